"""Server-Sent Events: start offsets and framing of log records as events (pure, no I/O).

Follows WHATWG HTML §9.2 "Server-sent events" (event stream format and interpretation):
lines end in ``\\n``; an event is its fields followed by a blank line; a line starting with
``:`` is a comment that clients ignore; ``retry:`` sets the reconnection time in ms; the
last ``id:`` seen is sent back by EventSource as the ``Last-Event-ID`` header on reconnect.

Each record of the log is one event (DESIGN.md "SSE stream")::

    id: <offset after the record>
    event: <record type>
    data: <the record's line, byte for byte, without its trailing newline>

Records never contain a raw ``\\n`` or ``\\r`` (orjson escapes them), so every record fits
one ``data:`` line.

Why not aiohttp-sse: its ``send()`` takes ``str`` (a decode and re-encode of every record),
writes one event per socket write, and pings on a fixed timer rather than after an idle
interval; here a whole block of records goes out as one write, byte for byte.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Final, NamedTuple

import orjson

__all__ = [
    "HEADERS",
    "KEEPALIVE",
    "Framed",
    "StartOffsetError",
    "frame_records",
    "retry",
    "start_offset",
]

HEADERS: Final = {
    "Content-Type": "text/event-stream",
    "Cache-Control": "no-cache",
    "X-Accel-Buffering": "no",
}
"""Response headers of every event stream (``X-Accel-Buffering: no`` turns off nginx's
response buffering for this response)."""

KEEPALIVE: Final = b": keep-alive\n\n"
"""A comment (not an event: no ``id``), sent after an idle interval so proxies and
browsers keep the connection open."""

_OFFSET = re.compile(r"-?[0-9]{1,19}")
_TYPE_PREFIX = b'{"type":"'


class StartOffsetError(ValueError):
    """A ``Last-Event-ID`` header or ``from`` parameter is not an integer, or negative."""


def start_offset(headers: Mapping[str, str], query: Mapping[str, str]) -> int:
    """The offset a stream starts at: ``Last-Event-ID`` header when present, else the
    ``from`` query parameter, else 0.

    Accepts ASCII decimal digits only (no sign, spaces, ``_`` or exponent).

    :raises StartOffsetError: the value is not an integer or is negative.
    """
    if "Last-Event-ID" in headers:
        source, value = "Last-Event-ID", headers["Last-Event-ID"]
    elif "from" in query:
        source, value = "from", query["from"]
    else:
        return 0
    if not _OFFSET.fullmatch(value):
        raise StartOffsetError(f"{source} must be a byte offset (a non-negative integer)")
    offset = int(value)
    if offset < 0:
        raise StartOffsetError(f"{source} must not be negative")
    return offset


def retry(milliseconds: int) -> bytes:
    """The ``retry:`` field (reconnection time for EventSource, in ms) as its own block."""
    return b"retry: %d\n\n" % milliseconds


class Framed(NamedTuple):
    """SSE events framed from a block of records."""

    events: bytes
    """The events, in one buffer."""
    size: int
    """Bytes of the block they came from (all of it, unless it stopped at an ``end``)."""
    ended: bool
    """Whether it stopped after the ``end`` record of the reply asked for."""


def frame_records(offset: int, block: bytes, *, until_end_of: str | None = None) -> Framed:
    """Frame a block of whole records starting at ``offset`` as SSE events: per record
    ``id: <offset after it>``, ``event: <its type>``, ``data: <its JSON line>``.

    The live path of every stream, a record at a time: a ``chunk`` (nearly every record
    of a reply) is told by its first bytes alone, and types are kept as bytes.

    :param until_end_of: a reply id: stop after that reply's ``end`` record.
    :raises ValueError: ``block`` does not end in a newline (not whole records).
    """
    lines = block.split(b"\n")
    if lines.pop():  # what follows the last newline: nothing, in whole records
        raise ValueError("a block of whole records ends in a newline")
    parts = []
    append = parts.append
    position = offset
    for line in lines:
        position += len(line) + 1
        if line.startswith(_CHUNK_PREFIX):
            append(_EVENT % (position, b"chunk", line))
            continue
        kind = _record_kind(line)
        append(_EVENT % (position, kind, line))
        if until_end_of is not None and kind == b"end" and _reply_id(line) == until_end_of:
            return Framed(b"".join(parts), position - offset, True)
    return Framed(b"".join(parts), len(block), False)


_EVENT: Final = b"id: %d\nevent: %s\ndata: %s\n\n"
_CHUNK_PREFIX: Final = b'{"type":"chunk",'
"""How every ``chunk`` record the writer encodes begins (``type`` first, then ``ts``)."""


def _record_kind(line: bytes) -> bytes:
    """A record's type, as the bytes of the ``event:`` field. Records are written with
    ``type`` first, so it is usually read without a parse."""
    if line.startswith(_TYPE_PREFIX):
        end = line.find(b'"', len(_TYPE_PREFIX))
        if end > 0:
            kind = line[len(_TYPE_PREFIX) : end]
            if b"\\" not in kind:
                return kind
    kind = str(orjson.loads(line).get("type", "message"))
    # An event type is one line; anything else could forge fields.
    return kind.replace("\r", " ").replace("\n", " ").encode()


def _reply_id(line: bytes) -> object:
    return orjson.loads(line).get("id")
