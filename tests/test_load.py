"""Load on a real server process: 1,000 concurrent event streams all receive a reply
exactly, and a client that stops reading never makes server memory grow with the log (a
lagging stream reads from the file, not from a per-client queue)."""

from __future__ import annotations

import asyncio
import re
import resource
from pathlib import Path

import aiohttp

from chatledger.storage import records

from .server_process import serve
from .sse_reader import StreamReader

STREAMS = 1000


def raise_open_file_limit() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


async def test_a_thousand_concurrent_streams(tmp_path):
    raise_open_file_limit()
    args = ("--demo-tokens-per-s", "50", "--demo-reply-tokens", "30", "--messages-per-minute", "0",
            "--max-streams-per-client", "0")  # fmt: skip
    with serve(tmp_path / "data", *args) as server:
        connector = aiohttp.TCPConnector(limit=0)
        timeout = aiohttp.ClientTimeout(total=120)
        async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
            base = f"{server.url}/api/conversations"
            async with session.post(base, json={"title": "crowd"}) as response:
                conversation_id = (await response.json())["id"]
            connected = 0
            all_connected = asyncio.Event()

            async def watch() -> StreamReader:
                nonlocal connected
                reader = StreamReader()
                async with session.get(f"{base}/{conversation_id}/events") as response:
                    assert response.status == 200
                    connected += 1
                    if connected == STREAMS:
                        all_connected.set()
                    async for data in response.content.iter_any():
                        for event in reader.feed(data):
                            if event.event == "end":
                                return reader
                return reader

            watchers = [asyncio.create_task(watch()) for _ in range(STREAMS)]
            await asyncio.wait_for(all_connected.wait(), 60)
            async with session.post(
                f"{base}/{conversation_id}/messages", json={"text": "everyone listening?"}
            ) as response:
                assert response.status == 202
            readers = await asyncio.wait_for(asyncio.gather(*watchers), 90)
            async with session.get(f"{base}/{conversation_id}/log") as response:
                log = await response.read()
    expected = [line for line in log.splitlines()]
    for reader in readers:
        assert [e.data.encode() for e in reader.events] == expected
    assert sum(records.decode(line)["type"] == "chunk" for line in expected) == 30


async def test_a_client_that_stops_reading_costs_no_memory_per_record(tmp_path):
    args = ("--durability", "flush", "--demo-tokens-per-s", "0",
            "--demo-reply-tokens", "250000", "--messages-per-minute", "0")  # fmt: skip
    with serve(tmp_path / "data", *args) as server:
        host, port = "127.0.0.1", int(server.url.rsplit(":", 1)[1])
        async with aiohttp.ClientSession() as session:
            base = f"{server.url}/api/conversations"
            async with session.post(base, json={"title": "slow reader"}) as response:
                conversation_id = (await response.json())["id"]
            # a raw client that sends its request and then reads nothing
            reader, writer = await asyncio.open_connection(host, port)
            writer.write(
                f"GET /api/conversations/{conversation_id}/events HTTP/1.1\r\n"
                f"Host: {host}\r\n\r\n".encode()
            )
            await writer.drain()
            await asyncio.sleep(0.3)
            rss_before = rss_bytes(server.process.pid)
            async with session.post(
                f"{base}/{conversation_id}/messages", json={"text": "a long one"}
            ) as response:
                assert response.status == 202
            while True:  # the reply goes on while the client lags (the listing is cheap)
                async with session.get(base) as response:
                    (row,) = await response.json()
                if row["running"] is None:
                    break
                await asyncio.sleep(0.2)
            log_size = row["size"]
            rss_after = rss_bytes(server.process.pid)
            assert log_size > 20 * 1024 * 1024
            growth = rss_after - rss_before
            assert growth < log_size / 4, (growth, log_size)

            # the lagging client now reads: it gets every record, in order, exactly
            async with session.get(f"{base}/{conversation_id}/log") as response:
                log = await response.read()
            raw = bytearray()
            while not re.search(rb"event: end\r?\n(\r\n[0-9a-f]+\r\n)?data: [^\n]*\n", raw[-8192:]):
                data = await asyncio.wait_for(reader.read(1 << 20), 30)
                assert data
                raw += data
            writer.close()
    head, _, body = bytes(raw).partition(b"\r\n\r\n")
    assert b"transfer-encoding: chunked" in head.lower()
    events = StreamReader()
    events.feed(dechunk(body))
    assert [e.data.encode() for e in events.events] == log.splitlines()
    *_, end, seal = map(records.decode, log.splitlines())
    assert end["finish"] == "stop" and seal["type"] == "seal"


def dechunk(body: bytes) -> bytes:
    """The payload of an HTTP/1.1 chunked body (RFC 9112 §7.1), up to what has arrived."""
    out = bytearray()
    position = 0
    while True:
        line_end = body.find(b"\r\n", position)
        if line_end < 0:
            return bytes(out)
        size = int(body[position:line_end].split(b";")[0], 16)
        start = line_end + 2
        if size == 0 or start + size > len(body):
            out += body[start : start + size]
            return bytes(out)
        out += body[start : start + size]
        position = start + size + 2
