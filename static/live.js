// Following one conversation's event stream (DESIGN.md "SSE stream"): EventSource, its
// reconnects, a restart (the caller rebuilds its view and says where to reopen) when the
// server refuses the stream, and a watchdog for a reply that goes quiet. No DOM:
// connection states go to a callback.

/** How long to wait before restarting a refused stream (and between failed tries), in ms. */
export const RESTART_DELAY_MS = 3000;
/** How often the watchdog looks, and how long without an event counts as a stall, in ms. */
export const WATCH_EVERY_MS = 5000;
export const STALL_AFTER_MS = 10000;
/** Reconnecting for this long with no stream opened: the state says "lost" (still trying). */
export const LOST_AFTER_MS = 15000;

/**
 * Open the event stream at `from` and keep following it.
 *
 * Each event is one log record: `event.data` is the record's JSON line, `event.lastEventId`
 * the byte offset just after it. After a dropped connection EventSource resumes by itself
 * with `Last-Event-ID`, so records arrive with no gap and no duplicate (before the first
 * event it reconnects to the URL it opened, i.e. at `from`). When the server refuses the
 * stream (the EventSource closes: e.g. 404, or 416 for an offset it does not have),
 * `restart` is called after RESTART_DELAY_MS: the caller drops what it folded, rebuilds
 * its view (say, from a new page of the conversation) and gives the offset that view
 * reflects, where the stream reopens. A `restart` that fails is tried again after
 * RESTART_DELAY_MS.
 *
 * @param {object} options
 * @param {(from: number) => string} options.url the events URL starting at a byte offset
 * @param {number} [options.from] the first offset (a record boundary, bytes); default 0
 * @param {string[]} options.types the SSE event names (record types) to listen for
 * @param {(record: object, offset: number) => void} options.onRecord each record, in order
 * @param {(state: "connecting"|"live"|"reconnecting"|"lost", label: string) => void}
 *   options.onState the connection state, with a label for people
 * @param {() => (number|Promise<number>)} options.restart the stream was refused: rebuild
 *   the view and return (or resolve to) the offset to reopen at
 * @param {() => boolean} [options.waiting] whether an event is due now (a reply runs)
 * @param {() => void} [options.onStall] every WATCH_EVERY_MS while `waiting()` and no
 *   event came for STALL_AFTER_MS
 * @returns {{close: () => void}} stop following: closes the stream and the watchdog
 */
export function follow(options) {
  const { url, types, onRecord, onState, restart } = options;
  const waiting = options.waiting ?? (() => false);
  const onStall = options.onStall ?? (() => {});
  let source = null;
  let closed = false;
  let restartTimer = null;
  let lastEventAt = Date.now();
  let reconnectingSince = null; // when EventSource began retrying, while it does

  function connect(from) {
    source = new EventSource(url(from));
    const opened = source;
    onState("connecting", "connecting…");
    opened.onopen = () => {
      reconnectingSince = null;
      if (!closed) onState("live", "live");
    };
    opened.onerror = () => {
      if (closed || opened !== source) return;
      if (opened.readyState === EventSource.CONNECTING) {
        reconnectingSince ??= Date.now();
        if (Date.now() - reconnectingSince < LOST_AFTER_MS) {
          onState("reconnecting", "connection lost, reconnecting…");
        } else {
          onState("lost", "connection lost, still trying (Check my connection?)");
        }
        return;
      }
      reconnectingSince = null;
      onState("lost", "connection lost"); // CLOSED: the server refused the stream
      scheduleRestart();
    };
    const onEvent = (event) => {
      if (closed || opened !== source) return;
      lastEventAt = Date.now();
      onRecord(JSON.parse(event.data), Number(event.lastEventId));
    };
    for (const type of types) opened.addEventListener(type, onEvent);
  }

  function scheduleRestart() {
    restartTimer = setTimeout(async () => {
      if (closed) return;
      let from;
      try {
        from = await restart();
      } catch {
        if (!closed) scheduleRestart(); // the state stays "lost" until a stream opens
        return;
      }
      if (!closed) connect(from);
    }, RESTART_DELAY_MS);
  }

  const watchdog = setInterval(() => {
    if (!closed && waiting() && Date.now() - lastEventAt >= STALL_AFTER_MS) onStall();
    // EventSource retries quietly between its errors: a long silence is "lost"
    if (!closed && reconnectingSince !== null && Date.now() - reconnectingSince >= LOST_AFTER_MS) {
      onState("lost", "connection lost, still trying (Check my connection?)");
    }
  }, WATCH_EVERY_MS);

  connect(options.from ?? 0);
  return {
    close() {
      closed = true;
      clearInterval(watchdog);
      clearTimeout(restartTimer);
      if (source) source.close();
    },
  };
}
