// static/fold.js started from a page of the server's fold (viewFrom), the records after
// the page folded onto it, older pages put in front (prependMessages): the cases of
// tests/fold_page_fixtures.json, whose pages and views tests/test_fold_page.py checks
// against storage/fold.py. Then every case of tests/fold_fixtures.json (whose views
// tests/test_fold.py checks against storage/fold.py) resumed at every split point.
// Run: node --test tests/js/   (tests/test_fold_page.py runs it from `python -m pytest`)

import assert from "node:assert/strict";
import { readFileSync } from "node:fs";
import { test } from "node:test";

import {
  applyRecord, emptyView, isOpen, prependMessages, runningReply, viewFrom,
} from "../../static/fold.js";

const load = (name) => JSON.parse(readFileSync(new URL(name, import.meta.url), "utf-8"));
const pageFixtures = load("../fold_page_fixtures.json");
const sharedFixtures = load("../fold_fixtures.json");

// Event ids: made-up offsets, the record at index i ends at (i + 1) * 100.
const offsetAfter = (count) => count * 100;

// What the page does: a view from the page (a JSON answer: a copy of its own), then every
// record from the page's offset on.
function resume(page, records, at) {
  const view = viewFrom(structuredClone({ ...page, offset: offsetAfter(at), writable: true }));
  assert.equal(view.offset, offsetAfter(at));
  records.slice(at).forEach((record, k) => {
    applyRecord(view, structuredClone(record), offsetAfter(at + k + 1));
  });
  return view;
}

for (const fixture of pageFixtures) {
  test(`page fixture: ${fixture.name}`, () => {
    const { records, at, page } = fixture;
    const view = resume(page, records, at);
    assert.deepStrictEqual(view.messages, fixture.messages);
    assert.equal(view.title, fixture.title);
    assert.equal(runningReply(view)?.id ?? null, fixture.running);
    assert.equal(view.offset, offsetAfter(records.length));
    const whole = [...fixture.messages];
    for (const older of fixture.older) {
      const added = prependMessages(view, structuredClone(older.messages));
      assert.deepStrictEqual(added, older.messages);
      whole.unshift(...older.messages);
      assert.deepStrictEqual(view.messages, whole);
    }
    assert.equal(runningReply(view)?.id ?? null, fixture.running);
  });
}

// A page of a JS fold of the first `at` records, as the server would answer it: the
// newest `limit` messages, `more`, the title and the reply still running.
function pageOf(records, at, limit) {
  const view = emptyView();
  records.slice(0, at).forEach((r, k) => applyRecord(view, structuredClone(r), offsetAfter(k + 1)));
  const messages = view.messages.slice(-limit);
  return {
    page: {
      id: "c1", title: view.title, messages, more: messages.length < view.messages.length,
      running: runningReply(view)?.id ?? null,
    },
    before: view.messages.length - messages.length,
  };
}

test("every shared fixture resumes from a page at every split point", () => {
  let resumed = 0;
  let reopened = 0;
  for (const fixture of sharedFixtures) {
    const { records } = fixture;
    for (let at = 0; at <= records.length; at += 1) {
      for (const limit of [1, 2, 3, 500]) {
        const { page } = pageOf(records, at, limit);
        const view = resume(page, records, at);
        const where = `${fixture.name}, at ${at}, limit ${limit}`;
        assert.equal(view.title, fixture.title, where);
        assert.equal(runningReply(view)?.id ?? null, fixture.running, where);
        if (view.stale) {
          // a `select` named a message of a branch the page never had, or a branch began
          // under one (made on another device), or under no message: the page opens anew
          const named = (r) => (r.type === "start" ? r.reply_to : r.parent);
          const branching = (r) => r.type === "select" || r.edit_of || r.regenerate_of ||
            (["user", "start"].includes(r.type) && named(r) && !view.nodes.has(named(r)));
          assert.ok(records.slice(at).some(branching), where);
          reopened += 1;
          continue;
        }
        // the newest messages of the whole fold's current path (checked against Python)
        let oldest = fixture.messages.length - view.messages.length;
        assert.deepStrictEqual(view.messages, fixture.messages.slice(oldest), where);
        // scrolling up, a page of `limit` at a time, ends with the whole path
        while (oldest > 0) {
          const from = Math.max(0, oldest - limit);
          const older = structuredClone(fixture.messages.slice(from, oldest));
          assert.deepStrictEqual(prependMessages(view, older), older, where);
          oldest = from;
        }
        assert.deepStrictEqual(view.messages, fixture.messages, where);
        resumed += 1;
      }
    }
  }
  assert.ok(resumed > 100);
  assert.ok(reopened > 0);
});

test("a chunk of a reply in the page appends to its text; its end closes it", () => {
  const view = viewFrom({
    id: "c1", title: "T", offset: 500, running: "r1", writable: true, more: true,
    messages: [
      { id: "u1", role: "user", text: "hi", finish: null },
      { id: "r1", role: "assistant", text: "Hel", finish: null, reply_to: "u1", model: "m",
        usage: null, error: null },
    ],
  });
  const reply = view.messages[1];
  assert.ok(isOpen(view, "r1"));
  assert.equal(runningReply(view), reply);
  assert.equal(applyRecord(view, { type: "chunk", ts: 1, id: "r1", i: 1, text: "lo" }, 600), reply);
  assert.equal(reply.text, "Hello");
  assert.equal(applyRecord(view, { type: "end", ts: 2, id: "r1", finish: "stop" }, 700), reply);
  assert.equal(runningReply(view), null);
  assert.equal(view.offset, 700);
  assert.deepStrictEqual(view.conversation, { id: "c1", title: "T", model: null, system: null });
});

test("which unfinished replies of a page are open", () => {
  const unfinished = (id) => ({
    id, role: "assistant", text: "", finish: null, reply_to: null, model: null,
    usage: null, error: null,
  });
  const messages = [unfinished("r1"), unfinished("r2")];
  // the server says which one its task runs; an `end` with no finish is not open
  let view = viewFrom({ messages: structuredClone(messages), offset: 0, running: "r2" });
  assert.deepStrictEqual([...view.openReplies], ["r2"]);
  view = viewFrom({ messages: structuredClone(messages), offset: 0, running: null });
  assert.equal(runningReply(view), null);
  // a log that can no longer be written: they never get an end, shown as stopped
  view = viewFrom({ messages: structuredClone(messages), offset: 0, running: null, writable: false });
  assert.equal(runningReply(view).id, "r2");
  // a page that does not say what runs: every unfinished reply is open
  view = viewFrom({ messages: structuredClone(messages), offset: 0 });
  assert.deepStrictEqual([...view.openReplies], ["r1", "r2"]);
});

test("an older page never shows a message twice", () => {
  const view = viewFrom({
    offset: 0, running: null,
    messages: [{ id: "u2", role: "user", text: "two", finish: null }],
  });
  const older = [
    { id: "u1", role: "user", text: "one", finish: null },
    { id: "u2", role: "user", text: "two", finish: null },
  ];
  assert.deepStrictEqual(prependMessages(view, older), [older[0]]);
  assert.deepStrictEqual(view.messages.map((m) => m.id), ["u1", "u2"]);
  assert.deepStrictEqual(prependMessages(view, []), []);
});
