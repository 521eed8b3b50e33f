// The summary figures and the throughput chart, from the stats message.

import { chart, CHART_MIN_GAP, CHART_SPAN, dlq, DLQ_POLL, page } from './state.js';
import { $, clockTime, fmtCount, num, setData, setHidden, setText } from './ui.js';
import { applyWorkers } from './workers.js';
import { applyQueues } from './queues.js';

/** A per-second rate: "12" from 12.0, "0.5", "1.3k" beyond 10,000. */
export function fmtRate(v) {
  if (v === null || v === undefined) return '–';
  if (v >= 10000) return `${(v / 1000).toFixed(1)}k`;
  if (v >= 100) return String(Math.round(v));
  return String(Math.round(v * 10) / 10);
}

export function handleStats(st, msg) {
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
  page.statsAt = chart.lastRecv;

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
  if (wl) { page.workersViaStatsAt = Date.now(); applyWorkers(wl); }
  const ql = Array.isArray(st.queues) ? st.queues : null;
  if (ql) { page.queuesViaStatsAt = Date.now(); applyQueues(ql); }
  requestChart();
}

/** Whether GET /api/dlq answered lately: its total then feeds #stat-dlq, so that the
 *  figure always agrees with the table below (the stats' count is the fallback). */
const dlqFresh = () => Date.now() - page.dlqPolledAt < 3 * DLQ_POLL + 1000;

export function setDlqFigure(n) {
  setText($('stat-dlq'), fmtCount(n));
  const fig = $('fig-dlq');
  setData(fig, 'alert', String(n > 0));
  const nav = $('nav-dlq');
  if (nav) { setText(nav, fmtCount(n)); setHidden(nav, !(n > 0)); }
}

export function setStale(stale) {
  const el = $('summary');
  if (el && el.dataset.stale !== String(stale)) {
    el.dataset.stale = String(stale);
    el.title = stale ? 'No live figures at the moment' : '';
  }
}

/** Redraw soon, but at most once per CHART_MIN_GAP for data-driven redraws. */
export function requestChart() {
  if (chart.timer) return;
  const wait = Math.max(0, chart.lastDraw + CHART_MIN_GAP - Date.now());
  chart.timer = setTimeout(() => {
    chart.timer = 0;
    if (document.hidden) return; // redrawn on visibilitychange
    drawChartSoon();
  }, wait);
}

/** Redraw on the next frame (resizes, hover). */
export function drawChartSoon() {
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
export function updateChartSummary() {
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

export function initChart() {
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
