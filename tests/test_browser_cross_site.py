"""Another site in a real browser (issue 8, finding 3): headless Chromium with a hostile
page served from a second loopback address, against a real ``chatledger serve``. The page
cannot create a conversation, post a message, read through DNS rebinding, or frame the
chat page. Every check waits on a condition (a response, a load event), never a clock."""

from __future__ import annotations

import contextlib
import http.server
import json
import os
import socket
import threading
import urllib.request
from collections.abc import Iterator

import pytest

from .conftest import CHROMIUM, CHROMIUM_ARGS
from .server_process import serve

playwright_sync = pytest.importorskip("playwright.sync_api")
pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(not os.path.exists(CHROMIUM), reason="needs Debian's chromium"),
]

EVIL_HOST = "127.0.0.2"  # another loopback address: another origin, the same machine
REBIND = "rebind.test"


@contextlib.contextmanager
def evil_site(pages: dict[str, str]) -> Iterator[str]:
    """Serve ``pages`` (path -> HTML) from :data:`EVIL_HOST` on a free port; yield its
    origin."""

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            body = pages.get(self.path)
            if body is None:
                self.send_error(404)
                return
            data = body.encode()
            self.send_response(200)
            self.send_header("Content-Type", "text/html; charset=utf-8")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer((EVIL_HOST, 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://{EVIL_HOST}:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(10)


@contextlib.contextmanager
def rebinding_name(target_port: int) -> Iterator[int]:
    """What DNS rebinding achieves, without a DNS server: a listener on
    :data:`EVIL_HOST` (Chromium maps :data:`REBIND` there) answers the first request for
    ``/`` with the attacker's page, then forwards every other connection byte for byte to
    chatledger on 127.0.0.1:``target_port``, as if the name now resolved to 127.0.0.1.
    Both addresses are loopback, so the browser's own Private Network Access checks do
    not interfere: only the server's ``Host`` check stands in the way. Yields the port."""
    listener = socket.create_server((EVIL_HOST, 0))
    served = threading.Event()
    page = b"<!doctype html><title>cute cats</title><body></body>"

    def pipe(source: socket.socket, sink: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := source.recv(65536):
                sink.sendall(data)
        with contextlib.suppress(OSError):
            sink.shutdown(socket.SHUT_WR)

    def handle(client: socket.socket) -> None:
        with client:
            head = b""
            while b"\r\n\r\n" not in head:
                data = client.recv(65536)
                if not data:
                    return
                head += data
            if head.startswith(b"GET / ") and not served.is_set():
                served.set()
                client.sendall(
                    b"HTTP/1.1 200 OK\r\nContent-Type: text/html\r\nConnection: close\r\n"
                    b"Content-Length: %d\r\n\r\n%s" % (len(page), page)
                )
                return
            with socket.create_connection(("127.0.0.1", target_port)) as upstream:
                upstream.sendall(head)
                back = threading.Thread(target=pipe, args=(upstream, client), daemon=True)
                back.start()
                pipe(client, upstream)
                back.join(10)

    def accept() -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return  # closed
            threading.Thread(target=handle, args=(client,), daemon=True).start()

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        yield listener.getsockname()[1]
    finally:
        listener.shutdown(socket.SHUT_RDWR)
        listener.close()
        thread.join(10)


@pytest.fixture
def browser():
    with playwright_sync.sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=CHROMIUM,
            args=[*CHROMIUM_ARGS, f"--host-resolver-rules=MAP {REBIND} {EVIL_HOST}"],
        )
        yield browser
        browser.close()


def call(url: str, body: dict | None = None):
    """The API as a script calls it (no Origin, no Sec-Fetch-Site): JSON in and out."""
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.load(response) if "json" in response.headers["Content-Type"] else None


def raw_log(url: str, conversation_id: str) -> bytes:
    with urllib.request.urlopen(f"{url}/api/conversations/{conversation_id}/log", timeout=10) as r:
        return r.read()


# What the hostile page does: no-cors POSTs (no preflight; the answer is opaque to it but
# the request is sent), a CORS JSON POST (needs a preflight) and a classic text/plain
# form that smuggles JSON.
ATTACK = """async ({target, id}) => {
  const sent = [];
  const post = async (path, body) => {
    try {
      await fetch(target + path, {method: "POST", mode: "no-cors", body,
                                  headers: {"Content-Type": "text/plain"}});
      sent.push(path);
    } catch (e) { sent.push("failed " + path); }
  };
  await post("/api/conversations", '{"title": "pwned", "model": "o1-pro-most-expensive"}');
  await post(`/api/conversations/${id}/messages`, '{"text": "pwned"}');
  await post(`/api/conversations/${id}/stop`, "");
  try {
    await fetch(target + "/api/conversations", {method: "POST", body: "{}",
                headers: {"Content-Type": "application/json"}});
    sent.push("cors json");
  } catch (e) { sent.push("cors json refused"); }
  const frame = document.createElement("iframe");
  frame.name = "sink";
  document.body.append(frame);
  const form = document.createElement("form");
  form.method = "POST";
  form.enctype = "text/plain";
  form.target = "sink";
  form.action = target + "/api/conversations";
  const input = document.createElement("input");
  input.name = '{"title": "form", "x": "';
  input.value = '"}';
  form.append(input);
  document.body.append(form);
  const loaded = new Promise((resolve) => frame.addEventListener("load", resolve));
  form.submit();
  await loaded;
  return sent;
}"""


def test_a_page_on_another_origin_cannot_create_or_post(browser, tmp_path):
    with serve(tmp_path / "data", "--demo-tokens-per-s", "0") as server:
        conversation_id = call(f"{server.url}/api/conversations", {"title": "mine"})["id"]
        before = raw_log(server.url, conversation_id)
        with evil_site({"/": "<!doctype html><title>cute cats</title><body></body>"}) as evil:
            page = browser.new_page()
            answers: list[tuple[str, str, int]] = []
            page.on(
                "response",
                lambda r: (
                    answers.append((r.request.method, r.url, r.status))
                    if r.url.startswith(server.url)
                    else None
                ),
            )
            page.goto(evil + "/")
            sent = page.evaluate(ATTACK, {"target": server.url, "id": conversation_id})
            page.close()
        assert sent[:3] == [
            "/api/conversations",
            f"/api/conversations/{conversation_id}/messages",
            f"/api/conversations/{conversation_id}/stop",
        ]  # the browser sent them: only the server stood in the way
        assert sent[3] == "cors json refused"  # its preflight (OPTIONS) is never granted
        posts = [(url, status) for method, url, status in answers if method == "POST"]
        assert len(posts) == 4 and all(status == 403 for _, status in posts), answers
        assert [row["id"] for row in call(f"{server.url}/api/conversations")] == [conversation_id]
        assert raw_log(server.url, conversation_id) == before
        assert os.listdir(tmp_path / "data" / "conversations") == [f"{conversation_id}.jsonl"]


REBOUND = """async (id) => {
  const read = async (path) => {
    const r = await fetch(path);  // same origin, as far as the browser knows
    return {status: r.status, body: await r.text()};
  };
  return [await read("/api/conversations"), await read(`/api/conversations/${id}/log`),
          await read("/")];
}"""


def test_dns_rebinding_cannot_read_the_conversations(browser, tmp_path):
    with serve(tmp_path / "data") as server:
        conversation_id = call(f"{server.url}/api/conversations", {"title": "secret"})["id"]
        port = int(server.url.rsplit(":", 1)[1])
        with rebinding_name(port) as rebound_port:
            page = browser.new_page()
            page.goto(f"http://{REBIND}:{rebound_port}/")
            assert page.title() == "cute cats"  # the attacker's page, from its own server
            results = page.evaluate(REBOUND, conversation_id)
            page.close()
        for result in results:
            assert result["status"] == 421  # chatledger answered, and refused
            assert json.loads(result["body"])["error"] == "misdirected_request"
            assert "secret" not in result["body"] and conversation_id not in result["body"]


def test_the_page_cannot_be_framed(browser, tmp_path):
    with serve(tmp_path / "data") as server:
        frames = (
            "<!doctype html><body>"
            f'<iframe id="chat" src="{server.url}/"></iframe>'
            '<iframe id="control" src="/inner"></iframe></body>'
        )
        pages = {"/": frames, "/inner": "<!doctype html><p id=inner>framed fine</p>"}
        with evil_site(pages) as evil:
            page = browser.new_page()
            # Chromium says why it refused the frame on the console; wait for that
            with page.expect_console_message(lambda m: "frame-ancestors" in m.text):
                page.goto(evil + "/", wait_until="load")  # after every iframe's load event
            control = page.frame_locator("#control").locator("#inner")
            playwright_sync.expect(control).to_have_text("framed fine")  # framing works
            chat = page.locator("#chat").element_handle().content_frame()
            assert chat is not None
            # a blocked frame holds Chromium's error page, never the chat page
            assert chat.url != f"{server.url}/"
            assert chat.evaluate("document.getElementById('new-chat')") is None
            page.close()
