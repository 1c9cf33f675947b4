"""``GET /api/conversations/{id}/export?format=jsonl|md|html``: a conversation as a
download (DESIGN.md "Export and import"; the file is made by :mod:`storage.export`).

The answer is an attachment, ``Content-Disposition: attachment; filename="<title or
id>.<ext>"`` (RFC 6266; with ``filename*`` in UTF-8, RFC 8187, when the name is not
ASCII). Who may export is who may read: :func:`server.api.conversation_log` (another
person's conversation is a ``404``; a guardian may export a child's), and the read is in
the conversation's audit log before any byte of it (the title in the headers included) is
sent (:func:`server.api.audited`). It exports the log up to its committed offset when the
request came; the audit's ``close`` says up to where.

Register with ``app.add_routes(routes)``.
"""

from __future__ import annotations

import asyncio
import unicodedata
from typing import Final
from urllib.parse import quote

from aiohttp import web

from ..storage import export
from . import api
from .errors import ApiError
from .keys import SESSIONS

__all__ = ["content_disposition", "routes"]

routes = web.RouteTableDef()

BLOCK: Final = 1 << 20
"""Bytes of the log read and sent at a time (``jsonl``)."""

SANDBOX: Final = (
    "sandbox; default-src 'none'; style-src 'unsafe-inline'; base-uri 'none'; "
    "form-action 'none'; frame-ancestors 'none'"
)
"""The download's Content-Security-Policy: were it ever shown in the browser rather than
saved, nothing in it could run or load, and it would be an origin of its own."""

_ATTR_CHARS: Final = "!#$&+-.^_`|~"
"""RFC 8187 ``attr-char`` besides letters and digits (not percent-encoded)."""


def content_disposition(name: str) -> str:
    """``attachment; filename="..."`` with an ASCII fallback of ``name`` (accents
    dropped, anything else outside printable ASCII, ``"`` and ``\\`` made ``_``), plus
    ``filename*=UTF-8''...`` when ``name`` is not ASCII (RFC 6266 §4.3, RFC 8187)."""
    folded = unicodedata.normalize("NFKD", name)
    fallback = "".join(
        ch if " " <= ch <= "~" and ch not in '"\\' else ("" if unicodedata.combining(ch) else "_")
        for ch in folded
    )
    header = f'attachment; filename="{fallback}"'
    if fallback != name:
        header += f"; filename*=UTF-8''{quote(name, safe=_ATTR_CHARS)}"
    return header


def _format(request: web.Request) -> str:
    fmt = request.query.get("format")
    if fmt not in export.FORMATS:
        raise ApiError(
            400,
            "invalid_query",
            f"'format' must be one of: {', '.join(export.FORMATS)}",
            formats=list(export.FORMATS),
        )
    return fmt


@routes.get("/api/conversations/{conversation_id}/export", allow_head=False)
async def export_conversation(request: web.Request) -> web.StreamResponse:
    """The conversation up to its committed offset as ``jsonl`` (the log, byte for byte),
    ``md`` or ``html`` (:func:`storage.export.render`), as an attachment.

    :raises ApiError: ``400 invalid_query`` for a missing or unknown ``format`` (before
        the conversation is looked at); ``404`` as :func:`server.api.conversation_log`.
    """
    fmt = _format(request)
    log = await api.conversation_log(request)
    conversation_id = request.match_info["conversation_id"]
    end = log.committed
    title = log.summary.title  # no await since: the title as of ``end``
    accounts = request.app[SESSIONS].state.accounts
    names = {account_id: account.name for account_id, account in accounts.items()}
    response = web.StreamResponse(
        headers={
            "Content-Type": export.MEDIA_TYPES[fmt],
            "Content-Disposition": content_disposition(
                export.file_name(title, conversation_id, fmt)
            ),
            "Cache-Control": "no-store",
            "Content-Security-Policy": SANDBOX,
        }
    )
    async with api.audited(request, 0, read="export") as receipt:  # before the first byte
        if fmt == "jsonl":
            response.content_length = end
            await response.prepare(request)
            position = 0
            while position < end:
                block = await log.read(position, min(end, position + BLOCK))
                await response.write(block)
                position += len(block)
                receipt.to = position
        else:
            data = await log.read(0, end)
            body = await asyncio.to_thread(export.render, data, fmt, names=names)
            response.content_length = len(body)
            await response.prepare(request)
            await response.write(body)
            receipt.to = end
        await response.write_eof()
    return response
