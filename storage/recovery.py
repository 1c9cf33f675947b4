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

:func:`open_file` and :func:`create_file` are the only places a log file is opened for
writing: they take the writer's ``flock`` and apply these rules (blocking calls, for a
worker thread). Closing replies left open (one ``end`` with ``finish: "interrupted"``
each) needs appends, so :meth:`storage.log.ConversationLog.open` does it after them.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import logging
import os
import stat
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

from .durability import FileIO
from .errors import CorruptLogError, ForeignFileError
from .fold import Summary
from .records import RecordError, decode, now_ms

__all__ = [
    "HELD_ELSEWHERE",
    "LOCK_TRIES",
    "READ_ONLY_ERRNOS",
    "FileKey",
    "Known",
    "Opened",
    "Scan",
    "create_file",
    "cut_torn_tail",
    "keep_aside",
    "open_file",
    "open_own",
    "reopen_file",
    "scan",
]

log = logging.getLogger(__name__)

BLOCK = 1 << 20  # bytes read per call while scanning

READ_ONLY_ERRNOS = frozenset({errno.EROFS, errno.EACCES, errno.EPERM})
"""``errno`` values of an ``open(2)`` for writing that mean the file (or its file system)
may be read and not written: a read-only mount, or permissions."""


@dataclass
class Scan:
    """Result of :func:`scan`.

    :ivar end: bytes in the valid prefix (a record boundary).
    :ivar size: bytes in the file; ``size - end`` bytes are torn tail, unless corrupt.
    :ivar corrupt_at: offset of the corrupt line, or ``None``.
    :ivar reason: why the first invalid line is invalid (empty when none is).
    :ivar summary: the :class:`Summary` of the records in the valid prefix.
    :ivar hashed: the SHA-256 (a ``hashlib`` object) of the valid prefix, for the
        writer's :class:`~storage.seal.Sealer`.
    :ivar sealed_at: the offset just after the valid prefix's last ``seal`` (0: none).
    """

    end: int = 0
    size: int = 0
    corrupt_at: int | None = None
    reason: str = ""
    summary: Summary = field(default_factory=Summary)
    hashed: Any = field(default_factory=hashlib.sha256)
    sealed_at: int = 0
    last_end: int = 0  # the offset just after the valid prefix's last end record

    @property
    def torn(self) -> bool:
        return self.corrupt_at is None and self.end < self.size


def scan(stream: BinaryIO) -> Scan:
    """Scan a log file from its current position (offset 0) to its end.

    Reads in blocks of :data:`BLOCK` bytes; memory is bounded by the longest line. The
    valid prefix is hashed as it is read (a block at a time).
    """
    result = Scan()
    hashed = result.hashed
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
                    if record["type"] == "seal":
                        result.sealed_at = result.end
                    elif record["type"] == "end":
                        result.last_end = result.end
                else:
                    result.corrupt_at = first_bad
            start = newline + 1
        hashed.update(data[: max(0, min(start, result.end - position))])
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
    # O_EXCL: never an existing file, and never through a symbolic link (open(2)). Two
    # cuts in one millisecond get names of their own: <ts>, <ts>.1, <ts>.2, ...
    stamp = f"{path.name}.{kind}-{now_ms()}"
    for attempt in range(100):
        aside = path.with_name(stamp if attempt == 0 else f"{stamp}.{attempt}")
        try:
            fd = os.open(aside, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
            break
        except FileExistsError:
            if attempt == 99:
                raise
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


def cut_torn_tail(path: Path, fd: int, scan_result: Scan, *, file_io: FileIO) -> Path:
    """Move the torn tail of the log open as ``fd`` aside and cut the log back to its
    valid prefix.

    Writes bytes ``[end, size)`` to ``<path>.torn-<ts>`` (``O_EXCL``), syncs it and the
    directory, then truncates the log to ``end`` and syncs it.

    :returns: the path of the file that keeps the cut bytes.
    :raises OSError: if any step fails; the log is then left as it was or cut with its
        tail already kept.
    """
    tail = os.pread(fd, scan_result.size - scan_result.end, scan_result.end)
    aside = keep_aside(path, "torn", tail, file_io=file_io)
    os.ftruncate(fd, scan_result.end)
    file_io.fdatasync(fd)
    log.warning(
        "%s: cut torn tail of %d bytes at offset %d (%s); kept in %s",
        path,
        len(tail),
        scan_result.end,
        scan_result.reason,
        aside.name,
    )
    return aside


def open_own(path: Path, flags: int, mode: int = 0o600) -> int:
    """``open(2)`` a log file only if it is a regular file of ours, with one name.

    Opened with ``O_NOFOLLOW`` (a symbolic link is refused, never followed) and
    ``O_CLOEXEC``; then ``fstat`` must show a regular file owned by this process's user
    with one link (a hard link could name a file outside the data dir).

    :raises ForeignFileError: it is something else (nothing was read or written).
    :raises FileNotFoundError: there is no such file.
    """
    try:
        fd = os.open(path, flags | os.O_NOFOLLOW | os.O_CLOEXEC, mode)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise ForeignFileError(path, "a symbolic link") from None
        if exc.errno == errno.EISDIR:
            raise ForeignFileError(path, "a directory") from None
        raise
    info = os.fstat(fd)
    problem = None
    if not stat.S_ISREG(info.st_mode):
        problem = "not a regular file"
    elif info.st_uid != os.geteuid():
        problem = "owned by another user"
    elif info.st_nlink > 1:
        problem = "a hard link to a file with another name"
    elif info.st_nlink == 0:
        os.close(fd)
        raise FileNotFoundError(errno.ENOENT, "the log was removed", str(path))
    if problem is not None:
        os.close(fd)
        log.warning("%s: refused, %s", path, problem)
        raise ForeignFileError(path, problem)
    return fd


def _reader_of(path: Path, fd: int) -> int:
    """A read-only fd of the same file as ``fd`` (reads go on after the writer closes)."""
    read_fd = open_own(path, os.O_RDONLY | os.O_NONBLOCK)  # never blocks on a FIFO
    mine, theirs = os.fstat(fd), os.fstat(read_fd)
    if (mine.st_dev, mine.st_ino) != (theirs.st_dev, theirs.st_ino):
        os.close(read_fd)
        raise ForeignFileError(path, "replaced while it was being opened")
    return read_fd


@dataclass(frozen=True, slots=True)
class FileKey:
    """A log file's identity and its last change, as ``fstat`` tells them: when a key
    taken at close equals the key at the next open, nobody wrote the file in between
    (this process holds the data dir, and every write changes ``st_mtime_ns``)."""

    device: int
    inode: int
    size: int
    mtime_ns: int
    ctime_ns: int
    """``st_ctime_ns``: unlike the mtime, no ``utime()`` can set it back. (A change within
    one tick of the file system's clock, with the same size, still goes unseen.)"""

    @classmethod
    def of(cls, info: os.stat_result) -> FileKey:
        return cls(info.st_dev, info.st_ino, info.st_size, info.st_mtime_ns, info.st_ctime_ns)


@dataclass(frozen=True, slots=True)
class Known:
    """What a close left of a log, so that while the file is unchanged it can be listed
    without opening it and, when it was writable, reopened with no recovery scan: its
    :class:`FileKey` then, the :class:`Summary` of its committed records, its committed
    offset (``end``; short of ``key.size`` when a corrupt or read-only log has bytes it
    does not serve), and whether it was writable (then ``end == key.size``)."""

    key: FileKey
    summary: Summary
    end: int
    writable: bool
    hashed: Any = None  # the SHA-256 of [0, end) (a hashlib object), when writable
    sealed_at: int = 0  # the offset just after the last seal


@dataclass(frozen=True)
class Opened:
    """Result of :func:`open_file`.

    :ivar fd: the log open ``O_RDWR | O_APPEND`` with its ``flock`` held, or ``None`` when
        the log is read-only.
    :ivar read_fd: the log open ``O_RDONLY``, for readers.
    :ivar scan: what :func:`scan` found (its ``end`` is the committed offset).
    :ivar read_only_reason: why the log takes no appends (locked by another process, or
        corrupt), or ``None``.
    """

    fd: int | None
    read_fd: int
    scan: Scan
    read_only_reason: str | None


def open_file(path: Path, *, file_io: FileIO, durable: bool) -> Opened:
    """Open an existing log for writing and recover it (blocking).

    Only a regular file of ours is opened (:func:`open_own`). Takes the writer lock
    (``flock(LOCK_EX | LOCK_NB)``); a log locked by another process opens read-only.
    Scans it: corruption opens it read-only (logged as an error, never cut); a torn tail
    is cut and kept (:func:`cut_torn_tail`); a file with no whole record is a create that
    never completed, kept aside and removed. With ``durable`` the recovered bytes are
    ``fdatasync``ed before anything can show them: their last writer may have died before
    its sync, and the disk may have lost them since.

    A file that can be read and not written (a read-only mount, permissions) opens
    read-only, with nothing cut or synced: its valid prefix is served.

    :raises FileNotFoundError: no such log (or one whose create never completed).
    :raises ForeignFileError: the path is not a regular file of ours.
    :raises OSError: recovery could not write, or the disk lost some of the bytes.
    """
    try:
        fd = open_own(path, os.O_RDWR | os.O_APPEND)
    except OSError as exc:
        if exc.errno not in READ_ONLY_ERRNOS:
            raise
        return _open_read_only(path, "the data dir is read-only")
    read_fd = -1
    try:
        reason = None if _lock(fd) else HELD_ELSEWHERE
        with os.fdopen(os.dup(fd), "rb") as stream:  # the file we checked, not the path
            stream.seek(0)
            found = scan(stream)
        if found.corrupt_at is not None:
            reason = _corrupt(path, found)
        elif reason is None and found.end == 0:
            # Not one record: the create never completed, so the conversation never
            # existed. Keep the bytes aside and report it missing.
            if found.size:
                cut_torn_tail(path, fd, found, file_io=file_io)
            path.unlink()
            file_io.fsync_dir(path.parent)
            raise FileNotFoundError(errno.ENOENT, "the log's create never completed", str(path))
        elif reason is None and found.torn:
            cut_torn_tail(path, fd, found, file_io=file_io)
        if reason is None and durable:
            file_io.fdatasync(fd)
        read_fd = _reader_of(path, fd)
    except BaseException:
        os.close(fd)
        raise
    if reason is not None:
        os.close(fd)  # releases the lock, if this process took it
        return Opened(None, read_fd, found, reason)
    return Opened(fd, read_fd, found, None)


HELD_ELSEWHERE = "another process holds this log"
"""The read-only reason of a log whose ``flock`` another process holds."""

LOCK_TRIES = 20
"""Tries (5 ms apart) to take a log's ``flock`` before it counts as held elsewhere: the
data dir's lock already keeps a second server out, so a per-log conflict is almost always
``chatledger verify`` reading it for a moment."""


def _lock(fd: int) -> bool:
    """Take the writer's ``flock(LOCK_EX | LOCK_NB)`` on ``fd``, trying :data:`LOCK_TRIES`
    times (blocking: a worker thread's call); whether it was taken."""
    for attempt in range(LOCK_TRIES):
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            if attempt + 1 < LOCK_TRIES:
                time.sleep(0.005)
    return False


def reopen_file(path: Path, known: Known) -> Opened | None:
    """Open a log this process closed cleanly, if it is still exactly as it was left
    (``known``): no scan, no sync, no cut, just the opens, the lock and two ``fstat``s,
    quick enough for the event loop (a worker thread would wait for the busy loop's GIL
    after each of these calls). ``None`` when the file changed, another process holds it,
    or it cannot be written, or was not writable: then :func:`open_file` recovers it.

    :raises FileNotFoundError: no such log.
    :raises ForeignFileError: the path is not a regular file of ours.
    :raises OSError: the opens failed (e.g. no file descriptor left).
    """
    if not known.writable:
        return None
    try:
        fd = open_own(path, os.O_RDWR | os.O_APPEND)
    except OSError as exc:
        if exc.errno in READ_ONLY_ERRNOS:
            return None
        raise
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # once: this runs on the loop
        except BlockingIOError:
            os.close(fd)
            return None
        if FileKey.of(os.fstat(fd)) != known.key:
            os.close(fd)  # releases the lock: open_file takes it again
            return None
        found = Scan(end=known.end, size=known.key.size, summary=known.summary)
        if known.hashed is None:
            os.close(fd)
            return None  # nothing kept of its hash: open_file rescans it
        found.hashed, found.sealed_at = known.hashed.copy(), known.sealed_at
        return Opened(fd, _reader_of(path, fd), found, None)
    except BaseException:
        with contextlib.suppress(OSError):
            os.close(fd)
        raise


def _corrupt(path: Path, found: Scan) -> str:
    assert found.corrupt_at is not None
    log.error(
        "%s; opened read-only, nothing cut", CorruptLogError(path, found.corrupt_at, found.reason)
    )
    return f"corrupt record at byte {found.corrupt_at}: {found.reason}"


def _open_read_only(path: Path, reason: str) -> Opened:
    """Open a log that cannot be written: scanned, never cut (a torn tail is just not
    served), no lock taken (nothing here writes it)."""
    read_fd = open_own(path, os.O_RDONLY | os.O_NONBLOCK)
    try:
        with os.fdopen(os.dup(read_fd), "rb") as stream:
            found = scan(stream)
    except BaseException:
        os.close(read_fd)
        raise
    if found.corrupt_at is not None:
        reason = _corrupt(path, found)
    elif found.end == 0:
        os.close(read_fd)
        raise FileNotFoundError(errno.ENOENT, "the log's create never completed", str(path))
    return Opened(None, read_fd, found, reason)


def create_file(path: Path, data: bytes, *, file_io: FileIO) -> tuple[int, int]:
    """Create a new log holding ``data`` (its first record), durably whatever the policy
    (blocking): ``O_EXCL`` create (never through a symbolic link), take the writer lock,
    write and ``fdatasync``, then ``fsync`` the directory. On failure the file is removed.

    :returns: ``(fd, read_fd)``: the log open ``O_RDWR | O_APPEND`` with its ``flock``
        held, and open ``O_RDONLY`` for readers.
    :raises FileExistsError: the log exists.
    :raises OSError: a write or sync failed.
    """
    fd = open_own(path, os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_EXCL)
    try:
        if not _lock(fd):
            raise BlockingIOError(errno.EWOULDBLOCK, HELD_ELSEWHERE, str(path))
        file_io.write_all(fd, data)
        file_io.fdatasync(fd)
        file_io.fsync_dir(path.parent)
        read_fd = _reader_of(path, fd)
    except BaseException:
        os.close(fd)
        path.unlink(missing_ok=True)
        raise
    return fd, read_fd
