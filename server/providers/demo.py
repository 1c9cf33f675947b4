"""``--llm demo``: an offline, deterministic provider.

It answers with made-up text drawn from a fixed vocabulary by a PRNG seeded with the
prompt, so the same prompt gives the same answer, at ``tokens_per_s`` tokens per second
(0: as fast as the event loop allows). It needs no network and no model, so the server
runs with no setup, and tests and benchmarks have a provider whose pace they control.
"""

from __future__ import annotations

import asyncio
import hashlib
import heapq
import itertools
import random
from collections.abc import AsyncIterator

from .base import (
    ESTIMATE_MESSAGE_TOKENS,
    ESTIMATE_PROMPT_TOKENS,
    Delta,
    estimate_tokens,
)

__all__ = ["DEMO_PROMPT_TOKENS", "DemoProvider"]

DEMO_PROMPT_TOKENS = 8192
"""Room for the prompt in the demo's window when no ``context_tokens`` is given: its
window is this plus its reply length, so a reply is never cut by the window however long
``--demo-reply-tokens`` is, and a prompt never grows past this however long the
conversation is (what a real model's window does to the cost of a message)."""

_WORDS = [
    "the",
    "log",
    "keeps",
    "every",
    "word",
    "in",
    "order",
    "so",
    "a",
    "reply",
    "can",
    "be",
    "read",
    "again",
    "exactly",
    "as",
    "it",
    "was",
    "shown",
    "and",
    "a",
    "page",
    "that",
    "reconnects",
    "picks",
    "up",
    "where",
    "it",
    "left",
    "off",
    "without",
    "a",
    "gap",
    "or",
    "a",
    "duplicate",
    "because",
    "each",
    "event",
    "carries",
    "the",
    "byte",
    "offset",
    "after",
    "its",
    "record",
    "while",
    "the",
    "model",
    "writes",
    "one",
    "token",
    "at",
    "a",
    "time",
    "and",
    "the",
    "server",
    "appends",
    "each",
    "chunk",
    "before",
    "any",
    "browser",
    "sees",
    "it",
    "which",
    "is",
    "what",
    "makes",
    "the",
    "history",
    "trustworthy",
    "for",
    "a",
    "family",
]


class Pacer:
    """Wakes paced streams at their due times from one loop timer.

    A heap of ``(due, sequence, future)``; one ``call_at`` armed for the earliest due time,
    which on firing wakes every stream then due. 1,000 demo replies at 20 tokens/s would
    otherwise arm and free 20,000 loop timers a second (about 7 us each with uvloop,
    against 3.5 us here): CPU a real provider, reading tokens from a socket, never spends.
    """

    def __init__(self) -> None:
        self.loop = asyncio.get_running_loop()
        """The event loop whose time ``due`` is in."""
        self._heap: list[tuple[float, int, asyncio.Future[None]]] = []
        self._sequence = itertools.count()
        self._timer: asyncio.Handle | None = None  # uvloop: a plain Handle when due
        self._timer_due = 0.0

    def until(self, due: float) -> asyncio.Future[None]:
        """A future that resolves at loop time ``due`` (s) or soon after."""
        future = self.loop.create_future()
        heapq.heappush(self._heap, (due, next(self._sequence), future))
        if self._timer is None or due < self._timer_due:
            self._arm(due)
        return future

    def _arm(self, due: float) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer = self.loop.call_at(due, self._fire)
        self._timer_due = due

    def _fire(self) -> None:
        self._timer = None
        now, heap = self.loop.time(), self._heap
        while heap and heap[0][0] <= now:
            future = heapq.heappop(heap)[2]
            if not future.done():  # a cancelled stream cancels its future
                future.set_result(None)
        if heap:
            self._arm(heap[0][0])


class DemoProvider:
    """Deterministic made-up replies.

    Its window and token counts are the ``openai`` provider's estimate
    (:func:`~server.providers.base.estimate_tokens`), so prompts are fitted in every test
    and benchmark as they are with a real model.

    :param tokens_per_s: pace of the stream; 0 yields as fast as possible.
    :param reply_tokens: tokens per reply, and the reply budget.
    :param context_tokens: the window in tokens (``None``: :data:`DEMO_PROMPT_TOKENS`
        plus ``reply_tokens``).
    """

    name = "demo"
    model = "demo"
    prompt_overhead_tokens = ESTIMATE_PROMPT_TOKENS

    def __init__(
        self,
        *,
        tokens_per_s: float = 30.0,
        reply_tokens: int = 60,
        context_tokens: int | None = None,
    ) -> None:
        if tokens_per_s < 0 or reply_tokens < 1:
            raise ValueError("tokens_per_s must be >= 0 and reply_tokens >= 1")
        self.tokens_per_s = tokens_per_s
        self.reply_tokens = reply_tokens
        self.max_reply_tokens = reply_tokens
        self.context_tokens = context_tokens or DEMO_PROMPT_TOKENS + reply_tokens
        self._pacer: Pacer | None = None

    async def start(self) -> None:
        return None

    async def close(self) -> None:
        return None

    async def count_tokens(self, role: str, text: str) -> int:
        """The estimate of the ``openai`` provider."""
        return estimate_tokens(text) + ESTIMATE_MESSAGE_TOKENS

    async def stream(
        self,
        messages: list[dict[str, str]],
        *,
        model: str = "demo",
        max_tokens: int | None = None,
    ) -> AsyncIterator[Delta]:
        """Yield ``reply_tokens`` deltas (at most ``max_tokens``), then a final one with
        ``finish_reason`` "stop" ("length" when ``max_tokens`` cut it) and ``usage``
        (the prompt's estimate; one token per delta)."""
        seed = hashlib.sha256(repr(messages).encode()).digest()
        rng = random.Random(seed)
        loop = asyncio.get_running_loop()
        if self._pacer is None or self._pacer.loop is not loop:
            self._pacer = Pacer()
        pacer = self._pacer
        interval = 1.0 / self.tokens_per_s if self.tokens_per_s else 0.0
        due = loop.time()
        capital = True
        length = min(self.reply_tokens, max_tokens or self.reply_tokens)
        for index in range(length):
            word = rng.choice(_WORDS)
            last = index == self.reply_tokens - 1
            if capital:
                word = word.capitalize()
            end_sentence = last or rng.random() < 0.08
            token = ("" if index == 0 else " ") + word + ("." if end_sentence else "")
            capital = end_sentence
            if interval:
                due += interval
                await pacer.until(due)
            else:
                await asyncio.sleep(0)
            yield Delta(text=token)
        prompt_tokens = self.prompt_overhead_tokens + sum(
            [await self.count_tokens(m["role"], m.get("content", "")) for m in messages]
        )
        yield Delta(
            finish_reason="stop" if length == self.reply_tokens else "length",
            usage={
                "prompt_tokens": prompt_tokens,
                "completion_tokens": length,
                "total_tokens": prompt_tokens + length,
            },
        )
