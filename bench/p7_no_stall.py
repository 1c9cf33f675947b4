"""P7, no stall: a live stream keeps its pace while another conversation, holding one reply
of 300,000 chunks (~25 MB), is opened and answered on the same server.

Before the server starts, conversation B is written into the data dir with
``storage.records``: one ``user``, one reply of ``--chunks`` chunks. The server runs
``--llm demo --demo-tokens-per-s 20``. The client

1. starts a long reply in a new conversation A (``POST …/messages`` with ``Accept:
   text/event-stream``) and stamps the arrival of each ``chunk`` event
   (``time.perf_counter``);
2. after ``--settle`` seconds of that stream alone (the baseline window), opens B
   (``GET /api/conversations/B``: its first fold, the whole log) and then answers it
   (``POST …/messages`` in B, until its first chunk): the disturbed window;
3. keeps stamping A for ``--settle`` seconds more.

Reported: the longest gap between two consecutive chunk events of A in each window, and
the stall, the longest gap minus A's own pace (50 ms at 20 tokens/s); how long B's open
and first chunk took. Before chatledger kept folds up to date (2026-12-01), folding B ran
on the event loop and the stall was 11.4 s.

Target: the stall while B is opened and answered is <= 50 ms.

Usage::

    python bench/p7_no_stall.py [--chunks 300000] [--rounds 3]

Writes ``bench/results/p7_no_stall.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import _common as c
import aiohttp
import orjson

NAME = "p7_no_stall"
PACE_S = 1 / 20


class Stamps:
    """SSE handler: the arrival time of every ``chunk`` event; stops at ``end``."""

    def __init__(self) -> None:
        self.at: list[float] = []
        self.first_chunk: asyncio.Event = asyncio.Event()

    def __call__(self, events: bytes, now: float) -> bool:
        arrived = time.perf_counter()
        for _ in range(events.count(b"event: chunk\n")):
            self.at.append(arrived)
            self.first_chunk.set()
        return b"event: end\n" in events


def longest_gap(stamps: list[float], start: float, end: float) -> float:
    inside = [t for t in stamps if start <= t <= end]
    return max((b - a for a, b in itertools.pairwise(inside)), default=0.0)


async def one_round(port: int, long_id: str, settle: float) -> dict:
    async with aiohttp.ClientSession() as session:
        live_id = await c.create_conversation(session, port, "live")
        stamps = Stamps()
        body = orjson.dumps({"text": "a long story, please"})
        live = await c.open_sse(
            port, "POST", f"/api/conversations/{live_id}/messages", stamps, body=body
        )
        await asyncio.wait_for(stamps.first_chunk.wait(), 30)
        baseline_start = time.perf_counter()
        await asyncio.sleep(settle)
        disturbed_start = time.perf_counter()
        async with session.get(
            f"http://{c.HOST}:{port}/api/conversations/{long_id}?limit=50"
        ) as response:
            page = await response.json()
            assert response.status == 200, page
        opened = time.perf_counter()
        answer = Stamps()
        other = await c.open_sse(
            port,
            "POST",
            f"/api/conversations/{long_id}/messages",
            answer,
            body=orjson.dumps({"text": "and after all that?"}),
        )
        await asyncio.wait_for(answer.first_chunk.wait(), 120)
        answered = time.perf_counter()
        other.close()
        await asyncio.sleep(settle)
        disturbed_end = time.perf_counter()
        live.close()
        async with session.post(f"http://{c.HOST}:{port}/api/conversations/{live_id}/stop"):
            pass
        async with session.post(f"http://{c.HOST}:{port}/api/conversations/{long_id}/stop"):
            pass
    if len(stamps.at) < 2 * settle / PACE_S * 0.5:
        raise RuntimeError(f"the live stream sent only {len(stamps.at)} chunks")
    return {
        "baseline_gap_s": longest_gap(stamps.at, baseline_start, disturbed_start),
        "disturbed_gap_s": longest_gap(stamps.at, disturbed_start, disturbed_end),
        "open_s": opened - disturbed_start,
        "answer_first_chunk_s": answered - opened,
        "live_chunks": len(stamps.at),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--chunks", type=int, default=300_000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--settle", type=float, default=3.0, help="seconds per window")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="chatledger-p7-"))
    data = work / "data"
    rounds = []
    try:
        long_id, size = c.write_conversation(
            data / "conversations", chunks_per_reply=args.chunks, replies=1, chunk_text="token "
        )
        for _ in range(args.rounds):  # a fresh server each round: B's first open is cold
            port, process = c.start_chatledger(
                data,
                "--llm", "demo", "--demo-tokens-per-s", "20", "--demo-reply-tokens", "100000",
                "--messages-per-minute", "0", "--creates-per-minute", "0",
                timeout=600,
            )  # fmt: skip
            try:
                rounds.append(asyncio.run(one_round(port, long_id, args.settle)))
            finally:
                c.stop(process)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    med = {k: statistics.median(r[k] for r in rounds) for k in rounds[0]}
    worst = max(r["disturbed_gap_s"] for r in rounds)
    stall_ms = max(0.0, worst - PACE_S) * 1e3
    targets = {"stall while B is opened and answered <= 50 ms": stall_ms <= 50}
    print(
        f"P7 no stall: B holds one reply of {args.chunks} chunks ({size / 1e6:.1f} MB);"
        f" A streams at 20 tokens/s; {args.rounds} rounds (fresh server each)"
    )
    print(
        f"longest gap in A, baseline: median {med['baseline_gap_s'] * 1e3:.1f} ms;"
        f" while B opens and answers: median {med['disturbed_gap_s'] * 1e3:.1f} ms,"
        f" worst {worst * 1e3:.1f} ms (A's own pace: {PACE_S * 1e3:.0f} ms)"
    )
    print(
        f"B: open (first fold) {med['open_s'] * 1e3:.0f} ms, then first chunk of its answer"
        f" {med['answer_first_chunk_s'] * 1e3:.0f} ms (medians)"
    )
    print(f"stall beyond A's pace, worst round: {stall_ms:.1f} ms")
    for name, ok in targets.items():
        print(f"target {name}: {'MET' if ok else 'MISSED'}")
    c.write_result(
        NAME,
        {
            "chunks": args.chunks,
            "log_bytes": size,
            "rounds": rounds,
            "medians": med,
            "worst_disturbed_gap_ms": worst * 1e3,
            "stall_ms": stall_ms,
            "targets_met": targets,
        },
    )


if __name__ == "__main__":
    main()
