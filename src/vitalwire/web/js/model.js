// What the screens show, folded from the streams as core/state.py folds them on the server:
// a patient's latest vitals, devices, open alerts, NEWS2, settings, commands and a short trend,
// and the ward's open alerts from the `alerts` stream. Screens read these models and re-render
// when they emit; only the models talk to Live.
import { Emitter, PRIORITY_RANK } from './lib.js';

/** Points of live trend a patient model keeps per metric (at 1 Hz, 8.5 minutes: the tiles'
 *  5-minute sparklines, and the patient view's seam between its history fetch and the stream). */
export const TREND_POINTS = 512;
/** The metrics a live trend is kept for (what the sparklines and the patient view chart). */
const TRENDED = new Set(['spo2', 'pulse', 'hr', 'rr', 'sbp', 'dbp', 'temp_c']);

/**
 * One metric's live trend: at most `cap` points, oldest first, in typed arrays reserved when the
 * metric first arrives and never grown (a 64-bed station's memory stays flat however long it
 * runs: issue 27's heap target). `t`, `v`, `o` are views of the points held: device time, value,
 * offset; a gap (device offline) is a point whose value and offset are NaN (`isGap`).
 */
export class Series {
  constructor(cap = TREND_POINTS) {
    this.cap = cap;
    // twice the capacity: points are appended, and slid back to the start once when it is full
    this.T = new Float64Array(cap * 2);
    this.V = new Float64Array(cap * 2);
    this.O = new Float64Array(cap * 2);
    this.start = 0;
    this.end = 0;
  }

  get length() { return this.end - this.start; }
  get t() { return this.T.subarray(this.start, this.end); }
  get v() { return this.V.subarray(this.start, this.end); }
  get o() { return this.O.subarray(this.start, this.end); }
  lastT() { return this.end > this.start ? this.T[this.end - 1] : null; }
  lastV() { return this.end > this.start ? this.V[this.end - 1] : null; }
  lastO() { return this.end > this.start ? this.O[this.end - 1] : null; }

  push(t, v, o) {
    if (this.end === this.T.length) {
      const keep = this.cap - 1;
      this.T.copyWithin(0, this.end - keep, this.end);
      this.V.copyWithin(0, this.end - keep, this.end);
      this.O.copyWithin(0, this.end - keep, this.end);
      this.start = 0;
      this.end = keep;
    }
    this.T[this.end] = t;
    this.V[this.end] = v == null ? NaN : v;
    this.O[this.end] = o == null ? NaN : o;
    this.end += 1;
    if (this.end - this.start > this.cap) this.start += 1;
  }
}

/** Render ticks: what screens show changes at most every TICK_MS, all models due in one go.
 *  64 monitors at 1 Hz with unsynchronised phases otherwise put a change into nearly every frame
 *  at 60 Hz (a model's `change` in the frame after its reading), and each such frame pays style,
 *  layout, hit testing under the pointer, layerization and commit for the whole page however
 *  small the change: a central station's busy share scaled with the frames, not with the work in
 *  them (docs/benchmarks.md, "Web app"). A reading waits at most TICK_MS more to be shown
 *  (issue 27: p99 <= 250 ms from reading to screen). */
export const TICK_MS = 100;
const due = new Set(); // what runs in the next tick's frame
let tickTimer = null;

/** Run `fn` once at the next tick (however often it is asked for before). A tick is a timer
 *  task on a fixed grid of TICK_MS (not TICK_MS after the first caller): what it changes is
 *  painted in the next frame, one frame per tick. (Not a requestAnimationFrame from the timer:
 *  that waited up to a frame more, and whatever the render's effects asked of the next frame
 *  made it a second frame per tick.) */
export function onTick(fn) {
  due.add(fn);
  if (tickTimer != null) return;
  tickTimer = setTimeout(() => {
    tickTimer = null;
    const fns = [...due];
    due.clear();
    for (const f of fns) { try { f(); } catch (e) { console.error(e); } }
  }, TICK_MS - (performance.now() % TICK_MS));
}

/** A trend point that is a gap (no data), not a value. */
export const isGap = (x) => x == null || x !== x;
const LOW_BATTERY = 20; // %, as the low_battery alert (docs/alerts.md)

export function sortAlerts(list) {
  return list.sort((a, b) => (PRIORITY_RANK[b.priority] || 0) - (PRIORITY_RANK[a.priority] || 0)
    || (a.raised_at ?? a.at) - (b.raised_at ?? b.at));
}

/** The highest priority among open alerts, and whether it is still unacknowledged (flashing). */
export function topAlert(alerts) {
  let top = null;
  for (const a of alerts) {
    if (a.state === 'resolved') continue;
    if (!top || (PRIORITY_RANK[a.priority] || 0) > (PRIORITY_RANK[top.priority] || 0)
      || ((PRIORITY_RANK[a.priority] || 0) === (PRIORITY_RANK[top.priority] || 0)
        && a.state === 'active' && top.state !== 'active')) top = a;
  }
  return top;
}

export class PatientModel extends Emitter {
  constructor(live, patient) {
    super();
    this.live = live;
    this.id = patient.id;
    this.info = patient; // {id, name, ward, devices}
    this.stream = `patient:${patient.id}`;
    this.clear();
    this.refs = 0;
    this.off = null;
    this.pending = false;
  }

  clear() {
    this.vitals = {};
    this.devices = {};
    this.alerts = [];
    this.news2 = null;
    this.limits = null;
    this.observations = null;
    this.commands = new Map(); // command_id -> {data, history: [{status, at, message}]}
    this.waveform = []; // recent waveform chunks
    this.trend = {}; // metric -> Series {t, v, o} (device time, value, offset)
    this.offset = null;
    this.lastTs = null; // device time of the latest reading
  }

  retain() {
    if (this.refs++ === 0) this.off = this.live.watch(this.stream, (m) => this.handle(m));
    return () => this.release();
  }

  release() {
    if (--this.refs === 0 && this.off) { this.off(); this.off = null; }
  }

  handle(m) {
    if (m.type === 'reset') {
      const s = m.snapshot;
      const keep = this.trend;
      const commands = this.commands;
      this.clear();
      this.trend = keep; // readings already drawn stay; new ones come after m.offset
      this.commands = commands;
      this.vitals = { ...s.vitals };
      this.devices = { ...s.devices };
      this.alerts = sortAlerts([...s.alerts]);
      this.news2 = s.news2;
      this.offset = m.offset;
      for (const v of Object.values(this.vitals)) if (v && v.ts > (this.lastTs || 0)) this.lastTs = v.ts;
      this.emit('reset', m); // a fresh snapshot: a history view reloads (events may be missing)
    } else if (m.type === 'event') {
      this.apply(m.event);
    } else if (m.type === 'ended') {
      this.ended = m.reason;
    }
    this.schedule();
  }

  /** Re-render at the next render tick, however many events came before it. */
  schedule() {
    if (this.pending) return;
    this.pending = true;
    onTick(() => { this.pending = false; this.emit('change'); });
  }

  apply(ev) {
    this.offset = ev.offset;
    const d = ev.data;
    switch (ev.kind) {
      case 'reading': {
        for (const [k, v] of Object.entries(d)) {
          if (k === 'device' || k === 'seq' || k === 'ts' || k === 'late') continue;
          this.vitals[k] = { value: v, ts: d.ts, device: d.device, offset: ev.offset };
          if (typeof v === 'number' && TRENDED.has(k)) this.push(k, d.ts, v, ev.offset);
        }
        if (!d.late && d.ts > (this.lastTs || 0)) this.lastTs = d.ts;
        this.emit('reading', ev);
        break;
      }
      case 'device_status':
        this.devices[d.device] = { status: d.status, ts: ev.ts, reason: d.reason ?? null };
        if (d.status === 'offline') this.gap(ev.ts);
        this.emit('device_status', ev); // the patient view's trend draws offline as a gap
        break;
      case 'binding':
        if (d.action === 'unbind') delete this.devices[d.device];
        break;
      case 'alert': {
        const i = this.alerts.findIndex((a) => a.alert_id === d.alert_id);
        const raised = i >= 0 ? this.alerts[i].raised_at : d.at;
        if (i >= 0) this.alerts.splice(i, 1);
        if (d.state !== 'resolved') this.alerts.push({ ...d, raised_at: raised });
        sortAlerts(this.alerts);
        this.emit('alert', d);
        break;
      }
      case 'news2': this.news2 = d; break;
      case 'settings':
        if (d.limits) this.limits = d.limits;
        if (d.observations) this.observations = d.observations;
        break;
      case 'command': this.command(d); break;
      case 'waveform':
        this.waveform.push(d);
        if (this.waveform.length > 200) this.waveform.splice(0, this.waveform.length - 200);
        this.emit('waveform', d);
        break;
      default: break;
    }
  }

  command(d) {
    let c = this.commands.get(d.command_id);
    if (!c) { c = { data: d, history: [] }; this.commands.set(d.command_id, c); }
    if (!c.history.some((h) => h.status === d.status)) {
      c.history.push({ status: d.status, at: d.at, message: d.message });
    }
    c.data = { ...c.data, ...d };
  }

  push(metric, t, v, offset) {
    let s = this.trend[metric];
    if (!s) { s = new Series(); this.trend[metric] = s; }
    const last = s.lastO();
    if (!isGap(last) && offset != null && offset <= last) return; // held already
    s.push(t, v, offset);
  }

  /** An offline marker: a gap point so a chart shows "no data" instead of joining the line. */
  gap(t) {
    for (const s of Object.values(this.trend)) {
      if (s.length && !isGap(s.lastV())) s.push(Math.max(t, s.lastT()), null, null);
    }
  }

  get top() { return topAlert(this.alerts); }

  /** Device problems for the tile: offline, probe off, battery low. */
  get deviceFlags() {
    const flags = [];
    const devs = Object.entries(this.devices);
    if (devs.some(([, s]) => s.status === 'offline')) flags.push('offline');
    if (this.vitals.probe && this.vitals.probe.value === false) flags.push('probe off');
    else if (this.alerts.some((a) => a.condition === 'probe_off')) flags.push('probe off');
    const bat = this.vitals.battery;
    if ((bat && bat.value < LOW_BATTERY) || this.alerts.some((a) => a.condition === 'low_battery')) {
      flags.push('battery low');
    }
    return flags;
  }
}

/** The user's ward: their patients (GET /patients), a model for each, and the alerts stream. */
export class Ward extends Emitter {
  constructor(api, live) {
    super();
    this.api = api;
    this.live = live;
    this.patients = []; // [{id, name, ward, devices}]
    this.models = new Map();
    this.alerts = []; // open alerts of every watched patient (alerts stream), highest first
    this.loaded = false;
    this.error = null;
    this.offAlerts = null;
  }

  async load() {
    try {
      const list = await this.api.get('/patients');
      this.patients = list;
      for (const p of list) {
        const m = this.models.get(p.id);
        if (m) m.info = p; else this.models.set(p.id, new PatientModel(this.live, p));
      }
      this.loaded = true;
      this.error = null;
    } catch (e) {
      this.error = e.message;
    }
    this.emit('change');
    return this.patients;
  }

  /** On a cloud (docs/howto-edge.md): whether each edge-owned patient's ward gateway is
   * connected, from GET /edges (a patient of GET /patients with `edge` is an edge's). */
  async refreshEdges() {
    if (!this.patients.some((p) => p.edge)) return;
    let edges;
    try {
      ({ edges } = await this.api.get('/edges'));
    } catch (e) {
      return; // the socket's own status says when the server is away
    }
    const byNode = new Map(edges.map((e) => [e.node, e]));
    let changed = false;
    for (const p of this.patients) {
      const e = p.edge && byNode.get(p.edge.node);
      if (!e) continue;
      const since = e.connected ? null : (e.down_since ?? null);
      if (e.connected !== p.edge.connected || since !== (p.edge.since ?? null)) {
        p.edge = { node: e.node, connected: e.connected, since };
        changed = true;
      }
    }
    if (changed) this.emit('change');
  }

  model(id) {
    let m = this.models.get(id);
    if (!m) { m = new PatientModel(this.live, { id, name: id, ward: null, devices: [] }); this.models.set(id, m); }
    return m;
  }

  /** Watch the alerts stream for the banner. */
  watchAlerts() {
    if (this.offAlerts) return this.offAlerts;
    const off = this.live.watch('alerts', (m) => {
      if (m.type === 'reset') this.alerts = sortAlerts([...m.snapshot.alerts]);
      else if (m.type === 'event') {
        const d = m.event.data;
        const i = this.alerts.findIndex((a) => a.alert_id === d.alert_id);
        const raised = i >= 0 ? this.alerts[i].raised_at : d.at;
        if (i >= 0) this.alerts.splice(i, 1);
        if (d.state !== 'resolved') this.alerts.push({ ...d, raised_at: raised });
        sortAlerts(this.alerts);
      }
      this.emit('alerts');
    });
    this.offAlerts = () => { off(); this.offAlerts = null; };
    return this.offAlerts;
  }

  /** Acknowledge over the socket (REST when the socket is down). */
  async acknowledge(alertId) {
    if (this.live.ready) return this.live.send({ type: 'ack_alert', alert_id: alertId });
    return this.api.post(`/alerts/${encodeURIComponent(alertId)}/acknowledge`);
  }
}
