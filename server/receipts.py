"""Receipts: what each read of a conversation sent, in its audit log (DESIGN.md "The
audit log"; records in :mod:`storage.audit`).

* :func:`audited` wraps a read: an ``open`` committed before the first byte of the
  conversation is sent, then a ``close`` with ``to``, the offset everything before which
  was written to the connection.
* While an event stream sends, :class:`Deliveries` appends a ``delivered`` record with
  the stream's position every :data:`DELIVERED_EVERY_S` seconds in which it moved: after
  a crash (no ``close``), the last ``delivered`` says how far it had got, and never more
  than was committed (a stream sends only committed records). One task ticks for every
  stream (not a timer each: 10,000 idle streams cost nothing).
* ``POST …/seen`` appends ``seen`` (what the page rendered while visible), attributed to
  the viewer's newest live connection to the conversation.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable
from typing import Final

from aiohttp import web

from ..storage import LogError
from ..storage.audit import AuditLogs
from .access import Access
from .errors import ApiError
from .inputs import client_id
from .keys import AUDIT, DELIVERIES
from .login import viewer_of

__all__ = ["ACCESS", "DELIVERED_EVERY_S", "Deliveries", "Receipt", "audited"]

logger = logging.getLogger(__name__)

DELIVERED_EVERY_S: Final = 5.0
"""Seconds between ``delivered`` receipts of a stream that keeps sending."""

ACCESS = web.RequestKey("access", Access)
"""What the viewer may do with the conversation the request names (set by
:func:`server.api.conversation_log`)."""


class Receipt:
    """What one read has sent: bytes ``[start, to)`` of the log, and why it ended.

    :ivar progress: for a live stream, its position (the offset after the last record
        written to the connection), read by :class:`Deliveries`; ``None`` otherwise.
    """

    __slots__ = ("conn", "conversation_id", "progress", "reason", "reported", "to", "viewer")

    def __init__(self, conversation_id: str, conn: str | None, viewer: str, to: int) -> None:
        self.conversation_id = conversation_id
        self.conn = conn  # None: not recorded (see audited)
        self.viewer = viewer
        self.to = to
        self.reported = to
        self.reason = "end"
        self.progress: Callable[[], int] | None = None


class Deliveries:
    """The receipts of the event streams sending now (see the module's docstring)."""

    def __init__(self, audit: AuditLogs) -> None:
        self.audit = audit
        self._live: dict[Receipt, None] = {}  # ordered: the newest last

    def add(self, receipt: Receipt) -> None:
        if receipt.conn is not None:
            self._live[receipt] = None

    def discard(self, receipt: Receipt) -> None:
        self._live.pop(receipt, None)

    def newest(self, conversation_id: str, viewer: str) -> str | None:
        """The conn of ``viewer``'s newest live stream of the conversation, or ``None``."""
        for receipt in reversed(self._live):
            if receipt.conversation_id == conversation_id and receipt.viewer == viewer:
                return receipt.conn
        return None

    async def tick(self) -> int:
        """Append a ``delivered`` for every stream whose position moved since it was last
        reported; returns how many."""
        moved = []
        for receipt in list(self._live):
            to = receipt.progress() if receipt.progress is not None else receipt.to
            if to > receipt.reported:
                receipt.reported = to
                moved.append(receipt)
        results = await asyncio.gather(
            *(self.audit.delivered(r.conversation_id, r.conn or "", to=r.reported) for r in moved),
            return_exceptions=True,
        )
        for receipt, result in zip(moved, results, strict=True):
            if isinstance(result, Exception):
                logger.error("audit log of %s: %s", receipt.conversation_id, result)
        return len(moved)

    async def run(self) -> None:
        """:meth:`tick` every :data:`DELIVERED_EVERY_S` seconds until cancelled."""
        while True:
            await asyncio.sleep(DELIVERED_EVERY_S)
            try:
                await self.tick()
            except Exception:
                logger.exception("delivered receipts")


_CLOSING: set[asyncio.Task[None]] = set()  # closes of reads whose client left early


def _close_unsent(
    audit: AuditLogs, conversation_id: str, start: int, done: asyncio.Future[str]
) -> None:
    if done.cancelled() or done.exception() is not None:
        return
    task = asyncio.ensure_future(
        audit.closed(conversation_id, done.result(), to=start, reason="client_left")
    )
    _CLOSING.add(task)
    task.add_done_callback(_CLOSING.discard)
    task.add_done_callback(lambda t: t.cancelled() or t.exception())


@contextlib.asynccontextmanager
async def audited(
    request: web.Request,
    start: int,
    *,
    read: str,
    progress: Callable[[], int] | None = None,
) -> AsyncIterator[Receipt]:
    """Commit an ``open`` record (``read``: what is read: ``events``, ``reply`` (a
    streaming ``POST …/messages``), ``view``, ``log``, ``export``) in the conversation's
    audit log before the block sends any byte of it, and a ``close`` with what it sent
    (``receipt.to``, which the block sets) after. With ``progress`` (a live stream's
    position), ``delivered`` receipts follow it meanwhile (:class:`Deliveries`).

    A guardian's read is refused when its ``open`` cannot be committed (oversight is on
    the record or does not happen); an owner's own read is then served unrecorded, and
    logged as an error: a full disk or a read-only data dir (a backup mounted read-only)
    must not lock people out of their own conversations.

    :raises ApiError: ``503 audit_unavailable`` when a guardian's ``open`` cannot be
        committed: nothing is sent.
    """
    conversation_id = request.match_info["conversation_id"]
    audit = request.app[AUDIT]
    viewer = viewer_of(request).id
    owner = request.get(ACCESS) is Access.OWNER
    if audit.store.read_only and owner:
        yield Receipt(conversation_id, None, viewer, start)
        return
    opening = asyncio.ensure_future(
        audit.opened(
            conversation_id, viewer=viewer, client=client_id(request), start=start, read=read
        )
    )
    try:
        conn = await asyncio.shield(opening)
    except asyncio.CancelledError:
        # The client left while the open commits: it still commits; close it then, with
        # nothing sent, so no open is left looking like a crash.
        opening.add_done_callback(lambda done: _close_unsent(audit, conversation_id, start, done))
        raise
    except (OSError, LogError) as exc:
        logger.error("audit log of %s: cannot record a read: %s", conversation_id, exc)
        if owner:
            yield Receipt(conversation_id, None, viewer, start)
            return
        raise ApiError(
            503,
            "audit_unavailable",
            "reads of this conversation cannot be recorded now, so nothing is sent",
        ) from None
    receipt = Receipt(conversation_id, conn, viewer, start)
    receipt.progress = progress
    deliveries = request.app[DELIVERIES]
    if progress is not None:
        deliveries.add(receipt)
    try:
        yield receipt
    except BaseException:
        receipt.reason = "failed"
        raise
    finally:
        deliveries.discard(receipt)
        try:
            await asyncio.shield(
                audit.closed(conversation_id, conn, to=receipt.to, reason=receipt.reason)
            )
        except (OSError, LogError) as exc:
            logger.error("audit log of %s: cannot record a close: %s", conversation_id, exc)
