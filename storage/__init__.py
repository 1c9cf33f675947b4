"""chatledger's conversation log: format, append, durability, read, follow, recover.

A store is a data dir of append-only JSONL logs, one per conversation. An append returns
once its record is committed (under ``fsync``: written and synced); readers never see
bytes past the committed offset, and an offset is a byte position, so "everything after
offset N" is exactly the file's bytes after N (DESIGN.md "The log")::

    import asyncio
    from pathlib import Path

    from chatledger.storage import Store, records

    async def main() -> None:
        store = Store(Path("/tmp/demo-data"))          # fsync durability by default
        log = await store.create(title="Dinner", model="demo", system=None)
        end = await log.append(records.user(message_id="m1", text="What shall we cook?"))
        print(end, await log.read(0, end))             # the offset after it; the bytes
        async for offset, block in log.follow(0):      # committed records, then live
            print(offset, records.decode_all(block))
            break
        await store.close()                            # commits what is queued

    asyncio.run(main())

The modules, one concept each: :mod:`.records` (record types, encode/decode, pure),
:mod:`.commit` (the writer side: queue, group commit, write, ``fdatasync``/``syncfs``,
failure), :mod:`.log` (the reader side: committed offset, reads, listeners),
:mod:`.recovery` (open/create a file, torn tail vs corruption), :mod:`.fold` (records to
the view, pure), :mod:`.store` (the data dir), :mod:`.durability` (the system-call seam
tests inject faults into), :mod:`.errors`, :mod:`.verify` (``chatledger verify``).

``storage`` knows nothing of HTTP and imports nothing from ``server``.
"""

from . import records
from .commit import GroupCommit
from .durability import Durability, FileIO
from .errors import (
    CorruptLogError,
    DataDirLockedError,
    ForeignFileError,
    InvalidIdError,
    LogClosedError,
    LogError,
    LogFailedError,
    LogReadOnlyError,
    OffsetBoundaryError,
    OffsetError,
    OffsetRangeError,
)
from .log import ConversationLog, LogState
from .store import (
    CONVERSATION_ID,
    DESCRIPTOR_ERRNOS,
    MAX_OPEN_LOGS,
    ConversationInfo,
    Store,
    check_id,
    new_id,
)

__all__ = [
    "CONVERSATION_ID",
    "DESCRIPTOR_ERRNOS",
    "MAX_OPEN_LOGS",
    "ConversationInfo",
    "ConversationLog",
    "CorruptLogError",
    "DataDirLockedError",
    "Durability",
    "FileIO",
    "ForeignFileError",
    "GroupCommit",
    "InvalidIdError",
    "LogClosedError",
    "LogError",
    "LogFailedError",
    "LogReadOnlyError",
    "LogState",
    "OffsetBoundaryError",
    "OffsetError",
    "OffsetRangeError",
    "Store",
    "check_id",
    "new_id",
    "records",
]
