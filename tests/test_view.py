"""An open conversation keeps its fold up to date (issue "Conversations that never break
and never slow down", part 2): the incremental fold agrees with the fold at once, is built
off the event loop, and once built, pages and prompts read no log bytes."""

from __future__ import annotations

import asyncio

from hypothesis import given, settings
from hypothesis import strategies as st

from chatledger.storage import ConversationLog, Durability, FileIO, records
from chatledger.storage.fold import Folded, messages

from .conftest import create_conversation, wait_idle


class CountingIO(FileIO):
    """The system-call seam, counting the log bytes read."""

    def __init__(self) -> None:
        self.read_calls = 0

    def pread(self, fd: int, size: int, offset: int) -> bytes:
        self.read_calls += 1
        return super().pread(fd, size, offset)


def conversation_records(n: int) -> list[records.Record]:
    out = [records.conversation(conversation_id="c", title="t", model="m", system="sys")]
    for k in range(n):
        out.append(records.user(message_id=f"u{k}", text=f"question {k}"))
        out.append(records.start(reply_id=f"r{k}", reply_to=f"u{k}", model="m"))
        out.extend(records.chunk(reply_id=f"r{k}", i=i, text=f"<{k}.{i}>") for i in range(3))
        out.append(records.end(reply_id=f"r{k}", finish="stop" if k % 5 else "error"))
    return out


@settings(max_examples=60, deadline=None)
@given(st.integers(0, 12), st.lists(st.integers(0, 80), max_size=8), st.integers(1, 9))
def test_the_incremental_fold_is_the_fold_at_once(n, reads, limit):
    """Folding one record at a time, with pages read in between (which join a reply's
    pieces early), ends exactly where folding everything at once does."""
    stream = conversation_records(n)
    folded = Folded()
    for k, record in enumerate(stream):
        folded.observe(record, k)
        if k in reads:
            folded.page(limit)
            list(folded.turns_newest_first())
    assert folded.path() == messages(stream)
    pages: list[dict] = []
    before = None
    while True:
        page, more = folded.page(limit, before)
        pages[:0] = page
        if not more:
            break
        before = page[0]["id"]
    assert pages == messages(stream)


def test_turns_newest_first_are_what_a_prompt_uses():
    folded = Folded()
    offset = 0
    for record in conversation_records(7):  # reply 6 ends "stop", replies 0 and 5 "error"
        folded.observe(record, offset)
        offset += len(records.encode(record))
    turns = list(folded.turns_newest_first())
    assert [role for _, role, _ in turns][:2] == ["assistant", "user"]
    assert all(text for _, _, text in turns)
    assert "<0.0><0.1><0.2>" not in {text for _, _, text in turns}  # reply 0 ended in error
    offsets = [offset for offset, _, _ in turns]
    assert offsets == sorted(offsets, reverse=True) and len(set(offsets)) == len(offsets)


async def test_an_open_log_pages_without_reading_its_file(tmp_path, group_commit):
    io = CountingIO()
    commit = group_commit(durability=Durability.FLUSH, file_io=io)
    path = tmp_path / "c.jsonl"
    stream = conversation_records(300)
    path.write_bytes(b"".join(records.encode(r) for r in stream))
    log = await ConversationLog.open(path, commit=commit)
    view = await log.view()
    assert io.read_calls > 0  # built once, from the file
    io.read_calls = 0
    page, more = view.page(50)
    assert more and page == messages(stream)[-50:]
    for k in range(300, 310):
        await log.append(records.user(message_id=f"u{k}", text=f"question {k}"))
        await log.append(records.start(reply_id=f"r{k}", reply_to=f"u{k}", model="m"))
        await log.append(records.chunk(reply_id=f"r{k}", i=0, text="live"))
    assert (await log.view()) is view
    page, _ = view.page(4)
    assert [m["text"] for m in page] == ["question 308", "live", "question 309", "live"]
    assert next(iter(view.turns_newest_first()))[2] == "question 309"
    assert io.read_calls == 0
    await log.close()


async def test_a_long_log_is_folded_off_the_event_loop(tmp_path, group_commit):
    """A 300,000-chunk reply folded on the loop stalled every stream for 11 s. The view
    is built on a worker thread: the loop keeps running other tasks meanwhile."""
    path = tmp_path / "long.jsonl"
    lines = [records.conversation(conversation_id="long", title="t", model="m", system=None)]
    lines.append(records.user(message_id="u", text="go"))
    lines.append(records.start(reply_id="r", reply_to="u", model="m"))
    lines.extend(records.chunk(reply_id="r", i=i, text="token ") for i in range(300_000))
    lines.append(records.end(reply_id="r", finish="stop"))
    path.write_bytes(b"".join(records.encode(r) for r in lines))
    log = await ConversationLog.open(path, commit=group_commit(durability=Durability.FLUSH))
    ticks = 0
    building = asyncio.ensure_future(log.view())
    while not building.done():
        ticks += 1
        await asyncio.sleep(0)
    view = building.result()
    assert ticks > 100  # the loop ran throughout, not once at the end
    assert view.page(1)[0][0]["text"] == "token " * 300_000
    await log.close()


async def test_the_paging_route_walks_back_with_no_gap_or_duplicate(make_client):
    client = await make_client(demo_reply_tokens=3)
    cid = await create_conversation(client, title="paged")
    for k in range(30):
        response = await client.post(f"/api/conversations/{cid}/messages", json={"text": f"m{k}"})
        assert response.status == 202
        await wait_idle(client, cid)
    body = await (await client.get(f"/api/conversations/{cid}?limit=7")).json()
    assert len(body["messages"]) == 7 and body["more"] is True
    assert body["offset"] == body["size"]
    seen = list(body["messages"])
    while body["more"]:
        before = seen[0]["id"]
        body = await (await client.get(f"/api/conversations/{cid}?limit=7&before={before}")).json()
        seen[:0] = body["messages"]
    assert [m["text"] for m in seen if m["role"] == "user"] == [f"m{k}" for k in range(30)]
    assert len(seen) == 60 and len({m["id"] for m in seen}) == 60
    default = await (await client.get(f"/api/conversations/{cid}")).json()
    assert default["messages"] == seen[-50:]


async def test_the_paging_route_refuses_bad_queries(make_client):
    client = await make_client()
    cid = await create_conversation(client)
    for query, code in (
        ("limit=0", "invalid_query"),
        ("limit=-1", "invalid_query"),
        ("limit=501", "invalid_query"),
        ("limit=%C2%B2", "invalid_query"),  # '²' is a digit to str.isdigit()
        ("limit=x", "invalid_query"),
        ("before=nope", "unknown_message"),
    ):
        response = await client.get(f"/api/conversations/{cid}?{query}")
        assert response.status == 400, query
        assert (await response.json())["error"] == code


async def test_folded_views_of_idle_logs_stay_within_the_memory_bound(tmp_path):
    """However many conversations are read, idle logs close once the tails and views
    of the open ones pass ``max_memory``; a closed one reopens and folds again."""
    from chatledger.storage import Store

    store = Store(tmp_path, durability=Durability.FLUSH, max_open=1000, max_memory=1 << 20)
    try:
        for k in range(40):
            log = await store.create(title="t", model="m", system=None, conversation_id=f"c{k}")
            await log.append(records.user(message_id="u", text=f"{k} " + "x" * 100_000))
        for k in range(40):
            log = await store.open(f"c{k}")
            log.pin()
            view = await log.view()
            assert view.page(1)[0][0]["text"].startswith(f"{k} ")
            log.unpin()
        for _ in range(20):
            await asyncio.sleep(0)
        assert store.memory <= (1 << 20) + 2 * 100_000 * 2
        assert store.open_logs < 40
        first = await store.open("c0")
        assert (await first.view()).page(1)[0][0]["text"].startswith("0 ")
    finally:
        await store.close()
