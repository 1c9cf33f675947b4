// The fold of a conversation's records into what the page shows (pure: no DOM, no network).
// One algorithm in two languages with storage/fold.py: `messages` is `messages()`, `title`
// and `openReplies` are `Summary.title` and `Summary.open_replies`. The same records in the
// same order give the same view, so a reload, a second device and a reconnect all converge.
// tests/fold_fixtures.json holds the cases both must agree on (tests/test_fold.py runs them
// through Python, tests/js/fold.test.mjs through this file).
//
// The page does not fold from offset 0: it starts from a page of the newest messages that
// the server folded (`viewFrom`, from `GET /api/conversations/{id}?limit=N`), folds the
// records after that page's `offset` onto it, and puts older pages in front as the person
// scrolls up (`prependMessages`). tests/fold_page_fixtures.json holds those cases: pages
// that tests/test_fold_page.py checks against storage/fold.py, the records after them,
// and the view that must come out (tests/js/fold_page.test.mjs).

/**
 * A folded message, the same object storage/fold.py's `messages()` gives.
 * @typedef {object} Message
 * @property {string} id message id (user) or reply id (assistant)
 * @property {"user"|"assistant"} role
 * @property {string} text the whole text so far (an assistant reply grows chunk by chunk)
 * @property {string|null} finish null for user messages and for replies with no `end` yet;
 *   else "stop" | "length" | "cancelled" | "error" | "interrupted"
 * @property {string|null} [reply_to] assistant only: the user message id it answers
 * @property {string|null} [model] assistant only
 * @property {object|null} [usage] assistant only: the `end` record's usage (token counts)
 * @property {string|null} [error] assistant only: the `end` record's error text
 */

/**
 * The view of one conversation.
 * @typedef {object} View
 * @property {object|null} conversation the `conversation` record (first of the log), or
 *   the conversation's `id`, `title`, `model` and `system` from a page
 * @property {string} title the current title ("" when none)
 * @property {Message[]} messages in log order
 * @property {Map<string, Message>} replies assistant messages by reply id (the latest
 *   `start` of an id: its chunks and `end` go there)
 * @property {Set<string>} openReplies reply ids with a `start` and no `end`, oldest first
 * @property {number} offset byte offset just after the last record applied (its event id)
 */

/**
 * A fresh, empty view: the fold of no records.
 * @returns {View}
 */
export function emptyView() {
  return {
    conversation: null, title: "", messages: [], replies: new Map(), openReplies: new Set(),
    offset: 0,
  };
}

/**
 * A page of a conversation as the server answers `GET /api/conversations/{id}?limit=N`.
 * @typedef {object} Page
 * @property {string} [id] conversation id
 * @property {string} [title]
 * @property {string} [model]
 * @property {string|null} [system]
 * @property {Message[]} messages the newest messages of the current path, oldest first,
 *   as storage/fold.py folds them (a reply still streaming: its text so far, finish null)
 * @property {boolean} more whether older messages exist before the first one
 * @property {number} offset the committed offset the page reflects: the stream opens here
 * @property {string|null} [running] the reply the server is running, or null
 * @property {boolean} [writable] false when the log can no longer be written
 */

/**
 * The view a page of the server's fold stands for: the fold of the log up to
 * `page.offset`, of which only the page's messages are known. Records from `page.offset`
 * on fold onto it as onto any view; a `chunk` of a reply in the page appends to it.
 *
 * A reply with `finish: null` counts as open (more of it may come) when the server runs
 * it (`page.running`), or when the log can no longer be written (`writable: false`: it
 * will never get its `end`, and the page says so). A page that does not say what runs
 * (no `running` field) counts every reply with `finish: null` as open.
 * @param {Page} page
 * @returns {View}
 */
export function viewFrom(page) {
  const view = emptyView();
  if (page.id !== undefined) {
    view.conversation = {
      id: page.id, title: page.title ?? "", model: page.model ?? null, system: page.system ?? null,
    };
  }
  view.title = page.title || "";
  view.offset = page.offset ?? 0;
  const told = Object.hasOwn(page, "running");
  for (const message of page.messages ?? []) {
    view.messages.push(message);
    if (message.role !== "assistant") continue;
    view.replies.set(message.id, message);
    const open = !told || page.running === message.id || page.writable === false;
    if (message.finish === null && open) view.openReplies.add(message.id);
  }
  return view;
}

/**
 * Put an older page's messages in front of the view's, in place. The older page is the
 * one asked for with `before=<id of view.messages[0]>`, so together they are contiguous,
 * with no gap; as a guard, a message whose id the view already holds is left out (never
 * shown twice). A reply id the view knows keeps pointing at its newer message.
 * @param {View} view
 * @param {Message[]} older oldest first
 * @returns {Message[]} the messages put in front, oldest first
 */
export function prependMessages(view, older) {
  const held = new Set(view.messages.map((message) => message.id));
  const added = older.filter((message) => !held.has(message.id));
  for (const message of added) {
    if (message.role === "assistant" && !view.replies.has(message.id)) {
      view.replies.set(message.id, message);
    }
  }
  if (added.length) view.messages.unshift(...added);
  return added;
}

/**
 * Apply one record (a parsed log line) to a view, in place. Records of unknown type, and
 * chunks or ends of unknown replies, change nothing but `offset`.
 * @param {View} view from emptyView() or viewFrom()
 * @param {object} record a log record: {type, ts, ...}
 * @param {number} offset the record's event id: the byte offset just after it
 * @returns {Message|null} the message the record changed, or null
 */
export function applyRecord(view, record, offset) {
  view.offset = offset;
  switch (record.type) {
    case "conversation":
      view.conversation = record;
      view.title = record.title || "";
      return null;
    case "title":
      view.title = record.title || "";
      return null;
    case "user": {
      const message = { id: record.id, role: "user", text: record.text, finish: null };
      view.messages.push(message);
      return message;
    }
    case "start": {
      const reply = {
        id: record.id, role: "assistant", text: "", finish: null,
        reply_to: record.reply_to ?? null, model: record.model ?? null, usage: null, error: null,
      };
      view.replies.set(record.id, reply);
      view.openReplies.add(record.id);
      view.messages.push(reply);
      return reply;
    }
    case "chunk": {
      const reply = view.replies.get(record.id);
      if (!reply) return null;
      reply.text += record.text ?? "";
      return reply;
    }
    case "end": {
      view.openReplies.delete(record.id);
      const reply = view.replies.get(record.id);
      if (!reply) return null;
      reply.finish = record.finish ?? null;
      reply.usage = record.usage ?? null;
      reply.error = record.error ?? null;
      return reply;
    }
    default:
      return null; // readers skip types they do not know
  }
}

/**
 * The reply still streaming, if any: the newest one with a `start` and no `end`.
 * @param {View} view
 * @returns {Message|null}
 */
export function runningReply(view) {
  let id = null;
  for (const open of view.openReplies) id = open; // a Set keeps insertion order
  return id === null ? null : view.replies.get(id) ?? null;
}

/**
 * Whether a reply has a `start` and no `end` yet.
 * @param {View} view
 * @param {string} id reply id
 * @returns {boolean}
 */
export function isOpen(view, id) {
  return view.openReplies.has(id);
}

/** Record types the fold understands (each an SSE `event:` name); the stream may carry more. */
export const RECORD_TYPES = ["conversation", "title", "user", "start", "chunk", "end"];
