"""P9, receipts and seals on the live path: P1 and P2 with them on, beside the same runs
with them off, and ``chatledger verify`` beside ``sha256sum``.

"Off" is the code before the audit log, its receipts and the seals existed (a ``git
worktree`` of ``--baseline``, run from its own package directory), so nothing of them
runs there; "on" is this tree, where every stream commits an ``open`` before its first
byte, ``delivered`` receipts every 5 s and a ``close``, and every reply ends with a
``seal`` (SHA-256 kept a write at a time). Both servers run side by side, rounds
interleave them:

* **P1**: one reply streamed as fast as the demo provider yields (``--demo-tokens-per-s
  0``, ``--events`` chunks, fsync), events/s at the client. Target: on >= 0.9x off.
* **P2**: N = 1,000 replies at 20 tokens/s at once (P2's round, fsync): chunks/s in the
  steady window and p99 latency. Target: on >= 0.9x off in chunks/s, p99 within 1/0.9.
* **verify**: a ~``--mb`` MB sealed log written by the store; ``chatledger verify`` (the
  whole command) vs ``sha256sum`` of the same file, MB/s. Target: >= 0.5x. The seals'
  own check (block hashing, :meth:`storage.seal.SealCheck.stream`) is reported apart.

Usage::

    python bench/p9_receipts_seals.py [--baseline d3b4bc4] [--events 20000] [--rounds 3]

Writes ``bench/results/p9_receipts_seals.json``.
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
import p1_fast_stream as p1
import p2_many_replies as p2
import psutil

NAME = "p9_receipts_seals"
SIDES = ("off", "on")


async def write_sealed_log(data_dir: Path, megabytes: float) -> Path:
    from chatledger.storage import Durability, Store, records

    store = Store(data_dir, durability=Durability.FLUSH)
    log = await store.create(title="big", model="m", system=None)
    n, text = 0, " word" * 10
    while log.committed < megabytes * 1_000_000:
        await log.append(records.user(message_id=f"u{n}", text="question"))
        await log.append(records.start(reply_id=f"r{n}", reply_to=f"u{n}", model="m"))
        last = None
        for i in range(200):
            last = log.append_nowait(records.chunk(reply_id=f"r{n}", i=i, text=text))
        await last
        await log.append(records.end(reply_id=f"r{n}", finish="stop"))
        n += 1
    path = log.path
    await store.close()
    return path


def timed(argv: list[str]) -> float:
    started = time.perf_counter()
    subprocess.run(argv, check=True, capture_output=True)
    return time.perf_counter() - started


def verify_speed(work: Path, megabytes: float, rounds: int) -> dict:
    from chatledger.storage.seal import SealCheck

    data_dir = work / "verify"
    path = asyncio.run(write_sealed_log(data_dir, megabytes))
    size = path.stat().st_size
    verify_s, sha_s, seals_s = [], [], []
    for _ in range(rounds):
        verify_s.append(
            timed([sys.executable, "-m", "chatledger", "verify", "--data-dir", str(data_dir)])
        )
        sha_s.append(timed(["sha256sum", str(path)]))
        started = time.perf_counter()
        check = SealCheck()
        with open(path, "rb") as stream:
            check.stream(stream)
        seals_s.append(time.perf_counter() - started)
        assert check.first_bad is None and check.seals > 0
    mbps = {
        "verify": size / 1e6 / statistics.median(verify_s),
        "sha256sum": size / 1e6 / statistics.median(sha_s),
        "seals_only": size / 1e6 / statistics.median(seals_s),
    }
    return {"bytes": size, "mb_per_s": mbps, "ratio": mbps["verify"] / mbps["sha256sum"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--baseline", default="d3b4bc4", help="the code with them off")
    parser.add_argument("--events", type=int, default=20000)
    parser.add_argument("--size", type=int, default=1000, help="P2's N")
    parser.add_argument("--tokens", type=int, default=200, help="P2's chunks per reply")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--mb", type=float, default=100.0, help="the verified log's size")
    parser.add_argument("--ramp", type=float, default=1.0)
    args = parser.parse_args()
    args.profile_now = False
    c.raise_nofile()
    work = Path(tempfile.mkdtemp(prefix="chatledger-p9-"))
    p1_rates: dict[str, list[float]] = {side: [] for side in SIDES}
    p2_rows: dict[str, list[dict]] = {side: [] for side in SIDES}
    try:
        with c.baseline(args.baseline) as package:
            packages = {"off": package, "on": None}
            fast = ("--durability", "fsync", "--demo-tokens-per-s", "0",
                    "--demo-reply-tokens", str(args.events), "--messages-per-minute", "0",
                    "--creates-per-minute", "0")  # fmt: skip
            servers = {
                side: c.start_chatledger(work / f"p1-{side}", *fast, package=packages[side])
                for side in SIDES
            }
            try:
                for round_ in range(args.rounds + 1):  # round 0 warms up
                    for side in SIDES if round_ % 2 else tuple(reversed(SIDES)):
                        chunks, seconds = asyncio.run(p1.run_chatledger(servers[side][0], 300))
                        if round_:
                            p1_rates[side].append(chunks / seconds)
                    if round_:
                        print(f"P1 round {round_}: " + ", ".join(
                            f"{s} {p1_rates[s][-1]:.0f}/s" for s in SIDES), flush=True)  # fmt: skip
            finally:
                for _, process in servers.values():
                    c.stop(process)
            many = ("--durability", "fsync", "--demo-tokens-per-s", str(p2.RATE),
                    "--demo-reply-tokens", str(args.tokens), "--max-streams", "0",
                    "--max-streams-per-client", "0", "--messages-per-minute", "0",
                    "--creates-per-minute", "0")  # fmt: skip
            servers = {
                side: c.start_chatledger(work / f"p2-{side}", *many, package=packages[side])
                for side in SIDES
            }
            procs = {side: psutil.Process(proc.pid) for side, (_, proc) in servers.items()}
            try:
                for round_ in range(args.rounds):
                    for side in SIDES if round_ % 2 else tuple(reversed(SIDES)):
                        gc.collect()
                        result = asyncio.run(
                            p2.one_round(servers[side][0], procs[side], args.size, args)
                        )
                        result.pop("_latencies")
                        p2_rows[side].append(result)
                        print(
                            f"P2 round {round_} {side}: {result['delivered_chunks']}/"
                            f"{result['expected_chunks']}, {result['chunks_per_s']:.0f}/s, p99"
                            f" {result['latency_ms']['p99']:.1f} ms",
                            flush=True,
                        )
            finally:
                for _, process in servers.values():
                    c.stop(process)
        verified = verify_speed(work, args.mb, args.rounds)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    p1_med = {side: statistics.median(v) for side, v in p1_rates.items()}
    p2_rate = {side: statistics.median(r["chunks_per_s"] for r in p2_rows[side]) for side in SIDES}
    p2_p99 = {
        side: statistics.median(r["latency_ms"]["p99"] for r in p2_rows[side]) for side in SIDES
    }
    ratios = {
        "P1 events/s on/off": p1_med["on"] / p1_med["off"],
        "P2 chunks/s on/off": p2_rate["on"] / p2_rate["off"],
        "P2 p99 off/on": p2_p99["off"] / p2_p99["on"],
        "verify / sha256sum": verified["ratio"],
    }
    targets = {
        "P1 on >= 0.9x off": ratios["P1 events/s on/off"] >= 0.9,
        "P2 chunks/s on >= 0.9x off": ratios["P2 chunks/s on/off"] >= 0.9,
        "P2 p99 on <= off / 0.9": ratios["P2 p99 off/on"] >= 0.9,
        "verify >= 0.5x sha256sum": verified["ratio"] >= 0.5,
    }
    print(f"P9 receipts and seals, baseline {args.baseline} (off) vs this tree (on), medians")
    print(f"P1 events/s: off {p1_med['off']:.0f}, on {p1_med['on']:.0f}")
    print(
        f"P2 N={args.size}: chunks/s off {p2_rate['off']:.0f}, on {p2_rate['on']:.0f};"
        f" p99 off {p2_p99['off']:.1f} ms, on {p2_p99['on']:.1f} ms"
    )
    mbps = verified["mb_per_s"]
    print(
        f"verify of {verified['bytes'] / 1e6:.0f} MB: {mbps['verify']:.0f} MB/s, sha256sum"
        f" {mbps['sha256sum']:.0f} MB/s, the seals alone {mbps['seals_only']:.0f} MB/s"
    )
    for name, value in ratios.items():
        print(f"{name}: {value:.2f}")
    for name, ok in targets.items():
        print(f"target {name}: {'MET' if ok else 'MISSED'}")
    c.write_result(
        NAME,
        {
            "baseline": args.baseline,
            "p1_events_per_s": p1_rates,
            "p2_per_round": p2_rows,
            "verify": verified,
            "ratios": ratios,
            "targets_met": targets,
        },
    )


if __name__ == "__main__":
    main()
