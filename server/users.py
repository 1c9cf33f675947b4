"""``chatledger user add|list|passwd|remove|limit``: the household's accounts, from the
command line (DESIGN.md "The household"). They append to ``<data-dir>/household.jsonl``
(:class:`storage.household.Household`), also while the server runs: it folds the new
records within a second (a removed account's sessions, live event streams included, end
then).

A password comes from a prompt (typed twice, not echoed) or, with ``--password-stdin``,
from the first line of standard input; never from the command line, where every user of
the machine can read it (``ps``, ``/proc/<pid>/cmdline``). At least
:data:`MIN_PASSWORD_CHARS` characters (OWASP Authentication cheat sheet: length over
composition rules).
"""

from __future__ import annotations

import argparse
import datetime
import getpass
import sys
from pathlib import Path
from typing import Final, TextIO

from ..storage.errors import CorruptLogError
from ..storage.household import ROLES, AccountError, Household

__all__ = ["MIN_PASSWORD_CHARS", "add_parser", "run"]

MIN_PASSWORD_CHARS: Final = 8
MAX_PASSWORD_CHARS: Final = 1024


def add_parser(commands: argparse._SubParsersAction, data_dir_flag: object) -> None:  # type: ignore[type-arg]
    """Add ``user`` and its subcommands to ``commands``; ``data_dir_flag(parser)`` adds
    ``--data-dir`` to a parser."""
    user = commands.add_parser("user", help="add, list, change or remove the household's accounts")
    actions = user.add_subparsers(dest="action", required=True)

    def command(name: str, help_text: str, *, named: bool = True) -> argparse.ArgumentParser:
        sub = actions.add_parser(name, help=help_text)
        if named:
            sub.add_argument("name", help="the account's name (what it signs in with)")
        data_dir_flag(sub)  # type: ignore[operator]
        return sub

    add = command("add", "add an account")
    add.add_argument("--role", required=True, choices=ROLES, help="what the account may do")
    add.add_argument("--password-stdin", action="store_true", help="read the password from stdin")
    command("list", "list the accounts", named=False)
    passwd = command("passwd", "set a new password (the account's sessions end)")
    passwd.add_argument(
        "--password-stdin", action="store_true", help="read the password from stdin"
    )
    command("remove", "disable an account (its conversations are kept; its sessions end)")
    limit = command("limit", "set daily budgets (none given: remove them)")
    limit.add_argument("--messages-per-day", type=_count, default=None, metavar="N")
    limit.add_argument("--tokens-per-day", type=_count, default=None, metavar="N")


def _count(text: str) -> int:
    if not text.isdigit():
        raise argparse.ArgumentTypeError("must be a whole number, 0 or more")
    return int(text)


def run(args: argparse.Namespace, *, stdin: TextIO | None = None, out: TextIO | None = None) -> int:
    """Carry out a parsed ``user`` command. :returns: the exit status (0 done, 1 refused
    with a message on stderr)."""
    stdin = stdin or sys.stdin
    out = out or sys.stdout
    data_dir: Path = args.data_dir
    try:
        if args.action != "list":
            data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        household = Household(data_dir) if data_dir.exists() else None
        if household is None:
            print("no accounts (single-person mode)", file=out)
            return 0
        try:
            return _run(args, household, stdin, out)
        finally:
            household.close()
    except (AccountError, OSError, CorruptLogError) as exc:
        print(f"chatledger: {exc}", file=sys.stderr)
        return 1


def _run(args: argparse.Namespace, household: Household, stdin: TextIO, out: TextIO) -> int:
    # here, not at the top: the CLI's other commands start without aiohttp and argon2
    from .access import guardians
    from .sessions import hash_password

    action = args.action
    if action == "list":
        accounts = household.state.active()
        if not accounts:
            print("no accounts (single-person mode)", file=out)
        for account in accounts:
            limits = []
            if account.messages_per_day is not None:
                limits.append(f"{account.messages_per_day} messages/day")
            if account.tokens_per_day is not None:
                limits.append(f"{account.tokens_per_day} tokens/day")
            readers = ", ".join(a.name for a in guardians(account, household.state))
            created = datetime.datetime.fromtimestamp(account.created / 1000).strftime("%Y-%m-%d")
            print(
                f"{account.name:<20} {account.role:<7} since {created}"
                + (f"  limits: {', '.join(limits)}" if limits else "")
                + (f"  read by: {readers}" if readers else ""),
                file=out,
            )
        return 0
    if action == "add":
        if household.state.named(args.name) is not None:
            raise AccountError(f"there is already an account called {args.name!r}")
        password = _password(args, stdin)
        account = household.add_account(args.name, args.role, hash_password(password))
        print(f"added {account.name} ({account.role})", file=out)
        if len(household.state.active()) == 1 and account.role != "parent":
            print(
                "note: the first parent account owns conversations made before accounts;"
                " add one with --role parent",
                file=out,
            )
        return 0
    if action == "passwd":
        if household.state.named(args.name) is None:
            raise AccountError(f"there is no account called {args.name!r}")
        account = household.set_password(args.name, hash_password(_password(args, stdin)))
        print(f"new password for {account.name}; its sessions have ended", file=out)
        return 0
    if action == "remove":
        account = household.remove_account(args.name)
        print(f"removed {account.name}; its conversations are kept", file=out)
        return 0
    if action == "limit":
        account = household.set_limit(
            args.name,
            messages_per_day=args.messages_per_day,
            tokens_per_day=args.tokens_per_day,
        )
        print(
            f"{account.name}: messages per day {_shown(args.messages_per_day)},"
            f" tokens per day {_shown(args.tokens_per_day)}",
            file=out,
        )
        return 0
    raise AccountError(f"unknown action {action!r}")


def _shown(value: int | None) -> str:
    return "no limit" if value is None else str(value)


def _password(args: argparse.Namespace, stdin: TextIO) -> str:
    """The new password, from stdin or a prompt. :raises AccountError: too short, too
    long, or the two typed differ."""
    if args.password_stdin:
        password = stdin.readline().rstrip("\r\n")
    else:
        password = getpass.getpass("password: ")
        if getpass.getpass("again: ") != password:
            raise AccountError("the two passwords differ")
    if len(password) < MIN_PASSWORD_CHARS:
        raise AccountError(f"a password has at least {MIN_PASSWORD_CHARS} characters")
    if len(password) > MAX_PASSWORD_CHARS:
        raise AccountError(f"a password has at most {MAX_PASSWORD_CHARS} characters")
    return password
