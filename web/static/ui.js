// DOM helpers every panel shares: text and attribute setters, the table-row and button builders, formats.

export const $ = (id) => document.getElementById(id);

/** Set an element's text only when it differs (no needless DOM mutation). */
export function setText(el, text) {
  if (el && el.textContent !== text) el.textContent = text;
}

/** Set a data-* attribute only when it differs. */
export function setData(el, key, value) {
  if (el && el.dataset[key] !== value) el.dataset[key] = value;
}

/** Set an element's title only when it differs. */
export function setTitle(el, text) {
  if (el && el.title !== text) el.title = text;
}

/** Show or hide an element, touching the attribute only on a change (no style work). */
export function setHidden(el, hidden) {
  if (el && el.hidden !== hidden) el.hidden = hidden;
}

/** Text of any JSON value: strings verbatim, the rest as JSON. */
export function asText(v, pretty) {
  if (v === undefined) return '';
  if (typeof v === 'string') return v;
  try { return JSON.stringify(v, null, pretty ? 2 : undefined) ?? String(v); } catch (e) { return String(v); }
}

export const shortId = (id) => String(id).slice(0, 8);

/** A finite number from a number or numeric string (seq, attempt, times), else null. */
export function toNum(x) {
  const v = typeof x === 'number' ? x : typeof x === 'string' && x.trim() !== '' ? Number(x) : NaN;
  return Number.isFinite(v) ? v : null;
}

export const isTime = (v) => typeof v === 'number' && Number.isFinite(v);

/**
 * Merge a full task or a partial update into the store, honouring per-task seq.
 *
 * Updates arrive twice and out of order (REST list, socket updates, the snapshot the
 * server sends on every (re)connect), so a task only ever moves forward: data with a
 * seq not above the one held is not applied, and neither is data without a seq once
 * the task has a real one. Such stale data may still fill in a missing type/queue/payload,
 * and a real created_at always replaces one guessed from `ts`.
 */

const NO_COLS = new Set();

/**
 * A table row with one <td class="<column>"> per name of `cols` (also class "num" for those in
 * `numeric`): the one builder of the rows of every table. Returns the row and its cells by name.
 */
export function tableRow(cols, numeric = NO_COLS) {
  const tr = document.createElement('tr');
  const td = {};
  for (const name of cols) {
    const cell = document.createElement('td');
    cell.className = name;
    if (numeric.has(name)) cell.classList.add('num');
    tr.appendChild(cell);
    td[name] = cell;
  }
  return { tr, td };
}

/** A row's action button (requeue, discard, pause, resume, cancel): `cls` says which. */
export function actionButton(cls, text, label = '') {
  const b = document.createElement('button');
  b.type = 'button';
  b.className = `btn btn-small ${cls}`;
  b.textContent = text;
  if (label) b.setAttribute('aria-label', label);
  return b;
}

/** The inline error beside a row's actions, hidden while empty (see setInlineError). Not of class
 *  "error": in a task's row that is the task's own error. */
export function rowError() {
  const err = document.createElement('span');
  err.className = 'row-error';
  err.hidden = true;
  return err;
}

/** The inline error of a dead letter's or a queue's row (its entry.el.err). */
export function setRowError(entry, text) {
  setInlineError(entry.el.err, text);
}

/** A panel's status line (#queues-status, #dlq-status, #tasks-status); `fromPoll` marks a
 *  poll's own error, which the next good poll clears. */
export function panelStatus(id, text, state, fromPoll = false) {
  const el = $(id);
  if (!el) return;
  el.textContent = text;
  el.dataset.state = state || '';
  el.dataset.poll = String(fromPoll);
}

/** One action call (requeue, discard, pause, resume, cancel; `json`: its body): the answer's status and JSON
 *  body, and the text an inline error shows when it failed ('' when it succeeded). Never throws. */

/** Show `text` in an inline error element, hidden while empty. */
export function setInlineError(el, text) {
  if (!el) return;
  setText(el, text);
  setHidden(el, !text);
}

/** Keyboard focus is in a row about to disappear: keep it in the table, not on <body>. */
export function focusAfterRemoval(tr) {
  const next = tr.nextElementSibling || tr.previousElementSibling;
  const target = next && next.querySelector('button');
  const heading = tr.closest('section') && tr.closest('section').querySelector('h2');
  if (target) target.focus();
  else if (heading) { if (!heading.hasAttribute('tabindex')) heading.tabIndex = -1; heading.focus(); }
}

export function badge(status) {
  const span = document.createElement('span');
  span.className = 'badge status-' + String(status).replace(/[^a-z0-9_-]/gi, '');
  span.textContent = status;
  return span;
}

const pad2 = (n) => String(n).padStart(2, '0');

/** Local wall-clock HH:MM:SS of a unix time in seconds, or '' if it is not a time. */
export function clockTime(sec) {
  const n = toNum(sec);
  if (n === null) return '';
  const d = new Date(n * 1000);
  return `${pad2(d.getHours())}:${pad2(d.getMinutes())}:${pad2(d.getSeconds())}`;
}

/** HH:MM:SS.mmm, for timelines where changes come within the same second. */
export function clockTimeMs(sec) {
  const n = toNum(sec);
  if (n === null) return '';
  return `${clockTime(n)}.${String(Math.floor((n * 1000) % 1000)).padStart(3, '0')}`;
}

/** "2024-05-01 13:04:05" local, for titles. */
export function fullTime(sec) {
  const n = toNum(sec);
  if (n === null) return '';
  const d = new Date(n * 1000);
  return `${d.getFullYear()}-${pad2(d.getMonth() + 1)}-${pad2(d.getDate())} ${clockTime(n)}`;
}

export function fmtDur(s) {
  s = Math.max(0, s);
  if (s < 1) return `${Math.round(s * 1000)} ms`;
  if (s < 10) return `${s.toFixed(1)} s`;
  if (s < 60) return `${Math.round(s)} s`;
  if (s < 3600) return `${Math.floor(s / 60)} m ${Math.floor(s % 60)} s`;
  if (s < 86400) return `${Math.floor(s / 3600)} h ${Math.floor((s % 3600) / 60)} m`;
  return `${Math.floor(s / 86400)} d ${Math.floor((s % 86400) / 3600)} h`;
}

/** Duration for finished tasks, running time for started ones, age otherwise; a cancelled task
 *  tells how long it ran (or, stopped before it started, waited). */

export function showDialog(dlg, modal) {
  try {
    if (modal && typeof dlg.showModal === 'function') dlg.showModal();
    else if (typeof dlg.show === 'function') dlg.show();
    else dlg.setAttribute('open', '');
  } catch (e) {
    dlg.setAttribute('open', '');
  }
}

/** CSS.escape where available (ids are UUIDs, but never trust that in a selector). */
function CSS_escape(s) {
  if (window.CSS && typeof window.CSS.escape === 'function') return window.CSS.escape(s);
  return String(s).replace(/[^a-zA-Z0-9_-]/g, (c) => `\\${c.charCodeAt(0).toString(16)} `);
}

export const num = (x) => { const n = toNum(x); return n === null ? null : n; };

export const fmtCount = (v) => (v === null || v === undefined ? '–' : Math.round(v).toLocaleString('en-US'));
