// The submit forms, built from each task type's fields.

import { tasks } from './state.js';
import { $ } from './ui.js';
import { api } from './api.js';
import { mergeTask } from './tasks.js';

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

export function initForms() {
  for (const form of document.querySelectorAll('form.task-form[data-type]')) {
    form.addEventListener('submit', (ev) => { ev.preventDefault(); submitTask(form); });
    // Drop a server-reported field error as soon as the user edits that field.
    form.addEventListener('input', (ev) => clearFieldError(ev.target));
  }
}
