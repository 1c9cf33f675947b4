"""Admission control: limits that keep one client from exhausting the server.

* request body size: aiohttp's ``client_max_size`` (``413``, see :mod:`server.errors`);
* concurrent event streams, server-wide and per client: :class:`StreamSlots` (``429``
  with ``Retry-After``);
* messages, and conversation creates, per minute per client: :class:`ClientRate`, a
  moving window from the ``limits`` library (``429`` with ``Retry-After``). Only what was
  accepted counts: a message answered ``409 reply_running`` uses up nothing.

A client is its remote address as aiohttp sees it (:func:`client_of`): the TCP peer, or,
with ``--trusted-proxy``, the address that proxy put in ``X-Forwarded-For``. Behind a
proxy that is not declared trusted, every client shares the proxy's address.
"""

from __future__ import annotations

import collections
import contextlib
import math
import time
from collections.abc import AsyncIterator, Iterable, Iterator

from limits import RateLimitItemPerMinute
from limits.aio.storage import MemoryStorage
from limits.aio.strategies import MovingWindowRateLimiter

__all__ = ["ClientRate", "StreamSlots", "TooManyError", "client_of"]


class TooManyError(Exception):
    """A limit is reached. :ivar retry_after: seconds until a retry may succeed."""

    def __init__(self, message: str, retry_after: int) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class StreamSlots:
    """At most ``limit`` event streams open at once, and at most ``per_client`` of them
    held by any one client (:func:`client_of`), so one client cannot take every slot.

    :param limit: slots, server-wide; 0 means no limit.
    :param per_client: slots one client may hold; 0 means no limit.
    :param retry_after: seconds a refused client is told to wait.
    """

    def __init__(self, limit: int, *, per_client: int = 0, retry_after: int = 5) -> None:
        self.limit = limit
        self.per_client = per_client
        self.retry_after = retry_after
        self.open = 0
        self._held: collections.Counter[str] = collections.Counter()

    def held_by(self, client: str) -> int:
        """Slots ``client`` holds now."""
        return self._held[client]

    @contextlib.contextmanager
    def hold(self, client: str) -> Iterator[None]:
        """Hold one of ``client``'s slots for the duration of a ``with`` block.

        :raises TooManyError: all slots are taken, or all of ``client``'s.
        """
        if self.limit and self.open >= self.limit:
            raise TooManyError(
                f"the server has {self.limit} event streams open; try again later",
                self.retry_after,
            )
        if self.per_client and self._held[client] >= self.per_client:
            raise TooManyError(
                f"you have {self.per_client} event streams open (the most one client may);"
                " close one or try again later",
                self.retry_after,
            )
        self.open += 1
        self._held[client] += 1
        try:
            yield
        finally:
            self.open -= 1
            self._held[client] -= 1
            if not self._held[client]:
                del self._held[client]


def client_of(peer: str | None, forwarded_for: str | None, trusted_proxies: Iterable[str]) -> str:
    """The client a request comes from: the TCP ``peer``, or, when the peer is a trusted
    proxy, the last ``X-Forwarded-For`` entry (the one that proxy appended; entries before
    it came from the client and may be forged).

    aiohttp-remotes' ``XForwardedStrict`` was tried: it answers 400 (in plain text) to a
    request from the proxy's address without the header, e.g. a health check on the host.
    """
    if peer in trusted_proxies and forwarded_for:
        return forwarded_for.rsplit(",", 1)[-1].strip() or peer
    return peer or "unknown"


class ClientRate:
    """At most ``per_minute`` accepted actions (``what``: messages, conversation
    creates) per client in any moving 60 s window.

    Only actions that succeed count (:meth:`admit`): one refused for another reason (a
    ``409``, a full disk) uses up nothing. Actions still in flight count against the
    limit while they run, so concurrent requests cannot slip past it together.

    :param per_minute: actions; 0 means no limit.
    :param what: the actions' name, plural, for the refusal's message.
    """

    def __init__(self, per_minute: int, *, what: str) -> None:
        self.per_minute = per_minute
        self.what = what
        self._item = RateLimitItemPerMinute(max(per_minute, 1))
        self._limiter = MovingWindowRateLimiter(MemoryStorage())
        self._in_flight: collections.Counter[str] = collections.Counter()

    @contextlib.asynccontextmanager
    async def admit(self, client: str) -> AsyncIterator[None]:
        """Check the limit on entry, and count one action of ``client`` if the ``async
        with`` block ends without an exception.

        :raises TooManyError: over the limit (on entry: the block does not run).
        """
        if not self.per_minute:
            yield
            return
        pending = self._in_flight[client]
        if not await self._limiter.test(self._item, self.what, client, cost=pending + 1):
            retry_after = await self._retry_after(client)
            raise TooManyError(
                f"more than {self.per_minute} {self.what} a minute; try again in {retry_after} s",
                retry_after,
            )
        self._in_flight[client] += 1
        try:
            yield
            await self._limiter.hit(self._item, self.what, client)
        finally:
            self._in_flight[client] -= 1
            if not self._in_flight[client]:
                del self._in_flight[client]

    async def _retry_after(self, client: str) -> int:
        """Seconds until the oldest counted action of ``client`` leaves the window (1 when
        only actions in flight fill it: they finish or fail in moments)."""
        stats = await self._limiter.get_window_stats(self._item, self.what, client)
        if stats.remaining > 0:
            return 1
        return max(1, math.ceil(stats.reset_time - time.time()))
