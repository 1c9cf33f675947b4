"""The group commit shared by a store's logs: one pass writes every log with queued
records, then syncs them with one ``fdatasync`` per log, or one ``syncfs`` for many; a
failure fails exactly the logs whose bytes it may have lost."""

from __future__ import annotations

import asyncio
import errno
from pathlib import Path

import pytest

from storage import ConversationLog, Durability, LogFailedError, records
from storage.commit import SYNCFS_MIN_LOGS, GroupCommit
from storage.durability import syncfs_reports_errors

from .conftest import FaultyIO

needs_syncfs = pytest.mark.skipif(not syncfs_reports_errors(), reason="needs Linux 5.8+")


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


@needs_syncfs
async def test_many_logs_commit_in_one_pass_with_one_syncfs(tmp_path):
    io = FaultyIO()
    commit = GroupCommit(file_io=io)
    logs = await open_logs(tmp_path, commit, 8)
    passes, syncs = commit.passes, io.calls["sync"]
    offsets = await append_to_each(logs, "together")
    assert commit.passes == passes + 1
    assert io.syncfs_calls == 1 and io.calls["sync"] == syncs + 1
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
    assert io.syncfs_calls == 0
    assert io.calls["sync"] == syncs + len(logs)
    await close(logs, commit)


@needs_syncfs
async def test_a_failed_syncfs_fails_every_log_of_its_pass_and_shows_nothing(tmp_path):
    io = FaultyIO()
    commit = GroupCommit(file_io=io)
    logs = await open_logs(tmp_path, commit, 6)
    before = [log.committed for log in logs]
    io.arm("sync", errno=errno.EIO, persistent=False)  # one failure: the syncfs
    results = await append_to_each(logs, "maybe lost")
    assert all(isinstance(r, LogFailedError) and r.errno == errno.EIO for r in results)
    # The sync works again: a log that was not in that pass commits (in a later pass:
    # the failed pass, cleanup included, is over when it returns).
    (tmp_path / "later").mkdir()
    (later,) = await open_logs(tmp_path / "later", commit, 1)
    await later.append(records.user(message_id="m", text="fine"))
    for log, committed in zip(logs, before, strict=True):
        assert log.failure is not None
        assert log.committed == committed
        assert b"maybe lost" not in await log.read()
        assert log.path.stat().st_size == committed  # cut back; the bytes kept aside
        assert list(tmp_path.glob(f"{log.path.name}.failed-*"))
    await close([*logs, later], commit)


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
async def test_a_fast_log_is_batched_while_slow_logs_commit_with_it(tmp_path, durability):
    commit = GroupCommit(durability=durability)
    fast, *slow = await open_logs(tmp_path, commit, 3)
    pending = [fast.append_nowait(records.chunk(reply_id="r", i=i, text="x")) for i in range(500)]
    await asyncio.sleep(0)
    await append_to_each(slow, "slow")
    offsets = await asyncio.gather(*pending)
    assert offsets == sorted(offsets) and offsets[-1] == fast.committed
    assert commit.passes < 100  # 500 records, far fewer passes
    await close([fast, *slow], commit)


async def test_a_log_refuses_a_shared_commit_with_its_own_policy(tmp_path):
    commit = GroupCommit()
    with pytest.raises(ValueError, match="shared group commit"):
        await ConversationLog.create(
            tmp_path / "c.jsonl",
            records.conversation(conversation_id="c", title="t", model="m", system=None),
            commit=commit,
            durability=Durability.FLUSH,
        )
    await commit.close()
