// asyncnode browser client: a live dashboard. Plain ES2020, no dependencies, no build step.
//
// Security notes: the page runs under a strict CSP (no inline script/style), and
// data coming from the server or the user is only ever written with textContent or
// attributes -- never innerHTML -- because task payloads/results may contain markup.
// The chart is drawn on a <canvas>; its colours come from the CSS custom properties.
//
// DOM hooks (tests rely on them; keep them working). Every one is an id, class or data-*
// attribute in web/templates/index.html or created here:
//   Connection   #conn[data-state=connecting|live|reconnecting|auth] (role=status).
//   Navigation   nav.section-nav links to #throughput, #workers, #queues, #schedules (in li#nav-schedules,
//                hidden with the panel), #tasks, #dlq, #submit; badges #nav-workers (live count),
//                #nav-dlq (dead letters, hidden at 0).
//   Summary      #summary[data-stale=true|false] (false while stats arrive, true before the
//                first and after 5 s without one); figures hold the number only ("12",
//                "0.5", "1,200"; "–" when unknown): #stat-completed, #stat-failed (per
//                second), #stat-queue (ready), #stat-dlq, #stat-submitted (per second),
//                #stat-completed-total, #stat-failed-total, #stat-workers (live),
//                #stat-busy; #fig-failed[data-alert], #fig-dlq[data-alert] ("true" when > 0).
//   Submit       form.task-form[data-type] with [name][data-kind] fields, #<field-id>-err,
//                and [role="status"] output (inline 400/401/503/network messages).
//   Tasks        table#task-table; #task-rows > tr[data-id][data-status] with
//                td.id/.type/.queue/.status/.actions/.progress/.attempts/.worker/.time/.result; td.id
//                holds button.open-task[data-task-id] (text: the short id); td.status holds
//                span.badge.status-<s>, and for a scheduled task span.countdown (" · in 4 s", "· due
//                now"; ticking with the page's one clock, dropped when the status changes); td.actions
//                holds button.cancel-task (shown for pending, scheduled, retrying and started; a click
//                POSTs /api/tasks/<id>/cancel, disabled while it runs) and span.row-error (its inline
//                error, e.g. "Cancel failed: already completed" for a 409); #tasks-status (role=status,
//                data-state ok/error: the last cancel's outcome);
//                <progress> and span.pct in td.progress; span.error/.retry/.note in
//                td.result; #task-count, #tasks-empty (no tasks at all), #tasks-nomatch (none
//                pass the filters); filters select#filter-status and select#filter-type
//                ("" or "all" = all) and select#queue-filter ("" = "All queues", then one
//                option per queue of the latest list; choosing one also fetches its recent
//                tasks with GET /api/tasks?queue=). A click on a row (outside its controls), Enter/Space on
//                a focused row, or a click on any [data-task-id] element opens the details.
//   Details      dialog#task-details ([open] while shown; Escape, #task-details-close or a
//                backdrop click close it and focus returns to the opener), with
//                #task-details-title, #detail-short, #detail-message (loading/404/errors),
//                #detail-id, #detail-type, #detail-queue, #detail-status (span.badge), #detail-attempts,
//                #detail-worker, #detail-created, #detail-time (ticking), and, each with its <dt> and
//                hidden while unset: #detail-run-at (ticking while scheduled), #detail-cancelled-at,
//                #detail-cancelled-by ("api (from 127.0.0.1, operator token)"); #detail-cancel
//                (button.cancel-task "Cancel task", shown as on the task's row; its outcome shows in
//                #detail-message, data-state busy/ok/error),
//                #detail-progress-block > #detail-progress, #detail-payload (pretty JSON),
//                #detail-result-block > #detail-result, #detail-error-block > #detail-error,
//                and ol#task-timeline > li[data-status] (time[datetime], span.badge,
//                span.tl-meta "+Δ · attempt N" or "+Δ · by api", span.tl-error).
//   Throughput   canvas#throughput-chart (role=img, aria-label, aria-describedby)
//                #throughput-summary (visually hidden text, refreshed every 5 s),
//                #chart-readout (values under the pointer), #chart-waiting (shown until the
//                first stats message).
//   Workers      table#worker-table; #worker-rows > tr[data-worker="<id>"][data-busy] with
//                td.host (span.dot, span.host-name, span.gone-label), td.instance, td.pid,
//                td.uptime, td.done, td.current (button.open-task[data-task-id] or "idle");
//                a worker missing from the latest list gets class "gone" for 30 s, then
//                goes; #worker-count, #workers-empty, #workers-error.
//   Queues       table#queue-table; #queue-rows > tr[data-queue="<name>"][data-paused=true|false]
//                in the server's order, with td.name, td.ready, td.running, td.retrying, td.scheduled,
//                td.consumers ("–" when unknown), td.limit, td.rate ("—" for no limit),
//                td.completed (per second), td.state (span.badge.queue-state "running" or
//                "paused") and td.actions holding button.pause-queue and button.resume-queue
//                (only the one that applies is shown and enabled) and span.row-error (inline
//                error). Filled from GET /api/queues until stats carry `queues`; a click POSTs
//                /api/queues/<name>/pause|resume and the row takes the answer's `paused`.
//                #queue-count, #queues-empty, #queues-status (role=status, data-state
//                ok/error).
//   Schedules    section#schedules, hidden (and li#nav-schedules with it) while GET /api/schedules lists
//                none; table#schedule-table; #schedule-rows > tr[data-schedule="<name>"][data-paused=true|false]
//                in the server's (config) order, with td.name, td.type, td.when ("every 300 s" or the cron
//                expression), td.timezone, td.queue, td.next ("in 4 s", "in 59 m 12 s", "due now", ticking
//                with the page's one clock; "paused" while paused; "—" unknown), td.last ("12 s ago", "just
//                now"; "—" before the first run), td.task (button.open-task[data-task-id] of the last task, or
//                "—"), td.status (span.badge.status-<s> of that task: the page's live copy of it, else the
//                list's last_status) and td.actions holding button.pause-schedule and button.resume-schedule
//                (only the one that applies is shown and enabled), button.run-schedule ("Run now") and
//                span.row-error (inline error). Polled every SCHEDULES_POLL ms, and again once a shown next
//                run has come; a click POSTs /api/schedules/<name>/pause|resume|run: the row takes the
//                answer's `paused` or, for a run, its task (also shown at once in the task table).
//                #schedule-count, #schedules-status (role=status, data-state ok/error).
//   Dead letters table#dlq-table (class "stale" while polling fails); #dlq-rows > tr[data-id]
//                with td.id (button.open-task[data-task-id]), td.type, td.error (span.error,
//                details.traceback > pre), td.attempts, td.failed, td.actions holding
//                button.requeue, button.discard and span.row-error (inline error). Discard
//                confirms inline: a first click arms the button (class "discard-confirm",
//                data-armed="true", text "Confirm discard") and shows button.discard-cancel;
//                a second click sends the DELETE; Escape or Cancel disarm it.
//                #dlq-requeue-all, #dlq-total, #dlq-status (role=status, data-state
//                ok/error/busy/confirm), #dlq-empty, #dlq-more, #dlq-heading.
//   Token        #token-dialog, #token-form, #token-input, #token-error, #token-submit,
//                #token-cancel.
//
// Server messages: a WebSocket frame is a JSON object or an array of them. A task update
// has an "id" (and "queue": its queue's name, at least in its first update: the page
// keeps the one it has when a later update leaves it out); a stats item is {"stats": {ts,
// completed_per_s, failed_per_s, submitted_per_s, queue: {ready, dlq}, totals: {...},
// workers?: [...], queues?: [...]}} (no "id"), `queues` holding the items of GET
// /api/queues: {name, broker_name, ready, running, retrying (null: unknown), scheduled, consumers,
// paused, limit (0: none), rate ("": none, else like "10/s"), completed_per_s}.
// After the socket opens the page sends {"subscribe": "*"}.
//
// Access token: when the server has `[api] token`, every /api/* call needs
// `Authorization: Bearer <token>` and the socket needs /ws?token=<token>. The token is
// asked for once (on the first 401) and kept in sessionStorage for this tab's session.
// With the read-only token (`[api] read_token`), <body data-access="read"> hides every
// action (submit forms, requeue, discard, pause/resume a queue or a schedule, run a schedule now, cancel a
// task) and #readonly-note
// says why.
//
// Tables: every table's rows come from one builder, tableRow(), with a <td class="<column>"> per
// column; their action buttons from actionButton() and their inline errors from rowError().
'use strict';

const MAX_ROWS = 200;    // rendered table rows cap
const MAX_KEPT = 1000;   // tasks kept in memory; the oldest beyond this are forgotten
const WS_MIN = 500;      // reconnect backoff start (ms)
const WS_MAX = 10000;    // reconnect backoff ceiling (ms)
const RESULT_MAX = 500;  // chars of result/error shown in a cell (full text in title)
const TERMINAL = new Set(['completed', 'failed', 'rejected', 'cancelled']);
const CANCELLABLE = new Set(['pending', 'scheduled', 'retrying', 'started']); // POST .../cancel stops these
const TOKEN_KEY = 'asyncnode.token'; // sessionStorage key of the API access token
const HIST_MAX = 50;     // status changes remembered per task (for the details timeline)

const CHART_SPAN = 300;        // seconds of history in the throughput chart
const CHART_MIN_GAP = 1000;    // ms between two data-driven chart redraws
const SUMMARY_EVERY = 5000;    // ms between updates of the chart's text summary
const STATS_STALE = 5000;      // ms without a stats message before the figures grey out
const WORKERS_POLL = 2000;     // ms between GET /api/workers
const WORKERS_VIA_STATS = 3500; // ms a worker list carried by stats makes polling unnecessary
const WORKER_GONE_KEEP = 30000; // ms a worker missing from the list stays (greyed out)
const DLQ_POLL = 3000;         // ms between GET /api/dlq
const DLQ_LIMIT = 100;         // dead letters fetched per poll
const QUEUES_POLL = 2000;      // ms between GET /api/queues
const QUEUES_VIA_STATS = 3500; // ms a queue list carried by stats makes polling unnecessary
const QUEUE_ANSWER_HOLD = 3000; // ms a pause/resume answer outranks a list that disagrees
const SCHEDULES_POLL = 3000;   // ms between GET /api/schedules
const SCHEDULES_DUE_GAP = 1000; // ms at least between two polls asked for by a next run that came

const tasks = new Map(); // id -> merged task object
const rows = new Map();  // id -> <tr> currently in the table
const dirty = new Set(); // ids changed since the last animation frame
const cancels = new Map(); // id -> {busy, error, detail, done}: this page's cancel of that task
const countdowns = new Set(); // <tr> of the scheduled tasks shown: their countdowns tick
let frameQueued = false;
const filter = { status: '', type: '', queue: '' }; // task table filters ('' = all)

const $ = (id) => document.getElementById(id);

/** Set an element's text only when it differs (no needless DOM mutation). */
function setText(el, text) {
  if (el && el.textContent !== text) el.textContent = text;
}

/** Set a data-* attribute only when it differs. */
function setData(el, key, value) {
  if (el && el.dataset[key] !== value) el.dataset[key] = value;
}

/** Set an element's title only when it differs. */
function setTitle(el, text) {
  if (el && el.title !== text) el.title = text;
}

/** Show or hide an element, touching the attribute only on a change (no style work). */
function setHidden(el, hidden) {
  if (el && el.hidden !== hidden) el.hidden = hidden;
}

/** Text of any JSON value: strings verbatim, the rest as JSON. */
function asText(v, pretty) {
  if (v === undefined) return '';
  if (typeof v === 'string') return v;
  try { return JSON.stringify(v, null, pretty ? 2 : undefined) ?? String(v); } catch (e) { return String(v); }
}

const shortId = (id) => String(id).slice(0, 8);

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
 * the task has a real one. Such stale data may still fill in a missing type/queue/payload,
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
  if (!frameQueued) { frameQueued = true; requestAnimationFrame(flush); }
}

const byNewest = (a, b) => (b.created_at || 0) - (a.created_at || 0);

const isAll = (v) => !v || v === 'all';

// A queue may be named "all": for queues only "" means every one.
const isFiltering = () => !isAll(filter.status) || !isAll(filter.type) || filter.queue !== '';

function matchesFilter(t) {
  return (isAll(filter.status) || t.status === filter.status)
    && (isAll(filter.type) || t.type === filter.type)
    && (filter.queue === '' || t.queue === filter.queue);
}

// ---------------------------------------------------------------- table rows and actions

const NO_COLS = new Set();

/**
 * A table row with one <td class="<column>"> per name of `cols` (also class "num" for those in
 * `numeric`): the one builder of the rows of every table. Returns the row and its cells by name.
 */
function tableRow(cols, numeric = NO_COLS) {
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
function actionButton(cls, text, label = '') {
  const b = document.createElement('button');
  b.type = 'button';
  b.className = `btn btn-small ${cls}`;
  b.textContent = text;
  if (label) b.setAttribute('aria-label', label);
  return b;
}

/** The inline error beside a row's actions, hidden while empty (see setInlineError). Not of class
 *  "error": in a task's row that is the task's own error. */
function rowError() {
  const err = document.createElement('span');
  err.className = 'row-error';
  err.hidden = true;
  return err;
}

/** The inline error of a dead letter's or a queue's row (its entry.el.err). */
function setRowError(entry, text) {
  setInlineError(entry.el.err, text);
}

/** A panel's status line (#queues-status, #dlq-status, #tasks-status); `fromPoll` marks a
 *  poll's own error, which the next good poll clears. */
function panelStatus(id, text, state, fromPoll = false) {
  const el = $(id);
  if (!el) return;
  el.textContent = text;
  el.dataset.state = state || '';
  el.dataset.poll = String(fromPoll);
}

/** One action call (requeue, discard, pause, resume, cancel): the answer's status and JSON body, and
 *  the text an inline error shows when it failed ('' when it succeeded). Never throws. */
async function callAction(path, method) {
  let res;
  try {
    res = await api(path, { method, headers: { Accept: 'application/json' } });
  } catch (e) {
    return { ok: false, status: 0, text: 'Network error: could not reach the server.' };
  }
  let body = null;
  try { body = await res.json(); } catch (e) { /* non-JSON body */ }
  const msg = body && typeof body.error === 'string' ? body.error : '';
  let text = '';
  if (!res.ok) {
    if (res.status === 401) text = 'An access token is required.';
    else if (res.status === 503) text = `Unavailable${msg ? `: ${msg}` : ', try again shortly.'}`;
    else text = msg || `Request failed (${res.status}).`;
  }
  return { ok: res.ok, status: res.status, body, text };
}

/** Show `text` in an inline error element, hidden while empty. */
function setInlineError(el, text) {
  if (!el) return;
  setText(el, text);
  setHidden(el, !text);
}

// ---------------------------------------------------------------- task table

function flush() {
  frameQueued = false;
  const body = $('task-rows');
  const ordered = [...tasks.values()].sort(byNewest); // stable: ties keep arrival order
  for (const t of ordered.splice(MAX_KEPT)) { tasks.delete(t.id); cancels.delete(t.id); }
  const filtering = isFiltering();
  const matching = filtering ? ordered.filter(matchesFilter) : ordered;
  const visible = matching.slice(0, MAX_ROWS);
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
  if (count) {
    let text;
    if (filtering) {
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

/** Keyboard focus is in a row about to disappear: keep it in the table, not on <body>. */
function focusAfterRemoval(tr) {
  const next = tr.nextElementSibling || tr.previousElementSibling;
  const target = next && next.querySelector('button');
  const heading = tr.closest('section') && tr.closest('section').querySelector('h2');
  if (target) target.focus();
  else if (heading) { if (!heading.hasAttribute('tabindex')) heading.tabIndex = -1; heading.focus(); }
}

// Ages tick only in rows that can be seen (the table scrolls inside its box), so that the
// clock does not re-lay out 200 rows every second; a row coming into view is refreshed.
const inView = typeof IntersectionObserver === 'function' ? new Set() : null;
let rowObserver = null;

function watchRow(tr) {
  if (!inView) return;
  if (!rowObserver) {
    rowObserver = new IntersectionObserver((entries) => {
      for (const e of entries) {
        if (!e.isIntersecting) { inView.delete(e.target); continue; }
        inView.add(e.target);
        const t = tasks.get(e.target.dataset.id);
        if (t) setText(e.target.cells[COL.time], timeText(t));
      }
    }, { root: document.querySelector('#tasks .table-wrap'), rootMargin: '200px 0px' });
  }
  rowObserver.observe(tr);
}

function unwatchRow(tr) {
  if (!inView) return;
  inView.delete(tr);
  if (rowObserver) rowObserver.unobserve(tr);
}

const COLS = ['id', 'type', 'queue', 'status', 'actions', 'progress', 'attempts', 'worker', 'time', 'result'];
const COL = Object.fromEntries(COLS.map((name, i) => [name, i])); // column name -> cell index

/** A button opening the details of task `id`, labelled with its short id. */
function taskButton(id, cls = 'open-task') {
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
  td.id.appendChild(taskButton(id));
  const cancel = actionButton('btn-danger-outline cancel-task', 'Cancel', `Cancel task ${shortId(id)}`);
  cancel.hidden = true;
  td.actions.append(cancel, rowError());
  return tr;
}

function badge(status) {
  const span = document.createElement('span');
  span.className = 'badge status-' + String(status).replace(/[^a-z0-9_-]/gi, '');
  span.textContent = status;
  return span;
}

function progressBar(progress) {
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

const hasProgress = (t, status) => status === 'started' && typeof t.progress === 'number' && isFinite(t.progress);

/**
 * Bring a row up to date, touching only what changed: at hundreds of updates a second
 * most of them move a progress bar, and rebuilding cells would make the browser redo
 * the table's layout for nothing.
 */
function updateRow(tr, t) {
  const status = String(t.status || 'unknown');
  const c = tr.cells;
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
function untilText(at) {
  const n = toNum(at);
  if (n === null) return '';
  const left = Math.ceil(n - Date.now() / 1000);
  return left > 0 ? `in ${left < 60 ? `${left} s` : fmtDur(left)}` : 'due now';
}

/** A scheduled task's countdown to its run_at (see untilText). */
const countdownText = (t) => untilText(t.run_at);

function renderCountdown(tr, t) {
  const el = tr.cells[COL.status].querySelector('.countdown');
  if (!el) return;
  const left = countdownText(t);
  setText(el, left ? ` \u00b7 ${left}` : '');
  setTitle(el, t.run_at == null ? '' : `runs at ${fullTime(t.run_at)}`);
}

const pad2 = (n) => String(n).padStart(2, '0');

/** Local wall-clock HH:MM:SS of a unix time in seconds, or '' if it is not a time. */
function clockTime(sec) {
  const n = toNum(sec);
  if (n === null) return '';
  const d = new Date(n * 1000);
  return `${pad2(d.getHours())}:${pad2(d.getMinutes())}:${pad2(d.getSeconds())}`;
}

/** HH:MM:SS.mmm, for timelines where changes come within the same second. */
function clockTimeMs(sec) {
  const n = toNum(sec);
  if (n === null) return '';
  return `${clockTime(n)}.${String(Math.floor((n * 1000) % 1000)).padStart(3, '0')}`;
}

/** "2024-05-01 13:04:05" local, for titles. */
function fullTime(sec) {
  const n = toNum(sec);
  if (n === null) return '';
  const d = new Date(n * 1000);
  return `${d.getFullYear()}-${pad2(d.getMonth() + 1)}-${pad2(d.getDate())} ${clockTime(n)}`;
}

/** "retry N at HH:MM:SS — error" for a task waiting for its next attempt. */
function retryText(t) {
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

function fmtDur(s) {
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
function timeText(t) {
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

function initFilters() {
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
  for (const key of ['status', 'type', 'queue']) {
    const el = sel[key];
    if (!el) continue;
    const apply = () => {
      const v = el.value;
      if (filter[key] === v) return;
      filter[key] = v;
      // The tasks kept are the newest of every queue: a quiet queue's may be missing.
      if (key === 'queue' && v) loadTasks(v);
      if (!frameQueued) { frameQueued = true; requestAnimationFrame(flush); }
    };
    el.addEventListener('change', apply);
    el.addEventListener('input', apply);
    filter[key] = el.value; // a value the browser restored on reload
  }
}

// ---------------------------------------------------------------- task details

const details = {
  id: null,        // task shown, null when closed
  fetched: null,   // GET /api/tasks/<id> answer (with history)
  loading: false,
  error: '',
  req: 0,          // guards against answers for a task no longer shown
  opener: null,    // element focused before opening (focus returns there)
  shownStatus: undefined,
  refetchTimer: 0,
};

/** The best view of the open task: the fetched record and live updates, newest wins. */
function detailsView() {
  const s = tasks.get(details.id);
  const f = details.fetched;
  if (!f) return s ? Object.assign({}, s) : { id: details.id };
  if (!s || s._local) return Object.assign({}, f);
  const sSeq = toNum(s.seq);
  const fSeq = toNum(f.seq);
  let v;
  if (sSeq !== null && (fSeq === null || sSeq > fSeq)) {
    v = Object.assign({}, f, s, { history: f.history });
    if (s.status !== f.status) {
      for (const k of ['progress', 'note']) if (!(k in s)) delete v[k];
    }
  } else {
    v = Object.assign({}, s, f);
  }
  if (isTime(f.created_at)) { v.created_at = f.created_at; delete v._tsCreated; } // not a guess
  return v;
}

function normEntry(e) {
  if (!e || typeof e !== 'object' || typeof e.status !== 'string') return null;
  const ts = toNum(e.ts);
  if (ts === null) return null;
  const out = { status: e.status, ts };
  const attempt = toNum(e.attempt);
  if (attempt !== null) out.attempt = attempt;
  if (e.error != null && e.error !== '') out.error = e.error;
  if (typeof e.cancelled_by === 'string' && e.cancelled_by) out.cancelled_by = e.cancelled_by;
  return out;
}

/** Every status change of the task: the server's history (or one rebuilt from its
 *  timestamps for old tasks), then the changes seen live since. */
function timelineEntries(v) {
  let entries = Array.isArray(v.history) ? v.history.map(normEntry).filter(Boolean) : [];
  if (!entries.length) {
    const created = toNum(v.created_at);
    const started = toNum(v.started_at);
    const finished = toNum(v.finished_at) ?? toNum(v.cancelled_at);
    if (created !== null && !v._tsCreated) entries.push({ status: 'pending', ts: created });
    if (started !== null) entries.push({ status: 'started', ts: started });
    if (finished !== null) {
      const e = { status: TERMINAL.has(v.status) ? v.status : 'finished', ts: finished };
      if (v.error != null && v.error !== '' && e.status !== 'completed') e.error = v.error;
      entries.push(e);
    }
  }
  const last = entries.reduce((m, e) => Math.max(m, e.ts), -Infinity);
  const live = (tasks.get(v.id) || {})._hist || [];
  for (const e of live) {
    if (e.ts <= last) continue;
    if (entries.some((x) => x.status === e.status && Math.abs(x.ts - e.ts) < 0.001)) continue;
    entries.push(e);
  }
  return entries.sort((a, b) => a.ts - b.ts);
}

function renderTimeline(list, entries) {
  // Progress updates re-render the details many times a second: rebuild only on change.
  const key = `${details.loading}|${entries.map((e) => `${e.status}@${e.ts}#${e.attempt}~${e.cancelled_by}`).join(',')}`;
  if (list._key === key) return;
  list._key = key;
  const first = entries.length ? entries[0].ts : 0;
  const items = entries.map((e, i) => {
    const li = document.createElement('li');
    li.dataset.status = e.status;
    const time = document.createElement('time');
    time.dateTime = new Date(e.ts * 1000).toISOString();
    time.textContent = clockTimeMs(e.ts);
    time.title = fullTime(e.ts);
    li.append(time, ' ', badge(e.status));
    const bits = [];
    if (i > 0) bits.push(`+${fmtDur(e.ts - first)}`);
    if (e.attempt != null) bits.push(`attempt ${e.attempt}`);
    if (e.cancelled_by != null) bits.push(`by ${e.cancelled_by}`);
    if (bits.length) {
      const meta = document.createElement('span');
      meta.className = 'tl-meta';
      meta.textContent = ' ' + bits.join(' · ');
      li.appendChild(meta);
    }
    if (e.error != null) {
      const err = document.createElement('span');
      err.className = 'error tl-error';
      err.textContent = asText(e.error);
      li.appendChild(err);
    }
    return li;
  });
  list.replaceChildren(...items);
  if (!items.length) {
    const li = document.createElement('li');
    li.className = 'muted';
    li.textContent = details.loading ? 'Loading…' : 'No status changes known.';
    list.appendChild(li);
  }
}

function renderDetails() {
  if (!details.id) return;
  const v = detailsView();
  const status = v.status == null ? 'unknown' : String(v.status);
  setText($('detail-short'), shortId(details.id));
  setText($('detail-id'), details.id);
  setText($('detail-type'), v.type == null ? '—' : String(v.type));
  setText($('detail-queue'), v.queue == null ? '—' : String(v.queue));
  const st = $('detail-status');
  if (st) {
    const cur = st.firstElementChild;
    if (!cur || cur.textContent !== status) st.replaceChildren(badge(status));
  }
  setText($('detail-attempts'), v.attempts == null ? '—' : String(v.attempts));
  setText($('detail-worker'), v.worker == null ? '—' : String(v.worker));
  setText($('detail-created'), v.created_at == null ? '—' : fullTime(v.created_at));
  setDetailRow('detail-cancelled-at', v.cancelled_at == null ? '' : fullTime(v.cancelled_at));
  setDetailRow('detail-cancelled-by', cancelledByText(v));
  renderDetailsTime(v);
  const cancel = $('detail-cancel');
  if (cancel) {
    const can = CANCELLABLE.has(status);
    if (!can && cancel === document.activeElement && $('task-details-close')) $('task-details-close').focus();
    setHidden(cancel, !can);
    const c = cancels.get(details.id);
    cancel.disabled = !!(c && c.busy);
  }

  const progBlock = $('detail-progress-block');
  if (progBlock) {
    const show = hasProgress(v, status) || (status === 'started' && v.note);
    setHidden(progBlock, !show);
    const holder = $('detail-progress');
    if (holder) {
      const parts = hasProgress(v, status) ? progressBar(v.progress) : [];
      if (v.note) {
        const note = document.createElement('span');
        note.className = 'note';
        note.textContent = ' ' + String(v.note);
        parts.push(note);
      }
      holder.replaceChildren(...parts);
    }
  }

  const payload = $('detail-payload');
  if (payload) {
    if (v.payload !== undefined) setText(payload, asText(v.payload, true));
    else setText(payload, details.loading ? 'Loading…' : '—');
  }
  const failing = status === 'failed' || status === 'rejected' || status === 'retrying';
  const hasError = v.error != null && v.error !== '';
  const resBlock = $('detail-result-block');
  const errBlock = $('detail-error-block');
  const showResult = !failing && v.result !== undefined && (v.result !== null || status === 'completed');
  setHidden(resBlock, !showResult);
  if (showResult) setText($('detail-result'), asText(v.result, true));
  setHidden(errBlock, !(hasError && (failing || !showResult)));
  if (hasError) {
    let text = asText(v.error, true);
    if (status === 'retrying') text = retryText(v);
    setText($('detail-error'), text);
  }
  const list = $('task-timeline');
  if (list) renderTimeline(list, timelineEntries(v));
  const msg = $('detail-message');
  if (msg) {
    const [text, state] = detailsMessage();
    setText(msg, text);
    setData(msg, 'state', state);
  }
  // A change of status may bring history the socket did not carry (errors, attempts).
  if (details.fetched && !details.loading && details.shownStatus !== undefined
      && details.shownStatus !== status && String(details.fetched.status) !== status) {
    scheduleDetailsRefetch();
  }
  details.shownStatus = status;
}

/** The line above the details: loading and load errors first, then this page's cancel of the task. */
function detailsMessage() {
  if (details.error) return [details.error, 'error'];
  const c = cancels.get(details.id);
  if (c && c.busy) return ['Cancelling…', 'busy'];
  if (c && c.error) return [c.detail, 'error'];
  if (c && c.done) return ['Cancelled.', 'ok'];
  return [details.loading && !details.fetched ? 'Loading…' : '', 'busy'];
}

/** A <dd> of the details grid and its <dt>: shown with `text`, hidden while it is ''. */
function setDetailRow(id, text) {
  const dd = $(id);
  if (!dd) return;
  setText(dd, text);
  setHidden(dd, !text);
  if (dd.previousElementSibling) setHidden(dd.previousElementSibling, !text);
}

/** "api (from 127.0.0.1, operator token)", "cli", "schedule"; '' when not cancelled. */
function cancelledByText(v) {
  if (typeof v.cancelled_by !== 'string' || !v.cancelled_by) return '';
  const bits = [];
  if (typeof v.cancelled_client === 'string' && v.cancelled_client) bits.push(`from ${v.cancelled_client}`);
  const token = v.cancelled_token;
  if (typeof token === 'string' && token) bits.push(token === 'none' ? 'no token' : `${token} token`);
  return bits.length ? `${v.cancelled_by} (${bits.join(', ')})` : v.cancelled_by;
}

function renderDetailsTime(v) {
  let text = timeText(v) || '—';
  if (v.status === 'retrying' && v.next_attempt_at != null) {
    const left = toNum(v.next_attempt_at) - Date.now() / 1000;
    text += ` · next attempt at ${clockTime(v.next_attempt_at)}${left > 0 ? ` (in ${fmtDur(left)})` : ''}`;
  }
  setText($('detail-time'), text);
  let runAt = v.run_at == null ? '' : fullTime(v.run_at);
  if (runAt && v.status === 'scheduled' && countdownText(v)) runAt += ` (${countdownText(v)})`;
  setDetailRow('detail-run-at', runAt);
}

function scheduleDetailsRefetch() {
  if (details.refetchTimer) return;
  details.refetchTimer = setTimeout(() => {
    details.refetchTimer = 0;
    if (details.id) fetchDetails();
  }, 400);
}

async function fetchDetails() {
  const id = details.id;
  const req = ++details.req;
  details.loading = true;
  let res = null;
  let body = null;
  let failure = '';
  try {
    res = await api(`/api/tasks/${encodeURIComponent(id)}`, { headers: { Accept: 'application/json' }, cache: 'no-store' });
    try { body = await res.json(); } catch (e) { /* non-JSON body */ }
  } catch (e) {
    failure = 'Network error: could not reach the server.';
  }
  if (req !== details.req || details.id !== id) return; // closed or another task shown
  details.loading = false;
  if (failure) details.error = details.fetched ? '' : failure;
  else if (res.ok && body && typeof body === 'object' && !Array.isArray(body)) {
    details.fetched = Object.assign({ id }, body);
    details.error = '';
  } else if (res.status === 404) {
    details.error = 'The server no longer knows this task (expired or never recorded); showing what this page saw.';
  } else if (res.status === 401) {
    details.error = 'An access token is required to load this task.';
  } else {
    const msg = body && typeof body.error === 'string' ? `: ${body.error}` : '';
    details.error = `Could not load the task (${res.status})${msg}.`;
  }
  renderDetails();
}

function showDialog(dlg, modal) {
  try {
    if (modal && typeof dlg.showModal === 'function') dlg.showModal();
    else if (typeof dlg.show === 'function') dlg.show();
    else dlg.setAttribute('open', '');
  } catch (e) {
    dlg.setAttribute('open', '');
  }
}

/** Show the details of task `id`; `opener` gets the focus back on close. */
function openDetails(id, opener) {
  const dlg = $('task-details');
  if (!dlg || typeof id !== 'string' || !id) return;
  if (details.id === id && dlg.open) return;
  clearTimeout(details.refetchTimer);
  Object.assign(details, {
    id, fetched: null, loading: true, error: '', shownStatus: undefined, refetchTimer: 0,
  });
  if (!dlg.open) details.opener = opener || document.activeElement;
  renderDetails();
  if (!dlg.open) showDialog(dlg, true);
  const close = $('task-details-close');
  if (close) close.focus();
  fetchDetails();
}

function closeDetails() {
  const dlg = $('task-details');
  if (!dlg || !dlg.open) { onDetailsClosed(); return; }
  if (typeof dlg.close === 'function') dlg.close(); // fires 'close' -> onDetailsClosed
  else { dlg.removeAttribute('open'); onDetailsClosed(); }
}

function onDetailsClosed() {
  const dlg = $('task-details');
  if (dlg && dlg.open) return;
  const id = details.id;
  details.id = null;
  details.fetched = null;
  details.req++;
  clearTimeout(details.refetchTimer);
  details.refetchTimer = 0;
  let back = details.opener;
  details.opener = null;
  if (!back || !document.contains(back)) {
    // The row that opened it was re-rendered or dropped: its current button, if any.
    back = id ? document.querySelector(`#task-rows button[data-task-id="${CSS_escape(id)}"]`) : null;
  }
  if (back && back !== document.body && typeof back.focus === 'function') back.focus();
}

/** CSS.escape where available (ids are UUIDs, but never trust that in a selector). */
function CSS_escape(s) {
  if (window.CSS && typeof window.CSS.escape === 'function') return window.CSS.escape(s);
  return String(s).replace(/[^a-zA-Z0-9_-]/g, (c) => `\\${c.charCodeAt(0).toString(16)} `);
}

function initDetails() {
  const dlg = $('task-details');
  if (dlg) {
    dlg.addEventListener('close', onDetailsClosed);
    const close = $('task-details-close');
    if (close) close.addEventListener('click', closeDetails);
    const cancel = $('detail-cancel');
    if (cancel) cancel.addEventListener('click', () => { if (details.id) cancelTask(details.id); });
    // A click on the backdrop (the dialog box itself, outside its content) closes it.
    dlg.addEventListener('click', (ev) => { if (ev.target === dlg) closeDetails(); });
    // Escape: native for a modal dialog; this covers the fallback without showModal.
    dlg.addEventListener('keydown', (ev) => {
      if (ev.key === 'Escape' && !ev.defaultPrevented) { ev.preventDefault(); closeDetails(); }
    });
  }
  // Anything carrying data-task-id opens that task (task ids, workers' tasks, dead letters).
  document.addEventListener('click', (ev) => {
    const el = ev.target;
    if (!el || typeof el.closest !== 'function') return;
    const opener = el.closest('[data-task-id]');
    if (opener) { openDetails(opener.dataset.taskId, opener); return; }
    const tr = el.closest('#task-rows > tr[data-id]');
    if (!tr || el.closest('a, button, input, select, textarea, summary')) return;
    // Selecting text in a row (to copy a result) is not a request to open it.
    const sel = window.getSelection ? window.getSelection() : null;
    if (sel && !sel.isCollapsed && String(sel).length && tr.contains(sel.anchorNode)) return;
    openDetails(tr.dataset.id, tr.querySelector('button.open-task'));
  });
  const body = $('task-rows');
  if (body) {
    // One listener for every row's Cancel button (rows come and go with the updates).
    body.addEventListener('click', (ev) => {
      const btn = ev.target && typeof ev.target.closest === 'function' ? ev.target.closest('button.cancel-task') : null;
      const tr = btn && btn.closest('tr[data-id]');
      if (tr) cancelTask(tr.dataset.id);
    });
    body.addEventListener('keydown', (ev) => {
      if (ev.key !== 'Enter' && ev.key !== ' ') return;
      const tr = ev.target;
      if (!tr || tr.tagName !== 'TR' || !tr.dataset.id) return; // buttons handle their own
      ev.preventDefault();
      openDetails(tr.dataset.id, tr.querySelector('button.open-task') || tr);
    });
  }
}

// ---------------------------------------------------------------- cancel

/**
 * Cancel task `id` (its row's or its details' Cancel button). The row turns cancelled through the
 * socket's update; the answer's outcome shows in #tasks-status, in the row (an error) and in the
 * details; then the task is read back, so that the row is right even while the socket is down.
 */
async function cancelTask(id) {
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

// ---------------------------------------------------------------- live figures & chart

const chart = {
  samples: [],     // {ts, c, f, s, q, d} oldest first, CHART_SPAN seconds (+1 before)
  lastRecv: 0,     // Date.now() when the newest sample arrived
  lastDraw: 0,
  timer: 0,
  frame: false,
  ctx: undefined,  // 2D context (null where canvas is unsupported)
  w: 0, h: 0,      // CSS pixel size of the canvas
  hoverX: null,
  colors: null,
  summaryAt: 0,
  summaryDirty: false,
};
let statsAt = 0;   // Date.now() of the last stats message (0: none yet)

const num = (x) => { const n = toNum(x); return n === null ? null : n; };

/** A per-second rate: "12" from 12.0, "0.5", "1.3k" beyond 10,000. */
function fmtRate(v) {
  if (v === null || v === undefined) return '–';
  if (v >= 10000) return `${(v / 1000).toFixed(1)}k`;
  if (v >= 100) return String(Math.round(v));
  return String(Math.round(v * 10) / 10);
}

const fmtCount = (v) => (v === null || v === undefined ? '–' : Math.round(v).toLocaleString('en-US'));

function handleStats(st, msg) {
  if (!st || typeof st !== 'object' || Array.isArray(st)) return;
  const q = st.queue && typeof st.queue === 'object' ? st.queue : {};
  const totals = st.totals && typeof st.totals === 'object' ? st.totals : {};
  const ts = num(st.ts) !== null ? num(st.ts) : Date.now() / 1000;
  const sample = {
    ts,
    c: num(st.completed_per_s), f: num(st.failed_per_s), s: num(st.submitted_per_s),
    q: num(q.ready), d: num(q.dlq),
  };
  const list = chart.samples;
  const last = list[list.length - 1];
  // A live sample far behind the newest held: the server's clock was set back.
  if (last && ts < last.ts - 60 && Math.abs(ts - Date.now() / 1000) < 30) list.length = 0;
  const newest = !list.length || ts >= list[list.length - 1].ts;
  if (newest) {
    if (list.length && ts === list[list.length - 1].ts) list[list.length - 1] = sample;
    else list.push(sample);
  } else {
    // Older than the newest (a catch-up snapshot after a reconnect): fill the gap in order.
    const newestTs = list[list.length - 1].ts;
    if (ts < newestTs - CHART_SPAN - 1) return;
    let i = list.length - 1;
    while (i >= 0 && list[i].ts > ts) i--;
    if (i >= 0 && list[i].ts === ts) list[i] = sample;
    else list.splice(i + 1, 0, sample);
  }
  const top = list[list.length - 1].ts;
  let drop = 0;
  while (drop < list.length - 2 && list[drop + 1].ts < top - CHART_SPAN) drop++;
  if (drop) list.splice(0, drop);
  chart.summaryDirty = true;
  if (!newest) { requestChart(); return; } // the figures show the newest sample only
  chart.lastRecv = Date.now();
  statsAt = chart.lastRecv;

  setText($('stat-completed'), fmtRate(sample.c));
  setText($('stat-failed'), fmtRate(sample.f));
  setText($('stat-submitted'), fmtRate(sample.s));
  setText($('stat-completed-total'), fmtCount(num(totals.completed)));
  setText($('stat-failed-total'), fmtCount(num(totals.failed)));
  // null depths: RabbitMQ did not answer; show "unknown" rather than a stale number.
  setText($('stat-queue'), fmtCount(sample.q));
  if (!dlqFresh()) { // the dead-letter list's own total wins while it is polled
    if (sample.d !== null) setDlqFigure(sample.d);
    else setText($('stat-dlq'), '–');
  }
  const ff = $('fig-failed');
  setData(ff, 'alert', String(!!sample.f));
  setStale(false);
  const waiting = $('chart-waiting');
  setHidden(waiting, true);

  const wl = Array.isArray(st.workers) ? st.workers : null;
  if (wl) { workersViaStatsAt = Date.now(); applyWorkers(wl); }
  const ql = Array.isArray(st.queues) ? st.queues : null;
  if (ql) { queuesViaStatsAt = Date.now(); applyQueues(ql); }
  requestChart();
}

/** Whether GET /api/dlq answered lately: its total then feeds #stat-dlq, so that the
 *  figure always agrees with the table below (the stats' count is the fallback). */
const dlqFresh = () => Date.now() - dlqPolledAt < 3 * DLQ_POLL + 1000;
let dlqPolledAt = 0;

function setDlqFigure(n) {
  setText($('stat-dlq'), fmtCount(n));
  const fig = $('fig-dlq');
  setData(fig, 'alert', String(n > 0));
  const nav = $('nav-dlq');
  if (nav) { setText(nav, fmtCount(n)); setHidden(nav, !(n > 0)); }
}

function setStale(stale) {
  const el = $('summary');
  if (el && el.dataset.stale !== String(stale)) {
    el.dataset.stale = String(stale);
    el.title = stale ? 'No live figures at the moment' : '';
  }
}

/** Redraw soon, but at most once per CHART_MIN_GAP for data-driven redraws. */
function requestChart() {
  if (chart.timer) return;
  const wait = Math.max(0, chart.lastDraw + CHART_MIN_GAP - Date.now());
  chart.timer = setTimeout(() => {
    chart.timer = 0;
    if (document.hidden) return; // redrawn on visibilitychange
    drawChartSoon();
  }, wait);
}

/** Redraw on the next frame (resizes, hover). */
function drawChartSoon() {
  if (chart.frame) return;
  chart.frame = true;
  requestAnimationFrame(() => { chart.frame = false; drawChart(); });
}

function cssVar(name, fallback) {
  try {
    const v = getComputedStyle(document.documentElement).getPropertyValue(name).trim();
    return v || fallback;
  } catch (e) { return fallback; }
}

function chartColors() {
  if (!chart.colors) {
    chart.colors = {
      c: cssVar('--st-completed', '#15803d'),
      f: cssVar('--st-failed', '#c62828'),
      s: cssVar('--c-submitted', '#2f6fed'),
      q: cssVar('--c-queue', '#64748b'),
      grid: cssVar('--border', '#dde2e8'),
      text: cssVar('--muted', '#5d6b7c'),
      ink: cssVar('--text', '#1c2430'),
    };
  }
  return chart.colors;
}

function chartContext(canvas) {
  if (chart.ctx === undefined) {
    try { chart.ctx = canvas.getContext ? canvas.getContext('2d') : null; } catch (e) { chart.ctx = null; }
  }
  return chart.ctx;
}

/** A round axis maximum at or above v: 1, 2, 5, 10, 20, 50… */
function niceMax(v, floor) {
  const x = Math.max(v, floor);
  const p = Math.pow(10, Math.floor(Math.log10(x)));
  for (const m of [1, 2, 5, 10]) if (m * p >= x) return m * p;
  return 10 * p;
}

/** The time at the chart's right edge: the newest sample's, advanced by the time since. */
function chartEnd() {
  const list = chart.samples;
  if (!list.length) return Date.now() / 1000;
  return list[list.length - 1].ts + Math.max(0, Date.now() - chart.lastRecv) / 1000;
}

function chartLayout() {
  const w = chart.w;
  const h = chart.h;
  const left = 46;
  const right = 10;
  const top = 10;
  const axis = 18; // time labels at the bottom
  const gap = 16;
  const usable = h - top - axis - gap;
  const rateH = Math.round(usable * 0.64);
  return {
    left, right: w - right, top, width: w - right - left,
    rate: { top, bottom: top + rateH },
    queue: { top: top + rateH + gap, bottom: h - axis },
  };
}

function drawChart() {
  chart.lastDraw = Date.now();
  const canvas = $('throughput-chart');
  if (!canvas || !chart.samples.length) return; // "Waiting for live figures…" until data
  const ctx = chartContext(canvas);
  if (!ctx) return;
  if (!chart.w || !chart.h) measureChart(canvas);
  if (chart.w < 40 || chart.h < 60) return;
  const dpr = Math.max(1, Math.min(3, window.devicePixelRatio || 1));
  const pw = Math.round(chart.w * dpr);
  const ph = Math.round(chart.h * dpr);
  if (canvas.width !== pw || canvas.height !== ph) { canvas.width = pw; canvas.height = ph; }
  ctx.setTransform(dpr, 0, 0, dpr, 0, 0);
  ctx.clearRect(0, 0, chart.w, chart.h);

  const col = chartColors();
  const L = chartLayout();
  const end = chartEnd();
  const start = end - CHART_SPAN;
  const xOf = (ts) => L.left + ((ts - start) / CHART_SPAN) * L.width;
  const shown = chart.samples.filter((p) => p.ts >= start - 2);
  let rateMax = 0;
  let queueMax = 0;
  for (const p of shown) {
    rateMax = Math.max(rateMax, p.c || 0, p.f || 0, p.s || 0);
    queueMax = Math.max(queueMax, p.q || 0);
  }
  rateMax = niceMax(rateMax, 1);
  queueMax = niceMax(queueMax, 5);

  ctx.font = '11px system-ui, -apple-system, "Segoe UI", Roboto, sans-serif';
  ctx.lineWidth = 1;
  // Horizontal grid and value labels, per pane.
  const pane = (p, max, unit) => {
    ctx.textAlign = 'right';
    ctx.textBaseline = 'middle';
    for (const frac of [0, 0.5, 1]) {
      const y = Math.round(p.bottom - frac * (p.bottom - p.top)) + 0.5;
      ctx.strokeStyle = col.grid;
      ctx.setLineDash(frac === 0 ? [] : [3, 3]);
      ctx.beginPath(); ctx.moveTo(L.left, y); ctx.lineTo(L.right, y); ctx.stroke();
      ctx.fillStyle = col.text;
      ctx.fillText(`${fmtRate(max * frac)}${unit}`, L.left - 6, y);
    }
    ctx.setLineDash([]);
  };
  pane(L.rate, rateMax, '/s');
  pane(L.queue, queueMax, '');
  // Vertical grid every minute, labelled at the bottom.
  ctx.textAlign = 'center';
  ctx.textBaseline = 'alphabetic';
  for (let k = 0; k <= CHART_SPAN / 60; k++) {
    const x = Math.round(xOf(end - k * 60)) + 0.5;
    ctx.strokeStyle = col.grid;
    ctx.setLineDash([2, 4]);
    ctx.beginPath(); ctx.moveTo(x, L.rate.top); ctx.lineTo(x, L.queue.bottom); ctx.stroke();
    ctx.setLineDash([]);
    ctx.fillStyle = col.text;
    ctx.textAlign = k === 0 ? 'right' : 'center';
    ctx.fillText(k === 0 ? 'now' : `−${k}m`, k === 0 ? L.right : x, chart.h - 4);
  }
  ctx.save();
  ctx.beginPath();
  ctx.rect(L.left, 0, L.width, chart.h);
  ctx.clip();
  // Lines break where samples are missing (disconnected), instead of inventing values.
  const yIn = (p, max, v) => p.bottom - (Math.min(v, max) / max) * (p.bottom - p.top);
  const series = (key, p, max, color, opts = {}) => {
    ctx.strokeStyle = color;
    ctx.lineWidth = opts.width || 2;
    ctx.setLineDash(opts.dash || []);
    ctx.lineJoin = 'round';
    let run = [];
    const runs = [];
    let prev = null;
    for (const s of shown) {
      const v = s[key];
      if (v === null || (prev && s.ts - prev.ts > 3.5)) { if (run.length) runs.push(run); run = []; }
      if (v !== null) run.push([xOf(s.ts), yIn(p, max, v)]);
      prev = s;
    }
    if (run.length) runs.push(run);
    for (const r of runs) {
      if (opts.fill) {
        ctx.globalAlpha = 0.16;
        ctx.fillStyle = color;
        ctx.beginPath();
        ctx.moveTo(r[0][0], p.bottom);
        for (const [x, y] of r) ctx.lineTo(x, y);
        ctx.lineTo(r[r.length - 1][0], p.bottom);
        ctx.closePath();
        ctx.fill();
        ctx.globalAlpha = 1;
      }
      ctx.beginPath();
      r.forEach(([x, y], i) => (i ? ctx.lineTo(x, y) : ctx.moveTo(x, y)));
      if (r.length === 1) ctx.lineTo(r[0][0] + 1, r[0][1]);
      ctx.stroke();
    }
    ctx.setLineDash([]);
  };
  series('s', L.rate, rateMax, col.s, { width: 1.5, dash: [4, 3] });
  series('c', L.rate, rateMax, col.c, { fill: true });
  series('f', L.rate, rateMax, col.f);
  series('q', L.queue, queueMax, col.q, { fill: true });
  ctx.restore();
  // Hover: a vertical rule and the values at that time (also written to #chart-readout).
  const readout = $('chart-readout');
  let text = '';
  if (chart.hoverX !== null && shown.length && chart.hoverX >= L.left && chart.hoverX <= L.right) {
    const t = start + ((chart.hoverX - L.left) / L.width) * CHART_SPAN;
    let best = null;
    for (const s of shown) if (!best || Math.abs(s.ts - t) < Math.abs(best.ts - t)) best = s;
    if (best && Math.abs(best.ts - t) < 3) {
      const x = Math.round(xOf(best.ts)) + 0.5;
      ctx.strokeStyle = col.ink;
      ctx.globalAlpha = 0.5;
      ctx.beginPath(); ctx.moveTo(x, L.rate.top); ctx.lineTo(x, L.queue.bottom); ctx.stroke();
      ctx.globalAlpha = 1;
      const dot = (key, p, max, color) => {
        if (best[key] === null) return;
        ctx.fillStyle = color;
        ctx.beginPath(); ctx.arc(x, yIn(p, max, best[key]), 3, 0, Math.PI * 2); ctx.fill();
      };
      dot('c', L.rate, rateMax, col.c);
      dot('f', L.rate, rateMax, col.f);
      dot('q', L.queue, queueMax, col.q);
      text = `${clockTime(best.ts)} — completed ${fmtRate(best.c)}/s · failed ${fmtRate(best.f)}/s · `
        + `submitted ${fmtRate(best.s)}/s · queue ${fmtCount(best.q)}`;
    }
  }
  setText(readout, text || '\u00a0');
}

function measureChart(canvas) {
  const box = canvas.parentElement || canvas;
  chart.w = box.clientWidth || canvas.clientWidth || 0;
  chart.h = canvas.clientHeight || 0;
}

/** The text alternative of the chart, refreshed every few seconds. */
function updateChartSummary() {
  const el = $('throughput-summary');
  if (!el || !chart.summaryDirty) return;
  chart.summaryDirty = false;
  chart.summaryAt = Date.now();
  const list = chart.samples;
  if (!list.length) return;
  const lastTs = list[list.length - 1].ts;
  const pts = list.filter((p) => p.ts >= lastTs - CHART_SPAN);
  const stat = (key) => {
    const vals = pts.map((p) => p[key]).filter((v) => v !== null);
    if (!vals.length) return null;
    return { avg: vals.reduce((a, b) => a + b, 0) / vals.length, max: Math.max(...vals), now: vals[vals.length - 1] };
  };
  const span = lastTs - pts[0].ts;
  const mins = Math.round(span / 60);
  const over = span < 90 ? `${Math.max(1, Math.round(span))} seconds` : `${mins} minutes`;
  const parts = [];
  const c = stat('c');
  const f = stat('f');
  const q = stat('q');
  const d = stat('d');
  if (c) parts.push(`completed ${fmtRate(c.now)} per second now, ${fmtRate(c.avg)} on average, peak ${fmtRate(c.max)}`);
  if (f) parts.push(`failed ${fmtRate(f.now)} per second now, peak ${fmtRate(f.max)}`);
  if (q) parts.push(`queue depth ${fmtCount(q.now)}, peak ${fmtCount(q.max)}`);
  const dead = dlqFresh() ? dlq.total : d && d.now;
  if (dead !== null && dead !== undefined) parts.push(`${fmtCount(dead)} dead letter${dead === 1 ? '' : 's'}`);
  setText(el, `Throughput over the last ${over}, as of ${clockTime(lastTs)}: ${parts.join('; ')}.`);
}

function initChart() {
  const canvas = $('throughput-chart');
  if (!canvas) return;
  const box = canvas.parentElement || canvas;
  if (typeof ResizeObserver === 'function') {
    // Sizes come from the observer, so drawing never forces a layout.
    new ResizeObserver((entries) => {
      for (const e of entries) {
        chart.w = Math.round(e.contentRect.width);
        chart.h = Math.round(canvas.clientHeight || e.contentRect.height);
      }
      drawChartSoon();
    }).observe(box);
  } else {
    window.addEventListener('resize', () => { chart.w = 0; chart.h = 0; drawChartSoon(); });
  }
  canvas.addEventListener('pointermove', (ev) => {
    chart.hoverX = ev.offsetX;
    drawChartSoon();
  });
  canvas.addEventListener('pointerleave', () => { chart.hoverX = null; drawChartSoon(); });
  drawChartSoon();
}

// ---------------------------------------------------------------- workers

const workers = new Map(); // worker id -> {tr, td, data, recvAt, goneAt, cur}
let workersViaStatsAt = 0; // Date.now() of the last worker list carried by a stats message

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
function applyWorkers(items) {
  if (!Array.isArray(items)) return;
  const now = Date.now();
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
function tickWorkers() {
  for (const e of workers.values()) {
    const up = workerUptime(e);
    if (up !== null) setText(e.td.uptime, fmtDur(up));
  }
  if ([...workers.values()].some((e) => e.goneAt)) renderWorkers();
}

async function pollWorkers() {
  if (Date.now() - workersViaStatsAt < WORKERS_VIA_STATS) return; // stats carry them
  let res;
  try {
    res = await api('/api/workers', { headers: { Accept: 'application/json' }, cache: 'no-store' });
  } catch (e) {
    setInlineError($('workers-error'), 'Network error: could not load the workers.');
    return;
  }
  let body = null;
  try { body = await res.json(); } catch (e) { /* non-JSON body */ }
  if (Date.now() - workersViaStatsAt < WORKERS_VIA_STATS) return; // a stats list came meanwhile
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

// ---------------------------------------------------------------- dead letters

const dlq = {
  rows: new Map(),  // key -> {tr, td, el, item, sig, busy, armed}
  total: null,
  busyAll: false,
  version: 0,       // bumped by every action, so an older poll answer cannot resurrect rows
};
const DLQ_COLS = ['id', 'type', 'error', 'attempts', 'failed', 'actions'];
const DLQ_NUMS = new Set(['attempts']);
const ERROR_MAX = 300; // chars of a dead letter's error shown in the row (full text in title)

const dlqStatus = (text, state, fromPoll = false) => panelStatus('dlq-status', text, state, fromPoll);

function createDlqRow(entry) {
  const { tr, td } = tableRow(DLQ_COLS, DLQ_NUMS);
  const requeue = actionButton('requeue', 'Requeue');
  const discard = actionButton('btn-danger-outline discard', 'Discard');
  const cancel = actionButton('btn-secondary discard-cancel', 'Cancel');
  cancel.hidden = true;
  const err = rowError();
  td.actions.append(requeue, discard, cancel, err);
  requeue.addEventListener('click', () => dlqAction(entry, 'requeue'));
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

async function pollDlq() {
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
    dlqPolledAt = Date.now();
    applyDlq(body.items, body.total);
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

function tickDlq() {
  for (const e of dlq.rows.values()) renderDlqTime(e);
}

function initDlq() {
  const all = $('dlq-requeue-all');
  if (all) all.addEventListener('click', requeueAll);
}

// ---------------------------------------------------------------- queues

const queues = {
  rows: new Map(),  // name -> {name, tr, td, el, item, busy, answered}
};
let queuesViaStatsAt = 0; // Date.now() of the last queue list carried by a stats message

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
function applyQueues(items) {
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

async function pollQueues() {
  if (Date.now() - queuesViaStatsAt < QUEUES_VIA_STATS) return; // stats carry them
  let res;
  try {
    res = await api('/api/queues', { headers: { Accept: 'application/json' }, cache: 'no-store' });
  } catch (e) {
    queuesStatus('Network error: could not load the queues.', 'error', true);
    return;
  }
  let body = null;
  try { body = await res.json(); } catch (e) { /* non-JSON body */ }
  if (Date.now() - queuesViaStatsAt < QUEUES_VIA_STATS) return; // a stats list came meanwhile
  if (res.ok && body && Array.isArray(body.items)) {
    applyQueues(body.items);
  } else if (res.status === 401) {
    queuesStatus('An access token is required to list the queues.', 'error', true);
  } else {
    const msg = body && typeof body.error === 'string' ? `: ${body.error}` : '';
    queuesStatus(`Could not load the queues (${res.status})${msg}.`, 'error', true);
  }
}

// ---------------------------------------------------------------- schedules

const schedules = {
  rows: new Map(),  // name -> {name, tr, td, el, item, busy}
  version: 0,       // bumped by every action, so an older poll answer cannot undo what it did
  polledAt: 0,      // Date.now() of the last poll asked for by a next run that came
};

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
function renderScheduleTasks(changed) {
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

async function pollSchedules() {
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
function tickSchedules() {
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

// ---------------------------------------------------------------- access token

let memToken = '';      // fallback when sessionStorage is unavailable (blocked storage)
let storageOk = true;
// Set when a 401 reached a caller because the prompt was dismissed: background polls then
// pause (instead of prompting again every few seconds) until a token is entered.
let needToken = false;

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
  needToken = false;
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
    if (res.status !== 401) { loadTasks(); pollAllNow(); }
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
    if (next === null) { needToken = true; return res; } // dismissed: the caller sees the 401
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
        const queue = typeof body.queue === 'string' ? { queue: body.queue } : {};
        mergeTask({ id, type, status: body.status || 'pending', seq: -1,
          created_at: Date.now() / 1000, _local: true, ...queue });
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

/** Fetch the newest tasks (of one queue, if given) into the store. */
async function loadTasks(queue = '') {
  const only = queue ? `&queue=${encodeURIComponent(queue)}` : '';
  try {
    const res = await api(`/api/tasks?limit=100${only}`, { headers: { Accept: 'application/json' }, cache: 'no-store' });
    if (!res.ok) return;
    const data = await res.json();
    if (data && Array.isArray(data.items)) data.items.forEach(mergeTask);
  } catch (e) { /* offline: the next (re)connect fetches again */ }
}

/** One item of a frame: a stats message (no "id") or a task update. */
function handleItem(item) {
  if (item && typeof item === 'object' && !Array.isArray(item) && !('id' in item) && 'stats' in item) {
    handleStats(item.stats, item);
  } else {
    mergeTask(item);
  }
}

function handleFrame(data) {
  if (typeof data !== 'string') return;
  let msg;
  try { msg = JSON.parse(data); } catch (e) { return; } // ignore garbage frames
  // An array is several queued updates, or the snapshot of recent tasks the server sends
  // on connect and after a Redis outage: the same update objects, merged by seq.
  if (Array.isArray(msg)) msg.forEach(handleItem);
  else handleItem(msg);
}

let sock = null;
let backoff = WS_MIN;
let openedAt = 0;
let reconnectTimer = 0;
let authBlocked = false; // the socket needs a token and the prompt was dismissed

function setConn(state, text) {
  const el = $('conn');
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
    // Everything: task updates of every type, and the stats pushed every second.
    try {
      if (typeof s.send === 'function') s.send(JSON.stringify({ subscribe: '*' }));
    } catch (e) { /* closing already: 'close' follows */ }
    loadTasks(); // catch up on anything missed while disconnected
    pollAllNow();
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

// ---------------------------------------------------------------- polling

const pollers = {}; // name -> {now(), again, busy}
let pollingStarted = false;

const tokenDialogOpen = () => { const d = tokenEl('dialog'); return !!(d && d.open); };

/**
 * Call `run` every `every` ms, one call at a time. Paused while the tab is hidden, while
 * the token prompt is open, and after a dismissed prompt (until a token is entered).
 */
function makePoller(name, every, run) {
  const p = { busy: false, again: false };
  const tick = async (forced) => {
    if (p.busy) { if (forced) p.again = true; return; }
    if (document.hidden || needToken || tokenDialogOpen()) return;
    p.busy = true;
    try { await run(); } catch (e) { /* each poller reports its own errors */ }
    p.busy = false;
    if (p.again) { p.again = false; tick(false); }
  };
  p.now = () => { if (pollingStarted) tick(true); };
  setInterval(() => tick(false), every); // an interval: one pending call at most, no drift
  pollers[name] = p;
  return p;
}

function pollAllNow() {
  for (const p of Object.values(pollers)) p.now();
}

function startPolling() {
  if (pollingStarted) return;
  pollingStarted = true;
  makePoller('workers', WORKERS_POLL, pollWorkers);
  makePoller('dlq', DLQ_POLL, pollDlq);
  makePoller('queues', QUEUES_POLL, pollQueues);
  makePoller('schedules', SCHEDULES_POLL, pollSchedules);
  pollAllNow();
}

// ---------------------------------------------------------------- clock

/** Once a second: ages, durations, uptimes and countdowns tick; the chart scrolls; staleness
 *  shows. The page's one clock: no row has a timer of its own. */
function tick() {
  if (document.hidden) return;
  for (const tr of inView || rows.values()) {
    const t = tasks.get(tr.dataset.id);
    if (t) setText(tr.cells[COL.time], timeText(t));
  }
  for (const tr of countdowns) {
    const t = tasks.get(tr.dataset.id);
    if (t) renderCountdown(tr, t);
  }
  if (details.id) renderDetailsTime(detailsView());
  tickWorkers();
  tickDlq();
  tickSchedules();
  if (statsAt) {
    setStale(Date.now() - statsAt > STATS_STALE);
    requestChart();
  }
  if (Date.now() - chart.summaryAt >= SUMMARY_EVERY) updateChartSummary();
}

// ---------------------------------------------------------------- access

/**
 * What this page's token may do, from GET /api/access: "operator" or "open" (everything) or
 * "read" (a read-only token: the page hides its actions, which the server would refuse with 403).
 * Kept on <body data-access>, which style.css reads; asked again whenever the token changes.
 */
let accessToken = undefined; // the token the current data-access was learnt with
async function refreshAccess() {
  const token = getToken();
  if (token === accessToken) return;
  let res;
  try {
    res = await api('/api/access', { headers: { Accept: 'application/json' }, cache: 'no-store' });
  } catch (e) {
    return; // unreachable: the next poll asks again
  }
  if (!res.ok) return;
  let body = null;
  try { body = await res.json(); } catch (e) { return; }
  accessToken = getToken();
  const access = body && typeof body.access === 'string' ? body.access : 'open';
  document.body.dataset.access = access;
  setHidden($('readonly-note'), access !== 'read');
}

// ---------------------------------------------------------------- boot

function init() {
  initTokenDialog();
  initForms();
  initFilters();
  initDetails();
  initChart();
  initDlq();
  // Background polls start once the first call settled, so a server asking for a token
  // prompts once (for that call and the socket's probe) rather than for every poll.
  loadTasks().finally(() => { startPolling(); refreshAccess(); setInterval(refreshAccess, 2000); });
  connect();
  window.addEventListener('online', () => { if (!sock) connect(); pollAllNow(); });
  document.addEventListener('visibilitychange', () => {
    if (document.hidden) return;
    tick();
    drawChartSoon();
    pollAllNow();
  });
  setInterval(tick, 1000);
}

if (document.readyState === 'loading') document.addEventListener('DOMContentLoaded', init);
else init();
