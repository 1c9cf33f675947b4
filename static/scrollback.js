// Older messages as the person scrolls up: an IntersectionObserver on the line above the
// oldest message shown (view.js `top`) asks for the next older ones whenever that line
// comes within MARGIN_PX of the visible part of the list, until none is left. No network
// and no rendering of its own: `loadOlder` (app.js) does both.

/** How far above the visible part of the list the top may be for a load to start. */
export const MARGIN_PX = 300;
/** How long to wait after a failed load before the top is looked at again, in ms. */
export const RETRY_MS = 3000;

/**
 * Watch the top of a scrolling list.
 *
 * One load runs at a time. After each, the top is observed anew: `observe()` reports the
 * top's current state once, so a top still in view (older messages too short to fill
 * the list) loads the next page at once, and a top scrolled out of view waits.
 * @param {HTMLElement} root the scrolling box (#messages)
 * @param {HTMLElement} top the element above the oldest message
 * @param {() => Promise<boolean>} loadOlder shows the next older messages; resolves
 *   to whether still older messages exist. A rejection is tried again after RETRY_MS.
 * @returns {{stop: () => void}} stop watching (a load already under way still runs to
 *   its end: `loadOlder` checks that its page is still wanted before showing it)
 */
export function watchTop(root, top, loadOlder) {
  let stopped = false;
  let loading = false;
  let retry = null;
  const observer = new IntersectionObserver(
    (entries) => {
      if (entries.some((entry) => entry.isIntersecting)) load();
    },
    { root, rootMargin: `${MARGIN_PX}px 0px 0px 0px` },
  );

  async function load() {
    if (stopped || loading) return;
    loading = true;
    observer.unobserve(top);
    let more = true;
    let failed = false;
    try {
      more = await loadOlder();
    } catch {
      failed = true;
    } finally {
      loading = false;
    }
    if (stopped || !more) return;
    if (failed) {
      retry = setTimeout(() => {
        if (!stopped) observer.observe(top);
      }, RETRY_MS);
    } else {
      observer.observe(top);
    }
  }

  observer.observe(top);
  return {
    stop() {
      stopped = true;
      clearTimeout(retry);
      observer.disconnect();
    },
  };
}
