// The live socket (/ws, docs/protocol.md "Client WebSocket"): one connection for the whole app.
//
// - auth with the access token as the first message (never in the URL); auth again with each
//   refreshed token (the connection stays the same user);
// - subscribe to streams with batch frames; every stream remembers the last offset applied;
// - after any drop it reconnects (1 s, 2 s, ... up to 15 s) and subscribes with since = those
//   offsets, so nothing is missed; an event at or below a stream's offset is dropped, so nothing
//   is doubled; `recovered: false` hands the stream's handler a fresh snapshot to start again;
// - while it is not connected, `status.live` is false and `status.since` says since when.
import { Emitter } from './lib.js';

export class LiveError extends Error {
  constructor(body) {
    super(body.message || body.code);
    this.code = body.code;
    this.field = body.field;
  }
}

const CLOSE_AUTH = new Set([4001, 4002]);

export class Live extends Emitter {
  constructor(api, url) {
    super();
    this.api = api;
    this.url = url || `${location.protocol === 'https:' ? 'wss' : 'ws'}://${location.host}/ws`;
    this.ws = null;
    this.ready = false; // authenticated
    this.streams = new Map(); // stream -> {handlers:Set, offset:number|null}
    this.pending = new Map(); // request id -> {resolve, reject}
    this.nextId = 1;
    this.retry = 0;
    this.timer = null;
    this.stopped = true;
    this.status = { live: false, since: Date.now() / 1000, reason: 'connecting' };
    this.offToken = api.on((what, token) => {
      if (what === 'token' && this.ready) this.send({ type: 'auth', token }).catch(() => {});
      if (what === 'logout') this.stop();
    });
  }

  start() {
    if (!this.stopped) return;
    this.stopped = false;
    this.connect();
  }

  stop() {
    this.stopped = true;
    clearTimeout(this.timer);
    if (this.ws) { this.ws.onclose = null; this.ws.close(1000); }
    this.ws = null;
    this.setLive(false, 'logged out');
    this.failAll(new LiveError({ code: 'disconnected', message: 'logged out' }));
  }

  setLive(live, reason) {
    if (live === this.status.live && reason === this.status.reason) return;
    this.status = { live, since: live ? null : (this.status.live ? Date.now() / 1000 : this.status.since), reason };
    this.emit('status', this.status);
  }

  connect() {
    if (this.stopped) return;
    const ws = new WebSocket(this.url);
    this.ws = ws;
    ws.onopen = () => {
      this.raw({ type: 'auth', token: this.api.access, id: 0 });
    };
    ws.onmessage = (m) => this.receive(m.data);
    ws.onclose = (e) => {
      if (this.ws !== ws) return;
      this.ws = null;
      this.ready = false;
      this.failAll(new LiveError({ code: 'disconnected', message: 'connection lost' }));
      this.setLive(false, e.reason || 'connection lost');
      if (CLOSE_AUTH.has(e.code)) {
        // the token was refused or the user was disabled: a fresh token, or log out
        this.api.refresh().then(() => this.schedule(), () => this.api.logout());
        return;
      }
      this.schedule();
    };
  }

  schedule() {
    if (this.stopped) return;
    clearTimeout(this.timer);
    const delay = Math.min(15000, 1000 * 2 ** this.retry) * (0.8 + Math.random() * 0.4);
    this.retry = Math.min(this.retry + 1, 4);
    this.timer = setTimeout(() => this.connect(), delay);
  }

  raw(msg) {
    if (this.ws && this.ws.readyState === WebSocket.OPEN) this.ws.send(JSON.stringify(msg));
  }

  /** Send a request; resolves with the result's data, rejects with a LiveError. */
  send(msg) {
    if (!this.ready) {
      return Promise.reject(new LiveError({ code: 'disconnected', message: 'not connected: try again when live' }));
    }
    const id = this.nextId++;
    return new Promise((resolve, reject) => {
      this.pending.set(id, { resolve, reject });
      this.raw({ ...msg, id });
    });
  }

  failAll(err) {
    for (const p of this.pending.values()) p.reject(err);
    this.pending.clear();
  }

  /** Watch a stream: handler({type:'reset', snapshot, offset}) then ({type:'event', event}). */
  watch(stream, handler) {
    let entry = this.streams.get(stream);
    if (!entry) {
      entry = { handlers: new Set(), offset: null };
      this.streams.set(stream, entry);
    }
    entry.handlers.add(handler);
    if (entry.handlers.size === 1 && this.ready) this.subscribe([stream]);
    return () => {
      entry.handlers.delete(handler);
      if (entry.handlers.size === 0 && this.streams.get(stream) === entry) {
        this.streams.delete(stream);
        if (this.ready) this.raw({ type: 'unsubscribe', streams: [stream] });
      }
    };
  }

  subscribe(names) {
    const since = {};
    for (const name of names) {
      const entry = this.streams.get(name);
      if (entry && entry.offset != null) since[name] = entry.offset;
    }
    // at most 200 streams in one connection and one request (docs/protocol.md "Limits")
    const id = this.nextId++;
    this.pending.set(id, { resolve: () => {}, reject: (e) => this.emit('error', e) });
    this.raw({ type: 'subscribe', streams: names, since, batch: true, id });
  }

  receive(text) {
    let msg;
    try { msg = JSON.parse(text); } catch (e) { return; }
    switch (msg.type) {
      case 'event': this.event(msg); break;
      case 'events': for (const item of msg.items) this.event(item); break;
      case 'subscribed': this.subscribed(msg); break;
      case 'result': this.result(msg); break;
      case 'error': this.error(msg); break;
      case 'ping': this.raw({ type: 'pong' }); break;
      case 'unsubscribed':
        this.emit('unsubscribed', msg);
        for (const name of msg.streams) {
          const entry = this.streams.get(name);
          if (entry) for (const fn of entry.handlers) fn({ type: 'ended', reason: msg.reason });
        }
        break;
      default: break;
    }
  }

  result(msg) {
    if (msg.id === 0) { // the auth reply
      this.ready = true;
      this.retry = 0;
      this.user = msg.data;
      this.setLive(true, null);
      const names = [...this.streams.keys()];
      if (names.length) this.subscribe(names);
      return;
    }
    const p = this.pending.get(msg.id);
    if (p) { this.pending.delete(msg.id); p.resolve(msg.data); }
  }

  error(msg) {
    const p = msg.id != null ? this.pending.get(msg.id) : null;
    if (p) { this.pending.delete(msg.id); p.reject(new LiveError(msg)); return; }
    this.emit('error', new LiveError(msg));
  }

  subscribed(msg) {
    if (msg.id != null) this.pending.delete(msg.id);
    for (const s of msg.streams) {
      const entry = this.streams.get(s.stream);
      if (!entry) continue;
      if (!s.recovered || entry.offset == null) {
        // a fresh start from the snapshot (first subscribe, or the resume could not be honoured)
        entry.offset = s.offset;
        for (const fn of entry.handlers) fn({ type: 'reset', snapshot: s.snapshot, offset: s.offset });
      }
      // recovered: the replayed events follow, then live ones; offsets skip what we hold
    }
  }

  event(ev) {
    if (ev.kind === 'command') this.emit('command', ev.data);
    const entry = this.streams.get(ev.stream);
    if (!entry) return;
    if (entry.offset != null && ev.offset <= entry.offset) return; // held already: never doubled
    entry.offset = ev.offset;
    for (const fn of entry.handlers) fn({ type: 'event', event: ev });
  }
}
