"""Stateful property test of the log (hypothesis): random sequences of appends (alone and
in concurrent batches), reopen, a crash that leaves a torn or NUL-filled write at the end,
reads from a random record boundary, and follows. Invariants: the committed prefix never
changes, a read from any boundary is the suffix of a full read, and recovery is
idempotent."""

from __future__ import annotations

import asyncio
import shutil
import tempfile
from pathlib import Path

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from chatledger.storage import ConversationLog, Durability, GroupCommit, records

TEXT = st.text(
    alphabet=st.characters(codec="utf-8", exclude_categories=("Cs",)), min_size=0, max_size=40
)


class LogMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.loop = asyncio.new_event_loop()
        self.directory = Path(tempfile.mkdtemp(prefix="chatledger-prop-"))
        self.path = self.directory / "c.jsonl"
        first = records.conversation(conversation_id="c", title="t", model="m", system=None)
        self.commit = GroupCommit(durability=Durability.FLUSH)
        self.log = self.run(ConversationLog.create(self.path, first, commit=self.commit))
        self.expected = records.encode(first)
        self.boundaries = [0, len(self.expected)]
        self.index = 0

    def run(self, coroutine):
        return self.loop.run_until_complete(coroutine)

    def record(self, text: str) -> records.Record:
        self.index += 1
        return records.chunk(reply_id="r", i=self.index, text=text)

    def expect(self, record: records.Record, offset: int) -> None:
        self.expected += records.encode(record)
        assert offset == len(self.expected)
        self.boundaries.append(offset)

    @rule(text=TEXT)
    def append(self, text: str) -> None:
        record = self.record(text)
        self.expect(record, self.run(self.log.append(record)))

    @rule(texts=st.lists(TEXT, min_size=2, max_size=6))
    def append_batch(self, texts: list[str]) -> None:
        batch = [self.record(text) for text in texts]

        async def together() -> list[int]:
            return await asyncio.gather(*(self.log.append(r) for r in batch))

        offsets = self.run(together())
        for record, offset in zip(batch, offsets, strict=True):
            self.expect(record, offset)

    @rule()
    def reopen(self) -> None:
        self.run(self.log.close())
        self.log = self.run(ConversationLog.open(self.path, commit=self.commit))

    @rule(text=TEXT, cut=st.floats(min_value=0.0, max_value=1.0), hole=st.booleans())
    def crash_mid_write(self, text: str, cut: float, hole: bool) -> None:
        """The process dies while writing a record: part of it (or a hole) is on disk."""
        self.run(self.log.close())
        line = records.encode(self.record(text))
        size = int(len(line) * cut) if cut < 1.0 else len(line) - 1
        with open(self.path, "ab") as stream:
            stream.write(b"\0" * size if hole else line[:size])
        self.log = self.run(ConversationLog.open(self.path, commit=self.commit))

    @rule(data=st.data())
    def read_from_a_boundary(self, data: st.DataObject) -> None:
        start = data.draw(st.sampled_from(self.boundaries))
        self.run(self.log.check_offset(start))
        assert self.run(self.read_all(start)) == self.expected[start:]

    async def read_all(self, start: int) -> bytes:
        out = bytearray()
        position = start
        while position < self.log.committed:
            block = await self.log.read_records(position)
            out += block
            position += len(block)
        return bytes(out)

    @precondition(lambda self: len(self.boundaries) > 2)
    @rule(data=st.data(), texts=st.lists(TEXT, min_size=1, max_size=4))
    def follow_from_a_boundary(self, data: st.DataObject, texts: list[str]) -> None:
        start = data.draw(st.sampled_from(self.boundaries))

        batch = [self.record(text) for text in texts]
        target = len(self.expected) + sum(len(records.encode(r)) for r in batch)

        async def follow_while_appending() -> bytes:
            seen = bytearray()

            async def follow() -> None:
                async for _, block in self.log.follow(start):
                    seen.extend(block)
                    if start + len(seen) >= target:
                        return

            follower = asyncio.create_task(follow())
            for record in batch:
                self.expect(record, await self.log.append(record))
                await asyncio.sleep(0)
            await asyncio.wait_for(follower, 10)
            return bytes(seen)

        assert self.run(follow_while_appending()) == self.expected[start:]

    @invariant()
    def committed_prefix_never_changes(self) -> None:
        assert self.log.committed == len(self.expected)
        assert self.path.read_bytes() == self.expected

    def teardown(self) -> None:
        self.run(self.log.close())
        self.run(self.commit.close())
        self.loop.close()
        shutil.rmtree(self.directory, ignore_errors=True)


LogMachine.TestCase.settings = settings(
    max_examples=40,
    stateful_step_count=25,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
TestLogProperties = LogMachine.TestCase
