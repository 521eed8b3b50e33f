// The task table: live task state, rows, filters, the search, the page's address, keys, bulk actions, cancel.

import { bulk, CANCELLABLE, cancels, countdowns, details, dirty, filter, HIST_MAX, inView, MAX_KEPT, MAX_ROWS, page, pollers, RESULT_MAX, rows, search, SEARCH_DELAY, tasks, TERMINAL } from './state.js';
import { $, actionButton, asText, badge, clockTime, fmtDur, focusAfterRemoval, fullTime, isTime, panelStatus, rowError, setHidden, setInlineError, setText, setTitle, shortId, tableRow, toNum } from './ui.js';
import { api, callAction } from './api.js';
import { closeDetails, openDetails, renderDetails } from './details.js';
import { renderScheduleTasks } from './schedules.js';
import { loadTasks } from './socket.js';
import { tick } from './app.js';

export function mergeTask(u) {
  if (!u || typeof u !== 'object' || Array.isArray(u) || typeof u.id !== 'string' || !u.id) return;
  const cur = tasks.get(u.id);
  if (cur) {
    const have = toNum(cur.seq);
    const got = toNum(u.seq);
    const newer = have === null || cur._local ? true : got !== null && got > have;
    if (!newer) {
      let changed = false;
      for (const k of ['type', 'queue', 'payload']) {
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
    // Remember live status changes for the details timeline (merged with the server's
    // history there); only socket updates carry the time of the change.
    if (isTime(u.ts) && !u._local) {
      const h = t._hist || (t._hist = []);
      const entry = { status: u.status, ts: u.ts };
      const attempt = toNum(u.attempt != null ? u.attempt : u.attempts);
      if (attempt !== null) entry.attempt = attempt;
      if (u.error != null && u.error !== '') entry.error = u.error;
      if (typeof u.cancelled_by === 'string' && u.cancelled_by) entry.cancelled_by = u.cancelled_by;
      h.push(entry);
      if (h.length > HIST_MAX) h.splice(0, h.length - HIST_MAX);
    }
    // Back to a status that can be cancelled (a requeue, a new attempt): an old cancel error is moot.
    const c = cancels.get(u.id);
    if (c && !c.busy && CANCELLABLE.has(u.status)) cancels.delete(u.id);
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
    if (u.status === 'cancelled' && !isTime(t.cancelled_at)) t.cancelled_at = u.ts; // the update has only ts
  }
  if (!u._local) delete t._local; // real server data has replaced the optimistic guess
  tasks.set(u.id, t);
  markDirty(u.id);
}

function markDirty(id) {
  dirty.add(id);
  // Coalesce bursts of updates into one DOM pass per frame.
  if (!page.frameQueued) { page.frameQueued = true; requestAnimationFrame(flush); }
}

const byNewest = (a, b) => (b.created_at || 0) - (a.created_at || 0);

const isAll = (v) => !v || v === 'all';

// A queue may be named "all": for queues only "" means every one.
/** Whether a part of the filters only the server can tell (words, the schedule, the creation time) is set: the
 *  table then shows the tasks the server's search found. */
const serverFiltered = () => filter.q !== '' || filter.schedule !== '' || filter.since !== '' || filter.until !== '';
const isFiltering = () => serverFiltered() || !isAll(filter.status) || !isAll(filter.type) || filter.queue !== '';

function matchesFilter(t) {
  return (!serverFiltered() || (search.ids !== null && search.ids.has(t.id)))
    && (isAll(filter.status) || t.status === filter.status)
    && (isAll(filter.type) || t.type === filter.type)
    && (filter.queue === '' || t.queue === filter.queue);
}

function flushSoon() {
  if (!page.frameQueued) { page.frameQueued = true; requestAnimationFrame(flush); }
}

function flush() {
  page.frameQueued = false;
  const body = $('task-rows');
  const ordered = [...tasks.values()].sort(byNewest); // stable: ties keep arrival order
  for (const t of ordered.splice(MAX_KEPT)) {
    if (search.ids && search.ids.has(t.id)) { ordered.push(t); continue; } // found by the search: kept while shown
    tasks.delete(t.id);
    cancels.delete(t.id);
  }
  const filtering = isFiltering();
  const matching = filtering ? ordered.filter(matchesFilter) : ordered;
  const found = serverFiltered() && search.ids !== null;
  const visible = matching.slice(0, found ? Math.max(MAX_ROWS, search.ids.size) : MAX_ROWS); // "More" adds pages
  const keep = new Set();
  if (body) {
    visible.forEach((t, i) => {
      let tr = rows.get(t.id);
      if (!tr) { tr = createRow(t.id); rows.set(t.id, tr); dirty.add(t.id); watchRow(tr); }
      if (dirty.has(t.id)) updateRow(tr, t);
      keep.add(t.id);
      // Move rows only when out of place, so unchanged rows keep focus/selection.
      const at = body.children[i];
      if (at !== tr) body.insertBefore(tr, at || null);
    });
  }
  for (const [id, tr] of rows) {
    if (keep.has(id)) continue;
    if (tr.contains(document.activeElement)) focusAfterRemoval(tr);
    tr.remove();
    rows.delete(id);
    countdowns.delete(tr);
    unwatchRow(tr);
  }
  if (details.id && dirty.has(details.id)) renderDetails();
  renderScheduleTasks(dirty);
  dirty.clear();
  const empty = $('tasks-empty');
  setHidden(empty, tasks.size > 0);
  const nomatch = $('tasks-nomatch');
  setHidden(nomatch, !(tasks.size > 0 && matching.length === 0));
  const count = $('task-count');
  setText($('tasks-search-error'), search.error);
  setHidden($('search-more'), !(found && search.next));
  renderBulk();
  if (count) {
    let text;
    if (found) {
      text = search.total > visible.length
        ? `showing ${visible.length} of ${search.total.toLocaleString('en-US')} matching`
        : `${matching.length} matching`;
    } else if (filtering) {
      text = matching.length > visible.length
        ? `showing ${visible.length} of ${matching.length} matching (${tasks.size} kept)`
        : `${matching.length} of ${tasks.size} match`;
    } else {
      text = tasks.size > visible.length
        ? `showing ${visible.length} of ${tasks.size}`
        : `${tasks.size} task${tasks.size === 1 ? '' : 's'}`;
    }
    setText(count, text);
  }
}

function watchRow(tr) {
  if (!inView) return;
  if (!page.rowObserver) {
    page.rowObserver = new IntersectionObserver((entries) => {
      for (const e of entries) {
        if (!e.isIntersecting) { inView.delete(e.target); continue; }
        inView.add(e.target);
        const t = tasks.get(e.target.dataset.id);
        if (t) setText(e.target.cells[COL.time], timeText(t));
      }
    }, { root: document.querySelector('#tasks .table-wrap'), rootMargin: '200px 0px' });
  }
  page.rowObserver.observe(tr);
}

function unwatchRow(tr) {
  if (!inView) return;
  inView.delete(tr);
  if (page.rowObserver) page.rowObserver.unobserve(tr);
}

const COLS = ['select', 'id', 'type', 'queue', 'status', 'actions', 'progress', 'attempts', 'worker', 'time', 'result'];
export const COL = Object.fromEntries(COLS.map((name, i) => [name, i])); // column name -> cell index

/** A button opening the details of task `id`, labelled with its short id. */
export function taskButton(id, cls = 'open-task') {
  const btn = document.createElement('button');
  btn.type = 'button';
  btn.className = cls;
  btn.dataset.taskId = id;
  btn.title = `${id} (show details)`;
  btn.setAttribute('aria-haspopup', 'dialog');
  const code = document.createElement('code');
  code.textContent = shortId(id);
  btn.appendChild(code);
  return btn;
}

function createRow(id) {
  const { tr, td } = tableRow(COLS);
  tr.dataset.id = id;
  const tick = document.createElement('input');
  tick.type = 'checkbox';
  tick.className = 'select-task';
  tick.setAttribute('aria-label', `Select task ${shortId(id)}`);
  td.select.appendChild(tick);
  td.id.appendChild(taskButton(id));
  const cancel = actionButton('btn-danger-outline cancel-task', 'Cancel', `Cancel task ${shortId(id)}`);
  cancel.hidden = true;
  td.actions.append(cancel, rowError());
  return tr;
}

export function progressBar(progress) {
  const v = Math.min(1, Math.max(0, progress));
  const pct = `${Math.round(v * 100)}%`;
  const bar = document.createElement('progress');
  bar.max = 1;
  bar.value = v;
  bar.textContent = pct; // fallback content
  bar.setAttribute('aria-label', `progress ${pct}`);
  const label = document.createElement('span');
  label.className = 'pct';
  label.textContent = pct;
  return [bar, label];
}

export const hasProgress = (t, status) => status === 'started' && typeof t.progress === 'number' && isFinite(t.progress);

/**
 * Bring a row up to date, touching only what changed: at hundreds of updates a second
 * most of them move a progress bar, and rebuilding cells would make the browser redo
 * the table's layout for nothing.
 */
function updateRow(tr, t) {
  const status = String(t.status || 'unknown');
  const c = tr.cells;
  const tick = c[COL.select].firstElementChild;
  const chosen = bulk.all || bulk.ids.has(t.id);
  if (tick.checked !== chosen) tick.checked = chosen;
  if (tick.disabled !== bulk.all) tick.disabled = bulk.all;
  if (tr.dataset.status !== status) tr.dataset.status = status;
  setText(c[COL.type], t.type == null ? '' : String(t.type));
  const queue = t.queue == null ? '' : String(t.queue);
  if (c[COL.queue].textContent !== queue) { c[COL.queue].textContent = queue; c[COL.queue].title = queue; }
  const b = c[COL.status].firstElementChild;
  if (!b || b.textContent !== status) {
    const parts = [badge(status)];
    if (status === 'scheduled') {
      const left = document.createElement('span');
      left.className = 'countdown';
      parts.push(left);
    }
    c[COL.status].replaceChildren(...parts);
  }
  // One clock for every countdown (tick()); a row leaves it as soon as its status changes.
  if (status === 'scheduled') { countdowns.add(tr); renderCountdown(tr, t); } else countdowns.delete(tr);
  renderRowActions(tr, t, status);
  const prog = c[COL.progress];
  if (hasProgress(t, status)) {
    const bar = prog.querySelector('progress');
    if (bar) {
      const v = Math.min(1, Math.max(0, t.progress));
      const pct = `${Math.round(v * 100)}%`;
      if (bar.value !== v) {
        bar.value = v;
        bar.textContent = pct;
        bar.setAttribute('aria-label', `progress ${pct}`);
      }
      setText(prog.querySelector('.pct'), pct);
    } else {
      prog.replaceChildren(...progressBar(t.progress));
    }
  } else if (prog.firstChild) {
    prog.replaceChildren();
  }
  setText(c[COL.attempts], t.attempts == null ? '' : String(t.attempts));
  const worker = t.worker == null ? '' : String(t.worker);
  if (c[COL.worker].textContent !== worker) { c[COL.worker].textContent = worker; c[COL.worker].title = worker; }
  setText(c[COL.time], timeText(t));
  renderResult(c[COL.result], t, status);
}

/** The Cancel button of a row: offered while the task can be cancelled, disabled while this
 *  page's cancel of it runs; its inline error stays until the task can be cancelled again. */
function renderRowActions(tr, t, status) {
  const cell = tr.cells[COL.actions];
  const btn = cell.querySelector('button.cancel-task');
  const c = cancels.get(t.id);
  const can = CANCELLABLE.has(status);
  // The button pressed gives way as the row turns cancelled: keep the keyboard on the row.
  if (!can && btn === document.activeElement) tr.cells[COL.id].querySelector('button').focus();
  setHidden(btn, !can);
  const busy = !!(c && c.busy);
  if (btn.disabled !== busy) btn.disabled = busy;
  setInlineError(cell.querySelector('.row-error'), c && c.error ? c.error : '');
}

/** "in 4 s" (or "in 59 m 12 s") until the unix time `at`, "due now" from then on ('' if unknown). */
export function untilText(at) {
  const n = toNum(at);
  if (n === null) return '';
  const left = Math.ceil(n - Date.now() / 1000);
  return left > 0 ? `in ${left < 60 ? `${left} s` : fmtDur(left)}` : 'due now';
}

/** A scheduled task's countdown to its run_at (see untilText). */
export const countdownText = (t) => untilText(t.run_at);

export function renderCountdown(tr, t) {
  const el = tr.cells[COL.status].querySelector('.countdown');
  if (!el) return;
  const left = countdownText(t);
  setText(el, left ? ` \u00b7 ${left}` : '');
  setTitle(el, t.run_at == null ? '' : `runs at ${fullTime(t.run_at)}`);
}

/** "retry N at HH:MM:SS — error" for a task waiting for its next attempt. */
export function retryText(t) {
  const n = toNum(t.attempt);
  const at = clockTime(t.next_attempt_at);
  let text = 'retry';
  if (n !== null) text += ` ${n}`;
  if (at) text += ` at ${at}`;
  if (t.error != null && t.error !== '') text += ` \u2014 ${asText(t.error)}`;
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
    text = asText(t.error);
    cls = 'error';
  } else if (status === 'cancelled') {
    text = typeof t.cancelled_by === 'string' && t.cancelled_by ? `cancelled by ${t.cancelled_by}` : 'cancelled';
    cls = 'note';
  } else if (t.result !== undefined && (t.result !== null || status === 'completed')) {
    // Strings are shown verbatim (not JSON-quoted) so text results read naturally.
    text = asText(t.result);
  } else if (t.note) {
    text = String(t.note);
    cls = 'note';
  }
  const shown = text.length > RESULT_MAX ? text.slice(0, RESULT_MAX) + '…' : text;
  const key = `${cls}\n${text}`;
  if (cell._shown === key) return; // unchanged: leave the DOM alone
  cell._shown = key;
  cell.title = text.length > RESULT_MAX ? text : '';
  if (cls) {
    const span = document.createElement('span');
    span.className = cls;
    span.textContent = shown;
    cell.replaceChildren(span);
  } else {
    cell.textContent = shown;
  }
}
export function timeText(t) {
  const now = Date.now() / 1000;
  if (t.status === 'cancelled') {
    const end = toNum(t.cancelled_at) ?? toNum(t.finished_at);
    const started = toNum(t.started_at);
    const start = started ?? toNum(t.created_at);
    if (end === null || start === null) return '';
    return `${started !== null ? 'ran' : 'waited'} ${fmtDur(end - start)}`;
  }
  if (t.finished_at != null) {
    const start = t.started_at != null ? t.started_at : t.created_at;
    return start != null ? `took ${fmtDur(t.finished_at - start)}` : '';
  }
  if (t.status === 'started' && t.started_at != null) return `running ${fmtDur(now - t.started_at)}`;
  return t.created_at != null ? `${fmtDur(now - t.created_at)} ago` : '';
}

export function initFilters() {
  const sel = { status: $('filter-status'), type: $('filter-type'), queue: $('queue-filter') };
  // Every form's type is offered even if the template did not list it.
  if (sel.type) {
    const have = new Set([...sel.type.options].map((o) => o.value));
    for (const form of document.querySelectorAll('form.task-form[data-type]')) {
      const name = form.dataset.type;
      if (have.has(name)) continue;
      have.add(name);
      const opt = document.createElement('option');
      opt.value = name;
      opt.textContent = name;
      sel.type.appendChild(opt);
    }
  }
  sel.schedule = $('filter-schedule');
  sel.since = $('filter-since');
  sel.until = $('filter-until');
  for (const key of ['status', 'type', 'queue', 'schedule', 'since', 'until']) {
    const el = sel[key];
    if (!el) continue;
    const read = () => (key === 'since' || key === 'until' ? fromLocalInput(el.value) : el.value.trim());
    const apply = () => {
      const v = read();
      if (filter[key] === v) return;
      filter[key] = v;
      // The tasks kept are the newest of every queue: a quiet queue's may be missing.
      if (key === 'queue' && v) loadTasks(v);
      if (serverFiltered()) runSearchSoon(key === 'schedule' ? SEARCH_DELAY : 0); // the server filters by all
      else if (search.ids !== null) runSearchSoon(0); // (the last server-only part was just cleared)
      clearBulk();
      writeRoute();
      flushSoon();
    };
    el.addEventListener('change', apply);
    el.addEventListener('input', apply);
    filter[key] = read(); // a value the browser restored on reload
  }
  const more = $('search-more');
  if (more) more.addEventListener('click', searchMore);
  const box = $('task-search');
  if (box) {
    box.addEventListener('input', () => {
      const q = box.value.trim();
      if (q === filter.q) return;
      filter.q = q;
      runSearchSoon(SEARCH_DELAY);
      clearBulk();
      writeRoute();
      flushSoon();
    });
    filter.q = box.value.trim();
  }
  readRoute();
  if (serverFiltered() && search.ids === null) runSearchSoon(0);
  window.addEventListener('hashchange', readRoute);
  document.addEventListener('keydown', onPageKey);
}

/** Epoch seconds (as text) of a datetime-local input's value, read in the browser's zone ('' for none). */
function fromLocalInput(value) {
  const at = value ? new Date(value).getTime() : NaN;
  return Number.isFinite(at) ? String(at / 1000) : '';
}

/** A datetime-local input's value for epoch seconds (as text), in the browser's zone. */
function toLocalInput(seconds) {
  const at = Number(seconds);
  if (!seconds || !Number.isFinite(at)) return '';
  const d = new Date(at * 1000);
  return new Date(d.getTime() - d.getTimezoneOffset() * 60000).toISOString().slice(0, 16);
}

/** The schedule filter suggests the names of the schedules (datalist#schedule-names, from GET /api/schedules). */
export function setScheduleNames(names) {
  const list = $('schedule-names');
  if (!list) return;
  const have = [...list.options].map((o) => o.value);
  if (have.length === names.length && have.every((v, i) => v === names[i])) return;
  list.replaceChildren(...names.map((name) => Object.assign(document.createElement('option'), { value: name })));
}

/** The filters as GET /api/tasks and the page's address take them. */
function filterParams() {
  const p = new URLSearchParams();
  if (filter.q !== '') p.set('q', filter.q);
  if (!isAll(filter.status)) p.set('status', filter.status);
  if (!isAll(filter.type)) p.set('type', filter.type);
  if (filter.queue !== '') p.set('queue', filter.queue);
  for (const key of ['schedule', 'since', 'until']) if (filter[key] !== '') p.set(key, filter[key]);
  return p;
}

function runSearchSoon(delay) {
  clearTimeout(search.timer);
  search.timer = setTimeout(runSearch, delay);
}

/** Ask the server for the tasks the search box and the filters match, among every task it keeps (not only
 *  those this page holds); they join the table, and stay while the search is shown. */
async function runSearch() {
  const req = ++search.req;
  if (!serverFiltered()) {
    Object.assign(search, { ids: null, total: 0, next: null, error: '' });
    flushSoon();
    return;
  }
  const data = await searchPage(null, req);
  if (data === undefined) return; // a newer search was asked meanwhile
  if (data) {
    Object.assign(search, { ids: new Set(data.items.map((t) => t.id)), total: toNum(data.total) || 0, error: '' });
    search.next = typeof data.next === 'string' ? data.next : null;
  }
  flushSoon();
}

/** One page of the server's search (after ``cursor``): its answer, null when refused (search.error says
 *  why), undefined when a newer search was asked meanwhile. Its tasks join the page's. */
async function searchPage(cursor, req) {
  const params = filterParams();
  params.set('limit', String(MAX_ROWS));
  if (cursor) params.set('cursor', cursor);
  let res = null;
  let data = null;
  try {
    res = await api(`/api/tasks?${params}`, { headers: { Accept: 'application/json' }, cache: 'no-store' });
    data = await res.json();
  } catch (e) { /* offline, or not JSON */ }
  if (req !== search.req) return undefined;
  if (res && res.ok && data && Array.isArray(data.items)) {
    data.items.forEach(mergeTask);
    return data;
  }
  const why = data && typeof data.error === 'string' ? data.error : res ? `HTTP ${res.status}` : 'no answer';
  Object.assign(search, { ids: new Set(), total: 0, next: null, error: `Search failed: ${why}` });
  return null;
}

/** "More": the next page of the search joins the table. */
async function searchMore() {
  if (!search.next || search.loading) return;
  search.loading = true;
  const data = await searchPage(search.next, search.req);
  search.loading = false;
  if (data) {
    for (const t of data.items) search.ids.add(t.id);
    search.next = typeof data.next === 'string' ? data.next : null;
  }
  flushSoon();
}

const ROUTE = '#/tasks';
const TASK_ID = /^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$/;

/** The page's address holds the filters and the open task: #/tasks?q=...&status=... or #/tasks/<id>?...
 *  (a link to share; the section links #tasks, #queues... are left alone). */
export function writeRoute() {
  const query = filterParams().toString();
  const path = details.id ? `${ROUTE}/${encodeURIComponent(details.id)}` : ROUTE;
  const want = details.id || query ? `${path}${query ? `?${query}` : ''}` : '';
  const now = location.hash;
  if (now === want || (!want && !now.startsWith('#/'))) return;
  history.replaceState(null, '', want || `${location.pathname}${location.search}`);
}

/** Take the filters and the open task from the address (at load, and when it changes). */
function readRoute() {
  const hash = location.hash;
  if (!hash.startsWith(ROUTE)) return;
  const [path, query = ''] = hash.slice(ROUTE.length).split('?');
  const p = new URLSearchParams(query);
  const want = { q: (p.get('q') || '').trim() };
  for (const key of ['status', 'type', 'queue', 'schedule', 'since', 'until']) want[key] = p.get(key) || '';
  const inputs = {
    q: $('task-search'), status: $('filter-status'), type: $('filter-type'), queue: $('queue-filter'),
    schedule: $('filter-schedule'), since: $('filter-since'), until: $('filter-until'),
  };
  let changed = false;
  for (const [key, value] of Object.entries(want)) {
    if (filter[key] !== value) { filter[key] = value; changed = true; }
    const el = inputs[key];
    const shown = key === 'since' || key === 'until' ? toLocalInput(value) : value;
    if (!el || el.value === shown) continue;
    if (shown !== value) { el.value = shown; continue; }
    if (el.tagName === 'SELECT' && ![...el.options].some((o) => o.value === value)) {
      const opt = document.createElement('option'); // a queue the list has not named yet, or a type
      opt.value = value;
      opt.textContent = value;
      el.appendChild(opt);
    }
    el.value = value;
  }
  if (changed) {
    clearBulk();
    if (filter.queue) loadTasks(filter.queue);
    runSearchSoon(0);
    flushSoon();
  }
  const id = path.startsWith('/') ? decodeURIComponent(path.slice(1)) : '';
  if (TASK_ID.test(id)) openDetails(id);
  else if (details.id) closeDetails();
  if (!id) {
    const panel = $('tasks');
    if (panel && typeof panel.scrollIntoView === 'function') panel.scrollIntoView();
  }
}

/** Keys: "/" to the search box; j and k to the next and previous task row (Enter opens it; Escape closes). */
function onPageKey(ev) {
  if (ev.defaultPrevented || ev.ctrlKey || ev.metaKey || ev.altKey) return;
  const el = ev.target;
  const typing = el && (el.isContentEditable || /^(INPUT|TEXTAREA|SELECT)$/.test(el.tagName));
  const dlg = document.querySelector('dialog[open]');
  if (typing || dlg) return;
  if (ev.key === '/') {
    const box = $('task-search');
    if (box) { ev.preventDefault(); box.focus(); box.select(); }
  } else if (ev.key === 'j' || ev.key === 'k') {
    const buttons = [...document.querySelectorAll('#task-rows > tr > td.id button.open-task')];
    if (!buttons.length) return;
    const at = buttons.findIndex((b) => b.closest('tr').contains(document.activeElement));
    const next = at < 0 ? 0 : Math.min(Math.max(at + (ev.key === 'j' ? 1 : -1), 0), buttons.length - 1);
    ev.preventDefault();
    buttons[next].focus();
    const tr = buttons[next].closest('tr');
    if (typeof tr.scrollIntoView === 'function') tr.scrollIntoView({ block: 'nearest' });
  }
}
const BULK = {
  cancel: { path: '/api/tasks/cancel', verb: 'Cancel', done: 'Cancelled', key: 'cancelled', what: 'tasks' },
  requeue: { path: '/api/dlq/requeue', verb: 'Requeue', done: 'Requeued', key: 'requeued', what: 'dead letters' },
  discard: { path: '/api/dlq/discard', verb: 'Discard', done: 'Discarded', key: 'discarded', what: 'dead letters' },
  delete: { path: '/api/tasks/delete', verb: 'Delete', done: 'Deleted', key: 'deleted', what: 'finished tasks' },
};

function clearBulk() {
  if (!bulk.ids.size && !bulk.all && !bulk.pending) return;
  bulk.ids.clear();
  bulk.all = false;
  bulk.pending = '';
  for (const tr of rows.values()) dirty.add(tr.dataset.id); // their boxes
  flushSoon();
}

/** How many a bulk action would act on, as its question counts them. */
const bulkCount = () => (bulk.all ? bulk.total : bulk.ids.size);

/** The bar: what is chosen, "Select all N matching" while filtering, Cancel and Delete finished, and the
 *  question a first click asks ("Cancel 12 tasks?" with Confirm and Keep). */
function renderBulk() {
  const bar = $('bulk-bar');
  if (!bar) return;
  const n = bulkCount();
  const chosen = bulk.all || bulk.ids.size > 0;
  setHidden(bar, !chosen && !isFiltering());
  setText($('bulk-count'), bulk.all ? `all ${n.toLocaleString('en-US')} matching selected` : chosen ? `${n} selected` : '');
  setHidden($('bulk-all'), bulk.all || !isFiltering());
  setHidden($('bulk-clear'), !chosen);
  for (const id of ['bulk-cancel', 'bulk-requeue', 'bulk-discard', 'bulk-delete']) {
    const b = $(id);
    if (b) { b.disabled = !chosen || bulk.busy; b.hidden = Boolean(bulk.pending); }
  }
  setHidden($('bulk-ask'), !bulk.pending);
  const action = BULK[bulk.pending];
  const whose = action && action.what === 'dead letters' ? ' (their dead letters)' : '';
  setText($('bulk-question'), action ? `${action.verb} ${n.toLocaleString('en-US')} task${n === 1 ? '' : 's'}${whose}?` : '');
  const confirm = $('bulk-confirm');
  if (confirm) confirm.disabled = bulk.busy;
}

/** "Select all N matching": ask the server how many tasks the filters match (all it keeps, not only the
 *  page's). */
async function selectAllMatching() {
  const params = filterParams();
  params.set('limit', '1');
  let total = null;
  try {
    const res = await api(`/api/tasks?${params}`, { headers: { Accept: 'application/json' }, cache: 'no-store' });
    const data = await res.json();
    if (res.ok) total = toNum(data.total);
    else panelStatus('bulk-status', `Could not count the matching tasks: ${data.error || res.status}`, 'error');
  } catch (e) {
    panelStatus('bulk-status', 'Could not count the matching tasks: the server did not answer.', 'error');
  }
  if (total === null) return;
  Object.assign(bulk, { all: true, total, pending: '' });
  bulk.ids.clear();
  for (const tr of rows.values()) dirty.add(tr.dataset.id);
  flushSoon();
}

async function runBulk() {
  const action = BULK[bulk.pending];
  if (!action || bulk.busy) return;
  const body = bulk.all ? { filter: Object.fromEntries(filterParams()) } : { ids: [...bulk.ids] };
  const kind = bulk.pending;
  bulk.busy = true;
  renderBulk();
  panelStatus('bulk-status', `${action.verb}…`, 'busy');
  const r = await callAction(action.path, 'POST', body);
  bulk.busy = false;
  if (!r.ok || !r.body) {
    panelStatus('bulk-status', `${action.verb} failed: ${r.text || 'unexpected answer from the server.'}`, 'error');
    bulk.pending = '';
    renderBulk();
    return;
  }
  const acted = toNum(r.body[action.key]) || 0;
  const skipped = toNum(r.body.skipped) || 0;
  panelStatus('bulk-status', `${action.done} ${acted} ${action.what}; skipped ${skipped}.`, 'ok');
  if (kind === 'delete') { // the deleted ones leave the table: the finished ones among those chosen
    for (const t of [...tasks.values()]) {
      if (TERMINAL.has(t.status) && (bulk.all ? matchesFilter(t) : bulk.ids.has(t.id))) tasks.delete(t.id);
    }
  } else {
    for (const id of bulk.ids) refreshTask(id);
  }
  clearBulk();
  if (serverFiltered()) runSearchSoon(0);
  if (kind === 'requeue' || kind === 'discard') pollers.dlq && pollers.dlq.now();
  flushSoon();
}

export function initBulk() {
  const body = $('task-rows');
  if (body) {
    body.addEventListener('change', (ev) => {
      const tick = ev.target;
      if (!tick || !tick.classList || !tick.classList.contains('select-task')) return;
      const id = tick.closest('tr[data-id]').dataset.id;
      if (tick.checked) bulk.ids.add(id);
      else bulk.ids.delete(id);
      bulk.pending = '';
      renderBulk();
    });
  }
  const on = (id, fn) => { const el = $(id); if (el) el.addEventListener('click', fn); };
  on('bulk-all', selectAllMatching);
  on('bulk-clear', clearBulk);
  for (const kind of Object.keys(BULK)) {
    on(`bulk-${kind}`, () => { bulk.pending = kind; renderBulk(); const c = $('bulk-confirm'); if (c) c.focus(); });
  }
  on('bulk-confirm', runBulk);
  on('bulk-keep', () => { bulk.pending = ''; renderBulk(); });
  renderBulk();
}

/**
 * Cancel task `id` (its row's or its details' Cancel button). The row turns cancelled through the
 * socket's update; the answer's outcome shows in #tasks-status, in the row (an error) and in the
 * details; then the task is read back, so that the row is right even while the socket is down.
 */
export async function cancelTask(id) {
  const c = cancels.get(id);
  if (c && c.busy) return;
  cancels.set(id, { busy: true, error: '', detail: '', done: false });
  markDirty(id);
  const r = await callAction(`/api/tasks/${encodeURIComponent(id)}/cancel`, 'POST');
  const short = shortId(id);
  if (r.ok) {
    cancels.set(id, { busy: false, error: '', detail: '', done: true });
    panelStatus('tasks-status', `Cancelled ${short}.`, 'ok');
  } else {
    const now = r.status === 409 && r.body && typeof r.body.status === 'string' ? `already ${r.body.status}` : '';
    cancels.set(id, { busy: false, error: `Cancel failed: ${now || r.text}`, detail: `Cancel failed: ${r.text}`, done: false });
    panelStatus('tasks-status', `Cancel of ${short} failed: ${r.text}`, 'error');
  }
  markDirty(id);
  if (r.status !== 0) refreshTask(id);
}

/** Read task `id` back into the store (merged by its seq like any update: never a step back). */
async function refreshTask(id) {
  try {
    const res = await api(`/api/tasks/${encodeURIComponent(id)}`, { headers: { Accept: 'application/json' }, cache: 'no-store' });
    if (!res.ok) return;
    const body = await res.json();
    if (!body || typeof body !== 'object' || Array.isArray(body)) return;
    const { history, ...task } = body; // the details fetch their own history
    mergeTask(Object.assign(task, { id }));
  } catch (e) { /* offline: the socket's snapshot catches up on reconnect */ }
}
