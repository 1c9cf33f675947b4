"""Logging in and out, and who is asking: ``POST /api/login``, ``POST /api/logout``,
``GET /api/me``, and the middleware :func:`require_session` (DESIGN.md "The household";
:mod:`server.sessions` for the rules).
"""

from __future__ import annotations

from typing import Any

import orjson
from aiohttp import web

from .access import guardians
from .errors import ApiError
from .inputs import client_id, json_body
from .keys import BUDGETS, SESSIONS, SETTINGS, VIEWER
from .sessions import (
    COOKIE,
    LOCAL,
    PUBLIC_PATHS,
    BadCredentialsError,
    ThrottledError,
    Viewer,
    clear_cookie,
    set_cookie,
)

__all__ = ["require_session", "routes"]

routes = web.RouteTableDef()

MAX_PASSWORD_CHARS = 1024
"""Longer passwords are refused before any hashing (argon2 of megabytes is a DoS)."""


def _json(data: Any, *, status: int = 200) -> web.Response:
    return web.Response(body=orjson.dumps(data), status=status, content_type="application/json")


def _secure(request: web.Request) -> bool:
    """``Secure`` cookies when the server's public origin is https (RFC 6265bis §4.1.2.5)."""
    return any(o.startswith("https://") for o in request.app[SETTINGS].public_origins)


@web.middleware
async def require_session(request: web.Request, handler: Any) -> web.StreamResponse:
    """Set ``request[VIEWER]``: :data:`~server.sessions.LOCAL` in single-person mode, else
    the session's account. A route outside :data:`~server.sessions.PUBLIC_PATHS` and
    ``/static/`` without a live session is ``401 login_required``."""
    sessions = request.app[SESSIONS]
    viewer = sessions.viewer(request.cookies.get(COOKIE))
    if viewer is not None:
        request[VIEWER] = viewer
    elif request.path not in PUBLIC_PATHS and not request.path.startswith("/static/"):
        raise ApiError(401, "login_required", "sign in first")
    return await handler(request)


def viewer_of(request: web.Request) -> Viewer:
    """The request's viewer (:func:`require_session` set it on every route that needs one).

    :raises ApiError: ``401 login_required`` when there is none.
    """
    viewer = request.get(VIEWER)
    if viewer is None:
        raise ApiError(401, "login_required", "sign in first")
    return viewer


@routes.post("/api/login")
async def login(request: web.Request) -> web.Response:
    """Body ``{"name", "password"}`` → ``200 {"id", "name", "role"}`` and the session
    cookie; ``401 bad_credentials``; ``429 login_throttled`` with ``Retry-After``;
    ``400 no_accounts`` in single-person mode."""
    body = await json_body(request)
    name, password = body.get("name"), body.get("password")
    if not isinstance(name, str) or not isinstance(password, str):
        raise ApiError(400, "invalid_field", "'name' and 'password' are required strings")
    if len(password) > MAX_PASSWORD_CHARS or len(name) > 200:
        raise ApiError(401, "bad_credentials", "that name and password do not match")
    sessions = request.app[SESSIONS]
    if not sessions.enabled:
        await sessions.refresh()
        if not sessions.enabled:
            raise ApiError(400, "no_accounts", "this server has no accounts: everyone is signed in")
    try:
        account, session_id = await sessions.login(name, password, client_id(request))
    except ThrottledError as exc:
        raise ApiError.retry_later("login_throttled", str(exc), exc.retry_after) from None
    except BadCredentialsError:
        raise ApiError(401, "bad_credentials", "that name and password do not match") from None
    old = request.get(VIEWER)
    if old is not None and old.session is not None:
        await sessions.logout(old.session)  # the session this browser had ends
    response = _json({"id": account.id, "name": account.name, "role": account.role})
    set_cookie(response, session_id, secure=_secure(request))
    response.headers["Cache-Control"] = "no-store"
    return response


@routes.post("/api/logout")
async def logout(request: web.Request) -> web.Response:
    """``204``; the session ends on the server at once (its event streams close)."""
    viewer = request.get(VIEWER)
    if viewer is not None and viewer.session is not None:
        await request.app[SESSIONS].logout(viewer.session)
    response = web.Response(status=204)
    clear_cookie(response, secure=_secure(request))
    return response


@routes.get("/api/me")
async def me(request: web.Request) -> web.Response:
    """``{"id", "name", "role", "accounts": bool, "readers": [names], "budget"}``;
    ``401 login_required`` when accounts exist and there is no session. ``readers``: who
    may read my conversations besides me; ``budget``: what is left today (``None``
    fields: no limit)."""
    viewer = request.get(VIEWER)
    if viewer is None:
        raise ApiError(401, "login_required", "sign in first", accounts=True)
    sessions = request.app[SESSIONS]
    if viewer is LOCAL:
        return _json(
            {"id": viewer.id, "name": "", "role": "parent", "accounts": False, "readers": []}
        )
    account = sessions.account(viewer.id)
    assert account is not None
    state = sessions.state
    family = None
    if account.role == "parent":
        family = [{"id": a.id, "name": a.name, "role": a.role} for a in state.active()]
    return _json(
        {
            "id": account.id,
            "name": account.name,
            "role": account.role,
            "accounts": True,
            "readers": [a.name for a in guardians(account, state)],
            "budget": await request.app[BUDGETS].left(account),
            "family": family,
        }
    )
