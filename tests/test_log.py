"""ConversationLog on real files: append, group commit, committed offset, read, follow,
the writer lock, and a failed write or sync being fatal for the log."""

from __future__ import annotations

import asyncio
import errno
import os
import threading
from pathlib import Path

import pytest

from chatledger.storage import (
    ConversationLog,
    Durability,
    GroupCommit,
    LogFailedError,
    LogReadOnlyError,
    OffsetBoundaryError,
    OffsetRangeError,
    records,
)

from .conftest import FaultyIO


def first_record() -> records.Record:
    return records.conversation(conversation_id="c1", title="t", model="m", system=None)


async def new_log(tmp_path: Path, commit: GroupCommit) -> ConversationLog:
    return await ConversationLog.create(tmp_path / "c1.jsonl", first_record(), commit=commit)


@pytest.mark.parametrize("durability", list(Durability))
async def test_append_returns_offset_after_record_and_file_holds_lines(
    tmp_path, group_commit, durability
):
    log = await new_log(tmp_path, group_commit(durability=durability))
    first_size = log.committed
    offsets = [
        await log.append(records.user(message_id=f"m{i}", text=f"hé\n{i}")) for i in range(3)
    ]
    data = (tmp_path / "c1.jsonl").read_bytes()
    assert offsets[-1] == log.committed == len(data)
    lines = data.splitlines(keepends=True)
    assert len(lines) == 4
    boundaries = [sum(len(x) for x in lines[: k + 1]) for k in range(4)]
    assert [first_size, *offsets] == boundaries
    assert records.decode(lines[1])["text"] == "hé\n0"  # newline escaped inside the line
    await log.close()


async def test_group_commit_shares_syncs(tmp_path, group_commit):
    io = FaultyIO()
    log = await new_log(tmp_path, group_commit(file_io=io))
    io.sync_delay = 0.02
    syncs_before = io.calls["sync"]
    results = await asyncio.gather(
        *(log.append(records.user(message_id=f"m{i}", text="x")) for i in range(50))
    )
    assert results == sorted(results) and len(set(results)) == 50
    # The first append syncs alone; the 49 that queued during its sync share the next.
    assert io.calls["sync"] - syncs_before <= 3
    await log.close()


async def test_follower_never_sees_a_record_before_its_sync_completed(tmp_path, group_commit):
    io = FaultyIO()
    log = await new_log(tmp_path, group_commit(file_io=io))
    io.sync_delay = 0.01
    fd_synced: dict[int, int] = {}
    lock = threading.Lock()

    def on_sync(fd: int) -> None:
        with lock:
            fd_synced["size"] = os.fstat(fd).st_size

    io.on_sync = on_sync
    seen: list[int] = []

    async def follow() -> None:
        async for offset, block in log.follow(0):
            end = offset + len(block)
            with lock:
                synced = fd_synced.get("size", len(records.encode(first_record())))
            # Every byte handed to a reader was fdatasync'ed first.
            assert end <= synced
            seen.append(end)

    follower = asyncio.create_task(follow())
    for i in range(40):
        await log.append(records.chunk(reply_id="r", i=i, text=f"t{i}"))
        if i % 7 == 0:
            await asyncio.sleep(0.003)
    await log.close()
    await follower
    assert seen[-1] == log.committed


async def test_flush_mode_never_syncs_appends(tmp_path, group_commit):
    io = FaultyIO()
    log = await new_log(tmp_path, group_commit(file_io=io, durability=Durability.FLUSH))
    syncs = io.calls["sync"]
    for i in range(5):
        await log.append(records.user(message_id=f"m{i}", text="x"))
    assert io.calls["sync"] == syncs
    await log.close()


async def test_check_offset_rules(tmp_path, group_commit):
    log = await new_log(tmp_path, group_commit())
    a = log.committed
    b = await log.append(records.user(message_id="m", text="hello"))
    for ok in (0, a, b):
        await log.check_offset(ok)
    with pytest.raises(OffsetBoundaryError):
        await log.check_offset(a + 3)
    with pytest.raises(OffsetRangeError) as excinfo:
        await log.check_offset(b + 1)
    assert excinfo.value.committed == b
    with pytest.raises(OffsetRangeError):
        await log.check_offset(-1)
    await log.close()


async def test_read_from_any_boundary_is_suffix_of_full_read(tmp_path, group_commit, monkeypatch):
    # Tiny in-memory tail and read blocks: exercise the file path and block cutting.
    monkeypatch.setattr("chatledger.storage.log.TAIL_BYTES", 64)
    monkeypatch.setattr("chatledger.storage.log.READ_BLOCK", 50)
    log = await new_log(tmp_path, group_commit())
    boundaries = [0, log.committed]
    for i in range(30):
        boundaries.append(await log.append(records.chunk(reply_id="r", i=i, text="y" * i)))
    full = await log.read()
    for start in boundaries:
        blocks = []
        async for offset, block in _drain(log, start):
            assert offset == start + sum(len(b) for b in blocks)
            assert block.endswith(b"\n") or not block
            blocks.append(block)
        assert b"".join(blocks) == full[start:]
    await log.close()


async def _drain(log: ConversationLog, start: int):
    position = start
    while position < log.committed:
        block = await log.read_records(position)
        yield position, block
        position += len(block)


async def test_failed_write_is_fatal_for_that_log_only(tmp_path, group_commit):
    io = FaultyIO()
    log = await new_log(tmp_path, group_commit(file_io=io))
    committed = await log.append(records.user(message_id="m1", text="kept"))
    io.arm("write", errno=errno.ENOSPC)
    with pytest.raises(LogFailedError) as excinfo:
        await log.append(records.user(message_id="m2", text="lost"))
    assert excinfo.value.errno == errno.ENOSPC
    io.disarm()  # even once the disk recovers, the log stays failed
    with pytest.raises(LogFailedError):
        await log.append(records.user(message_id="m3", text="refused"))
    assert log.committed == committed
    assert b"kept" in await log.read()
    other = await ConversationLog.create(
        tmp_path / "c2.jsonl", first_record(), commit=group_commit(file_io=io)
    )
    await other.append(records.user(message_id="x", text="fine"))
    await log.close()
    await other.close()


async def test_failed_sync_is_never_retried_as_if_it_worked(tmp_path, group_commit):
    io = FaultyIO()
    log = await new_log(tmp_path, group_commit(file_io=io))
    io.arm("sync", persistent=False)  # fails once only
    pending = [log.append(records.user(message_id=f"m{i}", text="x")) for i in range(3)]
    results = await asyncio.gather(*pending, return_exceptions=True)
    assert all(isinstance(r, LogFailedError) for r in results)
    calls = dict(io.calls)
    with pytest.raises(LogFailedError):
        await log.append(records.user(message_id="later", text="x"))
    assert io.calls == calls  # no write, no sync retried
    assert log.committed == len(records.encode(first_record()))
    await log.close()


async def test_second_writer_is_refused(tmp_path, group_commit):
    log = await new_log(tmp_path, group_commit())
    await log.append(records.user(message_id="m", text="x"))
    second = await ConversationLog.open(tmp_path / "c1.jsonl", commit=group_commit())
    assert second.read_only_reason
    with pytest.raises(LogReadOnlyError):
        await second.append(records.user(message_id="n", text="y"))
    assert await second.read() == await log.read()
    await second.close()
    await log.close()
    third = await ConversationLog.open(
        tmp_path / "c1.jsonl", commit=group_commit()
    )  # lock released on close
    assert third.read_only_reason is None
    await third.close()


async def test_create_is_exclusive(tmp_path, group_commit):
    log = await new_log(tmp_path, group_commit())
    with pytest.raises(FileExistsError):
        await new_log(tmp_path, group_commit())
    await log.close()


async def test_commit_listeners_are_told_each_commit_after_it_moved_and_the_close(
    tmp_path, group_commit, caplog
):
    log = await new_log(tmp_path, group_commit())
    seen: list[tuple[int, bytes, int]] = []

    def listener(offset: int, block: bytes) -> None:
        seen.append((offset, block, log.committed))

    def broken(offset: int, block: bytes) -> None:
        raise RuntimeError("listener bug")

    log.add_listener(broken)
    log.add_listener(listener)
    start = log.committed
    end = await log.append(records.user(message_id="m1", text="one"))
    assert seen == [(start, await log.read(start), end)]  # the offset had moved already
    assert "listener bug" in caplog.text
    caplog.clear()
    later = await log.append(records.user(message_id="m2", text="two"))
    assert seen[-1] == (end, await log.read(end), later)
    assert "listener bug" not in caplog.text  # the broken one was removed, once
    log.remove_listener(listener)
    log.remove_listener(listener)  # not listening: no error
    await log.append(records.user(message_id="m3", text="three"))
    assert len(seen) == 2
    log.add_listener(listener)
    await log.close()
    assert seen[-1] == (log.committed, b"", log.committed)


async def test_open_makes_what_it_recovered_durable_or_refuses_it(tmp_path, group_commit):
    # The bytes a scan finds may be in the page cache only (their writer died before its
    # sync) and the disk may have lost them: under fsync, open syncs before any is shown.
    log = await new_log(tmp_path, group_commit(durability=Durability.FLUSH))
    await log.append(records.user(message_id="m1", text="maybe on disk"))
    await log.close()
    io = FaultyIO()
    io.arm("sync", errno=errno.EIO)
    with pytest.raises(OSError):
        await ConversationLog.open(log.path, commit=group_commit(file_io=io))
    io.disarm()
    io.fdatasynced.clear()
    reopened = await ConversationLog.open(log.path, commit=group_commit(file_io=io))
    assert io.fdatasynced == [log.path]
    assert b"maybe on disk" in await reopened.read()
    await reopened.close()
