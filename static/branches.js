// Branches on the page (DESIGN.md "Branches, not overwrites"): under each message, the
// switch between its versions (`< 2/3 >`: its siblings, each a `select`), "Regenerate"
// (or "Try again" for a reply that did not finish) and "Edit" (edit and resend: a new
// sibling of the question; the old one stays one click away). Every action is a button
// carrying what it acts on in data-* attributes; the page (app.js) listens to one click
// handler for all of them (`actionOf`). Nothing here calls the server.
//
// The buttons are hidden, not just disabled, where they cannot be used (style.css):
// `#messages[data-writable="false"]` (a parent reading a child's conversation, a log that
// can no longer be written) and `#messages[data-running="true"]` (a reply streams).

/**
 * What a click on the message list asks for, or null when it hit no action button.
 * @param {Event} event a click inside #messages
 * @returns {{action: "select"|"regenerate"|"edit", id: string}|null} `id`: the message
 *   to select (a sibling), the reply to answer again, or the question to edit
 */
export function actionOf(event) {
  const button = event.target.closest?.("button[data-action]");
  if (!button || button.disabled) return null;
  return { action: button.dataset.action, id: button.dataset.id };
}

/**
 * Fill a message's action bar for the message as it stands; rebuilt only when what it
 * shows changed (a streaming reply changes text, not its actions).
 * @param {HTMLElement} bar the message's <div class="actions">
 * @param {{id: string, role: string, finish: string|null, siblings?: string[]}} message
 * @param {boolean} open whether the reply still streams (no action under it yet)
 */
export function renderActions(bar, message, open) {
  const siblings = message.siblings ?? [message.id];
  const key = `${open}|${message.finish}|${siblings.join(",")}`;
  if (bar.dataset.key === key) return;
  bar.dataset.key = key;
  const parts = [];
  if (siblings.length > 1) parts.push(switcher(message, siblings));
  if (message.role === "assistant" && !open) {
    const failed = ["error", "interrupted", "cancelled"].includes(message.finish);
    parts.push(button(failed ? "Try again" : "Regenerate", "regenerate", message.id, {
      label: failed ? "Try again: another answer" : "Regenerate: another answer",
    }));
  } else if (message.role === "user") {
    parts.push(button("Edit", "edit", message.id, { label: "Edit and resend this message" }));
  }
  bar.replaceChildren(...parts);
  bar.hidden = parts.length === 0;
}

// `‹ 2/3 ›`: the previous and next version of this message, and which one it is.
function switcher(message, siblings) {
  const at = siblings.indexOf(message.id);
  const nav = document.createElement("span");
  nav.className = "siblings";
  nav.setAttribute("role", "group");
  nav.setAttribute("aria-label", message.role === "user" ? "Versions of this message" : "Answers");
  const previous = button("‹", "select", siblings[at - 1], {
    label: `Previous version (${at} of ${siblings.length})`,
  });
  previous.disabled = at <= 0;
  const next = button("›", "select", siblings[at + 1], {
    label: `Next version (${at + 2} of ${siblings.length})`,
  });
  next.disabled = at >= siblings.length - 1;
  const where = document.createElement("span");
  where.className = "position";
  where.textContent = `${at + 1}/${siblings.length}`;
  nav.append(previous, where, next);
  return nav;
}

function button(text, action, id, { label }) {
  const element = document.createElement("button");
  element.type = "button";
  element.className = "action";
  element.textContent = text;
  element.dataset.action = action;
  if (id !== undefined) element.dataset.id = id;
  element.setAttribute("aria-label", label);
  return element;
}

/**
 * Edit a question in place: a text box with its text in place of the message, "Send"
 * and "Cancel". Enter sends (Shift+Enter: a new line), Escape cancels.
 * @param {HTMLElement} node the message's <article>
 * @param {string} text the question's text
 * @param {(text: string) => Promise<boolean>} submit sends the edited text; resolves true
 *   once sent (the form goes: the new branch arrives on the stream), false to keep it
 */
export function startEdit(node, text, submit) {
  if (node.querySelector("form.edit")) return;
  const form = document.createElement("form");
  form.className = "edit";
  const box = document.createElement("textarea");
  box.value = text;
  box.rows = Math.min(8, text.split("\n").length + 1);
  box.setAttribute("aria-label", "Edited message");
  const send = document.createElement("button");
  send.type = "submit";
  send.textContent = "Send";
  const cancel = document.createElement("button");
  cancel.type = "button";
  cancel.textContent = "Cancel";
  form.append(box, send, cancel);
  node.classList.add("editing");
  node.append(form);
  const close = () => {
    form.remove();
    node.classList.remove("editing");
    node.querySelector('button[data-action="edit"]')?.focus();
  };
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    if (!box.value.trim() || send.disabled) return;
    send.disabled = true;
    if (await submit(box.value)) close();
    else send.disabled = false;
  });
  box.addEventListener("keydown", (event) => {
    if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
      event.preventDefault();
      form.requestSubmit();
    } else if (event.key === "Escape") {
      close();
    }
  });
  cancel.addEventListener("click", close);
  box.focus();
  box.setSelectionRange(box.value.length, box.value.length);
}
