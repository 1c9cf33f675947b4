"""Branches, not overwrites (DESIGN.md "Branches, not overwrites", the API table):
regenerate, edit and resend, and select, as new records only, through a real server on
loopback; prompts are built from the current path (or, for another answer, from the path
up to the message it answers)."""

from __future__ import annotations

import asyncio

from chatledger.storage import records

from .conftest import add_account, create_conversation, login, unsealed, wait_idle
from .test_context import RecordingDemo


async def log_records(client, cid: str) -> list[dict]:
    data = await (await client.get(f"/api/conversations/{cid}/log")).read()
    return unsealed([records.decode(line) for line in data.splitlines()])


async def send(client, cid: str, **body) -> dict:
    response = await client.post(f"/api/conversations/{cid}/messages", json=body)
    assert response.status == 202, await response.text()
    started = await response.json()
    await wait_idle(client, cid)
    return started


async def regenerate(client, cid: str, reply_id: str) -> dict:
    response = await client.post(
        f"/api/conversations/{cid}/regenerate", json={"reply_id": reply_id}
    )
    assert response.status == 202, await response.text()
    started = await response.json()
    await wait_idle(client, cid)
    return started


async def path(client, cid: str) -> list[dict]:
    return (await (await client.get(f"/api/conversations/{cid}")).json())["messages"]


def contents(prompt: list[dict]) -> list[str]:
    return [m["content"] for m in prompt if m["role"] == "user"]


async def test_regenerate_twice_select_and_reload(make_client):
    provider = RecordingDemo(tokens_per_s=0, reply_tokens=5)
    client = await make_client(provider=provider)
    cid = await create_conversation(client)
    first = await send(client, cid, text="Name a fruit.")
    second = await regenerate(client, cid, first["reply_id"])
    third = await regenerate(client, cid, first["reply_id"])
    assert second["message_id"] == third["message_id"] == first["message_id"]
    shown = await path(client, cid)
    assert [m["id"] for m in shown] == [first["message_id"], third["reply_id"]]
    answers = [first["reply_id"], second["reply_id"], third["reply_id"]]
    assert shown[1]["siblings"] == answers
    assert shown[1]["parent"] == first["message_id"]
    # every regenerate's prompt ended at the question, never at an earlier answer
    assert [contents(p) for p, _ in provider.prompts] == [["Name a fruit."]] * 3
    assert all(p[-1]["role"] == "user" for p, _ in provider.prompts)
    starts = [r for r in await log_records(client, cid) if r["type"] == "start"]
    assert [s.get("regenerate_of") for s in starts] == [None, first["reply_id"], first["reply_id"]]
    # choose the second answer: a select record; a reload (a new GET) shows it
    response = await client.post(f"/api/conversations/{cid}/select", json={"leaf": answers[1]})
    assert response.status == 200, await response.text()
    body = await response.json()
    assert body["leaf"] == answers[1]
    assert [m["id"] for m in await path(client, cid)] == [first["message_id"], answers[1]]
    # the next message follows the chosen answer, and its prompt holds that answer only
    follow = await send(client, cid, text="Why that one?")
    shown = await path(client, cid)
    assert [m["id"] for m in shown] == [
        first["message_id"],
        answers[1],
        follow["message_id"],
        follow["reply_id"],
    ]
    prompt = provider.prompts[-1][0]
    assistant = [m["content"] for m in prompt if m["role"] == "assistant"]
    assert assistant == [shown[1]["text"]]
    # every answer is still in the log, byte for byte
    recs = await log_records(client, cid)
    assert {r["id"] for r in recs if r["type"] == "start"} >= set(answers)


async def test_edit_and_resend_makes_a_branch_the_old_one_one_select_away(make_client):
    provider = RecordingDemo(tokens_per_s=0, reply_tokens=5)
    client = await make_client(provider=provider)
    cid = await create_conversation(client)
    a = await send(client, cid, text="Plan a trip.")
    b = await send(client, cid, text="To Lisbon?")
    edited = await send(client, cid, text="To Porto?", edit_of=b["message_id"])
    shown = await path(client, cid)
    assert [m["id"] for m in shown] == [
        a["message_id"],
        a["reply_id"],
        edited["message_id"],
        edited["reply_id"],
    ]
    assert shown[2]["siblings"] == [b["message_id"], edited["message_id"]]
    assert shown[2]["parent"] == a["reply_id"]
    assert contents(provider.prompts[-1][0]) == ["Plan a trip.", "To Porto?"]
    user = [r for r in await log_records(client, cid) if r["type"] == "user"][-1]
    assert user["edit_of"] == b["message_id"] and user["parent"] == a["reply_id"]
    # the old question, and its answer, one select away
    response = await client.post(f"/api/conversations/{cid}/select", json={"leaf": b["message_id"]})
    assert (await response.json())["leaf"] == b["reply_id"]
    assert [m["text"] for m in await path(client, cid)][2] == "To Lisbon?"
    # the edit of a first message is a first message too
    root = await send(client, cid, text="Plan a holiday.", edit_of=a["message_id"])
    shown = await path(client, cid)
    assert [m["id"] for m in shown] == [root["message_id"], root["reply_id"]]
    assert shown[0]["parent"] is None
    assert shown[0]["siblings"] == [a["message_id"], root["message_id"]]


async def test_paging_walks_the_current_path_only(make_client):
    client = await make_client(demo_reply_tokens=3)
    cid = await create_conversation(client)
    a = await send(client, cid, text="one")
    b = await send(client, cid, text="two")
    await regenerate(client, cid, b["reply_id"])
    c = await send(client, cid, text="three")
    page = await (await client.get(f"/api/conversations/{cid}?limit=2")).json()
    assert [m["id"] for m in page["messages"]] == [c["message_id"], c["reply_id"]]
    assert page["more"] is True
    older = await (
        await client.get(f"/api/conversations/{cid}?limit=3&before={c['message_id']}")
    ).json()
    ids = [m["id"] for m in older["messages"]]
    assert ids[0] == a["reply_id"] and ids[1] == b["message_id"]
    assert ids[2] != b["reply_id"]  # the regenerated answer is on the path, not the first
    assert older["more"] is True


async def test_bad_branch_requests_are_clear_4xx_and_append_nothing(make_client):
    client = await make_client(demo_reply_tokens=3)
    cid = await create_conversation(client)
    a = await send(client, cid, text="one")
    before = await (await client.get(f"/api/conversations/{cid}/log")).read()
    base = f"/api/conversations/{cid}"
    cases = [
        ("messages", {"text": "x", "parent": "nope"}, "unknown_message"),
        ("messages", {"text": "x", "parent": a["message_id"]}, "unknown_message"),  # a question
        ("messages", {"text": "x", "edit_of": a["reply_id"]}, "unknown_message"),  # an answer
        (
            "messages",
            {"text": "x", "edit_of": a["message_id"], "parent": a["reply_id"]},
            "unknown_message",
        ),
        ("messages", {"text": "x", "parent": 7}, "invalid_field"),
        ("messages", {"text": "x", "edit_of": None}, "invalid_field"),
        ("messages", {"text": "x", "edit_of": "x" * 500}, "invalid_field"),
        ("regenerate", {}, "invalid_field"),
        ("regenerate", {"reply_id": a["message_id"]}, "unknown_message"),
        ("regenerate", {"reply_id": ["r"]}, "invalid_field"),
        ("select", {"leaf": "nope"}, "unknown_message"),
        ("select", {}, "invalid_field"),
        ("select", {"leaf": {"id": 1}}, "invalid_field"),
    ]
    for route, body, code in cases:
        response = await client.post(f"{base}/{route}", json=body)
        assert response.status == 400, (route, body, await response.text())
        answer = await response.json()
        assert answer["error"] == code, (route, body, answer)
        assert "Traceback" not in answer["message"]
    assert await (await client.get(f"{base}/log")).read() == before


async def test_regenerate_and_select_wait_for_the_running_reply(make_client):
    client = await make_client(demo_tokens_per_s=20, demo_reply_tokens=200)
    cid = await create_conversation(client)
    response = await client.post(f"/api/conversations/{cid}/messages", json={"text": "go"})
    started = await response.json()
    for route, body in (
        ("regenerate", {"reply_id": started["reply_id"]}),
        ("select", {"leaf": started["message_id"]}),
    ):
        response = await client.post(f"/api/conversations/{cid}/{route}", json=body)
        assert response.status == 409, await response.text()
        assert (await response.json())["error"] == "reply_running"
    await client.post(f"/api/conversations/{cid}/stop")
    await wait_idle(client, cid)
    # a stopped (or failed, or interrupted) reply can be tried again
    again = await regenerate(client, cid, started["reply_id"])
    shown = await path(client, cid)
    assert shown[-1]["id"] == again["reply_id"] and shown[-1]["finish"] == "stop"


async def test_regenerate_streams_with_accept_event_stream(make_client):
    client = await make_client(demo_reply_tokens=4)
    cid = await create_conversation(client)
    a = await send(client, cid, text="hi")
    response = await client.post(
        f"/api/conversations/{cid}/regenerate",
        json={"reply_id": a["reply_id"]},
        headers={"Accept": "text/event-stream"},
    )
    assert response.status == 200
    assert response.headers["Content-Type"].startswith("text/event-stream")
    body = (await asyncio.wait_for(response.read(), 30)).decode()
    assert "event: start" in body and "event: end" in body
    assert a["reply_id"] in body  # the start's regenerate_of
    assert "event: user" not in body  # it begins at the new start


async def test_a_regenerated_answer_counts_against_the_daily_budget(make_client, data_dir):
    add_account(data_dir, "Mom", "parent")
    kid = add_account(data_dir, "Sam", "child")
    from chatledger.storage.household import Household

    household = Household(data_dir)
    try:
        household.set_limit("Sam", messages_per_day=2, tokens_per_day=None)
    finally:
        household.close()
    client = await make_client(demo_reply_tokens=3)
    await login(client, "Sam")
    cid = await create_conversation(client)
    a = await send(client, cid, text="one")
    await regenerate(client, cid, a["reply_id"])
    response = await client.post(
        f"/api/conversations/{cid}/regenerate", json={"reply_id": a["reply_id"]}
    )
    assert response.status == 429, await response.text()
    assert (await response.json())["error"] == "budget_exceeded"
    # and after a restart, counted from the log: the regenerated start carries `by`
    starts = [r for r in await log_records(client, cid) if r["type"] == "start"]
    assert starts[1]["by"] == kid and "by" not in starts[0]
