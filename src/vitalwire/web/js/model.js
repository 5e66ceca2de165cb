// What the screens show, folded from the streams as core/state.py folds them on the server:
// a patient's latest vitals, devices, open alerts, NEWS2, settings, commands and a short trend,
// and the ward's open alerts from the `alerts` stream. Screens read these models and re-render
// when they emit; only the models talk to Live.
import { Emitter, PRIORITY_RANK } from './lib.js';

/** Seconds of live trend a patient model keeps (the tiles' sparklines, the patient view's tail). */
export const TREND_KEEP_S = 3600;
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
    this.trend = {}; // metric -> {t: [], v: [], o: []} (device time, value, offset)
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

  /** Re-render at most once per animation frame, however many events came in it. */
  schedule() {
    if (this.pending) return;
    this.pending = true;
    requestAnimationFrame(() => { this.pending = false; this.emit('change'); });
  }

  apply(ev) {
    this.offset = ev.offset;
    const d = ev.data;
    switch (ev.kind) {
      case 'reading': {
        for (const [k, v] of Object.entries(d)) {
          if (k === 'device' || k === 'seq' || k === 'ts' || k === 'late') continue;
          this.vitals[k] = { value: v, ts: d.ts, device: d.device, offset: ev.offset };
          if (typeof v === 'number') this.push(k, d.ts, v, ev.offset);
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
    if (!s) { s = { t: [], v: [], o: [] }; this.trend[metric] = s; }
    const n = s.t.length;
    if (n && s.o[n - 1] != null && offset != null && offset <= s.o[n - 1]) return;
    s.t.push(t); s.v.push(v); s.o.push(offset);
    const cut = t - TREND_KEEP_S;
    let drop = 0;
    while (drop < s.t.length && s.t[drop] < cut) drop++;
    if (drop) { s.t.splice(0, drop); s.v.splice(0, drop); s.o.splice(0, drop); }
  }

  /** An offline marker: a null point so a chart shows "no data" instead of joining the line. */
  gap(t) {
    for (const s of Object.values(this.trend)) {
      const n = s.t.length;
      if (n && s.v[n - 1] != null) { s.t.push(Math.max(t, s.t[n - 1])); s.v.push(null); s.o.push(null); }
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
