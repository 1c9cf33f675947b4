"""The JSON API on a real loopback server: happy paths and every kind of bad input."""

from __future__ import annotations

import asyncio

import pytest

from chatledger.storage import records

from .conftest import create_conversation, wait_idle


def files_in(directory) -> set[str]:
    return {p.name for p in directory.rglob("*")} if directory.exists() else set()


async def test_health_and_page(make_client):
    client = await make_client()
    response = await client.get("/api/health")
    assert response.status == 200
    body = await response.json()
    assert body["ok"] is True and body["version"]
    page = await client.get("/")
    assert page.status == 200 and "text/html" in page.headers["Content-Type"]
    assert "app.js" in await page.text()
    script = await client.get("/static/app.js")
    assert script.status == 200 and "javascript" in script.headers["Content-Type"]


async def test_create_list_get_and_reply(make_client, data_dir):
    client = await make_client(demo_reply_tokens=12)
    conversation_id = await create_conversation(client, title="Trip", system="Be brief.")
    assert (data_dir / "conversations" / f"{conversation_id}.jsonl").is_file()
    response = await client.post(
        f"/api/conversations/{conversation_id}/messages", json={"text": "Where to?"}
    )
    assert response.status == 202
    started = await response.json()
    assert set(started) == {"message_id", "reply_id", "offset"}
    body = await wait_idle(client, conversation_id)
    assert [m["role"] for m in body["messages"]] == ["user", "assistant"]
    user, reply = body["messages"]
    assert user == {
        "id": started["message_id"],
        "role": "user",
        "text": "Where to?",
        "finish": None,
        "parent": None,
        "siblings": [started["message_id"]],
    }
    assert reply["id"] == started["reply_id"] and reply["finish"] == "stop"
    assert len(reply["text"].split()) == 12
    raw = await client.get(f"/api/conversations/{conversation_id}/log")
    assert raw.headers["Content-Type"] == "application/x-ndjson"
    data = await raw.read()
    assert len(data) == body["offset"]
    # offset is the record boundary before the user record
    assert records.decode(data[started["offset"] :].split(b"\n")[0])["type"] == "user"
    listing = await (await client.get("/api/conversations")).json()
    assert listing[0]["id"] == conversation_id and listing[0]["title"] == "Trip"
    assert listing[0]["size"] == len(data) and listing[0]["updated"] >= listing[0]["created"]


async def test_first_message_titles_an_untitled_conversation(make_client):
    client = await make_client(demo_reply_tokens=2)
    untitled = await create_conversation(client)
    titled = await create_conversation(client, title="Kept")
    long_text = "Plan   a week of dinners\nfor four people, " + "with leftovers " * 10
    for conversation_id in (untitled, titled):
        for text in (long_text, "second message"):
            await client.post(f"/api/conversations/{conversation_id}/messages", json={"text": text})
            await wait_idle(client, conversation_id)
    titles = {
        row["id"]: row["title"] for row in await (await client.get("/api/conversations")).json()
    }
    assert titles == {untitled: "Plan a week of dinners", titled: "Kept"}
    log = await (await client.get(f"/api/conversations/{untitled}/log")).read()
    assert log.count(b'"type":"title"') == 1


def test_title_from_cuts_at_a_word():
    from chatledger.server.generation import title_from

    assert title_from("  hello   world \nmore") == "hello world"
    cut = title_from("word " * 30)
    assert cut.endswith("…") and len(cut) <= 60 and not cut[:-1].endswith(" ")


async def test_listing_is_newest_first(make_client):
    client = await make_client(demo_reply_tokens=2)
    first = await create_conversation(client, title="one")
    second = await create_conversation(client, title="two")
    listing = await (await client.get("/api/conversations")).json()
    assert [row["id"] for row in listing] == [second, first]
    await client.post(f"/api/conversations/{first}/messages", json={"text": "bump"})
    await wait_idle(client, first)
    listing = await (await client.get("/api/conversations")).json()
    assert [row["id"] for row in listing] == [first, second]


BAD_IDS = ["..", "a/b", "x" * 65, "é", "a.b", "%2e%2e", "a%2Fb", "%00"]


@pytest.mark.parametrize("bad_id", BAD_IDS)
@pytest.mark.parametrize(
    "method,suffix",
    [("GET", ""), ("GET", "/events"), ("POST", "/messages"), ("POST", "/stop"), ("GET", "/log")],
)
async def test_bad_conversation_ids_get_400_and_touch_nothing(
    make_client, data_dir, bad_id, method, suffix
):
    client = await make_client()
    before = files_in(data_dir)
    response = await client.request(
        method, f"/api/conversations/{bad_id}{suffix}", json={"text": "hi"}
    )
    assert response.status in (400, 404)
    body = await response.json()
    assert set(body) >= {"error", "message"}
    if response.status == 400:
        assert body["error"] == "invalid_id"
    assert files_in(data_dir) == before


async def test_empty_id_and_unknown_id(make_client, data_dir):
    client = await make_client()
    before = files_in(data_dir)
    response = await client.get("/api/conversations/")
    assert response.status == 404 and (await response.json())["error"] == "not_found"
    response = await client.get("/api/conversations/unknown_id-1")
    assert response.status == 404 and (await response.json())["error"] == "not_found"
    response = await client.post("/api/conversations/unknown/messages", json={"text": "x"})
    assert response.status == 404
    assert files_in(data_dir) == before


@pytest.mark.parametrize(
    "body,code",
    [
        (b"not json", "invalid_json"),
        (b"[1, 2]", "invalid_body"),
        (b"{}", "invalid_field"),
        (b'{"text": 5}', "invalid_field"),
        (b'{"text": null}', "invalid_field"),
        (b'{"text": "   "}', "invalid_field"),
        (b'{"text": ["a"]}', "invalid_field"),
    ],
)
async def test_bad_message_bodies(make_client, body, code):
    client = await make_client()
    conversation_id = await create_conversation(client)
    size = (await (await client.get(f"/api/conversations/{conversation_id}")).json())["offset"]
    response = await client.post(
        f"/api/conversations/{conversation_id}/messages",
        data=body,
        headers={"Content-Type": "application/json"},
    )
    assert response.status == 400
    assert (await response.json())["error"] == code
    after = await (await client.get(f"/api/conversations/{conversation_id}")).json()
    assert after["offset"] == size  # nothing appended


async def test_oversized_body_is_413(make_client):
    client = await make_client(max_body_bytes=1024)
    conversation_id = await create_conversation(client)
    response = await client.post(
        f"/api/conversations/{conversation_id}/messages", json={"text": "x" * 5000}
    )
    assert response.status == 413
    assert (await response.json())["error"] == "body_too_large"
    response = await client.post("/api/conversations", json={"title": "x" * 5000})
    assert response.status == 413


async def test_bad_conversation_bodies(make_client, data_dir):
    client = await make_client()
    before = files_in(data_dir)
    for body in (
        b"nope",
        b'"str"',
        b'{"title": 3}',
        b'{"system": []}',
        b'{"title": "' + b"x" * 300 + b'"}',
    ):
        response = await client.post(
            "/api/conversations", data=body, headers={"Content-Type": "application/json"}
        )
        assert response.status == 400, body
        assert "error" in await response.json()
    assert files_in(data_dir) == before


async def test_409_while_reply_runs_and_stop(make_client):
    client = await make_client(demo_tokens_per_s=50, demo_reply_tokens=1000)
    conversation_id = await create_conversation(client)
    url = f"/api/conversations/{conversation_id}"
    assert (await client.post(f"{url}/stop")).status == 409
    first = await client.post(f"{url}/messages", json={"text": "one"})
    assert first.status == 202
    second = await client.post(f"{url}/messages", json={"text": "two"})
    assert second.status == 409
    assert (await second.json())["error"] == "reply_running"
    stopped = await client.post(f"{url}/stop")
    assert stopped.status == 200
    body = await (await client.get(url)).json()
    assert body["running"] is None
    assert body["messages"][-1]["finish"] == "cancelled"
    assert [m["text"] for m in body["messages"] if m["role"] == "user"] == ["one"]


async def test_unknown_route_and_method_are_json(make_client):
    client = await make_client()
    response = await client.get("/api/nothing-here")
    assert response.status == 404 and (await response.json())["error"] == "not_found"
    response = await client.delete("/api/conversations")
    assert response.status == 405 and (await response.json())["error"] == "method_not_allowed"


async def test_messages_per_minute_per_client_get_429_with_retry_after(make_client):
    client = await make_client(messages_per_minute=3, demo_reply_tokens=1)
    conversation_id = await create_conversation(client)
    url = f"/api/conversations/{conversation_id}"
    for _ in range(3):
        assert (await client.post(f"{url}/messages", json={"text": "hi"})).status == 202
        await wait_idle(client, conversation_id)
    size = (await (await client.get(url)).json())["offset"]
    response = await client.post(f"{url}/messages", json={"text": "one too many"})
    assert response.status == 429
    assert 1 <= int(response.headers["Retry-After"]) <= 60
    body = await response.json()
    assert body["error"] == "too_many_requests" and body["retry_after"] >= 1
    assert (await (await client.get(url)).json())["offset"] == size  # nothing appended


async def test_concurrent_streams_limit(make_client):
    client = await make_client(max_streams=2)
    conversation_id = await create_conversation(client)
    url = f"/api/conversations/{conversation_id}/events"
    first, second = await client.get(url), await client.get(url)
    assert first.status == second.status == 200
    third = await client.get(url)
    assert third.status == 429 and "Retry-After" in third.headers
    assert (await third.json())["error"] == "too_many_requests"
    first.close()
    for _ in range(100):  # the server notices the closed stream at its next write or wait
        fourth = await client.get(url)
        if fourth.status == 200:
            break
        await asyncio.sleep(0.05)
    assert fourth.status == 200


@pytest.mark.parametrize("trusted", [False, True])
async def test_rate_limit_per_forwarded_client_only_behind_a_trusted_proxy(make_client, trusted):
    proxies = ("127.0.0.1",) if trusted else ()
    client = await make_client(messages_per_minute=2, demo_reply_tokens=1, trusted_proxies=proxies)
    conversation_id = await create_conversation(client)
    url = f"/api/conversations/{conversation_id}/messages"

    async def post(forwarded_for: str) -> int:
        response = await client.post(
            url, json={"text": "hi"}, headers={"X-Forwarded-For": forwarded_for}
        )
        await wait_idle(client, conversation_id)
        return response.status

    assert [await post("192.0.2.10"), await post("192.0.2.10")] == [202, 202]
    # another person behind the proxy: limited alone only if the proxy is trusted
    assert await post("192.0.2.20") == (202 if trusted else 429)
    assert await post("192.0.2.10") == 429
