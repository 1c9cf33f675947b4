// Seen receipts (DESIGN.md "The audit log": `seen`): while the tab is visible, the page
// tells the server how far into the log it has rendered, so the audit can say not only
// what was sent to a person but what their page showed. No DOM of its own beyond
// document.visibilityState; the report itself is a callback (api.js markSeen).
//
// The offset reported is always a record boundary the page has rendered: the event id of
// the last record folded and shown, or the `offset` of the page it opened. Reports are
// debounced: at most one every REPORT_EVERY_MS, and one more at once when a reply ends
// (`flush`) or the tab becomes visible; never for an offset already reported, never while
// the tab is hidden or the live view is not on screen (`hold`). A failed report is
// dropped quietly: receipts are best effort and must never bother the person.

/** The page's version, as each `seen` names it (`renderer`). */
export const RENDERER = "chatledger-page/1";

/** The least time between two reports, in ms. */
export const REPORT_EVERY_MS = 2000;

/**
 * Seen receipts for the conversation open on the page.
 * @param {(id: string, offset: number) => Promise<unknown>} report sends one receipt
 * @param {{every?: number, now?: () => number}} [options] `every`: REPORT_EVERY_MS
 * @returns {{open: (id: string|null) => void, rendered: (offset: number) => void,
 *   flush: () => void, hold: (held: boolean) => void}}
 *   `open`: a conversation opened (null: none is); `rendered`: the live view now shows
 *   every record before `offset`; `flush`: report now (a reply ended); `hold(true)`: the
 *   live view is off screen (replay shows instead), `hold(false)`: it is back
 */
export function createSeen(report, { every = REPORT_EVERY_MS, now = () => Date.now() } = {}) {
  let id = null;
  /** The highest offset rendered, and the highest reported, of conversation `id`. */
  let rendered = -1;
  let reported = -1;
  let lastAt = -Infinity;
  let timer = null;
  let held = false;

  const visible = () => document.visibilityState === "visible" && !held;

  function cancel() {
    clearTimeout(timer);
    timer = null;
  }

  function schedule() {
    if (timer !== null || !visible() || id === null || rendered <= reported) return;
    timer = setTimeout(send, Math.max(0, lastAt + every - now()));
  }

  function send() {
    cancel();
    if (!visible() || id === null || rendered <= reported) return;
    const asked = id;
    const offset = rendered;
    const before = reported;
    reported = offset;
    lastAt = now();
    Promise.resolve()
      .then(() => report(asked, offset))
      .catch(() => {
        // quietly: a later render may report it (or more) again
        if (id === asked && reported === offset) reported = before;
      });
  }

  document.addEventListener("visibilitychange", () => {
    if (document.visibilityState === "visible") send();
    else cancel();
  });

  return {
    open(conversationId) {
      cancel();
      id = conversationId;
      rendered = -1;
      reported = -1;
    },
    rendered(offset) {
      if (id === null || !Number.isInteger(offset) || offset <= rendered) return;
      rendered = offset;
      schedule();
    },
    flush: send,
    hold(value) {
      held = value;
      if (held) cancel();
      else send();
    },
  };
}
