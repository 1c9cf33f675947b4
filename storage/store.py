"""``Store``: the data dir, ``<data-dir>/conversations/<conversation_id>.jsonl``.

Conversation ids are checked against :data:`CONVERSATION_ID` before any path is built, so
no request can name a file outside ``conversations/``. Logs are opened (and recovered)
once and kept open; the store is the only place that creates or opens them.
"""

from __future__ import annotations

import asyncio
import errno
import fcntl
import logging
import os
import re
import secrets
import stat
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
)
from .log import ConversationLog

__all__ = [
    "CONVERSATION_ID",
    "ConversationInfo",
    "Store",
    "check_id",
    "new_id",
]

CONVERSATION_ID: Final = re.compile(r"[A-Za-z0-9_-]{1,64}")
"""Valid conversation ids (matched in full)."""

SUFFIX: Final = ".jsonl"

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


class Store:
    """The conversations of one data dir.

    One process serves a data dir: the store holds an exclusive ``flock`` on
    ``<data-dir>/chatledger.lock`` from construction until :meth:`close`.

    :param data_dir: created if missing (with ``conversations/`` inside).
    :param durability: policy for every log.
    :param file_io: the system-call layer (tests pass a fault-injecting subclass).
    :raises DataDirLockedError: another process (a second server) holds the data dir.
    :raises ForeignFileError: ``conversations/`` is a symbolic link or not ours.
    """

    def __init__(
        self,
        data_dir: Path,
        *,
        durability: Durability = Durability.FSYNC,
        file_io: FileIO | None = None,
    ) -> None:
        self.data_dir = Path(data_dir)
        self.directory = self.data_dir / "conversations"
        self.durability = Durability(durability)
        self.file_io = file_io or FileIO()
        self.commit = GroupCommit(durability=self.durability, file_io=self.file_io)
        """The group commit every log of the store shares."""
        self._logs: dict[str, ConversationLog] = {}
        self._opening: dict[str, asyncio.Task[ConversationLog]] = {}
        self._closing: asyncio.Task[None] | None = None  # set by the first close()
        self.data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.directory.mkdir(mode=0o700, exist_ok=True)
        _check_directory(self.directory)
        self._lock_fd = _lock_data_dir(self.data_dir)

    def path(self, conversation_id: str) -> Path:
        """The log path of a (valid) id. :raises InvalidIdError:"""
        return self.directory / f"{check_id(conversation_id)}{SUFFIX}"

    def ids(self) -> list[str]:
        """Ids of every log file in the data dir (torn-tail files and strays ignored)."""
        out = []
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
        self, *, title: str, model: str, system: str | None, conversation_id: str | None = None
    ) -> ConversationLog:
        """Create a conversation log (durably) and return it open.

        :raises FileExistsError: ``conversation_id`` is taken.
        :raises OSError: the disk refused the write.
        :raises LogClosedError: the store is closed.
        """
        self._check_open()
        conversation_id = check_id(conversation_id or new_id())
        first = records.conversation(
            conversation_id=conversation_id, title=title, model=model, system=system
        )
        if conversation_id in self._logs or conversation_id in self._opening:
            raise FileExistsError(errno.EEXIST, "the conversation exists", conversation_id)
        # Tracked like an open, shared and shielded: an open or a list during the create
        # waits for it (never reads the file before its first record is synced), close()
        # waits for it, and a cancelled caller does not leave its fd and lock behind.
        task = asyncio.ensure_future(self._create(conversation_id, first))
        self._opening[conversation_id] = task
        task.add_done_callback(lambda _: self._opening.pop(conversation_id, None))
        return await asyncio.shield(task)

    async def _create(self, conversation_id: str, first: records.Record) -> ConversationLog:
        log = await ConversationLog.create(self.path(conversation_id), first, commit=self.commit)
        self._logs[conversation_id] = log
        return log

    async def open(self, conversation_id: str) -> ConversationLog:
        """The open log of ``conversation_id``, opening and recovering it on first use.

        :raises InvalidIdError: the id is not valid (checked before any file access).
        :raises FileNotFoundError: there is no such conversation.
        :raises LogClosedError: the store is closed.
        """
        path = self.path(conversation_id)
        self._check_open()
        log = self._logs.get(conversation_id)
        if log is not None:
            return log
        task = self._opening.get(conversation_id)
        if task is None:
            # One open per log, shared by concurrent callers and shielded from their
            # cancellation: the open holds a file and a lock that only the store releases.
            task = asyncio.ensure_future(self._open(conversation_id, path))
            self._opening[conversation_id] = task
            task.add_done_callback(lambda _: self._opening.pop(conversation_id, None))
        return await asyncio.shield(task)

    async def _open(self, conversation_id: str, path: Path) -> ConversationLog:
        log = await ConversationLog.open(path, commit=self.commit)
        self._logs[conversation_id] = log
        return log

    async def open_all(self) -> list[ConversationLog]:
        """Open (and so recover) every log in the data dir. A log that cannot be opened
        is logged and skipped: it never keeps the others from being served."""
        logs = []
        for conversation_id in sorted(self.ids()):
            try:
                logs.append(await self.open(conversation_id))
            except (OSError, LogError) as exc:
                if isinstance(exc, LogClosedError):
                    raise
                logger.error("conversation %s cannot be opened: %s", conversation_id, exc)
        return logs

    async def list(self) -> list[ConversationInfo]:
        """Every conversation, newest ``updated`` first."""
        rows = []
        for log in await self.open_all():
            summary = log.summary
            rows.append(
                ConversationInfo(
                    id=log.path.name[: -len(SUFFIX)],
                    title=summary.title,
                    created=summary.created,
                    updated=summary.updated,
                    size=log.committed,
                )
            )
        rows.sort(key=lambda row: (row.updated, row.id), reverse=True)
        return rows

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
        logs, self._logs = self._logs, {}
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


def _lock_data_dir(data_dir: Path) -> int:
    path = data_dir / LOCK_NAME
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise ForeignFileError(path, f"{LOCK_NAME} is a symbolic link") from None
        raise
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
    """``conversations/`` and the data dir holding it must be directories of ours that no
    other user may write to: whoever can rename entries there could swap a directory for
    a symbolic link after this check (``O_NOFOLLOW`` guards only a path's last part)."""
    for path, name, info in (
        (directory.parent, "the data dir", os.stat(directory.parent)),
        (directory, "conversations/", os.lstat(directory)),
    ):
        if not stat.S_ISDIR(info.st_mode):
            raise ForeignFileError(path, f"{name} is not a directory (a symbolic link?)")
        if info.st_uid != os.geteuid():
            raise ForeignFileError(path, f"{name} is owned by another user")
        if info.st_mode & stat.S_IWOTH:
            raise ForeignFileError(path, f"{name} is writable by every user")
