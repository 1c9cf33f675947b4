"""``init_app()``: the aiohttp application, its resources and its one shutdown path.

Resources live in one ``cleanup_ctx`` (:func:`_resources`): at startup it opens and
recovers every log of the store and starts the provider (for ``local``, a supervised
child process); at cleanup, once every request has ended, it closes the provider.

Shutdown (``on_shutdown``: SIGINT/SIGTERM under ``web.run_app``, or a test client's close)
runs once, while requests may still be in flight and before aiohttp waits for them:
running replies get ``end`` with ``finish: "interrupted"``, then every log closes, so each
open event stream sends its last events and ends cleanly.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from pathlib import Path

from aiohttp import web

from ..storage import FileIO, Store
from .admission import MessageRate, StreamSlots
from .api import routes
from .errors import json_errors
from .generation import Replies
from .keys import MESSAGE_RATE, PROVIDER, REPLIES, SETTINGS, STORE, STREAM_SLOTS
from .providers import Provider
from .settings import Settings

__all__ = ["STATIC_DIR", "build_provider", "init_app"]

logger = logging.getLogger(__name__)

STATIC_DIR = Path(__file__).resolve().parent.parent / "static"
"""The page's files (installed beside the ``server`` package)."""


def build_provider(settings: Settings) -> Provider:
    """The provider ``settings.llm`` names.

    :raises ValueError: unknown name.
    :raises server.providers.ProviderError: ``local`` without a model.
    """
    if settings.llm == "demo":
        from .providers.demo import DemoProvider

        return DemoProvider(
            tokens_per_s=settings.demo_tokens_per_s, reply_tokens=settings.demo_reply_tokens
        )
    if settings.llm == "openai":
        from .providers.chat_completions import OpenAIProvider

        return OpenAIProvider(
            base_url=settings.base_url,
            model=settings.model or "gpt-4o-mini",
            max_tokens=settings.max_reply_tokens,
        )
    if settings.llm == "local":
        from .providers.local import LocalProvider

        return LocalProvider(
            model_path=settings.model_path,
            log_path=settings.data_dir / "local-model.log",
            max_tokens=settings.max_reply_tokens,
        )
    raise ValueError(f"unknown --llm {settings.llm!r}: demo, openai or local")


def init_app(
    settings: Settings, *, file_io: FileIO | None = None, provider: Provider | None = None
) -> web.Application:
    """Build the application.

    :param settings: configuration.
    :param file_io: system-call layer for the logs (tests inject faults here).
    :param provider: use this provider instead of building one from ``settings``.
    """
    app = web.Application(client_max_size=settings.max_body_bytes, middlewares=[json_errors])
    app[SETTINGS] = settings
    store = Store(settings.data_dir, durability=settings.durability, file_io=file_io)
    app[STORE] = store
    chosen = provider if provider is not None else build_provider(settings)
    app[PROVIDER] = chosen
    app[REPLIES] = Replies(chosen)
    app[STREAM_SLOTS] = StreamSlots(settings.max_streams)
    app[MESSAGE_RATE] = MessageRate(
        settings.messages_per_minute, trusted_proxies=settings.trusted_proxies
    )
    app.add_routes(routes)
    app.router.add_get("/", _index)
    app.router.add_static("/static/", STATIC_DIR, append_version=False)
    app.cleanup_ctx.append(_resources)
    app.on_shutdown.append(_shut_down)
    return app


async def _resources(app: web.Application) -> AsyncIterator[None]:
    store, provider = app[STORE], app[PROVIDER]
    try:
        logs = await store.open_all()
        logger.info("opened %d conversation logs in %s", len(logs), store.directory)
        await provider.start()
    except BaseException:
        await store.close()  # releases the data dir
        raise
    try:
        yield
    finally:
        await provider.close()  # no reply runs any more: _shut_down ended them


async def _shut_down(app: web.Application) -> None:
    """The one shutdown path (see the module's docstring); aiohttp runs it once."""
    await app[REPLIES].shutdown()  # every reply ends "interrupted"; no new one starts
    await app[STORE].close()  # queued appends commit; then each event stream ends


async def _index(request: web.Request) -> web.FileResponse:
    return web.FileResponse(STATIC_DIR / "index.html", headers={"Cache-Control": "no-cache"})
