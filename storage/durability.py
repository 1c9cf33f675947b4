"""The durability policy and the system calls that carry it out.

Every byte the log puts on disk goes through one :class:`FileIO` object, so a test can
hand the store a subclass that fails, slows down or records a ``write``/``fdatasync``
(the fault-injection seam, like tinydb's storage interface). Nothing else in ``storage``
calls ``os.write`` or ``os.fdatasync`` on a log.
"""

from __future__ import annotations

import ctypes
import enum
import functools
import os
import platform
from pathlib import Path

__all__ = ["SYNCFS_FILESYSTEMS", "Durability", "FileIO", "syncfs_reports_errors", "syncfs_trusted"]

SYNCFS_FILESYSTEMS = frozenset({"ext4", "xfs", "f2fs", "tmpfs"})
"""Local file systems whose ``syncfs`` writes every file's data and metadata to stable
storage as ``fdatasync`` would. Not FUSE and network file systems, whose ``syncfs`` may
not reach the server that holds the data. (Not btrfs either: a subvolume's ``st_dev``
matches no line of ``/proc/self/mountinfo``, so its type cannot be told this way.)"""


class Durability(enum.StrEnum):
    """When the committed offset may move past a record (DESIGN.md "Durability policy")."""

    FSYNC = "fsync"
    """Bytes written and ``fdatasync``ed: survives a crash of the machine."""
    FLUSH = "flush"
    """Bytes handed to the kernel with ``write()``: survives a crash of the process."""


class FileIO:
    """Blocking file system calls used by the log. Subclass to inject faults.

    Methods raise :class:`OSError` exactly as the system calls do. A log's appends call
    ``write_all`` on the event loop (a page-cache copy) and the syncs on a worker thread;
    creating, recovering and cleaning up a log run on a worker thread.
    """

    def write_all(self, fd: int, data: bytes) -> None:
        """Write all of ``data`` at the file's end (``fd`` is ``O_APPEND``).

        Loops over short writes. :raises OSError: e.g. ``ENOSPC``, ``EIO``.
        """
        written = os.write(fd, data)
        if written == len(data):
            return
        view = memoryview(data)[written:]
        while view:
            view = view[os.write(fd, view) :]

    def pread(self, fd: int, size: int, offset: int) -> bytes:
        """``pread(2)``: up to ``size`` bytes at byte ``offset`` (a log's readers, on a
        worker thread). :raises OSError: e.g. ``EIO``."""
        return os.pread(fd, size, offset)

    def fdatasync(self, fd: int) -> None:
        """``fdatasync(2)``: the file's data (and size) reach stable storage.

        :raises OSError: the data may be lost; never retry as if it worked.
        """
        os.fdatasync(fd)

    def syncfs(self, fd: int) -> None:
        """``syncfs(2)``: every file of the file system holding ``fd`` reaches stable
        storage (data, sizes, the journal, the disk's cache).

        Reports write-back errors of any file of that file system since Linux 5.8, and
        errors of the file system's own sync since 5.17 (:func:`syncfs_reports_errors`).

        :raises OSError: some data may be lost; never retry as if it worked.
        """
        if _libc().syncfs(fd) != 0:
            code = ctypes.get_errno()
            raise OSError(code, os.strerror(code))

    def fsync_dir(self, path: Path) -> None:
        """``fsync(2)`` a directory, so names created in it are on disk."""
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@functools.cache
def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(None, use_errno=True)


@functools.cache
def syncfs_reports_errors() -> bool:
    """Whether ``syncfs(2)`` is there and reports every error ``fdatasync`` would: Linux
    5.17 and later. Write-back errors since 5.8 (commit 735e4ae5ba28, "vfs: track per-sb
    writeback errors and report them to syncfs"); errors of the file system's own sync (a
    journal commit, a cache flush) since 5.17 (commit 5679897eb104, "vfs: make
    sync_filesystem return errors from ->sync_fs"). Elsewhere the log syncs each file
    with ``fdatasync``."""
    if platform.system() != "Linux":
        return False
    try:
        release = tuple(int(part) for part in platform.release().split(".")[:2])
        _libc().syncfs  # noqa: B018 (the symbol exists)
    except (ValueError, AttributeError, OSError):
        return False
    return release >= (5, 17)


def syncfs_trusted(directory: Path) -> bool:
    """Whether the log may use ``syncfs`` for files in ``directory``: the kernel reports
    its errors (:func:`syncfs_reports_errors`) and the file system is one of
    :data:`SYNCFS_FILESYSTEMS` (looked up by device in ``/proc/self/mountinfo``).

    :raises OSError: the directory or ``/proc/self/mountinfo`` cannot be read now.
    """
    return syncfs_reports_errors() and filesystem_type(directory) in SYNCFS_FILESYSTEMS


def filesystem_type(path: Path) -> str | None:
    """The type (``ext4``, ``fuse.sshfs``, ...) of the mount holding ``path``, from
    ``/proc/self/mountinfo`` (proc(5)); ``None`` when no mount has its device.

    :raises OSError: ``path`` or ``/proc/self/mountinfo`` cannot be read.
    """
    device = os.stat(path).st_dev
    wanted = f"{os.major(device)}:{os.minor(device)}"
    with open("/proc/self/mountinfo", encoding="utf-8", errors="replace") as mounts:
        for line in mounts:
            fields, _, rest = line.partition(" - ")
            if fields.split()[2:3] == [wanted] and rest:
                return rest.split()[0]
    return None
