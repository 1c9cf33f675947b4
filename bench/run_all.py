"""Run the benchmarks (P1-P4, P6) one after another with modest defaults and print the
figures each one reports. Each script writes ``bench/results/<name>.json`` and ``.png``.

Usage::

    python bench/run_all.py [--quick]

The default takes about 3 minutes on 2 cores; ``--quick`` uses smaller sizes (a smoke
run of under a minute). Exits 1 if a script fails (a missed target is not a failure: each
script prints MET or MISSED per target).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent

RUNS = {
    "p1_fast_stream": (["--rounds", "3"], ["--rounds", "1", "--events", "5000"]),
    "p2_many_replies": (["--rounds", "3", "--profile"], ["--rounds", "1", "--tokens", "60"]),
    "p3_resume": (["--rounds", "20"], ["--rounds", "5", "--mb", "20"]),
    "p4_idle": (["--rounds", "1"], ["--rounds", "1", "--connections", "2000"]),
    "p6_open": (["--rounds", "15"], ["--rounds", "3", "--mb", "20"]),  # about 35 s
}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    failed = []
    for name, (normal, quick) in RUNS.items():
        argv = [sys.executable, str(HERE / f"{name}.py"), *(quick if args.quick else normal)]
        print(f"== {name}: {' '.join(argv[1:])}", flush=True)
        started = time.monotonic()
        try:
            code = subprocess.run(argv, timeout=20 * 60).returncode
        except subprocess.TimeoutExpired:
            code = "timeout"
        print(f"== {name}: exit {code} in {time.monotonic() - started:.0f} s\n", flush=True)
        if code != 0:
            failed.append(name)
    if failed:
        print(f"failed: {', '.join(failed)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
