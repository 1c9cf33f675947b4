"""Audit logs: who was sent which bytes of a conversation (DESIGN.md "The audit log").

Each conversation has its own audit log, ``<data-dir>/audit/<conversation_id>.jsonl``,
created on its first read, with the record rules and the durability of the conversation
logs (it is a log of the same kind, opened and bounded by a :class:`~storage.Store` of
its own beside the conversations', sharing their group commit). The conversation log
itself stays content only.

==========  ==============================================================================
record      fields besides ``type``, ``ts``
==========  ==============================================================================
``audit``   ``conversation``: the first record, naming the conversation
``open``    ``conn`` (an id per connection or read), ``viewer`` (account id, or ``local``
            in single-person mode), ``client`` (address), ``from`` (offset): **committed
            before any byte of the conversation is sent** on that connection
``close``   ``conn``, ``to`` (offset: everything in ``[from, to)`` was written to it),
            ``reason``
==========  ==============================================================================

Usage::

    audit = AuditLogs(store.beside("audit"))
    conn = await audit.opened("c1", viewer="local", client="127.0.0.1", start=0)
    ...                                   # send bytes [0, to) of the conversation
    await audit.closed("c1", conn, to=to, reason="end")
    reads = await audit.reads("c1")       # [Read(conn, viewer, ...), ...]

``delivered`` and ``seen`` receipts are the receipts issue's; readers skip types they do
not know.
"""

from __future__ import annotations

from dataclasses import dataclass

from . import records
from .log import ConversationLog
from .store import Store, new_id

__all__ = ["LOCAL_VIEWER", "AuditLogs", "Read"]

LOCAL_VIEWER = "local"
"""The ``viewer`` of reads in single-person mode (no accounts)."""


@dataclass
class Read:
    """One connection or read of a conversation, folded from its audit records: who
    (``viewer``, ``client``), the bytes ``[start, to)`` it was sent (``to`` is ``None``
    until its ``close``; after a crash it stays ``None``), and when (ms)."""

    conn: str
    viewer: str
    client: str
    start: int
    opened: int
    to: int | None = None
    closed: int | None = None
    reason: str | None = None


def fold(audit_records: list[records.Record]) -> list[Read]:
    """The reads an audit log's records describe, in the order they opened (pure).
    Records of unknown types, and ``close`` records of no known ``open``, are skipped."""
    reads: dict[str, Read] = {}
    for record in audit_records:
        kind, conn = record.get("type"), record.get("conn")
        if not isinstance(conn, str):
            continue
        if kind == "open" and conn not in reads:
            reads[conn] = Read(
                conn=conn,
                viewer=str(record.get("viewer")),
                client=str(record.get("client")),
                start=int(record.get("from") or 0),
                opened=record["ts"],
            )
        elif kind == "close" and conn in reads:
            read = reads[conn]
            read.to, read.closed, read.reason = record.get("to"), record["ts"], record.get("reason")
    return list(reads.values())


class AuditLogs:
    """The audit logs of a data dir, kept in ``store`` (from :meth:`Store.beside`).

    :param store: the store of ``<data-dir>/audit``.
    """

    def __init__(self, store: Store) -> None:
        self.store = store

    async def _log(self, conversation_id: str) -> ConversationLog:
        """The audit log of ``conversation_id``, created on first use.

        :raises OSError, storage.LogError: it cannot be opened or created.
        """
        try:
            return await self.store.open(conversation_id)
        except FileNotFoundError:
            first = {"type": "audit", "ts": records.now_ms(), "conversation": conversation_id}
            try:
                return await self.store.create_log(conversation_id, first)
            except FileExistsError:  # created meanwhile by another read
                return await self.store.open(conversation_id)

    async def opened(self, conversation_id: str, *, viewer: str, client: str, start: int) -> str:
        """Append an ``open`` record and wait until it is committed; only then may the
        caller send any byte of the conversation.

        :returns: the new connection id (``conn``).
        :raises OSError, storage.LogError: the record could not be committed: send
            nothing.
        """
        conn = new_id()
        log = await self._log(conversation_id)
        log.pin()
        try:
            await log.append(
                {
                    "type": "open",
                    "ts": records.now_ms(),
                    "conn": conn,
                    "viewer": viewer,
                    "client": client,
                    "from": start,
                }
            )
        finally:
            log.unpin()
        return conn

    async def closed(self, conversation_id: str, conn: str, *, to: int, reason: str) -> None:
        """Append a ``close`` record (``[from, to)`` was written to ``conn``) and wait
        until it is committed.

        :raises OSError, storage.LogError: it could not be committed.
        """
        log = await self._log(conversation_id)
        log.pin()
        try:
            await log.append(
                {"type": "close", "ts": records.now_ms(), "conn": conn, "to": to, "reason": reason}
            )
        finally:
            log.unpin()

    async def reads(self, conversation_id: str) -> list[Read]:
        """Every read of ``conversation_id`` the audit log holds, oldest first (``[]``
        when it was never read).

        :raises OSError, storage.LogError: the audit log cannot be read.
        """
        try:
            log = await self.store.open(conversation_id)
        except FileNotFoundError:
            return []
        log.pin()
        try:
            data = await log.read(0, log.committed)
        finally:
            log.unpin()
        return fold(records.decode_all(data))

    async def close(self) -> None:
        """Close every audit log (what is queued commits first)."""
        await self.store.close()
