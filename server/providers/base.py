"""The one small interface every LLM provider implements.

A provider turns Chat Completions ``messages`` into an async iterator of :class:`Delta`,
the shape of an OpenAI streaming chunk reduced to what the log records: the ``delta``
text, the ``finish_reason`` and the ``usage`` object.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any, Protocol

__all__ = ["Delta", "Provider", "ProviderError"]


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
    """

    name: str
    model: str

    def stream(self, messages: list[dict[str, str]], *, model: str) -> AsyncIterator[Delta]:
        """Stream a reply to ``messages`` (``[{"role", "content"}]``).

        :raises ProviderError: the reply cannot be produced or broke off.
        """
        ...

    async def start(self) -> None:
        """Acquire what the provider needs (a child process, a client)."""
        ...

    async def close(self) -> None:
        """Release it."""
        ...
