"""The one small interface every LLM provider implements.

A provider turns Chat Completions ``messages`` into an async iterator of :class:`Delta`,
the shape of an OpenAI streaming chunk reduced to what the log records: the ``delta``
text, the ``finish_reason`` and the ``usage`` object. It also tells the size of its
model's context window and what a message costs in it (DESIGN.md "Context window"), so
:func:`server.context.fit` can build a prompt that fits:

* ``context_tokens``: the window, prompt and reply together, in tokens;
* ``max_reply_tokens``: the reply budget (``--max-reply-tokens``), in tokens;
* ``prompt_overhead_tokens``: what every prompt takes besides its messages (a BOS token,
  a default system text the chat template adds, the header the reply starts after);
* ``count_tokens(role, text)``: what one message takes, its text plus the chat
  template's overhead per message (and a margin where the count is an estimate).

A prompt of messages ``m`` then takes ``prompt_overhead_tokens + sum(count_tokens(m))``
tokens. Counting per message, not per rendered prompt, lets a count be cached per text
and lets ``fit`` stop at the first turn that no longer fits.
"""

from __future__ import annotations

import math
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any, Final, Protocol

__all__ = [
    "ESTIMATE_MESSAGE_TOKENS",
    "ESTIMATE_PROMPT_TOKENS",
    "Delta",
    "Provider",
    "ProviderError",
    "estimate_tokens",
]

ESTIMATE_MESSAGE_TOKENS: Final = 8
"""Tokens an estimated message takes besides its text: the chat template's role header
and end marker (SmolLM2's ChatML ``<|im_start|>user\\n…<|im_end|>\\n``: 6, measured
with its tokenizer; Llama 3's headers: 5), with room to spare."""
ESTIMATE_PROMPT_TOKENS: Final = 32
"""Tokens an estimated prompt takes besides its messages: BOS, the assistant header the
reply follows, and a default system text a template may add (SmolLM2: 24 in all)."""


def estimate_tokens(text: str) -> int:
    """An upper estimate of the tokens ``text`` takes, with no tokenizer: a token per 3
    ASCII characters, plus 2/3 more per digit (a digit each), plus one per 1.5 bytes of
    UTF-8 of other characters; rounded up.

    Measured with SmolLM2's tokenizer (49,152 byte-level BPE tokens, English-centric):
    English takes 4.9 bytes a token (prose) to 5.5 (this project's test questions), so
    a third of ASCII over-counts it by 45 to 65 percent: that is the safety margin (33
    percent at OpenAI's rule of thumb of 4 characters a token for its tokenizers).
    Digits take one token each (``3.14159…``: one byte a token), Japanese 1.7 bytes a
    token (1.8 tokens a character), both covered here; models with larger vocabularies
    take fewer, so this over-counts them. Text that
    tokenizes worse still (random bytes, rare scripts) can beat it: an upstream that then
    refuses the prompt says so ("the prompt does not fit the model's context").
    """
    data = text.encode("utf-8", "surrogatepass")
    ascii_chars = len(data) if text.isascii() else len(text.encode("ascii", "ignore"))
    other_bytes = len(data) - ascii_chars
    digits = len(data) - len(data.translate(None, b"0123456789"))  # one pass in C
    return math.ceil(ascii_chars / 3 + digits * 2 / 3 + other_bytes / 1.5)


@dataclass(frozen=True, slots=True)
class Delta:
    """One streamed piece of a reply.

    :ivar text: ``choices[0].delta.content`` ("" when null or absent).
    :ivar finish_reason: ``choices[0].finish_reason`` of the last chunk, else ``None``.
    :ivar usage: the ``usage`` object (token counts) of the final chunk, else ``None``.
    """

    text: str = ""
    finish_reason: str | None = None
    usage: dict[str, Any] | None = None


class ProviderError(Exception):
    """The provider could not produce (the rest of) a reply. ``str()`` is a sentence a
    person can read; it is stored as the ``end`` record's ``error``."""


class Provider(Protocol):
    """An LLM behind ``--llm``.

    :ivar name: the ``--llm`` value (``demo``, ``openai``, ``local``).
    :ivar model: the model name recorded in ``conversation``/``start`` records.
    :ivar context_tokens: the model's context window (prompt plus reply), in tokens.
    :ivar max_reply_tokens: the reply budget, in tokens: a reply is cut (``length``) there.
    :ivar prompt_overhead_tokens: tokens every prompt takes besides its messages.
    """

    name: str
    model: str
    context_tokens: int
    max_reply_tokens: int
    prompt_overhead_tokens: int

    def stream(
        self, messages: list[dict[str, str]], *, model: str, max_tokens: int | None = None
    ) -> AsyncIterator[Delta]:
        """Stream a reply to ``messages`` (``[{"role", "content"}]``) of at most
        ``max_tokens`` tokens (``None``: :attr:`max_reply_tokens`).

        :raises ProviderError: the reply cannot be produced or broke off.
        """
        ...

    async def count_tokens(self, role: str, text: str) -> int:
        """Tokens a message of ``role`` with ``text`` takes in a prompt: its text as the
        model's tokenizer counts it (or an upper estimate), plus the chat template's
        overhead per message.

        :raises ProviderError: the tokenizer is not available.
        """
        ...

    async def start(self) -> None:
        """Acquire what the provider needs (a child process, a client)."""
        ...

    async def close(self) -> None:
        """Release it."""
        ...
