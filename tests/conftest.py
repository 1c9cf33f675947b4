"""Shared fixtures: a real aiohttp server on loopback over a real data dir, and a
fault-injecting :class:`FaultyIO` for the log's write path."""

from __future__ import annotations

import errno
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from server.app import init_app
from server.providers.demo import DemoProvider
from server.settings import Settings
from storage import Durability, FileIO


class FaultyIO(FileIO):
    """A :class:`FileIO` that can fail or slow down chosen calls.

    :ivar fail_write: ``n`` -> the n-th ``write_all`` call (1-based, counted from when it is
        set) and every later one raise ``OSError(fail_errno)``; ``persistent=False`` fails
        only that call.
    :ivar fail_write_if: a predicate on the bytes of a ``write_all``; the first write it
        matches fails (and, ``persistent``, every later one).
    :ivar target: when set, only calls on files whose path contains it count and fail.
    :ivar sync_delay: seconds each ``fdatasync`` sleeps before syncing.
    :ivar synced: byte counts per fd that completed ``fdatasync`` (for ordering checks).
    """

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.writes = 0
        self.syncs = 0
        self.fail_write: int | None = None
        self.fail_sync: int | None = None
        self.fail_errno = errno.EIO
        self.target: str | None = None
        self.fail_write_if: Callable[[bytes], bool] | None = None
        self._tripped = False
        self.persistent = True
        self.sync_delay = 0.0
        self.written_to: dict[int, int] = {}
        self.synced_to: dict[int, int] = {}
        self.on_sync: Callable[[int], None] | None = None

    def _should_fail(self, count: int, at: int | None) -> bool:
        return at is not None and (count == at or (self.persistent and count > at))

    def _targeted(self, fd: int) -> bool:
        return self.target is None or self.target in os.readlink(f"/proc/self/fd/{fd}")

    def write_all(self, fd: int, data: bytes) -> None:
        if not self._targeted(fd):
            return super().write_all(fd, data)
        with self.lock:
            self.writes += 1
            count = self.writes
            if self.fail_write_if is not None and (
                (self._tripped and self.persistent) or self.fail_write_if(data)
            ):
                self._tripped = True
                raise OSError(self.fail_errno, os.strerror(self.fail_errno))
        if self._should_fail(count, self.fail_write):
            raise OSError(self.fail_errno, os.strerror(self.fail_errno))
        super().write_all(fd, data)
        with self.lock:
            self.written_to[fd] = self.written_to.get(fd, 0) + len(data)

    def fdatasync(self, fd: int) -> None:
        if not self._targeted(fd):
            return super().fdatasync(fd)
        with self.lock:
            self.syncs += 1
            count = self.syncs
        if self.sync_delay:
            time.sleep(self.sync_delay)
        if self._should_fail(count, self.fail_sync):
            raise OSError(self.fail_errno, os.strerror(self.fail_errno))
        super().fdatasync(fd)
        with self.lock:
            self.synced_to[fd] = os.fstat(fd).st_size
        if self.on_sync is not None:
            self.on_sync(fd)


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    return tmp_path / "data"


@pytest.fixture
def faulty_io() -> FaultyIO:
    return FaultyIO()


@pytest.fixture
def make_client(aiohttp_client, data_dir: Path):
    """``await make_client(**settings, file_io=..., provider=...)``: a test client for a
    real server on a loopback port over ``data_dir``."""

    async def make(*, file_io: FileIO | None = None, provider=None, **overrides) -> TestClient:
        settings = Settings(
            data_dir=data_dir,
            durability=overrides.pop("durability", Durability.FSYNC),
            keepalive=overrides.pop("keepalive", 15.0),
            retry_ms=overrides.pop("retry_ms", 500),
            demo_tokens_per_s=overrides.pop("demo_tokens_per_s", 0),
            messages_per_minute=overrides.pop("messages_per_minute", 0),
            **overrides,
        )
        if provider is None:
            provider = DemoProvider(
                tokens_per_s=settings.demo_tokens_per_s,
                reply_tokens=settings.demo_reply_tokens,
            )
        app = init_app(settings, file_io=file_io, provider=provider)
        return await aiohttp_client(TestServer(app, host="127.0.0.1"))

    return make


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
        await _sleep(0.02)


async def _sleep(seconds: float) -> None:
    import asyncio

    await asyncio.sleep(seconds)


def app_of(client: TestClient) -> web.Application:
    return client.server.app
