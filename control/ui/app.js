// The Skiff dashboard: a client of the cluster's own API, served at /ui/.
// Every call carries the logged-in user's token, so RBAC decides what
// each page may read and each button may do. Pages list what they show,
// then follow a watch from the list's resourceVersion and change only the
// rows an event names.
'use strict';

const TOKEN_KEY = 'skiff.token';
const NS_KEY = 'skiff.namespace';
const SVG = 'http://www.w3.org/2000/svg';

// ---- small helpers -------------------------------------------------------

function h(tag, attrs, ...children) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === undefined || v === null || v === false) continue;
    if (k.startsWith('on')) el.addEventListener(k.slice(2), v);
    else if (k === 'class') el.className = v;
    else if (k === 'text') el.textContent = v;
    else el.setAttribute(k, v === true ? '' : v);
  }
  for (const c of children.flat()) {
    if (c === undefined || c === null || c === false) continue;
    el.append(c instanceof Node ? c : String(c));
  }
  return el;
}

const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

function age(ts) {
  if (!ts) return '';
  let s = Math.max(0, Math.floor((Date.now() - Date.parse(ts)) / 1000));
  if (s < 120) return s + 's';
  let m = Math.floor(s / 60);
  if (m < 60) return m + 'm';
  const hrs = Math.floor(m / 60);
  m %= 60;
  if (hrs < 24) return m ? `${hrs}h${m}m` : hrs + 'h';
  return Math.floor(hrs / 24) + 'd';
}

// A cell showing the age of `ts`, kept current by the clock below.
function ageCell(ts) {
  return h('td', { class: 'age', 'data-ts': ts || '' }, age(ts));
}

setInterval(() => {
  for (const td of document.querySelectorAll('.age')) {
    td.textContent = age(td.dataset.ts);
  }
}, 5000);

// Quantities as the metrics API writes them: CPU in cores, memory in bytes.
const SUFFIX = {
  n: 1e-9, u: 1e-6, m: 1e-3, '': 1, k: 1e3, M: 1e6, G: 1e9, T: 1e12,
  Ki: 1024, Mi: 1024 ** 2, Gi: 1024 ** 3, Ti: 1024 ** 4,
};

function quantity(q) {
  if (q === undefined || q === null) return NaN;
  const m = /^([0-9.eE+-]+?)(n|u|m|k|M|G|T|Ki|Mi|Gi|Ti)?$/.exec(String(q));
  return m ? parseFloat(m[1]) * SUFFIX[m[2] || ''] : NaN;
}

function cores(c) {
  if (!isFinite(c)) return '';
  return c < 1 ? Math.round(c * 1000) + 'm' : c.toFixed(2);
}

function bytes(b) {
  if (!isFinite(b)) return '';
  const units = ['B', 'Ki', 'Mi', 'Gi', 'Ti'];
  let i = 0;
  while (b >= 1024 && i < units.length - 1) { b /= 1024; i++; }
  return (b < 10 && i ? b.toFixed(1) : Math.round(b)) + units[i];
}

// ---- the API -------------------------------------------------------------

const KINDS = {
  nodes: { group: '', version: 'v1', namespaced: false },
  namespaces: { group: '', version: 'v1', namespaced: false },
  pods: { group: '', version: 'v1', namespaced: true },
  services: { group: '', version: 'v1', namespaced: true },
  events: { group: '', version: 'v1', namespaced: true },
  deployments: { group: 'apps', version: 'v1', namespaced: true },
  statefulsets: { group: 'apps', version: 'v1', namespaced: true },
  daemonsets: { group: 'apps', version: 'v1', namespaced: true },
  jobs: { group: 'batch', version: 'v1', namespaced: true },
  endpointslices: { group: 'discovery.k8s.io', version: 'v1', namespaced: true },
  'metrics/nodes': { group: 'metrics.k8s.io', version: 'v1beta1', namespaced: false, plural: 'nodes' },
  'metrics/pods': { group: 'metrics.k8s.io', version: 'v1beta1', namespaced: true, plural: 'pods' },
};

function apiPath(kind, ns, name, sub) {
  const k = KINDS[kind];
  let p = k.group ? `/apis/${k.group}/${k.version}` : `/api/${k.version}`;
  if (k.namespaced && ns) p += `/namespaces/${encodeURIComponent(ns)}`;
  p += '/' + (k.plural || kind);
  if (name) p += '/' + encodeURIComponent(name);
  if (sub) p += '/' + sub;
  return p;
}

class ApiError extends Error {
  constructor(code, status) {
    super((status && status.message) || `HTTP ${code}`);
    this.code = code;
    this.reason = (status && status.reason) || '';
  }
}

function authHeaders(extra) {
  return Object.assign(
    { Authorization: 'Bearer ' + sessionStorage.getItem(TOKEN_KEY), Accept: 'application/json' },
    extra || {},
  );
}

async function failure(res) {
  const text = await res.text();
  let status;
  try { status = JSON.parse(text); } catch { status = { message: text.trim() } }
  if (res.status === 401) showLogin('The token was not accepted (401 Unauthorized).');
  return new ApiError(res.status, status);
}

// A request that got no answer at all (the connection dropped) is sent
// once more: what the page sends (gets, merge patches of set values,
// deletes) means the same when sent twice.
async function api(method, path, body, contentType, signal) {
  const headers = authHeaders(body === undefined ? {} : { 'Content-Type': contentType || 'application/json' });
  const send = () => fetch(path, {
    method, headers, signal, body: body === undefined ? undefined : JSON.stringify(body),
  });
  let res;
  try {
    res = await send();
  } catch (e) {
    if (signal && signal.aborted) throw e;
    await sleep(300);
    res = await send();
  }
  if (!res.ok) throw await failure(res);
  return res.status === 204 ? {} : res.json();
}

// Reads `res`'s body line by line.
async function* lines(res) {
  const reader = res.body.pipeThrough(new TextDecoderStream()).getReader();
  let buf = '';
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buf += value;
    let i;
    while ((i = buf.indexOf('\n')) >= 0) {
      yield buf.slice(0, i);
      buf = buf.slice(i + 1);
    }
  }
  if (buf) yield buf;
}

const keyOf = (o) => (o.metadata.namespace ? o.metadata.namespace + '/' : '') + o.metadata.name;

// A list, then a watch from its resourceVersion, kept in `items`. `on`
// gets ('reset') after each list and (type, object) for each event. A
// watch that ends is resumed where it stopped; one that is too old (410)
// lists again; errors back off and retry until stop().
class Informer {
  constructor(kind, ns, query, on) {
    this.kind = kind;
    this.ns = ns;
    this.query = query || {};
    this.on = on;
    this.items = new Map();
    this.ctrl = new AbortController();
    this.run();
  }

  stop() { this.ctrl.abort(); }

  url(extra) {
    const q = new URLSearchParams(Object.assign({}, this.query, extra));
    return apiPath(this.kind, this.ns) + '?' + q;
  }

  async run() {
    let backoff = 500;
    while (!this.ctrl.signal.aborted) {
      try {
        const list = await api('GET', this.url(), undefined, undefined, this.ctrl.signal);
        this.items = new Map((list.items || []).map((o) => [keyOf(o), o]));
        this.on('reset');
        await this.watch(list.metadata.resourceVersion);
        backoff = 500;
      } catch (e) {
        if (this.ctrl.signal.aborted) return;
        this.on('error', e);
        if (e.code === 401 || e.code === 403 || e.code === 404) return;
        await sleep(backoff);
        backoff = Math.min(backoff * 2, 10000);
      }
    }
  }

  async watch(rv) {
    while (!this.ctrl.signal.aborted) {
      const res = await fetch(this.url({
        watch: '1', resourceVersion: rv, allowWatchBookmarks: 'true', timeoutSeconds: '600',
      }), { headers: authHeaders(), signal: this.ctrl.signal });
      if (!res.ok) throw await failure(res);
      for await (const line of lines(res)) {
        if (!line.trim()) continue;
        const ev = JSON.parse(line);
        if (ev.type === 'ERROR') {
          if (ev.object && ev.object.code === 410) return; // list again
          throw new ApiError(ev.object && ev.object.code, ev.object);
        }
        rv = ev.object.metadata.resourceVersion;
        if (ev.type === 'BOOKMARK') continue;
        const key = keyOf(ev.object);
        if (ev.type === 'DELETED') this.items.delete(key);
        else this.items.set(key, ev.object);
        this.on(ev.type, ev.object);
      }
    }
  }
}

// A log line's RFC 3339 time with its fraction padded to nanoseconds, so
// that times compare as strings.
function logTime(t) {
  const m = /^(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)(?:\.(\d{1,9}))?Z$/.exec(t);
  return m ? `${m[1]}.${(m[2] || '').padEnd(9, '0')}Z` : '';
}

// ---- tables that change row by row ---------------------------------------

// A table of objects kept in order by `sortKey`. set() and remove() touch
// one row; reset() rebuilds them all.
class Table {
  constructor(id, headers, row, opts) {
    this.row = row;
    this.match = ''; // rows whose key does not contain it are hidden
    this.sortKey = (opts && opts.sortKey) || keyOf;
    this.desc = !!(opts && opts.desc);
    this.keys = []; // [sortKey, key], in display order
    this.rows = new Map();
    this.body = h('tbody');
    this.empty = h('p', { class: 'empty' }, (opts && opts.empty) || 'None.');
    this.el = h('section', { class: 'table', id },
      h('table', { 'data-state': 'loading' }, h('thead', {}, h('tr', {}, headers.map((t) => h('th', {}, t)))), this.body),
      this.empty);
  }

  state(s, message) {
    this.el.querySelector('table').dataset.state = s;
    this.empty.textContent = message || (this.rows.size ? '' : 'None.');
    this.empty.className = s === 'error' ? 'empty failed' : 'empty';
    this.empty.hidden = s === 'live' && this.rows.size > 0;
  }

  position(sk, key) {
    let lo = 0;
    let hi = this.keys.length;
    while (lo < hi) {
      const mid = (lo + hi) >> 1;
      const [msk, mkey] = this.keys[mid];
      const before = this.desc ? (msk > sk || (msk === sk && mkey < key)) : (msk < sk || (msk === sk && mkey < key));
      if (before) lo = mid + 1; else hi = mid;
    }
    return lo;
  }

  build(obj, key) {
    const tr = this.row(obj);
    tr.dataset.key = key;
    tr.hidden = !!this.match && !key.includes(this.match);
    return tr;
  }

  // Shows only the rows whose namespace/name contains `text`.
  filter(text) {
    this.match = text;
    for (const [key, r] of this.rows) r.tr.hidden = !!text && !key.includes(text);
  }

  // A box that filters this table as the user types.
  filterBox() {
    return h('input', {
      type: 'search', class: 'filter', placeholder: 'Filter by name', 'aria-label': 'Filter by name',
      oninput: (ev) => this.filter(ev.target.value.trim()),
    });
  }

  // Puts `tr` in the place of `old`, keeping what the user is typing
  // there (a replicas box, say) when an update redraws the row.
  static swap(old, tr) {
    const a = document.activeElement;
    const typing = a && a.tagName === 'INPUT' && old.contains(a) ? a : null;
    old.replaceWith(tr);
    if (!typing) return;
    const twin = typing.className && tr.querySelector('input.' + typing.className.split(' ').join('.'));
    if (twin) { twin.value = typing.value; twin.focus(); }
  }

  set(obj) {
    const key = keyOf(obj);
    const sk = this.sortKey(obj);
    const old = this.rows.get(key);
    const tr = this.build(obj, key);
    if (old && old.sk === sk) {
      Table.swap(old.tr, tr);
    } else {
      if (old) this.unlink(key, old);
      const i = this.position(sk, key);
      this.keys.splice(i, 0, [sk, key]);
      const next = i + 1 < this.keys.length ? this.rows.get(this.keys[i + 1][1]).tr : null;
      this.body.insertBefore(tr, next);
    }
    this.rows.set(key, { tr, sk });
    this.empty.hidden = true;
  }

  unlink(key, old) {
    const i = this.position(old.sk, key);
    if (this.keys[i] && this.keys[i][1] === key) this.keys.splice(i, 1);
    old.tr.remove();
    this.rows.delete(key);
  }

  remove(obj) {
    const key = keyOf(obj);
    const old = this.rows.get(key);
    if (old) this.unlink(key, old);
    this.empty.hidden = this.rows.size > 0;
  }

  // Rebuilds the row of `key` from `obj` (when what it shows beside the
  // object changed, such as usage).
  refreshWith(obj, key) {
    const r = this.rows.get(key);
    if (!r || !obj) return;
    const tr = this.build(obj, key);
    Table.swap(r.tr, tr);
    r.tr = tr;
  }

  reset(items) {
    const all = [...items].map((o) => [this.sortKey(o), keyOf(o), o]);
    all.sort((a, b) => {
      const c = a[0] < b[0] ? -1 : a[0] > b[0] ? 1 : a[1] < b[1] ? -1 : a[1] > b[1] ? 1 : 0;
      return this.desc && a[0] !== b[0] ? -c : c;
    });
    this.keys = all.map(([sk, key]) => [sk, key]);
    this.rows = new Map();
    const frag = document.createDocumentFragment();
    for (const [sk, key, o] of all) {
      const tr = this.build(o, key);
      this.rows.set(key, { tr, sk });
      frag.append(tr);
    }
    this.body.replaceChildren(frag);
    this.state('live');
    // For whoever measures the page (the benchmark does): when a list
    // was first on it.
    performance.mark('skiff:list:' + this.el.id);
  }

  // Keeps the table in step with `informer`'s events.
  follow(informer, type, obj) {
    if (type === 'reset') this.reset(informer.items.values());
    else if (type === 'error' && !(obj instanceof ApiError)) this.state('retrying', 'Connection lost; reconnecting…');
    else if (type === 'error') this.state('error', informer.kind + ': ' + obj.message);
    else if (type === 'DELETED') this.remove(obj);
    else this.set(obj);
  }
}

// ---- charts --------------------------------------------------------------

// Samples of the metrics API, per node and per pod, taken while the app
// is open (the API serves only the latest value).
const history = new Map();
const HISTORY = 60;

function record(key, cpu, mem) {
  let s = history.get(key);
  if (!s) history.set(key, (s = []));
  s.push({ t: Date.now(), cpu, mem });
  if (s.length > HISTORY) s.shift();
}

function sparkline(values, max, w, hgt, cls) {
  const svg = document.createElementNS(SVG, 'svg');
  svg.setAttribute('viewBox', `0 0 ${w} ${hgt}`);
  svg.setAttribute('width', w);
  svg.setAttribute('height', hgt);
  svg.setAttribute('class', 'chart ' + (cls || ''));
  const top = Math.max(max || 0, ...values, 1e-9);
  const n = Math.max(values.length - 1, 1);
  const pts = values.map((v, i) => `${((i / n) * (w - 2) + 1).toFixed(1)},${(hgt - 1 - (v / top) * (hgt - 2)).toFixed(1)}`);
  const line = document.createElementNS(SVG, 'polyline');
  line.setAttribute('points', pts.join(' '));
  svg.append(line);
  return svg;
}

// A usage cell: the latest value as text, and its history as a line.
function usageCell(key, field, fmt, max) {
  const s = history.get(key) || [];
  const vals = s.map((x) => x[field]);
  const last = vals.length ? vals[vals.length - 1] : NaN;
  const td = h('td', { class: 'usage ' + field }, h('span', {}, isFinite(last) ? fmt(last) : '–'));
  if (max) td.append(h('small', {}, ` / ${fmt(max)}`));
  if (vals.length > 1) td.append(sparkline(vals, max, 80, 20, field));
  return td;
}

// Samples `kind` ('metrics/nodes' or 'metrics/pods') every 15 s while
// the page is shown, then calls `after`.
class Sampler {
  constructor(kind, ns, after) {
    this.alive = true;
    this.loop(kind, ns, after);
  }

  stop() { this.alive = false; }

  async loop(kind, ns, after) {
    while (this.alive) {
      try {
        const list = await api('GET', apiPath(kind, ns));
        for (const m of list.items || []) {
          let cpu = 0;
          let mem = 0;
          for (const u of m.containers ? m.containers.map((c) => c.usage) : [m.usage]) {
            cpu += quantity(u.cpu);
            mem += quantity(u.memory);
          }
          record(kind + ':' + keyOf(m), cpu, mem);
        }
        if (this.alive) after(null);
        // Nothing scraped yet (a new node or pod): look again soon.
        await sleep((list.items || []).length ? 15000 : 3000);
      } catch (e) {
        if (this.alive) after(e);
        await sleep(15000);
      }
    }
  }
}

// ---- errors and writes ---------------------------------------------------

function showError(message) {
  $('#error-text').textContent = message;
  $('#error').hidden = false;
}

function clearError() {
  $('#error').hidden = true;
  $('#error-text').textContent = '';
}

// Runs a write; its failure (a 403 from RBAC, say) shows in the banner.
async function act(what, f) {
  clearError();
  try {
    await f();
  } catch (e) {
    showError(`${what} failed: ${e.message}`);
    return false;
  }
  return true;
}

const MERGE = 'application/merge-patch+json';

function scale(kind, o, replicas) {
  return act(`Scaling ${o.metadata.name}`, () => api('PATCH',
    apiPath(kind, o.metadata.namespace, o.metadata.name, 'scale'), { spec: { replicas } }, MERGE));
}

function restart(kind, o) {
  const annotations = { 'kubectl.kubernetes.io/restartedAt': new Date().toISOString() };
  return act(`Restarting ${o.metadata.name}`, () => api('PATCH',
    apiPath(kind, o.metadata.namespace, o.metadata.name),
    { spec: { template: { metadata: { annotations } } } }, MERGE));
}

function deletePod(o) {
  return act(`Deleting ${o.metadata.name}`, () => api('DELETE', apiPath('pods', o.metadata.namespace, o.metadata.name)));
}

// A button that asks once more before it acts.
function confirmButton(label, confirmLabel, f) {
  let armed = null;
  const b = h('button', { type: 'button', class: 'danger', 'data-action': label.toLowerCase() }, label);
  b.addEventListener('click', () => {
    if (!armed) {
      b.textContent = confirmLabel;
      b.classList.add('armed');
      armed = setTimeout(() => { armed = null; b.textContent = label; b.classList.remove('armed'); }, 5000);
      return;
    }
    clearTimeout(armed);
    armed = null;
    b.disabled = true;
    f().finally(() => { b.disabled = false; b.textContent = label; b.classList.remove('armed'); });
  });
  return b;
}

// ---- YAML, as kubectl prints it -----------------------------------------

function yamlScalar(v) {
  if (v === null || v === undefined) return 'null';
  if (Array.isArray(v)) return '[]';
  if (typeof v === 'object') return '{}';
  if (typeof v !== 'string') return String(v);
  const plain = /^[A-Za-z0-9_/.][A-Za-z0-9 _./=+-]*$/.test(v) && !/ $/.test(v)
    && !/^(true|false|null|yes|no|on|off|y|n|~|[-+]?[0-9][0-9_.:eE+-]*|\.inf|\.nan)$/i.test(v);
  return plain ? v : JSON.stringify(v);
}

const yamlKey = (k) => (/^[A-Za-z0-9_./-]+$/.test(k) ? k : JSON.stringify(k));
const complex = (v) => v !== null && typeof v === 'object' && Object.keys(v).length > 0;

function yamlLines(v, ind, out) {
  if (Array.isArray(v)) {
    for (const x of v) {
      if (complex(x) && !Array.isArray(x)) {
        const sub = [];
        yamlLines(x, ind + '  ', sub);
        sub[0] = ind + '- ' + sub[0].slice(ind.length + 2);
        out.push(...sub);
      } else if (complex(x)) {
        out.push(ind + '-');
        yamlLines(x, ind + '  ', out);
      } else {
        out.push(ind + '- ' + yamlScalar(x));
      }
    }
    return;
  }
  for (const [k, x] of Object.entries(v)) {
    if (complex(x)) {
      out.push(ind + yamlKey(k) + ':');
      yamlLines(x, Array.isArray(x) ? ind : ind + '  ', out);
    } else {
      out.push(ind + yamlKey(k) + ': ' + yamlScalar(x));
    }
  }
}

function toYaml(obj) {
  const out = [];
  yamlLines(obj, '', out);
  return out.join('\n') + '\n';
}

// ---- status texts, as kubectl shows them ---------------------------------

function podStatus(p) {
  if (p.metadata.deletionTimestamp) return 'Terminating';
  let reason = (p.status && (p.status.reason || p.status.phase)) || 'Pending';
  const inits = (p.status && p.status.initContainerStatuses) || [];
  for (const [i, c] of inits.entries()) {
    const st = c.state || {};
    if (st.terminated && st.terminated.exitCode === 0) continue;
    if (st.terminated) return 'Init:' + (st.terminated.reason || 'Error');
    if (st.waiting && st.waiting.reason && st.waiting.reason !== 'PodInitializing') return 'Init:' + st.waiting.reason;
    return `Init:${i}/${inits.length}`;
  }
  for (const c of (p.status && p.status.containerStatuses) || []) {
    const st = c.state || {};
    if (st.waiting && st.waiting.reason) reason = st.waiting.reason;
    else if (st.terminated) reason = st.terminated.reason || 'Error';
  }
  return reason;
}

function podReady(p) {
  const cs = (p.status && p.status.containerStatuses) || [];
  const total = (p.spec.containers || []).length;
  return `${cs.filter((c) => c.ready).length}/${total}`;
}

const podRestarts = (p) => ((p.status && p.status.containerStatuses) || []).reduce((n, c) => n + (c.restartCount || 0), 0);

function condition(o, type) {
  return ((o.status && o.status.conditions) || []).find((c) => c.type === type);
}

function deploymentRollout(d) {
  const s = d.status || {};
  const want = d.spec.replicas === undefined ? 1 : d.spec.replicas;
  if (d.spec.paused) return 'paused';
  if ((s.observedGeneration || 0) < (d.metadata.generation || 0)) return 'waiting for the controller';
  const prog = condition(d, 'Progressing');
  if (prog && prog.reason === 'ProgressDeadlineExceeded') return 'failed: progress deadline exceeded';
  const updated = s.updatedReplicas || 0;
  if (updated < want) return `${updated} of ${want} updated`;
  if ((s.replicas || 0) > updated) return `${s.replicas - updated} old pending termination`;
  if ((s.availableReplicas || 0) < updated) return `${s.availableReplicas || 0} of ${updated} available`;
  return 'complete';
}

function statefulSetRollout(s) {
  const st = s.status || {};
  const want = s.spec.replicas === undefined ? 1 : s.spec.replicas;
  if ((st.observedGeneration || 0) < (s.metadata.generation || 0)) return 'waiting for the controller';
  if ((st.updatedReplicas || 0) < want && st.updateRevision !== st.currentRevision) return `${st.updatedReplicas || 0} of ${want} updated`;
  if ((st.readyReplicas || 0) < want) return `${st.readyReplicas || 0} of ${want} ready`;
  return 'complete';
}

function daemonSetRollout(d) {
  const s = d.status || {};
  if ((s.observedGeneration || 0) < (d.metadata.generation || 0)) return 'waiting for the controller';
  const want = s.desiredNumberScheduled || 0;
  if ((s.updatedNumberScheduled || 0) < want) return `${s.updatedNumberScheduled || 0} of ${want} updated`;
  if ((s.numberAvailable || 0) < want) return `${s.numberAvailable || 0} of ${want} available`;
  return 'complete';
}

function jobStatus(j) {
  if (condition(j, 'Complete') && condition(j, 'Complete').status === 'True') return 'Complete';
  const failed = condition(j, 'Failed');
  if (failed && failed.status === 'True') return 'Failed: ' + (failed.reason || '');
  if (j.spec.suspend) return 'Suspended';
  return 'Running';
}

function selectorText(sel) {
  return Object.entries((sel && sel.matchLabels) || {}).map(([k, v]) => `${k}=${v}`).join(',');
}

// ---- views ---------------------------------------------------------------

let current = null; // the shown view's stop()
const namespace = () => sessionStorage.getItem(NS_KEY) || '';

function nameCell(o, href) {
  const td = h('td', { class: 'name' });
  if (o.metadata.namespace && !namespace()) td.append(h('span', { class: 'ns-tag' }, o.metadata.namespace + '/'));
  td.append(href ? h('a', { href }, o.metadata.name) : o.metadata.name);
  return td;
}

function podHref(ns, name) {
  return `#/pod/${encodeURIComponent(ns)}/${encodeURIComponent(name)}`;
}

function view(title, ...sections) {
  $('#main').replaceChildren(h('h1', {}, title), ...sections);
}

function nodesView() {
  const table = new Table('nodes', ['Name', 'Status', 'Conditions', 'Roles', 'Version', 'Internal IP', 'Pod CIDR', 'CPU', 'Memory', 'Age'], (n) => {
    const ready = condition(n, 'Ready');
    let status = ready ? (ready.status === 'True' ? 'Ready' : 'NotReady') : 'Unknown';
    if (n.spec.unschedulable) status += ',SchedulingDisabled';
    const pressures = ((n.status && n.status.conditions) || []).filter((c) => c.type !== 'Ready' && c.status === 'True').map((c) => c.type);
    const roles = Object.keys(n.metadata.labels || {}).filter((l) => l.startsWith('node-role.kubernetes.io/')).map((l) => l.split('/')[1]);
    const addr = ((n.status && n.status.addresses) || []).find((a) => a.type === 'InternalIP');
    const alloc = (n.status && n.status.allocatable) || {};
    const key = 'metrics/nodes:' + n.metadata.name;
    return h('tr', {},
      nameCell(n),
      h('td', { class: 'status ' + (status.startsWith('Ready') ? 'ok' : 'bad') }, status),
      h('td', { class: 'conditions' }, pressures.join(', ') || 'none'),
      h('td', {}, roles.join(',') || '<none>'),
      h('td', {}, (n.status && n.status.nodeInfo && n.status.nodeInfo.kubeletVersion) || ''),
      h('td', {}, addr ? addr.address : ''),
      h('td', {}, n.spec.podCIDR || ''),
      usageCell(key, 'cpu', cores, quantity(alloc.cpu)),
      usageCell(key, 'mem', bytes, quantity(alloc.memory)),
      ageCell(n.metadata.creationTimestamp));
  });
  const inf = new Informer('nodes', '', {}, (t, o) => table.follow(inf, t, o));
  const note = h('p', { class: 'note', id: 'metrics-note' }, 'Usage from the metrics API, sampled every 15 s while this page is open.');
  const sampler = new Sampler('metrics/nodes', '', (e) => {
    if (e) note.textContent = 'Usage unavailable: ' + e.message;
    for (const key of table.rows.keys()) table.refreshWith(inf.items.get(key), key);
  });
  view('Nodes', table.el, note);
  return () => { inf.stop(); sampler.stop(); };
}

function scaleForm(kind, o) {
  const input = h('input', { type: 'number', min: '0', class: 'replicas', value: String(o.spec.replicas === undefined ? 1 : o.spec.replicas), 'aria-label': 'Replicas' });
  const form = h('form', { class: 'scale' }, input, h('button', { type: 'submit', 'data-action': 'scale' }, 'Scale'));
  form.addEventListener('submit', (ev) => {
    ev.preventDefault();
    const n = Number(input.value);
    if (!Number.isInteger(n) || n < 0) { showError('Replicas must be a whole number, 0 or more.'); return; }
    scale(kind, o, n);
  });
  return form;
}

function restartButton(kind, o) {
  return h('button', { type: 'button', 'data-action': 'restart', onclick: () => restart(kind, o) }, 'Restart');
}

function podsOf(kind, o) {
  const q = new URLSearchParams({ selector: selectorText(o.spec.selector), owner: `${kind}/${o.metadata.name}` });
  if (o.metadata.namespace) q.set('ns', o.metadata.namespace);
  return '#/pods?' + q;
}

const SCALABLE = ['deployments', 'statefulsets'];
const RESTARTABLE = ['deployments', 'statefulsets', 'daemonsets'];

function readyOf(kind, o) {
  const s = o.status || {};
  const want = o.spec.replicas === undefined ? 1 : o.spec.replicas;
  if (kind === 'daemonsets') return `${s.numberReady || 0}/${s.desiredNumberScheduled || 0} ready`;
  if (kind === 'jobs') return jobStatus(o);
  return `${s.readyReplicas || 0}/${want} ready`;
}

// The bar above a workload's pods: its readiness, live, and its actions.
// The form is made once, so an update does not undo what is being typed.
function ownerBar(kind, ns, name) {
  const bar = h('div', { class: 'bar owner', id: 'owner' }, `${kind.replace(/s$/, '')} ${name}`);
  const ready = h('span', { class: 'ready' });
  let form = null;
  const inf = new Informer(kind, ns, { fieldSelector: 'metadata.name=' + name }, (t, o) => {
    if (t === 'error') { bar.replaceChildren(h('span', { class: 'failed' }, o.message)); return; }
    const w = inf.items.get(ns + '/' + name);
    if (!w) { bar.replaceChildren(`${kind.replace(/s$/, '')} ${name} no longer exists.`); return; }
    ready.textContent = readyOf(kind, w);
    if (!form) {
      form = SCALABLE.includes(kind) ? scaleForm(kind, w) : '';
      bar.append(' ', ready, ' ', form, RESTARTABLE.includes(kind) ? restartButton(kind, w) : '');
    } else if (form) {
      const input = form.querySelector('input');
      if (document.activeElement !== input) input.value = String(w.spec.replicas === undefined ? 1 : w.spec.replicas);
    }
  });
  return [bar, () => inf.stop()];
}

function workloadsView() {
  const ns = namespace();
  const tables = [
    ['deployments', 'Deployments', ['Name', 'Ready', 'Up-to-date', 'Available', 'Rollout', 'Age', 'Actions'], (d) => {
      const s = d.status || {};
      const want = d.spec.replicas === undefined ? 1 : d.spec.replicas;
      return h('tr', {}, nameCell(d, podsOf('deployments', d)),
        h('td', { class: 'ready' }, `${s.readyReplicas || 0}/${want}`),
        h('td', {}, s.updatedReplicas || 0), h('td', {}, s.availableReplicas || 0),
        h('td', { class: 'rollout' }, deploymentRollout(d)), ageCell(d.metadata.creationTimestamp),
        h('td', { class: 'actions' }, scaleForm('deployments', d), restartButton('deployments', d)));
    }],
    ['statefulsets', 'StatefulSets', ['Name', 'Ready', 'Updated', 'Rollout', 'Age', 'Actions'], (s) => {
      const st = s.status || {};
      const want = s.spec.replicas === undefined ? 1 : s.spec.replicas;
      return h('tr', {}, nameCell(s, podsOf('statefulsets', s)),
        h('td', { class: 'ready' }, `${st.readyReplicas || 0}/${want}`), h('td', {}, st.updatedReplicas || 0),
        h('td', { class: 'rollout' }, statefulSetRollout(s)), ageCell(s.metadata.creationTimestamp),
        h('td', { class: 'actions' }, scaleForm('statefulsets', s), restartButton('statefulsets', s)));
    }],
    ['daemonsets', 'DaemonSets', ['Name', 'Desired', 'Current', 'Ready', 'Up-to-date', 'Available', 'Rollout', 'Age', 'Actions'], (d) => {
      const s = d.status || {};
      return h('tr', {}, nameCell(d, podsOf('daemonsets', d)),
        h('td', {}, s.desiredNumberScheduled || 0), h('td', {}, s.currentNumberScheduled || 0),
        h('td', { class: 'ready' }, s.numberReady || 0), h('td', {}, s.updatedNumberScheduled || 0),
        h('td', {}, s.numberAvailable || 0), h('td', { class: 'rollout' }, daemonSetRollout(d)),
        ageCell(d.metadata.creationTimestamp), h('td', { class: 'actions' }, restartButton('daemonsets', d)));
    }],
    ['jobs', 'Jobs', ['Name', 'Completions', 'Active', 'Failed', 'Status', 'Age'], (j) => {
      const s = j.status || {};
      const want = j.spec.completions === undefined ? 1 : j.spec.completions;
      return h('tr', {}, nameCell(j, podsOf('jobs', j)),
        h('td', {}, `${s.succeeded || 0}/${want}`), h('td', {}, s.active || 0), h('td', {}, s.failed || 0),
        h('td', { class: 'rollout' }, jobStatus(j)), ageCell(j.metadata.creationTimestamp));
    }],
  ];
  const stops = [];
  const sections = [];
  for (const [kind, title, headers, row] of tables) {
    const table = new Table(kind, headers, row);
    const inf = new Informer(kind, ns, {}, (t, o) => table.follow(inf, t, o));
    stops.push(() => inf.stop());
    sections.push(h('h2', {}, title), table.el);
  }
  view('Workloads', ...sections);
  return () => stops.forEach((f) => f());
}

function podsView(params) {
  const ns = params.get('ns') !== null ? params.get('ns') : namespace();
  const selector = params.get('selector') || '';
  const table = new Table('pods', ['Name', 'Ready', 'Status', 'Restarts', 'Node', 'IP', 'CPU', 'Memory', 'Age', 'Actions'], (p) => {
    const key = 'metrics/pods:' + keyOf(p);
    const status = podStatus(p);
    return h('tr', {},
      nameCell(p, podHref(p.metadata.namespace, p.metadata.name)),
      h('td', { class: 'ready' }, podReady(p)),
      h('td', { class: 'status ' + (status === 'Running' || status === 'Completed' || status === 'Succeeded' ? 'ok' : 'warn') }, status),
      h('td', { class: 'restarts' }, podRestarts(p)),
      h('td', { class: 'node' }, p.spec.nodeName || ''),
      h('td', { class: 'ip' }, (p.status && p.status.podIP) || ''),
      usageCell(key, 'cpu', cores),
      usageCell(key, 'mem', bytes),
      ageCell(p.metadata.creationTimestamp),
      h('td', { class: 'actions' },
        h('a', { href: podHref(p.metadata.namespace, p.metadata.name) + '?tab=logs', 'data-action': 'logs' }, 'Logs'), ' ',
        h('a', { href: podHref(p.metadata.namespace, p.metadata.name) + '?tab=yaml', 'data-action': 'yaml' }, 'YAML'), ' ',
        confirmButton('Delete', 'Confirm delete', () => deletePod(p))));
  });
  const count = h('span', { class: 'count', id: 'pod-count' }, '');
  const query = selector ? { labelSelector: selector } : {};
  const inf = new Informer('pods', ns, query, (t, o) => {
    table.follow(inf, t, o);
    count.textContent = `${inf.items.size} pod${inf.items.size === 1 ? '' : 's'}`;
  });
  const sampler = new Sampler('metrics/pods', ns, () => {
    for (const key of table.rows.keys()) table.refreshWith(inf.items.get(key), key);
  });
  const title = h('span', {}, 'Pods', selector ? h('small', { class: 'selector' }, ` ${selector}`) : '', ' ', count, ' ', table.filterBox());
  const [ownerKind, ownerName] = (params.get('owner') || '').split('/');
  if (ownerName && KINDS[ownerKind] && ns) {
    const [bar, stop] = ownerBar(ownerKind, ns, ownerName);
    view(title, bar, table.el);
    return () => { inf.stop(); sampler.stop(); stop(); };
  }
  view(title, table.el);
  return () => { inf.stop(); sampler.stop(); };
}

function servicesView() {
  const ns = namespace();
  const slices = new Map(); // service key -> slices
  const table = new Table('services', ['Name', 'Type', 'Cluster IP', 'Ports', 'Endpoints', 'Age'], (s) => {
    const ports = (s.spec.ports || []).map((p) => `${p.port}${p.nodePort ? ':' + p.nodePort : ''}/${p.protocol || 'TCP'}`);
    const ready = [];
    const notReady = [];
    for (const sl of slices.get(keyOf(s)) || []) {
      const ps = (sl.ports || []).map((p) => p.port);
      for (const ep of sl.endpoints || []) {
        const ok = !ep.conditions || ep.conditions.ready !== false;
        for (const a of ep.addresses || []) {
          for (const p of ps.length ? ps : ['']) (ok ? ready : notReady).push(p ? `${a}:${p}` : a);
        }
      }
    }
    return h('tr', {}, nameCell(s), h('td', {}, s.spec.type || 'ClusterIP'),
      h('td', {}, s.spec.clusterIP || ''), h('td', {}, ports.join(', ')),
      h('td', { class: 'endpoints' }, ready.sort().join(', ') || (s.spec.selector ? '<none>' : 'no selector'),
        notReady.length ? h('span', { class: 'warn' }, ` (not ready: ${notReady.sort().join(', ')})`) : ''),
      ageCell(s.metadata.creationTimestamp));
  });
  const services = new Informer('services', ns, {}, (t, o) => table.follow(services, t, o));
  const sliceInf = new Informer('endpointslices', ns, {}, (t) => {
    if (t === 'error') return;
    slices.clear();
    for (const sl of sliceInf.items.values()) {
      const svc = (sl.metadata.labels || {})['kubernetes.io/service-name'];
      if (!svc) continue;
      const key = sl.metadata.namespace + '/' + svc;
      if (!slices.has(key)) slices.set(key, []);
      slices.get(key).push(sl);
    }
    for (const key of table.rows.keys()) table.refreshWith(services.items.get(key), key);
  });
  view('Services', table.el);
  return () => { services.stop(); sliceInf.stop(); };
}

function eventsView() {
  const ns = namespace();
  const when = (e) => e.lastTimestamp || e.eventTime || (e.series && e.series.lastObservedTime) || e.metadata.creationTimestamp || '';
  const table = new Table('events', ['Last seen', 'Type', 'Reason', 'Object', 'Message', 'Count'], (e) => {
    const io = e.involvedObject || {};
    return h('tr', { class: e.type === 'Warning' ? 'warning' : '' }, ageCell(when(e)),
      h('td', {}, e.type || ''), h('td', {}, e.reason || ''),
      h('td', {}, `${(io.kind || '').toLowerCase()}/${io.name || ''}`),
      h('td', { class: 'message' }, e.message || ''), h('td', {}, e.count || 1));
  }, { sortKey: when, desc: true, empty: 'No events.' });
  const inf = new Informer('events', ns, {}, (t, o) => table.follow(inf, t, o));
  view('Events', table.el);
  return () => inf.stop();
}

function podView(ns, name, params) {
  const stops = [];
  const summary = h('dl', { class: 'summary', id: 'pod-summary' });
  const containerSel = h('select', { id: 'container', 'aria-label': 'Container' });
  const follow = h('input', { type: 'checkbox', id: 'follow', checked: true });
  const logs = h('pre', { id: 'logs', class: 'logs' });
  const yaml = h('pre', { id: 'yaml', class: 'yaml' });
  const charts = h('div', { class: 'charts', id: 'pod-charts' }, h('p', { class: 'note' }, 'Usage from the metrics API, sampled every 15 s while this page is open.'));
  const tabs = {
    logs: h('section', { id: 'tab-logs' }, h('div', { class: 'bar' }, containerSel, h('label', {}, follow, ' Follow')), logs),
    yaml: h('section', { id: 'tab-yaml' }, yaml),
    usage: h('section', { id: 'tab-usage' }, charts),
  };
  let tab = params.get('tab') || 'logs';
  const tabBar = h('nav', { class: 'tabs' }, Object.keys(tabs).map((t) => h('a', {
    href: podHref(ns, name) + '?tab=' + t, class: t === tab ? 'on' : '', 'data-tab': t,
  }, t === 'yaml' ? 'YAML' : t[0].toUpperCase() + t.slice(1))));
  for (const [t, el] of Object.entries(tabs)) el.hidden = t !== tab;

  let pod = null;
  let streaming = null;
  // Asks for timestamps, to show the lines without them and to resume a
  // followed stream that breaks (the connection drops, say) from the
  // last line shown, with no line twice.
  function streamLogs() {
    if (streaming) streaming.abort();
    logs.textContent = '';
    delete logs.dataset.state;
    const ctrl = new AbortController();
    streaming = ctrl;
    const container = containerSel.value;
    const following = follow.checked;
    let last = '';
    (async () => {
      for (let attempt = 0; !ctrl.signal.aborted; attempt++) {
        const q = new URLSearchParams({ container, timestamps: 'true' });
        if (last) q.set('sinceTime', last.slice(0, 19) + 'Z'); else q.set('tailLines', '1000');
        if (following) q.set('follow', 'true');
        try {
          const res = await fetch(apiPath('pods', ns, name, 'log') + '?' + q, { headers: authHeaders({ Accept: '*/*' }), signal: ctrl.signal });
          if (!res.ok) throw await failure(res);
          for await (const line of lines(res)) {
            const sp = line.indexOf(' ');
            const ts = sp > 0 ? logTime(line.slice(0, sp)) : '';
            if (ts && last && ts <= last) continue;
            if (ts) last = ts;
            const atEnd = logs.scrollTop + logs.clientHeight >= logs.scrollHeight - 4;
            logs.append((ts ? line.slice(sp + 1) : line) + '\n');
            if (atEnd) logs.scrollTop = logs.scrollHeight;
          }
          // Ended cleanly: all there was, or the container exited.
          logs.dataset.state = 'ended';
          return;
        } catch (e) {
          if (ctrl.signal.aborted) return;
          if (e instanceof ApiError || attempt >= 5) {
            logs.append(h('span', { class: 'failed' }, `[logs: ${e.message}]\n`));
            return;
          }
        }
        await sleep(Math.min(500 * 2 ** attempt, 5000));
      }
    })();
  }
  containerSel.addEventListener('change', streamLogs);
  follow.addEventListener('change', streamLogs);
  stops.push(() => streaming && streaming.abort());

  const inf = new Informer('pods', ns, { fieldSelector: 'metadata.name=' + name }, (t, o) => {
    if (t === 'error') { summary.replaceChildren(h('p', { class: 'failed' }, o.message)); return; }
    const p = inf.items.get(ns + '/' + name);
    if (!p) { summary.replaceChildren(h('p', { class: 'failed' }, 'This pod no longer exists.')); return; }
    const first = !pod;
    pod = p;
    const row = (k, v) => [h('dt', {}, k), h('dd', { 'data-field': k.toLowerCase() }, v)];
    summary.replaceChildren(
      ...row('Status', podStatus(p)), ...row('Ready', podReady(p)), ...row('Restarts', podRestarts(p)),
      ...row('Node', p.spec.nodeName || ''), ...row('IP', (p.status && p.status.podIP) || ''),
      h('dt', {}, 'Age'), h('dd', { class: 'age', 'data-ts': p.metadata.creationTimestamp }, age(p.metadata.creationTimestamp)));
    const shown = { ...p, metadata: { ...p.metadata } };
    delete shown.metadata.managedFields;
    yaml.textContent = toYaml(Object.assign({ apiVersion: 'v1', kind: 'Pod' }, shown));
    if (first) {
      const names = [...(p.spec.initContainers || []), ...(p.spec.containers || [])].map((c) => c.name);
      containerSel.replaceChildren(...names.map((c) => h('option', { value: c }, c)));
      containerSel.value = (p.spec.containers || [{}])[0].name || names[0];
      streamLogs();
    }
  });
  stops.push(() => inf.stop());

  const sampler = new Sampler('metrics/pods', ns, (e) => {
    const s = history.get('metrics/pods:' + ns + '/' + name) || [];
    if (e || !s.length) {
      charts.replaceChildren(h('p', { class: 'note' }, e ? 'Usage unavailable: ' + e.message : 'No usage reported yet.'));
      return;
    }
    const last = s[s.length - 1];
    charts.replaceChildren(
      h('figure', {}, h('figcaption', {}, 'CPU ', h('b', { class: 'cpu-now' }, cores(last.cpu))), sparkline(s.map((x) => x.cpu), 0, 480, 120, 'cpu')),
      h('figure', {}, h('figcaption', {}, 'Memory ', h('b', { class: 'mem-now' }, bytes(last.mem))), sparkline(s.map((x) => x.mem), 0, 480, 120, 'mem')),
      h('p', { class: 'note' }, `${s.length} samples, every 15 s.`));
  });
  stops.push(() => sampler.stop());

  const actions = h('div', { class: 'bar' }, confirmButton('Delete', 'Confirm delete', () => pod ? deletePod(pod) : Promise.resolve()));
  view(h('span', {}, 'Pod ', h('span', { class: 'ns-tag' }, ns + '/'), name), summary, actions, tabBar, ...Object.values(tabs));
  return () => stops.forEach((f) => f());
}

// ---- login, navigation ---------------------------------------------------

function $(sel) { return document.querySelector(sel); }

function showLogin(message) {
  if (current) { current(); current = null; }
  sessionStorage.removeItem(TOKEN_KEY);
  $('#top').hidden = true;
  $('#user').textContent = '';
  clearError();
  const token = h('textarea', { id: 'token', rows: '4', required: true, spellcheck: 'false', autocomplete: 'off', placeholder: 'A bearer token, such as a ServiceAccount token from kubectl create token' });
  const form = h('form', { id: 'login', class: 'login' },
    h('h1', {}, 'Skiff'),
    h('label', { for: 'token' }, 'Token'), token,
    message ? h('p', { class: 'failed', id: 'login-error' }, message) : '',
    h('button', { type: 'submit', id: 'login-button' }, 'Log in'));
  form.addEventListener('submit', async (ev) => {
    ev.preventDefault();
    const t = token.value.trim();
    if (!t) return;
    sessionStorage.setItem(TOKEN_KEY, t);
    try {
      const review = await api('POST', '/apis/authentication.k8s.io/v1/selfsubjectreviews',
        { apiVersion: 'authentication.k8s.io/v1', kind: 'SelfSubjectReview' });
      sessionStorage.setItem('skiff.user', (review.status && review.status.userInfo && review.status.userInfo.username) || '');
      start();
    } catch (e) {
      if (e.code !== 401) showLogin('Login failed: ' + e.message);
    }
  });
  $('#main').replaceChildren(form);
  token.focus();
}

let namespaces = null;

function start() {
  $('#top').hidden = false;
  $('#user').textContent = sessionStorage.getItem('skiff.user') || '';
  $('#namespace').value = namespace();
  if (!namespaces) {
    // Suggestions for the namespace box, where the user may list them.
    namespaces = new Informer('namespaces', '', {}, (t) => {
      if (t === 'error') return;
      $('#namespaces').replaceChildren(...[...namespaces.items.values()].map((n) => h('option', { value: n.metadata.name })));
    });
  }
  route();
}

function route() {
  if (!sessionStorage.getItem(TOKEN_KEY)) { showLogin(); return; }
  const [path, query] = (location.hash.slice(1) || '/nodes').split('?');
  const params = new URLSearchParams(query || '');
  const parts = path.split('/').filter(Boolean).map(decodeURIComponent);
  if (current) current();
  clearError();
  for (const a of document.querySelectorAll('#nav a')) a.classList.toggle('on', a.dataset.view === (parts[0] === 'pod' ? 'pods' : parts[0]));
  switch (parts[0]) {
    case 'workloads': current = workloadsView(); break;
    case 'pods': current = podsView(params); break;
    case 'services': current = servicesView(); break;
    case 'events': current = eventsView(); break;
    case 'pod': current = podView(parts[1], parts[2], params); break;
    default: current = nodesView();
  }
}

document.addEventListener('DOMContentLoaded', () => {
  $('#error-close').addEventListener('click', clearError);
  $('#logout').addEventListener('click', () => {
    if (namespaces) { namespaces.stop(); namespaces = null; }
    sessionStorage.removeItem('skiff.user');
    showLogin();
  });
  $('#namespace').addEventListener('change', (ev) => {
    sessionStorage.setItem(NS_KEY, ev.target.value.trim());
    route();
  });
  window.addEventListener('hashchange', route);
  if (sessionStorage.getItem(TOKEN_KEY)) start(); else showLogin();
});
