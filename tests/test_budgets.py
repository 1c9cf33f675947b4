"""Daily budgets (DESIGN.md "The household": budgets; ``server/budgets.py``): messages and
tokens per local day, counted from the logs' ``user`` records and ``end.usage``, ``429
budget_exceeded`` with ``Retry-After`` until local midnight, reset at midnight (an injected
clock), the same count after a restart, per account."""

from __future__ import annotations

import asyncio
import datetime
import os
import subprocess
import sys
import time
from pathlib import Path

import aiohttp
import pytest

from chatledger.server.cli import main as chatledger_main
from chatledger.storage import records

from .conftest import FaultyIO, add_account, create_conversation, login, wait_idle

REPO = Path(__file__).resolve().parent.parent


def limit(data_dir: Path, name: str, *flags: str) -> None:
    """``chatledger user limit NAME FLAGS`` (in this process)."""
    assert chatledger_main(["user", "limit", name, *flags, "--data-dir", str(data_dir)]) == 0


def seconds_to_midnight(t: float) -> float:
    """Seconds from ``t`` to the next local midnight, by the C library's own ``mktime``
    (which knows the zone's DST rules)."""
    today = datetime.datetime.fromtimestamp(t).date()
    midnight = datetime.datetime.combine(today + datetime.timedelta(days=1), datetime.time())
    return time.mktime(midnight.timetuple()) - t


def local_midnight_before(t: float) -> float:
    today = datetime.datetime.fromtimestamp(t).date()
    return time.mktime(datetime.datetime.combine(today, datetime.time()).timetuple())


@pytest.fixture
def fake(monkeypatch):
    """A clock the test moves: ``fake[0]`` seconds since the epoch. Records appended get
    their ``ts`` from it too, as they would from the one real clock."""
    now = [time.time()]
    monkeypatch.setattr(records, "now_ms", lambda: int(now[0] * 1000))
    return now


@pytest.fixture
def new_york():
    """The process's local time zone is America/New_York (DST changes) for the test."""
    before = os.environ.get("TZ")
    os.environ["TZ"] = "America/New_York"
    time.tzset()
    yield
    if before is None:
        del os.environ["TZ"]
    else:
        os.environ["TZ"] = before
    time.tzset()


async def send(client, conversation_id: str, text: str = "hello", **headers: str):
    return await client.post(
        f"/api/conversations/{conversation_id}/messages", json={"text": text}, headers=headers
    )


async def send_and_wait(client, conversation_id: str, text: str = "hello") -> dict:
    response = await send(client, conversation_id, text)
    assert response.status == 202, await response.text()
    return await wait_idle(client, conversation_id)


async def budget(client) -> dict:
    response = await client.get("/api/me")
    assert response.status == 200
    return (await response.json())["budget"]


async def user_records(client, conversation_id: str) -> list[dict]:
    data = await (await client.get(f"/api/conversations/{conversation_id}/log")).read()
    return [r for r in map(records.decode, data.splitlines()) if r["type"] == "user"]


async def ends(client, conversation_id: str) -> list[dict]:
    data = await (await client.get(f"/api/conversations/{conversation_id}/log")).read()
    return [r for r in map(records.decode, data.splitlines()) if r["type"] == "end"]


async def assert_refused(response, clock_now: float | None = None) -> int:
    assert response.status == 429, await response.text()
    body = await response.json()
    assert body["error"] == "budget_exceeded"
    retry_after = int(response.headers["Retry-After"])
    assert retry_after > 0 and body["retry_after"] == retry_after
    if clock_now is not None:
        assert abs(retry_after - seconds_to_midnight(clock_now)) <= 1.5, retry_after
    return retry_after


# -- messages per day ---------------------------------------------------------------------


async def test_three_messages_a_day_then_429_until_local_midnight(make_client, data_dir, fake):
    add_account(data_dir, "Kid", "child")
    limited = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "chatledger", "user", "limit", "Kid", "--messages-per-day", "3",
        "--data-dir", str(data_dir), stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=REPO,
    )  # fmt: skip
    out, err = await asyncio.wait_for(limited.communicate(), 60)
    assert limited.returncode == 0, err
    assert b"messages per day 3" in out
    client = await make_client(clock=lambda: fake[0], demo_reply_tokens=2)
    await login(client, "Kid")
    first = await create_conversation(client, title="one")
    left = await budget(client)
    assert left["messages"] == 3 and left["tokens"] is None
    assert abs(left["resets_in"] - seconds_to_midnight(fake[0])) <= 1.5
    for sent in range(1, 4):
        await send_and_wait(client, first, f"message {sent}")
        assert (await budget(client))["messages"] == 3 - sent
    await assert_refused(await send(client, first, "message 4"), fake[0])
    # not through the streaming form, nor in another conversation
    await assert_refused(await send(client, first, "again", Accept="text/event-stream"), fake[0])
    second = await create_conversation(client, title="two")
    await assert_refused(await send(client, second, "elsewhere"), fake[0])
    assert [r["text"] for r in await user_records(client, first)] == [
        "message 1",
        "message 2",
        "message 3",
    ]
    assert await user_records(client, second) == []
    assert (await budget(client))["messages"] == 0
    fake[0] += seconds_to_midnight(fake[0]) - 1.0  # 23:59:59: still refused, for 1 s
    assert await assert_refused(await send(client, second, "late"), fake[0]) <= 2


async def test_a_message_that_is_refused_otherwise_does_not_count(make_client, data_dir):
    add_account(data_dir, "Kid", "child")
    limit(data_dir, "Kid", "--messages-per-day", "2")
    client = await make_client(demo_reply_tokens=5000, demo_tokens_per_s=50)
    await login(client, "Kid")
    conversation_id = await create_conversation(client)
    assert (await send(client, conversation_id, "first")).status == 202
    assert (await send(client, conversation_id, "while it runs")).status == 409
    assert (await send(client, conversation_id, " ")).status == 400
    assert (await send(client, "no-such-conversation", "x")).status == 404
    stopped = await client.post(f"/api/conversations/{conversation_id}/stop", json={})
    assert stopped.status == 200
    await wait_idle(client, conversation_id)
    assert (await budget(client))["messages"] == 1
    assert (await send(client, conversation_id, "second")).status == 202


async def test_messages_sent_at_once_cannot_pass_the_limit_together(make_client, data_dir):
    add_account(data_dir, "Kid", "child")
    limit(data_dir, "Kid", "--messages-per-day", "1")
    slow = FaultyIO()
    client = await make_client(demo_reply_tokens=2, file_io=slow)
    await login(client, "Kid")
    await budget(client)  # the day's count is made first
    conversations = [await create_conversation(client, title=f"c{i}") for i in range(5)]
    slow.sync_delay = 0.3  # a slow disk: each commit of a user record takes 0.3 s
    answers = await asyncio.gather(*(send(client, c, "at once") for c in conversations))
    statuses = sorted(r.status for r in answers)
    assert statuses == [202, 429, 429, 429, 429], statuses


async def test_changing_or_removing_a_limit_takes_effect_while_the_server_runs(
    make_client, data_dir
):
    add_account(data_dir, "Kid", "child")
    client = await make_client(demo_reply_tokens=2)
    await login(client, "Kid")
    conversation_id = await create_conversation(client)
    for _ in range(2):
        await send_and_wait(client, conversation_id)
    assert (await budget(client))["messages"] is None
    limit(data_dir, "Kid", "--messages-per-day", "1")  # below what was used today
    for _ in range(50):  # the server folds the household log about every second
        if (await budget(client))["messages"] == 0:
            break
        await asyncio.sleep(0.1)
    await assert_refused(await send(client, conversation_id))
    limit(data_dir, "Kid")  # no flag: no limit
    for _ in range(50):
        if (await budget(client))["messages"] is None:
            break
        await asyncio.sleep(0.1)
    assert (await send(client, conversation_id)).status == 202


@pytest.mark.parametrize("value", ["-1", "1.5", "three", ""])
def test_a_limit_must_be_a_whole_number(data_dir, value, capsys):
    add_account(data_dir, "Kid", "child")
    before = (data_dir / "household.jsonl").read_bytes()
    with pytest.raises(SystemExit) as exit_:
        chatledger_main(["user", "limit", "Kid", "--messages-per-day", value, "--data-dir",
                         str(data_dir)])  # fmt: skip
    assert exit_.value.code == 2
    assert (data_dir / "household.jsonl").read_bytes() == before


# -- midnight -----------------------------------------------------------------------------


async def test_the_budget_resets_at_local_midnight(make_client, data_dir, fake):
    add_account(data_dir, "Kid", "child")
    limit(data_dir, "Kid", "--messages-per-day", "1")
    now = time.time()
    fake[0] = now + seconds_to_midnight(now) - 10.0  # 23:59:50 local
    client = await make_client(clock=lambda: fake[0], demo_reply_tokens=2)
    await login(client, "Kid")
    conversation_id = await create_conversation(client)
    await send_and_wait(client, conversation_id, "before midnight")
    retry_after = await assert_refused(await send(client, conversation_id), fake[0])
    assert retry_after <= 11
    fake[0] += retry_after  # the moment Retry-After named
    left = await budget(client)
    assert left["messages"] == 1
    assert left["resets_in"] > 23 * 3600
    await send_and_wait(client, conversation_id, "after midnight")
    retry_after = await assert_refused(await send(client, conversation_id), fake[0])
    assert retry_after > 23 * 3600
    assert [r["text"] for r in await user_records(client, conversation_id)] == [
        "before midnight",
        "after midnight",
    ]


async def test_a_restart_after_midnight_counts_only_the_new_day(make_client, data_dir, fake):
    add_account(data_dir, "Kid", "child")
    limit(data_dir, "Kid", "--messages-per-day", "2")
    now = time.time()
    fake[0] = now + seconds_to_midnight(now) - 30.0
    client = await make_client(clock=lambda: fake[0], demo_reply_tokens=2)
    await login(client, "Kid")
    conversation_id = await create_conversation(client)
    await send_and_wait(client, conversation_id, "yesterday 1")
    await send_and_wait(client, conversation_id, "yesterday 2")
    await client.close()
    fake[0] += 60.0  # 00:00:30
    fake_midnight = local_midnight_before(fake[0])
    client = await make_client(clock=lambda: fake[0], demo_reply_tokens=2)
    await login(client, "Kid")
    assert (await budget(client))["messages"] == 2
    await send_and_wait(client, conversation_id, "today 1")
    await client.close()
    client = await make_client(clock=lambda: fake[0], demo_reply_tokens=2)
    await login(client, "Kid")
    assert (await budget(client))["messages"] == 1
    texts = [r["text"] for r in await user_records(client, conversation_id)]
    assert texts == ["yesterday 1", "yesterday 2", "today 1"]
    assert all(
        (r["ts"] >= fake_midnight * 1000) == r["text"].startswith("today")
        for r in await user_records(client, conversation_id)
    )


async def test_retry_after_on_a_spring_forward_day(make_client, data_dir, fake, new_york):
    add_account(data_dir, "Kid", "child")
    limit(data_dir, "Kid", "--messages-per-day", "0")
    fake[0] = datetime.datetime(2026, 3, 8, 6, 30, tzinfo=datetime.UTC).timestamp()  # 01:30 EST
    client = await make_client(clock=lambda: fake[0], demo_reply_tokens=2)
    await login(client, "Kid")
    conversation_id = await create_conversation(client)
    midnight = datetime.datetime(2026, 3, 9, 4, 0, tzinfo=datetime.UTC).timestamp()  # 00:00 EDT
    assert seconds_to_midnight(fake[0]) == midnight - fake[0] == 21.5 * 3600
    retry_after = await assert_refused(await send(client, conversation_id))
    assert abs(retry_after - (midnight - fake[0])) <= 1.5, retry_after


async def test_the_first_hour_of_a_fall_back_day_counts(make_client, data_dir, fake, new_york):
    add_account(data_dir, "Kid", "child")
    limit(data_dir, "Kid", "--messages-per-day", "1")
    fake[0] = datetime.datetime(2026, 11, 1, 4, 30, tzinfo=datetime.UTC).timestamp()  # 00:30 EDT
    client = await make_client(clock=lambda: fake[0], demo_reply_tokens=2)
    await login(client, "Kid")
    conversation_id = await create_conversation(client)
    await send_and_wait(client, conversation_id, "just after midnight")
    await client.close()
    fake[0] = datetime.datetime(2026, 11, 1, 17, 0, tzinfo=datetime.UTC).timestamp()  # noon EST
    assert (
        local_midnight_before(fake[0])
        < datetime.datetime(2026, 11, 1, 4, 30, tzinfo=datetime.UTC).timestamp()
    )  # the same local day
    client = await make_client(clock=lambda: fake[0], demo_reply_tokens=2)  # counts the logs
    await login(client, "Kid")
    assert (await budget(client))["messages"] == 0
    await assert_refused(await send(client, conversation_id))


# -- a restart counts from the logs -------------------------------------------------------


async def test_a_restarted_server_counts_todays_messages_from_the_logs(make_client, data_dir):
    add_account(data_dir, "Kid", "child")
    limit(data_dir, "Kid", "--messages-per-day", "3")
    client = await make_client(demo_reply_tokens=2)
    await login(client, "Kid")
    first = await create_conversation(client, title="one")
    second = await create_conversation(client, title="two")
    await send_and_wait(client, first)
    await send_and_wait(client, second)
    await send_and_wait(client, first)
    await assert_refused(await send(client, second))
    await client.close()

    client = await make_client(demo_reply_tokens=2)  # a new app on the same data dir
    await login(client, "Kid")
    assert (await budget(client))["messages"] == 0
    await assert_refused(await send(client, first))
    await assert_refused(await send(client, second))
    third = await create_conversation(client, title="three")
    await assert_refused(await send(client, third))
    assert len(await user_records(client, first)) == 2
    assert len(await user_records(client, second)) == 1


async def test_a_restart_counts_a_long_log_read_backwards(make_client, data_dir):
    """Today's records are found from the end of a log that is longer than the block the
    count reads at a time (64 KiB), with records cut at block edges."""
    add_account(data_dir, "Kid", "child")
    limit(data_dir, "Kid", "--messages-per-day", "40")
    client = await make_client(demo_reply_tokens=2, max_message_chars=32_000)
    await login(client, "Kid")
    conversation_id = await create_conversation(client)
    for index in range(30):
        await send_and_wait(client, conversation_id, f"{index} " + "long text " * 700)
    size = len(await (await client.get(f"/api/conversations/{conversation_id}/log")).read())
    assert size > 3 * 64 * 1024
    await client.close()
    client = await make_client(demo_reply_tokens=2)
    await login(client, "Kid")
    assert (await budget(client))["messages"] == 10


# -- tokens per day -----------------------------------------------------------------------


async def test_tokens_per_day_counted_from_end_usage(make_client, data_dir):
    add_account(data_dir, "Kid", "child")
    client = await make_client(demo_reply_tokens=20)
    await login(client, "Kid")
    conversation_id = await create_conversation(client)
    await send_and_wait(client, conversation_id, "first")
    [end] = await ends(client, conversation_id)
    first_tokens = end["usage"]["total_tokens"]
    assert first_tokens > 20  # the demo provider reports prompt + completion tokens
    limit(data_dir, "Kid", "--tokens-per-day", str(first_tokens + 1))
    for _ in range(50):  # the server folds the household log about every second
        if (await budget(client))["tokens"] is not None:
            break
        await asyncio.sleep(0.1)
    left = await budget(client)
    assert left == {"messages": None, "tokens": 1, "resets_in": left["resets_in"]}
    # one token left: the message is accepted and its reply is not cut
    body = await send_and_wait(client, conversation_id, "second")
    assert body["messages"][-1]["finish"] == "stop"
    assert len(body["messages"][-1]["text"].split()) == 20
    assert (await budget(client))["tokens"] == 0
    await assert_refused(await send(client, conversation_id, "third"))
    # a restart counts the same from the logs
    used = sum(e["usage"]["total_tokens"] for e in await ends(client, conversation_id))
    await client.close()
    client = await make_client(demo_reply_tokens=20)
    await login(client, "Kid")
    limit(data_dir, "Kid", "--tokens-per-day", str(used + 5))
    for _ in range(50):
        if (await budget(client))["tokens"] == 5:
            break
        await asyncio.sleep(0.1)
    assert (await budget(client))["tokens"] == 5


async def test_tokens_reached_exactly_refuse_the_next_message(make_client, data_dir):
    add_account(data_dir, "Kid", "child")
    client = await make_client(demo_reply_tokens=5)
    await login(client, "Kid")
    conversation_id = await create_conversation(client)
    await send_and_wait(client, conversation_id)
    [end] = await ends(client, conversation_id)
    await client.close()
    limit(data_dir, "Kid", "--tokens-per-day", str(end["usage"]["total_tokens"]))
    client = await make_client(demo_reply_tokens=5)
    await login(client, "Kid")
    assert (await budget(client))["tokens"] == 0
    await assert_refused(await send(client, conversation_id))


# -- whose budget -------------------------------------------------------------------------


async def test_a_guardians_reads_do_not_count(make_client, data_dir):
    add_account(data_dir, "Mom", "parent", "mom-password")
    add_account(data_dir, "Kid", "child")
    limit(data_dir, "Mom", "--messages-per-day", "1", "--tokens-per-day", "100000")
    limit(data_dir, "Kid", "--messages-per-day", "2", "--tokens-per-day", "100000")
    kid = await make_client(demo_reply_tokens=3)
    await login(kid, "Kid")
    conversation_id = await create_conversation(kid)
    await send_and_wait(kid, conversation_id)
    kid_left = await budget(kid)
    assert kid_left["messages"] == 1 and kid_left["tokens"] < 100000
    async with aiohttp.ClientSession(  # another browser on the same server
        base_url=str(kid.make_url("/")), cookie_jar=aiohttp.CookieJar(unsafe=True)
    ) as mom:
        async with mom.post(
            "/api/login", json={"name": "Mom", "password": "mom-password"}
        ) as response:
            assert response.status == 200
        for path in ("", "/log", "/audit", "?limit=5"):
            async with mom.get(f"/api/conversations/{conversation_id}{path}") as response:
                assert response.status == 200, path
        async with mom.get(f"/api/conversations/{conversation_id}/events") as stream:
            assert stream.status == 200
            await asyncio.wait_for(stream.content.readany(), 10)
        async with mom.post(
            f"/api/conversations/{conversation_id}/messages", json={"text": "hi from mom"}
        ) as response:
            assert response.status == 403  # a guardian reads, never writes
        async with mom.get("/api/me") as response:
            mom_left = (await response.json())["budget"]
    assert mom_left["messages"] == 1 and mom_left["tokens"] == 100000
    assert await budget(kid) == {**kid_left, "resets_in": (await budget(kid))["resets_in"]}
    await kid.close()
    kid = await make_client(demo_reply_tokens=3)  # counted again from the logs
    await login(kid, "Mom", "mom-password")
    assert (await budget(kid))["messages"] == 1
    assert (await budget(kid))["tokens"] == 100000


async def test_each_account_has_its_own_budget(make_client, data_dir):
    add_account(data_dir, "Kid", "child")
    add_account(data_dir, "Teen", "adult", "teen-password")
    add_account(data_dir, "Mom", "parent", "mom-password")
    limit(data_dir, "Kid", "--messages-per-day", "1")
    limit(data_dir, "Teen", "--messages-per-day", "1")
    client = await make_client(demo_reply_tokens=2)
    await login(client, "Kid")
    kid_conversation = await create_conversation(client)
    await send_and_wait(client, kid_conversation)
    await assert_refused(await send(client, kid_conversation))
    await login(client, "Teen", "teen-password")
    assert (await budget(client))["messages"] == 1
    teen_conversation = await create_conversation(client)
    await send_and_wait(client, teen_conversation)
    assert (await budget(client))["messages"] == 0
    await assert_refused(await send(client, teen_conversation))
    await login(client, "Mom", "mom-password")
    mom_conversation = await create_conversation(client)
    for _ in range(3):
        await send_and_wait(client, mom_conversation)
    assert (await budget(client))["messages"] is None
    await login(client, "Kid")
    assert (await budget(client))["messages"] == 0
