"""Admission control: limits that keep one client from exhausting the server.

* request body size: aiohttp's ``client_max_size`` (``413``, see :mod:`server.errors`);
* concurrent event streams, server-wide: :class:`StreamSlots` (``429``);
* messages per minute per client: :class:`MessageRate`, a moving window from the
  ``limits`` library (``429`` with ``Retry-After``).

A client is its remote address as aiohttp sees it: the TCP peer, or, with
``--trusted-proxy``, the address that proxy put in ``X-Forwarded-For``. Behind a proxy
that is not declared trusted, every client shares the proxy's address.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Iterable, Iterator

from limits import RateLimitItemPerMinute
from limits.aio.storage import MemoryStorage
from limits.aio.strategies import MovingWindowRateLimiter

__all__ = ["MessageRate", "StreamSlots", "TooManyError", "client_of"]


class TooManyError(Exception):
    """A limit is reached. :ivar retry_after: seconds until a retry may succeed."""

    def __init__(self, message: str, retry_after: int) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class StreamSlots:
    """At most ``limit`` event streams open at once.

    :param limit: slots; 0 means no limit.
    :param retry_after: seconds a refused client is told to wait.
    """

    def __init__(self, limit: int, *, retry_after: int = 5) -> None:
        self.limit = limit
        self.retry_after = retry_after
        self.open = 0

    @contextlib.contextmanager
    def hold(self) -> Iterator[None]:
        """Hold a slot for the duration of a ``with`` block.

        :raises TooManyError: all slots are taken.
        """
        if self.limit and self.open >= self.limit:
            raise TooManyError(
                f"the server has {self.limit} event streams open; try again later",
                self.retry_after,
            )
        self.open += 1
        try:
            yield
        finally:
            self.open -= 1


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


class MessageRate:
    """At most ``per_minute`` messages per client in any moving 60 s window.

    :param per_minute: messages; 0 means no limit.
    :param trusted_proxies: see :func:`client_of`.
    """

    def __init__(self, per_minute: int, *, trusted_proxies: Iterable[str] = ()) -> None:
        self.per_minute = per_minute
        self.trusted_proxies = frozenset(trusted_proxies)
        self._item = RateLimitItemPerMinute(max(per_minute, 1))
        self._limiter = MovingWindowRateLimiter(MemoryStorage())

    async def hit(self, peer: str | None, forwarded_for: str | None = None) -> None:
        """Count one message of the client (see :func:`client_of`).

        :raises TooManyError: over the limit."""
        if not self.per_minute:
            return
        client = client_of(peer, forwarded_for, self.trusted_proxies)
        if await self._limiter.hit(self._item, "messages", client):
            return
        stats = await self._limiter.get_window_stats(self._item, "messages", client)
        retry_after = max(1, math.ceil(stats.reset_time - time.time()))
        raise TooManyError(
            f"more than {self.per_minute} messages a minute; try again in {retry_after} s",
            retry_after,
        )
