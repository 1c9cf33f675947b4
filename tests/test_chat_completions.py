"""The ``openai`` provider's handling of what a real server rarely does on demand: null
``delta.content``, a usage-only final chunk, an error mid-stream, an HTTP error, a stream
that stops without ``finish_reason``, and an unreachable upstream. The upstream here is a
small aiohttp app speaking the Chat Completions streaming format on loopback (the real
llama.cpp server is exercised in test_model.py)."""

from __future__ import annotations

import asyncio

import orjson
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from chatledger.server.providers.chat_completions import OpenAIProvider
from chatledger.storage import records

from .conftest import create_conversation
from .server_process import free_port
from .sse_reader import read_events


def chunk(content=None, finish=None, usage=None, choices=True) -> bytes:
    body = {
        "id": "x",
        "object": "chat.completion.chunk",
        "created": 1,
        "model": "m",
        "choices": [
            {
                "index": 0,
                "delta": {"role": "assistant", "content": content},
                "finish_reason": finish,
            }
        ]
        if choices
        else [],
    }
    if usage is not None:
        body["usage"] = usage
    return b"data: " + orjson.dumps(body) + b"\n\n"


SCENARIOS = {
    "ok": [
        chunk(None),
        chunk("Hel"),
        chunk("lo"),
        chunk(None, "stop"),
        chunk(usage={"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}, choices=False),
        b"data: [DONE]\n\n",
    ],
    "length": [chunk("a"), chunk(None, "length"), b"data: [DONE]\n\n"],
    "error_mid_stream": [chunk("par"), b'data: {"error": {"message": "model overloaded"}}\n\n'],
    "no_finish": [chunk("cut"), b"data: [DONE]\n\n"],
    # llama-cpp-python's server on a prompt too long: 200, then a stream with nothing in it
    "empty": [],
}


SCENARIO = web.AppKey("scenario", dict)

CONTEXT_EXCEEDED = {  # what OpenAI, vLLM and llama-cpp-python answer a prompt too long
    "error": {
        "message": "This model's maximum context length is 1024 tokens. However, you"
        " requested 1100 tokens (1052 in the messages, 48 in the completion).",
        "type": "invalid_request_error",
        "param": "messages",
        "code": "context_length_exceeded",
    }
}


@pytest.fixture
async def upstream():
    requests: list[dict] = []

    async def completions(request: web.Request) -> web.StreamResponse:
        body = await request.json()
        requests.append(body)
        scenario = request.app[SCENARIO]["name"]
        if scenario == "http_500":
            return web.json_response({"error": {"message": "boom upstream"}}, status=500)
        if scenario == "http_400_context" or (scenario == "empty" and not body.get("stream")):
            return web.json_response(CONTEXT_EXCEEDED, status=400)
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        for part in SCENARIOS[scenario]:
            await response.write(part)
            await asyncio.sleep(0.005)
        return response

    app = web.Application()
    app[SCENARIO] = {"name": "ok"}
    app.router.add_post("/v1/chat/completions", completions)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    yield app, f"http://127.0.0.1:{server.port}/v1", requests
    await server.close()


async def run(make_client, base_url: str, max_tokens=None):
    provider = OpenAIProvider(base_url=base_url, model="m", max_tokens=max_tokens)
    client = await make_client(provider=provider)
    conversation_id = await create_conversation(client, system="sys")
    response = await client.post(
        f"/api/conversations/{conversation_id}/messages",
        json={"text": "hi"},
        headers={"Accept": "text/event-stream"},
    )
    reader = await asyncio.wait_for(read_events(response), 30)
    recs = [records.decode(e.data.encode()) for e in reader.events]
    return recs, recs[-1]


async def test_ok_stream_with_null_content_and_usage_chunk(make_client, upstream):
    _, url, requests = upstream
    recs, end = await run(make_client, url, max_tokens=7)
    assert [r["text"] for r in recs if r["type"] == "chunk"] == ["Hel", "lo"]
    assert end["finish"] == "stop" and end["error"] is None
    assert end["usage"] == {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}
    sent = requests[0]
    assert sent["stream"] is True and sent["max_tokens"] == 7
    assert sent["messages"] == [
        {"role": "system", "content": "sys"},
        {"role": "user", "content": "hi"},
    ]


@pytest.mark.parametrize(
    "scenario,finish,error",
    [
        ("length", "length", None),
        ("error_mid_stream", "error", "model overloaded"),
        ("http_500", "error", "answered 500: boom upstream"),
        ("no_finish", "error", "ended the stream before the reply finished"),
        (
            "http_400_context",
            "error",
            "the prompt does not fit the model's context: This model's maximum context length"
            " is 1024 tokens",
        ),
        ("empty", "error", "the prompt does not fit the model's context: This model's"),
    ],
)
async def test_failure_shapes(make_client, upstream, scenario, finish, error):
    app, url, _ = upstream
    app[SCENARIO]["name"] = scenario
    _, end = await run(make_client, url)
    assert end["type"] == "end" and end["finish"] == finish
    if error is None:
        assert end["error"] is None
    else:
        assert error in end["error"]


async def test_unreachable_upstream_ends_reply_with_readable_error(make_client):
    _, end = await run(make_client, f"http://127.0.0.1:{free_port()}/v1")
    assert end["finish"] == "error"
    assert "cannot reach the model server" in end["error"]
