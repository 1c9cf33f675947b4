"""Group commit across logs: one writer task commits every log with queued records.

A :class:`ConversationLog` queues its records and hands itself to the
:class:`GroupCommit` it shares with the other logs of its store. One long-lived task
runs *passes*; each pass takes the queued records of every log that has any and

* writes each log's batch with one ``write()`` on the event loop (a page-cache copy of
  a few hundred bytes: cheaper than a thread hop, and a worker thread writing while the
  loop is busy would wait for the GIL after every call);
* under ``fsync``, then makes them all durable on one worker thread: one ``fdatasync``
  per log, or, when at least :data:`SYNCFS_MIN_LOGS` logs of one file system were
  written, one ``syncfs(2)`` for that file system (on Linux 5.17 and later, where it
  reports every error ``fdatasync`` would, and on local file systems only).

Then, back on the loop, every written log moves its committed offset past its batch and
wakes its readers. Records queued while a pass is in flight go in the next pass, so the
cost of a sync is shared by every record and every log that waited for it (the classic
group commit of databases' write-ahead logs, across files).

Why ``syncfs``: on the 2-core VM the benchmarks run on, one small ``fdatasync`` costs the
process about 0.1 ms of CPU, so 1,000 replies at 20 tokens/s (20,000 commits/s, one per
log per pass) would take two cores just to sync. One ``syncfs`` after writing 200 logs
costs about 1 ms. It flushes the whole file system, so it is used only when several logs
wait: a single busy conversation keeps its own ``fdatasync``.

Failure (DESIGN.md "Durability"): a failed ``write`` fails that log; a failed
``fdatasync`` fails that log. A failed ``syncfs`` says only that some file of the file
system lost data (maybe not ours), so the pass then ``fdatasync``s each of its logs, and
exactly the logs whose own data was lost fail. ``syncfs`` is called on a directory fd the
group commit keeps for that file system, so one error is reported once, not once per log.
A failed log takes no more appends; its committed records stay readable; nothing is
retried.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING

from .durability import Durability, FileIO, syncfs_trusted

if TYPE_CHECKING:
    from .log import ConversationLog

__all__ = ["COALESCE_TICKS", "COALESCE_WHEN_WITHIN", "SYNCFS_MIN_LOGS", "GroupCommit"]

logger = logging.getLogger(__name__)

COALESCE_TICKS = 32
"""Loop ticks a pass may wait for more records while a busy log keeps queueing them."""
COALESCE_WHEN_WITHIN = 0.002
"""Seconds since a log's previous pass under which it counts as busy."""
SYNCFS_MIN_LOGS = 4
"""Logs of one file system written in a pass from which one ``syncfs`` replaces their
``fdatasync`` calls (``fsync`` policy, Linux 5.17+)."""


class GroupCommit:
    """Commits the queued records of many logs together, in passes.

    :param durability: the policy every log committed here follows.
    :param file_io: the system-call layer (tests pass a fault-injecting subclass).
    :param use_syncfs: allow ``syncfs(2)`` for passes with many logs, on the file systems
        :func:`~storage.durability.syncfs_trusted` accepts (Linux 5.17+, local).
    """

    def __init__(
        self,
        *,
        durability: Durability = Durability.FSYNC,
        file_io: FileIO | None = None,
        use_syncfs: bool = True,
    ) -> None:
        self.durability = Durability(durability)
        self.file_io = file_io or FileIO()
        self.use_syncfs = use_syncfs
        self.passes = 0
        """Passes run so far (for tests and benchmarks)."""
        self.syncfs_calls = 0
        """``syncfs`` calls made so far (for tests and benchmarks)."""
        self._syncfs_fds: dict[int, int | None] = {}  # st_dev -> a directory's fd, or None
        self._dirty: dict[ConversationLog, None] = {}  # insertion-ordered set
        self._wake: asyncio.Future[None] | None = None
        self._task: asyncio.Task[None] | None = None
        self._closing = False

    def schedule(self, log: ConversationLog) -> None:
        """Commit ``log``'s queued records in the next pass (the log calls this when its
        queue stops being empty)."""
        self._dirty[log] = None
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._run(), name="group commit")
        elif self._wake is not None and not self._wake.done():
            self._wake.set_result(None)

    async def close(self) -> None:
        """Run the passes still due, then stop the task. Logs close first."""
        self._closing = True
        if self._wake is not None and not self._wake.done():
            self._wake.set_result(None)
        try:
            if self._task is not None:
                await asyncio.shield(self._task)
        finally:
            fds, self._syncfs_fds = self._syncfs_fds, {}
            for fd in fds.values():
                if fd is not None:
                    os.close(fd)

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            if not self._dirty:
                if self._closing:
                    return
                self._wake = loop.create_future()
                await self._wake
                self._wake = None
                continue
            await self._coalesce(loop.time())
            logs, self._dirty = list(self._dirty), {}
            try:
                await self._pass(logs)
            except (Exception, asyncio.CancelledError) as exc:  # never leave a log hanging
                if not isinstance(exc, asyncio.CancelledError):
                    logger.exception("group commit pass failed")
                stuck = [log for log in logs if log._writing]
                for log in stuck:
                    log._fail(OSError(errno.EIO, f"group commit failed: {exc!r}"), log._writing)
                try:
                    await asyncio.to_thread(_discard_uncommitted, stuck)
                finally:
                    for log in stuck:
                        log._pass_done()
                if isinstance(exc, asyncio.CancelledError):
                    raise

    async def _coalesce(self, now: float) -> None:
        # A log whose previous pass was under 2 ms ago is busy (a fast stream): let the
        # loop run while busy logs keep queueing (a few ticks at most), so a fast stream
        # commits, and wakes its readers, in batches rather than a record at a time. Slow
        # streams (an LLM at 20-100 tokens/s) are committed at once, together.
        busy = [log for log in self._dirty if now - log._last_pass < COALESCE_WHEN_WITHIN]
        for log in self._dirty:
            log._last_pass = now
        if not busy:
            return
        for _ in range(COALESCE_TICKS):
            queued = sum(log.backlog for log in busy)
            await asyncio.sleep(0)
            if sum(log.backlog for log in busy) == queued:
                return

    async def _pass(self, logs: list[ConversationLog]) -> None:
        self.passes += 1
        batches = [(log, log._take_batch()) for log in logs]
        batches = [(log, batch) for log, batch in batches if batch]
        datas = [b"".join(line for _, line, _ in batch) for _, batch in batches]
        if self.durability is Durability.FSYNC and self.use_syncfs and not self._closing:
            for log, _ in batches:  # opened before the writes it is to report on
                if log._device not in self._syncfs_fds:
                    try:
                        self._syncfs_fds[log._device] = _syncfs_fd(log.path.parent)
                    except OSError as exc:  # no fd to spare now, say: fdatasync this pass
                        logger.warning("cannot prepare syncfs for %s: %s", log.path.parent, exc)
        # The writes are page-cache copies of a few hundred bytes: on the loop they cost
        # less than handing them to a thread, which would contend for the GIL once per
        # call while the loop is busy.
        errors = [self._write(log._fd, data) for (log, _), data in zip(batches, datas, strict=True)]
        if self.durability is Durability.FSYNC:
            written = [(k, log._fd, log._device) for k, (log, _) in enumerate(batches)]
            written = [entry for entry in written if errors[entry[0]] is None]
            if written:
                for k, error in await asyncio.to_thread(self._sync, written):
                    errors[k] = error
        failed = []
        for (log, batch), data, error in zip(batches, datas, errors, strict=True):
            if error is None:
                log._commit(batch, data)
            else:
                log._fail(error, batch)
                failed.append(log)
        if failed:
            await asyncio.to_thread(_discard_uncommitted, failed)
        for log, _ in batches:
            log._pass_done()

    def _write(self, fd: int | None, data: bytes) -> OSError | None:
        assert fd is not None
        try:
            self.file_io.write_all(fd, data)
        except OSError as exc:
            return exc
        return None

    def _sync(self, written: list[tuple[int, int | None, int]]) -> list[tuple[int, OSError]]:
        """On a worker thread: make the written logs durable.

        :param written: ``(batch index, fd, st_dev)`` per written log.
        :returns: ``(batch index, error)`` for each log whose sync failed.
        """
        devices: dict[int, list[tuple[int, int]]] = {}
        for k, fd, device in written:
            assert fd is not None
            devices.setdefault(device, []).append((k, fd))
        errors = []
        for device, logs in devices.items():
            syncfs_fd = self._syncfs_fds.get(device)
            if syncfs_fd is not None and len(logs) >= SYNCFS_MIN_LOGS:
                self.syncfs_calls += 1
                try:
                    self.file_io.syncfs(syncfs_fd)
                    continue
                except OSError as exc:
                    # Some file of this file system lost data: maybe one of these logs,
                    # maybe any other file. Each log's own fdatasync tells (it reports
                    # that file's write-back errors, once per open file).
                    logger.warning("syncfs failed (%s); syncing %d logs one by one", exc, len(logs))
            for k, fd in logs:
                try:
                    self.file_io.fdatasync(fd)
                except OSError as exc:
                    errors.append((k, exc))
        return errors


def _syncfs_fd(directory: Path) -> int | None:
    """A file of our own on ``directory``'s file system to call ``syncfs`` on, or ``None``
    where ``syncfs`` is not to be trusted (:func:`~storage.durability.syncfs_trusted`).

    Our own, opened before the writes it syncs: ``syncfs`` reports a write-back error once
    per open file, so calling it on a log's fd would make every log's first pass after
    any error (in any file of that file system) fail again.

    :raises OSError: it cannot be told or opened now (try again later).
    """
    if not syncfs_trusted(directory):
        return None
    return os.open(directory, os.O_RDONLY | os.O_DIRECTORY)


def _discard_uncommitted(logs: list[ConversationLog]) -> None:
    for log in logs:
        log._discard_uncommitted()
