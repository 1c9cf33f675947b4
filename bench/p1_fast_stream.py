"""P1, one fast stream: events/s delivered over SSE from a provider that yields as fast as
it can, with every event logged before it is sent, beside a bare SSE server and the naive
way to log.

Rows (each server is its own process on loopback; the client is this process):

* ``bare``: an aiohttp SSE server with no log; one ``write()`` per event, ``sleep(0)``
  between events (the pace of a provider that yields as fast as it can).
* ``naive-flush`` / ``naive-fsync``: FastAPI on uvicorn; a ``StreamingResponse`` generator
  that, before each ``yield`` of an event, awaits an aiofiles append: open the log file,
  write the record, flush, close (``naive-fsync``: also ``os.fdatasync`` in the executor
  before closing).
* ``chatledger-flush`` / ``chatledger-fsync``: ``python -m chatledger serve --durability
  ... --demo-tokens-per-s 0``; one reply streamed by ``POST .../messages`` with ``Accept:
  text/event-stream`` (the conversation is created before the clock starts).

A run is timed at the client from sending the request to receiving the ``end`` event; the
rate is chunk events / seconds. Rounds interleave the rows (round 0 warms up and is not
counted); medians are reported. The naive rows stream fewer events (``--naive-events``)
because they are ~100x slower; rates are per second, so rows compare directly. The disk's
own ``fdatasync`` median is measured in the same run.

Targets: chatledger-fsync >= 30x naive-fsync; chatledger-flush >= 0.5x bare.

Usage::

    python bench/p1_fast_stream.py [--events 20000] [--naive-events 2000] [--rounds 5]

Writes ``bench/results/p1_fast_stream.json`` and ``.png``.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import _common as c
import orjson

NAME = "p1_fast_stream"
ROWS = ("bare", "naive-flush", "naive-fsync", "chatledger-flush", "chatledger-fsync")
TOKEN = " word"


async def provider(count: int):
    """A provider yielding ``count`` tokens as fast as it can (like ``demo`` at rate 0)."""
    for _ in range(count):
        await asyncio.sleep(0)
        yield TOKEN


def event(offset: int, kind: str, line: bytes) -> bytes:
    return b"id: %d\nevent: %s\ndata: %s\n\n" % (offset, kind.encode(), line)


def record(kind: str, i: int, text: str) -> bytes:
    body = {"type": kind, "ts": time.time_ns() // 1_000_000, "id": "r"}
    body.update({"i": i, "text": text} if kind == "chunk" else {"finish": "stop"})
    return orjson.dumps(body)


# -- baseline servers (run as subprocesses of this script) -----------------------------------


def serve_bare(port: int) -> None:
    from aiohttp import web

    async def stream(request: web.Request) -> web.StreamResponse:
        count = int(request.query["n"])
        response = web.StreamResponse(
            headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
        )
        await response.prepare(request)
        await response.write(b"retry: 2000\n\n")
        offset, i = 0, 0
        async for token in provider(count):
            line = record("chunk", i, token)
            offset += len(line) + 1
            await response.write(event(offset, "chunk", line))
            i += 1
        line = record("end", i, "")
        await response.write(event(offset + len(line) + 1, "end", line))
        return response

    app = web.Application()
    app.router.add_post("/stream", stream)
    web.run_app(app, host=c.HOST, port=port, print=None, access_log=None)


def serve_naive(port: int, durability: str, data_dir: Path) -> None:
    import aiofiles
    import uvicorn
    from fastapi import FastAPI
    from fastapi.responses import StreamingResponse

    app = FastAPI()
    data_dir.mkdir(parents=True, exist_ok=True)
    counter = iter(range(1 << 30))

    async def append(path: Path, line: bytes) -> None:
        async with aiofiles.open(path, "ab") as log:
            await log.write(line)
            await log.flush()
            if durability == "fsync":
                await asyncio.get_running_loop().run_in_executor(None, os.fdatasync, log.fileno())

    @app.post("/stream")
    async def stream(n: int) -> StreamingResponse:
        path = data_dir / f"naive-{next(counter)}.jsonl"

        async def events():
            yield b"retry: 2000\n\n"
            offset, i = 0, 0
            async for token in provider(n):
                line = record("chunk", i, token)
                await append(path, line + b"\n")
                offset += len(line) + 1
                yield event(offset, "chunk", line)
                i += 1
            line = record("end", i, "")
            await append(path, line + b"\n")
            yield event(offset + len(line) + 1, "end", line)

        return StreamingResponse(events(), media_type="text/event-stream")

    uvicorn.run(app, host=c.HOST, port=port, log_level="warning", access_log=False)


# -- client -----------------------------------------------------------------------------------


class Counter:
    def __init__(self) -> None:
        self.chunks = 0
        self.ended = False

    def __call__(self, events: bytes, now: float) -> bool:
        self.chunks += events.count(b"\nevent: chunk\n")
        if b"\nevent: end\n" in events:
            self.ended = True
        return self.ended


async def timed_stream(port: int, path: str, limit_s: float) -> tuple[int, float]:
    counter = Counter()
    started = time.perf_counter()
    client = await c.open_sse(port, "POST", path, counter, body=b'{"text": "go"}')
    await asyncio.wait_for(asyncio.shield(client.done), limit_s)
    seconds = time.perf_counter() - started
    client.close()
    if client.status != 200 or not counter.ended:
        raise RuntimeError(f"{path}: status {client.status}, ended {counter.ended}")
    return counter.chunks, seconds


async def run_chatledger(port: int, limit_s: float) -> tuple[int, float]:
    import aiohttp

    async with aiohttp.ClientSession() as session:
        conversation_id = await c.create_conversation(session, port)
    return await timed_stream(port, f"/api/conversations/{conversation_id}/messages", limit_s)


# -- main -------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, default=20000, help="chunks per stream")
    parser.add_argument("--naive-events", type=int, default=2000, help="chunks, naive rows")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds per stream")
    parser.add_argument("--serve", choices=["bare", "naive"], help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--durability", default="fsync", help=argparse.SUPPRESS)
    parser.add_argument("--data-dir", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve == "bare":
        return serve_bare(args.port)
    if args.serve == "naive":
        return serve_naive(args.port, args.durability, args.data_dir)

    rows = ROWS
    work = Path(tempfile.mkdtemp(prefix="chatledger-p1-"))
    script = str(Path(__file__).resolve())
    servers = {}
    try:
        servers["bare"] = c.start_script(script, "--serve", "bare")
        for durability in ("flush", "fsync"):
            servers[f"naive-{durability}"] = c.start_script(
                script, "--serve", "naive", "--durability", durability,
                "--data-dir", str(work / f"naive-{durability}"),
            )  # fmt: skip
            servers[f"chatledger-{durability}"] = c.start_chatledger(
                work / f"chatledger-{durability}",
                "--durability", durability, "--demo-tokens-per-s", "0",
                "--demo-reply-tokens", str(args.events), "--messages-per-minute", "0",
            )  # fmt: skip
        rates: dict[str, list[float]] = {row: [] for row in rows}
        deadline = time.monotonic() + 30 * 60
        for round_ in range(args.rounds + 1):  # round 0 warms up
            order = rows if round_ % 2 else tuple(reversed(rows))
            for row in order:
                port = servers[row][0]
                if row.startswith("chatledger"):
                    expected = args.events
                    chunks, seconds = asyncio.run(run_chatledger(port, args.timeout))
                else:
                    expected = args.naive_events if row.startswith("naive") else args.events
                    chunks, seconds = asyncio.run(
                        timed_stream(port, f"/stream?n={expected}", args.timeout)
                    )
                if chunks != expected:
                    raise RuntimeError(f"{row}: got {chunks} of {expected} chunk events")
                if round_:
                    rates[row].append(chunks / seconds)
            if time.monotonic() > deadline:
                print("time limit reached; stopping early", file=sys.stderr)
                break
        sync_s = c.fdatasync_median(work)
    finally:
        for _, process in servers.values():
            c.stop(process)
        shutil.rmtree(work, ignore_errors=True)

    median = {row: statistics.median(values) for row, values in rates.items()}
    ratios = {
        "chatledger-fsync/naive-fsync": median["chatledger-fsync"] / median["naive-fsync"],
        "chatledger-flush/bare": median["chatledger-flush"] / median["bare"],
        "chatledger-fsync/bare": median["chatledger-fsync"] / median["bare"],
        "chatledger-flush/naive-flush": median["chatledger-flush"] / median["naive-flush"],
        "chatledger-fsync/chatledger-flush": median["chatledger-fsync"]
        / median["chatledger-flush"],
    }
    for row in rows[len(ROWS) :]:
        ratios[f"{row}/bare"] = median[row] / median["bare"]
    targets = {
        "chatledger-fsync/naive-fsync >= 30": ratios["chatledger-fsync/naive-fsync"] >= 30,
        "chatledger-flush/bare >= 0.5": ratios["chatledger-flush/bare"] >= 0.5,
    }
    print(
        f"P1 one fast stream: {args.events} events ({args.naive_events} naive), "
        f"{args.rounds} rounds, medians; disk fdatasync median {sync_s * 1e3:.3f} ms"
    )
    print(f"{'row':<18}{'events/s':>12}{'min':>12}{'max':>12}")
    for row in rows:
        values = rates[row]
        print(f"{row:<18}{median[row]:>12.0f}{min(values):>12.0f}{max(values):>12.0f}")
    for name, value in ratios.items():
        print(f"{name:<36}{value:>9.2f}")
    for name, ok in targets.items():
        print(f"target {name}: {'MET' if ok else 'MISSED'}")
    c.write_result(
        NAME,
        {
            "events": args.events,
            "naive_events": args.naive_events,
            "rounds": args.rounds,
            "fdatasync_median_ms": sync_s * 1e3,
            "events_per_s": rates,
            "median_events_per_s": median,
            "ratios": ratios,
            "targets_met": targets,
        },
    )
    plot(NAME, median, rates, ratios)


def plot(name: str, median: dict, rates: dict, ratios: dict) -> None:
    plt = c.pyplot()
    fig, ax = plt.subplots(figsize=(9, 4.5))
    rows = list(median)
    values = [median[r] for r in rows]
    low = [median[r] - min(rates[r]) for r in rows]
    high = [max(rates[r]) - median[r] for r in rows]
    colors = ["#888", "#d98", "#c55", "#8bd", "#37a", "#9c9", "#6a6"][: len(rows)]
    ax.bar(rows, values, yerr=[low, high], color=colors, capsize=4)
    ax.set_yscale("log")
    ax.set_ylabel("events/s delivered over SSE (median, min-max)")
    ax.set_title(
        f"P1 one fast stream: fsync {ratios['chatledger-fsync/naive-fsync']:.0f}x naive-fsync"
        f" (target 30x), flush {ratios['chatledger-flush/bare']:.2f}x bare (target 0.5x)",
        fontsize=9,
    )
    for x, v in enumerate(values):
        ax.text(x, v, f"{v:,.0f}", ha="center", va="bottom", fontsize=8)
    fig.tight_layout()
    ax.tick_params(axis="x", labelrotation=20, labelsize=8)
    fig.tight_layout()
    fig.savefig(c.RESULTS / f"{name}.png", dpi=110)


if __name__ == "__main__":
    main()
