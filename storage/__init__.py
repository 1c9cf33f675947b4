"""chatledger's conversation log: format, append, durability, read, follow, recover.

``storage`` knows nothing of HTTP and imports nothing from ``server``.
"""

from .durability import Durability, FileIO
from .log import (
    ConversationLog,
    LogClosedError,
    LogError,
    LogFailedError,
    LogReadOnlyError,
    OffsetBoundaryError,
    OffsetError,
    OffsetRangeError,
)
from .recovery import CorruptLogError
from .store import CONVERSATION_ID, ConversationInfo, InvalidIdError, Store, check_id, new_id

__all__ = [
    "CONVERSATION_ID",
    "ConversationInfo",
    "ConversationLog",
    "CorruptLogError",
    "Durability",
    "FileIO",
    "InvalidIdError",
    "LogClosedError",
    "LogError",
    "LogFailedError",
    "LogReadOnlyError",
    "OffsetBoundaryError",
    "OffsetError",
    "OffsetRangeError",
    "Store",
    "check_id",
    "new_id",
]
