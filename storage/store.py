"""``Store``: the data dir, ``<data-dir>/conversations/<conversation_id>.jsonl``.

Conversation ids are checked against :data:`CONVERSATION_ID` before any path is built, so
no request can name a file outside ``conversations/``. The store is the only place that
creates or opens logs.

**A bounded number of open logs.** An open log costs two file descriptors, so a data dir
of thousands of conversations cannot keep them all open (the process's ``RLIMIT_NOFILE``
is often 1,024). Logs open on first use and stay open while used; past ``max_open`` open
logs (or past ``max_memory`` bytes of tails and folded views), the least recently used
*idle* ones (:attr:`ConversationLog.idle`: no request or reply pins it, no event stream
follows it, nothing queued) are closed. What a clean close
leaves (:meth:`ConversationLog.known`) lets the next open of the unchanged file skip
recovery, and lets :meth:`Store.list` list it without opening it. When the process runs
out of descriptors anyway (``EMFILE``), the store closes every idle log and tries once
more; after that the error is the caller's (a clean ``503``: nothing was created).

**A read-only data dir** (a read-only mount, say) is served read-only: every log opens
read-only, and a create raises :class:`LogReadOnlyError`.
"""

from __future__ import annotations

import asyncio
import collections
import errno
import fcntl
import logging
import os
import re
import secrets
import stat
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from . import records
from .commit import GroupCommit
from .durability import Durability, FileIO
from .errors import (
    DataDirLockedError,
    ForeignFileError,
    InvalidIdError,
    LogClosedError,
    LogError,
    LogReadOnlyError,
)
from .fold import Summary
from .log import ConversationLog
from .recovery import READ_ONLY_ERRNOS, FileKey, Known

__all__ = [
    "CONVERSATION_ID",
    "DESCRIPTOR_ERRNOS",
    "MAX_MEMORY",
    "MAX_OPEN_LOGS",
    "ConversationInfo",
    "Store",
    "check_id",
    "new_id",
]

CONVERSATION_ID: Final = re.compile(r"[A-Za-z0-9_-]{1,64}")
"""Valid conversation ids (matched in full)."""

SUFFIX: Final = ".jsonl"

MAX_OPEN_LOGS: Final = 256
"""Default bound on open logs (two file descriptors each) of one store."""

MAX_MEMORY: Final = 256 << 20
"""Default bound, in bytes, on what the open logs of one store hold in memory."""

SCAN_PAUSE_S: Final = 0.1
"""Seconds after a search for idle logs that found none before the next one (see
:meth:`Store._evict`)."""

DESCRIPTOR_ERRNOS: Final = frozenset({errno.EMFILE, errno.ENFILE})
"""``errno`` values that mean no file descriptor is left (this process's, the system's)."""

logger = logging.getLogger(__name__)


def new_id() -> str:
    """A new random id: 16 url-safe characters (96 bits)."""
    return secrets.token_urlsafe(12)


def check_id(conversation_id: str) -> str:
    """Return ``conversation_id`` if valid. :raises InvalidIdError: otherwise."""
    if not isinstance(conversation_id, str) or not CONVERSATION_ID.fullmatch(conversation_id):
        raise InvalidIdError("conversation ids match ^[A-Za-z0-9_-]{1,64}$")
    return conversation_id


@dataclass(frozen=True)
class ConversationInfo:
    """One row of :meth:`Store.list`: times in ms since the epoch, ``size`` in bytes
    (the committed offset)."""

    id: str
    title: str
    created: int
    updated: int
    size: int
    owner: str | None = None
    """The owner's account id (:attr:`storage.fold.Summary.owner`)."""
    archived: bool = False
    """Put away (:attr:`storage.fold.Summary.archived`): never deleted."""


class Store:
    """The conversations of one data dir.

    One process serves a data dir: the store holds an exclusive ``flock`` on
    ``<data-dir>/chatledger.lock`` from construction until :meth:`close`.

    :param data_dir: created if missing (with ``conversations/`` inside).
    :param durability: policy for every log.
    :param file_io: the system-call layer (tests pass a fault-injecting subclass).
    :param max_open: open logs beyond which idle ones are closed, least recently used
        first (the module's docstring); at least 1.
    :param max_memory: bytes of memory (tails and folded views,
        :attr:`ConversationLog.memory`) beyond which idle logs are closed the same way.
    :param logs: the directory of the logs in the data dir (:meth:`beside` makes others).
    :param seal_key: the HMAC key of the logs' seals (:func:`storage.seal.load_key`);
        ``None``: seals carry the SHA-256 alone.
    :raises DataDirLockedError: another process (a second server) holds the data dir.
    :raises ForeignFileError: ``conversations/`` is a symbolic link or not ours.
    """

    def __init__(
        self,
        data_dir: Path,
        *,
        durability: Durability = Durability.FSYNC,
        file_io: FileIO | None = None,
        max_open: int = MAX_OPEN_LOGS,
        max_memory: int = MAX_MEMORY,
        logs: str = "conversations",
        seal_key: bytes | None = None,
        _beside: Store | None = None,
    ) -> None:
        if max_open < 1:
            raise ValueError("max_open must be at least 1")
        self.data_dir = Path(data_dir)
        self.directory = self.data_dir / logs
        self.durability = Durability(durability)
        self.file_io = file_io or FileIO()
        self._beside = _beside
        self.seal_key = seal_key
        """The HMAC key of every log's seals (:mod:`storage.seal`), or ``None``."""
        self.commit = GroupCommit(durability=self.durability, file_io=self.file_io)
        """The group commit every log of the store shares."""
        self.max_open = max_open
        self.max_memory = max_memory
        # Open logs, least recently used first.
        self._logs: collections.OrderedDict[str, ConversationLog] = collections.OrderedDict()
        self._opening: dict[str, asyncio.Task[ConversationLog]] = {}
        self._evicting: dict[str, asyncio.Task[None]] = {}  # idle logs being closed
        self._known: dict[str, Known] = {}  # what clean closes left
        self._fresh: dict[str, ConversationLog] = {}  # opened, callers not resumed yet
        self._next_scan = 0.0  # loop time before which _evict does not scan again
        self._closing: asyncio.Task[None] | None = None  # set by the first close()
        self.data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        try:
            self.directory.mkdir(mode=0o700, exist_ok=True)
        except OSError as exc:
            # A read-only data dir without this directory yet (audit/ of an old data dir):
            # then it has no logs, and is read-only like the rest.
            if exc.errno not in READ_ONLY_ERRNOS or os.path.lexists(self.directory):
                raise
        missing = not os.path.lexists(self.directory)
        if not missing:
            _check_directory(self.directory)
        self.read_only = missing or not os.access(self.directory, os.W_OK)
        """Whether the data dir cannot be written (served read-only)."""
        self._lock_fd = (
            -1 if _beside is not None else _lock_data_dir(self.data_dir, read_only=self.read_only)
        )

    def beside(
        self, logs: str, *, max_open: int = MAX_OPEN_LOGS, file_io: FileIO | None = None
    ) -> Store:
        """A store of other logs in this data dir, ``<data-dir>/<logs>/<id>.jsonl`` (the
        audit logs), under this store's lock, with its durability and a group commit of
        its own through ``file_io`` (default: a plain :class:`FileIO`, so that faults a
        test injects into the conversation logs stay there). Close it before this one.

        :raises ForeignFileError: the directory is a symbolic link or not ours.
        """
        return Store(
            self.data_dir,
            durability=self.durability,
            file_io=file_io or FileIO(),
            max_open=max_open,
            max_memory=self.max_memory,
            logs=logs,
            seal_key=self.seal_key,
            _beside=self,
        )

    def path(self, conversation_id: str) -> Path:
        """The log path of a (valid) id. :raises InvalidIdError:"""
        return self.directory / f"{check_id(conversation_id)}{SUFFIX}"

    def ids(self) -> list[str]:
        """Ids of every log file in the data dir (torn-tail files and strays ignored)."""
        out: list[str] = []
        if not os.path.lexists(self.directory):
            return out  # a read-only data dir without it
        with os.scandir(self.directory) as entries:
            for entry in entries:
                stem = entry.name[: -len(SUFFIX)]
                if (
                    entry.name.endswith(SUFFIX)
                    and CONVERSATION_ID.fullmatch(stem)
                    and entry.is_file(follow_symlinks=False)
                ):
                    out.append(stem)
        return out

    async def create(
        self,
        *,
        title: str,
        model: str,
        system: str | None,
        conversation_id: str | None = None,
        owner: str | None = None,
    ) -> ConversationLog:
        """Create a conversation log (durably) and return it open; ``owner`` is the
        account id of whoever creates it (``None`` in single-person mode).

        :raises FileExistsError: ``conversation_id`` is taken.
        :raises OSError: the disk refused the write, or no file descriptor is left
            (:data:`DESCRIPTOR_ERRNOS`, after closing the idle logs); no file is left.
        :raises LogReadOnlyError: the data dir is read-only.
        :raises LogClosedError: the store is closed.
        """
        self._check_open()
        if self.read_only:
            raise LogReadOnlyError("the data dir is read-only")
        conversation_id = check_id(conversation_id or new_id())
        first = records.conversation(
            conversation_id=conversation_id, title=title, model=model, system=system, owner=owner
        )
        return await self.create_log(conversation_id, first)

    async def create_log(self, conversation_id: str, first: records.Record) -> ConversationLog:
        """Create a log whose first record is ``first`` (durably) and return it open:
        :meth:`create` for a conversation; an audit log's first record for the store
        :meth:`beside` it. Raises as :meth:`create` does."""
        self._check_open()
        if self.read_only:
            raise LogReadOnlyError("the data dir is read-only")
        check_id(conversation_id)
        if conversation_id in self._logs or conversation_id in self._opening:
            raise FileExistsError(errno.EEXIST, "the conversation exists", conversation_id)
        # Tracked like an open, shared and shielded: an open or a list during the create
        # waits for it (never reads the file before its first record is synced), close()
        # waits for it, and a cancelled caller does not leave its fd and lock behind.
        task = asyncio.ensure_future(self._create(conversation_id, first))
        self._opening[conversation_id] = task
        task.add_done_callback(lambda _: self._opening.pop(conversation_id, None))
        log = await self._await_open(conversation_id, task)
        if self._logs.get(conversation_id) is not log:  # closed before this caller resumed
            return await self.open(conversation_id)
        return log

    async def _create(self, conversation_id: str, first: records.Record) -> ConversationLog:
        path = self.path(conversation_id)
        log = await self._retry_on_descriptors(
            lambda: ConversationLog.create(path, first, commit=self.commit, seal_key=self.seal_key)
        )
        self._add(conversation_id, log)
        return log

    async def open(self, conversation_id: str) -> ConversationLog:
        """The open log of ``conversation_id``, opening and recovering it on first use.

        The log is open when this returns; a caller that awaits anything before it is
        done with the log must :meth:`ConversationLog.pin` it first (synchronously, right
        after this returns), or the store may close it as idle.

        :raises InvalidIdError: the id is not valid (checked before any file access).
        :raises FileNotFoundError: there is no such conversation.
        :raises OSError: it cannot be opened (e.g. no file descriptor is left,
            :data:`DESCRIPTOR_ERRNOS`, after closing the idle logs).
        :raises LogClosedError: the store is closed.
        """
        path = self.path(conversation_id)
        while True:
            self._check_open()
            log = self._logs.get(conversation_id)
            if log is not None:
                self._logs.move_to_end(conversation_id)
                return log
            task = self._opening.get(conversation_id)
            if task is None:
                # One open per log, shared by concurrent callers and shielded from their
                # cancellation: the open holds a file and a lock only the store releases.
                task = asyncio.ensure_future(self._open(conversation_id, path))
                self._opening[conversation_id] = task
                task.add_done_callback(lambda _: self._opening.pop(conversation_id, None))
            log = await self._await_open(conversation_id, task)
            if self._logs.get(conversation_id) is log:
                return log
            # Closed as idle by another open before this caller resumed: open it again.

    async def _open(self, conversation_id: str, path: Path) -> ConversationLog:
        evicting = self._evicting.get(conversation_id)
        if evicting is not None:  # its fd still holds the lock: wait until it is closed
            await asyncio.shield(evicting)
        known = self._known.pop(conversation_id, None)
        log = await self._retry_on_descriptors(
            lambda: ConversationLog.open(
                path, commit=self.commit, known=known, seal_key=self.seal_key
            )
        )
        self._add(conversation_id, log)
        return log

    async def recover_all(self) -> int:
        """Open (and so recover) every log in the data dir, as many at a time as
        ``max_open`` allows. A log that cannot be opened is logged and skipped: it never
        keeps the others from being served.

        :returns: how many logs were opened.
        """
        opened = 0
        for conversation_id in sorted(self.ids()):
            if await self._try_open(conversation_id) is not None:
                opened += 1
        return opened

    async def _try_open(
        self, conversation_id: str, *, busy_raises: bool = False
    ) -> ConversationLog | None:
        try:
            return await self.open(conversation_id)
        except (OSError, LogError) as exc:
            if isinstance(exc, LogClosedError):
                raise
            if busy_raises and isinstance(exc, OSError) and exc.errno in DESCRIPTOR_ERRNOS:
                raise  # a list that silently left conversations out would look like loss
            logger.error("conversation %s cannot be opened: %s", conversation_id, exc)
            return None

    async def list(self) -> list[ConversationInfo]:
        """Every conversation, newest ``updated`` first.

        Open logs are listed from memory, closed ones from what their last clean close
        left while their file is unchanged (one ``lstat`` each); any other is opened (and
        so recovered) first. A log that cannot be opened is logged and left out.

        :raises OSError: no file descriptor is left (:data:`DESCRIPTOR_ERRNOS`) to open a
            log: a partial list would look like lost conversations.
        """
        rows = []
        for conversation_id, info in self._entries():
            log = self._logs.get(conversation_id)
            known = self._known.get(conversation_id)
            if log is not None:
                rows.append(_row(conversation_id, log.summary, log.committed))
            elif known is not None and info is not None and FileKey.of(info) == known.key:
                rows.append(_row(conversation_id, known.summary, known.end))
            elif (log := await self._try_open(conversation_id, busy_raises=True)) is not None:
                rows.append(_row(conversation_id, log.summary, log.committed))
        rows.sort(key=lambda row: (row.updated, row.id), reverse=True)
        return rows

    def _entries(self) -> list[tuple[str, os.stat_result | None]]:
        out = []
        for conversation_id in self.ids():
            try:
                out.append((conversation_id, os.lstat(self.path(conversation_id))))
            except OSError:
                out.append((conversation_id, None))
        return out

    # -- the bound on open logs -----------------------------------------------------------

    @property
    def open_logs(self) -> int:
        """Logs open now (each holds two file descriptors)."""
        return len(self._logs)

    @property
    def memory(self) -> int:
        """Bytes (roughly) the open logs hold: tails and folded views."""
        return sum(log.memory for log in self._logs.values())

    def _add(self, conversation_id: str, log: ConversationLog) -> None:
        """Put a log just opened or created in :attr:`_logs`, pinned for its callers
        (:meth:`_hand_over` unpins it once the first of them resumed and pinned it
        for itself): concurrent opens would otherwise close each other's new, still
        idle logs over and over."""
        log.pin()
        self._fresh[conversation_id] = log
        self._logs[conversation_id] = log
        self._logs.move_to_end(conversation_id)
        self._evict(self.max_open)

    def _hand_over(self, conversation_id: str, task: asyncio.Task[ConversationLog]) -> None:
        """The open (or create) ``task`` is over and a caller resumed (or was cancelled):
        drop the pin :meth:`_add` took for its callers, once."""
        if task.cancelled() or task.exception() is not None:
            return
        log = task.result()
        if self._fresh.get(conversation_id) is log:
            del self._fresh[conversation_id]
            log.unpin()

    async def _await_open(
        self, conversation_id: str, task: asyncio.Task[ConversationLog]
    ) -> ConversationLog:
        try:
            log = await asyncio.shield(task)
        except asyncio.CancelledError:
            task.add_done_callback(lambda done: self._hand_over(conversation_id, done))
            raise
        self._hand_over(conversation_id, task)
        return log

    def _evict(self, keep: int, *, emergency: bool = False) -> None:
        """Start closing idle logs, least recently used first, until at most ``keep``
        stay open and their memory is within ``max_memory`` (fewer idle ones: as many as
        there are). Synchronous: a log is out of :attr:`_logs` before anything can hand
        it out again.

        A search that found nothing to close is not repeated for :data:`SCAN_PAUSE_S`
        (unless ``emergency``): with every log in use (1,000 replies at once, say), each
        open would otherwise walk all of them; meanwhile the bound is exceeded, as it is
        anyway while every log is in use.
        """
        now = asyncio.get_running_loop().time()
        if not emergency and now < self._next_scan:
            return
        excess = len(self._logs) - keep
        memory = sum(log.memory for log in self._logs.values()) if excess <= 0 else 0
        if excess <= 0 and memory <= self.max_memory:
            return
        closed = 0
        for conversation_id, log in list(self._logs.items()):
            if excess <= 0 and memory <= self.max_memory:
                break
            if not log.idle:
                continue
            del self._logs[conversation_id]
            excess -= 1
            memory -= log.memory
            closed += 1
            task = asyncio.ensure_future(self._close_idle(conversation_id, log))
            self._evicting[conversation_id] = task
            task.add_done_callback(lambda _, c=conversation_id: self._evicting.pop(c, None))
        if not closed and not emergency:
            self._next_scan = now + SCAN_PAUSE_S

    async def _close_idle(self, conversation_id: str, log: ConversationLog) -> None:
        try:
            await log.close()
        except Exception:  # the close of a log nobody uses must not go unseen
            logger.exception("%s: closing an idle log failed", log.path)
            return
        known = log.known()
        if known is not None:
            self._known[conversation_id] = known

    async def _retry_on_descriptors(
        self, attempt: Callable[[], Awaitable[ConversationLog]]
    ) -> ConversationLog:
        """Run ``attempt``; if it finds no file descriptor left, close every idle log and
        run it once more."""
        try:
            return await attempt()
        except OSError as exc:
            if exc.errno not in DESCRIPTOR_ERRNOS:
                raise
            logger.warning(
                "out of file descriptors with %d logs open; closing the idle ones", len(self._logs)
            )
            self._evict(0, emergency=True)
            await asyncio.gather(*self._evicting.values(), return_exceptions=True)
            return await attempt()

    def _check_open(self) -> None:
        if self._closing is not None:
            raise LogClosedError("the store is closed")

    async def close(self) -> None:
        """Close every open log (queued appends are committed first), then release the
        data dir; later opens raise :class:`LogClosedError`. Runs once: concurrent callers
        wait for the same close, and a cancelled caller does not cut it short."""
        if self._closing is None:
            self._closing = asyncio.ensure_future(self._close())
        await asyncio.shield(self._closing)

    async def _close(self) -> None:
        await asyncio.gather(*self._opening.values(), return_exceptions=True)
        await asyncio.gather(*self._evicting.values(), return_exceptions=True)
        logs, self._logs = self._logs, collections.OrderedDict()
        try:
            for log in logs.values():
                await log.close()
            await self.commit.close()
        finally:
            if self._lock_fd >= 0:
                os.close(self._lock_fd)  # releases the data dir
                self._lock_fd = -1


LOCK_NAME: Final = "chatledger.lock"
"""The file in the data dir whose ``flock`` says which process serves it."""


def _row(conversation_id: str, summary: Summary, size: int) -> ConversationInfo:
    return ConversationInfo(
        id=conversation_id,
        title=summary.title,
        created=summary.created,
        updated=summary.updated,
        size=size,
        owner=summary.owner,
        archived=summary.archived,
    )


def _lock_data_dir(data_dir: Path, *, read_only: bool) -> int:
    """The data dir's lock, held (an fd); ``-1`` for a read-only data dir without a lock
    file (no server can be writing it: it would have made one)."""
    path = data_dir / LOCK_NAME
    flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | (0 if read_only else os.O_CREAT)
    try:
        fd = os.open(path, flags | os.O_NONBLOCK, 0o600)  # never blocks on a FIFO
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise ForeignFileError(path, f"{LOCK_NAME} is a symbolic link") from None
        if read_only and exc.errno == errno.ENOENT:
            return -1
        raise
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise ForeignFileError(path, f"{LOCK_NAME} is not a regular file")
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise DataDirLockedError(
            f"another chatledger process is serving {data_dir} (it holds {LOCK_NAME})"
        ) from None
    except BaseException:
        os.close(fd)
        raise
    return fd


def _check_directory(directory: Path) -> None:
    """The logs' directory (``conversations/``, ``audit/``) and the data dir holding it
    must be directories of ours that no other user (nor our group) may write to: whoever
    can rename entries there could swap a directory for a symbolic link after this check
    (``O_NOFOLLOW`` guards only a path's last part)."""
    for path, name, info in (
        (directory.parent, "the data dir", os.stat(directory.parent)),
        (directory, f"{directory.name}/", os.lstat(directory)),
    ):
        if not stat.S_ISDIR(info.st_mode):
            raise ForeignFileError(path, f"{name} is not a directory (a symbolic link?)")
        if info.st_uid != os.geteuid():
            raise ForeignFileError(path, f"{name} is owned by another user")
        if info.st_mode & stat.S_IWOTH:
            raise ForeignFileError(path, f"{name} is writable by every user")
        if info.st_mode & stat.S_IWGRP:
            raise ForeignFileError(path, f"{name} is writable by its group (chmod g-w)")
