"""Admission (issue 8, finding 11, and "creates are rate-limited like messages"): per-client
stream slots, only accepted messages count, creates limited per client, ``--keepalive``
bounded, text with no visible character refused."""

from __future__ import annotations

import asyncio
import math

import pytest

from chatledger.server.admission import ClientRate, StreamSlots, TooManyError
from chatledger.server.cli import parser
from chatledger.server.generation import title_from
from chatledger.server.settings import Settings
from chatledger.server.text import has_visible

from .conftest import create_conversation, wait_idle

PROXY = ("127.0.0.1",)  # the test client's address, declared a proxy: X-Forwarded-For names


def as_client(name: str) -> dict[str, str]:
    """Headers that make a request come from client ``name`` (behind the trusted PROXY)."""
    return {"X-Forwarded-For": name}


def conversation_files(data_dir) -> set[str]:
    return {p.name for p in (data_dir / "conversations").iterdir()}


async def committed(client, conversation_id: str) -> int:
    return (await (await client.get(f"/api/conversations/{conversation_id}")).json())["offset"]


# -- one client can hold all 2,000 stream slots ------------------------------------------


async def test_one_client_cannot_hold_all_stream_slots(make_client):
    client = await make_client(max_streams=10, max_streams_per_client=2, trusted_proxies=PROXY)
    conversation_id = await create_conversation(client)
    url = f"/api/conversations/{conversation_id}/events"
    mine = [await client.get(url, headers=as_client("10.0.0.1")) for _ in range(2)]
    assert [r.status for r in mine] == [200, 200]
    refused = await client.get(url, headers=as_client("10.0.0.1"))
    assert refused.status == 429
    assert int(refused.headers["Retry-After"]) >= 1
    body = await refused.json()
    assert body["error"] == "too_many_requests" and body["retry_after"] >= 1
    assert "you have 2 event streams open" in body["message"]
    # everyone else still gets a slot
    other = await client.get(url, headers=as_client("10.0.0.2"))
    assert other.status == 200
    # a streaming POST holds a slot too: refused before the message is appended
    before = await committed(client, conversation_id)
    post = await client.post(
        f"/api/conversations/{conversation_id}/messages",
        json={"text": "hi"},
        headers={"Accept": "text/event-stream", **as_client("10.0.0.1")},
    )
    assert post.status == 429 and (await post.json())["error"] == "too_many_requests"
    assert await committed(client, conversation_id) == before
    mine[0].close()
    for _ in range(100):  # the server notices the closed stream at its next write or wait
        again = await client.get(url, headers=as_client("10.0.0.1"))
        if again.status == 200:
            break
        again.release()
        await asyncio.sleep(0.05)
    assert again.status == 200
    for response in (mine[1], other, again):
        response.close()


def test_stream_slots_per_client_and_server_wide():
    slots = StreamSlots(3, per_client=2)
    with slots.hold("a"), slots.hold("a"):
        with pytest.raises(TooManyError, match="you have 2"), slots.hold("a"):
            pass
        with slots.hold("b"):
            assert slots.open == 3 and slots.held_by("a") == 2
            with pytest.raises(TooManyError, match="the server has 3"), slots.hold("c"):
                pass
    assert slots.open == 0 and slots.held_by("a") == 0
    unlimited = StreamSlots(0, per_client=0)
    with unlimited.hold("a"), unlimited.hold("a"), unlimited.hold("a"):
        assert unlimited.held_by("a") == 3


def test_the_per_client_stream_default_leaves_room_for_a_household():
    settings = Settings()
    assert settings.max_streams_per_client == 50
    assert settings.max_streams // settings.max_streams_per_client >= 40  # clients to fill it


# -- 409s count toward the per-minute limit ----------------------------------------------


async def test_409s_do_not_count_toward_the_messages_per_minute_limit(make_client):
    client = await make_client(messages_per_minute=2, demo_tokens_per_s=20, demo_reply_tokens=500)
    conversation_id = await create_conversation(client)
    url = f"/api/conversations/{conversation_id}"
    assert (await client.post(f"{url}/messages", json={"text": "one"})).status == 202
    for _ in range(5):  # a reply runs: each is 409 and uses up nothing
        response = await client.post(f"{url}/messages", json={"text": "again?"})
        assert response.status == 409
        assert (await response.json())["error"] == "reply_running"
    assert (await client.post(f"{url}/stop")).status == 200
    assert (await client.post(f"{url}/messages", json={"text": "two"})).status == 202
    assert (await client.post(f"{url}/stop")).status == 200
    size = await committed(client, conversation_id)
    third = await client.post(f"{url}/messages", json={"text": "three"})
    assert third.status == 429 and (await third.json())["error"] == "too_many_requests"
    assert 1 <= int(third.headers["Retry-After"]) <= 60
    assert await committed(client, conversation_id) == size  # nothing appended
    folded = await wait_idle(client, conversation_id)
    assert [m["text"] for m in folded["messages"] if m["role"] == "user"] == ["one", "two"]


async def test_a_rate_counts_only_what_succeeds_and_what_is_in_flight():
    rate = ClientRate(2, what="messages")
    with pytest.raises(RuntimeError):
        async with rate.admit("a"):
            raise RuntimeError("refused for another reason: not counted")
    gate, all_in = asyncio.Event(), asyncio.Event()
    answered = 0

    async def one() -> str:
        nonlocal answered
        try:
            async with rate.admit("a"):
                answered += 1
                if answered == 5:
                    all_in.set()
                await gate.wait()
        except TooManyError as exc:
            answered += 1
            if answered == 5:
                all_in.set()
            return f"429 {exc.retry_after}"
        return "ok"

    tasks = [asyncio.create_task(one()) for _ in range(5)]
    await all_in.wait()  # every one was admitted or refused while two are in flight
    gate.set()
    results = await asyncio.gather(*tasks)
    # concurrent requests cannot slip past together: two in flight fill the limit
    assert sorted(results) == ["429 1", "429 1", "429 1", "ok", "ok"]
    with pytest.raises(TooManyError) as refused:
        async with rate.admit("a"):
            pass
    assert 1 <= refused.value.retry_after <= 60  # until the first counted one leaves
    async with rate.admit("b"):  # per client
        pass
    unlimited = ClientRate(0, what="messages")
    for _ in range(10):
        async with unlimited.admit("a"):
            pass


# -- creates are rate-limited like messages ----------------------------------------------


async def test_creates_per_minute_per_client_get_429_with_retry_after(make_client, data_dir):
    client = await make_client(creates_per_minute=3, trusted_proxies=PROXY)
    bad = await client.post("/api/conversations", json={"title": 7}, headers=as_client("a"))
    assert bad.status == 400  # refused input uses up nothing
    for _ in range(3):
        await create_conversation(client)  # as 127.0.0.1 (no X-Forwarded-For)
    files = conversation_files(data_dir)
    refused = await client.post("/api/conversations", json={})
    assert refused.status == 429
    assert 1 <= int(refused.headers["Retry-After"]) <= 60
    body = await refused.json()
    assert body["error"] == "too_many_requests" and "conversations a minute" in body["message"]
    assert conversation_files(data_dir) == files  # a refused create touches no file
    other = await client.post("/api/conversations", json={}, headers=as_client("a"))
    assert other.status == 201  # another client is not held back


def test_creates_per_minute_flag():
    args = parser().parse_args(["serve", "--creates-per-minute", "0"])
    assert args.creates_per_minute == 0 and Settings().creates_per_minute == 10
    with pytest.raises(SystemExit):
        parser().parse_args(["serve", "--creates-per-minute", "-1"])


# -- --keepalive 0 is accepted -----------------------------------------------------------


@pytest.mark.parametrize("value", ["0", "0.5", "0.999", "nan", "-1"])
def test_keepalive_below_1_s_is_refused(value, capsys):
    with pytest.raises(SystemExit) as exited:
        parser().parse_args(["serve", "--keepalive", value])
    assert exited.value.code == 2
    assert "--keepalive" in capsys.readouterr().err
    with pytest.raises(ValueError, match="keepalive must be at least 1"):
        Settings(keepalive=float(value))


def test_keepalive_of_1_s_and_more_is_accepted():
    assert parser().parse_args(["serve", "--keepalive", "1"]).keepalive == 1.0
    assert Settings(keepalive=1.0).keepalive == 1.0
    assert Settings().keepalive == 15.0
    assert not math.isnan(Settings(keepalive=3600).keepalive)


# -- a message of only "\u200b" becomes an invisible title -------------------------------

INVISIBLE = [
    "\u200b",  # ZERO WIDTH SPACE (Cf)
    "\u200b\u200d\ufeff\u2060 \n",  # format characters and whitespace
    "\u0301\u0308",  # combining marks with nothing to mark
    "\u202e\u2066\u2069",  # bidi controls (UAX #9)
    "\u3164",  # HANGUL FILLER (Lo, renders blank)
    "\u2800",  # BRAILLE PATTERN BLANK
    "\u00a0\u3000\u2028",  # no-break space, ideographic space, line separator
    "\U000e0041",  # a tag character
]
VISIBLE = ["a\u200b", "🙂", "e\u0301", "\u202eabc", "\ue000", "👩\u200d👩\u200d👧", "\u05e9"]


@pytest.mark.parametrize("text", INVISIBLE)
async def test_a_message_with_no_visible_character_is_400(make_client, text):
    client = await make_client(demo_reply_tokens=1)
    conversation_id = await create_conversation(client)
    size = await committed(client, conversation_id)
    response = await client.post(
        f"/api/conversations/{conversation_id}/messages", json={"text": text}
    )
    assert response.status == 400
    body = await response.json()
    assert body["error"] == "invalid_field"
    assert body["message"] in {"'text' has no visible character", "'text' must not be empty"}
    assert await committed(client, conversation_id) == size  # nothing appended
    listed = await (await client.get("/api/conversations")).json()
    assert listed[0]["title"] == ""  # no invisible title either


@pytest.mark.parametrize("title", ["\u200b", " ", "\u202e", "\u200b\u200d\ufeff\u2060 \n"])
async def test_a_title_with_no_visible_character_is_400_and_makes_no_file(
    make_client, data_dir, title
):
    client = await make_client()
    await create_conversation(client)
    files = conversation_files(data_dir)
    response = await client.post("/api/conversations", json={"title": title})
    assert response.status == 400
    assert await response.json() == {
        "error": "invalid_field",
        "message": "'title' has no visible character",
    }
    assert conversation_files(data_dir) == files


async def test_visible_text_is_kept_exactly_as_sent(make_client):
    client = await make_client(demo_reply_tokens=1)
    spoof = "\u202eabc\u200b"
    conversation_id = await create_conversation(client, title=spoof)  # the log is the truth
    assert (await (await client.get(f"/api/conversations/{conversation_id}")).json())[
        "title"
    ] == spoof
    untitled = await create_conversation(client)
    url = f"/api/conversations/{untitled}/messages"
    assert (await client.post(url, json={"text": "\u200b\n\u200bhello\u200b"})).status == 202
    folded = await wait_idle(client, untitled)
    assert folded["messages"][0]["text"] == "\u200b\n\u200bhello\u200b"
    assert folded["title"] == "\u200bhello\u200b"  # its first line with something to see


@pytest.mark.parametrize("text", INVISIBLE)
def test_has_visible_is_false_for_invisible_text(text):
    assert not has_visible(text)


@pytest.mark.parametrize("text", VISIBLE)
def test_has_visible_is_true_for_visible_text(text):
    assert has_visible(text)


def test_a_title_is_never_made_from_an_invisible_line():
    assert title_from("\u200b\nhello") == "hello"
    assert title_from("  hello   world \nmore") == "hello world"
