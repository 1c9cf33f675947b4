"""The application's state, one ``web.AppKey`` each."""

from __future__ import annotations

from aiohttp import web

from ..storage import Store
from ..storage.audit import AuditLogs
from .admission import ClientRate, StreamSlots
from .budgets import Budgets
from .generation import Replies
from .providers import Provider
from .sessions import Sessions, Viewer
from .settings import Settings

__all__ = [
    "AUDIT",
    "DELIVERIES",
    "BUDGETS",
    "CREATE_RATE",
    "MESSAGE_RATE",
    "PROVIDER",
    "REPLIES",
    "SESSIONS",
    "SETTINGS",
    "STORE",
    "STREAM_SLOTS",
    "VIEWER",
]

SETTINGS = web.AppKey("settings", Settings)
STORE = web.AppKey("store", Store)
PROVIDER = web.AppKey("provider", Provider)
REPLIES = web.AppKey("replies", Replies)
STREAM_SLOTS = web.AppKey("stream_slots", StreamSlots)
MESSAGE_RATE = web.AppKey("message_rate", ClientRate)
"""Messages per client per minute (``--messages-per-minute``)."""
CREATE_RATE = web.AppKey("create_rate", ClientRate)
"""Conversation creates per client per minute (``--creates-per-minute``)."""
AUDIT = web.AppKey("audit", AuditLogs)
"""The audit logs, ``<data-dir>/audit/``."""
SESSIONS = web.AppKey("sessions", Sessions)
"""Accounts, sessions, logins (the household log)."""
BUDGETS = web.AppKey("budgets", Budgets)
"""Today's use of each account's daily budgets."""
VIEWER = web.RequestKey("viewer", Viewer)
"""Who the request is (set by :func:`server.login.require_session`)."""
DELIVERIES = web.AppKey("deliveries", "Deliveries")
"""The receipts of the event streams sending now (:class:`server.receipts.Deliveries`)."""
