"""The parts of a request every route reads the same way: its JSON body, its string
fields, and who it comes from."""

from __future__ import annotations

import asyncio
from typing import Any

import orjson
from aiohttp import web

from .admission import client_of
from .errors import ApiError
from .keys import SETTINGS

__all__ = ["client_id", "json_body", "optional_str"]


async def json_body(request: web.Request, *, required: bool = True) -> dict[str, Any]:
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


def optional_str(body: dict[str, Any], name: str, *, max_chars: int | None = None) -> str | None:
    value = body.get(name)
    if value is None:
        return None
    if not isinstance(value, str):
        raise ApiError(400, "invalid_field", f"'{name}' must be a string")
    if max_chars is not None and len(value) > max_chars:
        raise ApiError(400, "invalid_field", f"'{name}' is longer than {max_chars} characters")
    return value


def client_id(request: web.Request) -> str:
    """Who the request comes from, for per-client limits (:func:`server.admission.client_of`)."""
    proxies = request.app[SETTINGS].trusted_proxies
    return client_of(request.remote, request.headers.get("X-Forwarded-For"), proxies)
