"""``ConversationLog``: one conversation's append-only JSONL log, the reader side.

Writes (DESIGN.md "The log") go through the log's :class:`~storage.commit.LogWriter`:

* :meth:`ConversationLog.append` queues a record and waits until it is *committed*. The
  store's :class:`~storage.commit.GroupCommit` takes everything queued, writes it with
  one ``write()`` and (policy ``fsync``) makes it durable; then the writer reports the
  batch here, and the committed offset moves past it. Records that queue while a sync is
  in flight share the next one (group commit, across logs).
* A failed write or sync is fatal for the log: queued and later appends raise
  :class:`~storage.errors.LogFailedError`; what was committed stays readable; nothing is
  retried.
* One writer per file, across processes: the writer holds ``flock(LOCK_EX)``. A log that
  another process holds, or that is corrupt, opens read-only (it has no writer).

Reads never pass the committed offset and never block the writer. Readers near the end
are served from a bounded in-memory copy of the most recent committed bytes; readers
further back ``pread`` the file, so a lagging reader costs no memory per record. Live
readers learn of commits one way: a listener (:meth:`ConversationLog.add_listener`),
called at each commit; :meth:`ConversationLog.follow` is built on it.

A log's life is one :class:`LogState`::

    WRITABLE --(a write or sync fails)--> FAILED --.
    WRITABLE ------------------------------------+--(close)--> CLOSING --> CLOSED
    READ_ONLY (locked elsewhere, or corrupt) ----'
"""

from __future__ import annotations

import asyncio
import enum
import errno
import logging
import os
from collections.abc import AsyncIterator, Callable
from pathlib import Path

from . import records
from .commit import GroupCommit, LogWriter, Queued
from .durability import Durability, FileIO
from .errors import (
    LogClosedError,
    LogError,
    LogFailedError,
    LogReadOnlyError,
    OffsetBoundaryError,
    OffsetRangeError,
)
from .fold import Folded, Summary
from .recovery import HELD_ELSEWHERE, FileKey, Known, create_file, open_file, reopen_file
from .seal import Sealer

__all__ = ["READ_BLOCK", "SMALL_LOG", "TAIL_BYTES", "ConversationLog", "Listener", "LogState"]

logger = logging.getLogger(__name__)

READ_BLOCK = 256 * 1024
"""Bytes read from the file per call when a reader is behind the in-memory tail."""
SMALL_LOG = 256 * 1024
"""Bytes up to which a log's first fold reads and folds it on the event loop: a worker
thread would cost more (each of its system calls waits for a busy loop's GIL)."""
TAIL_BYTES = 512 * 1024
"""Committed bytes kept in memory for readers at the live edge (amortized, up to 2x)."""

Listener = Callable[[int, bytes], None]
"""``listener(offset, block)``: see :meth:`ConversationLog.add_listener`."""


class LogState(enum.Enum):
    """Where a :class:`ConversationLog` is in its life."""

    WRITABLE = "writable"
    """Takes appends; the committed offset moves."""
    READ_ONLY = "read_only"
    """Never took appends in this process: another process holds it, or it is corrupt
    (:attr:`ConversationLog.read_only_reason`)."""
    FAILED = "failed"
    """A write or sync failed (:attr:`ConversationLog.failure`); no more appends."""
    CLOSING = "closing"
    """:meth:`ConversationLog.close` is committing what was queued; no more appends."""
    CLOSED = "closed"
    """Closed: the lock is released, followers have ended, reads raise."""


class ConversationLog:
    """An open conversation log. Build with :meth:`create` or :meth:`open`.

    :ivar path: the log file.
    :ivar summary: running :class:`~storage.fold.Summary` of the committed records.
    """

    def __init__(
        self,
        path: Path,
        *,
        read_fd: int,
        committed: int,
        summary: Summary,
        read_only_reason: str | None,
        file_io: FileIO,
        tail: bytes = b"",
    ) -> None:
        self.path = path
        self._file_io = file_io
        self.summary = summary
        self._read_fd = read_fd
        self._committed = committed
        self._state = LogState.WRITABLE if read_only_reason is None else LogState.READ_ONLY
        self._read_only_reason = read_only_reason
        self._failure: LogFailedError | None = None
        self._writer: LogWriter | None = None
        self._closing: asyncio.Task[None] | None = None
        self._listeners: dict[Listener, None] = {}  # an ordered set
        self._tail = bytearray(tail)  # the last committed bytes
        self._tail_start = committed - len(tail)
        self._reads: set[asyncio.Future[bytes]] = set()
        self._pins = 0
        self._view: Folded | None = None  # built on first use, then kept up to date
        self._view_task: asyncio.Task[Folded] | None = None
        self._closed_key: FileKey | None = None  # the file as close() left it

    def _attach(self, fd: int, commit: GroupCommit, sealer: Sealer) -> None:
        self._writer = LogWriter(
            self.path,
            fd,
            committed=self._committed,
            group=commit,
            on_commit=self._on_commit,
            on_fail=self._on_fail,
            sealer=sealer,
        )

    # -- opening ----------------------------------------------------------------------

    @classmethod
    async def create(
        cls,
        path: Path,
        first: records.Record,
        *,
        commit: GroupCommit,
        seal_key: bytes | None = None,
    ) -> ConversationLog:
        """Create a new log whose first record is ``first`` (a ``conversation`` record),
        durably whatever the policy (:func:`~storage.recovery.create_file`).

        :param commit: the group commit that writes the log (a store's); its policy and
            system-call layer apply.
        :param seal_key: the HMAC key of the log's seals (:mod:`storage.seal`), or ``None``.
        :raises FileExistsError: the log exists.
        :raises OSError: a write or sync failed; no file is left.
        """
        data = records.encode(first)
        fd, read_fd = await asyncio.to_thread(create_file, path, data, file_io=commit.file_io)
        summary = Summary()
        summary.observe(first)
        log = cls(
            path,
            read_fd=read_fd,
            committed=len(data),
            summary=summary,
            read_only_reason=None,
            file_io=commit.file_io,
            tail=data,
        )
        sealer = Sealer(seal_key)
        sealer.update(data)
        log._attach(fd, commit, sealer)
        return log

    @classmethod
    async def open(
        cls,
        path: Path,
        *,
        commit: GroupCommit,
        known: Known | None = None,
        seal_key: bytes | None = None,
    ) -> ConversationLog:
        """Open an existing log, recovering it first (DESIGN.md "Recovery on open",
        :func:`~storage.recovery.open_file`), then append one ``end`` with
        ``finish: "interrupted"`` per reply that has a ``start`` and no ``end``.

        A log locked by another process, or corrupt, opens read-only with its valid
        prefix readable; so does a log that cannot be written (a read-only data dir).
        ``commit`` is as for :meth:`create`; ``known`` is what :meth:`known` said when this
        process last closed the log: while the file is unchanged, no scan is needed. A
        sealed log whose last ``end`` has no seal after it (a crash cut the write between
        them) gets its seal; a log from before seals is left as it is.

        :raises FileNotFoundError: no such log.
        :raises OSError: recovery could not write, or (``fsync``) the log's bytes could not
            be made durable: the disk lost some of them.
        """
        durable = commit.durability is Durability.FSYNC
        opened = reopen_file(path, known) if known is not None else None  # on the loop
        if opened is None:
            opened = await asyncio.to_thread(
                open_file, path, file_io=commit.file_io, durable=durable
            )
        log = cls(
            path,
            read_fd=opened.read_fd,
            committed=opened.scan.end,
            summary=opened.scan.summary,
            read_only_reason=opened.read_only_reason,
            file_io=commit.file_io,
        )
        if opened.fd is None:
            return log
        found = opened.scan
        sealer = Sealer(seal_key, found.hashed, found.end, found.sealed_at)
        if 0 < found.sealed_at < found.end:
            sealer.recovered = (found.sealed_at, found.end)  # named by the next seal
        log._attach(opened.fd, commit, sealer)
        for reply_id in list(opened.scan.summary.open_replies):
            try:
                await log.append(records.end(reply_id=reply_id, finish="interrupted"))
            except LogError as exc:  # the log stays readable, failed, like any other
                logger.error("%s: could not close interrupted reply %s: %s", path, reply_id, exc)
                break
            logger.warning("%s: closed interrupted reply %s", path, reply_id)
        writer = log._writer
        if writer is not None and 0 < found.sealed_at < found.last_end and log.live:
            # A sealed log whose last end has no seal after it: a crash cut the batch
            # between them (the seal was the torn tail). Seal it now, as it would have been.
            try:
                await writer.queue_seal()  # type: ignore[union-attr]
            except LogError as exc:
                logger.error("%s: could not seal the recovered log: %s", path, exc)
        return log

    # -- state --------------------------------------------------------------------------

    @property
    def state(self) -> LogState:
        return self._state

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
        return self._state is LogState.CLOSED

    @property
    def live(self) -> bool:
        """Whether the committed offset can still move in this process."""
        return self._state is LogState.WRITABLE

    # -- use ----------------------------------------------------------------------------

    def pin(self) -> None:
        """Say the log is in use (a request, a running reply), so the store does not close
        it to free its file descriptors; :meth:`unpin` once done. Pins nest."""
        self._pins += 1

    def unpin(self) -> None:
        """Undo one :meth:`pin`."""
        if self._pins <= 0:
            raise RuntimeError("unpin() without pin()")
        self._pins -= 1

    @property
    def idle(self) -> bool:
        """Whether closing the log now would cut nothing short: open and not failed, with
        no pin, no listener (an event stream), nothing queued or being written, no read in
        flight."""
        return (
            self._pins == 0
            and not self._listeners
            and not self._reads
            # Not FAILED: closed and reopened, it would take appends again in this
            # process, past a failed sync whose error the new fd would never report.
            and self._state in (LogState.WRITABLE, LogState.READ_ONLY)
            and (self._writer is None or not self._writer.busy)
        )

    def check_writable(self) -> None:
        """Raise the error an :meth:`append` would raise now, if any.

        :raises LogClosedError, LogReadOnlyError, LogFailedError:
        """
        state = self._state
        if state is LogState.WRITABLE:
            return
        if state is LogState.READ_ONLY:
            raise LogReadOnlyError(self._read_only_reason)
        if state is LogState.FAILED:
            assert self._failure is not None
            raise self._failure
        raise LogClosedError("log is closed")

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
            :class:`~storage.errors.LogFailedError` if the write or sync of its batch fails.
        :raises LogClosedError, LogReadOnlyError, LogFailedError: not queued.
        :raises storage.records.RecordError: the record cannot be encoded.
        """
        self.check_writable()
        assert self._writer is not None
        return self._writer.queue(record)

    @property
    def backlog(self) -> int:
        """Records queued and not yet being written."""
        return self._writer.backlog if self._writer is not None else 0

    def _on_commit(self, batch: list[Queued], data: bytes) -> None:
        observe = self.summary.observe
        for record, _, _ in batch:
            observe(record)
        start = self._committed
        view = self._view
        if view is not None:
            offset = start
            for record, line, _ in batch:
                view.observe(record, offset)
                offset += len(line)
        self._committed = start + len(data)
        self._tail += data
        if len(self._tail) > 2 * TAIL_BYTES:
            cut = len(self._tail) - TAIL_BYTES
            del self._tail[:cut]
            self._tail_start += cut
        if self._listeners:
            self._tell_listeners(start, data)

    def _on_fail(self, failure: LogFailedError) -> None:
        self._failure = failure
        if self._state is LogState.WRITABLE:
            self._state = LogState.FAILED

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
        :raises LogClosedError: the log is closed and the range is not in memory.
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

        :raises LogClosedError: the log is closed and the block is not in memory.
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
            None, self._file_io.pread, self._read_fd, size, start
        )
        self._reads.add(pending)
        pending.add_done_callback(self._reads.discard)
        return await asyncio.shield(pending)

    # -- the folded view -----------------------------------------------------------------

    async def view(self) -> Folded:
        """The conversation folded from every committed record (:class:`~storage.fold.Folded`),
        kept up to date as records commit: a page of messages or a prompt costs what it
        returns, never a re-read of the log.

        Built on first use: the committed bytes are read and folded on a worker thread
        (a long log never holds the event loop; one of at most :data:`SMALL_LOG` bytes,
        or one wholly in memory, on the loop), then what committed meanwhile is folded
        from memory. Concurrent callers share one build. Do not modify what it returns.

        :raises LogClosedError: the log closed before the view was built.
        """
        if self._view is not None:
            return self._view
        if self._view_task is None:
            self._view_task = asyncio.ensure_future(self._build_view())
            self._view_task.add_done_callback(self._view_built)
        return await asyncio.shield(self._view_task)

    def _view_built(self, task: asyncio.Task[Folded]) -> None:
        if task.cancelled() or task.exception() is not None:
            self._view_task = None  # the next caller tries again

    async def _build_view(self) -> Folded:
        folded = Folded()
        end = 0 if self._tail_start == 0 else self._committed  # all in memory: no read
        if 0 < end <= SMALL_LOG:  # one pread of the page cache, on the loop
            if self._read_fd < 0:
                raise LogClosedError("log is closed")
            _fold_file(self._file_io, self._read_fd, end, folded)
        elif end > 0:  # on a thread: a long log never holds the event loop
            if self._read_fd < 0:
                raise LogClosedError("log is closed")
            pending = asyncio.get_running_loop().run_in_executor(
                None, _fold_file, self._file_io, self._read_fd, end, folded
            )
            self._reads.add(pending)  # close() waits for it before closing the fd
            pending.add_done_callback(self._reads.discard)
            await asyncio.shield(pending)
        position = end
        while position < self._committed:  # the tail, and what committed meanwhile
            block = await self.read_records(position)
            for line in block.splitlines(keepends=True):
                folded.observe(records.decode(line[:-1]), position)
                position += len(line)
        self._view = folded  # no await since the loop: _on_commit takes over from here
        return folded

    @property
    def memory(self) -> int:
        """Bytes (roughly) this log holds in memory: its tail and its folded view."""
        return len(self._tail) + (self._view.size if self._view is not None else 0)

    def add_listener(self, listener: Listener) -> None:
        """Call ``listener(offset, block)`` at each commit, synchronously, as soon as the
        committed offset has moved past ``block`` (the whole records just committed,
        starting at ``offset``); and ``listener(committed, b"")`` once when the log closes.

        The one way live readers learn of commits: an event stream hands each commit
        straight to its socket, and no task wakes up per commit. A listener must not
        block or await; one that raises is logged and removed.
        """
        self._listeners[listener] = None

    def remove_listener(self, listener: Listener) -> None:
        """Stop calling ``listener`` (no error if it is not listening)."""
        self._listeners.pop(listener, None)

    def _tell_listeners(self, offset: int, block: bytes) -> None:
        for listener in tuple(self._listeners):
            try:
                listener(offset, block)
            except Exception:
                logger.exception("%s: commit listener %r failed; removed", self.path, listener)
                self.remove_listener(listener)

    async def follow(self, start: int) -> AsyncIterator[tuple[int, bytes]]:
        """Yield ``(offset, block)`` of committed records from ``start``, then each new
        commit as it happens (live tail), without polling: :meth:`read_records` to catch
        up, a listener to wait, as an event stream does.

        Each block is whole records beginning at ``offset``. Ends after the last committed
        record once the log is closed; a failed or read-only log is followed until then
        (its committed offset just never moves). ``start`` must have passed
        :meth:`check_offset`.

        :raises LogClosedError: the log closed while this follower was further behind
            than the in-memory tail (:data:`TAIL_BYTES`): it resumes from its offset in
            a later open, as an event stream's client does after a restart.
        """
        loop = asyncio.get_running_loop()
        wake: asyncio.Future[None] = loop.create_future()

        def listener(offset: int, block: bytes) -> None:
            if not wake.done():
                wake.set_result(None)

        position = start
        self.add_listener(listener)
        try:
            while True:
                if position < self._committed:
                    block = await self.read_records(position)
                    yield position, block
                    position += len(block)
                    continue
                if self._state is LogState.CLOSED:
                    return
                wake = loop.create_future()
                await wake
        finally:
            self.remove_listener(listener)

    # -- closing ------------------------------------------------------------------------

    def known(self) -> Known | None:
        """After the log closed, what lets the store list it without opening it while
        its file is unchanged, and (a clean close of a writable log) reopen it with no
        recovery scan; ``None`` after a failure, or for a log another process holds
        (that may change at any moment)."""
        key, reason = self._closed_key, self._read_only_reason
        if key is None or self._failure is not None or reason == HELD_ELSEWHERE:
            return None
        if reason is not None:  # corrupt, or a read-only data dir: the same until changed
            return Known(key, self.summary, self._committed, writable=False)
        sealer = self._writer.sealer if self._writer is not None else None
        if key.size != self._committed or sealer is None or sealer.size != self._committed:
            return None
        return Known(
            key,
            self.summary,
            self._committed,
            writable=True,
            hashed=sealer.hashed(),
            sealed_at=sealer.sealed_at,
        )

    async def close(self) -> None:
        """Commit what is queued, stop appends, end followers, release the lock.

        Runs once, as a task of its own: concurrent callers wait for the same close, and
        a caller that is cancelled does not cut it short (the fd and its lock would stay
        open).
        """
        if self._closing is None:
            self._closing = asyncio.ensure_future(self._close())
        await asyncio.shield(self._closing)

    async def _close(self) -> None:
        self._state = LogState.CLOSING  # appends are refused from here on
        try:
            if self._writer is not None:
                await self._writer.close()  # commits what was queued; releases the flock
        finally:
            self._state = LogState.CLOSED
            self._tell_listeners(self._committed, b"")
            while self._reads:  # reads may start while we wait: wait for those too
                await asyncio.wait(set(self._reads))
            try:
                self._closed_key = FileKey.of(os.fstat(self._read_fd))
            except OSError:
                self._closed_key = None
            os.close(self._read_fd)
            self._read_fd = -1


def _fold_file(file_io: FileIO, fd: int, end: int, folded: Folded) -> None:
    """On a worker thread: fold the committed records in bytes ``[0, end)`` of the log
    open as ``fd`` (``end`` is a record boundary) into ``folded``, a block at a time."""
    position = 0
    pending = b""
    while position < end:
        block = file_io.pread(fd, min(READ_BLOCK * 4, end - position), position)
        if not block:
            raise OSError(errno.EIO, "the log is shorter than its committed offset")
        position += len(block)
        data = pending + block
        cut = data.rfind(b"\n") + 1
        offset = position - len(data)
        for line in data[:cut].splitlines(keepends=True):
            folded.observe(records.decode(line[:-1]), offset)
            offset += len(line)
        pending = data[cut:]
