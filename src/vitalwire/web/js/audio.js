// The central station's audible alarm signal, through Web Audio.
//
// It sounds the priority of the ward's highest *unacknowledged* alert (state `active`), as the
// alarm signals of IEC 60601-1-8:2006+A1:2012 (clause 6.3.3, table 4, and the burst shapes of
// Annex F) describe them:
//
// | priority | pulses in a burst              | pulse td / spacing ts | burst repeats          |
// |----------|--------------------------------|-----------------------|------------------------|
// | high     | 10: 3 + 2, pause, 3 + 2        | 125 ms / 75 ms        | every ~5 s (tb 2.5 s)  |
// | medium   | 3                              | 200 ms / 200 ms       | every ~15 s            |
// | low      | 2                              | 200 ms / 200 ms       | once (no repeat)       |
//
// (Table 4: high td 75-200 ms, ts 50-125 ms, a 2ts + td gap between the 3rd and 4th pulses and
// 0.35-1.30 s between the 5th and 6th, burst interval 2.5-15 s; medium td and ts 125-250 ms, burst
// interval 2.5-30 s; low 1 or 2 pulses, interval over 15 s or not repeated. Each pulse has a
// fundamental of 150-1000 Hz and at least 4 harmonics within 15 dB of it; the rise takes 10-20 %
// of td. Medium sounds lower than high so the two cannot be confused.)
//
// Browsers start audio only from a user gesture, so the signal is off until the user turns it
// on. "Audio paused" (the mute) is time-limited as IEC 60601-1-8 requires of an alarm signal
// inactivation state: 120 s, the same bound as the `silence` command (howto-commands.md). A new
// alert of a higher priority than any that was sounding when the pause began ends it at once.
import { Emitter, PRIORITY_RANK } from './lib.js';

/** The longest audio pause, in seconds (IEC 60601-1-8 audio paused; the `silence` bound). */
export const PAUSE_S = 120;

const SIGNALS = {
  // offsets (s) of each pulse's start within a burst, the pulse duration, the pitch and the period
  high: {
    freq: 660, td: 0.125, period: 5.25,
    // 3 pulses (ts 75 ms), a 2ts + td gap, 2 pulses, a 0.5 s pause, then the same again
    starts: (() => {
      const td = 0.125, ts = 0.075, out = [];
      let t = 0;
      const gaps = [ts, ts, 2 * ts + td, ts, 0.5, ts, ts, 2 * ts + td, ts];
      out.push(t);
      for (const g of gaps) { t += td + g; out.push(t); }
      return out;
    })(),
  },
  medium: { freq: 523, td: 0.2, period: 15, starts: [0, 0.4, 0.8] },
  low: { freq: 440, td: 0.2, period: null, starts: [0, 0.4] },
};

// Relative amplitudes of the fundamental and 4 harmonics: all within 15 dB of the fundamental
// (0.25 is -12 dB), as the standard asks, so the tone is easy to localise and hear in noise.
const HARMONICS = [0, 1, 0.6, 0.45, 0.35, 0.25];

const rank = (p) => PRIORITY_RANK[p] || 0;

export class AlarmAudio extends Emitter {
  constructor() {
    super();
    this.ctx = null; // the AudioContext, made on the first enable (a user gesture)
    this.wave = null;
    this.out = null; // the gain node of the signal now sounding; dropped to stop it at once
    this.timer = null; // repeats the burst
    this.pauseTimer = null; // ends the audio pause
    this.ward = null;
    this.offWard = null;
    this.heard = new Set(); // active low alerts already announced (low sounds once)
    this.mutedLevel = 0; // the highest active priority when the pause began
    // what tests and the page read: kept up to date in place (window.vitalwire.audio)
    this.state = { enabled: false, mutedUntil: null, playing: null };
  }

  /** Follow a ward's alerts (the `alerts` stream, Ward.watchAlerts). */
  attach(ward) {
    if (this.ward === ward) return;
    if (this.offWard) this.offWard();
    this.ward = ward;
    this.offWard = ward.on((what) => { if (what === 'alerts') this.update(); });
    this.update();
  }

  detach() {
    if (this.offWard) this.offWard();
    this.offWard = null;
    this.ward = null;
    this.disable();
  }

  /** Turn the signal on; call it from a click (browsers need a user gesture for audio). */
  enable() {
    try {
      if (!this.ctx) {
        const Ctor = window.AudioContext || window.webkitAudioContext;
        this.ctx = new Ctor();
        const n = HARMONICS.length;
        this.wave = this.ctx.createPeriodicWave(new Float32Array(n), Float32Array.from(HARMONICS));
      }
      if (this.ctx.state === 'suspended') this.ctx.resume().catch(() => {});
    } catch (e) {
      console.warn('alarm audio unavailable:', e.message); // the state is still tracked
      this.ctx = null;
    }
    this.state.enabled = true;
    this.update();
  }

  disable() {
    this.state.enabled = false;
    this.unpause();
    this.update();
  }

  /** Audio paused for PAUSE_S seconds (the visual signals go on). */
  pause() {
    this.state.mutedUntil = Date.now() / 1000 + PAUSE_S;
    this.mutedLevel = rank(this.level());
    clearTimeout(this.pauseTimer);
    this.pauseTimer = setTimeout(() => this.update(), PAUSE_S * 1000 + 50);
    this.update();
  }

  unpause() {
    clearTimeout(this.pauseTimer);
    this.state.mutedUntil = null;
    this.mutedLevel = 0;
  }

  /** Seconds of audio pause left (0 when not paused). */
  remaining() {
    const u = this.state.mutedUntil;
    return u == null ? 0 : Math.max(0, Math.ceil(u - Date.now() / 1000));
  }

  /** The priority of the highest unacknowledged alert, or null. */
  level() {
    let best = null;
    for (const a of this.ward ? this.ward.alerts : []) {
      if (a.state === 'active' && rank(a.priority) > rank(best)) best = a.priority;
    }
    return best;
  }

  update() {
    const level = this.level();
    const s = this.state;
    if (s.mutedUntil != null && (Date.now() / 1000 >= s.mutedUntil || rank(level) > this.mutedLevel)) {
      this.unpause(); // timed out, or a higher-priority alert arrived: the pause ends
    }
    const want = s.enabled && s.mutedUntil == null ? level : null;
    // a low-priority signal is not repeated, but a newly raised low alert is announced once
    let fresh = false;
    const active = new Set();
    for (const a of this.ward ? this.ward.alerts : []) {
      if (a.state !== 'active' || a.priority !== 'low') continue;
      active.add(a.alert_id);
      if (!this.heard.has(a.alert_id)) fresh = true;
    }
    if (want === 'low' || !s.enabled) this.heard = active;
    if (want !== s.playing || (want === 'low' && fresh)) {
      this.stop();
      s.playing = want;
      if (want) this.start(want);
    }
    this.emit('change', s);
  }

  start(priority) {
    const sig = SIGNALS[priority];
    const burst = () => {
      this.burst(sig);
      if (sig.period) this.timer = setTimeout(burst, sig.period * 1000);
    };
    burst();
  }

  stop() {
    clearTimeout(this.timer);
    this.timer = null;
    if (this.out) {
      try { this.out.disconnect(); } catch (e) { /* already gone */ }
      this.out = null;
    }
  }

  /** Schedule one burst of pulses on the audio clock (sample-accurate timing). */
  burst(sig) {
    const ctx = this.ctx;
    if (!ctx || ctx.state === 'closed') return;
    if (!this.out) {
      this.out = ctx.createGain();
      this.out.gain.value = 0.2;
      this.out.connect(ctx.destination);
    }
    const t0 = ctx.currentTime + 0.05;
    const rise = sig.td * 0.15; // 10-20 % of td
    for (const start of sig.starts) {
      const t = t0 + start;
      const osc = ctx.createOscillator();
      const env = ctx.createGain();
      osc.setPeriodicWave(this.wave);
      osc.frequency.value = sig.freq;
      env.gain.setValueAtTime(0, t);
      env.gain.linearRampToValueAtTime(1, t + rise);
      env.gain.setValueAtTime(1, t + sig.td - rise);
      env.gain.linearRampToValueAtTime(0, t + sig.td);
      osc.connect(env);
      env.connect(this.out);
      osc.start(t);
      osc.stop(t + sig.td + 0.01);
      osc.onended = () => { osc.disconnect(); env.disconnect(); };
    }
  }
}

const perWard = new WeakMap();

/** The one alarm audio of a ward (so it keeps sounding while the user looks at a patient). */
export function audioFor(ward, api) {
  let a = perWard.get(ward);
  if (!a) {
    a = new AlarmAudio();
    a.attach(ward);
    perWard.set(ward, a);
    // logging out ends the session's ward: its alarm must not go on sounding
    const off = api.on((what) => { if (what === 'logout') { off(); a.detach(); } });
  }
  return a;
}
