// Replay (DESIGN.md "Replay"): a conversation played back from its raw log as it
// streamed. The fold is deterministic, so the frame at offset X, the fold of the records
// [0, X), is exactly what a viewer who had received [0, X) was shown; it is folded by
// fold.js and drawn by view.js, the very code of the live page, never a second renderer.
//
// The log (`GET /api/conversations/{id}/log`) is split into records with the offset after
// each; a frame is "k records applied". Going forward applies the next records to the view
// and renders each change as the live page renders an event; going back folds [0, X) anew.
// Playback keeps the records' recorded pace (their `ts`; a gap longer than MAX_GAP_MS is
// shortened to it), or ×4, ×16. "What <viewer> had been sent at <time>" comes from the
// conversation's audit (`GET …/audit`): the highest `delivered[].to` of that viewer's reads
// that had opened by then, among receipts written by then.
//
// The pure parts (splitLog, pace, sentBy, viewersOf) need no DOM; createReplay wires
// them to the replay panel and sets `window.chatledgerReplay` (seek, for tests).

import { applyRecord, emptyView } from "./fold.js";
import { createMessageList } from "./view.js";

/** The longest pause between two records in playback, in ms of the recording. */
export const MAX_GAP_MS = 2000;

/**
 * A raw log split into records.
 * @param {Uint8Array} bytes the log's JSONL bytes from offset 0
 * @returns {{records: object[], ends: number[]}} each record (parsed; a line that does not
 *   parse is `{type: null}`, so offsets stay exact) and the byte offset just after it
 *   (its event id). Bytes after the last newline (none, from the server) are left out.
 */
export function splitLog(bytes) {
  const decoder = new TextDecoder("utf-8");
  const records = [];
  const ends = [];
  let start = 0;
  for (;;) {
    const newline = bytes.indexOf(0x0a, start);
    if (newline < 0) break;
    let record;
    try {
      record = JSON.parse(decoder.decode(bytes.subarray(start, newline)));
    } catch {
      record = null;
    }
    records.push(record !== null && typeof record === "object" ? record : { type: null });
    ends.push(newline + 1);
    start = newline + 1;
  }
  return { records, ends };
}

/**
 * When each record comes in playback at ×1, in ms from the first: the recorded gaps
 * between records' `ts`, each at most `maxGap` (and never negative).
 * @param {object[]} records
 * @param {number} [maxGap] MAX_GAP_MS
 * @returns {number[]} one per record; the first is 0
 */
export function pace(records, maxGap = MAX_GAP_MS) {
  const times = [];
  let at = 0;
  let previous = null;
  for (const record of records) {
    const ts = Number.isFinite(record.ts) ? record.ts : previous;
    if (previous !== null && ts !== null) at += Math.min(Math.max(ts - previous, 0), maxGap);
    if (ts !== null) previous = ts;
    times.push(at);
  }
  return times;
}

/**
 * How far into the log `viewer` had been sent by `time`: the highest `to` among the
 * receipts (`delivered[]`, written at `at`) of that viewer's reads, counting only reads
 * that had opened by `time` and receipts written by then.
 * @param {Array<{viewer: string, opened: number, delivered: Array<{to: number,
 *   at: number}>}>} reads the audit's `reads`
 * @param {string} viewer an account id, or "local"
 * @param {number} time ms since the epoch
 * @returns {number|null} a byte offset (a record boundary), or null: nothing was sent
 */
export function sentBy(reads, viewer, time) {
  let best = null;
  for (const read of reads ?? []) {
    if (read.viewer !== viewer || !(read.opened <= time)) continue;
    for (const receipt of read.delivered ?? []) {
      if (receipt.at <= time && (best === null || receipt.to > best)) best = receipt.to;
    }
  }
  return best;
}

/**
 * The viewers of an audit's reads, in the order they first read.
 * @param {Array<{viewer: string, name: string|null}>} reads
 * @returns {Array<{viewer: string, name: string}>} `name`: the account's name, else a
 *   label for people ("this computer" for the single-person mode's `local`)
 */
export function viewersOf(reads) {
  const seen = new Map();
  for (const read of reads ?? []) {
    if (seen.has(read.viewer)) continue;
    const name = read.name ?? (read.viewer === "local" ? "this computer" : read.viewer);
    seen.set(read.viewer, { viewer: read.viewer, name });
  }
  return [...seen.values()];
}

/**
 * A time of day with seconds, local, 24-hour; with the date when not today.
 * @param {number} ms since the epoch
 * @returns {string}
 */
export function formatStamp(ms, now = new Date()) {
  const date = new Date(ms);
  const time = date.toLocaleTimeString([], {
    hour: "2-digit", minute: "2-digit", second: "2-digit", hourCycle: "h23",
  });
  if (date.toDateString() === now.toDateString()) return time;
  return `${date.toLocaleDateString([], { day: "numeric", month: "short", year: "numeric" })}, ${time}`;
}

/** A time as a datetime-local input's value (local time, to the second). */
export function localInputValue(ms) {
  const date = new Date(ms);
  const pad = (n) => String(n).padStart(2, "0");
  return `${date.getFullYear()}-${pad(date.getMonth() + 1)}-${pad(date.getDate())}` +
    `T${pad(date.getHours())}:${pad(date.getMinutes())}:${pad(date.getSeconds())}`;
}

/**
 * The replay panel.
 * @param {{panel: HTMLElement, messages: HTMLElement, play: HTMLButtonElement,
 *   speed: HTMLSelectElement, timeline: HTMLInputElement, time: HTMLOutputElement,
 *   exit: HTMLButtonElement, sentForm: HTMLFormElement, viewer: HTMLSelectElement,
 *   at: HTMLInputElement, note: HTMLElement}} ui
 * @param {{getLog: (id: string) => Promise<Uint8Array>, getAudit: (id: string) =>
 *   Promise<{reads: object[]}>, onExit: () => void}} hooks `onExit`: the person left
 *   replay (Exit, Escape); the page shows the live view again
 * @returns {{open: (id: string) => Promise<void>, close: () => void,
 *   active: () => boolean, seek: (offset: number) => Promise<number|null>}}
 */
export function createReplay(ui, { getLog, getAudit, onExit }) {
  const list = createMessageList(ui.messages, { actions: false });
  /** Counts opens and closes: an answer for an earlier one is dropped. */
  let epoch = 0;
  let state = null;

  function blank(id) {
    return {
      id, records: [], ends: [], times: [], view: emptyView(), applied: 0,
      playing: false, timer: null, anchor: null, reads: null, loaded: null, ready: false,
      pending: null,
    };
  }

  const offsetOf = (k) => (k === 0 ? 0 : state.ends[k - 1]);

  /** The frame of `offset`: the most records whose end is at most `offset`. */
  function frameOf(offset) {
    let low = 0;
    let high = state.ends.length;
    while (low < high) {
      const middle = (low + high + 1) >> 1;
      if (state.ends[middle - 1] <= offset) low = middle;
      else high = middle - 1;
    }
    return low;
  }

  // -- frames ------------------------------------------------------------------------

  function show(k) {
    k = Math.max(0, Math.min(k, state.records.length));
    if (k < state.applied) {
      // back in time: the fold of [0, X) anew, shown as the live page shows a page
      state.view = emptyView();
      for (let j = 0; j < k; j += 1) applyRecord(state.view, state.records[j], state.ends[j]);
      state.applied = k;
      list.show(state.view);
    } else {
      // forward: each record as the live page gets it from the event stream (another
      // branch, or a new one, drawn anew as the live page draws it)
      for (let j = state.applied; j < k; j += 1) {
        const changed = applyRecord(state.view, state.records[j], state.ends[j]);
        if (state.view.reshaped) {
          state.view.reshaped = false;
          list.show(state.view);
        } else {
          list.render(state.view, changed);
        }
      }
      state.applied = k;
    }
    showPosition();
  }

  function showPosition() {
    const k = state.applied;
    const n = state.records.length;
    ui.timeline.max = String(n);
    ui.timeline.value = String(k);
    const ts = k > 0 ? state.records[k - 1].ts : state.records[0]?.ts;
    const when = Number.isFinite(ts) ? formatStamp(ts) : "";
    const label = `${when}${when ? " · " : ""}record ${k} of ${n} · byte ${offsetOf(k)}`;
    ui.time.value = label;
    ui.timeline.setAttribute("aria-valuetext", label);
    ui.panel.dataset.offset = String(offsetOf(k));
  }

  // -- playback ------------------------------------------------------------------------

  const speed = () => Number(ui.speed.value) || 1;
  /** The playback clock (ms of the recording, at ×1) of the frame shown. */
  const clockOf = (k) => (k === 0 ? 0 : state.times[k - 1]);

  function setPlaying(playing) {
    state.playing = playing;
    clearTimeout(state.timer);
    state.timer = null;
    ui.play.textContent = playing ? "Pause" : "Play";
    ui.play.setAttribute("aria-pressed", String(playing));
    const ended = state.applied >= state.records.length;
    ui.panel.dataset.state = playing ? "playing" : ended ? "ended" : "paused";
    if (playing) {
      state.anchor = { wall: performance.now(), clock: clockOf(state.applied) };
      tick();
    }
  }

  function tick() {
    state.timer = null;
    if (!state.playing) return;
    const { wall, clock } = state.anchor;
    const now = clock + (performance.now() - wall) * speed();
    let k = state.applied;
    while (k < state.records.length && state.times[k] <= now) k += 1;
    if (k !== state.applied) show(k);
    if (state.applied >= state.records.length) {
      setPlaying(false);
      return;
    }
    const wait = (state.times[state.applied] - now) / speed();
    state.timer = setTimeout(tick, Math.max(0, wait));
  }

  /** Keep playing (or not) from the frame now shown, at the speed now chosen. */
  const reanchor = () => setPlaying(state.playing);

  function togglePlay() {
    if (!state?.ready) return;
    if (state.playing) {
      setPlaying(false);
      return;
    }
    if (state.applied >= state.records.length) show(0); // from the start again
    setPlaying(true);
  }

  // -- what a viewer had been sent -------------------------------------------------------

  function showViewers(reads) {
    const viewers = viewersOf(reads);
    const chosen = ui.viewer.value;
    ui.viewer.replaceChildren(
      ...viewers.map(({ viewer, name }) => {
        const option = document.createElement("option");
        option.value = viewer;
        option.textContent = name;
        return option;
      }),
    );
    if (viewers.some((v) => v.viewer === chosen)) ui.viewer.value = chosen;
    ui.sentForm.hidden = viewers.length === 0;
  }

  async function jumpToSent(event) {
    event.preventDefault();
    if (!state?.ready) return;
    const mine = state;
    const asked = epoch;
    const time = new Date(ui.at.value).getTime();
    const viewer = ui.viewer.value;
    if (!Number.isFinite(time) || !viewer) {
      note("Choose who, and a date and time.");
      return;
    }
    const name = ui.viewer.selectedOptions[0]?.textContent ?? viewer;
    let reads = mine.reads;
    try {
      reads = (await getAudit(mine.id)).reads; // receipts written since replay opened
    } catch {
      // what was had when replay opened is used
    }
    if (asked !== epoch) return;
    mine.reads = reads;
    const to = sentBy(reads, viewer, time);
    setPlaying(false);
    if (to === null) {
      show(0);
      setPlaying(false);
      note(`Nothing had been sent to ${name} by ${formatStamp(time)}.`);
      return;
    }
    if (to > offsetOf(mine.records.length)) {
      try {
        await load(mine); // the log has grown since replay opened
      } catch {
        // the frame stays within what was had
      }
      if (asked !== epoch) return;
    }
    const k = frameOf(to);
    show(k);
    setPlaying(false);
    note(`What ${name} had been sent by ${formatStamp(time)}: the log up to byte ${offsetOf(k)}.`);
  }

  function note(text) {
    ui.note.textContent = text;
    ui.note.hidden = !text;
  }

  // -- opening and closing ---------------------------------------------------------------

  async function load(mine) {
    const bytes = await getLog(mine.id);
    if (mine !== state) return;
    const { records, ends } = splitLog(bytes);
    const shrank = records.length < mine.applied; // not the log the frame came from
    mine.records = records;
    mine.ends = ends;
    mine.times = pace(records);
    if (shrank) show(0);
  }

  async function open(id) {
    close();
    epoch += 1;
    const asked = epoch;
    const mine = blank(id);
    state = mine;
    list.clear();
    ui.panel.hidden = false;
    ui.panel.dataset.state = "loading";
    ui.panel.dataset.offset = "0";
    ui.play.disabled = true;
    ui.timeline.disabled = true;
    ui.sentForm.hidden = true;
    ui.at.value = localInputValue(Date.now());
    ui.time.value = "loading the log…";
    note("");
    ui.play.focus();
    const audit = getAudit(id).then((body) => body.reads, () => null);
    mine.loaded = (async () => {
      try {
        await load(mine);
      } catch (error) {
        if (asked === epoch) note(`Could not load the log: ${error.message}`);
        throw error;
      }
      if (asked !== epoch) return;
      mine.ready = true;
      ui.play.disabled = false;
      ui.timeline.disabled = false;
      show(0);
      setPlaying(true);
    })();
    mine.loaded.catch(() => {});
    const reads = await audit;
    if (asked !== epoch) return;
    mine.reads = reads;
    if (reads !== null) showViewers(reads);
    await mine.loaded.catch(() => {});
  }

  function close() {
    epoch += 1;
    if (state) {
      clearTimeout(state.timer);
      if (state.pending !== null) cancelAnimationFrame(state.pending);
    }
    state = null;
    list.clear();
    ui.panel.hidden = true;
    delete ui.panel.dataset.state;
  }

  function exit() {
    close();
    onExit();
  }

  // -- controls ----------------------------------------------------------------------------

  ui.play.addEventListener("click", togglePlay);
  ui.speed.addEventListener("change", () => {
    if (state?.ready) reanchor();
  });
  // Scrubbing: the newest position is shown once a frame (input events come faster).
  ui.timeline.addEventListener("input", () => {
    if (!state?.ready || state.pending !== null) return;
    state.pending = requestAnimationFrame(() => {
      state.pending = null;
      show(Number(ui.timeline.value));
      reanchor();
    });
  });
  ui.exit.addEventListener("click", exit);
  ui.panel.addEventListener("keydown", (event) => {
    if (event.key === "Escape") exit();
  });
  ui.sentForm.addEventListener("submit", jumpToSent);

  /** Show the frame at `offset` (the most records ending at or before it), paused. */
  async function seek(offset) {
    const mine = state;
    if (!mine) return null;
    try {
      await mine.loaded;
    } catch {
      return null;
    }
    if (mine !== state) return null;
    show(frameOf(Number(offset)));
    setPlaying(false);
    return offsetOf(state.applied);
  }

  window.chatledgerReplay = {
    seek,
    get offset() {
      return state?.ready ? offsetOf(state.applied) : null;
    },
    get playing() {
      return state?.playing ?? false;
    },
  };

  return {
    open,
    close,
    active: () => state !== null,
    seek,
  };
}
