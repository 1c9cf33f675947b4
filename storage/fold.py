"""Folds of the record stream (pure, no I/O).

Two views are folded from a log's records, in order:

* :class:`Summary`: what the store keeps in memory per log (title, times, the reply that
  is still open), updated one record at a time as records are appended or scanned.
* :func:`messages`: the conversation as the page shows it and as prompts are built from
  it. ``static/fold.js`` is the same fold in the browser; the two must agree, and
  ``tests/fold_fixtures.json`` (run through both by ``tests/test_fold.py``) checks they do.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from .records import Record

__all__ = ["Message", "Summary", "messages", "prompt"]

Message = dict[str, Any]
"""``{"id", "role": "user"|"assistant", "text", "finish"}``; assistant messages also carry
``reply_to``, ``model``, ``usage`` and ``error`` (null until their ``end``)."""


@dataclass
class Summary:
    """Running metadata of one log.

    ``created``/``updated`` are ms timestamps of the first and last record;
    ``open_replies`` maps each reply id that has a ``start`` and no ``end`` to the index
    its next ``chunk`` must carry.
    """

    conversation_id: str | None = None
    title: str = ""
    model: str = ""
    system: str | None = None
    created: int = 0
    updated: int = 0
    records: int = 0
    user_messages: int = 0
    open_replies: dict[str, int] = field(default_factory=dict)

    def observe(self, record: Record) -> None:
        """Advance the summary past one record. Unknown types only move ``updated``."""
        kind = record["type"]
        self.records += 1
        self.updated = record["ts"]
        if kind == "conversation":
            self.conversation_id = record.get("id")
            self.title = record.get("title") or ""
            self.model = record.get("model") or ""
            self.system = record.get("system")
            self.created = record["ts"]
        elif kind == "title":
            self.title = record.get("title") or ""
        elif kind == "user":
            self.user_messages += 1
        elif kind == "start":
            self.open_replies[record["id"]] = 0
        elif kind == "chunk":
            reply_id = record.get("id")
            if reply_id in self.open_replies:
                self.open_replies[reply_id] = record.get("i", 0) + 1
        elif kind == "end":
            self.open_replies.pop(record.get("id"), None)


def messages(records: Iterable[Record]) -> list[Message]:
    """Fold records into the ordered list of messages.

    ``user`` adds a user message; ``start`` adds an empty assistant message; ``chunk``
    appends its text to the reply with the same id; ``end`` sets ``finish``, ``usage`` and
    ``error``. Records of unknown type, and chunks or ends of unknown replies, are skipped.
    """
    out: list[Message] = []
    replies: dict[str, Message] = {}
    for record in records:
        kind = record["type"]
        if kind == "user":
            out.append({"id": record["id"], "role": "user", "text": record["text"], "finish": None})
        elif kind == "start":
            reply: Message = {
                "id": record["id"],
                "role": "assistant",
                "text": "",
                "finish": None,
                "reply_to": record.get("reply_to"),
                "model": record.get("model"),
                "usage": None,
                "error": None,
            }
            replies[record["id"]] = reply
            out.append(reply)
        elif kind == "chunk":
            reply = replies.get(record.get("id"))
            if reply is not None:
                reply["text"] += record.get("text", "")
        elif kind == "end":
            reply = replies.get(record.get("id"))
            if reply is not None:
                reply["finish"] = record.get("finish")
                reply["usage"] = record.get("usage")
                reply["error"] = record.get("error")
    return out


def prompt(system: str | None, folded: Iterable[Message]) -> list[dict[str, str]]:
    """Chat Completions ``messages`` for the next reply.

    The ``system`` text (if any), then user texts and the texts of *finished* assistant
    replies (those with an ``end``; an empty or failed reply is left out), in log order.
    """
    out: list[dict[str, str]] = []
    if system:
        out.append({"role": "system", "content": system})
    for message in folded:
        if message["role"] == "user":
            out.append({"role": "user", "content": message["text"]})
        elif message["finish"] is not None and message["finish"] != "error" and message["text"]:
            out.append({"role": "assistant", "content": message["text"]})
    return out
