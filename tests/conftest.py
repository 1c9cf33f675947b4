"""Shared fixtures: a real aiohttp server on loopback over a real data dir, a
fault-injecting :class:`FaultyIO` for the log's write path, and headless Chromium."""

from __future__ import annotations

import asyncio
import errno
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from aiohttp.test_utils import TestClient, TestServer

from chatledger.server.app import init_app
from chatledger.server.providers.demo import DemoProvider
from chatledger.server.settings import Settings
from chatledger.storage import Durability, FileIO, GroupCommit


@dataclass
class Fault:
    """One armed fault of :class:`FaultyIO` (see :meth:`FaultyIO.arm`)."""

    errno: int
    skip: int
    persistent: bool
    partial: bool
    when: Callable[[bytes], bool] | None
    fired: bool = False


class FaultyIO(FileIO):
    """A :class:`FileIO` whose ``write_all``/``fdatasync``/``syncfs`` can fail, tear or
    slow down: the kinds of call ``"write"``, ``"sync"`` (``fdatasync``) and ``"syncfs"``.

    :ivar target: when set, only writes and syncs of files whose path contains it are
        counted, faulted or slowed; other files go straight through. (``syncfs`` is of
        a whole file system: always counted.)
    :ivar calls: counted calls per kind.
    :ivar calls_after_fault: calls per kind made after that kind's fault fired.
    :ivar sync_delay: seconds each counted sync sleeps first.
    :ivar on_sync: called with the fd after each successful counted sync.
    :ivar syncfs_paths: what each ``syncfs`` was called on.
    :ivar fdatasynced: the file of each ``fdatasync``, counted or not.
    """

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.target: str | None = None
        self.calls = {"write": 0, "sync": 0, "syncfs": 0}
        self.calls_after_fault = {"write": 0, "sync": 0, "syncfs": 0}
        self.faults: dict[str, Fault] = {}
        self.sync_delay = 0.0
        self.syncfs_paths: list[Path] = []
        self.fdatasynced: list[Path] = []
        self.on_sync: Callable[[int], None] | None = None

    def arm(
        self,
        call: str,
        *,
        errno: int = errno.EIO,
        skip: int = 0,
        persistent: bool = True,
        partial: bool = False,
        when: Callable[[bytes], bool] | None = None,
    ) -> None:
        """Fail a future ``call`` (``"write"``, ``"sync"``, ``"syncfs"``) with
        ``OSError(errno)``.

        :param skip: let this many matching calls succeed first.
        :param persistent: every later call of that kind fails too (else only one).
        :param partial: a failing write first writes half its bytes (a torn write).
        :param when: for writes, fail only a call whose bytes match this predicate.
        """
        self.faults[call] = Fault(errno, skip, persistent, partial, when)

    def disarm(self) -> None:
        self.faults.clear()

    def _targeted(self, fd: int) -> bool:
        return self.target is None or self.target in os.readlink(f"/proc/self/fd/{fd}")

    def _check(self, call: str, data: bytes = b"") -> Fault | None:
        with self.lock:
            self.calls[call] += 1
            fault = self.faults.get(call)
            if fault is None:
                return None
            if fault.fired:
                self.calls_after_fault[call] += 1
                return fault if fault.persistent else None
            if fault.when is not None and not fault.when(data):
                return None
            if fault.skip:
                fault.skip -= 1
                return None
            fault.fired = True
            return fault

    def write_all(self, fd: int, data: bytes) -> None:
        if self._targeted(fd) and (fault := self._check("write", data)) is not None:
            if fault.partial:
                super().write_all(fd, data[: len(data) // 2])
            raise OSError(fault.errno, os.strerror(fault.errno))
        super().write_all(fd, data)

    def fdatasync(self, fd: int) -> None:
        self.fdatasynced.append(Path(os.readlink(f"/proc/self/fd/{fd}")))
        if not self._targeted(fd):
            return super().fdatasync(fd)
        if self.sync_delay:
            time.sleep(self.sync_delay)
        if (fault := self._check("sync")) is not None:
            raise OSError(fault.errno, os.strerror(fault.errno))
        super().fdatasync(fd)
        if self.on_sync is not None:
            self.on_sync(fd)

    def syncfs(self, fd: int) -> None:
        self.syncfs_paths.append(Path(os.readlink(f"/proc/self/fd/{fd}")))
        if self.sync_delay:
            time.sleep(self.sync_delay)
        if (fault := self._check("syncfs")) is not None:
            raise OSError(fault.errno, os.strerror(fault.errno))
        super().syncfs(fd)


@pytest.fixture
async def group_commit():
    """``group_commit(durability=..., file_io=...)``: a :class:`GroupCommit` for logs a
    test builds itself (as a :class:`~chatledger.storage.Store` does); closed after the
    test, after its logs."""
    made: list[GroupCommit] = []

    def make(*, durability: Durability = Durability.FSYNC, file_io: FileIO | None = None):
        commit = GroupCommit(durability=durability, file_io=file_io)
        made.append(commit)
        return commit

    yield make
    for commit in made:
        await commit.close()


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    return tmp_path / "data"


@pytest.fixture
def make_client(aiohttp_client, data_dir: Path):
    """``await make_client(**settings, file_io=..., provider=...)``: a test client for a
    real server on a loopback port over ``data_dir``."""

    async def make(
        *,
        file_io: FileIO | None = None,
        provider=None,
        clock=None,
        audit_file_io: FileIO | None = None,
        **overrides,
    ) -> TestClient:
        settings = Settings(
            data_dir=overrides.pop("data_dir", data_dir),
            durability=overrides.pop("durability", Durability.FSYNC),
            keepalive=overrides.pop("keepalive", 15.0),
            retry_ms=overrides.pop("retry_ms", 500),
            demo_tokens_per_s=overrides.pop("demo_tokens_per_s", 0),
            messages_per_minute=overrides.pop("messages_per_minute", 0),
            creates_per_minute=overrides.pop("creates_per_minute", 0),
            **overrides,
        )
        if provider is None:
            provider = DemoProvider(
                tokens_per_s=settings.demo_tokens_per_s,
                reply_tokens=settings.demo_reply_tokens,
                context_tokens=settings.context_tokens,
            )
        extra = {"clock": clock} if clock is not None else {}
        app = init_app(
            settings, file_io=file_io, provider=provider, audit_file_io=audit_file_io, **extra
        )
        return await aiohttp_client(TestServer(app, host="127.0.0.1"))

    return make


def check_seals(data: bytes, key: bytes | None = None) -> int:
    """Recompute every seal in a log's bytes (as ``chatledger verify`` does); assert each
    matches; return how many there are."""
    from chatledger.storage import records
    from chatledger.storage.seal import SealCheck

    check = SealCheck(key=key)
    for line in data.splitlines(keepends=True):
        try:
            record = records.decode(line)
        except records.RecordError:
            record = None
        check.line(line, record)
    assert check.first_bad is None, check.reason
    return check.seals


def unsealed(recs: list[dict]) -> list[dict]:
    """``recs`` without their ``seal`` records (what the tests of content compare)."""
    return [r for r in recs if r["type"] != "seal"]


def add_account(data_dir: Path, name: str, role: str, password: str = "password-1") -> str:
    """Add an account to the household log of ``data_dir`` as ``chatledger user add``
    does (argon2id hash); returns its id. Works while a server runs on ``data_dir``."""
    from chatledger.server.sessions import hash_password
    from chatledger.storage.household import Household

    data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    household = Household(data_dir)
    try:
        return household.add_account(name, role, hash_password(password)).id
    finally:
        household.close()


async def login(client: TestClient, name: str, password: str = "password-1") -> dict:
    """``POST /api/login``; the client's cookie jar keeps the session. Returns the body."""
    response = await client.post("/api/login", json={"name": name, "password": password})
    assert response.status == 200, await response.text()
    return await response.json()


async def create_conversation(client: TestClient, **body) -> str:
    response = await client.post("/api/conversations", json=body)
    assert response.status == 201, await response.text()
    return (await response.json())["id"]


async def wait_idle(client: TestClient, conversation_id: str, limit_s: float = 30.0) -> dict:
    """Poll until no reply runs; returns the folded conversation."""
    deadline = time.monotonic() + limit_s
    while True:
        response = await client.get(f"/api/conversations/{conversation_id}")
        body = await response.json()
        if body["running"] is None:
            return body
        assert time.monotonic() < deadline, "reply did not finish"
        await asyncio.sleep(0.02)


CHROMIUM = "/usr/bin/chromium"
"""Debian's Chromium, which the browser tests drive through Playwright."""

CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


@pytest.fixture
def browser():
    """Headless :data:`CHROMIUM` through Playwright's sync API."""
    playwright_sync = pytest.importorskip("playwright.sync_api")
    with playwright_sync.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield browser
        browser.close()
