// Every HTTP call the page makes, and their one error shape. The server answers errors as
// JSON {"error": "<code>", "message": "<human text>"} (DESIGN.md "The HTTP API"); here they
// become an ApiError carrying the HTTP status and that code. A `401 login_required` (no
// session, or it ended: a logout elsewhere) is also told to the one listener set with
// `onLoginRequired`, whichever call met it.

/** An HTTP error answer of the API. */
export class ApiError extends Error {
  /**
   * @param {string} message the server's `message`, else "<status> <statusText>"
   * @param {number} status the HTTP status (4xx, 5xx)
   * @param {string|undefined} code the server's `error` code, e.g. "reply_running"
   * @param {object} body the whole JSON body (some errors carry more, e.g. `offset`)
   */
  constructor(message, status, code, body) {
    super(message);
    this.name = "ApiError";
    this.status = status;
    this.code = code;
    this.body = body;
  }
}

/** Called on any `401 login_required` answer (see onLoginRequired). */
let loginRequired = () => {};

/**
 * Set what happens when any call is answered `401 login_required`: the page has no
 * session (any more). Called before that call rejects with its ApiError.
 * @param {() => void} callback
 */
export function onLoginRequired(callback) {
  loginRequired = callback;
}

/**
 * One JSON request. A network failure rejects with fetch's own TypeError.
 * @param {string} method "GET", "POST", ...
 * @param {string} path e.g. "/api/conversations"
 * @param {object} [body] sent as JSON when given
 * @returns {Promise<any>} the parsed JSON answer ({} when it has none)
 * @throws {ApiError} when the status is not 2xx
 */
export async function request(method, path, body) {
  const response = await fetch(path, {
    method,
    headers: body === undefined ? {} : { "Content-Type": "application/json" },
    body: body === undefined ? undefined : JSON.stringify(body),
  });
  const data = await response.json().catch(() => ({}));
  if (!response.ok) {
    const message = data.message || `${response.status} ${response.statusText}`;
    if (response.status === 401 && data.error === "login_required") loginRequired();
    throw new ApiError(message, response.status, data.error, data);
  }
  return data;
}

const conversationPath = (id) => `/api/conversations/${encodeURIComponent(id)}`;

/**
 * The conversation list, newest first.
 * @returns {Promise<Array<{id: string, title: string, created: number, updated: number,
 *   size: number, running: string|null, access: "owner"|"guardian",
 *   owner: string|null}>>} times in ms since the epoch, size in bytes; `access`
 *   "guardian": a child's conversation, read-only to this parent; `owner` the owner's name
 */
export function listConversations() {
  return request("GET", "/api/conversations");
}

/**
 * Create a conversation.
 * @param {{title?: string, model?: string, system?: string}} [fields]
 * @returns {Promise<{id: string, title: string}>} the new conversation (201)
 */
export function createConversation(fields = {}) {
  return request("POST", "/api/conversations", fields);
}

/**
 * Rename a conversation (a `title` record; none when the title is already this one).
 * @param {string} id conversation id
 * @param {string} title 1 to 200 characters once trimmed (the server trims it), with a
 *   visible character and no control character
 * @returns {Promise<{id: string, title: string, archived: boolean, updated: number}>} the
 *   conversation as it stands after (200); `updated` in ms since the epoch
 * @throws {ApiError} 400 `invalid_field` for a title the server refuses; 403
 *   `guardian_read_only`; 404 `not_found`
 */
export function renameConversation(id, title) {
  return request("PATCH", conversationPath(id), { title });
}

/**
 * Archive a conversation (hidden from the list, never deleted), or list it again (an
 * `archive` / `unarchive` record; none when it already is so).
 * @param {string} id conversation id
 * @param {boolean} archived
 * @returns {Promise<{id: string, title: string, archived: boolean, updated: number}>} the
 *   conversation as it stands after (200)
 * @throws {ApiError} 403 `guardian_read_only`; 404 `not_found`
 */
export function setArchived(id, archived) {
  return request("PATCH", conversationPath(id), { archived });
}

/**
 * A page of one conversation, folded by the server: its newest `limit` messages of the
 * current path (before the message `before`, when given), oldest first.
 * @param {string} id
 * @param {{limit?: number, before?: string}} [options] `limit` 1..500 (the server's
 *   default: 50); `before` a message id
 * @returns {Promise<{id: string, title: string, model: string, system: string|null,
 *   messages: object[], more: boolean, offset: number, running: string|null,
 *   writable: boolean}>} `more`: older messages exist before the first one; `offset` in
 *   bytes: the committed offset the page reflects (open the event stream there)
 * @throws {ApiError} 400 for a `before` that is no message of the conversation
 */
export function getPage(id, { limit, before } = {}) {
  const query = new URLSearchParams();
  if (limit !== undefined) query.set("limit", String(limit));
  if (before !== undefined) query.set("before", before);
  const search = query.toString();
  return request("GET", search ? `${conversationPath(id)}?${search}` : conversationPath(id));
}

/**
 * Send a user message; the server starts the reply (202).
 * @param {string} id conversation id
 * @param {string} text
 * @param {{editOf?: string}} [options] `editOf`: edit and resend that question (the new
 *   message is its sibling; the old one stays)
 * @returns {Promise<{message_id: string, reply_id: string, offset: number}>}
 * @throws {ApiError} 409 `reply_running` while a reply runs; 400 `unknown_message`
 */
export function sendMessage(id, text, { editOf } = {}) {
  const body = editOf === undefined ? { text } : { text, edit_of: editOf };
  return request("POST", `${conversationPath(id)}/messages`, body);
}

/**
 * Another answer to the question a reply answers (202); the old answer stays.
 * @param {string} id conversation id
 * @param {string} replyId
 * @returns {Promise<{message_id: string, reply_id: string, offset: number}>}
 * @throws {ApiError} 409 `reply_running`; 400 `unknown_message`; 429 `budget_exceeded`
 */
export function regenerate(id, replyId) {
  return request("POST", `${conversationPath(id)}/regenerate`, { reply_id: replyId });
}

/**
 * Make the branch through a message current (a `select` record).
 * @param {string} id conversation id
 * @param {string} leaf a message id: the path then runs to the newest message under it
 * @returns {Promise<{leaf: string, offset: number}>}
 * @throws {ApiError} 409 `reply_running`; 400 `unknown_message`
 */
export function selectBranch(id, leaf) {
  return request("POST", `${conversationPath(id)}/select`, { leaf });
}

/**
 * Cancel the running reply.
 * @param {string} id conversation id
 * @returns {Promise<{reply_id: string, offset: number}>}
 * @throws {ApiError} 409 `no_reply_running` when none runs
 */
export function stopReply(id) {
  return request("POST", `${conversationPath(id)}/stop`);
}

/**
 * The URL of a conversation's event stream (SSE) starting at a byte offset.
 * @param {string} id conversation id
 * @param {number} from a record boundary (bytes); 0 for the whole log
 * @returns {string}
 */
export function eventsUrl(id, from) {
  return `${conversationPath(id)}/events?from=${from}`;
}

// -- the household (DESIGN.md "The household") -------------------------------------------

/**
 * Who is signed in.
 * @returns {Promise<{id: string, name: string, role: string, accounts: boolean,
 *   readers: string[], budget?: {messages: number|null, tokens: number|null,
 *   resets_in: number}, family?: Array<{id: string, name: string, role: string}>|null}>}
 *   `accounts` false: single-person mode (no account exists, everyone may do everything)
 * @throws {ApiError} 401 `login_required` when accounts exist and there is no session
 */
export function me() {
  return request("GET", "/api/me");
}

/**
 * Sign in; the server sets the session cookie (HttpOnly: this page never sees it).
 * @param {string} name
 * @param {string} password
 * @returns {Promise<{id: string, name: string, role: string}>}
 * @throws {ApiError} 401 `bad_credentials`; 429 `login_throttled` (body `retry_after`, s)
 */
export function login(name, password) {
  return request("POST", "/api/login", { name, password });
}

/**
 * Sign out: the server ends the session at once (204).
 * @returns {Promise<object>}
 */
export function logout() {
  return request("POST", "/api/logout");
}

/**
 * Who was sent a conversation, and who else may read it (its owner and guardians only).
 * @param {string} id conversation id
 * @returns {Promise<{reads: Array<{conn: string, read: string, viewer: string,
 *   name: string|null, from: number, to: number, opened: number, closed: number|null,
 *   reason: string|null, delivered: Array<{to: number, at: number}>}>, readers:
 *   Array<{id: string, name: string, last_read: number|null}>}>} oldest read first;
 *   `delivered`: the receipts (everything before `to` had been sent at `at`); times in
 *   ms since the epoch
 */
export function getAudit(id) {
  return request("GET", `${conversationPath(id)}/audit`);
}

// -- the audit and replay (DESIGN.md "The audit log", "Replay") ---------------------------

/**
 * Tell the server what the page rendered while it was visible (a `seen` in the audit log).
 * @param {string} id conversation id
 * @param {number} offset a record boundary: every record before it was folded and shown
 * @param {string} renderer the page's version, e.g. "chatledger-page/1"
 * @returns {Promise<object>} (204: no body)
 * @throws {ApiError} 416 for an offset that is no record boundary of the committed log
 */
export function markSeen(id, offset, renderer) {
  return request("POST", `${conversationPath(id)}/seen`, { offset, renderer });
}

/**
 * The raw log up to the committed offset, byte for byte (JSONL): what replay plays back.
 * @param {string} id conversation id
 * @returns {Promise<Uint8Array>} its bytes (offsets in the log are indexes into them)
 * @throws {ApiError} when the status is not 2xx
 */
export async function getLog(id) {
  const response = await fetch(`${conversationPath(id)}/log`);
  if (!response.ok) {
    const data = await response.json().catch(() => ({}));
    const message = data.message || `${response.status} ${response.statusText}`;
    if (response.status === 401 && data.error === "login_required") loginRequired();
    throw new ApiError(message, response.status, data.error, data);
  }
  return new Uint8Array(await response.arrayBuffer());
}
