// REST client: login, token refresh before expiry, logout, and JSON requests with the one error
// shape of docs/protocol.md ({code, message, field}). Tokens never go in a URL: the access token
// is held in memory and sent as a bearer header; the refresh token is kept in sessionStorage
// (this tab only, gone when it closes) so a reload does not log the user out.
import { Emitter } from './lib.js';

const KEY = 'vitalwire.session';

export class ApiError extends Error {
  constructor(status, body) {
    super((body && body.message) || `HTTP ${status}`);
    this.status = status;
    this.code = body && body.code;
    this.field = body && body.field;
  }
}

export class Api extends Emitter {
  constructor(base = '') {
    super();
    this.base = base;
    this.access = null; // access token (memory only)
    this.user = null; // {name, role}
    this.expiresAt = 0; // ms
    this.timer = null;
    this.refreshing = null;
  }

  get loggedIn() { return this.access != null; }

  /** Restore a session from this tab's refresh token, if any. */
  async resume() {
    const saved = sessionStorage.getItem(KEY);
    if (!saved) return false;
    try {
      const { refresh, user } = JSON.parse(saved);
      this.user = user;
      await this.refresh(refresh);
      return true;
    } catch (e) {
      this.forget();
      return false;
    }
  }

  async login(username, password) {
    const body = await this.raw('POST', '/auth/login', { username, password }, false);
    this.user = { name: username, role: body.role };
    this.take(body);
    return this.user;
  }

  logout() {
    this.forget();
    this.emit('logout');
  }

  forget() {
    clearTimeout(this.timer);
    this.access = null;
    this.user = null;
    sessionStorage.removeItem(KEY);
  }

  take(body) {
    this.access = body.access_token;
    this.expiresAt = Date.now() + body.expires_in * 1000;
    if (body.role && this.user) this.user.role = body.role;
    sessionStorage.setItem(KEY, JSON.stringify({ refresh: body.refresh_token, user: this.user }));
    clearTimeout(this.timer);
    // refresh at 80 % of the lifetime (at least 5 s before it ends)
    const lead = Math.max(5000, body.expires_in * 200);
    this.timer = setTimeout(() => this.refresh().catch(() => this.logout()),
      Math.max(1000, body.expires_in * 1000 - lead));
    this.emit('token', this.access);
  }

  async refresh(token) {
    if (this.refreshing) return this.refreshing;
    const saved = sessionStorage.getItem(KEY);
    const refresh = token || (saved && JSON.parse(saved).refresh);
    if (!refresh) throw new ApiError(401, { code: 'unauthenticated', message: 'not logged in' });
    this.refreshing = this.raw('POST', '/auth/refresh', { refresh_token: refresh }, false)
      .then((body) => { this.take(body); return this.access; })
      .finally(() => { this.refreshing = null; });
    return this.refreshing;
  }

  async raw(method, path, body, auth = true) {
    const headers = { Accept: 'application/json' };
    if (body !== undefined) headers['Content-Type'] = 'application/json';
    if (auth && this.access) headers.Authorization = `Bearer ${this.access}`;
    const res = await fetch(this.base + path, {
      method, headers, body: body === undefined ? undefined : JSON.stringify(body),
      credentials: 'omit', cache: 'no-store',
    });
    const text = await res.text();
    let data = null;
    try { data = text ? JSON.parse(text) : null; } catch (e) { data = { message: text }; }
    if (!res.ok) throw new ApiError(res.status, data);
    return data;
  }

  /** A request with the access token; one refresh and retry on 401, then logout. */
  async request(method, path, { query, body } = {}) {
    let url = path;
    if (query) {
      const q = new URLSearchParams();
      for (const [k, v] of Object.entries(query)) if (v != null && v !== '') q.set(k, v);
      const s = q.toString();
      if (s) url += `?${s}`;
    }
    try {
      return await this.raw(method, url, body);
    } catch (e) {
      if (!(e instanceof ApiError) || e.status !== 401 || !this.access) throw e;
      try { await this.refresh(); } catch (e2) { this.logout(); throw e; }
      return this.raw(method, url, body);
    }
  }

  get(path, query) { return this.request('GET', path, { query }); }
  post(path, body, query) { return this.request('POST', path, { body: body ?? {}, query }); }
  put(path, body) { return this.request('PUT', path, { body: body ?? {} }); }
  del(path) { return this.request('DELETE', path); }
}
