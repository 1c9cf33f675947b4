"""Server-owned reply tasks (DESIGN.md "Generation").

A reply runs as an asyncio task owned by :class:`Replies`, not by any HTTP connection: a
browser that leaves does not stop it. One reply runs per conversation at a time. The
task builds the prompt from the open log's fold, within the provider's context window
(:func:`server.context.fit`), appends ``start`` (with ``context``, where the prompt
began, and ``prompt_tokens``), streams from the provider and appends one ``chunk`` per
provider delta with text, each committed before any reader can see it, then one ``end``:

========================  ===========================================================
how the reply ended       ``end.finish``
========================  ===========================================================
provider finished         ``stop`` or ``length`` (its ``finish_reason``)
``POST .../stop``         ``cancelled``
server shutdown           ``interrupted``
provider failed           ``error`` with the provider's sentence in ``error``
no prompt fits            ``error``: "the message is too long for the model's context
                          window (N tokens)"
an append failed          the provider stream is closed at its next delta; ``end`` with
                          ``error`` is appended only if the log can still be written
========================  ===========================================================
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any, Literal

from ..storage import ConversationLog, LogClosedError, LogError, new_id, records
from ..storage.fold import Folded
from . import context
from .providers import Delta, Provider, ProviderError
from .text import has_visible

__all__ = ["NoReplyError", "ReplyRunningError", "Replies", "Started", "UnknownMessageError"]

logger = logging.getLogger(__name__)

MAX_BACKLOG = 256
"""Queued, uncommitted chunks after which a reply waits for the log to catch up."""


class ReplyRunningError(Exception):
    """A reply is already running in this conversation."""


class NoReplyError(Exception):
    """No reply is running in this conversation."""


class UnknownMessageError(ValueError):
    """A message id a request named is no message of the kind it must be in this
    conversation (``field``: the request's field that named it)."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field


@dataclass(frozen=True)
class Started:
    """What ``POST .../messages`` and ``.../regenerate`` answer: the id of the message
    answered, the reply's id, and ``offset``, the record boundary before the first record
    of the exchange (the ``user`` record; a regenerated reply's ``start``)."""

    message_id: str
    reply_id: str
    offset: int


@dataclass
class _Reply:
    reply_id: str
    by: str | None = None  # the account whose message it answers
    task: asyncio.Task[None] | None = None
    regenerate_of: str | None = None  # the reply this one is another answer to
    finish_on_cancel: str = "interrupted"
    begun: bool = False  # the task has started running
    stop_requested: bool = False
    created: asyncio.Event = field(default_factory=asyncio.Event)  # task made, or send failed
    # What its end record will say, so far:
    finish: str = "stop"
    usage: dict[str, Any] | None = None
    error: str | None = None

    def request_stop(self, finish: str) -> None:
        """End the reply with ``finish``. A task that has not begun is not cancelled (its
        coroutine would never run its cleanup): it sees the request when it begins."""
        self.finish_on_cancel = finish
        self.stop_requested = True
        if self.task is not None and self.begun:
            self.task.cancel()


class Replies:
    """The running replies of one server.

    :param provider: where reply text comes from.
    :param on_end: see :attr:`on_end`.
    """

    def __init__(
        self,
        provider: Provider,
        *,
        on_end: Callable[[str, dict[str, Any] | None], None] | None = None,
    ) -> None:
        self.provider = provider
        self.on_end = on_end
        """``on_end(by, usage)`` after the ``end`` of a reply to a message of account
        ``by`` committed (the daily budgets count its tokens)."""
        self._counted = context.TokenCounts()  # the turns' tokens, by (conversation, offset)
        self._running: dict[str, _Reply] = {}
        self._selecting: dict[str, asyncio.Future[int]] = {}  # a select's commit, by id
        self._closing = False

    def running(self, conversation_id: str) -> str | None:
        """The id of the reply running in a conversation, or ``None``."""
        reply = self._running.get(conversation_id)
        return reply.reply_id if reply else None

    async def send(
        self,
        conversation_id: str,
        log: ConversationLog,
        text: str,
        *,
        by: str | None = None,
        parent: str | Literal["current"] | None = "current",
        edit_of: str | None = None,
    ) -> Started:
        """Append a ``user`` record (``by``: the sender's account id) and start the reply
        to it. The message follows ``parent`` (a reply's id; ``None``: it is a first
        message; ``"current"``: the end of the current path), or, as an edit and resend of
        the user message ``edit_of``, what that one follows (DESIGN.md "Branches, not
        overwrites"). The first message of an untitled conversation also appends a
        ``title`` record (:func:`title_from`) in the same commit. Returns once they are
        committed; the reply's ``start`` follows.

        :raises ReplyRunningError: a reply is running (nothing was appended).
        :raises UnknownMessageError: ``parent`` is no reply, or ``edit_of`` no user message,
            of this conversation, or they disagree (nothing was appended).
        :raises storage.LogError: the log cannot take the message (nothing was started),
            or the server is shutting down.
        """
        reply = self._claim(conversation_id, log, by)
        try:
            view = await self._settled(conversation_id, log)  # the only writer now
            follows = _parent(view, parent, edit_of)
            message = records.user(
                message_id=new_id(), text=text, parent=follows, edit_of=edit_of, by=by
            )
            # the summary is the log's too; the title, if any, shares the message's commit
            first = not log.summary.title and log.summary.user_messages == 0
            committed = log.append_nowait(message)
            if first:
                await log.append_nowait(records.title(title=title_from(text)))
            after = await committed
        except BaseException:
            self._release(conversation_id, log, reply)
            raise
        self._start(conversation_id, log, reply, message["id"])
        return Started(
            message_id=message["id"],
            reply_id=reply.reply_id,
            offset=after - len(records.encode(message)),
        )

    async def regenerate(
        self, conversation_id: str, log: ConversationLog, reply_id: str, *, by: str | None = None
    ) -> Started:
        """Start another answer to the message that the reply ``reply_id`` answers: a new
        ``start`` with ``regenerate_of`` (and ``by``, whose budget it counts against),
        its prompt built from the path up to that message. Returns at once: ``offset`` is
        the committed offset, before the new ``start``.

        :raises ReplyRunningError: a reply is running (nothing was appended).
        :raises UnknownMessageError: ``reply_id`` is no reply of this conversation.
        :raises storage.LogError: the log takes no appends, or the server is shutting down.
        """
        reply = self._claim(conversation_id, log, by)
        try:
            view = await self._settled(conversation_id, log)
            node = view.node(reply_id)
            if node is None or node[0] != "assistant" or node[1] is None:
                raise UnknownMessageError("reply_id", "'reply_id' is no reply of this conversation")
            offset = log.committed
        except BaseException:
            self._release(conversation_id, log, reply)
            raise
        reply.regenerate_of = reply_id
        self._start(conversation_id, log, reply, node[1])
        return Started(message_id=node[1], reply_id=reply.reply_id, offset=offset)

    async def select(
        self, conversation_id: str, log: ConversationLog, leaf: str
    ) -> tuple[str, int]:
        """Append a ``select`` record: the current path goes through the message ``leaf``
        (to the newest message under it). Refused while a reply runs, whose branch the
        person is reading.

        :returns: the current leaf's id and the committed offset after the record.
        :raises ReplyRunningError: a reply is running (nothing was appended).
        :raises UnknownMessageError: ``leaf`` is no message of this conversation.
        :raises storage.LogError: the log takes no appends.
        """
        if conversation_id in self._running:
            raise ReplyRunningError(conversation_id)
        view = await log.view()
        if view.node(leaf) is None:
            raise UnknownMessageError("leaf", "'leaf' is no message of this conversation")
        if conversation_id in self._running:  # a send began meanwhile
            raise ReplyRunningError(conversation_id)
        committed = log.append_nowait(records.select(leaf=leaf))
        # a send that comes while it commits follows the branch it chose (see _settled)
        self._selecting[conversation_id] = committed
        try:
            after = await committed
        finally:
            if self._selecting.get(conversation_id) is committed:
                del self._selecting[conversation_id]
        return view.current or leaf, after

    async def _settled(self, conversation_id: str, log: ConversationLog) -> Folded:
        """The open log's fold once a ``select`` still committing has (its outcome
        aside): what a new message's ``parent`` and a prompt are read from."""
        pending = self._selecting.get(conversation_id)
        if pending is not None:
            with contextlib.suppress(Exception):
                await asyncio.shield(pending)
        return await log.view()

    def _claim(self, conversation_id: str, log: ConversationLog, by: str | None) -> _Reply:
        """Take the conversation's one reply slot (before any await) and pin its log.

        :raises ReplyRunningError: the slot is taken.
        :raises storage.LogError: shutting down, or the log takes no appends.
        """
        if self._closing:
            raise LogClosedError("the server is shutting down")
        if conversation_id in self._running:
            raise ReplyRunningError(conversation_id)
        log.check_writable()
        reply = _Reply(reply_id=new_id(), by=by)
        self._running[conversation_id] = reply
        log.pin()  # open until the reply ends (the store closes only idle logs)
        return reply

    def _release(self, conversation_id: str, log: ConversationLog, reply: _Reply) -> None:
        """Give the slot back: the reply was never started."""
        del self._running[conversation_id]
        log.unpin()
        reply.created.set()

    def _start(
        self, conversation_id: str, log: ConversationLog, reply: _Reply, message_id: str
    ) -> None:
        reply.task = asyncio.create_task(
            self._run(conversation_id, log, reply, message_id),
            name=f"reply {conversation_id}/{reply.reply_id}",
        )
        if self._closing:  # shutdown began while the message was being appended
            reply.request_stop("interrupted")
        reply.created.set()

    async def stop(self, conversation_id: str) -> str:
        """Stop the running reply and wait until its ``end`` (``cancelled``) is appended.

        :returns: the reply id.
        :raises NoReplyError: no reply is running.
        """
        reply = self._running.get(conversation_id)
        if reply is not None:
            await reply.created.wait()
        if reply is None or reply.task is None:
            raise NoReplyError(conversation_id)
        reply.request_stop("cancelled")
        await asyncio.wait({reply.task})
        return reply.reply_id

    async def shutdown(self) -> None:
        """End every running reply with ``finish: "interrupted"`` and wait for them,
        including replies whose message is still being appended."""
        self._closing = True
        while self._running:
            replies = list(self._running.values())
            for reply in replies:
                await reply.created.wait()
            tasks = [reply.task for reply in replies if reply.task is not None]
            for reply in replies:
                reply.request_stop("interrupted")
            if tasks:
                await asyncio.wait(tasks)

    async def _run(
        self, conversation_id: str, log: ConversationLog, reply: _Reply, message_id: str
    ) -> None:
        """The reply task: begin, build the prompt, stream the chunks, and always finish,
        with the ``finish`` (and ``error``) of how it went (see the module's table)."""
        reply.begun = True
        model = log.summary.model or self.provider.model
        try:
            fitted = await self._begin(conversation_id, log, reply, message_id, model)
            stream = self.provider.stream(
                fitted.messages, model=model, max_tokens=fitted.max_tokens
            )
            await self._stream_chunks(log, reply, stream)
        except asyncio.CancelledError:
            reply.finish = reply.finish_on_cancel
            _uncancel()
        except ProviderError as exc:
            reply.finish, reply.error = "error", str(exc)
            logger.warning("reply %s in %s failed: %s", reply.reply_id, conversation_id, exc)
        except LogError as exc:
            reply.finish, reply.error = "error", str(exc)
            logger.error("reply %s in %s stopped: %s", reply.reply_id, conversation_id, exc)
        except Exception as exc:
            reply.finish, reply.error = "error", "internal error while generating the reply"
            logger.exception("reply %s in %s crashed: %s", reply.reply_id, conversation_id, exc)
        try:
            await self._finish(conversation_id, log, reply)
        finally:
            self._running.pop(conversation_id, None)
            log.unpin()

    async def _begin(
        self, conversation_id: str, log: ConversationLog, reply: _Reply, message_id: str, model: str
    ) -> context.Fitted:
        """Build the prompt, then queue the ``start`` record that says where it began and
        its tokens; not awaited: it commits before any chunk. A reply whose prompt was not
        built (stopped before or meanwhile, no prompt fits, tokens not countable) gets its
        ``start`` all the same, with ``context`` and ``prompt_tokens`` null, so that its
        ``end`` follows a ``start`` as every reply's does.

        :raises asyncio.CancelledError: the reply was stopped before its prompt was built.
        :raises ProviderError: no prompt fits the window, or counting failed.
        :raises storage.LogError: the log takes no appends.
        """
        try:
            if reply.stop_requested:
                raise asyncio.CancelledError
            fitted = await self._prompt(conversation_id, log, message_id)
        except BaseException:
            with contextlib.suppress(LogError):  # then the end cannot be appended either
                log.append_nowait(_start_record(reply, message_id, model))
            raise
        log.append_nowait(
            _start_record(
                reply, message_id, model, context=fitted.context, prompt_tokens=fitted.prompt_tokens
            )
        )
        return fitted

    async def _prompt(
        self, conversation_id: str, log: ConversationLog, message_id: str
    ) -> context.Fitted:
        """The prompt of the reply to ``message_id``: the system text and the newest turns
        of the path up to that message in the open log's fold (``log.view()``, kept up to
        date as records commit; the message being answered is committed) that fit the
        provider's window with its reply budget. Never re-reads the log once its view is
        built, and counts only turns not counted for an earlier prompt.

        :raises ProviderError: no prompt fits, or the provider could not count tokens.
        :raises storage.LogClosedError: the log closed before its view was built.
        """
        view = await log.view()
        provider = self.provider
        return await context.fit(
            log.summary.system,
            view.turns_newest_first(message_id),
            window=provider.context_tokens,
            reply_budget=provider.max_reply_tokens,
            overhead=provider.prompt_overhead_tokens,
            count=provider.count_tokens,
            counted=self._counted,
            conversation=conversation_id,
        )

    async def _stream_chunks(
        self, log: ConversationLog, reply: _Reply, stream: AsyncIterator[Delta]
    ) -> None:
        """Append one ``chunk`` per provider delta with text, pipelined: each is queued
        and commits in order (no reader sees it before), and the stream waits for the log
        only when :data:`MAX_BACKLOG` chunks are queued, and for the last one at the end.
        A failed log refuses the next chunk at once, which stops the provider stream.
        Records the provider's ``finish_reason`` and ``usage`` on ``reply``; always closes
        ``stream``.

        :raises ProviderError: the provider failed.
        :raises storage.LogError: an append failed.
        """
        index = 0
        last: asyncio.Future[int] | None = None
        try:
            async for delta in stream:
                if delta.text:
                    last = log.append_nowait(
                        records.chunk(reply_id=reply.reply_id, i=index, text=delta.text)
                    )
                    index += 1
                    if log.backlog >= MAX_BACKLOG:
                        await last
                if delta.finish_reason is not None:
                    reply.finish = "length" if delta.finish_reason == "length" else "stop"
                if delta.usage is not None:
                    reply.usage = delta.usage
            if last is not None:
                await last
        finally:
            with contextlib.suppress(Exception):
                await stream.aclose()  # type: ignore[attr-defined]

    async def _finish(self, conversation_id: str, log: ConversationLog, reply: _Reply) -> None:
        """Append the ``end`` record and wait until it is committed. Always appended: a
        ``start`` queued before a cancellation still commits, first. A stop while the end
        commits does not interrupt the wait (the end commits anyway); a log that cannot
        take it is logged, not raised."""
        try:
            done = log.append_nowait(
                records.end(
                    reply_id=reply.reply_id,
                    finish=reply.finish,
                    usage=reply.usage,
                    error=reply.error,
                )
            )
            while not done.done():
                try:
                    await asyncio.shield(done)
                except asyncio.CancelledError:
                    _uncancel()  # a second stop while the end commits: it ends anyway
            done.result()
            if self.on_end is not None and reply.by is not None:
                self.on_end(reply.by, reply.usage)
        except LogError as exc:
            logger.error(
                "reply %s in %s: could not append its end: %s", reply.reply_id, conversation_id, exc
            )


def _parent(view: Folded, parent: str | None, edit_of: str | None) -> str | None:
    """What a new user message follows (see :meth:`Replies.send`).

    :raises UnknownMessageError: as :meth:`Replies.send` says.
    """
    if edit_of is not None:
        node = view.node(edit_of)
        if node is None or node[0] != "user":
            raise UnknownMessageError("edit_of", "'edit_of' is no message of this conversation")
        if parent != "current" and parent != node[1]:
            raise UnknownMessageError("parent", "'parent' must be what 'edit_of' follows")
        return node[1]
    if parent == "current":
        return view.current
    if parent is not None:
        node = view.node(parent)
        if node is None or node[0] != "assistant":
            raise UnknownMessageError("parent", "'parent' is no reply of this conversation")
    return parent


def _start_record(reply: _Reply, message_id: str, model: str, **prompt: Any) -> records.Record:
    record = records.start(
        reply_id=reply.reply_id,
        reply_to=message_id,
        model=model,
        regenerate_of=reply.regenerate_of,
        **prompt,
    )
    if reply.regenerate_of is not None and reply.by is not None:
        record["by"] = reply.by  # counted against the budget of whoever asked for it
    return record


def _uncancel() -> None:
    # The cancellation was ours (stop or shutdown) and is handled: the task ends normally.
    task = asyncio.current_task()
    if task is not None:
        task.uncancel()


def title_from(text: str, limit: int = 60) -> str:
    """A conversation title from its first message: its first line with a visible
    character (:func:`server.text.has_visible`), whitespace collapsed, cut at a word
    boundary to at most ``limit`` characters (with "…")."""
    shown = [line for line in text.splitlines() if has_visible(line)]
    line = " ".join(shown[0].split()) if shown else ""
    if len(line) <= limit:
        return line
    cut = line[: limit - 1].rsplit(" ", 1)[0] or line[: limit - 1]
    return cut + "…"
