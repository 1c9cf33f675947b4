"""A fixed number of file descriptors for any number of conversations (issue "Hardening",
finding 2): logs open lazily, idle ones close least recently used first, an unchanged log
reopens without a recovery scan, and running out of descriptors is a clean answer that
leaves nothing behind. The first tests drive a ``Store``; the last runs the real server
with its open-file limit at 1,024 over 5,000 conversations."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import random
import resource
from pathlib import Path

import aiohttp
import pytest

from chatledger.storage import (
    ConversationLog,
    Durability,
    LogFailedError,
    Store,
    records,
    recovery,
)

from .conftest import FaultyIO
from .server_process import serve


def own_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


async def settle(store: Store) -> None:
    """Let the closes of idle logs the store started run to their end."""
    for _ in range(100):
        await asyncio.sleep(0)
    await asyncio.sleep(0.05)


@pytest.fixture
def count_scans(monkeypatch):
    calls: list[int] = []
    real = recovery.scan

    def counting(stream):
        calls.append(1)
        return real(stream)

    monkeypatch.setattr(recovery, "scan", counting)
    return calls


async def create(store: Store, n: int, prefix: str = "c") -> list[str]:
    ids = []
    for k in range(n):
        log = await store.create(
            title=f"{prefix}{k}", model="m", system=None, conversation_id=f"{prefix}{k}"
        )
        await log.append(records.user(message_id=f"u{k}", text=f"hello {k}"))
        ids.append(f"{prefix}{k}")
    return ids


async def test_two_file_descriptors_per_conversation_forever_is_bounded(tmp_path):
    """Finding 2: every conversation ever opened kept two fds. Now at most ``max_open``
    logs are open, whatever the number of conversations, and each is still listed, read
    and written."""
    before = own_fds()
    store = Store(tmp_path, durability=Durability.FLUSH, max_open=4)
    try:
        ids = await create(store, 40)
        await settle(store)
        assert store.open_logs <= 4
        assert own_fds() - before <= 2 * 4 + 1  # + the data dir's lock
        assert sorted(row.id for row in await store.list()) == sorted(ids)
        sample = random.Random(1).sample(range(40), 10)
        for k in sample:
            log = await store.open(f"c{k}")
            log.pin()
            try:
                assert b"hello %d" % k in await log.read()
                await log.append(records.title(title=f"renamed {k}"))
            finally:
                log.unpin()
            await settle(store)
            assert store.open_logs <= 4
        titles = {row.id: row.title for row in await store.list()}
        assert titles == {f"c{k}": f"renamed {k}" if k in sample else f"c{k}" for k in range(40)}
        assert own_fds() - before <= 2 * 4 + 1
    finally:
        await store.close()
    assert own_fds() == before


async def test_a_pinned_log_is_never_closed_as_idle(tmp_path):
    store = Store(tmp_path, durability=Durability.FLUSH, max_open=2)
    try:
        await create(store, 1, "kept")
        kept = await store.open("kept0")
        kept.pin()
        followed = await store.open("kept0")
        assert followed is kept
        await create(store, 10)
        await settle(store)
        assert not kept.closed and kept.live
        await kept.append(records.user(message_id="later", text="still writable"))
        assert await store.open("kept0") is kept
        kept.unpin()
        await create(store, 3, "more")
        await settle(store)
        assert kept.closed  # idle now: closed like any other
        reopened = await store.open("kept0")
        assert reopened is not kept and b"still writable" in await reopened.read()
    finally:
        await store.close()


async def test_an_unchanged_log_reopens_without_a_recovery_scan(tmp_path, count_scans):
    store = Store(tmp_path, durability=Durability.FSYNC, max_open=1)
    try:
        await create(store, 3)
        await settle(store)
        count_scans.clear()
        assert {row.id for row in await store.list()} == {"c0", "c1", "c2"}
        assert count_scans == []  # listed from what the clean closes left
        log = await store.open("c0")
        assert count_scans == []  # reopened without a scan
        assert log.live and log.summary.title == "c0"
        end = await log.append(records.user(message_id="x", text="again"))
        assert end == log.committed
        await store.open("c1")  # c0 closes (max_open=1)
        await settle(store)
        # changed behind the store's back (a torn tail, as if written by another tool):
        # the key no longer matches, so the next open recovers it
        path = tmp_path / "conversations" / "c0.jsonl"
        path.write_bytes(path.read_bytes() + b'{"type":"chu')
        count_scans.clear()
        rows = {row.id: row for row in await store.list()}
        assert count_scans == [1]
        assert rows["c0"].size == end
        torn = [p.name for p in (tmp_path / "conversations").iterdir() if ".torn-" in p.name]
        assert len(torn) == 1
    finally:
        await store.close()


@contextlib.contextmanager
def fd_limit(spare: int):
    """Lower this process's soft open-file limit to the fds open now plus ``spare``."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (own_fds() + spare, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


async def test_out_of_file_descriptors_closes_idle_logs_and_retries(tmp_path):
    store = Store(tmp_path, durability=Durability.FLUSH, max_open=1000)
    try:
        await create(store, 1, "warm")  # the group commit's own fds are open
        with fd_limit(spare=24):
            ids = await create(store, 40)
        await settle(store)
        assert store.open_logs < 40
        assert {row.id for row in await store.list()} == {"warm0", *ids}
    finally:
        await store.close()


async def test_out_of_file_descriptors_with_every_log_in_use_leaves_no_phantom(tmp_path):
    """Finding 2: a create that hit EMFILE after making its file left a phantom,
    permanently read-only conversation. Now the error is raised, no file is left, and
    the next create (once descriptors are free) works."""
    store = Store(tmp_path, durability=Durability.FLUSH, max_open=1000)
    pinned: list[ConversationLog] = []
    try:
        await create(store, 1, "warm")
        failure = None
        with fd_limit(spare=15):
            for k in range(20):
                try:
                    log = await store.create(
                        title="t", model="m", system=None, conversation_id=f"p{k}"
                    )
                except OSError as exc:
                    failure = exc
                    break
                log.pin()  # in use: the store may not close it
                pinned.append(log)
        assert failure is not None and failure.errno == errno.EMFILE
        names = sorted(p.name for p in (tmp_path / "conversations").iterdir())
        assert names == sorted(["warm0.jsonl", *(f"p{k}.jsonl" for k in range(len(pinned)))])
        for log in pinned:
            log.unpin()
        log = await store.create(title="t", model="m", system=None, conversation_id="after")
        assert log.live
        assert len(await store.list()) == len(pinned) + 2
    finally:
        await store.close()


# -- the real server, 1,024 fds, 5,000 conversations ------------------------------------


def write_conversations(directory: Path, n: int) -> list[str]:
    directory.mkdir(parents=True, mode=0o700)
    ids = []
    for k in range(n):
        cid = f"conv{k:05d}"
        lines = [
            records.conversation(conversation_id=cid, title=f"chat {k}", model="demo", system=None),
            records.user(message_id="u1", text=f"question {k}"),
            records.start(reply_id="r1", reply_to="u1", model="demo"),
            records.chunk(reply_id="r1", i=0, text=f"answer {k}"),
            records.end(reply_id="r1", finish="stop"),
        ]
        (directory / f"{cid}.jsonl").write_bytes(b"".join(records.encode(r) for r in lines))
        ids.append(cid)
    return ids


async def statuses(session: aiohttp.ClientSession, method: str, url: str, n: int, **kw):
    async def one():
        async with session.request(method, url, **kw) as response:
            body = await response.json(content_type=None)
            return response.status, body

    return await asyncio.gather(*(one() for _ in range(n)))


async def test_5000_conversations_under_a_1024_descriptor_limit(tmp_path):
    data_dir = tmp_path / "data"
    ids = write_conversations(data_dir / "conversations", 5000)
    args = (
        "--durability",
        "flush",
        "--demo-tokens-per-s",
        "0",
        "--messages-per-minute",
        "0",
        "--creates-per-minute",
        "100",
        "--max-streams-per-client",
        "0",
    )
    with serve(data_dir, *args, nofile=1024, timeout=300) as server:
        fds = Path(f"/proc/{server.process.pid}/fd")
        connector = aiohttp.TCPConnector(limit=0)
        async with aiohttp.ClientSession(server.url, connector=connector) as session:
            async with session.get("/api/conversations") as response:
                assert response.status == 200
                listed = await response.json()
            assert sorted(row["id"] for row in listed) == ids
            for cid in random.Random(5).sample(ids, 5):
                async with session.get(f"/api/conversations/{cid}") as response:
                    body = await response.json()
                assert response.status == 200 and body["writable"]
                assert body["messages"][-1]["text"].startswith("answer")
                async with session.post(
                    f"/api/conversations/{cid}/messages", json={"text": "and now?"}
                ) as response:
                    assert response.status == 202, await response.text()
            assert len(os.listdir(fds)) < 1024 // 2
            # a create storm: clean answers only, and no phantom left behind
            answers = await statuses(session, "POST", "/api/conversations", 300, json={})
            assert {status for status, _ in answers} <= {201, 429, 503}
            created = {body["id"] for status, body in answers if status == 201}
            assert created
            for status, body in answers:
                if status != 201:
                    assert body["error"] in {"too_many_requests", "server_busy"}
            on_disk = {p.name[: -len(".jsonl")] for p in (data_dir / "conversations").iterdir()}
            assert on_disk == set(ids) | created
            # event streams on 900 conversations at once pin 900 logs (1,800 fds): what
            # does not fit is a clean 503 and the server stays up
            streams = []
            refused = []
            for cid in ids[:900]:
                response = await session.get(f"/api/conversations/{cid}/events")
                if response.status == 200:
                    streams.append(response)
                else:
                    refused.append((response.status, await response.json(content_type=None)))
                    response.release()
            assert streams and (503, "server_busy") in {(s, b["error"]) for s, b in refused}
            assert {(status, body["error"]) for status, body in refused} <= {
                (503, "server_busy"),
                (429, "too_many_requests"),
            }
            for response in streams:
                response.close()
            await asyncio.sleep(0.5)
            async with session.get(f"/api/conversations/{ids[-1]}/log") as response:
                assert response.status == 200
        server.process.terminate()
        assert server.process.wait(60) == 0
    with serve(data_dir, *args, nofile=1024, timeout=300) as server:
        async with (
            aiohttp.ClientSession(server.url) as session,
            session.get("/api/conversations") as response,
        ):
            assert len(await response.json()) == len(ids) + len(created)


async def test_concurrent_opens_do_not_close_each_others_new_logs(tmp_path, monkeypatch):
    """With every open log in use, 50 opens at once used to close each other's
    just-opened (still idle) logs over and over before their callers could pin them
    (bench: 1,000 replies took 40 s to start instead of 2). Each log now opens once."""
    store = Store(tmp_path, durability=Durability.FLUSH, max_open=2)
    opens = []
    real = ConversationLog.open

    async def counting(path, **kw):
        opens.append(path.name)
        return await real(path, **kw)

    try:
        ids = await create(store, 50)
        await settle(store)
        monkeypatch.setattr(ConversationLog, "open", counting)

        async def use(cid: str) -> ConversationLog:
            log = await store.open(cid)
            log.pin()  # as a request or a reply does, at once
            return log

        logs = await asyncio.gather(*(use(cid) for cid in ids))
        assert all(not log.closed for log in logs)
        assert len(opens) <= len(ids)  # no log opened twice
        for log in logs:
            log.unpin()
    finally:
        await store.close()


async def test_a_failed_log_is_never_closed_as_idle_and_reopened_writable(tmp_path):
    """A log whose sync failed stays failed in this process: closed as idle and reopened,
    a new fd's ``fdatasync`` would not report the error the old one consumed."""
    io = FaultyIO()
    store = Store(tmp_path, durability=Durability.FSYNC, file_io=io, max_open=1)
    try:
        victim = await store.create(title="t", model="m", system=None, conversation_id="v")
        io.target = "v.jsonl"
        io.arm("sync")
        with pytest.raises(LogFailedError):
            await victim.append(records.user(message_id="lost", text="never committed"))
        io.disarm()
        await asyncio.sleep(0.3)  # the failed pass is over, and so is any scan pause
        await create(store, 3)  # over max_open: idle logs close, the failed one does not
        await settle(store)
        again = await store.open("v")
        assert again is victim and not again.live
        with pytest.raises(LogFailedError):
            await again.append(records.user(message_id="later", text="refused"))
    finally:
        await store.close()


async def test_a_same_size_edit_with_its_mtime_put_back_is_seen(tmp_path):
    store = Store(tmp_path, durability=Durability.FLUSH, max_open=1)
    try:
        await store.create(title="AAAA", model="m", system=None, conversation_id="a")
        await create(store, 2)
        await settle(store)
        path = tmp_path / "conversations" / "a.jsonl"
        before = path.stat()
        path.write_bytes(path.read_bytes().replace(b"AAAA", b"ZZZZ"))
        os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
        titles = {row.id: row.title for row in await store.list()}
        assert titles["a"] == "ZZZZ"  # the ctime changed: listed from the file again
    finally:
        await store.close()
