"""Model text as Markdown in a real browser: headless Chromium (Debian's /usr/bin/chromium)
driven by Playwright against a real server whose provider streams scripted Markdown (the
demo provider cannot), in many small deltas.

The server runs in this process, on its own event loop in a thread (the sync Playwright
API wants the test's thread to itself), built by ``init_app`` with ``provider=``.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import threading
from collections.abc import Iterator

import pytest
from aiohttp import web

from chatledger.server.app import init_app
from chatledger.server.providers.base import Delta
from chatledger.server.providers.demo import DemoProvider
from chatledger.server.settings import Settings
from chatledger.storage import Durability

from .conftest import CHROMIUM

playwright_sync = pytest.importorskip("playwright.sync_api")
pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(not os.path.exists(CHROMIUM), reason="needs Debian's chromium"),
]

MARKDOWN = """Here is a list:

- one
- **two**
- three with `code`

| name | value |
|:-----|------:|
| a    | 1     |
| b    | 2     |

```python
def greet(name: str) -> str:
    return f"hello {name}"
```

See [the docs](https://example.com/docs) too.
"""

HOSTILE = """Payloads, none of which may run:

<img src=x onerror="window.pwned=1;alert(1)">

<script>window.pwned=2;alert(1)</script>

[x](javascript:window.pwned=3;alert(1))

<svg onload="window.pwned=4;alert(1)"></svg>

[y](JaVaScRiPt:window.pwned=5) and ![z](javascript:window.pwned=6)

<a href="javascript:window.pwned=7">raw</a> <b onmouseover="window.pwned=8">b</b>

```html
<img src=x onerror="window.pwned=9">
```

A fine [link](https://example.org/).
"""


def long_markdown(size: int = 30_000) -> str:
    """At least ``size`` characters of mixed Markdown: paragraphs, lists, code."""
    parts: list[str] = []
    k = 0
    while sum(map(len, parts)) < size:
        parts.append(
            f"## Section {k}\n\nSome *text* for section {k}, with `code` and **bold**.\n\n"
        )
        parts.append(f"- item {k}.1\n- item {k}.2\n\n")
        parts.append(f"```python\nx_{k} = [i * {k} for i in range(10)]\nprint(x_{k})\n```\n\n")
        k += 1
    return "".join(parts)


def pieces(text: str, count: int) -> list[str]:
    """``text`` cut into ``count`` pieces of about the same size."""
    step = max(1, -(-len(text) // count))
    return [text[i : i + step] for i in range(0, len(text), step)]


class ScriptedProvider(DemoProvider):
    """The demo provider's sizes and token counts, but a scripted reply: the text of the
    first entry of ``script`` whose key the last user message contains, streamed in
    ``chunks`` deltas, ``delay`` seconds apart."""

    def __init__(self, script: dict[str, str], chunks: int = 60, delay: float = 0.002):
        super().__init__(tokens_per_s=0, reply_tokens=64)
        self.script = script
        self.chunks = chunks
        self.delay = delay

    async def stream(self, messages, *, model="demo", max_tokens=None):
        asked = messages[-1]["content"] if messages else ""
        text = next((v for k, v in self.script.items() if k in asked), "no script")
        count = 1000 if "long" in asked else self.chunks
        for piece in pieces(text, count):
            await asyncio.sleep(self.delay)
            yield Delta(text=piece)
        usage = {"prompt_tokens": 1, "completion_tokens": count, "total_tokens": count + 1}
        yield Delta(finish_reason="stop", usage=usage)


@contextlib.contextmanager
def serve_in_thread(data_dir, provider) -> Iterator[str]:
    """A real chatledger server with ``provider`` on a free loopback port; yields its URL."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()

    async def start():
        settings = Settings(
            data_dir=data_dir,
            durability=Durability.FLUSH,
            keepalive=15.0,
            retry_ms=500,
            demo_tokens_per_s=0,
            messages_per_minute=0,
            creates_per_minute=0,
        )
        runner = web.AppRunner(init_app(settings, provider=provider))
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = runner.addresses[0][1]
        return runner, port

    runner, port = asyncio.run_coroutine_threadsafe(start(), loop).result(30)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        asyncio.run_coroutine_threadsafe(runner.cleanup(), loop).result(30)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()


@pytest.fixture
def server(tmp_path):
    provider = ScriptedProvider({"markdown": MARKDOWN, "hostile": HOSTILE, "long": long_markdown()})
    with serve_in_thread(tmp_path / "data", provider) as url:
        yield url


def open_page(browser, url: str, **context):
    page = browser.new_context(**context).new_page()
    dialogs: list[str] = []
    page.on("dialog", lambda dialog: (dialogs.append(dialog.message), dialog.dismiss()))
    page.goto(url + "/")
    return page, dialogs


def send_first(page, text: str) -> None:
    """Type and send with no conversation open: the first send makes the conversation."""
    expect = playwright_sync.expect
    expect(page.locator("#text")).to_be_enabled()
    page.fill("#text", text)
    page.keyboard.press("Enter")


def test_first_message_on_first_load_renders_markdown(browser, server):
    expect = playwright_sync.expect
    page, dialogs = open_page(browser, server)
    expect(page.locator("#send")).to_be_enabled()
    send_first(page, "some markdown, **please** <b>x</b>")
    expect(page).to_have_url(re.compile(r"#/c/[A-Za-z0-9_-]+$"))
    expect(page.locator("#connection")).to_have_attribute("data-state", "live")
    expect(page.locator("#conversations a[aria-current=page]")).to_have_count(1)

    # user text stays text
    user = page.locator(".message.user")
    expect(user.locator(".text")).to_have_text("some markdown, **please** <b>x</b>")
    assert user.locator("strong, b, .markdown").count() == 0

    reply = page.locator(".message.assistant").last
    expect(reply).to_have_attribute("data-finish", "stop", timeout=30_000)
    md = reply.locator(".markdown")
    expect(md.locator("ul > li")).to_have_count(3)
    expect(md.locator("ul > li strong")).to_have_text("two")
    expect(md.locator("table tr")).to_have_count(3)
    expect(md.locator("td.align-right").first).to_have_text("1")
    code = md.locator(".code-block pre code.language-python.hljs")
    expect(code).to_have_count(1)
    assert code.locator(".hljs-keyword").count() >= 1  # def, return
    assert code.locator(".hljs-title, .hljs-string").count() >= 1
    link = md.locator("a", has_text="the docs")
    expect(link).to_have_attribute("href", "https://example.com/docs")
    expect(link).to_have_attribute("target", "_blank")
    expect(link).to_have_attribute("rel", "noopener noreferrer")
    # the raw text is still what the log holds (hidden next to its rendering)
    assert reply.locator(".text").text_content() == MARKDOWN
    expect(reply.locator(".text")).to_be_hidden()

    # the Copy button: labelled, reachable by keyboard, copies the code
    page.context.grant_permissions(["clipboard-read", "clipboard-write"])
    copy = md.locator("button.copy")
    expect(copy).to_have_attribute("aria-label", "Copy code")
    copy.focus()
    page.keyboard.press("Enter")
    expect(copy).to_have_text("Copied")
    copied = page.evaluate("() => navigator.clipboard.readText()")
    assert copied.startswith("def greet(name: str) -> str:")
    # focus is visible
    outline = copy.evaluate("(el) => getComputedStyle(el).outlineStyle")
    assert outline != "none"

    # a reload shows the same rendering, from the page (no stream)
    page.wait_for_timeout(1600)  # "Copied" back to "Copy"
    html = md.inner_html()
    page.reload()
    reply = page.locator(".message.assistant").last
    expect(reply.locator(".markdown table")).to_have_count(1)
    assert reply.locator(".markdown").inner_html() == html
    assert dialogs == []
    page.close()


# Payload flags and the elements that may never be on the page.
CHECK_HOSTILE = """() => {
  const root = document.getElementById("messages");
  const bad = root.querySelectorAll(
    "script, svg, math, iframe, object, embed, img, style, form, input, " +
    "a[href^='javascript' i], [onerror], [onload], [onmouseover], [style]");
  const allowed = new Set(["ARTICLE", "DIV", "SPAN", "P", "A", "PRE", "CODE", "UL", "OL",
    "LI", "STRONG", "EM", "TABLE", "THEAD", "TBODY", "TR", "TH", "TD", "H1", "H2", "H3",
    "H4", "H5", "H6", "BLOCKQUOTE", "HR", "BR", "S", "DEL", "BUTTON"]);
  const outside = [...root.querySelectorAll(".markdown *")]
    .filter((el) => !allowed.has(el.tagName)).map((el) => el.tagName);
  const handlers = [...root.querySelectorAll(".markdown *")].flatMap((el) =>
    [...el.attributes].map((a) => a.name).filter((n) => n.startsWith("on")));
  const links = [...root.querySelectorAll(".markdown a")].map((a) => ({
    href: a.getAttribute("href"), rel: a.rel, target: a.target }));
  return { pwned: window.pwned ?? null, bad: bad.length, outside, handlers, links };
}"""


def test_hostile_markdown_runs_nothing(browser, server):
    expect = playwright_sync.expect
    page, dialogs = open_page(browser, server)
    send_first(page, "hostile")
    reply = page.locator(".message.assistant").last
    expect(reply).to_have_attribute("data-finish", "stop", timeout=30_000)
    expect(reply.locator(".markdown a", has_text="link")).to_have_count(1)
    reply.locator(".markdown").hover()
    page.wait_for_timeout(300)  # give any handler a chance to fire
    result = page.evaluate(CHECK_HOSTILE)
    assert result["pwned"] is None
    assert result["bad"] == 0
    assert result["outside"] == []
    assert result["handlers"] == []
    for link in result["links"]:
        assert link["href"] is None or link["href"].startswith(("https:", "http:", "mailto:"))
        if link["href"]:
            assert link["rel"] == "noopener noreferrer" and link["target"] == "_blank"
    assert any(link["href"] == "https://example.org/" for link in result["links"])
    # the payloads are shown as text
    text = reply.locator(".markdown").text_content()
    assert "<script>" in text and "onerror" in text
    assert dialogs == []
    page.close()


def test_dark_mode_follows_the_system(browser, server):
    colours = {}
    for scheme in ("light", "dark"):
        page, _ = open_page(browser, server, color_scheme=scheme)
        page.locator("#text").wait_for(state="visible")
        colours[scheme] = page.evaluate(
            """() => ({
              body: getComputedStyle(document.body).backgroundColor,
              ink: getComputedStyle(document.body).color,
              composer: getComputedStyle(document.getElementById("composer")).backgroundColor,
            })"""
        )
        page.close()
    assert colours["light"]["body"] != colours["dark"]["body"]
    assert colours["light"]["ink"] != colours["dark"]["ink"]
    assert colours["light"]["composer"] != colours["dark"]["composer"]


def test_dark_mode_code_is_highlighted_with_the_dark_theme(browser, server):
    expect = playwright_sync.expect
    page, _ = open_page(browser, server, color_scheme="dark")
    send_first(page, "markdown")
    code = page.locator(".message.assistant .markdown pre code.hljs")
    expect(code).to_have_count(1, timeout=30_000)
    expect(page.locator(".message.assistant")).to_have_attribute("data-finish", "stop")
    style = code.evaluate(
        """(el) => ({ bg: getComputedStyle(el).backgroundColor, fg: getComputedStyle(el).color })"""
    )
    # github-dark: a dark background, light text
    assert style["bg"] == "rgb(13, 17, 23)", style
    assert style["fg"] == "rgb(201, 209, 217)", style
    page.close()


# Counts draws of each reply's Markdown by animation frame: view.js announces each draw as
# `chatledger:drawn` (detail: {id}); the frame is `document.timeline.currentTime`, which
# stays the same for all of one frame's callbacks and the microtasks after them. Changes
# to a `.markdown` element are counted by frame too: none may come outside a draw's frame.
WATCH_RENDERS = """() => {
  const watch = { byFrame: new Map(), renders: 0, changed: new Set(), frame: 0 };
  window.renders = watch;
  // Frames counted by a callback of our own, first in each frame's callbacks (it is
  // asked for again during the frame before): headless Chromium may hand two frames
  // the same document.timeline.currentTime.
  const tick = () => { watch.frame += 1; requestAnimationFrame(tick); };
  requestAnimationFrame(tick);
  document.addEventListener("chatledger:drawn", (event) => {
    const key = `${watch.frame} ${event.detail.id}`;
    watch.byFrame.set(key, (watch.byFrame.get(key) ?? 0) + 1);
    watch.renders += 1;
  });
  new MutationObserver((mutations) => {
    for (const m of mutations) {
      if (m.type === "childList" && m.target.classList?.contains("markdown")) {
        watch.changed.add(watch.frame);
      }
    }
  }).observe(document.getElementById("messages"), { childList: true, subtree: true });
}"""

READ_RENDERS = """() => {
  const frames = new Set([...window.renders.byFrame.keys()].map((key) => key.split(" ")[0]));
  return {
    renders: window.renders.renders,
    frames: frames.size,
    most: Math.max(0, ...window.renders.byFrame.values()),
    outside: [...window.renders.changed].filter((frame) => !frames.has(String(frame))).length,
  };
}"""


def test_a_long_reply_renders_at_most_once_a_frame(browser, server):
    expect = playwright_sync.expect
    page, _ = open_page(browser, server)
    page.evaluate(WATCH_RENDERS)
    cdp = page.context.new_cdp_session(page)
    cdp.send("Performance.enable")

    def task_seconds() -> float:
        metrics = cdp.send("Performance.getMetrics")["metrics"]
        return next(m["value"] for m in metrics if m["name"] == "TaskDuration")

    before = task_seconds()
    send_first(page, "a long one")
    reply = page.locator(".message.assistant").last
    expect(reply).to_have_attribute("data-finish", "stop", timeout=60_000)
    page.wait_for_function(
        """() => { const r = document.querySelector('.message.assistant');
                   return r && r.querySelector('.markdown').childElementCount > 0; }"""
    )
    page.evaluate("() => new Promise((done) => requestAnimationFrame(() => done()))")
    after = task_seconds()
    counts = page.evaluate(READ_RENDERS)
    expected = long_markdown()
    raw = reply.locator(".text").text_content()
    assert raw == expected
    chunks = len(pieces(expected, 1000))
    assert counts["most"] <= 1, counts  # never two renders of a reply in one frame
    assert counts["outside"] == 0, counts  # and no change of it but by those renders
    assert counts["renders"] <= chunks
    assert reply.locator(".markdown pre code.hljs").count() == expected.count("```python")
    print(
        f"\n30 KB reply in {chunks} chunks: {counts['renders']} Markdown renders over "
        f"{counts['frames']} frames; main-thread TaskDuration {after - before:.3f} s for "
        f"the whole reply, {(after - before) * 1000 / chunks * 1000:.0f} ms per 1,000 chunks"
    )
    page.close()


TRICKY = [
    "- a\n- b\n\n- c\n\nafter\n\n1. one\n2. two\n\n3. three\n",
    "para\nmore\n===\n\nnext\n---\n\n***\n\n#\n#x\n",
    "use [the ref][r] and [r]\n\n> quote\n> more\nlazy\n\n[r]: https://example.com/r\n",
    "line\r\nline two\r\n\r\n```js\r\nlet x = 1;\r\n```\r\n\rafter a CR\n",
    "```python\nunclosed = True\n\n\nstill code\n",
    "    indented code\n\n    more\ntext\n\n| a | b |\n|---|:-:|\n| 1 | 2 |\ntrailing row\n",
    "* x\n\n  continued in item\n\n  ```\n  in item\n  ```\nlazy line\n\n",
    "<b>raw</b> & entities &amp; ok <https://a.example/> www.b.example\n",
]

# Draws every prefix of each text, cut every `step` characters, into one element the way
# a streaming reply is drawn, and compares it after each draw with the whole prefix
# rendered at once (what a reload shows).
COMPARE = """async ([texts, step]) => {
  const m = await import("/static/markdown.js");
  const bad = [];
  for (const text of texts) {
    const live = document.createElement("div");
    const view = m.createMarkdownView(live);
    for (let end = 1; end <= text.length + step - 1; end += step) {
      const prefix = text.slice(0, end);
      view.draw(prefix);
      const whole = document.createElement("div");
      whole.append(m.renderMarkdown(prefix));
      if (whole.innerHTML !== live.innerHTML) {
        bad.push({ prefix, live: live.innerHTML, whole: whole.innerHTML });
        break;
      }
    }
  }
  return bad;
}"""


def test_drawing_a_growing_text_shows_what_rendering_it_whole_does(browser, server):
    page, _ = open_page(browser, server)
    page.locator("#text").wait_for(state="visible")
    for step in (1, 3, 7):
        bad = page.evaluate(COMPARE, [[MARKDOWN, HOSTILE, *TRICKY], step])
        assert bad == [], [(b["prefix"], b["live"], b["whole"]) for b in bad]
    bad = page.evaluate(COMPARE, [[long_markdown(6000)], 41])
    assert bad == [], bad[0]
    page.close()
