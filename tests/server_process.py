"""Run ``chatledger serve`` as a real child process on a free loopback port."""

from __future__ import annotations

import contextlib
import os
import resource
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _limit_files(nofile: int) -> None:
    resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, nofile))


@dataclass
class ServerProcess:
    process: subprocess.Popen
    url: str
    startup_line: str
    log_path: Path

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")


@contextlib.contextmanager
def serve(
    data_dir: Path,
    *args: str,
    port: int | None = None,
    timeout: float = 60.0,
    nofile: int | None = None,
) -> Iterator[ServerProcess]:
    """Start ``python -m chatledger serve`` and yield once its startup line is printed.
    The process is terminated on exit if it still runs. ``nofile`` sets its open-file
    limit, soft and hard (as ``prlimit --nofile=N:N`` would)."""
    port = port or free_port()
    log_path = data_dir.parent / f"server-{port}-{time.monotonic_ns()}.out"
    data_dir.mkdir(parents=True, exist_ok=True)
    with open(log_path, "wb") as out:
        process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "chatledger",
                "serve",
                "--port",
                str(port),
                "--data-dir",
                str(data_dir),
                *args,
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=Path(__file__).resolve().parent.parent,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
            preexec_fn=None if nofile is None else lambda: _limit_files(nofile),
        )
    try:
        deadline = time.monotonic() + timeout
        line = ""
        while not line:
            text = log_path.read_text(errors="replace")
            line = next((x for x in text.splitlines() if " serving http://" in x), "")
            if process.poll() is not None:
                raise RuntimeError(f"server exited with {process.returncode}:\n{text}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"server did not start:\n{text}")
            time.sleep(0.05)
        yield ServerProcess(process, f"http://127.0.0.1:{port}", line, log_path)
    finally:
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(15)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
