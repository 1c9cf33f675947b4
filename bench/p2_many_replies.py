"""P2, many live replies: chunks/s and provider-to-client latency with 100 and 1,000
concurrent replies (one conversation each) at 20 tokens/s each, ``--durability fsync``.

One chatledger server (``--demo-tokens-per-s 20 --max-streams 0 --max-streams-per-client 0
--messages-per-minute 0 --creates-per-minute 0``: every client is this one) runs as a
subprocess. Each round creates N conversations, then starts N replies, one
``POST .../messages`` with ``Accept: text/event-stream`` per conversation, spread evenly
over ``--ramp`` seconds, and reads every stream to its ``end`` with a lean raw-socket SSE
client (one process, this one). Rounds interleave N = 100 and N = 1,000; medians of the
rounds are reported.

Latency of a chunk = client receive time (``time.time()``, ms) - the chunk record's
``ts``. ``ts`` is whole ms taken when the record is built, right after the provider yields,
so the figure is the true latency plus 0 to 1 ms (it is an upper bound; the lower bound
is 1 ms less). Both clocks are this machine's. Reported per N: chunks delivered / expected
(every reply must end with ``finish: "stop"``), chunks/s received in the steady window
(while all N replies were streaming; offered load is N x 20), latency p50/p99/max over
all chunks and over the steady window, server and client CPU (% of one core over the
round), and the disk's own ``fdatasync`` median measured in the same run. ``--profile``
runs one more round of the largest N with py-spy recording the server (not counted in
the figures: sampling costs the server CPU) and summarizes where its event loop spends
time.

Target at 1,000: every chunk delivered, p99 <= 25 ms.

Usage::

    python bench/p2_many_replies.py [--sizes 100 1000] [--tokens 200] [--rounds 2] [--profile]

Writes ``bench/results/p2_many_replies.json`` and ``.png``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import re
import resource
import shutil
import statistics
import tempfile
import time
from array import array
from pathlib import Path

import _common as c
import aiohttp
import psutil

NAME = "p2_many_replies"
RATE = 20.0
CHUNK_TS = re.compile(rb'\nevent: chunk\ndata: \{"type":"chunk","ts":(\d+),')
END = re.compile(rb'\nevent: end\ndata: \{"type":"end","ts":\d+,"id":"[^"]*","finish":"(\w+)"')


class Latencies:
    """Receive times (s) and latencies (ms) of every chunk, in two flat arrays: floats the
    garbage collector does not track, so a full collection of the client, which would
    grow with 200,000 tuples, never stalls the receiving loop (it showed as 70-100 ms
    spikes of client-side "latency")."""

    def __init__(self) -> None:
        self.times = array("d")
        self.ms = array("d")


class Stream:
    """One reply's event stream: chunk latencies, count, end."""

    def __init__(self, latencies: Latencies) -> None:
        self.latencies = latencies  # shared by every stream of the round
        self.chunks = 0
        self.finish: str | None = None
        self.first: float | None = None

    def __call__(self, events: bytes, now: float) -> bool:
        now_ms = now * 1000.0
        stamps = CHUNK_TS.findall(events)
        if stamps:
            if self.first is None:
                self.first = now
            self.chunks += len(stamps)
            self.latencies.times.extend([now] * len(stamps))
            self.latencies.ms.extend([now_ms - int(ts) for ts in stamps])
        end = END.search(events)
        if end:
            self.finish = end.group(1).decode()
            self.end = now
            return True
        return False


async def create_many(port: int, count: int, headers: dict[str, str] | None = None) -> list[str]:
    connector = aiohttp.TCPConnector(limit=32)
    async with aiohttp.ClientSession(connector=connector, headers=headers) as session:
        return list(
            await asyncio.gather(*(c.create_conversation(session, port) for _ in range(count)))
        )


async def one_round(
    port: int,
    server: psutil.Process,
    size: int,
    args,
    *,
    headers: dict[str, str] | None = None,
    meanwhile=None,
) -> dict:
    """One round of ``size`` replies. ``headers`` go with every request (a session
    cookie); ``meanwhile()``, if given, is awaited once every stream is open (the load
    of another benchmark, such as logins) and its result is returned as ``meanwhile``."""
    ids = await create_many(port, size, headers)
    latencies = Latencies()
    streams = [Stream(latencies) for _ in ids]
    clients = []
    cpu_server = server.cpu_times()
    cpu_client = resource.getrusage(resource.RUSAGE_SELF)
    wall = time.perf_counter()
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    for k, (conversation_id, stream) in enumerate(zip(ids, streams, strict=True)):
        await asyncio.sleep(max(0.0, t0 + args.ramp * k / size - loop.time()))
        clients.append(
            await c.open_sse(
                port,
                "POST",
                f"/api/conversations/{conversation_id}/messages",
                stream,
                body=b'{"text": "hello there"}',
                headers=headers,
            )
        )
    extra = await meanwhile() if meanwhile is not None else None
    profiler = None
    if args.profile_now:
        seconds = min(8.0, args.tokens / RATE - 1)
        profiler = c.py_spy(server.pid, seconds, c.RESULTS / f"{NAME}.pyspy.txt")
    timeout = args.tokens / RATE + args.ramp + 60
    done = asyncio.gather(*(client.done for client in clients))
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(done, timeout)
    for client in clients:
        client.close()
    wall = time.perf_counter() - wall
    cpu_s = sum(server.cpu_times()[:2]) - sum(cpu_server[:2])
    usage = resource.getrusage(resource.RUSAGE_SELF)
    cpu_c = usage.ru_utime + usage.ru_stime - cpu_client.ru_utime - cpu_client.ru_stime
    if profiler is not None:
        profiler.wait(30)
    expected = size * args.tokens
    got = sum(s.chunks for s in streams)
    stops = sum(s.finish == "stop" for s in streams)
    statuses = sorted({cl.status for cl in clients}, key=str)
    all_ms = list(latencies.ms)
    firsts = [s.first for s in streams if s.first is not None]
    ends = [getattr(s, "end", None) for s in streams if s.finish]
    if firsts and ends and len(firsts) == size:
        steady_from, steady_to = max(firsts), min(ends)
        steady = [
            ms
            for t, ms in zip(latencies.times, latencies.ms, strict=True)
            if steady_from <= t <= steady_to
        ]
    else:
        steady_from = steady_to = 0.0
        steady = []
    steady_s = steady_to - steady_from
    span = max(latencies.times) - min(latencies.times) if latencies.times else 0
    return {
        "size": size,
        "expected_chunks": expected,
        "delivered_chunks": got,
        "replies_stopped_ok": stops,
        "statuses": statuses,
        "all_delivered": got == expected and stops == size,
        "chunks_per_s": len(steady) / steady_s if steady_s > 1 else got / span if span else 0.0,
        "overall_chunks_per_s": got / span if span else 0.0,
        "steady_window_s": steady_s,
        "offered_chunks_per_s": size * RATE,
        "latency_ms": summary(all_ms),
        "steady_latency_ms": summary(steady),
        "server_cpu_pct": 100 * cpu_s / wall,
        "client_cpu_pct": 100 * cpu_c / wall,
        "wall_s": wall,
        "meanwhile": extra,
        "_latencies": all_ms,
    }


def summary(values: list[float]) -> dict:
    if not values:
        return {"n": 0}
    return {
        "n": len(values),
        "p50": c.percentile(values, 50),
        "p90": c.percentile(values, 90),
        "p99": c.percentile(values, 99),
        "p999": c.percentile(values, 99.9),
        "max": max(values),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[100, 1000])
    parser.add_argument("--tokens", type=int, default=200, help="chunks per reply (10 s)")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--ramp", type=float, default=1.0, help="seconds to start all replies")
    parser.add_argument(
        "--profile", action="store_true", help="one more round of the largest N, with py-spy"
    )
    parser.add_argument("--durability", default="fsync", choices=["fsync", "flush"])
    args = parser.parse_args()
    c.raise_nofile()
    work = Path(tempfile.mkdtemp(prefix="chatledger-p2-"))
    port, process = c.start_chatledger(
        work / "data",
        "--durability", args.durability, "--demo-tokens-per-s", str(RATE),
        "--demo-reply-tokens", str(args.tokens), "--max-streams", "0",
        "--max-streams-per-client", "0", "--messages-per-minute", "0",
        "--creates-per-minute", "0",
    )  # fmt: skip
    server = psutil.Process(process.pid)
    results: dict[int, list[dict]] = {size: [] for size in args.sizes}
    deadline = time.monotonic() + 30 * 60
    try:
        args.profile_now = False
        for round_ in range(args.rounds):
            order = args.sizes if round_ % 2 == 0 else list(reversed(args.sizes))
            for size in order:
                gc.collect()
                gc.freeze()  # what exists now is never scanned again during the round
                result = asyncio.run(one_round(port, server, size, args))
                results[size].append(result)
                print(
                    f"round {round_} N={size}: {result['delivered_chunks']}/"
                    f"{result['expected_chunks']} chunks, {result['chunks_per_s']:.0f}/s, "
                    f"p50 {result['latency_ms'].get('p50', float('nan')):.1f} ms, "
                    f"p99 {result['latency_ms'].get('p99', float('nan')):.1f} ms, "
                    f"server CPU {result['server_cpu_pct']:.0f}%, "
                    f"client CPU {result['client_cpu_pct']:.0f}%",
                    flush=True,
                )
            if time.monotonic() > deadline:
                break
        if args.profile:
            args.profile_now = True
            profiled = asyncio.run(one_round(port, server, max(args.sizes), args))
            p99 = profiled["latency_ms"].get("p99", float("nan"))
            print(f"profiled round N={max(args.sizes)} (not counted): p99 {p99:.1f} ms")
        sync_ms = c.fdatasync_median(work) * 1e3
    finally:
        c.stop(process)
        shutil.rmtree(work, ignore_errors=True)

    def med(size: int, *keys: str) -> float:
        values = []
        for r in results[size]:
            value = r
            for key in keys:
                value = value.get(key, float("nan"))
            values.append(value)
        return statistics.median(values)

    table = {}
    for size in args.sizes:
        table[size] = {
            "all_delivered_every_round": all(r["all_delivered"] for r in results[size]),
            "chunks_per_s": med(size, "chunks_per_s"),
            "offered_chunks_per_s": size * RATE,
            "p50_ms": med(size, "latency_ms", "p50"),
            "p99_ms": med(size, "latency_ms", "p99"),
            "max_ms": med(size, "latency_ms", "max"),
            "steady_p99_ms": med(size, "steady_latency_ms", "p99"),
            "server_cpu_pct": med(size, "server_cpu_pct"),
            "client_cpu_pct": med(size, "client_cpu_pct"),
        }
    big = max(args.sizes)
    targets = {
        f"N={big}: every chunk delivered": table[big]["all_delivered_every_round"],
        f"N={big}: p99 <= 25 ms": table[big]["p99_ms"] <= 25,
    }
    print(f"P2 many replies at {RATE:.0f} tokens/s, fsync, {args.tokens} chunks per reply, "
          f"{args.rounds} rounds (medians); disk fdatasync median {sync_ms:.3f} ms")  # fmt: skip
    print("latency = client receive - record ts (ms resolution: true value is 0-1 ms lower)")
    print(f"{'N':>6}{'delivered':>11}{'chunks/s':>10}{'offered':>9}{'p50 ms':>8}{'p99 ms':>8}"
          f"{'steady p99':>11}{'max ms':>8}{'srv CPU':>9}{'cli CPU':>9}")  # fmt: skip
    for size, row in table.items():
        print(f"{size:>6}{'all' if row['all_delivered_every_round'] else 'NO':>11}"
              f"{row['chunks_per_s']:>10.0f}{row['offered_chunks_per_s']:>9.0f}"
              f"{row['p50_ms']:>8.1f}{row['p99_ms']:>8.1f}{row['steady_p99_ms']:>11.1f}"
              f"{row['max_ms']:>8.1f}{row['server_cpu_pct']:>8.0f}%"
              f"{row['client_cpu_pct']:>8.0f}%")  # fmt: skip
    if len(args.sizes) > 1:
        small = min(args.sizes)
        print(f"p99 ratio N={big}/N={small}: {table[big]['p99_ms'] / table[small]['p99_ms']:.2f}")
    for name, ok in targets.items():
        print(f"target {name}: {'MET' if ok else 'MISSED'}")
    profile = None
    spy = c.RESULTS / f"{NAME}.pyspy.txt"
    if args.profile and spy.exists():
        profile = c.summarize_profile(spy)
        print(f"server profile (event loop thread, {profile['samples']} busy samples), self %:")
        for frame, pct in profile["self"][:12]:
            print(f"  {pct:5.1f}  {frame}")
    curves = {size: results[size][-1]["_latencies"] for size in args.sizes}
    for rows in results.values():
        for r in rows:
            r.pop("_latencies")
    c.write_result(
        NAME,
        {
            "rate_tokens_per_s": RATE,
            "tokens_per_reply": args.tokens,
            "ramp_s": args.ramp,
            "rounds": args.rounds,
            "fdatasync_median_ms": sync_ms,
            "median": table,
            "per_round": results,
            "targets_met": targets,
            "server_profile": profile,
        },
    )
    plot(NAME, curves, table)


def plot(name: str, curves: dict[int, list[float]], table: dict) -> None:
    plt = c.pyplot()
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for size, values in curves.items():
        ordered = sorted(values)
        if not ordered:
            continue
        n = len(ordered)
        ax.plot(ordered, [(k + 1) / n for k in range(n)], label=(
            f"N={size}: {table[size]['chunks_per_s']:.0f} chunks/s, "
            f"p99 {table[size]['p99_ms']:.1f} ms"))  # fmt: skip
    ax.axvline(25, color="red", linestyle="--", linewidth=1, label="target p99 25 ms")
    ax.axhline(0.99, color="grey", linestyle=":", linewidth=1)
    ax.set_xscale("log")
    ax.set_xlabel("provider yield -> client receive (ms, last round)")
    ax.set_ylabel("fraction of chunks")
    ax.set_title("P2 many live replies at 20 tokens/s each, fsync", fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(c.RESULTS / f"{name}.png", dpi=110)


if __name__ == "__main__":
    main()
