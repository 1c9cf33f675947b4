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
"""``{"id", "role": "user"|"assistant", "text", "finish"}``; assistant messages also carry
``reply_to``, ``model``, ``usage`` and ``error`` (null until their ``end``)."""


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

Turn = tuple[int, str, str]
"""``(offset, role, text)`` of one message a prompt may use: the offset where the record
that began it starts (a record boundary), ``"user"`` or ``"assistant"``, and its text."""


class Folded:
    """The conversation folded from its records, one record at a time: what
    :func:`messages` returns, kept up to date as records commit, so that a page of the
    newest messages or a prompt costs what it returns, not the log's length.

    Linear in what it folds: a reply's chunks are kept as pieces, joined :data:`PACK` at a
    time into blocks, and the blocks joined only when the message is read (then kept
    joined), never ``text += chunk`` per chunk.
    ``size`` counts the characters of text it holds (its memory, roughly).
    """

    def __init__(self) -> None:
        self._messages: list[Message] = []
        self._offsets: list[int] = []  # where the record that began each message starts
        self._index: dict[str, int] = {}  # message id -> position of its first message
        self._replies: dict[str, int] = {}  # reply id -> position of its latest start
        # reply position -> its text not joined yet: blocks of PACK pieces joined, then
        # the pieces since (one str object per chunk would cost ~50 bytes a chunk)
        self._pieces: dict[int, tuple[list[str], list[str]]] = {}
        self._ends: dict[int, tuple[int, int]] = {}  # reply position -> end's offset, ts
        self.size = 0
        """Characters of message text held."""

    def __len__(self) -> int:
        return len(self._messages)

    def observe(self, record: Record, offset: int = 0) -> None:
        """Fold one record that starts at byte ``offset`` of the log (see
        :func:`messages` for what each type does)."""
        kind = record["type"]
        if kind == "user":
            text = record["text"]
            self._add({"id": record["id"], "role": "user", "text": text, "finish": None}, offset)
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

    def _add(self, message: Message, offset: int) -> None:
        self._index.setdefault(message["id"], len(self._messages))
        self._messages.append(message)
        self._offsets.append(offset)

    def _reply(self, reply_id: Any) -> int | None:
        return self._replies.get(reply_id) if isinstance(reply_id, str) else None

    def _joined(self, position: int) -> Message:
        message = self._messages[position]
        pieces = self._pieces.pop(position, None)
        if pieces is not None:
            blocks, pending = pieces
            message["text"] += "".join(blocks) + "".join(pending)
        return message

    def message(self, position: int) -> Message:
        """A copy of the message at ``position`` (0 = the oldest)."""
        return dict(self._joined(position))

    def all(self) -> list[Message]:
        """Copies of every message, oldest first."""
        return [self.message(k) for k in range(len(self._messages))]

    def page(self, limit: int, before: str | None = None) -> tuple[list[Message], bool]:
        """The newest ``limit`` messages before the message ``before`` (``None``: the
        newest), oldest first, and whether older ones exist.

        :raises KeyError: ``before`` is no message id of this conversation.
        """
        end = len(self._messages) if before is None else self._index[before]
        start = max(0, end - max(0, limit))
        return [self.message(k) for k in range(start, end)], start > 0

    def replies(self) -> list[tuple[str, int, int | None, int | None]]:
        """Every reply, oldest first: ``(reply id, offset of its start record, offset of
        its end record or None, the end's ts (ms) or None)`` (for receipts: a reader was
        sent a whole reply once it was sent past its end record's offset)."""
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

    def turns_newest_first(self) -> Iterator[Turn]:
        """The messages a prompt may use, newest first (see :func:`prompt`): user texts,
        and texts of replies that ended other than in ``error`` and are not empty."""
        for position in range(len(self._messages) - 1, -1, -1):
            message = self._messages[position]
            if message["role"] == "user":
                yield self._offsets[position], "user", message["text"]
            elif message["finish"] is not None and message["finish"] != "error":
                text = self._joined(position)["text"]
                if text:
                    yield self._offsets[position], "assistant", text


def messages(records: Iterable[Record]) -> list[Message]:
    """Fold records into the ordered list of messages (:class:`Folded`, at once).

    ``user`` adds a user message; ``start`` adds an empty assistant message; ``chunk``
    appends its text to the reply with the same id; ``end`` sets ``finish``, ``usage`` and
    ``error``. Records of unknown type, and chunks or ends of unknown replies, are skipped.
    """
    folded = Folded()
    for record in records:
        folded.observe(record)
    return folded.all()


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
