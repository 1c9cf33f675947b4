"""The README's screenshots (issue 12), made by this test, never by hand: headless
Chromium (Debian's /usr/bin/chromium) driven by Playwright against a real server whose
model streams scripted Markdown, with three conversations in the list and one open whose
reply has a list and a code block.

* ``desktop.png``: 1280x800, light; ``phone.png``: 390x800, light; ``dark.png``: 1280x800,
  dark (``prefers-color-scheme: dark``).

Always made (into the test's tmp_path) and checked: each a PNG of its size, which
Chromium decodes, light ones light and the dark one dark. With ``CHATLEDGER_SCREENSHOTS``
naming a directory they are also written there; the README's come from

    CHATLEDGER_SCREENSHOTS=docs/screenshots python -m pytest tests/test_screenshots.py
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import struct
import time
import urllib.request
from pathlib import Path

import pytest

from .conftest import CHROMIUM
from .test_browser_markdown import ScriptedProvider, serve_in_thread

playwright_sync = pytest.importorskip("playwright.sync_api")
expect = playwright_sync.expect
pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(not os.path.exists(CHROMIUM), reason="needs Debian's chromium"),
]

SHOTS = {
    "desktop": {"viewport": {"width": 1280, "height": 800}, "color_scheme": "light"},
    "phone": {"viewport": {"width": 390, "height": 800}, "color_scheme": "light"},
    "dark": {"viewport": {"width": 1280, "height": 800}, "color_scheme": "dark"},
}

JSONL = """Read it line by line and decode each line on its own with `json.loads`:

1. open the file as UTF-8 text;
2. skip blank lines;
3. decode each line as one record.

```python
import json

def records(path):
    with open(path, encoding="utf-8") as lines:
        for line in lines:
            if line.strip():
                yield json.loads(line)
```

- Only **one record** is in memory at a time, however long the file.
- A torn last line (a crash mid-write) raises `json.JSONDecodeError`: stop there.
"""

PICNIC = """A simple plan for Saturday:

- **Food**: sandwiches, fruit, lemonade
- **Gear**: blanket, sun cream, a ball
- **Where**: the park by the river, before noon
"""

WAL = """A *write-ahead log* records each change **before** it is applied, so that after a
crash the log can be replayed to the last complete record.
"""

# (title, question, reply), oldest first: the last one is open in the screenshots
CONVERSATIONS = [
    ("Picnic on Saturday", "Plan a picnic for Saturday, please", PICNIC),
    ("What is a write-ahead log?", "What is a write-ahead log?", WAL),
    (
        "Reading JSONL in Python",
        "How do I read a JSONL file in Python, one record at a time?",
        JSONL,
    ),
]

# Chromium decodes the PNG and tells its size and mean luminance (0 black, 1 white).
DECODE = """async (b64) => {
  const image = new Image();
  image.src = `data:image/png;base64,${b64}`;
  await image.decode();
  const canvas = document.createElement("canvas");
  canvas.width = image.naturalWidth;
  canvas.height = image.naturalHeight;
  const context = canvas.getContext("2d");
  context.drawImage(image, 0, 0);
  const { data } = context.getImageData(0, 0, canvas.width, canvas.height);
  let sum = 0;
  for (let i = 0; i < data.length; i += 4) {
    sum += 0.2126 * data[i] + 0.7152 * data[i + 1] + 0.0722 * data[i + 2];
  }
  return { width: image.naturalWidth, height: image.naturalHeight,
           luminance: sum / (data.length / 4) / 255 };
}"""


def post(url: str, path: str, body: dict) -> dict:
    """``POST`` JSON as the page would (same origin, single-person mode)."""
    request = urllib.request.Request(
        url + path,
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json", "Origin": url},
        method="POST",
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.load(response)


def wait_idle(url: str, conversation_id: str, limit_s: float = 30.0) -> None:
    deadline = time.monotonic() + limit_s
    while True:
        with urllib.request.urlopen(f"{url}/api/conversations/{conversation_id}") as response:
            if json.load(response)["running"] is None:
                return
        assert time.monotonic() < deadline, "reply did not finish"
        time.sleep(0.05)


def png_size(data: bytes) -> tuple[int, int]:
    """Width and height from a PNG's IHDR chunk (the first, right after the signature)."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    assert data[12:16] == b"IHDR", "a PNG starts with its IHDR chunk"
    return struct.unpack(">II", data[16:24])


@pytest.fixture
def server(tmp_path):
    """A server (single-person mode) with :data:`CONVERSATIONS`, each reply ended;
    yields its URL and the id of the last one."""
    provider = ScriptedProvider({question: reply for _, question, reply in CONVERSATIONS})
    with serve_in_thread(tmp_path / "data", provider) as url:
        for title, question, _ in CONVERSATIONS:
            conversation_id = post(url, "/api/conversations", {"title": title})["id"]
            post(url, f"/api/conversations/{conversation_id}/messages", {"text": question})
            wait_idle(url, conversation_id)
        yield url, conversation_id


def test_screenshots_desktop_phone_dark(browser, server, tmp_path):
    url, open_id = server
    made: dict[str, Path] = {}
    for name, options in SHOTS.items():
        context = browser.new_context(**options, device_scale_factor=1)
        page = context.new_page()
        page.goto(f"{url}/#/c/{open_id}")
        expect(page.locator("#connection")).to_have_attribute("data-state", "live")
        expect(page.locator("#chat-title")).to_have_text(CONVERSATIONS[-1][0])
        reply = page.locator(".message.assistant").last
        expect(reply).to_have_attribute("data-finish", "stop")
        expect(reply.locator(".markdown ol > li")).to_have_count(3)
        expect(reply.locator(".markdown ul > li")).to_have_count(2)
        expect(
            reply.locator(".markdown .code-block pre code.hljs .hljs-keyword")
        ).not_to_have_count(0)
        if name != "phone":  # the list is not shown on a phone
            expect(page.locator("#conversations a")).to_have_count(len(CONVERSATIONS))
        page.evaluate("() => document.activeElement?.blur()")  # no focus ring in the picture
        made[name] = tmp_path / f"{name}.png"
        page.screenshot(path=made[name], animations="disabled", caret="hide")
        context.close()

    page = browser.new_page()  # about:blank: no CSP, so a data: image decodes
    seen = {}
    for name, path in made.items():
        data = path.read_bytes()
        size = SHOTS[name]["viewport"]
        assert png_size(data) == (size["width"], size["height"]), name
        seen[name] = page.evaluate(DECODE, base64.b64encode(data).decode())
        assert (seen[name]["width"], seen[name]["height"]) == png_size(data), name
    page.close()
    assert made["desktop"].read_bytes() != made["dark"].read_bytes()
    assert seen["desktop"]["luminance"] > 0.8 and seen["phone"]["luminance"] > 0.8, seen
    assert seen["dark"]["luminance"] < 0.25, seen

    if out := os.environ.get("CHATLEDGER_SCREENSHOTS"):
        target = Path(out)
        target.mkdir(parents=True, exist_ok=True)
        for path in made.values():
            shutil.copyfile(path, target / path.name)
