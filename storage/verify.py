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

:func:`verify_log` is pure over an iterable of lines and decodes every one of them.
:func:`verify_dir` does the I/O: it reads each log once, :data:`BLOCK` bytes at a time,
hashing it for the seals as it goes (:class:`storage.seal.SealCheck`). Where a seal
matches, the bytes before it are the bytes the writer hashed as it wrote them: between
two seals, some records, a reply's chunks, some records (a ``user`` and a ``start``, the
chunks, an ``end`` and the seal). There the lines before the first line that starts as
the writer writes a chunk (``{"type":"chunk",``) and after the last are decoded and
checked as above, and so are that first and last chunk; the ``n`` lines from one to the
other are taken for the chunks between when the two are of the same reply, with indexes
``k`` and ``k + n - 1``, ``ts`` not going back, else every line is checked. What the
lines between are not checked for (each valid JSON, its own ``ts``, index and id; a
line of another kind in place of a missing chunk) the matching seal vouches for: any
change since the writer wrote them makes it fail. All that no matching seal vouches for
(the bytes after the last one, all from the first that fails, the range a
``recovered`` seal names, a log from before seals) is checked line by line as
:func:`verify_log` does, so a change is reported at the offsets it has there. Records
and seals are found at line starts only: orjson escapes newlines and quotes inside a
string, so no text is taken for either.
"""

from __future__ import annotations

import errno
import fcntl
import io
import os
import stat
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

from orjson import JSONDecodeError, loads

from .records import FINISH_REASONS, Record, RecordError, decode
from .seal import SEAL_EVERY, SealCheck
from .store import CONVERSATION_ID, SUFFIX

__all__ = ["LogReport", "verify_dir", "verify_log"]

BLOCK: Final = 8 << 20
"""Bytes :func:`verify_dir` reads at a time (into one reused buffer)."""
_HELD: Final = 4 * SEAL_EVERY
"""Bytes of whole lines held back, waiting for a seal that vouches for them, before they
are checked line by line anyway (a log from before seals, a long unsealed tail)."""
_SEAL_START: Final = b'{"type":"seal",'
"""How a seal line starts as the writer writes it (``records.encode``: ``type`` first):
the lines :meth:`storage.seal.SealCheck.stream` takes for seals."""
_CHUNK_START: Final = b'{"type":"chunk",'


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
    Every line is decoded and checked (:func:`verify_dir` skips most chunk lines that a
    seal vouches for).

    :param sealed: the seals already checked over the same bytes by
        :meth:`storage.seal.SealCheck.stream`; ``None``: checked here, line by line.
        Either way every record whose type is ``seal`` must be one the check found (a
        seal not in the form the writer writes is an error).

    :param writer_running: a server holds the log: it already recovered the log when it
        opened it, its last reply may be open and an unterminated last line may be a
        write in flight. Trailing invalid lines are then errors, not a torn tail (the
        server appends after them).
    """
    check = _Check(conversation_id, writer_running)
    seals = sealed if sealed is not None else SealCheck(key=key)
    check.scan(lines, 0, feed=seals if sealed is None else None)
    return check.finish(seals)


class _Check:
    """The record checks of one log: fed its lines in order (:meth:`scan`; the caller may
    skip lines it vouches for, see :func:`_check_chunks`), then :meth:`finish`."""

    def __init__(self, conversation_id: str, writer_running: bool) -> None:
        self.report = LogReport(conversation_id, writer_running=writer_running)
        self.offset = 0  # just after the last line taken
        self.last_ts: int | None = None
        self.next_chunk: dict[str, int] = {}  # open replies -> next chunk index
        self.ended: set[str] = set()
        self.unrecorded: list[str] = []  # invalid lines no valid record has followed yet
        self.torn_at: int | None = None  # where the bytes that are no record begin
        self.partial = 0  # bytes after the last newline
        self.corrupt = False  # an invalid line with valid records after it
        self.seal_offsets: list[int] = []  # where a record of type seal starts
        self.last_end = 0  # the offset just after the last end record
        self.whole_lines_changed = False  # a whole line, not zeros, that is no record

    def scan(self, lines: Iterable[bytes], at: int, feed: SealCheck | None = None) -> Record | None:
        """Check ``lines``, the log's lines from offset ``at`` on (each with its ``\\n``;
        one without is the torn last line, and ends the scan).

        :param feed: a :class:`~storage.seal.SealCheck` to give each whole line to.
        :returns: the last line's record, or ``None`` if it is none.
        """
        report = self.report
        problems = report.problems
        conversation_id = report.conversation_id
        next_chunk, ended, unrecorded = self.next_chunk, self.ended, self.unrecorded
        last_ts, torn_at, corrupt = self.last_ts, self.torn_at, self.corrupt
        last_end, whole_lines_changed = self.last_end, self.whole_lines_changed
        count, replies = report.records, report.replies
        offset = at
        record = None
        for line in lines:
            at = offset
            offset += len(line)
            if not line.endswith(b"\n"):
                self.partial = len(line)
                torn_at = at if torn_at is None else torn_at
                record = None
                break
            record, why = _record(line)
            if record is None:
                unrecorded.append(f"byte {at}: invalid record: {why}")
                torn_at = at if torn_at is None else torn_at
                # zeros are where a lost write's blocks never landed: a crash can leave them
                whole_lines_changed = whole_lines_changed or (b"\0" not in line and line != b"\n")
                if feed is not None:
                    feed.line(line, None)
                continue
            if feed is not None:
                feed.line(line, record)
            if unrecorded:  # valid records follow: corruption, not a torn tail
                corrupt = True
                problems.extend(f"{bad} (valid records follow: corrupt)" for bad in unrecorded)
                unrecorded.clear()
            torn_at = None
            count += 1
            kind, ts = record["type"], record["ts"]
            if kind == "seal":
                self.seal_offsets.append(at)
            if last_ts is not None and ts < last_ts:
                problems.append(f"byte {at}: ts {ts} goes back from {last_ts}")
            last_ts = ts
            if count == 1:
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
                replies += 1
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
        self.offset = offset
        self.last_ts, self.torn_at, self.corrupt = last_ts, torn_at, corrupt
        self.last_end, self.whole_lines_changed = last_end, whole_lines_changed
        report.records, report.replies = count, replies
        return record

    def finish(self, seals: SealCheck) -> LogReport:
        """The report, once every line was taken and ``seals`` checked the same bytes."""
        report = self.report
        problems = report.problems
        writer_running = report.writer_running
        name = f"{report.conversation_id}{SUFFIX}"
        offset, partial, last_end = self.offset, self.partial, self.last_end
        unrecorded, corrupt = self.unrecorded, self.corrupt
        end = offset - partial if self.torn_at is None else self.torn_at  # the valid prefix
        report.size = end
        report.seals, report.sealed = seals.seals, seals.sealed
        report.seal_failed_at = seals.first_bad
        checked = set(seals.offsets)
        odd = [at for at in self.seal_offsets if at not in checked]
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
                report.warnings.append(
                    f"{what} (its seal is in the torn tail); the next open seals it"
                )
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
        elif torn and seals.seals and self.whole_lines_changed and not partial:
            # A crash leaves part of a write, or zeros where its blocks never landed; never
            # a whole line that is no record. In a sealed log that is a change, not a tear.
            problems.append(
                f"{unrecorded[0]}: a whole line that is no record after the last seal;"
                " a crash cannot leave that (it was changed after it was written)"
            )
        elif torn:
            what = (
                unrecorded[0]
                if unrecorded
                else f"byte {end}: {partial} bytes after the last newline"
            )
            _leftover(
                report,
                corrupt,
                f"{what}: a torn tail of {torn} bytes (never committed)",
                f"the next open cuts it into {name}.torn-<ts>",
            )
        for reply_id in self.next_chunk:
            if writer_running and len(self.next_chunk) == 1:
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


def _record(line: bytes) -> tuple[Record | None, str]:
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


def _check_lines(check: _Check, view: memoryview, start: int, end: int, base: int) -> None:
    """Check the whole lines ``view[start:end]`` (file offset ``base + start``) one by
    one."""
    if end > start:
        check.scan(io.BytesIO(view[start:end]), base + start)


def _check_vouched(
    check: _Check, buf: bytearray, view: memoryview, start: int, end: int, base: int
) -> None:
    """Check the whole lines ``buf[start:end]`` (file offset ``base + start``), bytes a
    seal that matches vouches for, as the writer writes them between two seals: some
    lines, a reply's chunks, some lines (a ``user`` and a ``start``, the chunks, an
    ``end`` and its seal). The lines before the first line that starts as the writer
    writes a chunk, and after the last, are decoded and checked; those from the first to
    the last by :func:`_check_run`."""
    at = start  # [start, at): lines that are no chunk
    while at < end and not buf.startswith(_CHUNK_START, at, end):
        at = buf.index(b"\n", at, end) + 1
    tail = end  # [tail, end): lines that are no chunk
    while tail > at:
        line = buf.rfind(b"\n", at, tail - 1) + 1 or at
        if buf.startswith(_CHUNK_START, line, tail):
            break
        tail = line
    if tail == at:
        _check_lines(check, view, start, end, base)
    else:
        _check_run(check, buf, view, base, start, at, tail, end)


def _check_run(
    check: _Check,
    buf: bytearray,
    view: memoryview,
    base: int,
    start: int,
    at: int,
    tail: int,
    end: int,
) -> None:
    """Check the whole lines ``buf[start:end]`` (file offset ``base + start``) that a
    matching seal vouches for: lines ``[at, tail)`` start and end with a line that starts
    as the writer writes a chunk. All but the lines between those two are decoded and
    checked; the lines between are taken as checked when the two say that they are what
    the writer writes between them: chunks of the same reply, as many as the indexes of
    the two say (``k`` and ``k + n - 1`` for ``n`` lines), with ``ts`` not going back
    from the first to the last and no problem up to the first. Otherwise every line is
    checked. (A line of another kind among them takes the place of a chunk: the count
    tells, unless a chunk is missing too, which the writer never does.)"""
    lines = buf.count(b"\n", at, tail)
    second = buf.index(b"\n", at, tail) + 1
    problems = len(check.report.problems)
    first = check.scan([*io.BytesIO(view[start:at]), bytes(view[at:second])], base + start)
    if lines == 1:
        _check_lines(check, view, tail, end, base)
        return
    last_at = buf.rfind(b"\n", at, tail - 1) + 1
    last_line = bytes(view[last_at:tail])
    last, _ = _record(last_line)
    if (
        first is not None
        and last is not None
        and len(check.report.problems) == problems
        and first["type"] == last["type"] == "chunk"
        and type(first.get("i")) is int
        and type(last.get("i")) is int
        and last["i"] == first["i"] + lines - 1
        and last["ts"] >= first["ts"]
        and isinstance(reply := first.get("id"), str)
        and last.get("id") == reply
        and check.next_chunk.get(reply) == first["i"] + 1
    ):
        # the lines between: what scan would make of them (valid records, each the next
        # chunk of the reply, ts not going back)
        check.report.records += lines - 2
        check.next_chunk[reply] = last["i"]
        check.scan([last_line, *io.BytesIO(view[tail:end])], base + last_at)
    else:
        _check_lines(check, view, second, end, base)


def _seal_line(buf: bytearray, start: int, end: int) -> int:
    """The start of the first line in ``buf[start:end]`` (``start`` a line start) that
    starts as the writer writes a seal, or ``-1``."""
    at = buf.find(_SEAL_START, start, end)
    while at > start and buf[at - 1] != 0x0A:  # inside a line: not a record's start
        at = buf.find(_SEAL_START, at + 1, end)
    return at


def _verify_stream(
    conversation_id: str,
    stream: io.RawIOBase,
    *,
    writer_running: bool,
    key: bytes | None,
    block: int | None = None,
) -> LogReport:
    """:func:`verify_log` of the log read from ``stream`` (a raw binary file at offset
    0, with ``readinto``), reading it once, ``block`` bytes (default :data:`BLOCK`) at a
    time, and hashing it for its seals as it goes; lines that a matching seal vouches for
    are checked as the module's docstring says, all others line by line."""
    check = _Check(conversation_id, writer_running)
    seals = SealCheck(key=key)
    buf = bytearray(block or BLOCK)
    kept = 0  # bytes at buf[:kept] carried from the last read, from a line start:
    hashed = 0  # whole lines [0, hashed) hashed but not yet checked, then a partial line
    base = 0  # the file offset of buf[0]
    while True:
        if kept == len(buf):  # a line longer than the buffer
            buf.extend(bytes(len(buf)))
        with memoryview(buf) as view:
            read = stream.readinto(view[kept:])
            if not read:
                _check_lines(check, view, 0, hashed, base)  # no seal vouches for them
                if kept > hashed:  # a torn last line: not hashed, as SealCheck.stream
                    check.scan((bytes(view[hashed:kept]),), base + hashed)
                break
            end = kept + read
            whole = buf.rfind(b"\n", hashed, end) + 1 or hashed
            checked = 0  # the lines before it are checked
            while hashed < whole:
                at = _seal_line(buf, hashed, whole)
                upto = whole if at < 0 else at
                if upto > hashed:
                    seals.line(view[hashed:upto], None)  # no seal in them
                hashed = upto
                if at < 0:
                    break
                hashed = buf.index(b"\n", at, whole) + 1
                line = bytes(view[at:hashed])
                record, _ = _record(line)
                matched = seals.seals
                seals.line(line, record)
                if seals.seals > matched:  # it vouches for every byte before it
                    if seals.recovered and seals.recovered[-1][0] == base + at:
                        _check_lines(check, view, checked, hashed, base)  # only as found
                    else:  # (its own line is no chunk: checked)
                        _check_vouched(check, buf, view, checked, hashed, base)
                    checked = hashed
                elif seals.first_bad is not None:  # no seal vouches for anything from here
                    _check_lines(check, view, checked, hashed, base)
                    checked = hashed
            if seals.first_bad is not None or hashed - checked > _HELD:
                _check_lines(check, view, checked, hashed, base)
                checked = hashed
        if checked:  # carry what is left to the front
            kept, hashed = end - checked, hashed - checked
            buf[:kept] = buf[checked:end]
            base += checked
        else:
            kept = end
    return check.finish(seals)


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
        with open(fd, "rb", buffering=0) as stream:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                problems = ["not a log: not a regular file; the server refuses it"]
                reports.append(LogReport(stem, problems=problems))
                continue
            running = _writer_running(fd)
            reports.append(_verify_stream(stem, stream, writer_running=running, key=key))
    return reports
