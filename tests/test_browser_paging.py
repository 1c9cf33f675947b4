"""The page opens at the tail (issue 9, part 3), in headless Chromium (Debian's
/usr/bin/chromium) driven by Playwright against a real ``chatledger serve`` process.

A conversation of 2,000 messages is written as a log file before the server starts. The
page shows the newest ones from ``GET /api/conversations/{id}?limit=50`` and follows the
event stream from the offset that page reflects; scrolling up loads older pages, each put
above the others without moving what is on screen, until the DOM holds every message
exactly once and in order. A reply streamed meanwhile arrives whole, and a reload in the
middle of a reply shows all of it: the text so far from the page, the rest from events.
Every wait is on a condition, never on a clock."""

from __future__ import annotations

import json
import os
import re
import urllib.request
from pathlib import Path

import pytest

from chatledger.storage import records
from chatledger.storage.fold import messages

from .conftest import CHROMIUM
from .server_process import serve

playwright_sync = pytest.importorskip("playwright.sync_api")
pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(not os.path.exists(CHROMIUM), reason="needs Debian's chromium"),
]


EXCHANGES = 1000  # 1,000 user messages and 1,000 finished replies: 2,000 messages
NUMBERED = re.compile(r"^m(\d{4}) ")


def text_of(k: int) -> str:
    """Message number ``k`` (1-based): numbered, and long enough to wrap now and then."""
    return f"m{k:04d} " + " ".join(["word"] * (5 + k % 17))


def long_text_of(k: int) -> str:
    """Message number ``k``, about 3,000 characters: a few of them fill a screen."""
    return f"m{k:04d} " + "many words " * 270


def write_conversation(directory: Path, conversation_id: str, exchanges: int, text=text_of) -> None:
    """A log of ``exchanges`` user messages, each answered by a finished reply; message
    ``k`` (1-based, in log order) has the text ``text(k)``."""
    directory.mkdir(parents=True, mode=0o700)
    lines = [
        records.conversation(
            conversation_id=conversation_id, title="long", model="demo", system=None
        )
    ]
    for n in range(exchanges):
        user_id, reply_id = f"u{n}", f"r{n}"
        lines.append(records.user(message_id=user_id, text=text(2 * n + 1)))
        lines.append(records.start(reply_id=reply_id, reply_to=user_id, model="demo"))
        lines.append(records.chunk(reply_id=reply_id, i=0, text=text(2 * n + 2)))
        lines.append(records.end(reply_id=reply_id, finish="stop"))
    path = directory / f"{conversation_id}.jsonl"
    path.write_bytes(b"".join(records.encode(r) for r in lines))


def post_json(url: str, body: dict) -> dict:
    request = urllib.request.Request(
        url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.load(response)


def log_fold(base: str) -> list[dict]:
    """The fold of the conversation's log as the server has it now."""
    with urllib.request.urlopen(f"{base}/log", timeout=10) as response:
        return messages([json.loads(line) for line in response.read().splitlines()])


# All shown messages: id, text, and finish, in DOM order.
SHOWN = """() => [...document.querySelectorAll("#messages article.message")].map((node) => ({
  id: node.dataset.id, text: node.querySelector(".text").textContent,
  finish: node.dataset.finish ?? null,
}))"""

# Scroll the list to its very top; return the oldest message shown and where it is.
TO_TOP = """() => {
  const list = document.getElementById("messages");
  const first = list.querySelector("article.message");
  list.scrollTop = 0;
  return { id: first.dataset.id, top: first.getBoundingClientRect().top,
           count: list.querySelectorAll("article.message").length };
}"""

# Where a message is on screen now.
TOP_OF = """(id) => document.querySelector(`#messages article[data-id="${id}"]`)
  .getBoundingClientRect().top"""

# An older page came (more messages than `count`), or there is none left to come.
GREW_OR_DONE = """(count) =>
  document.querySelectorAll("#messages article.message").length > count ||
  document.querySelector("#messages .older").hidden"""


def scroll_up_to_the_first(page, total: int) -> int:
    """Scroll the list to its top until no older message is left to come, checking after
    each load that what was on screen did not move. Returns the number of loads."""
    loads = 0
    while not page.evaluate("() => document.querySelector('#messages .older').hidden"):
        before = page.evaluate(TO_TOP)
        page.wait_for_function(GREW_OR_DONE, arg=before["count"], timeout=20_000)
        # the message that was the oldest shown is where it was
        assert abs(page.evaluate(TOP_OF, before["id"]) - before["top"]) <= 1, loads
        loads += 1
        assert loads <= total, "scrolling up never ended"
    return loads


def test_a_2000_message_conversation_opens_at_the_tail_and_scrolls_up_whole(browser, tmp_path):
    expect = playwright_sync.expect
    data_dir = tmp_path / "data"
    conversation_id = "long2000"
    write_conversation(data_dir / "conversations", conversation_id, EXCHANGES)
    total = 2 * EXCHANGES
    args = ("--demo-tokens-per-s", "20", "--demo-reply-tokens", "60", "--keepalive", "1")
    with serve(data_dir, *args) as server:
        base = f"{server.url}/api/conversations/{conversation_id}"
        requests: list[str] = []
        page = browser.new_page()
        page.on("request", lambda request: requests.append(request.url))
        page.goto(f"{server.url}/#/c/{conversation_id}")

        # the newest messages show, at the bottom of the list, from one page
        newest = page.locator(f'#messages article[data-id="r{EXCHANGES - 1}"]')
        expect(newest).to_be_in_viewport()
        expect(newest.locator(".text")).to_have_text(text_of(total))
        expect(page.locator("#connection")).to_have_attribute("data-state", "live")
        shown = page.evaluate(SHOWN)
        assert 0 < len(shown) <= 100  # a page, not the log
        tail = range(total - len(shown) + 1, total + 1)
        assert [m["text"] for m in shown] == [text_of(k) for k in tail]
        opened = [u for u in requests if "/events" in u]
        assert len(opened) == 1 and not opened[0].endswith("from=0"), opened
        assert any(u.endswith(f"/{conversation_id}?limit=50") for u in requests), requests

        # a reply streams while the person scrolls up
        sent = post_json(f"{base}/messages", {"text": "m2001 and one more, slowly"})
        expect(page.locator(f'#messages article[data-id="{sent["reply_id"]}"]')).to_have_count(1)

        assert scroll_up_to_the_first(page, total) >= 10

        reply = page.locator(f'#messages article[data-id="{sent["reply_id"]}"]')
        expect(reply).to_have_attribute("data-finish", "stop", timeout=60_000)
        shown = page.evaluate(SHOWN)
        new = (sent["message_id"], sent["reply_id"])
        assert [m["id"] for m in shown[-2:]] == list(new)
        numbers = [NUMBERED.match(m["text"]) for m in shown if m["id"] not in new]
        assert all(numbers), [m["text"][:20] for m in shown if not NUMBERED.match(m["text"])]
        # every one, in order: no gap, no duplicate
        assert [int(n.group(1)) for n in numbers] == list(range(1, total + 1))
        assert len({m["id"] for m in shown}) == len(shown) == total + 2
        # the DOM is the fold of the log, the streamed reply whole
        fold = log_fold(base)
        assert [(m["id"], m["text"]) for m in shown] == [(m["id"], m["text"]) for m in fold]
        assert shown[-1]["text"] == fold[-1]["text"] and len(fold[-1]["text"].split()) == 60
        assert all("/events" not in u or not u.endswith("from=0") for u in requests)
        page.close()


def test_a_reload_mid_reply_shows_the_whole_reply(browser, tmp_path):
    """Reloaded while a reply streams, the page gets the reply's text so far in its page
    and the rest from the event stream opened at that page's offset (not from 0). The
    reply is slow (500 tokens at 5 per second) and is stopped once the rest flowed."""
    expect = playwright_sync.expect
    data_dir = tmp_path / "data"
    conversation_id = "long200"
    write_conversation(data_dir / "conversations", conversation_id, 100)
    args = ("--demo-tokens-per-s", "5", "--demo-reply-tokens", "500", "--keepalive", "1")
    with serve(data_dir, *args) as server:
        base = f"{server.url}/api/conversations/{conversation_id}"
        requests: list[str] = []
        page = browser.new_page()
        page.on("request", lambda request: requests.append(request.url))
        page.goto(f"{server.url}/#/c/{conversation_id}")
        expect(page.locator("#connection")).to_have_attribute("data-state", "live")
        sent = post_json(f"{base}/messages", {"text": "tell me something long"})
        words = """([id, n]) => {
          const node = document.querySelector(`article[data-id="${id}"] .text`);
          return node !== null && node.textContent.split(" ").length >= n;
        }"""
        page.wait_for_function(words, arg=[sent["reply_id"], 4])
        seen = page.locator(f'article[data-id="{sent["reply_id"]}"] .text').text_content()

        reloaded_at = len(requests)
        with page.expect_response(lambda r: f"/{conversation_id}?limit=50" in r.url) as answer:
            page.reload()
        opened = answer.value.json()
        (in_page,) = [m for m in opened["messages"] if m["id"] == sent["reply_id"]]
        assert in_page["finish"] is None and in_page["text"].startswith(seen)
        assert opened["running"] == sent["reply_id"] and opened["offset"] > 0
        # the rest comes from events: more words than the page had
        page.wait_for_function(words, arg=[sent["reply_id"], len(in_page["text"].split()) + 3])
        events = [u for u in requests[reloaded_at:] if "/events" in u]
        assert events and events[0].endswith(f"from={opened['offset']}"), events
        post_json(f"{base}/stop", {})
        reply = page.locator(f'#messages article[data-id="{sent["reply_id"]}"]')
        expect(reply).to_have_attribute("data-finish", "cancelled", timeout=30_000)
        full = reply.locator(".text").text_content()
        assert full.startswith(in_page["text"]) and len(full) > len(in_page["text"])
        assert full == log_fold(base)[-1]["text"]  # the whole reply, as the log has it
        page.close()


def test_long_messages_render_a_screen_at_a_time(browser, tmp_path):
    """Of a page of long messages only the newest few are rendered at first; scrolling up
    renders the rest of the page before the next one is fetched, and ends with the log."""
    expect = playwright_sync.expect
    data_dir = tmp_path / "data"
    conversation_id = "long120"
    write_conversation(data_dir / "conversations", conversation_id, 60, text=long_text_of)
    with serve(data_dir) as server:
        base = f"{server.url}/api/conversations/{conversation_id}"
        requests: list[str] = []
        page = browser.new_page()
        page.on("request", lambda request: requests.append(request.url))
        page.goto(f"{server.url}/#/c/{conversation_id}")
        newest = page.locator('#messages article[data-id="r59"]')
        expect(newest).to_be_in_viewport()
        shown = page.evaluate(SHOWN)
        assert 1 <= len(shown) < 50  # a page came, a screen and more of it is rendered
        assert [m["text"] for m in shown] == [long_text_of(k) for k in range(121 - len(shown), 121)]
        loads = scroll_up_to_the_first(page, 120)
        fetched = [u for u in requests if "before=" in u]
        assert len(fetched) == 2 and loads > len(fetched) + 2, (loads, fetched)  # 50 + 50 + 20
        shown = page.evaluate(SHOWN)
        assert [m["text"] for m in shown] == [long_text_of(k) for k in range(1, 121)]
        assert [(m["id"], m["text"]) for m in shown] == [
            (m["id"], m["text"]) for m in log_fold(base)
        ]
        page.close()
