// The WebSocket of updates: connect, reconnect with backoff, catch up.

import { page, tasks, WS_MAX, WS_MIN } from './state.js';
import { $ } from './ui.js';
import { api, getToken } from './api.js';
import { mergeTask } from './tasks.js';
import { handleStats } from './chart.js';
import { pollAllNow } from './app.js';

/** Fetch the newest tasks (of one queue, if given) into the store. */
export async function loadTasks(queue = '') {
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

function setConn(state, text) {
  const el = $('conn');
  if (!el) return;
  el.dataset.state = state;
  el.textContent = text;
}

export function connect() {
  clearTimeout(page.reconnectTimer);
  page.reconnectTimer = 0;
  page.authBlocked = false;
  const token = getToken();
  const query = token ? `?token=${encodeURIComponent(token)}` : '';
  const url = `${location.protocol === 'https:' ? 'wss:' : 'ws:'}//${location.host}/ws${query}`;
  let s;
  try { s = new WebSocket(url); } catch (e) { scheduleReconnect(); return; }
  page.sock = s;
  let opened = false;
  s.addEventListener('open', () => {
    opened = true;
    page.openedAt = Date.now();
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
    if (page.sock !== s) return;
    page.sock = null;
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
  if (page.sock || page.reconnectTimer) return; // reconnected meanwhile (e.g. 'online', new token)
  if (res && res.status === 401) { // prompt dismissed: wait for a token before retrying
    page.authBlocked = true;
    setConn('auth', 'access token required');
    return;
  }
  if (res && getToken() !== usedToken) { page.backoff = WS_MIN; connect(); return; }
  scheduleReconnect();
}

function scheduleReconnect() {
  // Reset the backoff only if the last connection was stable; a server that accepts and
  // immediately drops us must not cause a tight reconnect loop.
  if (page.openedAt && Date.now() - page.openedAt > 5000) page.backoff = WS_MIN;
  page.openedAt = 0;
  setConn('reconnecting', 'reconnecting…');
  const delay = page.backoff * (0.75 + Math.random() * 0.25); // jitter spreads reconnect storms
  page.backoff = Math.min(page.backoff * 2, WS_MAX);
  page.reconnectTimer = setTimeout(connect, delay);
}
