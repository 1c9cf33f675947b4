"""Recovery of a log on open: torn tail vs corruption (DESIGN.md "Recovery on open").

Reader rules, applied to the bytes of a log file from offset 0:

1. The file is split into lines at ``\\n``. Each complete line must decode as a record
   (:func:`storage.records.decode`).
2. Bytes after the last ``\\n`` are a *torn tail*: a write that never completed.
3. The first complete line that does not decode starts a torn tail when no valid record
   follows it: garbage, or a NUL-filled hole (the file grew but the data blocks of an
   unsynced write never reached the disk), including a hole that runs into the bytes of
   a later record on the same line. A torn tail was never committed, so never shown.
4. An invalid line followed by a valid record is *corruption*, whatever its bytes:
   committed bytes changed under us, and cutting there would drop records that readers
   were shown and hand their offsets to new records. The log is never cut; it is opened
   read-only and reported.

Cutting a torn tail keeps it: the cut bytes are written and synced to
``<log>.torn-<ts>`` beside the log (the directory synced too) before the log is
truncated and synced, so a crash in the middle loses nothing.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

from .durability import FileIO
from .fold import Summary
from .records import RecordError, decode, now_ms

__all__ = ["CorruptLogError", "Scan", "cut_torn_tail", "keep_aside", "scan"]

log = logging.getLogger(__name__)

BLOCK = 1 << 20  # bytes read per call while scanning


class CorruptLogError(Exception):
    """A log has an invalid line with valid records after it (reader rule 4).

    :ivar offset: byte offset where the invalid line starts.
    """

    def __init__(self, path: Path, offset: int, reason: str) -> None:
        super().__init__(f"{path}: corrupt record at byte {offset}: {reason}")
        self.path = path
        self.offset = offset
        self.reason = reason


@dataclass
class Scan:
    """Result of :func:`scan`.

    :ivar end: bytes in the valid prefix (a record boundary).
    :ivar size: bytes in the file; ``size - end`` bytes are torn tail, unless corrupt.
    :ivar corrupt_at: offset of the corrupt line, or ``None``.
    :ivar reason: why the first invalid line is invalid (empty when none is).
    :ivar summary: the :class:`Summary` of the records in the valid prefix.
    """

    end: int = 0
    size: int = 0
    corrupt_at: int | None = None
    reason: str = ""
    summary: Summary = field(default_factory=Summary)

    @property
    def torn(self) -> bool:
        return self.corrupt_at is None and self.end < self.size


def scan(stream: BinaryIO) -> Scan:
    """Scan a log file from its current position (offset 0) to its end.

    Reads in blocks of :data:`BLOCK` bytes; memory is bounded by the longest line.
    """
    result = Scan()
    pending = b""  # bytes of the current, not yet terminated line
    position = 0  # file offset of pending[0]
    first_bad: int | None = None  # offset of the first invalid complete line
    while True:
        block = stream.read(BLOCK)
        if not block:
            break
        data = pending + block
        start = 0
        while True:
            newline = data.find(b"\n", start)
            if newline < 0:
                break
            line = data[start:newline]
            offset = position + start
            try:
                record = decode(line)
            except RecordError as exc:
                if first_bad is None:
                    first_bad, result.reason = offset, str(exc)
            else:
                if first_bad is None:
                    result.summary.observe(record)
                    result.end = position + newline + 1
                else:
                    result.corrupt_at = first_bad
            start = newline + 1
        pending = data[start:]
        position += start
    result.size = position + len(pending)
    if first_bad is None and pending:
        result.reason = "partial line at end of file"
    return result


def keep_aside(path: Path, kind: str, data: bytes, *, file_io: FileIO) -> Path:
    """Durably write ``data`` to a new file ``<path>.<kind>-<ts>`` beside the log
    (``O_EXCL``, written and synced, then the directory synced).

    :raises OSError: the file could not be written; it is then removed.
    """
    aside = path.with_name(f"{path.name}.{kind}-{now_ms()}")
    fd = os.open(aside, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        file_io.write_all(fd, data)
        file_io.fdatasync(fd)
    except OSError:
        aside.unlink(missing_ok=True)
        raise
    finally:
        os.close(fd)
    file_io.fsync_dir(path.parent)
    return aside


def cut_torn_tail(path: Path, scan_result: Scan, *, file_io: FileIO) -> Path:
    """Move the torn tail of ``path`` aside and cut the log back to its valid prefix.

    Writes bytes ``[end, size)`` to ``<path>.torn-<ts>`` (``O_EXCL``), syncs it and the
    directory, then truncates the log to ``end`` and syncs it.

    :returns: the path of the file that keeps the cut bytes.
    :raises OSError: if any step fails; the log is then left as it was or cut with its
        tail already kept.
    """
    with open(path, "rb") as source:
        source.seek(scan_result.end)
        tail = source.read()
    aside = keep_aside(path, "torn", tail, file_io=file_io)
    fd = os.open(path, os.O_WRONLY)
    try:
        os.ftruncate(fd, scan_result.end)
        file_io.fdatasync(fd)
    finally:
        os.close(fd)
    log.warning(
        "%s: cut torn tail of %d bytes at offset %d (%s); kept in %s",
        path,
        len(tail),
        scan_result.end,
        scan_result.reason,
        aside.name,
    )
    return aside
