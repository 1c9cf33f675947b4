"""Events per second delivered over SSE: chatledger (fsync, flush) beside a bare SSE server.

Each run streams one reply of ``--events`` chunks from a provider that yields as fast as it
can (``--llm demo --demo-tokens-per-s 0``) and times it at the client, from sending the
message to receiving the reply's ``end``. The baseline is a bare aiohttp server inside
this script (run as its own process, like chatledger) that sends the same number of events,
framed the same way, with no log at all. Rounds alternate between the three servers so
machine noise hits them alike; the median of the rounds is reported, with the ratios.

The disk's own ``fdatasync`` median (small appends to a file in the same data dir) is
measured in the same run, since it bounds what ``fsync`` can do.

Usage::

    python bench/sse_throughput.py [--events 3000] [--rounds 5]

Writes ``bench/results/sse_throughput.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp
import orjson
from aiohttp import web

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# -- the bare baseline server ---------------------------------------------------------------


def bare_server(port: int, events: int) -> None:
    """SSE with no log: the same events, one write each, yielding between them."""

    async def stream(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(
            headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
        )
        await response.prepare(request)
        await response.write(b"retry: 2000\n\n")
        offset = 0
        for i in range(events + 1):
            kind = "chunk" if i < events else "end"
            line = orjson.dumps(
                {"type": kind, "ts": time.time_ns() // 1_000_000, "id": "r", "i": i, "text": " w"}
            )
            offset += len(line) + 1
            await response.write(b"id: %d\nevent: %s\ndata: %s\n\n" % (offset, kind.encode(), line))
            await asyncio.sleep(0)
        return response

    app = web.Application()
    app.router.add_post("/stream", stream)
    web.run_app(app, host="127.0.0.1", port=port, print=None)


# -- client ---------------------------------------------------------------------------------


async def count_events(response: aiohttp.ClientResponse) -> int:
    """Read an event stream until the ``end`` event; return the number of chunk events."""
    chunks = 0
    buffer = b""
    async for data in response.content.iter_any():
        buffer += data
        *blocks, buffer = buffer.split(b"\n\n")
        for block in blocks:
            if b"\nevent: chunk\n" in b"\n" + block + b"\n" or block.startswith(b"event: chunk"):
                chunks += 1
            elif b"event: end\n" in block:
                return chunks
    return chunks


async def run_chatledger(url: str) -> tuple[int, float]:
    async with aiohttp.ClientSession() as session:
        async with session.post(f"{url}/api/conversations", json={}) as response:
            conversation_id = (await response.json())["id"]
        started = time.perf_counter()
        async with session.post(
            f"{url}/api/conversations/{conversation_id}/messages",
            json={"text": "go"},
            headers={"Accept": "text/event-stream"},
        ) as response:
            chunks = await count_events(response)
        return chunks, time.perf_counter() - started


async def run_bare(url: str) -> tuple[int, float]:
    async with aiohttp.ClientSession() as session:
        started = time.perf_counter()
        async with session.post(f"{url}/stream") as response:
            chunks = await count_events(response)
        return chunks, time.perf_counter() - started


def wait_port(port: int, process: subprocess.Popen) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server exited with {process.returncode}")
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise TimeoutError("server did not start")


def fdatasync_median(directory: Path, count: int = 200) -> float:
    """Median seconds of ``fdatasync`` after a small append, on the disk under test."""
    path = directory / "fdatasync-probe"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    times = []
    try:
        for _ in range(count):
            os.write(fd, b'{"type":"chunk","ts":0,"id":"r","i":0,"text":" w"}\n')
            started = time.perf_counter()
            os.fdatasync(fd)
            times.append(time.perf_counter() - started)
    finally:
        os.close(fd)
        path.unlink()
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, default=3000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--bare-server", type=int, metavar="PORT", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.bare_server:
        bare_server(args.bare_server, args.events)
        return

    work = Path(tempfile.mkdtemp(prefix="chatledger-bench-"))
    servers: dict[str, tuple[str, subprocess.Popen]] = {}
    try:
        for name in ("fsync", "flush"):
            port = free_port()
            process = subprocess.Popen(
                [sys.executable, "-m", "server.cli", "serve", "--port", str(port),
                 "--data-dir", str(work / name), "--durability", name,
                 "--demo-tokens-per-s", "0", "--demo-reply-tokens", str(args.events)],
                cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            )  # fmt: skip
            servers[name] = (f"http://127.0.0.1:{port}", process)
        port = free_port()
        process = subprocess.Popen(
            [sys.executable, __file__, "--bare-server", str(port), "--events", str(args.events)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        servers["bare"] = (f"http://127.0.0.1:{port}", process)
        for url, process in servers.values():
            wait_port(int(url.rsplit(":", 1)[1]), process)

        rates: dict[str, list[float]] = {name: [] for name in ("bare", "fsync", "flush")}
        for round_ in range(args.rounds + 1):  # round 0 warms up and is not counted
            for name in rates:
                url = servers[name][0]
                runner = run_bare if name == "bare" else run_chatledger
                chunks, seconds = asyncio.run(runner(url))
                if chunks != args.events:
                    raise RuntimeError(f"{name}: got {chunks} of {args.events} events")
                if round_:
                    rates[name].append(chunks / seconds)
        sync_s = fdatasync_median(work)
    finally:
        for _, process in servers.values():
            process.terminate()
            process.wait(10)

    median = {name: statistics.median(values) for name, values in rates.items()}
    ratios = {
        "fsync/bare": median["fsync"] / median["bare"],
        "flush/bare": median["flush"] / median["bare"],
        "fsync/flush": median["fsync"] / median["flush"],
    }
    print(f"events per reply: {args.events}, rounds: {args.rounds} (median shown)")
    print(f"disk fdatasync median: {sync_s * 1e3:.3f} ms")
    print(f"{'server':<8}{'events/s':>12}{'min':>12}{'max':>12}")
    for name, values in rates.items():
        print(f"{name:<8}{median[name]:>12.0f}{min(values):>12.0f}{max(values):>12.0f}")
    for name, value in ratios.items():
        print(f"{name:<12}{value:>8.3f}")
    RESULTS.mkdir(parents=True, exist_ok=True)
    result = {
        "benchmark": "sse_throughput",
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
        "events": args.events,
        "rounds": args.rounds,
        "fdatasync_median_ms": sync_s * 1e3,
        "events_per_s": rates,
        "median_events_per_s": median,
        "ratios": ratios,
    }
    (RESULTS / "sse_throughput.json").write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
