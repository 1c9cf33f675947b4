// The conversation list in the sidebar, and the sidebar as a drawer on a narrow screen.
//
// The list (createConversationList) shows the rows of `GET /api/conversations` newest
// first, as the server sends them, every row an <li> in that order (household.js
// decorateList marks a child's rows by index); what the filter box and the "Archived"
// toggle leave out is only hidden. The filter matches titles as shown, case-insensitive,
// as you type; the toggle shows the archived conversations instead of the others. A row
// of a conversation this person may write in (`access` "owner") has Rename (an inline
// field: Enter saves, Escape or leaving the field cancels) and Archive / Unarchive, each
// through `PATCH /api/conversations/{id}`; a guardian's read-only rows have neither.
// Archiving the open conversation leaves it open (it only leaves the list); the status
// line says where it went.
//
// Below 700 px (style.css) the sidebar is a drawer (createDrawer) behind the
// "Conversations" button of the header: modal while open (the rest of the page is
// `inert`, out of reach of pointer, keyboard and screen reader, under a backdrop; an
// <aside> may not take role=dialog), closed by Escape, the backdrop, its close button or picking a
// conversation; focus goes into it on opening and back to the button on closing.

import { showTitle } from "./view.js";

/** What a row shows for a conversation with no title (as the header does). */
const UNTITLED = "New chat";

/** The longest title the server takes (server/api.py MAX_TITLE_CHARS), in characters. */
export const MAX_TITLE_CHARS = 200;

/**
 * The title a row shows.
 * @param {{title?: string}} row
 * @returns {string}
 */
export function shownTitle(row) {
  return row.title || UNTITLED;
}

/**
 * Whether a row matches what is typed in the filter box: its shown title holds `query`,
 * compared case-insensitively (an empty query matches every row).
 * @param {{title?: string}} row
 * @param {string} query
 * @returns {boolean}
 */
export function matches(row, query) {
  const wanted = query.trim().toLocaleLowerCase();
  return !wanted || shownTitle(row).toLocaleLowerCase().includes(wanted);
}

// A title inside an accessible name or a sentence, bidi-isolated (FSI .. PDI) and quoted.
const quoted = (row) => `“\u2068${shownTitle(row)}\u2069”`;

/**
 * The conversation list.
 * @param {{list: HTMLUListElement, filter: HTMLInputElement, archived: HTMLButtonElement,
 *   status: HTMLElement, empty: HTMLElement}} ui the #conversations list, the filter
 *   box, the "Archived" toggle (aria-pressed), the status line (role=status) and the
 *   line shown when no row is
 * @param {{rename: (id: string, title: string) => Promise<{title: string}>,
 *   setArchived: (id: string, archived: boolean) => Promise<{archived: boolean}>,
 *   onChange: () => void}} actions the API calls (api.js renameConversation,
 *   setArchived), and what to do once one succeeded (fetch the list again)
 * @returns {{render: (rows: object[], currentId: string|null) => void, reset: () => void}}
 *   `render` shows the list's rows (newest first; `id`, `title`, `updated` in ms since
 *   the epoch, `access`, `archived`), `currentId` marked aria-current; `reset` empties it
 *   and forgets the filter (someone signed out)
 */
export function createConversationList(ui, actions) {
  /** The rows last rendered, in order. */
  let rows = [];
  let currentId = null;
  /** @type {Map<string, {li: HTMLLIElement, link: HTMLAnchorElement, tools: HTMLElement,
   *   renameButton: HTMLButtonElement, archiveButton: HTMLButtonElement, row: object}>} */
  const items = new Map();
  /** The row being renamed: {item, form, input, saving}, or null. */
  let editing = null;
  /** While `render` moves rows: a blur it causes is no "leaving the field". */
  let placing = false;
  let showArchived = false;

  function build(id) {
    const li = document.createElement("li");
    li.dataset.id = id;
    const link = document.createElement("a");
    link.href = `#/c/${id}`;
    const tools = document.createElement("span");
    tools.className = "row-tools";
    const renameButton = button("rename", "Rename");
    const archiveButton = button("archive", "Archive");
    tools.append(renameButton, archiveButton);
    li.append(link, tools);
    const item = { li, link, tools, renameButton, archiveButton, row: null };
    renameButton.addEventListener("click", () => startRename(item));
    archiveButton.addEventListener("click", () => archive(item, !item.row.archived));
    items.set(id, item);
    return item;
  }

  // Bring one row's element up to `row`. The link's content is set anew every time (so
  // what household.js decorateList appended to it goes, and is appended again after).
  function update(item, row) {
    item.row = row;
    showTitle(item.link, shownTitle(row));
    item.link.title = new Date(row.updated).toLocaleString();
    if (row.id === currentId) item.link.setAttribute("aria-current", "page");
    else item.link.removeAttribute("aria-current");
    item.li.classList.toggle("archived", Boolean(row.archived));
    const writable = row.access === undefined || row.access === "owner";
    item.tools.hidden = !writable || editing?.item === item;
    item.archiveButton.textContent = row.archived ? "Unarchive" : "Archive";
    item.renameButton.setAttribute("aria-label", `Rename ${quoted(row)}`);
    item.archiveButton.setAttribute(
      "aria-label",
      `${row.archived ? "Unarchive" : "Archive"} ${quoted(row)}`,
    );
  }

  // The list's children become `wanted`, in order, moving only what is out of place. A
  // row that moves (a rename makes it the newest) keeps what it had: a field being
  // edited, and the focus (moving an element in the DOM drops it).
  function place(wanted) {
    const focused = ui.list.contains(document.activeElement) ? document.activeElement : null;
    placing = true;
    try {
      wanted.forEach((li, i) => {
        const there = ui.list.children[i];
        if (there !== li) ui.list.insertBefore(li, there ?? null);
      });
      while (ui.list.children.length > wanted.length) ui.list.lastElementChild.remove();
      if (focused?.isConnected && document.activeElement !== focused) {
        focused.focus({ preventScroll: true });
      }
    } finally {
      placing = false;
    }
  }

  // Hide what the filter and the toggle leave out; say when nothing is left.
  function filter() {
    const query = ui.filter.value;
    let shown = 0;
    let archived = 0;
    for (const row of rows) {
      if (row.archived) archived += 1;
      const visible = Boolean(row.archived) === showArchived && matches(row, query);
      items.get(row.id).li.hidden = !visible;
      if (visible) shown += 1;
    }
    ui.archived.textContent = `Archived (${archived})`;
    ui.archived.setAttribute("aria-pressed", String(showArchived));
    ui.list.setAttribute("aria-label", showArchived ? "Archived conversations" : "Conversations");
    let empty = "";
    if (!shown && query.trim()) empty = `No conversation matches “\u2068${query.trim()}\u2069”.`;
    else if (!shown && showArchived) empty = "No archived conversations.";
    else if (!shown && archived) empty = "Every conversation is archived.";
    ui.empty.textContent = empty;
    ui.empty.hidden = !empty;
  }

  function render(newRows, openId) {
    rows = newRows;
    currentId = openId;
    const listed = new Set(rows.map((row) => row.id));
    for (const id of items.keys()) {
      if (listed.has(id)) continue;
      if (editing?.item === items.get(id)) editing = null;
      items.delete(id);
    }
    const wanted = rows.map((row) => {
      const item = items.get(row.id) ?? build(row.id);
      update(item, row);
      return item.li;
    });
    place(wanted);
    filter();
  }

  // One row changed here (the server answered a PATCH): shown at once, before the list
  // comes again.
  function changed(item, fields) {
    const row = { ...item.row, ...fields };
    rows = rows.map((r) => (r.id === row.id ? row : r));
    update(item, row);
    filter();
    actions.onChange();
  }

  function say(text) {
    ui.status.textContent = text;
  }

  // -- rename ------------------------------------------------------------------------

  function startRename(item) {
    if (editing) stopRename(false);
    say("");
    const form = document.createElement("form");
    form.className = "rename";
    const input = document.createElement("input");
    input.type = "text";
    input.value = item.row.title ?? "";
    input.maxLength = MAX_TITLE_CHARS;
    input.autocomplete = "off";
    input.setAttribute("aria-label", `New title for ${quoted(item.row)}`);
    form.append(input);
    item.link.hidden = true;
    item.tools.hidden = true;
    item.li.append(form);
    const edit = { item, form, input, saving: false };
    editing = edit;
    form.addEventListener("submit", (event) => {
      event.preventDefault();
      saveRename(edit);
    });
    input.addEventListener("keydown", (event) => {
      if (event.key !== "Escape") return;
      event.preventDefault();
      event.stopPropagation(); // cancels the edit only, not the drawer around it
      if (!edit.saving) stopRename(true);
    });
    input.addEventListener("blur", () => {
      if (editing === edit && !edit.saving && !placing) stopRename(false);
    });
    input.focus();
    input.select();
  }

  // End the edit; `focus`: back to the row's Rename button (not when focus went elsewhere).
  function stopRename(focus) {
    const edit = editing;
    if (!edit) return;
    editing = null;
    edit.form.remove();
    edit.item.link.hidden = false;
    update(edit.item, edit.item.row);
    if (focus && edit.item.li.isConnected) edit.item.renameButton.focus();
  }

  async function saveRename(edit) {
    if (edit.saving) return;
    const { item, input } = edit;
    const title = input.value.trim();
    if (!title) {
      say("A title needs at least one character.");
      return;
    }
    if (title === item.row.title) {
      stopRename(true);
      return;
    }
    edit.saving = true;
    input.readOnly = true;
    input.setAttribute("aria-busy", "true");
    try {
      const answer = await actions.rename(item.row.id, title);
      if (editing === edit) stopRename(true);
      changed(item, { title: answer.title, updated: answer.updated ?? item.row.updated });
      say(`Renamed to ${quoted(answer)}.`);
    } catch (error) {
      edit.saving = false;
      input.readOnly = false;
      input.removeAttribute("aria-busy");
      say(`Could not rename: ${error.message}`);
      if (editing === edit) input.focus();
    }
  }

  // -- archive -----------------------------------------------------------------------

  // While its PATCH is under way the button says so (aria-disabled: a disabled button
  // would lose the focus) and a second press does nothing.
  async function archive(item, archived) {
    if (item.archiveButton.getAttribute("aria-disabled") === "true") return;
    say("");
    item.archiveButton.setAttribute("aria-disabled", "true");
    let answer;
    try {
      answer = await actions.setArchived(item.row.id, archived);
    } catch (error) {
      say(`Could not ${archived ? "archive" : "unarchive"}: ${error.message}`);
      return;
    } finally {
      item.archiveButton.removeAttribute("aria-disabled");
    }
    // The row leaves this view: focus goes to the next row shown (else the one before,
    // else the toggle), not to nowhere.
    const hadFocus = item.li.contains(document.activeElement);
    const next = neighbour(item.li);
    changed(item, { archived: answer.archived, updated: answer.updated ?? item.row.updated });
    say(
      answer.archived
        ? `${quoted(item.row)} archived: it is under “Archived”.`
        : `${quoted(item.row)} is back in the list.`,
    );
    if (hadFocus && item.li.hidden) (next ?? ui.archived).focus();
  }

  function neighbour(li) {
    const shown = (node) => node && !node.hidden;
    let node = li.nextElementSibling;
    while (node && !shown(node)) node = node.nextElementSibling;
    if (!node) {
      node = li.previousElementSibling;
      while (node && !shown(node)) node = node.previousElementSibling;
    }
    return node?.querySelector("a") ?? null;
  }

  // -- the filter box and the toggle ---------------------------------------------------

  ui.filter.addEventListener("input", filter);
  ui.filter.addEventListener("keydown", (event) => {
    // Escape clears what is typed first; with nothing typed it closes the drawer.
    if (event.key === "Escape" && ui.filter.value) {
      event.preventDefault();
      event.stopPropagation();
      ui.filter.value = "";
      filter();
    }
  });
  ui.archived.addEventListener("click", () => {
    if (editing) stopRename(false);
    showArchived = !showArchived;
    say("");
    filter();
  });

  return {
    render,
    reset() {
      editing = null;
      items.clear();
      rows = [];
      currentId = null;
      showArchived = false;
      ui.filter.value = "";
      ui.list.replaceChildren();
      say("");
      filter();
    },
  };
}

function button(className, text) {
  const element = document.createElement("button");
  element.type = "button";
  element.className = className;
  element.textContent = text;
  return element;
}

/**
 * The sidebar as a drawer while `query` matches (a narrow screen; style.css lays it out).
 * @param {{sidebar: HTMLElement, backdrop: HTMLElement, open: HTMLButtonElement,
 *   close: HTMLButtonElement, main: HTMLElement}} ui the #sidebar (the drawer), the
 *   backdrop behind it, the header's "Conversations" button (aria-expanded,
 *   aria-controls="sidebar"), the drawer's close button, and the rest of the page
 *   (inert while the drawer is open)
 * @param {{query?: string}} [options] the media query of a narrow screen
 * @returns {{open: () => void, close: (options?: {focus?: boolean}) => void,
 *   isOpen: () => boolean}}
 */
export function createDrawer(ui, { query = "(max-width: 700px)" } = {}) {
  const narrow = window.matchMedia(query);
  let opened = false;

  function open() {
    if (opened || !narrow.matches) return;
    opened = true;
    ui.sidebar.dataset.open = "";
    ui.backdrop.hidden = false;
    ui.open.setAttribute("aria-expanded", "true");
    ui.main.inert = true;
    const first =
      ui.sidebar.querySelector("#conversations li:not([hidden]) a[aria-current]") ??
      ui.sidebar.querySelector("#conversations li:not([hidden]) a") ??
      ui.sidebar.querySelector("#new-chat");
    first?.focus();
  }

  // `focus`: back to the "Conversations" button (not when the page went away under it).
  function close({ focus = true } = {}) {
    if (!opened) return;
    opened = false;
    delete ui.sidebar.dataset.open;
    ui.backdrop.hidden = true;
    ui.open.setAttribute("aria-expanded", "false");
    ui.main.inert = false;
    if (focus) ui.open.focus();
  }

  ui.open.addEventListener("click", () => (opened ? close() : open()));
  ui.close.addEventListener("click", () => close());
  ui.backdrop.addEventListener("click", () => close());
  ui.sidebar.addEventListener("click", (event) => {
    if (event.target.closest?.("a[href^='#/c/']")) close(); // a conversation was picked
  });
  document.addEventListener("keydown", (event) => {
    if (opened && event.key === "Escape" && !event.defaultPrevented) {
      event.preventDefault();
      close();
    }
  });
  window.addEventListener("hashchange", () => close()); // e.g. "+ New chat" opened one
  narrow.addEventListener("change", () => {
    if (!narrow.matches) close({ focus: false }); // wide again: the sidebar is just there
  });
  // Signed out (household.js hides the sidebar): nothing of the drawer stays over the form.
  new MutationObserver(() => {
    if (ui.sidebar.hidden) close({ focus: false });
  }).observe(ui.sidebar, { attributes: true, attributeFilter: ["hidden"] });

  return { open, close, isOpen: () => opened };
}
