"""The demo provider: deterministic text, paced by one shared timer."""

from __future__ import annotations

import asyncio

import uvloop

from chatledger.server.providers.demo import DemoProvider, Pacer


def test_pacer_wakes_in_due_order_on_uvloop_even_when_due_already_passed():
    async def main() -> list[str]:
        loop = asyncio.get_running_loop()
        pacer = Pacer()
        now = loop.time()
        woke: list[str] = []

        async def wait(name: str, due: float) -> None:
            await pacer.until(due)
            assert loop.time() >= due
            woke.append(name)

        cancelled = asyncio.ensure_future(wait("cancelled", now + 0.02))
        waits = [
            wait("c", now + 0.06),
            wait("a", now + 0.02),
            wait("past", now - 1),  # uvloop arms a plain Handle for a due in the past
            wait("b", now + 0.04),
        ]
        await asyncio.sleep(0)
        cancelled.cancel()
        await asyncio.gather(*waits)
        return woke

    assert uvloop.run(main()) == ["past", "a", "b", "c"]


async def test_replies_are_deterministic_and_paced():
    provider = DemoProvider(tokens_per_s=200, reply_tokens=20)
    prompt = [{"role": "user", "content": "hi"}]

    async def reply() -> tuple[str, dict | None]:
        text, usage = "", None
        async for delta in provider.stream(prompt):
            text += delta.text
            usage = delta.usage or usage
        return text, usage

    loop = asyncio.get_running_loop()
    began = loop.time()
    first, second = await asyncio.gather(reply(), reply())
    assert loop.time() - began >= 20 / 200  # paced: never faster than tokens_per_s
    assert first == second
    # usage: the prompt as the demo counts it (overhead 32 + "hi" 1 + message 8), as fitted
    assert first[1] == {"prompt_tokens": 41, "completion_tokens": 20, "total_tokens": 61}
