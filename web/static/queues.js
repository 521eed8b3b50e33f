// The queues panel: pause and resume.

import { filter, page, QUEUE_ANSWER_HOLD, queues, QUEUES_VIA_STATS, tasks } from './state.js';
import { $, actionButton, fmtCount, focusAfterRemoval, num, panelStatus, rowError, setData, setHidden, setRowError, setText, setTitle, tableRow } from './ui.js';
import { api, callAction } from './api.js';
import { fmtRate } from './chart.js';

const QUEUE_COLS = ['name', 'ready', 'running', 'retrying', 'scheduled', 'consumers', 'limit', 'rate', 'completed', 'state', 'actions'];
const QUEUE_NUMS = new Set(['ready', 'running', 'retrying', 'scheduled', 'consumers', 'limit', 'rate', 'completed']);
const NO_LIMIT = '\u2014'; // shown for limit 0 and rate "": the queue has none

const queuesStatus = (text, state, fromPoll = false) => panelStatus('queues-status', text, state, fromPoll);

function createQueueRow(entry) {
  const { tr, td } = tableRow(QUEUE_COLS, QUEUE_NUMS);
  tr.dataset.queue = entry.name;
  const state = document.createElement('span');
  state.className = 'badge queue-state';
  td.state.appendChild(state);
  const mk = (cls, text, action) => {
    const b = actionButton(cls, text, `${text} queue ${entry.name}`);
    b.addEventListener('click', () => queueAction(entry, action));
    return b;
  };
  const pause = mk('btn-secondary pause-queue', 'Pause', 'pause');
  const resume = mk('resume-queue', 'Resume', 'resume');
  const err = rowError();
  td.actions.append(pause, resume, err);
  entry.tr = tr;
  entry.td = td;
  entry.el = { state, pause, resume, err };
}

/**
 * Whether the queue shows as paused: as listed, unless this page's own pause or resume was
 * answered moments ago -- a list sampled before the change may still be on its way.
 */
function shownPaused(entry) {
  const listed = entry.item.paused === true;
  const a = entry.answered;
  if (a && a.paused !== listed && Date.now() - a.at < QUEUE_ANSWER_HOLD) return a.paused;
  return listed;
}

function updateQueueRow(entry) {
  const it = entry.item;
  const { td, el } = entry;
  setText(td.name, entry.name);
  for (const key of ['ready', 'running', 'retrying', 'scheduled', 'consumers']) setText(td[key], fmtCount(num(it[key])));
  const limit = num(it.limit);
  setText(td.limit, limit ? fmtCount(limit) : NO_LIMIT);
  setTitle(td.limit, limit ? `at most ${fmtCount(limit)} running at once` : 'no limit');
  const rate = typeof it.rate === 'string' ? it.rate : '';
  setText(td.rate, rate || NO_LIMIT);
  setTitle(td.rate, rate ? `at most ${rate} started` : 'no limit');
  setText(td.completed, fmtRate(num(it.completed_per_s)));
  const paused = shownPaused(entry);
  setData(entry.tr, 'paused', String(paused));
  setText(el.state, paused ? 'paused' : 'running');
  // Only the action that applies is offered.
  setHidden(el.pause, paused);
  setHidden(el.resume, !paused);
  el.pause.disabled = paused || entry.busy;
  el.resume.disabled = !paused || entry.busy;
}


/** Apply the latest list of declared queues (from GET /api/queues or a stats message). */
export function applyQueues(items) {
  if (!Array.isArray(items)) return;
  const names = [];
  for (const it of items) {
    if (!it || typeof it !== 'object' || Array.isArray(it) || typeof it.name !== 'string' || !it.name) continue;
    if (names.includes(it.name)) continue;
    names.push(it.name);
    let entry = queues.rows.get(it.name);
    if (!entry) {
      entry = { name: it.name, busy: false, answered: null };
      createQueueRow(entry);
      queues.rows.set(it.name, entry);
    }
    entry.item = it;
    updateQueueRow(entry);
  }
  for (const [name, entry] of queues.rows) {
    if (names.includes(name) || entry.busy) continue;
    if (entry.tr.contains(document.activeElement)) focusAfterRemoval(entry.tr);
    entry.tr.remove();
    queues.rows.delete(name);
  }
  // The server's order (default first, then by name); rows move only when out of place.
  const body = $('queue-rows');
  if (body) {
    names.forEach((name, i) => {
      const tr = queues.rows.get(name).tr;
      const at = body.children[i];
      if (at !== tr) body.insertBefore(tr, at || null);
    });
  }
  setQueueOptions(names);
  renderQueueCount();
  const status = $('queues-status');
  if (status && status.dataset.poll === 'true') queuesStatus('', '');
}

function renderQueueCount() {
  const n = queues.rows.size;
  const paused = [...queues.rows.values()].filter((e) => e.tr.dataset.paused === 'true').length;
  setText($('queue-count'), `${n} queue${n === 1 ? '' : 's'}${paused ? `, ${paused} paused` : ''}`);
  setHidden($('queues-empty'), n > 0);
}

/** The task table's queue filter offers every listed queue, and keeps the one chosen. */
function setQueueOptions(names) {
  const sel = $('queue-filter');
  if (!sel) return;
  const want = filter.queue && !names.includes(filter.queue) ? [...names, filter.queue] : names;
  const have = [...sel.options].filter((o) => o.value !== '').map((o) => o.value);
  if (have.length === want.length && have.every((v, i) => v === want[i])) return;
  let all = [...sel.options].find((o) => o.value === '');
  if (!all) {
    all = document.createElement('option');
    all.value = '';
    all.textContent = 'All queues';
  }
  sel.replaceChildren(all, ...want.map((name) => {
    const opt = document.createElement('option');
    opt.value = name;
    opt.textContent = name;
    return opt;
  }));
  sel.value = filter.queue;
}

async function queueAction(entry, action) {
  if (entry.busy) return;
  const name = entry.name;
  const hadFocus = entry.tr.contains(document.activeElement);
  entry.busy = true;
  setRowError(entry, '');
  entry.tr.setAttribute('aria-busy', 'true');
  updateQueueRow(entry);
  const r = await callAction(`/api/queues/${encodeURIComponent(name)}/${action}`, 'POST');
  entry.busy = false;
  entry.tr.removeAttribute('aria-busy');
  const paused = r.body && typeof r.body.paused === 'boolean' ? r.body.paused : null;
  if (r.ok && paused !== null) {
    entry.answered = { paused, at: Date.now() };
    entry.item = Object.assign({}, entry.item, { paused });
    queuesStatus(paused ? `Paused queue ${name}: its tasks wait until it is resumed.` : `Resumed queue ${name}.`, 'ok');
  } else {
    const verb = action === 'pause' ? 'Pause' : 'Resume';
    const text = r.ok ? 'unexpected answer from the server.' : r.text;
    setRowError(entry, `${verb} failed: ${text}`);
    queuesStatus(`${verb} of queue ${name} failed: ${text}`, 'error');
  }
  updateQueueRow(entry);
  renderQueueCount();
  // The button pressed may have given way to the other one: keep the keyboard on the row.
  if (hadFocus) {
    const next = shownPaused(entry) ? entry.el.resume : entry.el.pause;
    if (!next.hidden) next.focus();
  }
}

export async function pollQueues() {
  if (Date.now() - page.queuesViaStatsAt < QUEUES_VIA_STATS) return; // stats carry them
  let res;
  try {
    res = await api('/api/queues', { headers: { Accept: 'application/json' }, cache: 'no-store' });
  } catch (e) {
    queuesStatus('Network error: could not load the queues.', 'error', true);
    return;
  }
  let body = null;
  try { body = await res.json(); } catch (e) { /* non-JSON body */ }
  if (Date.now() - page.queuesViaStatsAt < QUEUES_VIA_STATS) return; // a stats list came meanwhile
  if (res.ok && body && Array.isArray(body.items)) {
    applyQueues(body.items);
  } else if (res.status === 401) {
    queuesStatus('An access token is required to list the queues.', 'error', true);
  } else {
    const msg = body && typeof body.error === 'string' ? `: ${body.error}` : '';
    queuesStatus(`Could not load the queues (${res.status})${msg}.`, 'error', true);
  }
}
