"""``PATCH /api/conversations/{id}`` (``server/conversation_meta.py``): renaming,
archiving and unarchiving append ``title`` / ``archive`` / ``unarchive`` records (only
when they change something), the list and the conversation show them, bad bodies are
``400`` with nothing appended, a guardian is ``403``, anyone else gets the very ``404``
an unknown id gets, and a guardian's list stays audited."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestClient

from chatledger.server.keys import REPLIES
from chatledger.server.sessions import COOKIE
from chatledger.storage import records

from .conftest import add_account, create_conversation, wait_idle

UNKNOWN_ID = "no-such-conversation-0123"


def log_of(data_dir: Path, conversation_id: str) -> bytes:
    return (data_dir / "conversations" / f"{conversation_id}.jsonl").read_bytes()


def meta_records(data_dir: Path, conversation_id: str) -> list[dict[str, Any]]:
    """The ``title`` / ``archive`` / ``unarchive`` records of the log on disk."""
    kinds = {"title", "archive", "unarchive"}
    return [r for r in records.decode_all(log_of(data_dir, conversation_id)) if r["type"] in kinds]


async def patch(client: TestClient, conversation_id: str, body: Any, **kwargs: Any):
    return await client.patch(f"/api/conversations/{conversation_id}", json=body, **kwargs)


async def row_of(client: TestClient, conversation_id: str) -> dict[str, Any]:
    rows = await (await client.get("/api/conversations")).json()
    (row,) = [r for r in rows if r["id"] == conversation_id]
    return row


# -- single-person mode -------------------------------------------------------------------


async def test_a_rename_shows_in_the_list_the_conversation_and_the_raw_log(make_client, data_dir):
    client = await make_client()
    conversation_id = await create_conversation(client, title="first")
    response = await patch(client, conversation_id, {"title": "  Trip to Lisbon  "})
    assert response.status == 200, await response.text()
    body = await response.json()
    assert body["id"] == conversation_id
    assert (body["title"], body["archived"]) == ("Trip to Lisbon", False)  # stripped
    assert {"model", "system", "created", "updated", "size", "running", "writable"} <= set(body)
    assert (await row_of(client, conversation_id))["title"] == "Trip to Lisbon"
    page = await (await client.get(f"/api/conversations/{conversation_id}")).json()
    assert page["title"] == "Trip to Lisbon"
    raw = await (await client.get(f"/api/conversations/{conversation_id}/log")).read()
    assert [r["type"] for r in records.decode_all(raw)][-1] == "title"
    assert [r["title"] for r in meta_records(data_dir, conversation_id)] == ["Trip to Lisbon"]

    # the same title again changes nothing: nothing is appended
    before = log_of(data_dir, conversation_id)
    response = await patch(client, conversation_id, {"title": "Trip to Lisbon"})
    assert response.status == 200
    assert (await response.json())["title"] == "Trip to Lisbon"
    assert log_of(data_dir, conversation_id) == before


async def test_archive_and_unarchive_round_trip(make_client, data_dir):
    client = await make_client()
    kept = await create_conversation(client, title="kept")
    conversation_id = await create_conversation(client, title="put away")
    response = await patch(client, conversation_id, {"archived": True})
    assert response.status == 200
    assert (await response.json())["archived"] is True
    row = await row_of(client, conversation_id)  # still listed: the page filters
    assert (row["archived"], row["title"]) == (True, "put away")
    assert (await row_of(client, kept))["archived"] is False

    before = log_of(data_dir, conversation_id)
    response = await patch(client, conversation_id, {"archived": True})  # already: a no-op
    assert response.status == 200 and (await response.json())["archived"] is True
    assert log_of(data_dir, conversation_id) == before

    response = await patch(client, conversation_id, {"archived": False})
    assert response.status == 200 and (await response.json())["archived"] is False
    assert (await row_of(client, conversation_id))["archived"] is False
    logged = meta_records(data_dir, conversation_id)
    assert [r["type"] for r in logged] == ["archive", "unarchive"]
    assert all("by" not in r for r in logged)  # single-person mode: no account


async def test_both_fields_at_once_title_first(make_client, data_dir):
    client = await make_client()
    conversation_id = await create_conversation(client)
    response = await patch(client, conversation_id, {"title": "done", "archived": True})
    body = await response.json()
    assert response.status == 200 and (body["title"], body["archived"]) == ("done", True)
    assert [r["type"] for r in meta_records(data_dir, conversation_id)] == ["title", "archive"]


async def test_a_rename_reaches_the_event_stream(make_client):
    client = await make_client(demo_reply_tokens=2)
    conversation_id = await create_conversation(client, title="old")
    response = await client.post(
        f"/api/conversations/{conversation_id}/messages", json={"text": "hi"}
    )
    assert response.status == 202
    await wait_idle(client, conversation_id)
    assert (await patch(client, conversation_id, {"title": "new"})).status == 200
    async with client.get(f"/api/conversations/{conversation_id}/events") as stream:
        seen = b""
        async with asyncio.timeout(10):
            while b"event: title" not in seen:
                seen += await stream.content.readany()
    assert b'"title":"new"' in seen


async def test_two_alike_patches_that_race_append_one_record(make_client, data_dir):
    client = await make_client()
    conversation_id = await create_conversation(client)
    answers = await asyncio.gather(
        *(patch(client, conversation_id, {"archived": True}) for _ in range(5))
    )
    assert [a.status for a in answers] == [200] * 5
    assert [r["type"] for r in meta_records(data_dir, conversation_id)] == ["archive"]


async def test_a_title_of_the_longest_length_is_taken(make_client):
    client = await make_client()
    conversation_id = await create_conversation(client)
    title = "é" * 200
    response = await patch(client, conversation_id, {"title": title})
    assert response.status == 200 and (await response.json())["title"] == title


BAD_BODIES = [
    ({}, "invalid_body", "give 'title' and/or 'archived'"),
    ({"archive": True}, "unknown_field", "unknown field 'archive'"),
    ({"title": "ok", "owner": "me"}, "unknown_field", "unknown field 'owner'"),
    ({"title": ""}, "invalid_field", "'title' must not be empty"),
    ({"title": " \t "}, "invalid_field", "'title' must not be empty"),
    ({"title": None}, "invalid_field", "'title' must be a string"),
    ({"title": 7}, "invalid_field", "'title' must be a string"),
    ({"title": ["a"]}, "invalid_field", "'title' must be a string"),
    ({"title": "x" * 201}, "invalid_field", "'title' is longer than 200 characters"),
    ({"title": "two\nlines"}, "invalid_field", "'title' must not hold control characters"),
    ({"title": "nul\x00"}, "invalid_field", "'title' must not hold control characters"),
    ({"title": "\x1b[31mred"}, "invalid_field", "'title' must not hold control characters"),
    ({"title": "\u200b\u200d"}, "invalid_field", "'title' has no visible character"),
    ({"archived": "yes"}, "invalid_field", "'archived' must be true or false"),
    ({"archived": 1}, "invalid_field", "'archived' must be true or false"),
    ({"archived": None}, "invalid_field", "'archived' must be true or false"),
    # nothing is appended unless every field is good: not even the good title
    ({"title": "good", "archived": "no"}, "invalid_field", "'archived' must be true or false"),
    ([{"title": "a list"}], "invalid_body", "the request body must be a JSON object"),
    ("just a string", "invalid_body", "the request body must be a JSON object"),
]


@pytest.mark.parametrize(("body", "code", "message"), BAD_BODIES)
async def test_bad_bodies_are_400_and_append_nothing(make_client, data_dir, body, code, message):
    client = await make_client()
    conversation_id = await create_conversation(client, title="as it was")
    before = log_of(data_dir, conversation_id)
    response = await patch(client, conversation_id, body)
    assert response.status == 400
    assert response.content_type == "application/json"
    error = await response.json()
    assert error["error"] == code and error["message"].startswith(message), error
    assert log_of(data_dir, conversation_id) == before


async def test_a_body_that_is_not_json_is_400(make_client, data_dir):
    client = await make_client()
    conversation_id = await create_conversation(client)
    response = await client.patch(
        f"/api/conversations/{conversation_id}",
        data=b"{not json",
        headers={"Content-Type": "application/json"},
    )
    assert response.status == 400 and (await response.json())["error"] == "invalid_json"


async def test_an_unknown_or_bad_id_is_404_or_400(make_client):
    client = await make_client()
    response = await patch(client, UNKNOWN_ID, {"title": "x"})
    assert response.status == 404 and (await response.json())["error"] == "not_found"
    response = await client.patch("/api/conversations/bad%20id!", json={"title": "x"})
    assert response.status == 400


# -- with accounts ------------------------------------------------------------------------


async def session_of(client: TestClient, name: str) -> aiohttp.ClientSession:
    """A client session of its own, signed in as ``name``."""
    http = aiohttp.ClientSession(cookie_jar=aiohttp.DummyCookieJar())
    async with http.post(
        client.make_url("/api/login"), json={"name": name, "password": "password-1"}
    ) as response:
        assert response.status == 200, await response.text()
        http.headers["Cookie"] = f"{COOKIE}={response.cookies[COOKIE].value}"
    return http


async def answer_of(http: aiohttp.ClientSession, url: Any, body: Any) -> tuple:
    """Status, headers (but ``Date``) and body of a ``PATCH``, to compare byte for byte."""
    async with http.patch(url, json=body) as response:
        headers = [(k, v) for k, v in response.raw_headers if k.lower() != b"date"]
        return response.status, headers, await response.read()


@pytest.fixture
async def family(make_client, data_dir):
    """Mom (parent), Kid (child) and Alice (adult), each signed in; Kid has a
    conversation with one exchange."""
    ids = {
        name: add_account(data_dir, name, role)
        for name, role in (("Mom", "parent"), ("Kid", "child"), ("Alice", "adult"))
    }
    client = await make_client(demo_reply_tokens=2)
    people = {name: await session_of(client, name) for name in ids}
    async with people["Kid"].post(
        client.make_url("/api/conversations"), json={"title": "kid's first"}
    ) as response:
        assert response.status == 201
        conversation_id = (await response.json())["id"]
    async with people["Kid"].post(
        client.make_url(f"/api/conversations/{conversation_id}/messages"), json={"text": "hi"}
    ) as response:
        assert response.status == 202
    replies = client.server.app[REPLIES]
    deadline = time.monotonic() + 20
    while replies.running(conversation_id):  # without reading it: reads are audited
        assert time.monotonic() < deadline, "the reply did not end"
        await asyncio.sleep(0.02)
    try:
        yield client, ids, people, conversation_id
    finally:
        for http in people.values():
            await http.close()


async def test_the_owner_patches_with_its_account_as_by(family, data_dir):
    client, ids, people, conversation_id = family
    url = client.make_url(f"/api/conversations/{conversation_id}")
    async with people["Kid"].patch(url, json={"title": "homework", "archived": True}) as r:
        assert r.status == 200, await r.text()
    async with people["Kid"].patch(url, json={"archived": False}) as r:
        assert r.status == 200
    logged = meta_records(data_dir, conversation_id)
    assert [(r["type"], r.get("by")) for r in logged] == [
        ("title", None),
        ("archive", ids["Kid"]),
        ("unarchive", ids["Kid"]),
    ]


async def test_a_guardian_may_not_patch(family, data_dir):
    client, _, people, conversation_id = family
    before = log_of(data_dir, conversation_id)
    url = client.make_url(f"/api/conversations/{conversation_id}")
    for body in ({"title": "mom was here"}, {"archived": True}, {"title": 5}):
        async with people["Mom"].patch(url, json=body) as response:
            assert response.status == 403
            assert (await response.json())["error"] == "guardian_read_only"
    assert log_of(data_dir, conversation_id) == before


async def test_a_stranger_gets_the_answer_an_unknown_id_gets(family, data_dir):
    client, _, people, conversation_id = family
    before = log_of(data_dir, conversation_id)
    alice = people["Alice"]
    for body in ({"title": "mine now"}, {"archived": True}, {"title": ""}, {"nope": 1}):
        answer = await answer_of(
            alice, client.make_url(f"/api/conversations/{conversation_id}"), body
        )
        unknown = await answer_of(alice, client.make_url(f"/api/conversations/{UNKNOWN_ID}"), body)
        assert answer[0] == 404
        assert answer == unknown, (answer, unknown)
        assert b"kid's first" not in answer[2]
    assert log_of(data_dir, conversation_id) == before


async def test_a_guardians_list_is_still_audited(family, data_dir):
    client, ids, people, conversation_id = family
    url = client.make_url(f"/api/conversations/{conversation_id}")
    async with people["Kid"].patch(url, json={"title": "secret diary", "archived": True}) as r:
        assert r.status == 200
    async with people["Mom"].get(client.make_url("/api/conversations")) as response:
        rows = await response.json()
    (row,) = rows
    assert (row["id"], row["access"], row["archived"]) == (conversation_id, "guardian", True)
    assert row["title"] == "secret diary" and "title_hidden" not in row
    audit = records.decode_all((data_dir / "audit" / f"{conversation_id}.jsonl").read_bytes())
    opens = [r for r in audit if r["type"] == "open" and r["viewer"] == ids["Mom"]]
    assert [r["read"] for r in opens] == ["title"]
    closes = [r for r in audit if r["type"] == "close" and r["conn"] == opens[0]["conn"]]
    assert len(closes) == 1
    # Kid's own list: the archived conversation is there, marked
    async with people["Kid"].get(client.make_url("/api/conversations")) as response:
        (own,) = await response.json()
    assert (own["access"], own["archived"], own["title"]) == ("owner", True, "secret diary")
