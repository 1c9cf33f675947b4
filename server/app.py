"""``init_app()``: the aiohttp application, its resources and its one shutdown path.

Resources live in one ``cleanup_ctx`` (:func:`_resources`): at startup it opens and
recovers every log of the store and starts the provider (for ``local``, a supervised
child process); at cleanup, once every request has ended, it closes the provider and
the audit logs (each event stream records its `close` as it ends).

Shutdown (``on_shutdown``: SIGINT/SIGTERM under ``web.run_app``, or a test client's close)
runs once, while requests may still be in flight and before aiohttp waits for them:
running replies get ``end`` with ``finish: "interrupted"``, then every log closes, so each
open event stream sends its last events and ends cleanly.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import resource
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

from aiohttp import web

from ..storage import Durability, FileIO, Store
from ..storage.audit import AuditLogs
from ..storage.household import Household
from ..storage.seal import load_key
from . import diagnostic, edge
from .admission import ClientRate, StreamSlots
from .api import routes, unpin_logs
from .budgets import Budgets
from .conversation_meta import routes as meta_routes
from .diagnostic import routes as diagnostic_routes
from .errors import json_errors
from .export_api import routes as export_routes
from .generation import Replies
from .keys import (
    AUDIT,
    BUDGETS,
    CREATE_RATE,
    DELIVERIES,
    MESSAGE_RATE,
    PROVIDER,
    REPLIES,
    SESSIONS,
    SETTINGS,
    STORE,
    STREAM_SLOTS,
)
from .login import require_session
from .login import routes as login_routes
from .providers import Provider
from .receipts import Deliveries
from .sessions import Sessions, is_loopback
from .settings import Settings

__all__ = ["STATIC_DIR", "build_provider", "init_app", "open_log_budget"]

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
            tokens_per_s=settings.demo_tokens_per_s,
            reply_tokens=settings.demo_reply_tokens,
            context_tokens=settings.context_tokens,
        )
    if settings.llm == "openai":
        from .providers.chat_completions import OpenAIProvider

        return OpenAIProvider(
            base_url=settings.base_url,
            model=settings.model or "gpt-4o-mini",
            max_tokens=settings.max_reply_tokens,
            context_tokens=settings.context_tokens,
        )
    if settings.llm == "local":
        from .providers.local import LocalProvider

        return LocalProvider(
            model_path=settings.model_path,
            log_path=settings.data_dir / "local-model.log",
            max_tokens=settings.max_reply_tokens,
            context_tokens=settings.context_tokens,
        )
    raise ValueError(f"unknown --llm {settings.llm!r}: demo, openai or local")


def init_app(
    settings: Settings,
    *,
    file_io: FileIO | None = None,
    provider: Provider | None = None,
    clock: Callable[[], float] = time.time,
    audit_file_io: FileIO | None = None,
) -> web.Application:
    """Build the application.

    :param settings: configuration.
    :param file_io: system-call layer for the logs (tests inject faults here).
    :param provider: use this provider instead of building one from ``settings``.
    :param clock: seconds since the epoch, for sessions' ages and daily budgets (tests
        inject one).
    :param audit_file_io: system-call layer for the audit logs (a plain one by default:
        faults injected with ``file_io`` stay in the conversation logs).
    :raises storage.DataDirLockedError: another server holds the data dir.
    :raises storage.CorruptLogError: the household log is corrupt.
    :raises storage.seal.SealKeyError: ``--seal-key`` cannot be used.
    """
    app = web.Application(
        client_max_size=settings.max_body_bytes,
        middlewares=[json_errors, require_session, unpin_logs],
    )
    app[SETTINGS] = settings
    budget = open_log_budget(settings.max_open_logs)
    seal_key = (
        load_key(settings.seal_key, settings.data_dir) if settings.seal_key is not None else None
    )
    store = Store(
        settings.data_dir,
        durability=settings.durability,
        file_io=file_io,
        max_open=max(1, budget - budget // 4),
        seal_key=seal_key,
    )
    app[STORE] = store
    app[AUDIT] = AuditLogs(
        store.beside("audit", max_open=max(1, budget // 4), file_io=audit_file_io)
    )
    app[DELIVERIES] = Deliveries(app[AUDIT])
    household = Household(
        settings.data_dir,
        durable=settings.durability == Durability.FSYNC,
    )
    sessions = app[SESSIONS] = Sessions(
        household, clock=clock, local_allowed=is_loopback(settings.host)
    )
    budgets = app[BUDGETS] = Budgets(store, lambda: sessions.state, clock=clock)
    chosen = provider if provider is not None else build_provider(settings)
    app[PROVIDER] = chosen
    app[REPLIES] = Replies(chosen, on_end=budgets.count_tokens)
    app[STREAM_SLOTS] = StreamSlots(
        settings.max_streams, per_client=settings.max_streams_per_client
    )
    app[MESSAGE_RATE] = ClientRate(settings.messages_per_minute, what="messages")
    app[CREATE_RATE] = ClientRate(settings.creates_per_minute, what="conversations")
    app.add_routes(routes)
    app.add_routes(login_routes)
    app.add_routes(export_routes)
    app.add_routes(diagnostic_routes)
    app.add_routes(meta_routes)
    app.router.add_get("/", _index)
    app.router.add_get("/static/{path:.+}", _static)
    edge.install(app, settings)  # Host, same origin, JSON bodies; headers of every answer
    app.cleanup_ctx.append(_resources)
    app.cleanup_ctx.append(_household_poll)
    app.cleanup_ctx.append(_delivered_receipts)
    app.on_shutdown.append(_shut_down)
    app.on_shutdown.append(diagnostic.shut_down)  # a check in its idle gap ends at once
    return app


def open_log_budget(requested: int) -> int:
    """The open logs a store may keep: ``requested``, but at most a quarter of the
    process's open-file limit (``RLIMIT_NOFILE``, soft) in file descriptors (two per
    log), so sockets (one per event stream) and the rest keep three quarters; at least 1."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return max(1, requested)
    return max(1, min(requested, soft // 8))


async def _resources(app: web.Application) -> AsyncIterator[None]:
    store, provider = app[STORE], app[PROVIDER]
    try:
        opened = await store.recover_all()
        logger.info("recovered %d conversation logs in %s", opened, store.directory)
        await provider.start()
    except BaseException:
        await store.close()  # releases the data dir
        raise
    try:
        yield
    finally:
        await provider.close()  # no reply runs any more: _shut_down ended them
        await app[AUDIT].close()  # every request has ended: its close record is queued


async def _household_poll(app: web.Application) -> AsyncIterator[None]:
    """Fold what ``chatledger user …`` appends to the household log while the server
    runs (:meth:`server.sessions.Sessions.poll`)."""
    sessions = app[SESSIONS]
    task = asyncio.create_task(sessions.poll(), name="household poll")
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        sessions.household.close()


async def _delivered_receipts(app: web.Application) -> AsyncIterator[None]:
    """Tick the ``delivered`` receipts of live streams (:class:`server.receipts.Deliveries`)."""
    task = asyncio.create_task(app[DELIVERIES].run(), name="delivered receipts")
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def _shut_down(app: web.Application) -> None:
    """The one shutdown path (see the module's docstring); aiohttp runs it once."""
    await app[REPLIES].shutdown()  # every reply ends "interrupted"; no new one starts
    await app[STORE].close()  # queued appends commit; then each event stream ends
    # (the audit logs close at cleanup, once the streams have recorded their close)


async def _index(request: web.Request) -> web.FileResponse:
    return web.FileResponse(STATIC_DIR / "index.html", headers={"Cache-Control": "no-cache"})


async def _static(request: web.Request) -> web.FileResponse:
    """A file under :data:`STATIC_DIR`; anything else is a JSON ``404`` (aiohttp's own
    static route answers a missing file with an empty ``404`` that no middleware sees)."""
    path = await asyncio.get_running_loop().run_in_executor(
        None, _static_file, request.match_info["path"]
    )
    if path is None:
        raise web.HTTPNotFound()
    return web.FileResponse(path)


def _static_file(relative: str) -> Path | None:
    """The regular file ``relative`` names inside :data:`STATIC_DIR`, or ``None``: no
    such file, a directory, a hidden name, or a path that leads outside."""
    parts = relative.split("/")
    if any(not part or part.startswith(".") or "\\" in part or "\0" in part for part in parts):
        return None
    root = STATIC_DIR.resolve()
    try:
        path = root.joinpath(*parts).resolve()
        path.relative_to(root)
        return path if path.is_file() else None
    except (OSError, ValueError, RuntimeError):  # RuntimeError: a symlink loop
        return None
