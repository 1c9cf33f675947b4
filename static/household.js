// The household on the page (DESIGN.md "The household"): the sign-in form, who is signed
// in and signing out, what a parent may do with a child's conversation (read it, not
// write in it), what a child is told about who reads its conversations ("Mom can read
// your conversations", "read by Mom, 20:14"), and what is left of today's budget.
//
// In single-person mode (no account exists) it shows nothing. Names are the household's
// text: they are put on the page as text, each in its own <bdi> (bidi-isolated).

import * as api from "./api.js";

/**
 * @typedef {object} HouseholdUi
 * @property {HTMLElement} login the sign-in section (shown instead of `app`)
 * @property {HTMLFormElement} loginForm
 * @property {HTMLInputElement} loginName
 * @property {HTMLInputElement} loginPassword
 * @property {HTMLButtonElement} loginSubmit
 * @property {HTMLElement} loginError
 * @property {HTMLElement[]} app what is hidden while nobody is signed in
 * @property {HTMLElement} account the "Signed in as …" line, with `accountName` and `signOut`
 * @property {HTMLElement} accountName
 * @property {HTMLButtonElement} signOut
 * @property {HTMLElement} oversight the line on who can read, or who may write
 * @property {HTMLElement} budget the line on what is left today
 */

/**
 * The household part of the page.
 *
 * `start()` asks the server who is signed in: with no session (accounts exist) the
 * sign-in form is shown; else, and after each sign-in, `onSignedIn(me)` lets the page
 * begin. `showLogin()` (a sign-out, or any call answered `401 login_required`) hides the
 * page, calls `onSignedOut()` for it to drop what it showed, and shows the form.
 * @param {HouseholdUi} ui
 * @param {{onSignedIn: (me: object|null) => void, onSignedOut: () => void}} hooks
 *   `me` from `GET /api/me`; null when the server could not say (the page begins anyway:
 *   a call that needs a session brings the form back)
 */
export function createHousehold(ui, { onSignedIn, onSignedOut }) {
  /** `GET /api/me` of who is signed in; null while signed out (or unknown). */
  let me = null;
  let signedOut = false;
  /** The open conversation: its id, its row of the list (once known), who read it. */
  const open = { id: null, row: undefined, readBy: [] };

  const accounts = () => me?.accounts === true;

  async function start() {
    let answer;
    try {
      answer = await api.me();
    } catch (error) {
      if (error.status === 401) return; // onLoginRequired has shown the form
      answer = null; // no answer for now: begin, a call that needs a session will say
    }
    signedIn(answer);
  }

  function signedIn(answer) {
    me = answer;
    signedOut = false;
    ui.login.hidden = true;
    for (const element of ui.app) element.hidden = false;
    showAccount();
    renderNotes();
    onSignedIn(me);
  }

  function showLogin() {
    if (signedOut) return;
    signedOut = true;
    me = null;
    Object.assign(open, { id: null, row: undefined, readBy: [] });
    onSignedOut();
    showAccount();
    renderNotes();
    for (const element of ui.app) element.hidden = true;
    ui.login.hidden = false;
    ui.loginSubmit.disabled = false;
    ui.loginName.focus();
  }

  async function submit(event) {
    event.preventDefault();
    if (ui.loginSubmit.disabled) return;
    ui.loginSubmit.disabled = true;
    showLine(ui.loginError, "");
    try {
      await api.login(ui.loginName.value, ui.loginPassword.value);
      ui.loginPassword.value = "";
      signedIn(await api.me());
    } catch (error) {
      ui.loginSubmit.disabled = false;
      if (error.code === "no_accounts") {
        start(); // the accounts are gone: single-person mode
      } else if (signedOut) {
        showLine(ui.loginError, loginErrorText(error));
        ui.loginPassword.select();
      }
    }
  }

  async function signOut() {
    ui.signOut.disabled = true;
    try {
      await api.logout();
    } catch (error) {
      ui.signOut.disabled = false;
      ui.signOut.title = `Could not sign out: ${error.message}`;
      return;
    }
    ui.signOut.disabled = false;
    ui.signOut.title = "";
    // The next person to sign in here starts from the list, not in this one's conversation.
    history.replaceState(null, "", location.pathname + location.search);
    showLogin();
  }

  function showAccount() {
    ui.account.hidden = !accounts();
    if (!accounts()) return;
    ui.accountName.replaceChildren("Signed in as ", bdi(me.name), ` (${me.role})`);
  }

  // -- the open conversation ---------------------------------------------------------

  /** Who read the open conversation, from its audit: asked for when it opens, and when
   * the page is looked at again. Only a child's page asks (it has readers). */
  async function loadReadBy() {
    const { id } = open;
    if (!id || !accounts() || !me.readers?.length || isReadOnly(open.row)) return;
    let audit;
    try {
      audit = await api.getAudit(id);
    } catch {
      return; // nothing said: the reader line stays as it was
    }
    if (open.id !== id) return;
    open.readBy = audit.readers.filter((reader) => reader.last_read != null);
    renderNotes();
  }

  function renderNotes() {
    renderOversight();
    renderBudget();
  }

  function renderOversight() {
    const lines = [];
    if (accounts() && open.id && open.row?.access === "guardian") {
      const owner = open.row.owner ?? "its owner";
      lines.push(span("read-only", [
        "You can read ", bdi(owner), "'s conversation; only ", bdi(owner), " can write in it",
      ]));
    } else if (accounts() && me.readers?.length) {
      lines.push(span("readers", [...names(me.readers), " can read your conversations"]));
      for (const reader of open.id ? open.readBy : []) {
        const when = formatTime(reader.last_read);
        lines.push(span("read-by", ["read by ", bdi(reader.name), `, ${when}`]));
      }
    }
    ui.oversight.replaceChildren(...lines);
    ui.oversight.hidden = lines.length === 0;
  }

  function renderBudget() {
    const shown = accounts() && !(open.id && isReadOnly(open.row));
    const budget = shown ? me.budget : undefined;
    showLine(ui.budget, budgetText(budget));
    ui.budget.classList.toggle("used-up", budget?.messages === 0 || budget?.tokens === 0);
  }

  /**
   * Whether the conversation of this list row is read-only here: a child's, opened by a
   * parent. With no row yet (the list has not come), a parent waits for it.
   * @param {{access?: string}|undefined} row
   * @returns {boolean}
   */
  function isReadOnly(row) {
    if (row) return row.access === "guardian";
    return accounts() && me.role === "parent";
  }

  ui.loginForm.addEventListener("submit", submit);
  ui.signOut.addEventListener("click", signOut);
  document.addEventListener("visibilitychange", () => {
    if (document.visibilityState === "visible") loadReadBy();
  });

  return {
    start,
    showLogin,
    isReadOnly,
    /** A conversation opened (its row of the list, if known); null: none is open. */
    openConversation(id, row) {
      Object.assign(open, { id, row, readBy: [] });
      renderNotes();
      loadReadBy();
    },
    /** The list came: the open conversation's row, for what may be done with it. */
    setRow(row) {
      const first = open.row === undefined && row !== undefined;
      open.row = row;
      renderNotes();
      if (first) loadReadBy();
    },
    /** Ask again what is left of today's budget (after a message, a reply's end). */
    async refreshBudget() {
      if (!accounts()) return;
      let answer;
      try {
        answer = await api.me();
      } catch {
        return; // a 401 brought the form; else the line stays as it was
      }
      if (me && answer.id === me.id) {
        me = answer;
        renderNotes();
      }
    },
    /**
     * Mark the list's rows of children's conversations with the child's name and
     * "read-only" (the list was rendered from `rows`, in order, by conversations.js).
     * @param {HTMLElement} list the #conversations <ul>
     * @param {object[]} rows
     */
    decorateList(list, rows) {
      rows.forEach((row, i) => {
        const link = list.children[i]?.querySelector("a");
        if (!link || row.access !== "guardian") return;
        link.append(span("owner-mark", [bdi(row.owner ?? "?"), " · read-only"]));
      });
    },
  };
}

/**
 * What the sign-in form says when signing in failed.
 * @param {Error & {status?: number, code?: string, body?: object}} error
 * @returns {string}
 */
export function loginErrorText(error) {
  if (error.code === "bad_credentials") return "Wrong name or password.";
  if (error.status === 429) {
    const seconds = Number(error.body?.retry_after);
    return Number.isFinite(seconds) && seconds > 0
      ? `Too many tries: wait ${seconds} s, then try again.`
      : "Too many tries: wait a while, then try again.";
  }
  if (error.status === undefined) return "Could not reach the server; try again.";
  return `Could not sign in: ${error.message}`;
}

/**
 * What is left of today's budget, e.g. "12 messages left today"; "" with no limit.
 * @param {{messages: number|null, tokens: number|null, resets_in: number}|undefined} budget
 * @returns {string}
 */
export function budgetText(budget) {
  if (!budget) return "";
  const parts = [];
  if (budget.messages != null) {
    parts.push(`${budget.messages} ${budget.messages === 1 ? "message" : "messages"}`);
  }
  if (budget.tokens != null) parts.push(`${budget.tokens.toLocaleString()} tokens`);
  if (parts.length === 0) return "";
  let text = `${parts.join(" and ")} left today`;
  if (budget.messages === 0 || budget.tokens === 0) {
    text += ` (more in ${formatDuration(budget.resets_in)})`;
  }
  return text;
}

/**
 * A time of day in local time, 24-hour ("20:14"); with the date when not today.
 * @param {number} ms since the epoch
 * @param {Date} [now]
 * @returns {string}
 */
export function formatTime(ms, now = new Date()) {
  const date = new Date(ms);
  const time = date.toLocaleTimeString([], { hour: "2-digit", minute: "2-digit", hourCycle: "h23" });
  if (date.toDateString() === now.toDateString()) return time;
  return `${date.toLocaleDateString([], { day: "numeric", month: "short" })}, ${time}`;
}

/**
 * @param {number} seconds
 * @returns {string} e.g. "3 h 5 min", "12 min", "a minute"
 */
export function formatDuration(seconds) {
  const minutes = Math.ceil(Math.max(0, Number(seconds) || 0) / 60);
  if (minutes <= 1) return "a minute";
  const hours = Math.floor(minutes / 60);
  if (hours === 0) return `${minutes} min`;
  return minutes % 60 ? `${hours} h ${minutes % 60} min` : `${hours} h`;
}

// -- nodes ---------------------------------------------------------------------------

/** "Mom", "Mom and Dad", "Ann, Mom and Dad": each name in its own <bdi>. */
function names(list) {
  const nodes = [];
  list.forEach((name, i) => {
    if (i > 0) nodes.push(i === list.length - 1 ? " and " : ", ");
    nodes.push(bdi(name));
  });
  return nodes;
}

function bdi(text) {
  const element = document.createElement("bdi");
  element.dir = "auto";
  element.textContent = text;
  return element;
}

function span(className, nodes) {
  const element = document.createElement("span");
  element.className = className;
  element.append(...nodes);
  return element;
}

function showLine(element, text) {
  element.textContent = text;
  element.hidden = !text;
}
