"""Daily budgets per account (DESIGN.md "The household": budgets).

``chatledger user limit NAME --messages-per-day N --tokens-per-day N`` sets them (the
household log's ``limit`` record). What an account used today is counted **from the
logs**: its ``user`` records (``by``) and the ``end.usage.total_tokens`` of the replies in
the conversations it owns, whose ``ts`` falls in today, in the server's local time zone
(a family's day ends at its midnight). The first question about an account on a day
reads, from the end backwards, only the records of today in the logs updated today
(their ``updated`` is in the store's list); after that the server counts as it appends.

A message is refused (``429 budget_exceeded``, ``Retry-After``: the seconds until
midnight) once ``messages_per_day`` messages were sent today, or ``tokens_per_day``
tokens used: the message that reaches a limit is the last one accepted. A reply is not
cut when it passes the token budget; the next message is refused.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import orjson

from ..storage import ConversationLog, LogError, Store
from ..storage.household import Account, HouseholdState
from .access import owner_of

__all__ = ["BACK_BLOCK", "BudgetExceededError", "Budgets", "Used"]

BACK_BLOCK = 64 * 1024
"""Bytes read per step when a log is read backwards for today's records."""


class BudgetExceededError(Exception):
    """The account used up a daily budget; ``retry_after``: seconds until it resets."""

    def __init__(self, message: str, retry_after: int) -> None:
        super().__init__(message)
        self.retry_after = retry_after


@dataclass
class Used:
    """What an account used on ``day`` (an ISO date): ``user`` messages, and tokens."""

    day: str
    messages: int = 0
    tokens: int = 0


class Budgets:
    """Today's use of each account.

    :param store: the conversation logs.
    :param household: the accounts (and their limits), read when asked.
    :param clock: seconds since the epoch (tests inject one to pass midnight).
    """

    def __init__(
        self,
        store: Store,
        household: Callable[[], HouseholdState],
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.store = store
        self.household = household
        self.clock = clock
        self._used: dict[str, Used] = {}
        self._counting: dict[str, asyncio.Task[Used]] = {}

    def _today(self) -> tuple[str, int, int]:
        """(ISO date, start ms, seconds until the next midnight) in local time. Midnights
        come from ``mktime`` with the zone's rules for that date (``tm_isdst=-1``), so a
        day of 23 or 25 hours (a daylight-saving change) starts and ends when it does."""
        now = self.clock()
        local = time.localtime(now)
        year, month, day = local.tm_year, local.tm_mon, local.tm_mday
        start = time.mktime((year, month, day, 0, 0, 0, 0, 0, -1))
        following = time.mktime((year, month, day + 1, 0, 0, 0, 0, 0, -1))  # normalized
        return (
            f"{year:04d}-{month:02d}-{day:02d}",
            int(start * 1000),
            max(1, math.ceil(following - now)),
        )

    async def used(self, account_id: str) -> Used:
        """What ``account_id`` used today (counted from the logs on the first call of a
        day, then kept up to date by :meth:`admit` and :meth:`count_tokens`).

        :raises OSError, storage.LogError: a log could not be read.
        """
        day, start, _ = self._today()
        used = self._used.get(account_id)
        if used is not None and used.day == day:
            return used
        task = self._counting.get(account_id)
        if task is None or task.done():
            task = asyncio.ensure_future(self._count(account_id, day, start))
            self._counting[account_id] = task
        used = await asyncio.shield(task)
        self._counting.pop(account_id, None)
        if used.day == day:
            self._used[account_id] = used
        return used

    @contextlib.asynccontextmanager
    async def admit(self, account: Account) -> AsyncIterator[None]:
        """Check ``account``'s budgets and count one message in the same step (no await
        between them, so messages sent at once cannot pass a limit together); the count
        is taken back if the ``async with`` block raises (the message was not sent).

        :raises BudgetExceededError: ``account`` may send no more messages today (the
            block does not run).
        """
        used = await self.used(account.id)
        _, _, retry_after = self._today()
        if account.messages_per_day is not None and used.messages >= account.messages_per_day:
            raise BudgetExceededError(
                f"today's {account.messages_per_day} messages are used up; more after midnight",
                retry_after,
            )
        if account.tokens_per_day is not None and used.tokens >= account.tokens_per_day:
            raise BudgetExceededError(
                f"today's {account.tokens_per_day} tokens are used up; more after midnight",
                retry_after,
            )
        used.messages += 1
        try:
            yield
        except BaseException:
            used.messages -= 1
            raise

    async def left(self, account: Account) -> dict[str, Any]:
        """``{"messages": n|None, "tokens": n|None, "resets_in": s}`` for ``GET /api/me``
        (``None``: no limit)."""
        used = await self.used(account.id)
        _, _, resets_in = self._today()

        def rest(limit: int | None, spent: int) -> int | None:
            return None if limit is None else max(0, limit - spent)

        return {
            "messages": rest(account.messages_per_day, used.messages),
            "tokens": rest(account.tokens_per_day, used.tokens),
            "resets_in": resets_in,
        }

    def count_tokens(self, account_id: str, usage: dict[str, Any] | None) -> None:
        """A reply in a conversation of ``account_id`` ended now with ``usage``."""
        used = self._current(account_id)
        tokens = _tokens(usage)
        if used is not None and tokens:
            used.tokens += tokens

    def _current(self, account_id: str) -> Used | None:
        used = self._used.get(account_id)
        if used is None or used.day != self._today()[0]:
            return None  # counted from the logs when next asked
        return used

    async def _count(self, account_id: str, day: str, start: int) -> Used:
        used = Used(day=day)
        state = self.household()
        for row in await self.store.list():
            if row.updated < start:
                break  # newest first: every later one is older
            owned = owner_of(row.owner, state) == account_id
            try:
                log = await self.store.open(row.id)
            except (OSError, LogError, FileNotFoundError):
                continue
            log.pin()
            try:
                async for record in _records_since(log, start):
                    kind = record.get("type")
                    # a message sent, or another answer asked for (a regenerated start)
                    if kind in ("user", "start") and record.get("by") == account_id:
                        used.messages += 1
                    elif kind == "end" and owned:
                        used.tokens += _tokens(record.get("usage"))
            finally:
                log.unpin()
        return used


def _tokens(usage: Any) -> int:
    if not isinstance(usage, dict):
        return 0
    total = usage.get("total_tokens")
    if isinstance(total, int) and total > 0:
        return total
    parts = [usage.get("prompt_tokens"), usage.get("completion_tokens")]
    return sum(p for p in parts if isinstance(p, int) and p > 0)


async def _records_since(log: ConversationLog, start_ms: int):  # type: ignore[no-untyped-def]
    """The log's committed records whose ``ts`` is at least ``start_ms``, newest first,
    read backwards in :data:`BACK_BLOCK` blocks (records are appended in time order)."""
    end = log.committed
    carry = b""
    while end > 0:
        begin = max(0, end - BACK_BLOCK)
        data = await log.read(begin, end) + carry
        lines = data.split(b"\n")
        carry = lines.pop(0) if begin > 0 else b""  # may be cut: joined with the next block
        for line in reversed(lines):
            if not line:
                continue
            try:
                record = orjson.loads(line)
            except orjson.JSONDecodeError:
                continue
            if not isinstance(record, dict) or not isinstance(record.get("ts"), int):
                continue
            if record["ts"] < start_ms:
                return
            yield record
        end = begin
