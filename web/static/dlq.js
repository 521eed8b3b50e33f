// The dead letters panel: requeue, discard, grouped by error, edit and requeue.

import { dlq, DLQ_LIMIT, editing, groups, page, pollers } from './state.js';
import { $, actionButton, asText, clockTime, fmtCount, fmtDur, fullTime, isTime, panelStatus, rowError, setHidden, setRowError, setText, shortId, showDialog, tableRow, toNum } from './ui.js';
import { api, callAction } from './api.js';
import { taskButton } from './tasks.js';
import { setDlqFigure } from './chart.js';

const DLQ_COLS = ['id', 'type', 'error', 'attempts', 'failed', 'actions'];
const DLQ_NUMS = new Set(['attempts']);
const ERROR_MAX = 300; // chars of a dead letter's error shown in the row (full text in title)

const dlqStatus = (text, state, fromPoll = false) => panelStatus('dlq-status', text, state, fromPoll);

function createDlqRow(entry) {
  const { tr, td } = tableRow(DLQ_COLS, DLQ_NUMS);
  const requeue = actionButton('requeue', 'Requeue');
  const edit = actionButton('btn-secondary edit-requeue', 'Edit…');
  const discard = actionButton('btn-danger-outline discard', 'Discard');
  const cancel = actionButton('btn-secondary discard-cancel', 'Cancel');
  cancel.hidden = true;
  const err = rowError();
  td.actions.append(requeue, edit, discard, cancel, err);
  requeue.addEventListener('click', () => dlqAction(entry, 'requeue'));
  edit.addEventListener('click', () => openEdit(entry.item, edit));
  discard.addEventListener('click', () => {
    if (entry.armed) dlqAction(entry, 'discard');
    else armDiscard(entry, true);
  });
  cancel.addEventListener('click', () => { armDiscard(entry, false); discard.focus(); });
  tr.addEventListener('keydown', (ev) => {
    if (ev.key === 'Escape' && entry.armed) { ev.preventDefault(); armDiscard(entry, false); discard.focus(); }
  });
  entry.tr = tr;
  entry.td = td;
  entry.el = { requeue, discard, cancel, err };
  return tr;
}

/** The inline confirmation: the Discard button itself becomes "Confirm discard". */
function armDiscard(entry, armed) {
  entry.armed = armed;
  const { discard, cancel } = entry.el;
  discard.classList.toggle('discard-confirm', armed);
  if (armed) discard.dataset.armed = 'true';
  else delete discard.dataset.armed;
  const id = entry.item.id == null ? '' : shortId(entry.item.id);
  discard.textContent = armed ? 'Confirm discard' : 'Discard';
  discard.setAttribute('aria-label', armed ? `Confirm: discard dead letter ${id} for good` : `Discard dead letter ${id}`);
  cancel.hidden = !armed;
  if (armed) dlqStatus(`Discard ${id}? It cannot be undone. Press Confirm discard, or Cancel.`, 'confirm');
  else if ($('dlq-status') && $('dlq-status').dataset.state === 'confirm') dlqStatus('', '');
}

function updateDlqRow(entry) {
  const it = entry.item;
  const td = entry.td;
  const id = typeof it.id === 'string' && it.id ? it.id : '';
  entry.tr.dataset.id = id;
  entry.tr.dataset.fingerprint = typeof it.fingerprint === 'string' ? it.fingerprint : '';
  entry.tr.hidden = Boolean(dlq.group) && entry.tr.dataset.fingerprint !== dlq.group;
  td.id.replaceChildren(id ? taskButton(id) : Object.assign(document.createElement('span'), { className: 'muted', textContent: '(no id)' }));
  td.type.textContent = it.type == null ? '' : String(it.type);
  const errText = it.error == null ? '' : asText(it.error);
  const errSpan = document.createElement('span');
  errSpan.className = 'error';
  errSpan.textContent = errText.length > ERROR_MAX ? errText.slice(0, ERROR_MAX) + '…' : errText;
  if (errText.length > ERROR_MAX) errSpan.title = errText;
  const parts = [errSpan];
  if (it.traceback != null && it.traceback !== '') {
    const det = document.createElement('details');
    det.className = 'traceback';
    const sum = document.createElement('summary');
    sum.textContent = 'traceback';
    const pre = document.createElement('pre');
    pre.className = 'code-block';
    pre.textContent = asText(it.traceback);
    det.append(sum, pre);
    parts.push(det);
  }
  td.error.replaceChildren(...parts);
  td.attempts.textContent = it.attempts == null ? '' : String(it.attempts);
  renderDlqTime(entry);
  const first = toNum(it.first_failed_at);
  td.failed.title = [
    it.failed_at != null ? `last failed ${fullTime(it.failed_at)}` : '',
    first !== null && first !== toNum(it.failed_at) ? `first failed ${fullTime(first)}` : '',
  ].filter(Boolean).join('; ');
  const short = id ? shortId(id) : '';
  entry.el.requeue.disabled = !id || entry.busy;
  entry.el.discard.disabled = !id || entry.busy;
  entry.el.requeue.setAttribute('aria-label', `Requeue dead letter ${short}`);
  if (!entry.armed) entry.el.discard.setAttribute('aria-label', `Discard dead letter ${short}`);
}

function renderDlqTime(entry) {
  const at = toNum(entry.item.failed_at);
  const cell = entry.td.failed;
  if (at === null) { setText(cell, ''); return; }
  const ago = Date.now() / 1000 - at; // may be slightly negative: clocks differ
  setText(cell, `${clockTime(at)} · ${ago < 1 ? 'just now' : `${fmtDur(ago)} ago`}`);
}

function dlqKeyed(items) {
  const counts = new Map();
  return items.filter((it) => it && typeof it === 'object' && !Array.isArray(it)).map((it, i) => {
    const base = typeof it.id === 'string' && it.id ? it.id : `#${i}`;
    const n = (counts.get(base) || 0) + 1;
    counts.set(base, n);
    return [n === 1 ? base : `${base}~${n}`, it];
  });
}

function applyDlq(items, total) {
  const body = $('dlq-rows');
  const keyed = dlqKeyed(items);
  const seen = new Set();
  for (const [key, item] of keyed) {
    seen.add(key);
    let entry = dlq.rows.get(key);
    if (!entry) {
      entry = { key, item, sig: '', busy: false, armed: false };
      createDlqRow(entry);
      dlq.rows.set(key, entry);
    }
    entry.item = item;
    const sig = JSON.stringify(item);
    if (sig !== entry.sig) { entry.sig = sig; updateDlqRow(entry); }
  }
  for (const [key, entry] of dlq.rows) if (!seen.has(key) && !entry.busy) removeDlqRow(key);
  // Newest failure first; rows move only when out of place (focus and open tracebacks stay).
  const ordered = [...dlq.rows.values()].sort((a, b) => (toNum(b.item.failed_at) || 0) - (toNum(a.item.failed_at) || 0));
  if (body) {
    ordered.forEach((e, i) => {
      const at = body.children[i];
      if (at !== e.tr) body.insertBefore(e.tr, at || null);
    });
  }
  setDlqTotal(toNum(total) !== null ? toNum(total) : keyed.length);
}

function setDlqTotal(total) {
  dlq.total = total;
  setText($('dlq-total'), fmtCount(total));
  setDlqFigure(total);
  const all = $('dlq-requeue-all');
  if (all) all.disabled = dlq.busyAll || !(total > 0);
  const empty = $('dlq-empty');
  setHidden(empty, dlq.rows.size > 0 || total > 0);
  const more = $('dlq-more');
  if (more) {
    const shown = dlq.rows.size;
    setHidden(more, !(total > shown));
    setText(more, total > shown ? `Showing ${shown} of ${fmtCount(total)} dead letters (the oldest ${DLQ_LIMIT} are fetched).` : '');
  }
}

function removeDlqRow(key) {
  const entry = dlq.rows.get(key);
  if (!entry) return;
  if (entry.tr.contains(document.activeElement)) {
    const next = entry.tr.nextElementSibling || entry.tr.previousElementSibling;
    const btn = next && next.querySelector('button.requeue:not([disabled])');
    if (btn) btn.focus();
    else if ($('dlq-heading')) $('dlq-heading').focus();
  }
  entry.tr.remove();
  dlq.rows.delete(key);
}

async function dlqAction(entry, kind) {
  const id = entry.item.id;
  if (entry.busy || typeof id !== 'string' || !id) return;
  entry.busy = true;
  dlq.version++;
  entry.el.requeue.disabled = true;
  entry.el.discard.disabled = true;
  setRowError(entry, '');
  entry.tr.setAttribute('aria-busy', 'true');
  const path = kind === 'requeue' ? `/api/dlq/${encodeURIComponent(id)}/requeue` : `/api/dlq/${encodeURIComponent(id)}`;
  const r = await callAction(path, kind === 'requeue' ? 'POST' : 'DELETE');
  dlq.version++; // and a poll sent while this ran may predate it too
  entry.busy = false;
  entry.tr.removeAttribute('aria-busy');
  const short = shortId(id);
  if (r.ok || r.status === 404) {
    if (entry.armed) armDiscard(entry, false);
    removeDlqRow(entry.key);
    if (dlq.total !== null) setDlqTotal(Math.max(0, dlq.total - 1));
    dlqStatus(r.ok
      ? (kind === 'requeue' ? `Requeued ${short}: it runs again as a fresh task.` : `Discarded ${short}.`)
      : `${short} was no longer in the dead-letter queue.`, r.ok ? 'ok' : 'error');
  } else {
    entry.el.requeue.disabled = false;
    entry.el.discard.disabled = false;
    setRowError(entry, `${kind === 'requeue' ? 'Requeue' : 'Discard'} failed: ${r.text}`);
    dlqStatus(`${kind === 'requeue' ? 'Requeue' : 'Discard'} of ${short} failed: ${r.text}`, 'error');
  }
  pollers.dlq && pollers.dlq.now();
}

async function requeueAll() {
  const btn = $('dlq-requeue-all');
  if (dlq.busyAll) return;
  dlq.busyAll = true;
  dlq.version++;
  if (btn) btn.disabled = true;
  dlqStatus('Requeueing every dead letter…', 'busy');
  const r = await callAction('/api/dlq/requeue', 'POST');
  dlq.version++;
  dlq.busyAll = false;
  if (r.ok) {
    const n = r.body && toNum(r.body.requeued) !== null ? toNum(r.body.requeued) : null;
    dlqStatus(n === null ? 'Requeued.' : `Requeued ${n} task${n === 1 ? '' : 's'}.`, 'ok');
  } else {
    dlqStatus(`Requeue all failed: ${r.text}`, 'error');
  }
  if (btn) btn.disabled = !(dlq.total > 0);
  pollers.dlq && pollers.dlq.now();
}

export async function pollDlq() {
  const version = dlq.version;
  let res;
  try {
    res = await api(`/api/dlq?limit=${DLQ_LIMIT}`, { headers: { Accept: 'application/json' }, cache: 'no-store' });
  } catch (e) {
    setDlqStale('Network error: could not load the dead letters.');
    return;
  }
  let body = null;
  try { body = await res.json(); } catch (e) { /* non-JSON body */ }
  if (version !== dlq.version) { pollers.dlq.again = true; return; } // an action ran meanwhile: ask again
  if (res.ok && body && Array.isArray(body.items)) {
    setDlqStale('');
    page.dlqPolledAt = Date.now();
    applyDlq(body.items, body.total);
    pollGroups();
  } else if (res.status === 401) {
    setDlqStale('An access token is required to list the dead letters.');
  } else {
    const msg = body && typeof body.error === 'string' ? `: ${body.error}` : '';
    setDlqStale(`Could not load the dead letters (${res.status})${msg}.`);
  }
}

/** A failed poll keeps the last rows, greyed out, with the reason above them. */
function setDlqStale(text) {
  const table = $('dlq-table');
  if (table) table.classList.toggle('stale', !!text);
  const el = $('dlq-status');
  if (text) dlqStatus(text, 'error', true);
  else if (el && el.dataset.poll === 'true') dlqStatus('', '');
}

export function tickDlq() {
  for (const e of dlq.rows.values()) renderDlqTime(e);
}

export function initDlq() {
  const all = $('dlq-requeue-all');
  if (all) all.addEventListener('click', requeueAll);
  const box = $('dlq-groups-box');
  if (box) box.addEventListener('toggle', () => { if (box.open) pollGroups(); });
  const rowsEl = $('dlq-group-rows');
  if (rowsEl) {
    rowsEl.addEventListener('click', (ev) => {
      const btn = ev.target && typeof ev.target.closest === 'function' ? ev.target.closest('button') : null;
      const tr = btn && btn.closest('tr[data-fingerprint]');
      if (!tr) return;
      if (btn.classList.contains('show-group')) showGroup(dlq.group === tr.dataset.fingerprint ? '' : tr.dataset.fingerprint);
      else if (btn.classList.contains('requeue-group')) groupAction(tr, 'requeue');
      else if (btn.classList.contains('discard-group')) {
        if (btn.dataset.armed === 'true') groupAction(tr, 'discard');
        else armGroupDiscard(tr, true);
      } else if (btn.classList.contains('discard-group-cancel')) armGroupDiscard(tr, false);
    });
  }
  const form = $('dlq-edit-form');
  if (form) form.addEventListener('submit', (ev) => { ev.preventDefault(); submitEdit(); });
  const cancel = $('dlq-edit-cancel');
  if (cancel) cancel.addEventListener('click', closeEdit);
}
const GROUP_COLS = ['pattern', 'count', 'types', 'last', 'actions'];
const GROUP_LIMIT = 1000; // dead letters the server reads to group them, per poll

async function pollGroups() {
  const box = $('dlq-groups-box');
  if (!box || !box.open || groups.busy) return;
  const req = ++groups.req;
  let res = null;
  let body = null;
  try {
    res = await api(`/api/dlq/groups?limit=${GROUP_LIMIT}`, { headers: { Accept: 'application/json' }, cache: 'no-store' });
    body = await res.json();
  } catch (e) { /* offline */ }
  if (req !== groups.req) return;
  if (!res || !res.ok || !body || !Array.isArray(body.groups)) {
    const why = body && typeof body.error === 'string' ? body.error : res ? `HTTP ${res.status}` : 'no answer';
    dlqStatus(`Could not group the dead letters: ${why}`, 'error', true);
    return;
  }
  const rowsEl = $('dlq-group-rows');
  if (!rowsEl) return;
  const built = body.groups.map((g) => {
    const { tr, td } = tableRow(GROUP_COLS, new Set(['count']));
    tr.dataset.fingerprint = String(g.fingerprint);
    td.pattern.textContent = String(g.pattern);
    td.pattern.title = g.example && g.example.error != null ? asText(g.example.error) : '';
    td.count.textContent = String(g.count);
    td.types.textContent = Array.isArray(g.types) ? g.types.join(', ') : '';
    td.last.textContent = isTime(g.last_at) ? `${fmtDur(Date.now() / 1000 - g.last_at)} ago` : '—';
    const what = `the ${g.count} dead letter${g.count === 1 ? '' : 's'} of this error`;
    const shown = dlq.group === tr.dataset.fingerprint;
    const show = actionButton('btn-secondary show-group', shown ? 'Show all letters' : 'Show its letters');
    show.setAttribute('aria-pressed', String(shown));
    td.actions.append(
      show,
      actionButton('requeue-group', 'Requeue group', `Requeue group: ${what}`),
      actionButton('btn-danger-outline discard-group', 'Discard group', `Discard group: ${what}`),
      Object.assign(actionButton('btn-secondary discard-group-cancel', 'Cancel'), { hidden: true }),
    );
    tr.dataset.count = String(g.count);
    return tr;
  });
  rowsEl.replaceChildren(...built);
  if (dlq.group && !built.some((tr) => tr.dataset.fingerprint === dlq.group)) showGroup(''); // the group is gone
  setHidden($('dlq-groups-empty'), built.length > 0);
  const total = toNum(body.total);
  setText($('dlq-groups-note'), total !== null && total > toNum(body.read) ? `grouped: the first ${body.read} of ${total}` : '');
}

/** Show only the letters of the group ``fingerprint`` in the table above ('' = every letter again). */
function showGroup(fingerprint) {
  dlq.group = fingerprint;
  for (const e of dlq.rows.values()) e.tr.hidden = Boolean(fingerprint) && e.tr.dataset.fingerprint !== fingerprint;
  for (const tr of document.querySelectorAll('#dlq-group-rows > tr[data-fingerprint]')) {
    const btn = tr.querySelector('button.show-group');
    const on = tr.dataset.fingerprint === fingerprint;
    btn.textContent = on ? 'Show all letters' : 'Show its letters';
    btn.setAttribute('aria-pressed', String(on));
  }
  const row = fingerprint ? document.querySelector(`#dlq-group-rows > tr[data-fingerprint="${fingerprint}"]`) : null;
  setText($('dlq-shown'), row ? `Showing the letters of: ${row.cells[0].textContent}` : '');
}

function armGroupDiscard(tr, armed) {
  const btn = tr.querySelector('button.discard-group');
  const cancel = tr.querySelector('button.discard-group-cancel');
  btn.dataset.armed = String(armed);
  btn.textContent = armed ? `Confirm discard of ${tr.dataset.count}` : 'Discard group';
  const what = `${tr.dataset.count} dead letter${tr.dataset.count === '1' ? '' : 's'} of this error`;
  btn.setAttribute('aria-label', armed ? `${btn.textContent}: the ${what}, for good` : `Discard group: the ${what}`);
  cancel.hidden = !armed;
  if (armed) dlqStatus(`Discard ${tr.dataset.count} dead letters for good? Press Confirm, or Cancel.`, 'confirm');
  else dlqStatus('', '');
}

async function groupAction(tr, kind) {
  if (groups.busy) return;
  groups.busy = true;
  dlq.version++;
  for (const b of tr.querySelectorAll('button')) b.disabled = true;
  dlqStatus(kind === 'requeue' ? 'Requeueing the group…' : 'Discarding the group…', 'busy');
  const r = await callAction(`/api/dlq/${kind}`, 'POST', { fingerprint: tr.dataset.fingerprint });
  dlq.version++;
  groups.busy = false;
  if (r.ok && r.body) {
    const n = toNum(r.body[kind === 'requeue' ? 'requeued' : 'discarded']) || 0;
    const done = kind === 'requeue' ? 'Requeued' : 'Discarded';
    dlqStatus(`${done} ${n} dead letter${n === 1 ? '' : 's'} of ${tr.cells[0].textContent}.`, 'ok');
  } else {
    for (const b of tr.querySelectorAll('button')) b.disabled = false;
    dlqStatus(`${kind === 'requeue' ? 'Requeue' : 'Discard'} of the group failed: ${r.text}`, 'error');
  }
  pollGroups();
  pollers.dlq && pollers.dlq.now();
}

function openEdit(item, opener) {
  const dlg = $('dlq-edit');
  if (!dlg || typeof item.id !== 'string') return;
  Object.assign(editing, { item, opener, busy: false });
  setText($('dlq-edit-title'), `Edit and requeue ${shortId(item.id)} (${item.type || 'unknown type'})`);
  $('dlq-edit-payload').value = JSON.stringify(item.payload == null ? {} : item.payload, null, 2);
  setText($('dlq-edit-error'), '');
  showDialog(dlg, true);
  $('dlq-edit-payload').focus();
}

function closeEdit() {
  const dlg = $('dlq-edit');
  if (dlg && dlg.open) dlg.close();
  const back = editing.opener;
  editing.item = null;
  editing.opener = null;
  if (back && document.contains(back)) back.focus();
}

async function submitEdit() {
  const item = editing.item;
  if (!item || editing.busy) return;
  let payload;
  try {
    payload = JSON.parse($('dlq-edit-payload').value);
  } catch (e) {
    setText($('dlq-edit-error'), `Not valid JSON: ${e.message}`);
    return;
  }
  editing.busy = true;
  $('dlq-edit-submit').disabled = true;
  dlq.version++;
  const r = await callAction(`/api/dlq/${encodeURIComponent(item.id)}/requeue`, 'POST', { payload });
  dlq.version++;
  editing.busy = false;
  $('dlq-edit-submit').disabled = false;
  if (!r.ok) {
    setText($('dlq-edit-error'), r.text); // the letter stays where it was
    return;
  }
  closeEdit();
  dlqStatus(`Requeued ${shortId(item.id)} with the edited payload.`, 'ok');
  pollGroups();
  pollers.dlq && pollers.dlq.now();
}
