"""Safety at the edge (DESIGN.md), attacked the way a hostile page, a rebinding name and a
slow client would, on a real loopback server: issue 8, findings 3, 4, 6 and 10."""

from __future__ import annotations

import asyncio
import errno
import re

import pytest
from aiohttp.test_utils import TestServer

from chatledger.server.app import init_app
from chatledger.server.cli import parser, settings_from
from chatledger.server.edge import CONTENT_SECURITY_POLICY, Edge
from chatledger.server.errors import answer_for
from chatledger.server.providers.demo import DemoProvider
from chatledger.server.settings import Settings
from chatledger.storage import LogReadOnlyError, records

from .conftest import create_conversation


def log_files(data_dir) -> set[str]:
    directory = data_dir / "conversations"
    return {p.name for p in directory.iterdir()} if directory.exists() else set()


async def listing(client) -> list[str]:
    return [row["id"] for row in await (await client.get("/api/conversations")).json()]


async def exchange(host: str, port: int, *requests: bytes) -> list[bytes]:
    """Send each request on one keep-alive connection after the previous answer's
    headers arrived; return each answer's header block and, for the last, all bytes up
    to the server's close."""
    reader, writer = await asyncio.open_connection(host, port)
    heads = []
    try:
        for request in requests:
            writer.write(request)
            heads.append(await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10))
        heads.append(await asyncio.wait_for(reader.read(), 10))
    finally:
        writer.close()
    return heads


# -- finding 3: any web page can use the server ---------------------------------------------


@pytest.mark.parametrize("host", ["evil.example", "evil.example:8080", "rebind.test", "[::2]"])
async def test_finding_3_a_foreign_host_is_421_before_anything_is_read(make_client, host):
    # DNS rebinding: the attacker's name now points at 127.0.0.1, so its page reaches us,
    # but its requests still carry its own name.
    client = await make_client(demo_reply_tokens=2)
    conversation_id = await create_conversation(client, title="private")
    for path in (
        "/api/conversations",
        f"/api/conversations/{conversation_id}",
        f"/api/conversations/{conversation_id}/log",
        f"/api/conversations/{conversation_id}/events",
        "/",
        "/api/health",
        "/no/such/route",
    ):
        response = await client.get(path, headers={"Host": host})
        assert response.status == 421, path
        body = await response.json()
        assert body["error"] == "misdirected_request"
        assert "private" not in await response.text() and host not in body["message"]
    response = await client.post("/api/conversations", json={}, headers={"Host": host})
    assert response.status == 421
    assert await listing(client) == [conversation_id]


@pytest.mark.parametrize(
    "host", ["127.0.0.1", "127.0.0.1:1", "localhost", "LOCALHOST:80", "127.8.9.10", "[::1]:9"]
)
async def test_finding_3_loopback_names_are_answered(make_client, host):
    client = await make_client()
    response = await client.get("/api/health", headers={"Host": host})
    assert response.status == 200


async def test_finding_3_public_origin_hosts_are_answered_and_may_post(make_client, data_dir):
    client = await make_client(public_origins=("https://chat.example.org",))
    headers = {
        "Host": "chat.example.org",  # as nginx forwards it ($host)
        "Origin": "https://chat.example.org",
        "Sec-Fetch-Site": "same-origin",
    }
    response = await client.post("/api/conversations", json={"title": "ok"}, headers=headers)
    assert response.status == 201
    assert (await client.get("/api/health", headers={"Host": "chat.example.org:443"})).status == 200
    assert (await client.get("/api/health", headers={"Host": "other.example.org"})).status == 421
    # another site whose page posts to the public name
    response = await client.post(
        "/api/conversations",
        json={},
        headers={**headers, "Origin": "https://chat.example.org.evil.example"},
    )
    assert response.status == 403


def test_finding_3_the_listening_address_and_the_connections_own_ip_are_answered():
    edge = Edge.of(host="0.0.0.0", public_origins=())
    # on the LAN with --host 0.0.0.0: the browser asked for our own IP literal
    assert edge.answers_to("192.168.1.5:8080", local="192.168.1.5")
    assert edge.answers_to("192.168.1.5", local="::ffff:192.168.1.5")  # dual-stack socket
    assert not edge.answers_to("192.168.1.6:8080", local="192.168.1.5")
    assert not edge.answers_to("chat.lan:8080", local="192.168.1.5")  # a name: rebinding
    assert not edge.answers_to("0.0.0.0", local="127.0.0.1")
    named = Edge.of(host="chat.lan", public_origins=())
    assert named.answers_to("chat.lan:8080") and not named.answers_to("evil.lan")
    v6 = Edge.of(host="fd00::5", public_origins=())
    assert v6.answers_to("[fd00::5]:8080") and not v6.answers_to("[fd00::6]")
    for garbage in ("", "evil.example@127.0.0.1", "127.0.0.1/x", "[::1", "a b", "x:99999"):
        assert not edge.answers_to(garbage), garbage


@pytest.mark.parametrize(
    "headers",
    [
        {"Origin": "http://evil.example", "Content-Type": "text/plain"},
        {"Sec-Fetch-Site": "cross-site", "Content-Type": "text/plain"},
        {
            "Origin": "http://evil.example",
            "Sec-Fetch-Site": "cross-site",
            "Content-Type": "application/x-www-form-urlencoded",
        },
        {"Origin": "null", "Content-Type": "text/plain"},  # a sandboxed or file: page
    ],
    ids=["origin", "fetch-metadata", "form", "origin-null"],
)
async def test_finding_3_cross_site_posts_create_and_send_nothing(make_client, data_dir, headers):
    client = await make_client(demo_reply_tokens=2)
    conversation_id = await create_conversation(client)
    before_files = log_files(data_dir)
    before_log = await (await client.get(f"/api/conversations/{conversation_id}/log")).read()
    for path, body in (
        ("/api/conversations", b'{"title": "pwned", "model": "o1-pro-most-expensive"}'),
        (f"/api/conversations/{conversation_id}/messages", b'{"text": "pwned"}'),
        (f"/api/conversations/{conversation_id}/stop", b""),
    ):
        response = await client.post(path, data=body, headers=headers)
        assert response.status == 403, path
        assert (await response.json())["error"] == "cross_site"
    assert await listing(client) == [conversation_id]
    assert log_files(data_dir) == before_files
    after_log = await (await client.get(f"/api/conversations/{conversation_id}/log")).read()
    assert after_log == before_log


@pytest.mark.parametrize(
    "content_type",
    ["text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x", None],
)
async def test_finding_3_a_body_that_is_not_json_is_415(make_client, data_dir, content_type):
    # no Origin, no Sec-Fetch-Site (a script): still only JSON bodies
    client = await make_client()
    conversation_id = await create_conversation(client)
    before = log_files(data_dir)
    headers = {} if content_type is None else {"Content-Type": content_type}
    for path, body in (
        ("/api/conversations", b"{}"),
        (f"/api/conversations/{conversation_id}/messages", b'{"text": "hi"}'),
    ):
        if content_type is None:
            # aiohttp's client would add application/octet-stream; send none at all
            _, head = await exchange(
                client.host,
                client.port,
                b"POST %s HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n"
                b"Content-Length: %d\r\n\r\n%s" % (path.encode(), len(body), body),
            )
            assert b'"error":"unsupported_media_type"' in head
            continue
        response = await client.post(path, data=body, headers=headers)
        assert response.status == 415, path
        assert (await response.json())["error"] == "unsupported_media_type"
    assert log_files(data_dir) == before


@pytest.mark.parametrize(
    "headers",
    [
        {"Sec-Fetch-Site": "same-site"},  # a page on another port of 127.0.0.1
        {"Origin": "http://127.0.0.1:1"},
        {"Origin": "http://127.0.0.2:{port}"},  # another loopback address
        {"Origin": "https://127.0.0.1:{port}"},
        {"Origin": "http://localhost:{port}"},  # another name of the same server
    ],
)
async def test_finding_3_same_site_is_not_same_origin(make_client, headers):
    client = await make_client()
    headers = {k: v.format(port=client.port) for k, v in headers.items()}
    response = await client.post("/api/conversations", json={}, headers=headers)
    assert response.status == 403
    assert await listing(client) == []


async def test_finding_3_the_pages_own_requests_and_scripts_pass(make_client):
    client = await make_client(demo_reply_tokens=2)
    own = {"Origin": f"http://127.0.0.1:{client.port}", "Sec-Fetch-Site": "same-origin"}
    response = await client.post("/api/conversations", json={"title": "page"}, headers=own)
    assert response.status == 201
    conversation_id = (await response.json())["id"]
    # charset parameter, a stop with no body and no Content-Type (as static/api.js sends)
    response = await client.post(
        f"/api/conversations/{conversation_id}/messages",
        data=b'{"text": "hi"}',
        headers={**own, "Content-Type": "application/json; charset=utf-8"},
    )
    assert response.status == 202
    response = await client.post(f"/api/conversations/{conversation_id}/stop", headers=own)
    assert response.status in (200, 409)  # the reply may have ended already
    # Sec-Fetch-Site "none": typed in the address bar, a bookmark
    response = await client.post("/api/conversations", headers={"Sec-Fetch-Site": "none"})
    assert response.status == 201
    # curl: neither header, and a create with no body at all
    _, rest = await exchange(
        client.host,
        client.port,
        b"POST /api/conversations HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n",
    )
    assert b'"title":""' in rest
    assert len(await listing(client)) == 3


def header_values(head: bytes, name: bytes) -> list[bytes]:
    return [
        line.split(b":", 1)[1].strip()
        for line in head.split(b"\r\n")
        if line.lower().startswith(name.lower() + b":")
    ]


async def test_finding_3_every_answer_has_nosniff_csp_and_no_versions(make_client):
    client = await make_client(demo_reply_tokens=2)
    conversation_id = await create_conversation(client)
    url = f"/api/conversations/{conversation_id}"
    requests = [
        ("GET", "/"),
        ("GET", "/api/health"),
        ("GET", "/static/app.js"),
        ("GET", "/static/missing.js"),
        ("GET", "/no/such/route"),
        ("DELETE", "/api/health"),  # 405 from the router
        ("GET", f"{url}/log"),
        ("HEAD", f"{url}/log"),
        ("GET", "/api/conversations/bad$id"),
        ("GET", "/api/health", {"Host": "evil.example"}),  # 421
        ("POST", "/api/conversations", {"Origin": "null"}),  # 403
    ]
    for method, path, *headers in requests:
        response = await client.request(method, path, headers=headers[0] if headers else None)
        headers = response.headers
        assert headers["X-Content-Type-Options"] == "nosniff", path
        assert headers["Content-Security-Policy"] == CONTENT_SECURITY_POLICY, path
        assert headers["X-Frame-Options"] == "DENY" and headers["Referrer-Policy"] == "no-referrer"
        assert headers["Server"] == "chatledger", path
        await response.release()
    # a streamed answer: the SSE stream's headers, read off the socket before any event
    reader, writer = await asyncio.open_connection(client.host, client.port)
    writer.write(b"GET %s/events HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n" % url.encode())
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
    writer.close()
    assert head.startswith(b"HTTP/1.1 200") and b"text/event-stream" in head
    assert header_values(head, b"X-Content-Type-Options") == [b"nosniff"]
    assert b"frame-ancestors 'none'" in header_values(head, b"Content-Security-Policy")[0]
    assert header_values(head, b"Server") == [b"chatledger"]
    assert not re.search(rb"[0-9]", header_values(head, b"Server")[0])


async def test_finding_3_model_only_from_the_configured_list(make_client, data_dir):
    client = await make_client()
    response = await client.post("/api/conversations", json={"model": "o1-pro-most-expensive"})
    assert response.status == 400
    body = await response.json()
    assert body["error"] == "unknown_model" and body["models"] == ["demo"]
    assert "demo" in body["message"]
    assert log_files(data_dir) == set()
    # default: the provider's one model; system stays free text
    response = await client.post("/api/conversations", json={"system": "Talk like a pirate."})
    assert (await response.json())["model"] == "demo"

    listed = await make_client(models=("small", "large"), data_dir=data_dir.parent / "listed")
    response = await listed.post("/api/conversations", json={"model": "large"})
    assert response.status == 201 and (await response.json())["model"] == "large"
    assert (await listed.post("/api/conversations", json={"model": "demo"})).status == 201
    response = await listed.post("/api/conversations", json={"model": "huge"})
    assert (await response.json())["models"] == ["demo", "small", "large"]


# -- finding 4: HEAD sent a body ----------------------------------------------------------


async def test_finding_4_head_never_sends_a_body_on_any_get_route(make_client):
    client = await make_client(demo_reply_tokens=3)
    conversation_id = await create_conversation(client)
    await client.post(f"/api/conversations/{conversation_id}/messages", json={"text": "hi"})
    fill = {"conversation_id": conversation_id, "path": "app.js"}
    paths = {}
    for resource in client.server.app.router.resources():
        methods = {route.method for route in resource}
        if "GET" in methods:
            template = resource.canonical
            paths[template] = re.sub(r"\{(\w+)(:[^}]*)?\}", lambda m: fill[m[1]], template)
    for path in [*paths.values(), "/static/missing.js", "/no/such/route"]:
        head, health, rest = await exchange(
            client.host,
            client.port,
            b"HEAD %s HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n" % path.encode(),
            b"GET /api/health HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n",
        )
        assert head.startswith(b"HTTP/1.1 "), path
        # the next answer on the connection starts right after HEAD's headers
        assert health.startswith(b"HTTP/1.1 200 OK\r\n"), (path, health[:80])
        assert rest.startswith(b'{"ok":true'), path
    # every GET route of the app was tried: a new one cannot slip past this test
    assert set(paths) == {
        "/",
        "/api/health",
        "/api/connection-check",
        "/api/me",
        "/api/conversations",
        "/api/conversations/{conversation_id}",
        "/api/conversations/{conversation_id}/audit",
        "/api/conversations/{conversation_id}/events",
        "/api/conversations/{conversation_id}/export",
        "/api/conversations/{conversation_id}/log",
        "/static/{path}",
    }


# -- finding 6: a trickling body held its connection forever --------------------------------


@pytest.mark.parametrize("path", ["/api/conversations", "/api/conversations/{id}/messages"])
async def test_finding_6_a_body_that_trickles_gets_408_and_the_connection_closes(
    aiohttp_client, data_dir, path
):
    settings = Settings(data_dir=data_dir, body_timeout=0.5, demo_tokens_per_s=0)
    app = init_app(settings, provider=DemoProvider(tokens_per_s=0, reply_tokens=2))
    # aiohttp's lingering close (10 s by default) reads and drops what the client still
    # sends after the answer, so that it reads the 408 rather than a reset: shortened here
    server = TestServer(app, host="127.0.0.1")
    await server.start_server(lingering_time=0.5)  # RequestHandler's keyword
    client = await aiohttp_client(server)
    conversation_id = await create_conversation(client)
    target = path.replace("{id}", conversation_id).encode()
    reader, writer = await asyncio.open_connection(client.host, client.port)
    try:
        writer.write(
            b"POST %s HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            b"Content-Length: 100\r\n\r\n{" % target
        )
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 30)
        assert head.startswith(b"HTTP/1.1 408 ")
        assert header_values(head, b"Connection") == [b"close"]
        rest = b""
        while chunk := await asyncio.wait_for(reader.read(65536), 30):  # "" at close
            rest += chunk
            writer.write(b" ")  # still trickling
        assert rest.startswith(b'{"error":"body_timeout"')
    finally:
        writer.close()
    assert await listing(client) == [conversation_id]
    log = await (await client.get(f"/api/conversations/{conversation_id}/log")).read()
    assert b'"type":"user"' not in log


# -- finding 10: error texts leaked paths; some errors were not JSON -----------------------


async def test_finding_10_static_missing_is_a_json_404(make_client):
    client = await make_client()
    for path in ("/static/missing", "/static/", "/static/../server/app.py", "/static/.hidden"):
        response = await client.get(path)
        assert response.status == 404, path
        assert response.headers["Content-Type"] == "application/json"
        assert (await response.json())["error"] == "not_found"
    assert (await client.get("/static/style.css")).status == 200


async def test_finding_10_no_error_message_names_a_path(make_client, data_dir, tmp_path):
    path = data_dir / "conversations" / "corrupt.jsonl"
    path.parent.mkdir(parents=True)
    first = records.conversation(conversation_id="corrupt", title="t", model="m", system=None)
    later = records.user(message_id="u", text="after the damage")
    path.write_bytes(records.encode(first) + b"not json\n" + records.encode(later))
    client = await make_client()
    answers = [
        await client.post("/api/conversations/corrupt/messages", json={"text": "hi"}),
        await client.get("/api/conversations/corrupt/events?from=3"),
        await client.get("/api/conversations/nope"),
        await client.get("/static/nope.js"),
    ]
    for response in answers:
        body = await response.json()
        assert response.status >= 400 and body["error"]
        assert str(tmp_path) not in body["message"] and "/" not in body["message"], body
    assert (await answers[0].json())["error"] == "read_only"
    # the table's rows that format storage errors: a path in the error stays out
    for exc, operation in (
        (OSError(errno.EIO, "Input/output error", str(path)), "open"),
        (OSError(errno.ENOSPC, "No space left on device", str(path)), "create"),
        (OSError(errno.EACCES, "Permission denied", str(path)), "create"),
        (LogReadOnlyError("another process holds this log"), None),
    ):
        answer = answer_for(exc, operation)
        assert answer is not None and str(tmp_path) not in answer.message, exc


# -- the flags ------------------------------------------------------------------------------


def test_public_origin_and_models_flags():
    args = parser().parse_args(
        [
            "serve",
            "--public-origin",
            "https://Chat.Example.org/",
            "--public-origin",
            "http://[fd00::1]:8443",
            "--models",
            "small, large",
            "--models",
            "huge,small",
        ]
    )
    settings = settings_from(args)
    assert settings.public_origins == ("https://chat.example.org", "http://[fd00::1]:8443")
    assert settings.models == ("small", "large", "huge")


@pytest.mark.parametrize(
    "argv",
    [
        ["--public-origin", "chat.example.org"],
        ["--public-origin", "https://chat.example.org/chat"],
        ["--public-origin", "ftp://chat.example.org"],
        ["--public-origin", "https://user@chat.example.org"],
        ["--public-origin", "https://chat.example.org?x=1"],
        ["--models", "a,,b"],
    ],
)
def test_bad_public_origins_and_models_are_refused(argv, capsys):
    with pytest.raises(SystemExit) as exited:
        parser().parse_args(["serve", *argv])
    assert exited.value.code == 2
    assert argv[0] in capsys.readouterr().err
