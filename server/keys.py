"""The application's state, one ``web.AppKey`` each."""

from __future__ import annotations

from aiohttp import web

from storage import Store

from .generation import Replies
from .providers import Provider
from .settings import Settings

__all__ = ["PROVIDER", "REPLIES", "SETTINGS", "STORE"]

SETTINGS = web.AppKey("settings", Settings)
STORE = web.AppKey("store", Store)
PROVIDER = web.AppKey("provider", Provider)
REPLIES = web.AppKey("replies", Replies)
