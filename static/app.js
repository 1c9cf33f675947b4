// chatledger's page. It talks to the server only over the HTTP API and builds what it
// shows by folding the conversation's event stream (fold.js). Model text is inserted with
// textContent, never as HTML.

import { applyRecord, emptyView, runningReply, RECORD_TYPES } from "./fold.js";

const $ = (id) => document.getElementById(id);
const ui = {
  list: $("conversations"), newChat: $("new-chat"), title: $("chat-title"),
  connection: $("connection"), messages: $("messages"), empty: $("empty"), error: $("error"),
  composer: $("composer"), text: $("text"), send: $("send"), stop: $("stop"),
};

let current = null; // { id, view, source, nodes: Map<message id, element> }

async function api(method, path, body) {
  const response = await fetch(path, {
    method,
    headers: body === undefined ? {} : { "Content-Type": "application/json" },
    body: body === undefined ? undefined : JSON.stringify(body),
  });
  const data = await response.json().catch(() => ({}));
  if (!response.ok) {
    const error = new Error(data.message || `${response.status} ${response.statusText}`);
    error.status = response.status;
    error.code = data.error;
    throw error;
  }
  return data;
}

function showError(message) {
  ui.error.textContent = message || "";
  ui.error.hidden = !message;
}

function setConnection(state, label) {
  ui.connection.dataset.state = state;
  ui.connection.textContent = label;
}

// -- conversation list ---------------------------------------------------------------

async function refreshList() {
  let rows;
  try {
    rows = await api("GET", "/api/conversations");
  } catch (error) {
    showError(`Could not load conversations: ${error.message}`);
    return;
  }
  ui.list.replaceChildren(
    ...rows.map((row) => {
      const item = document.createElement("li");
      const link = document.createElement("a");
      link.href = `#/c/${row.id}`;
      link.textContent = row.title || "New chat";
      link.title = new Date(row.updated).toLocaleString();
      if (current && current.id === row.id) link.setAttribute("aria-current", "page");
      item.append(link);
      return item;
    }),
  );
}

// -- one conversation ----------------------------------------------------------------

function open(id) {
  if (current && current.source) current.source.close();
  if (current) clearInterval(current.watchdog);
  showError("");
  current = { id, view: emptyView(), source: null, nodes: new Map(), lastEventAt: Date.now() };
  current.watchdog = setInterval(() => checkStalled(current), 5000);
  ui.messages.replaceChildren();
  ui.title.textContent = "…";
  connect(current, 0);
  refreshList();
}

// Opens the event stream at `from`; EventSource itself resumes with Last-Event-ID after a
// drop, so the fold continues with no gap and no duplicate.
function connect(conversation, from) {
  const url = `/api/conversations/${encodeURIComponent(conversation.id)}/events?from=${from}`;
  const source = new EventSource(url);
  conversation.source = source;
  setConnection("connecting", "connecting…");
  source.onopen = () => setConnection("live", "live");
  source.onerror = () => {
    if (conversation !== current) return;
    if (source.readyState === EventSource.CONNECTING) {
      setConnection("reconnecting", "connection lost, reconnecting…");
      return;
    }
    // CLOSED: the server refused the stream (e.g. 404, or 416 for an offset it no longer
    // has). Rebuild the whole view from the start of the log after a pause.
    setConnection("lost", "connection lost");
    setTimeout(() => {
      if (conversation !== current) return;
      conversation.view = emptyView();
      conversation.nodes.clear();
      ui.messages.replaceChildren();
      connect(conversation, 0);
    }, 3000);
  };
  for (const type of RECORD_TYPES) {
    source.addEventListener(type, (event) => {
      if (conversation !== current) return;
      conversation.lastEventAt = Date.now();
      const record = JSON.parse(event.data);
      const changed = applyRecord(conversation.view, record, Number(event.lastEventId));
      render(conversation, changed);
      if (record.type === "title") refreshList();
    });
  }
}

// A reply that stays open with no event for a while: ask the server whether it still
// runs. If the log could not be written (a disk fault), say so instead of "generating".
async function checkStalled(conversation) {
  if (conversation !== current || !runningReply(conversation.view)) return;
  if (Date.now() - conversation.lastEventAt < 10000) return;
  try {
    const body = await api("GET", `/api/conversations/${encodeURIComponent(conversation.id)}`);
    if (body.running === null && body.writable === false) {
      conversation.failed = true;
      render(conversation, runningReply(conversation.view));
      showError(
        "This conversation can no longer be saved (the server could not write to its disk). " +
          "Everything shown here was saved; the reply stopped at that point.",
      );
    }
  } catch (error) {
    // the connection state already tells the person the server is unreachable
  }
}

function render(conversation, changed) {
  const view = conversation.view;
  ui.title.textContent = view.title || "New chat";
  document.title = `${view.title || "chat"} · chatledger`;
  if (changed) {
    const nearBottom =
      ui.messages.scrollHeight - ui.messages.scrollTop - ui.messages.clientHeight < 80;
    renderMessage(conversation, changed);
    if (nearBottom) ui.messages.scrollTop = ui.messages.scrollHeight;
  }
  const running = conversation.failed ? null : runningReply(view);
  ui.text.disabled = Boolean(conversation.failed);
  ui.send.disabled = Boolean(running) || Boolean(conversation.failed);
  ui.stop.hidden = !running;
  if (changed && changed.role === "assistant" && changed.finish) refreshList();
}

function renderMessage(conversation, message) {
  let node = conversation.nodes.get(message.id);
  if (!node) {
    node = document.createElement("article");
    node.dataset.id = message.id;
    node.append(document.createElement("div"), document.createElement("span"));
    node.lastChild.className = "meta";
    conversation.nodes.set(message.id, node);
    ui.messages.append(node);
  }
  const [body, meta] = node.children;
  body.className = "text";
  body.textContent = message.text; // text, never HTML
  node.className = `message ${message.role}`;
  if (message.role === "assistant") {
    node.dataset.finish = message.finish ?? "";
    if (message.finish === null && conversation.failed) {
      node.classList.add("finish-error");
      meta.textContent = "stopped: the server could not save more of this reply";
    } else if (message.finish === null) {
      node.classList.add("generating");
      meta.textContent = "";
    } else {
      node.classList.add(`finish-${message.finish}`);
      meta.textContent = describeFinish(message);
    }
  } else {
    meta.textContent = "";
  }
}

function describeFinish(message) {
  switch (message.finish) {
    case "stop": return message.usage?.completion_tokens ? `${message.usage.completion_tokens} tokens` : "";
    case "length": return "stopped at the length limit";
    case "cancelled": return "stopped";
    case "interrupted": return "interrupted (the server stopped)";
    case "error": return `error: ${message.error || "the reply failed"}`;
    default: return message.finish;
  }
}

// -- actions -------------------------------------------------------------------------

async function send(event) {
  event.preventDefault();
  const text = ui.text.value;
  if (!current || !text.trim() || ui.send.disabled) return;
  ui.send.disabled = true;
  try {
    await api("POST", `/api/conversations/${encodeURIComponent(current.id)}/messages`, { text });
    ui.text.value = "";
    showError("");
  } catch (error) {
    showError(error.message);
    ui.send.disabled = false;
  }
}

async function stop() {
  if (!current) return;
  try {
    await api("POST", `/api/conversations/${encodeURIComponent(current.id)}/stop`);
  } catch (error) {
    if (error.status !== 409) showError(error.message);
  }
}

async function newChat() {
  try {
    const conversation = await api("POST", "/api/conversations", {});
    location.hash = `#/c/${conversation.id}`;
  } catch (error) {
    showError(error.message);
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
