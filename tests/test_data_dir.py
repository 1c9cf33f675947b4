"""The data dir is chatledger's alone: nothing outside it is ever read or written through
a link planted in it, and one server serves it at a time (issue "Hardening", findings 1
and 7), attacked the way a careless admin or a hostile local user would."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from chatledger.storage import (
    ConversationLog,
    DataDirLockedError,
    ForeignFileError,
    Store,
    records,
)

from .conftest import create_conversation
from .server_process import free_port, serve


def a_log(conversation_id: str, *more: records.Record) -> bytes:
    first = records.conversation(conversation_id=conversation_id, title="t", model="m", system=None)
    return b"".join(records.encode(r) for r in (first, *more))


def snapshot(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


async def test_a_symlink_in_the_data_dir_is_never_followed(make_client, data_dir, tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    # a valid log elsewhere (it would be opened writable and grow), a file with a torn
    # tail (it would be cut), and one that is not a log at all (it would be truncated)
    (outside / "valid.jsonl").write_bytes(
        a_log("valid", records.user(message_id="u", text="hi"))
        + records.encode(records.start(reply_id="r", reply_to="u", model="m"))
    )
    (outside / "torn.jsonl").write_bytes(a_log("torn") + b'{"type":"chu')
    (outside / "precious.txt").write_bytes(b"not a log\n" * 100)
    before = snapshot(outside)
    conversations = data_dir / "conversations"
    conversations.mkdir(parents=True)
    for name, target in (("valid", "valid.jsonl"), ("torn", "torn.jsonl"), ("p", "precious.txt")):
        (conversations / f"{name}.jsonl").symlink_to(outside / target)
    client = await make_client()
    mine = await create_conversation(client, title="mine")
    listing = await (await client.get("/api/conversations")).json()
    assert [row["id"] for row in listing] == [mine]
    for name in ("valid", "torn", "p"):
        for method, path, body in (
            ("GET", f"/api/conversations/{name}", None),
            ("GET", f"/api/conversations/{name}/log", None),
            ("GET", f"/api/conversations/{name}/events", None),
            ("POST", f"/api/conversations/{name}/messages", {"text": "write here"}),
        ):
            response = await client.request(method, path, json=body)
            assert response.status == 404, (method, path, await response.text())
            assert (await response.json())["error"] == "not_found"
    await client.close()
    assert snapshot(outside) == before  # not one byte changed, nothing kept aside there
    assert not [p for p in conversations.iterdir() if ".torn-" in p.name or ".failed-" in p.name]


async def test_a_hard_link_or_another_users_file_is_refused(tmp_path, group_commit):
    outside = tmp_path / "elsewhere.jsonl"
    original = a_log("h")
    outside.write_bytes(original)
    directory = tmp_path / "conversations"
    directory.mkdir()
    linked = directory / "h.jsonl"
    os.link(outside, linked)
    with pytest.raises(ForeignFileError, match="hard link"):
        await ConversationLog.open(linked, commit=group_commit())
    assert outside.read_bytes() == original
    if os.geteuid() != 0:
        return  # only root can give a file to another user
    theirs = directory / "theirs.jsonl"
    planted = a_log("theirs") + b"torn"
    theirs.write_bytes(planted)
    os.chown(theirs, 65534, 65534)
    with pytest.raises(ForeignFileError, match="another user"):
        await ConversationLog.open(theirs, commit=group_commit())
    assert theirs.read_bytes() == planted


async def test_a_conversations_directory_that_is_a_symlink_is_refused(tmp_path):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    (data_dir / "conversations").symlink_to(elsewhere)
    with pytest.raises(ForeignFileError, match="not a directory"):
        Store(data_dir)
    assert list(elsewhere.iterdir()) == []
    (data_dir / "conversations").unlink()
    store = Store(data_dir)  # the refusal released the data dir's lock
    assert (data_dir / "conversations").is_dir()
    await store.close()


async def test_a_second_store_on_the_same_data_dir_is_refused_until_the_first_closes(tmp_path):
    first = Store(tmp_path / "data")
    log = await first.create(title="t", model="m", system=None)
    with pytest.raises(DataDirLockedError, match="another chatledger process"):
        Store(tmp_path / "data")
    await first.close()
    second = Store(tmp_path / "data")
    reopened = await second.open(log.summary.conversation_id or "")
    assert reopened.live
    await second.close()


def test_a_second_server_on_the_same_data_dir_refuses_to_start(tmp_path):
    data_dir = tmp_path / "data"
    with serve(data_dir):
        second = subprocess.run(
            [
                sys.executable,
                "-m",
                "chatledger",
                "serve",
                "--data-dir",
                str(data_dir),
                "--port",
                str(free_port()),
            ],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert second.returncode == 2, second.stdout + second.stderr
        assert "another chatledger process is serving" in second.stderr
        assert " serving http://" not in second.stdout


def test_a_data_dir_others_can_write_to_is_refused(tmp_path):
    # Whoever may rename entries in the data dir could swap conversations/ for a link to
    # somewhere else after the start-up check (O_NOFOLLOW guards only a path's last part).
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    with pytest.raises(ForeignFileError, match="writable by every user"):
        Store(shared)
    if os.geteuid() != 0:
        return  # only root can give a directory to another user
    theirs = tmp_path / "theirs"
    theirs.mkdir(mode=0o700)
    os.chown(theirs, 65534, 65534)
    with pytest.raises(ForeignFileError, match="owned by another user"):
        Store(theirs)


async def test_a_new_data_dir_is_private(tmp_path):
    store = Store(tmp_path / "fresh" / "data")
    assert (tmp_path / "fresh" / "data").stat().st_mode & 0o777 == 0o700
    assert store.directory.stat().st_mode & 0o777 == 0o700
    await store.close()


# -- finding 5: a vanished data dir or an unlinked log --------------------------------


async def test_a_data_dir_deleted_while_running_fails_its_logs(make_client, data_dir):
    """Finding 5: replies went on "committing" into unlinked files (``writable: true``,
    ``202``s), all lost at restart. Now the first append after the delete fails the log
    (``503``), and nothing is ever reported committed into a deleted file."""
    client = await make_client()
    cid = await create_conversation(client, title="doomed")
    before = await (await client.get(f"/api/conversations/{cid}")).json()
    shutil.rmtree(data_dir)
    response = await client.post(f"/api/conversations/{cid}/messages", json={"text": "hi"})
    assert response.status == 503, await response.text()
    assert (await response.json())["error"] == "log_failed"
    after = await (await client.get(f"/api/conversations/{cid}")).json()
    assert after["writable"] is False and after["offset"] == before["offset"]
    again = await client.post(f"/api/conversations/{cid}/messages", json={"text": "hi"})
    assert again.status == 503


async def test_an_unlinked_log_takes_no_reply(make_client, data_dir):
    client = await make_client()
    cid = await create_conversation(client)
    kept = await create_conversation(client)
    (data_dir / "conversations" / f"{cid}.jsonl").unlink()
    response = await client.post(f"/api/conversations/{cid}/messages", json={"text": "hi"})
    assert response.status == 503
    ok = await client.post(f"/api/conversations/{kept}/messages", json={"text": "hi"})
    assert ok.status == 202  # the other logs are untouched


# -- finding 9: a read-only data dir ----------------------------------------------------


@contextlib.contextmanager
def read_only_view(source: Path, target: Path):
    """``target``: a read-only bind mount of ``source`` (skips where mounting is not
    allowed: permission bits do not stop root, a read-only mount does)."""
    target.mkdir()
    mounted = subprocess.run(["mount", "--bind", str(source), str(target)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot bind-mount here: {mounted.stderr.decode().strip()}")
    try:
        subprocess.run(["mount", "-o", "remount,bind,ro", str(target)], check=True)
        yield target
    finally:
        subprocess.run(["umount", "--lazy", str(target)], check=True)


async def test_a_read_only_data_dir_is_served_read_only(make_client, data_dir, tmp_path):
    """Finding 9: a read-only data dir listed no conversations and answered 503 for
    each. Now every conversation is listed and readable; writes get a clear 503."""
    conversations = data_dir / "conversations"
    conversations.mkdir(parents=True, mode=0o700)
    (conversations / "whole.jsonl").write_bytes(
        a_log("whole", records.user(message_id="u", text="kept"))
    )
    torn_log = a_log("torn")
    (conversations / "torn.jsonl").write_bytes(torn_log + b'{"type":"chu')
    before = snapshot(conversations)
    with read_only_view(data_dir, tmp_path / "ro") as view:
        client = await make_client(data_dir=view)  # closed by the fixture if this fails
        listing = await (await client.get("/api/conversations")).json()
        assert sorted(row["id"] for row in listing) == ["torn", "whole"]
        whole = await (await client.get("/api/conversations/whole")).json()
        assert whole["writable"] is False
        assert [m["text"] for m in whole["messages"]] == ["kept"]
        torn = await client.get("/api/conversations/torn/log")
        assert await torn.read() == torn_log  # the torn tail is not served
        post = await client.post("/api/conversations/whole/messages", json={"text": "hi"})
        assert post.status == 503 and (await post.json())["error"] == "read_only"
        create = await client.post("/api/conversations", json={})
        assert create.status == 503 and (await create.json())["error"] == "read_only"
        assert "read-only" in (await create.json())["message"]
        await client.close()
    assert snapshot(conversations) == before
