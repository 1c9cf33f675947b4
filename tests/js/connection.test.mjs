// static/connection.js in Node: the event-stream parser, the decision on what arrived
// when, and the reading of a (fake) fetch answer with a fake clock. Run by
// tests/test_diagnostic.py (node --test).
import assert from "node:assert/strict";
import test from "node:test";

import {
  burstTiming,
  decide,
  EventStreamParser,
  observe,
  seconds,
} from "../../static/connection.js";

const T0 = 1_764_590_000_000; // a server time (ms since the epoch)

/** An observation of a stream that answered 200: burst arrivals `arrivals` (ms, client),
 * sent 50 ms apart from T0; `done` at doneAt (null: none), sent 2500 ms after the last. */
function seen({ arrivals, doneAt = null, keepalives = [], endedAt = null, lastDataAt = null,
                keepaliveS = 1, idleS = 2.5, timedOut = false, begin = true }) {
  const burst = arrivals.map((at, seq) => ({ seq, t: T0 + 50 * seq, at }));
  const lastT = burst.length ? burst[burst.length - 1].t : T0;
  const ended = endedAt ?? doneAt ?? arrivals[arrivals.length - 1] ?? 5;
  return {
    status: 200,
    contentType: "text/event-stream",
    error: null,
    code: null,
    headersAt: 5,
    begin: begin
      ? { t: T0, keepalive_s: keepaliveS, idle_s: idleS, burst: 10, spacing_ms: 50,
          at: arrivals[0] ?? 5 }
      : null,
    burst,
    keepalives,
    done: doneAt === null ? null : { seq: burst.length, t: lastT + idleS * 1000, at: doneAt },
    lastDataAt: lastDataAt ?? doneAt ?? keepalives.at(-1) ?? arrivals.at(-1) ?? null,
    endedAt: ended,
    timedOut,
  };
}

const spread = Array.from({ length: 10 }, (_, i) => 10 + 50 * i + (i % 3)); // as sent
const together = Array.from({ length: 10 }, () => 2990); // all at once, at the end

test("parser: LF, CRLF and CR lines, split anywhere, comments, BOM", () => {
  const parser = new EventStreamParser();
  const text = "\uFEFFevent: begin\r\ndata: {\"a\":1}\r\n\r\n: keep-alive\r\rdata: x\ndata: y\n\n";
  const out = [];
  for (const piece of text.match(/.{1,3}/gsu)) out.push(...parser.feed(piece));
  out.push(...parser.feed("", true));
  assert.deepEqual(out, [
    { kind: "event", event: "begin", data: "{\"a\":1}" },
    { kind: "comment", text: "keep-alive" },
    { kind: "event", event: "message", data: "x\ny" },
  ]);
});

test("parser: no data is no event; an unfinished event at the end is dropped", () => {
  const parser = new EventStreamParser();
  assert.deepEqual(parser.feed("event: lonely\n\n"), []);
  assert.deepEqual(parser.feed("event: done\ndata: {}\n"), []);
  assert.deepEqual(parser.feed("", true), []);
});

test("seconds: one decimal below 10 s, whole seconds from there", () => {
  assert.equal(seconds(2.46), "2.5");
  assert.equal(seconds(5), "5");
  assert.equal(seconds(0.04), "0");
  assert.equal(seconds(100.4), "100");
});

test("fine: the burst arrived spread as sent, and done after the idle gap", () => {
  const result = decide(seen({ arrivals: spread, doneAt: 2980, keepalives: [1470, 2470] }));
  assert.equal(result.verdict, "fine");
  assert.match(result.message, /^Your connection is fine: 10 events arrived as they were sent/);
  assert.match(result.message, /stayed open through 2\.5 s of quiet \(keep-alive is 1 s\)/);
});

test("buffered: the burst and done arrived together, late", () => {
  const result = decide(seen({ arrivals: together, doneAt: 2990, keepalives: [2990, 2990] }));
  assert.equal(result.verdict, "buffered");
  assert.equal(result.bunched, true);
  assert.equal(result.held, true);
  assert.match(result.message, /^Your proxy holds events back: 10 events the server sent over 450 ms reached you within 0 ms, about 2\.5 s late/);
  assert.match(result.message, /add `proxy_buffering off`/);
});

test("buffered: bunched by a proxy that flushes on a timer (not held to the end)", () => {
  const bunched = Array.from({ length: 10 }, (_, i) => (i < 5 ? 1000 : 1010));
  const result = decide(seen({ arrivals: bunched, doneAt: 3600 }));
  assert.equal(result.verdict, "buffered");
  assert.deepEqual([result.bunched, result.held], [true, false]);
});

test("buffered: spread, but held back until done came", () => {
  const late = spread.map((at) => at + 2500);
  const result = decide(seen({ arrivals: late, doneAt: late.at(-1) + 5 }));
  assert.equal(result.verdict, "buffered");
  assert.deepEqual([result.bunched, result.held], [false, true]);
});

test("a browser that reads two events at once is still fine", () => {
  const arrivals = [...spread];
  arrivals[1] = arrivals[2]; // one read got events 1 and 2
  assert.equal(decide(seen({ arrivals, doneAt: 2980 })).verdict, "fine");
  assert.equal(burstTiming(seen({ arrivals, doneAt: 2980 })).bunched, false);
});

test("cut: an idle timeout shorter than the keep-alive", () => {
  const result = decide(seen({ arrivals: spread, endedAt: 2465, keepaliveS: 5, idleS: 6 }));
  assert.equal(result.verdict, "cut");
  assert.equal(result.cutAfterS, 2.46);
  assert.match(result.message, /^Cut after 2\.5 s: keep-alive is 5 s\. /);
  assert.match(result.message, /quiet for about 2 s, less than the server's keep-alive/);
  assert.match(result.message, /`proxy_read_timeout`/);
});

test("cut: keep-alives came, yet the stream was cut (a limit on its length)", () => {
  const result = decide(seen({
    arrivals: spread, keepalives: [15000, 30000, 45000, 60000, 75000, 90000],
    endedAt: 100_005, keepaliveS: 15, idleS: 200,
  }));
  assert.equal(result.verdict, "cut");
  assert.match(result.message, /^Cut after 100 s: keep-alive is 15 s\. Keep-alives did arrive/);
});

test("cut before anything arrived", () => {
  const result = decide(seen({ arrivals: [], begin: false, endedAt: 40 }));
  assert.equal(result.verdict, "cut");
  assert.match(result.message, /^Cut after 0 s: keep-alive is unknown/);
});

test("nothing arrived before the check gave up: buffered; stalled after begin", () => {
  const none = seen({ arrivals: [], begin: false, endedAt: 360_000, timedOut: true });
  assert.equal(decide(none).verdict, "buffered");
  assert.match(decide(none).message, /^Your proxy holds events back: nothing of the check arrived in 360 s/);
  const stalled = seen({ arrivals: spread, endedAt: 40_000, timedOut: true });
  assert.equal(decide(stalled).verdict, "cut");
  assert.match(decide(stalled).message, /^Stalled after 40 s: keep-alive is 1 s/);
});

test("unreachable: no answer, a refusal, or something else than an event stream", () => {
  const base = { contentType: null, error: null, code: null, burst: [], keepalives: [] };
  const no = decide({ ...base, status: null, error: "fetch failed" });
  assert.deepEqual(no.verdict, "unreachable");
  assert.match(no.message, /^Could not reach the server \(fetch failed\)/);
  assert.match(decide({ ...base, status: 401 }).message, /^Sign in first/);
  const busy = decide({ ...base, status: 429, error: "you have 50 event streams open" });
  assert.match(busy.message, /no room for another stream right now: you have 50/);
  assert.match(decide({ ...base, status: 502 }).message, /answered 502\.$/);
  const portal = decide({ ...base, status: 200, contentType: "text/html" });
  assert.equal(portal.verdict, "unreachable");
  assert.match(portal.message, /not with an event stream \(text\/html\)/);
});

/** A fetch whose answer's body gives `chunks` ({at, text} or {at, error}), the clock
 * standing at each chunk's `at` when it is read. */
function fakeFetch(clock, chunks, { status = 200, contentType = "text/event-stream" } = {}) {
  const calls = [];
  const fetch = async (url, init) => {
    calls.push({ url, init });
    clock.now = 5;
    let next = 0;
    const body = new ReadableStream({
      pull(controller) {
        const chunk = chunks[next++];
        if (!chunk) {
          controller.close();
          return;
        }
        clock.now = chunk.at;
        if (chunk.error) controller.error(new TypeError(chunk.error));
        else controller.enqueue(new TextEncoder().encode(chunk.text));
      },
    }, { highWaterMark: 0 }); // no read-ahead: the clock is a chunk's when it is read
    return new Response(body, { status, headers: { "Content-Type": contentType } });
  };
  return { fetch, calls };
}

const event = (name, data) => `event: ${name}\ndata: ${JSON.stringify(data)}\n\n`;
const beginText = event("begin", { t: T0, keepalive_s: 1, idle_s: 2.5, burst: 10, spacing_ms: 50 });

test("observe: stamps each event with the time its bytes were read", async () => {
  const clock = { now: 0 };
  const chunks = [{ at: 10, text: beginText }];
  for (let seq = 0; seq < 10; seq++) {
    chunks.push({ at: 10 + 50 * seq, text: event("burst", { seq, t: T0 + 50 * seq }) });
  }
  chunks.push({ at: 1470, text: ": keep-alive\n\n" }, { at: 2470, text: ": keep-alive\n\n" });
  chunks.push({ at: 2960, text: event("done", { seq: 10, t: T0 + 2950 }) });
  const { fetch, calls } = fakeFetch(clock, chunks);
  let begun = null;
  const result = await observe({
    base: "http://chat.test", idleS: 2.5, fetch, now: () => clock.now,
    onBegin: (begin) => { begun = begin; },
  });
  assert.equal(calls[0].url, "http://chat.test/api/connection-check?idle=2.5");
  assert.equal(calls[0].init.headers.Accept, "text/event-stream");
  assert.equal(begun.keepalive_s, 1);
  assert.deepEqual(result.burst.map((e) => e.at), spread.map((_, i) => 10 + 50 * i));
  assert.deepEqual(result.keepalives, [1470, 2470]);
  assert.equal(result.done.at, 2960);
  assert.equal(decide(result).verdict, "fine");
});

test("observe: a body cut short is a cut, with the time of the cut", async () => {
  const clock = { now: 0 };
  const chunks = [{ at: 10, text: beginText + event("burst", { seq: 0, t: T0 }) },
                  { at: 2460, error: "terminated" }];
  const { fetch } = fakeFetch(clock, chunks);
  const result = await observe({ fetch, now: () => clock.now });
  assert.equal(result.done, null);
  assert.match(result.error, /terminated/);
  assert.equal(result.endedAt, 2460);
  const verdict = decide(result);
  assert.equal(verdict.verdict, "cut");
  assert.match(verdict.message, /^Cut after 2\.5 s: keep-alive is 1 s/);
});

test("observe: an error answer keeps the server's message", async () => {
  const clock = { now: 0 };
  const fetch = async () => new Response(
    JSON.stringify({ error: "too_many_requests", message: "you have 50 event streams open" }),
    { status: 429, headers: { "Content-Type": "application/json" } },
  );
  const result = await observe({ fetch, now: () => clock.now });
  assert.deepEqual([result.status, result.code], [429, "too_many_requests"]);
  assert.equal(decide(result).verdict, "unreachable");
});

test("observe: a fetch that rejects is unreachable", async () => {
  const fetch = async () => { throw new TypeError("Failed to fetch"); };
  const result = await observe({ fetch });
  assert.equal(result.status, null);
  assert.match(decide(result).message, /^Could not reach the server \(Failed to fetch\)/);
});
