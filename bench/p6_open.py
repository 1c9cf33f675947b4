"""P6, open: in headless Chromium, the time from navigation to the newest message
visible, for a conversation with a ~100 MB log beside a new one, on one server.

Two logs are written into the data dir with ``storage.records`` before the server
starts (``_common.write_conversation``): the long one, replies of ``--chunks`` chunks
(``" word"`` each, about 335 KB of log and 20 KB of text a reply: ~300 replies) up to
``--mb`` MB; the new one, one question and a 60-chunk reply. The server runs with its
defaults (``--llm demo``, fsync). Debian's Chromium (``/usr/bin/chromium``, headless,
driven by Playwright) opens ``/#/c/<id>`` in a fresh browser context each time (no cache,
no state), in interleaved rounds. A script Playwright adds to the document before the
page's own (through the DevTools protocol, so the page's CSP does not apply to it) looks
at every animation frame for the conversation's newest message (the last reply,
``article[data-id=...]``) inside the visible part of the list, with its text; the time
is ``performance.now()`` in that frame: milliseconds since the navigation started.

What the page does in that time: load the HTML, CSS and its ES modules, fetch the
conversation list and ``GET /api/conversations/{id}?limit=50`` (the newest 50 messages:
for the long conversation, about 25 replies of 20 KB), render them, scroll to the newest.
Where the time goes is reported from Navigation and Resource Timing: the page's scripts
loaded (``DOMContentLoaded``), the GET of the page of messages (when it started, how long
it took, its size), and from its answer to the newest message visible (parse and render).
The first open of the long conversation after the server starts builds its folded view
(the log read once, on a worker thread): reported apart as ``cold``; the rounds after it
measure every later open.

Target: opening the long conversation takes <= 2x the time of opening the new one.

Usage::

    python bench/p6_open.py [--mb 100] [--chunks 4000] [--rounds 15]

Needs Playwright (the ``test`` extra) and Debian's ``chromium``. Writes
``bench/results/p6_open.json`` and ``.png``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import tempfile
import time
import urllib.request
from pathlib import Path

import _common as c

NAME = "p6_open"
ROWS = ("new", "long")
CHROMIUM = "/usr/bin/chromium"
ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]

# Added to every document before its own scripts: notes the frame in which the message
# `TARGET` is first inside the visible part of #messages, with its text.
WATCH = """(() => {
  const target = %s;
  const look = () => {
    const list = document.getElementById("messages");
    const node = list && list.querySelector(`article[data-id="${target}"]`);
    if (node && node.querySelector(".text").textContent.length > 0) {
      const box = node.getBoundingClientRect();
      const shown = list.getBoundingClientRect();
      if (box.height > 0 && box.bottom > shown.top && box.top < shown.bottom) {
        window.__p6 = { visible: performance.now(),
                        messages: list.querySelectorAll("article.message").length };
        return;
      }
    }
    requestAnimationFrame(look);
  };
  requestAnimationFrame(look);
})();"""

# Where the time went: the document, its scripts, and the page's GET of the conversation
# (ms since the navigation started).
TIMING = """(id) => {
  const nav = performance.getEntriesByType("navigation")[0];
  const entry = performance.getEntriesByType("resource")
    .find((e) => e.name.includes(`/api/conversations/${id}?limit=`));
  return { document: nav.responseEnd, scripts: nav.domContentLoadedEventEnd,
           route_start: entry ? entry.startTime : null,
           route_end: entry ? entry.responseEnd : null,
           route_ms: entry ? entry.responseEnd - entry.startTime : null,
           route_bytes: entry ? entry.decodedBodySize : null };
}"""


def newest_id(path: Path) -> str:
    """The id of the last ``start`` in a log (its newest message: the last reply)."""
    with open(path, "rb") as log:
        log.seek(max(0, path.stat().st_size - (4 << 20)))
        tail = log.read().splitlines()
    for line in reversed(tail):
        if b'"type":"start"' in line:
            return json.loads(line)["id"]
    raise RuntimeError(f"no start record near the end of {path}")


def open_once(browser, url: str, conversation_id: str, target: str) -> dict:
    context = browser.new_context(viewport={"width": 1280, "height": 800})
    try:
        page = context.new_page()
        page.add_init_script(WATCH % json.dumps(target))
        started = time.perf_counter()
        page.goto(f"{url}/#/c/{conversation_id}", wait_until="commit")
        page.wait_for_function("() => window.__p6 !== undefined", timeout=120_000)
        wall = time.perf_counter() - started
        seen = page.evaluate("() => window.__p6")
        timing = page.evaluate(TIMING, conversation_id)
        return {"visible_ms": seen["visible"], "wall_ms": wall * 1e3,
                "messages": seen["messages"], **timing}  # fmt: skip
    finally:
        context.close()


def measure(url: str, ids: dict[str, str], targets: dict[str, str], rounds: int):
    """Every open's figures per row (the rounds), and the cold opens of round 0."""
    from playwright.sync_api import sync_playwright

    opens: dict[str, list[dict]] = {row: [] for row in ROWS}
    cold: dict[str, dict] = {}
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        try:
            for round_ in range(rounds + 1):  # round 0: the cold opens, apart
                order = ROWS if round_ % 2 else tuple(reversed(ROWS))
                for row in order:
                    result = open_once(browser, url, ids[row], targets[row])
                    if round_ == 0:
                        cold[row] = result
                    else:
                        opens[row].append(result)
        finally:
            browser.close()
    return opens, cold


def get_json(url: str):
    with urllib.request.urlopen(url, timeout=60) as response:
        return json.load(response)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mb", type=float, default=100.0, help="long log size in MB")
    parser.add_argument("--chunks", type=int, default=4000, help="chunks per long reply")
    parser.add_argument("--rounds", type=int, default=15)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="chatledger-p6-"))
    data = work / "data"
    conversations = data / "conversations"
    try:
        started = time.perf_counter()
        long_id, size = c.write_conversation(
            conversations, chunks_per_reply=args.chunks, megabytes=args.mb
        )
        new_id, new_size = c.write_conversation(conversations, chunks_per_reply=60, replies=1)
        build_s = time.perf_counter() - started
        long_log = (conversations / f"{long_id}.jsonl").read_bytes()
        replies = long_log.count(b'"type":"start"')
        del long_log
        ids = {"new": new_id, "long": long_id}
        targets = {row: newest_id(conversations / f"{ids[row]}.jsonl") for row in ROWS}
        started = time.perf_counter()
        port, process = c.start_chatledger(
            data, "--max-streams", "0", "--max-streams-per-client", "0", timeout=600
        )
        startup_s = time.perf_counter() - started
        url = f"http://{c.HOST}:{port}"
        try:
            opens, cold = measure(url, ids, targets, args.rounds)
            # what the page was given: the newest message is the one watched for
            for row in ROWS:
                page = get_json(f"{url}/api/conversations/{ids[row]}?limit=50")
                if page["messages"][-1]["id"] != targets[row]:
                    raise RuntimeError(f"{row}: the newest message is not {targets[row]}")
        finally:
            c.stop(process)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    times = {row: [o["visible_ms"] for o in opens[row]] for row in ROWS}
    median_ms = {row: statistics.median(v) for row, v in times.items()}

    def median_of(row: str, part) -> float:
        values = [part(o) for o in opens[row] if o["route_end"] is not None]
        return statistics.median(values) if values else float("nan")

    # the parts: document and scripts loaded, the conversation's GET, then to visible
    parts = {
        row: {
            "scripts_ms": median_of(row, lambda o: o["scripts"]),
            "route_start_ms": median_of(row, lambda o: o["route_start"]),
            "route_ms": median_of(row, lambda o: o["route_ms"]),
            "after_route_ms": median_of(row, lambda o: o["visible_ms"] - o["route_end"]),
            "route_kb": (opens[row][-1]["route_bytes"] or 0) / 1e3,
        }
        for row in ROWS
    }
    ratio = median_ms["long"] / median_ms["new"]
    targets_met = {"long / new <= 2": ratio <= 2}
    print(f"P6 open: long log {size / 1e6:.1f} MB ({replies} replies of {args.chunks} chunks), "
          f"new log {new_size} B; built in {build_s:.1f} s; server start with recovery "
          f"scan {startup_s:.1f} s; {args.rounds} rounds; medians, ms from navigation")  # fmt: skip
    print(f"{'open':<6}{'visible':>9}{'p90':>8}{'min':>8}{'cold':>8}  |{'scripts':>9}"
          f"{'GET at':>8}{'GET':>7}{'GET KB':>8}{'GET..visible':>14}")  # fmt: skip
    for row in ROWS:
        ms, part = times[row], parts[row]
        print(f"{row:<6}{median_ms[row]:>9.1f}{c.percentile(ms, 90):>8.1f}{min(ms):>8.1f}"
              f"{cold[row]['visible_ms']:>8.1f}  |{part['scripts_ms']:>9.1f}"
              f"{part['route_start_ms']:>8.1f}{part['route_ms']:>7.1f}{part['route_kb']:>8.1f}"
              f"{part['after_route_ms']:>14.1f}")  # fmt: skip
    print(f"long / new: {ratio:.2f}")
    for name, ok in targets_met.items():
        print(f"target {name}: {'MET' if ok else 'MISSED'}")
    c.write_result(
        NAME,
        {
            "log_bytes": {"long": size, "new": new_size},
            "long_replies": replies,
            "chunks_per_reply": args.chunks,
            "build_s": build_s,
            "server_start_s": startup_s,
            "rounds": args.rounds,
            "visible_ms": times,
            "median_visible_ms": median_ms,
            "median_parts": parts,
            "opens": opens,
            "cold": cold,
            "ratio_long_over_new": ratio,
            "targets_met": targets_met,
        },
    )
    plt = c.pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.boxplot([times[row] for row in ROWS])
    ax.set_xticks(range(1, len(ROWS) + 1), [f"{row} conversation" for row in ROWS])
    ax.set_ylabel("navigation to newest message visible (ms)")
    ax.set_title(
        f"P6 open, {size / 1e6:.0f} MB log vs new: long/new = {ratio:.2f} (target <= 2)",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(c.RESULTS / f"{NAME}.png", dpi=110)


if __name__ == "__main__":
    main()
