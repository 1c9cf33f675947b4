"""The SSE stream: exact bytes, offsets as ids, resume with no gap and no duplicate,
start-offset validation, keep-alives, write before show."""

from __future__ import annotations

import asyncio
import errno
import socket

import pytest

from chatledger.server import sse, stream
from chatledger.storage import Durability, records

from .conftest import FaultyIO, check_seals, create_conversation, wait_idle
from .sse_reader import StreamReader, read_events, read_quiet, read_through


def expected_stream(log: bytes, start: int, retry_ms: int) -> bytes:
    """What the stream must send for a log read from ``start``, built from the file."""
    out = [b"retry: %d\n\n" % retry_ms]
    offset = start
    for line in log[start:].splitlines(keepends=True):
        offset += len(line)
        kind = records.decode(line)["type"].encode()
        out.append(b"id: %d\nevent: %s\ndata: %s\n\n" % (offset, kind, line[:-1]))
    return b"".join(out)


def test_start_offset_sources_and_validation():
    assert sse.start_offset({}, {}) == 0
    assert sse.start_offset({}, {"from": "12"}) == 12
    assert sse.start_offset({"Last-Event-ID": "7"}, {"from": "12"}) == 7
    for bad in ("abc", "", "1.5", " 3", "+3", "1_0", "0x10", "-1", "9" * 40):
        with pytest.raises(sse.StartOffsetError):
            sse.start_offset({"Last-Event-ID": bad}, {})


def test_frame_records_exact_bytes():
    block = b'{"type":"user","ts":1,"id":"u","text":"a"}\n{"ts":2,"type":"odd"}\n'
    assert sse.frame_records(100, block) == (
        b'id: 143\nevent: user\ndata: {"type":"user","ts":1,"id":"u","text":"a"}\n\n'
        b'id: 165\nevent: odd\ndata: {"ts":2,"type":"odd"}\n\n',
        len(block),
        False,
    )


def test_frame_records_stops_after_the_end_of_the_reply_asked_for():
    other_end = b'{"type":"end","ts":1,"id":"r1","finish":"stop"}\n'
    end = b'{"type":"end","ts":2,"id":"r2","finish":"stop"}\n'
    after = b'{"type":"user","ts":3,"id":"u","text":"next"}\n'
    framed = sse.frame_records(0, other_end + end + after, until_end_of="r2")
    assert framed.size == len(other_end + end)
    assert framed.ended
    assert framed.events.count(b"event: end\n") == 2
    assert b"event: user" not in framed.events
    assert sse.frame_records(0, other_end + after, until_end_of="r2").ended is False


def test_frame_records_is_one_event_per_record_whatever_its_type():
    """The chunk fast path, the type read from the bytes, and the parse for a type not
    written first or escaped all give the event a plain reading of the record gives."""
    import orjson

    lines = [
        records.encode(records.chunk(reply_id="r", i=0, text='a "chunk", with\nnewline')),
        records.encode(records.user(message_id="u", text='{"type":"chunk",')),
        b'{"ts":1,"type":"chunk","id":"r"}\n',  # a chunk, not written by us: type later
        b'{"type":"chunky","ts":1}\n',
        b'{"type":"a\\"b\\r\\nc","ts":1}\n',  # escapes: parsed, made one line
        '{"type":"é","ts":1}\n'.encode(),
        records.encode(records.end(reply_id="x", finish="stop")),
        records.encode(records.end(reply_id="r", finish="stop")),
        records.encode(records.title(title="after")),
    ]
    block = b"".join(lines)
    expected, offset = [], 7
    for line in lines:
        offset += len(line)
        kind = str(orjson.loads(line)["type"]).replace("\r", " ").replace("\n", " ")
        expected.append(b"id: %d\nevent: %s\ndata: %s\n\n" % (offset, kind.encode(), line[:-1]))
    assert sse.frame_records(7, block) == (b"".join(expected), len(block), False)
    assert sse.frame_records(7, block, until_end_of="r") == (
        b"".join(expected[:-1]),
        len(block) - len(lines[-1]),
        True,
    )
    assert sse.frame_records(7, b"") == (b"", 0, False)
    with pytest.raises(ValueError):
        sse.frame_records(7, block + b'{"type":"chunk"')  # never counted as sent


async def test_stream_headers_and_exact_bytes_after_reply(make_client):
    client = await make_client(demo_reply_tokens=5, retry_ms=750)
    conversation_id = await create_conversation(client)
    await client.post(f"/api/conversations/{conversation_id}/messages", json={"text": "hi"})
    await wait_idle(client, conversation_id)
    log = await (await client.get(f"/api/conversations/{conversation_id}/log")).read()
    for start in [0] + [i + 1 for i, b in enumerate(log) if b == ord("\n")]:
        response = await client.get(f"/api/conversations/{conversation_id}/events?from={start}")
        assert response.status == 200
        assert response.headers["Content-Type"] == "text/event-stream"
        assert response.headers["Cache-Control"] == "no-cache"
        assert response.headers["X-Accel-Buffering"] == "no"
        want = expected_stream(log, start, 750)
        got = b""
        while len(got) < len(want):
            got += await asyncio.wait_for(response.content.readany(), 5)
        assert got == want
        response.close()


async def test_resume_mid_reply_has_no_gap_and_no_duplicate(make_client):
    client = await make_client(demo_tokens_per_s=200, demo_reply_tokens=150)
    conversation_id = await create_conversation(client)
    started = await (
        await client.post(f"/api/conversations/{conversation_id}/messages", json={"text": "go"})
    ).json()
    url = f"/api/conversations/{conversation_id}/events"
    first = await client.get(url, params={"from": str(started["offset"])})
    part = await read_events(first, limit=20)
    first.close()  # drop the connection mid-reply
    await asyncio.sleep(0.2)  # the reply goes on while nobody watches
    last_id = part.events[-1].id
    second = await client.get(url, headers={"Last-Event-ID": last_id})
    rest = await read_events(
        second,
        until=lambda e: (
            e.event == "end" and records.decode(e.data.encode())["id"] == started["reply_id"]
        ),
    )
    second.close()
    await wait_idle(client, conversation_id)
    log = await (await client.get(f"/api/conversations/{conversation_id}/log")).read()
    received = [e.data.encode() + b"\n" for e in part.events + rest.events]
    assert b"".join(received) == log[started["offset"] :]
    ids = [int(e.id) for e in part.events + rest.events]
    assert ids == sorted(set(ids))
    assert ids[-1] == len(log)


async def test_post_with_accept_event_stream_streams_the_reply(make_client):
    client = await make_client(demo_reply_tokens=8)
    conversation_id = await create_conversation(client)
    response = await client.post(
        f"/api/conversations/{conversation_id}/messages",
        json={"text": "hello"},
        headers={"Accept": "text/event-stream"},
    )
    assert response.status == 200
    assert response.headers["Content-Type"] == "text/event-stream"
    reader = await read_events(response)  # the server closes after the reply's end
    kinds = [e.event for e in reader.events]
    assert kinds == ["user", "title", "start"] + ["chunk"] * 8 + ["end"]  # first message titles
    log = await (await client.get(f"/api/conversations/{conversation_id}/log")).read()
    # the stream ends at the reply's end; the log goes on with the seal after it
    seal_at = log.rindex(b'\n{"type":"seal"') + 1
    assert int(reader.events[-1].id) == seal_at and check_seals(log) == 1


def dechunk(body: bytes) -> bytes:
    """The payload of an HTTP/1.1 chunked body (RFC 9112 §7.1), checking its framing."""
    out, position = [], 0
    while True:
        line_end = body.index(b"\r\n", position)
        size = int(body[position:line_end], 16)
        start = line_end + 2
        assert body[start + size : start + size + 2] == b"\r\n"
        if size == 0:
            assert start + 2 == len(body)
            return b"".join(out)
        out.append(body[start : start + size])
        position = start + size + 2


@pytest.mark.parametrize("version", ["1.1", "1.0", "2.0"])
async def test_live_events_are_byte_exact_in_the_framing_aiohttp_chose(make_client, version):
    # Paced, so chunks commit while the stream is caught up: they are pushed to the
    # socket by the commit itself, in aiohttp's framing for the version (chunked from
    # HTTP/1.1 on, a bare "HTTP/2.0" request line included; HTTP/1.0: ends at close).
    client = await make_client(demo_reply_tokens=12, demo_tokens_per_s=100, retry_ms=700)
    conversation_id = await create_conversation(client)
    body = b'{"text": "hi"}'
    reader, writer = await asyncio.open_connection(client.host, client.port)
    writer.write(
        b"POST /api/conversations/%s/messages HTTP/%s\r\nHost: 127.0.0.1\r\nConnection: close\r\n"
        b"Accept: text/event-stream\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\n\r\n%s"
        % (conversation_id.encode(), version.encode(), len(body), body)
    )
    raw = await asyncio.wait_for(reader.read(), 30)  # the server closes after the end
    writer.close()
    head, _, payload = raw.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/%s 200" % version.encode())
    if version != "1.0":
        assert b"Transfer-Encoding: chunked" in head
        assert payload.count(b"\r\n") > 2 * 12  # many chunks: events went out as they came
        payload = dechunk(payload)
    else:
        assert b"Transfer-Encoding" not in head
    log = await (await client.get(f"/api/conversations/{conversation_id}/log")).read()
    start = log.index(b'{"type":"user"')
    assert payload == expected_stream(log[: log.rindex(b'\n{"type":"seal"') + 1], start, 700)


async def test_head_of_an_event_stream_is_headers_only_and_the_connection_goes_on(make_client):
    client = await make_client(demo_reply_tokens=3)
    conversation_id = await create_conversation(client)
    reader, writer = await asyncio.open_connection(client.host, client.port)
    writer.write(
        b"HEAD /api/conversations/%s/events HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
        b"GET /api/health HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
        % conversation_id.encode()
    )
    raw = await asyncio.wait_for(reader.read(), 10)
    writer.close()
    head, _, rest = raw.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200") and b"text/event-stream" in head
    assert rest.startswith(b"HTTP/1.1 200")  # no body before the next response
    assert b"retry:" not in raw and b"event:" not in raw


@pytest.mark.parametrize(
    "header,status,code",
    [
        ("abc", 400, "invalid_offset"),
        ("-5", 400, "invalid_offset"),
        ("3", 416, "offset_not_boundary"),
        ("999999", 416, "offset_out_of_range"),
    ],
)
async def test_bad_last_event_id(make_client, header, status, code):
    client = await make_client()
    conversation_id = await create_conversation(client)
    committed = (await (await client.get(f"/api/conversations/{conversation_id}")).json())["offset"]
    response = await client.get(
        f"/api/conversations/{conversation_id}/events", headers={"Last-Event-ID": header}
    )
    assert response.status == status
    body = await response.json()
    assert body["error"] == code
    if status == 416:
        assert body["offset"] == committed
    response = await client.get(f"/api/conversations/{conversation_id}/events?from={header}")
    assert response.status == status


async def test_keepalive_comments_when_idle(make_client):
    client = await make_client(keepalive=1.0)  # the shortest allowed
    conversation_id = await create_conversation(client)
    response = await client.get(f"/api/conversations/{conversation_id}/events")
    reader = StreamReader()
    while len(reader.comments) < 2:
        reader.feed(await asyncio.wait_for(response.content.readany(), 5))
    assert reader.comments[:2] == ["keep-alive"] * 2
    assert [e.event for e in reader.events] == ["conversation"]
    assert b"\n\n: keep-alive\n\n" in bytes(reader.raw)
    response.close()


async def test_write_before_show_append_failure_at_kth_chunk(make_client):
    io = FaultyIO()
    client = await make_client(file_io=io, demo_tokens_per_s=100, demo_reply_tokens=40)
    victim = await create_conversation(client)
    other = await create_conversation(client)
    stream = await client.get(f"/api/conversations/{victim}/events")
    reader = StreamReader()
    k = 7
    io.target = f"{victim}.jsonl"
    io.arm(
        "write",
        errno=errno.EIO,
        when=lambda data: b'"type":"chunk","ts"' in data and b'"i":%d,' % k in data,
    )
    started = await client.post(f"/api/conversations/{victim}/messages", json={"text": "hi"})
    assert started.status == 202
    body = await wait_idle(client, victim)  # the reply task ended
    await read_through(stream, reader, body["offset"])
    await read_quiet(stream, reader)  # nothing more arrives: nothing more was committed
    chunks = [records.decode(e.data.encode()) for e in reader.events if e.event == "chunk"]
    shown = [c["i"] for c in chunks]
    # chunk k never reaches a client, nor anything after it (chunks queued in the same
    # batch as chunk k fail with it, so fewer than k may have been shown)
    assert shown == list(range(len(shown))) and len(shown) <= k
    assert not any(e.event == "end" for e in reader.events)
    assert body["writable"] is False
    # appends to the failed conversation get a clear error, committed records stay readable
    response = await client.post(f"/api/conversations/{victim}/messages", json={"text": "again"})
    assert response.status == 503 and (await response.json())["error"] == "log_failed"
    log = await (await client.get(f"/api/conversations/{victim}/log")).read()
    assert log.count(b'"type":"chunk"') == len(shown)
    # other conversations keep working (the fault persists for the victim's file)
    response = await client.post(f"/api/conversations/{other}/messages", json={"text": "ok?"})
    assert response.status == 202
    other_body = await wait_idle(client, other)
    assert other_body["messages"][-1]["finish"] == "stop"


def dechunked_prefix(body: bytes) -> bytes:
    """The payload of the complete chunks at the start of a chunked body."""
    out, position = [], 0
    while (line_end := body.find(b"\r\n", position)) >= 0:
        size = int(body[position:line_end], 16)
        start = line_end + 2
        if size == 0 or len(body) < start + size + 2:
            break
        out.append(body[start : start + size])
        position = start + size + 2
    return b"".join(out)


async def test_a_client_that_stops_reading_is_pulled_and_misses_nothing(make_client, monkeypatch):
    # Live events are pushed to the socket while the client keeps up; once the transport
    # holds more than PUSH_BUFFER_LIMIT unread bytes, push refuses and the stream pulls,
    # awaiting each write: the client still gets every record, once, in order.
    refused = []
    push_init, send_now = stream.Push.__init__, stream.Push.send_now

    def small_send_buffer(self, request, response) -> None:
        # a fixed kernel send buffer (no autotuning to megabytes): the transport's own
        # buffer fills soon after the client stops reading
        sock = request.transport.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 8192)
        push_init(self, request, response)

    def counting_send_now(self, data: bytes) -> bool:
        sent = send_now(self, data)
        if not sent:
            refused.append(len(data))
        return sent

    monkeypatch.setattr(stream.Push, "__init__", small_send_buffer)
    monkeypatch.setattr(stream.Push, "send_now", counting_send_now)
    client = await make_client(
        durability=Durability.FLUSH, demo_tokens_per_s=0, demo_reply_tokens=5000, retry_ms=600
    )
    conversation_id = await create_conversation(client)
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # a slow reader's small window
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, (client.host, client.port))
    reader, writer = await asyncio.open_connection(sock=sock)
    writer.write(
        b"GET /api/conversations/%s/events HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
        % conversation_id.encode()
    )
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
    assert b"Transfer-Encoding: chunked" in head
    # the reply streams while the client reads nothing
    await client.post(f"/api/conversations/{conversation_id}/messages", json={"text": "go"})
    await wait_idle(client, conversation_id, limit_s=120)
    assert refused  # the stream fell back to pulling
    log = await (await client.get(f"/api/conversations/{conversation_id}/log")).read()
    want = expected_stream(log, 0, 600)
    body = b""
    while len(payload := dechunked_prefix(body)) < len(want):
        body += await asyncio.wait_for(reader.read(1 << 20), 10)
    assert payload == want
    writer.close()
