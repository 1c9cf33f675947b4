"""Process crash loop: SIGKILL the server at random moments while several replies stream,
50 times, alternating ``fsync`` and ``flush``. After every restart: every log opens and
verifies, every event any client received is in the log byte for byte at its offset,
each cut reply has exactly one ``end`` with ``finish: "interrupted"``, a torn tail (made
by hand on some cycles, as a kill in the middle of a write would leave it) is cut and
kept beside the log, and new replies work."""

from __future__ import annotations

import asyncio
import random
import time
from pathlib import Path

import aiohttp

from chatledger.storage import records
from chatledger.storage.verify import verify_dir

from .server_process import serve
from .sse_reader import StreamReader

CYCLES = 50
CONVERSATIONS = 3
TIME_LIMIT_S = 600  # the loop stops (and fails) rather than run away on a stuck machine


async def stream_events(
    session: aiohttp.ClientSession, url: str, reader: StreamReader, stop: asyncio.Event
) -> None:
    try:
        async with session.get(url) as response:
            assert response.status == 200
            while not stop.is_set():
                data = await response.content.readany()
                if not data:
                    return
                reader.feed(data)
    except (aiohttp.ClientError, ConnectionError):
        return  # the server was killed under us


def append_bytes(path: Path, data: bytes) -> None:
    with open(path, "ab") as stream:
        stream.write(data)


def log_path(data_dir: Path, conversation_id: str) -> Path:
    return data_dir / "conversations" / f"{conversation_id}.jsonl"


async def test_sigkill_crash_loop(tmp_path):
    rng = random.Random(20261126)
    data_dir = tmp_path / "data"
    conversation_ids: list[str] = []
    received: dict[str, dict[int, bytes]] = {}  # conversation -> {event id: data line}
    cut: dict[str, set[str]] = {}  # conversation -> replies seen started, not ended
    torn_made: dict[str, bytes] = {}
    started_at = time.monotonic()
    for cycle in range(CYCLES):
        assert time.monotonic() - started_at < TIME_LIMIT_S, f"only {cycle} cycles in time"
        durability = "fsync" if cycle % 2 == 0 else "flush"
        args = ("--durability", durability, "--demo-tokens-per-s", "60",
                "--demo-reply-tokens", "400", "--messages-per-minute", "0")  # fmt: skip
        with serve(data_dir, *args) as server:
            async with aiohttp.ClientSession() as session:
                base = f"{server.url}/api/conversations"
                # -- the previous kill: everything shown is in the recovered log -------
                for report in verify_dir(data_dir):
                    assert report.ok, (cycle, report.problems)
                for conversation_id in conversation_ids:
                    async with session.get(f"{base}/{conversation_id}") as response:
                        assert response.status == 200  # every log opens
                        body = await response.json()
                    assert body["writable"], (cycle, conversation_id)
                    log = log_path(data_dir, conversation_id).read_bytes()
                    for offset, data in received[conversation_id].items():
                        assert log[offset - len(data) - 1 : offset] == data + b"\n", cycle
                    ends = [
                        r
                        for r in map(records.decode, log.splitlines())
                        if r["type"] == "end" and r["id"] in cut[conversation_id]
                    ]
                    assert sorted(e["id"] for e in ends) == sorted(cut[conversation_id])
                    assert all(e["finish"] == "interrupted" for e in ends), cycle
                    cut[conversation_id] = set()
                    if conversation_id in torn_made:  # cut and kept beside the log
                        kept = log_path(data_dir, conversation_id).parent.glob(
                            f"{conversation_id}.jsonl.torn-*"
                        )
                        assert torn_made.pop(conversation_id) in [p.read_bytes() for p in kept]
                while len(conversation_ids) < CONVERSATIONS:
                    async with session.post(base, json={}) as response:
                        conversation_id = (await response.json())["id"]
                    conversation_ids.append(conversation_id)
                    received[conversation_id], cut[conversation_id] = {}, set()

                # -- new replies work; clients follow them; kill at a random moment ----
                readers = {cid: StreamReader() for cid in conversation_ids}
                stop = asyncio.Event()
                streams = []
                for cid in conversation_ids:
                    async with session.get(f"{base}/{cid}") as response:
                        offset = (await response.json())["offset"]
                    url = f"{base}/{cid}/events?from={offset}"
                    streams.append(
                        asyncio.create_task(stream_events(session, url, readers[cid], stop))
                    )
                for cid in conversation_ids:
                    async with session.post(
                        f"{base}/{cid}/messages", json={"text": f"c{cycle}"}
                    ) as r:
                        assert r.status == 202, (cycle, await r.text())
                await asyncio.sleep(rng.uniform(0.05, 0.6))
                server.process.kill()
                server.process.wait()
                await asyncio.wait(streams, timeout=10)
                stop.set()
        for cid, reader in readers.items():
            open_replies: set[str] = set()
            for event in reader.events:
                data = event.data.encode()
                received[cid][int(event.id)] = data
                record = records.decode(data)
                if record["type"] == "start":
                    open_replies.add(record["id"])
                elif record["type"] == "end":
                    open_replies.discard(record["id"])
            assert reader.events, (cycle, cid)  # the reply streamed before the kill
            cut[cid] |= open_replies
        if cycle % 5 == 4:  # a kill in the middle of a write leaves a partial line
            victim = rng.choice(conversation_ids)
            torn = b'{"type":"chunk","ts":1,"id":"x","i":0,"te'[: rng.randint(1, 40)]
            await asyncio.to_thread(append_bytes, log_path(data_dir, victim), torn)
            torn_made[victim] = torn
    assert all(received.values())
