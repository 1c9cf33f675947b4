"""The one table from storage (and admission) errors to HTTP answers
(``server/errors.py``): every row, what no row answers, and a row over HTTP."""

from __future__ import annotations

import errno
import os

import pytest

from chatledger.server.admission import TooManyError
from chatledger.server.errors import answer_for
from chatledger.storage import (
    InvalidIdError,
    LogClosedError,
    LogFailedError,
    LogReadOnlyError,
    OffsetBoundaryError,
    OffsetRangeError,
    records,
)


def os_error(number: int) -> OSError:
    return OSError(number, os.strerror(number))


@pytest.mark.parametrize(
    "exc,operation,status,code",
    [
        (InvalidIdError("bad"), "open", 400, "invalid_id"),
        (InvalidIdError("bad"), None, 400, "invalid_id"),
        (FileNotFoundError(errno.ENOENT, "gone"), "open", 404, "not_found"),
        (os_error(errno.EIO), "open", 503, "log_unavailable"),
        (os_error(errno.ENOSPC), "open", 503, "log_unavailable"),  # recovery could not write
        (LogClosedError("closing"), "open", 503, "shutting_down"),
        (os_error(errno.ENOSPC), "create", 507, "disk_full"),
        (os_error(errno.EDQUOT), "create", 507, "disk_full"),
        (os_error(errno.EIO), "create", 503, "storage_failed"),
        (FileNotFoundError(errno.ENOENT, "gone"), "create", 503, "storage_failed"),
        (LogClosedError("closing"), "create", 503, "shutting_down"),
        (LogClosedError("closing"), None, 503, "shutting_down"),
        (LogReadOnlyError("held by pid 7"), None, 503, "read_only"),
        (LogFailedError(os_error(errno.ENOSPC)), None, 507, "disk_full"),
        (LogFailedError(os_error(errno.EDQUOT)), None, 507, "disk_full"),
        (LogFailedError(os_error(errno.EIO)), None, 503, "log_failed"),
        (OffsetBoundaryError("inside a record", 42), None, 416, "offset_not_boundary"),
        (OffsetRangeError("past the end", 42), None, 416, "offset_out_of_range"),
        (TooManyError("slow down", 7), None, 429, "too_many_requests"),
    ],
)
def test_each_storage_error_has_its_status_and_code(exc, operation, status, code):
    answer = answer_for(exc, operation)
    assert answer is not None
    assert (answer.status, answer.code) == (status, code)
    assert answer.message


def test_offset_errors_give_the_committed_offset():
    for exc in (OffsetBoundaryError("inside", 42), OffsetRangeError("past", 42)):
        answer = answer_for(exc)
        assert answer is not None and answer.extra == {"offset": 42}
        assert answer.message == str(exc)


def test_too_many_gives_retry_after_as_field_and_header():
    answer = answer_for(TooManyError("slow down", 7))
    assert answer is not None
    assert answer.extra == {"retry_after": 7}
    assert answer.headers == {"Retry-After": "7"}


def test_messages_say_what_failed():
    assert answer_for(os_error(errno.EIO), "open").message == (
        "this conversation's log cannot be opened: Input/output error"
    )
    assert answer_for(LogFailedError(os_error(errno.ENOSPC))).message == (
        "the disk is full; this conversation cannot grow"
    )
    assert answer_for(os_error(errno.ENOSPC), "create").message == "the disk is full"


@pytest.mark.parametrize(
    "exc",
    [ValueError("x"), os_error(errno.EIO), ConnectionResetError(), FileNotFoundError()],
    ids=["ValueError", "EIO", "ConnectionResetError", "FileNotFoundError"],
)
def test_what_no_row_answers_is_left_to_the_500(exc):
    # an OSError outside opening or creating a log (but a full disk) is a server fault
    assert answer_for(exc) is None


async def test_a_corrupt_log_answers_appends_read_only_over_http(make_client, data_dir):
    # an invalid line with valid records after it: corruption, opened read-only
    path = data_dir / "conversations" / "corrupt.jsonl"
    path.parent.mkdir(parents=True)
    first = records.conversation(conversation_id="corrupt", title="t", model="m", system=None)
    later = records.user(message_id="u", text="after the damage")
    path.write_bytes(records.encode(first) + b"not json\n" + records.encode(later))
    client = await make_client()
    body = await (await client.get("/api/conversations/corrupt")).json()
    assert body["writable"] is False
    response = await client.post("/api/conversations/corrupt/messages", json={"text": "hi"})
    assert response.status == 503
    answer = await response.json()
    assert answer["error"] == "read_only" and "read-only" in answer["message"]
    assert path.read_bytes().endswith(records.encode(later))  # never cut, nothing appended
