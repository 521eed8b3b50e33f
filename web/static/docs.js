// The API's OpenAPI document, rendered for people: each endpoint with its parameters, body and answers, then
// each task type's payload. The token (if the API has one) is the dashboard's, kept in sessionStorage.
const TOKEN_KEY = 'asyncnode.token';
const $ = (id) => document.getElementById(id);

let memToken = ''; // where sessionStorage is blocked

function token() {
  try { return sessionStorage.getItem(TOKEN_KEY) || memToken; } catch (e) { return memToken; }
}

function el(tag, text, cls) {
  const node = document.createElement(tag);
  if (text !== undefined) node.textContent = text;
  if (cls) node.className = cls;
  return node;
}

function resolve(doc, schema) {
  if (schema && schema.$ref) return resolve(doc, schema.$ref.split('/').slice(1).reduce((o, k) => o[k], doc));
  return schema || {};
}

function describe(doc, schema) {
  const s = resolve(doc, schema);
  if (s.oneOf) return s.oneOf.map((x) => describe(doc, x)).join(' | ');
  if (s.type === 'array') return `[${describe(doc, s.items)}]`;
  if (s.type === 'object' && s.properties) {
    const req = new Set(s.required || []);
    return `{${Object.keys(s.properties).map((k) => (req.has(k) ? k : `${k}?`)).join(', ')}}`;
  }
  if (s.const !== undefined) return JSON.stringify(s.const);
  if (s.enum) return s.enum.map((v) => JSON.stringify(v)).join(' | ');
  return Array.isArray(s.type) ? s.type.join(' | ') : (s.type || 'any');
}

function renderOperations(doc) {
  const root = $('docs-operations');
  root.replaceChildren(el('h2', 'Endpoints'));
  for (const [path, ops] of Object.entries(doc.paths)) {
    for (const [method, op] of Object.entries(ops)) {
      const item = el('article', undefined, 'docs-op');
      const head = el('h3');
      head.append(el('code', method.toUpperCase(), 'docs-method'), ' ', el('code', path, 'docs-path'));
      item.append(head, el('p', op.summary || ''));
      const list = el('ul');
      for (const p of op.parameters || []) {
        list.append(el('li', `${p.in} ${p.name}${p.required ? '' : '?'}: ${describe(doc, p.schema)}`));
      }
      const body = op.requestBody && op.requestBody.content['application/json'];
      if (body) list.append(el('li', `body: ${describe(doc, body.schema)}`));
      for (const [code, answer] of Object.entries(op.responses)) {
        const media = Object.entries(answer.content || {})[0];
        const shape = media ? ` ${media[0]} ${describe(doc, media[1].schema)}` : '';
        list.append(el('li', `${code} ${answer.description}${shape}`));
      }
      item.append(list);
      root.append(item);
    }
  }
}

function renderTypes(doc) {
  const root = $('docs-schemas');
  root.replaceChildren(el('h2', 'Task types'));
  for (const [name, schema] of Object.entries(doc.components.schemas)) {
    if (!name.startsWith('Submission_')) continue;
    const item = el('article', undefined, 'docs-type');
    item.append(el('h3', schema.properties.type.const), el('p', schema.description || ''));
    const fields = el('ul');
    const payload = schema.properties.payload;
    const required = new Set(payload.required || []);
    for (const [field, s] of Object.entries(payload.properties)) {
      const limits = ['minimum', 'maximum', 'maxLength'].filter((k) => s[k] !== undefined).map((k) => `${k} ${s[k]}`);
      const text = `${field}${required.has(field) ? '' : '?'}: ${s.type}${limits.length ? ` (${limits.join(', ')})` : ''}`;
      fields.append(el('li', s.description ? `${text} — ${s.description}` : text));
    }
    item.append(fields);
    root.append(item);
  }
}

async function load() {
  const headers = token() ? { Authorization: `Bearer ${token()}` } : {};
  const response = await fetch('/api/openapi.json', { headers });
  if (response.status === 401) {
    $('docs-status').textContent = 'A token is needed.';
    $('docs-token').hidden = false;
    $('docs-token-error').textContent = token() ? 'That token was refused.' : '';
    $('docs-token-input').focus();
    return;
  }
  if (!response.ok) {
    $('docs-status').textContent = `The document could not be read (HTTP ${response.status}).`;
    return;
  }
  const doc = await response.json();
  $('docs-token').hidden = true;
  $('docs-status').textContent = `${doc.info.title} ${doc.info.version}: OpenAPI ${doc.openapi}`;
  renderOperations(doc);
  renderTypes(doc);
}

$('docs-token').addEventListener('submit', (event) => {
  event.preventDefault();
  memToken = $('docs-token-input').value;
  try { sessionStorage.setItem(TOKEN_KEY, memToken); } catch (e) { /* blocked storage: memToken serves */ }
  load();
});

load();
