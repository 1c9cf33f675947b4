"""``chatledger serve`` as a real process: startup line, graceful shutdown on SIGTERM and
SIGINT, recovery after SIGKILL."""

from __future__ import annotations

import asyncio
import signal
import time

import aiohttp
import pytest

from chatledger.storage import records

from .conftest import check_seals
from .server_process import serve
from .sse_reader import StreamReader


async def start_reply(session: aiohttp.ClientSession, url: str) -> tuple[str, dict]:
    async with session.post(f"{url}/api/conversations", json={"title": "cli"}) as response:
        assert response.status == 201
        conversation_id = (await response.json())["id"]
    async with session.post(
        f"{url}/api/conversations/{conversation_id}/messages", json={"text": "hello"}
    ) as response:
        assert response.status == 202
        return conversation_id, await response.json()


def test_startup_line_names_url_data_dir_provider_and_durability(tmp_path):
    data_dir = tmp_path / "data"
    with serve(data_dir, "--durability", "flush") as server:
        line = server.startup_line
        assert server.url in line
        assert str(data_dir.resolve()) in line
        assert "llm demo" in line and "durability flush" in line


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
async def test_signal_interrupts_replies_closes_streams_and_exits_0(tmp_path, signum):
    data_dir = tmp_path / "data"
    with serve(data_dir, "--demo-tokens-per-s", "20", "--demo-reply-tokens", "1000") as server:
        async with aiohttp.ClientSession() as session:
            conversation_id, started = await start_reply(session, server.url)
            events_url = f"{server.url}/api/conversations/{conversation_id}/events"
            async with session.get(events_url) as stream:
                reader = StreamReader()
                while sum(e.event == "chunk" for e in reader.events) < 3:
                    reader.feed(await asyncio.wait_for(stream.content.readany(), 10))
                sent_at = time.monotonic()
                server.process.send_signal(signum)
                # the stream sends its last events, then ends cleanly
                while data := await asyncio.wait_for(stream.content.readany(), 10):
                    reader.feed(data)
            code = await asyncio.to_thread(server.process.wait, 15)
            assert code == 0, server.output()
            assert time.monotonic() - sent_at < 10
    assert reader.events[-1].event == "seal"  # the seal after the reply's end went out too
    last = records.decode(reader.events[-2].data.encode())
    assert last["type"] == "end" and last["finish"] == "interrupted"
    assert last["id"] == started["reply_id"]
    log = (data_dir / "conversations" / f"{conversation_id}.jsonl").read_bytes()
    assert int(reader.events[-1].id) == len(log) and check_seals(log) >= 1
    received = b"".join(e.data.encode() + b"\n" for e in reader.events)
    assert received == log


async def test_sigkill_then_restart_recovers_and_serves(tmp_path):
    data_dir = tmp_path / "data"
    with serve(data_dir, "--demo-tokens-per-s", "50", "--demo-reply-tokens", "1000") as server:
        async with aiohttp.ClientSession() as session:
            conversation_id, started = await start_reply(session, server.url)
            events_url = f"{server.url}/api/conversations/{conversation_id}/events"
            reader = StreamReader()
            async with session.get(events_url) as stream:
                while sum(e.event == "chunk" for e in reader.events) < 5:
                    reader.feed(await asyncio.wait_for(stream.content.readany(), 10))
                server.process.kill()
                server.process.wait()
    log_path = data_dir / "conversations" / f"{conversation_id}.jsonl"
    shown = b"".join(e.data.encode() + b"\n" for e in reader.events)
    assert log_path.read_bytes().startswith(shown)  # everything shown is in the log
    with serve(data_dir, "--demo-reply-tokens", "3", "--demo-tokens-per-s", "0") as server:
        async with aiohttp.ClientSession() as session:
            base = f"{server.url}/api/conversations/{conversation_id}"
            async with session.get(base) as response:
                body = await response.json()
            assert body["running"] is None
            assert body["messages"][-1]["finish"] == "interrupted"
            async with session.post(f"{base}/messages", json={"text": "again"}) as response:
                assert response.status == 202
    ends = [
        r for r in map(records.decode, log_path.read_bytes().splitlines()) if r["type"] == "end"
    ]
    assert ends[0]["finish"] == "interrupted"
    assert sum(e["id"] == started["reply_id"] for e in ends) == 1
