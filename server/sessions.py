"""Sessions: who is asking (DESIGN.md "The household", OWASP Session Management and
Authentication cheat sheets).

* **Single-person mode**: while the household has no active account, every request is
  the :data:`LOCAL` viewer (it may read and write everything), as before accounts.
* **Accounts**: once one exists, every route but ``/``, ``/static/…``, ``/api/health``,
  ``/api/login`` (and ``/api/me``, which answers ``401``) needs a session: ``401
  login_required`` otherwise.
* A session is a random id (192 bits, :meth:`storage.household.Household.start_session`)
  in the cookie :data:`COOKIE`: ``HttpOnly; SameSite=Lax; Path=/`` (RFC 6265bis), plus
  ``Secure`` when the public origin is https; ``Max-Age`` :data:`SESSION_MAX_AGE_S`. The
  server keeps only its SHA-256, in the household log: it survives a restart, and
  logout, a new password or ``user remove`` ends it at once, live event streams included
  (:meth:`Sessions.watch`). Each login makes a new id (no fixation) and ends the session
  the request carried.
* Passwords are argon2id (argon2-cffi's defaults: RFC 9106's second recommended option,
  64 MiB, 3 passes, 4 lanes), verified on worker threads of their own, at most
  :data:`HASHING_AT_ONCE` at a time, at the lowest CPU priority (``nice`` 19, which the
  library's lane threads inherit): twenty logins at once would otherwise take both cores
  from the event loop and stall every live stream (bench P8). An unknown name costs a
  verification too, so timing does not tell names.
* Failed logins are throttled (:class:`LoginThrottle`) per account and per client.

Records another process appends (``chatledger user …``) are folded by a poll of the
file's size every :data:`REFRESH_S` seconds (a ``stat``), and before each login.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import contextlib
import copy
import functools
import ipaddress
import logging
import math
import os
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Final

import argon2
from aiohttp import web
from limits import RateLimitItemPerMinute
from limits.aio.storage import MemoryStorage
from limits.aio.strategies import MovingWindowRateLimiter

from ..storage.audit import LOCAL_VIEWER
from ..storage.household import (
    Account,
    AccountError,
    Household,
    HouseholdState,
    name_key,
    session_key,
)

__all__ = [
    "COOKIE",
    "HASHING_AT_ONCE",
    "LOCAL",
    "PUBLIC_PATHS",
    "REFRESH_S",
    "SESSION_MAX_AGE_S",
    "BadCredentialsError",
    "LoginThrottle",
    "Sessions",
    "ThrottledError",
    "Viewer",
    "hash_password",
    "is_loopback",
]

logger = logging.getLogger(__name__)

COOKIE: Final = "chatledger_session"
SESSION_MAX_AGE_S: Final = 30 * 24 * 3600
"""A session's absolute lifetime (s): the cookie's ``Max-Age``, and checked on the server."""
REFRESH_S: Final = 1.0
"""Seconds between polls of the household log for records another process appended."""
HASHING_AT_ONCE: Final = 2
"""argon2id computations at once (each uses 64 MiB, and 4 threads for ~50 ms)."""
PUBLIC_PATHS: Final = frozenset({"/", "/api/health", "/api/login", "/api/me", "/api/logout"})
"""Paths answered without a session (``/static/…`` too)."""

_LOCAL_KEY: Final = "local"  # what LOCAL's streams are watched under (no session key)
_HASHER = argon2.PasswordHasher()  # argon2id, RFC 9106 low-memory defaults


def _lowest_priority() -> None:
    """Run this worker thread (and the threads it starts) at ``nice`` 19: on Linux a
    thread's nice value is its own (``setpriority`` with its thread id)."""
    with contextlib.suppress(OSError):
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)


_HASHING = concurrent.futures.ThreadPoolExecutor(
    max_workers=HASHING_AT_ONCE, thread_name_prefix="argon2", initializer=_lowest_priority
)


@functools.cache
def _dummy_hash() -> str:
    """What an unknown name's password is checked against (an unknown name costs a
    verification too). Made once, on a hashing thread, when the first :class:`Sessions`
    is (not at import: every CLI command would pay ~0.3 s and 64 MiB for it)."""
    return _HASHER.hash("an unknown name costs a verification too")


def is_loopback(host: str) -> bool:
    """Whether ``host`` (``--host``) is a loopback address or ``localhost``: the only
    place single-person mode may listen (DESIGN.md "The household")."""
    if host.lower() in ("localhost", "localhost."):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def hash_password(password: str) -> str:
    """An argon2id PHC string of ``password`` (blocking, ~50 ms, 64 MiB)."""
    return _HASHER.hash(password)


@dataclass(frozen=True)
class Viewer:
    """Who a request is: an account (``id``, ``name``, ``role``), or :data:`LOCAL`.
    ``session`` is the session's key (``None`` for LOCAL)."""

    id: str
    name: str
    role: str
    session: str | None = None

    @property
    def local(self) -> bool:
        return self.id == LOCAL_VIEWER


LOCAL: Final = Viewer(id=LOCAL_VIEWER, name="", role="parent")
"""The viewer of single-person mode: may read and write every conversation."""


class BadCredentialsError(Exception):
    """No active account has that name and password."""


class ThrottledError(Exception):
    """Too many failed logins; ``retry_after`` in seconds."""

    def __init__(self, message: str, retry_after: int) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class LoginThrottle:
    """Failed logins allowed in any moving window of ``minutes``: ``per_account`` for one
    account name, ``per_client`` for one client (OWASP Authentication cheat sheet: limit
    attempts per account and per source). A success clears its account's failures.
    Attempts still being checked count as failures until they are done (:meth:`check`
    to :meth:`done`), so guesses sent at once cannot pass the limit together.

    :param per_account: failures per account name; 0: no limit.
    :param per_client: failures per client; 0: no limit.
    """

    def __init__(self, *, per_account: int = 5, per_client: int = 20, minutes: int = 15) -> None:
        self.minutes = minutes
        self._limits = {
            "account": (per_account, RateLimitItemPerMinute(max(per_account, 1), minutes)),
            "client": (per_client, RateLimitItemPerMinute(max(per_client, 1), minutes)),
        }
        self._storage = MemoryStorage()
        self._limiter = MovingWindowRateLimiter(self._storage)
        self._checking: collections.Counter[tuple[str, str]] = collections.Counter()

    def _keys(self, name: str, client: str) -> tuple[tuple[str, str], ...]:
        return (("account", name_key(name)), ("client", client))

    async def check(self, name: str, client: str) -> None:
        """Start an attempt: it counts as a failure until :meth:`done` (call it, always,
        once this returns).

        :raises ThrottledError: the account or the client has no failure left (the
            attempt did not start).
        """
        keys = self._keys(name, client)
        for kind, key in keys:
            limit, item = self._limits[kind]
            cost = self._checking[kind, key] + 1
            if limit and not await self._limiter.test(item, "login", kind, key, cost=cost):
                stats = await self._limiter.get_window_stats(item, "login", kind, key)
                retry_after = max(1, math.ceil(stats.reset_time - time.time()))
                raise ThrottledError(
                    f"too many failed logins for this {kind}; try again in {retry_after} s",
                    retry_after,
                )
        for kind_key in keys:  # no await since the test: the reservation is atomic
            self._checking[kind_key] += 1

    async def done(self, name: str, client: str, *, ok: bool) -> None:
        """End an attempt :meth:`check` started: a failure is counted, a success clears
        the account's failures."""
        for kind_key in self._keys(name, client):
            self._checking[kind_key] -= 1
            if not self._checking[kind_key]:
                del self._checking[kind_key]
        if ok:
            _, item = self._limits["account"]
            await self._limiter.clear(item, "login", "account", name_key(name))
            return
        for kind, key in self._keys(name, client):
            limit, item = self._limits[kind]
            if limit:
                await self._limiter.hit(item, "login", kind, key)


class Sessions:
    """The household as the server sees it: accounts, sessions, logins.

    :param household: the household log (its calls run on a worker thread here).
    :param throttle: failed-login limits.
    :param clock: seconds since the epoch (tests inject one).
    :param local_allowed: whether single-person mode may serve while no account exists
        (the server listens on a loopback address only); ``False``: with no active
        account nobody is let in (after ``user remove`` of the last one, say).
    """

    def __init__(
        self,
        household: Household,
        *,
        throttle: LoginThrottle | None = None,
        clock: Callable[[], float] = time.time,
        local_allowed: bool = True,
    ) -> None:
        self.household = household
        self.local_allowed = local_allowed
        self.throttle = throttle or LoginThrottle()
        self.clock = clock
        self._lock = asyncio.Lock()  # one household call at a time (it is not thread-safe)
        self._watchers: dict[str, set[Callable[[], None]]] = {}
        self._state = copy.deepcopy(household.state)
        _HASHING.submit(_dummy_hash)  # ready before the first login with an unknown name

    # -- state ----------------------------------------------------------------------------

    @property
    def state(self) -> HouseholdState:
        """The household as last folded: a snapshot the event loop owns (the household log
        folds on a worker thread, into its own copy, swapped in after each call)."""
        return self._state

    @property
    def enabled(self) -> bool:
        """Whether accounts are on: an active account exists, or one ever did (removing
        the last account never brings back single-person mode, where whoever reaches
        the server owns every conversation)."""
        return bool(self.state.accounts)

    def viewer(self, session_id: str | None) -> Viewer | None:
        """The viewer of a cookie's session id: :data:`LOCAL` in single-person mode;
        ``None`` when accounts exist and the id names no live session, and when none
        exists on a server that may not run in single-person mode."""
        if not self.enabled:
            return LOCAL if self.local_allowed else None
        if not session_id:
            return None
        key = session_key(session_id)
        session = self.state.session(key)
        if session is None or self.clock() * 1000 - session.created > SESSION_MAX_AGE_S * 1000:
            return None
        account = self.state.accounts.get(session.account)
        if account is None or account.removed:
            return None
        return Viewer(id=account.id, name=account.name, role=account.role, session=key)

    def live(self, viewer: Viewer) -> bool:
        """Whether ``viewer`` is still who it was: its session is live and its account
        active; for :data:`LOCAL`, single-person mode still holds."""
        if viewer.local:
            return not self.enabled and self.local_allowed
        account = self.state.accounts.get(viewer.id)
        return (
            viewer.session is not None
            and viewer.session in self.state.sessions
            and account is not None
            and not account.removed
        )

    def account(self, account_id: str) -> Account | None:
        return self.state.accounts.get(account_id)

    async def _call(self, function: Callable[..., object], *args: object) -> object:
        async with self._lock:
            before, had_accounts = set(self.state.sessions), self.enabled
            try:
                return await asyncio.to_thread(function, *args)
            finally:
                self._state = copy.deepcopy(self.household.state)  # on the loop, whole
                ended = before - set(self.state.sessions)
                if self.enabled and not had_accounts:
                    ended.add(_LOCAL_KEY)  # the first account: single-person mode is over
                self._ended(ended)

    async def refresh(self) -> None:
        """Fold what another process appended (if the file grew); end the event streams
        of sessions that ended."""
        if self.household.changed():
            await self._call(self.household.refresh)

    async def poll(self) -> None:
        """:meth:`refresh` every :data:`REFRESH_S` seconds until cancelled."""
        while True:
            await asyncio.sleep(REFRESH_S)
            try:
                await self.refresh()
            except Exception:
                logger.exception("cannot read %s", self.household.path)

    # -- logging in and out ---------------------------------------------------------------

    async def login(self, name: str, password: str, client: str) -> tuple[Account, str]:
        """Check ``name`` and ``password``; on success start a session.

        :returns: the account and the new session id (for the cookie).
        :raises ThrottledError: too many failures (nothing was checked).
        :raises BadCredentialsError: no active account has that name and password.
        :raises OSError: the session could not be recorded.
        """
        await self.throttle.check(name, client)
        ok = False
        try:
            await self.refresh()
            account = self.state.named(name) if isinstance(name, str) else None
            phc = account.hash if account is not None else None
            loop = asyncio.get_running_loop()
            ok = await loop.run_in_executor(_HASHING, _verify, phc, password)
            ok = ok and account is not None
        finally:
            await self.throttle.done(name, client, ok=ok)
        if not ok or account is None:
            raise BadCredentialsError(name)
        try:
            session_id = await self._call(self.household.start_session, account.id, client, phc)
        except AccountError:  # removed, or a new password, while this one was checked
            raise BadCredentialsError(name) from None
        assert isinstance(session_id, str)
        return account, session_id

    async def logout(self, key: str) -> None:
        """End the session ``key`` (and its event streams) at once."""
        await self._call(self.household.end_session, key)

    # -- live streams ---------------------------------------------------------------------

    @contextlib.contextmanager
    def watch(self, viewer: Viewer, on_end: Callable[[], None]) -> Iterator[None]:
        """Within the ``with`` block, ``on_end()`` is called (once) if the viewer's
        session ends: logout, a new password, ``user remove``; for :data:`LOCAL`, when
        the first account is added (single-person mode ends)."""
        key = _LOCAL_KEY if viewer.local else viewer.session
        if key is None:
            yield
            return
        self._watchers.setdefault(key, set()).add(on_end)
        if not self.live(viewer):  # it ended while the request was on its way here
            self._watchers[key].discard(on_end)
            on_end()
        try:
            yield
        finally:
            watchers = self._watchers.get(key)
            if watchers is not None:
                watchers.discard(on_end)
                if not watchers:
                    del self._watchers[key]

    def _ended(self, keys: set[str]) -> None:
        for key in keys:
            for on_end in self._watchers.pop(key, ()):
                try:
                    on_end()
                except Exception:
                    logger.exception("ending a stream of a session that ended")


def _verify(phc: str | None, password: str) -> bool:
    """Whether ``password`` matches the argon2 PHC string ``phc`` (``None``: an unknown
    name, checked against :func:`_dummy_hash`). Runs on a hashing thread."""
    try:
        return _HASHER.verify(phc if phc is not None else _dummy_hash(), password)
    except (argon2.exceptions.VerificationError, argon2.exceptions.InvalidHashError):
        return False


def set_cookie(response: web.StreamResponse, session_id: str, *, secure: bool) -> None:
    """The session cookie (see the module's docstring)."""
    response.set_cookie(
        COOKIE,
        session_id,
        max_age=SESSION_MAX_AGE_S,
        path="/",
        httponly=True,
        samesite="Lax",
        secure=secure,
    )


def clear_cookie(response: web.StreamResponse, *, secure: bool) -> None:
    response.del_cookie(COOKIE, path="/", httponly=True, samesite="Lax", secure=secure)
