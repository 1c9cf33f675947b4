"""The isolation matrix (DESIGN.md "The household": isolation).

Every route that names a conversation, asked by every kind of person about one: its
owner may do everything; a parent may read a child's conversation (writes are ``403
guardian_read_only``); to anyone else it does not exist: the answer (status, headers,
JSON body) is byte-identical to the answer for an unknown id; without a live session
(none, logged out, a removed account's) it is ``401 login_required``. No refused answer
holds anything of the conversation, and no refused request creates or changes a file
under the data dir. Lists show only what the caller may see. The matrix is data (the
tables :data:`ROUTES` and :data:`SUBJECTS`), and :func:`test_the_matrix_covers_every_route`
checks it against the app's router, so a new route cannot slip past it.

The household and its conversations are built once for the module (argon2 logins are
slow); every cell of the matrix is its own test on that one server.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
import pytest_asyncio
from aiohttp.test_utils import TestClient, TestServer

from chatledger.server.app import init_app
from chatledger.server.keys import REPLIES
from chatledger.server.providers.demo import DemoProvider
from chatledger.server.sessions import COOKIE
from chatledger.server.settings import Settings
from chatledger.storage import Durability, audit, records
from chatledger.storage.household import Household

from .conftest import add_account, create_conversation, wait_idle
from .sse_reader import StreamReader

UNKNOWN_ID = "no-such-conversation-0123"
"""A valid id no conversation has."""

# -- the matrix as data -------------------------------------------------------------------


@dataclass(frozen=True)
class Route:
    """One way of asking about a conversation.

    :ivar resource: the router's canonical path it exercises.
    :ivar write: whether it changes the conversation (a guardian gets ``403``).
    :ivar paged: adds ``?limit=1&before=<a message id of the conversation>``.
    :ivar sse: a ``200`` answer is an event stream.
    :ivar owner: what the owner gets: status and ``error`` code (``None``: no error).
    """

    name: str
    method: str
    resource: str
    write: bool = False
    paged: bool = False
    sse: bool = False
    headers: tuple[tuple[str, str], ...] = ()
    body: dict[str, Any] | None = None
    owner: tuple[int, str | None] = (200, None)
    query: tuple[tuple[str, str], ...] = ()

    def path(self, conversation_id: str) -> str:
        return self.resource.replace("{conversation_id}", conversation_id)


CONVERSATION = "/api/conversations/{conversation_id}"
SSE_ACCEPT = (("Accept", "text/event-stream"),)

ROUTES: tuple[Route, ...] = (
    Route("get", "GET", CONVERSATION),
    Route("get_page", "GET", CONVERSATION, paged=True),
    Route("head", "HEAD", CONVERSATION),
    Route("head_page", "HEAD", CONVERSATION, paged=True),
    Route("events", "GET", CONVERSATION + "/events", sse=True),
    Route(
        "events_from", "GET", CONVERSATION + "/events", sse=True, headers=(("Last-Event-ID", "0"),)
    ),
    Route("head_events", "HEAD", CONVERSATION + "/events"),
    Route("log", "GET", CONVERSATION + "/log"),
    Route("head_log", "HEAD", CONVERSATION + "/log"),
    Route("audit", "GET", CONVERSATION + "/audit"),
    Route("export_jsonl", "GET", CONVERSATION + "/export", query=(("format", "jsonl"),)),
    Route("export_html", "GET", CONVERSATION + "/export", query=(("format", "html"),)),
    Route("head_audit", "HEAD", CONVERSATION + "/audit"),
    Route(
        "post_message",
        "POST",
        CONVERSATION + "/messages",
        write=True,
        body={"text": "a probe"},
        owner=(202, None),
    ),
    Route(
        "post_message_sse",
        "POST",
        CONVERSATION + "/messages",
        write=True,
        sse=True,
        headers=SSE_ACCEPT,
        body={"text": "a probe, streamed"},
    ),
    Route("stop", "POST", CONVERSATION + "/stop", write=True, owner=(409, "no_reply_running")),
    # access is checked before the body: the owner learns the id is no reply, others 403/404
    Route(
        "regenerate",
        "POST",
        CONVERSATION + "/regenerate",
        write=True,
        body={"reply_id": "no-such-reply"},
        owner=(400, "unknown_message"),
    ),
    Route(
        "select",
        "POST",
        CONVERSATION + "/select",
        write=True,
        body={"leaf": "no-such-message"},
        owner=(400, "unknown_message"),
    ),
    # a no-op for its owner (it is listed already): the matrix changes no conversation
    Route("patch", "PATCH", CONVERSATION, write=True, body={"archived": False}),
    # what the page saw: a guardian's page reports it too (into the audit log)
    Route("seen", "POST", CONVERSATION + "/seen", body={"offset": 0}, owner=(204, None)),
)


@dataclass(frozen=True)
class Subject:
    """Who asks (``asker``: an account name, or ``None`` for no cookie), with which
    session (``live``, ``revoked``: logged out, ``removed``: its account was removed),
    about whose conversation (``target``: its owner's name), and what they should be:
    ``owner``, ``guardian``, ``hidden`` (a 404 like an unknown id) or ``anonymous`` (401).
    """

    name: str
    asker: str | None
    target: str
    relation: str
    session: str = "live"


SUBJECTS: tuple[Subject, ...] = (
    Subject("owner_adult", "Alice", "Alice", "owner"),
    Subject("owner_child", "Kid", "Kid", "owner"),
    Subject("owner_parent", "Mom", "Mom", "owner"),
    Subject("another_adult", "Bob", "Alice", "hidden"),
    # Bob's conversation is never read (it has no audit log): a refusal makes none
    Subject("another_adult_unread", "Alice", "Bob", "hidden"),
    Subject("parent_on_unread_adult", "Dad", "Bob", "hidden"),
    Subject("parent_on_child", "Mom", "Kid", "guardian"),
    Subject("other_parent_on_child", "Dad", "Kid", "guardian"),
    Subject("parent_on_adult", "Mom", "Alice", "hidden"),
    Subject("parent_on_parent", "Dad", "Mom", "hidden"),
    Subject("adult_on_child", "Bob", "Kid", "hidden"),
    Subject("child_on_parent", "Kid", "Mom", "hidden"),
    Subject("child_on_adult", "Kid", "Alice", "hidden"),
    Subject("child_on_child", "Kid2", "Kid", "hidden"),
    Subject("no_session", None, "Kid", "anonymous"),
    Subject("revoked_session", "Alice", "Alice", "anonymous", session="revoked"),
    Subject("removed_account", "Gone", "Gone", "anonymous", session="removed"),
)

ACCOUNTS: tuple[tuple[str, str], ...] = (
    ("Mom", "parent"),  # the first parent
    ("Dad", "parent"),
    ("Alice", "adult"),
    ("Bob", "adult"),
    ("Kid", "child"),
    ("Kid2", "child"),
    ("Gone", "adult"),  # removed once the world is built
)


def expected(route: Route, subject: Subject) -> tuple[int, str | None]:
    """The status and ``error`` code ``subject`` must get from ``route``."""
    if subject.relation == "owner":
        return route.owner
    if subject.relation == "guardian":
        return (403, "guardian_read_only") if route.write else route.owner
    if subject.relation == "hidden":
        return 404, "not_found"
    return 401, "login_required"


# -- the world ----------------------------------------------------------------------------


@dataclass
class Conversation:
    id: str
    owner: str
    secrets: list[str]
    """Texts of the conversation no refused answer may hold: title, system, the user's
    text, the reply, message ids."""
    before: str
    """A message id of it (for ``?before=``)."""


@dataclass
class World:
    client: TestClient
    http: aiohttp.ClientSession
    data_dir: Path
    ids: dict[str, str]  # account name -> id
    cookies: dict[tuple[str, str], str]  # (name, session kind) -> session id
    conversations: dict[str, Conversation] = field(default_factory=dict)  # by owner name

    def cookie(self, subject: Subject) -> str | None:
        if subject.asker is None:
            return None
        return self.cookies[(subject.asker, subject.session)]


@dataclass
class Answer:
    status: int
    headers: list[tuple[str, str]]
    body: bytes
    events: list[Any] = field(default_factory=list)

    def headers_dict(self) -> dict[str, str]:
        return dict(self.headers)

    @property
    def error(self) -> str | None:
        if self.status < 400:
            return None
        return orjson.loads(self.body)["error"] if self.body else None


def start_app(data_dir: Path, **overrides: Any) -> TestServer:
    """The app :func:`tests.conftest.make_client` builds, on a loopback port."""
    settings = Settings(
        data_dir=data_dir,
        durability=Durability.FSYNC,
        keepalive=overrides.pop("keepalive", 1.0),  # a stream that was left ends soon
        retry_ms=500,
        demo_tokens_per_s=0,
        demo_reply_tokens=overrides.pop("demo_reply_tokens", 6),
        messages_per_minute=0,
        creates_per_minute=0,
        **overrides,
    )
    provider = DemoProvider(
        tokens_per_s=0,
        reply_tokens=settings.demo_reply_tokens,
        context_tokens=settings.context_tokens,
    )
    return TestServer(init_app(settings, provider=provider), host="127.0.0.1")


async def log_in(client: TestClient, name: str, password: str = "password-1") -> str:
    """A new session of ``name``: its id (the cookie's value)."""
    async with (
        aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)) as http,
        http.post(client.make_url("/api/login"), json={"name": name, "password": password}) as r,
    ):
        assert r.status == 200, await r.text()
        return r.cookies[COOKIE].value


async def ask(
    world: World,
    method: str,
    path: str,
    cookie: str | None,
    *,
    params: dict[str, str] | None = None,
    headers: tuple[tuple[str, str], ...] = (),
    body: dict[str, Any] | None = None,
    sse: bool = False,
) -> Answer:
    """One request with ``cookie`` (or none). A ``200`` event stream is read until its
    ``conversation`` event (or its end, for a POST), then left."""
    sent = dict(headers)
    if cookie is not None:
        sent["Cookie"] = f"{COOKIE}={cookie}"
    async with world.http.request(
        method,
        world.client.make_url(path),
        params=params,
        headers=sent,
        json=body,
    ) as response:
        kept = [
            (k.decode("latin-1"), v.decode("latin-1"))
            for k, v in response.raw_headers
            if k.lower() != b"date"
        ]
        if sse and response.status == 200:
            reader = StreamReader()
            until_end = method == "POST"
            async with asyncio.timeout(20):
                async for data in response.content.iter_any():
                    reader.feed(data)
                    kinds = {e.event for e in reader.events}
                    if (not until_end and "conversation" in kinds) or (
                        until_end and "end" in kinds
                    ):
                        break
            return Answer(response.status, kept, bytes(reader.raw), reader.events)
        return Answer(response.status, kept, await response.read())


async def no_reply_runs(client: TestClient, conversation_id: str) -> None:
    """Wait until no reply runs in the conversation (without reading it: reads are
    audited)."""
    replies = client.server.app[REPLIES]
    deadline = time.monotonic() + 20
    while replies.running(conversation_id):
        assert time.monotonic() < deadline, "the reply did not end"
        await asyncio.sleep(0.02)


async def audit_quiet(world: World) -> None:
    """Wait until no reply runs and every read in every audit log has its ``close``
    (a stream the client left ends at its next keep-alive)."""
    replies = world.client.server.app[REPLIES]
    deadline = time.monotonic() + 20
    while True:
        running = any(replies.running(c.id) for c in world.conversations.values())
        open_reads = []
        audit_dir = world.data_dir / "audit"
        for path in audit_dir.glob("*.jsonl") if audit_dir.exists() else ():
            data = path.read_bytes()
            data = data[: data.rfind(b"\n") + 1]
            reads, _ = audit.fold(records.decode_all(data))
            open_reads += [r for r in reads if r.closed is None]
        if not running and not open_reads:
            return
        assert time.monotonic() < deadline, f"still busy: running={running} {open_reads}"
        await asyncio.sleep(0.05)


def snapshot(data_dir: Path) -> dict[str, tuple[str, int, int, str]]:
    """Every entry under ``data_dir``: kind, size, mtime_ns, and a file's SHA-256."""
    out = {}
    for root, dirs, files in os.walk(data_dir):
        for name in dirs + files:
            path = Path(root, name)
            info = path.lstat()
            if name in files:
                digest = hashlib.sha256(path.read_bytes()).hexdigest()
                out[str(path.relative_to(data_dir))] = ("f", info.st_size, info.st_mtime_ns, digest)
            else:
                out[str(path.relative_to(data_dir))] = ("d", 0, info.st_mtime_ns, "")
    return out


async def settled_snapshot(world: World) -> dict[str, tuple[str, int, int, str]]:
    await audit_quiet(world)
    before = snapshot(world.data_dir)
    while True:  # nothing in flight: two snapshots a moment apart agree
        await asyncio.sleep(0.05)
        again = snapshot(world.data_dir)
        if again == before:
            return again
        before = again


def assert_unchanged(before: dict, after: dict, what: str) -> None:
    changed = {
        k: (before.get(k), after.get(k))
        for k in before.keys() | after.keys()
        if before.get(k) != after.get(k)
    }
    assert not changed, f"{what} changed files under the data dir: {changed}"


def leaks(answer: Answer, conversation: Conversation) -> list[str]:
    """The conversation's secrets found in the answer's body or headers."""
    text = answer.body.decode("utf-8", "replace") + "".join(v for _, v in answer.headers)
    return [s for s in conversation.secrets if s in text]


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def world(tmp_path_factory) -> AsyncIterator[World]:
    data_dir = tmp_path_factory.mktemp("isolation") / "data"
    ids = {name: add_account(data_dir, name, role) for name, role in ACCOUNTS}
    client = TestClient(start_app(data_dir))
    await client.start_server()
    http = aiohttp.ClientSession(cookie_jar=aiohttp.DummyCookieJar())
    try:
        cookies = {}
        for name, _ in ACCOUNTS:
            cookies[(name, "live")] = await log_in(client, name)
        world = World(client, http, data_dir, ids, cookies)
        for name, _ in ACCOUNTS:
            await make_conversation(world, name)
        # Alice's second session, logged out; Gone's session, then Gone removed (as
        # `chatledger user remove` does, from another process's point of view).
        revoked = await log_in(client, "Alice")
        answer = await ask(world, "POST", "/api/logout", revoked)
        assert answer.status == 204
        world.cookies[("Alice", "revoked")] = revoked
        world.cookies[("Gone", "removed")] = world.cookies.pop(("Gone", "live"))
        household = Household(data_dir)
        try:
            household.remove_account("Gone")
        finally:
            household.close()
        deadline = time.monotonic() + 10
        while (
            await ask(world, "GET", "/api/me", world.cookies[("Gone", "removed")])
        ).status != 401:
            assert time.monotonic() < deadline, "the server never saw the account removed"
            await asyncio.sleep(0.1)
        yield world
    finally:
        await http.close()
        await client.close()


async def make_conversation(world: World, owner: str) -> None:
    """``owner`` creates a conversation with one exchange in it. Nobody reads it (its
    secrets come from the file), so it has no audit log until a read of the matrix."""
    cookie = world.cookies[(owner, "live")]
    tag = f"{owner}-{os.urandom(4).hex()}"
    title, system, text = f"title-secret-{tag}", f"system-secret-{tag}", f"text-secret-{tag}"
    answer = await ask(
        world, "POST", "/api/conversations", cookie, body={"title": title, "system": system}
    )
    assert answer.status == 201, answer.body
    conversation_id = orjson.loads(answer.body)["id"]
    answer = await ask(
        world, "POST", f"/api/conversations/{conversation_id}/messages", cookie, body={"text": text}
    )
    assert answer.status == 202, answer.body
    started = orjson.loads(answer.body)
    await no_reply_runs(world.client, conversation_id)
    log = (world.data_dir / "conversations" / f"{conversation_id}.jsonl").read_bytes()
    logged = records.decode_all(log)
    reply = "".join(r["text"] for r in logged if r["type"] == "chunk")
    assert reply and [r["finish"] for r in logged if r["type"] == "end"] == ["stop"]
    world.conversations[owner] = Conversation(
        id=conversation_id,
        owner=owner,
        secrets=[title, system, text, reply, started["message_id"], started["reply_id"]],
        before=started["reply_id"],
    )


async def ask_route(
    world: World, route: Route, conversation_id: str, subject: Subject, before: str
):
    return await ask(
        world,
        route.method,
        route.path(conversation_id),
        world.cookie(subject),
        params={"limit": "1", "before": before} if route.paged else (dict(route.query) or None),
        headers=route.headers,
        body=route.body,
        sse=route.sse,
    )


# -- the matrix ---------------------------------------------------------------------------


def test_the_matrix_covers_every_route(tmp_path):
    """Every route of the app whose path names a conversation is a column of the matrix,
    with each of its methods, and the matrix names no route the app lacks."""
    settings = Settings(data_dir=tmp_path / "data")
    app = init_app(settings, provider=DemoProvider(tokens_per_s=0, reply_tokens=1))
    in_router = {
        (route.method, route.resource.canonical)
        for route in app.router.routes()
        if route.resource is not None and "{conversation_id}" in route.resource.canonical
    }
    covered = {(route.method, route.resource) for route in ROUTES}
    assert covered == in_router, (
        f"routes without a column: {in_router - covered}; columns without a route: "
        f"{covered - in_router}"
    )
    assert {s.relation for s in SUBJECTS} == {"owner", "guardian", "hidden", "anonymous"}


@pytest.mark.asyncio(loop_scope="module")
@pytest.mark.parametrize("subject", SUBJECTS, ids=[s.name for s in SUBJECTS])
@pytest.mark.parametrize("route", ROUTES, ids=[r.name for r in ROUTES])
async def test_isolation(world: World, route: Route, subject: Subject):
    conversation = world.conversations[subject.target]
    status, error = expected(route, subject)
    refused = status in (401, 403, 404)
    before = await settled_snapshot(world) if refused else None
    answer = await ask_route(world, route, conversation.id, subject, conversation.before)
    if route.method == "HEAD":  # a HEAD answer has no body to tell the error code
        assert answer.status == status and answer.body == b""
    else:
        assert (answer.status, answer.error) == (status, error), answer.body[:300]
    if not refused:
        await check_allowed(world, route, conversation, answer)
        return
    after = await settled_snapshot(world)
    assert_unchanged(before, after, f"{route.name} by {subject.name}")
    assert leaks(answer, conversation) == []
    assert answer.headers_dict()["Content-Type"] == "application/json"
    if status in (401, 404):
        # byte-identical to the answer to an unknown id (status, headers, body)
        unknown = await ask_route(world, route, UNKNOWN_ID, subject, conversation.before)
        assert (unknown.status, unknown.headers, unknown.body) == (
            answer.status,
            answer.headers,
            answer.body,
        )
        assert_unchanged(after, await settled_snapshot(world), f"{route.name} of an unknown id")


async def check_allowed(world: World, route: Route, conversation: Conversation, answer: Answer):
    """An allowed answer is the real thing (so the secrets a refusal must not hold are
    ones the allowed answers do hold)."""
    headers = answer.headers_dict()
    title, _, text, reply = conversation.secrets[:4]
    if route.method == "HEAD":
        assert answer.body == b""
        if route.name == "head_events":
            assert headers["Content-Type"] == "text/event-stream"
        return
    if route.name in ("get", "get_page"):
        body = orjson.loads(answer.body)
        assert body["id"] == conversation.id and body["title"] == title
        texts = [m["text"] for m in body["messages"]]
        assert texts[-1] == reply if route.name == "get" else text in texts
    elif route.name in ("events", "events_from"):
        assert headers["Content-Type"] == "text/event-stream"
        assert title in answer.events[0].data
    elif route.name == "log":
        assert headers["Content-Type"] == "application/x-ndjson"
        assert text.encode() in answer.body and title.encode() in answer.body
    elif route.name == "audit":
        body = orjson.loads(answer.body)
        assert body["reads"] and {"reads", "readers"} <= set(body)
    elif route.name == "post_message":
        body = orjson.loads(answer.body)
        assert set(body) == {"message_id", "reply_id", "offset"}
    elif route.name == "patch":
        body = orjson.loads(answer.body)
        assert (body["id"], body["title"], body["archived"]) == (conversation.id, title, False)
    elif route.name == "seen":
        assert answer.body == b""
    elif route.name == "post_message_sse":
        assert headers["Content-Type"] == "text/event-stream"
        assert [e.event for e in answer.events][:2] == ["user", "start"]
        assert answer.events[-1].event == "end"


# -- lists --------------------------------------------------------------------------------

LISTS = {
    # who -> {owner of each conversation listed: access}
    "Mom": {"Mom": "owner", "Kid": "guardian", "Kid2": "guardian"},
    "Dad": {"Dad": "owner", "Kid": "guardian", "Kid2": "guardian"},
    "Alice": {"Alice": "owner"},
    "Bob": {"Bob": "owner"},
    "Kid": {"Kid": "owner"},
    "Kid2": {"Kid2": "owner"},
}


@pytest.mark.asyncio(loop_scope="module")
@pytest.mark.parametrize("who", sorted(LISTS))
async def test_list_shows_only_what_the_caller_may_see(world: World, who: str):
    answer = await ask(world, "GET", "/api/conversations", world.cookies[(who, "live")])
    assert answer.status == 200
    rows = orjson.loads(answer.body)
    by_id = {c.id: c for c in world.conversations.values()}
    listed = {by_id[row["id"]].owner: row["access"] for row in rows}
    assert listed == LISTS[who]
    for row in rows:
        assert row["owner"] == by_id[row["id"]].owner  # the owner's name
    hidden = [c for c in world.conversations.values() if c.owner not in LISTS[who]]
    for conversation in hidden:
        assert leaks(answer, conversation) == [], conversation.owner
        assert conversation.id not in answer.body.decode()


@pytest.mark.asyncio(loop_scope="module")
@pytest.mark.parametrize("session", ["none", "revoked", "removed"])
async def test_list_without_a_live_session(world: World, session: str):
    cookie = {
        "none": None,
        "revoked": world.cookies[("Alice", "revoked")],
        "removed": world.cookies[("Gone", "removed")],
    }[session]
    before = await settled_snapshot(world)
    answer = await ask(world, "GET", "/api/conversations", cookie)
    assert (answer.status, answer.error) == (401, "login_required")
    for conversation in world.conversations.values():
        assert leaks(answer, conversation) == []
        assert conversation.id not in answer.body.decode()
    assert_unchanged(before, await settled_snapshot(world), f"a list with {session} session")


@pytest.mark.asyncio(loop_scope="module")
@pytest.mark.parametrize("session", ["live", "none", "revoked", "removed"])
async def test_the_connection_check_names_no_conversation_and_needs_a_session(
    world: World, session: str
):
    """``/api/connection-check`` names no conversation (so it has no column, like
    ``/api/me``): it needs a live session, and reads and writes nothing of anyone's."""
    cookie = {
        "live": world.cookies[("Kid", "live")],
        "none": None,
        "revoked": world.cookies[("Alice", "revoked")],
        "removed": world.cookies[("Gone", "removed")],
    }[session]
    before = await settled_snapshot(world)
    answer = await ask(world, "GET", "/api/connection-check", cookie, params={"idle": "0"})
    if session == "live":
        assert answer.status == 200
        assert answer.headers_dict()["Content-Type"] == "text/event-stream"
        assert answer.body.endswith(b"\n\n") and b"event: done\n" in answer.body
    else:
        assert (answer.status, answer.error) == (401, "login_required")
    for conversation in world.conversations.values():
        assert leaks(answer, conversation) == []
    assert_unchanged(before, await settled_snapshot(world), f"a check with {session} session")


# -- logs written before accounts -----------------------------------------------------------

LEGACY_ACCOUNTS = (("Alice", "adult"), ("Mom", "parent"), ("Dad", "parent"), ("Kid", "child"))
"""An adult made before the first parent: the first *parent* owns the old logs."""


@pytest.mark.parametrize("written", ["single_person_mode", "before_start"])
async def test_a_log_written_before_accounts_belongs_to_the_first_parent(
    make_client, data_dir, written
):
    secret = f"legacy-secret-{os.urandom(4).hex()}"
    if written == "single_person_mode":
        client = await make_client(demo_reply_tokens=4)
        conversation_id = await create_conversation(client, title=secret)
        response = await client.post(
            f"/api/conversations/{conversation_id}/messages", json={"text": secret + "-text"}
        )
        assert response.status == 202
        await wait_idle(client, conversation_id)
        await client.close()
    else:
        conversation_id = "legacy-conversation"
        directory = data_dir / "conversations"
        directory.mkdir(mode=0o700, parents=True)
        first = records.conversation(
            conversation_id=conversation_id, title=secret, model="demo", system=None
        )
        user = records.user(message_id="m1", text=secret + "-text")
        user["parent"] = None
        (directory / f"{conversation_id}.jsonl").write_bytes(
            records.encode(first) + records.encode(user)
        )
    log_path = data_dir / "conversations" / f"{conversation_id}.jsonl"
    assert "owner" not in records.decode(log_path.read_bytes().split(b"\n")[0])
    for name, role in LEGACY_ACCOUNTS:
        add_account(data_dir, name, role)

    client = await make_client(demo_reply_tokens=4)
    http = aiohttp.ClientSession(cookie_jar=aiohttp.DummyCookieJar())
    try:
        world = World(client, http, data_dir, {}, {})
        for name, _ in LEGACY_ACCOUNTS:
            world.cookies[(name, "live")] = await log_in(client, name)
        mom = world.cookies[("Mom", "live")]
        path = f"/api/conversations/{conversation_id}"
        answer = await ask(world, "GET", path, mom)
        assert answer.status == 200 and orjson.loads(answer.body)["title"] == secret
        rows = orjson.loads((await ask(world, "GET", "/api/conversations", mom)).body)
        assert [(r["id"], r["access"], r["owner"]) for r in rows] == [
            (conversation_id, "owner", "Mom")
        ]
        # the first parent owns it: it may write in it too
        answer = await ask(world, "POST", path + "/messages", mom, body={"text": "mine"})
        assert answer.status == 202
        await no_reply_runs(client, conversation_id)
        for name in ("Alice", "Dad", "Kid"):
            cookie = world.cookies[(name, "live")]
            for method, suffix in (("GET", ""), ("GET", "/log"), ("GET", "/events")):
                before = snapshot(data_dir)
                answer = await ask(world, method, path + suffix, cookie)
                unknown = await ask(
                    world, method, f"/api/conversations/{UNKNOWN_ID}{suffix}", cookie
                )
                assert answer.status == 404, (name, suffix)
                assert (answer.status, answer.headers, answer.body) == (
                    unknown.status,
                    unknown.headers,
                    unknown.body,
                )
                assert secret not in answer.body.decode()
                assert_unchanged(before, snapshot(data_dir), f"{name} GET {suffix}")
            rows = orjson.loads((await ask(world, "GET", "/api/conversations", cookie)).body)
            assert conversation_id not in {r["id"] for r in rows}
    finally:
        await http.close()
