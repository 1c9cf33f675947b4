"""Findings of the security and race review of the household, audit and seals work
(2026-12-01), each as the attack that found it: every test failed on the reviewed code
and asserts the secure behaviour."""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path

import aiohttp

from chatledger.server import sessions as sessions_module
from chatledger.server.sessions import COOKIE, hash_password
from chatledger.storage import FileIO, Store, records
from chatledger.storage.household import Household
from chatledger.storage.verify import verify_log

from .conftest import add_account, create_conversation, login, wait_idle
from .sse_reader import StreamReader


def cookie_of(client) -> str:
    return client.session.cookie_jar.filter_cookies(client.make_url("/"))[COOKIE].value


class GatedSyncIO(FileIO):
    """fdatasync blocks (on its worker thread) while ``gate`` is armed."""

    def __init__(self) -> None:
        self.armed = False
        self.entered = threading.Event()
        self.release = threading.Event()

    def fdatasync(self, fd: int) -> None:
        if self.armed:
            self.entered.set()
            self.release.wait(10)
        super().fdatasync(fd)


# -- 1. a logout while a stream's audit `open` commits leaves the stream running ---------


async def test_review_logout_during_the_audit_open_ends_the_stream(make_client, data_dir):
    add_account(data_dir, "Kid", "child")
    io = GatedSyncIO()
    client = await make_client(demo_reply_tokens=2, audit_file_io=io)
    await login(client, "Kid")
    doomed = cookie_of(client)
    conversation_id = await create_conversation(client, title="t")
    r = await client.get(f"/api/conversations/{conversation_id}")  # audit log now exists
    assert r.status == 200
    # A second session of Kid's, to write while the first one is logged out.
    async with aiohttp.ClientSession(cookie_jar=aiohttp.DummyCookieJar()) as bare:
        url = client.make_url
        async with bare.post(
            url("/api/login"), json={"name": "Kid", "password": "password-1"}
        ) as r:
            other = r.cookies[COOKIE].value
        io.armed = True
        stream_task = asyncio.ensure_future(
            bare.get(
                url(f"/api/conversations/{conversation_id}/events"),
                headers={"Cookie": f"{COOKIE}={doomed}"},
            )
        )
        await asyncio.to_thread(io.entered.wait, 10)  # the stream's open is being synced
        async with bare.post(url("/api/logout"), headers={"Cookie": f"{COOKIE}={doomed}"}) as r:
            assert r.status == 204
        io.armed = False
        io.release.set()
        stream = await stream_task
        reader = StreamReader()
        try:
            # the logged-out session is still being sent new records:
            async with bare.post(
                url(f"/api/conversations/{conversation_id}/messages"),
                json={"text": "sent after the logout"},
                headers={"Cookie": f"{COOKIE}={other}"},
            ) as r:
                assert r.status == 202
            deadline = time.monotonic() + 3
            ended = False
            while time.monotonic() < deadline:
                try:
                    data = await asyncio.wait_for(stream.content.readany(), 0.5)
                except TimeoutError:
                    continue
                if not data:
                    ended = True
                    break
                reader.feed(data)
            got_user = any(e.event == "user" for e in reader.events)
            assert ended and not got_user, (
                f"stream of a logged-out session still open={not ended}, received the"
                f" message sent after the logout={got_user}"
            )
        finally:
            stream.close()


# -- 2. a login with the old password in flight survives `user passwd` -------------------


async def test_review_a_login_in_flight_with_the_old_password_fails_after_passwd(
    make_client, data_dir, monkeypatch
):
    add_account(data_dir, "Kid", "child")
    client = await make_client()
    entered, release = threading.Event(), threading.Event()
    real_verify = sessions_module._verify

    def slow_verify(phc: str, password: str) -> bool:
        entered.set()
        release.wait(10)
        return real_verify(phc, password)

    monkeypatch.setattr(sessions_module, "_verify", slow_verify)
    attempt = asyncio.ensure_future(
        client.post("/api/login", json={"name": "Kid", "password": "password-1"})
    )
    await asyncio.to_thread(entered.wait, 10)

    def passwd() -> None:  # what `chatledger user passwd Kid` does, in another "process"
        household = Household(data_dir)
        try:
            household.set_password("Kid", hash_password("password-2-new"))
        finally:
            household.close()

    await asyncio.to_thread(passwd)
    release.set()
    response = await attempt
    me = await client.get("/api/me")
    assert response.status == 401 and me.status == 401, (
        f"old password after `user passwd`: login {response.status}, /api/me {me.status}"
    )


# -- 3. a guardian reads a child's first line (the title) with no audit record -----------


async def test_review_a_guardians_list_is_audited_or_hides_titles(make_client, data_dir):
    mom = add_account(data_dir, "Mom", "parent")
    add_account(data_dir, "Kid", "child")
    client = await make_client(demo_reply_tokens=2)
    await login(client, "Kid")
    conversation_id = await create_conversation(client)  # untitled: titled by 1st message
    r = await client.post(
        f"/api/conversations/{conversation_id}/messages",
        json={"text": "i have a crush on Sam from class\nplease don't tell"},
    )
    assert r.status == 202
    await wait_idle(client, conversation_id)
    client.session.cookie_jar.clear()
    await login(client, "Mom")
    rows = await (await client.get("/api/conversations")).json()
    audit = Path(data_dir) / "audit" / f"{conversation_id}.jsonl"
    mom_opens = []
    if audit.exists():
        mom_opens = [
            rec
            for rec in records.decode_all(audit.read_bytes())
            if rec["type"] == "open" and rec["viewer"] == mom
        ]
    titles = [row["title"] for row in rows]
    assert not any("crush on Sam" in t for t in titles) or mom_opens, (
        f"Mom was sent the child's first message line {titles} and the audit log has"
        f" no record of it ({mom_opens})"
    )


# -- 4. behind a reverse proxy, removing the last account opens every conversation -------


async def test_review_removing_the_last_account_behind_a_proxy_opens_nothing(make_client, data_dir):
    add_account(data_dir, "Kid", "child")
    client = await make_client(
        public_origins=("https://chat.example.com",), trusted_proxies=("127.0.0.1",)
    )
    r = await client.post("/api/login", json={"name": "Kid", "password": "password-1"})
    assert r.status == 200
    cookie = {"Cookie": f"{COOKIE}={r.cookies[COOKIE].value}"}  # Secure: sent by hand
    r = await client.post("/api/conversations", json={"title": "kid's diary"}, headers=cookie)
    assert r.status == 201
    conversation_id = (await r.json())["id"]
    await asyncio.to_thread(lambda: (h := Household(data_dir), h.remove_account("Kid"), h.close()))
    await asyncio.sleep(1.5)  # the server folds the removal (REFRESH_S = 1 s)
    async with (
        aiohttp.ClientSession(cookie_jar=aiohttp.DummyCookieJar()) as stranger,
        stranger.get(
            client.make_url("/api/conversations"),
            headers={"Host": "chat.example.com", "X-Forwarded-For": "203.0.113.9"},
        ) as r,
    ):
        body = await r.text()
        assert r.status == 401, (
            f"an anonymous internet client (via the proxy) gets {r.status}: {body[:200]}"
        )
    assert conversation_id


# -- 5. records appended after the last seal pass verify, and the next open seals them ---


async def test_review_a_record_forged_after_the_last_seal_is_not_laundered(tmp_path):
    key = b"k" * 40
    data_dir = tmp_path / "data"
    store = Store(data_dir, seal_key=key)
    log = await store.create(title="t", model="m", system=None)
    await log.append(records.user(message_id="u1", text="hi"))
    await log.append(records.start(reply_id="r1", reply_to="u1", model="m"))
    await log.append(records.chunk(reply_id="r1", i=0, text="hello"))
    await log.append(records.end(reply_id="r1", finish="stop"))
    conversation_id = log.summary.conversation_id
    await store.close()
    path = data_dir / "conversations" / f"{conversation_id}.jsonl"
    forged = records.user(message_id="u2", text="FORGED: written by someone without the key")
    with open(path, "ab") as f:  # noqa: ASYNC230 - the forger's one small write
        f.write(records.encode(forged))
    first = verify_log(conversation_id, path.read_bytes().splitlines(keepends=True), key=key)
    # Reopen (the server's recovery), one more exchange: the forged record gets sealed.
    store = Store(data_dir, seal_key=key)
    log = await store.open(conversation_id)
    await log.append(records.start(reply_id="r2", reply_to="u2", model="m"))
    await log.append(records.end(reply_id="r2", finish="stop"))
    await store.close()
    data = path.read_bytes()
    after = verify_log(conversation_id, data.splitlines(keepends=True), key=key)
    assert b"FORGED" in data
    print("before reopen:", first.problems, first.warnings, first.sealed, first.size)
    print("after reopen:", after.problems, after.warnings, after.sealed, after.size)
    assert first.problems or after.problems or after.warnings, (
        "a record appended without the key is reported by verify neither before nor after"
        f" the next open; after it the log is sealed (HMAC) to byte {after.sealed} of"
        f" {after.size}"
    )
