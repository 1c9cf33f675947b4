"""Record types of the conversation log and their byte encoding (pure, no I/O).

A record is a JSON object on one line: serialized with orjson, UTF-8, ending in ``\\n``
(DESIGN.md "The log"). Every record has ``type`` (str) and ``ts`` (int, milliseconds since
the Unix epoch, UTC). orjson escapes control characters inside strings, so an encoded
record never contains a raw newline before its terminator.
"""

from __future__ import annotations

import time
from typing import Any, Final, Literal

import orjson

__all__ = [
    "FINISH_REASONS",
    "RECORD_TYPES",
    "Record",
    "RecordError",
    "chunk",
    "conversation",
    "decode",
    "decode_all",
    "encode",
    "end",
    "archive",
    "now_ms",
    "select",
    "start",
    "title",
    "unarchive",
    "user",
]

Record = dict[str, Any]
"""A decoded record: a JSON object with at least ``type`` (str) and ``ts`` (int ms)."""

RECORD_TYPES: Final = frozenset(
    {"conversation", "user", "start", "chunk", "end", "title", "select", "archive"}
    | {"unarchive", "seal"}
)
"""The record types this version writes. Readers skip types they do not know."""

FINISH_REASONS: Final = frozenset({"stop", "length", "cancelled", "error", "interrupted"})
"""Values of ``end.finish``."""


class RecordError(ValueError):
    """A line is not a valid record: not UTF-8 JSON, not an object, or missing
    ``type`` (str) / ``ts`` (int)."""


def now_ms() -> int:
    """Current time in integer milliseconds since the Unix epoch (UTC)."""
    return time.time_ns() // 1_000_000


def encode(record: Record) -> bytes:
    """Serialize one record to its line: orjson bytes followed by ``b"\\n"``.

    :raises RecordError: if the record lacks ``type``/``ts`` or is not serializable.
    """
    if not isinstance(record.get("type"), str) or not _is_int(record.get("ts")):
        raise RecordError("a record needs a string 'type' and an integer 'ts'")
    try:
        return orjson.dumps(record, option=orjson.OPT_APPEND_NEWLINE)
    except orjson.JSONEncodeError as exc:
        raise RecordError(f"record is not serializable: {exc}") from None


def decode(line: bytes | bytearray | memoryview) -> Record:
    """Parse one line (with or without its trailing ``\\n``) into a record.

    :raises RecordError: if the line is not a JSON object with ``type`` (str) and
        ``ts`` (int). NUL bytes and invalid UTF-8 are errors too.
    """
    try:
        value = orjson.loads(line)
    except orjson.JSONDecodeError as exc:
        raise RecordError(f"not valid JSON: {exc}") from None
    if not isinstance(value, dict):
        raise RecordError("not a JSON object")
    if not isinstance(value.get("type"), str) or not _is_int(value.get("ts")):
        raise RecordError("missing string 'type' or integer 'ts'")
    return value


def decode_all(data: bytes) -> list[Record]:
    """Parse a block of whole records (each line ending in ``\n``).

    :raises RecordError: a line is not a valid record.
    """
    return [decode(line) for line in data.splitlines()]


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


# Constructors: one per record type of DESIGN.md "Record types". ``ts`` is taken when the
# record is built, immediately before it is appended.


def conversation(
    *,
    conversation_id: str,
    title: str,
    model: str,
    system: str | None,
    owner: str | None = None,
) -> Record:
    """First record of every log. ``owner`` is the account id of whoever created it
    (absent in single-person mode, and in logs written before accounts)."""
    record: Record = {
        "type": "conversation",
        "ts": now_ms(),
        "id": conversation_id,
        "title": title,
        "model": model,
        "system": system,
    }
    if owner is not None:
        record["owner"] = owner
    return record


def user(
    *,
    message_id: str,
    text: str,
    parent: str | Literal["previous"] | None = "previous",
    edit_of: str | None = None,
    by: str | None = None,
) -> Record:
    """A message a person sent. ``parent`` is the id of the message it follows (``None``
    for the first of a conversation; ``"previous"``, the default, leaves the field out:
    the message then follows the end of the current path, as in logs written before
    branches); ``edit_of`` the id of the ``user`` message it is an
    edited copy of (same ``parent``), absent when it is none; ``by`` the sender's account
    id (absent in single-person mode). DESIGN.md "Branches, not overwrites"."""
    record: Record = {
        "type": "user",
        "ts": now_ms(),
        "id": message_id,
        "text": text,
    }
    if parent != "previous":
        record["parent"] = parent
    if edit_of is not None:
        record["edit_of"] = edit_of
    if by is not None:
        record["by"] = by
    return record


def start(
    *,
    reply_id: str,
    reply_to: str,
    model: str,
    context: int | None = None,
    prompt_tokens: int | None = None,
    regenerate_of: str | None = None,
) -> Record:
    """An assistant reply begins. ``context`` is the offset of the first record whose
    text the prompt used (past the system text, always used), ``prompt_tokens`` the
    prompt's size in tokens as counted; both ``None`` when no prompt was built (the reply
    was stopped first, or its message does not fit the model's context).
    ``regenerate_of`` is the reply this one is another answer to (absent when none)."""
    record: Record = {
        "type": "start",
        "ts": now_ms(),
        "id": reply_id,
        "reply_to": reply_to,
        "model": model,
        "context": context,
        "prompt_tokens": prompt_tokens,
    }
    if regenerate_of is not None:
        record["regenerate_of"] = regenerate_of
    return record


def chunk(*, reply_id: str, i: int, text: str) -> Record:
    """One piece of model output (``i`` is 0-based within the reply)."""
    return {"type": "chunk", "ts": now_ms(), "id": reply_id, "i": i, "text": text}


def end(
    *,
    reply_id: str,
    finish: str,
    usage: dict[str, Any] | None = None,
    error: str | None = None,
) -> Record:
    """The reply is over. ``finish`` is one of :data:`FINISH_REASONS`.

    :raises ValueError: for an unknown ``finish``.
    """
    if finish not in FINISH_REASONS:
        raise ValueError(f"unknown finish {finish!r}")
    return {
        "type": "end",
        "ts": now_ms(),
        "id": reply_id,
        "finish": finish,
        "usage": usage,
        "error": error,
    }


def title(*, title: str) -> Record:
    """The conversation was renamed."""
    return {"type": "title", "ts": now_ms(), "title": title}


def select(*, leaf: str) -> Record:
    """The person chose which branch is current: the path through message ``leaf``."""
    return {"type": "select", "ts": now_ms(), "leaf": leaf}


def archive(*, by: str | None = None) -> Record:
    """Hidden from lists, never deleted (``by``: the account id, absent in single-person
    mode)."""
    record: Record = {"type": "archive", "ts": now_ms()}
    if by is not None:
        record["by"] = by
    return record


def unarchive(*, by: str | None = None) -> Record:
    """Listed again after an :func:`archive`."""
    record: Record = {"type": "unarchive", "ts": now_ms()}
    if by is not None:
        record["by"] = by
    return record
