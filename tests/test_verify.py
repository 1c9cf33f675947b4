"""``chatledger verify``: sound logs pass, each kind of damage is named (exit 1), crash
leftovers that the next open repairs are warnings (exit 0), nothing is written."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from chatledger.storage import ConversationLog, records
from chatledger.storage.verify import verify_dir

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
