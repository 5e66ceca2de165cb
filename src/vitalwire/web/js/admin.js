// The admin pages (admins only): users, care teams, patients, devices and their bindings, and
// the audit log. Everything goes through the REST administration API (docs/api.md,
// "Administration"; GET /audit in docs/protocol.md): this screen adds no privilege of its own,
// the server checks the role on every request and audits every act.
//
// Every act follows one pattern (useAct): the button is busy while it runs, a failure shows the
// server's own message (the one error shape {code, message, field}) in [data-testid=admin-error]
// and keeps the form as typed, a success says what changed and the list is read again. Acts that
// cannot be undone (delete a user, discharge a patient, rotate a device's secret) ask for a
// second click first.
import { html, useState, useEffect, useRef, dateTime } from './lib.js';
import { useCtx } from './ctx.js';
import { ApiError } from './api.js';

const SECTIONS = [
  { key: 'users', label: 'Users' },
  { key: 'care-teams', label: 'Care teams' },
  { key: 'patients', label: 'Patients' },
  { key: 'devices', label: 'Devices' },
  { key: 'audit', label: 'Audit log' },
];
const ROLES = ['admin', 'clinician', 'viewer'];
const PAGE = 50; // rows per page of the admin lists (the API allows up to 1000)
const MAX_PAGE = 1000; // the API's largest page (lists, GET /audit)

/** A readable message for a failed request: the server's message, or why there was none. */
function describe(e) {
  if (e instanceof ApiError) {
    // the page is routed for admins only, so a 403 means the role was taken away meanwhile
    if (e.status === 403) return `Refused: ${e.message}. This account may no longer administer.`;
    return e.message;
  }
  return e && e.name === 'TypeError' ? 'the server cannot be reached' : String((e && e.message) || e);
}

/** Run one act: busy flag, the server's error on failure, a notice on success, then `after`
 *  (the list's reload) either way, since a refused act may mean the list is out of date.
 *  Resolves to the act's result, or null when it failed (so forms keep what was typed). */
function useAct(after) {
  const [state, setState] = useState({ busy: false, error: null, notice: null });
  const run = async (fn, notice) => {
    setState({ busy: true, error: null, notice: null });
    try {
      const result = await fn();
      setState({
        busy: false, error: null,
        notice: typeof notice === 'function' ? notice(result) : notice,
      });
      return result ?? true;
    } catch (e) {
      setState({ busy: false, error: describe(e), notice: null });
      return null;
    } finally {
      if (after) after();
    }
  };
  const clear = () => setState({ busy: false, error: null, notice: null });
  return { ...state, run, clear };
}

/** The outcome of the last act (and a list's load error): error first, as an alert. */
function Outcome({ act, loadError }) {
  const error = act.error || loadError;
  return html`<div class="admin-outcome">
    ${error && html`<p class="error" role="alert" data-testid="admin-error">${error}</p>`}
    ${!error && act.notice && html`<p class="notice" role="status" data-testid="admin-notice">${act.notice}</p>`}
  </div>`;
}

/**
 * One list read page by page through a cursor. `load(query, cursor)` resolves to
 * {items, next, self?} (`self`: a cursor that reads this page again, when the cursor it was read
 * with would not); a stack keeps the cursors of the pages before this one, for "previous".
 * Changing the query starts again from the first page.
 */
function usePaged(load, initialQuery) {
  const [pos, setPos] = useState({ query: initialQuery, cursor: null, stack: [] });
  const [page, setPage] = useState({ items: null, next: null, self: null, error: null, extra: null });
  const [version, setVersion] = useState(0);
  const key = JSON.stringify([pos.query, pos.cursor]);
  useEffect(() => {
    let gone = false; // an answer to an older request must not overwrite a newer one
    load(pos.query, pos.cursor).then(
      (r) => { if (!gone) setPage({ ...r, self: r.self ?? pos.cursor, error: null }); },
      (e) => { if (!gone) setPage((p) => ({ ...p, error: describe(e) })); },
    );
    return () => { gone = true; };
  }, [key, version]);
  return {
    ...page,
    query: pos.query,
    number: pos.stack.length + 1,
    hasPrev: pos.stack.length > 0,
    setQuery: (query) => {
      // a new search shows "Loading…" rather than the last search's rows meanwhile
      setPage((p) => ({ ...p, items: null, next: null, error: null }));
      setPos({ query, cursor: null, stack: [] });
    },
    goNext: () => page.next != null
      && setPos((p) => ({ ...p, cursor: page.next, stack: [...p.stack, page.self] })),
    goPrev: () => setPos((p) => (p.stack.length
      ? { ...p, cursor: p.stack[p.stack.length - 1], stack: p.stack.slice(0, -1) } : p)),
    reload: () => setVersion((v) => v + 1),
  };
}

/** A loader for the admin API's lists ({items, next_cursor}, paged by the API's cursor). */
const adminList = (api, path, limit = PAGE) => async (query, cursor) => {
  const r = await api.get(path, { ...query, cursor, limit });
  return { items: r.items, next: r.next_cursor };
};

/** Every item of an admin list (for the selects), following the cursor. */
async function fetchAll(api, path, query = {}) {
  const items = [];
  let cursor = null;
  for (let i = 0; i < 50; i += 1) {
    const r = await api.get(path, { ...query, cursor, limit: MAX_PAGE });
    items.push(...r.items);
    cursor = r.next_cursor;
    if (!cursor) break;
  }
  return items;
}

/** fetchAll as state, read again when `version` changes; [] until it arrives or on failure
 *  (the section's own list shows the error). */
function useAll(api, path, query, version) {
  const [items, setItems] = useState([]);
  useEffect(() => {
    let gone = false;
    fetchAll(api, path, query).then((r) => { if (!gone) setItems(r); }, () => {});
    return () => { gone = true; };
  }, [path, JSON.stringify(query), version]);
  return items;
}

function Pager({ list, name }) {
  return html`<div class="admin-pager">
    <button type="button" data-testid=${`${name}-prev`} disabled=${!list.hasPrev}
      onClick=${list.goPrev}>← Previous</button>
    <span class="muted" data-testid=${`${name}-page`}>page ${list.number}</span>
    <button type="button" data-testid=${`${name}-next`} disabled=${list.next == null}
      onClick=${list.goNext}>Next →</button>
  </div>`;
}

/** A button that asks for a second click before an act that cannot be undone. */
function Confirm({ testid, label, question, onConfirm, busy }) {
  const [asking, setAsking] = useState(false);
  if (!asking) {
    return html`<button type="button" class="danger" data-testid=${testid} disabled=${busy}
      onClick=${() => setAsking(true)}>${label}</button>`;
  }
  return html`<span class="admin-confirm" role="group">
    <span>${question}</span>
    <button type="button" class="danger" data-testid=${`${testid}-confirm`} disabled=${busy}
      onClick=${() => { setAsking(false); onConfirm(); }}>Yes, ${label.toLowerCase()}</button>
    <button type="button" data-testid=${`${testid}-cancel`} onClick=${() => setAsking(false)}>Cancel</button>
  </span>`;
}

/** The controlled fields of a form: [values, set(name) -> onInput handler, reset]. */
function useFields(initial) {
  const [values, setValues] = useState(initial);
  const set = (name) => (e) => setValues((v) => ({ ...v, [name]: e.target.value }));
  return [values, set, () => setValues(initial)];
}

const Empty = ({ cols, text }) => html`<tr><td colspan=${cols} class="muted">${text}</td></tr>`;

// -- users ------------------------------------------------------------------------------------

function Users() {
  const { api, user: me } = useCtx();
  const list = usePaged(adminList(api, '/admin/users'), {});
  const [version, setVersion] = useState(0);
  const reload = () => { list.reload(); setVersion((v) => v + 1); };
  const act = useAct(reload);
  const patients = useAll(api, '/admin/patients', {}, version);
  const [form, set, reset] = useFields({ username: '', password: '', role: 'viewer' });

  const create = async (e) => {
    e.preventDefault();
    const ok = await act.run(
      () => api.post('/admin/users', { username: form.username.trim(), password: form.password, role: form.role }),
      (r) => `user ${r.username} created (${r.role})`,
    );
    if (ok) reset();
  };

  return html`<section class="admin-section" aria-label="Users">
    <form class="admin-form" onSubmit=${create} data-testid="user-create-form">
      <h2>New user</h2>
      <label>Username <input data-testid="user-new-name" value=${form.username}
        onInput=${set('username')} required maxlength="64" autocomplete="off" /></label>
      <label>Password <input data-testid="user-new-password" type="password" value=${form.password}
        onInput=${set('password')} required maxlength="1024" autocomplete="new-password" /></label>
      <label>Role <select data-testid="user-new-role" value=${form.role} onChange=${set('role')}>
        ${ROLES.map((r) => html`<option value=${r}>${r}</option>`)}
      </select></label>
      <button type="submit" data-testid="user-create" disabled=${act.busy}>Create</button>
    </form>
    <${Outcome} act=${act} loadError=${list.error} />
    <div class="table-wrap">
      <table class="admin-table">
        <thead><tr><th>User</th><th>Role</th><th>State</th><th>Wards</th><th>Patients</th>
          <th>Password</th><th></th></tr></thead>
        <tbody>
          ${list.items == null ? html`<${Empty} cols="7" text="Loading…" />`
            : list.items.length === 0 ? html`<${Empty} cols="7" text="No users." />`
            : list.items.map((u) => html`<${UserRow} key=${u.username} u=${u} me=${me}
                act=${act} patients=${patients} />`)}
        </tbody>
      </table>
    </div>
    <${Pager} list=${list} name="users" />
  </section>`;
}

function UserRow({ u, me, act, patients }) {
  const { api } = useCtx();
  const [password, setPassword] = useState(null); // null: the reset form is closed
  const [assignTo, setAssignTo] = useState('');
  const path = `/admin/users/${encodeURIComponent(u.username)}`;
  const setRole = (role) => act.run(() => api.put(`${path}/role`, { role }),
    (r) => (r.changed === false ? `${u.username} is ${role} already` : `${u.username} is now ${r.after}`));
  const toggle = () => act.run(() => api.post(`${path}/${u.disabled ? 'enable' : 'disable'}`),
    `${u.username} ${u.disabled ? 'enabled' : 'disabled'}`);
  const resetPassword = async (e) => {
    e.preventDefault();
    const ok = await act.run(() => api.post(`${path}/password`, { password }),
      `password of ${u.username} reset: their older tokens no longer work`);
    if (ok) setPassword(null);
  };
  const assign = async (e) => {
    e.preventDefault();
    if (!assignTo) return;
    const ok = await act.run(() => api.put(`${path}/patients/${encodeURIComponent(assignTo)}`),
      `${assignTo} assigned to ${u.username}`);
    if (ok) setAssignTo('');
  };
  const unassign = (pid) => act.run(() => api.del(`${path}/patients/${encodeURIComponent(pid)}`),
    `${pid} no longer assigned to ${u.username}`);
  const others = patients.filter((p) => !u.patients.includes(p.id));

  return html`<tr data-testid="user-row" data-user=${u.username} data-role=${u.role}
      data-disabled=${String(u.disabled)} class=${u.disabled ? 'is-disabled' : ''}>
    <td class="nowrap"><strong>${u.username}</strong>${u.username === me.name && html` <span class="muted">(you)</span>`}</td>
    <td><select data-testid="user-role" aria-label=${`role of ${u.username}`} value=${u.role}
      disabled=${act.busy} onChange=${(e) => setRole(e.target.value)}>
      ${ROLES.map((r) => html`<option value=${r}>${r}</option>`)}
    </select></td>
    <td class="nowrap">
      <span class=${`badge ${u.disabled ? 'off' : 'on'}`}>${u.disabled ? 'disabled' : 'active'}</span>
      ${u.disabled
        ? html`<button type="button" data-testid="user-enable" disabled=${act.busy} onClick=${toggle}>Enable</button>`
        : html`<button type="button" data-testid="user-disable" disabled=${act.busy} onClick=${toggle}>Disable</button>`}
    </td>
    <td>${u.wards.length ? u.wards.join(', ') : html`<span class="muted">—</span>`}</td>
    <td>
      <span class="chips">${u.patients.map((pid) => html`<span class="chip" data-patient=${pid}>${pid}
        <button type="button" class="chip-x" data-testid="user-unassign" disabled=${act.busy}
          aria-label=${`unassign ${pid} from ${u.username}`} title="Unassign"
          onClick=${() => unassign(pid)}>×</button></span>`)}</span>
      <form class="inline" onSubmit=${assign}>
        <select data-testid="user-assign-patient" aria-label=${`patient to assign to ${u.username}`}
          value=${assignTo} onChange=${(e) => setAssignTo(e.target.value)}>
          <option value="">patient…</option>
          ${others.map((p) => html`<option value=${p.id}>${p.id} ${p.name}</option>`)}
        </select>
        <button type="submit" data-testid="user-assign" disabled=${act.busy || !assignTo}>Assign</button>
      </form>
    </td>
    <td class="nowrap">${password == null
      ? html`<button type="button" data-testid="user-password-reset" onClick=${() => setPassword('')}>Reset…</button>`
      : html`<form class="inline" onSubmit=${resetPassword}>
          <input type="text" hidden readonly autocomplete="username" value=${u.username} />
          <input type="password" data-testid="user-password" aria-label=${`new password for ${u.username}`}
            placeholder="new password" value=${password} required maxlength="1024"
            autocomplete="new-password" onInput=${(e) => setPassword(e.target.value)} />
          <button type="submit" data-testid="user-password-set" disabled=${act.busy}>Set</button>
          <button type="button" onClick=${() => setPassword(null)}>Cancel</button>
        </form>`}</td>
    <td class="nowrap"><${Confirm} testid="user-delete" label="Delete" busy=${act.busy}
      question=${`Delete ${u.username} with their memberships and assignments?`}
      onConfirm=${() => act.run(() => api.del(path), `user ${u.username} deleted`)} /></td>
  </tr>`;
}

// -- care teams -------------------------------------------------------------------------------

function CareTeams() {
  const { api } = useCtx();
  const list = usePaged(adminList(api, '/admin/care-teams'), {});
  const [version, setVersion] = useState(0);
  const reload = () => { list.reload(); setVersion((v) => v + 1); };
  const act = useAct(reload);
  const users = useAll(api, '/admin/users', {}, version);
  const [form, set, reset] = useFields({ ward: '', username: '' });
  const member = (ward, username) =>
    `/admin/care-teams/${encodeURIComponent(ward)}/members/${encodeURIComponent(username)}`;

  const add = async (e) => {
    e.preventDefault();
    const ward = form.ward.trim();
    const ok = await act.run(() => api.put(member(ward, form.username)),
      (r) => (r.changed ? `${r.username} added to ${r.ward}` : `${r.username} was in ${r.ward} already`));
    if (ok) reset();
  };
  const remove = (ward, username) => act.run(() => api.del(member(ward, username)),
    `${username} removed from ${ward}: their subscriptions to its patients ended`);

  return html`<section class="admin-section" aria-label="Care teams">
    <form class="admin-form" onSubmit=${add}>
      <h2>Add a member</h2>
      <label>Ward <input data-testid="care-ward" list="admin-wards" value=${form.ward}
        onInput=${set('ward')} required maxlength="64" autocomplete="off" /></label>
      <datalist id="admin-wards">${(list.items || []).map((w) => html`<option value=${w.ward} />`)}</datalist>
      <label>User <select data-testid="care-user" value=${form.username} onChange=${set('username')} required>
        <option value="">user…</option>
        ${users.map((u) => html`<option value=${u.username}>${u.username} (${u.role})</option>`)}
      </select></label>
      <button type="submit" data-testid="care-add" disabled=${act.busy}>Add</button>
      <p class="muted hint">A new ward name starts a new care team.</p>
    </form>
    <${Outcome} act=${act} loadError=${list.error} />
    <div class="table-wrap">
      <table class="admin-table">
        <thead><tr><th>Ward</th><th>Members</th><th>Patients (not discharged)</th></tr></thead>
        <tbody>
          ${list.items == null ? html`<${Empty} cols="3" text="Loading…" />`
            : list.items.length === 0 ? html`<${Empty} cols="3" text="No care teams." />`
            : list.items.map((w) => html`<tr key=${w.ward} data-testid="ward-row" data-ward=${w.ward}>
              <td class="nowrap"><strong>${w.ward}</strong></td>
              <td><span class="chips">${w.members.length === 0 ? html`<span class="muted">no members</span>`
                : w.members.map((m) => html`<span class="chip" data-member=${m}>${m}
                  <button type="button" class="chip-x" data-testid="care-remove" disabled=${act.busy}
                    aria-label=${`remove ${m} from ${w.ward}`} title="Remove from the care team"
                    onClick=${() => remove(w.ward, m)}>×</button></span>`)}</span></td>
              <td>${w.patients.length ? w.patients.join(', ') : html`<span class="muted">—</span>`}</td>
            </tr>`)}
        </tbody>
      </table>
    </div>
    <${Pager} list=${list} name="care-teams" />
  </section>`;
}

// -- patients ---------------------------------------------------------------------------------

function Patients() {
  const { api } = useCtx();
  const list = usePaged(adminList(api, '/admin/patients'), { include_discharged: false });
  const [version, setVersion] = useState(0);
  const reload = () => { list.reload(); setVersion((v) => v + 1); };
  const act = useAct(reload);
  const wards = useAll(api, '/admin/care-teams', {}, version);
  const [form, set, reset] = useFields({ id: '', name: '', ward: '' });

  const admit = async (e) => {
    e.preventDefault();
    const ok = await act.run(
      () => api.post('/admin/patients', { id: form.id.trim(), name: form.name.trim(), ward: form.ward.trim() }),
      (r) => `${r.id} ${r.name} admitted to ${r.ward}`,
    );
    if (ok) reset();
  };
  const discharge = (p) => act.run(
    () => api.post(`/admin/patients/${encodeURIComponent(p.id)}/discharge`),
    (r) => (r.changed === false ? `${p.id} was discharged already`
      : `${p.id} discharged${r.unbound.length ? `; unbound ${r.unbound.join(', ')}` : ''}`
        + `${r.alerts_ended ? `; ${r.alerts_ended} open alert(s) ended` : ''}`),
  );
  const includeDischarged = list.query.include_discharged;

  return html`<section class="admin-section" aria-label="Patients">
    <form class="admin-form" onSubmit=${admit}>
      <h2>Admit a patient</h2>
      <label>Id <input data-testid="patient-new-id" value=${form.id} onInput=${set('id')}
        required maxlength="64" autocomplete="off" /></label>
      <label>Name <input data-testid="patient-new-name" value=${form.name} onInput=${set('name')}
        required maxlength="200" autocomplete="off" /></label>
      <label>Ward <input data-testid="patient-new-ward" list="admin-patient-wards" value=${form.ward}
        onInput=${set('ward')} required maxlength="64" autocomplete="off" /></label>
      <datalist id="admin-patient-wards">${wards.map((w) => html`<option value=${w.ward} />`)}</datalist>
      <button type="submit" data-testid="patient-admit" disabled=${act.busy}>Admit</button>
    </form>
    <${Outcome} act=${act} loadError=${list.error} />
    <label class="admin-toggle"><input type="checkbox" data-testid="patient-include-discharged"
      checked=${includeDischarged}
      onChange=${(e) => list.setQuery({ include_discharged: e.target.checked })} /> Include discharged patients</label>
    <div class="table-wrap">
      <table class="admin-table">
        <thead><tr><th>Id</th><th>Name</th><th>Ward</th><th>Devices</th><th>Admitted</th>
          <th>Discharged</th><th></th></tr></thead>
        <tbody>
          ${list.items == null ? html`<${Empty} cols="7" text="Loading…" />`
            : list.items.length === 0 ? html`<${Empty} cols="7" text="No patients." />`
            : list.items.map((p) => html`<tr key=${p.id} data-testid="patient-row" data-patient=${p.id}
                data-discharged=${String(p.discharged_at != null)}
                class=${p.discharged_at != null ? 'is-disabled' : ''}>
              <td class="nowrap"><strong>${p.id}</strong></td>
              <td>${p.name}</td>
              <td>${p.ward}</td>
              <td>${p.devices.length ? p.devices.join(', ') : html`<span class="muted">—</span>`}</td>
              <td class="nowrap">${dateTime(p.created_at)}</td>
              <td class="nowrap">${p.discharged_at != null
                ? `${dateTime(p.discharged_at)} by ${p.discharged_by || '?'}` : html`<span class="muted">—</span>`}</td>
              <td class="nowrap">${p.discharged_at == null && html`<${Confirm} testid="patient-discharge"
                label="Discharge" busy=${act.busy}
                question=${`Discharge ${p.id}? Their devices are unbound and open alerts end.`}
                onConfirm=${() => discharge(p)} />`}</td>
            </tr>`)}
        </tbody>
      </table>
    </div>
    <${Pager} list=${list} name="patients" />
  </section>`;
}

// -- devices and bindings ---------------------------------------------------------------------

function Devices() {
  const { api } = useCtx();
  const list = usePaged(adminList(api, '/admin/devices'), {});
  const [version, setVersion] = useState(0);
  const reload = () => { list.reload(); setVersion((v) => v + 1); };
  const act = useAct(reload);
  const patients = useAll(api, '/admin/patients', {}, version); // not discharged: bindable
  const [form, set, reset] = useFields({ device_id: '', kind: 'monitor' });
  // {device_id, secret, why}: shown once, until dismissed or the page is left (never stored)
  const [secret, setSecret] = useState(null);

  const register = async (e) => {
    e.preventDefault();
    setSecret(null);
    const r = await act.run(
      () => api.post('/admin/devices', { device_id: form.device_id.trim(), kind: form.kind.trim() || 'monitor' }),
      (d) => `device ${d.device_id} registered`,
    );
    if (r) { reset(); setSecret({ ...r, why: 'registered' }); }
  };
  const rotate = async (d) => {
    setSecret(null);
    const r = await act.run(
      () => api.post(`/admin/devices/${encodeURIComponent(d.id)}/rotate-secret`),
      `new secret for ${d.id}: the old one no longer works and its session ended`,
    );
    if (r) setSecret({ ...r, why: 'rotated' });
  };

  return html`<section class="admin-section" aria-label="Devices and bindings">
    <form class="admin-form" onSubmit=${register}>
      <h2>Register a device</h2>
      <label>Device id <input data-testid="device-new-id" value=${form.device_id}
        onInput=${set('device_id')} required maxlength="64" autocomplete="off" /></label>
      <label>Kind <input data-testid="device-new-kind" value=${form.kind} onInput=${set('kind')}
        maxlength="64" autocomplete="off" /></label>
      <button type="submit" data-testid="device-register" disabled=${act.busy}>Register</button>
    </form>
    ${secret && html`<${SecretOnce} secret=${secret} onDone=${() => setSecret(null)} />`}
    <${Outcome} act=${act} loadError=${list.error} />
    <div class="table-wrap">
      <table class="admin-table">
        <thead><tr><th>Device</th><th>Kind</th><th>State</th><th>Bound to</th><th>Binding</th>
          <th>Secret</th></tr></thead>
        <tbody>
          ${list.items == null ? html`<${Empty} cols="6" text="Loading…" />`
            : list.items.length === 0 ? html`<${Empty} cols="6" text="No devices." />`
            : list.items.map((d) => html`<${DeviceRow} key=${d.id} d=${d} act=${act}
                patients=${patients} onRotate=${() => rotate(d)} />`)}
        </tbody>
      </table>
    </div>
    <${Pager} list=${list} name="devices" />
  </section>`;
}

/** A device secret, shown this once: the store keeps only its hash (docs/api.md). */
function SecretOnce({ secret, onDone }) {
  const [copied, setCopied] = useState(null);
  const code = useRef(null);
  const copy = async () => {
    try { await navigator.clipboard.writeText(secret.secret); setCopied('copied'); } catch (e) {
      // no clipboard (a page not served over https or localhost): select it for Ctrl-C instead
      const range = document.createRange();
      range.selectNodeContents(code.current);
      const sel = window.getSelection();
      sel.removeAllRanges(); sel.addRange(range);
      setCopied('selected: copy it with Ctrl-C');
    }
  };
  return html`<div class="admin-secret" role="alert" data-testid="device-secret-panel"
      data-device=${secret.device_id}>
    <p><strong>Secret of ${secret.device_id}</strong> (${secret.why}). Store it in the device now:
      <strong>it will not be shown again</strong> (the server keeps only its hash).</p>
    <code data-testid="device-secret" ref=${code}>${secret.secret}</code>
    <div class="row">
      <button type="button" data-testid="device-secret-copy" onClick=${copy}>Copy</button>
      <button type="button" data-testid="device-secret-done" onClick=${onDone}>I have stored it</button>
      ${copied && html`<span class="muted">${copied}</span>`}
    </div>
  </div>`;
}

function DeviceRow({ d, act, patients, onRotate }) {
  const { api } = useCtx();
  const [target, setTarget] = useState('');
  const id = encodeURIComponent(d.id);
  const bind = async (e) => {
    e.preventDefault();
    if (!target) return;
    const ok = await act.run(() => api.put(`/admin/bindings/${id}`, { patient_id: target }),
      (r) => (r.previous_patient_id ? `${d.id} moved from ${r.previous_patient_id} to ${r.patient_id}`
        : `${d.id} bound to ${r.patient_id}`));
    if (ok) setTarget('');
  };
  const unbind = () => act.run(() => api.del(`/admin/bindings/${id}`),
    (r) => (r.changed === false ? `${d.id} was not bound` : `${d.id} unbound: its readings go to no patient`));
  const toggle = () => act.run(() => api.post(`/admin/devices/${id}/${d.disabled ? 'enable' : 'disable'}`),
    d.disabled ? `${d.id} accepted again` : `${d.id} disabled: its session ended`);

  return html`<tr data-testid="device-row" data-device=${d.id} data-patient=${d.patient_id || ''}
      data-disabled=${String(d.disabled)} class=${d.disabled ? 'is-disabled' : ''}>
    <td class="nowrap"><strong>${d.id}</strong></td>
    <td>${d.kind}</td>
    <td class="nowrap">
      <span class=${`badge ${d.disabled ? 'off' : 'on'}`}>${d.disabled ? 'disabled' : 'enabled'}</span>
      ${d.disabled
        ? html`<button type="button" data-testid="device-enable" disabled=${act.busy} onClick=${toggle}>Enable</button>`
        : html`<button type="button" data-testid="device-disable" disabled=${act.busy} onClick=${toggle}>Disable</button>`}
    </td>
    <td class="nowrap" data-testid="device-patient">${d.patient_id || html`<span class="muted">not bound</span>`}</td>
    <td class="nowrap">
      <form class="inline" onSubmit=${bind}>
        <select data-testid="device-bind-patient" aria-label=${`patient to bind ${d.id} to`}
          value=${target} onChange=${(e) => setTarget(e.target.value)}>
          <option value="">patient…</option>
          ${patients.filter((p) => p.id !== d.patient_id)
            .map((p) => html`<option value=${p.id}>${p.id} ${p.name} (${p.ward})</option>`)}
        </select>
        <button type="submit" data-testid="device-bind" disabled=${act.busy || !target}>
          ${d.patient_id ? 'Move' : 'Bind'}</button>
      </form>
      ${d.patient_id && html`<button type="button" data-testid="device-unbind" disabled=${act.busy}
        onClick=${unbind}>Unbind</button>`}
    </td>
    <td class="nowrap"><${Confirm} testid="device-rotate" label="Rotate" busy=${act.busy}
      question=${`New secret for ${d.id}? The old one stops working at once.`}
      onConfirm=${onRotate} /></td>
  </tr>`;
}

// -- audit log --------------------------------------------------------------------------------

/**
 * GET /audit (docs/protocol.md "GET /audit") filters on the server by patient, actor, action
 * (each exact) and time (since <= at < until), newest first; pages are keyset pages: `before` =
 * the id of the last row shown (ids grow with time), so pages stay put while new entries arrive.
 * One row more than the page is asked for, to know whether there is a next page.
 */
const auditPage = (api) => async (q, before) => {
  const size = q.size || PAGE;
  // datetime-local fields are to the minute: "to 10:05" includes 10:05:59
  const since = q.from ? new Date(q.from).getTime() / 1000 : null;
  const until = q.to ? new Date(q.to).getTime() / 1000 + 60 : null;
  const rows = await api.get('/audit', {
    limit: size + 1,
    patient_id: (q.patient || '').trim() || null,
    actor: (q.actor || '').trim() || null,
    action: (q.action || '').trim() || null,
    since,
    until,
    before,
  });
  const items = rows.slice(0, size);
  return {
    items,
    next: rows.length > size ? items[items.length - 1].id : null,
    // the first page read with no cursor pins its newest id, so "previous" back to it shows the
    // same rows (not the entries logged since, among them this page's own read_audit)
    self: items.length ? items[0].id + 1 : before,
  };
};

/** The detail column: the stored JSON string, compacted (or as it is when it is not JSON). */
function compact(detail) {
  if (detail == null || detail === '') return '';
  try { return JSON.stringify(typeof detail === 'string' ? JSON.parse(detail) : detail); } catch (e) {
    return String(detail);
  }
}

function Audit() {
  const { api } = useCtx();
  const list = usePaged(auditPage(api), { size: PAGE });
  const size = list.query.size;
  const [form, set, reset] = useFields({ actor: '', action: '', patient: '', from: '', to: '' });
  // a search starts again from the newest entries (the cursor stack is dropped)
  const search = (e) => {
    e.preventDefault();
    list.setQuery({ ...form, size });
  };
  const clear = () => { reset(); list.setQuery({ size }); };

  return html`<section class="admin-section" aria-label="Audit log">
    <form class="admin-form" data-testid="audit-search" role="search" onSubmit=${search}>
      <h2>Search the audit log</h2>
      <label>Actor <input data-testid="audit-actor" value=${form.actor} onInput=${set('actor')}
        placeholder="username" autocomplete="off" /></label>
      <label>Action <input data-testid="audit-action" value=${form.action} onInput=${set('action')}
        placeholder="e.g. ack_alert" autocomplete="off" /></label>
      <label>Patient <input data-testid="audit-patient" value=${form.patient} onInput=${set('patient')}
        placeholder="patient id" autocomplete="off" /></label>
      <label>From <input type="datetime-local" data-testid="audit-from" value=${form.from}
        onInput=${set('from')} /></label>
      <label>To <input type="datetime-local" data-testid="audit-to" value=${form.to}
        onInput=${set('to')} /></label>
      <label>Per page <select data-testid="audit-limit" value=${String(size)}
        onChange=${(e) => list.setQuery({ ...list.query, size: Number(e.target.value) })}>
        ${[25, 50, 100, 250].map((n) => html`<option value=${String(n)}>${n}</option>`)}
      </select></label>
      <button type="submit" data-testid="audit-submit">Search</button>
      <button type="button" data-testid="audit-clear" onClick=${clear}>Clear</button>
    </form>
    <${Outcome} act=${{}} loadError=${list.error} />
    <p class="muted hint" data-testid="audit-window">Newest first. Actor, action and patient match
      exactly; times are this browser's local time.</p>
    <div class="table-wrap">
      <table class="admin-table audit-table">
        <thead><tr><th>Time</th><th>Actor</th><th>Action</th><th>Patient</th><th>Origin</th>
          <th>Details</th></tr></thead>
        <tbody>
          ${list.items == null ? html`<${Empty} cols="6" text="Loading…" />`
            : list.items.length === 0 ? html`<${Empty} cols="6" text="No entries match." />`
            : list.items.map((r) => html`<tr key=${r.id} data-testid="audit-row" data-id=${r.id}
                data-action=${r.action} data-actor=${r.actor}>
              <td class="nowrap">${dateTime(r.at)}</td>
              <td class="nowrap">${r.actor}</td>
              <td class="nowrap">${r.action}</td>
              <td class="nowrap">${r.patient_id || html`<span class="muted">—</span>`}</td>
              <td class="nowrap">${r.origin || html`<span class="muted">—</span>`}</td>
              <td class="detail"><code>${compact(r.detail)}</code></td>
            </tr>`)}
        </tbody>
      </table>
    </div>
    <${Pager} list=${list} name="audit" />
  </section>`;
}

// -- the page ---------------------------------------------------------------------------------

const SCREENS = {
  users: Users, 'care-teams': CareTeams, patients: Patients, devices: Devices, audit: Audit,
};

export function Admin({ section }) {
  const Screen = SCREENS[section];
  return html`<main class="admin" data-testid="admin" data-section=${section}>
    <nav class="admin-tabs" aria-label="Administration">
      ${SECTIONS.map((s) => html`<a href=${`#/admin/${s.key}`} data-testid=${`admin-tab-${s.key}`}
        class=${s.key === section ? 'on' : ''} aria-current=${s.key === section ? 'page' : undefined}>${s.label}</a>`)}
    </nav>
    ${Screen ? html`<${Screen} key=${section} />`
      : html`<p class="error" data-testid="admin-error">No admin section "${section}".</p>`}
  </main>`;
}
