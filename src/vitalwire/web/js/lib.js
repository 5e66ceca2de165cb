// The one place the app imports its libraries from (vendored by tools/vendor_web.py).
import { h, render, Fragment, createContext } from '../vendor/preact.module.js';
import {
  useState, useEffect, useLayoutEffect, useRef, useMemo, useCallback, useContext, useReducer,
} from '../vendor/preact-hooks.module.js';
import htm from '../vendor/htm.module.js';
import uPlot from '../vendor/uPlot.esm.js';

export const html = htm.bind(h);
export {
  h, render, Fragment, createContext,
  useState, useEffect, useLayoutEffect, useRef, useMemo, useCallback, useContext, useReducer,
  uPlot,
};

/** Subscribe a component to an object with on(fn) -> off(): re-renders on every change. */
export function useSource(source) {
  const [, tick] = useState(0);
  useEffect(() => source.on(() => tick((n) => n + 1)), [source]);
  return source;
}

/** A tiny observable: on(fn) returns the function that stops it. */
export class Emitter {
  constructor() { this.fns = new Set(); }
  on(fn) { this.fns.add(fn); return () => this.fns.delete(fn); }
  emit(...args) { for (const fn of [...this.fns]) { try { fn(...args); } catch (e) { console.error(e); } } }
}

export const METRICS = [
  { key: 'spo2', label: 'SpO₂', unit: '%', digits: 0 },
  { key: 'pulse', label: 'Pulse', unit: '/min', digits: 0 },
  { key: 'hr', label: 'HR', unit: '/min', digits: 0 },
  { key: 'rr', label: 'RR', unit: '/min', digits: 0 },
  { key: 'sbp', label: 'SBP', unit: 'mmHg', digits: 0 },
  { key: 'dbp', label: 'DBP', unit: 'mmHg', digits: 0 },
  { key: 'temp_c', label: 'Temp', unit: '°C', digits: 1 },
];

export const PRIORITY_RANK = { high: 3, medium: 2, low: 1 };

export function fmt(value, digits = 0) {
  return value == null || Number.isNaN(value) ? '—' : Number(value).toFixed(digits);
}

export function clock(ts) {
  return ts == null ? '—' : new Date(ts * 1000).toLocaleTimeString([], { hour12: false });
}

export function dateTime(ts) {
  if (ts == null) return '—';
  const d = new Date(ts * 1000);
  return `${d.toLocaleDateString()} ${d.toLocaleTimeString([], { hour12: false })}`;
}
