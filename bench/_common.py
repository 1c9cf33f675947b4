"""Shared pieces of the benchmarks: server subprocesses, a lean SSE client, results.

The client is a raw ``asyncio.Protocol`` speaking HTTP/1.1 (chunked transfer decoding
included), not aiohttp's client: it costs a few microseconds per event, so on a 2-core
machine most of the CPU is left to the server under test.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import platform
import resource
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
HOST = "127.0.0.1"


def raise_nofile(want: int | None = None) -> int:
    """Raise this process's soft open-file limit (up to the hard one); return it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if want is None else min(hard, max(soft, want))
    if target != soft:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return sock.getsockname()[1]


def wait_port(port: int, process: subprocess.Popen, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server on port {port} exited with {process.returncode}")
        with socket.socket() as sock:
            if sock.connect_ex((HOST, port)) == 0:
                return
        time.sleep(0.05)
    raise TimeoutError(f"server on port {port} did not start in {timeout} s")


def start_chatledger(
    data_dir: Path,
    *args: str,
    port: int | None = None,
    timeout: float = 60.0,
    package: Path | None = None,
) -> tuple[int, subprocess.Popen]:
    """Start ``python -m chatledger serve`` on loopback; its output goes to a file.
    ``package``: a directory holding another ``chatledger`` package (a baseline) that
    the server runs instead of this one (first on ``PYTHONPATH``)."""
    port = port or free_port()
    data_dir.mkdir(parents=True, exist_ok=True)
    env = None
    if package is not None:
        env = {
            **os.environ,
            "PYTHONPATH": f"{package}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
        }
    with open(data_dir.parent / f"server-{port}.log", "wb") as out:
        argv = ["-m", "chatledger", "serve", "--host", HOST, "--port", str(port),
                "--data-dir", str(data_dir), *args]  # fmt: skip
        return port, _launch(argv, port, timeout, out, env=env)


def start_script(script: str, *args: str, timeout: float = 60.0) -> tuple[int, subprocess.Popen]:
    """Start a helper server mode of a bench script (``--serve-... PORT``)."""
    port = free_port()
    argv = [script, *args, "--port", str(port)]
    return port, _launch(argv, port, timeout, subprocess.DEVNULL)


def _launch(
    argv: list[str], port: int, timeout: float, out: Any, env: dict[str, str] | None = None
) -> subprocess.Popen:
    """Run ``python *argv`` from the project root and wait until it listens on ``port``."""
    process = subprocess.Popen(
        [sys.executable, *argv], cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, env=env
    )
    try:
        wait_port(port, process, timeout)
    except BaseException:
        stop(process)
        raise
    return process


def stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(5)


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


def percentile(values: list[float], q: float) -> float:
    """``q``-th percentile (0-100), nearest rank; NaN for no values."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    rank = max(0, min(len(ordered) - 1, round(q / 100 * len(ordered) + 0.5) - 1))
    return ordered[rank]


def machine() -> dict[str, Any]:
    return {
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "platform": platform.platform(),
    }


def write_result(name: str, result: dict[str, Any]) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    result = {
        "benchmark": name,
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": machine(),
        **result,
    }
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    return path


def pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


# -- a lean SSE client ----------------------------------------------------------------------

EventsHandler = Callable[[bytes, float], bool]
"""Called with a run of complete events (ending in a blank line) and the receive time
(``time.time()``); returns True to close the stream."""


class SSEClient(asyncio.Protocol):
    """One HTTP/1.1 request whose answer is read as an event stream.

    :ivar status: HTTP status, once the head arrived.
    :ivar head_received: ``time.perf_counter()`` when the response head arrived.
    :ivar done: resolved when the stream ends (handler asked, server closed, or error).
    """

    def __init__(self, request: bytes, handler: EventsHandler | None = None) -> None:
        self.request = request
        self.handler = handler
        self.status: int | None = None
        self.head_received: float | None = None
        self.error: str | None = None
        loop = asyncio.get_running_loop()
        self.head: asyncio.Future[None] = loop.create_future()
        self.done: asyncio.Future[None] = loop.create_future()
        self.transport: asyncio.Transport | None = None
        self._head_buffer = b""
        self._chunked = False
        self._raw = b""
        self._left = 0  # bytes left in the current chunk's data
        self._state = "size"  # size | data | crlf | end
        self._events = b""
        self.body_bytes = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        transport.write(self.request)  # type: ignore[attr-defined]

    def data_received(self, data: bytes) -> None:
        now = time.time()
        if self.status is None:
            self._head_buffer += data
            end = self._head_buffer.find(b"\r\n\r\n")
            if end < 0:
                return
            head, data = self._head_buffer[:end], self._head_buffer[end + 4 :]
            self._head_buffer = b""
            lines = head.split(b"\r\n")
            self.status = int(lines[0].split()[1])
            self.head_received = time.perf_counter()
            for line in lines[1:]:
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"transfer-encoding" and b"chunked" in value.lower():
                    self._chunked = True
            if not self.head.done():
                self.head.set_result(None)
        body = self._dechunk(data) if self._chunked else data
        if not body:
            return
        self.body_bytes += len(body)
        self._events += body
        cut = self._events.rfind(b"\n\n")
        if cut < 0:
            return
        complete, self._events = self._events[: cut + 2], self._events[cut + 2 :]
        if self.handler is not None and self.handler(complete, now):
            self.close()

    def _dechunk(self, data: bytes) -> bytes:
        raw = self._raw + data if self._raw else data
        out = []
        pos, size = 0, len(raw)
        while pos < size:
            if self._state == "data":
                take = min(self._left, size - pos)
                out.append(raw[pos : pos + take])
                pos += take
                self._left -= take
                if self._left == 0:
                    self._state = "crlf"
            elif self._state == "crlf":
                if size - pos < 2:
                    break
                pos += 2
                self._state = "size"
            elif self._state == "size":
                end = raw.find(b"\r\n", pos)
                if end < 0:
                    break
                self._left = int(raw[pos:end].split(b";")[0], 16)
                pos = end + 2
                self._state = "data" if self._left else "end"
            else:  # end of the body
                pos = size
                self.close()
        self._raw = raw[pos:]
        return b"".join(out)

    def close(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.close()
        if not self.done.done():
            self.done.set_result(None)

    def connection_lost(self, exc: Exception | None) -> None:
        if exc is not None:
            self.error = repr(exc)
        if not self.head.done():
            self.head.set_exception(ConnectionError(self.error or "closed before the head"))
        if not self.done.done():
            self.done.set_result(None)


def http_request(
    method: str,
    port: int,
    path: str,
    *,
    body: bytes = b"",
    headers: dict[str, str] | None = None,
) -> bytes:
    lines = [f"{method} {path} HTTP/1.1", f"Host: {HOST}:{port}", "Accept: text/event-stream"]
    for name, value in (headers or {}).items():
        lines.append(f"{name}: {value}")
    if body or method == "POST":
        lines.append("Content-Type: application/json")
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


async def open_sse(
    port: int,
    method: str,
    path: str,
    handler: EventsHandler | None = None,
    *,
    body: bytes = b"",
    headers: dict[str, str] | None = None,
) -> SSEClient:
    """Connect and send the request; the returned client reads the stream as it comes."""
    loop = asyncio.get_running_loop()
    request = http_request(method, port, path, body=body, headers=headers)
    _, client = await loop.create_connection(lambda: SSEClient(request, handler), HOST, port)
    return client


async def create_conversation(session: Any, port: int, title: str = "bench") -> str:
    async with session.post(
        f"http://{HOST}:{port}/api/conversations", json={"title": title}
    ) as response:
        response.raise_for_status()
        return (await response.json())["id"]


# -- profiles ---------------------------------------------------------------------------------


def py_spy(pid: int, seconds: float, out: Path, rate: int = 200):
    """Start ``py-spy record`` (collapsed stacks, all threads) on ``pid`` for ``seconds``;
    returns the process, or None when py-spy is not installed."""
    if shutil.which("py-spy") is None:
        return None
    return subprocess.Popen(
        ["py-spy", "record", "-p", str(pid), "-d", str(max(1, round(seconds))), "-r", str(rate),
         "--format", "raw", "-o", str(out), "--nonblocking"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip


def _frame(text: str) -> str:
    """``func (path/file.py:line)`` -> ``func (file.py)``."""
    name, _, where = text.partition(" (")
    return f"{name} ({where.rsplit('/', 1)[-1].split(':')[0].rstrip(')')})" if where else name


def summarize_profile(path: Path, top: int = 15) -> dict[str, list[tuple[str, float]]]:
    """Self and inclusive share of samples per function from a py-spy collapsed file.

    Only the event loop thread counts: stacks of worker threads (``asyncio.to_thread``,
    which py-spy samples only while they run) are left out. Shares are of the samples in
    which the event loop thread was busy.
    """
    selfs: dict[str, int] = {}
    incl: dict[str, int] = {}
    total = 0
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or stack.startswith("Thread._bootstrap"):
            continue
        n = int(count)
        total += n
        frames = [_frame(f) for f in stack.split(";")]
        if frames:
            selfs[frames[-1]] = selfs.get(frames[-1], 0) + n
        for frame in set(frames):
            incl[frame] = incl.get(frame, 0) + n
    if not total:
        return {"self": [], "inclusive": []}

    def ranked(table: dict[str, int]) -> list[tuple[str, float]]:
        rows = sorted(table.items(), key=lambda kv: -kv[1])[:top]
        return [(name, round(100 * n / total, 1)) for name, n in rows]

    return {"self": ranked(selfs), "inclusive": ranked(incl), "samples": total}


# -- logs written before a server starts -------------------------------------------------------


def write_conversation(
    directory: Path,
    *,
    chunks_per_reply: int,
    megabytes: float | None = None,
    replies: int | None = None,
    chunk_text: str = " word",
) -> tuple[str, int]:
    """Write one conversation log straight into ``directory`` (``conversations/``) with
    ``storage.records``: replies of ``chunks_per_reply`` chunks each (``user``, ``start``,
    chunks, ``end``), until the log reaches ``megabytes`` MB or has ``replies`` replies;
    fsynced. Returns (conversation id, size in bytes)."""
    from chatledger.storage import new_id, records

    conversation_id = new_id()
    directory.mkdir(parents=True, exist_ok=True)
    target = int(megabytes * 1_000_000) if megabytes is not None else None
    first = records.conversation(
        conversation_id=conversation_id, title="long", model="demo", system="Be brief."
    )
    size = 0
    with open(directory / f"{conversation_id}.jsonl", "wb") as out:
        buffer = [records.encode(first)]
        n = 0
        while (target is None or size < target) and (replies is None or n < replies):
            message = records.user(message_id=new_id(), text=f"question {n}: tell me more")
            reply_id = new_id()
            buffer.append(records.encode(message))
            buffer.append(
                records.encode(
                    records.start(reply_id=reply_id, reply_to=message["id"], model="demo")
                )
            )
            for i in range(chunks_per_reply):
                buffer.append(
                    records.encode(records.chunk(reply_id=reply_id, i=i, text=chunk_text))
                )
                if len(buffer) > 20000:
                    data = b"".join(buffer)
                    out.write(data)
                    size += len(data)
                    buffer = []
            buffer.append(records.encode(records.end(reply_id=reply_id, finish="stop")))
            n += 1
            data = b"".join(buffer)
            out.write(data)
            size += len(data)
            buffer = []
        out.flush()
        os.fsync(out.fileno())
    return conversation_id, size


@contextlib.contextmanager
def baseline(rev: str) -> Iterator[Path]:
    """A ``git worktree`` of ``rev`` (the code before a change), as a directory to give
    :func:`start_chatledger` as ``package``: the "off" side of an A/B in one run."""
    work = Path(tempfile.mkdtemp(prefix="chatledger-baseline-"))
    tree = work / "tree"
    subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(tree), rev],
                   check=True, capture_output=True)  # fmt: skip
    (work / "pkg").mkdir()
    (work / "pkg" / "chatledger").symlink_to(tree)
    try:
        yield work / "pkg"
    finally:
        subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(tree)],
                       capture_output=True)  # fmt: skip
        shutil.rmtree(work, ignore_errors=True)


def cpu_seconds(pid: int) -> float:
    """CPU seconds the process ``pid`` has run, to the nanosecond: the sum over its
    threads of the first field of ``/proc/<pid>/task/<tid>/schedstat`` (time on a CPU,
    ns; Linux ``Documentation/scheduler/sched-stats.rst``). ``/proc/<pid>/stat`` counts in
    10 ms ticks, too coarse for one message of a few ms. Threads that have exited are no
    longer counted: measure across spans in which the worker threads live on (asyncio's
    default executor keeps its threads)."""
    total = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            total += int((task / "schedstat").read_text().split()[0])
        except (FileNotFoundError, ProcessLookupError):
            continue  # the thread exited meanwhile
    return total / 1e9
