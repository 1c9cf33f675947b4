"""The HTTP API of DESIGN.md: JSON routes and the SSE event stream.

Errors are JSON ``{"error": "<code>", "message": "<human text>"}`` (plus fields such as
``offset``) with a 4xx status for bad input and 5xx only for faults of the server; storage
errors escape the handlers and :mod:`server.errors` answers them. A conversation id is
checked before any file is touched.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from typing import Any, Final

import orjson
from aiohttp import web

from ..storage import ConversationLog, LogError, Store, check_id
from ..storage.fold import Folded
from . import __version__, sse
from .access import Access, access, guardians, owner_of
from .budgets import BudgetExceededError
from .errors import ApiError, during
from .generation import NoReplyError, Replies, ReplyRunningError, Started, UnknownMessageError
from .inputs import client_id, json_body, optional_str
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
from .login import viewer_of
from .receipts import ACCESS, Receipt, audited
from .stream import EventStream
from .text import has_visible

__all__ = [
    "ACCESS",
    "NOT_FOUND",
    "PINNED_LOGS",
    "Receipt",
    "audited",
    "conversation_info",
    "conversation_log",
    "routes",
    "unpin_logs",
]

logger = logging.getLogger(__name__)

routes = web.RouteTableDef()

MAX_TITLE_CHARS = 200


def _json(data: Any, *, status: int = 200) -> web.Response:
    return web.Response(body=orjson.dumps(data), status=status, content_type="application/json")


# -- helpers ------------------------------------------------------------------------------


PINNED_LOGS = web.RequestKey("pinned_logs", list)
"""The logs a request pinned (:func:`conversation_log`); :func:`unpin_logs` unpins them
at its end."""


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


async def conversation_log(request: web.Request, *, write: bool = False) -> ConversationLog:
    """The open log the request's ``conversation_id`` names, if the viewer may see it
    (:func:`server.access.access`), pinned until the request ends
    (:meth:`storage.ConversationLog.pin`: the store closes only idle logs).

    :raises ApiError: ``404 not_found`` for a conversation the viewer may not see, the
        very answer an unknown id gets; ``403 guardian_read_only`` when ``write`` and the
        viewer is a guardian.
    """
    conversation_id = check_id(request.match_info["conversation_id"])  # before any file
    with during("open"):
        log = await request.app[STORE].open(conversation_id)
    log.pin()  # before any await: the store may close an unpinned log as idle
    pinned = request.get(PINNED_LOGS)
    if pinned is None:
        pinned = request[PINNED_LOGS] = []
    pinned.append(log)
    allowed = access(viewer_of(request), log.summary.owner, request.app[SESSIONS].state)
    if allowed is None:
        raise NOT_FOUND
    request[ACCESS] = allowed
    if write and allowed is Access.GUARDIAN:
        raise ApiError(
            403,
            "guardian_read_only",
            "a guardian may read a child's conversations, not write in them",
        )
    return log


NOT_FOUND: Final = ApiError(404, "not_found", "no such conversation")
"""The answer to an unknown id, and to a conversation the viewer may not see."""


@web.middleware
async def unpin_logs(request: web.Request, handler: Any) -> web.StreamResponse:
    """Unpin the logs a request pinned once its handler is done (an event stream's
    handler returns when the stream ends)."""
    try:
        return await handler(request)
    finally:
        for log in request.get(PINNED_LOGS, ()):
            log.unpin()


def conversation_info(
    conversation_id: str, log: ConversationLog, replies: Replies
) -> dict[str, Any]:
    """What ``POST /api/conversations`` answers, and a page and ``PATCH`` begin with:
    ``id``, ``title``, ``model``, ``system``, ``created``/``updated`` (ms since the
    epoch), ``size`` (bytes: the committed offset), ``running`` (reply id or null),
    ``writable``, ``archived``."""
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
        "archived": summary.archived,
    }


# -- routes -------------------------------------------------------------------------------


@routes.get("/api/health")
async def health(request: web.Request) -> web.Response:
    return _json({"ok": True, "version": __version__})


@routes.get("/api/conversations")
async def list_conversations(request: web.Request) -> web.Response:
    """The conversations the viewer may see, newest first: its own, and (a parent) the
    children's, read-only (``access: "guardian"``, ``owner``: the child's name)."""
    rows = await request.app[STORE].list()
    replies = request.app[REPLIES]
    viewer = viewer_of(request)
    state = request.app[SESSIONS].state
    out = []
    seen = []
    for r in rows:
        allowed = access(viewer, r.owner, state)
        if allowed is None:
            continue
        if allowed is Access.GUARDIAN:
            seen.append(r.id)
        owner = state.accounts.get(owner_of(r.owner, state) or "")
        out.append(
            {
                "id": r.id,
                "title": r.title,
                "created": r.created,
                "updated": r.updated,
                "size": r.size,
                "running": replies.running(r.id),
                "access": allowed.value,
                "owner": owner.name if owner is not None else None,
                "archived": r.archived,
            }
        )
    if seen:
        # A child's title is its first line: a guardian sees it only on the record
        # (an open and a close per conversation, read "title"); one that cannot be
        # recorded is listed with its title hidden.
        hidden = await _record_titles(request, viewer.id, seen)
        for row in out:
            if row["id"] in hidden:
                row["title"], row["title_hidden"] = "", True
    return _json(out)


async def _record_titles(request: web.Request, viewer: str, ids: list[str]) -> set[str]:
    audit = request.app[AUDIT]
    client = client_id(request)

    async def record(conversation_id: str) -> None:
        conn = await audit.opened(
            conversation_id, viewer=viewer, client=client, start=0, read="title"
        )
        await audit.closed(conversation_id, conn, to=0, reason="end")

    results = await asyncio.gather(*(record(i) for i in ids), return_exceptions=True)
    failed = {i for i, result in zip(ids, results, strict=True) if isinstance(result, Exception)}
    for conversation_id in failed:
        logger.error("audit log of %s: cannot record a listed title", conversation_id)
    return failed


@routes.post("/api/conversations")
async def create_conversation(request: web.Request) -> web.Response:
    body = await json_body(request, required=False)
    title = optional_str(body, "title", max_chars=MAX_TITLE_CHARS) or ""
    if title and not has_visible(title):
        raise ApiError(400, "invalid_field", "'title' has no visible character")
    model = _model(request, optional_str(body, "model", max_chars=200) or None)
    system = optional_str(body, "system", max_chars=request.app[SETTINGS].max_message_chars)
    store: Store = request.app[STORE]
    viewer = viewer_of(request)
    # Checked before any file is made; only a create that succeeds counts.
    async with request.app[CREATE_RATE].admit(client_id(request)):
        with during("create"):
            try:
                log = await store.create(
                    title=title,
                    model=model,
                    system=system,
                    owner=None if viewer.local else viewer.id,
                )
            except OSError as exc:
                logger.error("cannot create a conversation: %s", exc)
                raise
    conversation_id = log.summary.conversation_id or ""
    try:  # its audit log too, so that a read only appends (a stream's start costs no create)
        await request.app[AUDIT].prepare(conversation_id)
    except (OSError, LogError) as exc:
        logger.error("audit log of %s: cannot be created yet: %s", conversation_id, exc)
    return _json(conversation_info(conversation_id, log, request.app[REPLIES]), status=201)


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
    log = await conversation_log(request)
    view = await log.view()
    if request.method == "HEAD" and request[ACCESS] is Access.OWNER:
        return _page(request, log, view, limit, before)
    # A guardian's HEAD is a read too: its Content-Length tells how much a child wrote.
    read = "head" if request.method == "HEAD" else "view"
    async with audited(request, 0, read=read) as receipt:  # before the page is made
        response = _page(request, log, view, limit, before)
        await response.prepare(request)
        await response.write_eof()  # sent (to the transport) before the close says so
        receipt.to = response[_PAGE_OFFSET] if read == "view" else 0
    return response


def _page(
    request: web.Request, log: ConversationLog, view: Folded, limit: int, before: str | None
) -> web.Response:
    offset = log.committed  # no await since the view: the page is exactly this offset's
    try:
        page, more = view.page(limit, before)
    except KeyError:
        raise ApiError(
            400, "unknown_message", "'before' is no message of this conversation"
        ) from None
    conversation_id = request.match_info["conversation_id"]
    response = _json(
        {
            **conversation_info(conversation_id, log, request.app[REPLIES]),
            "messages": page,
            "more": more,
            "offset": offset,
        }
    )
    response[_PAGE_OFFSET] = offset
    return response


_PAGE_OFFSET = web.ResponseKey("page_offset", int)
"""The committed offset a page of the conversation reflects (what its receipt says)."""


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
    """Send a message and start the reply (DESIGN.md API table): body ``{"text"}``, and
    optionally ``parent`` (the reply it follows; ``null``: a first message; absent: the
    end of the current path) or ``edit_of`` (edit and resend: a user message, whose
    parent the new one shares). ``202 {"message_id", "reply_id", "offset"}``, or with
    ``Accept: text/event-stream`` the event stream from ``offset`` to the reply's ``end``.

    :raises ApiError: ``400 invalid_field``/``unknown_message``, ``409 reply_running``,
        ``429 budget_exceeded``.
    """
    log = await conversation_log(request, write=True)
    body = await json_body(request)
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
    parent = _message_id(body, "parent", nullable=True) if "parent" in body else "current"
    edit_of = _message_id(body, "edit_of")
    replies = request.app[REPLIES]
    conversation_id = request.match_info["conversation_id"]

    def send(by: str | None) -> Awaitable[Started]:
        return replies.send(conversation_id, log, text, by=by, parent=parent, edit_of=edit_of)

    return await _exchange(request, log, send)


@routes.post("/api/conversations/{conversation_id}/regenerate")
async def regenerate(request: web.Request) -> web.StreamResponse:
    """Another answer to the message a reply answers: body ``{"reply_id"}``; answers as
    ``POST .../messages`` does (``message_id`` is the message answered; ``offset`` the
    boundary before the new ``start``). The old answer stays, a sibling of the new one.

    :raises ApiError: ``400 invalid_field``/``unknown_message``, ``409 reply_running``,
        ``429 budget_exceeded``.
    """
    log = await conversation_log(request, write=True)
    body = await json_body(request)
    reply_id = _required_message_id(body, "reply_id")
    replies = request.app[REPLIES]
    conversation_id = request.match_info["conversation_id"]

    def start(by: str | None) -> Awaitable[Started]:
        return replies.regenerate(conversation_id, log, reply_id, by=by)

    return await _exchange(request, log, start)


@routes.post("/api/conversations/{conversation_id}/select")
async def select(request: web.Request) -> web.Response:
    """Choose the current branch: body ``{"leaf"}`` (any message id; the path goes to the
    newest message under it) appends a ``select`` record. ``200 {"leaf", "offset"}``: the
    current leaf now, the committed offset after the record.

    :raises ApiError: ``400 invalid_field``/``unknown_message``, ``409 reply_running``.
    """
    log = await conversation_log(request, write=True)
    body = await json_body(request)
    leaf = _required_message_id(body, "leaf")
    replies = request.app[REPLIES]
    conversation_id = request.match_info["conversation_id"]
    try:
        current, offset = await replies.select(conversation_id, log, leaf)
    except UnknownMessageError as exc:
        raise ApiError(400, "unknown_message", str(exc), field=exc.field) from None
    except ReplyRunningError:
        raise _reply_running(replies, conversation_id) from None
    return _json({"leaf": current, "offset": offset})


MAX_MESSAGE_ID_CHARS = 128
"""The longest message id a request may name (ours are 22 characters)."""


def _message_id(body: dict[str, Any], name: str, *, nullable: bool = False) -> str | None:
    """A message id field of a request body (absent: ``None``).

    :raises ApiError: ``400 invalid_field``: not a string (or ``null``, when ``nullable``),
        empty, or longer than :data:`MAX_MESSAGE_ID_CHARS`.
    """
    value = body.get(name)
    if value is None:
        if name in body and not nullable:
            raise ApiError(400, "invalid_field", f"'{name}' must be a message id")
        return None
    if not isinstance(value, str) or not 0 < len(value) <= MAX_MESSAGE_ID_CHARS:
        raise ApiError(400, "invalid_field", f"'{name}' must be a message id")
    return value


def _required_message_id(body: dict[str, Any], name: str) -> str:
    """:func:`_message_id`, which the body must have. :raises ApiError: ``400``."""
    value = _message_id(body, name)
    if value is None:
        raise ApiError(400, "invalid_field", f"'{name}' is required")
    return value


async def _exchange(
    request: web.Request,
    log: ConversationLog,
    begin: Callable[[str | None], Awaitable[Started]],
) -> web.StreamResponse:
    """Begin an exchange (``begin(by)``: a message sent, or a reply regenerated) within the
    sender's rate and daily budget, and answer ``202`` with its ids, or with
    ``Accept: text/event-stream`` the stream from its ``offset`` to its reply's ``end``."""
    client = client_id(request)
    viewer = viewer_of(request)
    by = None if viewer.local else viewer.id
    rate = request.app[MESSAGE_RATE]
    if "text/event-stream" in request.headers.get("Accept", ""):
        with request.app[STREAM_SLOTS].hold(client):  # taken before the message is appended
            async with rate.admit(client):
                started = await _counted(request, begin, by)
            return await _stream(request, log, started.offset, until_end_of=started.reply_id)
    async with rate.admit(client):
        started = await _counted(request, begin, by)
    return _json(
        {
            "message_id": started.message_id,
            "reply_id": started.reply_id,
            "offset": started.offset,
        },
        status=202,
    )


async def _counted(
    request: web.Request, begin: Callable[[str | None], Awaitable[Started]], by: str | None
) -> Started:
    """Begin the exchange; an account's budget is checked and the message counted in the
    same step, and given back if it was not sent."""
    replies = request.app[REPLIES]
    account = request.app[SESSIONS].account(by) if by is not None else None
    budget = (
        request.app[BUDGETS].admit(account) if account is not None else contextlib.nullcontext()
    )
    conversation_id = request.match_info["conversation_id"]
    try:
        async with budget:
            return await begin(by)
    except BudgetExceededError as exc:
        raise ApiError.retry_later("budget_exceeded", str(exc), exc.retry_after) from None
    except UnknownMessageError as exc:
        raise ApiError(400, "unknown_message", str(exc), field=exc.field) from None
    except ReplyRunningError:
        raise _reply_running(replies, conversation_id) from None


def _reply_running(replies: Replies, conversation_id: str) -> ApiError:
    return ApiError(
        409,
        "reply_running",
        "a reply is already running in this conversation",
        reply_id=replies.running(conversation_id),
    )


@routes.post("/api/conversations/{conversation_id}/stop")
async def stop_reply(request: web.Request) -> web.Response:
    log = await conversation_log(request, write=True)
    try:
        reply_id = await request.app[REPLIES].stop(request.match_info["conversation_id"])
    except NoReplyError:
        raise ApiError(
            409, "no_reply_running", "no reply is running in this conversation"
        ) from None
    return _json({"reply_id": reply_id, "offset": log.committed})


@routes.get("/api/conversations/{conversation_id}/log")
async def raw_log(request: web.Request) -> web.StreamResponse:
    log = await conversation_log(request)
    end = log.committed
    response = web.StreamResponse(headers={"Content-Type": "application/x-ndjson"})
    response.content_length = end
    if request.method == "HEAD":
        if request[ACCESS] is Access.OWNER:
            await response.prepare(request)
            return response  # the headers only: a HEAD response has no body
        async with audited(request, 0, read="head") as receipt:  # its length is a read
            await response.prepare(request)
            receipt.to = 0
        return response
    async with audited(request, 0, read="log") as receipt:  # before even the headers
        await response.prepare(request)
        position = 0
        while position < end:
            block = await log.read(position, min(end, position + (1 << 20)))
            await response.write(block)
            position += len(block)
            receipt.to = position
        await response.write_eof()
    return response


@routes.get("/api/conversations/{conversation_id}/audit")
async def audit_of(request: web.Request) -> web.Response:
    """Who was sent which bytes of the conversation, and what they saw (its owner and
    guardians; DESIGN.md "The audit log"):

    * ``reads``, oldest first: ``conn``, ``viewer`` (an account id or ``local``),
      ``name``, ``client``, ``from``/``to`` offsets, ``opened``/``closed`` (ms),
      ``reason``, ``delivered`` (``[{"to", "at"}]``: receipts while it sent, and at close);
    * ``viewers``: per viewer, per reply: ``generated`` (its end's ts, or null while it
      runs), ``delivered`` (when a read of it had been sent past the reply's end) and
      ``seen`` (when the page reported it rendered past it), each ms or null;
    * ``readers``: who else may read it (``name``, ``last_read``).
    """
    log = await conversation_log(request)
    conversation_id = request.match_info["conversation_id"]
    reads, seen = await request.app[AUDIT].reads(conversation_id)
    view = await log.view()
    state = request.app[SESSIONS].state

    def name(viewer: str) -> str | None:
        account = state.accounts.get(viewer)
        return account.name if account is not None else None

    readers = []
    owner = state.accounts.get(owner_of(log.summary.owner, state) or "")
    for guardian in guardians(owner, state) if owner is not None else []:
        times = [r.opened for r in reads if r.viewer == guardian.id]
        readers.append(
            {"id": guardian.id, "name": guardian.name, "last_read": max(times, default=None)}
        )
    viewers = []
    for viewer in dict.fromkeys(r.viewer for r in reads):
        mine = [r for r in reads if r.viewer == viewer]
        replies = []
        for reply_id, start, end, ended in view.replies():
            delivered = [
                at
                for r in mine
                if r.start <= start
                for to, at in r.delivered
                if end is not None and to > end
            ]
            shown = [v.ts for v in seen if v.viewer == viewer and end is not None and v.upto > end]
            replies.append(
                {
                    "reply_id": reply_id,
                    "generated": ended,
                    "delivered": min(delivered, default=None),
                    "seen": min(shown, default=None),
                }
            )
        viewers.append({"viewer": viewer, "name": name(viewer), "replies": replies})
    return _json(
        {
            "reads": [
                {
                    "conn": r.conn,
                    "read": r.read,
                    "viewer": r.viewer,
                    "name": name(r.viewer),
                    "client": r.client,
                    "from": r.start,
                    "to": r.to,
                    "opened": r.opened,
                    "closed": r.closed,
                    "reason": r.reason,
                    "delivered": [{"to": to, "at": at} for to, at in r.delivered],
                }
                for r in reads
            ],
            "viewers": viewers,
            "readers": readers,
        }
    )


RENDERER_CHARS = 64
"""The longest ``renderer`` (the page's version) a ``seen`` may name."""


@routes.post("/api/conversations/{conversation_id}/seen")
async def seen(request: web.Request) -> web.Response:
    """Body ``{"offset", "renderer"?}``: the page rendered every record before ``offset``
    while it was visible → ``204``; a ``seen`` record in the audit log, attributed to the
    viewer's newest live event stream of the conversation. ``offset`` must be a record
    boundary within the committed log (``416`` otherwise)."""
    log = await conversation_log(request)
    body = await json_body(request)
    offset = body.get("offset")
    if not isinstance(offset, int) or isinstance(offset, bool) or offset < 0:
        raise ApiError(400, "invalid_field", "'offset' must be a non-negative integer")
    renderer = optional_str(body, "renderer", max_chars=RENDERER_CHARS) or ""
    await log.check_offset(offset)
    conversation_id = request.match_info["conversation_id"]
    viewer = viewer_of(request).id
    try:
        await request.app[AUDIT].seen(
            conversation_id,
            conn=request.app[DELIVERIES].newest(conversation_id, viewer),
            viewer=viewer,
            upto=offset,
            renderer=renderer,
        )
    except (OSError, LogError) as exc:
        logger.error("audit log of %s: cannot record a seen: %s", conversation_id, exc)
        raise ApiError(503, "audit_unavailable", "the audit log cannot be written now") from None
    return web.Response(status=204)


@routes.get("/api/conversations/{conversation_id}/events")
async def events(request: web.Request) -> web.StreamResponse:
    log = await conversation_log(request)
    try:
        start = sse.start_offset(request.headers, request.query)
    except sse.StartOffsetError as exc:
        raise ApiError(400, "invalid_offset", str(exc)) from None
    with request.app[STREAM_SLOTS].hold(client_id(request)):
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
    if request.method == "HEAD":
        return await stream.run()  # headers only: nothing of the conversation is sent
    viewer = viewer_of(request)
    read = "events" if until_end_of is None else "reply"
    async with audited(request, start, read=read, progress=lambda: stream.position) as receipt:
        with request.app[SESSIONS].watch(viewer, lambda: stream.stop("session_ended")):
            try:
                return await stream.run()
            finally:
                receipt.to, receipt.reason = stream.position, stream.reason
