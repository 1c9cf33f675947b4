"""``--llm openai``: any OpenAI-compatible Chat Completions endpoint, streamed.

Uses the official ``openai`` SDK (``AsyncOpenAI``) with ``stream: true`` and
``stream_options.include_usage``, so the final chunk carries ``usage``. Works with OpenAI,
Ollama's ``/v1``, llama.cpp's server, vLLM and LM Studio. The API key comes from the
``OPENAI_API_KEY`` environment variable (never the command line); local servers need none.

Every failure ends as a :class:`ProviderError` with a readable sentence: an unreachable
upstream, an HTTP error status, an ``error`` object sent mid-stream, a stream that stalls
longer than the read timeout, and a stream that stops without a ``finish_reason``.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from typing import Any

import openai

from .base import Delta, ProviderError

__all__ = ["OpenAIProvider"]


class OpenAIProvider:
    """Streams from ``{base_url}/chat/completions``.

    :param base_url: e.g. ``https://api.openai.com/v1`` or ``http://127.0.0.1:11434/v1``.
    :param model: model name sent with every request (and recorded in the log).
    :param api_key: defaults to ``$OPENAI_API_KEY``; a placeholder when unset.
    :param connect_timeout: seconds to open a connection.
    :param read_timeout: longest silence, in seconds, between two streamed chunks.
    :param max_tokens: cap on a reply's length in tokens (``None``: the server's default).
    """

    name = "openai"

    def __init__(
        self,
        *,
        base_url: str,
        model: str,
        api_key: str | None = None,
        connect_timeout: float = 10.0,
        read_timeout: float = 120.0,
        max_tokens: int | None = None,
    ) -> None:
        self.base_url = base_url
        self.model = model
        self.max_tokens = max_tokens
        self._client = openai.AsyncOpenAI(
            base_url=base_url,
            api_key=api_key or os.environ.get("OPENAI_API_KEY") or "unused",
            timeout=openai.Timeout(read_timeout, connect=connect_timeout),
            max_retries=0,
        )

    async def start(self) -> None:
        return None

    async def close(self) -> None:
        await self._client.close()

    async def stream(
        self, messages: list[dict[str, str]], *, model: str | None = None
    ) -> AsyncIterator[Delta]:
        """Yield one :class:`Delta` per streamed chunk that has content, a
        ``finish_reason`` or ``usage``.

        :raises ProviderError: see the module docstring.
        """
        finished = False
        try:
            response = await self._client.chat.completions.create(
                model=model or self.model,
                messages=messages,  # type: ignore[arg-type]
                stream=True,
                stream_options={"include_usage": True},
                **({"max_tokens": self.max_tokens} if self.max_tokens else {}),
            )
            async with response:
                async for chunk in response:
                    delta = _delta(chunk)
                    if delta is None:
                        continue
                    finished = finished or delta.finish_reason is not None
                    yield delta
        except openai.APITimeoutError:
            raise ProviderError(f"the model server at {self.base_url} stopped answering") from None
        except openai.APIConnectionError as exc:
            raise ProviderError(
                f"cannot reach the model server at {self.base_url}: {_cause(exc)}"
            ) from None
        except openai.APIStatusError as exc:
            raise ProviderError(
                f"the model server answered {exc.status_code}: {_message(exc)}"
            ) from None
        except openai.APIError as exc:
            raise ProviderError(f"the model server reported an error: {_message(exc)}") from None
        if not finished:
            raise ProviderError("the model server ended the stream before the reply finished")


def _delta(chunk: Any) -> Delta | None:
    text = ""
    finish_reason = None
    if chunk.choices:
        choice = chunk.choices[0]
        if choice.delta is not None and choice.delta.content:
            text = choice.delta.content
        finish_reason = choice.finish_reason
    usage = chunk.usage.model_dump(exclude_none=True) if chunk.usage else None
    if not text and finish_reason is None and usage is None:
        return None
    return Delta(text=text, finish_reason=finish_reason, usage=usage)


def _message(exc: openai.APIError) -> str:
    body = exc.body
    if isinstance(body, dict):
        error = body.get("error", body)
        if isinstance(error, dict) and error.get("message"):
            return str(error["message"])
        if isinstance(error, str):
            return error
    return exc.message or type(exc).__name__


def _cause(exc: BaseException) -> str:
    cause = exc.__cause__ or exc.__context__
    return str(cause) if cause and str(cause) else "connection failed"
