""" "Check my connection" (issue 12 item 5): ``GET /api/connection-check``
(``server/diagnostic.py``) and its reading and verdict in the page (``static/connection.js``).

* on loopback, against the real aiohttp server: the route's exact bytes and headers, its
  timing (the burst leaves spread, keep-alives every ``--keepalive``), bad queries
  (``400`` JSON), its stream slot (``429``), and the JavaScript's verdict "fine";
* the JavaScript's parser and decision in Node (``tests/js/connection.test.mjs``);
* through Debian's nginx (the README block, see ``tests/test_nginx.py``): "fine" with the
  README's block, "buffered" when nginx buffers and ignores ``X-Accel-Buffering``, "cut"
  with a ``proxy_read_timeout`` below the keep-alive interval, decided by the same
  ``static/connection.js`` run in Node; and the page's own button in Chromium through
  the buffering nginx, and through the README's, saying so in plain words.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
import re
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest

from chatledger.server import diagnostic, sse

from .conftest import CHROMIUM
from .server_process import ServerProcess, serve
from .sse_reader import StreamReader
from .test_fold import run_node_tests
from .test_nginx import BUFFERING_VARIANTS, NGINX, Nginx, location_block, start_nginx

ROOT = Path(__file__).resolve().parent.parent
NODE_TEST = ROOT / "tests" / "js" / "connection.test.mjs"
NODE_CHECK = ROOT / "tests" / "js" / "check_connection.mjs"
PATH = diagnostic.PATH

needs_nginx = pytest.mark.skipif(
    not os.access(NGINX, os.X_OK),
    reason=f"{NGINX} not found: install Debian's nginx (apt-get install nginx)",
)


async def read_timed(response: aiohttp.ClientResponse) -> list[tuple[float, bytes]]:
    """The whole body, each piece with when it arrived (s, monotonic)."""
    pieces = []
    async for data in response.content.iter_any():
        pieces.append((time.monotonic(), data))
    return pieces


def expected_body(keepalive_s: float, idle_s: float, keepalives: int) -> re.Pattern[bytes]:
    """The diagnostic's bytes, exactly, but for its times (13-digit ms)."""
    t = rb"(\d{13})"
    begin = (
        rb'event: begin\ndata: {"t":%s,"keepalive_s":%s,"idle_s":%s,"burst":10,"spacing_ms":50}\n\n'
        % (t, str(keepalive_s).encode(), str(idle_s).encode())
    )
    burst = b"".join(rb'event: burst\ndata: {"seq":%d,"t":%s}\n\n' % (seq, t) for seq in range(10))
    done = rb'event: done\ndata: {"seq":10,"t":%s}\n\n' % t
    return re.compile(begin + burst + re.escape(sse.KEEPALIVE) * keepalives + done)


async def test_the_route_sends_a_burst_an_idle_gap_with_keepalives_and_done(make_client):
    client = await make_client(keepalive=1.0)
    opened = time.monotonic()
    async with client.session.get(client.make_url(PATH), params={"idle": "2.5"}) as response:
        pieces = await read_timed(response)
        headers = response.headers
        assert response.status == 200
    body = b"".join(data for _, data in pieces)
    for name, value in sse.HEADERS.items():
        assert headers[name] == value
    assert headers["Transfer-Encoding"] == "chunked" and "Content-Length" not in headers
    # a burst of 10 events 50 ms apart, 2.5 s idle with keep-alives at 1 s and 2 s, done
    match = expected_body(1.0, 2.5, keepalives=2).fullmatch(body)
    assert match, body.decode()
    begin_t, *burst_t, done_t = map(int, match.groups())
    assert burst_t[0] - begin_t < 20
    assert all(45 <= b - a < 200 for a, b in itertools.pairwise(burst_t))
    assert 2450 <= done_t - burst_t[-1] < 3000
    assert b"id:" not in body and b"retry:" not in body  # no log: nothing to resume
    # On loopback the burst arrived as it was sent: spread over ~450 ms, not at once.
    reader = StreamReader()
    arrivals: dict[str, list[float]] = {}
    for when, data in pieces:
        for event in reader.feed(data):
            arrivals.setdefault(event.event, []).append(when)
    assert len(arrivals["burst"]) == 10
    assert arrivals["burst"][-1] - arrivals["burst"][0] >= 0.3
    assert reader.comments == ["keep-alive", "keep-alive"]
    assert 2.4 <= arrivals["done"][0] - opened < 4


async def test_no_idle_gap_sends_no_keepalive(make_client):
    client = await make_client(keepalive=1.0)
    async with client.session.get(client.make_url(PATH), params={"idle": "0"}) as response:
        body = await response.read()
    assert expected_body(1.0, 0.0, keepalives=0).fullmatch(body), body.decode()


async def test_head_is_the_headers_only(make_client):
    client = await make_client()
    response = await client.head(PATH)
    assert response.status == 200
    for name, value in sse.HEADERS.items():
        assert response.headers[name] == value
    assert await response.read() == b""


@pytest.mark.parametrize(
    "idle", ["-1", "abc", "301", "300.001", "1e3", "", " 2", "2 ", "nan", "inf", "2.5555", "0x10"]
)
async def test_a_bad_idle_gap_is_400_json(make_client, idle):
    client = await make_client()
    response = await client.get(PATH, params={"idle": idle})
    assert response.status == 400
    assert response.content_type == "application/json"
    assert await response.json() == {
        "error": "invalid_query",
        "message": "'idle' must be a number of seconds from 0 to 300",
    }


async def test_the_longest_idle_gap_is_accepted(make_client):
    client = await make_client()
    async with client.session.get(client.make_url(PATH), params={"idle": "300"}) as response:
        assert response.status == 200
        reader = StreamReader()
        while not reader.events:
            reader.feed(await asyncio.wait_for(response.content.readany(), 5))
    assert reader.events[0].event == "begin"
    assert json.loads(reader.events[0].data)["idle_s"] == 300.0


async def test_it_takes_a_stream_slot_and_frees_it_when_the_client_leaves(make_client):
    client = await make_client(max_streams_per_client=1)
    first = await client.session.get(client.make_url(PATH), params={"idle": "60"})
    assert first.status == 200
    await first.content.readany()
    second = await client.get(PATH, params={"idle": "1"})
    assert second.status == 429
    assert second.headers["Retry-After"] == "5"
    assert (await second.json())["error"] == "too_many_requests"
    first.close()  # the client leaves in the idle gap: its slot is free within a second
    deadline = time.monotonic() + 5
    while (third := await client.get(PATH, params={"idle": "0"})).status == 429:
        assert time.monotonic() < deadline, "the slot of a check the client left was kept"
        await asyncio.sleep(0.1)
    assert third.status == 200
    assert expected_body(15.0, 0.0, keepalives=0).fullmatch(await third.read())


async def test_shut_down_ends_a_check_in_its_idle_gap_at_once(make_client):
    client = await make_client()
    async with client.session.get(client.make_url(PATH), params={"idle": "60"}) as response:
        reader = StreamReader()
        while len(reader.events) < 11:  # begin and the burst: now in the idle gap
            reader.feed(await asyncio.wait_for(response.content.readany(), 5))
        await diagnostic.shut_down(client.server.app)
        async with asyncio.timeout(3):  # it ends within a second, not after 60 s
            async for data in response.content.iter_any():
                reader.feed(data)
    assert [e.event for e in reader.events] == ["begin"] + ["burst"] * 10  # no done


def test_the_javascript_parser_and_decision_in_node():
    passed, output = run_node_tests(NODE_TEST)
    assert len(passed) >= 17, output


async def check_in_node(base: str, idle: float) -> dict:
    """``static/connection.js``'s ``checkConnection`` run in Node against ``base``."""
    node = shutil.which("node")
    if node is None:
        pytest.fail("Node.js is needed to run static/connection.js (apt-get install nodejs)")
    process = await asyncio.create_subprocess_exec(
        node,
        str(NODE_CHECK),
        base,
        str(idle),
        cwd=ROOT,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    stdout, stderr = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode == 0, stderr.decode()
    return json.loads(stdout)


async def test_the_javascript_says_fine_on_loopback(make_client):
    client = await make_client(keepalive=1.0)
    result = await check_in_node(str(client.make_url("")).rstrip("/"), 2.5)
    assert result["verdict"] == "fine", result
    assert result["message"].startswith("Your connection is fine: 10 events arrived")


# -- through nginx ----------------------------------------------------------------------

# tests/test_nginx.py's variants of README's block, and what the check says. The control
# has gzip on as well as proxy_buffering on and X-Accel-Buffering ignored: without gzip,
# nginx 1.22 passes each small upstream write on at once even with proxy_buffering on (the
# check then rightly says "fine"); gzip is what makes a buffering nginx hold events back.
VERDICTS = {
    "readme": "fine",
    "buffering-on-gzip": "fine",  # X-Accel-Buffering: no turns nginx's buffering off
    "control-x-accel-ignored": "buffered",  # proxy_buffering on, the header ignored
}
assert set(VERDICTS) == set(BUFFERING_VARIANTS)


@contextlib.contextmanager
def behind_nginx(
    tmp: Path, *serve_args: str, variant: str = "readme", read_timeout: str | None = None
) -> Iterator[tuple[ServerProcess, Nginx]]:
    """A real ``chatledger serve`` with nginx in front, configured with README's block
    (or one of :data:`tests.test_nginx.BUFFERING_VARIANTS`); both stopped on exit."""
    buffering = BUFFERING_VARIANTS[variant]
    with serve(tmp / "data", *serve_args) as server:
        port = int(server.url.rsplit(":", 1)[1])
        location = location_block(
            port,
            read_timeout=read_timeout,
            replace=buffering and {"proxy_buffering off;": buffering},
        )
        nginx = start_nginx(tmp / "nginx", location)
        try:
            yield server, nginx
        finally:
            nginx.stop()


@needs_nginx
@pytest.mark.parametrize("variant", list(VERDICTS))
async def test_the_check_through_nginx_tells_buffered_from_fine(tmp_path, variant):
    with behind_nginx(tmp_path, "--keepalive", "1", variant=variant) as (_, nginx):
        result = await check_in_node(nginx.url, 2.5)
    assert result["verdict"] == VERDICTS[variant], result
    if VERDICTS[variant] == "buffered":
        # nginx held the events back until the stream was over
        assert result["held"] and result["bunched"], result
        assert result["lateMs"] >= 2000, result
        assert result["message"].startswith("Your proxy holds events back: 10 events")
        assert "add `proxy_buffering off`" in result["message"]
    else:
        assert result["arrivedMs"] >= 300, result
        assert result["message"].startswith("Your connection is fine")


@needs_nginx
async def test_the_check_through_nginx_tells_a_cut_and_the_keepalive(tmp_path):
    # nginx gives up on a quiet upstream after 2 s; the server's keep-alive is 5 s
    with behind_nginx(tmp_path, "--keepalive", "5", read_timeout="2s") as (_, nginx):
        result = await check_in_node(nginx.url, 6)
        error_log = nginx.error_log()
    assert result["verdict"] == "cut", result
    match = re.match(r"Cut after (\d+(?:\.\d)?) s: keep-alive is 5 s\. ", result["message"])
    assert match, result
    assert 2 <= float(match[1]) < 4  # the burst (0.45 s) and 2 s of quiet
    assert "`proxy_read_timeout`" in result["message"]
    assert "upstream timed out" in error_log


@needs_nginx
@pytest.mark.browser
@pytest.mark.skipif(not os.path.exists(CHROMIUM), reason="needs Debian's chromium")
@pytest.mark.parametrize("variant", ["control-x-accel-ignored", "readme"])
def test_the_page_button_through_nginx_says_it_in_plain_words(browser, tmp_path, variant):
    expect = pytest.importorskip("playwright.sync_api").expect
    with behind_nginx(tmp_path, "--keepalive", "1", variant=variant) as (_, nginx):
        page = browser.new_page()
        page.goto(nginx.url + "/")
        button = page.locator("#check-connection")
        expect(button).to_have_text("Check my connection")
        expect(page.locator("#sidebar")).to_be_visible()  # the page has begun
        button.evaluate("(button) => { button.dataset.idleS = '2.5'; }")
        button.click()
        status = page.locator("#connection-check-result")
        expect(status).to_have_attribute("role", "status")
        expect(status).to_have_attribute("data-verdict", "checking")
        expect(button).to_be_disabled()
        expect(status).not_to_have_attribute("data-verdict", "checking", timeout=20_000)
        text = status.text_content()
        if variant == "readme":
            expect(status).to_have_attribute("data-verdict", "fine")
            assert text.startswith("Your connection is fine: 10 events arrived as they were sent")
        else:
            expect(status).to_have_attribute("data-verdict", "buffered")
            assert re.match(
                r"Your proxy holds events back: 10 events the server sent over \d+ ms reached"
                r" you within \d+ ms, about \d(\.\d)? s late, so answers will appear in lumps",
                text,
            ), text
            assert "add `proxy_buffering off`" in text
        expect(button).to_be_enabled()
        # the status sits right after the button, in the chat's header
        assert (
            page.evaluate("() => document.getElementById('check-connection').nextElementSibling.id")
            == "connection-check-result"
        )
        page.close()
