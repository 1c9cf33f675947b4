"""One SSE event stream of a conversation log: committed records from a start offset,
then the live tail, with keep-alive comments while nothing commits.

Each stream waits for the log's next commit on a future of its own
(:meth:`storage.ConversationLog.next_commit`); no task, no shield and no timer is made
per event. The keep-alive is one lazily re-armed timer per stream (:class:`IdleTimer`),
which fires about once per keep-alive interval, not once per event.
"""

from __future__ import annotations

import asyncio
import logging

from aiohttp import web

from storage import ConversationLog, records

from . import sse

__all__ = ["IdleTimer", "stream_log"]

logger = logging.getLogger(__name__)


class IdleTimer:
    """Wakes a waiting stream once it has sent nothing for ``seconds``.

    Sending only stamps the time (:meth:`sent`); the timer, when it fires early, moves
    itself to the new deadline instead of being cancelled and re-created per event.

    :param seconds: idle time before a keep-alive is due (s).
    """

    def __init__(self, seconds: float) -> None:
        self._loop = asyncio.get_running_loop()
        self._seconds = seconds
        self._last_sent = self._loop.time()
        self._waiter: asyncio.Future[None] | None = None
        self._handle = self._loop.call_at(self._last_sent + seconds, self._fire)

    def sent(self) -> None:
        """Bytes just went out: the idle time starts again."""
        self._last_sent = self._loop.time()

    @property
    def due(self) -> bool:
        """Whether the stream has been idle for the whole interval."""
        return self._loop.time() - self._last_sent >= self._seconds

    async def wait(self, waiter: asyncio.Future[None]) -> None:
        """Wait for ``waiter`` (a commit), or until a keep-alive is due."""
        self._waiter = waiter
        try:
            await waiter
        finally:
            self._waiter = None

    def cancel(self) -> None:
        self._handle.cancel()

    def _fire(self) -> None:
        deadline = self._last_sent + self._seconds
        if self._loop.time() < deadline:
            self._handle = self._loop.call_at(deadline, self._fire)
            return
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)
        self._handle = self._loop.call_at(self._loop.time() + self._seconds, self._fire)


async def stream_log(
    request: web.Request,
    log: ConversationLog,
    start: int,
    *,
    keepalive: float,
    retry_ms: int,
    until_end_of: str | None = None,
) -> web.StreamResponse:
    """Send committed records from ``start`` as SSE events, then follow the log.

    Each event is ``id: <offset after the record>``, ``event: <record type>``,
    ``data: <the record's JSON line>`` (DESIGN.md "SSE stream"); a block of records that
    committed together goes out in one write. Ends when the client leaves, the log closes
    (shutdown), or, with ``until_end_of``, after the ``end`` record of that reply. A
    failed or read-only log's stream stays open with keep-alives (nothing new can
    commit), so EventSource does not reconnect in a loop.

    :param start: a record boundary already checked with
        :meth:`~storage.ConversationLog.check_offset`.
    :param keepalive: seconds of silence after which a ``: keep-alive`` comment is sent.
    :param retry_ms: the ``retry:`` field sent first (ms).
    :param until_end_of: a reply id: end the stream after that reply's ``end``.
    """
    response = web.StreamResponse(headers=sse.HEADERS)
    position = start
    idle = IdleTimer(keepalive)
    try:
        await response.prepare(request)
        await response.write(sse.retry(retry_ms))
        while True:
            if position < log.committed:
                block = await log.read_records(position)
                ended = False
                if until_end_of is not None:
                    block, ended = _through_end(position, block, until_end_of)
                await response.write(sse.frame_records(position, block))
                idle.sent()
                position += len(block)
                if ended:
                    break
                continue
            if log.closed:
                break  # shutdown: every committed record was sent
            await idle.wait(log.next_commit())
            if position == log.committed and idle.due:
                await response.write(sse.KEEPALIVE)
                idle.sent()
    except ConnectionError:
        pass  # the client left; the reply (if any) goes on without it
    except Exception:
        # Headers are sent: no error answer is possible. End the stream; EventSource
        # reconnects with Last-Event-ID and resumes exactly.
        logger.exception("event stream of %s failed at offset %d", log.path.name, position)
    finally:
        idle.cancel()
    return response


def _through_end(offset: int, block: bytes, reply_id: str) -> tuple[bytes, bool]:
    """Cut ``block`` just after the ``end`` record of ``reply_id``, if it holds it."""
    for offset_after, kind, line in sse.records_in(offset, block):
        if kind == "end" and records.decode(line).get("id") == reply_id:
            return block[: offset_after - offset], True
    return block, False
