"""Power loss: a storage-level fault layer keeps apart the bytes that were synced and
those that were only written, and at a simulated crash point (every write and sync call
of a scripted workload, in turn) builds what the disk may hold after the power comes
back: unsynced bytes lost, torn, turned into a NUL hole, or all kept. With ``fsync`` no
record a reader was shown is ever lost; with ``flush`` some are."""

from __future__ import annotations

import asyncio
import errno
import os
import threading
from pathlib import Path

import pytest

from chatledger.storage import ConversationLog, Durability, FileIO, LogError, records
from chatledger.storage.commit import GroupCommit
from chatledger.storage.durability import syncfs_reports_errors

from .conftest import check_seals

VARIANTS = ("lost", "torn", "hole", "kept")


class PowerLossIO(FileIO):
    """Counts write/sync calls; the ``crash_at``-th one (1-based) is the instant the
    power goes. From then on every call fails (the machine is gone).

    :ivar images: after the crash, ``{path: {variant: bytes | None}}`` (``None``: the
        file's name never reached the disk).
    """

    def __init__(self, crash_at: int) -> None:
        self.crash_at = crash_at
        self.calls = 0
        self.crashed = False
        self.lock = threading.Lock()
        self.synced: dict[Path, int] = {}  # bytes of each file known to be durable
        self.named: set[Path] = set()  # files whose directory entry is durable
        self.files: set[Path] = set()
        self.images: dict[Path, dict[str, bytes | None]] = {}
        self.syncfs_calls = 0

    def _path(self, fd: int) -> Path:
        return Path(os.readlink(f"/proc/self/fd/{fd}"))

    def _tick(self) -> None:
        with self.lock:
            self.calls += 1
            if self.calls == self.crash_at:
                self.crashed = True
                self.images = {path: self._image(path) for path in self.files}
            if self.crashed:
                raise OSError(errno.EIO, "the machine lost power")

    def _image(self, path: Path) -> dict[str, bytes | None]:
        content = path.read_bytes() if path.exists() else b""
        durable = content[: self.synced.get(path, 0)]
        unsynced = content[len(durable) :]
        named = path in self.named
        return {
            "lost": durable if named else None,
            "torn": durable + unsynced[: len(unsynced) // 2] if named else None,
            "hole": durable + b"\0" * len(unsynced) if named else None,
            "kept": content,
        }

    def write_all(self, fd: int, data: bytes) -> None:
        self._tick()
        self.files.add(self._path(fd))
        super().write_all(fd, data)

    def fdatasync(self, fd: int) -> None:
        self._tick()
        super().fdatasync(fd)
        self.synced[self._path(fd)] = os.fstat(fd).st_size

    def syncfs(self, fd: int) -> None:
        self.syncfs_calls += 1
        self._tick()
        super().syncfs(fd)
        device = os.fstat(fd).st_dev
        for path in self.files:
            if path.exists() and path.stat().st_dev == device:
                self.synced[path] = path.stat().st_size

    def fsync_dir(self, path: Path) -> None:
        self._tick()
        super().fsync_dir(path)
        self.named.update(p for p in self.files if p.parent == Path(path).resolve())


async def workload(
    directory: Path, durability: Durability, io: PowerLossIO, *, logs: int = 1
) -> dict[Path, bytes]:
    """Create ``logs`` logs sharing one group commit, append records to all of them in
    batches that share commits (with 4 or more logs a pass syncs them with one
    ``syncfs``), and follow each from 0.

    :returns: per log, the bytes a reader was shown before the crash.
    """
    commit = GroupCommit(durability=durability, file_io=io)
    shown: dict[Path, bytearray] = {}
    opened: list[ConversationLog] = []
    for k in range(logs):
        path = directory / f"c{k}.jsonl"
        try:
            opened.append(
                await ConversationLog.create(
                    path,
                    records.conversation(conversation_id="c", title="t", model="m", system=None),
                    commit=commit,
                )
            )
        except OSError:
            break
        shown[path] = bytearray()

    async def follow(log: ConversationLog) -> None:
        async for _, block in log.follow(0):
            shown[log.path].extend(block)

    followers = [asyncio.create_task(follow(log)) for log in opened]
    index = 0
    for size in (1, 2, 1, 4, 1, 3) if len(opened) == logs else ():
        batch = []
        for _ in range(size):
            batch.append(records.chunk(reply_id="r", i=index, text=f"token {index}"))
            index += 1
        if size == 4:  # a reply ends mid-workload: its seal is written and synced too
            batch.append(records.end(reply_id="r", finish="stop"))
        try:
            await asyncio.gather(*(log.append(record) for log in opened for record in batch))
        except LogError:
            break
        await asyncio.sleep(0)  # let the readers see the commit before the next batch
    for log in opened:
        await log.close()
    await commit.close()
    await asyncio.gather(*followers)
    return {path: bytes(data) for path, data in shown.items()}


async def recover(image: bytes | None, directory: Path) -> bytes:
    """What the log holds once a restarted server has opened (recovered) ``image``."""
    directory.mkdir(parents=True)  # noqa: ASYNC240 - a test's scratch directory
    if image is None:
        return b""
    path = directory / "c.jsonl"
    path.write_bytes(image)
    commit = GroupCommit()
    try:
        log = await ConversationLog.open(path, commit=commit)
    except FileNotFoundError:  # no whole record: the create never completed
        return b""
    finally:
        await commit.close()
    assert log.read_only_reason is None, log.read_only_reason  # torn, never "corrupt"
    await log.close()
    recovered = path.read_bytes()
    check_seals(recovered)  # no cut leaves a seal that fails: each covers bytes before it
    return recovered


async def crash_everywhere(
    tmp_path: Path, durability: Durability, *, logs: int = 1
) -> list[tuple[int, str]]:
    """Run the workload crashing at each call in turn; return the (call, variant) pairs
    after which a record that had been shown is missing from the recovered log."""
    losses = []
    crash_at = 1
    while True:
        io = PowerLossIO(crash_at)
        run = tmp_path / f"{durability}-{crash_at}"
        run.mkdir()
        shown = await workload(run, durability, io, logs=logs)
        if not io.crashed:
            assert crash_at > 8  # every call of the workload was a crash point
            return losses
        for path, seen in shown.items():
            for variant in VARIANTS:
                image = io.images.get(path, {}).get(variant)
                recovered = await recover(image, run / f"{path.stem}-{variant}")
                if not recovered.startswith(seen):
                    losses.append((crash_at, variant))
        crash_at += 1


async def test_fsync_never_loses_a_shown_record_and_flush_can(tmp_path):
    assert await crash_everywhere(tmp_path, Durability.FSYNC) == []
    flush_losses = await crash_everywhere(tmp_path, Durability.FLUSH)
    # with write() only, a shown record can vanish when unsynced bytes are lost
    assert any(variant in ("lost", "torn", "hole") for _, variant in flush_losses)
    assert not any(variant == "kept" for _, variant in flush_losses)


@pytest.mark.skipif(not syncfs_reports_errors(), reason="needs syncfs (Linux 5.8+)")
async def test_fsync_never_loses_a_shown_record_when_logs_share_a_syncfs(tmp_path):
    io = PowerLossIO(crash_at=10**6)  # no crash: check that the workload uses syncfs
    (tmp_path / "dry").mkdir()
    shown = await workload(tmp_path / "dry", Durability.FSYNC, io, logs=5)
    assert len(shown) == 5 and all(shown.values())
    assert io.syncfs_calls >= 6  # one per batch of the workload, for all five logs
    assert await crash_everywhere(tmp_path, Durability.FSYNC, logs=5) == []


@pytest.mark.parametrize("variant", VARIANTS)
async def test_power_loss_image_shapes_recover_cleanly(tmp_path, variant):
    io = PowerLossIO(crash_at=8)  # mid-workload, with unsynced bytes in flight (flush)
    shown = await workload(tmp_path, Durability.FLUSH, io)
    assert io.crashed and shown[tmp_path / "c0.jsonl"]
    recovered = await recover(io.images[tmp_path / "c0.jsonl"][variant], tmp_path / "after")
    # whatever survived is a valid log made of whole records
    for line in recovered.splitlines():
        records.decode(line)
