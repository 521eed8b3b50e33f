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
//                td.select/.id/.type/.queue/.status/.actions/.progress/.attempts/.worker/.time/.result; td.select
//                holds input.select-task (a tick for the bulk bar); td.id
//                holds button.open-task[data-task-id] (text: the short id); td.status holds
//                span.badge.status-<s>, and for a scheduled task span.countdown (" · in 4 s", "· due
//                now"; ticking with the page's one clock, dropped when the status changes); td.actions
//                holds button.cancel-task (shown for pending, scheduled, retrying and started; a click
//                POSTs /api/tasks/<id>/cancel, disabled while it runs) and span.row-error (its inline
//                error, e.g. "Cancel failed: already completed" for a 409); #tasks-status (role=status,
//                data-state ok/error: the last cancel's outcome);
//                <progress> and span.pct in td.progress; span.error/.retry/.note in
//                td.result; #task-count, #tasks-empty (no tasks at all), #tasks-nomatch (none
//                pass the filters); input#task-search (type=search; "/" focuses it): its words are looked
//                for by the server among every task it keeps (GET /api/tasks?q=&status=&type=&queue=, 250 ms
//                after the last keystroke), and the table shows those it found, newest first, with live
//                updates ("showing 200 of 1,234 matching" in #task-count; a refused search's error in
//                #tasks-search-error); filters select#filter-status and select#filter-type
//                ("" or "all" = all) and select#queue-filter ("" = "All queues", then one
//                option per queue of the latest list; choosing one also fetches its recent
//                tasks with GET /api/tasks?queue=); input#filter-schedule (suggestions in datalist
//                #schedule-names, the schedules' names) and input#filter-since / #filter-until
//                (datetime-local, the browser's zone; epoch seconds in the address): like the search box,
//                answered by the server; button#search-more ("More", shown while the server has another
//                page: the next 200 join the table). A click on a row (outside its controls), Enter/Space on
//                a focused row, or a click on any [data-task-id] element opens the details. j and k move
//                the focus to the next and previous row's id button (Enter opens it).
//   Bulk bar     #bulk-bar (hidden until a row is ticked or a filter is set; never for the read-only token):
//                #bulk-count ("3 selected", "all 1,234 matching selected"), button#bulk-all ("Select all
//                matching": the server's total for the filters), #bulk-cancel, #bulk-requeue, #bulk-discard
//                (their dead letters: POST /api/dlq/requeue|discard), #bulk-delete ("Delete finished"),
//                #bulk-clear; a first click asks in #bulk-ask (#bulk-question "Cancel 3 tasks?", #bulk-confirm,
//                #bulk-keep), Confirm POSTs /api/tasks/cancel or /api/tasks/delete with {"ids"} or {"filter"};
//                the outcome in #bulk-status (role=status, data-state busy/ok/error: "Cancelled 3 tasks;
//                skipped 0.").
//   Address      #/tasks?q=...&status=...&type=...&queue=... holds the filters, #/tasks/<id>?... the open
//                task too (written as they change, with history.replaceState; read at load and on
//                hashchange: a shared link opens the same view). #tasks, #queues... are the section links.
//   Details      dialog#task-details ([open] while shown; Escape, #task-details-close or a
//                backdrop click close it and focus returns to the opener), with
//                #task-details-title, #detail-short, #detail-message (loading/404/errors),
//                #detail-id, #detail-type, #detail-queue, #detail-status (span.badge), #detail-attempts,
//                #detail-worker (for a started task whose worker is in no list of live workers: "h:12 (gone:
//                no heartbeat since …)"), #detail-created, #detail-time (ticking), and, each with its <dt>
//                and hidden while unset: #detail-schedule (the schedule that fired it), #detail-trace (the
//                trace id of its traceparent), #detail-run-at (ticking while scheduled), #detail-cancelled-at,
//                #detail-cancelled-by ("api (from 127.0.0.1, operator token)"); #detail-cancel
//                (button.cancel-task "Cancel task", shown as on the task's row; its outcome shows in
//                #detail-message, data-state busy/ok/error),
//                #detail-progress-block > #detail-progress, #detail-payload (pretty JSON),
//                #detail-result-block > #detail-result, #detail-error-block > #detail-error,
//                #detail-traceback-block > #detail-traceback (its dead letter's traceback, while listed),
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
//                ok/error/busy/confirm), #dlq-empty, #dlq-more, #dlq-heading. button.edit-requeue ("Edit…")
//                opens dialog#dlq-edit: #dlq-edit-title, textarea#dlq-edit-payload (the letter's payload as
//                JSON), #dlq-edit-error (invalid JSON, or the server's 400: the letter stays), #dlq-edit-submit
//                (POSTs /api/dlq/<id>/requeue {"payload"}), #dlq-edit-cancel.
//                details#dlq-groups-box ("Grouped by error"; read while open, with each DLQ poll): table
//                #dlq-group-table, #dlq-group-rows > tr[data-fingerprint][data-count] with td.pattern (the
//                error with numbers, ids and quoted values masked; the example's error in its title),
//                td.count, td.types, td.last, td.actions holding button.show-group ("Show its letters": only
//                they stay shown in #dlq-rows, whose rows carry data-fingerprint; #dlq-shown says so; again:
//                all), button.requeue-group and
//                button.discard-group (a first click arms it: "Confirm discard of 12", with
//                button.discard-group-cancel), POSTing /api/dlq/requeue|discard {"fingerprint"};
//                #dlq-groups-empty, #dlq-groups-note.
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
import { chart, countdowns, details, DLQ_POLL, inView, page, pollers, QUEUES_POLL, rows, SCHEDULES_POLL, STATS_STALE, SUMMARY_EVERY, tasks, WORKERS_POLL } from './state.js';
import { $, setHidden, setText } from './ui.js';
import { api, getToken, initTokenDialog, tokenEl } from './api.js';
import { COL, initBulk, initFilters, renderCountdown, timeText } from './tasks.js';
import { detailsView, initDetails, renderDetailsTime } from './details.js';
import { drawChartSoon, initChart, requestChart, setStale, updateChartSummary } from './chart.js';
import { pollWorkers, tickWorkers } from './workers.js';
import { pollQueues } from './queues.js';
import { pollSchedules, tickSchedules } from './schedules.js';
import { initDlq, pollDlq, tickDlq } from './dlq.js';
import { initForms } from './forms.js';
import { connect, loadTasks } from './socket.js';

const tokenDialogOpen = () => { const d = tokenEl('dialog'); return !!(d && d.open); };

/**
 * Call `run` every `every` ms, one call at a time. Paused while the tab is hidden, while
 * the token prompt is open, and after a dismissed prompt (until a token is entered).
 */
function makePoller(name, every, run) {
  const p = { busy: false, again: false };
  const tick = async (forced) => {
    if (p.busy) { if (forced) p.again = true; return; }
    if (document.hidden || page.needToken || tokenDialogOpen()) return;
    p.busy = true;
    try { await run(); } catch (e) { /* each poller reports its own errors */ }
    p.busy = false;
    if (p.again) { p.again = false; tick(false); }
  };
  p.now = () => { if (page.pollingStarted) tick(true); };
  setInterval(() => tick(false), every); // an interval: one pending call at most, no drift
  pollers[name] = p;
  return p;
}

export function pollAllNow() {
  for (const p of Object.values(pollers)) p.now();
}

function startPolling() {
  if (page.pollingStarted) return;
  page.pollingStarted = true;
  makePoller('workers', WORKERS_POLL, pollWorkers);
  makePoller('dlq', DLQ_POLL, pollDlq);
  makePoller('queues', QUEUES_POLL, pollQueues);
  makePoller('schedules', SCHEDULES_POLL, pollSchedules);
  pollAllNow();
}

/** Once a second: ages, durations, uptimes and countdowns tick; the chart scrolls; staleness
 *  shows. The page's one clock: no row has a timer of its own. */
export function tick() {
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
  if (page.statsAt) {
    setStale(Date.now() - page.statsAt > STATS_STALE);
    requestChart();
  }
  if (Date.now() - chart.summaryAt >= SUMMARY_EVERY) updateChartSummary();
}
async function refreshAccess() {
  const token = getToken();
  if (token === page.accessToken) return;
  let res;
  try {
    res = await api('/api/access', { headers: { Accept: 'application/json' }, cache: 'no-store' });
  } catch (e) {
    return; // unreachable: the next poll asks again
  }
  if (!res.ok) return;
  let body = null;
  try { body = await res.json(); } catch (e) { return; }
  page.accessToken = getToken();
  const access = body && typeof body.access === 'string' ? body.access : 'open';
  document.body.dataset.access = access;
  setHidden($('readonly-note'), access !== 'read');
}

function init() {
  initTokenDialog();
  initForms();
  initFilters();
  initBulk();
  initDetails();
  initChart();
  initDlq();
  // Background polls start once the first call settled, so a server asking for a token
  // prompts once (for that call and the socket's probe) rather than for every poll.
  loadTasks().finally(() => { startPolling(); refreshAccess(); setInterval(refreshAccess, 2000); });
  connect();
  window.addEventListener('online', () => { if (!page.sock) connect(); pollAllNow(); });
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
