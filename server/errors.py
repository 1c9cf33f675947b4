"""Error answers of the HTTP API: :class:`ApiError`, the one table from storage errors to
HTTP status and code (:data:`STORAGE_ERRORS`), and the middleware :func:`json_errors`.

Every error is answered as JSON ``{"error": "<code>", "message": "<human text>"}`` (plus
fields such as ``offset``), with a 4xx status for bad input and 5xx only for faults of the
server; no stack trace reaches a client. Handlers let storage errors escape:
:func:`json_errors` answers them from the table. Only an ``OSError`` means different
things depending on what raised it (no such conversation on open, a full disk on create):
the code that opens or creates a log names the operation with :func:`during`.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Final, Literal

import orjson
from aiohttp import web

from ..storage import (
    DESCRIPTOR_ERRNOS,
    InvalidIdError,
    LogClosedError,
    LogFailedError,
    LogReadOnlyError,
    OffsetBoundaryError,
    OffsetRangeError,
)
from .admission import TooManyError

__all__ = [
    "DISK_FULL",
    "STORAGE_ERRORS",
    "ApiError",
    "Operation",
    "Rule",
    "answer_for",
    "during",
    "json_errors",
]

logger = logging.getLogger(__name__)

Operation = Literal["open", "create"]
"""What a handler asked the store for when an ``OSError`` came up (see :func:`during`)."""

DISK_FULL: Final = frozenset({errno.ENOSPC, errno.EDQUOT})
"""The ``errno`` values that mean no room is left: out of space, or over quota."""


class ApiError(Exception):
    """An error answer.

    :param status: the HTTP status.
    :param code: the machine-readable ``error`` field.
    :param message: the human-readable ``message`` field.
    :param headers: response headers (e.g. ``Retry-After``).
    :param close: close the connection after the answer (no keep-alive).
    :param extra: more fields of the JSON body (e.g. ``offset``).
    """

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        *,
        headers: dict[str, str] | None = None,
        close: bool = False,
        **extra: Any,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.headers = headers
        self.close = close
        self.extra = extra

    @classmethod
    def retry_later(cls, code: str, message: str, retry_after: int) -> ApiError:
        """A ``429`` that says when to try again: a ``Retry-After`` header (RFC 9110
        §10.2.3, seconds) and the same ``retry_after`` in the body."""
        return cls(
            429,
            code,
            message,
            headers={"Retry-After": str(retry_after)},
            retry_after=retry_after,
        )

    def response(self) -> web.Response:
        """The answer: ``application/json`` with ``error``, ``message`` and the extra fields."""
        response = _json_response(
            {"error": self.code, "message": self.message, **self.extra},
            status=self.status,
            headers=self.headers,
        )
        if self.close:
            response.force_close()  # "Connection: close"
        return response


@dataclass(frozen=True, slots=True)
class Rule:
    """One row of :data:`STORAGE_ERRORS`: an error and the answer it gets.

    :ivar error: the exception class (or classes) the row matches.
    :ivar status: HTTP status of the answer.
    :ivar code: its ``error`` field.
    :ivar message: its ``message`` field, or a function of the exception giving it.
    :ivar during: the row matches only errors of this operation (``None``: any).
    :ivar when: the row matches only exceptions this returns true for.
    :ivar extra: more fields of the answer, from the exception.
    :ivar headers: response headers of the answer, from the exception.
    """

    error: type[Exception] | tuple[type[Exception], ...]
    status: int
    code: str
    message: str | Callable[[Any], str]
    during: Operation | None = None
    when: Callable[[Any], bool] | None = None
    extra: Callable[[Any], dict[str, Any]] | None = None
    headers: Callable[[Any], dict[str, str]] | None = None

    def matches(self, exc: Exception, operation: Operation | None) -> bool:
        """Whether ``exc``, raised during ``operation``, gets this row's answer."""
        return (
            isinstance(exc, self.error)
            and (self.during is None or self.during == operation)
            and (self.when is None or self.when(exc))
        )

    def answer(self, exc: Exception) -> ApiError:
        """This row's answer to ``exc``."""
        message = self.message if isinstance(self.message, str) else self.message(exc)
        return ApiError(
            self.status,
            self.code,
            message,
            headers=self.headers(exc) if self.headers is not None else None,
            **(self.extra(exc) if self.extra is not None else {}),
        )


def _disk_full(exc: OSError | LogFailedError) -> bool:
    return exc.errno in DISK_FULL


def _disk_full_message(exc: OSError | LogFailedError) -> str:
    if isinstance(exc, LogFailedError):
        return "the disk is full; this conversation cannot grow"
    return "the disk is full"


def _committed(exc: OffsetBoundaryError | OffsetRangeError) -> dict[str, Any]:
    return {"offset": exc.committed}


STORAGE_ERRORS: Final[tuple[Rule, ...]] = (
    # The first row that matches answers; rows that only match one operation come before
    # the rows they refine (an ENOSPC on open is no disk_full: the log cannot be opened).
    Rule(InvalidIdError, 400, "invalid_id", "conversation ids match ^[A-Za-z0-9_-]{1,64}$"),
    Rule(FileNotFoundError, 404, "not_found", "no such conversation", during="open"),
    Rule(OffsetBoundaryError, 416, "offset_not_boundary", str, extra=_committed),
    Rule(OffsetRangeError, 416, "offset_out_of_range", str, extra=_committed),
    Rule(
        TooManyError,
        429,
        "too_many_requests",
        str,
        extra=lambda exc: {"retry_after": exc.retry_after},
        headers=lambda exc: {"Retry-After": str(exc.retry_after)},
    ),
    Rule(
        OSError,  # the process (or system) has no file descriptor left, even after the
        # store closed its idle logs: nothing was created; a retry soon may succeed
        503,
        "server_busy",
        "the server has too many files open; try again shortly",
        when=lambda exc: exc.errno in DESCRIPTOR_ERRNOS,
        headers=lambda exc: {"Retry-After": "5"},
        extra=lambda exc: {"retry_after": 5},
    ),
    Rule(
        OSError,  # e.g. the disk lost bytes the log's last writer wrote
        503,
        "log_unavailable",
        lambda exc: f"this conversation's log cannot be opened: {exc.strerror}",
        during="open",
    ),
    Rule(LogClosedError, 503, "shutting_down", "the server is shutting down"),
    Rule(
        LogReadOnlyError,
        503,
        "read_only",
        lambda exc: f"this conversation is read-only: {exc}",
    ),
    Rule((LogFailedError, OSError), 507, "disk_full", _disk_full_message, when=_disk_full),
    Rule(
        LogFailedError,
        503,
        "log_failed",
        lambda exc: f"this conversation's log cannot be written: {exc}",
    ),
    Rule(OSError, 503, "storage_failed", "the conversation could not be created", during="create"),
)
"""Storage (and admission) errors and their answers, the one place they are mapped."""


def answer_for(exc: Exception, operation: Operation | None = None) -> ApiError | None:
    """The answer :data:`STORAGE_ERRORS` gives ``exc``, raised during ``operation``
    (``None``: in no named operation); ``None`` when no row matches."""
    for rule in STORAGE_ERRORS:
        if rule.matches(exc, operation):
            return rule.answer(exc)
    return None


@contextlib.contextmanager
def during(operation: Operation) -> Iterator[None]:
    """Answer the errors raised inside the ``with`` block as :data:`STORAGE_ERRORS` says
    for ``operation``.

    :raises ApiError: a row matched.
    """
    try:
        yield
    except Exception as exc:
        error = answer_for(exc, operation)
        if error is None:
            raise
        raise error from None


_HTTP_CODES: Final = {
    400: "bad_request",
    404: "not_found",
    405: "method_not_allowed",
    413: "body_too_large",
}
"""Codes of aiohttp's own error answers (an unknown route, a body past the limit)."""


@web.middleware
async def json_errors(request: web.Request, handler: Any) -> web.StreamResponse:
    """Turn every error into a JSON answer: an :class:`ApiError` as it says, an aiohttp
    ``HTTPException`` with its status, a storage error as :data:`STORAGE_ERRORS` says;
    anything else is ``500 internal``, logged with its stack."""
    try:
        return await handler(request)
    except ApiError as exc:
        return exc.response()
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        headers = {k: v for k, v in exc.headers.items() if k.lower() == "allow"}
        code = _HTTP_CODES.get(exc.status, "http_error")
        return _json_response(
            {"error": code, "message": exc.reason}, status=exc.status, headers=headers
        )
    except asyncio.CancelledError:
        raise
    except Exception as exc:
        error = answer_for(exc)
        if error is not None:
            return error.response()
        logger.exception("%s %s failed", request.method, request.path)
        return _json_response(
            {"error": "internal", "message": "the server failed to handle this request"},
            status=500,
        )


def _json_response(
    data: dict[str, Any], *, status: int, headers: dict[str, str] | None = None
) -> web.Response:
    return web.Response(
        body=orjson.dumps(data), status=status, content_type="application/json", headers=headers
    )
