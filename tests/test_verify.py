"""``chatledger verify``: sound logs pass, each kind of damage is named (exit 1), crash
leftovers that the next open repairs are warnings (exit 0), nothing is written."""

from __future__ import annotations

import asyncio
import hashlib
import random
import re
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import pytest

from chatledger.storage import ConversationLog, Store, records
from chatledger.storage import verify as verify_module
from chatledger.storage.seal import SEAL_EVERY, SealCheck, seal_record
from chatledger.storage.verify import LogReport, verify_dir, verify_log

from .server_process import serve

ROOT = Path(__file__).resolve().parent.parent


def rec(kind: str, ts: int, **fields) -> bytes:
    return records.encode({"type": kind, "ts": ts, **fields})


def sound(conversation_id: str = "c1") -> list[bytes]:
    return [
        rec("conversation", 1, id=conversation_id, title="t", model="m", system=None),
        rec("user", 2, id="u1", text="hi"),
        rec("start", 3, id="r1", reply_to="u1", model="m"),
        rec("chunk", 4, id="r1", i=0, text="a"),
        rec("chunk", 4, id="r1", i=1, text="b"),
        rec("end", 5, id="r1", finish="stop", usage=None, error=None),
    ]


def write(data_dir: Path, conversation_id: str, lines: list[bytes]) -> Path:
    path = data_dir / "conversations" / f"{conversation_id}.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"".join(lines))
    return path


def run_cli(data_dir: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "chatledger", "verify", "--data-dir", str(data_dir)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )


DAMAGE = {
    "invalid line": (lambda ls: [*ls[:2], b"{oops\n", *ls[2:]], "invalid record"),
    "chunk gap": (lambda ls: [*ls[:3], ls[4], ls[5]], "chunk i=1, expected 0"),
    "repeated chunk": (lambda ls: [*ls[:5], ls[4], ls[5]], "chunk i=1, expected 2"),
    "second end": (lambda ls: [*ls, ls[5]], "ends a second time"),
    "ts back": (lambda ls: [*ls, rec("user", 1, id="u2", text="x")], "goes back"),
    "invalid line then torn tail": (
        lambda ls: [*ls[:2], b"{oops\n", *ls[2:], b'{"type":"us'],
        "torn tail of 11 bytes (never committed); not repaired: the log is corrupt",
    ),
    "unended start in a corrupt log": (
        lambda ls: [*ls[:2], b"{oops\n", *ls[2:5]],
        "has a start and no end (interrupted); not repaired",
    ),
    "chunk after end": (lambda ls: [*ls, rec("chunk", 9, id="r1", i=2, text="c")], "after its end"),
    "wrong first": (lambda ls: ls[1:], "not 'conversation'"),
    "bad finish": (
        lambda ls: [*ls[:5], rec("end", 5, id="r1", finish="done", usage=None, error=None)],
        "unknown finish",
    ),
}


def test_sound_logs_pass(tmp_path):
    write(tmp_path, "c1", sound("c1"))
    write(tmp_path, "c2", sound("c2"))
    result = run_cli(tmp_path)
    assert result.returncode == 0, result.stdout
    assert "ok   c1: 6 records" in result.stdout
    assert "2 conversations checked, 0 with errors, 0 with warnings only" in result.stdout


@pytest.mark.parametrize("name", DAMAGE)
def test_each_kind_of_damage_is_reported_and_nothing_written(tmp_path, name):
    damage, reason = DAMAGE[name]
    write(tmp_path, "good", sound("good"))
    path = write(tmp_path, "bad", damage(sound("bad")))
    before = {p.name: p.read_bytes() for p in path.parent.iterdir()}
    result = run_cli(tmp_path)
    assert result.returncode == 1
    assert "FAIL bad" in result.stdout and "ok   good" in result.stdout
    assert "error: byte" in result.stdout or "error: reply" in result.stdout
    assert reason in result.stdout
    assert {p.name: p.read_bytes() for p in path.parent.iterdir()} == before


async def test_reply_of_a_running_writer_is_not_a_problem(tmp_path, group_commit):
    path = tmp_path / "conversations" / "c1.jsonl"
    path.parent.mkdir(parents=True)
    log = await ConversationLog.create(
        path,
        records.conversation(conversation_id="c1", title="t", model="m", system=None),
        commit=group_commit(),
    )
    await log.append(records.user(message_id="u", text="x"))
    await log.append(records.start(reply_id="r9", reply_to="u", model="m"))
    (report,) = verify_dir(tmp_path)
    assert report.ok and report.writer_running and report.open_reply == "r9"
    await log.close()
    (report,) = verify_dir(tmp_path)  # no server now: the next open ends it "interrupted"
    assert report.ok and not report.problems
    assert "has a start and no end" in report.warnings[0]


def test_missing_data_dir_exits_2(tmp_path):
    assert run_cli(tmp_path / "nothing").returncode == 2


# -- finding 8: crash leftovers that the next open repairs are warnings, not errors -------

LEFTOVERS = {
    # SIGKILL during a create, before its first record: the next open removes the file.
    "zero-byte log": (lambda ls: [], "no whole record (0 bytes): a create that never"),
    "torn first record": (lambda ls: [ls[0][:9]], "keeps its 9 bytes in bad.jsonl.torn-"),
    # A crash (or a full disk) mid-reply: the next open appends end "interrupted".
    "start without end": (lambda ls: ls[:5], "reply r1 has a start and no end (interrupted)"),
    # A write that never completed: the next open cuts it into .torn-<ts>.
    "torn tail": (lambda ls: [*ls, b'{"type":"us'], "11 bytes after the last newline"),
    "NUL-filled tail": (lambda ls: [*ls, b"\0" * 40 + b"\n"], "a torn tail of 41 bytes"),
}


@pytest.mark.parametrize("name", LEFTOVERS)
def test_verify_exits_0_with_a_warning_on_a_crash_leftover_the_next_open_repairs(tmp_path, name):
    leftover, reason = LEFTOVERS[name]
    write(tmp_path, "good", sound("good"))
    path = write(tmp_path, "bad", leftover(sound("bad")))
    before = {p.name: p.read_bytes() for p in path.parent.iterdir()}
    result = run_cli(tmp_path)
    assert result.returncode == 0, result.stdout
    assert "warn bad" in result.stdout and "ok   good" in result.stdout
    assert "warning: " in result.stdout and reason in result.stdout
    assert "error:" not in result.stdout
    assert "2 conversations checked, 0 with errors, 1 with warnings only" in result.stdout
    assert {p.name: p.read_bytes() for p in path.parent.iterdir()} == before


def test_verify_warns_on_a_zero_byte_log_from_a_kill_during_create(tmp_path):
    write(tmp_path, "c1", [])
    result = run_cli(tmp_path)
    assert result.returncode == 0, result.stdout
    assert "warn c1: 0 records, 0 bytes" in result.stdout
    assert "the next open removes the log" in result.stdout


def test_verify_warns_on_a_start_without_end(tmp_path):
    write(tmp_path, "c1", sound("c1")[:4])
    result = run_cli(tmp_path)
    assert result.returncode == 0, result.stdout
    assert "warning: reply r1 has a start and no end (interrupted)" in result.stdout
    assert "appends its end with finish 'interrupted'" in result.stdout


def test_verify_warns_on_a_torn_tail_with_no_server_running(tmp_path):
    write(tmp_path, "c1", [*sound("c1"), b'{"type":"user","ts":6,"id":"u2","te'])
    result = run_cli(tmp_path)
    assert result.returncode == 0, result.stdout
    assert "warning: byte " in result.stdout and "cuts it into c1.jsonl.torn-<ts>" in result.stdout


def test_verify_fails_on_a_corrupt_record_in_the_middle(tmp_path):
    lines = sound("c1")
    write(tmp_path, "c1", [*lines[:3], b'{"type":"chunk","ts":4,"id":"r1"\n', *lines[4:]])
    result = run_cli(tmp_path)
    assert result.returncode == 1, result.stdout
    assert "FAIL c1" in result.stdout
    assert "error: byte " in result.stdout and "(valid records follow: corrupt)" in result.stdout


def test_what_verify_calls_repairable_the_next_start_repairs(tmp_path):
    """Each warning is true: once a server has started on the data dir (it opens, and so
    recovers, every log), verify finds nothing, and the logs with no whole record are gone."""
    names = {name: name.replace(" ", "_") for name in LEFTOVERS}
    for name, (leftover, _) in LEFTOVERS.items():
        write(tmp_path, names[name], leftover(sound(names[name])))
    assert all(report.ok and report.warnings for report in verify_dir(tmp_path))
    with serve(tmp_path):
        pass
    reports = verify_dir(tmp_path)
    assert [(r.conversation_id, r.problems, r.warnings) for r in reports] == [
        (r.conversation_id, [], []) for r in reports
    ]
    gone = {names["zero-byte log"], names["torn first record"]}
    assert sorted(r.conversation_id for r in reports) == sorted(set(names.values()) - gone)


def test_a_symbolic_link_is_an_error_never_followed(tmp_path):
    outside = tmp_path / "outside.jsonl"
    outside.write_bytes(b"".join(sound("c1")))
    write(tmp_path, "c2", sound("c2"))
    (tmp_path / "conversations" / "c1.jsonl").symlink_to(outside)
    result = run_cli(tmp_path)
    assert result.returncode == 1
    assert "FAIL c1" in result.stdout and "a symbolic link" in result.stdout


# -- verify_dir's fast path: what a matching seal vouches for is not decoded line by line,
#    and reports the same as the line-by-line check (verify_log over SealCheck.stream) -----

FAKE_RECORDS = (
    '\n{"type":"seal","ts":1,"upto":0,"sha256":"' + "0" * 64 + '"}\n'
    '{"type":"end","ts":1,"id":"r1","finish":"stop","usage":null,"error":null}\n\\"'
)
"""Text that reads like a seal and an end (in a record it is an escaped JSON string)."""


def sealed_bytes(items: list, key: bytes | None = None) -> bytes:
    """The bytes the writer writes for ``items`` (records, or lines written as they are):
    a seal after each ``end`` and after the record past which :data:`SEAL_EVERY` bytes
    have none (DESIGN.md "Seals"), each seal's ``ts`` that of the record before it. The
    item ``"recovered"`` starts the bytes that the next seal names as found by an open."""
    hashed, size, sealed_at, out, ts = hashlib.sha256(), 0, 0, [], 0
    recovered = None
    for item in items:
        if item == "recovered":
            recovered = size
            continue
        line = item if isinstance(item, bytes) else records.encode(item)
        try:
            record = records.decode(line)
        except records.RecordError:
            record = {"type": None, "ts": ts}
        ts = max(ts, record["ts"])
        out.append(line)
        hashed.update(line)
        size += len(line)
        if record["type"] == "end" or size - sealed_at >= SEAL_EVERY:
            seal = seal_record(size, hashed.digest(), key)
            seal["ts"] = ts
            if recovered is not None:
                seal["recovered"], recovered = [recovered, size], None
            line = records.encode(seal)
            out.append(line)
            hashed.update(line)
            size += len(line)
            sealed_at = size
    return b"".join(out)


def chatty(conversation_id: str, long_reply: int = 1_600, tricky: bool = True) -> list:
    """Records of a conversation: replies of 3, ``long_reply`` (past SEAL_EVERY: a seal
    inside it), 1, 0 and 5 chunks, texts that read like records, a long user text."""
    ts = iter(range(1_000, 10**9))
    fake = FAKE_RECORDS if tricky else ""

    def r(kind: str, **fields) -> dict:
        return {"type": kind, "ts": next(ts), **fields}

    items = [r("conversation", id=conversation_id, title="t", model="m", system=None)]
    for n, chunks in enumerate([3, long_reply, 1, 0, 5]):
        text = f"question {n}{fake}" + ("x" * 3000 if n == 2 else "")
        items.append(r("user", id=f"u{n}", text=text))
        items.append(r("start", id=f"r{n}", reply_to=f"u{n}", model="m"))
        for i in range(chunks):
            text = f" word{i} " + "w" * 700 + (fake if i % 97 == 1 else "")
            items.append(r("chunk", id=f"r{n}", i=i, text=text))
        items.append(r("end", id=f"r{n}", finish="stop", usage=None, error=None))
    items.append(r("title", title=f"renamed{fake}"))
    return items


def line_by_line(path: Path, key: bytes | None = None) -> LogReport:
    """What verify_dir reported before its fast path: the seals by SealCheck.stream,
    then every line decoded and checked (verify_log)."""
    seals = SealCheck(key=key)
    with open(path, "rb") as stream:
        seals.stream(stream)
    with open(path, "rb") as stream:
        return verify_log(path.stem, stream, key=key, sealed=seals)


def seal_starts(data: bytes) -> list[int]:
    out, offset = [], 0
    for line in data.splitlines(keepends=True):
        if records.decode(line)["type"] == "seal":
            out.append(offset)
        offset += len(line)
    return out


def damaged(good: bytes) -> dict[str, bytes]:
    """Changes to a sealed log: flipped bytes, cuts, seals removed, lines added."""
    seals = seal_starts(good)
    lines = good.splitlines(keepends=True)
    long_run = good.index(b'"i":700,')  # a chunk in the middle of the long reply
    out = {"none": good}
    rng = random.Random(11)
    for position in [0, long_run, len(good) - 2, *rng.sample(range(len(good) - 1), 6)]:
        flipped = bytearray(good)
        flipped[position] ^= 0x04
        out[f"flip {position}"] = bytes(flipped)
    for position in [seals[-1] - 1, seals[-1], seals[-1] + 30, *rng.sample(range(len(good)), 3)]:
        out[f"cut {position}"] = good[:position]

    def without(at: int) -> bytes:
        return good[:at] + good[good.index(b"\n", at) + 1 :]

    out["no seal inside the long reply"] = without(seals[1])
    out["no last seal"] = without(seals[-1])
    out["a line after the last seal"] = good + b'{"type":"user"}\n'
    chunk = next(line for line in lines if b'"i":900,' in line)
    out["a chunk twice"] = good.replace(chunk, chunk + chunk)
    return out


@pytest.mark.parametrize("key", [None, b"k" * 40])
def test_verify_dir_reports_what_the_line_by_line_check_does(tmp_path, monkeypatch, key):
    good = sealed_bytes(chatty("c1"), key)
    assert len(seal_starts(good)) == 6  # one per end, one inside the long reply
    path = write(tmp_path, "c1", [good])
    # reads of a few bytes (lines and seals across reads), of 64 KiB, of BLOCK; and
    # lines no seal vouches for yet checked once 1,000 bytes of them are held back
    ways = [(997, None), (1 << 16, None), (verify_module.BLOCK, None), (997, 1000)]
    for name, data in damaged(good).items():
        path.write_bytes(data)
        expected = asdict(line_by_line(path, key))
        assert name == "none" or expected["problems"] or expected["warnings"], name
        for block, held in ways:
            monkeypatch.setattr(verify_module, "BLOCK", block)
            if held is not None:
                monkeypatch.setattr(verify_module, "_HELD", held)
            (report,) = verify_dir(tmp_path, key=key)
            assert asdict(report) == expected, (name, block, held)
        monkeypatch.undo()


def test_a_flipped_byte_in_a_long_run_of_chunks_is_found_with_its_range(tmp_path, monkeypatch):
    good = sealed_bytes(chatty("c1"))
    seals = seal_starts(good)
    position = good.index(b'"i":500,') + 4  # the 5 (of bytes no decode saw when sound)
    flipped = bytearray(good)
    flipped[position] ^= 0x01
    path = write(tmp_path, "c1", [bytes(flipped)])
    monkeypatch.setattr(verify_module, "BLOCK", 1 << 16)
    (report,) = verify_dir(tmp_path)
    assert not report.ok and report.seal_failed_at == min(at for at in seals if at > position)
    (named,) = [problem for problem in report.problems if "some byte in" in problem]
    start, end = map(int, re.search(r"some byte in \[(\d+), (\d+)\)", named).groups())
    assert start <= position < end and start == max(at for at in seals if at < position)
    line = good.rindex(b"\n", 0, position) + 1
    assert f"byte {line}: reply r1 chunk i=400, expected 500" == report.problems[0]
    assert asdict(report) == asdict(line_by_line(path))


def test_text_that_reads_like_a_seal_or_an_end_cannot_fool_verify(tmp_path):
    """Written by the store: texts holding a seal and an end (a record's whole line,
    newlines and quotes included) are escaped JSON strings, never a line's start: no
    seal more is found, and an end whose seal was cut is still reported."""

    async def write_log() -> Path:
        store = Store(tmp_path / "data")
        log = await store.create(title="t", model="m", system=None)
        for n in range(2):
            await log.append(records.user(message_id=f"u{n}", text=FAKE_RECORDS))
            await log.append(records.start(reply_id=f"r{n}", reply_to=f"u{n}", model="m"))
            for i in range(50):
                text = FAKE_RECORDS * (i % 3)
                await log.append(records.chunk(reply_id=f"r{n}", i=i, text=text))
            await log.append(records.end(reply_id=f"r{n}", finish="stop"))
        path = log.path
        await store.close()
        return path

    path = asyncio.run(write_log())
    data = path.read_bytes()
    seals = seal_starts(data)
    assert len(seals) == 2 and data.count(b'"type":"seal"') == 2  # the texts' are escaped
    assert data.count(b'\\"type\\":\\"seal\\"') >= 80
    (report,) = verify_dir(tmp_path / "data")
    assert report.ok and not report.warnings and report.seals == 2
    assert report.records == len(data.splitlines()) and report.replies == 2
    path.write_bytes(data[: seals[1]])  # the end stays, its seal is gone
    (report,) = verify_dir(tmp_path / "data")
    assert not report.ok and report.seals == 1
    assert any("a reply's end has no seal after it" in p for p in report.problems)
    assert asdict(report) == asdict(line_by_line(path))


def test_sealed_lines_not_as_the_writer_writes_them_are_checked(tmp_path, monkeypatch):
    """Inside bytes whose seals match, a record in another form (keys in another order, a
    seal not as the writer writes it) is decoded and checked, and so is every line of a
    run of chunks whose first and last do not add up (a gap, ts going back, no start),
    and every line a seal vouches for only as an open found it (``recovered``)."""
    later = 10**6

    def chunks(reply: str, indexes, ts: int = 2_000) -> list[dict]:
        return [{"type": "chunk", "ts": ts, "id": reply, "i": i, "text": "w"} for i in indexes]

    head = chatty("x", long_reply=40, tricky=False)[:-1]  # up to the last end
    end = {"type": "end", "ts": later, "id": "r9", "finish": "stop", "usage": None}
    variants = {
        "an end in another form": [
            {"type": "start", "ts": later, "id": "r9", "reply_to": "u4", "model": "m"},
            *chunks("r9", range(10), later),
            b'{"ts":%d,"id":"r9","type":"end","finish":"stop"}\n' % later,
            *chunks("r9", range(10, 20), later),
            end,
        ],
        "a seal in another form": [
            b'{"ts":%d,"type":"seal","upto":0,"sha256":"%s"}\n' % (later, b"0" * 64)
        ],
        "a gap": [
            {"type": "start", "ts": later, "id": "r9", "reply_to": "u4", "model": "m"},
            *chunks("r9", [*range(10), *range(11, 30)], later),
            end,
        ],
        "ts going back in a run": [
            {"type": "start", "ts": later, "id": "r9", "reply_to": "u4", "model": "m"},
            *chunks("r9", range(10), later),
            *chunks("r9", range(10, 30), later - 1),
            end,
        ],
        "chunks of a reply without a start": [*chunks("r8", range(30), later)],
        "ts going back inside a run an open found": [
            "recovered",  # the seal after them vouches for them only as found
            {"type": "start", "ts": later, "id": "r9", "reply_to": "u4", "model": "m"},
            *chunks("r9", range(10), later),
            *chunks("r9", range(10, 12), later - 1),
            *chunks("r9", range(12, 30), later),
            end,
        ],
    }
    names = {f"v{n}": name for n, name in enumerate(variants)}
    for conversation_id, name in names.items():
        items = [{**head[0], "id": conversation_id}, *head[1:], *variants[name]]
        write(tmp_path, conversation_id, [sealed_bytes(items)])
    expected = {
        name: asdict(line_by_line(tmp_path / "conversations" / f"{conversation_id}.jsonl"))
        for conversation_id, name in names.items()
    }
    assert all(report["problems"] for report in expected.values())
    for block in (1 << 12, verify_module.BLOCK):
        monkeypatch.setattr(verify_module, "BLOCK", block)
        for report in verify_dir(tmp_path):
            name = names[report.conversation_id]
            assert asdict(report) == expected[name], (name, block)


def test_verify_dir_decodes_few_lines_of_a_sealed_log(tmp_path, monkeypatch):
    data = sealed_bytes(chatty("c1"))
    write(tmp_path, "c1", [data])
    decoded = []
    decode = verify_module._record
    monkeypatch.setattr(verify_module, "_record", lambda line: decoded.append(1) or decode(line))
    (report,) = verify_dir(tmp_path)
    assert report.ok and report.records == data.count(b"\n") > 1_600
    assert len(decoded) < 100
