"""P4, idle streams: server memory (RSS) per idle SSE connection, with 10,000 connections,
beside a bare aiohttp SSE server that holds the same connections and does nothing else.

Each round starts a fresh server (chatledger: ``--max-streams 0 --max-streams-per-client
0``, default keep-alive; bare: an aiohttp handler that sends ``retry:`` and then a
keep-alive comment every 15 s), creates one conversation (chatledger), opens and closes
``--warmup`` streams, lets it settle, reads its RSS from ``/proc`` (psutil), then opens
``--connections`` streams (``GET .../events?from=<committed offset>``: caught up, nothing
to send), each counted once its response head and ``retry:`` arrived, waits ``--settle``
s and reads RSS again. Per connection = (after - before) / connections. Clients are lean
raw sockets in this process (at most ``--concurrency`` connecting at once); this process
raises its RLIMIT_NOFILE, the server raises its own. Rounds alternate chatledger and
bare; medians are reported.

Target: <= 20 KB per connection (chatledger).

Usage::

    python bench/p4_idle.py [--connections 10000] [--rounds 2]

Writes ``bench/results/p4_idle.json`` and ``.png``.
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import _common as c
import aiohttp
import psutil

NAME = "p4_idle"
ROWS = ("chatledger", "bare")
SCRIPT = str(Path(__file__).resolve())


def serve_bare(port: int) -> None:
    from aiohttp import web

    c.raise_nofile()

    async def stream(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(
            headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
        )
        await response.prepare(request)
        await response.write(b"retry: 2000\n\n")
        for _ in range(10_000):  # bounded: ~40 hours of keep-alives
            await asyncio.sleep(15)
            await response.write(b": keep-alive\n\n")
        return response

    app = web.Application()
    app.router.add_get("/api/conversations/{id}/events", stream)
    web.run_app(app, host=c.HOST, port=port, print=None, access_log=None)


class Retry:
    def __init__(self) -> None:
        self.ready = asyncio.get_running_loop().create_future()

    def __call__(self, events: bytes, now: float) -> bool:
        if b"retry:" in events and not self.ready.done():
            self.ready.set_result(None)
        return False


async def open_many(port: int, path: str, count: int, concurrency: int) -> list[c.SSEClient]:
    gate = asyncio.Semaphore(concurrency)
    clients: list[c.SSEClient] = []

    async def one() -> None:
        async with gate:
            handler = Retry()
            try:
                client = await c.open_sse(port, "GET", path, handler)
                await asyncio.wait_for(asyncio.shield(handler.ready), 60)
            except (OSError, TimeoutError):
                return
            if client.status == 200:
                clients.append(client)
            else:
                client.close()

    await asyncio.gather(*(one() for _ in range(count)))
    return clients


def rss(pid: int) -> int:
    return psutil.Process(pid).memory_info().rss


async def one_round(row: str, work: Path, args) -> dict:
    if row == "chatledger":
        port, process = c.start_chatledger(
            work / f"data-{time.monotonic_ns()}",
            "--max-streams", "0", "--max-streams-per-client", "0",
        )  # fmt: skip
        async with aiohttp.ClientSession() as session:
            conversation_id = await c.create_conversation(session, port)
            async with session.get(
                f"http://{c.HOST}:{port}/api/conversations/{conversation_id}"
            ) as response:
                offset = (await response.json())["offset"]
        path = f"/api/conversations/{conversation_id}/events?from={offset}"
    else:
        port, process = c.start_script(SCRIPT, "--serve-bare")
        path = "/api/conversations/x/events"
    try:
        warm = await open_many(port, path, args.warmup, args.concurrency)
        for client in warm:
            client.close()
        await asyncio.sleep(args.settle)
        before = rss(process.pid)
        started = time.perf_counter()
        clients = await open_many(port, path, args.connections, args.concurrency)
        open_s = time.perf_counter() - started
        await asyncio.sleep(args.settle)
        after = rss(process.pid)
        alive = sum(not cl.done.done() for cl in clients)
        for client in clients:
            client.close()
    finally:
        c.stop(process)
    return {
        "opened": len(clients),
        "alive_at_measure": alive,
        "open_s": open_s,
        "rss_before_mb": before / 2**20,
        "rss_after_mb": after / 2**20,
        "kb_per_connection": (after - before) / 1024 / max(1, len(clients)),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--connections", type=int, default=10_000)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=200)
    parser.add_argument("--concurrency", type=int, default=100)
    parser.add_argument("--settle", type=float, default=2.0)
    parser.add_argument("--serve-bare", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve_bare:
        return serve_bare(args.port)
    limit = c.raise_nofile()
    if limit < args.connections + 500:
        raise SystemExit(f"RLIMIT_NOFILE is {limit}: too low for {args.connections} connections")
    work = Path(tempfile.mkdtemp(prefix="chatledger-p4-"))
    results: dict[str, list[dict]] = {row: [] for row in ROWS}
    try:
        for round_ in range(args.rounds):
            for row in ROWS if round_ % 2 == 0 else tuple(reversed(ROWS)):
                result = asyncio.run(one_round(row, work, args))
                results[row].append(result)
                print(
                    f"round {round_} {row}: {result['opened']} open in {result['open_s']:.1f} s, "
                    f"RSS {result['rss_before_mb']:.1f} -> {result['rss_after_mb']:.1f} MB, "
                    f"{result['kb_per_connection']:.1f} KB/connection",
                    flush=True,
                )
    finally:
        shutil.rmtree(work, ignore_errors=True)
    median = {row: statistics.median(r["kb_per_connection"] for r in results[row]) for row in ROWS}
    complete = all(r["opened"] == args.connections for rows in results.values() for r in rows)
    ratio = median["chatledger"] / median["bare"]
    targets = {
        f"all {args.connections} connections open": complete,
        "chatledger <= 20 KB per connection": median["chatledger"] <= 20,
    }
    print(f"P4 idle: {args.connections} idle SSE connections, {args.rounds} rounds, medians")
    for row in ROWS:
        print(f"{row:<11}{median[row]:>8.1f} KB per connection")
    print(f"chatledger / bare: {ratio:.2f}")
    for name, ok in targets.items():
        print(f"target {name}: {'MET' if ok else 'MISSED'}")
    c.write_result(
        NAME,
        {
            "connections": args.connections,
            "rounds": args.rounds,
            "per_round": results,
            "median_kb_per_connection": median,
            "ratio_chatledger_over_bare": ratio,
            "targets_met": targets,
        },
    )
    plt = c.pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.bar(ROWS, [median[r] for r in ROWS], color=["#37a", "#888"])
    ax.axhline(20, color="red", linestyle="--", linewidth=1, label="target 20 KB")
    for x, row in enumerate(ROWS):
        ax.text(x, median[row], f"{median[row]:.1f} KB", ha="center", va="bottom")
    ax.set_ylabel("server RSS per idle SSE connection (KB)")
    ax.set_title(f"P4 {args.connections:,} idle SSE connections", fontsize=10)
    ax.legend()
    fig.tight_layout()
    fig.savefig(c.RESULTS / f"{NAME}.png", dpi=110)


if __name__ == "__main__":
    main()
