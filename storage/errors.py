"""The errors ``storage`` raises, in one place (``server/errors.py`` maps them to HTTP).

=========================  ==========================================================
error                      raised when
=========================  ==========================================================
:class:`LogClosedError`    an append or read reaches a log (or store) that is closing
:class:`LogReadOnlyError`  an append reaches a log another process holds, or a corrupt one
:class:`LogFailedError`    an append reaches a log whose write or sync failed
:class:`OffsetRangeError`  a reader's offset or range is outside ``[0, committed]``
:class:`OffsetBoundaryError`  a reader's start offset is inside a record
:class:`CorruptLogError`   a log has an invalid line with valid records after it
:class:`InvalidIdError`    a conversation id does not match ``^[A-Za-z0-9_-]{1,64}$``
:class:`ForeignFileError`  a log's path is not a regular file of ours (a symlink, a hard
                           link, a directory, another user's file): treated as missing
:class:`DataDirLockedError`  another process (a second server) holds the data dir
=========================  ==========================================================

``FileNotFoundError`` (no such log) and other ``OSError`` (the disk refused a create or
an open) are not wrapped.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path

__all__ = [
    "CorruptLogError",
    "DataDirLockedError",
    "ForeignFileError",
    "InvalidIdError",
    "LogClosedError",
    "LogError",
    "LogFailedError",
    "LogReadOnlyError",
    "OffsetBoundaryError",
    "OffsetError",
    "OffsetRangeError",
]


class LogError(Exception):
    """Base of the errors an append raises: nothing was committed."""


class LogClosedError(LogError):
    """The log or its store was closed (the server is shutting down)."""


class LogReadOnlyError(LogError):
    """The log takes no appends: another process holds its lock, or it is corrupt."""


class LogFailedError(LogError):
    """A write or sync of this log failed; it takes no more appends in this process.

    :ivar errno: the ``errno`` of the failed call (e.g. ``ENOSPC``, ``EIO``).
    :ivar cause: the ``OSError`` itself.
    """

    def __init__(self, cause: OSError) -> None:
        super().__init__(f"log write failed: {os.strerror(cause.errno or errno.EIO)}")
        self.errno = cause.errno or errno.EIO
        self.cause = cause


class OffsetError(ValueError):
    """A start offset a reader asked for is not valid.

    :ivar committed: the log's committed offset when the check ran (bytes).
    """

    def __init__(self, message: str, committed: int) -> None:
        super().__init__(message)
        self.committed = committed


class OffsetRangeError(OffsetError):
    """The offset is negative or past the committed offset."""


class OffsetBoundaryError(OffsetError):
    """The offset is inside a record, not at a record boundary."""


class CorruptLogError(Exception):
    """A log has an invalid line with valid records after it (``recovery`` reader rule 4).

    :ivar offset: byte offset where the invalid line starts.
    """

    def __init__(self, path: Path, offset: int, reason: str) -> None:
        super().__init__(f"{path}: corrupt record at byte {offset}: {reason}")
        self.path = path
        self.offset = offset
        self.reason = reason


class InvalidIdError(ValueError):
    """A conversation id does not match ``^[A-Za-z0-9_-]{1,64}$``."""


class ForeignFileError(FileNotFoundError):
    """A path where a log (or the ``conversations/`` directory) should be is not a regular
    file (directory) of ours: a symbolic link, a hard link, a directory, a device or
    another user's file. Never followed, read or written; answered as a missing log.

    :ivar path: the path; :ivar problem: what it is instead (a few words).
    """

    def __init__(self, path: Path, problem: str) -> None:
        super().__init__(errno.ENOENT, f"not a log of this data dir: {problem}")
        self.path = path
        self.problem = problem


class DataDirLockedError(OSError):
    """Another process holds the data dir's lock: a second server on the same data dir."""
