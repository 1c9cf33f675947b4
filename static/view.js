// Rendering: a folded view (fold.js) into the page's elements. No network calls, no state
// but the DOM nodes it made. A message's text, exactly as the log has it, is kept in one
// text node (`.text`), appended to as a reply streams, so keeping it costs O(n) in all.
// User text is shown as that text. Model text is shown as Markdown (markdown.js: rendered
// and sanitized) in a `.markdown` element next to it, the `.text` one then hidden: a
// streaming reply is re-rendered at most once per animation frame, however many chunks
// the frame brought. The live view and the replay (replay.js) both draw through here.

import { renderActions } from "./branches.js";
import { isOpen } from "./fold.js";
import { copyCode, createMarkdownView } from "./markdown.js";

/**
 * What one message's element shows of it.
 * @typedef {object} Entry
 * @property {HTMLElement} node the <article class="message ...">
 * @property {HTMLElement} body its <div class="text">
 * @property {HTMLElement} meta its <span class="meta"> (finish, token count)
 * @property {HTMLElement} actions its <div class="actions"> (branches.js)
 * @property {Text} text the text node inside `body` that the message's text goes into
 * @property {HTMLElement|null} markdown its <div class="markdown"> (model text), else null
 * @property {{draw: (text: string) => void}|null} view what draws into `markdown`
 * @property {boolean} drawn whether `markdown` shows `text` as it stands
 * @property {object} message the folded message last rendered here
 * @property {number} shown how many UTF-16 code units of `message.text` `text` holds
 */

/**
 * The message list of one conversation, rendered incrementally into `container`.
 *
 * Its first child is `top`, a line above the oldest message shown ("older messages…"),
 * visible while older messages are still to be loaded: scrollback.js watches it, and
 * `prepend` puts the older messages between it and the rest.
 * @param {HTMLElement} container the #messages element (the scrolling box)
 * @param {{actions?: boolean}} [options] `actions`: draw each message's branch actions
 *   (branches.js; default true; the replay draws none)
 * @returns {{top: HTMLElement, show: (view: object, state?: object) => void,
 *   render: (view: object, changed: object|null, state?: {failed?: boolean}) => void,
 *   prepend: (view: object, older: object[], state?: object) => void,
 *   clear: () => void}} (`state`: {from?: number, failed?: boolean, more?: boolean})
 *   `show` replaces the list with the messages of a view from index `from` on (a page
 *   just opened) and scrolls to the newest; `render` shows the message a record changed
 *   (`changed`, from fold.js applyRecord), keeping the list scrolled to the bottom if it
 *   was there; `prepend` puts older messages of the view above the others without moving
 *   what is on screen; `more` says whether `top` stays; `clear` empties the list
 */
export function createMessageList(container, { actions: actionsOn = true } = {}) {
  /** @type {Map<string, Entry>} */
  const entries = new Map();
  const top = document.createElement("div");
  top.className = "older";
  top.textContent = "older messages…";
  top.hidden = true;
  /** While changes of this frame are rendered: whether the list is to stay at the bottom. */
  let stick = null;
  /** Entries whose Markdown is to be drawn anew in the next frame. */
  const stale = new Set();
  /** The next frame's callback, once asked for. */
  let frame = 0;
  container.addEventListener("click", copyCode);

  // Once per frame: the Markdown of the replies that changed, then the scroll to the
  // bottom if the list was there (after the text grew, so it really is the bottom).
  function nextFrame() {
    frame = 0;
    for (const entry of stale) draw(entry);
    stale.clear();
    if (stick) container.scrollTop = container.scrollHeight;
    stick = null;
  }

  function schedule() {
    if (!frame) frame = requestAnimationFrame(nextFrame);
  }

  function build(message) {
    const node = document.createElement("article");
    node.dataset.id = message.id;
    const body = document.createElement("div");
    body.className = "text";
    const text = document.createTextNode("");
    body.append(text);
    const meta = document.createElement("span");
    meta.className = "meta";
    const actions = document.createElement("div");
    actions.className = "actions";
    actions.hidden = true;
    let markdown = null;
    if (message.role === "assistant") {
      markdown = document.createElement("div");
      markdown.className = "markdown";
      body.hidden = true;
      node.append(body, markdown, meta, actions);
    } else {
      node.append(body, meta, actions);
    }
    const view = markdown && createMarkdownView(markdown);
    const entry = {
      node, body, meta, actions, text, message, shown: 0, markdown, view, drawn: true,
    };
    entries.set(message.id, entry);
    return entry;
  }

  // `now`: draw the Markdown at once (a page shown or prepended), else in the next frame.
  function update(view, entry, message, failed, now = true) {
    if (renderText(entry, message)) entry.drawn = false;
    if (entry.markdown && !entry.drawn) {
      if (now) {
        stale.delete(entry);
        draw(entry);
      } else {
        stale.add(entry);
        schedule();
      }
    }
    const open = isOpen(view, message.id);
    renderStatus(entry, message, open, failed);
    if (actionsOn) renderActions(entry.actions, message, open);
  }

  function clear() {
    entries.clear();
    stale.clear();
    top.hidden = true;
    container.replaceChildren(top);
  }

  return {
    top,
    show(view, { from = 0, failed = false, more = false } = {}) {
      clear();
      const fragment = document.createDocumentFragment();
      for (const message of view.messages.slice(from)) {
        if (entries.has(message.id)) continue;
        const entry = build(message);
        update(view, entry, message, failed);
        fragment.append(entry.node);
      }
      container.append(fragment);
      top.hidden = !more;
      container.scrollTop = container.scrollHeight;
    },
    render(view, changed, { failed = false } = {}) {
      if (!changed) return;
      // Whether the list was at the bottom is read once per frame, before the frame's
      // first change, and the list follows the bottom once, in the next frame: a burst of
      // records (a stream catching up) costs one layout a frame, not one per record.
      if (stick === null) {
        stick = container.scrollHeight - container.scrollTop - container.clientHeight < 80;
        schedule();
      }
      let entry = entries.get(changed.id);
      if (!entry) {
        entry = build(changed);
        container.append(entry.node);
      }
      update(view, entry, changed, failed, false);
    },
    prepend(view, older, { failed = false, more = false } = {}) {
      // What is on screen stays put: the list grows above it by exactly the height added
      // (style.css turns the browser's own scroll anchoring off for #messages).
      const height = container.scrollHeight;
      const scrolled = container.scrollTop;
      const fragment = document.createDocumentFragment();
      for (const message of older) {
        if (entries.has(message.id)) continue;
        const entry = build(message);
        update(view, entry, message, failed);
        fragment.append(entry.node);
      }
      top.after(fragment);
      top.hidden = !more;
      container.scrollTop = scrolled + (container.scrollHeight - height);
    },
    clear,
  };
}

/**
 * Bring a message's text on the page up to `message.text`.
 *
 * The fold only ever appends to a message's text, so what is new is the tail past
 * `entry.shown`: it is appended to the one text node (`appendData`), never set anew.
 * Should the text not have grown from what is shown (another message under the same id),
 * the node's text is replaced once.
 *
 * @param {Entry} entry
 * @param {{text: string}} message
 * @returns {boolean} whether the text changed
 */
function renderText(entry, message) {
  const text = message.text ?? "";
  let changed = false;
  if (entry.message !== message || text.length < entry.shown) {
    entry.message = message;
    changed = entry.text.data !== text;
    if (changed) entry.text.data = text;
  } else if (text.length > entry.shown) {
    entry.text.appendData(text.slice(entry.shown));
    changed = true;
  }
  entry.shown = text.length;
  return changed;
}

/**
 * Show a model message's text, as it stands, as Markdown (markdown.js: its last blocks
 * rendered and sanitized anew), so what a reply shows mid-stream is what the same text
 * shows once it ended, and on reload. Announced on `document` as `chatledger:drawn`
 * (detail: {id}): what a test counts.
 * @param {Entry} entry
 */
function draw(entry) {
  entry.view.draw(entry.text.data);
  entry.drawn = true;
  const detail = { id: entry.message.id };
  document.dispatchEvent(new CustomEvent("chatledger:drawn", { detail }));
}

function renderStatus(entry, message, open, failed) {
  const { node, meta } = entry;
  let className = `message ${message.role}`;
  let line = "";
  if (message.role === "assistant") {
    const finish = message.finish ?? "";
    if (node.dataset.finish !== finish) node.dataset.finish = finish;
    if (open && failed) {
      className += " finish-error";
      line = "stopped: the server could not save more of this reply";
    } else if (open) {
      className += " generating";
    } else {
      if (finish) className += ` finish-${finish}`;
      line = describeFinish(message);
    }
  }
  if (node.className !== className) node.className = className;
  setText(meta, line);
}

function setText(element, text) {
  if (element.textContent !== text) element.textContent = text;
}

/**
 * The line under a finished reply.
 * @param {{finish: string|null, usage: object|null, error: string|null}} message
 * @returns {string} e.g. "42 tokens", "stopped", "error: ..."
 */
export function describeFinish(message) {
  switch (message.finish) {
    case "stop": return message.usage?.completion_tokens ? `${message.usage.completion_tokens} tokens` : "";
    case "length": return "stopped at the length limit";
    case "cancelled": return "stopped";
    case "interrupted": return "interrupted (the server stopped)";
    case "error": return `error: ${message.error || "the reply failed"}`;
    default: return message.finish ?? "";
  }
}

/**
 * The header and composer for a view: title, the tab's title, and which of text, Send and
 * Stop can be used (Send waits while a reply runs; nothing can be sent to a failed log).
 * @param {{title: HTMLElement, text: HTMLTextAreaElement, send: HTMLButtonElement,
 *   stop: HTMLButtonElement}} ui
 * @param {object} view from fold.js
 * @param {{running: boolean, failed: boolean}} state
 */
export function renderControls(ui, view, { running, failed }) {
  showTitle(ui.title, view.title || "New chat");
  // FSI .. PDI (UAX #9 isolates): bidi controls in the title cannot reorder the rest.
  document.title = `\u2068${view.title || "chat"}\u2069 · chatledger`;
  ui.text.disabled = failed;
  ui.send.disabled = running || failed;
  ui.stop.hidden = !running;
}

/**
 * Show a conversation title as the only content of `element`, bidi-isolated: in a
 * `<bdi class="title" dir="auto">` (style.css: `unicode-bidi: isolate`), so the title's
 * direction comes from its own first strong character, and bidi controls in it (U+202E
 * RIGHT-TO-LEFT OVERRIDE, say) cannot reorder anything around it (UAX #9 isolates).
 * The title is inserted as text, exactly as the log has it.
 * @param {HTMLElement} element the sidebar link, or the #chat-title heading
 * @param {string} title
 */
export function showTitle(element, title) {
  let bdi = element.firstElementChild;
  if (element.childNodes.length !== 1 || !bdi?.matches("bdi.title")) {
    bdi = document.createElement("bdi");
    bdi.className = "title";
    bdi.dir = "auto";
    element.replaceChildren(bdi);
  }
  setText(bdi, title);
}

/**
 * Show an error line, or hide it.
 * @param {HTMLElement} element the #error element
 * @param {string} [message] nothing or "" hides it
 */
export function showError(element, message) {
  element.textContent = message || "";
  element.hidden = !message;
}

/**
 * Show the connection state.
 * @param {HTMLElement} element the #connection element (style.css colours by data-state)
 * @param {string} state "connecting" | "live" | "reconnecting" | "lost"
 * @param {string} label what people read
 */
export function showConnection(element, state, label) {
  element.dataset.state = state;
  element.textContent = label;
}
