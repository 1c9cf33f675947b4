"""``chatledger import``: conversations from other chat apps, and chatledger's own logs,
written as new logs of a data dir (DESIGN.md "Export and import").

Formats, told apart by their content (:func:`plan`):

* **chatledger JSONL** (a log, e.g. from ``chatledger export --format jsonl``): every line
  a record (:func:`storage.records.decode`), the first a ``conversation`` record, and the
  whole log as ``chatledger verify`` would pass it (:func:`storage.verify.verify_log`;
  its seals must match). Its bytes become the log as they are, under its own id, so its
  seals stay valid; an id the data dir has already is refused. The owner is in its first
  record and cannot change with the bytes unchanged: it must be the ``--owner`` account
  (or absent, for the first parent or a single-person data dir).
* **ChatGPT** ``conversations.json`` (a list of conversations, each a tree ``mapping``
  of nodes ``{id, parent, children, message}`` and a ``current_node``), and
* **Open WebUI** chat exports (a list of chats, or one, each with
  ``chat.history.messages`` ``{id: {id, parentId, childrenIds, role, content,
  timestamp}}`` and ``chat.history.currentId``).

From the two trees, every branch is kept as chatledger branches (DESIGN.md "Branches, not
overwrites"): among the user messages that follow the same message, each after the first
(oldest first) is a ``user`` record with ``edit_of`` the one before it and ``parent``
their parent; among the answers to one user message, each after the first is a ``start``
with ``regenerate_of`` the one before it. The current thread (``current_node``,
``currentId``) is the last ``select`` record when the conversation has branches. Nodes
that are not a visible text message are skipped and counted by reason: ``system``,
``tool`` (a tool's output), ``tool call`` (an assistant message addressed to a tool),
``hidden`` (``metadata.is_visually_hidden_from_conversation``), ``non-text
(<content_type>)`` and ``empty``; a skipped node's children follow its nearest kept
ancestor. (A tree's empty root, a node with no message, is structure, not counted.)
A reply made of several assistant messages in a row (a tool call between them) is one
reply, one chunk per message; an answer whose continuation branched is one reply per
branch, each with the whole text of its branch.

Message ids are the source's where they are valid chatledger ids (``[A-Za-z0-9_-]{1,64}``,
as UUIDs are), else new ones. Records are built with :mod:`storage.records` (one chunk per
message), with ``ts`` from the source's times where known and never going back
(``chatledger verify`` requires it), and sealed as the writer seals (after every ``end``,
and at the end of the log). The ``conversation`` record also says where it came from:
``source: {"format": "chatgpt" | "open-webui", "id": <the source's conversation id>}``.

**Nothing is written unless everything is valid** (:class:`ImportRefusedError`, one line
naming what is wrong and where). Then each log is written as a new file, durably and
atomically (:func:`write`): its bytes go to a temporary name the server never looks at
(``<id>.jsonl.import-<hex>``), are ``fdatasync``ed, and the file is renamed to
``<id>.jsonl`` without replacing anything (``renameat2(RENAME_NOREPLACE)``; else a hard
link and an unlink), then ``conversations/`` is ``fsync``ed. So a running server (which
holds the data dir's lock, and keeps it) never sees a part of a log: a conversation
appears whole, in its next list.
"""

from __future__ import annotations

import collections
import ctypes
import errno
import hashlib
import heapq
import itertools
import math
import os
import secrets
import stat
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, NoReturn

import orjson

from . import records
from .durability import FileIO
from .errors import CorruptLogError, InvalidIdError
from .household import Household, HouseholdState
from .recovery import open_own
from .seal import SEAL_EVERY, seal_record
from .store import CONVERSATION_ID, SUFFIX, check_id, new_id
from .verify import verify_log

__all__ = [
    "CHATGPT",
    "CHATLEDGER",
    "OPEN_WEBUI",
    "ImportRefusedError",
    "Plan",
    "Planned",
    "check_owner",
    "plan",
    "resolve_owner",
    "run",
    "write",
]

CHATGPT: Final = "ChatGPT export"
OPEN_WEBUI: Final = "Open WebUI export"
CHATLEDGER: Final = "chatledger log"

MAX_TITLE_CHARS: Final = 200
"""As ``POST /api/conversations`` allows."""


class ImportRefusedError(ValueError):
    """Nothing was (or, for a failed write, nothing more was) imported: ``str()`` is one
    line saying what is wrong and where."""


@dataclass
class Planned:
    """One conversation ready to be written: its log's bytes and what they hold."""

    conversation_id: str
    title: str
    data: bytes
    source_id: str | None = None
    owner: str | None = None
    messages: int = 0
    edits: int = 0
    regenerations: int = 0
    skipped: collections.Counter[str] = field(default_factory=collections.Counter)
    warnings: list[str] = field(default_factory=list)

    @property
    def branches(self) -> int:
        return self.edits + self.regenerations


@dataclass
class Plan:
    """What a file holds (:func:`plan`): its format and its conversations."""

    format: str
    conversations: list[Planned]

    @property
    def skipped(self) -> collections.Counter[str]:
        total: collections.Counter[str] = collections.Counter()
        for planned in self.conversations:
            total.update(planned.skipped)
        return total


# -- detection -----------------------------------------------------------------------------


def plan(
    data: bytes,
    *,
    owner: str | None = None,
    seal_key: bytes | None = None,
    where: str = "the file",
) -> Plan:
    """Read a file's bytes into conversations ready to write, validating everything.

    :param owner: the account id the conversations get (``None``: single-person mode);
        for a chatledger log see :func:`check_owner`.
    :param seal_key: the HMAC key the new logs' seals carry (the server's ``--seal-key``).
    :param where: how messages name the file.
    :raises ImportRefusedError: the file is not one of the formats, or is malformed.
    """
    if not data.strip():
        raise ImportRefusedError(f"{where}: the file is empty")
    first = data.split(b"\n", 1)[0]
    try:
        head = records.decode(first)
    except records.RecordError:
        head = None
    if head is not None and head["type"] == "conversation":
        return Plan(CHATLEDGER, [_chatledger(data, where)])
    try:
        value = orjson.loads(data)
    except orjson.JSONDecodeError as exc:
        if head is not None:
            raise ImportRefusedError(
                f"{where}: line 1: the first record is {head['type']!r}; a chatledger log"
                " begins with its 'conversation' record"
            ) from None
        if _records_follow(data):
            try:
                records.decode(first)
            except records.RecordError as bad:
                raise ImportRefusedError(f"{where}: line 1 (byte 0): {bad}") from None
        raise ImportRefusedError(f"{where}: not valid JSON ({exc})") from None
    items = value if isinstance(value, list) else [value]
    if not items:
        raise ImportRefusedError(f"{where}: an empty list, no conversation in it")
    kinds = set()
    for number, item in enumerate(items, 1):
        kind = _kind(item)
        if kind is None:
            what = f"item {number}" if isinstance(value, list) else "the file"
            raise ImportRefusedError(
                f"{where}: {what} is neither a ChatGPT conversation (an object with"
                " 'mapping') nor an Open WebUI chat (with 'chat.history.messages'),"
                " nor a chatledger log (its first line a 'conversation' record)"
            )
        kinds.add(kind)
    if len(kinds) > 1:
        raise ImportRefusedError(f"{where}: mixes ChatGPT conversations and Open WebUI chats")
    kind = kinds.pop()
    convert = _chatgpt if kind == CHATGPT else _open_webui
    planned = [
        convert(item, f"{where}: conversation {number}", owner, seal_key)
        for number, item in enumerate(items, 1)
    ]
    return Plan(kind, planned)


def _records_follow(data: bytes) -> bool:
    """Whether one of the lines after the first few is a record: a chatledger log whose
    first line is damaged, rather than a JSON document."""
    for line in data.split(b"\n", 6)[1:6]:
        try:
            records.decode(line)
        except records.RecordError:
            continue
        return True
    return False


def _kind(item: Any) -> str | None:
    if not isinstance(item, dict):
        return None
    if "mapping" in item:
        return CHATGPT
    chat = item.get("chat") if isinstance(item.get("chat"), dict) else item
    if isinstance(chat.get("history"), dict):
        return OPEN_WEBUI
    return None


# -- chatledger's own logs -----------------------------------------------------------------


def _chatledger(data: bytes, where: str) -> Planned:
    lines = data.split(b"\n")
    if lines[-1]:
        raise ImportRefusedError(
            f"{where}: line {len(lines)} (byte {len(data) - len(lines[-1])}) has no newline"
            " at its end (a torn tail?)"
        )
    lines.pop()
    offset = 0
    recs = []
    for number, line in enumerate(lines, 1):
        try:
            recs.append(records.decode(line))
        except records.RecordError as exc:
            raise ImportRefusedError(f"{where}: line {number} (byte {offset}): {exc}") from None
        offset += len(line) + 1
    first = recs[0]
    try:
        conversation_id = check_id(first.get("id"))  # type: ignore[arg-type]
    except InvalidIdError:
        raise ImportRefusedError(
            f"{where}: line 1: the conversation id {first.get('id')!r} is not a valid id"
            " (^[A-Za-z0-9_-]{1,64}$)"
        ) from None
    report = verify_log(conversation_id, (line + b"\n" for line in lines))
    if report.problems:
        raise ImportRefusedError(f"{where}: not a valid chatledger log: {report.problems[0]}")
    owner = first.get("owner")
    return Planned(
        conversation_id=conversation_id,
        title=first.get("title") if isinstance(first.get("title"), str) else "",
        data=data,
        source_id=conversation_id,
        owner=owner if isinstance(owner, str) else None,
        messages=sum(r["type"] in ("user", "start") for r in recs),
        edits=sum(r["type"] == "user" and r.get("edit_of") is not None for r in recs),
        regenerations=sum(
            r["type"] == "start" and r.get("regenerate_of") is not None for r in recs
        ),
        warnings=list(report.warnings),
    )


def check_owner(planned: Planned, owner: str | None, state: HouseholdState) -> None:
    """Whether a chatledger log may be imported for ``owner`` (an account id, ``None`` in
    single-person mode): its bytes, owner included, stay as they are, so its owner must
    be that account; a log with no owner belongs to the first parent.

    :raises ImportRefusedError: it would belong to someone else.
    """
    if not state.accounts:
        return  # single-person mode: the one person owns every conversation
    first = state.first_parent()
    effective = planned.owner if planned.owner is not None else (first.id if first else None)
    if effective == owner:
        return
    account = state.accounts.get(effective or "")
    if planned.owner is None:
        whose = f"the first parent ({first.name!r})" if first is not None else "no one here"
        whose = f"no owner in it, so it would belong to {whose}"
    elif account is not None:
        whose = f"it belongs to account {account.name!r}"
    else:
        whose = f"it belongs to account {planned.owner!r}, not in this household"
    raise ImportRefusedError(
        f"the log of conversation {planned.conversation_id} has {whose}, not to the --owner;"
        " its bytes (and seals) are imported unchanged, so its owner cannot change"
    )


# -- trees: ChatGPT and Open WebUI ---------------------------------------------------------


@dataclass
class _Node:
    id: str
    parent: str | None
    children: list[str]
    order: int
    role: str | None = None
    text: str = ""
    time: int | None = None
    skip: str | None = None  # why it is skipped; "" for structure (not counted)
    model: str | None = None
    finish: str = "stop"
    error: str | None = None


@dataclass
class _Source:
    """A conversation tree, as both formats give one."""

    where: str
    title: str
    source_id: str | None
    format: str
    created: int | None
    model: str
    system: str | None
    nodes: dict[str, _Node]
    current: str | None


def _fail(where: str) -> Callable[[str], NoReturn]:
    def bad(what: str) -> NoReturn:
        raise ImportRefusedError(f"{where}: {what}")

    return bad


def _ms(value: Any, bad: Callable[[str], NoReturn], what: str) -> int | None:
    """A time in ms from seconds (or ms, for values past 1e11: year 5138 in seconds)."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        bad(f"{what} is not a number")
    if not math.isfinite(value) or value < 0:
        bad(f"{what} is not a time")
    ms = round(value * 1000 if value < 1e11 else value)
    if ms >= 1 << 53:
        bad(f"{what} is not a time")
    return ms


def _label(where: str, title: str) -> str:
    shown = " ".join(title.split())
    shown = shown if len(shown) <= 40 else shown[:39] + "…"
    return f"{where} (“{shown}”)" if shown else where


def _text_of(value: Any, bad: Callable[[str], NoReturn], what: str, default: str = "") -> str:
    if value is None:
        return default
    if not isinstance(value, str):
        bad(f"{what} is not a string")
    return value


def _chatgpt(item: dict[str, Any], where: str, owner: str | None, key: bytes | None) -> Planned:
    title = item.get("title") if isinstance(item.get("title"), str) else ""
    where = _label(where, title)
    bad = _fail(where)
    mapping = item.get("mapping")
    if not isinstance(mapping, dict):
        bad("'mapping' is not an object")
    nodes: dict[str, _Node] = {}
    models: list[str] = []
    for order, (node_id, raw) in enumerate(mapping.items()):
        here = f"node {node_id!r}"
        if not isinstance(raw, dict):
            bad(f"{here} is not an object")
        parent = raw.get("parent")
        if parent is not None and not isinstance(parent, str):
            bad(f"{here}: 'parent' is not a string or null")
        children = raw.get("children") or []
        if not isinstance(children, list) or not all(isinstance(c, str) for c in children):
            bad(f"{here}: 'children' is not a list of ids")
        node = _Node(node_id, parent, children, order)
        nodes[node_id] = node
        message = raw.get("message")
        if message is None:
            node.skip = ""
            continue
        if not isinstance(message, dict):
            bad(f"{here}: 'message' is not an object")
        author = message.get("author") or {}
        content = message.get("content") or {}
        metadata = message.get("metadata") or {}
        for name, part in (("author", author), ("content", content), ("metadata", metadata)):
            if not isinstance(part, dict):
                bad(f"{here}: 'message.{name}' is not an object")
        node.role = author.get("role") if isinstance(author.get("role"), str) else None
        node.time = _ms(message.get("create_time"), bad, f"{here}: 'create_time'")
        slug = metadata.get("model_slug")
        node.model = slug if isinstance(slug, str) and slug else None
        if node.model and node.role == "assistant":
            models.append(node.model)
        details = metadata.get("finish_details")
        kind = details.get("type") if isinstance(details, dict) else None
        node.finish = {"max_tokens": "length", "interrupted": "cancelled"}.get(str(kind), "stop")
        content_type = content.get("content_type")
        parts = content.get("parts")
        if node.role == "system":
            node.skip = "system"
        elif node.role == "tool":
            node.skip = "tool"
        elif node.role not in ("user", "assistant"):
            node.skip = f"role {node.role}" if node.role else "no role"
        elif metadata.get("is_visually_hidden_from_conversation"):
            node.skip = "hidden"
        elif message.get("recipient") not in (None, "all"):
            node.skip = "tool call"
        elif content_type != "text":
            node.skip = f"non-text ({content_type})"
        elif not isinstance(parts, list):
            bad(f"{here}: 'content.parts' is not a list")
        elif not all(isinstance(p, str) for p in parts):
            node.skip = "non-text (text with attachments)"
        else:
            node.text = "\n\n".join(p for p in parts if p)
            if not node.text.strip():
                node.skip = "empty"
    current = item.get("current_node")
    if current is not None and not isinstance(current, str):
        bad("'current_node' is not a string")
    default_model = item.get("default_model_slug")
    model = default_model if isinstance(default_model, str) and default_model else None
    source_id = item.get("conversation_id", item.get("id"))
    return _build(
        _Source(
            where=where,
            title=title,
            source_id=source_id if isinstance(source_id, str) else None,
            format="chatgpt",
            created=_ms(item.get("create_time"), bad, "'create_time'"),
            model=model or (models[0] if models else "chatgpt"),
            system=None,
            nodes=nodes,
            current=current,
        ),
        owner,
        key,
    )


def _open_webui(item: dict[str, Any], where: str, owner: str | None, key: bytes | None) -> Planned:
    chat = item["chat"] if isinstance(item.get("chat"), dict) else item
    title = next(
        (t for t in (item.get("title"), chat.get("title")) if isinstance(t, str) and t), ""
    )
    where = _label(where, title)
    bad = _fail(where)
    history = chat["history"]
    messages = history.get("messages")
    if not isinstance(messages, dict):
        bad("'chat.history.messages' is not an object")
    nodes: dict[str, _Node] = {}
    for order, (message_id, raw) in enumerate(messages.items()):
        here = f"message {message_id!r}"
        if not isinstance(raw, dict):
            bad(f"{here} is not an object")
        parent = raw.get("parentId")
        if parent is not None and not isinstance(parent, str):
            bad(f"{here}: 'parentId' is not a string or null")
        children = raw.get("childrenIds") or []
        if not isinstance(children, list) or not all(isinstance(c, str) for c in children):
            bad(f"{here}: 'childrenIds' is not a list of ids")
        role = raw.get("role")
        node = _Node(
            message_id, parent, children, order, role=role if isinstance(role, str) else None
        )
        nodes[message_id] = node
        node.time = _ms(raw.get("timestamp"), bad, f"{here}: 'timestamp'")
        model = raw.get("model")
        node.model = model if isinstance(model, str) and model else None
        content = raw.get("content")
        error = raw.get("error")
        if error:
            node.finish = "error"
            detail = error.get("content") if isinstance(error, dict) else error
            node.error = detail if isinstance(detail, str) and detail else "error"
        elif raw.get("done") is False:
            node.finish = "interrupted"
        if node.role == "system":
            node.skip = "system"
        elif node.role not in ("user", "assistant"):
            node.skip = f"role {node.role}" if node.role else "no role"
        elif not isinstance(content, str):
            node.skip = "non-text (content is no string)"
        else:
            node.text = content
            if not content.strip() and not (node.role == "assistant" and node.error):
                node.skip = "empty"
    current = history.get("currentId")
    if current is not None and not isinstance(current, str):
        bad("'chat.history.currentId' is not a string")
    models = chat.get("models")
    model = (
        models[0] if isinstance(models, list) and models and isinstance(models[0], str) else None
    )
    params = chat.get("params") if isinstance(chat.get("params"), dict) else {}
    system = next(
        (s for s in (chat.get("system"), params.get("system")) if isinstance(s, str) and s.strip()),
        None,
    )
    created = item.get("created_at", chat.get("timestamp"))
    source_id = item.get("id") or chat.get("id")
    return _build(
        _Source(
            where=where,
            title=title,
            source_id=source_id if isinstance(source_id, str) and source_id else None,
            format="open-webui",
            created=_ms(created, bad, "'created_at'"),
            model=model or next((n.model for n in nodes.values() if n.model), "open-webui"),
            system=system,
            nodes=nodes,
            current=current,
        ),
        owner,
        key,
    )


@dataclass
class _Reply:
    id: str
    path: list[str]
    attach: str | None  # the user message it answers (None: the conversation's first)
    regenerate_of: str | None = None


def _check_tree(source: _Source) -> None:
    """Every parent and child names a node; parents lead to a root (no cycle)."""
    bad = _fail(source.where)
    nodes = source.nodes
    for node in nodes.values():
        if node.parent is not None and node.parent not in nodes:
            bad(f"node {node.id!r}: its parent {node.parent!r} is not in the tree")
        for child in node.children:
            if child not in nodes:
                bad(f"node {node.id!r}: its child {child!r} is not in the tree")
    done: set[str] = set()
    for start in nodes:
        walk: list[str] = []
        on_walk: set[str] = set()
        at: str | None = start
        while at is not None and at not in done:
            if at in on_walk:
                bad(f"the tree has a cycle through node {at!r}")
            walk.append(at)
            on_walk.add(at)
            at = nodes[at].parent
        done.update(walk)
    if source.current is not None and source.current not in nodes:
        bad(f"the current message {source.current!r} is not in the tree")


def _build(source: _Source, owner: str | None, key: bytes | None) -> Planned:
    _check_tree(source)
    nodes = source.nodes
    kept = {n.id for n in nodes.values() if n.skip is None}

    # Times: a node's own, else its parent's (so it sorts right after it).
    times: dict[str, int] = {}

    def time_of(node_id: str) -> int:
        if node_id in times:
            return times[node_id]
        walk = []
        at: str | None = node_id
        while at is not None and at not in times and nodes[at].time is None:
            walk.append(at)
            at = nodes[at].parent
        if at is None:
            base = source.created or 0
        elif at in times:
            base = times[at]
        else:
            base = times[at] = nodes[at].time  # type: ignore[assignment]
        for step in walk:
            times[step] = base
        return times[node_id]

    # The kept node each kept node follows (through skipped ones), and kept children.
    kept_parent: dict[str, str | None] = {}
    for node_id in kept:
        at = nodes[node_id].parent
        while at is not None and at not in kept:
            at = nodes[at].parent
        kept_parent[node_id] = at
    position: dict[str, int] = {}
    for node in nodes.values():
        for index, child in enumerate(node.children):
            position.setdefault(child, index)

    def sort_key(node_id: str) -> tuple[int, int, int]:
        return (time_of(node_id), position.get(node_id, 0), nodes[node_id].order)

    kids: dict[str | None, list[str]] = collections.defaultdict(list)
    for node_id in sorted(kept, key=sort_key):
        kids[kept_parent[node_id]].append(node_id)

    def role(node_id: str | None) -> str | None:
        return nodes[node_id].role if node_id is not None else None

    # Replies: each branch of consecutive assistant messages below a user message (or
    # the root) is one reply, named by its last message.
    replies: list[_Reply] = []
    heads = [n for group in kids.values() for n in group if role(n) == "assistant"]
    for head in heads:
        attach = kept_parent[head]
        if role(attach) == "assistant":
            continue  # a continuation, inside its head's reply
        stack: list[tuple[str, list[str]]] = [(head, [head])]
        while stack:
            at, path = stack.pop()
            following = kids.get(at, [])
            more = [c for c in following if role(c) == "assistant"]
            if not more or any(role(c) == "user" for c in following):
                replies.append(_Reply(at, path, attach))
            stack.extend((c, [*path, c]) for c in reversed(more))
    reply_ids = {r.id for r in replies}

    def reply_key(reply: _Reply) -> tuple[int, int, int]:
        return (max(time_of(n) for n in reply.path), *sort_key(reply.id)[1:])

    by_attach: dict[str | None, list[_Reply]] = collections.defaultdict(list)
    for reply in replies:
        by_attach[reply.attach].append(reply)
    regenerations = 0
    for group in by_attach.values():
        group.sort(key=reply_key)
        for before, reply in itertools.pairwise(group):
            reply.regenerate_of = before.id
            regenerations += 1

    # Users: each after the first that follow the same message is an edit of the one
    # before it.
    users = [n for n in kept if role(n) == "user"]
    parent_of: dict[str, str | None] = {}
    edit_of: dict[str, str] = {}
    for user in users:
        parent = kept_parent[user]
        if parent is not None and role(parent) == "assistant" and parent not in reply_ids:
            raise AssertionError(f"{parent} ends a reply: it has a user child")
        parent_of[user] = parent
    for siblings in kids.values():
        following = [n for n in siblings if role(n) == "user"]
        for before, user in itertools.pairwise(following):
            edit_of[user] = before

    # Order: parents before children, earlier siblings before later ones, else by time.
    items: dict[str, tuple[tuple[int, int, int], list[str]]] = {}
    for user in users:
        deps = [d for d in (parent_of[user], edit_of.get(user)) if d is not None]
        items[user] = (sort_key(user), deps)
    for reply in replies:
        deps = [d for d in (reply.attach, reply.regenerate_of) if d is not None]
        items[reply.id] = (reply_key(reply), deps)
    ordered = _topological(items)

    # Records.
    recs: list[records.Record] = []
    last = source.created if source.created is not None else None
    if last is None:
        known = [t for n in kept if (t := nodes[n].time) is not None]
        last = min(known) if known else records.now_ms()

    def at(record: records.Record, when: int | None) -> records.Record:
        nonlocal last
        last = max(last, when if when is not None else last)
        record["ts"] = last
        recs.append(record)
        return record

    # Message ids: the source's where they are valid chatledger ids, else new ones.
    fresh: dict[str, str] = {}

    def ident(node_id: str | None) -> str | None:
        if node_id is None or CONVERSATION_ID.fullmatch(node_id):
            return node_id
        if node_id not in fresh:
            made = new_id()
            while made in nodes or made in fresh.values():
                made = new_id()
            fresh[node_id] = made
        return fresh[node_id]

    conversation_id = new_id()
    first = records.conversation(
        conversation_id=conversation_id,
        title=source.title[:MAX_TITLE_CHARS],
        model=source.model,
        system=source.system,
        owner=owner,
    )
    first["source"] = {"format": source.format, "id": source.source_id}
    at(first, source.created)
    by_reply = {r.id: r for r in replies}
    for item in ordered:
        if item in by_reply:
            reply = by_reply[item]
            model = next((nodes[n].model for n in reply.path if nodes[n].model), source.model)
            reply_id = ident(reply.id)
            assert reply_id is not None
            start = records.start(reply_id=reply_id, reply_to=ident(reply.attach), model=model)  # type: ignore[arg-type]
            if reply.regenerate_of is not None:
                start["regenerate_of"] = ident(reply.regenerate_of)
            at(start, nodes[reply.path[0]].time)
            index = 0
            for node_id in reply.path:
                node = nodes[node_id]
                if node.text:
                    text = node.text if index == 0 else "\n\n" + node.text
                    at(records.chunk(reply_id=reply_id, i=index, text=text), node.time)
                    index += 1
            tail = nodes[reply.path[-1]]
            at(records.end(reply_id=reply_id, finish=tail.finish, error=tail.error), tail.time)
        else:
            node = nodes[item]
            user = records.user(message_id=ident(item), text=node.text, by=owner)  # type: ignore[arg-type]
            user["parent"] = ident(parent_of[item])
            if item in edit_of:
                user["edit_of"] = ident(edit_of[item])
            at(user, node.time)
    edits = len(edit_of)
    if (edits or regenerations) and source.current is not None:
        leaf = _current_leaf(source.current, nodes, kept, kids, reply_ids, role)
        if leaf is not None:
            at({"type": "select", "ts": 0, "leaf": ident(leaf)}, None)
    data = _sealed(recs, key)
    report = verify_log(conversation_id, _lines(data), key=key)
    if report.problems:  # a bug here, never the file's fault
        raise ImportRefusedError(
            f"{source.where}: the log made of it would not verify ({report.problems[0]});"
            " nothing imported"
        )
    skipped = collections.Counter(n.skip for n in nodes.values() if n.skip)
    return Planned(
        conversation_id=conversation_id,
        title=source.title[:MAX_TITLE_CHARS],
        data=data,
        source_id=source.source_id,
        owner=owner,
        messages=len(users) + len(replies),
        edits=edits,
        regenerations=regenerations,
        skipped=skipped,  # type: ignore[arg-type]
    )


def _current_leaf(
    current: str,
    nodes: dict[str, _Node],
    kept: set[str],
    kids: dict[str | None, list[str]],
    reply_ids: set[str],
    role: Callable[[str | None], str | None],
) -> str | None:
    """The chatledger message the source's current node is: itself or its nearest kept
    ancestor; for an assistant message inside a reply, the reply it ends (the first)."""
    at: str | None = current
    while at is not None and at not in kept:
        at = nodes[at].parent
    while at is not None and role(at) == "assistant" and at not in reply_ids:
        at = next((c for c in kids.get(at, []) if role(c) == "assistant"), None)
    return at


def _topological(items: dict[str, tuple[tuple[int, int, int], list[str]]]) -> list[str]:
    """Items in an order where each follows its dependencies; among those ready, the
    smallest key first."""
    waiting = {name: len(deps) for name, (_, deps) in items.items()}
    after: dict[str, list[str]] = collections.defaultdict(list)
    for name, (_, deps) in items.items():
        for dep in deps:
            after[dep].append(name)
    ready = [(key, name) for name, (key, deps) in items.items() if not deps]
    heapq.heapify(ready)
    out = []
    while ready:
        _, name = heapq.heappop(ready)
        out.append(name)
        for follower in after.get(name, []):
            waiting[follower] -= 1
            if not waiting[follower]:
                heapq.heappush(ready, (items[follower][0], follower))
    assert len(out) == len(items), "dependencies of a tree cannot form a cycle"
    return out


def _lines(data: bytes) -> list[bytes]:
    """The lines of whole records, each with its newline (only ``\\n`` ends a line)."""
    return [line + b"\n" for line in data.split(b"\n")[:-1]]


def _sealed(recs: Iterable[records.Record], key: bytes | None) -> bytes:
    """The log's bytes with seals where the writer puts them (after every ``end``, and
    every :data:`~storage.seal.SEAL_EVERY` bytes), and one at the end; a seal's ``ts`` is
    the record's before it, so that ``ts`` never goes back."""
    out = bytearray()
    hashed = hashlib.sha256()
    sealed_at = 0
    ts = 0

    def seal() -> None:
        nonlocal sealed_at
        record = seal_record(len(out), hashed.digest(), key)
        record["ts"] = ts
        line = records.encode(record)
        out.extend(line)
        hashed.update(line)
        sealed_at = len(out)

    for record in recs:
        line = records.encode(record)
        out.extend(line)
        hashed.update(line)
        ts = record["ts"]
        if record["type"] == "end" or len(out) - sealed_at >= SEAL_EVERY:
            seal()
    if sealed_at < len(out):
        seal()
    return bytes(out)


# -- owner, writing ------------------------------------------------------------------------


def resolve_owner(data_dir: Path, name: str | None) -> tuple[str | None, HouseholdState]:
    """The account id the imported conversations belong to, and the household.

    :raises ImportRefusedError: accounts exist and ``name`` is none of them (or ``None``),
        or none exist and a ``name`` was given.
    """
    try:
        household = Household(data_dir)
    except (CorruptLogError, OSError) as exc:
        raise ImportRefusedError(f"cannot read the household's accounts: {exc}") from None
    try:
        state = household.state
    finally:
        household.close()
    if not state.accounts:
        if name is not None:
            raise ImportRefusedError(
                f"no account {name!r}: {data_dir} has no accounts (single-person mode);"
                " leave --owner out"
            )
        return None, state
    if name is None:
        raise ImportRefusedError(
            f"{data_dir} has accounts: say whose conversations these are with --owner NAME"
        )
    account = state.named(name)
    if account is None:
        raise ImportRefusedError(
            f"no account {name!r} in {data_dir} (chatledger user list shows them)"
        )
    return account.id, state


def write(
    conversations: list[Planned], data_dir: Path, *, file_io: FileIO | None = None
) -> list[Path]:
    """Write each conversation as a new log, durably and atomically (the module's
    docstring), in ``<data_dir>/conversations/``, made (``0700``) if missing.

    :returns: the paths written.
    :raises ImportRefusedError: a log with one of the ids exists (checked for all before
        any is written), ``conversations/`` is not a directory of ours, or a write
        failed (the message says which were written before it).
    """
    file_io = file_io or FileIO()
    directory = _directory(Path(data_dir), file_io)
    for planned in conversations:
        path = directory / f"{planned.conversation_id}{SUFFIX}"
        if os.path.lexists(path):
            raise ImportRefusedError(
                f"conversation {planned.conversation_id} exists already in {directory}"
                " (imported before?); nothing imported"
            )
    written: list[Path] = []
    for planned in conversations:
        path = directory / f"{planned.conversation_id}{SUFFIX}"
        try:
            _publish(path, planned.data, file_io)
        except OSError as exc:
            done = (
                f"{len(written)} of {len(conversations)} written before it"
                if written
                else "nothing written"
            )
            what = "exists already" if isinstance(exc, FileExistsError) else f"failed: {exc}"
            raise ImportRefusedError(
                f"writing conversation {planned.conversation_id} {what} ({done})"
            ) from None
        written.append(path)
    return written


def _directory(data_dir: Path, file_io: FileIO) -> Path:
    """``<data_dir>/conversations``, made if missing; a directory of ours (as the store
    requires), never a symbolic link."""
    directory = data_dir / "conversations"
    try:
        if not data_dir.exists():
            data_dir.mkdir(mode=0o700, parents=True)
            file_io.fsync_dir(data_dir.parent)
        if not os.path.lexists(directory):
            directory.mkdir(mode=0o700)
            file_io.fsync_dir(data_dir)
        info = os.lstat(directory)
    except OSError as exc:
        raise ImportRefusedError(f"cannot make {data_dir}/conversations: {exc}") from None
    if not stat.S_ISDIR(info.st_mode):
        raise ImportRefusedError(f"{directory} is not a directory (a symbolic link?)")
    if info.st_uid != os.geteuid():
        raise ImportRefusedError(f"{directory} is owned by another user")
    return directory


def _publish(path: Path, data: bytes, file_io: FileIO) -> None:
    """Write ``data`` to a new file at ``path``: a temporary name beside it first,
    written and synced, then renamed without replacing; then the directory synced."""
    temporary = path.with_name(f"{path.name}.import-{secrets.token_hex(6)}")
    fd = open_own(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL)
    try:
        try:
            file_io.write_all(fd, data)
            file_io.fdatasync(fd)
        finally:
            os.close(fd)
        _rename_no_replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    file_io.fsync_dir(path.parent)


_RENAME_NOREPLACE: Final = 1
_AT_FDCWD: Final = -100


def _rename_no_replace(source: Path, target: Path) -> None:
    """Rename ``source`` to ``target`` unless ``target`` exists (``FileExistsError``), in
    one step (``renameat2``); where the call or the file system lacks it, a hard link
    then an unlink (the target has two names for that moment)."""
    try:
        call = ctypes.CDLL(None, use_errno=True).renameat2
    except AttributeError:
        call = None
    if call is not None:
        call.argtypes = [
            ctypes.c_int,
            ctypes.c_char_p,
            ctypes.c_int,
            ctypes.c_char_p,
            ctypes.c_uint,
        ]
        call.restype = ctypes.c_int
        if (
            call(_AT_FDCWD, os.fsencode(source), _AT_FDCWD, os.fsencode(target), _RENAME_NOREPLACE)
            == 0
        ):
            return
        code = ctypes.get_errno()
        if code not in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP):
            raise OSError(code, os.strerror(code), str(target))
    os.link(source, target)  # FileExistsError if it exists
    os.unlink(source)


def run(
    file: Path,
    data_dir: Path,
    *,
    owner: str | None,
    seal_key: bytes | None = None,
    file_io: FileIO | None = None,
) -> tuple[Plan, list[Path]]:
    """``chatledger import FILE``: read, validate, then write every conversation.

    :param owner: the ``--owner`` account's name (``None``: none given).
    :raises ImportRefusedError: see :func:`resolve_owner`, :func:`plan`, :func:`write`.
    """
    try:
        data = Path(file).read_bytes()
    except OSError as exc:
        raise ImportRefusedError(f"cannot read {file}: {exc.strerror or exc}") from None
    owner_id, state = resolve_owner(Path(data_dir), owner)
    found = plan(data, owner=owner_id, seal_key=seal_key, where=str(file))
    if found.format == CHATLEDGER:
        check_owner(found.conversations[0], owner_id, state)
    return found, write(found.conversations, Path(data_dir), file_io=file_io)
