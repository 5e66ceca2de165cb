// Small uPlot helpers shared by the screens: a dark theme, a chart component that keeps one
// uPlot instance per mount (resized with its container) and is fed new data imperatively, and
// the series colours of each metric.
import { html, useEffect, useRef, uPlot } from './lib.js';

export const COLORS = {
  spo2: '#4ea1ff', pulse: '#3fb950', hr: '#a5d6a7', rr: '#e3b341', sbp: '#f778ba',
  dbp: '#d2a8ff', temp_c: '#ffa657', news2: '#ff7b72', pleth: '#19c3d6',
};

const AXIS = { stroke: '#8b98a5', grid: { stroke: '#2a3542', width: 1 }, ticks: { stroke: '#2a3542', width: 1 } };

/** Axes for a time chart: x time, y with an optional label and value formatter. */
export function timeAxes(label, digits = 0) {
  return [
    { ...AXIS },
    { ...AXIS, label, labelSize: label ? 18 : 0, size: 48,
      values: (u, splits) => splits.map((v) => (v == null ? '' : v.toFixed(digits))) },
  ];
}

/** A series of one metric's values. */
export function line(label, color, extra = {}) {
  return { label, stroke: color, width: 1.5, spanGaps: false, points: { show: false }, ...extra };
}

/** Hex colour with an alpha (for bands). */
export function alpha(hex, a) {
  const n = parseInt(hex.slice(1), 16);
  return `rgba(${(n >> 16) & 255},${(n >> 8) & 255},${n & 255},${a})`;
}

/**
 * A uPlot chart. `opts` makes the chart (a new object re-creates it: change it only when the
 * series change); `data` (uPlot's column arrays) is set on every render; `xRange` ([min, max],
 * optional) pins the x scale (a sliding window). Height is fixed, width follows the container.
 */
export function Chart({ opts, data, xRange, height = 160, testid, label }) {
  const box = useRef(null);
  const plot = useRef(null);
  const range = useRef(xRange);
  range.current = xRange;

  useEffect(() => {
    const el = box.current;
    const o = {
      ...opts,
      width: Math.max(200, el.clientWidth || 300),
      height,
      scales: {
        ...(opts.scales || {}),
        x: { time: true, ...((opts.scales || {}).x || {}),
          range: (u, min, max) => (range.current ? range.current : [min, max]) },
      },
    };
    const u = new uPlot(o, data, el);
    plot.current = u;
    const ro = new ResizeObserver(() => {
      const w = el.clientWidth;
      if (w && Math.abs(w - u.width) > 1) u.setSize({ width: w, height });
    });
    ro.observe(el);
    return () => { ro.disconnect(); u.destroy(); plot.current = null; };
  }, [opts, height]);

  useEffect(() => {
    if (plot.current) plot.current.setData(data);
  });

  return html`<div class="chart" ref=${box} data-testid=${testid} role="img" aria-label=${label}></div>`;
}
