// "Check my connection": runs the server's diagnostic stream (GET /api/connection-check,
// server/diagnostic.py) and tells the person, in plain words, whether something between
// them and the server holds events back (answers would come in lumps) or cuts quiet
// streams (live answers would drop).
//
// The stream (WHATWG HTML §9.2 "Server-sent events"): `begin` {t, keepalive_s, idle_s,
// burst, spacing_ms}; `burst` events {seq, t}, spacing_ms apart; an idle gap of idle_s
// seconds with `: keep-alive` comments every keepalive_s seconds; `done` {seq, t}; the end.
// Server times `t` are ms since the epoch; only their differences are used, so the two
// clocks need not agree. It is read with fetch and a streaming body reader (not
// EventSource, which would reconnect by itself and hide a cut), and each event is stamped
// with the time its bytes were read.
//
// The decision (`decide`) is a pure function of what arrived when, so it runs in Node's
// tests too (tests/js/connection.test.mjs). Imported by app.js for its effect: it wires
// the page's #check-connection button, and shows the result in a role="status" element
// it puts next to the button. The button's `data-idle-s` attribute, when set, asks for
// that idle gap instead of the server's default (75 s): the tests use a short one.

/** The diagnostic stream's path. */
export const CHECK_PATH = "/api/connection-check";

/** Seconds to wait for the stream's `begin` when the idle gap is not known: the longest
 * gap the server allows (a proxy that buffers the whole answer shows nothing before its
 * end) and a margin. */
export const MAX_WAIT_S = 300 + 60;

/** Seconds past the idle gap (and one keep-alive) after `begin` before giving up. */
export const MARGIN_S = 30;

/**
 * An incremental parser of an event stream (WHATWG HTML §9.2.6 "Interpreting an event
 * stream"): lines end in CRLF, LF or CR; a line starting with ":" is a comment; `event`
 * and `data` fields make up an event, dispatched at a blank line (not when it has no data).
 */
export class EventStreamParser {
  constructor() {
    this.buffer = "";
    this.first = true;
    this.reset();
  }

  reset() {
    this.event = "";
    this.data = [];
  }

  /**
   * Add decoded text (a BOM at the very start is dropped).
   * @param {string} text
   * @param {boolean} [end] the stream ended: what is left of an unfinished line or event
   *   is dropped, as §9.2.6 says
   * @returns {Array<{kind: "event", event: string, data: string} |
   *   {kind: "comment", text: string}>} what the text completed, in order
   */
  feed(text, end = false) {
    if (this.first && text) {
      text = text.replace(/^\uFEFF/, "");
      this.first = false;
    }
    const buffer = this.buffer + text;
    const out = [];
    let start = 0;
    for (let i = 0; i < buffer.length; i++) {
      const c = buffer[i];
      if (c !== "\n" && c !== "\r") continue;
      if (c === "\r" && i + 1 === buffer.length && !end) break; // perhaps half a CRLF
      const item = this.line(buffer.slice(start, i));
      if (c === "\r" && buffer[i + 1] === "\n") i++;
      start = i + 1;
      if (item) out.push(item);
    }
    this.buffer = end ? "" : buffer.slice(start);
    return out;
  }

  line(line) {
    if (line === "") {
      if (!this.data.length) {
        this.reset();
        return null;
      }
      const item = { kind: "event", event: this.event || "message", data: this.data.join("\n") };
      this.reset();
      return item;
    }
    if (line.startsWith(":")) return { kind: "comment", text: line.slice(1).trim() };
    const colon = line.indexOf(":");
    const name = colon < 0 ? line : line.slice(0, colon);
    const value = colon < 0 ? "" : line.slice(colon + 1).replace(/^ /, "");
    if (name === "event") this.event = value;
    else if (name === "data") this.data.push(value);
    return null;
  }
}

/**
 * What the check saw; every `at` is ms since the request was made (client clock).
 * @typedef {object} Observation
 * @property {number|null} status the HTTP status (null: no answer at all)
 * @property {string|null} contentType its Content-Type
 * @property {string|null} error why fetch or the body failed, or the server's `message`
 * @property {string|null} code the server's `error` code, for an error answer
 * @property {number|null} headersAt when the answer's headers came (ms)
 * @property {object|null} begin the `begin` event's fields and its `at`
 * @property {Array<{seq: number, t: number, at: number}>} burst the burst events
 * @property {number[]} keepalives when each keep-alive comment came (ms)
 * @property {object|null} done the `done` event's fields and its `at`
 * @property {number|null} lastDataAt when bytes last came (ms)
 * @property {number|null} endedAt when the answer ended or failed (ms)
 * @property {boolean} timedOut the check gave up waiting (MAX_WAIT_S, or the idle gap
 *   and MARGIN_S after `begin`)
 */

/**
 * Run the diagnostic and decide.
 * @param {object} [options]
 * @param {string} [options.base] prefix of CHECK_PATH ("" in the page; an origin in Node)
 * @param {number} [options.idleS] the idle gap to ask for (s); default: the server's
 * @param {typeof fetch} [options.fetch] the fetch to use
 * @param {() => number} [options.now] a clock in ms (default performance.now)
 * @param {(begin: object) => void} [options.onBegin] called when `begin` arrives
 * @returns {Promise<ReturnType<typeof decide>>}
 */
export async function checkConnection(options = {}) {
  return decide(await observe(options));
}

/**
 * Run the diagnostic stream and record what arrived when (see checkConnection's options).
 * Never rejects: a failure is recorded in the observation.
 * @returns {Promise<Observation>}
 */
export async function observe(options = {}) {
  const base = options.base ?? "";
  const doFetch = options.fetch ?? ((...args) => globalThis.fetch(...args));
  const now = options.now ?? (() => performance.now());
  const onBegin = options.onBegin ?? (() => {});
  const query = options.idleS === undefined ? "" : `?idle=${encodeURIComponent(options.idleS)}`;
  const started = now();
  const at = () => now() - started;
  const seen = {
    status: null, contentType: null, error: null, code: null, headersAt: null, begin: null,
    burst: [], keepalives: [], done: null, lastDataAt: null, endedAt: null, timedOut: false,
  };
  const controller = new AbortController();
  let timer = null;
  const giveUpIn = (seconds) => {
    clearTimeout(timer);
    timer = setTimeout(() => {
      seen.timedOut = true;
      controller.abort();
    }, seconds * 1000);
  };
  giveUpIn(options.idleS === undefined ? MAX_WAIT_S : Number(options.idleS) + 60);
  const take = (item, when) => {
    if (item.kind === "comment") {
      if (item.text === "keep-alive") seen.keepalives.push(when);
      return;
    }
    let data;
    try {
      data = JSON.parse(item.data);
    } catch {
      return;
    }
    if (item.event === "begin") {
      seen.begin = { ...data, at: when };
      giveUpIn((Number(data.idle_s) || 0) + (Number(data.keepalive_s) || 0) + MARGIN_S);
      onBegin(seen.begin);
    } else if (item.event === "burst") seen.burst.push({ ...data, at: when });
    else if (item.event === "done") seen.done = { ...data, at: when };
  };
  try {
    const response = await doFetch(`${base}${CHECK_PATH}${query}`, {
      cache: "no-store",
      headers: { Accept: "text/event-stream" },
      signal: controller.signal,
    });
    seen.headersAt = at();
    seen.status = response.status;
    seen.contentType = response.headers.get("Content-Type");
    if (!response.ok || !isEventStream(seen.contentType)) {
      const body = await response.json().catch(() => ({}));
      seen.error = body.message ?? null;
      seen.code = body.error ?? null;
      seen.endedAt = at();
      return seen;
    }
    const reader = response.body.getReader();
    const decoder = new TextDecoder();
    const parser = new EventStreamParser();
    for (;;) {
      let chunk;
      try {
        chunk = await reader.read();
      } catch (error) {
        seen.error = describe(error);
        break;
      }
      const when = at();
      if (chunk.done) {
        for (const item of parser.feed(decoder.decode(), true)) take(item, when);
        break;
      }
      seen.lastDataAt = when;
      for (const item of parser.feed(decoder.decode(chunk.value, { stream: true }))) {
        take(item, when);
      }
      if (seen.done) {
        reader.cancel().catch(() => {});
        break;
      }
    }
  } catch (error) {
    seen.error = describe(error);
  } finally {
    clearTimeout(timer);
  }
  seen.endedAt = at();
  return seen;
}

function isEventStream(contentType) {
  return /^text\/event-stream\s*(;|$)/i.test(contentType ?? "");
}

function describe(error) {
  const cause = error?.cause?.message;
  return [error?.message ?? String(error), cause].filter(Boolean).join(": ");
}

/**
 * Seconds for people: one decimal below 10 s, whole seconds from there.
 * @param {number} seconds
 * @returns {string} e.g. "2.5", "5", "100"
 */
export function seconds(seconds) {
  return String(seconds >= 10 ? Math.round(seconds) : Math.round(seconds * 10) / 10);
}

/** Below this share of the burst's sent span (or of the idle gap), events arrived "together". */
export const TOGETHER = 0.5;

/**
 * How the burst arrived compared with how it was sent (all ms).
 * @param {Observation} seen
 * @returns {{sentMs: number, arrivedMs: number, bunched: boolean, held: boolean,
 *   lateMs: number}} `bunched`: the burst arrived in less than TOGETHER of the time it
 *   was sent over; `held`: it arrived with `done`, not an idle gap before it; `lateMs`:
 *   how much later than sent it came, at least
 */
export function burstTiming(seen) {
  const burst = seen.burst;
  const first = burst[0];
  const last = burst[burst.length - 1];
  const sentMs = burst.length > 1 ? last.t - first.t : 0;
  const arrivedMs = burst.length > 1 ? last.at - first.at : 0;
  const bunched = sentMs >= 100 && arrivedMs < sentMs * TOGETHER;
  let held = false;
  let lateMs = Math.max(0, sentMs - arrivedMs);
  if (last && seen.done) {
    const gapSent = seen.done.t - last.t;
    const gapArrived = seen.done.at - last.at;
    held = gapSent >= 1000 && gapArrived < gapSent * TOGETHER;
    if (held) lateMs = Math.max(lateMs, gapSent - gapArrived);
  }
  return { sentMs, arrivedMs, bunched, held, lateMs };
}

/**
 * The verdict on an observation (pure).
 *
 * - "unreachable": no answer, or not the event stream (e.g. 401, 429, a proxy's 502);
 * - "cut": the stream ended before `done` (said: after how many seconds, and the
 *   server's keep-alive interval);
 * - "buffered": the burst arrived together, or held back until the end;
 * - "fine": the burst arrived spread as sent, and the stream lasted the idle gap.
 *
 * @param {Observation} seen
 * @returns {{verdict: "fine"|"buffered"|"cut"|"unreachable", message: string,
 *   cutAfterS?: number, quietS?: number, keepaliveS?: number|null, sentMs?: number,
 *   arrivedMs?: number, lateMs?: number}} `message` in plain words for people
 */
export function decide(seen) {
  if (seen.status === null) {
    return {
      verdict: "unreachable",
      message:
        "Could not reach the server" + (seen.error ? ` (${seen.error})` : "") +
        ". Check that you are online and that the server is running.",
    };
  }
  if (seen.status !== 200 || !isEventStream(seen.contentType)) {
    return { verdict: "unreachable", message: refusal(seen) };
  }
  const keepaliveS = seen.begin ? Number(seen.begin.keepalive_s) : null;
  const timing = burstTiming(seen);
  if (!seen.done) {
    if (seen.timedOut && !seen.begin) {
      const waitedS = (seen.endedAt ?? 0) / 1000;
      return {
        verdict: "buffered",
        message:
          `Your proxy holds events back: nothing of the check arrived in ${seconds(waitedS)} s. ` +
          "Answers would appear only when they are over. If the proxy is nginx, add " +
          "`proxy_buffering off` to its location block.",
        lateMs: waitedS * 1000,
      };
    }
    const opened = seen.headersAt ?? 0;
    const cutAfterS = ((seen.endedAt ?? opened) - opened) / 1000;
    const quietS = ((seen.endedAt ?? opened) - (seen.lastDataAt ?? opened)) / 1000;
    const how = seen.timedOut ? "Stalled" : "Cut";
    let message = `${how} after ${seconds(cutAfterS)} s: keep-alive is ` +
      (keepaliveS === null ? "unknown (nothing arrived)." : `${seconds(keepaliveS)} s.`);
    if (keepaliveS !== null && !seen.keepalives.length && quietS < keepaliveS) {
      message +=
        " Something between you and the server (a proxy, a load balancer) ends a stream " +
        `that is quiet for about ${seconds(quietS)} s, less than the server's keep-alive ` +
        "interval, so live answers drop while nothing is said. Raise its idle timeout above " +
        `${seconds(keepaliveS)} s (nginx: \`proxy_read_timeout\`), or run chatledger with a ` +
        "shorter `--keepalive`.";
    } else if (keepaliveS !== null) {
      message +=
        ` Keep-alives did arrive (the last thing came ${seconds(quietS)} s before the end), ` +
        "so something limits how long a stream may stay open. The page reconnects and " +
        "resumes where it was, but look at that proxy's timeouts.";
    } else {
      message += " The stream ended before the server's first event: look at the proxy.";
    }
    if (timing.bunched) message += " It also holds events back (add `proxy_buffering off`).";
    return { verdict: "cut", message, cutAfterS, quietS, keepaliveS, ...timing };
  }
  if (timing.bunched || timing.held) {
    const late = timing.lateMs >= 1000 ? `, about ${seconds(timing.lateMs / 1000)} s late` : "";
    return {
      verdict: "buffered",
      message:
        `Your proxy holds events back: ${seen.burst.length} events the server sent over ` +
        `${Math.round(timing.sentMs)} ms reached you within ${Math.round(timing.arrivedMs)} ms` +
        `${late}, so answers will appear in lumps instead of word by word. If the proxy is ` +
        "nginx, add `proxy_buffering off` to its location block, and do not make it ignore " +
        "X-Accel-Buffering.",
      keepaliveS,
      ...timing,
    };
  }
  const idleS = Number(seen.begin?.idle_s ?? 0);
  return {
    verdict: "fine",
    message:
      `Your connection is fine: ${seen.burst.length} events arrived as they were sent ` +
      `(spread over ${Math.round(timing.arrivedMs)} ms, sent over ` +
      `${Math.round(timing.sentMs)} ms), and the stream stayed open through ` +
      `${seconds(idleS)} s of quiet (keep-alive is ${seconds(keepaliveS ?? 0)} s).`,
    keepaliveS,
    ...timing,
  };
}

function refusal(seen) {
  const said = seen.error ? `: ${seen.error}` : "";
  if (seen.status === 401) return "Sign in first: the check needs a session.";
  if (seen.status === 429) {
    return `The server has no room for another stream right now${said}. Try again shortly.`;
  }
  if (seen.status === 200) {
    return `Something answered for the server, but not with an event stream ` +
      `(${seen.contentType || "no Content-Type"}): a proxy or a captive portal?`;
  }
  return `The check could not run: the server (or a proxy before it) answered ` +
    `${seen.status}${said}.`;
}

/**
 * Wire a button to the check: a role="status" element is put right after it; while the
 * check runs the button is disabled and the status says so; then it shows the verdict
 * (`data-verdict`) and its message.
 * @param {HTMLButtonElement} button its `data-idle-s`, when set, is the idle gap asked for
 * @param {{check?: typeof checkConnection}} [options]
 * @returns {HTMLElement} the status element
 */
export function attach(button, options = {}) {
  const check = options.check ?? checkConnection;
  const status = document.createElement("span");
  status.id = "connection-check-result";
  status.className = "connection-check";
  status.setAttribute("role", "status");
  button.after(status);
  button.addEventListener("click", async () => {
    button.disabled = true;
    status.dataset.verdict = "checking";
    status.textContent = "Checking your connection…";
    const idle = button.dataset.idleS;
    try {
      const result = await check({
        idleS: idle === undefined || idle === "" ? undefined : Number(idle),
        onBegin: (begin) => {
          const about = Math.ceil(Number(begin.idle_s) + 1);
          status.textContent = `Checking your connection… (about ${about} s)`;
        },
      });
      status.dataset.verdict = result.verdict;
      status.textContent = result.message;
    } finally {
      button.disabled = false;
    }
  });
  return status;
}

const button = globalThis.document?.getElementById("check-connection");
if (button) attach(button);
