// The fold of a conversation's records into what the page shows (pure: no DOM, no network).
// One algorithm in two languages with storage/fold.py: `messages` is `messages()`, `title`
// and `openReplies` are `Summary.title` and `Summary.open_replies`. The same records in the
// same order give the same view, so a reload, a second device and a reconnect all converge.
// tests/fold_fixtures.json holds the cases both must agree on (tests/test_fold.py runs them
// through Python, tests/js/fold.test.mjs through this file).

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
 * @property {object|null} conversation the `conversation` record (first of the log)
 * @property {string} title the current title ("" when none)
 * @property {Message[]} messages in log order
 * @property {Map<string, Message>} replies assistant messages by reply id
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
 * Apply one record (a parsed log line) to a view, in place. Records of unknown type, and
 * chunks or ends of unknown replies, change nothing but `offset`.
 * @param {View} view from emptyView()
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
