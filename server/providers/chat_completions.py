"""``--llm openai``: any OpenAI-compatible Chat Completions endpoint, streamed.

Uses the official ``openai`` SDK (``AsyncOpenAI``) with ``stream: true`` and
``stream_options.include_usage``, so the final chunk carries ``usage``. Works with OpenAI,
Ollama's ``/v1``, llama.cpp's server, vLLM and LM Studio. The API key comes from the
``OPENAI_API_KEY`` environment variable (never the command line); local servers need none.

Every failure ends as a :class:`ProviderError` with a readable sentence: an unreachable
upstream, an HTTP error status, an ``error`` object sent mid-stream, a stream that stalls
longer than the read timeout, and a stream that stops without a ``finish_reason``. An
upstream refusing a prompt that exceeds its context (an ``error.code`` of
``context_length_exceeded``, as OpenAI, vLLM and llama-cpp-python send, or a message about
the context length, window or size) says so: "the prompt does not fit the model's
context: <its message>". llama-cpp-python's server refuses it only after it has begun
the stream (its ``200`` sent, it ends the stream with nothing in it), so a stream that
ends before any delta is asked again without streaming and with ``max_tokens`` 1, where
that server answers ``400 context_length_exceeded`` (:meth:`OpenAIProvider._refusal`).

The context window is ``--context-tokens`` (:data:`DEFAULT_CONTEXT_TOKENS` when not
given). The Chat Completions API has no tokenizer endpoint, and the models behind it
tokenize differently (``tiktoken`` knows OpenAI's encodings only, and loads their BPE
files from the internet at run time), so a message is counted by an upper estimate:
:func:`~server.providers.base.estimate_tokens` of its text plus
:data:`~server.providers.base.ESTIMATE_MESSAGE_TOKENS`.
"""

from __future__ import annotations

import os
import re
from collections.abc import AsyncIterator
from typing import Any, Final

import openai

from .base import (
    ESTIMATE_MESSAGE_TOKENS,
    ESTIMATE_PROMPT_TOKENS,
    Delta,
    ProviderError,
    estimate_tokens,
)

__all__ = ["DEFAULT_CONTEXT_TOKENS", "DEFAULT_MAX_REPLY_TOKENS", "OVERFLOW", "OpenAIProvider"]

DEFAULT_CONTEXT_TOKENS: Final = 8192
"""The window assumed without ``--context-tokens``: every current chat model has at
least this (OpenAI's and Llama 3's have more), and it bounds what each message of a long
conversation costs on a paid API. A server with a smaller window (Ollama runs models
with 2048 or 4096 unless told otherwise) needs ``--context-tokens``."""
DEFAULT_MAX_REPLY_TOKENS: Final = 1024
"""The reply budget when none is given (``--max-reply-tokens``' default)."""
OVERFLOW: Final = "the prompt does not fit the model's context"
"""How an upstream's refusal of a too-long prompt begins its ``end.error``."""
_OVERFLOW_MESSAGE: Final = re.compile(
    r"context[ _](length|window|size)|maximum context|exceeds? (the )?(available )?context"
    r"|prompt is too long|too many tokens",
    re.IGNORECASE,
)


class OpenAIProvider:
    """Streams from ``{base_url}/chat/completions``.

    :param base_url: e.g. ``https://api.openai.com/v1`` or ``http://127.0.0.1:11434/v1``.
    :param model: model name sent with every request (and recorded in the log).
    :param api_key: defaults to ``$OPENAI_API_KEY``; a placeholder when unset.
    :param connect_timeout: seconds to open a connection.
    :param read_timeout: longest silence, in seconds, between two streamed chunks.
    :param max_tokens: the reply budget in tokens (``None``: :data:`DEFAULT_MAX_REPLY_TOKENS`).
    :param context_tokens: the model's context window in tokens (``None``:
        :data:`DEFAULT_CONTEXT_TOKENS`).
    """

    name = "openai"
    prompt_overhead_tokens = ESTIMATE_PROMPT_TOKENS

    def __init__(
        self,
        *,
        base_url: str,
        model: str,
        api_key: str | None = None,
        connect_timeout: float = 10.0,
        read_timeout: float = 120.0,
        max_tokens: int | None = None,
        context_tokens: int | None = None,
    ) -> None:
        self.base_url = base_url
        self.model = model
        self.max_reply_tokens = max_tokens or DEFAULT_MAX_REPLY_TOKENS
        self.context_tokens = context_tokens or DEFAULT_CONTEXT_TOKENS
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

    async def count_tokens(self, role: str, text: str) -> int:
        """An upper estimate (see the module's docstring); ``role`` does not change it."""
        return estimate_tokens(text) + ESTIMATE_MESSAGE_TOKENS

    async def stream(
        self,
        messages: list[dict[str, str]],
        *,
        model: str | None = None,
        max_tokens: int | None = None,
    ) -> AsyncIterator[Delta]:
        """Yield one :class:`Delta` per streamed chunk that has content, a
        ``finish_reason`` or ``usage``; the request's ``max_tokens`` is ``max_tokens``,
        else :attr:`max_reply_tokens`.

        :raises ProviderError: see the module docstring.
        """
        finished = began = False
        try:
            response = await self._client.chat.completions.create(
                model=model or self.model,
                messages=messages,  # type: ignore[arg-type]
                stream=True,
                stream_options={"include_usage": True},
                max_tokens=max_tokens or self.max_reply_tokens,
            )
            async with response:
                async for chunk in response:
                    delta = _delta(chunk)
                    if delta is None:
                        continue
                    began = True
                    finished = finished or delta.finish_reason is not None
                    yield delta
        except openai.APITimeoutError:
            raise ProviderError(f"the model server at {self.base_url} stopped answering") from None
        except openai.APIConnectionError as exc:
            raise ProviderError(
                f"cannot reach the model server at {self.base_url}: {_cause(exc)}"
            ) from None
        except openai.APIStatusError as exc:
            if _is_overflow(exc):
                raise ProviderError(f"{OVERFLOW}: {_message(exc)}") from None
            raise ProviderError(
                f"the model server answered {exc.status_code}: {_message(exc)}"
            ) from None
        except openai.APIError as exc:
            if _is_overflow(exc):
                raise ProviderError(f"{OVERFLOW}: {_message(exc)}") from None
            raise ProviderError(f"the model server reported an error: {_message(exc)}") from None
        if not finished:
            refusal = None if began else await self._refusal(messages, model or self.model)
            raise ProviderError(
                refusal or "the model server ended the stream before the reply finished"
            )

    async def _refusal(self, messages: list[dict[str, str]], model: str) -> str | None:
        """Why the upstream refuses ``messages``, if it is for their length: the same
        request without streaming and with ``max_tokens`` 1 (a prompt that fits costs
        one token of reply). ``None``: it does not say so. Tried twice if the connection
        fails: llama-cpp-python's server closes the one its broken stream came on, and the
        client may take that connection from its pool first."""
        for _ in range(2):
            try:
                await self._client.chat.completions.create(
                    model=model,
                    messages=messages,  # type: ignore[arg-type]
                    max_tokens=1,
                )
            except openai.APITimeoutError:
                return None
            except openai.APIConnectionError:
                continue
            except openai.OpenAIError as exc:
                if isinstance(exc, openai.APIError) and _is_overflow(exc):
                    return f"{OVERFLOW}: {_message(exc)}"
            return None
        return None


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


def _is_overflow(exc: openai.APIError) -> bool:
    """Whether the upstream refused the prompt for its length: ``code``
    ``context_length_exceeded``, or a message about the context (length, window, size)."""
    body = exc.body
    error = body.get("error", body) if isinstance(body, dict) else None
    if isinstance(error, dict) and error.get("code") == "context_length_exceeded":
        return True
    return bool(_OVERFLOW_MESSAGE.search(_message(exc)))


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
