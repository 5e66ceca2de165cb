// The doctor's patient view (#/patient/<id>): live header, trends from the history API extended
// live, the pleth waveform, alert history, commands with their lifecycle, the limits editor and
// NEWS2 (observations form and trend). Live data comes from the patient's model (model.js), the
// history from REST (docs/api.md); nothing here talks to the socket except through `live.send`.
import { html, useState, useEffect, useRef, useMemo, uPlot, METRICS, fmt, clock, dateTime } from './lib.js';
import { useCtx } from './ctx.js';
import { Chart, COLORS, timeAxes, line, alpha } from './charts.js';

const METRIC = Object.fromEntries(METRICS.map((m) => [m.key, m]));
const CAN_ACT = new Set(['clinician', 'admin']);

function useLiveStatus(live) {
  const [status, setStatus] = useState(live.status);
  useEffect(() => live.on((what, s) => { if (what === 'status') setStatus({ ...s }); }), [live]);
  return status;
}

function useNow(ms) {
  const [now, setNow] = useState(Date.now() / 1000);
  useEffect(() => {
    const t = setInterval(() => setNow(Date.now() / 1000), ms);
    return () => clearInterval(t);
  }, [ms]);
  return now;
}

/** The alarm signal of the highest open alert (IEC 60601-1-8 table 3: high flashes fast, medium
 * slowly, low is steady; an acknowledged alarm stops flashing but keeps its colour). */
function signal(top) {
  if (!top) return { cls: '', priority: 'none' };
  const flashing = top.state === 'active' && top.priority !== 'low';
  return { cls: `prio-${top.priority}${flashing ? ` flash-${top.priority}` : ''}`, priority: top.priority };
}

/** Walk a cursor-paged list (docs/api.md "Pagination"): every page's items, and the vitals
 * history's offline/online markers of every page (by offset, once each). */
async function walk(api, path, query, max = 50) {
  const items = [];
  const gaps = new Map();
  let cursor = null;
  for (let i = 0; i < max; i++) {
    const page = await api.get(path, { ...query, cursor });
    items.push(...(page.items || []));
    for (const g of page.gaps || []) gaps.set(g.offset, g);
    if (!page.next_cursor) break;
    cursor = page.next_cursor;
  }
  return { items, gaps: [...gaps.values()] };
}

/** What an open alert says: its message, except that an acknowledgement's message ("acknowledged
 * by ...") would hide the condition, so that one says both. */
function alertText(a) {
  if (a.action === 'acknowledged') return `${a.condition}: acknowledged${a.by ? ` by ${a.by}` : ''}`;
  return a.message || a.condition;
}

// ---- header ------------------------------------------------------------------------------------

function Num({ vitals, k }) {
  const m = METRIC[k];
  const v = vitals[k];
  return html`<div class=${`pv-num pv-num-${k}`}>
    <span class="lbl">${m.label}</span>
    <span class="val" data-metric=${k}>${fmt(v && v.value, m.digits)}</span>
    <span class="unit">${m.unit}</span>
  </div>`;
}

function Header({ model, status }) {
  const { vitals, news2 } = model;
  const top = model.top;
  const sig = signal(top);
  const p = model.info;
  return html`<section class="pv-header card">
    <div class="pv-title">
      <a href="#/" class="back" data-testid="back-to-station">← Central station</a>
      <h1><span class="pv-name">${p.name || model.id}</span>
        <span class="muted pv-id">${model.id}${p.ward ? ` · ${p.ward}` : ''}</span></h1>
      ${!status.live && html`<span class="stale-mark" data-testid="stale" title=${status.reason || ''}>not live since ${clock(status.since)}</span>`}
      ${status.live && p.edge && !p.edge.connected && html`<span class="stale-mark" data-testid="gateway">ward gateway ${p.edge.node} unreachable${p.edge.since ? ` since ${clock(p.edge.since)}` : ''}: commands, acknowledgements and limits cannot reach the ward</span>`}
    </div>
    <div class="pv-nums">
      <${Num} vitals=${vitals} k="spo2" />
      <${Num} vitals=${vitals} k="pulse" />
      <${Num} vitals=${vitals} k="hr" />
      <${Num} vitals=${vitals} k="rr" />
      <div class="pv-num pv-num-bp">
        <span class="lbl">BP</span>
        <span class="val"><span data-metric="sbp">${fmt(vitals.sbp && vitals.sbp.value, 0)}</span>/<span
          data-metric="dbp">${fmt(vitals.dbp && vitals.dbp.value, 0)}</span></span>
        <span class="unit">mmHg</span>
      </div>
      <${Num} vitals=${vitals} k="temp_c" />
    </div>
    <div class="pv-status">
      <span class="pv-news2" data-testid="news2" data-band=${news2 ? news2.band : 'none'}
        title=${news2 && news2.missing && news2.missing.length ? `missing: ${news2.missing.join(', ')}` : ''}>
        NEWS2 <b>${news2 ? news2.display : '—'}</b></span>
      ${model.deviceFlags.map((f) => html`<span class="flag" data-testid="device-flag">${f}</span>`)}
      ${Object.entries(model.devices).map(([d, s]) => html`<span class="muted dev">${d}: ${s.status}</span>`)}
      <span class=${`pv-alarm ${sig.cls}`} data-testid="patient-alarm" data-priority=${sig.priority}>
        ${top ? alertText(top) : 'no open alarm'}</span>
    </div>
  </section>`;
}

// ---- trends ------------------------------------------------------------------------------------

const RANGES = [
  { key: '15m', label: '15 min', s: 900 },
  { key: '1h', label: '1 h', s: 3600 },
  { key: '6h', label: '6 h', s: 21600 },
  { key: '24h', label: '24 h', s: 86400 },
];
const RAW_MAX_S = 3600; // up to 1 h: raw readings; longer: buckets (docs/api.md, vitals history)
const MAX_BUCKETS = 1000;
const PANELS = [
  { key: 'spo2', label: 'SpO₂', unit: '%', metrics: ['spo2'] },
  { key: 'rate', label: 'Pulse / HR', unit: '/min', metrics: ['pulse', 'hr'] },
  { key: 'rr', label: 'RR', unit: '/min', metrics: ['rr'] },
  { key: 'bp', label: 'BP', unit: 'mmHg', metrics: ['sbp', 'dbp'] },
  { key: 'temp', label: 'Temp', unit: '°C', metrics: ['temp_c'], digits: 1 },
];
const PLOTTED = PANELS.flatMap((p) => p.metrics);
const SKIP = new Set(['device', 'seq', 'ts', 'late']);

/**
 * One range's trend: raw readings (≤ 1 h) or buckets, and the offline markers, from the history
 * API, then extended live. Raw readings are kept by offset: a live reading is appended only when
 * its offset is above the last one held, so nothing is doubled at the seam between the history
 * fetch and the stream, and the model's own trend fills what came between.
 */
export class Trend {
  constructor(range) {
    this.range = range;
    this.raw = range.s <= RAW_MAX_S;
    this.readings = []; // raw: {t (device time), o (offset), v: {metric: value}}, by offset
    this.gaps = []; // times of offline markers (server time: the device clock is seconds away)
    this.buckets = []; // bucketed: {start, m: {metric: {min, max, mean, count}}}
    this.bucket = null;
    this.lastOffset = -1;
    this.loaded = false;
    this.error = null;
  }

  window(now) {
    return [now - this.range.s, now];
  }

  async load(api, pid, model) {
    const now = Date.now() / 1000;
    // `to` a minute ahead: receive times may run ahead of this browser's clock
    const query = { from: Math.floor(now - this.range.s), to: Math.ceil(now + 60) };
    if (this.raw) {
      const { items, gaps } = await walk(api, `/patients/${encodeURIComponent(pid)}/vitals`,
        { ...query, limit: 1000 }, 200);
      for (const it of items) this.addReading(it.measured ?? it.ts, it.offset, it.values || {});
      this.addGaps(gaps);
      this.seam(model);
    } else {
      const bucket = Math.ceil(this.range.s / MAX_BUCKETS);
      const page = await api.get(`/patients/${encodeURIComponent(pid)}/vitals`,
        { ...query, bucket, metrics: PLOTTED.join(',') });
      this.bucket = page.bucket;
      this.buckets = (page.buckets || []).map((b) => ({ start: b.start, m: b.metrics }));
      this.addGaps(page.gaps);
      this.lastOffset = model.offset ?? -1;
    }
    this.loaded = true;
  }

  addGaps(gaps) {
    for (const g of gaps || []) if (g.status === 'offline') this.gaps.push(g.ts);
  }

  /** After the history: the model's trend points above the history's last offset. */
  seam(model) {
    const byOffset = new Map();
    for (const [metric, s] of Object.entries(model.trend)) {
      for (let i = 0; i < s.t.length; i++) {
        const o = s.o[i];
        if (o == null || o !== o) { // a gap point (NaN offset in the model's trend)
          if (s.t[i] > (this.lastT() ?? 0)) this.gaps.push(s.t[i]);
          continue;
        }
        if (o <= this.lastOffset) continue;
        let r = byOffset.get(o);
        if (!r) { r = { t: s.t[i], o, v: {} }; byOffset.set(o, r); }
        r.v[metric] = s.v[i];
      }
    }
    for (const o of [...byOffset.keys()].sort((a, b) => a - b)) {
      const r = byOffset.get(o);
      this.addReading(r.t, r.o, r.v);
    }
  }

  lastT() {
    const n = this.readings.length;
    return n ? this.readings[n - 1].t : null;
  }

  addReading(t, o, values) {
    if (o == null || o <= this.lastOffset) return false;
    this.readings.push({ t, o, v: values });
    this.lastOffset = o;
    return true;
  }

  /** A live reading event from the model. */
  live(ev) {
    const values = {};
    for (const [k, v] of Object.entries(ev.data)) if (!SKIP.has(k) && typeof v === 'number') values[k] = v;
    if (this.raw) return this.addReading(ev.data.ts, ev.offset, values);
    if (ev.offset <= this.lastOffset) return false;
    this.lastOffset = ev.offset;
    // epoch-aligned buckets (ranges over 3 h): fold the reading into its bucket
    const start = Math.floor(ev.data.ts / this.bucket) * this.bucket;
    let b = this.buckets[this.buckets.length - 1];
    if (!b || b.start < start) { b = { start, m: {} }; this.buckets.push(b); }
    else if (b.start > start) return false; // older than the last bucket: already summarised
    for (const [k, v] of Object.entries(values)) {
      const s = b.m[k];
      if (!s) b.m[k] = { min: v, max: v, mean: v, count: 1, last: v };
      else {
        s.mean = (s.mean * s.count + v) / (s.count + 1);
        s.count += 1; s.min = Math.min(s.min, v); s.max = Math.max(s.max, v); s.last = v;
      }
    }
    return true;
  }

  /** Drop what slid out of the window. */
  trim(now) {
    const [from] = this.window(now);
    let i = 0;
    while (i < this.readings.length && this.readings[i].t < from) i++;
    if (i) this.readings.splice(0, i);
    let j = 0;
    while (j < this.buckets.length && this.buckets[j].start + (this.bucket || 0) < from) j++;
    if (j) this.buckets.splice(0, j);
    this.gaps = this.gaps.filter((g) => g >= from);
  }

  /** uPlot data of one panel: x, then per metric a value series (raw) or mean, min, max. */
  data(panel) {
    if (this.raw) {
      const pts = [];
      for (const r of this.readings) {
        if (panel.metrics.some((m) => r.v[m] != null)) pts.push(r);
      }
      for (const g of this.gaps) pts.push({ t: g, v: {} }); // null: drawn as a gap
      pts.sort((a, b) => a.t - b.t);
      return [pts.map((p) => p.t), ...panel.metrics.map((m) => pts.map((p) => p.v[m] ?? null))];
    }
    const pts = [];
    let prev = null;
    const gaps = [...this.gaps].sort((a, b) => a - b);
    let gi = 0;
    for (const b of this.buckets) {
      if (!panel.metrics.some((m) => b.m[m])) continue;
      let gap = prev != null && b.start - prev > 1.5 * this.bucket; // no bucket: no data
      while (gi < gaps.length && gaps[gi] < b.start) { if (prev != null && gaps[gi] > prev) gap = true; gi++; }
      if (gap) pts.push({ start: prev + this.bucket, m: {} });
      pts.push(b);
      prev = b.start;
    }
    const cols = [pts.map((p) => p.start)];
    for (const m of panel.metrics) {
      cols.push(pts.map((p) => (p.m[m] ? p.m[m].mean : null)));
      cols.push(pts.map((p) => (p.m[m] ? p.m[m].min : null)));
      cols.push(pts.map((p) => (p.m[m] ? p.m[m].max : null)));
    }
    return cols;
  }

  /** What the tests read: every reading offset plotted, ascending, and the values. */
  snapshot(pid) {
    const readings = [...this.readings].sort((a, b) => a.o - b.o);
    const values = {};
    for (const m of PLOTTED) values[m] = readings.map((r) => r.v[m] ?? null);
    return { patient: pid, range: this.range.key, raw: this.raw, loaded: this.loaded,
      offsets: readings.map((r) => r.o), values };
  }
}

function panelOpts(panel, raw) {
  const series = [{}];
  const bands = [];
  for (const m of panel.metrics) {
    const c = COLORS[m];
    const name = METRIC[m].label;
    if (raw) series.push(line(name, c));
    else {
      const i = series.length;
      series.push(line(`${name} mean`, c));
      series.push(line(`${name} min`, alpha(c, 0.35), { width: 1 }));
      series.push(line(`${name} max`, alpha(c, 0.35), { width: 1 }));
      bands.push({ series: [i + 2, i + 1], fill: alpha(c, 0.12) });
    }
  }
  // no uPlot legend (six rows of it in bucket mode): the panel's key says which colour is what
  return { series, bands, axes: timeAxes(panel.unit, panel.digits || 0), legend: { show: false },
    cursor: { sync: { key: 'pv-trend' } } };
}

function Trends({ model, pid }) {
  const { api, live } = useCtx();
  const [rangeKey, setRangeKey] = useState('15m');
  const [reload, setReload] = useState(0);
  const [trend, setTrend] = useState(null);
  const [, redraw] = useState(0);
  const now = useNow(5000);

  useEffect(() => {
    const range = RANGES.find((r) => r.key === rangeKey);
    const t = new Trend(range);
    let gone = false;
    let frame = 0;
    const paint = () => {
      if (frame) return;
      frame = requestAnimationFrame(() => { frame = 0; if (!gone) redraw((n) => n + 1); });
    };
    setTrend(t);
    let started = false;
    const offs = [
      model.on((what, ev) => {
        // a new snapshot after the history was asked for (a resume the server could not honour,
        // or the subscription came late): the stream may have moved on without us, read again
        if (what === 'reset' && started) { setReload((n) => n + 1); return; }
        if (!t.loaded) return;
        if (what === 'reading') { if (t.live(ev)) paint(); }
        else if (what === 'device_status' && ev.data.status === 'offline') { t.gaps.push(ev.ts); paint(); }
      }),
    ];
    (async () => {
      // wait for the subscription: the store holds every event up to its offset (events are
      // published only once committed), so history plus the model's later trend misses nothing
      // (a stream's entry is new, its offset null, until its `subscribed` arrives)
      const subscribed = () => { const e = live.streams.get(model.stream); return e && e.offset != null; };
      for (let i = 0; i < 50 && !subscribed() && !gone; i++) await new Promise((r) => setTimeout(r, 100));
      if (gone) return;
      started = true;
      try { await t.load(api, pid, model); } catch (e) { t.error = e.message; }
      if (!gone) paint();
    })();
    window.vitalwire.patientTrend = () => t.snapshot(pid);
    return () => {
      gone = true;
      offs.forEach((f) => f());
      if (frame) cancelAnimationFrame(frame);
      if (window.vitalwire.patientTrend) delete window.vitalwire.patientTrend;
    };
  }, [rangeKey, model, pid, reload]);

  const opts = useMemo(() => {
    const raw = (RANGES.find((r) => r.key === rangeKey) || RANGES[0]).s <= RAW_MAX_S;
    return Object.fromEntries(PANELS.map((p) => [p.key, panelOpts(p, raw)]));
  }, [rangeKey]);

  const t = trend && trend.range.key === rangeKey ? trend : null;
  const wallNow = Math.max(now, Date.now() / 1000, t && t.lastT() ? t.lastT() : 0);
  if (t) t.trim(wallNow);
  const xRange = t ? t.window(wallNow) : null;

  return html`<section class="card pv-trends">
    <div class="card-head">
      <h2>Trends</h2>
      <div class="ranges" role="group" aria-label="trend range">
        ${RANGES.map((r) => html`<button class=${r.key === rangeKey ? 'on' : ''} data-testid=${`range-${r.key}`}
          aria-pressed=${String(r.key === rangeKey)} onClick=${() => setRangeKey(r.key)}>${r.label}</button>`)}
      </div>
    </div>
    <div data-testid="trend-chart" data-range=${rangeKey} data-loaded=${String(!!(t && t.loaded))}
      data-raw=${String(!t || t.raw)} class="trend-panels">
      ${t && t.error && html`<p class="error">${t.error}</p>`}
      ${t && !t.loaded && html`<p class="muted">Loading history…</p>`}
      ${t && !t.raw && t.bucket && html`<p class="muted small">Buckets of ${t.bucket} s: mean, with the min–max band.</p>`}
      ${PANELS.map((p) => html`<div class="trend-panel" data-panel=${p.key}>
        <div class="key">${p.metrics.map((m) => html`<span style=${{ color: COLORS[m] }}>${METRIC[m].label}</span>`)}
          ${t && t.raw ? '' : html`<span class="muted">mean, min–max</span>`}</div>
        <${Chart} key=${`${rangeKey}-${p.key}`} opts=${opts[p.key]} height=${120}
          data=${t ? t.data(p) : opts[p.key].series.map(() => [])}
          xRange=${xRange} label=${`${p.label} trend`} />
      </div>`)}
    </div>
  </section>`;
}

// ---- pleth waveform ----------------------------------------------------------------------------

const WAVE_KEEP_S = 5;
const WAVE_OPTS = {
  series: [{}, line('Pleth', COLORS.pleth, { width: 1.5 })],
  axes: timeAxes('Pleth', 2),
  legend: { show: false },
  cursor: { show: false },
  scales: { y: { range: [0, 1.05] } },
};

function Waveform({ model, pid, canAct }) {
  const { live } = useCtx();
  const wave = useRef({ t: [], v: [] });
  const [, redraw] = useState(0);
  const [state, setState] = useState({ busy: false, error: null, command: null });

  useEffect(() => {
    let frame = 0;
    const off = model.on((what, d) => {
      if (what !== 'waveform' || d.kind !== 'pleth') return;
      const w = wave.current;
      const step = 1 / (d.rate_hz || 100);
      let last = w.t.length ? w.t[w.t.length - 1] : -Infinity;
      d.samples.forEach((s, i) => {
        const t = d.ts + i * step;
        if (t <= last) return; // a resent chunk
        w.t.push(t); w.v.push(s); last = t;
      });
      // keep ~5 s: the line sweeps along with the newest sample
      const cut = last - WAVE_KEEP_S;
      let n = 0;
      while (n < w.t.length && w.t[n] < cut) n++;
      if (n) { w.t.splice(0, n); w.v.splice(0, n); }
      if (!frame) frame = requestAnimationFrame(() => { frame = 0; redraw((x) => x + 1); });
    });
    return () => { off(); if (frame) cancelAnimationFrame(frame); };
  }, [model]);

  const request = async () => {
    setState({ busy: true, error: null, command: null });
    try {
      const data = await live.send({ type: 'command', patient_id: pid, name: 'request_data',
        args: { kind: 'pleth', duration_s: 10 } });
      setState({ busy: false, error: null, command: data.command });
    } catch (e) {
      setState({ busy: false, error: e.message, command: null });
    }
  };

  const w = wave.current;
  const last = w.t.length ? w.t[w.t.length - 1] : null;
  const cmd = state.command && model.commands.get(state.command.command_id);
  return html`<section class="card pv-wave">
    <div class="card-head">
      <h2>Pleth waveform</h2>
      ${canAct && html`<button data-testid="waveform-request" onClick=${request} disabled=${state.busy}>
        Request 10 s of pleth</button>`}
    </div>
    ${state.error && html`<p class="error" role="alert">${state.error}</p>`}
    ${cmd && html`<p class="muted small">request_data: ${cmd.data.status}${cmd.data.message ? ` (${cmd.data.message})` : ''}</p>`}
    <${Chart} opts=${WAVE_OPTS} height=${120} testid="waveform" label="pleth waveform"
      data=${[w.t.slice(), w.v.slice()]} xRange=${last != null ? [last - WAVE_KEEP_S, last] : null} />
    ${!w.t.length && html`<p class="muted small">No waveform yet${canAct ? ': request one' : ''}.</p>`}
  </section>`;
}

// ---- alerts ------------------------------------------------------------------------------------

function Alerts({ model, pid, canAct }) {
  const { api, ward } = useCtx();
  const [rows, setRows] = useState([]);
  const [cursor, setCursor] = useState(null);
  const [error, setError] = useState(null);
  const [ackError, setAckError] = useState(null);
  const [busy, setBusy] = useState(false);

  const more = async (from) => {
    setBusy(true);
    try {
      const page = await api.get('/alerts', { patient: pid, limit: 20, cursor: from });
      setRows((old) => {
        const seen = new Set(old.map((r) => r.alert_id));
        return [...old, ...page.items.filter((a) => !seen.has(a.alert_id))];
      });
      setCursor(page.next_cursor);
      setError(null);
    } catch (e) { setError(e.message); }
    setBusy(false);
  };

  useEffect(() => { setRows([]); more(null); }, [pid]);

  // live alert changes update their row (state, who acknowledged), a new alert goes on top
  useEffect(() => model.on((what, d) => {
    if (what !== 'alert') return;
    setRows((old) => {
      const i = old.findIndex((r) => r.alert_id === d.alert_id);
      const prev = i >= 0 ? old[i] : { alert_id: d.alert_id, patient_id: d.patient_id,
        condition: d.condition, category: d.category, raised_at: d.at, acknowledged_at: null,
        acknowledged_by: null, resolved_at: null };
      const row = { ...prev, priority: d.priority, state: d.state, updated_at: d.at,
        escalation_level: d.escalation_level,
        message: d.action === 'acknowledged' && prev.message ? prev.message : d.message };
      if (d.action === 'acknowledged' || (d.action === 'resolved' && d.by)) {
        row.acknowledged_by = d.by; row.acknowledged_at = d.at;
      }
      if (d.state === 'resolved') row.resolved_at = d.at;
      return i >= 0 ? [...old.slice(0, i), row, ...old.slice(i + 1)] : [row, ...old];
    });
  }), [model]);

  const ack = async (id) => {
    setAckError(null);
    try { await ward.acknowledge(id); } catch (e) { setAckError(e.message); }
  };

  const messages = new Map(model.alerts.map((a) => [a.alert_id, a.message]));
  return html`<section class="card pv-alerts">
    <div class="card-head"><h2>Alerts</h2></div>
    ${model.alerts.length ? html`<ul class="open-alerts">
      ${model.alerts.map((a) => html`<li class=${`open-alert ${signal(a).cls}`} data-testid="open-alert"
        data-alert-id=${a.alert_id} data-state=${a.state} data-priority=${a.priority}>
        <span class="prio">${a.priority}</span>
        <span class="msg">${alertText(a)}</span>
        <span class="muted">${a.state} · ${clock(a.raised_at ?? a.at)}</span>
        ${canAct && a.state === 'active' && html`<button data-testid="alert-ack" data-alert-id=${a.alert_id}
          onClick=${() => ack(a.alert_id)}>Acknowledge</button>`}
      </li>`)}
    </ul>` : html`<p class="muted small">No open alert.</p>`}
    ${ackError && html`<p class="error" role="alert">${ackError}</p>`}
    <div class="table-wrap">
      <table data-testid="alert-history" class="alert-history">
        ${rows.length > 0 && html`<thead><tr><th>Raised</th><th>Condition</th><th>Priority</th><th>State</th><th>Acknowledged</th><th>Resolved</th></tr></thead>`}
        <tbody>
          ${rows.map((a) => html`<tr data-testid="alert-row" data-alert-id=${a.alert_id} data-state=${a.state}>
            <td>${dateTime(a.raised_at)}</td>
            <td>${a.condition}${(a.message || messages.get(a.alert_id)) && html`<div class="muted small">${a.message || messages.get(a.alert_id)}</div>`}</td>
            <td><span class=${`prio-chip prio-${a.priority}`}>${a.priority}</span></td>
            <td>${a.state}${a.escalation_level ? ` (esc. ${a.escalation_level})` : ''}</td>
            <td>${a.acknowledged_by ? html`<span data-testid="alert-acked-by">${a.acknowledged_by}</span> ${clock(a.acknowledged_at)}` : '—'}</td>
            <td>${a.resolved_at ? clock(a.resolved_at) : '—'}</td>
          </tr>`)}
        </tbody>
      </table>
    </div>
    ${error && html`<p class="error">${error}</p>`}
    ${!rows.length && !error && html`<p class="muted small">No alert in the history.</p>`}
    ${cursor && html`<button data-testid="alert-more" disabled=${busy} onClick=${() => more(cursor)}>More</button>`}
  </section>`;
}

// ---- commands ----------------------------------------------------------------------------------

// The command catalogue (docs/howto-commands.md; core/commands.py CATALOGUE) and its arguments.
const COMMANDS = {
  report_now: [],
  set_interval: [{ name: 'interval_s', type: 'number', min: 0.1, max: 3600, step: 0.1, required: true, placeholder: '0.1–3600 s' }],
  request_data: [
    { name: 'kind', type: 'select', options: ['pleth', 'burst'] },
    { name: 'duration_s', type: 'number', min: 1, max: 60, placeholder: '1–60 s (10)' },
    { name: 'rate_hz', type: 'number', min: 1, max: 500, placeholder: '1–500 Hz (100)' },
  ],
  identify: [{ name: 'duration_s', type: 'number', min: 1, max: 60, placeholder: '1–60 s (10)' }],
  silence: [{ name: 'duration_s', type: 'number', min: 1, max: 120, placeholder: '1–120 s (120)' }],
  reset: [],
};
// queued -> sent -> acknowledged -> one final status (DESIGN.md 5; core/commands.py)
const STEP_RANK = { queued: 0, sent: 1, acknowledged: 2, completed: 3, failed: 3, expired: 3, timed_out: 3 };

function latest(history) {
  return history.reduce((best, h) => (!best || (STEP_RANK[h.status] ?? 0) >= (STEP_RANK[best.status] ?? 0) ? h : best), null);
}

function CommandForm({ pid, onSent }) {
  const { live } = useCtx();
  const [name, setName] = useState('report_now');
  const [args, setArgs] = useState({});
  const [error, setError] = useState(null);
  const [busy, setBusy] = useState(false);

  const send = async (e) => {
    e.preventDefault();
    setBusy(true); setError(null);
    const out = {};
    for (const a of COMMANDS[name]) {
      const v = args[a.name];
      if (v == null || v === '') continue;
      out[a.name] = a.type === 'number' ? Number(v) : v;
    }
    try {
      const data = await live.send({ type: 'command', patient_id: pid, name, args: out });
      onSent(data.command);
    } catch (err) { setError(err.message); }
    setBusy(false);
  };

  return html`<form class="command-form" onSubmit=${send}>
    <label>Command
      <select data-testid="command-name" value=${name}
        onChange=${(e) => { setName(e.target.value); setArgs({}); setError(null); }}>
        ${Object.keys(COMMANDS).map((c) => html`<option value=${c}>${c}</option>`)}
      </select></label>
    ${COMMANDS[name].map((a) => html`<label>${a.name}
      ${a.type === 'select'
        ? html`<select data-testid=${`command-arg-${a.name}`} value=${args[a.name] ?? a.options[0]}
            onChange=${(e) => setArgs({ ...args, [a.name]: e.target.value })}>
            ${a.options.map((o) => html`<option value=${o}>${o}</option>`)}</select>`
        : html`<input data-testid=${`command-arg-${a.name}`} type="number" inputmode="decimal"
            step=${a.step || 'any'} placeholder=${a.placeholder} value=${args[a.name] ?? ''}
            onInput=${(e) => setArgs({ ...args, [a.name]: e.target.value })} />`}
    </label>`)}
    <button type="submit" data-testid="command-send" disabled=${busy}>Send</button>
    ${error && html`<p class="error" role="alert" data-testid="command-error">${error}</p>`}
  </form>`;
}

function Commands({ model, pid, canAct }) {
  const { api } = useCtx();
  const [listed, setListed] = useState([]); // GET /commands on open
  const [sent, setSent] = useState(new Map()); // results of our own sends
  const [error, setError] = useState(null);
  const [opened, setOpened] = useState({}); // command id -> lifecycle from GET /commands/{id}

  useEffect(() => {
    api.get('/commands', { patient: pid, limit: 20 })
      .then((page) => setListed(page.items), (e) => setError(e.message));
  }, [pid]);

  const details = async (id) => {
    try {
      const r = await api.get(`/commands/${encodeURIComponent(id)}`);
      setOpened((o) => ({ ...o, [id]: r.lifecycle }));
    } catch (e) { setError(e.message); }
  };

  // every command of the patient: the model's (live command events, with each status seen),
  // then our own results, then the REST list (latest status only, lifecycle on demand)
  const rows = new Map();
  for (const c of listed) {
    rows.set(c.command_id, { id: c.command_id, name: c.name, args: c.args, device: c.device_id,
      by: c.requested_by, created: c.created_at, message: c.message,
      history: opened[c.command_id] || [{ status: c.status, at: c.updated_at, message: c.message }] });
  }
  for (const c of sent.values()) {
    const r = rows.get(c.command_id);
    if (!r) rows.set(c.command_id, { id: c.command_id, name: c.name, args: c.args, device: c.device,
      by: c.requested_by, created: c.at, message: c.message, history: [{ status: c.status, at: c.at }] });
  }
  for (const [id, c] of model.commands) {
    const r = rows.get(id);
    const hist = [...(r && opened[id] ? opened[id] : r ? r.history : [])];
    for (const h of c.history) if (!hist.some((x) => x.status === h.status)) hist.push(h);
    rows.set(id, { id, name: c.data.name, args: c.data.args, device: c.data.device,
      by: c.data.requested_by, created: r ? r.created : (c.history[0] && c.history[0].at),
      message: c.data.message, result: c.data.result, history: hist });
  }
  const list = [...rows.values()].sort((a, b) => (b.created || 0) - (a.created || 0));

  return html`<section class="card pv-commands">
    <div class="card-head"><h2>Commands</h2></div>
    ${canAct && html`<div data-testid="command-panel" class="command-panel">
      <${CommandForm} pid=${pid} onSent=${(c) => setSent((m) => new Map(m).set(c.command_id, c))} />
    </div>`}
    ${error && html`<p class="error">${error}</p>`}
    <ul class="command-list">
      ${list.map((c) => {
        const hist = [...c.history].sort((a, b) => (STEP_RANK[a.status] ?? 0) - (STEP_RANK[b.status] ?? 0));
        const top = latest(hist);
        return html`<li data-testid="command-row" data-command-id=${c.id} data-status=${top ? top.status : ''}
          class=${`command-row st-${top ? top.status : ''}`}>
          <div class="cmd-head">
            <b>${c.name}</b>
            <span class="muted small">${Object.entries(c.args || {}).map(([k, v]) => `${k}=${v}`).join(' ')}</span>
            <span class="muted small">${c.device || ''} · ${c.by || ''} · ${clock(c.created)}</span>
            ${!opened[c.id] && html`<button class="linkish" onClick=${() => details(c.id)}>lifecycle</button>`}
          </div>
          <ol class="steps">
            ${hist.map((h) => html`<li data-testid="command-step" data-status=${h.status} class=${`step st-${h.status}`}
              title=${h.message || ''}>${h.status} <span class="muted">${clock(h.at)}</span></li>`)}
          </ol>
          ${(top && top.message) || c.message ? html`<div class="muted small">${(top && top.message) || c.message}</div>` : ''}
        </li>`;
      })}
    </ul>
    ${!list.length && html`<p class="muted small">No command for this patient yet.</p>`}
  </section>`;
}

// ---- limits ------------------------------------------------------------------------------------

const LIMIT_FIELDS = ['low', 'high', 'critical_low', 'critical_high', 'delay_s'];
const LIMIT_LABEL = { low: 'Low', high: 'High', critical_low: 'Critical low', critical_high: 'Critical high', delay_s: 'Delay s' };

function Limits({ model, pid, canAct }) {
  const { api } = useCtx();
  const [table, setTable] = useState(null); // {limits, sources}
  const [edits, setEdits] = useState({}); // "metric.field" -> text
  const [error, setError] = useState(null); // {message, field}
  const [saved, setSaved] = useState(false);
  const [busy, setBusy] = useState(false);
  const seen = useRef(null);

  const load = async () => {
    try { setTable(await api.get(`/patients/${encodeURIComponent(pid)}/limits`)); }
    catch (e) { setError({ message: e.message, field: e.field }); }
  };
  useEffect(() => { load(); }, [pid]);
  // a settings event (someone changed the limits): read them again unless we are editing
  useEffect(() => {
    if (model.limits && model.limits !== seen.current) {
      seen.current = model.limits;
      if (!Object.keys(edits).length) load();
    }
  });

  const save = async (e) => {
    e.preventDefault();
    const body = {};
    for (const [key, text] of Object.entries(edits)) {
      const [metric, field] = key.split('.');
      const old = table.limits[metric][field];
      const value = text.trim() === '' ? null : Number(text);
      if (value === old || (value === null && old === null)) continue;
      (body[metric] = body[metric] || {})[field] = value;
    }
    setSaved(false); setError(null);
    if (!Object.keys(body).length) { setEdits({}); return; }
    setBusy(true);
    try {
      setTable(await api.put(`/patients/${encodeURIComponent(pid)}/limits`, { limits: body }));
      setEdits({});
      setSaved(true);
    } catch (err) {
      setError({ message: err.message, field: err.field });
    }
    setBusy(false);
  };

  if (!table) {
    return html`<section class="card pv-limits" data-testid="limits-editor"><h2>Alarm limits</h2>
      ${error ? html`<p class="error">${error.message}</p>` : html`<p class="muted">Loading…</p>`}</section>`;
  }
  const metrics = Object.keys(table.limits);
  const bad = error && error.field ? error.field.replace(/^limits\./, '') : null;
  return html`<section class="card pv-limits" data-testid="limits-editor">
    <div class="card-head"><h2>Alarm limits</h2>
      <span class="muted small">${canAct ? 'empty restores the default' : 'read only'}</span></div>
    <form onSubmit=${save}>
      <div class="table-wrap">
        <table class="limits">
          <thead><tr><th>Metric</th>${LIMIT_FIELDS.map((f) => html`<th>${LIMIT_LABEL[f]}</th>`)}</tr></thead>
          <tbody>
            ${metrics.map((m) => html`<tr>
              <th scope="row">${METRIC[m] ? `${METRIC[m].label} ${METRIC[m].unit}` : m}</th>
              ${LIMIT_FIELDS.map((f) => {
                const key = `${m}.${f}`;
                const value = table.limits[m][f];
                const source = table.sources && table.sources[m] ? table.sources[m][f] : null;
                const invalid = bad === key || (bad === m);
                return html`<td class=${`src-${source || 'unknown'}`}>
                  ${canAct
                    ? html`<input data-testid=${`limit-${m}-${f}`} type="number" step="any" inputmode="decimal"
                        class=${invalid ? 'invalid' : ''} aria-invalid=${String(invalid)}
                        aria-label=${`${m} ${f}`} value=${edits[key] ?? (value ?? '')}
                        onInput=${(e) => { setEdits({ ...edits, [key]: e.target.value }); setSaved(false); }} />`
                    : html`<span class="limit-value" data-testid=${`limit-value-${m}-${f}`}>${value ?? '—'}</span>`}
                  <span class="limit-source" data-testid=${`limit-source-${m}-${f}`}>${source || ''}</span>
                </td>`;
              })}
            </tr>`)}
          </tbody>
        </table>
      </div>
      ${error && html`<p class="error" role="alert" data-testid="limits-error">${error.message}</p>`}
      ${saved && html`<p class="ok" role="status" data-testid="limits-saved">Saved.</p>`}
      ${canAct && html`<div class="actions">
        <button type="submit" data-testid="limits-save" disabled=${busy}>Save limits</button>
        <button type="button" disabled=${busy || !Object.keys(edits).length}
          onClick=${() => { setEdits({}); setError(null); }}>Discard</button>
      </div>`}
    </form>
  </section>`;
}

// ---- NEWS2 -------------------------------------------------------------------------------------

// ACVPU (RCP NEWS2, 2017): Alert, new Confusion, Voice, Pain, Unresponsive
const ACVPU = [['alert', 'A: alert'], ['confusion', 'C: new confusion'], ['voice', 'V: voice'],
  ['pain', 'P: pain'], ['unresponsive', 'U: unresponsive']];

function Observations({ model, pid }) {
  const { api } = useCtx();
  const [form, setForm] = useState({ on_oxygen: '', consciousness: '', scale: '' });
  const [msg, setMsg] = useState(null);
  // what is recorded now: read once (GET), then kept by the model's settings events
  const [read, setRead] = useState(null);
  useEffect(() => {
    let gone = false;
    api.get(`/patients/${encodeURIComponent(pid)}/observations`)
      .then((r) => { if (!gone) setRead(r.observations || {}); }, () => {});
    return () => { gone = true; };
  }, [pid]);
  const obs = model.observations || read;

  const submit = async (e) => {
    e.preventDefault();
    const body = {};
    if (form.on_oxygen !== '') body.on_oxygen = form.on_oxygen === 'yes';
    if (form.consciousness !== '') body.consciousness = form.consciousness;
    if (form.scale !== '') body.scale = Number(form.scale);
    try {
      const r = await api.post(`/patients/${encodeURIComponent(pid)}/observations`, body);
      const o = r.observations || {};
      const said = [o.on_oxygen != null && `on oxygen: ${o.on_oxygen ? 'yes' : 'no'}`,
        o.consciousness && `consciousness: ${o.consciousness}`, o.scale && `SpO₂ scale ${o.scale}`];
      setMsg({ ok: true, text: `Recorded (${said.filter(Boolean).join(', ')})` });
      setForm({ on_oxygen: '', consciousness: '', scale: '' });
    } catch (err) { setMsg({ ok: false, text: err.message }); }
  };
  const set = (k) => (e) => setForm({ ...form, [k]: e.target.value });
  return html`<form class="obs-form" data-testid="observations-form" onSubmit=${submit}>
    <label>On oxygen
      <select data-testid="obs-on_oxygen" value=${form.on_oxygen} onChange=${set('on_oxygen')}>
        <option value="">${obs && obs.on_oxygen != null ? `unchanged (${obs.on_oxygen ? 'yes' : 'no'})` : 'unchanged'}</option>
        <option value="no">no (air)</option><option value="yes">yes</option>
      </select></label>
    <label>Consciousness (ACVPU)
      <select data-testid="obs-consciousness" value=${form.consciousness} onChange=${set('consciousness')}>
        <option value="">${obs && obs.consciousness ? `unchanged (${obs.consciousness})` : 'unchanged'}</option>
        ${ACVPU.map(([v, l]) => html`<option value=${v}>${l}</option>`)}
      </select></label>
    <label>SpO₂ scale
      <select data-testid="obs-scale" value=${form.scale} onChange=${set('scale')}>
        <option value="">${obs && obs.scale ? `unchanged (${obs.scale})` : 'unchanged'}</option>
        <option value="1">1</option><option value="2">2 (hypercapnic respiratory failure)</option>
      </select></label>
    <button type="submit" data-testid="obs-save">Record</button>
    ${msg && html`<p class=${msg.ok ? 'ok small' : 'error'} role="status" data-testid="obs-result">${msg.text}</p>`}
  </form>`;
}

const NEWS2_OPTS = {
  // a score holds until its next change: a stepped line
  series: [{}, line('NEWS2', COLORS.news2, { width: 2, paths: uPlot.paths.stepped({ align: 1 }) })],
  axes: timeAxes('NEWS2'),
  legend: { show: false },
  scales: { y: { range: (u, min, max) => [0, Math.max(8, (max || 0) + 1)] } },
};

function News2({ model, pid, canAct }) {
  const { api } = useCtx();
  const pts = useRef({ t: [], v: [], last: null });
  const [, redraw] = useState(0);
  const [error, setError] = useState(null);
  const now = useNow(10000);

  useEffect(() => {
    pts.current = { t: [], v: [], last: null };
    const from = Math.floor(Date.now() / 1000 - 86400);
    walk(api, `/patients/${encodeURIComponent(pid)}/news2`, { from, limit: 1000 }, 20)
      .then(({ items }) => {
        // merge with what the live stream already added, in time order, each time once
        const p = pts.current;
        const byTs = new Map(p.t.map((t, i) => [t, p.v[i]]));
        for (const e of items) byTs.set(e.ts, e.data.total);
        const ts = [...byTs.keys()].sort((a, b) => a - b);
        p.t = ts; p.v = ts.map((t) => byTs.get(t));
        redraw((n) => n + 1);
      }, (e) => setError(e.message));
  }, [pid]);

  // extended live from the model's news2 events
  const n2 = model.news2;
  if (n2 && n2 !== pts.current.last) {
    const p = pts.current;
    p.last = n2;
    const at = n2.at ?? Date.now() / 1000;
    if (!p.t.length || at > p.t[p.t.length - 1]) { p.t.push(at); p.v.push(n2.total); }
  }
  const p = pts.current;
  const end = Math.max(now, p.t.length ? p.t[p.t.length - 1] : 0);
  const data = p.t.length ? [[...p.t, end], [...p.v, p.v[p.v.length - 1]]] : [[], []];
  return html`<section class="card pv-news2">
    <div class="card-head"><h2>NEWS2</h2>
      <span class="muted small">${n2 ? n2.display : '—'}${n2 && n2.missing && n2.missing.length ? ` · missing ${n2.missing.join(', ')}` : ''}</span></div>
    ${canAct && html`<${Observations} model=${model} pid=${pid} />`}
    ${error && html`<p class="error">${error}</p>`}
    <${Chart} opts=${NEWS2_OPTS} height=${120} testid="news2-chart" label="NEWS2 total over 24 h"
      data=${data} xRange=${[end - 86400, end]} />
    <p class="muted small">Last 24 h; a point at each change of band (RCP NEWS2, 2017).</p>
  </section>`;
}

// ---- the view ----------------------------------------------------------------------------------

export function PatientView({ id }) {
  const { ward, live, user } = useCtx();
  const model = ward.model(id);
  const status = useLiveStatus(live);
  const [, tick] = useState(0);

  // only a patient of the user's list (GET /patients: their care teams) is watched and shown
  const known = ward.loaded && ward.patients.some((p) => p.id === id);
  // (it also catches up with a change made before it started: the list may have loaded
  // between the first render and this effect, and would otherwise stay "Loading…")
  useEffect(() => {
    tick((n) => n + 1);
    return ward.on((what) => { if (what === 'change') tick((n) => n + 1); });
  }, [ward]);
  useEffect(() => {
    if (!known) return undefined;
    const release = model.retain();
    const off = model.on((what) => { if (what === 'change') tick((n) => n + 1); });
    return () => { off(); release(); };
  }, [model, known]);

  const canAct = CAN_ACT.has(user.role);
  if (!known) {
    return html`<main class="patient-view" data-testid="patient-view" data-patient=${id} data-known="false">
      <p><a href="#/" data-testid="back-to-station">← Central station</a></p>
      ${ward.loaded ? html`<p class="error" data-testid="patient-unknown">Patient ${id} is not one of your patients.</p>`
        : ward.error ? html`<p class="error">${ward.error}</p>` : html`<p class="muted">Loading…</p>`}</main>`;
  }
  return html`<main class="patient-view" data-testid="patient-view" data-patient=${id} data-role=${user.role}
    data-live=${String(status.live)}>
    <${Header} model=${model} status=${status} />
    <div class="pv-grid">
      <div class="pv-col">
        <${Trends} model=${model} pid=${id} />
        <${Waveform} model=${model} pid=${id} canAct=${canAct} />
        <${News2} model=${model} pid=${id} canAct=${canAct} />
      </div>
      <div class="pv-col">
        <${Alerts} model=${model} pid=${id} canAct=${canAct} />
        <${Commands} model=${model} pid=${id} canAct=${canAct} />
        <${Limits} model=${model} pid=${id} canAct=${canAct} />
      </div>
    </div>
  </main>`;
}
