"""One fold in two languages (DESIGN.md "Layout"): ``storage/fold.py`` and ``static/fold.js``
agree on every case of ``tests/fold_fixtures.json`` (records in, messages, title and the
running reply out). Python runs the cases here; the JavaScript runs them in Node's own test
runner (``tests/js/fold.test.mjs``), started from here so ``python -m pytest`` runs both."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from chatledger.storage.fold import Summary, messages, prompt

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = json.loads((ROOT / "tests" / "fold_fixtures.json").read_text(encoding="utf-8"))
NODE_TEST = ROOT / "tests" / "js" / "fold.test.mjs"


def test_fixture_names_are_unique_and_records_well_formed():
    names = [case["name"] for case in FIXTURES]
    assert len(names) == len(set(names))
    assert not [n for n in names if "#" in n or "\\" in n]  # TAP would escape them
    for case in FIXTURES:
        assert set(case) == {"name", "records", "messages", "title", "running"}, case["name"]
        for record in case["records"]:
            assert isinstance(record["type"], str) and isinstance(record["ts"], int)


@pytest.mark.parametrize("case", FIXTURES, ids=[case["name"] for case in FIXTURES])
def test_fold_py_matches_the_fixture(case):
    assert messages(case["records"]) == case["messages"]
    summary = Summary()
    for record in case["records"]:
        summary.observe(record)
    assert summary.title == case["title"]
    running = list(summary.open_replies)[-1] if summary.open_replies else None
    assert running == case["running"]
    assert summary.records == len(case["records"])


def run_node_tests(path: Path) -> tuple[set[str], str]:
    """Run a ``node --test`` file; assert every test in it passed. Fails (never skips)
    without Node.js: CI installs it (``.ci/run``).

    :returns: the names of the tests that passed, and the whole output.
    """
    node = shutil.which("node")
    if node is None:
        pytest.fail("Node.js is needed to test static/fold.js (Debian: apt-get install nodejs)")
    run = subprocess.run(
        [node, "--test", "--test-reporter=tap", str(path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    output = run.stdout + run.stderr
    assert run.returncode == 0, output
    assert re.search(r"^# fail 0$", run.stdout, flags=re.M), output
    return set(re.findall(r"^\s*ok \d+ - (.*)$", run.stdout, flags=re.M)), output


def test_fold_js_matches_the_fixtures():
    # every fixture case ran as a test of its own and passed
    passed, output = run_node_tests(NODE_TEST)
    missing = [c["name"] for c in FIXTURES if f"fixture: {c['name']}" not in passed]
    assert not missing, output


def _reply(rid: str, text: str, finish: str | None) -> dict:
    return {
        "id": rid,
        "role": "assistant",
        "text": text,
        "finish": finish,
        "reply_to": None,
        "model": "demo",
        "usage": None,
        "error": "boom" if finish == "error" else None,
    }


def _user(uid: str, text: str) -> dict:
    return {"id": uid, "role": "user", "text": text, "finish": None}


def test_prompt_system_first_then_user_and_finished_replies_in_order():
    folded = [
        _user("u1", "one"),
        _reply("r1", "first", "stop"),
        _user("u2", "two"),
        _reply("r2", "cut short", "length"),
        _user("u3", "three"),
        _reply("r3", "stopped here", "cancelled"),
        _user("u4", "four"),
        _reply("r4", "until the crash", "interrupted"),
        _user("u5", "five"),
    ]
    assert prompt("Be brief.", folded) == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "one"},
        {"role": "assistant", "content": "first"},
        {"role": "user", "content": "two"},
        {"role": "assistant", "content": "cut short"},
        {"role": "user", "content": "three"},
        {"role": "assistant", "content": "stopped here"},
        {"role": "user", "content": "four"},
        {"role": "assistant", "content": "until the crash"},
        {"role": "user", "content": "five"},
    ]


@pytest.mark.parametrize("system", [None, ""])
def test_prompt_without_system_text(system):
    folded = [_user("u1", "hi"), _reply("r1", "hello", "stop"), _user("u2", "again")]
    assert prompt(system, folded) == [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "hello"},
        {"role": "user", "content": "again"},
    ]


def test_prompt_leaves_out_empty_failed_and_unfinished_replies():
    folded = [
        _user("u1", "one"),
        _reply("r1", "", "stop"),  # empty
        _user("u2", "two"),
        _reply("r2", "half an answer", "error"),  # failed
        _user("u3", "three"),
        _reply("r3", "", "error"),
        _user("u4", "four"),
        _reply("r4", "still streaming", None),  # no end yet
    ]
    assert prompt("sys", folded) == [
        {"role": "system", "content": "sys"},
        {"role": "user", "content": "one"},
        {"role": "user", "content": "two"},
        {"role": "user", "content": "three"},
        {"role": "user", "content": "four"},
    ]


def test_prompt_from_a_fixture_fold():
    (case,) = [c for c in FIXTURES if c["name"] == "error with error text"]
    assert prompt(None, messages(case["records"])) == [
        {"role": "user", "content": "hi"},
        {"role": "user", "content": "again?"},
    ]
    assert prompt("s", []) == [{"role": "system", "content": "s"}]
    assert prompt(None, []) == []
