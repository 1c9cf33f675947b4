"""``chatledger verify``: check every log of a data dir, read-only.

For each ``conversations/<id>.jsonl`` it checks, without writing anything:

* every line is a valid record (:func:`storage.records.decode`);
* the first record is ``conversation`` with the file's id;
* per reply: one ``start``, ``chunk`` indexes ``0, 1, 2, …`` with no gap or repeat, at most
  one ``end`` with a known ``finish``, nothing of the reply after its ``end``;
* every ``start`` has its ``end``, unless it is the reply a running server is writing
  (a server holds the log's ``flock``);
* at most one reply open at a time, and ``ts`` never goes back;
* every ``seal`` matches the SHA-256 (and, with the key, the HMAC) of the bytes before
  it (:mod:`storage.seal`); the report says up to which offset seals vouch for the log.

What it finds is one of two kinds:

* **warnings**: what a crash (SIGKILL, a power cut, a full disk) leaves and the next open
  of the log repairs on its own (:func:`storage.recovery.open_file`,
  :meth:`storage.log.ConversationLog.open`), when no server holds the log:

  - a torn tail: bytes after the last ``\\n``, or trailing lines that are no record with
    no valid record after them; the next open cuts them into ``<id>.jsonl.torn-<ts>``;
  - a reply with a ``start`` and no ``end``; the next open appends its ``end`` with
    ``finish: "interrupted"``;
  - a log with no whole record (0 bytes, or only a torn first line): a create that never
    completed; the next open keeps its bytes (if any) in ``<id>.jsonl.torn-<ts>`` and
    removes the file, so the conversation never existed.

* **errors** (:attr:`LogReport.problems`): damage no open repairs, e.g. an invalid line
  with valid records after it (the log opens read-only), a wrong first record, chunk
  index gaps, ``ts`` going back.

:func:`verify_log` is pure over an iterable of lines; :func:`verify_dir` does the I/O.
"""

from __future__ import annotations

import errno
import fcntl
import os
import stat
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from orjson import JSONDecodeError, loads

from .records import FINISH_REASONS, RecordError, decode
from .seal import SealCheck
from .store import CONVERSATION_ID, SUFFIX

__all__ = ["LogReport", "verify_dir", "verify_log"]


@dataclass
class LogReport:
    """What :func:`verify_log` found in one log.

    :ivar size: bytes of the log's valid prefix (what the next open keeps).
    :ivar problems: errors, damage that no open repairs; one sentence each, with the
        byte offset where it applies.
    :ivar warnings: crash leftovers that the next open repairs (see the module's
        docstring); one sentence each, saying what that open will do.
    """

    conversation_id: str
    records: int = 0
    size: int = 0
    seals: int = 0
    seal_failed_at: int | None = None
    """The start offset of the first seal that does not match, or ``None``."""
    sealed: int = 0
    """The offset up to which seals vouch for the bytes (just after the last one that
    matched); ``0`` for a log from before seals ("unsealed")."""
    replies: int = 0
    open_reply: str | None = None
    writer_running: bool = False
    problems: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """No errors (warnings may remain: the next open repairs them)."""
        return not self.problems


def verify_log(
    conversation_id: str,
    lines: Iterable[bytes],
    *,
    writer_running: bool = False,
    key: bytes | None = None,
    sealed: SealCheck | None = None,
) -> LogReport:
    """Check the lines of one log (each with its ``\\n``, the last one possibly without),
    and recompute its seals (:class:`storage.seal.SealCheck`): a seal that does not match
    the bytes before it is an error naming its offset; with ``key``, so is a seal
    without a matching ``hmac`` (verify logs sealed before a key was set without one).

    :param sealed: the seals already checked over the same bytes by
        :meth:`storage.seal.SealCheck.stream` (``verify_dir`` runs it on a thread beside
        this); ``None``: checked here, line by line. Either way every record whose type
        is ``seal`` must be one the check found (a seal not in the form the writer writes
        is an error).

    :param writer_running: a server holds the log: it already recovered the log when it
        opened it, its last reply may be open and an unterminated last line may be a
        write in flight. Trailing invalid lines are then errors, not a torn tail (the
        server appends after them).
    """
    report = LogReport(conversation_id, writer_running=writer_running)
    problems = report.problems
    name = f"{conversation_id}{SUFFIX}"
    offset = 0
    last_ts = None
    next_chunk: dict[str, int] = {}  # open replies -> next chunk index
    ended: set[str] = set()
    unrecorded: list[str] = []  # invalid lines no valid record has followed yet
    torn_at: int | None = None  # where the bytes that are no record begin
    partial = 0  # bytes after the last newline
    corrupt = False  # an invalid line with valid records after it
    seals = sealed if sealed is not None else SealCheck(key=key)
    feed = sealed is None
    seal_offsets: list[int] = []
    last_end = 0  # the offset just after the last end record
    whole_lines_changed = False  # a whole line, not zeros, that is no record
    for line in lines:
        at = offset
        offset += len(line)
        if not line.endswith(b"\n"):
            partial = len(line)
            torn_at = at if torn_at is None else torn_at
            break
        record, why = _record(line)
        if record is None:
            unrecorded.append(f"byte {at}: invalid record: {why}")
            torn_at = at if torn_at is None else torn_at
            # zeros are where a lost write's blocks never landed: a crash can leave them
            whole_lines_changed = whole_lines_changed or (b"\0" not in line and line != b"\n")
            if feed:
                seals.line(line, None)
            continue
        if feed:
            seals.line(line, record)
        if unrecorded:  # valid records follow: corruption, not a torn tail
            corrupt = True
            problems.extend(f"{bad} (valid records follow: corrupt)" for bad in unrecorded)
            unrecorded.clear()
        torn_at = None
        report.records += 1
        kind, ts = record["type"], record["ts"]
        if kind == "seal":
            seal_offsets.append(at)
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
            last_end = offset
            if record.get("finish") not in FINISH_REASONS:
                problems.append(f"byte {at}: unknown finish {record.get('finish')!r}")
    end = offset - partial if torn_at is None else torn_at  # the valid prefix
    report.size = end
    report.seals, report.sealed = seals.seals, seals.sealed
    report.seal_failed_at = seals.first_bad
    checked = set(seals.offsets)
    odd = [at for at in seal_offsets if at not in checked]
    if odd:
        problems.append(f"byte {odd[0]}: a seal not in the form the writer writes")
    if seals.first_bad is not None:
        problems.append(seals.reason)
    for at, (start, to) in seals.recovered:
        report.warnings.append(
            f"byte {at}: this seal vouches for bytes [{start}, {to}) only as an open found"
            " them after the last seal (a crash left them, or they were appended)"
        )
    if (
        seals.seals
        and seals.first_bad is None
        and end > seals.sealed
        and last_end <= seals.sealed
        and not writer_running
    ):
        report.warnings.append(
            f"bytes [{seals.sealed}, {end}) follow the last seal: no seal vouches for them"
            " (the next open seals them as found)"
        )
    elif seals.seals and last_end > seals.sealed and not writer_running:
        # The writer seals every end in the same write: an end with no seal after it was
        # cut there (a crash: then its seal is the torn tail) or had its seal removed.
        what = f"byte {last_end}: a reply's end has no seal after it"
        if offset > end:
            report.warnings.append(f"{what} (its seal is in the torn tail); the next open seals it")
        else:
            problems.append(f"{what}: the log was cut after its last seal, or a seal removed")
    torn = offset - end  # bytes the next open cuts
    if writer_running:
        # The server recovered the log when it opened it: invalid complete lines came
        # later and its appends go after them. A partial last line is a write in flight,
        # and a log with no record yet a create in flight.
        problems.extend(f"{bad} (a server is writing after it)" for bad in unrecorded)
    elif report.records == 0:
        kept = f" keeps its {torn} bytes in {name}.torn-<ts> and" if torn else ""
        report.warnings.append(
            f"no whole record ({torn} bytes): a create that never completed;"
            f" the next open{kept} removes the log (the conversation never existed)"
        )
    elif torn and seals.seals and whole_lines_changed and not partial:
        # A crash leaves part of a write, or zeros where its blocks never landed; never
        # a whole line that is no record. In a sealed log that is a change, not a tear.
        problems.append(
            f"{unrecorded[0]}: a whole line that is no record after the last seal;"
            " a crash cannot leave that (it was changed after it was written)"
        )
    elif torn:
        what = (
            unrecorded[0] if unrecorded else f"byte {end}: {partial} bytes after the last newline"
        )
        _leftover(
            report,
            corrupt,
            f"{what}: a torn tail of {torn} bytes (never committed)",
            f"the next open cuts it into {name}.torn-<ts>",
        )
    for reply_id in next_chunk:
        if writer_running and len(next_chunk) == 1:
            report.open_reply = reply_id
        elif writer_running:
            problems.append(f"reply {reply_id} has a start and no end while another runs")
        else:
            _leftover(
                report,
                corrupt,
                f"reply {reply_id} has a start and no end (interrupted)",
                "the next open appends its end with finish 'interrupted'",
            )
    return report


def _leftover(report: LogReport, corrupt: bool, what: str, repair: str) -> None:
    """A crash leftover: a warning saying how the next open repairs it, or an error
    when the log is corrupt (it then opens read-only and nothing is repaired)."""
    if corrupt:
        report.problems.append(f"{what}; not repaired: the log is corrupt (opens read-only)")
    else:
        report.warnings.append(f"{what}; {repair}")


def _writer_running(fd: int) -> bool:
    """Whether another process holds the exclusive ``flock`` of the log open as ``fd``
    (a running server). Takes a shared lock for a moment if not; closing ``fd`` or
    the unlock below releases it."""
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    fcntl.flock(fd, fcntl.LOCK_UN)
    return False


def _record(line: bytes) -> tuple[dict | None, str]:
    """``(record, "")``, or ``(None, why)`` as :func:`storage.records.decode` says: the
    same rules, without its call and exception in the common case (a valid record)."""
    try:
        value = loads(line)
    except JSONDecodeError:
        value = None
    if type(value) is dict and type(value.get("type")) is str and type(value.get("ts")) is int:
        return value, ""
    try:
        return decode(line), ""
    except RecordError as exc:
        return None, str(exc)


class _PRead:
    """Reads a file from offset 0 with ``pread``: its own position, beside a stream on
    the same fd (a ``dup`` would share the offset)."""

    def __init__(self, fd: int) -> None:
        self._fd, self._position = fd, 0

    def read(self, size: int) -> bytes:
        data = os.pread(self._fd, size, self._position)
        self._position += len(data)
        return data


def verify_dir(data_dir: Path, *, key: bytes | None = None) -> list[LogReport]:
    """Verify every log under ``<data_dir>/conversations``, sorted by id.

    A log is opened ``O_NOFOLLOW | O_NONBLOCK`` and must be a regular file, as the server
    requires (:func:`storage.recovery.open_own`): a symbolic link or a FIFO is reported
    as an error, never followed or read.

    :raises FileNotFoundError: there is no ``conversations`` directory.
    """
    directory = Path(data_dir) / "conversations"
    reports = []
    for path in sorted(directory.iterdir()):
        stem = path.name[: -len(SUFFIX)]
        if not path.name.endswith(SUFFIX) or not CONVERSATION_ID.fullmatch(stem):
            continue
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError as exc:
            what = "a symbolic link" if exc.errno == errno.ELOOP else exc.strerror
            reports.append(LogReport(stem, problems=[f"not a log: {what}; the server refuses it"]))
            continue
        with open(fd, "rb") as stream:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                problems = ["not a log: not a regular file; the server refuses it"]
                reports.append(LogReport(stem, problems=problems))
                continue
            running = _writer_running(fd)
            # Seals first, a large block at a time (C speed: hundreds of MB/s), then the
            # records line by line (a thread for the seals only adds GIL hand-offs).
            sealed = SealCheck(key=key)
            sealed.stream(_PRead(fd))
            report = verify_log(stem, stream, writer_running=running, key=key, sealed=sealed)
            reports.append(report)
    return reports
