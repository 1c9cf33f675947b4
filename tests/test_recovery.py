"""Recovery on open: torn tails cut and kept aside, corruption reported and left alone,
unfinished replies closed exactly once."""

from __future__ import annotations

import hashlib
import io
from pathlib import Path

import pytest

from chatledger.storage import ConversationLog, FileIO, LogReadOnlyError, records
from chatledger.storage.fold import messages
from chatledger.storage.recovery import keep_aside, scan
from chatledger.storage.seal import seal_record

from .conftest import check_seals, unsealed


def lines(*recs: records.Record) -> bytes:
    return b"".join(records.encode(r) for r in recs)


def base_log() -> bytes:
    return lines(
        records.conversation(conversation_id="c", title="t", model="m", system=None),
        records.user(message_id="u1", text="hi"),
        records.start(reply_id="r1", reply_to="u1", model="m"),
        records.chunk(reply_id="r1", i=0, text="Hel"),
        records.chunk(reply_id="r1", i=1, text="lo"),
    )


def decoded(path: Path) -> list[records.Record]:
    return [records.decode(line) for line in path.read_bytes().splitlines()]


def torn_files(path: Path) -> list[Path]:
    return sorted(path.parent.glob(path.name + ".torn-*"))


@pytest.mark.parametrize(
    "tail",
    [
        b'{"type":"chunk","ts":1,"id":"r1","i":2,"te',  # partial line
        b"\0" * 300,  # NUL-filled hole, no newline
        b"\0" * 40 + b"\n",  # hole ending in a newline
        b"garbage\n",  # a complete line that is not a record
        b"\0" * 20 + b'{"type":"chunk","ts":1,"id":"r1","i":2,"text":"x"}\n',  # hole, then valid
        b'{"type":"chunk","ts":1,"id":"r1","i":2,"text":"x"}',  # valid JSON, no newline
    ],
    ids=["partial", "hole", "hole-newline", "garbage", "hole-then-valid", "unterminated"],
)
async def test_torn_tail_is_cut_kept_and_reply_closed(tmp_path, group_commit, tail, caplog):
    path = tmp_path / "c.jsonl"
    good = base_log()
    path.write_bytes(good + tail)
    log = await ConversationLog.open(path, commit=group_commit())
    kept = torn_files(path)
    assert len(kept) == 1 and kept[0].read_bytes() == tail
    assert path.read_bytes().startswith(good)
    recs = decoded(path)
    assert recs[-1]["type"] == "seal" and check_seals(path.read_bytes()) == 1
    recs = unsealed(recs)
    assert recs[-1]["type"] == "end" and recs[-1]["finish"] == "interrupted"
    assert recs[-1]["id"] == "r1"
    assert len(recs) == 6
    assert messages(recs)[-1]["text"] == "Hello"
    assert log.committed == path.stat().st_size
    assert "torn tail" in caplog.text
    await log.close()


async def test_closing_an_interrupted_reply_twice_adds_one_record(tmp_path, group_commit):
    path = tmp_path / "c.jsonl"
    path.write_bytes(base_log())
    log = await ConversationLog.open(path, commit=group_commit())
    await log.close()
    once = path.read_bytes()
    log = await ConversationLog.open(path, commit=group_commit())
    await log.close()
    assert path.read_bytes() == once
    assert sum(r["type"] == "end" for r in decoded(path)) == 1
    assert torn_files(path) == []


@pytest.mark.parametrize("bad", [b"}}}garbage{{{\n", b"\0" * 30 + b"\n"], ids=["garbage", "hole"])
async def test_corruption_opens_read_only_and_is_never_cut(tmp_path, group_commit, caplog, bad):
    path = tmp_path / "c.jsonl"
    good = base_log()
    # an invalid line (even a NUL hole) with a valid record after it: committed bytes changed
    corrupt = good + bad + lines(records.user(message_id="u2", text="after"))
    path.write_bytes(corrupt)
    log = await ConversationLog.open(path, commit=group_commit())
    assert log.read_only_reason and "corrupt" in log.read_only_reason
    with pytest.raises(LogReadOnlyError):
        await log.append(records.user(message_id="u3", text="x"))
    assert path.read_bytes() == corrupt
    assert torn_files(path) == []
    assert "corrupt" in caplog.text
    await log.close()


def test_scan_every_truncation_gives_longest_valid_prefix():
    data = base_log()
    boundaries = [0] + [i + 1 for i, b in enumerate(data) if b == ord("\n")]
    for cut in range(len(data) + 1):
        result = scan(io.BytesIO(data[:cut]))
        expected = max(b for b in boundaries if b <= cut)
        assert result.end == expected, cut
        assert result.corrupt_at is None
        assert result.torn == (cut != expected)


async def test_clean_log_is_untouched(tmp_path, group_commit):
    path = tmp_path / "c.jsonl"
    data = base_log() + lines(records.end(reply_id="r1", finish="stop"))
    path.write_bytes(data)
    log = await ConversationLog.open(path, commit=group_commit())
    await log.close()
    assert path.read_bytes() == data
    assert torn_files(path) == []


async def test_open_after_truncation_at_every_byte(tmp_path, group_commit):
    """Cut the log at every byte offset: open recovers the longest valid prefix, keeps
    the cut bytes aside, closes the open reply once, and a second open changes nothing."""
    sealed = base_log() + lines(records.end(reply_id="r1", finish="stop"))
    data = sealed + lines(
        seal_record(len(sealed), hashlib.sha256(sealed).digest(), None),
        records.user(message_id="u2", text="more"),
        records.start(reply_id="r2", reply_to="u2", model="m"),
        records.chunk(reply_id="r2", i=0, text="x"),
    )
    boundaries = [0] + [i + 1 for i, b in enumerate(data) if b == ord("\n")]
    for cut in range(len(data) + 1):
        directory = tmp_path / str(cut)
        directory.mkdir()
        path = directory / "c.jsonl"
        path.write_bytes(data[:cut])
        valid = max(b for b in boundaries if b <= cut)
        kept = data[valid:cut]
        if valid == 0:  # not one whole record: the create never completed
            with pytest.raises(FileNotFoundError):
                await ConversationLog.open(path, commit=group_commit())
            assert not path.exists()
            assert [p.read_bytes() for p in torn_files(path)] == ([kept] if kept else [])
            continue
        log = await ConversationLog.open(path, commit=group_commit())
        await log.close()
        recovered = path.read_bytes()
        assert recovered.startswith(data[:valid]), cut
        prefix = [records.decode(line) for line in data[:valid].splitlines()]
        added = unsealed(decoded(path)[len(prefix) :])
        check_seals(recovered)  # the seal after the recovered end covers every byte
        starts = {r["id"] for r in prefix if r["type"] == "start"}
        ended = {r["id"] for r in prefix if r["type"] == "end"}
        assert [(r["type"], r["id"], r["finish"]) for r in added] == [
            ("end", reply, "interrupted") for reply in sorted(starts - ended)
        ], cut
        assert [p.read_bytes() for p in torn_files(path)] == ([kept] if kept else [])
        log = await ConversationLog.open(path, commit=group_commit())  # recovery is idempotent
        await log.close()
        assert path.read_bytes() == recovered


def test_two_cuts_in_one_millisecond_keep_both(tmp_path, monkeypatch):
    monkeypatch.setattr("chatledger.storage.recovery.now_ms", lambda: 1_700_000_000_000)
    path = tmp_path / "c.jsonl"
    first = keep_aside(path, "torn", b"one", file_io=FileIO())
    second = keep_aside(path, "torn", b"two", file_io=FileIO())
    assert first != second
    assert [first.read_bytes(), second.read_bytes()] == [b"one", b"two"]
