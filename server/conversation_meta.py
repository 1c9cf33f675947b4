"""``PATCH /api/conversations/{id}``: rename a conversation, archive or unarchive it
(DESIGN.md "The HTTP API"; records ``title``, ``archive``, ``unarchive``).

Body ``{"title"?: str, "archived"?: bool}``, at least one of them and nothing else. Who
may is who may write: :func:`server.api.conversation_log` with ``write=True`` (its owner;
a guardian gets ``403 guardian_read_only``; anyone else the ``404`` an unknown id gets,
before the body is read). The fields are all checked before anything is appended.

A record is appended only when it changes something: a ``title`` equal to the current
one, ``archived: true`` on an archived conversation and ``archived: false`` on a listed
one append nothing and answer ``200`` all the same (the log only grows, and every record
moves the conversation's ``updated``, hence its place in the list). When both fields
change, the ``title`` record comes first. PATCHes of one conversation run one at a time
(the check and the append are one step), so two alike that race append one record. The
answer is the conversation's info as it
stands after (:func:`server.api.conversation_info`).

Register with ``app.add_routes(routes)``.
"""

from __future__ import annotations

import asyncio
import unicodedata
import weakref
from typing import Final

import orjson
from aiohttp import web

from ..storage import ConversationLog, records
from .api import MAX_TITLE_CHARS, conversation_info, conversation_log
from .errors import ApiError
from .inputs import json_body
from .keys import REPLIES
from .login import viewer_of
from .text import has_visible

__all__ = ["FIELDS", "MAX_TITLE_CHARS", "clean_title", "routes"]

routes = web.RouteTableDef()

FIELDS: Final = frozenset({"title", "archived"})
"""The fields a ``PATCH`` body may have."""

_LOCKS: weakref.WeakKeyDictionary[ConversationLog, asyncio.Lock] = weakref.WeakKeyDictionary()
"""One lock per open log: a PATCH compares with the summary and appends under it."""


def clean_title(value: object) -> str:
    """The title a rename gives: ``value`` without leading and trailing whitespace.

    :param value: the body's ``title``.
    :returns: the stripped title, 1 to :data:`MAX_TITLE_CHARS` characters (code points).
    :raises ApiError: ``400 invalid_field`` when it is not a string, is empty once
        stripped, is longer than :data:`MAX_TITLE_CHARS`, holds a control character
        (Unicode ``Cc``: newline, tab, NUL, …) or has no visible character
        (:func:`server.text.has_visible`).
    """
    if not isinstance(value, str):
        raise ApiError(400, "invalid_field", "'title' must be a string")
    title = value.strip()
    if not title:
        raise ApiError(400, "invalid_field", "'title' must not be empty")
    if len(title) > MAX_TITLE_CHARS:
        raise ApiError(400, "invalid_field", f"'title' is longer than {MAX_TITLE_CHARS} characters")
    if any(unicodedata.category(char) == "Cc" for char in title):
        raise ApiError(400, "invalid_field", "'title' must not hold control characters")
    if not has_visible(title):
        raise ApiError(400, "invalid_field", "'title' has no visible character")
    return title


@routes.patch("/api/conversations/{conversation_id}")
async def patch_conversation(request: web.Request) -> web.Response:
    """Body ``{"title"?: str, "archived"?: bool}`` → ``200`` with
    :func:`server.api.conversation_info` after the change (see the module's docstring).

    :raises ApiError: ``404 not_found`` (unknown id, or a conversation the viewer may not
        see), ``403 guardian_read_only``; ``400 invalid_json`` / ``invalid_body`` (no JSON
        object), ``400 unknown_field`` (a field besides ``title`` and ``archived``),
        ``400 invalid_body`` (neither of them), ``400 invalid_field`` (see
        :func:`clean_title`; ``archived`` not a boolean). Storage errors (a log that can no
        longer be written) escape to :mod:`server.errors`.
    """
    log = await conversation_log(request, write=True)  # before the body: a 404 is a 404
    body = await json_body(request)
    unknown = sorted(set(body) - FIELDS)
    if unknown:
        raise ApiError(
            400,
            "unknown_field",
            f"unknown field {unknown[0]!r}: a PATCH takes 'title' and 'archived'",
        )
    if not FIELDS & set(body):
        raise ApiError(400, "invalid_body", "give 'title' and/or 'archived'")
    title = clean_title(body["title"]) if "title" in body else None
    archived = body.get("archived")
    if "archived" in body and not isinstance(archived, bool):
        raise ApiError(400, "invalid_field", "'archived' must be true or false")
    viewer = viewer_of(request)
    by = None if viewer.local else viewer.id
    lock = _LOCKS.setdefault(log, asyncio.Lock())
    async with lock:  # the summary moves when an append commits: compare, append, wait
        if title is not None and title != log.summary.title:
            await log.append(records.title(title=title))
        if archived is not None and archived != log.summary.archived:
            await log.append(records.archive(by=by) if archived else records.unarchive(by=by))
    conversation_id = request.match_info["conversation_id"]
    answer = conversation_info(conversation_id, log, request.app[REPLIES])
    return web.Response(body=orjson.dumps(answer), content_type="application/json")
