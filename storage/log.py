"""``ConversationLog``: one conversation's append-only JSONL log.

Writes (DESIGN.md "The log"):

* :meth:`ConversationLog.append` queues a record and waits until it is *committed*. The
  log's :class:`~storage.commit.GroupCommit` (shared by the logs of a store) takes
  everything queued, writes it with one ``write()`` and (policy ``fsync``) makes it
  durable, then moves the committed offset past the whole batch. Records that queue while
  a sync is in flight share the next one (group commit, across logs).
* A failed write or sync is fatal for the log: queued and later appends raise
  :class:`LogFailedError`; what was committed stays readable; nothing is retried.
* One writer per file, across processes: the writer holds ``flock(LOCK_EX)``. A log that
  another process holds, or that is corrupt, opens read-only.

Reads never pass the committed offset and never block the writer. Readers near the end
are served from a bounded in-memory copy of the most recent committed bytes; readers
further back ``pread`` the file, so a lagging reader costs no memory per record.
"""

from __future__ import annotations

import asyncio
import errno
import fcntl
import logging
import os
from collections.abc import AsyncIterator, Callable
from pathlib import Path

from . import records
from .commit import GroupCommit
from .durability import Durability, FileIO
from .fold import Summary
from .recovery import CorruptLogError, Scan, cut_torn_tail, keep_aside, scan

__all__ = [
    "ConversationLog",
    "LogClosedError",
    "LogError",
    "LogFailedError",
    "LogReadOnlyError",
    "OffsetBoundaryError",
    "OffsetError",
    "OffsetRangeError",
]

logger = logging.getLogger(__name__)

READ_BLOCK = 256 * 1024
"""Bytes read from the file per call when a reader is behind the in-memory tail."""
TAIL_BYTES = 512 * 1024
"""Committed bytes kept in memory for readers at the live edge (amortized, up to 2x)."""


_CLEANUP_IO = FileIO()


class LogError(Exception):
    """Base of the errors :class:`ConversationLog` raises for appends."""


class LogClosedError(LogError):
    """The log was closed (the server is shutting down)."""


class LogReadOnlyError(LogError):
    """The log takes no appends: another process holds its lock, or it is corrupt."""


class LogFailedError(LogError):
    """A write or sync of this log failed; it takes no more appends in this process.

    :ivar errno: the ``errno`` of the failed call (e.g. ``ENOSPC``, ``EIO``).
    """

    def __init__(self, cause: OSError) -> None:
        super().__init__(f"log write failed: {os.strerror(cause.errno or errno.EIO)}")
        self.errno = cause.errno or errno.EIO
        self.cause = cause


class OffsetError(ValueError):
    """A start offset a reader asked for is not valid.

    :ivar committed: the log's committed offset when the check ran.
    """

    def __init__(self, message: str, committed: int) -> None:
        super().__init__(message)
        self.committed = committed


class OffsetRangeError(OffsetError):
    """The offset is past the committed offset."""


class OffsetBoundaryError(OffsetError):
    """The offset is inside a record, not at a record boundary."""


class ConversationLog:
    """An open conversation log. Build with :meth:`create` or :meth:`open`.

    :ivar path: the log file.
    :ivar summary: running :class:`~storage.fold.Summary` of the committed records.
    """

    def __init__(
        self,
        path: Path,
        *,
        fd: int | None,
        read_fd: int,
        committed: int,
        summary: Summary,
        commit: GroupCommit,
        owns_commit: bool,
        read_only_reason: str | None = None,
        tail: bytes = b"",
    ) -> None:
        self.path = path
        self.summary = summary
        self._fd = fd
        self._device = os.fstat(read_fd).st_dev
        self._read_fd = read_fd
        self._committed = committed
        self._group_commit = commit
        self._owns_commit = owns_commit
        self._read_only_reason = read_only_reason
        self._failure: LogFailedError | None = None
        self._closing = False
        self._closed = False
        self._queue: list[tuple[records.Record, bytes, asyncio.Future[int]]] = []
        self._writing: list = []  # the batch the group commit is writing
        self._last_pass = 0.0  # loop time the group commit last took this log's records
        self._waiters: list[asyncio.Future[None]] = []  # see next_commit()
        self._listeners: dict[Callable[[int, bytes], None], None] = {}  # an ordered set
        self._tail = bytearray(tail)  # the last committed bytes
        self._tail_start = committed - len(tail)
        self._reads: set[asyncio.Future[bytes]] = set()

    # -- opening ----------------------------------------------------------------------

    @classmethod
    async def create(
        cls,
        path: Path,
        first: records.Record,
        *,
        durability: Durability | None = None,
        file_io: FileIO | None = None,
        commit: GroupCommit | None = None,
    ) -> ConversationLog:
        """Create a new log whose first record is ``first`` (a ``conversation`` record).

        Durable whatever the policy: ``O_EXCL`` create, write and ``fdatasync`` the record,
        then ``fsync`` the directory. On failure the file is removed.

        :param durability: policy of a log with its own group commit (default ``fsync``).
        :param file_io: system-call layer of a log with its own group commit.
        :param commit: the group commit shared with other logs (a store's); its policy and
            system-call layer apply. Without it the log gets its own.
        :raises FileExistsError: the log exists.
        :raises OSError: a write or sync failed.
        :raises ValueError: ``commit`` given with ``durability`` or ``file_io``.
        """
        commit, owns_commit = _commit_of(durability, file_io, commit)
        file_io = commit.file_io
        data = records.encode(first)

        def create_sync() -> int:
            fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_EXCL, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                file_io.write_all(fd, data)
                file_io.fdatasync(fd)
                file_io.fsync_dir(path.parent)
            except BaseException:
                os.close(fd)
                path.unlink(missing_ok=True)
                raise
            return fd

        fd = await asyncio.to_thread(create_sync)
        summary = Summary()
        summary.observe(first)
        return cls(
            path,
            fd=fd,
            read_fd=os.open(path, os.O_RDONLY),
            committed=len(data),
            summary=summary,
            commit=commit,
            owns_commit=owns_commit,
            tail=data,
        )

    @classmethod
    async def open(
        cls,
        path: Path,
        *,
        durability: Durability | None = None,
        file_io: FileIO | None = None,
        commit: GroupCommit | None = None,
    ) -> ConversationLog:
        """Open an existing log, recovering it first (DESIGN.md "Recovery on open").

        Takes the writer lock; cuts a torn tail (kept in ``<log>.torn-<ts>``); appends one
        ``end`` with ``finish: "interrupted"`` per reply that has a ``start`` and no
        ``end``. A log locked by another process, or corrupt, opens read-only with its
        valid prefix readable; corruption is logged as an error, never cut.

        ``durability``, ``file_io`` and ``commit`` are as for :meth:`create`.

        :raises FileNotFoundError: no such log.
        :raises OSError: recovery could not write, or (``fsync``) the log's bytes could not
            be made durable: the disk lost some of them.
        :raises ValueError: ``commit`` given with ``durability`` or ``file_io``.
        """
        commit, owns_commit = _commit_of(durability, file_io, commit)
        file_io = commit.file_io
        durable = commit.durability is Durability.FSYNC

        def open_sync() -> tuple[int | None, Scan, str | None]:
            fd: int | None = os.open(path, os.O_RDWR | os.O_APPEND)
            reason = None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                fd, reason = None, "another process holds this log"
            try:
                with open(path, "rb") as stream:
                    found = scan(stream)
                if found.corrupt_at is not None:
                    error = CorruptLogError(path, found.corrupt_at, found.reason)
                    logger.error("%s; opened read-only, nothing cut", error)
                    reason = str(error)
                elif found.end == 0 and fd is not None:
                    # Not one record: the create never completed, so the conversation
                    # never existed. Keep the bytes aside and report it missing.
                    if found.size:
                        cut_torn_tail(path, found, file_io=file_io)
                    path.unlink()
                    file_io.fsync_dir(path.parent)
                    raise FileNotFoundError(path)
                elif found.torn and fd is not None:
                    cut_torn_tail(path, found, file_io=file_io)
                if fd is not None and reason is None and durable:
                    # What the scan read may be in the page cache only: written by a
                    # process that died before its sync, and then maybe lost by the
                    # disk's write-back. Make it durable, or learn it was lost, before
                    # any of it can be shown.
                    file_io.fdatasync(fd)
            except BaseException:
                if fd is not None:
                    os.close(fd)
                raise
            if reason is not None and fd is not None:
                os.close(fd)
                fd = None
            return fd, found, reason

        fd, found, reason = await asyncio.to_thread(open_sync)
        log = cls(
            path,
            fd=fd,
            read_fd=os.open(path, os.O_RDONLY),
            committed=found.end,
            summary=found.summary,
            commit=commit,
            owns_commit=owns_commit,
            read_only_reason=reason,
        )
        for reply_id in list(found.summary.open_replies) if fd is not None else []:
            try:
                await log.append(records.end(reply_id=reply_id, finish="interrupted"))
            except LogError as exc:  # the log stays readable, failed, like any other
                logger.error("%s: could not close interrupted reply %s: %s", path, reply_id, exc)
                break
            logger.warning("%s: closed interrupted reply %s", path, reply_id)
        return log

    # -- state --------------------------------------------------------------------------

    @property
    def committed(self) -> int:
        """Bytes of the log that met the durability policy; readers never pass it."""
        return self._committed

    @property
    def failure(self) -> LogFailedError | None:
        """The failure that stopped appends, or ``None``."""
        return self._failure

    @property
    def read_only_reason(self) -> str | None:
        """Why the log takes no appends (locked elsewhere, corrupt), or ``None``."""
        return self._read_only_reason

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def live(self) -> bool:
        """Whether the committed offset can still move in this process (open, writable,
        not failed)."""
        return not self._closing and self._failure is None and self._fd is not None

    def check_writable(self) -> None:
        """Raise the error an :meth:`append` would raise now, if any.

        :raises LogClosedError, LogReadOnlyError, LogFailedError:
        """
        if self._closing:
            raise LogClosedError("log is closed")
        if self._read_only_reason is not None:
            raise LogReadOnlyError(self._read_only_reason)
        if self._failure is not None:
            raise self._failure

    # -- appending ----------------------------------------------------------------------

    async def append(self, record: records.Record) -> int:
        """Append one record and wait until it is committed.

        If the caller is cancelled while waiting, the record is still written (it was
        queued); its place in the log does not change.

        :returns: the offset just after the record (its SSE event id).
        :raises LogClosedError, LogReadOnlyError, LogFailedError: nothing was committed.
        :raises storage.records.RecordError: the record cannot be encoded.
        """
        return await self.append_nowait(record)

    def append_nowait(self, record: records.Record) -> asyncio.Future[int]:
        """Queue one record for the next commit and return at once.

        Records are committed in the order they were queued, so a writer can queue
        several and wait only for the last (a pipeline: one write and one sync for the
        whole batch). Readers still see none of them before they are committed.

        :returns: a future of the offset just after the record; it raises
            :class:`LogFailedError` if the write or sync of its batch fails.
        :raises LogClosedError, LogReadOnlyError, LogFailedError: not queued.
        :raises storage.records.RecordError: the record cannot be encoded.
        """
        self.check_writable()
        data = records.encode(record)
        done: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        if not self._queue:
            self._group_commit.schedule(self)
        self._queue.append((record, data, done))
        return done

    @property
    def backlog(self) -> int:
        """Records queued and not yet being written."""
        return len(self._queue)

    # The group commit's side of a pass (storage.commit): take the batch, then either
    # commit it or fail the log, then say the pass is done.

    def _take_batch(self) -> list[tuple[records.Record, bytes, asyncio.Future[int]]]:
        self._writing, self._queue = self._queue, []
        return self._writing

    def _commit(self, batch: list, data: bytes) -> None:
        offset = self._committed
        for record, line, done in batch:
            offset += len(line)
            self.summary.observe(record)
            if not done.done():
                done.set_result(offset)
        start, self._committed = self._committed, offset
        self._remember(data)
        if self._listeners:
            self._tell_listeners(start, data)
        self._signal_commit()

    def _pass_done(self) -> None:
        self._writing = []
        if self._closing and not self._queue:
            self._signal_commit()  # close() waits for this

    def _fail(self, exc: OSError, batch: list) -> None:
        self._failure = LogFailedError(exc)
        logger.error(
            "%s: %s; the log takes no more appends in this process (committed %d bytes)",
            self.path,
            exc,
            self._committed,
        )
        for _, _, done in batch + self._queue:
            if not done.done():
                done.set_exception(self._failure)
                done.exception()  # seen: a pipelining writer awaits only its last future
        self._queue = []
        self._signal_commit()

    def _discard_uncommitted(self) -> None:
        """After a failed write or sync, take the bytes past the committed offset (a torn
        write, or records whose sync failed: never shown) out of the log, so a restart
        does not resurrect them. Best effort: they are copied to ``<log>.failed-<ts>``
        when the disk allows, then the log is truncated to its committed offset. This
        cleanup bypasses the injected ``file_io``: it is not the log's write path, and it
        never makes the failed bytes count as committed."""
        assert self._fd is not None
        try:
            size = os.fstat(self._fd).st_size
            if size <= self._committed:
                return
            extra = os.pread(self._read_fd, size - self._committed, self._committed)
            try:
                keep_aside(self.path, "failed", extra, file_io=_CLEANUP_IO)
            except OSError as exc:
                logger.warning(
                    "%s: could not keep %d uncommitted bytes: %s", self.path, len(extra), exc
                )
            os.ftruncate(self._fd, self._committed)
            _CLEANUP_IO.fdatasync(self._fd)
            logger.warning(
                "%s: cut %d uncommitted bytes back to offset %d",
                self.path,
                len(extra),
                self._committed,
            )
        except OSError as exc:
            logger.error("%s: could not cut uncommitted bytes (recovery will): %s", self.path, exc)

    def _remember(self, data: bytes) -> None:
        self._tail += data
        if len(self._tail) > 2 * TAIL_BYTES:
            cut = len(self._tail) - TAIL_BYTES
            del self._tail[:cut]
            self._tail_start += cut

    def _signal_commit(self) -> None:
        if not self._waiters:
            return
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)

    # -- reading ------------------------------------------------------------------------

    async def check_offset(self, offset: int) -> None:
        """Check that a reader may start at ``offset``.

        :raises OffsetRangeError: ``offset`` is negative or past the committed offset.
        :raises OffsetBoundaryError: ``offset`` is not 0 and the byte before it is not ``\\n``.
        """
        committed = self._committed
        if offset < 0 or offset > committed:
            raise OffsetRangeError(
                f"offset {offset} is outside the committed log [0, {committed}]", committed
            )
        if offset == 0 or offset == committed:
            return
        if await self._read(offset - 1, 1) != b"\n":
            raise OffsetBoundaryError(f"offset {offset} is not a record boundary", committed)

    async def read(self, start: int = 0, end: int | None = None) -> bytes:
        """Committed bytes ``[start, end)`` (``end`` defaults to the committed offset).

        :raises OffsetRangeError: the range is not inside ``[0, committed]``.
        """
        committed = self._committed
        end = committed if end is None else end
        if not 0 <= start <= end <= committed:
            raise OffsetRangeError(f"range [{start}, {end}) is outside [0, {committed}]", committed)
        return await self._read(start, end - start)

    async def read_records(self, start: int = 0) -> bytes:
        """The next block of whole committed records at ``start`` (a record boundary).

        At most about :data:`READ_BLOCK` bytes, more only for a longer record; empty when
        ``start`` is the committed offset.
        """
        committed = self._committed
        if start >= self._tail_start:
            return bytes(self._tail[start - self._tail_start : committed - self._tail_start])
        size = min(READ_BLOCK, committed - start)
        while True:
            block = await self._read(start, size)
            cut = block.rfind(b"\n") + 1
            if cut or start + size >= committed:
                return block[:cut]
            size = min(size * 2, committed - start)

    async def _read(self, start: int, size: int) -> bytes:
        if start >= self._tail_start:
            begin = start - self._tail_start
            return bytes(self._tail[begin : begin + size])
        if self._read_fd < 0:
            raise LogClosedError("log is closed")
        # Tracked until the thread is done with the fd (not until a cancelled reader
        # gives up), so close() never closes an fd a pread still uses.
        pending = asyncio.get_running_loop().run_in_executor(
            None, os.pread, self._read_fd, size, start
        )
        self._reads.add(pending)
        pending.add_done_callback(self._reads.discard)
        return await asyncio.shield(pending)

    def add_listener(self, listener: Callable[[int, bytes], None]) -> None:
        """Call ``listener(offset, block)`` at each commit, synchronously, as soon as the
        committed offset has moved past ``block`` (the whole records just committed,
        starting at ``offset``); and ``listener(committed, b"")`` once when the log closes.

        For live readers that hand each commit straight to a socket: no task wakes up per
        commit. A listener must not block or await; one that raises is logged and removed.
        """
        self._listeners[listener] = None

    def remove_listener(self, listener: Callable[[int, bytes], None]) -> None:
        """Stop calling ``listener`` (no error if it is not listening)."""
        self._listeners.pop(listener, None)

    def _tell_listeners(self, offset: int, block: bytes) -> None:
        for listener in tuple(self._listeners):
            try:
                listener(offset, block)
            except Exception:
                logger.exception("%s: commit listener %r failed; removed", self.path, listener)
                self.remove_listener(listener)

    def next_commit(self) -> asyncio.Future[None]:
        """A future that resolves at the log's next commit, failure or close.

        Each caller gets a future of its own: cancelling it touches no other waiter.
        (Live event streams do not wait here: they listen, see :meth:`add_listener`.)
        """
        waiter = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        return waiter

    async def follow(self, start: int) -> AsyncIterator[tuple[int, bytes]]:
        """Yield ``(offset, block)`` of committed records from ``start``, then each new
        commit as it happens (live tail), without polling.

        Each block is whole records beginning at ``offset``. Ends after the last committed
        record once the log is closed; a failed or read-only log is followed until then
        (its committed offset just never moves). ``start`` must have passed
        :meth:`check_offset`.
        """
        position = start
        while True:
            if position < self._committed:
                block = await self.read_records(position)
                yield position, block
                position += len(block)
                continue
            if self._closed:
                return
            await self.next_commit()

    # -- closing ------------------------------------------------------------------------

    async def close(self) -> None:
        """Commit what is queued, stop appends, end followers, release the lock."""
        if self._closing:
            while not self._closed:
                await self.next_commit()
            return
        self._closing = True  # appends are refused from here on
        while self._queue or self._writing:
            await self.next_commit()
        self._closed = True
        self._signal_commit()
        self._tell_listeners(self._committed, b"")
        if self._fd is not None:
            os.close(self._fd)  # releases the flock
            self._fd = None
        while self._reads:  # reads may start while we wait: wait for those too
            await asyncio.wait(set(self._reads))
        os.close(self._read_fd)
        self._read_fd = -1
        if self._owns_commit:
            await self._group_commit.close()


def _commit_of(
    durability: Durability | None, file_io: FileIO | None, commit: GroupCommit | None
) -> tuple[GroupCommit, bool]:
    """The group commit a log uses, and whether the log owns it (closes it)."""
    if commit is None:
        return GroupCommit(durability=durability or Durability.FSYNC, file_io=file_io), True
    if durability is not None or file_io is not None:
        raise ValueError("durability and file_io come from the shared group commit")
    return commit, False
