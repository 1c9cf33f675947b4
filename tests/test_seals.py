"""Seals (DESIGN.md "Seals"): a ``seal`` after every reply and every 1 MiB, kept
incrementally by the writer, checked by ``chatledger verify``; with ``--seal-key`` an
HMAC that a forger without the key cannot make."""

from __future__ import annotations

import asyncio
import hashlib
import os
import random
import re
import subprocess
import sys
from pathlib import Path

import pytest

from chatledger.server.app import init_app
from chatledger.server.settings import Settings
from chatledger.storage import Store, records
from chatledger.storage.seal import SEAL_EVERY, SealKeyError, load_key, seal_record
from chatledger.storage.verify import verify_dir

from .conftest import check_seals, create_conversation, wait_idle

KEY = b"k" * 40


def write_key(directory: Path, data: bytes = KEY, mode: int = 0o600) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "seal.key"
    path.write_bytes(data)
    path.chmod(mode)
    return path


def seals_of(data: bytes) -> list[tuple[int, dict]]:
    """(start offset, record) of every seal in a log's bytes."""
    out, offset = [], 0
    for line in data.splitlines(keepends=True):
        record = records.decode(line)
        if record["type"] == "seal":
            out.append((offset, record))
        offset += len(line)
    return out


def verify(data_dir: Path, *key: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "chatledger", "verify", "--data-dir", str(data_dir), *key],
        capture_output=True,
        text=True,
        timeout=120,
    )


async def test_every_reply_ends_sealed_and_long_ones_every_mebibyte(tmp_path):
    store = Store(tmp_path / "data")
    log = await store.create(title="t", model="m", system=None)
    await log.append(records.user(message_id="u", text="hi"))
    await log.append(records.start(reply_id="r", reply_to="u", model="m"))
    text = "x" * 1000
    for i in range(2600):  # ~2.7 MB of chunks: two seals inside the reply
        log.append_nowait(records.chunk(reply_id="r", i=i, text=text))
    await log.append(records.end(reply_id="r", finish="stop"))
    data = await log.read()
    await store.close()
    seals = seals_of(data)
    assert len(seals) == 3 and check_seals(data) == 3
    assert data.endswith(records.encode(seals[-1][1]))  # the last record: the end's seal
    previous = 0
    for at, seal in seals:
        assert seal["upto"] == at and seal["sha256"] == hashlib.sha256(data[:at]).hexdigest()
        assert at - previous <= SEAL_EVERY + 1100  # at most one record past 1 MiB
        previous = at
        assert "hmac" not in seal


def expected_seals(lines: list[bytes], first: int) -> list[int]:
    """Where the writer's rule puts seals among records ``lines`` (no seals), which
    follow ``first`` bytes with no seal: after every ``end``, and after the record past
    which :data:`SEAL_EVERY` bytes have no seal. Returns their start offsets."""
    out, size, sealed_at = [], first, 0
    for line in lines:
        size += len(line)
        if line.startswith(b'{"type":"end",') or size - sealed_at >= SEAL_EVERY:
            out.append(size)
            size += len(records.encode(seal_record(size, bytes(32), None)))
            sealed_at = size
    return out


async def test_seals_land_where_the_rule_says_whatever_the_batches(tmp_path):
    """Seals are made as a pass takes a batch (one hash update per run of records), yet
    they fall exactly where a record-by-record writer would put them: after each end,
    after the record that passes 1 MiB, in batches of any size and mix."""
    rng = random.Random(11)
    store = Store(tmp_path / "data")
    log = await store.create(title="t", model="m", system=None)
    first = log.committed
    written: list[bytes] = []
    for n in range(40):
        batch = []
        for _ in range(rng.choice((1, 3, 50, 400))):
            kind = rng.random()
            if kind < 0.05:
                record = records.end(reply_id=f"r{n}", finish="stop")
            elif kind < 0.1:
                record = records.user(message_id=f"u{n}", text="q" * rng.randrange(200_000))
            else:
                record = records.chunk(reply_id=f"r{n}", i=0, text="x" * rng.randrange(3000))
            batch.append(log.append_nowait(record))
            written.append(records.encode(record))
        await batch[-1]  # one batch (or more, should a pass take part of it meanwhile)
    end = records.end(reply_id="last", finish="stop")
    await log.append(end)
    written.append(records.encode(end))
    data = await log.read()
    await store.close()
    assert check_seals(data) == len(seals_of(data))
    assert [at for at, _ in seals_of(data)] == expected_seals(written, first)
    assert data.endswith(records.encode(seals_of(data)[-1][1]))


async def test_a_batch_of_a_reply_is_hashed_with_one_update(tmp_path, monkeypatch):
    from chatledger.storage.seal import Sealer

    store = Store(tmp_path / "data")
    log = await store.create(title="t", model="m", system=None)
    first = log.committed
    updates: list[int] = []
    update = Sealer.update

    def counted(self: Sealer, data: bytes) -> None:
        updates.append(len(data))
        update(self, data)

    monkeypatch.setattr(Sealer, "update", counted)
    last = None
    for i in range(500):
        last = log.append_nowait(records.chunk(reply_id="r", i=i, text=" word"))
    await last
    assert len(updates) == 1  # the whole write, in one call, not one a record
    await log.append(records.end(reply_id="r", finish="stop"))
    assert len(updates) == 3  # the end; then its seal, itself hashed
    data = await log.read()
    await store.close()
    assert check_seals(data) == 1 and sum(updates) == len(data) - first


async def test_the_hash_carries_over_a_close_and_a_reopen_with_no_rescan(tmp_path):
    """After a clean close the store reopens the log from what it kept (no scan), and a
    new store rescans it: both go on hashing from the right state."""
    store = Store(tmp_path / "data", max_open=1)
    log = await store.create(title="t", model="m", system=None, conversation_id="a")
    await log.append(records.end(reply_id="r0", finish="stop"))
    await store.create(title="t", model="m", system=None, conversation_id="b")  # evicts a
    log = await store.open("a")  # reopened from its Known: no scan
    await log.append(records.end(reply_id="r1", finish="stop"))
    await store.close()
    store = Store(tmp_path / "data")  # a new process: scanned
    log = await store.open("a")
    await log.append(records.end(reply_id="r2", finish="stop"))
    data = await log.read()
    await store.close()
    assert check_seals(data) == 3


async def test_server_seals_with_the_key_and_verify_checks_the_hmac(make_client, tmp_path):
    key = write_key(tmp_path / "secret")
    client = await make_client(seal_key=key, demo_reply_tokens=20)
    conversation_id = await create_conversation(client)
    for text in ("one", "two"):
        await client.post(f"/api/conversations/{conversation_id}/messages", json={"text": text})
        await wait_idle(client, conversation_id)
    data_dir = tmp_path / "data"
    log = (data_dir / "conversations" / f"{conversation_id}.jsonl").read_bytes()
    assert check_seals(log, key=KEY) == 2
    assert all("hmac" in seal for _, seal in seals_of(log))
    assert verify(data_dir, "--seal-key", str(key)).returncode == 0
    other = write_key(tmp_path / "other", b"o" * 40)
    wrong = verify(data_dir, "--seal-key", str(other))
    assert wrong.returncode == 1 and "hmac that does not match" in wrong.stdout


def sealed_log(tmp_path: Path, key: bytes | None = None) -> Path:
    """A log of three replies, each ended and sealed, written by the store."""

    async def write() -> Path:
        store = Store(tmp_path / "data", seal_key=key)
        log = await store.create(title="t", model="m", system=None)
        for n in range(3):
            await log.append(records.user(message_id=f"u{n}", text=f"question {n}"))
            await log.append(records.start(reply_id=f"r{n}", reply_to=f"u{n}", model="m"))
            for i in range(5):
                await log.append(records.chunk(reply_id=f"r{n}", i=i, text=f"word{i} "))
            await log.append(records.end(reply_id=f"r{n}", finish="stop"))
        path = log.path
        await store.close()
        return path

    return asyncio.run(write())


def test_a_flipped_byte_anywhere_fails_verify_naming_the_seal(tmp_path):
    path = sealed_log(tmp_path)
    good = path.read_bytes()
    assert all(report.ok for report in verify_dir(tmp_path / "data"))
    # The one span no seal vouches for: the last seal's own ts (a seal covers the bytes
    # before it; its own are covered by the next one). Its upto, sha256 and type are
    # checked all the same.
    last_at, last = seals_of(good)[-1]
    ts_at = last_at + records.encode(last).index(b'"ts":') + 5
    unvouched = range(ts_at, ts_at + len(str(last["ts"])))
    last_newline = len(good) - 1
    positions = [*random.Random(7).sample(range(last_newline), 80), 0, last_newline - 1]
    for position in positions:
        if position in unvouched:
            continue
        damaged = bytearray(good)
        damaged[position] ^= 0x04
        path.write_bytes(bytes(damaged))
        (report,) = verify_dir(tmp_path / "data")
        assert not report.ok, position
        # a seal at or after the flipped byte no longer matches (or a seal was unmade, and
        # the end before it is reported unsealed)
        if report.seal_failed_at is not None:
            (named,) = [p for p in report.problems if "some byte in" in p]
            start, end = map(int, re.search(r"some byte in \[(\d+), (\d+)\)", named).groups())
            assert start <= position < end, (position, named)
    path.write_bytes(good)
    assert verify(tmp_path / "data").returncode == 0
    damaged = bytearray(good)
    damaged[len(good) // 2] ^= 0x01
    path.write_bytes(bytes(damaged))
    result = verify(tmp_path / "data")
    assert result.returncode == 1 and "the seal at byte" in result.stdout


def test_a_cut_and_reforged_log_passes_sha256_alone_but_not_the_key(tmp_path):
    """A forger cuts the last reply and appends another with a recomputed plain
    SHA-256 seal: without the key that is indistinguishable; with it, verify fails."""
    key_file = write_key(tmp_path / "secret")
    path = sealed_log(tmp_path, key=load_key(key_file, tmp_path / "data"))
    data = path.read_bytes()
    cut = seals_of(data)[1][0] + len(records.encode(seals_of(data)[1][1]))  # after 2nd seal
    body = data[:cut] + records.encode(records.user(message_id="u9", text="I never said"))
    forged = body + records.encode(seal_record(len(body), hashlib.sha256(body).digest(), None))
    path.write_bytes(forged)
    assert verify(tmp_path / "data").returncode == 0  # SHA-256 alone: anyone can recompute
    result = verify(tmp_path / "data", "--seal-key", str(key_file))
    assert result.returncode == 1
    assert f"the seal at byte {len(body)} has no hmac" in result.stdout


def test_cutting_the_last_seal_is_reported(tmp_path):
    path = sealed_log(tmp_path)
    data = path.read_bytes()
    last_at, _ = seals_of(data)[-1]
    path.write_bytes(data[:last_at])  # the end of the last reply stays, its seal is gone
    (report,) = verify_dir(tmp_path / "data")
    assert not report.ok and any("has no seal after it" in p for p in report.problems)


def test_a_crash_between_an_end_and_its_seal_is_sealed_on_open(tmp_path):
    path = sealed_log(tmp_path)
    data = path.read_bytes()
    last_at, _last = seals_of(data)[-1]
    path.write_bytes(data[: last_at + 20])  # the seal is a torn tail
    (report,) = verify_dir(tmp_path / "data")
    assert report.ok and any("the next open seals it" in w for w in report.warnings)

    async def reopen() -> bytes:
        store = Store(tmp_path / "data")
        log = await store.open(path.stem)
        data = await log.read()
        await store.close()
        return data

    recovered = asyncio.run(reopen())
    assert recovered.startswith(data[:last_at]) and check_seals(recovered) == 3
    (report,) = verify_dir(tmp_path / "data")
    # sealed, and said to be sealed as found after the crash, not as written
    (warning,) = report.warnings
    assert report.ok and "only as an open found them" in warning


def test_a_log_from_before_seals_verifies_as_unsealed(tmp_path):
    conversations = tmp_path / "data" / "conversations"
    conversations.mkdir(parents=True)
    lines = [
        records.conversation(conversation_id="old", title="t", model="m", system=None),
        records.user(message_id="u", text="hi"),
        records.start(reply_id="r", reply_to="u", model="m"),
        records.end(reply_id="r", finish="stop"),
    ]
    (conversations / "old.jsonl").write_bytes(b"".join(map(records.encode, lines)))
    result = verify(tmp_path / "data")
    assert result.returncode == 0 and "unsealed (written before seals)" in result.stdout


@pytest.mark.parametrize(
    "where, mode, message",
    [
        ("inside", 0o600, "outside the data dir"),
        ("outside", 0o640, "readable by others"),
        ("short", 0o600, "fewer than 32 bytes"),
    ],
)
def test_a_key_that_cannot_be_used_is_refused(tmp_path, where, mode, message):
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    if where == "inside":
        key = write_key(data_dir, mode=mode)
    elif where == "short":
        key = write_key(tmp_path / "k", b"short", mode=mode)
    else:
        key = write_key(tmp_path / "k", mode=mode)
    with pytest.raises(SealKeyError, match=message):
        init_app(Settings(data_dir=data_dir, seal_key=key))
    result = subprocess.run(
        [sys.executable, "-m", "chatledger", "serve", "--data-dir", str(data_dir),
         "--seal-key", str(key), "--port", "0"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode == 2 and message in result.stderr
    assert not any((data_dir / "conversations").glob("*")) if where != "inside" else True


def test_a_symlink_into_the_data_dir_is_inside_it(tmp_path):
    data_dir = tmp_path / "data"
    key = write_key(data_dir / "conversations")
    link = tmp_path / "looks-outside.key"
    os.symlink(key, link)
    with pytest.raises(SealKeyError, match="outside the data dir"):
        load_key(link, data_dir)
