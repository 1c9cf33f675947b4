"""Replay and seen receipts on the page (issue 11, items 1 and 3), in headless Chromium
(Debian's /usr/bin/chromium) driven by Playwright against a real ``chatledger serve``.

* Replay: the frame shown at offset X is the fold of the log's records [0, X), drawn by
  the live page's own fold.js and view.js: it equals what the live page showed once it
  had received [0, X) (recorded as it streamed) and what storage/fold.py folds from the
  same records. Played at x16 it reaches the end, and its last frame is the live view.
* Seen: the page reports what it rendered while visible (``seen`` in the audit log, at
  record boundaries of the committed log, naming its renderer), and nothing while hidden.
* "What <viewer> had been sent at <time>": from the audit's receipts, the frame at the
  highest ``to`` that viewer had been sent by then.

Every wait is on a condition, except where a test must let time pass (said there)."""

from __future__ import annotations

import itertools
import json
import os
import time
import urllib.request
from datetime import UTC, datetime
from pathlib import Path

import pytest

from chatledger.storage.fold import messages

from .conftest import CHROMIUM, add_account
from .server_process import serve

playwright_sync = pytest.importorskip("playwright.sync_api")
expect = playwright_sync.expect
pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(not os.path.exists(CHROMIUM), reason="needs Debian's chromium"),
]

RENDERER = "chatledger-page/1"
TOKENS = 60
DEMO = ("--demo-tokens-per-s", "50", "--demo-reply-tokens", str(TOKENS))
PASSWORD = "password-1"  # add_account's default

# What the live page shows after each record it renders, by offset: every message's
# class, text and status line. Installed before the records come.
RECORD_LIVE = """() => {
  window.liveFrames = {};
  document.addEventListener("chatledger:rendered", (event) => {
    window.liveFrames[event.detail.offset] = [...document.querySelectorAll(
      "#messages article.message")].map((node) => [node.className,
        node.querySelector(".text").textContent, node.querySelector(".meta").textContent]);
  });
}"""

# The same of what a list of messages shows now.
SHOWN = """(list) => [...document.querySelectorAll(`#${list} article.message`)].map((node) =>
  [node.className, node.querySelector(".text").textContent,
   node.querySelector(".meta").textContent])"""

SEEK = "(offset) => window.chatledgerReplay.seek(offset)"


def raw_log(url: str, conversation_id: str, context=None) -> tuple[bytes, list[dict], list[int]]:
    """The conversation's log: its bytes, its records and the offset after each
    (``context``: a browser context whose session reads it, when accounts are on)."""
    path = f"{url}/api/conversations/{conversation_id}/log"
    if context is None:
        with urllib.request.urlopen(path, timeout=10) as response:
            data = response.read()
    else:
        response = context.request.get(path)
        assert response.ok, response.status
        data = response.body()
    return split(data)


def split(data: bytes) -> tuple[bytes, list[dict], list[int]]:
    records, ends, position = [], [], 0
    for line in data.splitlines(keepends=True):
        position += len(line)
        records.append(json.loads(line))
        ends.append(position)
    return data, records, ends


def folded_texts(records: list[dict]) -> list[str]:
    """The texts of the messages storage/fold.py folds from ``records``, in order."""
    return [m["text"] for m in messages(records)]


def audit_records(data_dir: Path, conversation_id: str) -> list[dict]:
    """The conversation's audit log: its whole lines (one being written is left out)."""
    path = data_dir / "audit" / f"{conversation_id}.jsonl"
    if not path.exists():
        return []
    data = path.read_bytes()
    return [json.loads(line) for line in data.splitlines(keepends=True) if line.endswith(b"\n")]


def seens(data_dir: Path, conversation_id: str) -> list[dict]:
    return [r for r in audit_records(data_dir, conversation_id) if r["type"] == "seen"]


def wait_for(condition, limit_s: float = 20.0, what: str = "a condition"):
    """Poll ``condition`` until it returns something true; returns that."""
    deadline = time.monotonic() + limit_s
    while not (result := condition()):
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)
    return result


def send_and_wait(page, text: str, replies: int) -> None:
    """Send ``text`` and wait until reply number ``replies`` (1-based) has ended."""
    page.fill("#text", text)
    page.keyboard.press("Enter")
    reply = page.locator("#messages .message.assistant").nth(replies - 1)
    expect(reply).to_have_attribute("data-finish", "stop", timeout=30_000)
    expect(page.locator("#send")).to_be_enabled()


def open_replay(page) -> None:
    page.click("#replay-open")
    expect(page.locator("#replay")).to_be_visible()
    expect(page.locator("#messages")).to_be_hidden()
    expect(page.locator("#composer")).to_be_hidden()
    expect(page.locator("#replay")).not_to_have_attribute("data-state", "loading")


def test_replay_frames_are_the_live_frames_and_seen_is_receipted(browser, tmp_path):
    data_dir = tmp_path / "data"
    with serve(data_dir, *DEMO) as server:
        page = browser.new_page()
        page.goto(server.url + "/")
        page.click("#new-chat")
        expect(page.locator("#connection")).to_have_attribute("data-state", "live")
        expect(page.locator("#replay-open")).to_be_visible()
        conversation_id = page.evaluate("location.hash").split("/")[-1]
        page.evaluate(RECORD_LIVE)
        send_and_wait(page, "first question", 1)
        send_and_wait(page, "and a second one", 2)
        live = page.evaluate(SHOWN, "messages")

        # (c) seen: the page reported each reply's end once it rendered it
        audit_before = seens(data_dir, conversation_id)
        data, records, ends = raw_log(server.url, conversation_id)
        end_offsets = [e for r, e in zip(records, ends, strict=True) if r["type"] == "end"]
        assert len(end_offsets) == 2
        reported = wait_for(
            lambda: [s for s in seens(data_dir, conversation_id) if s["upto"] >= end_offsets[1]],
            what="a seen of the second reply",
        )
        assert reported[0]["renderer"] == RENDERER and reported[0]["viewer"] == "local"
        everything = seens(data_dir, conversation_id)
        assert any(end_offsets[0] <= s["upto"] < end_offsets[1] for s in everything)
        boundaries = {0, *ends}
        for receipt in audit_before:  # read before the log: none past what was committed
            assert receipt["upto"] in boundaries and receipt["upto"] <= len(data), receipt
        for receipt in everything:
            assert receipt["upto"] in boundaries and receipt["renderer"] == RENDERER, receipt
        uptos = [s["upto"] for s in everything]
        assert uptos == sorted(set(uptos))  # never an offset already reported

        # (a) replay: the frame at X is the live page's frame at X and the fold of [0, X)
        open_replay(page)
        starts = [k for k, r in enumerate(records) if r["type"] == "start"]
        second = [k for k, r in enumerate(records) if r.get("id") == records[starts[1]]["id"]]
        chunks = [k for k in second if records[k]["type"] == "chunk"]
        assert len(chunks) >= 10
        user_two = starts[1] - 1
        picks = {
            0,
            user_two,  # the boundary before the second question
            user_two + 1,  # the second question, no reply yet
            starts[1] + 1,  # the reply began, empty
            *(chunks[k] + 1 for k in (0, 1, len(chunks) // 3, len(chunks) // 2, -2, -1)),
            second[-1] + 1,  # its end
            len(records),  # the whole log (a seal after the end)
            ends.index(end_offsets[0]) + 1,  # the first reply's end
        }
        live_frames = page.evaluate("() => window.liveFrames")
        compared_live = 0
        for k in sorted(picks, reverse=True) + sorted(picks):  # back and forth
            offset = 0 if k == 0 else ends[k - 1]
            assert page.evaluate(SEEK, offset) == offset
            expect(page.locator("#replay")).to_have_attribute("data-offset", str(offset))
            shown = page.evaluate(SHOWN, "replay-messages")
            assert [text for _, text, _ in shown] == folded_texts(records[:k]), offset
            if str(offset) in live_frames:
                assert shown == live_frames[str(offset)], offset
                compared_live += 1
        assert compared_live >= 2 * 10  # every pick the live page rendered as an event

        # a reply mid-stream is shown as the live page showed it: still generating
        offset = ends[chunks[len(chunks) // 2]]
        page.evaluate(SEEK, offset)
        expect(page.locator("#replay-messages .message.assistant").last).to_have_class(
            "message assistant generating"
        )

        # the timeline is the page's own control, from the keyboard, labelled with the time
        timeline = page.locator("#replay-timeline")
        timeline.focus()
        page.keyboard.press("Home")
        expect(page.locator("#replay")).to_have_attribute("data-offset", "0")
        expect(page.locator("#replay-messages .message")).to_have_count(0)
        page.keyboard.press("End")
        expect(page.locator("#replay")).to_have_attribute("data-offset", str(len(data)))
        page.keyboard.press("ArrowLeft")
        expect(page.locator("#replay")).to_have_attribute("data-offset", str(ends[-2]))
        label = page.locator("#replay-time")
        expect(label).to_contain_text(f"record {len(records) - 1} of {len(records)}")
        stamp = datetime.fromtimestamp(records[-2]["ts"] / 1000).strftime("%H:%M:%S")
        expect(label).to_contain_text(stamp)
        assert timeline.get_attribute("aria-valuetext") == label.text_content()

        # (b) played at x16 from the start it reaches the end: the live view
        assert page.evaluate(SEEK, 0) == 0
        page.select_option("#replay-speed", "16")
        began = time.monotonic()
        page.click("#replay-play")
        expect(page.locator("#replay")).to_have_attribute("data-state", "ended", timeout=30_000)
        took = time.monotonic() - began
        expect(page.locator("#replay")).to_have_attribute("data-offset", str(len(data)))
        assert page.evaluate(SHOWN, "replay-messages") == live
        assert page.evaluate(SHOWN, "messages") == live
        recorded = sum(min(max(b["ts"] - a["ts"], 0), 2000) for a, b in itertools.pairwise(records))
        assert recorded >= 2 * TOKENS / 50 * 1000 * 0.8  # two replies at 50 tokens a second
        # at x16 of the recorded pace: never faster, and far from x1
        assert recorded / 16 / 1000 * 0.9 <= took < recorded / 1000 / 2, (took, recorded)
        expect(page.locator("#replay-play")).to_have_text("Play")

        # exit: the live page as it was, and it still works
        page.click("#replay-exit")
        expect(page.locator("#replay")).to_be_hidden()
        expect(page.locator("#messages")).to_be_visible()
        expect(page.locator("#composer")).to_be_visible()
        expect(page.locator("#replay-open")).to_be_focused()
        assert page.evaluate(SHOWN, "messages") == live
        send_and_wait(page, "a third", 3)
        page.close()


# Make the tab look hidden (or visible again) to the page, as switching tabs does.
SET_VISIBILITY = """(state) => {
  Object.defineProperty(document, "visibilityState", { configurable: true, get: () => state });
  document.dispatchEvent(new Event("visibilitychange"));
}"""


def test_no_seen_is_sent_while_the_tab_is_hidden(browser, tmp_path):
    data_dir = tmp_path / "data"
    with serve(data_dir, *DEMO) as server:
        page = browser.new_page()
        page.goto(server.url + "/")
        page.click("#new-chat")
        expect(page.locator("#connection")).to_have_attribute("data-state", "live")
        conversation_id = page.evaluate("location.hash").split("/")[-1]
        opened = wait_for(lambda: seens(data_dir, conversation_id), what="the page's seen")
        assert [s["upto"] for s in opened] == [opened[0]["upto"]] and opened[0]["upto"] > 0

        page.evaluate(SET_VISIBILITY, "hidden")
        send_and_wait(page, "while nobody looks", 1)
        # time must pass here: longer than the 2 s between reports, and nothing came
        time.sleep(2.5)
        assert seens(data_dir, conversation_id) == opened

        page.evaluate(SET_VISIBILITY, "visible")  # looked at again: reported at once
        _, records, ends = raw_log(server.url, conversation_id)
        (end,) = [e for r, e in zip(records, ends, strict=True) if r["type"] == "end"]
        (after,) = wait_for(
            lambda: seens(data_dir, conversation_id)[1:], limit_s=1.5, what="a seen on visible"
        )
        assert after["upto"] == end and after["renderer"] == RENDERER
        page.close()


def sign_in(page, name: str) -> None:
    expect(page.locator("#login")).to_be_visible()
    page.fill("#login-name", name)
    page.fill("#login-password", PASSWORD)
    page.click("#login-submit")
    expect(page.locator("#login")).to_be_hidden()


def next_second() -> None:
    """Let the wall clock pass the next whole second (times on the page have seconds)."""
    time.sleep(1.05 - time.time() % 1)


def local_input(seconds: int) -> str:
    """A datetime-local value for the page, whose time zone is UTC."""
    return datetime.fromtimestamp(seconds, UTC).strftime("%Y-%m-%dT%H:%M:%S")


def test_what_a_guardian_had_been_sent_at_a_time(browser, tmp_path):
    """Mom reads Sam's conversation after its first reply, leaves, and reads it again after
    the second. On Sam's replay, "what Mom had been sent at T" shows, for T between the
    two reads, the frame at the first read's last receipt; after the second, all of it;
    before the first, nothing."""
    data_dir = tmp_path / "data"
    mom_id = add_account(data_dir, "Mom", "parent")
    add_account(data_dir, "Sam", "child")
    with serve(data_dir, *DEMO) as server:
        sam_context = browser.new_context(timezone_id="UTC")
        sam = sam_context.new_page()
        sam.goto(server.url + "/")
        sign_in(sam, "Sam")
        sam.click("#new-chat")
        expect(sam.locator("#connection")).to_have_attribute("data-state", "live")
        conversation_id = sam.evaluate("location.hash").split("/")[-1]
        send_and_wait(sam, "hello", 1)
        next_second()
        before_mom = int(time.time())

        def mom_reads() -> int:
            context = browser.new_context()
            mom = context.new_page()
            mom.goto(f"{server.url}/#/c/{conversation_id}")
            sign_in(mom, "Mom")
            expect(mom.locator("#connection")).to_have_attribute("data-state", "live")
            count = mom.locator("#messages .message").count()
            context.close()  # her event stream closes: a close receipt
            return count

        def closed() -> bool:
            audit = audit_records(data_dir, conversation_id)
            opened = {r["conn"] for r in audit if r["type"] == "open" and r["viewer"] == mom_id}
            return opened <= {r["conn"] for r in audit if r["type"] == "close"}

        assert mom_reads() == 2
        wait_for(closed, what="Mom's reads to close")
        next_second()
        between = int(time.time())
        next_second()
        send_and_wait(sam, "tell me more", 2)
        assert mom_reads() == 4
        wait_for(closed, what="Mom's reads to close")
        _, records, ends = raw_log(server.url, conversation_id, sam_context)

        # the receipts, as the audit route gives them
        with sam.expect_response(f"**/api/conversations/{conversation_id}/audit") as answer:
            open_replay(sam)
        reads = [r for r in answer.value.json()["reads"] if r["viewer"] == mom_id]
        first = [r for r in reads if r["opened"] < between * 1000]
        later = [r for r in reads if r["opened"] >= between * 1000]
        assert first and later
        assert all(d["at"] < between * 1000 for r in first for d in r["delivered"])
        sent = max(d["to"] for r in first for d in r["delivered"])
        end_offsets = [e for r, e in zip(records, ends, strict=True) if r["type"] == "end"]
        assert end_offsets[0] <= sent < end_offsets[1]  # the first reply, whole
        expect(sam.locator("#replay-sent")).to_be_visible()
        expect(sam.locator("#replay-viewer option")).to_have_text(["Sam", "Mom"])

        def sent_at(seconds: int, offset: int) -> None:
            sam.select_option("#replay-viewer", mom_id)
            sam.fill("#replay-at", local_input(seconds))
            sam.click("#replay-sent-show")
            expect(sam.locator("#replay")).to_have_attribute("data-offset", str(offset))
            state = "ended" if offset == ends[-1] else "paused"  # the jump stops playback
            expect(sam.locator("#replay")).to_have_attribute("data-state", state)
            k = 0 if offset == 0 else ends.index(offset) + 1
            shown = sam.evaluate(SHOWN, "replay-messages")
            assert [text for _, text, _ in shown] == folded_texts(records[:k])

        sent_at(between, sent)
        expect(sam.locator("#replay-note")).to_contain_text("What Mom had been sent by")
        assert len(sam.evaluate(SHOWN, "replay-messages")) == 2
        sent_at(int(time.time()) + 1, max(d["to"] for r in later for d in r["delivered"]))
        assert len(sam.evaluate(SHOWN, "replay-messages")) == 4
        sent_at(before_mom - 1, 0)
        expect(sam.locator("#replay-note")).to_contain_text("Nothing had been sent to Mom")

        # the same from the keyboard
        sam.fill("#replay-at", local_input(between))
        sam.focus("#replay-sent-show")
        sam.keyboard.press("Enter")
        expect(sam.locator("#replay")).to_have_attribute("data-offset", str(sent))
        sam_context.close()
