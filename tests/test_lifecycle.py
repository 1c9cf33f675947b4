"""Races around replies, opening and closing: stop before a reply begins, a second stop,
shutdown while a message is being appended, appends during close, a cancelled open, a
cancelled close, two closes of a store, a create during a list and a close, and a stray
file in the data dir."""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os

import pytest

from chatledger.server.generation import Replies
from chatledger.server.providers.demo import DemoProvider
from chatledger.storage import ConversationLog, LogClosedError, Store, records

from .conftest import FaultyIO, create_conversation


async def new_store(tmp_path, **kwargs) -> Store:
    return Store(tmp_path / "data", **kwargs)


def decoded(data: bytes) -> list[records.Record]:
    return [records.decode(line) for line in data.splitlines()]


async def test_stop_right_after_send_before_the_reply_begins(tmp_path):
    store = await new_store(tmp_path)
    log = await store.create(title="t", model="m", system=None)
    replies = Replies(DemoProvider(tokens_per_s=0, reply_tokens=50))
    cid = log.summary.conversation_id
    started = await replies.send(cid, log, "hi")
    assert await replies.stop(cid) == started.reply_id  # the task has not run a step yet
    assert replies.running(cid) is None
    kinds = [(r["type"], r.get("finish")) for r in decoded(await log.read())]
    assert kinds[-3:] == [("start", None), ("end", "cancelled"), ("seal", None)]
    again = await replies.send(cid, log, "again")  # no 409: the conversation is free
    assert again.reply_id != started.reply_id
    await replies.shutdown()
    await store.close()


async def test_second_stop_while_end_commits_returns_normally(tmp_path):
    io = FaultyIO()
    store = await new_store(tmp_path, file_io=io)
    log = await store.create(title="t", model="m", system=None)
    replies = Replies(DemoProvider(tokens_per_s=200, reply_tokens=1000))
    cid = log.summary.conversation_id
    await replies.send(cid, log, "hi")
    await asyncio.sleep(0.05)
    io.sync_delay = 0.2  # the end record's commit is slow
    first = asyncio.create_task(replies.stop(cid))
    await asyncio.sleep(0.05)
    second = asyncio.create_task(replies.stop(cid))
    results = await asyncio.gather(first, second, return_exceptions=True)
    assert all(isinstance(r, str) for r in results), results
    ends = [r for r in decoded(await log.read()) if r["type"] == "end"]
    assert [e["finish"] for e in ends] == ["cancelled"]
    await store.close()


async def test_shutdown_while_a_message_is_being_appended(tmp_path):
    io = FaultyIO()
    store = await new_store(tmp_path, file_io=io)
    log = await store.create(title="t", model="m", system=None)
    replies = Replies(DemoProvider(tokens_per_s=50, reply_tokens=100))
    cid = log.summary.conversation_id
    io.sync_delay = 0.1  # the user record is still committing when shutdown begins
    sending = asyncio.create_task(replies.send(cid, log, "hi"))
    await asyncio.sleep(0.02)
    await replies.shutdown()
    started = await sending
    await store.close()  # no append may race the close
    recs = decoded((tmp_path / "data" / "conversations" / f"{cid}.jsonl").read_bytes())
    assert recs[-1]["type"] == "seal"  # after every reply's end
    assert recs[-2]["type"] == "end" and recs[-2]["finish"] == "interrupted"
    assert recs[-2]["id"] == started.reply_id
    with pytest.raises(LogClosedError):
        await replies.send(cid, log, "late")


async def test_appends_during_close_are_refused_not_written_to_a_closed_fd(tmp_path, group_commit):
    io = FaultyIO()
    log = await ConversationLog.create(
        tmp_path / "c.jsonl",
        records.conversation(conversation_id="c", title="t", model="m", system=None),
        commit=group_commit(file_io=io),
    )
    io.sync_delay = 0.05
    first = asyncio.create_task(log.append(records.user(message_id="a", text="x")))
    await asyncio.sleep(0.01)
    closing = asyncio.create_task(log.close())
    await asyncio.sleep(0.01)
    with pytest.raises(LogClosedError):
        await log.append(records.user(message_id="b", text="y"))
    await first  # queued before close: committed
    await closing
    assert b'"id":"a"' in (tmp_path / "c.jsonl").read_bytes()


async def test_a_cancelled_open_leaves_the_log_writable(tmp_path):
    store = await new_store(tmp_path)
    log = await store.create(title="t", model="m", system=None)
    cid = log.summary.conversation_id
    await store.close()
    store = await new_store(tmp_path)
    opening = asyncio.create_task(store.open(cid))
    await asyncio.sleep(0)  # the open is under way in a thread
    opening.cancel()
    with pytest.raises(asyncio.CancelledError):
        await opening
    log = await store.open(cid)
    assert log.read_only_reason is None and log.live
    await log.append(records.user(message_id="u", text="still mine"))
    await store.close()


async def test_a_stray_entry_does_not_stop_startup_or_listing(make_client, data_dir):
    (data_dir / "conversations" / "stray.jsonl").mkdir(parents=True)
    (data_dir / "conversations" / "empty.jsonl").write_bytes(b"")
    client = await make_client()
    conversation_id = await create_conversation(client, title="fine")
    listing = await (await client.get("/api/conversations")).json()
    assert [row["id"] for row in listing] == [conversation_id]
    response = await client.get("/api/conversations/empty")
    assert response.status == 404  # a log with no record never existed


async def test_close_waits_for_reads_in_flight(tmp_path, group_commit, monkeypatch):
    # Readers behind the in-memory tail pread the file on a worker thread; close() must
    # not close that fd under them (EBADF, or worse a reused fd number: another file).
    monkeypatch.setattr("chatledger.storage.log.TAIL_BYTES", 16)
    monkeypatch.setattr("chatledger.storage.log.READ_BLOCK", 64)
    for attempt in range(30):
        log = await ConversationLog.create(
            tmp_path / f"c{attempt}.jsonl",
            records.conversation(conversation_id="c", title="t", model="m", system=None),
            commit=group_commit(),
        )
        for i in range(50):
            await log.append(records.chunk(reply_id="r", i=i, text="x" * 40))
        seen = [bytearray() for _ in range(3)]

        async def follow(log: ConversationLog, into: bytearray) -> None:
            async for _, block in log.follow(0):
                into.extend(block)

        followers = [asyncio.create_task(follow(log, into)) for into in seen]
        await asyncio.sleep(0)
        await log.close()
        for follower in followers:
            with contextlib.suppress(LogClosedError):  # refused after close, never misread
                await follower
        data = (tmp_path / f"c{attempt}.jsonl").read_bytes()
        for into in seen:
            assert bytes(into) == data[: len(into)]


def fds_on(name: str) -> list[str]:
    """This process's open fds whose file's name ends with ``name``."""
    found = []
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):
            if os.readlink(f"/proc/self/fd/{fd}").endswith(name):
                found.append(fd)
    return found


def locked(path) -> bool:
    fd = os.open(path, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False


async def test_a_cancelled_close_still_closes_the_writer_and_tells_listeners_last(
    tmp_path, group_commit
):
    io = FaultyIO()
    log = await ConversationLog.create(
        tmp_path / "c1.jsonl",
        records.conversation(conversation_id="c1", title="t", model="m", system=None),
        commit=group_commit(file_io=io),
    )
    heard: list[bytes] = []
    log.add_listener(lambda offset, block: heard.append(block))
    io.sync_delay = 0.2
    queued = log.append_nowait(records.user(message_id="u", text="hi"))
    closing = asyncio.ensure_future(log.close())
    await asyncio.sleep(0.05)
    closing.cancel()
    await asyncio.gather(closing, return_exceptions=True)
    await queued  # committed: it was queued before the close
    await log.close()
    assert heard[-1] == b"" and len(heard) == 2  # the commit, then the close, once
    assert not fds_on("c1.jsonl") and not locked(log.path)


async def test_a_second_store_close_waits_for_the_first(tmp_path):
    io = FaultyIO()
    store = await new_store(tmp_path, file_io=io)
    log = await store.create(title="t", model="m", system=None)
    io.sync_delay = 0.2
    log.append_nowait(records.user(message_id="u", text="slow to sync"))
    first = asyncio.ensure_future(store.close())
    await asyncio.sleep(0.01)
    await store.close()
    assert first.done()  # the data dir is released only once the first close is over
    await first


async def test_a_create_is_waited_for_by_lists_opens_and_close_and_survives_a_cancel(tmp_path):
    io = FaultyIO()
    store = await new_store(tmp_path, file_io=io)
    io.sync_delay = 0.2
    creating = asyncio.ensure_future(
        store.create(title="secret", model="m", system=None, conversation_id="c1")
    )
    await asyncio.sleep(0.05)  # the file exists, its first record not yet synced
    listing = asyncio.ensure_future(store.list())  # waits: never reads it, never read-only
    await asyncio.sleep(0.01)
    assert not listing.done()
    creating.cancel()  # the create goes on without its caller
    with pytest.raises(asyncio.CancelledError):
        await creating
    assert [row.id for row in await listing] == ["c1"]
    assert (await store.open("c1")).live
    late = asyncio.ensure_future(
        store.create(title="late", model="m", system=None, conversation_id="c2")
    )
    await asyncio.sleep(0.05)
    await store.close()  # waits for the create in flight, then closes its log too
    assert (await late).closed
    assert not fds_on("c1.jsonl") and not fds_on("c2.jsonl")
