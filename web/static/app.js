// asyncnode browser client. Plain ES2020, no dependencies, no build step.
//
// Security notes: the page runs under a strict CSP (no inline script/style), and
// data coming from the server or the user is only ever written with textContent or
// attributes -- never innerHTML -- because task payloads/results may contain markup.
//
// DOM hooks (tests rely on them): #conn[data-state], #task-rows > tr[data-id][data-status]
// with td.id/.type/.status/.progress/.attempts/.worker/.time/.result, span.badge.status-*,
// #tasks-empty, #task-count, form.task-form[data-type] with [name][data-kind] fields,
// #<field-id>-err and [role="status"]; the token dialog: #token-dialog, #token-form,
// #token-input, #token-error, #token-submit, #token-cancel.
//
// Access token: when the server has `[api] token`, every /api/* call needs
// `Authorization: Bearer <token>` and the socket needs /ws?token=<token>. The token is
// asked for once (on the first 401) and kept in sessionStorage for this tab's session.
'use strict';

const MAX_ROWS = 200;    // rendered table rows cap
const MAX_KEPT = 1000;   // tasks kept in memory; the oldest beyond this are forgotten
const WS_MIN = 500;      // reconnect backoff start (ms)
const WS_MAX = 10000;    // reconnect backoff ceiling (ms)
const RESULT_MAX = 500;  // chars of result/error shown in a cell (full text in title)
const TERMINAL = new Set(['completed', 'failed', 'rejected']);
const TOKEN_KEY = 'asyncnode.token'; // sessionStorage key of the API access token

const tasks = new Map(); // id -> merged task object
const rows = new Map();  // id -> <tr> currently in the table
const dirty = new Set(); // ids changed since the last animation frame
let frameQueued = false;

// ---------------------------------------------------------------- task state

/** A finite number from a number or numeric string (seq, attempt, times), else null. */
function toNum(x) {
  const v = typeof x === 'number' ? x : typeof x === 'string' && x.trim() !== '' ? Number(x) : NaN;
  return Number.isFinite(v) ? v : null;
}

const isTime = (v) => typeof v === 'number' && Number.isFinite(v);

/**
 * Merge a full task or a partial update into the store, honouring per-task seq.
 *
 * Updates arrive twice and out of order (REST list, socket updates, the snapshot the
 * server sends on every (re)connect), so a task only ever moves forward: data with a
 * seq not above the one held is not applied, and neither is data without a seq once
 * the task has a real one. Such stale data may still fill in a missing type/payload,
 * and a real created_at always replaces one guessed from `ts`.
 */
function mergeTask(u) {
  if (!u || typeof u !== 'object' || Array.isArray(u) || typeof u.id !== 'string' || !u.id) return;
  const cur = tasks.get(u.id);
  if (cur) {
    const have = toNum(cur.seq);
    const got = toNum(u.seq);
    const newer = have === null || cur._local ? true : got !== null && got > have;
    if (!newer) {
      let changed = false;
      for (const k of ['type', 'payload']) {
        if (cur[k] == null && u[k] != null) { cur[k] = u[k]; changed = true; }
      }
      if (isTime(u.created_at) && (cur._tsCreated || cur.created_at == null)) {
        cur.created_at = u.created_at;
        delete cur._tsCreated;
        changed = true;
      }
      if (changed) markDirty(u.id);
      return;
    }
  }
  const prevStatus = cur ? cur.status : undefined;
  const t = Object.assign(cur || {}, u);
  if (typeof u.status === 'string' && u.status !== prevStatus) {
    // progress/note describe one running attempt: a new status (a retry, a new start,
    // the end) must not keep showing the previous attempt's values.
    if (!('progress' in u)) delete t.progress;
    if (!('note' in u)) delete t.note;
  }
  if (isTime(u.created_at)) delete t._tsCreated;
  // Socket updates carry `ts` instead of explicit timestamps; derive what we can so that
  // ages/durations also work for tasks we first learned about over the socket.
  if (isTime(u.ts)) {
    if (t.created_at == null || t._local) { // none yet, or replace the client-clock guess
      t.created_at = u.ts;
      t._tsCreated = true;
    }
    if (u.status === 'started' && (t.started_at == null || (prevStatus !== 'started' && !isTime(u.started_at)))) {
      t.started_at = u.ts; // a new attempt starts its own clock
    }
    if (TERMINAL.has(u.status) && t.finished_at == null) t.finished_at = u.ts;
  }
  if (!u._local) delete t._local; // real server data has replaced the optimistic guess
  tasks.set(u.id, t);
  markDirty(u.id);
}

function markDirty(id) {
  dirty.add(id);
  // Coalesce bursts of updates into one DOM pass per frame.
  if (!frameQueued) { frameQueued = true; requestAnimationFrame(flush); }
}

const byNewest = (a, b) => (b.created_at || 0) - (a.created_at || 0);

// ---------------------------------------------------------------- rendering

function flush() {
  frameQueued = false;
  const body = document.getElementById('task-rows');
  const ordered = [...tasks.values()].sort(byNewest); // stable: ties keep arrival order
  for (const t of ordered.splice(MAX_KEPT)) tasks.delete(t.id);
  const visible = ordered.slice(0, MAX_ROWS);
  const keep = new Set();
  visible.forEach((t, i) => {
    let tr = rows.get(t.id);
    if (!tr) { tr = createRow(t.id); rows.set(t.id, tr); dirty.add(t.id); }
    if (dirty.has(t.id)) updateRow(tr, t);
    keep.add(t.id);
    // Move rows only when out of place, so unchanged rows keep focus/selection.
    const at = body.children[i];
    if (at !== tr) body.insertBefore(tr, at || null);
  });
  for (const [id, tr] of rows) if (!keep.has(id)) { tr.remove(); rows.delete(id); }
  dirty.clear();
  document.getElementById('tasks-empty').hidden = tasks.size > 0;
  const count = document.getElementById('task-count');
  if (count) {
    count.textContent = tasks.size > visible.length
      ? `showing ${visible.length} of ${tasks.size}`
      : `${tasks.size} task${tasks.size === 1 ? '' : 's'}`;
  }
}

const COLS = ['id', 'type', 'status', 'progress', 'attempts', 'worker', 'time', 'result'];

function createRow(id) {
  const tr = document.createElement('tr');
  tr.dataset.id = id;
  for (const name of COLS) {
    const td = document.createElement('td');
    td.className = name;
    tr.appendChild(td);
  }
  const code = document.createElement('code');
  code.textContent = id.slice(0, 8);
  code.title = id;
  tr.cells[0].appendChild(code);
  return tr;
}

function updateRow(tr, t) {
  const status = String(t.status || 'unknown');
  const c = tr.cells;
  tr.dataset.status = status;
  c[1].textContent = t.type == null ? '' : String(t.type);

  const badge = document.createElement('span');
  badge.className = 'badge status-' + status.replace(/[^a-z0-9_-]/gi, '');
  badge.textContent = status;
  c[2].replaceChildren(badge);

  if (status === 'started' && typeof t.progress === 'number' && isFinite(t.progress)) {
    const v = Math.min(1, Math.max(0, t.progress));
    const pct = `${Math.round(v * 100)}%`;
    const bar = document.createElement('progress');
    bar.max = 1;
    bar.value = v;
    bar.textContent = pct; // fallback content
    bar.setAttribute('aria-label', `progress ${pct}`);
    const label = document.createElement('span');
    label.className = 'pct';
    label.textContent = pct;
    c[3].replaceChildren(bar, label);
  } else {
    c[3].replaceChildren();
  }

  c[4].textContent = t.attempts == null ? '' : String(t.attempts);
  c[5].textContent = t.worker == null ? '' : String(t.worker);
  c[6].textContent = timeText(t);
  renderResult(c[7], t, status);
}

const pad2 = (n) => String(n).padStart(2, '0');

/** Local wall-clock HH:MM:SS of a unix time in seconds, or '' if it is not a time. */
function clockTime(sec) {
  const n = toNum(sec);
  if (n === null) return '';
  const d = new Date(n * 1000);
  return `${pad2(d.getHours())}:${pad2(d.getMinutes())}:${pad2(d.getSeconds())}`;
}

/** "retry N at HH:MM:SS — error" for a task waiting for its next attempt. */
function retryText(t) {
  const n = toNum(t.attempt);
  const at = clockTime(t.next_attempt_at);
  let text = 'retry';
  if (n !== null) text += ` ${n}`;
  if (at) text += ` at ${at}`;
  if (t.error != null && t.error !== '') {
    text += ` \u2014 ${typeof t.error === 'string' ? t.error : JSON.stringify(t.error)}`;
  }
  return text;
}

function renderResult(cell, t, status) {
  const failing = status === 'failed' || status === 'rejected';
  let text = '';
  let cls = '';
  if (status === 'retrying') {
    text = retryText(t);
    cls = 'retry';
  } else if (failing && t.error != null && t.error !== '') {
    text = typeof t.error === 'string' ? t.error : JSON.stringify(t.error);
    cls = 'error';
  } else if (t.result !== undefined && (t.result !== null || status === 'completed')) {
    // Strings are shown verbatim (not JSON-quoted) so text results read naturally.
    text = typeof t.result === 'string' ? t.result : JSON.stringify(t.result);
  } else if (t.note) {
    text = String(t.note);
    cls = 'note';
  }
  cell.title = text.length > RESULT_MAX ? text : '';
  const shown = text.length > RESULT_MAX ? text.slice(0, RESULT_MAX) + '…' : text;
  if (cls) {
    const span = document.createElement('span');
    span.className = cls;
    span.textContent = shown;
    cell.replaceChildren(span);
  } else {
    cell.textContent = shown;
  }
}

function fmtDur(s) {
  s = Math.max(0, s);
  if (s < 1) return `${Math.round(s * 1000)} ms`;
  if (s < 10) return `${s.toFixed(1)} s`;
  if (s < 60) return `${Math.round(s)} s`;
  if (s < 3600) return `${Math.floor(s / 60)} m ${Math.floor(s % 60)} s`;
  if (s < 86400) return `${Math.floor(s / 3600)} h ${Math.floor((s % 3600) / 60)} m`;
  return `${Math.floor(s / 86400)} d`;
}

/** Duration for finished tasks, running time for started ones, age otherwise. */
function timeText(t) {
  const now = Date.now() / 1000;
  if (t.finished_at != null) {
    const start = t.started_at != null ? t.started_at : t.created_at;
    return start != null ? `took ${fmtDur(t.finished_at - start)}` : '';
  }
  if (t.status === 'started' && t.started_at != null) return `running ${fmtDur(now - t.started_at)}`;
  return t.created_at != null ? `${fmtDur(now - t.created_at)} ago` : '';
}

// ---------------------------------------------------------------- access token

let memToken = '';      // fallback when sessionStorage is unavailable (blocked storage)
let storageOk = true;

/** The access token known for this session, or '' if none. */
function getToken() {
  if (storageOk) {
    try { return sessionStorage.getItem(TOKEN_KEY) || ''; } catch (e) { storageOk = false; }
  }
  return memToken;
}

function setToken(token) {
  memToken = token;
  if (!storageOk) return;
  try {
    if (token) sessionStorage.setItem(TOKEN_KEY, token);
    else sessionStorage.removeItem(TOKEN_KEY);
  } catch (e) { storageOk = false; }
}

// One prompt at a time: every call that got a 401 waits on the same open dialog.
const tokenPrompt = {
  waiters: [],      // resolve functions of calls waiting for a token (null = dismissed)
  checking: null,   // token submitted from the dialog whose first answer is still awaited
  returnFocus: null,
};

const tokenEl = (name) => document.getElementById(`token-${name}`);

function setTokenError(text) {
  const err = tokenEl('error');
  const input = tokenEl('input');
  if (err) err.textContent = text;
  if (input) {
    if (text) input.setAttribute('aria-invalid', 'true');
    else input.removeAttribute('aria-invalid');
  }
}

function openTokenDialog() {
  const dlg = tokenEl('dialog');
  if (!dlg || dlg.open) return;
  tokenPrompt.returnFocus = document.activeElement;
  const input = tokenEl('input');
  if (input) input.value = '';
  setTokenError('');
  try {
    if (typeof dlg.showModal === 'function') dlg.showModal();
    else dlg.setAttribute('open', '');
  } catch (e) {
    dlg.setAttribute('open', ''); // e.g. already open non-modally
  }
  if (input) input.focus();
}

function closeTokenDialog() {
  const dlg = tokenEl('dialog');
  if (!dlg || !dlg.open) return;
  if (typeof dlg.close === 'function') dlg.close(); // fires 'close' -> onTokenDialogClosed
  else { dlg.removeAttribute('open'); onTokenDialogClosed(); }
}

/** The dialog closed (token accepted, Cancel or Escape): release whoever still waits. */
function onTokenDialogClosed() {
  const dlg = tokenEl('dialog');
  if (dlg && dlg.open) return; // reopened before this (asynchronous) event ran
  tokenPrompt.checking = null;
  for (const resolve of tokenPrompt.waiters.splice(0)) resolve(null);
  const back = tokenPrompt.returnFocus;
  tokenPrompt.returnFocus = null;
  if (back && back !== document.body && document.contains(back) && typeof back.focus === 'function') {
    back.focus();
  }
}

/** Resolves with the token the user submits, or null if the dialog is dismissed. */
function waitForToken() {
  if (!tokenEl('dialog')) return Promise.resolve(null);
  openTokenDialog();
  return new Promise((resolve) => tokenPrompt.waiters.push(resolve));
}

function onTokenSubmit(ev) {
  ev.preventDefault();
  const input = tokenEl('input');
  const value = input ? input.value.trim() : '';
  if (!value) {
    setTokenError('Enter the access token.');
    if (input) input.focus();
    return;
  }
  // An HTTP header can carry only this; anything else cannot be the server's token.
  if (!/^[\x20-\x7e]+$/.test(value)) {
    setTokenError('wrong token');
    if (input) { input.focus(); input.select(); }
    return;
  }
  setToken(value);
  setTokenError('');
  tokenPrompt.checking = value; // the next answer to a call made with it decides
  const waiters = tokenPrompt.waiters.splice(0);
  for (const resolve of waiters) resolve(value); // each waiting call retries with it
  if (!waiters.length) verifyToken(); // nothing to retry: check the token ourselves
  if (authBlocked && !sock) connect();
}

/** Check a token submitted while no call was waiting; on success catch up on tasks. */
async function verifyToken() {
  try {
    const res = await api('/api/tasks?limit=1', { headers: { Accept: 'application/json' }, cache: 'no-store' });
    if (res.status !== 401) loadTasks();
  } catch (e) {
    if (tokenEl('dialog') && tokenEl('dialog').open) setTokenError('Could not reach the server; try again.');
  }
}

function initTokenDialog() {
  const dlg = tokenEl('dialog');
  if (!dlg) return;
  const form = tokenEl('form') || dlg.querySelector('form');
  if (form) form.addEventListener('submit', onTokenSubmit);
  dlg.addEventListener('close', onTokenDialogClosed);
  const cancel = tokenEl('cancel');
  if (cancel) cancel.addEventListener('click', closeTokenDialog);
  const input = tokenEl('input');
  if (input) input.addEventListener('input', () => setTokenError(''));
}

/**
 * fetch() for every /api/* call: adds `Authorization: Bearer <token>` when a token is
 * known. On a 401 it asks for the token (one shared dialog for concurrent calls) and
 * retries; a retry answered 401 again shows "wrong token" and keeps the dialog open.
 * Resolves with the final Response (a 401 one only if the dialog was dismissed);
 * rejects like fetch() on a network error.
 */
async function api(path, options = {}) {
  let token = getToken();
  for (;;) {
    const headers = {};
    const given = options.headers;
    if (given && typeof given.forEach === 'function' && !Array.isArray(given)) {
      given.forEach((v, k) => { headers[k] = v; }); // a Headers object
    } else if (given) {
      Object.assign(headers, Array.isArray(given) ? Object.fromEntries(given) : given);
    }
    if (token) headers.Authorization = `Bearer ${token}`;
    let res;
    try {
      res = await fetch(path, Object.assign({}, options, { headers }));
    } catch (e) {
      if (token && tokenPrompt.checking === token) {
        tokenPrompt.checking = null;
        setTokenError('Could not reach the server; try again.');
      }
      throw e;
    }
    if (res.status !== 401) {
      if (token && tokenPrompt.checking === token) closeTokenDialog(); // the token works
      return res;
    }
    const now = getToken();
    if (now !== token) { token = now; continue; } // set meanwhile (another call's prompt)
    if (token && tokenPrompt.checking === token) {
      tokenPrompt.checking = null;
      setTokenError('wrong token');
      openTokenDialog(); // (still open: keep it so)
      const input = tokenEl('input');
      if (input) { input.focus(); input.select(); }
    }
    const next = await waitForToken();
    if (next === null) return res; // dismissed: the caller sees the 401
    token = next;
  }
}

// ---------------------------------------------------------------- forms

function setStatus(form, text, state) {
  const out = form.querySelector('[role="status"]');
  if (!out) return;
  out.textContent = text;
  out.dataset.state = state;
}

function clearFieldError(el) {
  if (!el || !el.id || !el.hasAttribute('aria-invalid')) return;
  el.removeAttribute('aria-invalid');
  const err = document.getElementById(`${el.id}-err`);
  if (err) { err.textContent = ''; err.hidden = true; }
}

function showFieldError(form, name, msg) {
  const el = [...form.querySelectorAll('[name]')].find((e) => e.name === name);
  if (!el) return false;
  el.setAttribute('aria-invalid', 'true');
  const err = document.getElementById(`${el.id}-err`);
  if (err) { err.textContent = msg; err.hidden = false; }
  el.focus();
  return true;
}

function collectPayload(form) {
  const payload = {};
  for (const el of form.querySelectorAll('[name][data-kind]')) {
    const kind = el.dataset.kind;
    if (kind === 'boolean') { payload[el.name] = el.checked; continue; }
    const raw = el.value;
    const numeric = kind === 'integer' || kind === 'number';
    if (raw.trim() === '') {
      if (!el.required) continue; // omit optional blanks so server-side defaults apply
      payload[el.name] = numeric ? null : raw; // let the server report the missing value
      continue;
    }
    payload[el.name] = numeric ? Number(raw) : raw;
  }
  return payload;
}

async function submitTask(form) {
  const type = form.dataset.type;
  const btn = form.querySelector('button[type="submit"]');
  form.querySelectorAll('[aria-invalid]').forEach(clearFieldError);
  setStatus(form, 'Sending…', 'busy');
  if (btn) btn.disabled = true;
  try {
    let res;
    try {
      res = await api('/api/tasks', {
        method: 'POST',
        headers: { 'Content-Type': 'application/json', Accept: 'application/json' },
        body: JSON.stringify({ type, payload: collectPayload(form) }),
      });
    } catch (e) {
      setStatus(form, 'Network error: could not reach the server.', 'error');
      return;
    }
    let body = null;
    try { body = await res.json(); } catch (e) { /* non-JSON body */ }
    const msg = body && typeof body.error === 'string' ? body.error : '';

    if (res.ok) {
      const id = body && typeof body.id === 'string' ? body.id : '';
      setStatus(form, id ? `queued ${id.slice(0, 8)}` : 'queued', 'ok');
      // Show it immediately; the socket may already have delivered it (then keep that).
      if (id && !tasks.has(id)) {
        mergeTask({ id, type, status: body.status || 'pending', seq: -1,
          created_at: Date.now() / 1000, _local: true });
      }
    } else if (res.status === 401) {
      setStatus(form, 'Error: an access token is required to queue tasks.', 'error');
    } else if (res.status === 503) {
      setStatus(form, `Service unavailable${msg ? `: ${msg}` : ', try again shortly.'}`, 'error');
    } else if (res.status >= 400 && res.status < 500) {
      const text = msg || `Request rejected (${res.status}).`;
      if (body && typeof body.field === 'string') showFieldError(form, body.field, text);
      setStatus(form, `Error: ${text}`, 'error');
    } else {
      setStatus(form, `Server error (${res.status})${msg ? `: ${msg}` : ''}`, 'error');
    }
  } finally {
    if (btn) btn.disabled = false;
  }
}

function initForms() {
  for (const form of document.querySelectorAll('form.task-form[data-type]')) {
    form.addEventListener('submit', (ev) => { ev.preventDefault(); submitTask(form); });
    // Drop a server-reported field error as soon as the user edits that field.
    form.addEventListener('input', (ev) => clearFieldError(ev.target));
  }
}

// ---------------------------------------------------------------- server sync

async function loadTasks() {
  try {
    const res = await api('/api/tasks?limit=100', { headers: { Accept: 'application/json' }, cache: 'no-store' });
    if (!res.ok) return;
    const data = await res.json();
    if (data && Array.isArray(data.items)) data.items.forEach(mergeTask);
  } catch (e) { /* offline: the next (re)connect fetches again */ }
}

function handleFrame(data) {
  if (typeof data !== 'string') return;
  let msg;
  try { msg = JSON.parse(data); } catch (e) { return; } // ignore garbage frames
  // An array is several queued updates, or the snapshot of recent tasks the server sends
  // on connect and after a Redis outage: the same update objects, merged by seq.
  if (Array.isArray(msg)) msg.forEach(mergeTask);
  else mergeTask(msg);
}

let sock = null;
let backoff = WS_MIN;
let openedAt = 0;
let reconnectTimer = 0;
let authBlocked = false; // the socket needs a token and the prompt was dismissed

function setConn(state, text) {
  const el = document.getElementById('conn');
  if (!el) return;
  el.dataset.state = state;
  el.textContent = text;
}

function connect() {
  clearTimeout(reconnectTimer);
  reconnectTimer = 0;
  authBlocked = false;
  const token = getToken();
  const query = token ? `?token=${encodeURIComponent(token)}` : '';
  const url = `${location.protocol === 'https:' ? 'wss:' : 'ws:'}//${location.host}/ws${query}`;
  let s;
  try { s = new WebSocket(url); } catch (e) { scheduleReconnect(); return; }
  sock = s;
  let opened = false;
  s.addEventListener('open', () => {
    opened = true;
    openedAt = Date.now();
    setConn('live', 'live');
    loadTasks(); // catch up on anything missed while disconnected
  });
  s.addEventListener('message', (ev) => handleFrame(ev.data));
  // 'error' is always followed by 'close', so reconnect only from 'close'.
  s.addEventListener('close', () => {
    if (sock !== s) return;
    sock = null;
    if (opened) scheduleReconnect();
    else onOpenFailed(token); // maybe refused for want of a (valid) token
  });
}

/**
 * The socket never opened. A browser does not expose the upgrade's HTTP status, so ask
 * the API: a 401 there means the token is missing or wrong, and api() prompts for it;
 * once a new token is known reconnect at once, otherwise back off as usual.
 */
async function onOpenFailed(usedToken) {
  setConn('reconnecting', 'reconnecting…');
  let res;
  try {
    res = await api('/api/tasks?limit=1', { headers: { Accept: 'application/json' }, cache: 'no-store' });
  } catch (e) {
    res = null; // server unreachable: plain backoff
  }
  if (sock || reconnectTimer) return; // reconnected meanwhile (e.g. 'online', new token)
  if (res && res.status === 401) { // prompt dismissed: wait for a token before retrying
    authBlocked = true;
    setConn('auth', 'access token required');
    return;
  }
  if (res && getToken() !== usedToken) { backoff = WS_MIN; connect(); return; }
  scheduleReconnect();
}

function scheduleReconnect() {
  // Reset the backoff only if the last connection was stable; a server that accepts and
  // immediately drops us must not cause a tight reconnect loop.
  if (openedAt && Date.now() - openedAt > 5000) backoff = WS_MIN;
  openedAt = 0;
  setConn('reconnecting', 'reconnecting…');
  const delay = backoff * (0.75 + Math.random() * 0.25); // jitter spreads reconnect storms
  backoff = Math.min(backoff * 2, WS_MAX);
  reconnectTimer = setTimeout(connect, delay);
}

// ---------------------------------------------------------------- boot

function init() {
  initTokenDialog();
  initForms();
  loadTasks();
  connect();
  window.addEventListener('online', () => { if (!sock) connect(); });
  // Keep ages/durations fresh without re-rendering whole rows.
  setInterval(() => {
    if (document.hidden) return;
    for (const [id, tr] of rows) {
      const t = tasks.get(id);
      if (t) tr.cells[6].textContent = timeText(t);
    }
  }, 1000);
}

if (document.readyState === 'loading') document.addEventListener('DOMContentLoaded', init);
else init();
