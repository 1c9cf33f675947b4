"""Export (DESIGN.md "Export and import"): ``storage.export`` (pure: a log's bytes in, a
file out), ``GET /api/conversations/{id}/export`` (a download, isolation, the audit) and
``chatledger export``.

The HTML export must be inert and self-contained: it is parsed with ``html.parser`` and
every element and attribute checked, with a model reply made of the usual attacks."""

from __future__ import annotations

import asyncio
import datetime
import html.parser
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import unquote

import orjson
import pytest

from chatledger.server.export_api import content_disposition
from chatledger.server.export_api import routes as export_routes
from chatledger.storage import export, records

from .conftest import add_account, check_seals, create_conversation, login, wait_idle

REPO = Path(__file__).resolve().parent.parent
UTC2 = datetime.timezone(datetime.timedelta(hours=2))
EXPORT_PATH = "/api/conversations/{conversation_id}/export"


def chatledger(*args: str) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [sys.executable, "-m", "chatledger", *args], cwd=REPO, capture_output=True, timeout=120
    )


def log_of(*recs: dict) -> bytes:
    """A log's bytes: each record at ts 1714557600000 + its index seconds."""
    out = b""
    for index, record in enumerate(recs):
        out += records.encode({**record, "ts": 1714557600000 + index * 1000})
    return out


def conversation(**fields) -> dict:
    return {
        "type": "conversation",
        "id": "c1",
        "title": "Test",
        "model": "demo",
        "system": None,
        **fields,
    }


def reply(reply_id: str, reply_to: str, text: str, finish: str | None = "stop", **start):
    out = [{"type": "start", "id": reply_id, "reply_to": reply_to, "model": "demo", **start}]
    if text:
        out.append({"type": "chunk", "id": reply_id, "i": 0, "text": text})
    if finish is not None:
        error = "the provider failed" if finish == "error" else None
        out.append({"type": "end", "id": reply_id, "finish": finish, "usage": None, "error": error})
    return out


BRANCHED = log_of(
    conversation(title="Branches"),
    {"type": "user", "id": "u1", "text": "First question", "parent": None},
    *reply("r1", "u1", "First answer"),
    *reply("r2", "u1", "Second answer", regenerate_of="r1"),
    {"type": "user", "id": "u2", "text": "Follow-up", "parent": "r2"},
    *reply("r3", "u2", "Partial", finish="cancelled"),
    {"type": "user", "id": "u3", "text": "Follow-up, rephrased", "parent": "r2", "edit_of": "u2"},
    *reply("r4", "u3", "Broken", finish="error"),
    {"type": "select", "leaf": "r3"},
    {"type": "user", "id": "u4", "text": "Unanswered?", "parent": "r3"},
    *reply("r5", "u4", "Still writ", finish=None),
)


# -- the pure module -----------------------------------------------------------------------


def test_jsonl_is_the_log_byte_for_byte():
    assert export.render(BRANCHED, "jsonl") == BRANCHED


def test_unknown_format_is_refused():
    with pytest.raises(ValueError):
        export.render(BRANCHED, "pdf")


def test_transcript_marks_branches_and_the_current_path():
    found = export.transcript(records.decode_all(BRANCHED), size=len(BRANCHED))
    messages = {e.id: e for e in found.entries}
    assert messages["u3"].edit_of == "u2" and messages["r2"].regenerate_of == "r1"
    # the latest select names r3; u4 and r5 follow it, so the current path ends at r5
    current = {e.id for e in found.entries if e.current}
    assert current == {"u1", "r2", "u2", "r3", "u4", "r5"}
    assert not messages["r5"].ended and messages["r4"].finish == "error"


def test_markdown_is_readable_with_branches_and_endings_marked():
    text = export.render(BRANCHED, "md", tz=UTC2, names={}).decode()
    assert text.startswith("# Branches\n")
    assert "### You · 2024-05-01 12:00 UTC+02:00" in text  # local time with its offset
    assert "### Assistant · 2024-05-01 12:00 UTC+02:00 · demo · another answer" in text
    assert "*Another answer to “First question” (regenerated).*" in text
    assert "· edited question" in text
    assert "*Edited question: another version of “Follow-up”. Not on the current branch.*" in text
    assert "*Unfinished: stopped before it finished.*" in text
    assert "*Failed: the provider failed.*" in text
    assert "*Unfinished: the reply was still being written when this was exported.*" in text
    # r1 is off the current path, r2 on it
    first, second = text.split("First answer")[0], text.split("Second answer")[0]
    assert first.rstrip().endswith("*Not on the current branch.*")
    assert not second.split("First answer")[-1].count("Not on the current branch")


def test_markdown_names_the_sender_and_closes_an_open_code_fence():
    data = log_of(
        conversation(owner="acc1"),
        {"type": "user", "id": "u1", "text": "```\nunclosed", "by": "acc1", "parent": None},
        *reply("r1", "u1", "fine"),
    )
    text = export.render(data, "md", names={"acc1": "Kid"}).decode()
    assert "### Kid · " in text
    assert "```\nunclosed\n```\n" in text


def test_legacy_logs_without_parent_fields_are_one_path():
    data = log_of(
        conversation(),
        {"type": "user", "id": "u1", "text": "a"},
        *reply("r1", "u1", "b"),
        {"type": "user", "id": "u2", "text": "c"},
        *reply("r2", "u2", "d"),
    )
    found = export.transcript(records.decode_all(data))
    assert all(e.current for e in found.entries)
    assert "Not on the current branch" not in export.render(data, "md").decode()


def test_file_names():
    assert export.file_name("Trip: Lisbon / Porto?", "c1", "md") == "Trip_ Lisbon _ Porto_.md"
    assert export.file_name("  \n ", "c1", "html") == "c1.html"
    assert export.file_name("x" * 300, "c1", "jsonl") == "x" * 100 + ".jsonl"
    assert export.file_name("a\x00b\u202ec", "c1", "md") == "a b c.md"


def test_content_disposition_has_an_ascii_fallback_and_filename_star():
    assert content_disposition("plain.md") == 'attachment; filename="plain.md"'
    header = content_disposition("Été à Paris ✈.md")
    fallback, star = header.split("; filename*=")
    assert fallback == 'attachment; filename="Ete a Paris _.md"'
    assert star.startswith("UTF-8''") and unquote(star[len("UTF-8''") :]) == "Été à Paris ✈.md"
    assert " " not in star and "'" not in star[len("UTF-8''") :]
    assert content_disposition('a"b\\c.md') == (
        "attachment; filename=\"a_b_c.md\"; filename*=UTF-8''a%22b%5Cc.md"
    )


# -- HTML: inert and self-contained --------------------------------------------------------

ATTACK = "\n\n".join(
    [
        "Some **bold** text and a [fine link](https://example.org/page) and [top](#top).",
        "<img src=x onerror=alert(1)>",
        "<script>alert(2)</script>",
        '[x](javascript:alert(3)) and <a href="javascript:alert(4)">a</a>',
        "<svg onload=alert(5)><circle r=1></circle></svg>",
        "![a cat](http://example.com/cat.png) ![data](data:image/png;base64,AAAA)",
        '<iframe src="https://evil.example"></iframe> <link rel=stylesheet href=//evil.example>',
        "<style>body{background:url(https://evil.example/x)}</style>",
        '<div style="background:url(https://evil.example/y)" onclick="alert(6)">div</div>',
        "[v](vbscript:msgbox(1)) [d](data:text/html,<script>alert(7)</script>)",
        "| a | b |\n|:-|-:|\n| 1 | 2 |",
        "```html\n<script>alert(8)</script>\n```",
    ]
)


class Collector(html.parser.HTMLParser):
    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.tags: list[tuple[str, list[tuple[str, str | None]]]] = []
        self.styles: list[str] = []
        self.text: list[str] = []
        self._in_style = False

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, attrs))
        self._in_style = tag == "style"

    def handle_startendtag(self, tag, attrs):
        self.tags.append((tag, attrs))

    def handle_endtag(self, tag):
        self._in_style = False

    def handle_data(self, data):
        (self.styles if self._in_style else self.text).append(data)


def parsed(document: bytes) -> Collector:
    collector = Collector()
    collector.feed(document.decode())
    collector.close()
    return collector


def assert_inert(document: bytes) -> Collector:
    """No script, no event handler, no javascript:/data: URL, nothing that loads."""
    found = parsed(document)
    tags = {tag for tag, _ in found.tags}
    assert not tags & {"script", "svg", "img", "iframe", "object", "embed", "link", "frame"}
    assert not tags & {"video", "audio", "source", "form", "input", "base", "math", "picture"}
    assert [tag for tag, _ in found.tags].count("style") == 1  # the export's own
    metas = [dict(attrs) for tag, attrs in found.tags if tag == "meta"]
    assert {"http-equiv": "Content-Security-Policy", "content": export.CSP} in metas
    for tag, attrs in found.tags:
        for name, value in attrs:
            assert not name.startswith("on"), (tag, name)
            assert name not in ("src", "srcset", "action", "formaction", "background"), tag
            if name == "style":
                assert tag in ("th", "td") and value and value.startswith("text-align:"), value
            if name == "href":
                assert tag == "a"
                assert value is not None
                scheme = value.split(":", 1)[0].lower() if ":" in value else ""
                assert scheme in ("", "http", "https", "mailto"), value
        if tag == "a":
            assert dict(attrs).get("rel") == "noopener noreferrer"
    style = "".join(found.styles)
    assert "url(" not in style and "@import" not in style and "@font-face" not in style
    # every URL in the file is the href of a link (nothing is fetched): none elsewhere
    outside = document.decode()
    for _, attrs in found.tags:
        for name, value in attrs:
            if name == "href" and value:
                outside = outside.replace(f'href="{value}"', "")
    assert "https://example.org" not in outside and "http://example.com" not in outside
    return found


def test_html_model_text_is_sanitized_markdown_and_user_text_is_text():
    data = log_of(
        conversation(title="<b>Title</b>", system="Be <i>kind</i>."),
        {"type": "user", "id": "u1", "text": "<b>not bold</b> <script>alert(0)</script>"},
        *reply("r1", "u1", ATTACK),
    )
    document = export.render(data, "html")
    found = assert_inert(document)
    tags = [tag for tag, _ in found.tags]
    assert "strong" in tags and "table" in tags and "pre" in tags  # Markdown was rendered
    assert "b" not in tags and "i" not in tags  # the title, system and user text are text
    text = "".join(found.text)
    assert "<b>not bold</b> <script>alert(0)</script>" in text
    assert "<b>Title</b>" in text and "Be <i>kind</i>." in text
    assert "<img src=x onerror=alert(1)>" in text  # raw HTML in model text is shown as text
    assert "<script>alert(8)</script>" in text  # the code block's content, as text
    assert "[image: a cat]" in text  # an image is a link to it, never loaded
    assert "[image: data]" in text  # ... with no href left for a data: URL
    links = [dict(attrs).get("href") or "" for tag, attrs in found.tags if tag == "a"]
    assert "https://example.org/page" in links and "#top" in links
    assert "http://example.com/cat.png" in links
    assert not any("javascript" in link or "data:" in link for link in links)
    assert document.startswith(b"<!DOCTYPE html>")


def test_html_marks_branches_and_endings():
    document = export.render(BRANCHED, "html")
    assert_inert(document)
    text = "".join(parsed(document).text)
    assert "another answer" in text and "edited question" in text
    assert "Failed: the provider failed." in text and "Not on the current branch." in text


# -- the route -----------------------------------------------------------------------------


@pytest.fixture
def exporting(make_client, monkeypatch):
    """``make_client`` whose application also has the export routes (registered here
    until ``server/app.py`` adds them itself)."""
    real = make_client.__globals__["init_app"]

    def init_app(*args, **kwargs):
        app = real(*args, **kwargs)
        paths = {resource.canonical for resource in app.router.resources()}
        if EXPORT_PATH not in paths:
            app.add_routes(export_routes)
        return app

    monkeypatch.setitem(make_client.__globals__, "init_app", init_app)
    return make_client


async def test_route_exports_every_format_as_an_attachment(exporting):
    client = await exporting(demo_reply_tokens=6)
    conversation_id = await create_conversation(client, title="Été à Paris ✈")
    response = await client.post(
        f"/api/conversations/{conversation_id}/messages", json={"text": "<b>hello</b>"}
    )
    assert response.status == 202
    await wait_idle(client, conversation_id)
    raw = await (await client.get(f"/api/conversations/{conversation_id}/log")).read()
    url = f"/api/conversations/{conversation_id}/export"

    response = await client.get(url, params={"format": "jsonl"})
    assert response.status == 200
    assert await response.read() == raw
    check_seals(raw)
    assert response.headers["Content-Type"] == "application/x-ndjson"
    disposition = response.headers["Content-Disposition"]
    assert disposition.startswith('attachment; filename="Ete a Paris _.jsonl"; filename*=UTF-8')
    assert response.headers["Cache-Control"] == "no-store"

    response = await client.get(url, params={"format": "md"})
    assert response.status == 200
    assert response.headers["Content-Type"] == "text/markdown; charset=utf-8"
    text = await response.text()
    assert text.startswith("# Été à Paris ✈\n") and "<b>hello</b>" in text
    assert ".md\"; filename*=UTF-8''%C3%89t%C3%A9" in response.headers["Content-Disposition"]

    response = await client.get(url, params={"format": "html"})
    assert response.status == 200
    assert response.headers["Content-Type"] == "text/html; charset=utf-8"
    assert response.headers["Content-Security-Policy"].startswith("sandbox;")
    document = await response.read()
    found = assert_inert(document)
    assert "<b>hello</b>" in "".join(found.text)


@pytest.mark.parametrize("query", [{"format": "pdf"}, {}, {"format": "JSONL"}])
async def test_route_refuses_an_unknown_format(exporting, query):
    client = await exporting()
    conversation_id = await create_conversation(client, title="x")
    response = await client.get(f"/api/conversations/{conversation_id}/export", params=query)
    assert response.status == 400
    body = await response.json()
    assert body["error"] == "invalid_query" and "jsonl, md, html" in body["message"]


async def test_route_unknown_and_invalid_ids(exporting):
    client = await exporting()
    response = await client.get("/api/conversations/nope/export", params={"format": "md"})
    assert response.status == 404 and (await response.json())["error"] == "not_found"
    response = await client.get("/api/conversations/a.b/export", params={"format": "md"})
    assert response.status == 400


async def audit_records(data_dir: Path, conversation_id: str, until) -> list[dict]:
    path = data_dir / "audit" / f"{conversation_id}.jsonl"
    deadline = time.monotonic() + 10
    while True:
        data = path.read_bytes() if path.exists() else b""
        recs = records.decode_all(data[: data.rfind(b"\n") + 1])
        if until(recs):
            return recs
        assert time.monotonic() < deadline, recs
        await asyncio.sleep(0.02)


async def test_route_isolation_and_the_guardians_audited_export(exporting, data_dir):
    ids = {
        name: add_account(data_dir, name, role)
        for name, role in (("Mom", "parent"), ("Kid", "child"), ("Alice", "adult"))
    }
    client = await exporting(demo_reply_tokens=6)
    await login(client, "Kid")
    conversation_id = await create_conversation(client, title="Homework")
    response = await client.post(
        f"/api/conversations/{conversation_id}/messages", json={"text": "2+2?"}
    )
    assert response.status == 202
    await wait_idle(client, conversation_id)
    url = f"/api/conversations/{conversation_id}/export"
    response = await client.get(url, params={"format": "md"})
    assert response.status == 200
    assert "### Kid · " in await response.text()  # the sender's name
    committed = (data_dir / "conversations" / f"{conversation_id}.jsonl").stat().st_size

    await login(client, "Alice")  # another adult: the conversation does not exist
    response = await client.get(url, params={"format": "jsonl"})
    unknown = await client.get("/api/conversations/unknown0/export", params={"format": "jsonl"})
    assert response.status == unknown.status == 404
    assert await response.json() == await unknown.json()
    assert "Content-Disposition" not in response.headers

    await login(client, "Mom")  # a guardian may export it, and that is on the record
    response = await client.get(url, params={"format": "html"})
    assert response.status == 200
    assert "Homework" in (await response.read()).decode()

    def moms_read_closed(recs: list[dict]) -> bool:
        opens = [r for r in recs if r["type"] == "open" and r["viewer"] == ids["Mom"]]
        return bool(opens) and any(
            r["type"] == "close" and r["conn"] == opens[-1]["conn"] for r in recs
        )

    recs = await audit_records(data_dir, conversation_id, moms_read_closed)
    opened = [r for r in recs if r["type"] == "open" and r["viewer"] == ids["Mom"]]
    assert len(opened) == 1 and opened[0]["from"] == 0
    closed = next(r for r in recs if r["type"] == "close" and r["conn"] == opened[0]["conn"])
    assert closed["to"] == committed and closed["reason"] == "end"
    assert not [r for r in recs if r.get("viewer") == ids["Alice"]]


# -- the command ---------------------------------------------------------------------------


async def test_cli_export_to_stdout_and_to_a_file(exporting, data_dir, tmp_path):
    client = await exporting(demo_reply_tokens=6)
    conversation_id = await create_conversation(client, title="CLI")
    response = await client.post(
        f"/api/conversations/{conversation_id}/messages", json={"text": "hi"}
    )
    assert response.status == 202
    await wait_idle(client, conversation_id)
    log_path = data_dir / "conversations" / f"{conversation_id}.jsonl"
    # while the server runs: read-only, no lock needed
    done = await asyncio.to_thread(
        chatledger, "export", conversation_id, "--format", "jsonl", "--data-dir", str(data_dir)
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout == log_path.read_bytes()
    out = tmp_path / "out.html"
    done = await asyncio.to_thread(
        chatledger,
        "export",
        conversation_id,
        "--format",
        "html",
        "-o",
        str(out),
        "--data-dir",
        str(data_dir),
    )
    assert done.returncode == 0 and done.stdout == b"", done.stderr
    assert_inert(out.read_bytes())
    done = await asyncio.to_thread(
        chatledger, "export", "missing", "--format", "md", "--data-dir", str(data_dir)
    )
    assert done.returncode == 1 and b"no conversation missing" in done.stderr


def test_cli_export_of_a_torn_log_exports_its_whole_records(tmp_path):
    directory = tmp_path / "data" / "conversations"
    directory.mkdir(parents=True)
    data = log_of(conversation(), {"type": "user", "id": "u1", "text": "a", "parent": None})
    (directory / "c1.jsonl").write_bytes(data + b'{"type":"chu')
    done = chatledger("export", "c1", "--format", "jsonl", "--data-dir", str(tmp_path / "data"))
    assert done.returncode == 0 and done.stdout == data
    assert b"a write in flight, or a torn tail" in done.stderr
    done = chatledger("export", "c1", "--format", "pdf", "--data-dir", str(tmp_path / "data"))
    assert done.returncode == 2  # argparse: not one of the choices


def test_records_in_the_md_are_in_log_order():
    text = export.render(BRANCHED, "md").decode()
    order = [text.index(word) for word in ("First answer", "Second answer", "Partial", "Broken")]
    assert order == sorted(order)
    assert orjson.loads(BRANCHED.split(b"\n")[0])["title"] == "Branches"


def test_the_sanitizer_alone_makes_raw_html_inert(monkeypatch):
    """Defence in depth: were raw HTML let through the Markdown step, nh3 still strips
    scripts, handlers, javascript: URLs and anything that loads."""
    from markdown_it import MarkdownIt

    unsafe = MarkdownIt("commonmark", {"html": True}).enable("table")
    monkeypatch.setattr(export, "_markdown", lambda: unsafe)
    data = log_of(
        conversation(), {"type": "user", "id": "u1", "text": "hi"}, *reply("r1", "u1", ATTACK)
    )
    document = export.render(data, "html")
    found = assert_inert(document)
    assert "div" in [tag for tag, _ in found.tags]  # raw HTML did get through markdown-it
    assert "alert(2)" not in "".join(found.text)  # a script's content is dropped with it
