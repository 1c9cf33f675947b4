"""Races around replies, opening and closing: stop before a reply begins, a second stop,
shutdown while a message is being appended, appends during close, a cancelled open,
and a stray file in the data dir."""

from __future__ import annotations

import asyncio
import contextlib

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
    assert kinds[-2:] == [("start", None), ("end", "cancelled")]
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
    assert recs[-1]["type"] == "end" and recs[-1]["finish"] == "interrupted"
    assert recs[-1]["id"] == started.reply_id
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
