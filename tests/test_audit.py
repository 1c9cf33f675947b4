"""The audit log (DESIGN.md "The audit log", "The household": oversight you can see).

Every read of a conversation (its event stream, its raw log, its JSON view) has an
``open`` record committed in ``<data-dir>/audit/<id>.jsonl`` before the first byte of the
conversation reaches the client, and a ``close`` that says what was sent. Shown here by
fault injection in the audit logs' system-call layer (``make_client(audit_file_io=...)``):

* when the ``open`` of a guardian's read cannot be committed (``write`` or
  ``fdatasync`` fails with ``EIO``), the guardian gets ``503 audit_unavailable`` and no
  byte of the conversation;
* while that ``fdatasync`` is held back, the client gets nothing at all (on a raw socket:
  not even the status line), and the read goes on once the sync is done.

Then what the records say (viewer, ``from``, ``to``, reason, ``local`` in single-person
mode), ``GET .../audit`` (owner and guardians only), and that reads never change the
conversation's log.
"""

from __future__ import annotations

import asyncio
import errno
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp.test_utils import TestClient

from chatledger.server.keys import REPLIES
from chatledger.server.sessions import COOKIE
from chatledger.storage import FileIO, records
from chatledger.storage import audit as audit_records

from .conftest import FaultyIO, add_account
from .sse_reader import StreamReader, read_through

ACCOUNTS = (("Mom", "parent"), ("Dad", "parent"), ("Kid", "child"), ("Alice", "adult"))


@dataclass
class Person:
    name: str
    id: str
    cookie: str
    http: aiohttp.ClientSession


@dataclass
class Household:
    client: TestClient
    data_dir: Path
    people: dict[str, Person]
    conversation: str
    """Kid's conversation: one exchange, never read yet."""
    secrets: list[str]
    """Texts of it: title, the user's text, the reply."""

    def __getitem__(self, name: str) -> Person:
        return self.people[name]

    @property
    def log_path(self) -> Path:
        return self.data_dir / "conversations" / f"{self.conversation}.jsonl"

    @property
    def audit_path(self) -> Path:
        return self.data_dir / "audit" / f"{self.conversation}.jsonl"

    def url(self, suffix: str = "") -> str:
        return str(self.client.make_url(f"/api/conversations/{self.conversation}{suffix}"))

    def audit_records(self) -> list[dict[str, Any]]:
        """The audit log's complete records on disk (none when it does not exist)."""
        if not self.audit_path.exists():
            return []
        data = self.audit_path.read_bytes()
        return records.decode_all(data[: data.rfind(b"\n") + 1])


async def log_in(client: TestClient, name: str) -> str:
    async with (
        aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)) as http,
        http.post(
            client.make_url("/api/login"), json={"name": name, "password": "password-1"}
        ) as r,
    ):
        assert r.status == 200, await r.text()
        return r.cookies[COOKIE].value


async def no_reply_runs(client: TestClient, conversation_id: str) -> None:
    replies = client.server.app[REPLIES]
    deadline = time.monotonic() + 20
    while replies.running(conversation_id):
        assert time.monotonic() < deadline, "the reply did not end"
        await asyncio.sleep(0.02)


async def household(make_client, data_dir: Path, **settings: Any) -> Household:
    """Mom and Dad (parents), Kid (child), Alice (adult), each signed in with a session
    of its own; Kid's conversation holds one exchange, and nobody has read it."""
    ids = {name: add_account(data_dir, name, role) for name, role in ACCOUNTS}
    client = await make_client(demo_reply_tokens=8, **settings)
    people = {}
    for name, _ in ACCOUNTS:
        cookie = await log_in(client, name)
        http = aiohttp.ClientSession(
            cookie_jar=aiohttp.DummyCookieJar(), headers={"Cookie": f"{COOKIE}={cookie}"}
        )
        people[name] = Person(name, ids[name], cookie, http)
    kid = people["Kid"].http
    tag = os.urandom(4).hex()
    title, text = f"title-secret-{tag}", f"text-secret-{tag}"
    async with kid.post(client.make_url("/api/conversations"), json={"title": title}) as r:
        assert r.status == 201
        conversation = (await r.json())["id"]
    async with kid.post(
        client.make_url(f"/api/conversations/{conversation}/messages"), json={"text": text}
    ) as r:
        assert r.status == 202
    await no_reply_runs(client, conversation)
    logged = records.decode_all((data_dir / "conversations" / f"{conversation}.jsonl").read_bytes())
    reply = "".join(r["text"] for r in logged if r["type"] == "chunk")
    assert reply
    return Household(client, data_dir, people, conversation, [title, text, reply])


async def close_people(home: Household) -> None:
    for person in home.people.values():
        await person.http.close()


@pytest.fixture
async def home_factory(make_client, data_dir):
    made: list[Household] = []

    async def make(**settings: Any) -> Household:
        home = await household(make_client, data_dir, **settings)
        made.append(home)
        return home

    yield make
    for home in made:
        await close_people(home)


def reads_in(audit: list[dict[str, Any]]) -> list[audit_records.Read]:
    """The reads an audit log's records describe (:func:`storage.audit.fold`)."""
    reads, _ = audit_records.fold(audit)
    return reads


def opens_of(home: Household, viewer: str) -> list[dict[str, Any]]:
    return [r for r in home.audit_records() if r["type"] == "open" and r["viewer"] == viewer]


async def closed_read(home: Household, viewer: str, limit_s: float = 10.0):
    """The last read of ``viewer``, once its ``close`` is in the audit log."""
    deadline = time.monotonic() + limit_s
    while True:
        reads = [r for r in reads_in(home.audit_records()) if r.viewer == viewer]
        if reads and reads[-1].closed is not None:
            return reads[-1]
        assert time.monotonic() < deadline, f"no closed read of {viewer}: {reads}"
        await asyncio.sleep(0.05)


READS = {
    # name -> (path suffix, query)
    "events": ("/events", {}),
    "log": ("/log", {}),
    "view": ("", {}),
    "view_page": ("", {"limit": "1"}),
}


# -- the open record comes first: fault injection -------------------------------------------


@pytest.mark.parametrize("existing", [True, False], ids=["read_before", "first_read"])
@pytest.mark.parametrize("call", ["write", "sync"])
@pytest.mark.parametrize(
    "read",
    [
        "events",
        "log",
        "view",
        "view_page",
    ],
)
async def test_a_guardian_read_whose_open_cannot_be_committed_sends_nothing(
    home_factory, read, call, existing
):
    io = FaultyIO()
    io.target = f"{os.sep}audit{os.sep}"
    home = await home_factory(audit_file_io=io)
    if existing:  # Kid has read it: the audit log exists; Mom's open is an append
        async with home["Kid"].http.get(home.url()) as r:
            assert r.status == 200
        await closed_read(home, home["Kid"].id)
    log_before = home.log_path.read_bytes()
    io.arm(call, errno=errno.EIO)
    suffix, query = READS[read]
    async with (
        asyncio.timeout(5),
        home["Mom"].http.get(home.url(suffix), params=query) as response,
    ):
        body = await response.read()
        status, content_type = response.status, response.headers.get("Content-Type")
    assert (status, content_type) == (503, "application/json"), body[:300]
    assert orjson.loads(body)["error"] == "audit_unavailable"
    for secret in home.secrets:
        assert secret.encode() not in body
    assert b"event:" not in body and b"retry:" not in body
    # Nothing of Mom's read stays: the bytes of a failed sync are cut back (and kept
    # aside) once the failure is handled, a failed create leaves no file.
    deadline = time.monotonic() + 10
    while opens_of(home, home["Mom"].id):
        assert time.monotonic() < deadline, "the uncommitted open record stayed"
        await asyncio.sleep(0.05)
    assert home.log_path.read_bytes() == log_before
    if not existing:  # the audit log was made with the conversation: it holds only its head
        assert [r["type"] for r in home.audit_records()] == ["audit"]


# -- the open record comes first: nothing is sent while its sync is held --------------------


class HeldSyncIO(FileIO):
    """A :class:`FileIO` whose ``fdatasync`` of audit logs waits for :attr:`release` once
    :attr:`armed`; :attr:`held` is set when a sync is waiting."""

    def __init__(self) -> None:
        self.armed = False
        self.held = threading.Event()
        self.release = threading.Event()
        self.synced: list[str] = []

    def fdatasync(self, fd: int) -> None:
        path = os.readlink(f"/proc/self/fd/{fd}")
        if self.armed and f"{os.sep}audit{os.sep}" in path:
            self.held.set()
            assert self.release.wait(30), "never released"
        super().fdatasync(fd)
        self.synced.append(path)


async def raw_get(home: Household, person: Person, target: str):
    """A GET on a raw socket (nothing buffered between the server and the test)."""
    server = home.client.server
    reader, writer = await asyncio.open_connection(server.host, server.port)
    writer.write(
        f"GET {target} HTTP/1.1\r\nHost: 127.0.0.1:{server.port}\r\n"
        f"Cookie: {COOKIE}={person.cookie}\r\nConnection: close\r\n\r\n".encode()
    )
    await writer.drain()
    return reader, writer


@pytest.mark.parametrize(
    "read",
    [
        "events",
        "log",
        "view",
    ],
)
async def test_nothing_reaches_the_client_before_the_open_is_committed(home_factory, read):
    io = HeldSyncIO()
    home = await home_factory(audit_file_io=io)
    io.synced.clear()  # the audit log's create, with its conversation's
    io.armed = True
    suffix, _ = READS[read]
    target = f"/api/conversations/{home.conversation}{suffix}"
    reader, writer = await raw_get(home, home["Mom"], target)
    try:
        assert await asyncio.to_thread(io.held.wait, 10), "no audit sync was held"
        with pytest.raises(TimeoutError):  # not one byte, not even the status line
            async with asyncio.timeout(0.5):
                got = await reader.read(1)
                pytest.fail(f"got {got!r} before the open record was committed")
        assert str(home.audit_path) not in io.synced  # not committed yet
    finally:
        io.release.set()
    received = b""
    async with asyncio.timeout(10):
        while b"\r\n\r\n" not in received or (read != "events" and not reader.at_eof()):
            data = await reader.read(65536)
            if not data:
                break
            received += data
            if read == "events" and home.secrets[0].encode() in received:
                break
    writer.close()
    head, _, body = received.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200"), head
    assert home.secrets[0].encode() in body  # the title: the read went on
    (opened,) = opens_of(home, home["Mom"].id)
    assert opened["from"] == 0 and opened["client"] == "127.0.0.1"


async def test_a_read_left_while_its_open_commits_still_gets_a_close(home_factory):
    io = HeldSyncIO()
    home = await home_factory(audit_file_io=io)
    async with home["Kid"].http.get(home.url()) as r:  # the audit log exists: Mom's
        assert r.status == 200  # open is an append to it
    io.armed = True
    target = f"/api/conversations/{home.conversation}/events"
    _, writer = await raw_get(home, home["Mom"], target)
    try:
        assert await asyncio.to_thread(io.held.wait, 10), "no audit sync was held"
        writer.close()  # the client gives up while the open is being synced
        await asyncio.sleep(0.3)
    finally:
        io.release.set()
    deadline = time.monotonic() + 5
    while not opens_of(home, home["Mom"].id):  # the open commits, the client is gone
        assert time.monotonic() < deadline, "the open never committed"
        await asyncio.sleep(0.05)
    read = await closed_read(home, home["Mom"].id, limit_s=5)
    assert read.to == 0


async def test_the_open_is_on_disk_when_the_first_byte_arrives(home_factory):
    """The first byte of an event stream arrives only after the audit log holds the
    guardian's ``open``, synced."""
    io = HeldSyncIO()
    home = await home_factory(audit_file_io=io)
    io.synced.clear()  # the audit log's create, with its conversation's
    async with home["Mom"].http.get(home.url("/events")) as response:
        first = await response.content.readany()
        assert first
        synced = list(io.synced)
        (opened,) = opens_of(home, home["Mom"].id)
    assert str(home.audit_path) in synced
    assert opened["viewer"] == home["Mom"].id and opened["from"] == 0


# -- what the records say -------------------------------------------------------------------


async def test_a_guardian_read_has_open_and_close_with_what_was_sent(home_factory):
    home = await home_factory()
    mom = home["Mom"]
    log = home.log_path.read_bytes()
    boundaries = [k + 1 for k, byte in enumerate(log) if byte == ord("\n")]

    # the JSON view: [0, offset)
    async with mom.http.get(home.url(), params={"limit": "1"}) as r:
        view = await r.json()
    read = await closed_read(home, mom.id)
    assert (read.start, read.to, read.reason) == (0, view["offset"], "end")
    assert view["offset"] == len(log)

    # the raw log: every byte of it
    async with mom.http.get(home.url("/log")) as r:
        body = await r.read()
    assert body == log
    read = await closed_read(home, mom.id)
    assert (read.start, read.to, read.reason) == (0, len(body), "end")

    # the event stream from a boundary, left by the client once caught up
    start = boundaries[0]
    async with mom.http.get(home.url("/events"), params={"from": str(start)}) as r:
        reader = StreamReader()
        await read_through(r, reader, len(log))
    read = await closed_read(home, mom.id)
    assert read.start == start and read.to == int(reader.events[-1].id) == len(log)
    # "client_left" under web.run_app; aiohttp's TestServer cancels the handler of a
    # request whose client left (handler_cancellation=True), which _audited records
    # as "failed"
    assert read.reason in ("client_left", "failed")
    sent = b"".join(e.data.encode() + b"\n" for e in reader.events)
    assert sent == log[start:]

    # an event stream whose session ends (logout): the stream ends, and says why
    async with mom.http.get(home.url("/events"), headers={"Last-Event-ID": "0"}) as r:
        reader = StreamReader()
        await read_through(r, reader, len(log))
        async with mom.http.post(home.client.make_url("/api/logout")) as out:
            assert out.status == 204
        async with asyncio.timeout(10):
            async for data in r.content.iter_any():
                reader.feed(data)
    read = await closed_read(home, mom.id)
    assert (read.start, read.to, read.reason) == (0, len(log), "session_ended")

    reads = [r for r in reads_in(home.audit_records()) if r.viewer == mom.id]
    assert len(reads) == 4 and all(r.client == "127.0.0.1" for r in reads)
    assert home.log_path.read_bytes() == log


async def test_the_owners_reads_are_recorded_too(home_factory):
    home = await home_factory()
    kid = home["Kid"]
    async with kid.http.get(home.url()) as r:
        assert r.status == 200
    async with kid.http.get(home.url("/log")) as r:
        assert await r.read() == home.log_path.read_bytes()
    before = len(home.log_path.read_bytes())
    async with kid.http.post(
        home.url("/messages"), json={"text": "more"}, headers={"Accept": "text/event-stream"}
    ) as r:
        assert r.status == 200
        reader = StreamReader()
        async with asyncio.timeout(20):
            async for data in r.content.iter_any():
                reader.feed(data)
    await no_reply_runs(home.client, home.conversation)
    read = await closed_read(home, kid.id)
    assert read.start == before and read.reason == "end"
    assert read.to == int(reader.events[-1].id)
    assert [e.event for e in reader.events][:2] == ["user", "start"]
    reads = [r for r in reads_in(home.audit_records()) if r.viewer == kid.id]
    assert len(reads) == 3
    assert {r.viewer for r in reads_in(home.audit_records())} == {kid.id}


async def test_single_person_reads_have_viewer_local(make_client, data_dir):
    client = await make_client(demo_reply_tokens=4)
    response = await client.post("/api/conversations", json={"title": "mine"})
    conversation = (await response.json())["id"]
    await client.post(f"/api/conversations/{conversation}/messages", json={"text": "hi"})
    await no_reply_runs(client, conversation)
    path = f"/api/conversations/{conversation}"
    assert (await client.get(path)).status == 200
    assert (await client.get(path + "/log")).status == 200
    stream = await client.get(path + "/events")
    reader = StreamReader()
    log = (data_dir / "conversations" / f"{conversation}.jsonl").read_bytes()
    await read_through(stream, reader, len(log))
    stream.close()
    audit = data_dir / "audit" / f"{conversation}.jsonl"
    deadline = time.monotonic() + 10
    while True:
        reads = reads_in(records.decode_all(audit.read_bytes()))
        if len(reads) == 3 and all(r.closed is not None for r in reads):
            break
        assert time.monotonic() < deadline, reads
        await asyncio.sleep(0.05)
    assert [r.viewer for r in reads] == ["local"] * 3
    body = await (await client.get(path + "/audit")).json()
    assert [r["viewer"] for r in body["reads"]] == ["local"] * 3
    assert body["readers"] == []


# -- GET .../audit ----------------------------------------------------------------------------


async def test_the_audit_route_for_owner_and_guardians_only(home_factory):
    home = await home_factory()
    mom, dad, kid = home["Mom"], home["Dad"], home["Kid"]
    async with kid.http.get(home.url()) as r:
        assert r.status == 200
    await closed_read(home, kid.id)
    async with mom.http.get(home.url("/log")) as r:
        assert r.status == 200
        await r.read()
    await closed_read(home, mom.id)
    async with mom.http.get(home.url()) as r:
        assert r.status == 200
    mom_read = await closed_read(home, mom.id)
    # a close can be in the file before its commit (its fsync); the route answers from
    # what is committed: ask until it has all three closes, then compare the answers
    deadline = time.monotonic() + 10
    while True:
        async with kid.http.get(home.url("/audit")) as r:
            shown = (await r.json())["reads"]
        if len(shown) == 3 and all(read["closed"] is not None for read in shown):
            break
        assert time.monotonic() < deadline, shown
        await asyncio.sleep(0.05)

    answers = {}
    for person in (kid, mom, dad):
        async with person.http.get(home.url("/audit")) as r:
            assert r.status == 200, (person.name, await r.text())
            answers[person.name] = await r.json()
    body = answers["Kid"]
    assert answers["Mom"] == answers["Dad"] == body
    reads = body["reads"]
    assert [(r["viewer"], r["name"]) for r in reads] == [
        (kid.id, "Kid"),
        (mom.id, "Mom"),
        (mom.id, "Mom"),
    ]
    for r in reads:
        assert r["client"] == "127.0.0.1" and r["reason"] == "end" and r["from"] == 0
        assert r["opened"] <= r["closed"]
    assert body["readers"] == [
        {"id": mom.id, "name": "Mom", "last_read": mom_read.opened},
        {"id": dad.id, "name": "Dad", "last_read": None},
    ]

    # to anyone else the conversation does not exist: the answer to an unknown id
    unknown = str(home.client.make_url("/api/conversations/no-such-conversation/audit"))
    for person in (home["Alice"],):
        async with person.http.get(home.url("/audit")) as r:
            refused = (r.status, _headers(r), await r.read())
        async with person.http.get(unknown) as r:
            assert refused == (r.status, _headers(r), await r.read())
        assert refused[0] == 404
        for secret in home.secrets:
            assert secret.encode() not in refused[2]


def _headers(response: aiohttp.ClientResponse) -> list[tuple[bytes, bytes]]:
    return [(k, v) for k, v in response.raw_headers if k.lower() != b"date"]


async def test_reads_do_not_change_the_conversation_log(home_factory):
    home = await home_factory()
    info = home.log_path.stat()
    before = (home.log_path.read_bytes(), info.st_size, info.st_mtime_ns)
    log = before[0]
    for person in (home["Kid"], home["Mom"]):
        for suffix, query in READS.values():
            if suffix == "/events":
                async with person.http.get(home.url(suffix)) as r:
                    await read_through(r, StreamReader(), len(log))
            else:
                async with person.http.get(home.url(suffix), params=query) as r:
                    assert r.status == 200
                    await r.read()
        async with person.http.get(home.url("/audit")) as r:
            assert r.status == 200
        for suffix in ("", "/log", "/events", "/audit"):
            async with person.http.head(home.url(suffix)) as r:
                assert r.status == 200
        await closed_read(home, person.id)
    info = home.log_path.stat()
    assert (home.log_path.read_bytes(), info.st_size, info.st_mtime_ns) == before
    reads = reads_in(home.audit_records())
    # 4 reads each; a guardian's HEAD of the view and the log is a read too (their
    # Content-Length says how much the child wrote), the owner's sends nothing to record
    assert len(reads) == 10
    assert sorted(r.read for r in reads if r.read == "head") == ["head", "head"]
    assert {r.viewer for r in reads if r.read == "head"} == {home["Mom"].id}
