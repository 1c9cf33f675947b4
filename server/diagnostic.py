"""``GET /api/connection-check``: a diagnostic event stream that shows what lies between the
page and the server (the page's "Check my connection", ``static/connection.js``).

A proxy that buffers responses holds small events back and delivers them together, late;
one with a short idle timeout cuts a quiet stream. The check makes both visible to the
person who asks, without reading any conversation: an event stream in the format of
WHATWG HTML §9.2 "Server-sent events" (event stream format), with the response headers
of every stream (:data:`server.sse.HEADERS`: ``text/event-stream``, ``no-cache``,
``X-Accel-Buffering: no``, which a correctly configured nginx honours), that sends

1. ``event: begin``: ``{"t", "keepalive_s", "idle_s", "burst", "spacing_ms"}``: the
   server's time (ms since the Unix epoch), its keep-alive interval and the idle gap (s),
   and how many burst events follow, how far apart (ms);
2. the burst: :data:`BURST` events ``event: burst``, ``{"seq", "t"}`` (0-based sequence
   number, the time it was sent, ms), each its own write, :data:`SPACING_MS` apart: passed
   on at once, they arrive spread as they were sent; buffered, they arrive together, late;
3. the idle gap: ``idle_s`` seconds without an event, with a ``: keep-alive`` comment
   (:data:`server.sse.KEEPALIVE`) after every ``--keepalive`` seconds of it, as the log's
   streams send them;
4. ``event: done``, ``{"seq", "t"}`` (``seq`` = :data:`BURST`), and the stream ends.

No event has an ``id:`` (this stream is no log: nothing to resume) and no ``retry:`` is
sent. It takes a stream slot like any event stream (``429`` when none is free,
:class:`server.admission.StreamSlots`), needs a session like any ``/api/`` route but
``PUBLIC_PATHS`` (:func:`server.login.require_session`: ``401 login_required``), and ends
early, without ``done``, when the client leaves, the session ends, or :func:`shut_down`
is called (an ``on_shutdown`` hook: without it, a check in its idle gap holds a shutdown
up until aiohttp's ``shutdown_timeout`` cancels it).
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import time
import weakref
from typing import Final

import orjson
from aiohttp import web

from . import sse
from .errors import ApiError
from .inputs import client_id
from .keys import SESSIONS, SETTINGS, STREAM_SLOTS
from .login import viewer_of

__all__ = [
    "BURST",
    "CLIENT_POLL_S",
    "DEFAULT_IDLE_S",
    "MAX_IDLE_S",
    "PATH",
    "SPACING_MS",
    "idle_seconds",
    "routes",
    "shut_down",
]

routes = web.RouteTableDef()

PATH: Final = "/api/connection-check"

BURST: Final = 10
"""Events in the burst."""
SPACING_MS: Final = 50
"""Milliseconds between two burst events: the burst spans 450 ms, long enough that a
browser's own scheduling (a busy tab reads several chunks at once) does not look like a
proxy holding events back, short enough to fit well inside any proxy buffer's timer."""
DEFAULT_IDLE_S: Final = 75.0
"""The idle gap when ``idle`` is not given (s): longer than nginx's default
``proxy_read_timeout`` (60 s) and most load balancers' idle timeouts (AWS ALB: 60 s)."""
MAX_IDLE_S: Final = 300.0
"""The longest idle gap one may ask for (s)."""
CLIENT_POLL_S: Final = 1.0
"""How often the idle gap looks whether the client has left (s), so a left check frees
its stream slot within a second rather than at its next keep-alive."""

_RUNNING: Final[weakref.WeakKeyDictionary[web.Application, set[asyncio.Event]]] = (
    weakref.WeakKeyDictionary()
)
"""The stop events of the checks running in each application (for :func:`shut_down`)."""

_SECONDS = re.compile(r"[0-9]{1,3}(?:\.[0-9]{1,3})?")


def idle_seconds(text: str | None) -> float:
    """The ``idle`` query parameter: seconds of idle gap, ASCII decimal (``2``, ``2.5``;
    at most 3 decimals), from 0 to :data:`MAX_IDLE_S`; :data:`DEFAULT_IDLE_S` when absent.

    :raises ApiError: ``400 invalid_query`` (no sign, exponent, spaces, ``nan`` or ``inf``).
    """
    if text is None:
        return DEFAULT_IDLE_S
    if not _SECONDS.fullmatch(text) or float(text) > MAX_IDLE_S:
        raise ApiError(
            400,
            "invalid_query",
            f"'idle' must be a number of seconds from 0 to {MAX_IDLE_S:g}",
        )
    return float(text)


async def shut_down(app: web.Application) -> None:
    """End every check running in ``app`` now, without its ``done`` (an ``on_shutdown``
    hook: ``app.on_shutdown.append(shut_down)``)."""
    for stopped in _RUNNING.get(app, ()):
        stopped.set()


def _event(kind: bytes, data: dict[str, object]) -> bytes:
    return b"event: %s\ndata: %s\n\n" % (kind, orjson.dumps(data))


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


@routes.get(PATH)
async def connection_check(request: web.Request) -> web.StreamResponse:
    """The diagnostic stream (see the module's docstring for its bytes).

    Query: ``idle``, the idle gap in seconds (:func:`idle_seconds`).

    :raises ApiError: ``400 invalid_query`` (``401 login_required`` comes from the
        session middleware before this runs).
    :raises server.admission.TooManyError: no stream slot is free (answered ``429
        too_many_requests`` with ``Retry-After``).
    """
    idle = idle_seconds(request.query.get("idle"))
    keepalive = request.app[SETTINGS].keepalive
    viewer = viewer_of(request)
    stopped = asyncio.Event()
    running = _RUNNING.setdefault(request.app, set())
    with (
        request.app[STREAM_SLOTS].hold(client_id(request)),
        request.app[SESSIONS].watch(viewer, stopped.set),
    ):
        response = web.StreamResponse(headers=sse.HEADERS)
        await response.prepare(request)
        if request.method == "HEAD":
            return response  # the headers only: a HEAD response has no body
        running.add(stopped)
        try:
            with contextlib.suppress(ConnectionError):  # the client left
                await _send(request, response, stopped, idle=idle, keepalive=keepalive)
        finally:
            running.discard(stopped)
    return response


async def _send(
    request: web.Request,
    response: web.StreamResponse,
    stopped: asyncio.Event,
    *,
    idle: float,
    keepalive: float,
) -> None:
    begin = {
        "t": _now_ms(),
        "keepalive_s": keepalive,
        "idle_s": idle,
        "burst": BURST,
        "spacing_ms": SPACING_MS,
    }
    await response.write(_event(b"begin", begin))
    for seq in range(BURST):
        if seq:
            await asyncio.sleep(SPACING_MS / 1000)
        if stopped.is_set():
            return
        await response.write(_event(b"burst", {"seq": seq, "t": _now_ms()}))
    if not await _idle(request, response, stopped, idle, keepalive):
        return
    await response.write(_event(b"done", {"seq": BURST, "t": _now_ms()}))
    await response.write_eof()


async def _idle(
    request: web.Request,
    response: web.StreamResponse,
    stopped: asyncio.Event,
    seconds: float,
    keepalive: float,
) -> bool:
    """``seconds`` without an event, a keep-alive after every ``keepalive`` seconds of it.

    :returns: whether the gap ran its course (not: the client left, or the session ended).
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + seconds
    last = loop.time()  # when bytes last went out
    while True:
        now = loop.time()
        if now >= deadline:
            return True
        due = last + keepalive
        wake = min(due, deadline, now + CLIENT_POLL_S)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stopped.wait(), wake - now)
        transport = request.transport
        if stopped.is_set() or transport is None or transport.is_closing():
            return False
        if due < deadline and loop.time() >= due:
            await response.write(sse.KEEPALIVE)
            last = loop.time()
