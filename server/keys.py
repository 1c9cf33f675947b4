"""The application's state, one ``web.AppKey`` each."""

from __future__ import annotations

from aiohttp import web

from ..storage import Store
from .admission import ClientRate, StreamSlots
from .generation import Replies
from .providers import Provider
from .settings import Settings

__all__ = [
    "CREATE_RATE",
    "MESSAGE_RATE",
    "PROVIDER",
    "REPLIES",
    "SETTINGS",
    "STORE",
    "STREAM_SLOTS",
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
