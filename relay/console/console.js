// The Hatch console (docs/CONSOLE.md): log in, list instances and sessions, and open a
// terminal that speaks hatch.v1 (docs/PROTOCOL.md section 2) to the agent through the relay's
// data plane.
//
// What it keeps: the CSRF token of the console session, in this script's memory only (the
// session itself is an HttpOnly cookie this script cannot read). No access key is kept
// anywhere: the login form's field is cleared as soon as it is sent, and nothing goes to
// localStorage or sessionStorage.
'use strict';

(() => {
  const $ = (id) => document.getElementById(id);

  /** hatch.v1 message types. */
  const DATA = 0x01, RESIZE = 0x02, EXIT = 0x03, ACK = 0x04, ERROR = 0x05, STDERR = 0x07;
  /** Acknowledge at once when this many received bytes are unacknowledged (as the CLI). */
  const ACK_BYTES = 64 * 1024;
  /** Otherwise acknowledge this long after the first unacknowledged byte, in ms. */
  const ACK_DELAY_MS = 2000;
  /** How often the instance and session lists are read again, in ms. */
  const REFRESH_MS = 5000;

  let csrf = null;
  let closeWords = {};
  let refreshTimer = null;
  /** The terminal session on screen, if any. */
  let live = null;

  const encoder = new TextEncoder();
  const decoder = new TextDecoder();

  /** A request to the console's API; rejects with the answer's {code, message}. */
  async function call(method, path, body) {
    const opts = { method, headers: {}, credentials: 'same-origin', cache: 'no-store' };
    if (body !== undefined) {
      opts.headers['content-type'] = 'application/json';
      opts.body = JSON.stringify(body);
    }
    if (method !== 'GET' && csrf) opts.headers['x-hatch-csrf'] = csrf;
    const r = await fetch(path, opts);
    const text = await r.text();
    let v = null;
    try { v = text ? JSON.parse(text) : null; } catch (_) { v = null; }
    if (!r.ok) {
      const e = new Error((v && v.message) || `HTTP ${r.status}`);
      e.status = r.status;
      e.code = (v && v.code) || 'HTTP' + r.status;
      throw e;
    }
    return v;
  }

  function notice(text) {
    const n = $('notice');
    n.textContent = text || '';
    n.hidden = !text;
  }

  function describeError(e) {
    return e.code ? `${e.code}: ${e.message}` : String(e.message || e);
  }

  function when(rfc3339) {
    if (!rfc3339) return '';
    const d = new Date(rfc3339);
    return isNaN(d) ? rfc3339 : d.toLocaleString();
  }

  function cell(row, text, cls) {
    const td = document.createElement('td');
    td.textContent = text == null ? '' : String(text);
    if (cls) td.className = cls;
    row.appendChild(td);
    return td;
  }

  function button(label, cls, onClick) {
    const b = document.createElement('button');
    b.type = 'button';
    b.textContent = label;
    b.className = cls;
    b.addEventListener('click', onClick);
    return b;
  }

  function emptyRow(tbody, cols, text) {
    const tr = document.createElement('tr');
    const td = cell(tr, text, 'empty');
    td.colSpan = cols;
    tbody.appendChild(tr);
  }

  // --- login ---------------------------------------------------------------------------

  function showLogin(message) {
    csrf = null;
    if (refreshTimer) clearInterval(refreshTimer);
    refreshTimer = null;
    $('app-view').hidden = true;
    $('logout').hidden = true;
    $('who').textContent = '';
    $('login-view').hidden = false;
    notice(message);
    $('access-key').focus();
  }

  function loggedIn(info) {
    csrf = info.csrf;
    $('who').textContent = `${info.principal} · ${info.account_id}`;
    $('login-view').hidden = true;
    $('app-view').hidden = false;
    $('logout').hidden = false;
    notice('');
    refresh();
    if (refreshTimer) clearInterval(refreshTimer);
    refreshTimer = setInterval(refresh, REFRESH_MS);
  }

  async function login(ev) {
    ev.preventDefault();
    const field = $('access-key');
    const key = field.value.trim();
    field.value = '';
    if (!key) return;
    $('login-button').disabled = true;
    try {
      loggedIn(await call('POST', '/console/api/login', { access_key: key }));
    } catch (e) {
      showLogin(describeError(e));
    } finally {
      $('login-button').disabled = false;
    }
  }

  async function logout() {
    if (live) live.close();
    try { await call('POST', '/console/api/logout'); } catch (_) { /* gone already */ }
    showLogin('Logged out.');
  }

  /** A call failed: a lost console session sends the person back to the login. */
  function failed(e) {
    if (e.status === 401) showLogin(describeError(e));
    else notice(describeError(e));
  }

  // --- lists ---------------------------------------------------------------------------

  async function refresh() {
    if (!csrf) return;
    try {
      const [inst, sess] = await Promise.all([
        call('GET', '/console/api/instances'),
        call('GET', '/console/api/sessions?state=active&limit=50'),
      ]);
      renderInstances(inst.instances || []);
      renderSessions(sess.sessions || []);
    } catch (e) {
      failed(e);
    }
  }

  function renderInstances(list) {
    const tbody = $('instances').tBodies[0];
    tbody.replaceChildren();
    if (!list.length) emptyRow(tbody, 7, 'No instances you may see.');
    for (const i of list) {
      const tr = document.createElement('tr');
      tr.dataset.instance = i.instance_id;
      cell(tr, i.instance_id, 'mono');
      cell(tr, i.hostname || '');
      cell(tr, i.region);
      cell(tr, i.online ? 'online' : 'offline', i.online ? 'online status' : 'offline status');
      cell(tr, when(i.last_seen));
      const tags = cell(tr, '');
      for (const [k, v] of Object.entries(i.tags || {})) {
        const s = document.createElement('span');
        s.className = 'tag';
        s.textContent = `${k}=${v}`;
        tags.appendChild(s);
      }
      const b = button('Open terminal', 'small open', () => openTerminal(i.instance_id));
      b.disabled = !i.online;
      cell(tr, '').appendChild(b);
      tbody.appendChild(tr);
    }
  }

  function renderSessions(list) {
    const tbody = $('sessions').tBodies[0];
    tbody.replaceChildren();
    if (!list.length) emptyRow(tbody, 6, 'No active sessions.');
    for (const s of list) {
      const tr = document.createElement('tr');
      tr.dataset.session = s.session_id;
      cell(tr, s.session_id, 'mono');
      cell(tr, s.instance_id, 'mono');
      cell(tr, s.principal);
      cell(tr, s.state);
      cell(tr, when(s.created_at));
      cell(tr, '').appendChild(button('Terminate', 'small danger terminate', async () => {
        try {
          await call('DELETE', `/console/api/sessions/${encodeURIComponent(s.session_id)}`);
        } catch (e) {
          failed(e);
        }
        refresh();
      }));
      tbody.appendChild(tr);
    }
  }

  // --- the terminal ----------------------------------------------------------------------

  function closeWordsFor(code) {
    if (closeWords[code]) return closeWords[code];
    if (code === 1006) return 'the connection was lost or refused (no close frame)';
    if (code === 1005) return 'closed without a status';
    return 'unknown close code';
  }

  function setStatus(text, cls) {
    const s = $('term-status');
    s.textContent = text;
    s.className = 'term-status ' + (cls || '');
  }

  /** One terminal session: an xterm.js terminal and its hatch.v1 WebSocket leg. */
  class TermSession {
    constructor(instanceId) {
      this.instanceId = instanceId;
      this.sessionId = null;
      this.ws = null;
      this.exit = null;
      this.ended = false;
      this.received = 0; // bytes (and the EXIT) of the agent's output received
      this.acked = 0;
      this.ackTimer = null;
      this.term = new Terminal({
        cursorBlink: true,
        fontFamily: 'ui-monospace, "DejaVu Sans Mono", monospace',
        fontSize: 14,
        scrollback: 5000,
        theme: { background: '#101418' },
      });
      this.fit = new FitAddon.FitAddon();
      this.term.loadAddon(this.fit);
      const el = $('terminal');
      el.replaceChildren();
      this.term.open(el);
      this.fit.fit();
      this.term.onData((s) => this.send(DATA, encoder.encode(s)));
      this.term.onBinary((s) => this.send(DATA, Uint8Array.from(s, (c) => c.charCodeAt(0) & 0xff)));
      this.term.onResize(({ cols, rows }) => this.resize(cols, rows));
      this.observer = new ResizeObserver(() => this.refit());
      this.observer.observe(el);
      this.onWindowResize = () => this.refit();
      window.addEventListener('resize', this.onWindowResize);
    }

    refit() {
      if (!this.ended) {
        try { this.fit.fit(); } catch (_) { /* not laid out yet */ }
      }
    }

    async start() {
      $('term-title').textContent = `${this.instanceId} · starting…`;
      setStatus('starting a session', '');
      let g;
      try {
        g = await call('POST', '/console/api/sessions',
          { instance_id: this.instanceId, mode: 'shell', term: 'xterm-256color' });
      } catch (e) {
        this.end(`could not start a session: ${describeError(e)}`);
        if (e.status === 401) showLogin(describeError(e));
        return;
      }
      this.sessionId = g.session_id;
      $('term-title').textContent = `${this.instanceId} · ${g.session_id}`;
      setStatus('connecting', '');
      // The token travels as a subprotocol: a browser cannot set Authorization on a WebSocket.
      const ws = new WebSocket(g.stream_url, ['hatch.v1', 'bearer.' + g.token]);
      ws.binaryType = 'arraybuffer';
      this.ws = ws;
      ws.addEventListener('open', () => {
        setStatus('connected', 'live');
        this.refit();
        this.resize(this.term.cols, this.term.rows);
        this.term.focus();
        refresh();
      });
      ws.addEventListener('message', (ev) => this.onMessage(ev.data));
      ws.addEventListener('close', (ev) => this.onClose(ev));
    }

    send(kind, body) {
      if (!this.ws || this.ws.readyState !== WebSocket.OPEN) return;
      // A pending acknowledgement rides with the input, as the CLI does.
      if (kind === DATA && this.received > this.acked) this.sendAck();
      const m = new Uint8Array(1 + body.length);
      m[0] = kind;
      m.set(body, 1);
      this.ws.send(m);
    }

    resize(cols, rows) {
      const b = new Uint8Array(4);
      const v = new DataView(b.buffer);
      v.setUint16(0, cols);
      v.setUint16(2, rows);
      this.send(RESIZE, b);
    }

    sendAck() {
      if (this.ackTimer) clearTimeout(this.ackTimer);
      this.ackTimer = null;
      if (!this.ws || this.ws.readyState !== WebSocket.OPEN) return;
      const m = new Uint8Array(9);
      m[0] = ACK;
      new DataView(m.buffer).setBigUint64(1, BigInt(this.received));
      this.ws.send(m);
      this.acked = this.received;
    }

    countReceived(n) {
      this.received += n;
      if (this.received - this.acked >= ACK_BYTES) this.sendAck();
      else if (!this.ackTimer) this.ackTimer = setTimeout(() => this.sendAck(), ACK_DELAY_MS);
    }

    onMessage(data) {
      if (typeof data === 'string') {
        // hatch.v1 is binary only (close 1003, as the CLI).
        this.ws.close(1003, 'text message on hatch.v1');
        return;
      }
      const m = new Uint8Array(data);
      if (m.length === 0) return;
      const body = m.subarray(1);
      switch (m[0]) {
        case DATA:
        case STDERR:
          this.term.write(body);
          this.countReceived(body.length);
          break;
        case EXIT:
          if (body.length !== 4) break;
          this.exit = new DataView(body.buffer, body.byteOffset, 4).getInt32(0);
          this.received += 1; // the EXIT takes one offset
          this.sendAck(); // at once: the agent closes once it knows we have the status
          setStatus(`process exited with status ${this.exit}`, 'ended');
          break;
        case ERROR: {
          if (body.length < 2) break;
          const code = new DataView(body.buffer, body.byteOffset, 2).getUint16(0);
          const text = decoder.decode(body.subarray(2));
          this.term.write(`\r\n\x1b[31mremote error ${code}: ${text.replace(/[\x00-\x1f\x7f]/g, ' ')}\x1b[0m\r\n`);
          break;
        }
        default:
          // ACK of our input (we keep no replay buffer), RESUME, unknown: ignored.
          break;
      }
    }

    onClose(ev) {
      let text;
      if (this.exit !== null) {
        text = `process exited with status ${this.exit}`;
      } else {
        const words = closeWordsFor(ev.code);
        text = `session closed: ${words} (${ev.code})`;
        // The reason is the closing side's text: shown only when it says more, and without
        // control characters (it is also written into the terminal below).
        const reason = (ev.reason || '').replace(/[\x00-\x1f\x7f-\x9f]/g, ' ').trim();
        if (reason && reason !== words) text += ` — ${reason}`;
      }
      this.term.write(`\r\n\x1b[2m[${text}]\x1b[0m\r\n`);
      this.end(text);
      refresh();
    }

    end(text) {
      this.ended = true;
      if (this.ackTimer) clearTimeout(this.ackTimer);
      this.ackTimer = null;
      setStatus(text, 'ended');
    }

    close() {
      this.end('closed');
      if (this.ws && this.ws.readyState <= WebSocket.OPEN) this.ws.close(1000, 'console closed');
      this.observer.disconnect();
      window.removeEventListener('resize', this.onWindowResize);
      this.term.dispose();
      $('terminal').replaceChildren();
    }

    /** The terminal's buffer as lines of text (the browser tests read it). */
    lines() {
      const b = this.term.buffer.active;
      const out = [];
      for (let y = 0; y < b.length; y++) {
        const l = b.getLine(y);
        if (l) out.push(l.translateToString(true));
      }
      return out;
    }
  }

  function openTerminal(instanceId) {
    if (live) live.close();
    $('terminal-view').hidden = false;
    live = new TermSession(instanceId);
    live.start();
  }

  function closeTerminal() {
    if (live) live.close();
    live = null;
    $('terminal-view').hidden = true;
    refresh();
  }

  // A read-only view for the browser tests (docs/CONSOLE.md, "Tests").
  window.hatchConsole = Object.freeze({
    lines: () => (live ? live.lines() : []),
    size: () => (live ? { cols: live.term.cols, rows: live.term.rows } : null),
    sessionId: () => (live ? live.sessionId : null),
  });

  // --- start -----------------------------------------------------------------------------

  /**
   * A login link (`hatch console`): the code is in the fragment, which no request carries; it
   * leaves the address bar before it is used, and works once. False when the URL has none.
   */
  async function linkLogin() {
    const m = /^#link=([A-Za-z0-9_-]+)$/.exec(location.hash);
    if (!m) return false;
    history.replaceState(null, '', location.pathname);
    if (live) closeTerminal();
    try {
      const info = await call('POST', '/console/api/link', { code: m[1] });
      loggedIn(info);
      if (info.instance_id) openTerminal(info.instance_id);
    } catch (e) {
      showLogin(describeError(e));
    }
    return true;
  }

  async function start() {
    $('login-form').addEventListener('submit', login);
    $('logout').addEventListener('click', logout);
    $('refresh').addEventListener('click', refresh);
    $('term-close').addEventListener('click', closeTerminal);
    try { closeWords = await call('GET', '/console/api/close-codes'); } catch (_) { closeWords = {}; }

    // A link pasted into a tab that already shows the console changes only the fragment.
    window.addEventListener('hashchange', () => linkLogin());
    if (await linkLogin()) return;
    try {
      loggedIn(await call('GET', '/console/api/me'));
    } catch (e) {
      showLogin(e.status === 401 ? '' : describeError(e));
    }
  }

  start();
})();
