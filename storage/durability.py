"""The durability policy and the system calls that carry it out.

Every byte the log puts on disk goes through one :class:`FileIO` object, so a test can
hand the store a subclass that fails, slows down or records a ``write``/``fdatasync``
(the fault-injection seam, like tinydb's storage interface). Nothing else in ``storage``
calls ``os.write`` or ``os.fdatasync`` on a log.
"""

from __future__ import annotations

import enum
import os
from pathlib import Path

__all__ = ["Durability", "FileIO"]


class Durability(enum.StrEnum):
    """When the committed offset may move past a record (DESIGN.md "Durability policy")."""

    FSYNC = "fsync"
    """Bytes written and ``fdatasync``ed: survives a crash of the machine."""
    FLUSH = "flush"
    """Bytes handed to the kernel with ``write()``: survives a crash of the process."""


class FileIO:
    """Blocking file system calls used by the log. Subclass to inject faults.

    Methods run on a worker thread (never on the event loop) and raise :class:`OSError`
    exactly as the system calls do.
    """

    def write_all(self, fd: int, data: bytes) -> None:
        """Write all of ``data`` at the file's end (``fd`` is ``O_APPEND``).

        Loops over short writes. :raises OSError: e.g. ``ENOSPC``, ``EIO``.
        """
        view = memoryview(data)
        while view:
            written = os.write(fd, view)
            view = view[written:]

    def fdatasync(self, fd: int) -> None:
        """``fdatasync(2)``: the file's data (and size) reach stable storage.

        :raises OSError: the data may be lost; never retry as if it worked.
        """
        os.fdatasync(fd)

    def fsync_dir(self, path: Path) -> None:
        """``fsync(2)`` a directory, so names created in it are on disk."""
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
