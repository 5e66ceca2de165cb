// The central station: the ward's alarm banner (highest priority first, acknowledge), the audible
// alarm controls, and one tile per patient of the user's care teams with live numerics, a short
// trend, device flags, NEWS2 and the colour and flashing of its highest open alert.
//
// Performance (issue 27: 64 beds at 1 Hz, reading-to-screen p99 <= 250 ms): each tile subscribes
// to its own PatientModel and re-renders only when that model emits 'change', at most once per
// render tick (model.js's onTick: ten a second, every tile due in the same frame); the station
// itself re-renders only when the patient list or the connection state changes, and the banner
// only when the alerts stream does. Sparklines are SVG paths drawn straight from the model's
// trend arrays, with no layout reads.
import {
  html, useState, useEffect, useLayoutEffect, useRef, METRICS, clock, fmt,
} from './lib.js';
import { useCtx } from './ctx.js';
import { onTick } from './model.js';
import { audioFor, PAUSE_S } from './audio.js';

const SPARK_S = 300; // seconds of trend a tile's sparkline shows
const SPARK_GAP_S = 15; // no reading for this long breaks the line (data missing)
const SPARK_REDRAW_MS = 2000; // a sparkline is redrawn at most this often
const DIGITS = Object.fromEntries(METRICS.map((m) => [m.key, m.digits]));
const BAND_LABEL = {
  low: 'low', low_medium: 'low-medium', medium: 'medium', high: 'high', incomplete: 'incomplete',
};

/** Bed order: by id, numbers in ids compared as numbers, so beds never jump around. */
const byId = (a, b) => a.id.localeCompare(b.id, undefined, { numeric: true });

function age(seconds) {
  const s = Math.max(0, Math.round(seconds));
  if (s < 60) return `${s} s`;
  if (s < 3600) return `${Math.floor(s / 60)} min`;
  return `${Math.floor(s / 3600)} h ${Math.floor((s % 3600) / 60)} min`;
}

/** The alarm signal of a tile or banner row (IEC 60601-1-8 table 3): colour by priority, and
 *  flashing for an unacknowledged high (fast, 2 Hz) or medium (slow, 0.6 Hz) alert; low never
 *  flashes, and an acknowledged alert keeps its colour but stops flashing. */
function signal(alert) {
  if (!alert) return { priority: 'none', flashing: false, cls: '' };
  const p = alert.priority;
  const flashing = alert.state === 'active' && (p === 'high' || p === 'medium');
  return { priority: p, flashing, cls: `prio-${p}${flashing ? ` flash-${p}` : ''}` };
}

/** What an alert is about. An `acknowledged` change carries "acknowledged by <user>" as its
 *  message, so the last message that described the condition is remembered per alert (pruned
 *  to the open alerts by the banner); after a reload, the condition and value stand in. */
const described = new Map(); // alert_id -> message

function describe(a) {
  if (a.action !== 'acknowledged' && a.message) { described.set(a.alert_id, a.message); return a.message; }
  const known = described.get(a.alert_id);
  if (known) return known;
  const what = (a.condition || 'alert').replace(/_/g, ' ');
  return a.value != null && a.metric ? `${what}: ${a.metric} ${a.value}` : what;
}

function pruneDescribed(alerts) {
  if (described.size <= alerts.length + 100) return;
  const open = new Set(alerts.map((a) => a.alert_id));
  for (const id of described.keys()) if (!open.has(id)) described.delete(id);
}

// ---- sparklines -------------------------------------------------------------------------------

// An inline SVG path per series, not a canvas per tile: 64 canvases were 64 composited layers
// (layerized and committed at every frame) and were rasterised on the main thread at each
// redraw; a path is recorded into the tile's paint and rasterised off the main thread. The
// viewBox is the 5-minute window (x in seconds) by the box's height (in half pixels), stretched
// to the tile's width; the strokes do not scale with it.
const SPARK_H = 34; // px, as .spark in station.css
const SPARK_PAD = 2; // px above and below the line
const SPARK_Y = 2; // viewBox units a pixel (y)

const SPARK_SERIES = [
  { key: 'spo2', color: '#58a6ff', minSpan: 6 },
  { key: 'hr', color: '#3fb950', minSpan: 20 },
];

/** The readings of the last SPARK_S seconds before the tile opened (GET /patients/{id}/vitals,
 *  raw, once per model), so the line is there at once instead of filling in over 5 minutes.
 *  Only the part before the model's first live point is drawn: nothing is drawn twice. */
const before = new WeakMap(); // model -> {spo2: {t, v}, hr: {t, v}}

function loadBefore(api, model) {
  if (before.has(model)) return;
  const past = { spo2: { t: [], v: [] }, hr: { t: [], v: [] } };
  before.set(model, past);
  const to = Date.now() / 1000;
  api.get(`/patients/${encodeURIComponent(model.id)}/vitals`,
    { from: (to - SPARK_S).toFixed(3), metrics: 'spo2,hr', limit: 1000 })
    .then((res) => {
      // readings and offline markers in the server's receive order; a device going offline
      // breaks the line (a null point), as the model's own gap() does for live data
      const offline = res.gaps.filter((g) => g.status === 'offline');
      let g = 0;
      for (const it of res.items) {
        while (g < offline.length && offline[g].ts < it.ts) {
          for (const k of Object.keys(past)) { past[k].t.push(offline[g].ts); past[k].v.push(null); }
          g++;
        }
        for (const k of Object.keys(past)) {
          const v = it.values[k];
          if (typeof v === 'number') { past[k].t.push(it.measured); past[k].v.push(v); }
        }
      }
      model.schedule(); // redraw
    })
    .catch(() => {}); // only the back-fill is lost; the live line still draws
}

function lowerBound(t, x, hi = t.length) {
  let lo = 0;
  while (lo < hi) { const mid = (lo + hi) >> 1; if (t[mid] < x) lo = mid + 1; else hi = mid; }
  return lo;
}

const NO_TREND = { t: [], v: [] };

// scratch state of the series being drawn
const pen = {
  min: 0, max: 0, down: false, l: false, last: 0, from: 0, sy: 0, x: 0, y: 0, d: '',
};

function extent(t, v, lo, hi) {
  for (let i = lo; i < hi; i++) {
    const x = v[i];
    if (x != null) { if (x < pen.min) pen.min = x; if (x > pen.max) pen.max = x; }
  }
}

/** A number of a path's coordinate list, with the separator it needs ('-' is one). */
const num = (n) => (n < 0 ? `${n}` : ` ${n}`);

// A path in whole units of the viewBox (x: seconds, y: half pixels), each point relative to the
// one before ("M x y l dx dy dx dy ..."): about 4 characters a point instead of 13. Redrawn for
// 64 tiles every 2 s, the path strings were most of what the station allocated, and the heap
// measured after a collection counts what is allocated while it is read.
function trace(t, v, lo, hi) {
  for (let i = lo; i < hi; i++) {
    const x = v[i];
    if (x == null || x !== x || t[i] - pen.last > SPARK_GAP_S) pen.down = false;
    if (x == null || x !== x) continue; // a gap (NaN in the model's trend, null in the back-fill)
    const px = Math.round(t[i] - pen.from);
    const py = Math.round(SPARK_Y * (SPARK_H - SPARK_PAD - (x - pen.min) * pen.sy));
    if (!pen.down) pen.d += `M${px}${num(py)}`;
    else pen.d += (pen.l ? '' : 'l') + num(px - pen.x) + num(py - pen.y);
    pen.l = pen.down; // a lineto is open (its next points need no command letter)
    pen.x = px; pen.y = py;
    pen.down = true;
    pen.last = t[i];
  }
}

/** The path of one series over the last SPARK_S seconds, scaled to its own range (the shape is
 *  what matters at a glance); null values and missing stretches break the line. */
function sparkPath(model, key, minSpan) {
  const to = model.lastTs;
  if (to == null) return '';
  const from = to - SPARK_S;
  let past = before.get(model);
  if (past && model.trend.hr && model.trend.hr.t[0] <= from) {
    before.set(model, null); // the live trend covers the window now: let the back-fill go
    past = null;
  }
  const live = model.trend[key] || NO_TREND;
  const p = past && past[key];
  const liveLo = lowerBound(live.t, from);
  const pastLo = p ? lowerBound(p.t, from) : 0;
  const pastHi = p ? lowerBound(p.t, live.t.length ? live.t[0] : Infinity) : 0;
  pen.min = Infinity; pen.max = -Infinity;
  if (p) extent(p.t, p.v, pastLo, pastHi);
  extent(live.t, live.v, liveLo, live.t.length);
  if (pen.min === Infinity) return '';
  if (pen.max - pen.min < minSpan) {
    const mid = (pen.max + pen.min) / 2;
    pen.min = mid - minSpan / 2; pen.max = mid + minSpan / 2;
  }
  pen.from = from;
  pen.sy = (SPARK_H - 2 * SPARK_PAD) / (pen.max - pen.min);
  pen.down = false; pen.last = -Infinity; pen.d = '';
  if (p) trace(p.t, p.v, pastLo, pastHi);
  trace(live.t, live.v, liveLo, live.t.length);
  const d = pen.d;
  pen.d = '';
  return d;
}

function drawSpark(svg, model) {
  if (model.lastTs != null) svg.drawnAt = performance.now(); // (the first reading: at once)
  const paths = svg.children;
  for (let i = 0; i < SPARK_SERIES.length; i++) {
    const { key, minSpan } = SPARK_SERIES[i];
    const d = sparkPath(model, key, minSpan);
    paths[i].setAttribute('d', d);
  }
}

function Sparkline({ model, api }) {
  const ref = useRef(null);
  useEffect(() => { loadBefore(api, model); }, [model]);
  // redrawn after a render of the tile, at most every SPARK_REDRAW_MS: the 5-minute window moves
  // about a pixel in that time (docs/benchmarks.md, "Web app"); a redraw that has to wait runs
  // at a later render tick, with the tiles. A layout effect, so the drawing is painted in the
  // render's own frame (a plain effect runs after that frame: one more frame each time)
  useLayoutEffect(() => {
    const svg = ref.current;
    const wait = SPARK_REDRAW_MS - (performance.now() - (svg.drawnAt || -Infinity));
    if (wait <= 0) drawSpark(svg, model);
    else if (!svg.later) {
      svg.later = setTimeout(() => {
        svg.later = null;
        onTick(() => { if (svg.isConnected) drawSpark(svg, model); });
      }, wait);
    }
  });
  useEffect(() => () => { clearTimeout(ref.current && ref.current.later); }, []);
  // the paths' `d` is the drawing's, set by drawSpark only (Preact never sees it)
  return html`<svg ref=${ref} class="spark" data-testid="sparkline"
    viewBox=${`0 0 ${SPARK_S} ${SPARK_H * SPARK_Y}`} preserveAspectRatio="none" role="img"
    aria-label="SpO₂ (blue) and HR (green), last 5 minutes">
    ${SPARK_SERIES.map(({ key, color }) => html`<path key=${key} stroke=${color} />`)}
  </svg>`;
}

// ---- a patient's tile -------------------------------------------------------------------------

function Num({ vitals, k, label, unit }) {
  const v = vitals[k];
  return html`<div class=${`num num-${k}`}>
    <span class="lbl">${label}</span>
    <span class="val" data-metric=${k}>${fmt(v && v.value, DIGITS[k])}</span>
    <span class="unit">${unit}</span>
  </div>`;
}

function News2({ news2 }) {
  if (!news2) {
    return html`<span class="news2" data-testid="news2" data-band="none" title="no NEWS2 score yet">NEWS2 —</span>`;
  }
  // RCP NEWS2 (2017) chart: 0-4 low, a 3 in any one parameter low-medium, 5-6 medium, 7+ high;
  // "incomplete" while parameters are missing and the partial score does not already reach high
  const missing = news2.missing && news2.missing.length ? `missing: ${news2.missing.join(', ')}` : '';
  return html`<span class="news2" data-testid="news2" data-band=${news2.band}
    title=${`NEWS2 ${news2.display} (${BAND_LABEL[news2.band] || news2.band})${missing ? `; ${missing}` : ''}`}>
    NEWS2 <b>${news2.display}</b></span>`;
}

function Tile({ model, status, api }) {
  const [, tick] = useState(0);
  useEffect(() => {
    const release = model.retain();
    const off = model.on((what) => { if (what === 'change') tick((n) => n + 1); });
    return () => { off(); release(); };
  }, [model]);

  const { vitals, news2 } = model;
  const top = model.top;
  const sig = signal(top);
  const flags = model.deviceFlags;
  const live = status.live;
  const p = model.info;
  // on a cloud: the patient's ward gateway is unreachable, so nothing of them is live here
  const gw = p.edge && !p.edge.connected ? p.edge : null;
  return html`<a class=${`tile ${sig.cls}${live && !gw ? '' : ' stale'}`} href=${`#/patient/${encodeURIComponent(model.id)}`}
    data-testid="tile" data-patient=${model.id} data-priority=${sig.priority}
    data-flashing=${String(sig.flashing)} data-live=${String(live)}
    data-offset=${model.offset ?? ''} data-ts=${model.lastTs ?? ''}>
    <div class="tile-head">
      <span class="bed">${model.id}</span>
      <span class="name">${p.name || ''}</span>
    </div>
    <div class="tile-body">
      <div class="nums">
        <${Num} vitals=${vitals} k="spo2" label="SpO₂" unit="%" />
        <${Num} vitals=${vitals} k="pulse" label="Pulse" unit="/min" />
        <${Num} vitals=${vitals} k="hr" label="HR" unit="/min" />
        <${Num} vitals=${vitals} k="rr" label="RR" unit="/min" />
        <div class="num num-bp">
          <span class="lbl">BP</span>
          <span class="val"><span data-metric="sbp">${fmt(vitals.sbp && vitals.sbp.value, 0)}</span>/<span
            data-metric="dbp">${fmt(vitals.dbp && vitals.dbp.value, 0)}</span></span>
          <span class="unit">mmHg</span>
        </div>
        <${Num} vitals=${vitals} k="temp_c" label="Temp" unit="°C" />
      </div>
      <${Sparkline} model=${model} api=${api} />
      <div class="tile-foot">
        <${News2} news2=${news2} />
        ${!live && html`<span class="stale-mark" data-testid="stale" title=${status.reason || ''}>not live since ${clock(status.since)}</span>`}
        ${live && gw && html`<span class="stale-mark" data-testid="gateway">ward gateway ${gw.node} unreachable${gw.since ? ` since ${clock(gw.since)}` : ''}</span>`}
        ${flags.map((f) => html`<span class="flag" data-testid="device-flag">${f}</span>`)}
        ${model.ended && html`<span class="flag">stream ended: ${model.ended}</span>`}
        ${top && html`<span class="tile-alert">${top.state === 'acknowledged' ? '(acknowledged) ' : ''}${describe(top)}</span>`}
      </div>
    </div>
  </a>`;
}

// ---- alarm banner and audio -------------------------------------------------------------------

function useNow(ms, on = true) {
  const [now, setNow] = useState(Date.now() / 1000);
  useEffect(() => {
    if (!on) return undefined;
    setNow(Date.now() / 1000);
    const t = setInterval(() => setNow(Date.now() / 1000), ms);
    return () => clearInterval(t);
  }, [ms, on]);
  return now;
}

function AudioControls({ audio }) {
  const [, tick] = useState(0);
  useEffect(() => audio.on(() => tick((n) => n + 1)), [audio]);
  const s = audio.state;
  const paused = s.mutedUntil != null;
  useNow(1000, paused); // the countdown
  const left = audio.remaining();
  return html`<div class="audio">
    <button data-testid="audio-toggle" aria-pressed=${String(s.enabled)}
      title="Audible alarm signals (IEC 60601-1-8 priorities) for unacknowledged alerts"
      onClick=${() => (s.enabled ? audio.disable() : audio.enable())}>
      ${s.enabled ? 'Sound on' : 'Sound off'}</button>
    <button data-testid="mute"
      title=${`Audio paused for ${PAUSE_S / 60} minutes; a new higher-priority alert ends it`}
      onClick=${() => (paused ? (audio.unpause(), audio.update()) : audio.pause())}>
      ${paused ? 'Resume sound' : 'Pause 2 min'}</button>
    ${paused && html`<span class="mute-left" data-testid="mute-remaining" role="timer">${
      `audio paused ${Math.floor(left / 60)}:${String(left % 60).padStart(2, '0')}`}</span>`}
    ${s.playing && html`<span class=${`sounding prio-${s.playing}`}>♪ ${s.playing}</span>`}
  </div>`;
}

function BannerRow({ alert, name, now, canAck, ward }) {
  const [busy, setBusy] = useState(false);
  const [error, setError] = useState(null);
  const sig = signal(alert);
  const ack = async (e) => {
    e.preventDefault();
    setBusy(true); setError(null);
    try { await ward.acknowledge(alert.alert_id); } catch (err) { setError(err.message); }
    setBusy(false);
  };
  const pid = alert.patient_id;
  return html`<li class=${`banner-row ${sig.cls}`} data-testid="banner-alert"
    data-alert-id=${alert.alert_id} data-patient=${pid} data-priority=${alert.priority}
    data-state=${alert.state}>
    <span class="chip">${alert.priority}</span>
    <a class="pt" href=${`#/patient/${encodeURIComponent(pid)}`}>${pid}${name ? ` ${name}` : ''}</a>
    <span class="msg">${describe(alert)}</span>
    <span class="age" title=${clock(alert.raised_at ?? alert.at)}>${age(now - (alert.raised_at ?? alert.at))}</span>
    <span class="state">${alert.state}${alert.state === 'acknowledged' && alert.by ? ` by ${alert.by}` : ''}</span>
    ${canAck && html`<button data-testid="ack" disabled=${busy || alert.state !== 'active'}
      onClick=${ack}>${alert.state === 'active' ? 'Acknowledge' : 'Acknowledged'}</button>`}
    ${error && html`<span class="error ack-error" role="alert" data-testid="ack-error">${error}</span>`}
  </li>`;
}

function AlarmBanner({ ward, names, canAck, audio }) {
  const [, tick] = useState(0);
  useEffect(() => {
    tick((n) => n + 1); // alerts that came before this subscription
    return ward.on((what) => { if (what === 'alerts') tick((n) => n + 1); });
  }, [ward]);
  const alerts = ward.alerts;
  pruneDescribed(alerts);
  const now = useNow(5000, alerts.length > 0); // ages
  const unacked = alerts.filter((a) => a.state === 'active').length;
  return html`<section class="banner" data-testid="alarm-banner" aria-label="Active alarms">
    <div class="banner-head">
      <h2>Alarms <span class="count">${alerts.length}${unacked !== alerts.length ? ` (${unacked} unacknowledged)` : ''}</span></h2>
      <${AudioControls} audio=${audio} />
    </div>
    ${alerts.length === 0
    ? html`<p class="no-alarms" data-testid="no-alarms">No active alarms</p>`
    : html`<ul class="banner-list">${alerts.map((a) => html`<${BannerRow} key=${a.alert_id} alert=${a}
        name=${names.get(a.patient_id)} now=${now} canAck=${canAck} ward=${ward} />`)}</ul>`}
  </section>`;
}

// ---- the station ------------------------------------------------------------------------------

export function Station() {
  const { api, ward, live, user } = useCtx();
  const [, tick] = useState(0);
  const [status, setStatus] = useState(live.status);
  // (each subscription also catches up with a change made before it started)
  useEffect(() => {
    tick((n) => n + 1);
    return ward.on((what) => { if (what === 'change') tick((n) => n + 1); });
  }, [ward]);
  useEffect(() => {
    setStatus({ ...live.status });
    return live.on((what, s) => { if (what === 'status') setStatus({ ...s }); });
  }, [live]);
  // the alerts stream stays watched for the session (the audible alarm follows it on every page)
  useEffect(() => { ward.watchAlerts(); }, [ward]);
  const audio = audioFor(ward, api);
  useEffect(() => {
    window.vitalwire.audio = audio.state;
  }, [audio]);

  const patients = [...ward.patients].sort(byId);
  const names = new Map(patients.map((p) => [p.id, p.name]));
  const canAck = user.role !== 'viewer';
  let body;
  if (ward.error && !ward.loaded) body = html`<p class="error">Could not load the patients: ${ward.error}</p>`;
  else if (!ward.loaded) body = html`<p class="muted">Loading patients…</p>`;
  else if (!patients.length) body = html`<p class="muted">No patients in your care teams.</p>`;
  else {
    body = html`<div class="tiles">${patients.map((p) => html`<${Tile} key=${p.id}
      model=${ward.model(p.id)} status=${status} api=${api} />`)}</div>`;
  }
  return html`<main class="station" data-testid="station">
    <${AlarmBanner} ward=${ward} names=${names} canAck=${canAck} audio=${audio} />
    ${body}
  </main>`;
}
