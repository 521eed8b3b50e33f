// The schedules panel: pause, resume, run now.

import { pollers, schedules, SCHEDULES_DUE_GAP, tasks } from './state.js';
import { $, actionButton, badge, fmtDur, focusAfterRemoval, fullTime, num, panelStatus, rowError, setData, setHidden, setRowError, setText, setTitle, shortId, tableRow, toNum } from './ui.js';
import { api, callAction } from './api.js';
import { mergeTask, setScheduleNames, taskButton, untilText } from './tasks.js';

const SCHEDULE_COLS = ['name', 'type', 'when', 'timezone', 'queue', 'next', 'last', 'task', 'status', 'actions'];
const NONE = '\u2014'; // shown for what a schedule has not got yet (a last run, a last task)

const schedulesStatus = (text, state, fromPoll = false) => panelStatus('schedules-status', text, state, fromPoll);

function createScheduleRow(entry) {
  const { tr, td } = tableRow(SCHEDULE_COLS);
  tr.dataset.schedule = entry.name;
  const mk = (cls, text, action) => {
    const b = actionButton(cls, text, `${text} schedule ${entry.name}`);
    b.addEventListener('click', () => scheduleAction(entry, action));
    return b;
  };
  const pause = mk('btn-secondary pause-schedule', 'Pause', 'pause');
  const resume = mk('resume-schedule', 'Resume', 'resume');
  const run = mk('btn-secondary run-schedule', 'Run now', 'run');
  const err = rowError();
  td.actions.append(pause, resume, run, err);
  entry.tr = tr;
  entry.td = td;
  entry.el = { pause, resume, run, err, task: null }; // task: the last task's id shown in td.task
}

/** "every 300 s" or the cron expression. */
function scheduleWhen(it) {
  if (typeof it.cron === 'string' && it.cron) return it.cron;
  const every = num(it.every);
  return every === null ? '' : `every ${every} s`;
}

/** The status of a schedule's last task: this page's copy of the task where it has one (the socket keeps it
 *  current between two polls), else the list's. */
function scheduleTaskStatus(it) {
  const t = typeof it.last_task_id === 'string' ? tasks.get(it.last_task_id) : undefined;
  if (t && typeof t.status === 'string' && t.status) return t.status;
  return typeof it.last_status === 'string' && it.last_status ? it.last_status : '';
}

function updateScheduleRow(entry) {
  const it = entry.item;
  const { td, el } = entry;
  setText(td.name, entry.name);
  setText(td.type, it.type == null ? '' : String(it.type));
  const when = scheduleWhen(it);
  setText(td.when, when);
  setTitle(td.when, typeof it.cron === 'string' && it.cron ? 'cron expression' : '');
  setText(td.timezone, it.timezone == null ? '' : String(it.timezone));
  setText(td.queue, it.queue == null ? NONE : String(it.queue));
  const paused = it.paused === true;
  setData(entry.tr, 'paused', String(paused));
  renderScheduleTimes(entry);
  const id = typeof it.last_task_id === 'string' && it.last_task_id ? it.last_task_id : '';
  if (el.task !== id) { // rebuilt only on change, so a focused button stays put
    el.task = id;
    td.task.replaceChildren(id ? taskButton(id, 'open-task task-link') : NONE);
  }
  renderScheduleStatus(entry);
  // Only the pause or resume that applies is offered; Run now always is.
  setHidden(el.pause, paused);
  setHidden(el.resume, !paused);
  el.pause.disabled = paused || entry.busy;
  el.resume.disabled = !paused || entry.busy;
  el.run.disabled = entry.busy;
}

/** The ticking cells: the countdown to the next run ("paused" while paused) and the age of the last. */
function renderScheduleTimes(entry) {
  const it = entry.item;
  const { td } = entry;
  if (it.paused === true) {
    setText(td.next, 'paused');
    setTitle(td.next, 'nothing runs until it is resumed');
  } else {
    setText(td.next, untilText(it.next_run_at) || NONE);
    setTitle(td.next, it.next_run_at == null ? '' : `runs at ${fullTime(it.next_run_at)}`);
  }
  const last = toNum(it.last_run_at);
  if (last === null) {
    setText(td.last, NONE);
    setTitle(td.last, 'not run yet');
  } else {
    const ago = Date.now() / 1000 - last; // may be slightly negative: clocks differ
    setText(td.last, ago < 1 ? 'just now' : `${fmtDur(ago)} ago`);
    setTitle(td.last, fullTime(last));
  }
}

function renderScheduleStatus(entry) {
  const status = scheduleTaskStatus(entry.item);
  const cur = entry.td.status.firstElementChild;
  if (!status) { if (entry.td.status.firstChild) entry.td.status.replaceChildren(); return; }
  if (!cur || cur.textContent !== status) entry.td.status.replaceChildren(badge(status));
}

/** Task updates (flush) that concern a schedule's last task refresh its status badge at once. */
export function renderScheduleTasks(changed) {
  for (const entry of schedules.rows.values()) {
    if (changed.has(entry.item.last_task_id)) renderScheduleStatus(entry);
  }
}

/** Apply the latest list of schedules (GET /api/schedules): the panel and its nav link show while there is one. */
function applySchedules(items) {
  if (!Array.isArray(items)) return;
  const names = [];
  for (const it of items) {
    if (!it || typeof it !== 'object' || Array.isArray(it) || typeof it.name !== 'string' || !it.name) continue;
    if (names.includes(it.name)) continue;
    names.push(it.name);
    let entry = schedules.rows.get(it.name);
    if (!entry) {
      entry = { name: it.name, busy: false };
      createScheduleRow(entry);
      schedules.rows.set(it.name, entry);
    }
    entry.item = it;
    updateScheduleRow(entry);
  }
  for (const [name, entry] of schedules.rows) {
    if (names.includes(name) || entry.busy) continue;
    if (entry.tr.contains(document.activeElement)) focusAfterRemoval(entry.tr);
    entry.tr.remove();
    schedules.rows.delete(name);
  }
  // The server's order (that of config.toml); rows move only when out of place.
  const body = $('schedule-rows');
  if (body) {
    names.forEach((name, i) => {
      const tr = schedules.rows.get(name).tr;
      const at = body.children[i];
      if (at !== tr) body.insertBefore(tr, at || null);
    });
  }
  renderScheduleCount();
  const status = $('schedules-status');
  if (status && status.dataset.poll === 'true') schedulesStatus('', '');
  setScheduleNames(names);
}

function renderScheduleCount() {
  const n = schedules.rows.size;
  const paused = [...schedules.rows.values()].filter((e) => e.item.paused === true).length;
  setText($('schedule-count'), `${n} schedule${n === 1 ? '' : 's'}${paused ? `, ${paused} paused` : ''}`);
  const panel = $('schedules');
  if (panel && n === 0 && panel.contains(document.activeElement) && $('tasks-heading')) {
    $('tasks-heading').tabIndex = -1;
    $('tasks-heading').focus();
  }
  setHidden(panel, n === 0);
  setHidden($('nav-schedules'), n === 0);
}

const SCHEDULE_VERBS = { pause: 'Pause', resume: 'Resume', run: 'Run now' };

/** Pause, resume or run schedule `entry` now (its row's buttons); the outcome shows in #schedules-status and,
 *  an error, in the row. The list is then asked again, which brings the next run after a resume. */
async function scheduleAction(entry, action) {
  if (entry.busy) return;
  const name = entry.name;
  const hadFocus = entry.tr.contains(document.activeElement);
  entry.busy = true;
  schedules.version++;
  setRowError(entry, '');
  entry.tr.setAttribute('aria-busy', 'true');
  updateScheduleRow(entry);
  const r = await callAction(`/api/schedules/${encodeURIComponent(name)}/${action}`, 'POST');
  schedules.version++; // and a poll sent while this ran may predate it too
  entry.busy = false;
  entry.tr.removeAttribute('aria-busy');
  const body = r.body && typeof r.body === 'object' && !Array.isArray(r.body) ? r.body : {};
  const verb = SCHEDULE_VERBS[action];
  if (r.ok && action === 'run' && typeof body.id === 'string' && body.id) {
    const status = typeof body.status === 'string' && body.status ? body.status : 'pending';
    entry.item = Object.assign({}, entry.item, { last_task_id: body.id, last_status: status });
    // Shown in the task table at once, as a form's task is; the socket's updates then replace the guess.
    if (!tasks.has(body.id)) {
      const queue = typeof body.queue === 'string' ? { queue: body.queue } : {};
      mergeTask({ id: body.id, type: entry.item.type, status, seq: -1, created_at: Date.now() / 1000, _local: true, ...queue });
    }
    schedulesStatus(`Ran schedule ${name} now: task ${shortId(body.id)}.`, 'ok');
  } else if (r.ok && action !== 'run' && typeof body.paused === 'boolean') {
    const next = body.paused ? { next_run_at: null } : {}; // resumed: the list brings the next run
    entry.item = Object.assign({}, entry.item, { paused: body.paused }, next);
    schedulesStatus(body.paused ? `Paused schedule ${name}: nothing of it runs until it is resumed.`
      : `Resumed schedule ${name}.`, 'ok');
  } else {
    const text = r.ok ? 'unexpected answer from the server.' : r.text;
    setRowError(entry, `${verb} failed: ${text}`);
    schedulesStatus(`${verb} of schedule ${name} failed: ${text}`, 'error');
  }
  updateScheduleRow(entry);
  renderScheduleCount();
  // The button pressed may have given way to the other one: keep the keyboard on the row.
  if (hadFocus && action !== 'run') {
    const next = entry.item.paused === true ? entry.el.resume : entry.el.pause;
    if (!next.hidden) next.focus();
  }
  pollers.schedules && pollers.schedules.now();
}

export async function pollSchedules() {
  const version = schedules.version;
  let res;
  try {
    res = await api('/api/schedules', { headers: { Accept: 'application/json' }, cache: 'no-store' });
  } catch (e) {
    schedulesStatus('Network error: could not load the schedules.', 'error', true);
    return;
  }
  let body = null;
  try { body = await res.json(); } catch (e) { /* non-JSON body */ }
  if (version !== schedules.version) { pollers.schedules.again = true; return; } // an action ran meanwhile
  if (res.ok && body && Array.isArray(body.items)) {
    applySchedules(body.items);
  } else if (res.status === 404 && !schedules.rows.size) {
    // A server without schedules at all: the panel stays hidden.
  } else if (res.status === 401) {
    schedulesStatus('An access token is required to list the schedules.', 'error', true);
  } else {
    const msg = body && typeof body.error === 'string' ? `: ${body.error}` : '';
    schedulesStatus(`Could not load the schedules (${res.status})${msg}.`, 'error', true);
  }
}

/** Every second: countdowns and ages tick; a next run that came makes the list be asked again (at most once
 *  a second) for the one after it and the task it made. */
export function tickSchedules() {
  let due = false;
  const now = Date.now() / 1000;
  for (const entry of schedules.rows.values()) {
    renderScheduleTimes(entry);
    const next = toNum(entry.item.next_run_at);
    if (entry.item.paused !== true && next !== null && next <= now) due = true;
  }
  if (due && pollers.schedules && Date.now() - schedules.polledAt >= SCHEDULES_DUE_GAP) {
    schedules.polledAt = Date.now();
    pollers.schedules.now();
  }
}
