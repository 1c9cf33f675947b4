"""Fitting a prompt into the model's context window (DESIGN.md "Context window"). Pure:
no I/O of its own; tokens are counted by the function it is given.

Shapes and units:

* ``system``: the conversation's system text, or ``None``. Always kept.
* ``turns``: the conversation's turns, **newest first**, each ``(offset, role, text)``:
  ``offset`` is the byte offset in the log of the record that began the message (a
  record boundary), ``role`` is ``"user"`` or ``"assistant"``; only turns a prompt uses
  (``storage.fold.Folded.turns_newest_first``: user texts, and the texts of finished,
  non-error, non-empty replies). Read lazily: fit stops at the first turn that no
  longer fits, so its cost follows the window, not the conversation's length.
* ``window``: the model's context window, prompt and reply together, in tokens.
* ``reply_budget``: the tokens a reply may take (``--max-reply-tokens``).
* ``overhead``: tokens every prompt takes besides its messages (BOS, the header the
  reply follows).
* ``count(role, text)``: tokens one message takes in a prompt, its chat-template
  overhead included (``Provider.count_tokens``); awaited.
* ``counted``: a :class:`TokenCounts` of the conversation's turns, by offset, that fit
  reads and fills, so the next prompt of the same conversation counts only its new
  turns (a turn at an offset of an append-only log never changes: a user text, or a
  reply's text once it has ended).

The prompt is the system text, then the newest turns that fit with the whole reply
budget, oldest first: ``overhead + system + turns + reply_budget <= window``. The first
turn that does not fit, and every older one, is dropped (a prompt is always a suffix of
the conversation), and so is an assistant turn left oldest, so the turns begin with a
person's message (chat templates such as Gemma's and Mistral's refuse any other start).
The newest turn, the message the reply answers, is always used: when it does not fit
with the whole budget, the reply gets what is left, down to :data:`MIN_REPLY_TOKENS`;
below that :class:`PromptTooLongError`.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Awaitable, Callable, Hashable, Iterable
from dataclasses import dataclass
from typing import Final

from ..storage.fold import Turn
from .providers.base import ProviderError

__all__ = [
    "MIN_REPLY_TOKENS",
    "Counter",
    "Fitted",
    "PromptTooLongError",
    "TokenCounts",
    "Turn",
    "fit",
]

MIN_REPLY_TOKENS: Final = 16
"""The shortest reply budget (tokens) ``fit`` shrinks to before it gives up: a reply
of fewer tokens is no answer."""

Counter = Callable[[str, str], Awaitable[int]]
"""``await count(role, text)``: tokens that message takes in a prompt."""


class TokenCounts:
    """Token counts of turns already counted, least recently used dropped first: at most
    ``limit`` entries (an entry is a key and an int, about 150 bytes: the default holds
    some 10 MB, the windows of dozens of long conversations).

    Keys are ``(conversation, offset)``: whatever names the conversation, and the turn's
    offset in its log (:data:`Turn`); one instance per provider (counts are its own).
    """

    def __init__(self, limit: int = 65_536) -> None:
        self.limit = limit
        self._counts: OrderedDict[tuple[Hashable, int], int] = OrderedDict()

    def __len__(self) -> int:
        return len(self._counts)

    def get(self, key: tuple[Hashable, int]) -> int | None:
        """The count stored under ``key``, or ``None``."""
        count = self._counts.get(key)
        if count is not None:
            self._counts.move_to_end(key)
        return count

    def put(self, key: tuple[Hashable, int], count: int) -> None:
        """Store ``count`` under ``key``, dropping the least recently used beyond ``limit``."""
        self._counts[key] = count
        self._counts.move_to_end(key)
        while len(self._counts) > self.limit:
            self._counts.popitem(last=False)


class PromptTooLongError(ProviderError):
    """The system text and the newest message leave no room for a reply in the window.
    ``str()`` says so, with the window's size, for the ``end`` record's ``error``."""


@dataclass(frozen=True, slots=True)
class Fitted:
    """A prompt that fits.

    :ivar messages: Chat Completions ``messages``: the system text (if any), then the
        turns used, oldest first.
    :ivar context: offset of the oldest turn used (the first record whose text the
        prompt used, past the system text, which is always used); ``None`` when there
        was no turn.
    :ivar prompt_tokens: tokens the prompt takes, as counted (overhead included).
    :ivar max_tokens: the reply's budget: ``reply_budget``, or what the window leaves.
    :ivar dropped: whether older turns were left out.
    """

    messages: list[dict[str, str]]
    context: int | None
    prompt_tokens: int
    max_tokens: int
    dropped: bool


async def fit(
    system: str | None,
    turns: Iterable[Turn],
    *,
    window: int,
    reply_budget: int,
    overhead: int,
    count: Counter,
    counted: TokenCounts | None = None,
    conversation: Hashable = None,
) -> Fitted:
    """The prompt for the next reply (see the module's docstring). With ``counted``,
    turns are looked up there under ``(conversation, offset)`` before ``count`` is
    awaited, and what was counted is stored.

    :raises PromptTooLongError: the system text with the newest turn leaves fewer than
        ``min(MIN_REPLY_TOKENS, reply_budget)`` tokens of the window.
    :raises ProviderError: ``count`` failed.
    """
    least = max(1, min(MIN_REPLY_TOKENS, reply_budget))
    used = overhead
    if system:
        used += await count("system", system)
        if used + least > window:
            raise PromptTooLongError(
                f"the system text is too long for the model's context window ({window} tokens)"
            )
    kept: list[tuple[Turn, int]] = []
    dropped = False
    for turn in turns:
        cost = counted.get((conversation, turn[0])) if counted is not None else None
        if cost is None:
            cost = await count(turn[1], turn[2])
            if counted is not None:
                counted.put((conversation, turn[0]), cost)
        if not kept:
            if used + cost + least > window:
                raise PromptTooLongError(
                    f"the message is too long for the model's context window ({window} tokens)"
                )
        elif used + cost + reply_budget > window:
            dropped = True
            break
        kept.append((turn, cost))
        used += cost
    while len(kept) > 1 and kept[-1][0][1] != "user":
        used -= kept.pop()[1]
        dropped = True
    messages = [{"role": "system", "content": system}] if system else []
    messages.extend({"role": role, "content": text} for (_, role, text), _ in reversed(kept))
    return Fitted(
        messages=messages,
        context=kept[-1][0][0] if kept else None,
        prompt_tokens=used,
        max_tokens=min(reply_budget, window - used),
        dropped=dropped,
    )
