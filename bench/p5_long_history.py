"""P5, long history: the cost of a new message in a conversation with a ~100 MB log,
beside the same in a new conversation, on one server.

The long log is written into the data dir with ``storage.records`` before the server
starts (replies of 60 chunks up to ``--mb`` MB). The server runs ``--llm demo
--demo-tokens-per-s 0`` (replies as fast as it can) with everything on that a family's
server has on (fsync durability, the edge checks, rate limits off only so the bench can
send fast). In interleaved rounds, each conversation gets one message through
``POST …/messages`` with ``Accept: text/event-stream``, and the client measures

* time to the first ``chunk`` event, from sending the request;
* server CPU for the whole message (``/proc/<pid>/stat``, user + system, from sending
  until the reply's ``end`` arrived), summed over the rounds and divided by them.

The first message into the long conversation after start builds its folded view (the
log read once, on a worker thread): it is reported apart as ``cold``; the rounds after
it measure what every later message costs.

Target: the long conversation's time to first chunk and CPU per message are <= 1.5x the
new one's.

Usage::

    python bench/p5_long_history.py [--mb 100] [--rounds 20]

Writes ``bench/results/p5_long_history.json``.
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
import orjson

NAME = "p5_long_history"
ROWS = ("new", "long")


class UntilEnd:
    """SSE handler: notes when the first ``chunk`` and the ``end`` arrive."""

    def __init__(self) -> None:
        self.first_chunk: float | None = None
        self.ended = False

    def __call__(self, events: bytes, now: float) -> bool:
        if self.first_chunk is None and b"event: chunk" in events:
            self.first_chunk = time.perf_counter()
        if b"event: end" in events:
            self.ended = True
            return True
        return False


async def one_message(port: int, pid: int, conversation_id: str, n: int) -> tuple[float, float]:
    """(seconds to the first chunk, server CPU seconds) of one message."""
    handler = UntilEnd()
    body = orjson.dumps({"text": f"message {n}: and then?"})
    cpu = c.cpu_seconds(pid)
    started = time.perf_counter()
    client = await c.open_sse(
        port, "POST", f"/api/conversations/{conversation_id}/messages", handler, body=body
    )
    await asyncio.wait_for(asyncio.shield(client.done), 120)
    client.close()
    if client.status != 200 or handler.first_chunk is None or not handler.ended:
        raise RuntimeError(f"message {n}: status {client.status}, {client.error}")
    await asyncio.sleep(0.05)  # the reply task ends just after its last event
    return handler.first_chunk - started, c.cpu_seconds(pid) - cpu


async def measure(port: int, pid: int, long_id: str, rounds: int) -> dict:
    async with aiohttp.ClientSession() as session:
        new_id = await c.create_conversation(session, port, "new")
    ids = {"new": new_id, "long": long_id}
    cold = await one_message(port, pid, long_id, 0)
    await one_message(port, pid, new_id, 0)  # warm the new one too
    first: dict[str, list[float]] = {row: [] for row in ROWS}
    cpu: dict[str, list[float]] = {row: [] for row in ROWS}
    for round_ in range(1, rounds + 1):
        for row in ROWS if round_ % 2 else tuple(reversed(ROWS)):
            seconds, used = await one_message(port, pid, ids[row], round_)
            first[row].append(seconds)
            cpu[row].append(used)
    return {"cold": cold, "first": first, "cpu": cpu}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mb", type=float, default=100.0, help="long log size in MB")
    parser.add_argument("--rounds", type=int, default=20)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="chatledger-p5-"))
    data = work / "data"
    try:
        long_id, size = c.write_conversation(
            data / "conversations", chunks_per_reply=60, megabytes=args.mb
        )
        started = time.perf_counter()
        port, process = c.start_chatledger(
            data,
            "--llm", "demo", "--demo-tokens-per-s", "0", "--demo-reply-tokens", "30",
            "--messages-per-minute", "0", "--creates-per-minute", "0",
            timeout=600,
        )  # fmt: skip
        startup_s = time.perf_counter() - started
        try:
            result = asyncio.run(measure(port, process.pid, long_id, args.rounds))
        finally:
            c.stop(process)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    first_ms = {row: statistics.median(v) * 1e3 for row, v in result["first"].items()}
    cpu_ms = {row: sum(v) / len(v) * 1e3 for row, v in result["cpu"].items()}
    ratios = {
        "first_chunk": first_ms["long"] / first_ms["new"],
        "cpu_per_message": cpu_ms["long"] / max(cpu_ms["new"], 1e-9),
    }
    targets = {f"long / new {k} <= 1.5": v <= 1.5 for k, v in ratios.items()}
    print(
        f"P5 long history: log {size / 1e6:.1f} MB (server start with recovery"
        f" {startup_s:.1f} s), {args.rounds} rounds"
    )
    print(f"{'conversation':<14}{'first chunk ms (median)':>25}{'server CPU ms/message':>24}")
    for row in ROWS:
        print(f"{row:<14}{first_ms[row]:>25.2f}{cpu_ms[row]:>24.2f}")
    cold_first, cold_cpu = result["cold"]
    print(
        f"{'long, cold':<14}{cold_first * 1e3:>25.2f}{cold_cpu * 1e3:>24.2f}"
        "   (first message after start: builds the folded view)"
    )
    for name, value in ratios.items():
        print(f"long / new {name}: {value:.2f}")
    for name, ok in targets.items():
        print(f"target {name}: {'MET' if ok else 'MISSED'}")
    c.write_result(
        NAME,
        {
            "log_bytes": size,
            "server_start_s": startup_s,
            "rounds": args.rounds,
            "first_chunk_ms": {k: [x * 1e3 for x in v] for k, v in result["first"].items()},
            "cpu_ms": {k: [x * 1e3 for x in v] for k, v in result["cpu"].items()},
            "median_first_chunk_ms": first_ms,
            "mean_cpu_ms_per_message": cpu_ms,
            "cold_long": {"first_chunk_ms": cold_first * 1e3, "cpu_ms": cold_cpu * 1e3},
            "ratios": ratios,
            "targets_met": targets,
        },
    )


if __name__ == "__main__":
    main()
