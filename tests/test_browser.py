"""The page in a real browser: headless Chromium (Debian's /usr/bin/chromium) driven by
Playwright against a real ``chatledger serve`` process."""

from __future__ import annotations

import json
import os
import urllib.request

import pytest

from .conftest import CHROMIUM
from .server_process import serve

playwright_sync = pytest.importorskip("playwright.sync_api")
pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(not os.path.exists(CHROMIUM), reason="needs Debian's chromium"),
]


def get_json(url: str):
    with urllib.request.urlopen(url, timeout=10) as response:
        return json.load(response)


def test_send_stream_reload_mid_reply_and_reconnect(browser, tmp_path):
    data_dir = tmp_path / "data"
    expect = playwright_sync.expect
    args = ("--demo-tokens-per-s", "15", "--demo-reply-tokens", "60", "--keepalive", "1")
    with serve(data_dir, *args) as server:
        page = browser.new_page()
        page.goto(server.url + "/")
        page.click("#new-chat")
        expect(page.locator("#connection")).to_have_attribute("data-state", "live")
        conversation_id = page.evaluate("location.hash").split("/")[-1]

        hostile = "<img src=x onerror=alert(1)> <b>bold?</b>"
        page.fill("#text", hostile)
        page.keyboard.press("Enter")
        reply = page.locator(".message.assistant").last
        expect(reply).to_have_class("message assistant generating")
        expect(page.locator("#stop")).to_be_visible()
        expect(page.locator("#send")).to_be_disabled()
        # the user's text is shown as text, never as HTML
        expect(page.locator(".message.user .text")).to_have_text(hostile)
        assert page.locator("#messages img, #messages b").count() == 0

        page.wait_for_function(  # a function, not an expression: the CSP forbids eval
            "() => document.querySelector('.message.assistant .text')"
            ".textContent.split(' ').length >= 8"
        )
        seen_before_reload = reply.locator(".text").text_content()
        page.reload()  # mid-reply: the text so far from the page, the rest from events
        reply = page.locator(".message.assistant").last
        expect(reply).to_have_attribute("data-finish", "stop", timeout=30_000)
        full = reply.locator(".text").text_content()
        assert full.startswith(seen_before_reload)
        assert len(full.split()) == 60
        expect(page.locator("#stop")).to_be_hidden()

        body = get_json(f"{server.url}/api/conversations/{conversation_id}")
        assert full == body["messages"][-1]["text"]
        port = int(server.url.rsplit(":", 1)[1])
        server.process.terminate()
        server.process.wait(15)
        expect(page.locator("#connection")).to_have_attribute(
            "data-state", "reconnecting", timeout=15_000
        )
        # still no server after LOST_AFTER_MS (live.js): the page says it is lost
        expect(page.locator("#connection")).to_have_attribute("data-state", "lost", timeout=30_000)
        expect(page.locator("#connection")).to_contain_text("still trying")
    with serve(data_dir, *args, port=port):
        expect(page.locator("#connection")).to_have_attribute("data-state", "live", timeout=20_000)
        # after reconnecting (Last-Event-ID), nothing is duplicated
        expect(page.locator(".message")).to_have_count(2)
        page.close()


def test_stop_button_cancels_the_reply(browser, tmp_path):
    with serve(
        tmp_path / "data", "--demo-tokens-per-s", "10", "--demo-reply-tokens", "500"
    ) as server:
        page = browser.new_page()
        page.goto(server.url + "/")
        page.click("#new-chat")
        page.fill("#text", "tell me a long story")
        page.click("#send")
        expect = playwright_sync.expect
        expect(page.locator("#stop")).to_be_visible()
        page.click("#stop")
        reply = page.locator(".message.assistant").last
        expect(reply).to_have_attribute("data-finish", "cancelled")
        expect(reply.locator(".meta")).to_have_text("stopped")
        expect(page.locator("#send")).to_be_enabled()
        page.close()


# Counts, from before the reply starts, what happens to the reply's text: every chunk must
# be appended to the one text node the reply's element got first (characterData), never
# put back with textContent (a childList change of the .text element: a flicker and O(n²)).
WATCH_TEXT = """() => {
  const watch = { article: null, first: null, appends: 0, resets: 0 };
  window.watch = watch;
  new MutationObserver((mutations) => {
    for (const m of mutations) {
      if (m.type === "childList") {
        for (const node of m.addedNodes) {
          if (node.matches?.(".message.assistant") && !watch.article) {
            watch.article = node;
            watch.first = node.querySelector(".text").firstChild;
          }
        }
        if (m.target.classList?.contains("text")) watch.resets += 1;
      } else if (m.type === "characterData" && m.target === watch.first) {
        watch.appends += 1;
      }
    }
  }).observe(document.getElementById("messages"),
             { childList: true, characterData: true, subtree: true });
}"""


def test_a_streamed_reply_is_appended_to_never_reset(browser, tmp_path):
    expect = playwright_sync.expect
    tokens = 400
    args = ("--demo-tokens-per-s", "200", "--demo-reply-tokens", str(tokens))
    with serve(tmp_path / "data", *args) as server:
        page = browser.new_page()
        page.goto(server.url + "/")
        page.click("#new-chat")
        expect(page.locator("#connection")).to_have_attribute("data-state", "live")
        conversation_id = page.evaluate("location.hash").split("/")[-1]
        page.evaluate(WATCH_TEXT)
        page.fill("#text", "a long one, please")
        page.keyboard.press("Enter")
        reply = page.locator(".message.assistant").last
        expect(reply).to_have_attribute("data-finish", "stop", timeout=30_000)

        with urllib.request.urlopen(
            f"{server.url}/api/conversations/{conversation_id}/log", timeout=10
        ) as response:
            log = [json.loads(line) for line in response.read().splitlines()]
        (start,) = [r for r in log if r["type"] == "start"]
        chunks = [r for r in log if r["type"] == "chunk" and r["id"] == start["id"]]
        full = "".join(c["text"] for c in chunks)
        assert len(full.split()) == tokens

        watch = page.evaluate(
            """() => {
              const text = window.watch.article.querySelector(".text");
              return { same: text.firstChild === window.watch.first,
                       nodes: text.childNodes.length, text: text.textContent,
                       appends: window.watch.appends, resets: window.watch.resets };
            }"""
        )
        assert watch["text"] == full
        assert watch["same"]  # the node the element got first still holds the text
        assert watch["nodes"] == 1
        assert watch["resets"] == 0
        # one append per chunk that carried text: the reply really streamed into the node
        assert watch["appends"] == len([c for c in chunks if c["text"]])
        page.close()


def sse_events(records: list[dict]) -> str:
    """An SSE body as the server frames it, with made-up offsets for event ids."""
    frames = [
        f"id: {(i + 1) * 100}\nevent: {r['type']}\ndata: {json.dumps(r)}\n\n"
        for i, r in enumerate(records)
    ]
    return "retry: 500\n\n" + "".join(frames)


def test_a_reply_whose_log_cannot_be_written_says_so(browser, tmp_path):
    """A reply that goes quiet makes the page ask the server; a log that can no longer be
    written (a disk fault: ``running`` null, ``writable`` false) is said so, not left
    "generating". The stream and the conversation are faked; the page's clock runs fast."""
    expect = playwright_sync.expect
    records = [
        {"type": "conversation", "ts": 1, "id": "c1", "title": "Disk", "model": "demo"},
        {"type": "user", "ts": 2, "id": "u1", "text": "hi", "parent": None},
        {"type": "start", "ts": 3, "id": "r1", "reply_to": "u1", "model": "demo"},
        {"type": "chunk", "ts": 4, "id": "r1", "i": 0, "text": "saved so far"},
    ]
    sse = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}

    def events(route):  # the records once; a resume (Last-Event-ID) gets nothing new
        resumed = "last-event-id" in route.request.headers
        route.fulfill(status=200, headers=sse, body="" if resumed else sse_events(records))

    asked = []

    def conversation(route):  # the page opens at offset 0; later questions: disk fault
        if "limit=50" in route.request.url:
            page = {"id": "c1", "title": "Disk", "messages": [], "more": False, "offset": 0}
            route.fulfill(json={**page, "running": "r1", "writable": True})
            return
        asked.append(route.request.url)
        route.fulfill(json={"id": "c1", "running": None, "writable": False, "offset": 400})

    with serve(tmp_path / "data") as server:
        page = browser.new_page()
        page.clock.install()
        page.route("**/api/conversations/c1/events?*", events)
        page.route("**/api/conversations/c1?*", conversation)
        page.goto(server.url + "/#/c/c1")
        reply = page.locator(".message.assistant")
        expect(reply).to_have_class("message assistant generating")
        expect(page.locator("#stop")).to_be_visible()
        assert asked == []
        page.clock.run_for(16_000)  # no event for longer than the watchdog waits
        expect(page.locator("#error")).to_contain_text("can no longer be saved")
        expect(reply).to_have_class("message assistant finish-error")
        expect(reply.locator(".meta")).to_have_text(
            "stopped: the server could not save more of this reply"
        )
        expect(reply.locator(".text")).to_have_text("saved so far")
        expect(page.locator("#stop")).to_be_hidden()
        expect(page.locator("#send")).to_be_disabled()
        expect(page.locator("#text")).to_be_disabled()
        assert len(asked) >= 1
        page.close()


def post_json(url: str, body: dict) -> dict:
    request = urllib.request.Request(
        url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.load(response)


ISOLATED = """(element) => ({
  tag: element.tagName, dir: element.getAttribute("dir"),
  bidi: getComputedStyle(element).unicodeBidi, text: element.textContent,
  only: element.parentElement.childNodes.length === 1,
})"""


def test_titles_with_rtl_overrides_are_shown_bidi_isolated(browser, tmp_path):
    """Finding 11: a title with U+202E RIGHT-TO-LEFT OVERRIDE could reorder what the page
    shows around it. Every title (sidebar and header) sits alone in a ``<bdi dir="auto">``
    whose computed ``unicode-bidi`` is ``isolate``, with its text exactly as sent."""
    expect = playwright_sync.expect
    spoof = "\u202eabc"
    with serve(tmp_path / "data") as server:
        base = f"{server.url}/api/conversations"
        spoofed = post_json(base, {"title": spoof})["id"]
        post_json(base, {"title": "plain"})
        page = browser.new_page()
        page.goto(f"{server.url}/#/c/{spoofed}")
        expect(page.locator("#conversations li")).to_have_count(2)
        expect(page.locator("#chat-title")).to_have_text(spoof)
        titles = page.locator("#conversations a > bdi.title, #chat-title > bdi.title")
        expect(titles).to_have_count(3)
        shown = [titles.nth(i).evaluate(ISOLATED) for i in range(3)]
        assert sorted(s["text"] for s in shown) == sorted([spoof, spoof, "plain"])
        for title in shown:
            assert title["tag"] == "BDI" and title["dir"] == "auto", title
            assert title["bidi"] == "isolate" and title["only"], title
        assert page.title() == f"\u2068{spoof}\u2069 · chatledger"
        page.close()
