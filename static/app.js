// chatledger's page: routing by location.hash and the wiring of the modules. It talks to
// the server only through api.js (HTTP) and live.js (the event stream), folds what the
// stream carries with fold.js, and shows it with view.js.
//
//   #/c/<conversation id>   that conversation      anything else   just the list

import * as api from "./api.js";
import { applyRecord, emptyView, RECORD_TYPES, runningReply } from "./fold.js";
import { follow } from "./live.js";
import { createMessageList, renderControls, renderList, showConnection, showError } from "./view.js";

const $ = (id) => document.getElementById(id);
const ui = {
  list: $("conversations"), newChat: $("new-chat"), title: $("chat-title"),
  connection: $("connection"), messages: $("messages"), error: $("error"),
  composer: $("composer"), text: $("text"), send: $("send"), stop: $("stop"),
};
const messageList = createMessageList(ui.messages);

/** The open conversation: { id, view (fold.js), stream (live.js), failed } or null. */
let current = null;

async function refreshList() {
  let rows;
  try {
    rows = await api.listConversations();
  } catch (error) {
    showError(ui.error, `Could not load conversations: ${error.message}`);
    return;
  }
  renderList(ui.list, rows, current?.id ?? null);
}

// -- one conversation ----------------------------------------------------------------

function open(id) {
  if (current) current.stream.close();
  showError(ui.error, "");
  const conversation = { id, view: emptyView(), stream: null, failed: false };
  current = conversation;
  messageList.clear();
  ui.title.textContent = "…";
  // The whole log, folded from offset 0; EventSource resumes with Last-Event-ID itself.
  conversation.stream = follow({
    url: (from) => api.eventsUrl(id, from),
    from: 0,
    types: RECORD_TYPES,
    onState: (state, label) => showConnection(ui.connection, state, label),
    onRecord: (record, offset) => {
      const changed = applyRecord(conversation.view, record, offset);
      render(conversation, changed);
      if (record.type === "title" || (record.type === "end" && changed)) refreshList();
    },
    onRestart: () => {
      conversation.view = emptyView();
      messageList.clear();
    },
    waiting: () => !conversation.failed && runningReply(conversation.view) !== null,
    onStall: () => checkStalled(conversation),
  });
  refreshList();
}

function render(conversation, changed) {
  const { view, failed } = conversation;
  messageList.render(view, changed, { failed });
  renderControls(ui, view, { running: !failed && runningReply(view) !== null, failed });
}

// A reply that stays open with no event for a while: ask the server whether it still
// runs. If the log could not be written (a disk fault), say so instead of "generating".
async function checkStalled(conversation) {
  let body;
  try {
    body = await api.getConversation(conversation.id);
  } catch {
    return; // the connection state already tells the person the server is unreachable
  }
  if (conversation !== current || body.running !== null || body.writable !== false) return;
  conversation.failed = true;
  render(conversation, runningReply(conversation.view));
  showError(
    ui.error,
    "This conversation can no longer be saved (the server could not write to its disk). " +
      "Everything shown here was saved; the reply stopped at that point.",
  );
}

// -- actions -------------------------------------------------------------------------

async function send(event) {
  event.preventDefault();
  const text = ui.text.value;
  if (!current || !text.trim() || ui.send.disabled) return;
  ui.send.disabled = true;
  try {
    await api.sendMessage(current.id, text);
    ui.text.value = "";
    showError(ui.error, "");
  } catch (error) {
    showError(ui.error, error.message);
    ui.send.disabled = false;
  }
}

async function stop() {
  if (!current) return;
  try {
    await api.stopReply(current.id);
  } catch (error) {
    if (error.status !== 409) showError(ui.error, error.message);
  }
}

async function newChat() {
  try {
    const conversation = await api.createConversation();
    location.hash = `#/c/${conversation.id}`;
  } catch (error) {
    showError(ui.error, error.message);
  }
}

function route() {
  const match = location.hash.match(/^#\/c\/([A-Za-z0-9_-]{1,64})$/);
  if (match) {
    if (!current || current.id !== match[1]) open(match[1]);
  } else {
    refreshList();
  }
}

ui.composer.addEventListener("submit", send);
ui.text.addEventListener("keydown", (event) => {
  if (event.key === "Enter" && !event.shiftKey && !event.isComposing) send(event);
});
ui.stop.addEventListener("click", stop);
ui.newChat.addEventListener("click", newChat);
window.addEventListener("hashchange", route);
route();
