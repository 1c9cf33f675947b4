"""``chatledger import`` (DESIGN.md "Export and import"): ChatGPT ``conversations.json``,
Open WebUI chat exports and chatledger's own JSONL, as real processes over real data dirs.

The fixtures in ``tests/fixtures/`` are written from the documented formats: a ChatGPT
export with a regenerated answer, an edited question, and hidden, system, tool and
non-text nodes (and a reply made of two assistant messages around a tool call); an Open
WebUI export with two answers to one question and a failed reply. Each is imported (one
while a server runs on the data dir), its records checked, and exported again as
Markdown with its branches marked. A chatledger log round-trips byte for byte with its
seals valid; malformed files exit 1 with one line and create nothing."""

from __future__ import annotations

import asyncio
import re
import subprocess
import sys
from pathlib import Path

import orjson
import pytest

from chatledger.storage import importers, records

from .conftest import add_account, check_seals, create_conversation, login, wait_idle

REPO = Path(__file__).resolve().parent.parent
FIXTURES = Path(__file__).resolve().parent / "fixtures"
CHATGPT = FIXTURES / "chatgpt_conversations.json"
OPEN_WEBUI = FIXTURES / "openwebui_export.json"


def chatledger(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "chatledger", *map(str, args)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )


def logs(data_dir: Path) -> dict[str, bytes]:
    """Title -> bytes of every log in the data dir."""
    out = {}
    for path in sorted((data_dir / "conversations").glob("*.jsonl")):
        data = path.read_bytes()
        out[records.decode(data.split(b"\n", 1)[0])["title"]] = data
    return out


def leftovers(data_dir: Path) -> list[str]:
    directory = data_dir / "conversations"
    return sorted(p.name for p in directory.iterdir()) if directory.exists() else []


def content(data: bytes) -> list[dict]:
    return [r for r in records.decode_all(data) if r["type"] != "seal"]


def assert_well_formed(data: bytes) -> list[dict]:
    recs = records.decode_all(data)
    assert recs[0]["type"] == "conversation"
    stamps = [r["ts"] for r in recs]
    assert stamps == sorted(stamps)  # ts never goes back
    assert check_seals(data) >= 1
    assert recs[-1]["type"] == "seal"
    return recs


# -- ChatGPT -------------------------------------------------------------------------------


async def test_chatgpt_export_imports_while_the_server_runs(make_client, data_dir):
    client = await make_client()  # holds the data dir's lock the whole time
    done = await asyncio.to_thread(chatledger, "import", CHATGPT, "--data-dir", data_dir)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0] == (
        f"imported 2 conversations from {CHATGPT} (ChatGPT export) into"
        f" {data_dir / 'conversations'}:"
    )
    assert lines[1].endswith(
        "Lisbon trip: 7 messages, 2 branches (1 edited question, 1 other answer);"
        " skipped 5 nodes: 1 hidden, 1 non-text (user_editable_context), 1 system,"
        " 1 tool, 1 tool call"
    )
    assert lines[2].endswith(
        "Arithmetic: 2 messages, 0 branches; skipped 3 nodes: 1 non-text (multimodal_text),"
        " 1 tool, 1 tool call"
    )
    assert lines[3].startswith("total: 2 conversations, 9 messages, 2 branches")
    assert lines[3].endswith(
        "skipped 8 nodes: 1 hidden, 1 non-text (multimodal_text),"
        " 1 non-text (user_editable_context), 1 system, 2 tool, 2 tool call"
    )

    found = logs(data_dir)
    assert set(found) == {"Lisbon trip", "Arithmetic"}
    assert not [n for n in leftovers(data_dir) if not n.endswith(".jsonl")]  # no temp file
    lisbon = content(found["Lisbon trip"])
    assert_well_formed(found["Lisbon trip"])
    head = lisbon[0]
    assert head["model"] == "gpt-4o" and head["system"] is None and "owner" not in head
    assert head["source"] == {"format": "chatgpt", "id": "6632f1a0-0000-4000-8000-000000000001"}
    assert head["ts"] == 1714557600000  # the conversation's create_time
    shape = [(r["type"], r.get("id") or r.get("leaf")) for r in lisbon[1:]]
    assert shape == [
        ("user", "q1"),
        *[("start", "a1"), ("chunk", "a1"), ("end", "a1")],
        *[("start", "a1b"), ("chunk", "a1b"), ("end", "a1b")],
        ("user", "q2"),
        *[("start", "a2"), ("chunk", "a2"), ("end", "a2")],
        ("user", "q2b"),
        *[("start", "a2b"), ("chunk", "a2b"), ("end", "a2b")],
        ("select", "a2b"),  # the current thread: current_node
    ]
    by_id = {(r["type"], r.get("id")): r for r in lisbon}
    q1, q2, q2b = by_id["user", "q1"], by_id["user", "q2"], by_id["user", "q2b"]
    assert q1["parent"] is None and q1["ts"] == 1714557610000 and "by" not in q1
    assert q1["text"] == "What should I see in Lisbon in two days?"
    assert q2["parent"] == "a1b" and "edit_of" not in q2
    assert q2b["parent"] == "a1b" and q2b["edit_of"] == "q2"  # the edited question
    a1, a1b = by_id["start", "a1"], by_id["start", "a1b"]
    assert a1["reply_to"] == "q1" and "regenerate_of" not in a1
    assert a1b["reply_to"] == "q1" and a1b["regenerate_of"] == "a1"  # another answer
    assert by_id["start", "a2b"]["reply_to"] == "q2b"  # the tool call and its output skipped
    assert by_id["chunk", "a2b"]["text"] == "The train from Rossio costs about 2.30 EUR each way."
    assert all(by_id["end", r]["finish"] == "stop" for r in ("a1", "a1b", "a2", "a2b"))

    arithmetic = content(found["Arithmetic"])
    assert_well_formed(found["Arithmetic"])
    chunks = [r["text"] for r in arithmetic if r["type"] == "chunk"]
    assert chunks == ["Let me check.", "\n\nIt is **42**."]  # one reply around a tool call
    start = next(r for r in arithmetic if r["type"] == "start")
    assert start["id"] == "p-2" and start["reply_to"] == "u-1" and start["model"] == "gpt-4"
    assert arithmetic[-1]["type"] == "end" and arithmetic[-1]["finish"] == "length"
    assert not [r for r in arithmetic if r["type"] == "select"]  # no branch: none needed

    # the running server lists and opens them (it never saw a part of a file)
    listed = await (await client.get("/api/conversations")).json()
    assert {row["title"] for row in listed} == {"Lisbon trip", "Arithmetic"}
    lisbon_id = lisbon[0]["id"]
    view = await (await client.get(f"/api/conversations/{lisbon_id}")).json()
    assert view["offset"] == len(found["Lisbon trip"])
    assert "The train from Rossio costs about 2.30 EUR each way." in [
        m["text"] for m in view["messages"]
    ]
    verified = await asyncio.to_thread(chatledger, "verify", "--data-dir", data_dir)
    assert verified.returncode == 0, verified.stdout

    # exported again as Markdown: the branches are marked
    done = await asyncio.to_thread(
        chatledger, "export", lisbon_id, "--format", "md", "--data-dir", data_dir
    )
    assert done.returncode == 0, done.stderr
    text = done.stdout
    assert text.startswith("# Lisbon trip\n")
    assert "· gpt-4o · another answer\n" in text
    assert "*Another answer to “What should I see in Lisbon in two days?” (regenerated).*" in text
    assert "· edited question\n" in text
    assert "*Edited question: another version of “How do I get to Sintra?”.*" in text
    section = text.split("How do I get to Sintra?\n")[0].rsplit("### ", 1)[1]
    assert "*Not on the current branch.*" in section  # q2 was edited away
    assert "| 1 | Belém |" in text  # model text as written (Markdown)
    assert text.count("*Not on the current branch.*") == 3  # a1, q2, a2


# -- Open WebUI ----------------------------------------------------------------------------


async def test_open_webui_export_imports_for_an_account(make_client, data_dir):
    alice = add_account(data_dir, "Alice", "adult")
    add_account(data_dir, "Bob", "adult")

    done = chatledger("import", OPEN_WEBUI, "--data-dir", data_dir)
    assert done.returncode == 1 and "--owner NAME" in done.stderr and not leftovers(data_dir)
    done = chatledger("import", OPEN_WEBUI, "--owner", "Nobody", "--data-dir", data_dir)
    assert done.returncode == 1 and "no account 'Nobody'" in done.stderr
    assert not leftovers(data_dir)

    done = chatledger("import", OPEN_WEBUI, "--owner", "alice", "--data-dir", data_dir)
    assert done.returncode == 0, done.stderr
    assert "(Open WebUI export)" in done.stdout
    assert "Bread baking: 5 messages, 1 branch (0 edited questions, 1 other answer);" in (
        done.stdout
    )
    data = logs(data_dir)["Bread baking"]
    assert_well_formed(data)
    recs = content(data)
    head = recs[0]
    assert head["owner"] == alice and head["system"] == "You are a patient baker."
    assert head["model"] == "llama3.1:8b" and head["ts"] == 1715000000000
    users = [r for r in recs if r["type"] == "user"]
    assert [(u["id"], u["parent"], u["by"]) for u in users] == [
        ("m1", None, alice),
        ("m2", "r1", alice),
    ]
    starts = {r["id"]: r for r in recs if r["type"] == "start"}
    assert starts["r1"]["reply_to"] == starts["r1b"]["reply_to"] == "m1"
    assert starts["r1b"]["regenerate_of"] == "r1" and starts["r1b"]["model"] == "mistral:7b"
    failed = next(r for r in recs if r["type"] == "end" and r["id"] == "r2")
    assert failed["finish"] == "error" and failed["error"] == "Ollama: connection refused"
    assert recs[-1] == {**recs[-1], "type": "select", "leaf": "r2"}
    stamps = [r["ts"] for r in recs if r["type"] in ("user", "start")]
    assert stamps == [1715000000000, 1715000005000, 1715000030000, 1715000100000, 1715000101000]

    conversation_id = head["id"]
    done = chatledger("export", conversation_id, "--format", "md", "--data-dir", data_dir)
    assert done.returncode == 0, done.stderr
    text = done.stdout
    assert "### Alice · " in text and "> You are a patient baker." in text
    assert "· mistral:7b · another answer\n" in text
    assert "Another answer to “How long should bread dough rise?” (regenerated)." in text
    assert "*Failed: Ollama: connection refused.*" in text

    # isolation holds for imported conversations too
    client = await make_client()
    await login(client, "Bob")
    assert (await client.get(f"/api/conversations/{conversation_id}")).status == 404
    await login(client, "Alice")
    assert (await client.get(f"/api/conversations/{conversation_id}")).status == 200


# -- chatledger JSONL ----------------------------------------------------------------------


async def test_chatledger_log_round_trips_byte_for_byte(make_client, data_dir, tmp_path):
    client = await make_client(demo_reply_tokens=8)
    conversation_id = await create_conversation(client, title="Round trip", system="Be brief.")
    for text in ("first", "second"):
        response = await client.post(
            f"/api/conversations/{conversation_id}/messages", json={"text": text}
        )
        assert response.status == 202
        await wait_idle(client, conversation_id)
    original = (data_dir / "conversations" / f"{conversation_id}.jsonl").read_bytes()
    assert check_seals(original) == 2

    exported = tmp_path / "exported.jsonl"
    done = await asyncio.to_thread(
        chatledger, "export", conversation_id, "--format", "jsonl", "-o", exported,
        "--data-dir", data_dir,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert exported.read_bytes() == original

    elsewhere = tmp_path / "elsewhere"
    done = await asyncio.to_thread(chatledger, "import", exported, "--data-dir", elsewhere)
    assert done.returncode == 0, done.stderr
    assert "(chatledger log)" in done.stdout and f"  {conversation_id}  Round trip: 4 messages" in (
        done.stdout
    )
    imported = elsewhere / "conversations" / f"{conversation_id}.jsonl"
    assert imported.read_bytes() == original  # byte for byte
    assert check_seals(imported.read_bytes()) == 2  # its seals still hold
    verified = await asyncio.to_thread(chatledger, "verify", "--data-dir", elsewhere)
    assert verified.returncode == 0, verified.stdout

    # the id exists: refused, in the data dir it came from (server running) and again
    for target in (data_dir, elsewhere):
        done = await asyncio.to_thread(chatledger, "import", exported, "--data-dir", target)
        assert done.returncode == 1 and "exists already" in done.stderr
        assert len(done.stderr.strip().splitlines()) == 1
    assert leftovers(elsewhere) == [f"{conversation_id}.jsonl"]

    # its owner cannot change with its bytes: another household's account is refused
    household = tmp_path / "household"
    add_account(household, "Mom", "parent")
    add_account(household, "Dad", "parent")
    done = await asyncio.to_thread(
        chatledger, "import", exported, "--owner", "Dad", "--data-dir", household
    )
    assert done.returncode == 1 and "first parent ('Mom')" in done.stderr
    assert not leftovers(household)
    done = await asyncio.to_thread(
        chatledger, "import", exported, "--owner", "Mom", "--data-dir", household
    )
    assert done.returncode == 0, done.stderr  # a log with no owner is the first parent's


def test_seals_carry_the_hmac_of_the_seal_key(tmp_path):
    key = tmp_path / "seal.key"
    key.write_bytes(b"k" * 40)
    key.chmod(0o600)
    data_dir = tmp_path / "data"
    done = chatledger("import", OPEN_WEBUI, "--seal-key", key, "--data-dir", data_dir)
    assert done.returncode == 0, done.stderr
    data = logs(data_dir)["Bread baking"]
    assert check_seals(data, key=b"k" * 40) == 4
    verified = chatledger("verify", "--seal-key", key, "--data-dir", data_dir)
    assert verified.returncode == 0 and "HMAC" in verified.stdout, verified.stdout


def test_a_log_with_an_open_reply_imports_with_a_warning(tmp_path):
    data = importers._sealed(  # a reply that never ended (the server was killed)
        [
            {"type": "conversation", "ts": 1, "id": "c-open", "title": "t", "model": "m",
             "system": None},
            {"type": "user", "ts": 2, "id": "u1", "text": "q"},
            {"type": "start", "ts": 3, "id": "r1", "reply_to": "u1", "model": "m"},
            {"type": "chunk", "ts": 4, "id": "r1", "i": 0, "text": "par"},
        ],
        None,
    )  # fmt: skip
    source = tmp_path / "open.jsonl"
    source.write_bytes(data)
    done = chatledger("import", source, "--data-dir", tmp_path / "d")
    assert done.returncode == 0, done.stderr
    assert "warning: reply r1 has a start and no end" in done.stdout
    assert (tmp_path / "d" / "conversations" / "c-open.jsonl").read_bytes() == data


# -- malformed files -----------------------------------------------------------------------


def chatgpt_file(*mappings: dict) -> bytes:
    return orjson.dumps(
        [
            {"title": f"c{n}", "create_time": 1714557600.0, "mapping": m, "current_node": None}
            for n, m in enumerate(mappings, 1)
        ]
    )


def gnode(node_id: str, parent: str | None, children: list[str], text: str | None = "hi"):
    message = None
    if text is not None:
        message = {
            "author": {"role": "user"},
            "create_time": 1714557601.0,
            "content": {"content_type": "text", "parts": [text]},
        }
    return {"id": node_id, "parent": parent, "children": children, "message": message}


def wnode(message_id: str, parent: str | None) -> dict:
    return {
        "id": message_id,
        "parentId": parent,
        "childrenIds": [],
        "role": "user",
        "content": "hi",
        "timestamp": 1715000000,
    }


def open_webui_file(current: str, messages: dict) -> bytes:
    return orjson.dumps({"chat": {"history": {"currentId": current, "messages": messages}}})


GOOD = {"r": gnode("r", None, ["u"], None), "u": gnode("u", "r", [])}


def sealed_log() -> bytes:
    planned = importers.plan(OPEN_WEBUI.read_bytes()).conversations[0]
    return planned.data


def tampered_log() -> bytes:
    data = sealed_log()
    return data.replace(b"1 to 2 hours", b"3 to 4 hours", 1)  # same length, before a seal


def bad_line_log() -> bytes:
    lines = sealed_log().split(b"\n")
    lines[2] = b'{"type":"start","ts":1715000005000,"id":"r1",oops}'
    return b"\n".join(lines)


MALFORMED = {
    "bad_json": (b'[{"title": "x", "mapping": {"a": ', "not valid JSON"),
    "not_an_export": (b'{"hello": 1}', "is neither a ChatGPT conversation"),
    "empty_list": (b"[]", "an empty list"),
    "mapping_cycle": (
        chatgpt_file({"a": gnode("a", "b", ["b"]), "b": gnode("b", "a", ["a"])}),
        "conversation 1 (“c1”): the tree has a cycle through node",
    ),
    "self_parent": (
        chatgpt_file({"a": gnode("a", "a", [])}),
        "the tree has a cycle through node 'a'",
    ),
    "parent_nowhere": (
        chatgpt_file(GOOD, {"r": gnode("r", None, [], None), "u": gnode("u", "ghost", [])}),
        "conversation 2 (“c2”): node 'u': its parent 'ghost' is not in the tree",
    ),
    "child_nowhere": (
        chatgpt_file({"r": gnode("r", None, ["u", "lost"], None), "u": gnode("u", "r", [])}),
        "node 'r': its child 'lost' is not in the tree",
    ),
    "bad_create_time": (
        chatgpt_file(
            {
                "u": {
                    **gnode("u", None, []),
                    "message": {**gnode("u", None, [])["message"], "create_time": "yesterday"},
                }
            }
        ),
        "node 'u': 'create_time' is not a number",
    ),
    "open_webui_parent_nowhere": (
        open_webui_file("m1", {"m1": wnode("m1", "m0")}),
        "node 'm1': its parent 'm0' is not in the tree",
    ),
    "open_webui_current_nowhere": (
        open_webui_file("zz", {"m1": wnode("m1", None)}),
        "the current message 'zz' is not in the tree",
    ),
    "jsonl_bad_line": (bad_line_log(), "line 3 (byte "),
    "jsonl_torn_tail": (sealed_log() + b'{"type":"us', "has no newline at its end"),
    "jsonl_not_conversation_first": (
        b'{"type":"user","ts":1,"id":"u","text":"x"}\n{"type":"user","ts":2,"id":"v","text":"y"}\n',
        "line 1: the first record is 'user'",
    ),
    "jsonl_seal_mismatch": (tampered_log(), "not a valid chatledger log: the seal at byte"),
    "jsonl_bad_id": (
        b'{"type":"conversation","ts":1,"id":"../etc","title":"","model":"m","system":null}\n',
        "the conversation id '../etc' is not a valid id",
    ),
}


@pytest.mark.parametrize("case", list(MALFORMED))
def test_a_malformed_file_exits_1_with_one_line_and_creates_nothing(tmp_path, case):
    data, message = MALFORMED[case]
    source = tmp_path / "input.json"
    source.write_bytes(data)
    data_dir = tmp_path / "data"
    done = chatledger("import", source, "--data-dir", data_dir)
    assert done.returncode == 1, (done.stdout, done.stderr)
    assert done.stdout == ""
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"chatledger: {source}: "), done.stderr
    assert message in lines[0]
    assert not data_dir.exists()  # validated fully before anything was made


def test_a_missing_file_is_one_line_too(tmp_path):
    done = chatledger("import", tmp_path / "nope.json", "--data-dir", tmp_path / "data")
    assert done.returncode == 1 and "cannot read" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1


def test_source_ids_that_are_no_chatledger_ids_get_new_ones(tmp_path):
    odd = {
        "q 1": {**wnode("q 1", None), "childrenIds": ["a/1", "a.2"]},
        "a/1": {**wnode("a/1", "q 1"), "role": "assistant", "content": "one"},
        "a.2": {
            **wnode("a.2", "q 1"),
            "role": "assistant",
            "content": "two",
            "timestamp": 1715000009,
        },
        "": {**wnode("", "a.2"), "content": "next", "timestamp": 1715000020},
    }
    source = tmp_path / "odd.json"
    source.write_bytes(open_webui_file("", odd))
    done = chatledger("import", source, "--data-dir", tmp_path / "data")
    assert done.returncode == 0, done.stderr
    recs = content(next(iter(logs(tmp_path / "data").values())))
    users = [r for r in recs if r["type"] == "user"]
    starts = [r for r in recs if r["type"] == "start"]
    ids = [r["id"] for r in users + starts]
    assert all(re.fullmatch(r"[A-Za-z0-9_-]{1,64}", i) for i in ids) and len(set(ids)) == 4
    first, second = starts
    assert first["reply_to"] == second["reply_to"] == users[0]["id"]
    assert second["regenerate_of"] == first["id"]
    assert users[1]["parent"] == second["id"]
    assert recs[-1]["type"] == "select" and recs[-1]["leaf"] == users[1]["id"]
