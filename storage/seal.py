"""Seals: tamper evidence for a log's bytes (DESIGN.md "Seals").

A ``seal`` record ``{"type": "seal", "ts", "upto", "sha256", "hmac"?, "recovered"?}``
says: the SHA-256 of the log's bytes ``[0, upto)`` is ``sha256`` (hex), where ``upto``
is the seal's own start offset. With a key, ``hmac`` is HMAC-SHA-256(key, the 32-byte
digest), hex: without the key nobody can cut a log and append a seal that matches (a
plain SHA-256 anyone can recompute). The writer appends a seal after every reply's
``end`` and whenever :data:`SEAL_EVERY` bytes were appended since the last one, from a
hash it keeps incrementally (:class:`Sealer`); it never re-reads the file. The hash is
fed a whole write at a time (:meth:`Sealer.take`: the bytes a group commit writes for
the log in one pass, one ``update`` per run of records between seals), not a record at a
time: a fast stream's records cost no hashing call each.

Worked example: a log whose first two records take 120 bytes gets, after its reply's
``end`` at bytes ``[120, 200)``, a seal at offset 200::

    {"type":"seal","ts":…,"upto":200,"sha256":"<sha256 of bytes 0..199>","hmac":"…"}

and the next seal's ``sha256`` covers everything before it, this seal included.
``chatledger verify`` recomputes each (:class:`SealCheck`), and names the first seal that
no longer matches: some byte in ``[previous good seal, that seal)`` changed. Bytes that
an open finds after the last seal of a sealed log were never vouched for as written (a
crash left them, or someone appended them): the next seal carries ``recovered: [from,
to)``, and verify reports that range as sealed only at recovery.

A key file (``--seal-key FILE``) holds at least :data:`MIN_KEY_BYTES` bytes of secret; it
must live outside the data dir (a copy of the data dir must not carry its own key).
"""

from __future__ import annotations

import hashlib
import hmac as hmac_lib
import stat
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from . import records

__all__ = [
    "MIN_KEY_BYTES",
    "SEAL_EVERY",
    "SEAL_HERE",
    "Entry",
    "SealCheck",
    "SealKeyError",
    "Sealer",
    "load_key",
    "seal_record",
]

SEAL_EVERY: Final = 1 << 20
"""Bytes appended after which a seal is due even inside a reply (1 MiB)."""
MIN_KEY_BYTES: Final = 32


class SealKeyError(ValueError):
    """The ``--seal-key`` file cannot be used: ``str()`` says why."""


def load_key(path: Path, data_dir: Path) -> bytes:
    """The secret in ``path``: a regular file of ours, outside ``data_dir``, not readable
    by others, at least :data:`MIN_KEY_BYTES` bytes (surrounding whitespace stripped).

    :raises SealKeyError: any of that is not so.
    """
    try:
        resolved = path.resolve(strict=True)
    except OSError as exc:
        raise SealKeyError(f"cannot read the seal key {path}: {exc.strerror}") from None
    data_root = data_dir.resolve()
    if resolved == data_root or data_root in resolved.parents:
        raise SealKeyError("the seal key must be kept outside the data dir")
    info = resolved.stat()
    if not stat.S_ISREG(info.st_mode):
        raise SealKeyError("the seal key is not a regular file")
    if info.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise SealKeyError("the seal key is readable by others (chmod 600 it)")
    key = resolved.read_bytes().strip()
    if len(key) < MIN_KEY_BYTES:
        raise SealKeyError(f"the seal key has fewer than {MIN_KEY_BYTES} bytes")
    return key


def seal_record(upto: int, digest: bytes, key: bytes | None) -> records.Record:
    """The ``seal`` record for bytes ``[0, upto)`` whose SHA-256 is ``digest``."""
    record: records.Record = {
        "type": "seal",
        "ts": records.now_ms(),
        "upto": upto,
        "sha256": digest.hex(),
    }
    if key is not None:
        record["hmac"] = hmac_lib.new(key, digest, hashlib.sha256).hexdigest()
    return record


class Sealer:
    """The running SHA-256 of a log's bytes, as its writer takes them to write, and when
    the next seal is due.

    :param key: the HMAC key, or ``None``.
    :param hashed: the hash of the log's bytes so far (``hashlib.sha256`` object).
    :param size: bytes hashed.
    :param sealed_at: the offset just after the last seal (0: none yet).
    """

    __slots__ = ("_hash", "key", "recovered", "sealed_at", "size")

    def __init__(
        self, key: bytes | None, hashed: Any = None, size: int = 0, sealed_at: int = 0
    ) -> None:
        self.key = key
        self._hash = hashed if hashed is not None else hashlib.sha256()
        self.size = size
        self.sealed_at = sealed_at
        self.recovered: tuple[int, int] | None = None
        """Bytes ``[from, to)`` an open found after the last seal of a sealed log (a
        crash, or an edit): the next seal names them, so it vouches for them only as
        found then, not as written."""

    def hashed(self) -> Any:
        """A copy of the running hash (a ``hashlib`` object) of the bytes so far."""
        return self._hash.copy()

    def update(self, data: bytes) -> None:
        """Hash ``data``, the log's next bytes."""
        self._hash.update(data)
        self.size += len(data)

    def seal(self) -> tuple[records.Record, bytes]:
        """The seal of everything hashed, and its line, itself hashed."""
        record = seal_record(self.size, self._hash.digest(), self.key)
        if self.recovered is not None:
            record["recovered"] = list(self.recovered)
            self.recovered = None
        line = records.encode(record)
        self.update(line)
        self.sealed_at = self.size
        return record, line

    def take(
        self, batch: list[Entry], *, marked: bool, new_future: Callable[[], Any]
    ) -> tuple[list[Entry], bytes]:
        """Hash the log's next write and put its seals in: ``batch`` is what its writer
        queued since the last write, in order, ``(record, line, future)`` entries (the
        writer's :data:`~storage.commit.Queued`), where an entry whose record is
        :data:`SEAL_HERE` (line ``b""``) asks for a seal of every byte before it, as the
        writer queues after each ``end``; ``marked`` says whether any is. A seal also
        follows the record after which :data:`SEAL_EVERY` bytes have no seal (its entry's
        future is ``new_future()``). Every seal is made, ``ts`` included, as it is taken.

        The common batch (records of a reply, no seal due) costs one ``join`` and one
        ``update``; only a batch with a seal in it is walked record by record.

        :returns: the entries to write (each seal in place, with its record and line)
            and their bytes, joined.
        """
        if not marked:
            data = b"".join([line for _, line, _ in batch])
            if self.size + len(data) - self.sealed_at < SEAL_EVERY:
                self.update(data)
                return batch, data
        entries: list[Entry] = []
        lines: list[bytes] = []  # the write, seals included
        hashed = 0  # lines[:hashed] are hashed
        size = self.size  # the log's size after lines
        last = len(batch) - 1
        for k, (record, line, done) in enumerate(batch):
            if record is not SEAL_HERE:
                entries.append((record, line, done))
                lines.append(line)
                size += len(line)
                if size - self.sealed_at < SEAL_EVERY or (
                    k < last and batch[k + 1][0] is SEAL_HERE  # sealed next anyway
                ):
                    continue
                done = new_future()
            if hashed < len(lines):
                self.update(b"".join(lines[hashed:]))
            seal, line = self.seal()
            entries.append((seal, line, done))
            lines.append(line)
            hashed = len(lines)
            size = self.size
        if hashed < len(lines):
            self.update(b"".join(lines[hashed:]))
        return entries, b"".join(lines)


SEAL_HERE: Final[Any] = None
"""The record of a queued entry that asks for a seal at its place (:meth:`Sealer.take`)."""

Entry = tuple[Any, bytes, Any]
"""``(record or SEAL_HERE, line, future)``: one entry of a writer's queue."""


def _problem(record: records.Record, digest: bytes, size: int, key: bytes | None) -> str | None:
    """Why the ``seal`` record at offset ``size`` does not vouch for the bytes before it,
    whose SHA-256 is ``digest``; ``None`` when it does."""
    if record.get("upto") != size:
        return f"says upto {record.get('upto')}"
    if record.get("sha256") != digest.hex():
        return "has a sha256 that does not match the bytes before it"
    if key is not None:
        expected = hmac_lib.new(key, digest, hashlib.sha256).hexdigest()
        given = record.get("hmac")
        if not isinstance(given, str):
            return "has no hmac, and a key was given"
        if not hmac_lib.compare_digest(given, expected):
            return "has an hmac that does not match (another key, or forged)"
    return None


@dataclass
class SealCheck:
    """Recomputes a log's seals (``chatledger verify``): line by line (:meth:`line`), or
    a whole file at a time (:meth:`stream`, hashing between seals in large blocks).

    :ivar sealed: the offset just after the last seal that matched (0: none).
    :ivar seals: seals that matched.
    :ivar offsets: the start offset of every seal met (the first failing one included).
    :ivar first_bad: the start offset of the first seal that does not match, or ``None``.
    :ivar reason: why it does not.
    """

    key: bytes | None = None
    sealed: int = 0
    seals: int = 0
    first_bad: int | None = None
    reason: str = ""
    offsets: list[int] = field(default_factory=list)
    recovered: list[tuple[int, tuple[int, int]]] = field(default_factory=list)
    """``(seal offset, (from, to))`` of each matching seal that names bytes it vouches
    for only as recovered."""

    def __post_init__(self) -> None:
        self._hash = hashlib.sha256()
        self._size = 0
        self._last_start = 0  # the start of the last seal that matched

    @property
    def size(self) -> int:
        return self._size

    def line(self, data: bytes, record: records.Record | None) -> None:
        """Take the next line of the log (``data`` with its newline); ``record`` is it
        decoded, or ``None`` if it does not decode."""
        if record is not None and record.get("type") == "seal":
            self._seal(record, len(data))
        self._hash.update(data)
        self._size += len(data)

    def _seal(self, record: records.Record, length: int) -> None:
        self.offsets.append(self._size)
        if self.first_bad is not None:
            return
        problem = _problem(record, self._hash.digest(), self._size, self.key)
        if problem is not None:
            self.first_bad = self._size
            # the last good seal vouched for the bytes before it, not for its own
            self.reason = (
                f"the seal at byte {self._size} {problem}: some byte in"
                f" [{self._last_start}, {self._size + length}) changed"
            )
            return
        self._last_start = self._size
        self.sealed = self._size + length
        self.seals += 1
        span = record.get("recovered")
        if isinstance(span, list) and len(span) == 2 and all(isinstance(v, int) for v in span):
            self.recovered.append((self._size, (span[0], span[1])))

    def stream(self, stream: Any, block: int = 4 << 20) -> None:
        """Check every seal of a log file read from ``stream`` (from offset 0): the bytes
        between seals are hashed a large block at a time (``hashlib`` releases the GIL,
        so this can run on a thread beside the line-by-line checks). Seals are found as
        the writer writes them, a line starting ``{"type":"seal",``; the caller compares
        :attr:`offsets` with the seals its own decoding found. A last line with no
        newline (a torn tail) is not hashed, as :meth:`line` would not be given it."""
        pending = b""  # the start of a line not yet whole; data always starts a line
        while chunk := stream.read(block):
            data = pending + chunk
            position = 0
            while True:
                at = data.find(_SEAL_LINE, position)
                while at > 0 and data[at - 1] != 0x0A:  # inside a line: not a record start
                    at = data.find(_SEAL_LINE, at + 1)
                if at < 0:
                    break
                newline = data.find(b"\n", at)
                if newline < 0:
                    break  # the seal's line goes on in the next block
                self._hash.update(data[position:at])
                self._size += at - position
                line = data[at : newline + 1]
                try:
                    record = records.decode(line)
                except records.RecordError:
                    record = None
                self.line(line, record)
                position = newline + 1
            if at >= 0 and data.find(b"\n", at) < 0:
                whole = at  # keep the seal's partial line for the next block
            else:
                whole = data.rfind(b"\n", position) + 1 or position
            self._hash.update(data[position:whole])
            self._size += whole - position
            pending = data[whole:]


_SEAL_LINE: Final = b'{"type":"seal",'
