// asyncnode browser client. Plain ES2020, no dependencies, no build step.
//
// Security notes: the page runs under a strict CSP (no inline script/style), and
// data coming from the server or the user is only ever written with textContent or
// attributes -- never innerHTML -- because task payloads/results may contain markup.
'use strict';

const MAX_ROWS = 200;    // rendered table rows cap
const MAX_KEPT = 1000;   // tasks kept in memory; the oldest beyond this are forgotten
const WS_MIN = 500;      // reconnect backoff start (ms)
const WS_MAX = 10000;    // reconnect backoff ceiling (ms)
const RESULT_MAX = 500;  // chars of result/error shown in a cell (full text in title)
const TERMINAL = new Set(['completed', 'failed', 'rejected']);

const tasks = new Map(); // id -> merged task object
const rows = new Map();  // id -> <tr> currently in the table
const dirty = new Set(); // ids changed since the last animation frame
let frameQueued = false;

// ---------------------------------------------------------------- task state

/** Merge a full task or a partial update into the store, honouring per-task seq. */
function mergeTask(u) {
  if (!u || typeof u !== 'object' || Array.isArray(u) || typeof u.id !== 'string' || !u.id) return;
  const cur = tasks.get(u.id);
  // Updates can arrive twice or out of order (socket vs. REST snapshot): only newer seq wins.
  if (cur && typeof u.seq === 'number' && typeof cur.seq === 'number' && u.seq <= cur.seq) return;
  const t = Object.assign(cur || {}, u);
  // Socket updates carry `ts` instead of explicit timestamps; derive what we can so that
  // ages/durations also work for tasks we first learned about over the socket.
  if (typeof u.ts === 'number') {
    if (t.created_at == null || t._local) t.created_at = u.ts; // replace client-clock guess
    if (u.status === 'started' && t.started_at == null) t.started_at = u.ts;
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

function renderResult(cell, t, status) {
  const failing = status === 'failed' || status === 'rejected' || status === 'retrying';
  let text = '';
  let cls = '';
  if (failing && t.error != null && t.error !== '') {
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
      res = await fetch('/api/tasks', {
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
    const res = await fetch('/api/tasks?limit=100', { headers: { Accept: 'application/json' }, cache: 'no-store' });
    if (!res.ok) return;
    const data = await res.json();
    if (data && Array.isArray(data.items)) data.items.forEach(mergeTask);
  } catch (e) { /* offline: the next (re)connect fetches again */ }
}

function handleFrame(data) {
  if (typeof data !== 'string') return;
  let msg;
  try { msg = JSON.parse(data); } catch (e) { return; } // ignore garbage frames
  if (Array.isArray(msg)) msg.forEach(mergeTask);
  else mergeTask(msg);
}

let sock = null;
let backoff = WS_MIN;
let openedAt = 0;
let reconnectTimer = 0;

function setConn(state, text) {
  const el = document.getElementById('conn');
  if (!el) return;
  el.dataset.state = state;
  el.textContent = text;
}

function connect() {
  clearTimeout(reconnectTimer);
  reconnectTimer = 0;
  const url = `${location.protocol === 'https:' ? 'wss:' : 'ws:'}//${location.host}/ws`;
  let s;
  try { s = new WebSocket(url); } catch (e) { scheduleReconnect(); return; }
  sock = s;
  s.addEventListener('open', () => {
    openedAt = Date.now();
    setConn('live', 'live');
    loadTasks(); // catch up on anything missed while disconnected
  });
  s.addEventListener('message', (ev) => handleFrame(ev.data));
  // 'error' is always followed by 'close', so reconnect only from 'close'.
  s.addEventListener('close', () => {
    if (sock !== s) return;
    sock = null;
    scheduleReconnect();
  });
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
