"""``chatledger verify``: sound logs pass, each kind of damage is named, nothing is written."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from chatledger.storage import ConversationLog, records
from chatledger.storage.verify import verify_dir

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
    "unended start": (lambda ls: ls[:5], "has a start and no end"),
    "torn tail": (lambda ls: [*ls, b'{"type":"us'], "torn tail"),
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
    assert "2 conversations checked, 0 with problems" in result.stdout


@pytest.mark.parametrize("name", DAMAGE)
def test_each_kind_of_damage_is_reported_and_nothing_written(tmp_path, name):
    damage, reason = DAMAGE[name]
    write(tmp_path, "good", sound("good"))
    path = write(tmp_path, "bad", damage(sound("bad")))
    before = {p.name: p.read_bytes() for p in path.parent.iterdir()}
    result = run_cli(tmp_path)
    assert result.returncode == 1
    assert "FAIL bad" in result.stdout and "ok   good" in result.stdout
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
    (report,) = verify_dir(tmp_path)
    assert not report.ok and "has a start and no end" in report.problems[0]


def test_missing_data_dir_exits_2(tmp_path):
    assert run_cli(tmp_path / "nothing").returncode == 2
