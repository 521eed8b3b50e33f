// A task's details dialog: its record, live updates and timeline.

import { CANCELLABLE, cancels, details, dlq, page, rows, tasks, TERMINAL, workers } from './state.js';
import { $, asText, badge, clockTime, clockTimeMs, fmtDur, fullTime, isTime, setData, setHidden, setText, shortId, showDialog, toNum } from './ui.js';
import { api } from './api.js';
import { cancelTask, countdownText, hasProgress, progressBar, retryText, timeText, writeRoute } from './tasks.js';

/** The best view of the open task: the fetched record and live updates, newest wins. */
export function detailsView() {
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

export function renderDetails() {
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
  setDetailRow('detail-schedule', v.schedule == null ? '' : String(v.schedule));
  setDetailRow('detail-trace', traceId(v.traceparent));
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
  const letter = [...dlq.rows.values()].find((e) => e.item && e.item.id === details.id);
  const traceback = letter && typeof letter.item.traceback === 'string' ? letter.item.traceback : '';
  setHidden($('detail-traceback-block'), !traceback);
  setText($('detail-traceback'), traceback);
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

/** Who runs (or ran) the task; for a started task whose worker is in no list of live workers any more (it died,
 *  or stopped), that it is gone: the task runs again once its message is redelivered. */
function workerText(v, status) {
  if (v.worker == null) return '—';
  const name = String(v.worker);
  if (status !== 'started' || !page.workersListedAt) return name;
  const w = workers.get(name);
  if (w && !w.goneAt) return name;
  const since = w && w.data && isTime(toNum(w.data.ts)) ? ` since ${fullTime(toNum(w.data.ts))}` : '';
  return `${name} (gone: no heartbeat${since}; the task runs again once its message is redelivered)`;
}

/** The trace id of a W3C traceparent ("00-<trace id>-<span id>-<flags>"), or ''. */
function traceId(traceparent) {
  const m = typeof traceparent === 'string' ? /^[0-9a-f]{2}-([0-9a-f]{32})-[0-9a-f]{16}-[0-9a-f]{2}$/.exec(traceparent) : null;
  return m ? m[1] : '';
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

export function renderDetailsTime(v) {
  let text = timeText(v) || '—';
  if (v.status === 'retrying' && v.next_attempt_at != null) {
    const left = toNum(v.next_attempt_at) - Date.now() / 1000;
    text += ` · next attempt at ${clockTime(v.next_attempt_at)}${left > 0 ? ` (in ${fmtDur(left)})` : ''}`;
  }
  setText($('detail-time'), text);
  setText($('detail-worker'), workerText(v, v.status == null ? 'unknown' : String(v.status))); // its worker may go
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

/** Show the details of task `id`; `opener` gets the focus back on close. */
export function openDetails(id, opener) {
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
  writeRoute();
  fetchDetails();
}

export function closeDetails() {
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
  writeRoute();
  let back = details.opener;
  details.opener = null;
  if (!back || !document.contains(back)) {
    // The row that opened it was re-rendered or dropped: its current button, if any.
    back = id ? document.querySelector(`#task-rows button[data-task-id="${CSS_escape(id)}"]`) : null;
  }
  if (back && back !== document.body && typeof back.focus === 'function') back.focus();
}

export function initDetails() {
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
