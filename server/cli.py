"""The ``chatledger`` command.

``chatledger verify [--data-dir D]`` checks every log read-only and exits 1 if any is
damaged; crash leftovers that the next open repairs are warnings (:mod:`storage.verify`).

``chatledger user add|list|passwd|remove|limit …`` changes the household's accounts
(:mod:`server.users`).

``chatledger serve [flags]`` runs the server until SIGINT or SIGTERM, then shuts down
gracefully (running replies end with ``finish: "interrupted"``, streams close after their
last event) and exits 0.
"""

from __future__ import annotations

import argparse
import dataclasses
import enum
import gc
import ipaddress
import logging
import resource
import sys
from pathlib import Path
from typing import Any

import uvloop
from aiohttp import web

from ..storage import CorruptLogError
from ..storage.seal import SealKeyError, load_key
from ..storage.verify import verify_dir
from . import __version__, users
from .app import build_provider, init_app
from .keys import SESSIONS
from .providers import ProviderError
from .settings import FLAG, Flag, Settings

__all__ = ["main", "parser", "settings_from"]

_FLAGS: dict[str, tuple[dataclasses.Field[Any], Flag]] = {
    setting.name: (setting, setting.metadata[FLAG])
    for setting in dataclasses.fields(Settings)
    if FLAG in setting.metadata
}
"""The settings that are ``serve`` flags, by field name, in declaration order."""


def parser() -> argparse.ArgumentParser:
    """The argument parser of ``chatledger``: ``serve`` takes a flag per setting that
    declares one (:class:`~server.settings.Flag`), ``verify`` takes ``--data-dir``."""
    top = argparse.ArgumentParser(
        prog="chatledger",
        description="A self-hosted chat server whose conversation log is the ground truth.",
    )
    top.add_argument("--version", action="version", version=f"chatledger {__version__}")
    commands = top.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="run the chat server")
    for name in _FLAGS:
        _add_flag(serve, name)
    verify = commands.add_parser(
        "verify", help="check every conversation log, read-only; exit 1 if any is damaged"
    )
    _add_flag(verify, "data_dir")
    _add_flag(verify, "seal_key")
    users.add_parser(commands, lambda sub: _add_flag(sub, "data_dir"))
    return top


def settings_from(args: argparse.Namespace) -> Settings:
    """The ``Settings`` of a parsed ``serve`` command line (see :func:`parser`)."""
    values = {}
    for name, (_, flag) in _FLAGS.items():
        value = getattr(args, name)
        if flag.repeatable:
            value = tuple(value)
        if flag.to_setting is not None:
            value = flag.to_setting(value)
        values[name] = value
    return Settings(**values)


def _add_flag(command: argparse.ArgumentParser, name: str) -> None:
    setting, flag = _FLAGS[name]
    options: dict[str, Any] = {"dest": name, "help": _help(flag.help, setting.default)}
    if flag.repeatable:
        options.update(action="append", default=list(setting.default))
    else:
        options["default"] = setting.default
    if flag.parse is not None:
        options["type"] = flag.parse
    if flag.choices is not None:
        options["choices"] = flag.choices
    if flag.metavar is not None:
        options["metavar"] = flag.metavar
    command.add_argument(flag.name or "--" + name.replace("_", "-"), **options)


def _help(text: str, default: object) -> str:
    """``text`` and the default as a person would type it (none shown for an absent one)."""
    if default is None or default == ():
        shown = None
    elif isinstance(default, enum.Enum):
        shown = str(default.value)
    elif isinstance(default, Path) and not default.is_absolute():
        shown = f"./{default}"
    elif isinstance(default, float):
        shown = f"{default:g}"
    else:
        shown = str(default)
    text = text if shown is None else f"{text} (default: {shown})"
    return text.replace("%", "%%")  # argparse %-formats help texts


def verify(data_dir: Path, seal_key: Path | None = None) -> int:
    """``chatledger verify``: print a report per conversation (``ok``, ``warn``: only
    crash leftovers the next open repairs, ``FAIL``: damage, a seal that does not match
    included), its errors and warnings under it. :returns: 0 if no log has an error
    (warnings or not), 1 if any has, 2 if there is no data dir or the key is unusable."""
    try:
        key = load_key(seal_key, data_dir) if seal_key is not None else None
        reports = verify_dir(data_dir, key=key)
    except SealKeyError as exc:
        print(f"chatledger: {exc}", file=sys.stderr)
        return 2
    except FileNotFoundError:
        print(f"chatledger: no conversations in {data_dir}", file=sys.stderr)
        return 2
    for report in reports:
        status = "FAIL" if not report.ok else "warn" if report.warnings else "ok  "
        running = f", reply {report.open_reply} running" if report.open_reply else ""
        if report.seal_failed_at is not None:
            sealed = f", a seal fails at byte {report.seal_failed_at}"
        elif not report.seals:
            sealed = ", unsealed (written before seals)"
        elif report.sealed < report.size:
            sealed = f", sealed up to byte {report.sealed}"
        else:
            sealed = f", sealed ({report.seals} seals{', HMAC' if key else ''})"
        print(
            f"{status} {report.conversation_id}: {report.records} records, {report.size} bytes,"
            f" {report.replies} replies{running}{sealed}"
        )
        for problem in report.problems:
            print(f"     error: {problem}")
        for warning in report.warnings:
            print(f"     warning: {warning}")
    bad = sum(not r.ok for r in reports)
    warned = sum(r.ok and bool(r.warnings) for r in reports)
    print(
        f"{len(reports)} conversations checked, {bad} with errors,"
        f" {warned} with warnings only (repaired when the server next opens them)"
    )
    return 1 if bad else 0


def _loopback(host: str) -> bool:
    """Whether ``host`` (``--host``) is a loopback address or ``localhost`` (single-person
    mode may listen only there: DESIGN.md "The household")."""
    if host.lower() in ("localhost", "localhost."):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _raise_open_file_limit() -> None:
    # Each event stream holds a socket: let the soft limit go up to the hard one.
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def main(argv: list[str] | None = None) -> int:
    """Entry point of the console script. :returns: the exit status."""
    args = parser().parse_args(argv)
    if args.command == "verify":
        return verify(args.data_dir, args.seal_key)
    if args.command == "user":
        return users.run(args)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    settings = settings_from(args)
    _raise_open_file_limit()  # before init_app: the store sizes its open logs by it
    try:
        provider = build_provider(settings)
        app = init_app(settings, provider=provider)
    except (ProviderError, ValueError, OSError, CorruptLogError) as exc:  # SealKeyError too
        print(f"chatledger: {exc}", file=sys.stderr)
        return 2
    if not app[SESSIONS].enabled and not _loopback(settings.host):
        print(
            f"chatledger: refusing to listen on {settings.host} with no account: anyone who"
            " reaches it could read and write every conversation. Add one first:\n"
            f"  chatledger user add NAME --role parent --data-dir {settings.data_dir}\n"
            "or listen on a loopback address (--host 127.0.0.1).",
            file=sys.stderr,
        )
        return 2
    host = f"[{settings.host}]" if ":" in settings.host else settings.host
    line = (
        f"chatledger {__version__} serving http://{host}:{settings.port}/ "
        f"data dir {settings.data_dir.resolve()} | llm {provider.name} ({provider.model}) "
        f"| window {provider.context_tokens} tokens | durability {settings.durability.value}"
    )
    _tune_gc()
    web.run_app(
        app,
        host=settings.host,
        port=settings.port,
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
