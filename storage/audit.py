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
            in single-person mode), ``client`` (address), ``from`` (offset), ``read``
            (what: ``events``, ``reply``, ``view``, ``log``, ``export``): **committed
            before any byte of the conversation is sent** on that connection
``delivered`` ``conn``, ``to``: everything in ``[from, to)`` was written to the connection
            (every few seconds while it sends)
``close``   ``conn``, ``to`` (offset: everything in ``[from, to)`` was written to it),
            ``reason``
``seen``    ``conn`` (or null), ``viewer``, ``upto``, ``renderer``: the page rendered
            every record before ``upto`` while it was visible
==========  ==============================================================================

Usage::

    audit = AuditLogs(store.beside("audit"))
    conn = await audit.opened("c1", viewer="local", client="127.0.0.1", start=0)
    ...                                   # send bytes [0, to) of the conversation
    await audit.closed("c1", conn, to=to, reason="end")
    reads = await audit.reads("c1")       # [Read(conn, viewer, ...), ...]

Readers skip types they do not know.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from . import records
from .log import ConversationLog
from .store import Store, new_id

__all__ = ["LOCAL_VIEWER", "AuditLogs", "Read", "Seen", "fold"]

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
    read: str = ""
    to: int | None = None
    closed: int | None = None
    reason: str | None = None
    delivered: list[tuple[int, int]] = field(default_factory=list)
    """``(to, ts)`` of each ``delivered`` and of the ``close``, in order."""
    seen: list[tuple[int, int, str]] = field(default_factory=list)
    """``(upto, ts, renderer)`` of each ``seen`` attributed to this connection."""


@dataclass
class Seen:
    """A ``seen`` receipt: ``viewer`` rendered every record before ``upto`` at ``ts``."""

    viewer: str
    upto: int
    ts: int
    renderer: str
    conn: str | None


def fold(audit_records: list[records.Record]) -> tuple[list[Read], list[Seen]]:
    """The reads an audit log's records describe, in the order they opened, and every
    ``seen`` (pure). Records of unknown types, and receipts of no known ``open``, are
    skipped."""
    reads: dict[str, Read] = {}
    seen: list[Seen] = []
    for record in audit_records:
        kind, conn = record.get("type"), record.get("conn")
        if kind == "seen" and isinstance(record.get("upto"), int):
            seen.append(
                Seen(
                    viewer=str(record.get("viewer")),
                    upto=record["upto"],
                    ts=record["ts"],
                    renderer=str(record.get("renderer")),
                    conn=conn if isinstance(conn, str) else None,
                )
            )
            if isinstance(conn, str) and conn in reads:
                reads[conn].seen.append((record["upto"], record["ts"], str(record.get("renderer"))))
            continue
        if not isinstance(conn, str):
            continue
        if kind == "open" and conn not in reads:
            reads[conn] = Read(
                conn=conn,
                viewer=str(record.get("viewer")),
                client=str(record.get("client")),
                start=int(record.get("from") or 0),
                opened=record["ts"],
                read=str(record.get("read") or ""),
            )
        elif kind in ("delivered", "close") and conn in reads and isinstance(record.get("to"), int):
            read = reads[conn]
            read.delivered.append((record["to"], record["ts"]))
            read.to = record["to"]
            if kind == "close":
                read.closed, read.reason = record["ts"], record.get("reason")
    return list(reads.values()), seen


class AuditLogs:
    """The audit logs of a data dir, kept in ``store`` (from :meth:`Store.beside`).

    :param store: the store of ``<data-dir>/audit``.
    """

    def __init__(self, store: Store) -> None:
        self.store = store
        # The audit log of each read, pinned (kept open) from its open to its close: its
        # receipts and its close append to an open log, never reopening one the store
        # closed as idle (1,000 live streams would churn the store's bound on open logs
        # at every receipt), and a burst of closes opens nothing.
        self._held: dict[str, ConversationLog] = {}

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

    async def prepare(self, conversation_id: str) -> None:
        """Create the audit log of a new conversation now, with it (a file and a directory
        sync), so that its first read only appends.

        :raises OSError, storage.LogError: it could not be created.
        """
        await self._log(conversation_id)

    async def opened(
        self, conversation_id: str, *, viewer: str, client: str, start: int, read: str = ""
    ) -> str:
        """Append an ``open`` record and wait until it is committed; only then may the
        caller send any byte of the conversation.

        :returns: the new connection id (``conn``).
        :raises OSError, storage.LogError: the record could not be committed: send
            nothing.
        """
        conn = new_id()
        log = await self._log(conversation_id)
        log.pin()
        self._held[conn] = log
        try:
            await log.append(
                {
                    "type": "open",
                    "ts": records.now_ms(),
                    "conn": conn,
                    "viewer": viewer,
                    "client": client,
                    "from": start,
                    "read": read,
                }
            )
        except BaseException:
            self._release(conn)
            raise
        return conn

    def _release(self, conn: str) -> None:
        log = self._held.pop(conn, None)
        if log is not None:
            log.unpin()

    async def _append(self, conversation_id: str, record: records.Record) -> None:
        held = self._held.get(record.get("conn") or "")
        if held is not None and not held.closed:
            await held.append(record)
            return
        log = await self._log(conversation_id)
        log.pin()
        try:
            await log.append(record)
        finally:
            log.unpin()

    async def delivered(self, conversation_id: str, conn: str, *, to: int) -> None:
        """Append a ``delivered`` record (``[from, to)`` was written to ``conn``) and wait
        until it is committed. :raises OSError, storage.LogError:"""
        await self._append(
            conversation_id, {"type": "delivered", "ts": records.now_ms(), "conn": conn, "to": to}
        )

    async def seen(
        self, conversation_id: str, *, conn: str | None, viewer: str, upto: int, renderer: str
    ) -> None:
        """Append a ``seen`` record and wait until it is committed.
        :raises OSError, storage.LogError:"""
        await self._append(
            conversation_id,
            {
                "type": "seen",
                "ts": records.now_ms(),
                "conn": conn,
                "viewer": viewer,
                "upto": upto,
                "renderer": renderer,
            },
        )

    async def closed(self, conversation_id: str, conn: str, *, to: int, reason: str) -> None:
        """Append a ``close`` record (``[from, to)`` was written to ``conn``) and wait
        until it is committed.

        :raises OSError, storage.LogError: it could not be committed.
        """
        try:
            await self._append(
                conversation_id,
                {"type": "close", "ts": records.now_ms(), "conn": conn, "to": to, "reason": reason},
            )
        finally:
            self._release(conn)

    async def reads(self, conversation_id: str) -> tuple[list[Read], list[Seen]]:
        """Every read of ``conversation_id`` the audit log holds, oldest first, and every
        ``seen`` (both empty when it was never read).

        :raises OSError, storage.LogError: the audit log cannot be read.
        """
        try:
            log = await self.store.open(conversation_id)
        except FileNotFoundError:
            return [], []
        log.pin()
        try:
            data = await log.read(0, log.committed)
        finally:
            log.unpin()
        return fold(records.decode_all(data))

    async def close(self) -> None:
        """Close every audit log (what is queued commits first)."""
        await self.store.close()
