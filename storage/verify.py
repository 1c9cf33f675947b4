"""``chatledger verify``: check every log of a data dir, read-only.

For each ``conversations/<id>.jsonl`` it checks, without writing anything:

* every line is a valid record (:func:`storage.records.decode`), nothing after the last
  ``\\n`` unless a server is writing the log right now;
* the first record is ``conversation`` with the file's id;
* per reply: one ``start``, ``chunk`` indexes ``0, 1, 2, …`` with no gap or repeat, at most
  one ``end`` with a known ``finish``, nothing of the reply after its ``end``;
* every ``start`` has its ``end``, unless it is the reply a running server is writing
  (a server holds the log's ``flock``);
* at most one reply open at a time, and ``ts`` never goes back.

:func:`verify_log` is pure over an iterable of lines; :func:`verify_dir` does the I/O.
"""

from __future__ import annotations

import fcntl
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from .records import FINISH_REASONS, RecordError, decode
from .store import CONVERSATION_ID, SUFFIX

__all__ = ["LogReport", "verify_dir", "verify_log"]


@dataclass
class LogReport:
    """What :func:`verify_log` found in one log.

    :ivar problems: one sentence each, with the byte offset where it applies.
    """

    conversation_id: str
    records: int = 0
    size: int = 0
    replies: int = 0
    open_reply: str | None = None
    writer_running: bool = False
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def verify_log(
    conversation_id: str, lines: Iterable[bytes], *, writer_running: bool = False
) -> LogReport:
    """Check the lines of one log (each with its ``\\n``, the last one possibly without).

    :param writer_running: a server holds the log: its last reply may be open and an
        unterminated last line may be a write in flight.
    """
    report = LogReport(conversation_id, writer_running=writer_running)
    problems = report.problems
    offset = 0
    last_ts = None
    next_chunk: dict[str, int] = {}  # open replies -> next chunk index
    ended: set[str] = set()
    for line in lines:
        at = offset
        offset += len(line)
        if not line.endswith(b"\n"):
            if not writer_running:
                problems.append(f"byte {at}: {len(line)} bytes after the last newline (torn tail)")
            offset = at  # not part of the log
            break
        try:
            record = decode(line)
        except RecordError as exc:
            problems.append(f"byte {at}: invalid record: {exc}")
            continue
        report.records += 1
        kind, ts = record["type"], record["ts"]
        if last_ts is not None and ts < last_ts:
            problems.append(f"byte {at}: ts {ts} goes back from {last_ts}")
        last_ts = ts
        if report.records == 1:
            if kind != "conversation":
                problems.append(f"byte {at}: first record is {kind!r}, not 'conversation'")
            elif record.get("id") != conversation_id:
                problems.append(
                    f"byte {at}: conversation id {record.get('id')!r} is not the file's"
                )
            continue
        reply_id = record.get("id")
        if kind == "start":
            if reply_id in next_chunk or reply_id in ended:
                problems.append(f"byte {at}: reply {reply_id} starts twice")
                continue
            if next_chunk:
                problems.append(
                    f"byte {at}: reply {reply_id} starts while {next(iter(next_chunk))} runs"
                )
            next_chunk[reply_id] = 0
            report.replies += 1
        elif kind == "chunk":
            if reply_id not in next_chunk:
                where = "after its end" if reply_id in ended else "without a start"
                problems.append(f"byte {at}: chunk of reply {reply_id} {where}")
            elif record.get("i") != next_chunk[reply_id]:
                problems.append(
                    f"byte {at}: reply {reply_id} chunk i={record.get('i')!r},"
                    f" expected {next_chunk[reply_id]}"
                )
                if isinstance(record.get("i"), int):
                    next_chunk[reply_id] = record["i"] + 1
            else:
                next_chunk[reply_id] += 1
        elif kind == "end":
            if reply_id not in next_chunk:
                where = "a second time" if reply_id in ended else "without a start"
                problems.append(f"byte {at}: reply {reply_id} ends {where}")
            else:
                del next_chunk[reply_id]
                ended.add(reply_id)
            if record.get("finish") not in FINISH_REASONS:
                problems.append(f"byte {at}: unknown finish {record.get('finish')!r}")
    report.size = offset
    if report.records == 0:
        problems.append("empty log: no conversation record")
    for reply_id in next_chunk:
        if writer_running and len(next_chunk) == 1:
            report.open_reply = reply_id
        else:
            problems.append(f"reply {reply_id} has a start and no end (interrupted, not closed)")
    return report


def _writer_running(path: Path) -> bool:
    """Whether another process holds the log's exclusive ``flock`` (a running server)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)  # releases the shared lock, if taken
    return False


def verify_dir(data_dir: Path) -> list[LogReport]:
    """Verify every log under ``<data_dir>/conversations``, sorted by id.

    :raises FileNotFoundError: there is no ``conversations`` directory.
    """
    directory = Path(data_dir) / "conversations"
    reports = []
    for path in sorted(directory.iterdir()):
        stem = path.name[: -len(SUFFIX)]
        if not path.name.endswith(SUFFIX) or not CONVERSATION_ID.fullmatch(stem):
            continue
        running = _writer_running(path)
        with open(path, "rb") as stream:
            reports.append(verify_log(stem, stream, writer_running=running))
    return reports
