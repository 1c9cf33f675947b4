"""Folds of the record stream (pure, no I/O).

Two views are folded from a log's records, in order:

* :class:`Summary`: what the store keeps in memory per log (title, times, the reply that
  is still open), updated one record at a time as records are appended or scanned.
* :class:`Folded` (and :func:`messages`, the same fold at once): the conversation as the
  page shows it and as prompts are built from it; an open log keeps one up to date.
  ``static/fold.js`` is the same fold in the browser; the two must agree, and
  ``tests/fold_fixtures.json`` (run through both by ``tests/test_fold.py``) checks they do.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from .records import Record

__all__ = ["Folded", "Message", "Summary", "Turn", "messages", "prompt"]

Message = dict[str, Any]
"""``{"id", "role": "user"|"assistant", "text", "finish", "parent", "siblings"}``
(``parent``: the id of the message it follows, null for a first message; ``siblings``: the
ids of the messages with the same parent, itself too, oldest first); assistant messages
also carry ``reply_to``, ``model``, ``usage`` and ``error`` (null until their ``end``)."""


@dataclass
class Summary:
    """Running metadata of one log.

    ``created``/``updated`` are ms timestamps of the first and last record;
    ``open_replies`` maps each reply id that has a ``start`` and no ``end`` to the index
    its next ``chunk`` must carry.
    """

    conversation_id: str | None = None
    owner: str | None = None
    """The account id in the ``conversation`` record (``None``: single-person mode, or a
    log written before accounts)."""
    title: str = ""
    model: str = ""
    system: str | None = None
    created: int = 0
    updated: int = 0
    records: int = 0
    user_messages: int = 0
    archived: bool = False
    """Whether the latest of ``archive`` / ``unarchive`` is an ``archive``."""
    open_replies: dict[str, int] = field(default_factory=dict)

    def observe(self, record: Record) -> None:
        """Advance the summary past one record. Unknown types only move ``updated``."""
        kind = record["type"]
        self.records += 1
        self.updated = record["ts"]
        if kind == "conversation":
            self.conversation_id = record.get("id")
            self.title = record.get("title") or ""
            self.model = record.get("model") or ""
            self.system = record.get("system")
            owner = record.get("owner")
            self.owner = owner if isinstance(owner, str) else None
            self.created = record["ts"]
        elif kind == "title":
            self.title = record.get("title") or ""
        elif kind == "user":
            self.user_messages += 1
        elif kind == "start":
            self.open_replies[record["id"]] = 0
        elif kind == "chunk":
            reply_id = record.get("id")
            if reply_id in self.open_replies:
                self.open_replies[reply_id] = record.get("i", 0) + 1
        elif kind == "end":
            self.open_replies.pop(record.get("id"), None)
        elif kind == "archive":
            self.archived = True
        elif kind == "unarchive":
            self.archived = False


PACK = 256
"""Chunks of a reply joined into one block as they are folded (see :class:`Folded`)."""

ROOT = -1
"""The parent position of a conversation's first messages."""
ORPHAN = -2
"""The parent position of a message that names a parent not in the log."""

Turn = tuple[int, str, str]
"""``(offset, role, text)`` of one message a prompt may use: the offset where the record
that began it starts (a record boundary), ``"user"`` or ``"assistant"``, and its text."""


class Folded:
    """The conversation folded from its records, one record at a time: a tree of messages
    (DESIGN.md "Branches, not overwrites") and its **current path**, kept up to date as
    records commit, so that a page of the newest messages of the path or a prompt costs
    what it returns, not the log's length.

    Each message has a parent: the id a ``user`` record's ``parent`` names (``null``: a
    first message), a ``start``'s ``reply_to``. A field that is absent reads as its
    default: an edit (``edit_of``) or another answer (``regenerate_of``) follows what the
    original follows; anything else follows the end of the current path (as every message
    of a log written before branches does). Siblings are the messages with the same
    parent, oldest first. A path goes up to a first message, or to one whose parent is no
    message of the log (then it starts there).

    The current path runs from the root to the **current leaf**: the newest message, or,
    when a ``select`` came after it, the newest message under the one that ``select``
    names (itself, when it has no children: a leaf). ``select`` of an unknown id changes
    nothing.

    Linear in what it folds: a reply's chunks are kept as pieces, joined :data:`PACK` at a
    time into blocks, and the blocks joined only when the message is read (then kept
    joined), never ``text += chunk`` per chunk.
    ``size`` counts the characters of text it holds (its memory, roughly).
    """

    def __init__(self) -> None:
        self._messages: list[Message] = []  # every message of every branch, in log order
        self._offsets: list[int] = []  # where the record that began each message starts
        self._parents: list[int] = []  # position of each message's parent, ROOT, ORPHAN
        # parent id (None: the first messages) -> positions of its children, oldest first
        # (its siblings, as shown); and position -> its children's positions (the tree
        # walked: a child's position is always past its parent's, so no walk can loop)
        self._children: dict[str | None, list[int]] = {}
        self._kids: dict[int, list[int]] = {}
        # select target -> (the newest message under it, messages folded when found)
        self._newest: dict[int, tuple[int, int]] = {}
        self._index: dict[str, int] = {}  # message id -> position of its first message
        self._replies: dict[str, int] = {}  # reply id -> position of its latest start
        # reply position -> its text not joined yet: blocks of PACK pieces joined, then
        # the pieces since (one str object per chunk would cost ~50 bytes a chunk)
        self._pieces: dict[int, tuple[list[str], list[str]]] = {}
        self._ends: dict[int, tuple[int, int]] = {}  # reply position -> end's offset, ts
        self._current = ROOT  # the current leaf's position (ROOT: no message yet)
        self.size = 0
        """Characters of message text held."""

    def __len__(self) -> int:
        """Messages of every branch."""
        return len(self._messages)

    @property
    def current(self) -> str | None:
        """The id of the current leaf (the last message of the current path), or ``None``
        when there is no message."""
        return None if self._current < 0 else self._messages[self._current]["id"]

    def observe(self, record: Record, offset: int = 0) -> None:
        """Fold one record that starts at byte ``offset`` of the log (see
        :func:`messages` for what each type does)."""
        kind = record["type"]
        if kind == "user":
            text = record["text"]
            parent = self._user_parent(record)
            self._add(
                {"id": record["id"], "role": "user", "text": text, "finish": None},
                offset,
                parent,
            )
            self.size += len(text)
        elif kind == "start":
            self._add(
                {
                    "id": record["id"],
                    "role": "assistant",
                    "text": "",
                    "finish": None,
                    "reply_to": record.get("reply_to"),
                    "model": record.get("model"),
                    "usage": None,
                    "error": None,
                },
                offset,
                self._reply_parent(record),
            )
            self._replies[record["id"]] = len(self._messages) - 1
        elif kind == "chunk":
            position = self._reply(record.get("id"))
            if position is not None:
                text = record.get("text", "")
                blocks, pending = self._pieces.setdefault(position, ([], []))
                pending.append(text)
                if len(pending) >= PACK:
                    blocks.append("".join(pending))
                    pending.clear()
                self.size += len(text)
        elif kind == "end":
            position = self._reply(record.get("id"))
            if position is not None:
                reply = self._messages[position]
                reply["finish"] = record.get("finish")
                reply["usage"] = record.get("usage")
                reply["error"] = record.get("error")
                self._ends[position] = (offset, record["ts"])
        elif kind == "select":
            position = self._position(record.get("leaf"))
            if position is not None:
                self._current = self._newest_in(position)

    def _newest_in(self, position: int) -> int:
        """The newest message (the latest in the log) of the subtree under ``position``,
        itself included: a leaf, since its children would be newer."""
        known = self._newest.get(position)
        if known is not None and known[1] == len(self._messages):
            return known[0]  # nothing new since: the same (a select repeated costs O(1))
        newest, stack = position, [position]
        while stack:
            at = stack.pop()
            newest = max(newest, at)
            stack.extend(self._kids.get(at, ()))
        self._newest[position] = (newest, len(self._messages))
        return newest

    def _position(self, message_id: Any) -> int | None:
        return self._index.get(message_id) if isinstance(message_id, str) else None

    def _user_parent(self, record: Record) -> str | None:
        if "parent" in record and (record["parent"] is None or isinstance(record["parent"], str)):
            return record["parent"]
        original = self._position(record.get("edit_of"))
        if original is not None:
            return self._messages[original]["parent"]
        return self.current

    def _reply_parent(self, record: Record) -> str | None:
        if isinstance(record.get("reply_to"), str):
            return record["reply_to"]
        original = self._position(record.get("regenerate_of"))
        if original is not None:
            return self._messages[original]["parent"]
        return self.current

    def _add(self, message: Message, offset: int, parent: str | None) -> None:
        position = len(self._messages)
        # the parent is a message folded before this one (never itself, never a later
        # one): a log whose parents name each other, or an id twice, cannot make a loop
        above = ROOT if parent is None else self._index.get(parent, ORPHAN)
        message["parent"] = parent
        self._index.setdefault(message["id"], position)
        self._messages.append(message)
        self._offsets.append(offset)
        self._parents.append(above)
        self._children.setdefault(parent, []).append(position)
        if above >= 0:
            self._kids.setdefault(above, []).append(position)
        self._current = position

    def _reply(self, reply_id: Any) -> int | None:
        return self._replies.get(reply_id) if isinstance(reply_id, str) else None

    def _joined(self, position: int) -> Message:
        message = self._messages[position]
        pieces = self._pieces.pop(position, None)
        if pieces is not None:
            blocks, pending = pieces
            message["text"] += "".join(blocks) + "".join(pending)
        return message

    def _up(self, position: int) -> Iterator[int]:
        """``position`` and its ancestors, up to the first message of its path."""
        while position >= 0:
            yield position
            position = self._parents[position]

    def node(self, message_id: str) -> tuple[str, str | None] | None:
        """``(role, parent id)`` of the message ``message_id``, or ``None`` when no message
        of this conversation has that id."""
        position = self._position(message_id)
        if position is None:
            return None
        message = self._messages[position]
        return message["role"], message["parent"]

    def message(self, position: int) -> Message:
        """A copy of the message at ``position`` (0 = the oldest of any branch), with
        ``siblings``: the ids of the messages with its parent (itself too), oldest
        first."""
        copy = dict(self._joined(position))
        siblings = self._children[copy["parent"]]
        copy["siblings"] = [self._messages[k]["id"] for k in siblings]
        return copy

    def path(self) -> list[Message]:
        """Copies of the messages of the current path, oldest first."""
        positions = list(self._up(self._current))
        return [self.message(k) for k in reversed(positions)]

    def page(self, limit: int, before: str | None = None) -> tuple[list[Message], bool]:
        """The newest ``limit`` messages of the current path before the message
        ``before`` (``None``: the current leaf, included), oldest first, and whether
        older ones exist. A ``before`` off the current path pages through its own
        ancestors. Costs O(``limit``).

        :raises KeyError: ``before`` is no message id of this conversation.
        """
        start = self._current if before is None else self._parents[self._index[before]]
        # (ROOT or ORPHAN: nothing before it)
        positions: list[int] = []
        if limit > 0:
            for position in self._up(start):
                positions.append(position)
                if len(positions) == limit:
                    break
        more = (self._parents[positions[-1]] if positions else start) >= 0
        return [self.message(k) for k in reversed(positions)], more

    def replies(self) -> list[tuple[str, int, int | None, int | None]]:
        """Every reply of every branch, oldest first: ``(reply id, offset of its start
        record, offset of its end record or None, the end's ts (ms) or None)`` (for
        receipts: a reader was sent a whole reply once it was sent past its end record's
        offset)."""
        out = []
        for position, message in enumerate(self._messages):
            if message["role"] == "assistant":
                end = self._ends.get(position)
                out.append(
                    (
                        message["id"],
                        self._offsets[position],
                        end[0] if end else None,
                        end[1] if end else None,
                    )
                )
        return out

    def turns_newest_first(self, leaf: str | None = None) -> Iterator[Turn]:
        """The messages a prompt may use, newest first (see :func:`prompt`): user texts,
        and texts of replies that ended other than in ``error`` and are not empty, of the
        path up from ``leaf`` (a message id; ``None``: the current leaf).

        :raises KeyError: ``leaf`` is no message id of this conversation.
        """
        start = self._current if leaf is None else self._index[leaf]
        for position in self._up(start):
            message = self._messages[position]
            if message["role"] == "user":
                yield self._offsets[position], "user", message["text"]
            elif message["finish"] is not None and message["finish"] != "error":
                text = self._joined(position)["text"]
                if text:
                    yield self._offsets[position], "assistant", text


def messages(records: Iterable[Record]) -> list[Message]:
    """Fold records into the messages of the current path, oldest first
    (:class:`Folded`, at once).

    ``user`` adds a user message; ``start`` adds an empty assistant message; ``chunk``
    appends its text to the reply with the same id; ``end`` sets ``finish``, ``usage`` and
    ``error``; ``select`` moves the current path. Records of unknown type, and chunks or
    ends of unknown replies, are skipped. Every message also carries ``parent`` (id or
    null) and ``siblings`` (see :meth:`Folded.message`).
    """
    folded = Folded()
    for record in records:
        folded.observe(record)
    return folded.path()


def prompt(system: str | None, folded: Iterable[Message]) -> list[dict[str, str]]:
    """Chat Completions ``messages`` for the next reply.

    The ``system`` text (if any), then user texts and the texts of *finished* assistant
    replies (those with an ``end``; an empty or failed reply is left out), in log order.
    """
    out: list[dict[str, str]] = []
    if system:
        out.append({"role": "system", "content": system})
    for message in folded:
        if message["role"] == "user":
            out.append({"role": "user", "content": message["text"]})
        elif message["finish"] is not None and message["finish"] != "error" and message["text"]:
            out.append({"role": "assistant", "content": message["text"]})
    return out
