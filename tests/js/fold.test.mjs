// static/fold.js against the shared fixtures (tests/fold_fixtures.json), which
// tests/test_fold.py runs through storage/fold.py: one fold, two languages.
// Run: node --test tests/js/   (tests/test_fold.py runs it from `python -m pytest`)

import assert from "node:assert/strict";
import { readFileSync } from "node:fs";
import { test } from "node:test";

import { applyRecord, emptyView, isOpen, runningReply } from "../../static/fold.js";

const fixtures = JSON.parse(
  readFileSync(new URL("../fold_fixtures.json", import.meta.url), "utf-8"),
);

function fold(records) {
  const view = emptyView();
  records.forEach((record, i) => applyRecord(view, record, (i + 1) * 100));
  return view;
}

for (const fixture of fixtures) {
  test(`fixture: ${fixture.name}`, () => {
    // the records are shared by reference with the view (usage objects): fold a copy
    const view = fold(structuredClone(fixture.records));
    assert.deepStrictEqual(view.messages, fixture.messages);
    assert.equal(view.title, fixture.title);
    assert.equal(runningReply(view)?.id ?? null, fixture.running);
    assert.equal(view.offset, fixture.records.length * 100);
  });
}

test("the fixtures cover what both folds must agree on", () => {
  const finishes = new Set(
    fixtures.flatMap((f) => f.messages.map((m) => m.finish)).filter((f) => f !== null),
  );
  assert.deepStrictEqual([...finishes].sort(), ["cancelled", "error", "interrupted", "length", "stop"]);
  assert.ok(fixtures.some((f) => f.running !== null));
  assert.ok(fixtures.some((f) => f.records.some((r) => r.type === "title")));
});

test("applyRecord returns the message it changed, or null", () => {
  const view = emptyView();
  assert.equal(applyRecord(view, { type: "conversation", ts: 1, id: "c", title: "T" }, 10), null);
  const user = applyRecord(view, { type: "user", ts: 2, id: "u1", text: "hi" }, 20);
  assert.equal(user, view.messages[0]);
  const reply = applyRecord(view, { type: "start", ts: 3, id: "r1", reply_to: "u1" }, 30);
  assert.equal(reply, view.messages[1]);
  assert.ok(isOpen(view, "r1"));
  assert.equal(runningReply(view), reply);
  assert.equal(applyRecord(view, { type: "chunk", ts: 4, id: "r1", i: 0, text: "a" }, 40), reply);
  assert.equal(applyRecord(view, { type: "chunk", ts: 5, id: "nope", i: 0, text: "b" }, 50), null);
  assert.equal(applyRecord(view, { type: "seal", ts: 6, upto: 50, sha256: "" }, 60), null);
  assert.equal(applyRecord(view, { type: "end", ts: 7, id: "r1", finish: "stop" }, 70), reply);
  assert.equal(runningReply(view), null);
  assert.equal(isOpen(view, "r1"), false);
  assert.equal(view.offset, 70);
  assert.equal(reply.text, "a");
});

test("with two replies open, the newest is the running one", () => {
  const view = fold([
    { type: "start", ts: 1, id: "r1", reply_to: null, model: "m" },
    { type: "start", ts: 2, id: "r2", reply_to: null, model: "m" },
  ]);
  assert.equal(runningReply(view).id, "r2");
  applyRecord(view, { type: "end", ts: 3, id: "r2", finish: "interrupted" }, 300);
  assert.equal(runningReply(view).id, "r1");
});
