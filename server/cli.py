"""The ``chatledger`` command.

``chatledger verify [--data-dir D]`` checks every log read-only and exits 1 if any is
damaged; crash leftovers that the next open repairs are warnings (:mod:`storage.verify`).

``chatledger user add|list|passwd|remove|limit …`` changes the household's accounts
(:mod:`server.users`).

``chatledger export ID --format jsonl|md|html [-o FILE]`` writes one conversation (its log
byte for byte, or readable; :mod:`storage.export`), read-only, also while a server runs.

``chatledger import FILE [--owner NAME]`` adds the conversations of a ChatGPT or Open WebUI
export, or a chatledger log, as new logs (:mod:`storage.importers`), also while a server
runs: each log appears whole, in one rename.

``chatledger serve [flags]`` runs the server until SIGINT or SIGTERM, then shuts down
gracefully (running replies end with ``finish: "interrupted"``, streams close after their
last event) and exits 0.
"""

from __future__ import annotations

import argparse
import dataclasses
import enum
import gc
import io
import logging
import os
import resource
import sys
from collections import Counter
from pathlib import Path
from typing import Any

from ..storage import CorruptLogError, InvalidIdError, check_id, export
from ..storage.household import Household
from ..storage.recovery import open_own, scan
from ..storage.seal import SealKeyError, load_key
from ..storage.verify import verify_dir
from . import __version__, users
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
    exporting = commands.add_parser(
        "export",
        help="write one conversation: its log byte for byte (jsonl), Markdown or HTML",
    )
    exporting.add_argument("conversation_id", metavar="ID", help="the conversation's id")
    exporting.add_argument("--format", required=True, choices=export.FORMATS)
    exporting.add_argument(
        "-o", "--output", type=Path, default=None, metavar="FILE", help="(default: stdout)"
    )
    _add_flag(exporting, "data_dir")
    importing = commands.add_parser(
        "import",
        help="add the conversations of a ChatGPT or Open WebUI export, or a chatledger log",
    )
    importing.add_argument("file", type=Path, metavar="FILE")
    importing.add_argument(
        "--owner",
        default=None,
        metavar="NAME",
        help="the account they belong to (leave out with no accounts: single-person mode)",
    )
    _add_flag(importing, "data_dir")
    _add_flag(importing, "seal_key")
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


def export_command(conversation_id: str, fmt: str, output: Path | None, data_dir: Path) -> int:
    """``chatledger export``: the log's valid prefix (all of it, but a torn tail or what
    follows a corrupt line) rendered as ``fmt``, to ``output`` or stdout. Read-only: it
    takes no lock and repairs nothing. :returns: 0, or 1 with a message on stderr."""
    try:
        check_id(conversation_id)
    except InvalidIdError as exc:
        print(f"chatledger: {exc}", file=sys.stderr)
        return 1
    path = data_dir / "conversations" / f"{conversation_id}.jsonl"
    try:
        fd = open_own(path, os.O_RDONLY | os.O_NONBLOCK)
        with open(fd, "rb") as stream:
            data = stream.read()
        household = Household(data_dir)
        names = {a.id: a.name for a in household.state.accounts.values()}
        household.close()
    except FileNotFoundError:
        print(f"chatledger: no conversation {conversation_id} in {data_dir}", file=sys.stderr)
        return 1
    except (OSError, CorruptLogError) as exc:
        print(f"chatledger: cannot read {path}: {exc}", file=sys.stderr)
        return 1
    found = scan(io.BytesIO(data))
    if found.end == 0:
        print(f"chatledger: {path} holds no whole record", file=sys.stderr)
        return 1
    if found.end < len(data):
        what = (
            "corrupt"
            if found.corrupt_at is not None
            else "no whole record (a write in flight, or a torn tail)"
        )
        print(
            f"chatledger: {path}: byte {found.end} on is {what}: {found.reason};"
            f" exporting bytes [0, {found.end})",
            file=sys.stderr,
        )
    body = export.render(data[: found.end], fmt, names=names)
    try:
        if output is None:
            sys.stdout.buffer.write(body)
            sys.stdout.buffer.flush()
        else:
            output.write_bytes(body)
    except OSError as exc:
        print(f"chatledger: cannot write {output or 'stdout'}: {exc}", file=sys.stderr)
        return 1
    return 0


def import_command(
    file: Path, data_dir: Path, owner: str | None, seal_key: Path | None = None
) -> int:
    """``chatledger import``: validate the whole file, then write each conversation as a
    new log; print what was imported. :returns: 0, or 1 with one line on stderr (nothing
    imported, or, for a failed write, which were)."""
    from ..storage import importers  # here: the other commands never load it

    try:
        key = load_key(seal_key, data_dir) if seal_key is not None else None
        found, written = importers.run(file, data_dir, owner=owner, seal_key=key)
    except (importers.ImportRefusedError, SealKeyError) as exc:
        print(f"chatledger: {exc}", file=sys.stderr)
        return 1
    plural = "" if len(written) == 1 else "s"
    print(
        f"imported {len(written)} conversation{plural} from {file} ({found.format})"
        f" into {data_dir / 'conversations'}:"
    )
    for planned in found.conversations:
        title = " ".join(planned.title.split()) or "(untitled)"
        counts = _counts(planned.messages, planned.edits, planned.regenerations, planned.skipped)
        print(f"  {planned.conversation_id}  {title}: {counts}")
        for warning in planned.warnings:
            print(f"      warning: {warning}")
    conversations = found.conversations
    totals = _counts(
        sum(p.messages for p in conversations),
        sum(p.edits for p in conversations),
        sum(p.regenerations for p in conversations),
        found.skipped,
    )
    print(f"total: {len(written)} conversation{plural}, {totals}")
    return 0


def _counts(messages: int, edits: int, regenerations: int, skipped: Counter[str]) -> str:
    def many(count: int, what: str, plural: str = "s") -> str:
        return f"{count} {what}{'' if count == 1 else plural}"

    text = f"{many(messages, 'message')}, {many(edits + regenerations, 'branch', 'es')}"
    if edits + regenerations:
        text += f" ({many(edits, 'edited question')}, {many(regenerations, 'other answer')})"
    if skipped:
        reasons = ", ".join(f"{count} {reason}" for reason, count in sorted(skipped.items()))
        text += f"; skipped {many(sum(skipped.values()), 'node')}: {reasons}"
    else:
        text += "; skipped none"
    return text


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
    if args.command == "export":
        return export_command(args.conversation_id, args.format, args.output, args.data_dir)
    if args.command == "import":
        return import_command(args.file, args.data_dir, args.owner, args.seal_key)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    # the server's modules: here, so that verify, export, import and user start fast
    import uvloop
    from aiohttp import web

    from .app import build_provider, init_app
    from .keys import SESSIONS
    from .providers import ProviderError
    from .sessions import is_loopback

    settings = settings_from(args)
    _raise_open_file_limit()  # before init_app: the store sizes its open logs by it
    try:
        provider = build_provider(settings)
        app = init_app(settings, provider=provider)
    except (ProviderError, ValueError, OSError, CorruptLogError) as exc:  # SealKeyError too
        print(f"chatledger: {exc}", file=sys.stderr)
        return 2
    if not app[SESSIONS].state.active() and not is_loopback(settings.host):
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
