"""The group commit shared by a store's logs: one pass writes every log with queued
records, then syncs them with one ``fdatasync`` per log, or one ``syncfs`` for many; a
failure fails exactly the logs whose bytes it may have lost."""

from __future__ import annotations

import asyncio
import errno
from pathlib import Path

import pytest

from chatledger.storage import ConversationLog, Durability, FileIO, LogFailedError, records
from chatledger.storage.commit import SYNCFS_MIN_LOGS, GroupCommit
from chatledger.storage.durability import syncfs_trusted

from .conftest import FaultyIO


def require_syncfs(directory: Path) -> None:
    if not syncfs_trusted(directory):
        pytest.skip("syncfs needs Linux 5.17+ and a local file system")


async def open_logs(directory: Path, commit: GroupCommit, count: int) -> list[ConversationLog]:
    return [
        await ConversationLog.create(
            directory / f"c{k}.jsonl",
            records.conversation(conversation_id=f"c{k}", title="t", model="m", system=None),
            commit=commit,
        )
        for k in range(count)
    ]


async def append_to_each(logs: list[ConversationLog], text: str) -> list[int | BaseException]:
    """One record per log, queued in the same loop tick, so one pass takes them all."""
    return await asyncio.gather(
        *(log.append(records.user(message_id="m", text=text)) for log in logs),
        return_exceptions=True,
    )


async def close(logs: list[ConversationLog], commit: GroupCommit) -> None:
    for log in logs:
        await log.close()
    await commit.close()


async def test_many_logs_commit_in_one_pass_with_one_syncfs(tmp_path):
    require_syncfs(tmp_path)
    io = FaultyIO()
    commit = GroupCommit(file_io=io)
    logs = await open_logs(tmp_path, commit, 8)
    passes, syncs = commit.passes, io.calls["sync"]
    offsets = await append_to_each(logs, "together")
    assert commit.passes == passes + 1
    assert io.calls["syncfs"] == 1 and io.calls["sync"] == syncs  # no fdatasync
    assert io.syncfs_paths == [tmp_path]  # on a directory of its own, not on a log
    for log, offset in zip(logs, offsets, strict=True):
        assert offset == log.committed
        assert (await log.read()).endswith(b'"text":"together"}\n')
        assert log.path.read_bytes() == await log.read()
    await close(logs, commit)


async def test_few_logs_keep_one_fdatasync_each(tmp_path):
    io = FaultyIO()
    commit = GroupCommit(file_io=io)
    logs = await open_logs(tmp_path, commit, SYNCFS_MIN_LOGS - 1)
    syncs = io.calls["sync"]
    await append_to_each(logs, "apart")
    assert io.calls["syncfs"] == 0
    assert io.calls["sync"] == syncs + len(logs)
    await close(logs, commit)


async def test_a_failed_syncfs_fails_only_the_logs_whose_own_fdatasync_fails(tmp_path):
    require_syncfs(tmp_path)
    io = FaultyIO()
    commit = GroupCommit(file_io=io)
    logs = await open_logs(tmp_path, commit, 6)
    before = [log.committed for log in logs]
    io.arm("syncfs", errno=errno.EIO, persistent=False)  # some file lost data...
    io.target = "c2.jsonl"
    io.arm("sync", errno=errno.EIO)  # ...and it was c2's
    io.fdatasynced.clear()
    results = await append_to_each(logs, "maybe lost")
    assert isinstance(results[2], LogFailedError) and results[2].errno == errno.EIO
    assert sorted(io.fdatasynced) == sorted(log.path for log in logs)  # each on its own
    for k, (log, result) in enumerate(zip(logs, results, strict=True)):
        if k != 2:
            assert result == log.committed
            assert (await log.read()).endswith(b'"text":"maybe lost"}\n')
    # The error was reported once: the next pass of the healthy logs uses syncfs again.
    healthy = [log for k, log in enumerate(logs) if k != 2]
    assert all(isinstance(r, int) for r in await append_to_each(healthy, "next"))
    assert io.calls["syncfs"] == 2
    failed = logs[2]
    assert failed.committed == before[2]
    assert b"maybe lost" not in await failed.read()
    assert failed.path.stat().st_size == before[2]  # cut back; the bytes kept aside
    assert list(tmp_path.glob(f"{failed.path.name}.failed-*"))
    await close(logs, commit)


async def test_a_failed_write_fails_only_its_log_in_a_shared_pass(tmp_path):
    io = FaultyIO()
    commit = GroupCommit(file_io=io)
    logs = await open_logs(tmp_path, commit, 6)
    io.target = "c2.jsonl"
    io.arm("write", errno=errno.ENOSPC)
    results = await append_to_each(logs, "six")
    assert isinstance(results[2], LogFailedError) and results[2].errno == errno.ENOSPC
    for k, (log, result) in enumerate(zip(logs, results, strict=True)):
        if k != 2:
            assert result == log.committed
            assert (await log.read()).endswith(b'"text":"six"}\n')
    await close(logs, commit)


@pytest.mark.parametrize("durability", list(Durability))
async def test_a_fast_stream_is_committed_in_batches_and_slow_logs_with_it(tmp_path, durability):
    # A provider as fast as the loop: one record per loop tick. Under flush a write takes
    # microseconds, so without coalescing every tick would be a pass of one record.
    commit = GroupCommit(durability=durability)
    fast, *slow = await open_logs(tmp_path, commit, 3)
    passes = commit.passes
    pending = []
    for i in range(320):
        pending.append(fast.append_nowait(records.chunk(reply_id="r", i=i, text="x")))
        if i == 100:
            slow_done = asyncio.ensure_future(append_to_each(slow, "slow"))
        await asyncio.sleep(0)
    offsets = await asyncio.gather(*pending)
    assert offsets == sorted(offsets) and offsets[-1] == fast.committed
    assert all(isinstance(r, int) for r in await slow_done)
    assert commit.passes - passes <= 320 // 8  # batches of many records
    await close([fast, *slow], commit)


async def test_an_unexpected_error_in_a_pass_fails_its_logs_and_leaves_nothing_behind(
    tmp_path, caplog
):
    class BuggyIO(FileIO):
        armed = False

        def fdatasync(self, fd: int) -> None:
            if self.armed:
                raise ValueError("a bug in the sync layer")
            super().fdatasync(fd)

    io = BuggyIO()
    commit = GroupCommit(file_io=io)
    (log,) = await open_logs(tmp_path, commit, 1)
    committed = log.committed
    io.armed = True
    with pytest.raises(LogFailedError):
        await log.append(records.user(message_id="m", text="never committed"))
    assert "group commit pass failed" in caplog.text
    io.armed = False
    (tmp_path / "other").mkdir()
    (other,) = await open_logs(tmp_path / "other", commit, 1)
    await other.append(records.user(message_id="m", text="the group commit goes on"))
    await close([log, other], commit)
    assert log.path.stat().st_size == committed  # the unsynced bytes were cut
    commit = GroupCommit()
    reopened = await ConversationLog.open(log.path, commit=commit)
    assert b"never committed" not in await reopened.read()
    await close([reopened], commit)
