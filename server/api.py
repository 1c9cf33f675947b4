"""The HTTP API of DESIGN.md: JSON routes and the SSE event stream.

Errors are JSON ``{"error": "<code>", "message": "<human text>"}`` (plus fields such as
``offset``) with a 4xx status for bad input and 5xx only for faults of the server; storage
errors escape the handlers and :mod:`server.errors` answers them. A conversation id is
checked before any file is touched.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import orjson
from aiohttp import web

from ..storage import ConversationLog, Store, check_id
from . import __version__, sse
from .admission import client_of
from .errors import ApiError, during
from .generation import NoReplyError, Replies, ReplyRunningError, Started
from .keys import CREATE_RATE, MESSAGE_RATE, PROVIDER, REPLIES, SETTINGS, STORE, STREAM_SLOTS
from .stream import EventStream
from .text import has_visible

__all__ = ["PINNED_LOGS", "routes", "unpin_logs"]

logger = logging.getLogger(__name__)

routes = web.RouteTableDef()

MAX_TITLE_CHARS = 200


def _json(data: Any, *, status: int = 200) -> web.Response:
    return web.Response(body=orjson.dumps(data), status=status, content_type="application/json")


# -- helpers ------------------------------------------------------------------------------


async def _body(request: web.Request, *, required: bool = True) -> dict[str, Any]:
    """The request's JSON object body (``{}`` when empty and not ``required``).

    :raises ApiError: ``408 body_timeout`` (and the connection closes) when the body has
        not arrived ``Settings.body_timeout`` seconds after its headers; ``400`` when it
        is no JSON object. (aiohttp answers ``413`` past ``client_max_size``.)
    """
    timeout = request.app[SETTINGS].body_timeout
    try:
        async with asyncio.timeout(timeout):  # a body that trickles in holds a connection
            raw = await request.read()
    except TimeoutError:
        raise ApiError(
            408, "body_timeout", f"the request body took longer than {timeout:g} s", close=True
        ) from None
    if not raw and not required:
        return {}
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise ApiError(400, "invalid_json", "the request body is not valid JSON") from None
    if not isinstance(body, dict):
        raise ApiError(400, "invalid_body", "the request body must be a JSON object")
    return body


def _optional_str(body: dict[str, Any], name: str, *, max_chars: int | None = None) -> str | None:
    value = body.get(name)
    if value is None:
        return None
    if not isinstance(value, str):
        raise ApiError(400, "invalid_field", f"'{name}' must be a string")
    if max_chars is not None and len(value) > max_chars:
        raise ApiError(400, "invalid_field", f"'{name}' is longer than {max_chars} characters")
    return value


def _client(request: web.Request) -> str:
    """Who the request comes from, for per-client limits (:func:`server.admission.client_of`)."""
    proxies = request.app[SETTINGS].trusted_proxies
    return client_of(request.remote, request.headers.get("X-Forwarded-For"), proxies)


PINNED_LOGS = web.RequestKey("pinned_logs", list)
"""The logs a request pinned (:func:`_log`); :func:`unpin_logs` unpins them at its end."""


def _model(request: web.Request, asked: str | None) -> str:
    """The model a new conversation gets: ``asked`` if it is the provider's own or one of
    ``--models``, the provider's own when ``None``.

    :raises ApiError: ``400 unknown_model`` (the answer lists the allowed ones).
    """
    own = request.app[PROVIDER].model
    if asked is None:
        return own
    allowed = list(dict.fromkeys((own, *request.app[SETTINGS].models)))
    if asked not in allowed:
        raise ApiError(
            400,
            "unknown_model",
            f"'model' must be one of: {', '.join(allowed)}",
            models=allowed,
        )
    return asked


async def _log(request: web.Request) -> ConversationLog:
    """The open log the request's ``conversation_id`` names, pinned until the request
    ends (:meth:`storage.ConversationLog.pin`: the store closes only idle logs)."""
    conversation_id = check_id(request.match_info["conversation_id"])  # before any file
    with during("open"):
        log = await request.app[STORE].open(conversation_id)
    log.pin()  # before any await: the store may close an unpinned log as idle
    pinned = request.get(PINNED_LOGS)
    if pinned is None:
        pinned = request[PINNED_LOGS] = []
    pinned.append(log)
    return log


@web.middleware
async def unpin_logs(request: web.Request, handler: Any) -> web.StreamResponse:
    """Unpin the logs a request pinned once its handler is done (an event stream's
    handler returns when the stream ends)."""
    try:
        return await handler(request)
    finally:
        for log in request.get(PINNED_LOGS, ()):
            log.unpin()


def _info(conversation_id: str, log: ConversationLog, replies: Replies) -> dict[str, Any]:
    summary = log.summary
    return {
        "id": conversation_id,
        "title": summary.title,
        "model": summary.model,
        "system": summary.system,
        "created": summary.created,
        "updated": summary.updated,
        "size": log.committed,
        "running": replies.running(conversation_id),
        "writable": log.live,
    }


# -- routes -------------------------------------------------------------------------------


@routes.get("/api/health")
async def health(request: web.Request) -> web.Response:
    return _json({"ok": True, "version": __version__})


@routes.get("/api/conversations")
async def list_conversations(request: web.Request) -> web.Response:
    rows = await request.app[STORE].list()
    replies = request.app[REPLIES]
    return _json(
        [
            {
                "id": r.id,
                "title": r.title,
                "created": r.created,
                "updated": r.updated,
                "size": r.size,
                "running": replies.running(r.id),
            }
            for r in rows
        ]
    )


@routes.post("/api/conversations")
async def create_conversation(request: web.Request) -> web.Response:
    body = await _body(request, required=False)
    title = _optional_str(body, "title", max_chars=MAX_TITLE_CHARS) or ""
    if title and not has_visible(title):
        raise ApiError(400, "invalid_field", "'title' has no visible character")
    model = _model(request, _optional_str(body, "model", max_chars=200) or None)
    system = _optional_str(body, "system", max_chars=request.app[SETTINGS].max_message_chars)
    store: Store = request.app[STORE]
    # Checked before any file is made; only a create that succeeds counts.
    async with request.app[CREATE_RATE].admit(_client(request)):
        with during("create"):
            try:
                log = await store.create(title=title, model=model, system=system)
            except OSError as exc:
                logger.error("cannot create a conversation: %s", exc)
                raise
    conversation_id = log.summary.conversation_id or ""
    return _json(_info(conversation_id, log, request.app[REPLIES]), status=201)


@routes.get("/api/conversations/{conversation_id}")
async def get_conversation(request: web.Request) -> web.Response:
    """The conversation's current path, a page at a time: the newest ``limit`` messages
    (default :data:`PAGE_LIMIT`, at most :data:`MAX_PAGE_LIMIT`) before the message
    ``before`` (default: the newest), oldest first; ``more`` says whether older ones
    exist; ``offset`` is the committed offset the page reflects (open the event stream
    there). Costs what it returns: the open log keeps its fold up to date.

    :raises ApiError: ``400 invalid_query`` for a bad ``limit``, ``400 unknown_message``
        for a ``before`` that is no message of this conversation.
    """
    limit = _limit(request.query.get("limit"))
    before = request.query.get("before")
    log = await _log(request)
    view = await log.view()
    offset = log.committed  # no await since the view: the page is exactly this offset's
    try:
        page, more = view.page(limit, before)
    except KeyError:
        raise ApiError(
            400, "unknown_message", "'before' is no message of this conversation"
        ) from None
    conversation_id = request.match_info["conversation_id"]
    return _json(
        {
            **_info(conversation_id, log, request.app[REPLIES]),
            "messages": page,
            "more": more,
            "offset": offset,
        }
    )


PAGE_LIMIT = 50
"""Messages in a page of ``GET /api/conversations/{id}`` unless ``limit`` says."""
MAX_PAGE_LIMIT = 500
"""The most messages one page may ask for."""


def _limit(text: str | None) -> int:
    if text is None:
        return PAGE_LIMIT
    if not (text.isascii() and text.isdigit()) or not 1 <= int(text) <= MAX_PAGE_LIMIT:
        raise ApiError(
            400, "invalid_query", f"'limit' must be an integer from 1 to {MAX_PAGE_LIMIT}"
        )
    return int(text)


@routes.post("/api/conversations/{conversation_id}/messages")
async def post_message(request: web.Request) -> web.StreamResponse:
    log = await _log(request)
    body = await _body(request)
    text = body.get("text")
    if not isinstance(text, str):
        raise ApiError(400, "invalid_field", "'text' is required and must be a string")
    if not text.strip():
        raise ApiError(400, "invalid_field", "'text' must not be empty")
    if not has_visible(text):
        raise ApiError(400, "invalid_field", "'text' has no visible character")
    limit = request.app[SETTINGS].max_message_chars
    if len(text) > limit:
        raise ApiError(400, "invalid_field", f"'text' is longer than {limit} characters")
    conversation_id = request.match_info["conversation_id"]
    replies = request.app[REPLIES]
    client = _client(request)
    # Checked before the message is appended; only an accepted one counts (a 409 does not).
    rate = request.app[MESSAGE_RATE]
    if "text/event-stream" in request.headers.get("Accept", ""):
        with request.app[STREAM_SLOTS].hold(client):  # taken before the message is appended
            async with rate.admit(client):
                started = await _send(replies, conversation_id, log, text)
            return await _stream(request, log, started.offset, until_end_of=started.reply_id)
    async with rate.admit(client):
        started = await _send(replies, conversation_id, log, text)
    return _json(
        {
            "message_id": started.message_id,
            "reply_id": started.reply_id,
            "offset": started.offset,
        },
        status=202,
    )


async def _send(replies: Replies, conversation_id: str, log: ConversationLog, text: str) -> Started:
    try:
        return await replies.send(conversation_id, log, text)
    except ReplyRunningError:
        raise ApiError(
            409,
            "reply_running",
            "a reply is already running in this conversation",
            reply_id=replies.running(conversation_id),
        ) from None


@routes.post("/api/conversations/{conversation_id}/stop")
async def stop_reply(request: web.Request) -> web.Response:
    log = await _log(request)
    try:
        reply_id = await request.app[REPLIES].stop(request.match_info["conversation_id"])
    except NoReplyError:
        raise ApiError(
            409, "no_reply_running", "no reply is running in this conversation"
        ) from None
    return _json({"reply_id": reply_id, "offset": log.committed})


@routes.get("/api/conversations/{conversation_id}/log")
async def raw_log(request: web.Request) -> web.StreamResponse:
    log = await _log(request)
    end = log.committed
    response = web.StreamResponse(headers={"Content-Type": "application/x-ndjson"})
    response.content_length = end
    await response.prepare(request)
    if request.method == "HEAD":
        return response  # the headers only: a HEAD response has no body
    position = 0
    while position < end:
        block = await log.read(position, min(end, position + (1 << 20)))
        await response.write(block)
        position += len(block)
    await response.write_eof()
    return response


@routes.get("/api/conversations/{conversation_id}/events")
async def events(request: web.Request) -> web.StreamResponse:
    log = await _log(request)
    try:
        start = sse.start_offset(request.headers, request.query)
    except sse.StartOffsetError as exc:
        raise ApiError(400, "invalid_offset", str(exc)) from None
    with request.app[STREAM_SLOTS].hold(_client(request)):
        return await _stream(request, log, start)


async def _stream(
    request: web.Request, log: ConversationLog, start: int, *, until_end_of: str | None = None
) -> web.StreamResponse:
    """Check ``start`` (an :class:`~storage.OffsetError`, answered ``416``, when it is no
    record boundary of the committed log), then stream
    (:class:`server.stream.EventStream`). The caller holds a stream slot."""
    await log.check_offset(start)
    settings = request.app[SETTINGS]
    stream = EventStream(
        request,
        log,
        start,
        keepalive=settings.keepalive,
        retry_ms=settings.retry_ms,
        until_end_of=until_end_of,
    )
    return await stream.run()
