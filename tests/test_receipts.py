"""Receipts (DESIGN.md "The audit log"): ``delivered`` and ``close`` say exactly which
bytes each connection was sent, ``seen`` what the page rendered; the audit route sums
them up per viewer and per reply."""

from __future__ import annotations

import asyncio
import json
import random
import signal
from pathlib import Path

import aiohttp

from chatledger.server.keys import DELIVERIES
from chatledger.storage import records

from .conftest import add_account, create_conversation, login, wait_idle
from .server_process import serve
from .sse_reader import StreamReader


def audit_records(data_dir: Path, conversation_id: str) -> list[dict]:
    path = data_dir / "audit" / f"{conversation_id}.jsonl"
    return [records.decode(line) for line in path.read_bytes().splitlines()]


def ranges(audit: list[dict], read: str = "events") -> list[tuple[int, int]]:
    """``[from, to)`` of every connection of one kind of read, from its ``open`` and its
    last receipt, in the order they opened."""
    start = {r["conn"]: r["from"] for r in audit if r["type"] == "open" and r["read"] == read}
    to: dict[str, int] = {}
    for r in audit:
        if r["type"] in ("delivered", "close"):
            to[r["conn"]] = r["to"]
    return [(start[conn], to.get(conn, start[conn])) for conn in start]


def union(spans: list[tuple[int, int]]) -> list[tuple[int, int]]:
    out: list[list[int]] = []
    for a, b in sorted(spans):
        if a == b:
            continue
        if out and a <= out[-1][1]:
            out[-1][1] = max(out[-1][1], b)
        else:
            out.append([a, b])
    return [(a, b) for a, b in out]


async def test_fifty_reconnects_mid_reply_are_receipted_exactly(make_client, data_dir):
    """A client reads a paced reply in 50 pieces, each a new connection that resumes
    with Last-Event-ID and leaves mid-reply. The union of the receipted ranges is
    exactly the bytes it received, and every connection's range starts where it asked."""
    client = await make_client(demo_reply_tokens=400, demo_tokens_per_s=200)
    conversation_id = await create_conversation(client)
    response = await client.post(
        f"/api/conversations/{conversation_id}/messages", json={"text": "go"}
    )
    assert response.status == 202
    received = bytearray()  # the record lines received, in order, over every connection
    last_id = "0"
    rng = random.Random(5)
    for attempt in range(51):
        headers = {"Last-Event-ID": last_id}
        async with client.get(
            f"/api/conversations/{conversation_id}/events", headers=headers
        ) as stream:
            assert stream.status == 200
            reader = StreamReader()
            wanted = rng.randint(1, 12) if attempt < 50 else None
            seen = 0
            while True:
                new = reader.feed(await asyncio.wait_for(stream.content.readany(), 10))
                for event in new:
                    received += event.data.encode() + b"\n"
                    last_id = event.id or last_id
                    seen += 1
                if wanted is not None and seen >= wanted:
                    break
                if wanted is None and any(e.event == "seal" for e in new):
                    break  # the reply's end and its seal: everything
        # leaving drops the connection; the server records its close
    await wait_idle(client, conversation_id)
    await asyncio.sleep(0.2)  # the last handler records its close as it ends
    log = await (await client.get(f"/api/conversations/{conversation_id}/log")).read()
    audit = audit_records(data_dir, conversation_id)
    spans = ranges(audit)  # the 51 event streams (not the views and the log read)
    assert len(spans) == 51
    assert union(spans) == [(0, len(received))], (union(spans), len(received))
    assert bytes(received) == log  # the client got the whole log, seal included
    for start, to in spans:
        assert start <= to <= len(log)


async def test_delivered_receipts_follow_a_live_stream(make_client, data_dir):
    client = await make_client(demo_reply_tokens=200, demo_tokens_per_s=100)
    conversation_id = await create_conversation(client)
    deliveries = client.server.app[DELIVERIES]
    async with client.get(f"/api/conversations/{conversation_id}/events") as stream:
        reader = StreamReader()
        await client.post(f"/api/conversations/{conversation_id}/messages", json={"text": "go"})
        ticks = 0
        while not any(e.event == "end" for e in reader.events):
            reader.feed(await asyncio.wait_for(stream.content.readany(), 10))
            if sum(e.event == "chunk" for e in reader.events) > 20 * (ticks + 1):
                ticks += await deliveries.tick()
        assert ticks >= 3
    await asyncio.sleep(0.2)
    audit = audit_records(data_dir, conversation_id)
    delivered = [r["to"] for r in audit if r["type"] == "delivered"]
    assert len(delivered) >= 3 and delivered == sorted(delivered)
    received_to = int(reader.events[-1].id)
    assert all(to <= received_to for to in delivered)  # never more than was sent


async def test_seen_and_the_audit_summary_per_viewer_and_reply(make_client, data_dir):
    add_account(data_dir, "Mom", "parent")
    add_account(data_dir, "Sam", "child")
    client = await make_client(demo_reply_tokens=5)
    await login(client, "Sam")
    conversation_id = await create_conversation(client)
    await client.post(f"/api/conversations/{conversation_id}/messages", json={"text": "hi"})
    view = await wait_idle(client, conversation_id)
    offset = view["offset"]
    # the page reports what it rendered: a record boundary, within the log
    bad = await client.post(f"/api/conversations/{conversation_id}/seen", json={"offset": 3})
    assert bad.status == 416
    bad = await client.post(f"/api/conversations/{conversation_id}/seen", json={"offset": "x"})
    assert bad.status == 400
    ok = await client.post(
        f"/api/conversations/{conversation_id}/seen", json={"offset": offset, "renderer": "t1"}
    )
    assert ok.status == 204
    summary = await (await client.get(f"/api/conversations/{conversation_id}/audit")).json()
    (sam,) = [v for v in summary["viewers"] if v["name"] == "Sam"]
    (reply,) = sam["replies"]
    assert reply["generated"] and reply["delivered"] and reply["seen"]
    assert reply["generated"] <= reply["delivered"] <= reply["seen"]
    seen_records = [r for r in audit_records(data_dir, conversation_id) if r["type"] == "seen"]
    assert [(r["upto"], r["renderer"], r["viewer"]) for r in seen_records] == [
        (offset, "t1", sam["viewer"])
    ]
    # another adult cannot report seen on it (it does not exist for them)
    add_account(data_dir, "Ann", "adult")
    await client.post("/api/logout")
    await login(client, "Ann")
    other = await client.post(f"/api/conversations/{conversation_id}/seen", json={"offset": offset})
    assert other.status == 404


async def test_after_a_sigkill_no_receipt_is_past_the_committed_log(tmp_path):
    data_dir = tmp_path / "data"
    with serve(data_dir, "--demo-tokens-per-s", "300", "--demo-reply-tokens", "5000") as server:
        async with aiohttp.ClientSession() as session:
            async with session.post(f"{server.url}/api/conversations", json={}) as response:
                conversation_id = (await response.json())["id"]
            url = f"{server.url}/api/conversations/{conversation_id}"
            async with session.post(f"{url}/messages", json={"text": "go"}) as response:
                assert response.status == 202
            streams = [await session.get(f"{url}/events") for _ in range(5)]
            for stream in streams:
                await asyncio.wait_for(stream.content.readany(), 10)
            await asyncio.sleep(6.5)  # a delivered tick (every 5 s) while they stream
            server.process.send_signal(signal.SIGKILL)
            server.process.wait(10)
            for stream in streams:
                stream.close()
    committed = (data_dir / "conversations" / f"{conversation_id}.jsonl").stat().st_size
    audit = audit_records(data_dir, conversation_id)
    receipts = [r["to"] for r in audit if r["type"] in ("delivered", "close")]
    assert receipts, json.dumps(audit)[:500]
    assert max(receipts) <= committed
