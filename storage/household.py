"""The household: accounts, roles, limits and sessions, in their own append-only log
(DESIGN.md "The household"), ``<data-dir>/household.jsonl``.

Same record rules as a conversation log (one orjson object per line, ``type`` and
``ts``; never modified, only appended) and the same durability: a record is written and
``fdatasync``ed before anyone acts on it. Unlike a conversation log it has more than one
writer: the server (sessions) and ``chatledger user ...`` (accounts) append to it, each
under ``flock(LOCK_EX)`` for one append, after folding what the other appended (so a
check such as "this name is free" and its record are one step). A reader folds new
records under ``flock(LOCK_SH)``, so it never sees a record whose writer has not synced
it. Bytes after the last newline that a writer left when it died are a torn tail: never
folded, cut (and kept beside the file) by the next writer.

==============  =========================================================================
record          fields besides ``type``, ``ts``
==============  =========================================================================
``account``     ``id``, ``name``, ``role`` (``parent`` | ``adult`` | ``child``), ``hash``
                (argon2id, PHC string)
``password``    ``account``, ``hash``: a new password (the account's sessions end)
``remove``      ``account``: disabled; its conversations are kept; its sessions end
``limit``       ``account``, ``messages_per_day``, ``tokens_per_day`` (int or null)
``session``     ``sid`` (SHA-256 hex of the session id: the id itself is never stored),
                ``account``, ``client``
``logout``      ``sid``: the session ended
==============  =========================================================================

The fold (:class:`HouseholdState`) is pure; :class:`Household` does the file I/O, in
blocking calls (the server runs them on a worker thread).
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import logging
import os
import re
import unicodedata
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

from . import records
from .durability import FileIO
from .errors import CorruptLogError, ForeignFileError
from .recovery import keep_aside, open_own
from .store import new_id

__all__ = [
    "HOUSEHOLD_FILE",
    "ROLES",
    "Account",
    "AccountError",
    "Household",
    "HouseholdState",
    "Session",
    "check_name",
    "name_key",
    "session_key",
]

logger = logging.getLogger(__name__)

HOUSEHOLD_FILE: Final = "household.jsonl"
ROLES: Final = ("parent", "adult", "child")
MAX_NAME_CHARS: Final = 40


class AccountError(ValueError):
    """An account operation that cannot be done (a taken name, an unknown account, a
    bad role): ``str()`` says why, for a person."""


@dataclass
class Account:
    """One account as the household log says it is now.

    :ivar messages_per_day: the budget of ``user`` messages per day, or ``None``.
    :ivar tokens_per_day: the budget of tokens (``end.usage.total_tokens``) per day.
    """

    id: str
    name: str
    role: str
    hash: str
    created: int
    removed: bool = False
    messages_per_day: int | None = None
    tokens_per_day: int | None = None


@dataclass(frozen=True)
class Session:
    """A live session: its key (:func:`session_key`), its account, when it began (ms)."""

    key: str
    account: str
    created: int


def session_key(session_id: str) -> str:
    """What the household log stores of a session id: its SHA-256, hex. A copy of the
    log (a backup) holds no id that could be used as a cookie."""
    return hashlib.sha256(session_id.encode()).hexdigest()


def check_name(name: object) -> str:
    """``name`` if it can name an account: 1 to :data:`MAX_NAME_CHARS` characters, no
    control or format characters, not only spaces; stripped.

    :raises AccountError: otherwise.
    """
    if not isinstance(name, str):
        raise AccountError("a name must be a string")
    name = name.strip()
    if not 1 <= len(name) <= MAX_NAME_CHARS:
        raise AccountError(f"a name has 1 to {MAX_NAME_CHARS} characters")
    if any(unicodedata.category(ch)[0] in "CZ" and ch != " " for ch in name):
        raise AccountError("a name has no control, format or line-separator characters")
    if re.search(r"\s{2,}", name):
        raise AccountError("a name has no runs of spaces")
    return name


def name_key(name: str) -> str:
    """What two names that are the same account share: stripped, NFKC, case-folded
    (``Mom``, ``MOM`` and fullwidth ``Ｍｏｍ`` are one name)."""  # noqa: RUF002
    return unicodedata.normalize("NFKC", name.strip()).casefold()


@dataclass
class HouseholdState:
    """The household folded from its log's records, in order (pure)."""

    accounts: dict[str, Account] = field(default_factory=dict)
    by_name: dict[str, str] = field(default_factory=dict)  # folded name -> account id
    sessions: dict[str, Session] = field(default_factory=dict)  # key -> session

    def observe(self, record: records.Record) -> None:
        """Fold one record; unknown types and records of unknown accounts are skipped."""
        kind = record.get("type")
        if kind == "account":
            account = Account(
                id=str(record["id"]),
                name=str(record["name"]),
                role=str(record["role"]),
                hash=str(record["hash"]),
                created=record["ts"],
            )
            self.accounts[account.id] = account
            self.by_name[name_key(account.name)] = account.id
            return
        if kind == "logout":
            self.sessions.pop(str(record.get("sid")), None)
            return
        account = self.accounts.get(str(record.get("account")))
        if account is None:
            return
        if kind == "session" and not account.removed:
            sid = str(record.get("sid"))
            self.sessions[sid] = Session(key=sid, account=account.id, created=record["ts"])
        elif kind == "password":
            account.hash = str(record["hash"])
            self._end_sessions(account.id)
        elif kind == "remove":
            account.removed = True
            self.by_name.pop(name_key(account.name), None)  # the name may be used again
            self._end_sessions(account.id)
        elif kind == "limit":
            account.messages_per_day = record.get("messages_per_day")
            account.tokens_per_day = record.get("tokens_per_day")

    def _end_sessions(self, account_id: str) -> None:
        for key in [k for k, s in self.sessions.items() if s.account == account_id]:
            del self.sessions[key]

    # -- questions ------------------------------------------------------------------------

    def active(self) -> list[Account]:
        """Accounts not removed, oldest first."""
        return [a for a in self.accounts.values() if not a.removed]

    def named(self, name: str) -> Account | None:
        """The active account called ``name`` (case and width folded), or ``None``."""
        account_id = self.by_name.get(name_key(name.strip()))
        return self.accounts.get(account_id) if account_id else None

    def first_parent(self) -> Account | None:
        """The first account ever made a parent: the owner of logs written before
        accounts (DESIGN.md "The household")."""
        return next((a for a in self.accounts.values() if a.role == "parent"), None)

    def session(self, key: str) -> Session | None:
        return self.sessions.get(key)


class Household:
    """The household log of a data dir, folded in memory (blocking I/O).

    :param data_dir: the data dir (the file is created on first append).
    :param file_io: the system-call layer (writes and syncs go through it).
    :param durable: ``fdatasync`` each append (the ``fsync`` policy); else ``write``.
    :raises CorruptLogError: a record that does not decode is followed by one that does.
    :raises ForeignFileError: the file is not a regular file of ours.
    """

    def __init__(self, data_dir: Path, *, file_io: FileIO | None = None, durable: bool = True):
        self.path = Path(data_dir) / HOUSEHOLD_FILE
        self.file_io = file_io or FileIO()
        self.durable = durable
        self.state = HouseholdState()
        self.end = 0  # bytes folded (a record boundary)
        self._fd = -1
        self.failure: OSError | None = None
        """The write or sync that failed: this object takes no more appends (DESIGN.md:
        a failed write or sync is fatal for the log; a new process recovers it)."""
        self.refresh()

    # -- reading --------------------------------------------------------------------------

    def _open(self, *, create: bool) -> bool:
        if self._fd >= 0:
            return True
        flags = os.O_RDWR | os.O_APPEND | (os.O_CREAT if create else 0)
        existed = self.path.exists()
        try:
            self._fd = open_own(self.path, flags)
        except ForeignFileError:
            raise  # a link or another's file: never "no accounts" (single-person mode)
        except FileNotFoundError:
            return False
        except OSError as exc:
            if exc.errno not in (errno.EROFS, errno.EACCES) or create:
                raise
            self._fd = open_own(self.path, os.O_RDONLY)
        if create and not existed:
            self.file_io.fsync_dir(self.path.parent)
        return True

    def refresh(self) -> bool:
        """Fold the records others appended since the last call (under ``LOCK_SH``);
        nothing after this object's own write or sync failed (its record may be there).

        :returns: whether anything new was folded.
        :raises CorruptLogError: see the class.
        """
        if self.failure is not None or not self._open(create=False):
            return False
        fcntl.flock(self._fd, fcntl.LOCK_SH)
        try:
            return self._fold_new(cut=False)
        finally:
            fcntl.flock(self._fd, fcntl.LOCK_UN)

    def changed(self) -> bool:
        """Whether the file is longer than what was folded (one ``stat``; no lock)."""
        try:
            return os.stat(self.path).st_size != self.end
        except FileNotFoundError:
            return False

    def _fold_new(self, *, cut: bool) -> bool:
        """Fold the complete records past :attr:`end`; with ``cut`` (under ``LOCK_EX``),
        cut what follows them (a torn tail), keeping its bytes beside the file."""
        size = os.fstat(self._fd).st_size
        if size == self.end:
            return False
        data = os.pread(self._fd, size - self.end, self.end)
        complete = data[: data.rfind(b"\n") + 1]  # a torn tail after the last newline
        decoded: list[records.Record] = []
        bad: int | None = None  # offset of the first invalid line
        position = self.end
        for line in complete.split(b"\n")[:-1]:
            try:
                record = records.decode(line)
            except records.RecordError:
                if bad is None:
                    bad = position
            else:
                if bad is not None:
                    raise CorruptLogError(self.path, bad, "an invalid record before valid ones")
                decoded.append(record)
            position += len(line) + 1
        for record in decoded:
            self.state.observe(record)
        self.end = bad if bad is not None else self.end + len(complete)
        if cut and self.end < size:  # a writer died mid-append: keep its bytes, cut them
            torn = os.pread(self._fd, size - self.end, self.end)
            keep_aside(self.path, "torn", torn, file_io=self.file_io)
            os.ftruncate(self._fd, self.end)
            self.file_io.fdatasync(self._fd)
            logger.warning("%s: cut a torn tail of %d bytes at %d", self.path, len(torn), self.end)
        return bool(decoded)

    # -- writing --------------------------------------------------------------------------

    def append(
        self, build: Callable[[HouseholdState], list[records.Record]]
    ) -> list[records.Record]:
        """Append the records ``build(state)`` returns, ``state`` being the household with
        every record already appended by anyone folded in; ``build`` raises to append
        nothing. Under ``LOCK_EX``: fold what is new, cut a torn tail, write, sync,
        fold the new records.

        :raises AccountError: from ``build``.
        :raises OSError: the write or sync failed (the records may not be durable: this
            call then re-reads the file on the next refresh, never folds them blindly).
        """
        if self.failure is not None:
            raise OSError(self.failure.errno, f"the household log failed: {self.failure}")
        self._open(create=True)
        fcntl.flock(self._fd, fcntl.LOCK_EX)
        try:
            self._fold_new(cut=True)
            new = build(self.state)
            if not new:
                return []
            data = b"".join(records.encode(record) for record in new)
            try:
                self.file_io.write_all(self._fd, data)
                if self.durable:
                    self.file_io.fdatasync(self._fd)
            except OSError as exc:
                # Never retried as if it worked, nor folded: the kernel may have dropped
                # the bytes and still report them clean. What was written, if anything,
                # is cut by the next writer that finds it (a torn tail) or kept.
                self.failure = exc
                raise
            self._fold_new(cut=False)
            return new
        finally:
            fcntl.flock(self._fd, fcntl.LOCK_UN)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    # -- the operations ---------------------------------------------------------------------

    def add_account(self, name: str, role: str, password_hash: str) -> Account:
        """Add an account.

        :raises AccountError: the name is taken or invalid, or the role is unknown.
        """
        name = check_name(name)
        if role not in ROLES:
            raise AccountError(f"the role must be one of: {', '.join(ROLES)}")
        account_id = new_id()

        def build(state: HouseholdState) -> list[records.Record]:
            if state.named(name) is not None:
                raise AccountError(f"there is already an account called {name!r}")
            return [
                {
                    "type": "account",
                    "ts": records.now_ms(),
                    "id": account_id,
                    "name": name,
                    "role": role,
                    "hash": password_hash,
                }
            ]

        self.append(build)
        return self.state.accounts[account_id]

    def _on_account(self, name: str, make: Callable[[Account], records.Record]) -> Account:
        holder: list[Account] = []

        def build(state: HouseholdState) -> list[records.Record]:
            account = state.named(name)
            if account is None:
                raise AccountError(f"there is no account called {name!r}")
            holder.append(account)
            return [make(account)]

        self.append(build)
        return holder[0]

    def set_password(self, name: str, password_hash: str) -> Account:
        """A new password for ``name``; its sessions end. :raises AccountError:"""
        return self._on_account(
            name,
            lambda a: {
                "type": "password",
                "ts": records.now_ms(),
                "account": a.id,
                "hash": password_hash,
            },
        )

    def remove_account(self, name: str) -> Account:
        """Disable ``name`` (its conversations are kept); its sessions end.
        :raises AccountError:"""
        return self._on_account(
            name, lambda a: {"type": "remove", "ts": records.now_ms(), "account": a.id}
        )

    def set_limit(
        self, name: str, *, messages_per_day: int | None, tokens_per_day: int | None
    ) -> Account:
        """Set (``None``: remove) the daily budgets of ``name``. :raises AccountError:"""
        for value in (messages_per_day, tokens_per_day):
            if value is not None and (not isinstance(value, int) or value < 0):
                raise AccountError("a limit is a whole number, 0 or more")
        return self._on_account(
            name,
            lambda a: {
                "type": "limit",
                "ts": records.now_ms(),
                "account": a.id,
                "messages_per_day": messages_per_day,
                "tokens_per_day": tokens_per_day,
            },
        )

    def start_session(self, account_id: str, client: str, verified: str | None = None) -> str:
        """A new session for an active account: returns the session id (to put in the
        cookie); the log keeps only its :func:`session_key`. ``verified``: the password
        hash the login checked, which must still be the account's.

        :raises AccountError: the account was removed, or got a new password, meanwhile.
        """
        session_id = new_id() + new_id()  # 192 bits

        def build(state: HouseholdState) -> list[records.Record]:
            account = state.accounts.get(account_id)
            if account is None or account.removed:
                raise AccountError("the account was removed")
            if verified is not None and account.hash != verified:
                raise AccountError("the password changed while it was checked")
            return [
                {
                    "type": "session",
                    "ts": records.now_ms(),
                    "sid": session_key(session_id),
                    "account": account_id,
                    "client": client,
                }
            ]

        self.append(build)
        return session_id

    def end_session(self, key: str) -> None:
        """End the session whose key is ``key`` (nothing when it is not live)."""
        self.append(
            lambda state: (
                [{"type": "logout", "ts": records.now_ms(), "sid": key}]
                if key in state.sessions
                else []
            )
        )
