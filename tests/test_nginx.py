"""chatledger behind Debian's nginx, configured with exactly the ``location /`` block that
README.md gives under "Behind nginx" (read from README.md at test time; only the upstream
port is substituted): events pass through one by one while a reply runs, keep-alives hold
an idle stream open past ``proxy_read_timeout``, and a resume through the proxy is exact.

nginx runs as a child of the test, unprivileged-friendly: ``daemon off``, no master
process, every path (pid, logs, temp dirs) under the test's tmp dir, listening on a free
loopback port. CI installs it (``apt-get install nginx``); without it these tests skip.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import pytest

from chatledger.storage import records

from .server_process import ServerProcess, free_port, serve
from .sse_reader import StreamReader, read_events

ROOT = Path(__file__).resolve().parent.parent
NGINX = Path("/usr/sbin/nginx")
README_UPSTREAM = "proxy_pass http://127.0.0.1:8080;"

pytestmark = pytest.mark.skipif(
    not os.access(NGINX, os.X_OK),
    reason=f"{NGINX} not found: install Debian's nginx (apt-get install nginx)",
)


def readme_location_block() -> str:
    """The ```nginx block of README.md's "Behind nginx" section, verbatim."""
    readme = (ROOT / "README.md").read_text()
    assert "\n## Behind nginx\n" in readme, "README.md lost its 'Behind nginx' section"
    section = readme.split("\n## Behind nginx\n", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```nginx\n(.*?)```", section, flags=re.S)
    assert len(blocks) == 1, "expected exactly one ```nginx block under 'Behind nginx'"
    block = blocks[0]
    assert block.lstrip().startswith("location / {"), block
    assert block.count(README_UPSTREAM) == 1, f"the block should contain {README_UPSTREAM!r}"
    return block


def location_block(
    upstream_port: int,
    *,
    read_timeout: str | None = None,
    replace: dict[str, str] | None = None,
) -> str:
    """README's block with only the upstream port substituted; if asked, only the value
    of ``proxy_read_timeout`` replaced, or (for controls) exact lines replaced."""
    block = readme_location_block().replace(
        README_UPSTREAM, f"proxy_pass http://127.0.0.1:{upstream_port};"
    )
    if read_timeout is not None:
        block, count = re.subn(
            r"proxy_read_timeout\s+[^;]+;", f"proxy_read_timeout {read_timeout};", block
        )
        assert count == 1, "the README block should set proxy_read_timeout exactly once"
    for old, new in (replace or {}).items():
        assert block.count(old) == 1, f"the README block should contain {old!r} once"
        block = block.replace(old, new)
    return block


def nginx_conf(tmp: Path, port: int, location: str) -> str:
    return f"""
daemon off;
master_process off;  # one process: nothing runs as another user, one pid to stop
pid {tmp}/nginx.pid;
error_log {tmp}/error.log info;
events {{
    worker_connections 64;
}}
http {{
    access_log {tmp}/access.log;
    client_body_temp_path {tmp}/client_body;
    proxy_temp_path {tmp}/proxy;
    fastcgi_temp_path {tmp}/fastcgi;
    uwsgi_temp_path {tmp}/uwsgi;
    scgi_temp_path {tmp}/scgi;
    server {{
        listen 127.0.0.1:{port};
{location}
    }}
}}
"""


@dataclass
class Nginx:
    process: subprocess.Popen
    url: str
    dir: Path

    def error_log(self) -> str:
        path = self.dir / "error.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def start_nginx(tmp: Path, location: str, timeout: float = 20.0) -> Nginx:
    """Start nginx in front of ``location``; returns once its port accepts connections."""
    tmp.mkdir(parents=True)
    for _attempt in range(3):  # the free port may be taken before nginx binds it
        port = free_port()
        conf = tmp / "nginx.conf"
        conf.write_text(nginx_conf(tmp, port, location))
        with open(tmp / "nginx.out", "ab") as out:
            process = subprocess.Popen(
                [str(NGINX), "-p", str(tmp), "-e", str(tmp / "error.log"), "-c", str(conf)],
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
        nginx = Nginx(process, f"http://127.0.0.1:{port}", tmp)
        deadline = time.monotonic() + timeout
        while process.poll() is None:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 1):
                return nginx
            if time.monotonic() > deadline:
                nginx.stop()
                raise TimeoutError(f"nginx did not start:\n{nginx.error_log()}")
            time.sleep(0.05)
        if "Address already in use" not in nginx.error_log():
            break
    out = (tmp / "nginx.out").read_text(errors="replace")
    raise RuntimeError(f"nginx exited with {process.returncode}:\n{out}\n{nginx.error_log()}")


@pytest.fixture
def chatledger(tmp_path: Path) -> Iterator:
    """``chatledger(*serve_args)``: a real ``chatledger serve``; all stopped at teardown."""
    with contextlib.ExitStack() as stack:
        count = 0

        def start(*args: str) -> ServerProcess:
            nonlocal count
            count += 1
            return stack.enter_context(serve(tmp_path / f"data-{count}", *args))

        yield start


@pytest.fixture
def proxy(tmp_path: Path, chatledger) -> Iterator:
    """``proxy(server, read_timeout=None, replace=None)``: nginx with README's block (see
    :func:`location_block`) in front of ``server``. Every nginx started is stopped at
    teardown (before the servers, whose fixture this one uses), even when the test fails."""
    started: list[Nginx] = []

    def start(
        server: ServerProcess,
        *,
        read_timeout: str | None = None,
        replace: dict[str, str] | None = None,
    ) -> Nginx:
        upstream_port = int(server.url.rsplit(":", 1)[1])
        location = location_block(upstream_port, read_timeout=read_timeout, replace=replace)
        nginx = start_nginx(tmp_path / f"nginx-{len(started) + 1}", location)
        started.append(nginx)
        return nginx

    try:
        yield start
    finally:
        for nginx in started:
            nginx.stop()


def client() -> aiohttp.ClientSession:
    # No aiohttp timeouts: each wait below has its own bound.
    return aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=None))


async def create_conversation(http: aiohttp.ClientSession, base: str) -> tuple[str, int]:
    """A new conversation (made directly on the server); its id and committed offset."""
    async with http.post(f"{base}/api/conversations", json={"title": "nginx"}) as response:
        assert response.status == 201, await response.text()
        body = await response.json()
    return body["id"], await committed(http, base, body["id"])


async def conversation(http: aiohttp.ClientSession, base: str, cid: str) -> dict:
    async with http.get(f"{base}/api/conversations/{cid}") as response:
        assert response.status == 200
        return await response.json()


async def committed(http: aiohttp.ClientSession, base: str, cid: str) -> int:
    return (await conversation(http, base, cid))["offset"]


async def read_log(http: aiohttp.ClientSession, base: str, cid: str) -> bytes:
    async with http.get(f"{base}/api/conversations/{cid}/log") as response:
        assert response.status == 200
        return await response.read()


async def poll(http: aiohttp.ClientSession, base: str, cid: str, done) -> dict:
    """Poll the conversation (on the server directly) until ``done(it)``; returns it."""
    for _ in range(600):
        body = await conversation(http, base, cid)
        if done(body):
            return body
        await asyncio.sleep(0.05)
    raise AssertionError(f"condition not reached: {body}")


async def wait_idle(http: aiohttp.ClientSession, base: str, cid: str) -> dict:
    return await poll(http, base, cid, lambda body: body["running"] is None)


def assert_event_stream_headers(response: aiohttp.ClientResponse) -> None:
    assert response.status == 200
    assert response.headers["Server"].startswith("nginx")  # it did go through the proxy
    assert response.headers["Content-Type"] == "text/event-stream"
    assert response.headers["Cache-Control"] == "no-cache"
    # nginx acts on X-Accel-Buffering and, by default, does not pass it on to the client.
    assert "X-Accel-Buffering" not in response.headers


def is_end_of(reply_id: str):
    return lambda e: e.event == "end" and records.decode(e.data.encode())["id"] == reply_id


async def read_reply_live(
    stream: aiohttp.ClientResponse, http: aiohttp.ClientSession, server: ServerProcess, cid: str
) -> tuple[StreamReader, str, dict, bytes]:
    """Read ``stream`` (through nginx) through the ``end`` of the first reply it shows.
    When its 3rd chunk has arrived, look at the conversation on the server directly (not
    through nginx). Returns the reader, the reply id, and the conversation and the log as
    they were then."""
    reader = StreamReader()
    reply_id: str | None = None
    seen_at_third: tuple[dict, bytes] | None = None
    while reply_id is None or not any(is_end_of(reply_id)(e) for e in reader.events):
        data = await stream.content.readany()
        assert data, "the stream closed before the reply's end"
        reader.feed(data)
        starts = [e for e in reader.events if e.event == "start"]
        if reply_id is None and starts:
            reply_id = records.decode(starts[0].data.encode())["id"]
        chunks = sum(e.event == "chunk" for e in reader.events)
        if seen_at_third is None and chunks >= 3:
            seen_at_third = (
                await conversation(http, server.url, cid),
                await read_log(http, server.url, cid),
            )
    assert seen_at_third is not None, "fewer than 3 chunks"
    return reader, reply_id, *seen_at_third


def has_end_of(log: bytes, reply_id: str) -> bool:
    return any(
        r["type"] == "end" and r["id"] == reply_id for r in map(records.decode, log.splitlines())
    )


# Variants of README's block for the buffering tests. "readme" is the block as given. The
# other two go beyond it on purpose, to show what README's claims rest on: with
# proxy_buffering on and gzip for text/event-stream (a config where nginx does hold
# events back), chatledger's X-Accel-Buffering: no still makes nginx pass each event on
# at once (README: "turns nginx's buffering off ... even where proxy_buffering is left
# on"); and when nginx is told to ignore that header, the events arrive only once the
# reply is over, which this test detects (its assertions can fail).
BUFFERING_ON = "proxy_buffering on; gzip on; gzip_types text/event-stream;"
BUFFERING_VARIANTS = {
    "readme": None,
    "buffering-on-gzip": BUFFERING_ON,
    "control-x-accel-ignored": f"{BUFFERING_ON} proxy_ignore_headers X-Accel-Buffering;",
}


@pytest.mark.parametrize("variant", list(BUFFERING_VARIANTS))
async def test_events_pass_through_nginx_one_by_one_while_the_reply_runs(
    chatledger, proxy, variant
):
    server = chatledger("--demo-tokens-per-s", "10", "--demo-reply-tokens", "40")
    buffering = BUFFERING_VARIANTS[variant]
    nginx = proxy(server, replace=buffering and {"proxy_buffering off;": buffering})
    control = variant.startswith("control")
    async with client() as http, asyncio.timeout(60), contextlib.AsyncExitStack() as streams:
        cid, offset = await create_conversation(http, server.url)
        url = f"{nginx.url}/api/conversations/{cid}"
        following = []
        if not control:  # nginx would hold this one back for good (it never ends)
            # An events stream, opened while idle, follows the reply live...
            get = await streams.enter_async_context(
                http.get(f"{url}/events", params={"from": str(offset)})
            )
            assert_event_stream_headers(get)
            following.append(get)
        # ... and so does the reply's own stream that the POST answers with.
        post = await streams.enter_async_context(
            http.post(
                f"{url}/messages", json={"text": "hi"}, headers={"Accept": "text/event-stream"}
            )
        )
        assert_event_stream_headers(post)
        following.append(post)
        results = await asyncio.gather(
            *(read_reply_live(stream, http, server, cid) for stream in following)
        )
        await wait_idle(http, server.url, cid)
        log = await read_log(http, server.url, cid)
    for reader, reply_id, seen, log_then in results:
        if control:
            # Buffered by nginx: nothing came through before the reply was over.
            assert has_end_of(log_then, reply_id)
            continue
        # When the 3rd chunk came through nginx, the reply was still running and its end
        # was not committed: chunks arrive one by one, not all at the end.
        assert seen["running"] == reply_id
        assert not has_end_of(log_then, reply_id)
        # the reply's own stream ends at its end; the events stream also gets the seal
        kinds = [e.event for e in reader.events]
        assert kinds in (
            ["user", "start", *["chunk"] * 40, "end"],
            ["user", "start", *["chunk"] * 40, "end", "seal"],
        )
        last = int(reader.events[-1].id)
        assert b"".join(e.data.encode() + b"\n" for e in reader.events) == log[offset:last]
        assert last == (len(log) if kinds[-1] == "seal" else log.rindex(b'{"type":"seal"'))


# README's proxy_read_timeout is 1h, too long to wait out in a test. The keep-alive tests
# override only its value (in their copy of the block) to this, and run chatledger with a
# --keepalive below it (the stream must stay open) or above it (nginx must close it).
READ_TIMEOUT_S = 2


async def test_keepalives_hold_an_idle_stream_open_past_proxy_read_timeout(chatledger, proxy):
    server = chatledger("--keepalive", "1", "--demo-tokens-per-s", "0", "--demo-reply-tokens", "5")
    nginx = proxy(server, read_timeout=f"{READ_TIMEOUT_S}s")
    loop = asyncio.get_running_loop()
    async with client() as http, asyncio.timeout(60):
        cid, _ = await create_conversation(http, server.url)
        url = f"{nginx.url}/api/conversations/{cid}"
        async with http.get(f"{url}/events") as stream:
            assert_event_stream_headers(stream)
            reader = StreamReader()
            idle_until = loop.time() + 3 * READ_TIMEOUT_S  # hold it idle 3x the timeout
            while (left := idle_until - loop.time()) > 0:
                try:
                    data = await asyncio.wait_for(stream.content.readany(), left)
                except TimeoutError:
                    break
                except aiohttp.ClientPayloadError:  # nginx cut the chunked body short
                    data = b""
                assert data, f"nginx closed the idle stream:\n{nginx.error_log()}"
                reader.feed(data)
            assert not stream.content.at_eof()
            assert [e.event for e in reader.events] == ["conversation"]  # idle: no record
            # Staying open 3x proxy_read_timeout needs data at least every timeout: these.
            assert len(reader.comments) >= 2
            assert set(reader.comments) == {"keep-alive"}
            assert b"\n\n: keep-alive\n\n" in bytes(reader.raw)
            # The same connection still carries events.
            async with http.post(f"{url}/messages", json={"text": "still there?"}) as response:
                assert response.status == 202, await response.text()
                reply_id = (await response.json())["reply_id"]
            await asyncio.wait_for(read_events(stream, reader, until=is_end_of(reply_id)), 20)
        log = await read_log(http, server.url, cid)
    assert [e.event for e in reader.events] == ["conversation", "user", "start"] + ["chunk"] * 5 + [
        "end",
        "seal",
    ]
    assert b"".join(e.data.encode() + b"\n" for e in reader.events) == log
    assert "upstream timed out" not in nginx.error_log()


async def test_control_without_keepalives_nginx_closes_the_idle_stream(chatledger, proxy):
    keepalive_s = 30  # larger than proxy_read_timeout: nginx sees nothing for too long
    server = chatledger("--keepalive", str(keepalive_s))
    nginx = proxy(server, read_timeout=f"{READ_TIMEOUT_S}s")
    async with client() as http, asyncio.timeout(60):
        cid, _ = await create_conversation(http, server.url)
        async with http.get(f"{nginx.url}/api/conversations/{cid}/events") as stream:
            assert_event_stream_headers(stream)
            reader = StreamReader()
            closed = False
            try:
                async with asyncio.timeout(keepalive_s - 5):  # well before a keep-alive
                    while data := await stream.content.readany():
                        reader.feed(data)
                closed = True
            except aiohttp.ClientPayloadError:  # nginx cut the chunked body short
                closed = True
            except TimeoutError:
                pass
    assert closed, "nginx kept an idle stream open past proxy_read_timeout"
    assert [e.event for e in reader.events] == ["conversation"]
    assert reader.comments == []
    assert "upstream timed out" in nginx.error_log()


async def test_resume_through_nginx_has_no_gap_and_no_duplicate(chatledger, proxy):
    server = chatledger("--demo-tokens-per-s", "20", "--demo-reply-tokens", "60")
    nginx = proxy(server)
    async with client() as http, asyncio.timeout(60):
        cid, offset = await create_conversation(http, server.url)
        url = f"{nginx.url}/api/conversations/{cid}"
        first = await http.get(f"{url}/events", params={"from": str(offset)})
        assert_event_stream_headers(first)
        async with http.post(f"{url}/messages", json={"text": "go"}) as response:
            assert response.status == 202, await response.text()
            started = await response.json()
        assert started["offset"] == offset
        part = await read_events(first, limit=8)  # user, start, 6 chunks
        first.close()  # drop the connection mid-reply
        assert [e.event for e in part.events] == ["user", "start"] + ["chunk"] * 6
        last_id = int(part.events[-1].id)
        # The reply goes on while nobody watches: wait until the log grew past last_id.
        await poll(http, server.url, cid, lambda body: body["offset"] > last_id)
        second = await http.get(f"{url}/events", headers={"Last-Event-ID": str(last_id)})
        assert_event_stream_headers(second)
        rest = await read_events(second, until=is_end_of(started["reply_id"]))
        second.close()
        # A Last-Event-ID inside a record is refused through nginx too, with the offset.
        async with http.get(f"{url}/events", headers={"Last-Event-ID": str(last_id - 1)}) as bad:
            assert bad.status == 416
            assert (await bad.json())["error"] == "offset_not_boundary"
        await wait_idle(http, server.url, cid)
        log = await read_log(http, server.url, cid)
    received = [e.data.encode() + b"\n" for e in part.events + rest.events]
    assert b"".join(received) == log[offset:]
    ids = [int(e.id) for e in part.events + rest.events]
    assert ids == sorted(set(ids))
    assert ids[-1] == len(log)
    assert int(rest.events[0].id) > last_id
    assert rest.events[-1].event == "seal"  # after the reply's end
    assert records.decode(rest.events[-2].data.encode())["finish"] == "stop"
