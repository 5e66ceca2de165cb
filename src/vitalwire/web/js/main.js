// The app shell: login, the top bar (who, connection state, navigation, logout) and a hash
// router (#/ central station, #/patient/<id>, #/admin/<section>). Hash routes keep the server to
// one page and keep anything private out of the path the server logs.
import { html, render, useState, useEffect, clock } from './lib.js';
import { Ctx, navigate } from './ctx.js';
import { Api } from './api.js';
import { Live } from './live.js';
import { Ward } from './model.js';
import { Station } from './station.js';
import { PatientView } from './patient.js';
import { Admin } from './admin.js';

function parseRoute() {
  const parts = (location.hash.replace(/^#\/?/, '') || '').split('/').map(decodeURIComponent);
  if (parts[0] === 'patient' && parts[1]) return { name: 'patient', id: parts[1] };
  if (parts[0] === 'admin') return { name: 'admin', section: parts[1] || 'users' };
  return { name: 'station' };
}

function Login({ api, onIn }) {
  const [user, setUser] = useState('');
  const [password, setPassword] = useState('');
  const [error, setError] = useState(null);
  const [busy, setBusy] = useState(false);
  const submit = async (e) => {
    e.preventDefault();
    setBusy(true); setError(null);
    try { onIn(await api.login(user.trim(), password)); } catch (err) { setError(err.message); }
    setBusy(false);
  };
  return html`<main class="login">
    <form onSubmit=${submit} data-testid="login-form" autocomplete="on">
      <h1>vitalwire</h1>
      <label>User <input id="login-user" name="username" autocomplete="username" value=${user}
        onInput=${(e) => setUser(e.target.value)} required /></label>
      <label>Password <input id="login-password" name="password" type="password"
        autocomplete="current-password" value=${password}
        onInput=${(e) => setPassword(e.target.value)} required /></label>
      <button id="login-submit" type="submit" disabled=${busy}>Log in</button>
      ${error && html`<p class="error" role="alert" data-testid="login-error">${error}</p>`}
    </form>
  </main>`;
}

function ConnStatus({ live }) {
  const [status, setStatus] = useState(live.status);
  useEffect(() => live.on((what, s) => { if (what === 'status') setStatus({ ...s }); }), [live]);
  return html`<span class=${`conn ${status.live ? 'live' : 'stale'}`} data-testid="conn-status"
    data-live=${String(status.live)} role="status">
    ${status.live ? 'live' : `not live since ${clock(status.since)}`}</span>`;
}

function Shell({ ctx }) {
  const [route, setRoute] = useState(parseRoute());
  useEffect(() => {
    const on = () => setRoute(parseRoute());
    window.addEventListener('hashchange', on);
    return () => window.removeEventListener('hashchange', on);
  }, []);
  const { user } = ctx;
  let page;
  if (route.name === 'patient') page = html`<${PatientView} key=${route.id} id=${route.id} />`;
  else if (route.name === 'admin' && user.role === 'admin') page = html`<${Admin} section=${route.section} />`;
  else page = html`<${Station} />`;
  return html`<${Ctx.Provider} value=${ctx}>
    <header class="topbar">
      <a class="brand" href="#/">vitalwire</a>
      <nav>
        <a href="#/" class=${route.name === 'station' ? 'on' : ''}>Central station</a>
        ${user.role === 'admin' && html`<a href="#/admin/users" class=${route.name === 'admin' ? 'on' : ''} data-testid="nav-admin">Admin</a>`}
      </nav>
      <${ConnStatus} live=${ctx.live} />
      <span class="who" data-testid="who">${user.name} (${user.role})</span>
      <button class="logout" data-testid="logout" onClick=${() => ctx.api.logout()}>Log out</button>
    </header>
    ${page}
  <//>`;
}

function App() {
  const [ctx, setCtx] = useState(null);
  const [checked, setChecked] = useState(false);
  const api = window.vitalwire.api;

  const start = () => {
    const live = new Live(api);
    const ward = new Ward(api, live);
    const c = { api, live, ward, user: api.user, navigate };
    window.vitalwire.live = live;
    window.vitalwire.ward = ward;
    // the patient list follows the care team: read again every 30 s, after a reconnect, and at
    // once when the server ends a patient's subscription (moved out of the user's care)
    let wasLive = false;
    live.on((what, s) => {
      if (what === 'unsubscribed') ward.load();
      if (what === 'status') {
        if (s.live && !wasLive && ward.loaded) ward.load();
        wasLive = s.live;
      }
    });
    const every = setInterval(() => { if (api.loggedIn) ward.load(); }, 30000);
    // on a cloud, each ward gateway's link (a patient whose gateway is away is not live)
    const edges = setInterval(() => { if (api.loggedIn) ward.refreshEdges(); }, 5000);
    const off = api.on((what) => {
      if (what === 'logout') { clearInterval(every); clearInterval(edges); off(); }
    });
    live.start();
    ward.load();
    setCtx(c);
  };

  useEffect(() => {
    const off = api.on((what) => {
      if (what === 'logout') {
        setCtx((c) => { if (c) c.live.stop(); return null; });
      }
    });
    api.resume().then((ok) => { if (ok) start(); setChecked(true); });
    return off;
  }, []);

  if (!checked) return html`<p class="boot">Loading vitalwire…</p>`;
  if (!ctx) return html`<${Login} api=${api} onIn=${start} />`;
  return html`<${Shell} ctx=${ctx} />`;
}

// Exposed for tests and the browser bench (read-only use): the API client, the live socket and
// the ward models.
window.vitalwire = { api: new Api() };
render(html`<${App} />`, document.getElementById('app'));
