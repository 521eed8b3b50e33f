// The server: api() (every /api/* call, with the access token and its dialog) and callAction().

import { page, TOKEN_KEY, tokenPrompt } from './state.js';
import { $ } from './ui.js';
import { connect, loadTasks } from './socket.js';
import { pollAllNow } from './app.js';

export async function callAction(path, method, json = undefined) {
  let res;
  const options = { method, headers: { Accept: 'application/json' } };
  if (json !== undefined) {
    options.headers['Content-Type'] = 'application/json';
    options.body = JSON.stringify(json);
  }
  try {
    res = await api(path, options);
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

/** The access token known for this session, or '' if none. */
export function getToken() {
  if (page.storageOk) {
    try { return sessionStorage.getItem(TOKEN_KEY) || ''; } catch (e) { page.storageOk = false; }
  }
  return page.memToken;
}

function setToken(token) {
  page.memToken = token;
  if (!page.storageOk) return;
  try {
    if (token) sessionStorage.setItem(TOKEN_KEY, token);
    else sessionStorage.removeItem(TOKEN_KEY);
  } catch (e) { page.storageOk = false; }
}

export const tokenEl = (name) => document.getElementById(`token-${name}`);

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
  page.needToken = false;
  setTokenError('');
  tokenPrompt.checking = value; // the next answer to a call made with it decides
  const waiters = tokenPrompt.waiters.splice(0);
  for (const resolve of waiters) resolve(value); // each waiting call retries with it
  if (!waiters.length) verifyToken(); // nothing to retry: check the token ourselves
  if (page.authBlocked && !page.sock) connect();
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

export function initTokenDialog() {
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
export async function api(path, options = {}) {
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
    if (next === null) { page.needToken = true; return res; } // dismissed: the caller sees the 401
    token = next;
  }
}
