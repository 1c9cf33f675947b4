"""P8, the household on the live path: P2's load with accounts on, and logins during it.

Two chatledger servers run side by side as subprocesses, with P2's flags (fsync, 20
tokens/s, no admission limits): ``plain`` in single-person mode, ``accounts`` with a
household of 10 adults, each logged in, and every request (creates, and each ``POST
…/messages`` with ``Accept: text/event-stream``) carrying one of their session cookies:
authenticated, isolated, budget-checked, and every stream's audit ``open``/``close``
written (both servers write those). Rounds interleave the servers; medians are reported.

* **A, accounts**: N = 1,000 replies (as P2): p99 provider-to-client latency, chunks/s,
  server CPU, on each server. Target: accounts within noise of plain (ratio <= 1.2) and
  p99 <= 25 ms.
* **B, logins**: N = 100 replies on the ``accounts`` server, with and without 20 logins
  at once (argon2id at its default cost: 64 MiB, 3 passes) started once every stream is
  open. Target: p99 with logins <= 2x without.

Usage::

    python bench/p8_household.py [--sizes 1000] [--tokens 200] [--rounds 2]

Writes ``bench/results/p8_household.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import _common as c
import aiohttp
import p2_many_replies as p2
import psutil

NAME = "p8_household"
PEOPLE = 10
LOGINS = 20
PASSWORD = "bench-password-1"
FLAGS = (
    "--durability", "fsync", "--demo-tokens-per-s", str(p2.RATE), "--max-streams", "0",
    "--max-streams-per-client", "0", "--messages-per-minute", "0",
    "--creates-per-minute", "0",
)  # fmt: skip


def add_people(data: Path) -> None:
    for k in range(PEOPLE):
        subprocess.run(
            [sys.executable, "-m", "chatledger", "user", "add", f"person{k}", "--role", "adult",
             "--password-stdin", "--data-dir", str(data)],
            input=PASSWORD + "\n", text=True, check=True, capture_output=True,
        )  # fmt: skip


async def login(port: int, name: str) -> tuple[str, float]:
    """(the session cookie header value, seconds the login took)."""
    started = time.perf_counter()
    async with (
        aiohttp.ClientSession() as session,
        session.post(
            f"http://{c.HOST}:{port}/api/login", json={"name": name, "password": PASSWORD}
        ) as response,
    ):
        response.raise_for_status()
        cookie = response.cookies["chatledger_session"].value
    return f"chatledger_session={cookie}", time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000])
    parser.add_argument("--small", type=int, default=100, help="N of part B")
    parser.add_argument("--tokens", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--ramp", type=float, default=1.0)
    args = parser.parse_args()
    args.profile_now = False
    c.raise_nofile()
    work = Path(tempfile.mkdtemp(prefix="chatledger-p8-"))
    add_people(work / "accounts")
    flags = (*FLAGS, "--demo-reply-tokens", str(args.tokens))
    servers = {
        "plain": c.start_chatledger(work / "plain", *flags),
        "accounts": c.start_chatledger(work / "accounts", *flags),
    }
    procs = {name: psutil.Process(proc.pid) for name, (_, proc) in servers.items()}
    rows: dict[str, list[dict]] = {f"{name} N={n}": [] for name in servers for n in args.sizes}
    rows.update({"logins off": [], "logins on": []})
    login_s: list[float] = []
    try:
        port = servers["accounts"][0]
        cookies = [asyncio.run(login(port, f"person{k}"))[0] for k in range(PEOPLE)]
        authed = {"Cookie": cookies[0]}

        async def logins() -> list[float]:
            done = await asyncio.gather(
                *(login(port, f"person{k % PEOPLE}") for k in range(LOGINS))
            )
            return [seconds for _, seconds in done]

        for round_ in range(args.rounds):
            order = ["plain", "accounts"] if round_ % 2 == 0 else ["accounts", "plain"]
            for size in args.sizes:
                for name in order:
                    gc.collect()
                    headers = authed if name == "accounts" else None
                    result = asyncio.run(
                        p2.one_round(servers[name][0], procs[name], size, args, headers=headers)
                    )
                    result.pop("_latencies")
                    rows[f"{name} N={size}"].append(result)
                    print(
                        f"round {round_} {name} N={size}: {result['delivered_chunks']}/"
                        f"{result['expected_chunks']}, p99 {result['latency_ms']['p99']:.1f} ms,"
                        f" server CPU {result['server_cpu_pct']:.0f}%",
                        flush=True,
                    )
            for with_logins in (round_ % 2 == 0, round_ % 2 == 1):
                gc.collect()
                result = asyncio.run(
                    p2.one_round(
                        port,
                        procs["accounts"],
                        args.small,
                        args,
                        headers=authed,
                        meanwhile=logins if with_logins else None,
                    )
                )
                result.pop("_latencies")
                if with_logins:
                    login_s.extend(result["meanwhile"])
                rows["logins on" if with_logins else "logins off"].append(result)
                print(
                    f"round {round_} N={args.small} logins {'on' if with_logins else 'off'}:"
                    f" p99 {result['latency_ms']['p99']:.1f} ms",
                    flush=True,
                )
        sync_ms = c.fdatasync_median(work) * 1e3
    finally:
        for _, proc in servers.values():
            c.stop(proc)
        shutil.rmtree(work, ignore_errors=True)

    def med(name: str, *keys: str) -> float:
        values = []
        for r in rows[name]:
            value = r
            for key in keys:
                value = value[key]
            values.append(value)
        return statistics.median(values)

    print(
        f"P8 household, fsync, {p2.RATE:.0f} tokens/s, {args.tokens} chunks per reply,"
        f" {args.rounds} rounds (medians); disk fdatasync median {sync_ms:.3f} ms"
    )
    print(f"{'run':<22}{'delivered':>10}{'chunks/s':>10}{'p50 ms':>8}{'p99 ms':>8}{'srv CPU':>9}")
    for name in rows:
        delivered = all(r["all_delivered"] for r in rows[name])
        print(
            f"{name:<22}{'all' if delivered else 'NO':>10}{med(name, 'chunks_per_s'):>10.0f}"
            f"{med(name, 'latency_ms', 'p50'):>8.1f}{med(name, 'latency_ms', 'p99'):>8.1f}"
            f"{med(name, 'server_cpu_pct'):>8.0f}%"
        )
    targets = {}
    ratios = {}
    for size in args.sizes:
        ratio = med(f"accounts N={size}", "latency_ms", "p99") / med(
            f"plain N={size}", "latency_ms", "p99"
        )
        ratios[f"accounts/plain p99 N={size}"] = ratio
        targets[f"N={size}: accounts p99 within noise of plain (<= 1.2x)"] = ratio <= 1.2
        targets[f"N={size}: accounts p99 <= 25 ms"] = (
            med(f"accounts N={size}", "latency_ms", "p99") <= 25
        )
    ratio = med("logins on", "latency_ms", "p99") / med("logins off", "latency_ms", "p99")
    ratios["logins on/off p99"] = ratio
    targets[f"{LOGINS} logins during N={args.small}: p99 <= 2x"] = ratio <= 2
    if login_s:
        print(
            f"{LOGINS} logins at once: median {statistics.median(login_s) * 1e3:.0f} ms,"
            f" slowest {max(login_s) * 1e3:.0f} ms each"
        )
    for name, value in ratios.items():
        print(f"{name}: {value:.2f}")
    for name, ok in targets.items():
        print(f"target {name}: {'MET' if ok else 'MISSED'}")
    c.write_result(
        NAME,
        {
            "tokens_per_reply": args.tokens,
            "rounds": args.rounds,
            "fdatasync_median_ms": sync_ms,
            "login_seconds": login_s,
            "per_round": rows,
            "ratios": ratios,
            "targets_met": targets,
        },
    )


if __name__ == "__main__":
    main()
