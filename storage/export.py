"""Export of one conversation (DESIGN.md "Export and import"), pure: a log's bytes (whole
records, up to the offset being exported) in, the bytes of a file out. No I/O, no HTTP:
``chatledger export`` and ``GET /api/conversations/{id}/export`` both call :func:`render`.

* ``jsonl``: the log itself, byte for byte (its seals stay valid).
* ``md``: readable Markdown: the title, who said what and when (local time), each reply's
  end when it did not finish, and the branches marked: a ``user`` record with ``edit_of``
  is an *edited question*, a ``start`` with ``regenerate_of`` *another answer*; messages off
  the current path say so. Messages are in log order (the order they were written), so
  the export reads as what happened.
* ``html``: one self-contained file, readable offline for years: no script, no external
  resource (no ``<link>``, no image, no font, no ``url()``), one ``<style>`` element, and a
  Content-Security-Policy ``<meta>`` of ``default-src 'none'`` as a second lock. Model text
  is rendered as Markdown with markdown-it-py (the ``commonmark`` preset with tables; raw
  HTML in it is shown as text, as on the page), then sanitized with nh3 (ammonia): a
  small allow-list of tags, ``href`` only on links and only ``http``, ``https``, ``mailto``
  or relative, ``rel="noopener noreferrer"`` on every link. An image becomes a link to it
  (``[image: alt]``): nothing is ever fetched. User text is escaped, shown as typed.
"""

from __future__ import annotations

import datetime
import functools
import html
import re
import unicodedata
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Final

import nh3

from .records import Record, decode_all

__all__ = [
    "EXTENSIONS",
    "FORMATS",
    "MEDIA_TYPES",
    "Entry",
    "Transcript",
    "file_name",
    "render",
    "render_markdown",
    "to_html",
    "to_markdown",
    "transcript",
]

FORMATS: Final = ("jsonl", "md", "html")
"""The export formats."""

EXTENSIONS: Final = {"jsonl": "jsonl", "md": "md", "html": "html"}
MEDIA_TYPES: Final = {
    "jsonl": "application/x-ndjson",
    "md": "text/markdown; charset=utf-8",
    "html": "text/html; charset=utf-8",
}

MAX_NAME_CHARS: Final = 100
"""Characters of a title kept in a file name."""


# -- the transcript: records folded for reading ---------------------------------------------


@dataclass
class Entry:
    """One thing the transcript shows: a ``user`` message, an ``assistant`` reply, or a
    ``title`` change (``text`` is the new title)."""

    kind: str
    ts: int
    id: str | None = None
    text: str = ""
    by: str | None = None
    model: str | None = None
    parent: str | None = None
    edit_of: str | None = None
    regenerate_of: str | None = None
    reply_to: str | None = None
    ended: bool = False
    finish: str | None = None
    error: str | None = None
    current: bool = True
    """On the current path (root to the selected, else the newest, leaf)."""
    pieces: list[str] = field(default_factory=list, repr=False)


@dataclass
class Transcript:
    """A log folded for reading (:func:`transcript`)."""

    conversation_id: str = ""
    title: str = ""
    model: str = ""
    system: str | None = None
    created: int = 0
    owner: str | None = None
    entries: list[Entry] = field(default_factory=list)
    size: int = 0
    """Bytes of the log exported."""

    def message(self, message_id: str | None) -> Entry | None:
        if message_id is None:
            return None
        return next(
            (e for e in self.entries if e.id == message_id and e.kind != "title"),
            None,
        )


def transcript(recs: Iterable[Record], *, size: int = 0) -> Transcript:
    """Fold records (in log order) for reading. Unknown types, chunks and ends of unknown
    replies are skipped; a ``user`` with no ``parent`` field follows the message before it
    (DESIGN.md: a log written before a field existed). The current path ends at the leaf
    the latest ``select`` names, unless a message was written after it: then at the
    newest message (sending under a branch makes it current)."""
    out = Transcript(size=size)
    by_id: dict[str, Entry] = {}
    last_message: str | None = None
    selected: str | None = None
    for record in recs:
        kind = record.get("type")
        ts = record.get("ts", 0)
        if kind == "conversation":
            out.conversation_id = _str(record.get("id"))
            out.title = _str(record.get("title"))
            out.model = _str(record.get("model"))
            system = record.get("system")
            out.system = system if isinstance(system, str) and system else None
            owner = record.get("owner")
            out.owner = owner if isinstance(owner, str) else None
            out.created = ts
        elif kind == "title":
            out.title = _str(record.get("title"))
            out.entries.append(Entry("title", ts, text=out.title))
        elif kind == "user" and isinstance(record.get("id"), str):
            parent = record.get("parent", last_message)
            entry = Entry(
                "user",
                ts,
                id=record["id"],
                text=_str(record.get("text")),
                by=_opt(record.get("by")),
                parent=_opt(parent),
                edit_of=_opt(record.get("edit_of")),
            )
            out.entries.append(entry)
            by_id[entry.id] = entry  # type: ignore[index]
            last_message, selected = entry.id, None
        elif kind == "start" and isinstance(record.get("id"), str):
            entry = Entry(
                "assistant",
                ts,
                id=record["id"],
                model=_opt(record.get("model")),
                parent=_opt(record.get("reply_to")),
                reply_to=_opt(record.get("reply_to")),
                regenerate_of=_opt(record.get("regenerate_of")),
            )
            out.entries.append(entry)
            by_id[entry.id] = entry  # type: ignore[index]
            last_message, selected = entry.id, None
        elif kind == "chunk":
            entry = by_id.get(record.get("id"))  # type: ignore[arg-type]
            if entry is not None and entry.kind == "assistant" and not entry.ended:
                entry.pieces.append(_str(record.get("text")))
        elif kind == "end":
            entry = by_id.get(record.get("id"))  # type: ignore[arg-type]
            if entry is not None and entry.kind == "assistant" and not entry.ended:
                entry.ended = True
                entry.finish = _opt(record.get("finish"))
                entry.error = _opt(record.get("error"))
        elif kind == "select" and isinstance(record.get("leaf"), str):
            selected = record["leaf"]
    for entry in out.entries:
        if entry.pieces:
            entry.text, entry.pieces = "".join(entry.pieces), []
    leaf = selected if selected in by_id else last_message
    current: set[str] = set()
    while leaf is not None and leaf in by_id and leaf not in current:
        current.add(leaf)
        leaf = by_id[leaf].parent
    for entry in out.entries:
        if entry.kind != "title":
            entry.current = entry.id in current
    return out


def _str(value: Any) -> str:
    return value if isinstance(value, str) else ""


def _opt(value: Any) -> str | None:
    return value if isinstance(value, str) else None


# -- shared wording --------------------------------------------------------------------------


def _when(ts: int, tz: datetime.tzinfo | None) -> datetime.datetime:
    moment = datetime.datetime.fromtimestamp(ts / 1000, datetime.UTC)
    return moment.astimezone(tz) if tz is not None else moment.astimezone()


def _local(ts: int, tz: datetime.tzinfo | None) -> str:
    """``2024-05-01 14:03 UTC+02:00``: the local time, with its offset (unambiguous)."""
    moment = _when(ts, tz)
    offset = moment.strftime("%z")
    offset = f"UTC{offset[:3]}:{offset[3:]}" if offset else "UTC"
    return f"{moment:%Y-%m-%d %H:%M} {offset}"


def _snippet(text: str, limit: int = 60) -> str:
    line = " ".join(text.split())
    return line if len(line) <= limit else line[: limit - 1].rstrip() + "…"


def _who(entry: Entry, names: Mapping[str, str]) -> str:
    if entry.kind == "assistant":
        return "Assistant"
    return names.get(entry.by or "", "You") if entry.by else "You"


def _notes(entry: Entry, found: Transcript) -> list[str]:
    """Sentences about a message's branch (how a reply ended is :func:`_ending`)."""
    notes = []
    if entry.kind == "user" and entry.edit_of is not None:
        original = found.message(entry.edit_of)
        about = f": another version of “{_snippet(original.text)}”" if original else ""
        notes.append(f"Edited question{about}.")
    if entry.kind == "assistant" and entry.regenerate_of is not None:
        question = found.message(entry.reply_to)
        about = f" to “{_snippet(question.text)}”" if question and question.text else ""
        notes.append(f"Another answer{about} (regenerated).")
    if not entry.current:
        notes.append("Not on the current branch.")
    return notes


def _ending(entry: Entry) -> str | None:
    if not entry.ended:
        return "Unfinished: the reply was still being written when this was exported."
    if entry.finish == "length":
        return "Cut off: the reply reached its length limit."
    if entry.finish == "cancelled":
        return "Unfinished: stopped before it finished."
    if entry.finish == "interrupted":
        return "Unfinished: interrupted (the server stopped before the reply finished)."
    if entry.finish == "error":
        return f"Failed: {entry.error or 'the model gave an error'}."
    if not entry.text:
        return "The reply is empty."
    return None


def _branch_label(entry: Entry) -> str | None:
    if entry.kind == "user" and entry.edit_of is not None:
        return "edited question"
    if entry.kind == "assistant" and entry.regenerate_of is not None:
        return "another answer"
    return None


def _one_line(text: str) -> str:
    return " ".join(text.split())


# -- Markdown --------------------------------------------------------------------------------


def to_markdown(
    found: Transcript,
    *,
    names: Mapping[str, str] | None = None,
    tz: datetime.tzinfo | None = None,
) -> bytes:
    """The transcript as Markdown (UTF-8). Message texts are as written (model text is
    Markdown already); headings and notes are made of one line each."""
    names = names or {}
    title = _one_line(found.title) or found.conversation_id
    out = [f"# {title}", ""]
    facts = [f"Conversation `{found.conversation_id}`"]
    if found.model:
        facts.append(f"model {found.model}")
    if found.created:
        facts.append(f"started {_local(found.created, tz)}")
    facts.append(f"exported up to byte {found.size} of its log")
    out += [" · ".join(facts), ""]
    if found.system:
        out += ["**System prompt:**", ""]
        out += [f"> {line}" if line else ">" for line in found.system.splitlines()]
        out.append("")
    for entry in found.entries:
        if entry.kind == "title":
            out += ["---", "", f"*Renamed “{_one_line(entry.text)}” · {_local(entry.ts, tz)}*", ""]
            continue
        head = [_who(entry, names), _local(entry.ts, tz)]
        if entry.kind == "assistant" and entry.model:
            head.append(entry.model)
        label = _branch_label(entry)
        if label:
            head.append(label)
        out += ["---", "", f"### {' · '.join(head)}", ""]
        notes = _notes(entry, found)
        if notes:
            out += [f"*{' '.join(notes)}*", ""]
        if entry.text:
            out += [_fences_closed(entry.text.rstrip("\n")), ""]
        ending = _ending(entry) if entry.kind == "assistant" else None
        if ending:
            out += [f"*{ending}*", ""]
    return ("\n".join(out).rstrip("\n") + "\n").encode()


_FENCE = re.compile(r"^ {0,3}(`{3,}|~{3,})")


def _fences_closed(text: str) -> str:
    """``text`` with a code fence it leaves open closed, so that it cannot swallow the
    messages after it when the file is rendered."""
    opened: str | None = None
    for line in text.splitlines():
        match = _FENCE.match(line)
        if match is None:
            continue
        fence = match.group(1)
        if opened is None:
            opened = fence
        elif fence[0] == opened[0] and len(fence) >= len(opened) and not line.strip()[len(fence) :]:
            opened = None
    return text if opened is None else f"{text}\n{opened}"


# -- HTML ------------------------------------------------------------------------------------


@functools.cache
def _markdown() -> Any:
    """markdown-it-py's ``commonmark`` preset with tables, raw HTML as text, images as
    links; made on first use (an import that commands other than export never pay)."""
    from markdown_it import MarkdownIt

    markdown = MarkdownIt("commonmark", {"html": False}).enable("table")
    markdown.add_render_rule("image", _image_as_link)
    return markdown


def _image_as_link(self: Any, tokens: list[Any], idx: int, options: Any, env: Any) -> str:
    """An image is never fetched: it becomes a link to it, ``[image: alt]``."""
    token = tokens[idx]
    alt = self.renderInlineAsText(token.children or [], options, env)
    src = token.attrGet("src") or ""
    label = html.escape(f"[image: {alt}]" if alt else "[image]")
    return f'<a href="{html.escape(str(src), quote=True)}">{label}</a>'


ALLOWED_TAGS: Final = frozenset(
    {
        "p", "br", "hr", "h1", "h2", "h3", "h4", "h5", "h6", "blockquote", "ul", "ol",
        "li", "pre", "code", "em", "strong", "a", "table", "thead", "tbody", "tr", "th",
        "td",
    }
)  # fmt: skip
"""What markdown-it's ``commonmark`` preset with tables makes, images aside."""

ALLOWED_ATTRIBUTES: Final = {
    "a": {"href", "title"},
    "ol": {"start"},
    "th": {"style"},
    "td": {"style"},
}
URL_SCHEMES: Final = frozenset({"http", "https", "mailto"})


def render_markdown(text: str) -> str:
    """Model text as sanitized HTML: markdown-it-py (``commonmark`` + tables, raw HTML as
    text), then nh3 with :data:`ALLOWED_TAGS`, :data:`ALLOWED_ATTRIBUTES` (styles only
    ``text-align``, a table column's), :data:`URL_SCHEMES` and ``rel="noopener
    noreferrer"`` on links. No event handler, script, ``javascript:`` URL or resource
    survives."""
    return nh3.clean(
        _markdown().render(text),
        tags=set(ALLOWED_TAGS),
        clean_content_tags={"script", "style"},
        attributes={tag: set(names) for tag, names in ALLOWED_ATTRIBUTES.items()},
        url_schemes=set(URL_SCHEMES),
        link_rel="noopener noreferrer",
        filter_style_properties={"text-align"},
        strip_comments=True,
    )


CSS: Final = """
html{background:#fff;color:#1d1d1f}
body{margin:0;font:16px/1.55 system-ui,-apple-system,"Segoe UI",Roboto,"Noto Sans",sans-serif}
.page{max-width:46rem;margin:0 auto;padding:1.5rem 1rem 3rem}
h1{font-size:1.6rem;line-height:1.25;margin:0 0 .3rem}
.meta,.foot{color:#5f6368;font-size:.85rem}
.system{border-left:3px solid #c6c9ce;padding:.2rem .8rem;margin:1rem 0;color:#3c4043}
.system .text,.user .text{white-space:pre-wrap;overflow-wrap:anywhere}
article{border-top:1px solid #e3e5e8;padding:.9rem 0}
article>header{font-size:.85rem;color:#5f6368;margin-bottom:.35rem}
.who{font-weight:600;color:#1d1d1f}
.branch{display:inline-block;border:1px solid #b0b5bb;border-radius:.6rem;
padding:0 .45rem;margin-left:.3rem}
.note{font-style:italic;color:#5f6368;margin:.2rem 0 .5rem}
.user .text{background:#eef3fb;border-radius:.5rem;padding:.55rem .8rem}
.off{opacity:.8}
.renamed{font-style:italic;color:#5f6368}
.md>:first-child{margin-top:0}
.md>:last-child{margin-bottom:0}
.md pre{background:#f4f5f7;padding:.7rem .8rem;border-radius:.4rem;overflow-x:auto}
.md code{font:.9em/1.45 ui-monospace,SFMono-Regular,Menlo,Consolas,monospace}
.md :not(pre)>code{background:#f4f5f7;padding:.05rem .3rem;border-radius:.25rem}
.md table{border-collapse:collapse;display:block;overflow-x:auto}
.md th,.md td{border:1px solid #d0d4d9;padding:.25rem .55rem}
.md blockquote{border-left:3px solid #c6c9ce;margin:.5rem 0;padding:0 .8rem;color:#3c4043}
.md a{color:#1558b0}
@media (prefers-color-scheme:dark){
html{background:#17181a;color:#e6e6e6}
.who{color:#f2f2f2}
.meta,.foot,article>header,.note,.renamed{color:#a5a9ae}
article{border-top-color:#2c2e31}
.user .text{background:#1f2937}
.md pre,.md :not(pre)>code{background:#222428}
.md th,.md td{border-color:#3a3d41}
.system,.md blockquote{color:#c9ccd0;border-left-color:#4a4d52}
.md a{color:#8ab4f8}
}
@media print{.page{max-width:none}}
"""
"""The export's whole style: no ``url()``, no ``@import``, no font to fetch."""

CSP: Final = "default-src 'none'; style-src 'unsafe-inline'; base-uri 'none'; form-action 'none'"
"""The export's own Content-Security-Policy (a ``<meta>``): nothing may load or run."""


def to_html(
    found: Transcript,
    *,
    names: Mapping[str, str] | None = None,
    tz: datetime.tzinfo | None = None,
) -> bytes:
    """The transcript as one self-contained HTML document (UTF-8)."""
    names = names or {}
    esc = html.escape
    title = _one_line(found.title) or found.conversation_id
    facts = [f"Conversation {esc(found.conversation_id)}"]
    if found.model:
        facts.append(f"model {esc(found.model)}")
    if found.created:
        facts.append(f"started {_time(found.created, tz)}")
    out = [
        "<!DOCTYPE html>",
        '<html lang="en">',
        "<head>",
        '<meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f'<meta http-equiv="Content-Security-Policy" content="{CSP}">',
        '<meta name="referrer" content="no-referrer">',
        '<meta name="generator" content="chatledger">',
        f"<title>{esc(title)}</title>",
        f"<style>{CSS}</style>",
        "</head>",
        "<body>",
        '<div class="page">',
        "<header>",
        f"<h1>{esc(title)}</h1>",
        f'<p class="meta">{" · ".join(facts)}</p>',
        "</header>",
    ]
    if found.system:
        out.append(
            '<section class="system"><p><strong>System prompt</strong></p>'
            f'<div class="text">{esc(found.system)}</div></section>'
        )
    out.append("<main>")
    for entry in found.entries:
        if entry.kind == "title":
            out.append(
                f'<p class="renamed">Renamed “{esc(_one_line(entry.text))}” ·'
                f" {_time(entry.ts, tz)}</p>"
            )
            continue
        classes = [entry.kind] + ([] if entry.current else ["off"])
        head = [f'<span class="who">{esc(_who(entry, names))}</span>', _time(entry.ts, tz)]
        if entry.kind == "assistant" and entry.model:
            head.append(esc(entry.model))
        label = _branch_label(entry)
        if label:
            head.append(f'<span class="branch">{label}</span>')
        out.append(f'<article class="{" ".join(classes)}">')
        out.append(f"<header>{' · '.join(head)}</header>")
        ending = _ending(entry) if entry.kind == "assistant" else None
        notes = _notes(entry, found)
        if notes:
            out.append(f'<p class="note">{esc(" ".join(notes))}</p>')
        if entry.kind == "user":
            out.append(f'<div class="text">{esc(entry.text)}</div>')
        elif entry.text:
            out.append(f'<div class="md">{render_markdown(entry.text)}</div>')
        if ending:
            out.append(f'<p class="note">{esc(ending)}</p>')
        out.append("</article>")
    out += [
        "</main>",
        f'<p class="foot">Exported from chatledger: bytes [0, {found.size}) of the log of'
        f" conversation {esc(found.conversation_id)}.</p>",
        "</div>",
        "</body>",
        "</html>",
        "",
    ]
    return "\n".join(out).encode()


def _time(ts: int, tz: datetime.tzinfo | None) -> str:
    moment = _when(ts, datetime.UTC)
    stamp = moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"
    return f'<time datetime="{stamp}">{html.escape(_local(ts, tz))}</time>'


# -- the one entry point ---------------------------------------------------------------------


def render(
    data: bytes,
    fmt: str,
    *,
    names: Mapping[str, str] | None = None,
    tz: datetime.tzinfo | None = None,
) -> bytes:
    """The export of a log whose bytes (whole records, ``[0, offset)``) are ``data``.

    :param fmt: one of :data:`FORMATS`.
    :param names: account id to name, for who wrote each message (``"You"`` otherwise).
    :param tz: the zone of the times shown (default: the machine's local zone).
    :raises ValueError: an unknown format.
    :raises storage.records.RecordError: ``data`` holds a line that is no record.
    """
    if fmt == "jsonl":
        return bytes(data)
    if fmt not in FORMATS:
        raise ValueError(f"unknown export format {fmt!r}: one of {', '.join(FORMATS)}")
    found = transcript(decode_all(bytes(data)), size=len(data))
    if fmt == "md":
        return to_markdown(found, names=names, tz=tz)
    return to_html(found, names=names, tz=tz)


_UNSAFE_IN_NAMES = re.compile(r'[\\/:*?"<>|]+')


def file_name(title: str, conversation_id: str, fmt: str) -> str:
    """``<title or id>.<ext>``: the title without control characters or characters file
    systems refuse (``\\ / : * ? " < > |``), spaces collapsed, at most
    :data:`MAX_NAME_CHARS` characters; the id when nothing is left."""
    cleaned = "".join(
        " " if unicodedata.category(ch)[0] in "CZ" else ch
        for ch in unicodedata.normalize("NFC", title)
    )
    cleaned = _UNSAFE_IN_NAMES.sub("_", cleaned)
    cleaned = " ".join(cleaned.split())[:MAX_NAME_CHARS].strip(" .")
    return f"{cleaned or conversation_id}.{EXTENSIONS[fmt]}"
