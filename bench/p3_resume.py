"""P3, resume: time to first event when a client resumes at the end of a ~100 MB log,
beside starting at the beginning and in the middle.

The log is written directly into the data dir with ``storage.records`` (its encoder and
record constructors) before the server starts: one conversation of replies (``user``,
``start``, 60 ``chunk``, ``end``) up to ``--mb`` MB, fsynced. The server is then started
(its recovery scan of the whole log is timed too) and, in interleaved rounds, a new
connection per request asks ``GET .../events``:

* ``end``: ``Last-Event-ID`` = committed offset minus the last record, so exactly one
  event (the last ``end``) is due;
* ``middle``: ``Last-Event-ID`` = a record boundary near the middle of the file;
* ``start``: ``?from=0``.

Time to first event = from ``connect()`` to a complete first event (``id:``..blank line)
at the client. Medians of the rounds are reported, and the ratio end / start. The file
is in the page cache (just written): this measures the server, not the disk.

Target: resuming at the end takes <= 2x the time of starting at 0.

Usage::

    python bench/p3_resume.py [--mb 100] [--rounds 30]

Writes ``bench/results/p3_resume.json`` and ``.png``.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import _common as c

NAME = "p3_resume"
ROWS = ("end", "middle", "start")


def build_log(directory: Path, megabytes: float) -> tuple[str, int, int, int]:
    """Write a log of about ``megabytes`` MB. Returns (id, size, last record length,
    a boundary near the middle)."""
    from chatledger.storage import new_id, records

    conversation_id = new_id()
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{conversation_id}.jsonl"
    target = int(megabytes * 1_000_000)
    size, middle, last = 0, 0, 0
    words = ["the", " log", " keeps", " every", " word", " in", " order", "."]
    with open(path, "wb") as out:
        buffer = [
            records.encode(
                records.conversation(
                    conversation_id=conversation_id, title="big", model="demo", system=None
                )
            )
        ]
        size = len(buffer[0])
        n = 0
        while size < target:
            message = records.user(message_id=new_id(), text=f"question {n}")
            reply_id = new_id()
            lines = [records.encode(message)]
            lines.append(
                records.encode(
                    records.start(reply_id=reply_id, reply_to=message["id"], model="demo")
                )
            )
            for i in range(60):
                lines.append(
                    records.encode(records.chunk(reply_id=reply_id, i=i, text=words[i % 8]))
                )
            lines.append(
                records.encode(
                    records.end(reply_id=reply_id, finish="stop", usage={"completion_tokens": 60})
                )
            )
            for line in lines:
                size += len(line)
                if not middle and size >= target // 2:
                    middle = size
            last = len(lines[-1])
            buffer.extend(lines)
            n += 1
            if len(buffer) > 20000:
                out.write(b"".join(buffer))
                buffer = []
        out.write(b"".join(buffer))
        out.flush()
        os.fsync(out.fileno())
    return conversation_id, size, last, middle


class FirstEvent:
    def __init__(self) -> None:
        self.at: float | None = None
        self.first: bytes = b""

    def __call__(self, events: bytes, now: float) -> bool:
        for block in events.split(b"\n\n"):
            if block.startswith(b"id: ") or b"\nid: " in block:
                self.at = time.perf_counter()
                self.first = block
                return True
        return False


async def first_event(port: int, path: str, headers: dict[str, str]) -> tuple[float, bytes]:
    handler = FirstEvent()
    started = time.perf_counter()
    client = await c.open_sse(port, "GET", path, handler, headers=headers)
    await asyncio.wait_for(asyncio.shield(client.done), 30)
    client.close()
    if client.status != 200 or handler.at is None:
        raise RuntimeError(f"{path} {headers}: status {client.status}, no event")
    return handler.at - started, handler.first


async def measure(port: int, conversation_id: str, size: int, last: int, middle: int, rounds: int):
    path = f"/api/conversations/{conversation_id}/events"
    requests = {
        "end": (path, {"Last-Event-ID": str(size - last)}),
        "middle": (path, {"Last-Event-ID": str(middle)}),
        "start": (f"{path}?from=0", {}),
    }
    times: dict[str, list[float]] = {row: [] for row in ROWS}
    firsts: dict[str, str] = {}
    deadline = time.monotonic() + 600
    for round_ in range(rounds + 1):  # round 0 warms up
        order = ROWS if round_ % 2 else tuple(reversed(ROWS))
        for row in order:
            seconds, first = await first_event(port, *requests[row])
            await asyncio.sleep(0.05)  # let the server drop the abandoned stream
            if round_:
                times[row].append(seconds)
            firsts[row] = first.decode()[:160]
        if time.monotonic() > deadline:
            break
    return times, firsts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mb", type=float, default=100.0, help="log size in MB")
    parser.add_argument("--rounds", type=int, default=30)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="chatledger-p3-"))
    data = work / "data"
    try:
        started = time.perf_counter()
        conversation_id, size, last, middle = build_log(data / "conversations", args.mb)
        build_s = time.perf_counter() - started
        started = time.perf_counter()
        port, process = c.start_chatledger(
            data, "--max-streams", "0", "--max-streams-per-client", "0", timeout=600
        )
        startup_s = time.perf_counter() - started
        try:
            times, firsts = asyncio.run(
                measure(port, conversation_id, size, last, middle, args.rounds)
            )
        finally:
            c.stop(process)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if '"type":"end"' not in firsts["end"] or '"type":"conversation"' not in firsts["start"]:
        raise RuntimeError(f"unexpected first events: {firsts}")
    median_ms = {row: statistics.median(v) * 1e3 for row, v in times.items()}
    ratio = median_ms["end"] / median_ms["start"]
    targets = {"end / start <= 2": ratio <= 2}
    print(f"P3 resume: log {size / 1e6:.1f} MB (built in {build_s:.1f} s; server start with "
          f"recovery scan {startup_s:.1f} s), {args.rounds} rounds, medians")  # fmt: skip
    print(f"{'resume at':<10}{'first event ms':>15}{'p90 ms':>9}{'min ms':>9}")
    for row in ROWS:
        ms = [t * 1e3 for t in times[row]]
        print(f"{row:<10}{median_ms[row]:>15.2f}{c.percentile(ms, 90):>9.2f}{min(ms):>9.2f}")
    print(f"end / start: {ratio:.2f}   end / middle: {median_ms['end'] / median_ms['middle']:.2f}")
    for name, ok in targets.items():
        print(f"target {name}: {'MET' if ok else 'MISSED'}")
    c.write_result(
        NAME,
        {
            "log_bytes": size,
            "build_s": build_s,
            "server_start_s": startup_s,
            "rounds": args.rounds,
            "first_event_ms": {row: [t * 1e3 for t in v] for row, v in times.items()},
            "median_first_event_ms": median_ms,
            "ratio_end_over_start": ratio,
            "targets_met": targets,
            "first_events": firsts,
        },
    )
    plt = c.pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.boxplot([[t * 1e3 for t in times[row]] for row in ROWS])
    ax.set_xticks(range(1, len(ROWS) + 1), [f"resume at {row}" for row in ROWS])
    ax.set_ylabel("time to first event (ms)")
    ax.set_title(
        f"P3 resume in a {size / 1e6:.0f} MB log: end/start = {ratio:.2f} (target <= 2)",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(c.RESULTS / f"{NAME}.png", dpi=110)


if __name__ == "__main__":
    main()
