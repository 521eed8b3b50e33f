// The workers panel.

import { page, WORKER_GONE_KEEP, workers, WORKERS_VIA_STATS } from './state.js';
import { $, fmtCount, fmtDur, focusAfterRemoval, fullTime, num, setData, setHidden, setInlineError, setText, tableRow, toNum } from './ui.js';
import { api } from './api.js';
import { taskButton } from './tasks.js';

const WORKER_COLS = ['host', 'instance', 'pid', 'uptime', 'done', 'current'];
const WORKER_NUMS = new Set(['pid', 'done']);

function workerId(w) {
  if (w.id != null && w.id !== '') return String(w.id);
  if (w.host == null && w.pid == null) return '';
  return `${w.host == null ? '?' : w.host}:${w.instance == null ? '' : w.instance}:${w.pid == null ? '?' : w.pid}`;
}

/** A worker's row and its cells by column: {tr, td}. */
function createWorkerRow(id) {
  const row = tableRow(WORKER_COLS, WORKER_NUMS);
  row.tr.dataset.worker = id;
  const dot = document.createElement('span');
  dot.className = 'dot';
  dot.setAttribute('aria-hidden', 'true');
  const name = document.createElement('span');
  name.className = 'host-name';
  const gone = document.createElement('span');
  gone.className = 'gone-label';
  gone.textContent = 'gone';
  gone.hidden = true;
  row.td.host.append(dot, name, gone);
  return row;
}

/** Seconds the worker has been up: measured on the server's clock, then ticking locally. */
function workerUptime(e) {
  const started = toNum(e.data.started_at);
  if (started === null) return null;
  const ts = toNum(e.data.ts);
  const base = ts !== null ? ts : e.recvAt;
  const since = e.goneAt ? (e.goneAt / 1000 - e.recvAt) : (Date.now() / 1000 - e.recvAt);
  return Math.max(0, base - started + Math.max(0, since));
}

function updateWorkerRow(e) {
  const w = e.data;
  const td = e.td;
  const name = td.host.querySelector('.host-name');
  setText(name, w.host == null ? '?' : String(w.host));
  td.host.title = workerId(w);
  setText(td.instance, w.instance == null ? '' : String(w.instance));
  setText(td.pid, w.pid == null ? '' : String(w.pid));
  const up = workerUptime(e);
  setText(td.uptime, up === null ? '' : fmtDur(up));
  td.uptime.title = w.started_at == null ? '' : `since ${fullTime(w.started_at)}`;
  setText(td.done, w.tasks_done == null ? '' : fmtCount(num(w.tasks_done)));
  const inHand = num(w.in_hand) || 0;
  const cur = typeof w.current === 'string' && w.current ? w.current : '';
  const key = `${cur}|${inHand}`;
  setData(e.tr, 'busy', String(!!cur || inHand > 0));
  if (e.cur !== key) { // rebuilt only on change, so a focused button stays put
    e.cur = key;
    const parts = [];
    if (cur) parts.push(taskButton(cur, 'open-task task-link'));
    if (inHand > 1 || (!cur && inHand > 0)) {
      const more = document.createElement('span');
      more.className = 'muted more';
      more.textContent = cur ? ` +${inHand - 1}` : `${inHand} in hand`;
      parts.push(more);
    }
    if (!parts.length) {
      const idle = document.createElement('span');
      idle.className = 'muted';
      idle.textContent = 'idle';
      parts.push(idle);
    }
    td.current.replaceChildren(...parts);
  }
}

function setWorkerGone(e, gone) {
  e.tr.classList.toggle('gone', gone);
  const label = e.tr.querySelector('.gone-label');
  setHidden(label, !gone);
  if (gone) e.tr.title = 'No heartbeat in the latest list';
  else e.tr.removeAttribute('title');
}

/** Apply the latest list of live workers (from GET /api/workers or a stats message). */
export function applyWorkers(items) {
  if (!Array.isArray(items)) return;
  const now = Date.now();
  page.workersListedAt = now;
  const seen = new Set();
  for (const w of items) {
    if (!w || typeof w !== 'object' || Array.isArray(w)) continue;
    const id = workerId(w);
    if (!id || seen.has(id)) continue;
    seen.add(id);
    let e = workers.get(id);
    if (!e) { e = { ...createWorkerRow(id), cur: null, goneAt: 0 }; workers.set(id, e); }
    e.data = w;
    e.recvAt = now / 1000;
    if (e.goneAt) { e.goneAt = 0; setWorkerGone(e, false); }
    updateWorkerRow(e);
  }
  for (const e of workers.values()) {
    if (!seen.has(e.tr.dataset.worker) && !e.goneAt) { e.goneAt = now; setWorkerGone(e, true); }
  }
  renderWorkers();
}

const workerOrder = (a, b) => {
  const k = (e) => [String(e.data.host ?? ''), String(e.data.instance ?? ''), Number(e.data.pid) || 0];
  const [ah, ai, ap] = k(a);
  const [bh, bi, bp] = k(b);
  return ah.localeCompare(bh) || ai.localeCompare(bi) || ap - bp;
};

/** Drop workers gone for long enough, then put rows in order and refresh the counts. */
function renderWorkers() {
  const body = $('worker-rows');
  const now = Date.now();
  for (const [id, e] of workers) {
    if (e.goneAt && now - e.goneAt >= WORKER_GONE_KEEP) {
      if (e.tr.contains(document.activeElement)) focusAfterRemoval(e.tr);
      e.tr.remove();
      workers.delete(id);
    }
  }
  const list = [...workers.values()].sort(workerOrder);
  if (body) {
    list.forEach((e, i) => {
      const at = body.children[i];
      if (at !== e.tr) body.insertBefore(e.tr, at || null);
    });
  }
  const live = list.filter((e) => !e.goneAt);
  const busy = live.filter((e) => e.tr.dataset.busy === 'true').length;
  const gone = list.length - live.length;
  setText($('worker-count'), `${live.length} live${busy ? `, ${busy} busy` : ''}${gone ? `, ${gone} gone` : ''}`);
  setText($('stat-workers'), String(live.length));
  setText($('stat-busy'), String(busy));
  const nav = $('nav-workers');
  if (nav) { setText(nav, String(live.length)); setHidden(nav, false); }
  const empty = $('workers-empty');
  setHidden(empty, list.length > 0);
}

/** Every second: uptimes tick, and gone workers leave after WORKER_GONE_KEEP. */
export function tickWorkers() {
  for (const e of workers.values()) {
    const up = workerUptime(e);
    if (up !== null) setText(e.td.uptime, fmtDur(up));
  }
  if ([...workers.values()].some((e) => e.goneAt)) renderWorkers();
}

export async function pollWorkers() {
  if (Date.now() - page.workersViaStatsAt < WORKERS_VIA_STATS) return; // stats carry them
  let res;
  try {
    res = await api('/api/workers', { headers: { Accept: 'application/json' }, cache: 'no-store' });
  } catch (e) {
    setInlineError($('workers-error'), 'Network error: could not load the workers.');
    return;
  }
  let body = null;
  try { body = await res.json(); } catch (e) { /* non-JSON body */ }
  if (Date.now() - page.workersViaStatsAt < WORKERS_VIA_STATS) return; // a stats list came meanwhile
  if (res.ok && body && Array.isArray(body.items)) {
    setInlineError($('workers-error'), '');
    applyWorkers(body.items);
  } else if (res.status === 401) {
    setInlineError($('workers-error'), 'An access token is required to list the workers.');
  } else {
    const msg = body && typeof body.error === 'string' ? `: ${body.error}` : '';
    setInlineError($('workers-error'), `Could not load the workers (${res.status})${msg}.`);
  }
}
