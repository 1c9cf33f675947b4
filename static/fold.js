// The fold of a conversation's records into what the page shows.
// Mirrors storage/fold.py `messages()`: the same records in the same order give the same
// messages, so a reload, a second device and a reconnect all converge on one view.

/** A fresh, empty view. */
export function emptyView() {
  return { conversation: null, title: "", messages: [], replies: new Map(), offset: 0 };
}

/**
 * Apply one record (a parsed log line) to a view, in place.
 * @param {object} view from emptyView()
 * @param {object} record a log record: {type, ts, ...}
 * @param {number} offset the record's event id: the byte offset just after it
 * @returns {object|null} the message the record changed (or null)
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
        reply_to: record.reply_to, model: record.model, usage: null, error: null,
      };
      view.replies.set(record.id, reply);
      view.messages.push(reply);
      return reply;
    }
    case "chunk": {
      const reply = view.replies.get(record.id);
      if (!reply) return null;
      reply.text += record.text || "";
      return reply;
    }
    case "end": {
      const reply = view.replies.get(record.id);
      if (!reply) return null;
      reply.finish = record.finish;
      reply.usage = record.usage ?? null;
      reply.error = record.error ?? null;
      return reply;
    }
    default:
      return null; // readers skip types they do not know
  }
}

/** The reply still streaming, if any (a start without an end). */
export function runningReply(view) {
  for (let i = view.messages.length - 1; i >= 0; i--) {
    const message = view.messages[i];
    if (message.role === "assistant" && message.finish === null) return message;
  }
  return null;
}

/** Record types the stream carries (each an SSE `event:` name). */
export const RECORD_TYPES = ["conversation", "title", "user", "start", "chunk", "end"];
