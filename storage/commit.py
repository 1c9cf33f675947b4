"""Group commit across logs: one writer task commits every log with queued records.

The writer side of the log lives here. Each open, writable log has one
:class:`LogWriter` (its fd, its queue, the batch in flight, its failure); a writer that
has records queued hands itself to the :class:`GroupCommit` it shares with the other
logs of its store. One long-lived task runs *passes*; each pass takes the queued records
of every writer that has any and

* writes each log's batch with one ``write()`` on the event loop (a page-cache copy of
  a few hundred bytes: cheaper than a thread hop, and a worker thread writing while the
  loop is busy would wait for the GIL after every call);
* under ``fsync``, then makes them all durable on one worker thread: one ``fdatasync``
  per log, or, when at least :data:`SYNCFS_MIN_LOGS` logs of one file system were
  written, one ``syncfs(2)`` for that file system (on Linux 5.17 and later, where it
  reports every error ``fdatasync`` would, and on local file systems only).

Then, back on the loop, every written log's writer reports the commit to its log (a
callback), which moves the committed offset past the batch and tells its listeners.
Records queued while a pass is in flight go in the next pass, so the cost of a sync is
shared by every record and every log that waited for it (the classic group commit of
databases' write-ahead logs, across files).

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
retried. A log whose file was unlinked (its data dir deleted while the server runs) fails
the same way at its next pass: after the write (and sync), one ``fstat`` per written log
checks ``st_nlink``, so no record is ever reported committed into a file a restart would
not find.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
from collections.abc import Callable
from pathlib import Path

from . import records
from .durability import Durability, FileIO, syncfs_trusted
from .errors import LogFailedError
from .recovery import keep_aside
from .seal import SEAL_HERE, Sealer

__all__ = [
    "COALESCE_TICKS",
    "COALESCE_WHEN_WITHIN",
    "SYNCFS_MIN_LOGS",
    "GroupCommit",
    "LogWriter",
    "Queued",
]

logger = logging.getLogger(__name__)

COALESCE_TICKS = 32
"""Loop ticks a pass may wait for more records while a busy log keeps queueing them."""
COALESCE_WHEN_WITHIN = 0.002
"""Seconds since a log's previous pass under which it counts as busy."""
SYNCFS_MIN_LOGS = 4
"""Logs of one file system written in a pass from which one ``syncfs`` replaces their
``fdatasync`` calls (``fsync`` policy, Linux 5.17+)."""

_CLEANUP_IO = FileIO()

Queued = tuple[records.Record, bytes, "asyncio.Future[int]"]
"""A record, its encoded line, and the future of the offset just after it. (While
queued, a seal due at its place is an entry whose record is
:data:`~storage.seal.SEAL_HERE`; a pass makes it, :meth:`~storage.seal.Sealer.take`.)"""


def _retrieved(future: asyncio.Future[int]) -> None:
    if not future.cancelled():
        future.exception()  # its failure is the log's, reported to the record's caller


class LogWriter:
    """The writer side of one log: its ``O_APPEND`` fd (which holds the log's ``flock``),
    the records queued for the next pass, the batch a pass is writing, and the failure
    that ended it. The log that owns it (:class:`~storage.log.ConversationLog`) supplies
    two callbacks, both called on the event loop:

    * ``on_commit(batch, data)``: a batch (:data:`Queued` entries, in order) met the
      durability policy; ``data`` is its bytes, which now follow the previous committed
      offset in the file;
    * ``on_fail(error)``: a write or sync failed (a :class:`~storage.errors.LogFailedError`);
      queued and later records are refused.

    :param fd: the log file, open ``O_RDWR | O_APPEND`` and locked; closed by :meth:`close`.
    :param committed: bytes of the file already committed (its size, after recovery).
    :param group: the group commit that writes and syncs this log's batches.
    :param sealer: the hash of the log's ``committed`` bytes, and when the next seal is
        due; ``None``: no seals.
    """

    def __init__(
        self,
        path: Path,
        fd: int,
        *,
        committed: int,
        group: GroupCommit,
        on_commit: Callable[[list[Queued], bytes], None],
        on_fail: Callable[[LogFailedError], None],
        sealer: Sealer | None = None,
    ) -> None:
        self.path = path
        self.sealer = sealer
        """The running hash of the log's bytes as taken to be written (:mod:`storage.seal`):
        a seal is queued after each ``end``, and made, with those due by size, when a
        pass takes the batch."""
        self.device = os.fstat(fd).st_dev
        """``st_dev`` of the file system holding the log (for ``syncfs``)."""
        self._fd = fd
        self._end = committed
        self._group = group
        self._on_commit = on_commit
        self._on_fail = on_fail
        self._queue: list[Queued] = []
        self._marked = False  # whether a seal is queued (an entry of SEAL_HERE)
        self._writing: list[Queued] = []  # the batch a pass is writing
        self._data = b""  # its bytes
        self._failure: LogFailedError | None = None
        self._last_pass = 0.0  # loop time a pass last took this log's records
        self._drained: asyncio.Future[None] | None = None  # close() waits on it

    def queue(self, record: records.Record) -> asyncio.Future[int]:
        """Queue one record for the next pass.

        :returns: a future of the offset just after the record, set once it is committed;
            it raises :class:`~storage.errors.LogFailedError` if its batch fails.
        :raises storage.errors.LogFailedError: the log failed before (not queued).
        :raises storage.records.RecordError: the record cannot be encoded (not queued).
        """
        if self._failure is not None:
            raise self._failure
        data = records.encode(record)
        done: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        if not self._queue:
            self._group.schedule(self)
        self._queue.append((record, data, done))
        # Only the end of a reply is looked at here: hashing, and seals due by size, wait
        # for the pass that writes the batch (Sealer.take), once per batch.
        if self.sealer is not None and record["type"] == "end":
            self.queue_seal().add_done_callback(_retrieved)  # nobody awaits it
        return done

    def queue_seal(self) -> asyncio.Future[int]:
        """Queue a ``seal`` of every byte queued so far (:mod:`storage.seal`); it is made
        (hash, ``ts``) when the pass that writes it takes the batch.

        :returns: the future of the offset after it, as :meth:`queue`.
        :raises storage.errors.LogFailedError: the log failed before.
        """
        if self._failure is not None:
            raise self._failure
        assert self.sealer is not None
        sealed: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        if not self._queue:
            self._group.schedule(self)
        self._queue.append((SEAL_HERE, b"", sealed))
        self._marked = True
        return sealed

    @property
    def backlog(self) -> int:
        """Records queued and not yet being written."""
        return len(self._queue)

    @property
    def busy(self) -> bool:
        """Whether records are queued or being written."""
        return bool(self._queue or self._writing)

    async def close(self) -> None:
        """Wait until every queued record is committed (or failed), then close the fd,
        which releases the lock."""
        while self.busy:
            self._drained = asyncio.get_running_loop().create_future()
            await self._drained
        os.close(self._fd)

    # The group commit's side of a pass: take the batch, write it, then commit it or fail
    # the log, then say the pass is done.

    def _take_batch(self) -> bool:
        batch = self._writing = self._queue  # (failed as a whole if what follows raises)
        self._queue = []
        if self.sealer is None:
            self._data = b"".join([line for _, line, _ in batch])
        else:  # hashed as one write, seals made and put in place
            marked, self._marked = self._marked, False
            self._writing, self._data = self.sealer.take(
                batch, marked=marked, new_future=self._seal_future
            )
        return bool(self._writing)

    def _seal_future(self) -> asyncio.Future[int]:
        """The future of a seal that :meth:`_take_batch` puts in (due by size)."""
        sealed: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        sealed.add_done_callback(_retrieved)  # nobody awaits it
        return sealed

    def _write(self, file_io: FileIO) -> OSError | None:
        try:
            file_io.write_all(self._fd, self._data)
        except OSError as exc:
            return exc
        return None

    def _commit(self) -> None:
        # The log first (its committed offset, its listeners), then the appenders: if the
        # log cannot take the batch, no appender is told it was committed.
        self._on_commit(self._writing, self._data)
        offset = self._end
        for _, line, done in self._writing:
            offset += len(line)
            if not done.done():
                done.set_result(offset)
        self._end = offset

    def _fail(self, exc: OSError) -> None:
        self._failure = LogFailedError(exc)
        logger.error(
            "%s: %s; the log takes no more appends in this process (committed %d bytes)",
            self.path,
            exc,
            self._end,
        )
        for _, _, done in self._writing + self._queue:
            if not done.done():
                done.set_exception(self._failure)
                done.exception()  # seen: a pipelining writer awaits only its last future
        self._queue = []
        self._marked = False
        self._on_fail(self._failure)

    def _pass_done(self) -> None:
        self._writing, self._data = [], b""
        if self._drained is not None and not self._drained.done() and not self._queue:
            self._drained.set_result(None)

    def _discard_uncommitted(self) -> None:
        """On a worker thread, after a failed write or sync: take the bytes past the
        committed offset (a torn write, or records whose sync failed: never shown) out of
        the log, so a restart does not resurrect them. Best effort: they are copied to
        ``<log>.failed-<ts>`` when the disk allows, then the log is truncated to its
        committed offset. This cleanup bypasses the injected ``file_io``: it is not the
        log's write path, and it never makes the failed bytes count as committed."""
        try:
            size = os.fstat(self._fd).st_size
            if size <= self._end:
                return
            extra = os.pread(self._fd, size - self._end, self._end)
            try:
                keep_aside(self.path, "failed", extra, file_io=_CLEANUP_IO)
            except OSError as exc:
                logger.warning(
                    "%s: could not keep %d uncommitted bytes: %s", self.path, len(extra), exc
                )
            os.ftruncate(self._fd, self._end)
            _CLEANUP_IO.fdatasync(self._fd)
            logger.warning(
                "%s: cut %d uncommitted bytes back to offset %d", self.path, len(extra), self._end
            )
        except OSError as exc:
            logger.error(
                "%s: could not cut uncommitted bytes; a restart will see them as records: %s",
                self.path,
                exc,
            )


class GroupCommit:
    """Commits the queued records of many logs together, in passes.

    :param durability: the policy every log committed here follows.
    :param file_io: the system-call layer (tests pass a fault-injecting subclass).

    Under ``fsync``, a pass that wrote :data:`SYNCFS_MIN_LOGS` or more logs of one file
    system syncs them with one ``syncfs(2)`` where
    :func:`~storage.durability.syncfs_trusted` accepts it (Linux 5.17+, local).
    """

    def __init__(
        self,
        *,
        durability: Durability = Durability.FSYNC,
        file_io: FileIO | None = None,
    ) -> None:
        self.durability = Durability(durability)
        self.file_io = file_io or FileIO()
        self.passes = 0
        """Passes run so far (for tests and benchmarks)."""
        self.syncfs_calls = 0
        """``syncfs`` calls made so far (for tests and benchmarks)."""
        self._syncfs_fds: dict[int, int | None] = {}  # st_dev -> a directory's fd, or None
        self._dirty: dict[LogWriter, None] = {}  # insertion-ordered set
        self._wake: asyncio.Future[None] | None = None
        self._task: asyncio.Task[None] | None = None
        self._closing = False

    def schedule(self, writer: LogWriter) -> None:
        """Commit ``writer``'s queued records in the next pass (the writer calls this when
        its queue stops being empty)."""
        self._dirty[writer] = None
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
            writers, self._dirty = list(self._dirty), {}
            try:
                await self._pass(writers)
            except (Exception, asyncio.CancelledError) as exc:  # never leave a log hanging
                if not isinstance(exc, asyncio.CancelledError):
                    logger.exception("group commit pass failed")
                stuck = [writer for writer in writers if writer._writing]
                for writer in stuck:
                    writer._fail(OSError(errno.EIO, f"group commit failed: {exc!r}"))
                try:
                    await asyncio.to_thread(_discard_uncommitted, stuck)
                finally:
                    for writer in stuck:
                        writer._pass_done()
                if isinstance(exc, asyncio.CancelledError):
                    raise

    async def _coalesce(self, now: float) -> None:
        # A log whose previous pass was under 2 ms ago is busy (a fast stream): let the
        # loop run while busy logs keep queueing (a few ticks at most), so a fast stream
        # commits, and wakes its readers, in batches rather than a record at a time. Slow
        # streams (an LLM at 20-100 tokens/s) are committed at once, together.
        busy = [w for w in self._dirty if now - w._last_pass < COALESCE_WHEN_WITHIN]
        for writer in self._dirty:
            writer._last_pass = now
        if not busy:
            return
        for _ in range(COALESCE_TICKS):
            queued = sum(writer.backlog for writer in busy)
            await asyncio.sleep(0)
            if sum(writer.backlog for writer in busy) == queued:
                return

    async def _pass(self, writers: list[LogWriter]) -> None:
        self.passes += 1
        batches = [writer for writer in writers if writer._take_batch()]
        if self.durability is Durability.FSYNC and not self._closing:
            for writer in batches:  # opened before the writes it is to report on
                if writer.device not in self._syncfs_fds:
                    try:
                        self._syncfs_fds[writer.device] = _syncfs_fd(writer.path.parent)
                    except OSError as exc:  # no fd to spare now, say: fdatasync this pass
                        logger.warning("cannot prepare syncfs for %s: %s", writer.path.parent, exc)
        # The writes are page-cache copies of a few hundred bytes: on the loop they cost
        # less than handing them to a thread, which would contend for the GIL once per
        # call while the loop is busy.
        errors = [writer._write(self.file_io) for writer in batches]
        if self.durability is Durability.FSYNC:
            written = [(k, w._fd, w.device) for k, w in enumerate(batches) if errors[k] is None]
            if written:
                for k, error in await asyncio.to_thread(self._sync, written):
                    errors[k] = error
        # On the loop, not on the sync's thread: there, one GIL-releasing call per log
        # would wait for the busy loop to hand the GIL back each time (bench P2 at 1,000
        # replies fell from 20,000 to 3,600 chunks/s).
        for k, writer in enumerate(batches):
            if errors[k] is None:
                errors[k] = _removed(writer._fd)
        failed = []
        for writer, error in zip(batches, errors, strict=True):
            if error is None:
                try:
                    writer._commit()
                    continue
                except Exception as exc:  # a bug in one log must not fail the others
                    logger.exception("%s: committing a batch failed", writer.path)
                    error = OSError(errno.EIO, f"commit failed: {exc!r}")
            writer._fail(error)
            failed.append(writer)
        if failed:
            await asyncio.to_thread(_discard_uncommitted, failed)
        for writer in batches:
            writer._pass_done()

    def _sync(self, written: list[tuple[int, int, int]]) -> list[tuple[int, OSError]]:
        """On a worker thread: make the written logs durable.

        :param written: ``(batch index, fd, st_dev)`` per written log.
        :returns: ``(batch index, error)`` for each log whose sync failed.
        """
        devices: dict[int, list[tuple[int, int]]] = {}
        for k, fd, device in written:
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


def _removed(fd: int) -> OSError | None:
    """Whether the log open as ``fd`` was unlinked (its data dir deleted, say): records
    written to it now would be lost at the next start, so they must not count as
    committed. Returns the error that fails the log, or ``None``."""
    try:
        if os.fstat(fd).st_nlink == 0:
            return FileNotFoundError(errno.ENOENT, "the log file was removed")
    except OSError as exc:
        return exc
    return None


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


def _discard_uncommitted(writers: list[LogWriter]) -> None:
    for writer in writers:
        writer._discard_uncommitted()
