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
 * @property {string|null} parent the id of the message it follows (null: a first message)
 * @property {string[]} siblings the ids of the messages with the same parent, itself too,
 *   oldest first (one array shared by those siblings the view holds)
 * @property {string|null} [reply_to] assistant only: the user message id it answers
 * @property {string|null} [model] assistant only
 * @property {object|null} [usage] assistant only: the `end` record's usage (token counts)
 * @property {string|null} [error] assistant only: the `end` record's error text
 */

/**
 * The view of one conversation: a tree of messages (DESIGN.md "Branches, not overwrites")
 * and its current path, as storage/fold.py's `Folded` keeps them.
 * @typedef {object} View
 * @property {object|null} conversation the `conversation` record (first of the log), or
 *   the conversation's `id`, `title`, `model` and `system` from a page
 * @property {string} title the current title ("" when none)
 * @property {Message[]} messages the current path, oldest first: what the page shows
 * @property {Map<string, Message>} nodes every message the view holds, by id (the first
 *   of an id), of every branch
 * @property {Map<string|null, string[]>} children the ids of each message's children
 *   (key null: the first messages), oldest first, as far as the view knows them
 * @property {Map<string, number>} order where each message the view holds stands in the
 *   log, as numbers that only compare (older is smaller); `span` is [lowest, highest]
 *   given so far
 * @property {string|null} older the parent of the oldest message the pages held (null: they
 *   reach the first message): older messages the server holds, not yet asked for
 * @property {string|null} current the id of the current leaf
 * @property {boolean} whole whether the view was folded from the log's first record (it
 *   then holds every message), not from a page
 * @property {Map<string, Message>} replies assistant messages by reply id (the latest
 *   `start` of an id: its chunks and `end` go there)
 * @property {Set<string>} openReplies reply ids with a `start` and no `end`, oldest first
 * @property {boolean} stale the current path runs through a message whose text the view
 *   does not hold (a page shows the newest of one path only): open the page anew
 * @property {boolean} reshaped the current path changed other than at its end since
 *   this flag was last cleared (a new branch, a `select`): draw the whole path anew
 * @property {number} offset byte offset just after the last record applied (its event id)
 */

/**
 * A fresh, empty view: the fold of no records.
 * @returns {View}
 */
export function emptyView() {
  return {
    conversation: null, title: "", messages: [], nodes: new Map(), children: new Map(),
    order: new Map(), span: [0, 0], older: null, current: null, whole: true,
    replies: new Map(), openReplies: new Set(), stale: false, reshaped: false, offset: 0,
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
  view.whole = false;
  if (page.id !== undefined) {
    view.conversation = {
      id: page.id, title: page.title ?? "", model: page.model ?? null, system: page.system ?? null,
    };
  }
  view.title = page.title || "";
  view.offset = page.offset ?? 0;
  const told = Object.hasOwn(page, "running");
  const messages = page.messages ?? [];
  hold(view, messages);
  for (const message of messages) {
    if (message.role !== "assistant") continue;
    view.replies.set(message.id, message);
    const open = !told || page.running === message.id || page.writable === false;
    if (message.finish === null && open) view.openReplies.add(message.id);
  }
  view.current = messages.length ? messages[messages.length - 1].id : null;
  view.older = messages.length ? messages[0].parent : null;
  view.messages = messages.slice();
  return view;
}

// Take a page's messages (a stretch of one path, oldest first, older than every message
// the view holds) into the view's tree.
function hold(view, messages) {
  view.span[0] -= messages.length;
  let first = view.span[0];
  for (const message of messages) {
    view.order.set(message.id, first);
    first += 1;
    message.parent ??= null;
    let siblings = message.siblings ?? [message.id];
    const held = view.children.get(message.parent);
    if (held && held.length >= siblings.length) {
      siblings = held;
    } else {
      // the fuller list: every held sibling shares it (new siblings are pushed onto it)
      view.children.set(message.parent, siblings);
      for (const id of held ?? []) {
        const sibling = view.nodes.get(id);
        if (sibling) sibling.siblings = siblings;
      }
    }
    message.siblings = siblings;
    if (!view.nodes.has(message.id)) view.nodes.set(message.id, message);
  }
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
  const added = older.filter((message) => !held.has(message.id) && !view.nodes.has(message.id));
  hold(view, added);
  for (const message of added) {
    if (message.role === "assistant" && !view.replies.has(message.id)) {
      view.replies.set(message.id, message);
    }
  }
  if (added.length) {
    view.messages.unshift(...added);
    view.older = added[0].parent;
  }
  return added;
}

/**
 * Apply one record (a parsed log line) to a view, in place. Records of unknown type, and
 * chunks or ends of unknown replies, change nothing but `offset`. The parent of a message
 * is found as storage/fold.py `Folded` finds it: the one its record names (a `user`'s
 * `parent`, a `start`'s `reply_to`), else what the original of an edit (`edit_of`) or of
 * another answer (`regenerate_of`) follows, else the current leaf.
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
      add(view, message, userParent(view, record));
      return message;
    }
    case "start": {
      const reply = {
        id: record.id, role: "assistant", text: "", finish: null,
        reply_to: record.reply_to ?? null, model: record.model ?? null, usage: null, error: null,
      };
      add(view, reply, replyParent(view, record));
      view.replies.set(record.id, reply);
      view.openReplies.add(record.id);
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
    case "select":
      select(view, record.leaf);
      return null;
    default:
      return null; // readers skip types they do not know
  }
}

function isId(value) {
  return typeof value === "string";
}

function userParent(view, record) {
  if (Object.hasOwn(record, "parent") && (record.parent === null || isId(record.parent))) {
    return record.parent;
  }
  const original = isId(record.edit_of) ? view.nodes.get(record.edit_of) : undefined;
  return original ? original.parent : view.current;
}

function replyParent(view, record) {
  if (isId(record.reply_to)) return record.reply_to;
  const original = isId(record.regenerate_of) ? view.nodes.get(record.regenerate_of) : undefined;
  return original ? original.parent : view.current;
}

function add(view, message, parent) {
  message.parent = parent;
  // The view knows the children of every message it holds and of what the pages' messages
  // follow; under another one (a branch made on another device) its siblings are unknown.
  const unknown = !view.nodes.has(parent) && !view.children.has(parent);
  if (!view.whole && view.nodes.size > 0 && unknown) view.stale = true;
  let siblings = view.children.get(parent);
  if (!siblings) {
    siblings = [];
    view.children.set(parent, siblings);
  }
  siblings.push(message.id);
  message.siblings = siblings;
  if (!view.nodes.has(message.id)) {
    view.nodes.set(message.id, message);
    view.span[1] += 1;
    view.order.set(message.id, view.span[1]);
  }
  const last = view.messages[view.messages.length - 1];
  const extendsPath = last === undefined ? parent === view.older : last.id === parent;
  view.current = message.id;
  if (extendsPath) {
    view.messages.push(message);
  } else {
    retrace(view, message);
  }
}

// `select`: the newest message under the named one (itself when it has none), among the
// messages the view holds. A view folded from the first record holds every message: a
// name it does not hold is no message (as storage/fold.py, nothing changes); a view from
// a page holds one path, and a branch it does not hold makes it `stale`.
function select(view, leaf) {
  if (!isId(leaf)) return;
  let newest = null;
  const stack = [leaf];
  const seen = new Set(); // a log whose parents name each other cannot make this loop
  while (stack.length) {
    const id = stack.pop();
    if (seen.has(id)) continue;
    seen.add(id);
    if (!view.nodes.has(id)) {
      if (!view.whole) view.stale = true;
      return;
    }
    if (newest === null || view.order.get(id) > view.order.get(newest)) newest = id;
    stack.push(...(view.children.get(id) ?? []));
  }
  view.current = newest;
  retrace(view, view.nodes.get(newest));
}

// The current path anew, from `leaf` up through the messages the view holds; where it
// stops short of a first message, `older` is what it follows (older pages bring it).
function retrace(view, leaf) {
  const path = [];
  const seen = new Set(); // as storage/fold.py: a parent is a message held before it
  for (let message = leaf; message && !seen.has(message); ) {
    seen.add(message);
    path.push(message);
    if (message.parent === null) break;
    const parent = view.nodes.get(message.parent);
    if (parent && view.order.get(parent.id) >= view.order.get(message.id)) break;
    message = parent;
  }
  path.reverse();
  view.messages = path;
  view.older = path[0].parent;
  view.reshaped = true;
}

/**
 * The messages of the current path the page holds, oldest first, each as
 * storage/fold.py's `messages()` gives it (what tests/fold_fixtures.json compares).
 * @param {View} view
 * @returns {Message[]}
 */
export function currentPath(view) {
  return view.messages;
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
export const RECORD_TYPES = ["conversation", "title", "user", "start", "chunk", "end", "select"];
