"""I/O errors in the log's write path: ENOSPC and EIO in ``write`` and ``fdatasync``, once
and persistently. Nothing past the failure reaches a client, no call is retried as if it
worked, the conversation answers appends with a clear error while its committed records
stay readable, other conversations go on, and a restart recovers."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import subprocess
import uuid
from pathlib import Path

import pytest

from chatledger.storage import ConversationLog, FileIO, records
from chatledger.storage.verify import verify_dir

from .conftest import FaultyIO, check_seals, create_conversation, wait_idle
from .sse_reader import StreamReader, read_quiet, read_through


@pytest.mark.parametrize("persistent", [False, True], ids=["once", "persistent"])
@pytest.mark.parametrize("err", [errno.ENOSPC, errno.EIO], ids=["ENOSPC", "EIO"])
@pytest.mark.parametrize("call", ["write", "sync"])
async def test_io_error_in_the_write_path(make_client, data_dir, call, err, persistent):
    io = FaultyIO()
    client = await make_client(file_io=io, demo_tokens_per_s=300, demo_reply_tokens=300)
    victim = await create_conversation(client, title="victim")
    other = await create_conversation(client, title="other")
    stream = await client.get(f"/api/conversations/{victim}/events")
    io.target = f"{victim}.jsonl"
    # user, start and a few chunks commit; then a write (torn: half its bytes) or a sync fails
    io.arm(call, errno=err, skip=4, persistent=persistent, partial=call == "write")
    assert (
        await client.post(f"/api/conversations/{victim}/messages", json={"text": "hi"})
    ).status == 202
    await wait_idle(client, victim)  # the reply task ended
    log = await (await client.get(f"/api/conversations/{victim}/log")).read()
    reader = StreamReader()
    await read_through(stream, reader, len(log))
    await read_quiet(stream, reader)  # the stream stays open; nothing more arrives
    assert stream.connection is not None and not stream.content.at_eof()
    shown = b"".join(e.data.encode() + b"\n" for e in reader.events)
    assert shown == log  # every record shown is committed, and nothing past the failure
    assert int(reader.events[-1].id) == len(log)
    assert b'"type":"chunk"' in log and b'"type":"end"' not in log
    assert io.calls_after_fault == {"write": 0, "sync": 0, "syncfs": 0}  # nothing retried

    body = await wait_idle(client, victim)
    assert body["writable"] is False and body["offset"] == len(log)
    response = await client.post(f"/api/conversations/{victim}/messages", json={"text": "again"})
    expected = (507, "disk_full") if err == errno.ENOSPC else (503, "log_failed")
    assert (response.status, (await response.json())["error"]) == expected

    assert (
        await client.post(f"/api/conversations/{other}/messages", json={"text": "fine?"})
    ).status == 202
    assert (await wait_idle(client, other))["messages"][-1]["finish"] == "stop"

    await client.close()  # restart on the same data dir with a healthy disk
    client = await make_client(file_io=FileIO(), demo_reply_tokens=3)
    recovered = await (await client.get(f"/api/conversations/{victim}/log")).read()
    assert recovered.startswith(log)
    body = await (await client.get(f"/api/conversations/{victim}")).json()
    assert body["writable"] and body["messages"][-1]["finish"] == "interrupted"
    # the uncommitted bytes (a torn half-write, or records whose sync failed) were cut
    # at the failure, kept aside, and never came back
    (kept,) = (data_dir / "conversations").glob(f"{victim}.jsonl.failed-*")
    assert kept.read_bytes()
    # only the end recovery appended, and its seal
    added, seal = recovered[len(log) :].splitlines()
    assert records.decode(added)["finish"] == "interrupted"
    assert records.decode(seal)["type"] == "seal" and check_seals(recovered) >= 1
    assert all(report.ok for report in verify_dir(data_dir))
    assert (
        await client.post(f"/api/conversations/{victim}/messages", json={"text": "back"})
    ).status == 202
    assert (await wait_idle(client, victim))["messages"][-1]["finish"] == "stop"


@contextlib.contextmanager
def small_tmpfs(path: Path, size: str):
    path.mkdir(parents=True)
    result = subprocess.run(
        [
            "mount",
            "-t",
            "tmpfs",
            "-o",
            f"size={size}",
            f"chatledger-{uuid.uuid4().hex[:8]}",
            str(path),
        ],
        capture_output=True,
        text=True,
    )
    if result.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {result.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


async def test_real_full_disk(make_client, tmp_path):
    with small_tmpfs(tmp_path / "disk", "256k") as disk:
        data_dir = disk / "data"
        client = await make_client(
            data_dir=data_dir, demo_tokens_per_s=0, demo_reply_tokens=1_000_000
        )
        quiet = await create_conversation(client, title="quiet")
        ballast = disk / "ballast"
        ballast.write_bytes(b"\0" * 64 * 1024)
        victim = await create_conversation(client, title="fills the disk")
        stream = await client.get(f"/api/conversations/{victim}/events")
        assert (
            await client.post(f"/api/conversations/{victim}/messages", json={"text": "go"})
        ).status == 202
        await wait_idle(client, victim, limit_s=60)
        log = await (await client.get(f"/api/conversations/{victim}/log")).read()
        reader = StreamReader()
        await read_through(stream, reader, len(log))
        await read_quiet(stream, reader)
        assert b"".join(e.data.encode() + b"\n" for e in reader.events) == log
        response = await client.post(f"/api/conversations/{victim}/messages", json={"text": "x"})
        assert response.status == 507 and (await response.json())["error"] == "disk_full"
        assert (await client.get(f"/api/conversations/{quiet}")).status == 200

        ballast.unlink()  # room again: the other conversation goes on at once
        response = await client.post(f"/api/conversations/{quiet}/messages", json={"text": "hi"})
        assert response.status == 202
        await client.post(f"/api/conversations/{quiet}/stop")  # its reply would fill it again
        quiet_log = await (await client.get(f"/api/conversations/{quiet}/log")).read()
        assert b'"type":"user"' in quiet_log and b'"text":"hi"' in quiet_log
        await client.close()

        remount = ["mount", "-o", "remount,size=4m", str(disk)]  # the owner frees room
        await asyncio.to_thread(subprocess.run, remount, check=True)
        client = await make_client(data_dir=data_dir, demo_reply_tokens=2)
        body = await (await client.get(f"/api/conversations/{victim}")).json()
        assert body["messages"][-1]["finish"] == "interrupted"
        recovered = await (await client.get(f"/api/conversations/{victim}/log")).read()
        assert recovered.startswith(log)
        assert all(report.ok for report in verify_dir(data_dir))
        response = await client.post(f"/api/conversations/{victim}/messages", json={"text": "x"})
        assert response.status == 202
        assert (await wait_idle(client, victim))["messages"][-1]["finish"] == "stop"
        await client.close()


@contextlib.contextmanager
def ext4_on_a_full_disk(path: Path):
    """A real ext4 whose disk can run out of room under it: an image on a 40 MiB tmpfs,
    attached to a loop device. Filling the tmpfs makes the kernel's write-back of new
    blocks fail (ENOSPC), as a thin-provisioned or dying disk would. Needs root."""
    back = path / "back"
    with small_tmpfs(back, "40m"):
        image = back / "disk.img"
        with open(image, "wb") as f:
            f.truncate(200 << 20)
        attach = subprocess.run(
            ["losetup", "-f", "--show", str(image)], capture_output=True, text=True
        )
        if attach.returncode != 0:
            pytest.skip(f"no loop device here: {attach.stderr.strip()}")
        device = attach.stdout.strip()
        mount = path / "ext4"
        mount.mkdir()
        try:
            for command in (
                ["mkfs.ext4", "-q", "-E", "lazy_itable_init=0,lazy_journal_init=0", device],
                ["mount", device, str(mount)],
            ):
                made = subprocess.run(command, capture_output=True, text=True)
                if made.returncode != 0:
                    pytest.skip(f"{command[0]} failed here: {made.stderr.strip()}")
            try:
                yield mount, back
            finally:
                subprocess.run(["umount", "-l", str(mount)], check=False)
        finally:
            subprocess.run(["losetup", "-d", device], check=False)


def lose_another_files_data(mount: Path, back: Path) -> bool:
    """Make the write-back of a file that is no log fail, then give the room back.

    :returns: whether its ``fsync`` reported the loss.
    """
    fill = back / "fill"
    with open(fill, "wb") as f, contextlib.suppress(OSError):
        while True:
            f.write(b"\0" * (1 << 20))
            f.flush()
    other = mount / "not-a-log.bin"
    try:
        with open(other, "wb") as f:
            f.write(b"x" * (4 << 20))
            f.flush()
            os.fsync(f.fileno())
    except OSError:
        return True
    finally:
        fill.unlink()
    return False


async def test_a_write_back_error_in_another_file_fails_no_conversation(tmp_path):
    # syncfs reports an error of any file of the file system, once per open file: the
    # group commit must not let it fail conversations whose own data is fine.
    from chatledger.storage.commit import GroupCommit
    from chatledger.storage.durability import syncfs_trusted

    class CountingIO(FileIO):
        fdatasyncs = 0

        def fdatasync(self, fd: int) -> None:
            self.fdatasyncs += 1
            super().fdatasync(fd)

    with ext4_on_a_full_disk(tmp_path) as (mount, back):
        if not syncfs_trusted(mount):
            pytest.skip("syncfs needs Linux 5.17+")
        io = CountingIO()
        commit = GroupCommit(file_io=io)
        logs = [
            await ConversationLog.create(
                mount / f"c{k}.jsonl",
                records.conversation(conversation_id=f"c{k}", title="t", model="m", system=None),
                commit=commit,
            )
            for k in range(12)
        ]
        if not await asyncio.to_thread(lose_another_files_data, mount, back):
            for log in logs:
                await log.close()
            await commit.close()
            pytest.skip("could not make the kernel lose a file's data here")
        before = io.fdatasyncs
        for group in (logs[:4], logs[4:8], logs[8:], logs):
            results = await asyncio.gather(
                *(log.append(records.user(message_id="m", text="hi")) for log in group),
                return_exceptions=True,
            )
            assert all(isinstance(r, int) for r in results), results
        assert commit.syncfs_calls == 4
        # The error was reported once: only the first pass fell back to its 4 fdatasyncs.
        assert io.fdatasyncs - before == 4
        for log in logs:
            assert log.failure is None
            await log.close()
        await commit.close()
