// chatledger's page: routing by location.hash and the wiring of the modules. It talks to
// the server only through api.js (HTTP) and live.js (the event stream), folds what the
// stream carries with fold.js, and shows it with view.js.
//
// A conversation opens at its tail (DESIGN.md "The page"): the newest PAGE messages from
// `GET /api/conversations/{id}?limit=PAGE`, then the event stream from the offset that
// page reflects, folded onto it; older pages load as the list is scrolled to its top
// (scrollback.js). The cost of opening does not grow with the log.
//
// With accounts (DESIGN.md "The household"), household.js asks who is signed in first,
// and shows the sign-in form instead of the page while nobody is (and whenever a call is
// answered 401); a child's conversation opened by a parent is read-only.
//
// While the tab is visible, seen.js tells the server how far the page has rendered (a
// `seen` receipt in the audit log). "Replay" (replay.js) plays the conversation back from
// its log in a panel that takes the place of the live messages, folded and drawn by the
// same fold.js and view.js; the live view keeps following its stream meanwhile, and
// comes back as it is now on "Exit replay".
//
// After each record it renders, the page dispatches `chatledger:rendered` on `document`
// (detail: {offset}): what a test watches to know what the live page showed at an offset.
//
//   #/c/<conversation id>   that conversation      anything else   just the list

import * as api from "./api.js";
import { actionOf, startEdit } from "./branches.js";
import "./connection.js";
import { applyRecord, prependMessages, RECORD_TYPES, runningReply, viewFrom } from "./fold.js";
import { createHousehold } from "./household.js";
import { follow, RESTART_DELAY_MS } from "./live.js";
import { createReplay } from "./replay.js";
import { watchTop } from "./scrollback.js";
import { createSeen, RENDERER } from "./seen.js";
import { createConversationList, createDrawer } from "./conversations.js";
import { createMessageList, renderControls, showConnection, showError } from "./view.js";

const $ = (id) => document.getElementById(id);
const ui = {
  list: $("conversations"), newChat: $("new-chat"), title: $("chat-title"),
  connection: $("connection"), messages: $("messages"), error: $("error"),
  composer: $("composer"), text: $("text"), send: $("send"), stop: $("stop"),
  empty: $("empty"), replayOpen: $("replay-open"),
};
const messageList = createMessageList(ui.messages);
const conversations = createConversationList(
  {
    list: ui.list, filter: $("conversation-filter"), archived: $("show-archived"),
    status: $("list-status"), empty: $("list-empty"),
  },
  { rename: api.renameConversation, setArchived: api.setArchived, onChange: () => refreshList() },
);
createDrawer({
  sidebar: $("sidebar"), backdrop: $("drawer-backdrop"), open: $("drawer-open"),
  close: $("drawer-close"), main: $("chat"),
});
const household = createHousehold(
  {
    login: $("login"), loginForm: $("login-form"), loginName: $("login-name"),
    loginPassword: $("login-password"), loginSubmit: $("login-submit"),
    loginError: $("login-error"), app: [$("sidebar"), $("chat")], account: $("account"),
    accountName: $("account-name"), signOut: $("sign-out"), oversight: $("oversight"),
    budget: $("budget"),
  },
  { onSignedIn: begin, onSignedOut: reset },
);
api.onLoginRequired(household.showLogin);
const seen = createSeen((id, offset) => api.markSeen(id, offset, RENDERER));
const replay = createReplay(
  {
    panel: $("replay"), messages: $("replay-messages"), play: $("replay-play"),
    speed: $("replay-speed"), timeline: $("replay-timeline"), time: $("replay-time"),
    exit: $("replay-exit"), sentForm: $("replay-sent"), viewer: $("replay-viewer"),
    at: $("replay-at"), note: $("replay-note"),
  },
  { getLog: api.getLog, getAudit: api.getAudit, onExit: () => showLive({ focus: true }) },
);

/** Messages per page: the first one shown, and each older one loaded on scrolling up. */
const PAGE = 50;

/**
 * The open conversation, or null: { id, view (fold.js; null until its first page came),
 * shownFrom (view.messages from this index on are on the page), more (the server has
 * messages older than view.messages[0]), stream (live.js), scrollback (scrollback.js),
 * retry (a timer), failed }.
 */
let current = null;
/** The rows of the conversation list last shown, by id (`access`, `owner`). */
let rowsById = new Map();
/** Whether someone is signed in (or no account exists) and the page has begun. */
let started = false;
/** Counts sign-outs: an answer to a call made before the last one is not shown. */
let epoch = 0;

async function refreshList() {
  const asked = epoch;
  let rows;
  try {
    rows = await api.listConversations();
  } catch (error) {
    if (asked === epoch) showError(ui.error, `Could not load conversations: ${error.message}`);
    return;
  }
  if (asked !== epoch) return;
  rowsById = new Map(rows.map((row) => [row.id, row]));
  conversations.render(rows, current?.id ?? null);
  household.decorateList(ui.list, rows);
  if (current) {
    household.setRow(rowsById.get(current.id));
    if (current.view) controls(current);
  }
}

// -- one conversation ----------------------------------------------------------------

function open(id) {
  if (current) leave(current);
  showError(ui.error, "");
  const conversation = {
    id, view: null, shownFrom: 0, more: false, stream: null, scrollback: null, retry: null,
    focusAfter: null,
    failed: false,
  };
  current = conversation;
  if (replay.active()) {
    replay.close();
    showLive();
  }
  seen.open(id);
  ui.replayOpen.hidden = false;
  messageList.clear();
  ui.title.textContent = "…";
  household.openConversation(id, rowsById.get(id));
  refreshList();
  load(conversation);
}

function leave(conversation) {
  clearTimeout(conversation.retry);
  conversation.scrollback?.stop();
  conversation.stream?.close();
}

// The newest page, then the event stream from the offset it reflects. A page that cannot
// be had for now (no connection, a 5xx) is asked for again; a 4xx (an unknown
// conversation) is said and left.
async function load(conversation) {
  const { id } = conversation;
  showConnection(ui.connection, "connecting", "connecting…");
  let page;
  try {
    page = await api.getPage(id, { limit: PAGE });
  } catch (error) {
    if (conversation !== current) return;
    showError(ui.error, `Could not open this conversation: ${error.message}`);
    showConnection(ui.connection, "lost", "connection lost");
    if (error.status === undefined || error.status >= 500) {
      conversation.retry = setTimeout(() => load(conversation), RESTART_DELAY_MS);
    }
    return;
  }
  if (conversation !== current) return;
  showError(ui.error, "");
  showPage(conversation, page);
  conversation.stream = follow({
    url: (from) => api.eventsUrl(id, from),
    from: page.offset,
    types: RECORD_TYPES,
    onState: (state, label) => showConnection(ui.connection, state, label),
    onRecord: (record, offset) => {
      const { view } = conversation;
      const changed = applyRecord(view, record, offset);
      if (view.stale) {
        reopen(conversation); // a branch this page never had: its page anew
        return;
      }
      if (view.reshaped) {
        view.reshaped = false;
        redraw(conversation); // another branch, or a new one: the whole path anew
      } else {
        render(conversation, changed);
      }
      rendered(offset);
      if (record.type === "end" && changed) seen.flush();
      if (record.type === "title" || (record.type === "end" && changed)) refreshList();
      if (record.type === "end" && changed) household.refreshBudget();
    },
    // The server refused the stream (e.g. 416: the log is not the one this view came
    // from): start over from a new page, and reopen where that page stands.
    restart: async () => {
      const fresh = await api.getPage(id, { limit: PAGE });
      if (conversation === current) showPage(conversation, fresh);
      return fresh.offset;
    },
    waiting: () => !conversation.failed && runningReply(conversation.view) !== null,
    onStall: () => checkStalled(conversation),
  });
}

// Show a page as the whole view (what was shown before is dropped), scrolled to the
// newest message, and watch the top for older messages while there are any.
function showPage(conversation, page) {
  const view = viewFrom(page);
  conversation.view = view;
  // A reply with no `end` that no task runs in a log that can no longer be written: the
  // server could not save the rest of it (checkStalled finds the same while it streams).
  const unfinished = runningReply(view) !== null;
  const failed = unfinished && page.writable === false && page.running == null;
  conversation.failed = failed;
  redraw(conversation);
  rendered(view.offset);
  if (failed) showFailed();
}

// Draw the view's current path as the whole list, scrolled to the newest message, and
// watch the top for older messages while there are any. Only the newest messages are
// rendered at first, about a screen's worth and more (see RENDER_CHARS): the rest come
// from the view as the list is scrolled up.
function redraw(conversation) {
  const { view } = conversation;
  conversation.scrollback?.stop();
  conversation.scrollback = null;
  conversation.more = view.older !== null; // what the oldest message held follows
  conversation.shownFrom = batchStart(view.messages, view.messages.length);
  const older = conversation.shownFrom > 0 || conversation.more;
  messageList.show(view, { from: conversation.shownFrom, failed: conversation.failed, more: older });
  controls(conversation);
  if (older) {
    const load = () => loadOlder(conversation, view);
    conversation.scrollback = watchTop(ui.messages, messageList.top, load);
  }
  const focus = conversation.focusAfter;
  conversation.focusAfter = null;
  if (focus) ui.messages.querySelector(focus)?.focus();
}

// The open conversation anew from its newest page (its stream too).
function reopen(conversation) {
  leave(conversation);
  conversation.stream = null;
  load(conversation);
}

/** Text rendered at a time, in characters: more than any screen shows of it. */
const RENDER_CHARS = 20000;

// Where the next batch to render begins, going back from `end` (exclusive): at most a
// PAGE of messages and about RENDER_CHARS of text, at least one message.
function batchStart(messages, end) {
  let start = end;
  let chars = 0;
  while (start > 0 && end - start < PAGE && chars < RENDER_CHARS) {
    start -= 1;
    chars += messages[start].text?.length ?? 0;
  }
  return start;
}

// The next older messages, put above the oldest one shown: those of the view not shown
// yet, else the page before the oldest (fetched into the view first). Resolves to
// whether still older messages exist; false as well once the view it was for is gone.
async function loadOlder(conversation, view) {
  if (conversation.shownFrom === 0) {
    const oldest = view.messages[0];
    if (!oldest || !conversation.more) return false;
    let page;
    try {
      page = await api.getPage(conversation.id, { limit: PAGE, before: oldest.id });
    } catch (error) {
      if (error.status === undefined || error.status >= 500) throw error; // tried again
      page = { messages: [], more: false }; // e.g. 400: `before` is no longer on the path
    }
    if (conversation !== current || conversation.view !== view) return false;
    const added = prependMessages(view, page.messages);
    conversation.shownFrom += added.length;
    conversation.more = page.more && added.length > 0;
  }
  const end = conversation.shownFrom;
  const start = batchStart(view.messages, end);
  conversation.shownFrom = start;
  const left = start > 0 || conversation.more;
  const older = view.messages.slice(start, end);
  messageList.prepend(view, older, { failed: conversation.failed, more: left });
  return left;
}

// The live view now shows every record before `offset` (a record boundary).
function rendered(offset) {
  seen.rendered(offset);
  document.dispatchEvent(new CustomEvent("chatledger:rendered", { detail: { offset } }));
}

function render(conversation, changed) {
  const { view, failed } = conversation;
  messageList.render(view, changed, { failed });
  controls(conversation);
}

// Title, text, Send and Stop for the conversation's view. A child's conversation opened
// by its parent is read-only: nothing can be written or stopped there (the server would
// refuse it: 403 guardian_read_only).
function controls(conversation) {
  const { view, failed } = conversation;
  const readOnly = household.isReadOnly(rowsById.get(conversation.id));
  const running = !failed && !readOnly && runningReply(view) !== null;
  renderControls(ui, view, { running, failed: failed || readOnly });
  // the branch buttons under the messages (branches.js; style.css hides them)
  ui.messages.dataset.writable = String(!failed && !readOnly);
  ui.messages.dataset.running = String(runningReply(view) !== null);
}

// A reply that stays open with no event for a while: ask the server whether it still
// runs. If the log could not be written (a disk fault), say so instead of "generating".
async function checkStalled(conversation) {
  let body;
  try {
    body = await api.getPage(conversation.id, { limit: 1 });
  } catch {
    return; // the connection state already tells the person the server is unreachable
  }
  if (conversation !== current || body.running !== null || body.writable !== false) return;
  conversation.failed = true;
  render(conversation, runningReply(conversation.view));
  showFailed();
}

function showFailed() {
  showError(
    ui.error,
    "This conversation can no longer be saved (the server could not write to its disk). " +
      "Everything shown here was saved; the reply stopped at that point.",
  );
}

// -- actions -------------------------------------------------------------------------

// With no conversation open, the first message makes one (as "+ New chat" does), is sent
// to it, and the new conversation is then opened as if it had been picked.
async function send(event) {
  event.preventDefault();
  const text = ui.text.value;
  if (!started || !text.trim() || ui.send.disabled) return;
  ui.send.disabled = true;
  const asked = epoch;
  let created = null;
  try {
    if (!current) created = (await api.createConversation()).id;
    if (asked !== epoch) return;
    await api.sendMessage(created ?? current.id, text);
    if (asked !== epoch) return;
    ui.text.value = "";
    if (created) openCreated(created);
    showError(ui.error, "");
  } catch (error) {
    if (asked !== epoch) return;
    if (created) openCreated(created); // made, but the message was refused: kept to retry
    showError(ui.error, error.message);
    ui.send.disabled = false;
  }
  household.refreshBudget(); // one message fewer left; or, refused, what is left
}

// Open a conversation just made here: at its location, at once (the hashchange that
// follows finds it open already).
function openCreated(id) {
  location.hash = `#/c/${id}`;
  route();
}

// No conversation open: the composer is ready for a first message (see `send`).
function composeFirst() {
  ui.text.disabled = false;
  ui.send.disabled = false;
  ui.stop.hidden = true;
}

async function stop() {
  if (!current) return;
  const asked = epoch;
  try {
    await api.stopReply(current.id);
  } catch (error) {
    if (error.status !== 409 && asked === epoch) showError(ui.error, error.message);
  }
}

// A branch button under a message (branches.js): switch versions, answer again, edit.
async function branchAction(conversation, { action, id }) {
  const asked = epoch;
  const said = (error) => {
    if (asked === epoch && conversation === current) showError(ui.error, error.message);
  };
  if (action === "edit") {
    const message = conversation.view?.nodes.get(id);
    const node = ui.messages.querySelector(`article[data-id="${CSS.escape(id)}"]`);
    if (!message || !node) return;
    startEdit(node, message.text, async (text) => {
      try {
        await api.sendMessage(conversation.id, text, { editOf: id });
        showError(ui.error, "");
        return true;
      } catch (error) {
        said(error);
        return false;
      } finally {
        household.refreshBudget();
      }
    });
    return;
  }
  try {
    if (action === "select") {
      // once the path is drawn anew, the switch of the version now shown has focus
      const switches = `article[data-id="${CSS.escape(id)}"] .siblings button:not(:disabled)`;
      conversation.focusAfter = switches;
      await api.selectBranch(conversation.id, id);
    } else if (action === "regenerate") {
      await api.regenerate(conversation.id, id);
      household.refreshBudget();
    }
    showError(ui.error, "");
  } catch (error) {
    said(error);
  }
}

async function newChat() {
  const asked = epoch;
  try {
    const conversation = await api.createConversation();
    if (asked === epoch) location.hash = `#/c/${conversation.id}`;
  } catch (error) {
    if (asked === epoch) showError(ui.error, error.message);
  }
}

// -- replay --------------------------------------------------------------------------

// The replay panel in place of the live messages and the composer; no seen receipt is
// sent meanwhile (the live view is off screen).
function startReplay() {
  if (!current) return;
  seen.hold(true);
  ui.messages.hidden = true;
  ui.composer.hidden = true;
  ui.replayOpen.hidden = true;
  replay.open(current.id);
}

// The live view back, as it stands now (it kept following its stream).
function showLive({ focus = false } = {}) {
  ui.messages.hidden = false;
  ui.composer.hidden = false;
  ui.replayOpen.hidden = !current;
  ui.messages.scrollTop = ui.messages.scrollHeight;
  seen.hold(false);
  if (focus && current) ui.replayOpen.focus();
}

// -- signing in and out --------------------------------------------------------------

// Someone signed in (or no account exists): show what the location names.
function begin() {
  started = true;
  route();
}

// Nobody is signed in any more: drop all that was shown, the open conversation's event
// stream first, and what was typed.
function reset() {
  started = false;
  epoch += 1;
  if (current) leave(current);
  current = null;
  replay.close();
  showLive();
  seen.open(null);
  rowsById = new Map();
  conversations.reset();
  messageList.clear();
  ui.messages.append(ui.empty);
  ui.title.textContent = "No conversation open";
  document.title = "chatledger";
  showConnection(ui.connection, "idle", "");
  showError(ui.error, "");
  ui.text.value = "";
  ui.text.disabled = true;
  ui.send.disabled = true;
  ui.stop.hidden = true;
}

function route() {
  if (!started) return;
  const match = location.hash.match(/^#\/c\/([A-Za-z0-9_-]{1,64})$/);
  if (match) {
    if (!current || current.id !== match[1]) open(match[1]);
  } else {
    if (!current) composeFirst();
    refreshList();
  }
}

ui.composer.addEventListener("submit", send);
ui.text.addEventListener("keydown", (event) => {
  if (event.key === "Enter" && !event.shiftKey && !event.isComposing) send(event);
});
ui.stop.addEventListener("click", stop);
ui.messages.addEventListener("click", (event) => {
  const asked = actionOf(event);
  if (asked && current) branchAction(current, asked);
});
ui.newChat.addEventListener("click", newChat);
ui.replayOpen.addEventListener("click", startReplay);
window.addEventListener("hashchange", route);
household.start();
