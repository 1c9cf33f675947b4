"""The ``chatledger`` command.

``chatledger verify [--data-dir D]`` checks every log read-only and exits 1 if any is
wrong (:mod:`storage.verify`).

``chatledger serve [flags]`` runs the server until SIGINT or SIGTERM, then shuts down
gracefully (running replies end with ``finish: "interrupted"``, streams close after their
last event) and exits 0.
"""

from __future__ import annotations

import argparse
import gc
import logging
import resource
import sys
from pathlib import Path

import uvloop
from aiohttp import web

from ..storage import Durability
from ..storage.verify import verify_dir
from . import __version__
from .app import build_provider, init_app
from .providers import ProviderError
from .settings import Settings

__all__ = ["main", "parser"]


def _non_negative(kind: type) -> object:
    def parse(text: str) -> object:
        value = kind(text)
        if value < 0:
            raise argparse.ArgumentTypeError("must not be negative")
        return value

    parse.__name__ = kind.__name__
    return parse


def parser() -> argparse.ArgumentParser:
    """The argument parser of ``chatledger``."""
    defaults = Settings()
    top = argparse.ArgumentParser(
        prog="chatledger",
        description="A self-hosted chat server whose conversation log is the ground truth.",
    )
    top.add_argument("--version", action="version", version=f"chatledger {__version__}")
    commands = top.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="run the chat server")
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (127.0.0.1)")
    serve.add_argument("--port", type=int, default=8080, help="TCP port (8080)")
    serve.add_argument(
        "--data-dir",
        type=Path,
        default=defaults.data_dir,
        help="where logs live (./chatledger-data)",
    )
    serve.add_argument(
        "--durability",
        choices=[d.value for d in Durability],
        default=defaults.durability.value,
        help="fsync: fdatasync before a record is shown (default); flush: write() only",
    )
    serve.add_argument(
        "--keepalive",
        type=_non_negative(float),
        default=defaults.keepalive,
        help="seconds without an event before a ': keep-alive' comment (15)",
    )
    serve.add_argument(
        "--llm",
        choices=["demo", "openai", "local"],
        default=defaults.llm,
        help="demo: offline made-up answers (default); openai: any OpenAI-compatible "
        "endpoint; local: a GGUF model run by llama.cpp in a child process",
    )
    serve.add_argument(
        "--base-url",
        default=defaults.base_url,
        help="Chat Completions base URL for --llm openai (key from $OPENAI_API_KEY)",
    )
    serve.add_argument("--model", default=None, help="model name for --llm openai")
    serve.add_argument(
        "--model-path", type=Path, default=None, help="GGUF file for --llm local (SmolLM2-135M)"
    )
    serve.add_argument(
        "--max-reply-tokens",
        type=int,
        default=defaults.max_reply_tokens,
        help="cap on a reply's length in tokens for --llm openai/local (1024)",
    )
    serve.add_argument(
        "--demo-tokens-per-s",
        type=_non_negative(float),
        default=defaults.demo_tokens_per_s,
        help="pace of --llm demo in tokens per second; 0 = as fast as it can (30)",
    )
    serve.add_argument(
        "--demo-reply-tokens",
        type=int,
        default=defaults.demo_reply_tokens,
        help="tokens in a --llm demo reply (60)",
    )
    serve.add_argument(
        "--max-body-bytes",
        type=int,
        default=defaults.max_body_bytes,
        help="largest request body in bytes; larger gets 413 (262144)",
    )
    serve.add_argument(
        "--max-streams",
        type=int,
        default=defaults.max_streams,
        help="event streams open at once; more get 429 (2000; 0 = no limit)",
    )
    serve.add_argument(
        "--messages-per-minute",
        type=int,
        default=defaults.messages_per_minute,
        help="messages one client may send a minute; more get 429 (20; 0 = no limit)",
    )
    serve.add_argument(
        "--trusted-proxy",
        action="append",
        default=[],
        metavar="ADDR",
        help="a reverse proxy's address (repeatable); X-Forwarded-For from it names the client",
    )
    verify = commands.add_parser(
        "verify", help="check every conversation log, read-only; exit 1 if any is wrong"
    )
    verify.add_argument(
        "--data-dir", type=Path, default=defaults.data_dir, help="the data dir (./chatledger-data)"
    )
    return top


def verify(data_dir: Path) -> int:
    """``chatledger verify``: print a report per conversation. :returns: 0 if all are
    sound, 1 if any is wrong, 2 if there is no data dir."""
    try:
        reports = verify_dir(data_dir)
    except FileNotFoundError:
        print(f"chatledger: no conversations in {data_dir}", file=sys.stderr)
        return 2
    for report in reports:
        status = "ok  " if report.ok else "FAIL"
        running = f", reply {report.open_reply} running" if report.open_reply else ""
        print(
            f"{status} {report.conversation_id}: {report.records} records, {report.size} bytes,"
            f" {report.replies} replies{running}"
        )
        for problem in report.problems:
            print(f"     - {problem}")
    bad = sum(not r.ok for r in reports)
    print(f"{len(reports)} conversations checked, {bad} with problems")
    return 1 if bad else 0


def _raise_open_file_limit() -> None:
    # Each event stream holds a socket: let the soft limit go up to the hard one.
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def main(argv: list[str] | None = None) -> int:
    """Entry point of the console script. :returns: the exit status."""
    args = parser().parse_args(argv)
    if args.command == "verify":
        return verify(args.data_dir)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    settings = Settings(
        data_dir=args.data_dir,
        durability=Durability(args.durability),
        keepalive=args.keepalive,
        llm=args.llm,
        base_url=args.base_url,
        model=args.model,
        model_path=args.model_path,
        max_reply_tokens=args.max_reply_tokens,
        demo_tokens_per_s=args.demo_tokens_per_s,
        demo_reply_tokens=args.demo_reply_tokens,
        max_body_bytes=args.max_body_bytes,
        max_streams=args.max_streams,
        messages_per_minute=args.messages_per_minute,
        trusted_proxies=tuple(args.trusted_proxy),
    )
    try:
        provider = build_provider(settings)
        app = init_app(settings, provider=provider)
    except (ProviderError, ValueError, OSError) as exc:
        print(f"chatledger: {exc}", file=sys.stderr)
        return 2
    _raise_open_file_limit()
    host = f"[{args.host}]" if ":" in args.host else args.host
    line = (
        f"chatledger {__version__} serving http://{host}:{args.port}/ "
        f"data dir {settings.data_dir.resolve()} | llm {provider.name} ({provider.model}) "
        f"| durability {settings.durability.value}"
    )
    _tune_gc()
    web.run_app(
        app,
        host=args.host,
        port=args.port,
        print=lambda _: print(line, flush=True),
        shutdown_timeout=10.0,
        backlog=1024,  # many browsers (re)connecting at once
        loop=uvloop.new_event_loop(),  # libuv's loop: about a third less CPU per event
    )
    return 0


def _tune_gc() -> None:
    """Keep full garbage collections, which stop the event loop and so every stream, rare
    and short.

    * ``gc.freeze()``: the ~100k objects of the imported modules (aiohttp, the openai SDK,
      pydantic) live as long as the process; frozen, no collection scans them again
      (about 25 ms saved per full collection on the benchmark VM).
    * A full collection waits for 1,000 (not 10) collections of the middle generation:
      with 1,000 live streams one took 20-50 ms, each a latency spike for every stream
      (bench P2). Short-lived garbage is still collected as often as before; what waits
      longer is cyclic garbage that survived two collections, a small amount here.
    """
    gc.collect()
    gc.freeze()
    young, middle, _ = gc.get_threshold()
    gc.set_threshold(young, middle, 1000)


if __name__ == "__main__":
    sys.exit(main())
