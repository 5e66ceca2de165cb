"""``vitalwire bench web``: the clinicians' central station in headless Chromium, under load.

Issue 27's targets for a 64-bed station at 1 Hz per device: reading-to-screen latency p99
<= 250 ms, main-thread busy <= 20 %, JS heap after 30 minutes within 10 % of its level after 1
minute. One run:

1. ``vitalwire serve`` in a child process on a fresh SQLite file (:func:`runner.server_process`),
   with ``beds`` patients, one monitor each, and the demo clinician caring for the ward.
2. ``beds`` devices (the SDK's :class:`DeviceClient`, in this process) each send one reading per
   ``1/rate`` s, their phases spread over the interval as unsynchronised monitors are; a
   reading's device timestamp ``ts`` is its send time, so latency = screen time - ``ts``.
3. Chromium (Playwright, the system's ``chromium``) logs in as the clinician on ``/`` and waits
   for the station's ``beds`` tiles. An init script (run by the browser before the page's own
   scripts; the page's CSP does not apply to it) watches the tiles' ``data-ts`` attribute, which
   the station updates in the render that shows a new reading. For each change it takes the time
   in the next ``requestAnimationFrame`` callback (the frame that paints the change: closer to
   "on screen" than the mutation itself, which is recorded too) minus ``data-ts``.
4. The baseline, in the same run and the same browser: a bare page of the same origin (no app,
   no rendering: the server's ``/healthz`` document) with its own ``/ws`` connection subscribed
   to the same streams, which only parses the frames and takes the time at ``onmessage`` and at
   the next animation frame. The difference between the two is what the app (model, Preact
   render, layout, paint) adds to the socket and the browser's own frame scheduling.
5. Main-thread busy from the DevTools protocol (``Performance.getMetrics``: ``TaskDuration``
   delta over ``Timestamp`` delta) over the measured window, for both pages; the station's JS
   heap (``JSHeapUsedSize`` after ``HeapProfiler.collectGarbage``) at ``heap_at`` s and at the
   end. Samples are drained from the pages every second so the bench's own records do not grow
   the heap it measures.

The first ``warmup`` s after the station is up are not measured. With ``trace_s``, a Chromium
trace of the station alone follows the measurement, summarised as its main thread's time by
event (what dominates the busy share).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import os
import random
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

from vitalwire.bench.runner import machine, server_process
from vitalwire.sdk import DeviceClient

#: Debian's Chromium (Playwright's own browser downloads are not used).
CHROMIUM = "/usr/bin/chromium"

#: Issue 27's targets.
TARGET_P99_MS = 250.0
TARGET_BUSY_PCT = 20.0
TARGET_HEAP_GROWTH_PCT = 10.0

# Runs in the station page before its scripts. Records, per data-ts change of a tile:
# [wall s at the mutation, latency s at the mutation, latency s at the next animation frame].
# Also long tasks (> 50 ms), CSP violations. window.__vwBench.drain() hands the records over and
# empties them.
_STATION_PROBE = r"""
(() => {
  const now = () => (performance.timeOrigin + performance.now()) / 1000;
  const b = { samples: [], pending: [], longtasks: [], csp: [], frame: false };
  window.__vwBench = b;
  b.drain = () => {
    const out = { samples: b.samples, longtasks: b.longtasks, csp: b.csp };
    b.samples = []; b.longtasks = []; b.csp = [];
    return out;
  };
  const onFrame = () => {
    const t = now();
    for (const [tm, ts] of b.pending) b.samples.push([tm, tm - ts, t - ts]);
    b.pending = [];
    b.frame = false;
  };
  const mo = new MutationObserver((records) => {
    const t = now();
    for (const r of records) {
      const el = r.target;
      if (r.attributeName !== 'data-ts' || el.dataset.testid !== 'tile') continue;
      const ts = parseFloat(el.dataset.ts);
      if (Number.isFinite(ts) && String(ts) !== String(parseFloat(r.oldValue))) {
        b.pending.push([t, ts]);
      }
    }
    if (b.pending.length && !b.frame) { b.frame = true; requestAnimationFrame(onFrame); }
  });
  mo.observe(document, {
    subtree: true, attributes: true, attributeOldValue: true, attributeFilter: ['data-ts'],
  });
  try {
    new PerformanceObserver((list) => {
      for (const e of list.getEntries()) b.longtasks.push([e.startTime, e.duration]);
    }).observe({ type: 'longtask', buffered: true });
  } catch (e) { /* no long task API: none reported */ }
  document.addEventListener('securitypolicyviolation', (e) => {
    b.csp.push(`${e.violatedDirective} ${e.blockedURI}`);
  });
})();
"""

# The baseline page: the same readings over its own /ws, parsed and nothing else.
_BASELINE_SOCKET = r"""
([token, streams]) => new Promise((resolve, reject) => {
  const now = () => (performance.timeOrigin + performance.now()) / 1000;
  const b = { samples: [], pending: [], frame: false, errors: [] };
  window.__vwBench = b;
  b.drain = () => { const out = { samples: b.samples, errors: b.errors }; b.samples = [];
    b.errors = []; return out; };
  const onFrame = () => {
    const t = now();
    for (const [tm, ts] of b.pending) b.samples.push([tm, tm - ts, t - ts]);
    b.pending = [];
    b.frame = false;
  };
  const take = (e, t) => {
    if (e.kind === 'reading' && typeof e.data?.ts === 'number') b.pending.push([t, e.data.ts]);
  };
  const ws = new WebSocket(location.origin.replace(/^http/, 'ws') + '/ws');
  ws.onopen = () => ws.send(JSON.stringify({ type: 'auth', token, id: 0 }));
  ws.onclose = (e) => {
    b.errors.push(`closed ${e.code} ${e.reason}`);
    reject(new Error(`closed ${e.code}`));
  };
  ws.onmessage = (m) => {
    const t = now();
    const msg = JSON.parse(m.data);
    if (msg.type === 'event') take(msg, t);
    else if (msg.type === 'events') for (const e of msg.items) take(e, t);
    else if (msg.type === 'ping') ws.send('{"type":"pong"}');
    else if (msg.type === 'result' && msg.id === 0) {
      ws.send(JSON.stringify({ type: 'subscribe', streams, batch: true, id: 1 }));
    } else if (msg.type === 'subscribed') resolve(true);
    else if (msg.type === 'error') {
      b.errors.push(`${msg.code}: ${msg.message}`);
      reject(new Error(msg.message));
    }
    if (b.pending.length && !b.frame) { b.frame = true; requestAnimationFrame(onFrame); }
  };
})
"""


def _pct(samples_s: list[float]) -> dict[str, float | int | None]:
    """count, p50, p95, p99 and max in ms (nearest rank)."""
    if not samples_s:
        return {"n": 0, "p50": None, "p95": None, "p99": None, "max": None}
    s = sorted(x * 1000 for x in samples_s)

    def rank(q: float) -> float:
        return s[min(len(s) - 1, max(0, math.ceil(q * len(s)) - 1))]

    return {"n": len(s), "p50": rank(0.5), "p95": rank(0.95), "p99": rank(0.99), "max": s[-1]}


def browser_missing(executable: str = CHROMIUM) -> str | None:
    """Why the browser bench cannot run here (None: it can)."""
    try:
        import playwright.async_api  # noqa: F401
    except ImportError:
        return "playwright (Python) is not installed"
    if not (os.path.exists(executable) or shutil.which(executable)):
        return f"no chromium at {executable}"
    return None


def _keep(console: list[str], m: Any) -> None:
    if m.type in ("error", "warning"):
        console.append(f"{m.type}: {m.text}")


async def _metrics(cdp: Any) -> dict[str, float]:
    r = await cdp.send("Performance.getMetrics")
    return {m["name"]: m["value"] for m in r["metrics"]}


# The points the app's patient models hold in their live trends (window.vitalwire.ward, exposed
# for tests and this bench): what the heap grows with while the trend window fills.
_TREND_POINTS = """() => {
  let n = 0;
  for (const m of window.vitalwire?.ward?.models?.values() ?? []) {
    for (const s of Object.values(m.trend ?? {})) n += s.t?.length ?? 0;
  }
  return n;
}"""


async def _heap(cdp: Any, page: Any) -> dict[str, float]:
    """The JS heap after a full collection, with the DOM's size (a leak often shows there) and
    the points in the models' live trends."""
    await cdp.send("HeapProfiler.collectGarbage")
    m = await _metrics(cdp)
    return {
        "trend_points": await page.evaluate(_TREND_POINTS),
        "js_heap_used_mb": m["JSHeapUsedSize"] / 2**20,
        "js_heap_total_mb": m["JSHeapTotalSize"] / 2**20,
        "dom_nodes": m.get("Nodes", 0),
        "event_listeners": m.get("JSEventListeners", 0),
    }


def _busy(m0: dict[str, float], m1: dict[str, float]) -> dict[str, Any]:
    """The main thread's busy share of the wall time between two ``Performance.getMetrics``
    (``TaskDuration``: every task it ran), with its parts (``ScriptDuration``,
    ``LayoutDuration``, ``RecalcStyleDuration``, ``TaskOtherDuration``: paint, commit, ...)."""
    wall = m1["Timestamp"] - m0["Timestamp"]

    def pct(key: str) -> float:
        return 100.0 * (m1.get(key, 0.0) - m0.get(key, 0.0)) / wall if wall > 0 else 0.0

    return {
        "wall_s": wall,
        "busy_pct": pct("TaskDuration"),
        "busy_by_kind": {
            k.removesuffix("Duration").lower(): pct(k)
            for k in sorted(m1)
            if k.endswith("Duration") and k != "TaskDuration"
        },
    }


def _main_thread_self_ms(trace: dict[str, Any]) -> dict[str, float]:
    """Self time (ms) by event name on the renderers' main threads (``CrRendererMain``) of a
    Chromium trace: each complete event (``ph: X``) minus the events nested in it; the 15
    largest."""
    events = trace.get("traceEvents", [])
    mains = {
        (e["pid"], e["tid"])
        for e in events
        if e.get("ph") == "M"
        and e.get("name") == "thread_name"
        and e.get("args", {}).get("name") == "CrRendererMain"
    }
    xs = sorted(
        (e for e in events if e.get("ph") == "X" and (e.get("pid"), e.get("tid")) in mains),
        key=lambda e: (e["pid"], e["tid"], e["ts"], -e.get("dur", 0)),
    )
    self_us: dict[str, float] = {}
    stack: list[tuple[Any, float, str]] = []  # (thread, end, name)
    for e in xs:
        thread, start, dur = (e["pid"], e["tid"]), e["ts"], e.get("dur", 0)
        while stack and (stack[-1][0] != thread or stack[-1][1] <= start):
            stack.pop()
        if stack:  # nested: not its parent's own time
            self_us[stack[-1][2]] = self_us.get(stack[-1][2], 0.0) - dur
        self_us[e["name"]] = self_us.get(e["name"], 0.0) + dur
        stack.append((thread, start + dur, e["name"]))
    top = sorted(self_us.items(), key=lambda kv: -kv[1])[:15]
    return {name: round(us / 1000, 1) for name, us in top}


async def _stalls(stop: asyncio.Event, out: dict[int, float]) -> None:
    """Per wall-clock second, the longest stall of this process's event loop (ms): a reading
    is stamped when the device loop runs, so a stall delays it inside the latency measured."""
    tick = 0.01
    last = time.monotonic()
    while not stop.is_set():
        await asyncio.sleep(tick)
        now = time.monotonic()
        second = int(time.time())
        out[second] = max(out.get(second, 0.0), (now - last - tick) * 1000)
        last = now


async def _devices(
    url: str, devices: list[dict[str, str]], rate: float, stop: asyncio.Event, sent: list[float]
) -> None:
    """Each device sends plausible adult vitals every 1/rate s (device time = send time); the
    phases are spread over the interval. ``sent`` collects the send times."""
    clients = [DeviceClient(url, d["device_id"], d["secret"]) for d in devices]
    for c in clients:
        await c.start(wait=False)
    try:
        await asyncio.gather(*(c.wait_connected(timeout=30) for c in clients))
        period = 1.0 / rate
        t0 = time.time() + 0.5
        rnd = random.Random(27)

        async def run(i: int, c: DeviceClient) -> None:
            k = 0
            hr = rnd.uniform(60, 90)
            while not stop.is_set():
                due = t0 + period * (k + i / len(clients))
                await asyncio.sleep(max(0.0, due - time.time()))
                if stop.is_set():
                    return
                hr = min(100.0, max(55.0, hr + rnd.uniform(-2, 2)))
                c.send(
                    spo2=round(rnd.uniform(95, 99)),
                    pulse=round(hr),
                    hr=round(hr),
                    rr=round(rnd.uniform(12, 18)),
                    temp_c=round(rnd.uniform(36.5, 37.2), 1),
                    sbp=round(rnd.uniform(112, 128)),
                    dbp=round(rnd.uniform(70, 82)),
                    battery=90,
                    probe=True,
                )
                sent.append(time.time())
                k += 1

        await asyncio.gather(*(run(i, c) for i, c in enumerate(clients)))
    finally:
        for c in clients:
            await c.close()


async def bench_web(
    beds: int = 64,
    rate: float = 1.0,
    duration: float = 300.0,
    heap_at: float = 60.0,
    warmup: float = 5.0,
    executable: str = CHROMIUM,
    trace_s: float = 0.0,
    progress: Any = None,
) -> dict[str, Any]:
    """Run the central station under ``beds`` devices at ``rate`` Hz for ``duration`` measured
    seconds (after ``warmup``); return latency, busy and heap for the station and the baseline.

    Raises:
        RuntimeError: playwright or chromium is missing, or the station never showed its tiles.
    """
    why = browser_missing(executable)
    if why:
        raise RuntimeError(why)
    from playwright.async_api import async_playwright

    say = progress or (lambda msg: None)
    if heap_at >= duration:  # a short run: the first heap sample halfway
        heap_at = duration / 2
    result: dict[str, Any] = {
        "scenario": "web",
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "chromium": executable,
        "beds": beds,
        "rate_hz": rate,
        "duration_s": duration,
        "warmup_s": warmup,
        "heap_at_s": heap_at,
        "targets": {
            "p99_ms": TARGET_P99_MS,
            "busy_pct": TARGET_BUSY_PCT,
            "heap_growth_pct": TARGET_HEAP_GROWTH_PCT,
        },
        "machine": machine(),
    }
    with tempfile.TemporaryDirectory() as tmp:
        async with server_process(Path(tmp), beds) as srv:
            user = next(u for u in srv.creds.users if u["role"] == "clinician")
            streams = [f"patient:{d['patient_id']}" for d in srv.creds.devices]
            stop = asyncio.Event()
            sent: list[float] = []
            load = asyncio.create_task(_devices(srv.url, srv.creds.devices, rate, stop, sent))
            stalls: dict[int, float] = {}
            sampler = asyncio.create_task(_stalls(stop, stalls))
            try:
                async with async_playwright() as p:
                    args = ["--no-sandbox"] if os.geteuid() == 0 else []
                    browser = await p.chromium.launch(executable_path=executable, args=args)
                    try:
                        await _measure(
                            browser,
                            srv.url,
                            user,
                            streams,
                            beds,
                            duration,
                            heap_at,
                            warmup,
                            sent,
                            stalls,
                            result,
                            say,
                            trace_s,
                        )
                    finally:
                        await browser.close()
            finally:
                stop.set()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await asyncio.wait_for(load, 30)
                await sampler
                if load.done() and not load.cancelled() and load.exception():
                    result.setdefault("errors", []).append(f"devices: {load.exception()!r}")
    return result


async def _measure(
    browser: Any,
    url: str,
    user: dict[str, str],
    streams: list[str],
    beds: int,
    duration: float,
    heap_at: float,
    warmup: float,
    sent: list[float],
    stalls: dict[int, float],
    result: dict[str, Any],
    say: Any,
    trace_s: float,
) -> None:
    errors: list[str] = result.setdefault("errors", [])
    console: list[str] = []
    # a central station's screen
    ctx = await browser.new_context(viewport={"width": 1920, "height": 1080})
    page = await ctx.new_page()
    page.on("console", lambda m: _keep(console, m))
    page.on("pageerror", lambda e: console.append(f"pageerror: {e}"))
    await page.add_init_script(_STATION_PROBE)
    say("logging in as the clinician")
    await page.goto(url + "/")
    await page.fill("#login-user", user["username"])
    await page.fill("#login-password", user["password"])
    await page.click("#login-submit")
    await page.wait_for_selector("[data-testid=station]", timeout=30_000)
    say(f"waiting for {beds} tiles")
    # polled from here: page.wait_for_function would evaluate its predicate with eval inside
    # the page, which the page's CSP (no 'unsafe-eval') refuses
    shown = "[...document.querySelectorAll('[data-testid=tile]')].filter((t) => t.dataset.ts)"
    deadline = time.monotonic() + 60
    while (n := await page.evaluate(f"{shown}.length")) < beds:
        if time.monotonic() > deadline:
            raise RuntimeError(f"the station showed {n} tiles with a reading in 60 s, not {beds}")
        await asyncio.sleep(0.25)
    cdp = await ctx.new_cdp_session(page)
    await cdp.send("Performance.enable", {"timeDomain": "timeTicks"})

    # the baseline: a document of the same origin with no app in it (/healthz's JSON; its
    # policy, default-src 'none', would block the socket, hence bypass_csp for this page only.
    # A page the bench served itself through a route would not do: Chromium's local network
    # access checks refuse its socket to a loopback address)
    bctx = await browser.new_context(viewport={"width": 800, "height": 600}, bypass_csp=True)
    base = await bctx.new_page()
    base.on("pageerror", lambda e: console.append(f"baseline pageerror: {e}"))
    await base.goto(url + "/healthz")
    async with httpx.AsyncClient(base_url=url) as http:
        r = await http.post(
            "/auth/login", json={"username": user["username"], "password": user["password"]}
        )
        r.raise_for_status()
        token = r.json()["access_token"]
    await base.evaluate(_BASELINE_SOCKET, [token, streams])
    bcdp = await bctx.new_cdp_session(base)
    await bcdp.send("Performance.enable", {"timeDomain": "timeTicks"})

    say(f"warm-up {warmup:g} s")
    await asyncio.sleep(warmup)
    drain = "() => window.__vwBench.drain()"
    await page.evaluate(drain)
    await base.evaluate(drain)
    station_s: list[list[float]] = []
    baseline_s: list[list[float]] = []
    longtasks: list[list[float]] = []
    csp: list[str] = []
    sent_from = len(sent)
    wall0 = time.time()
    m0, b0 = await _metrics(cdp), await _metrics(bcdp)
    t0 = time.monotonic()
    heap_first: dict[str, float] | None = None
    heap_timeline: list[dict[str, float]] = []
    say(f"measuring {duration:g} s")
    next_note = 60.0
    while (elapsed := time.monotonic() - t0) < duration:
        await asyncio.sleep(min(1.0, duration - elapsed))
        got = await page.evaluate(drain)
        station_s += got["samples"]
        longtasks += got["longtasks"]
        csp += got["csp"]
        bgot = await base.evaluate(drain)
        baseline_s += bgot["samples"]
        errors += [f"baseline: {e}" for e in bgot["errors"]]
        elapsed = time.monotonic() - t0
        if heap_first is None and elapsed >= heap_at:
            heap_first = await _heap(cdp, page)
            heap_first["at_s"] = elapsed
            say(f"heap at {elapsed:.0f} s: {heap_first['js_heap_used_mb']:.2f} MB")
        if elapsed >= next_note:  # without a collection: the heap as it goes
            m = await _metrics(cdp)
            heap_timeline.append({"at_s": elapsed, "js_heap_used_mb": m["JSHeapUsedSize"] / 2**20})
            say(f"{elapsed:.0f} s: {len(station_s):,} tile updates")
            next_note += 60.0
    m1, b1 = await _metrics(cdp), await _metrics(bcdp)
    # the machine is shared with the server, the devices and the browser (and whatever else runs)
    result["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
    result["browser_version"] = browser.version
    sent_in_window = len(sent) - sent_from
    heap_end = await _heap(cdp, page)
    heap_end["at_s"] = time.monotonic() - t0
    live = await page.evaluate(
        "document.querySelector('[data-testid=conn-status]')?.dataset.live ?? null"
    )

    def lat(samples: list[list[float]], i: int) -> dict[str, Any]:
        return _pct([s[i] for s in samples])

    growth = None
    if heap_first and heap_first["js_heap_used_mb"] > 0:
        growth = 100.0 * (heap_end["js_heap_used_mb"] / heap_first["js_heap_used_mb"] - 1)
    timeline: dict[int, dict[str, float]] = {}
    for key, samples, i in (
        ("station_over_100ms", station_s, 2),
        ("baseline_over_100ms", baseline_s, 1),
    ):
        for sample in samples:
            if sample[i] > 0.1:
                row = timeline.setdefault(int(sample[0] - wall0), {})
                row[key] = row.get(key, 0) + 1
    for second, stall in stalls.items():
        if stall >= 20 and second >= wall0:
            timeline.setdefault(int(second - wall0), {})["bench_loop_stall_ms"] = round(stall)
    longest = sorted(longtasks, key=lambda x: -x[1])[:10]
    result.update(
        {
            "readings_sent": sent_in_window,
            "station": {
                "latency_raf_ms": lat(station_s, 2),
                "latency_mutation_ms": lat(station_s, 1),
                "tile_updates": len(station_s),
                **_busy(m0, m1),
                "heap_first": heap_first,
                "heap_end": heap_end,
                "heap_growth_pct": growth,
                "heap_timeline": heap_timeline,
                "long_tasks": len(longtasks),
                "long_tasks_ms": sum(d for _, d in longtasks),
                "longest_tasks_ms": [round(d, 1) for _, d in longest],
                "connection_live_at_end": live == "true",
            },
            "baseline": {
                "what": "bare page, own /ws, frames parsed only (same browser, same streams)",
                "latency_raf_ms": lat(baseline_s, 2),
                "latency_message_ms": lat(baseline_s, 1),
                "readings": len(baseline_s),
                **_busy(b0, b1),
            },
            "timeline": [{"s": k, **v} for k, v in sorted(timeline.items())],
            "console_errors": console[:20],
            "csp_violations": csp[:20],
        }
    )
    st = result["station"]
    p99 = st["latency_raf_ms"]["p99"]
    result["verdict"] = {
        "p99_ms": None if p99 is None else p99 <= TARGET_P99_MS,
        "busy_pct": st["busy_pct"] <= TARGET_BUSY_PCT,
        "heap_growth_pct": None if growth is None else abs(growth) <= TARGET_HEAP_GROWTH_PCT,
    }
    await bctx.close()
    if trace_s > 0:  # what the station's main thread spends its time on, the baseline closed
        say(f"tracing the station for {trace_s:g} s")
        await browser.start_tracing(
            page=page,
            categories=[
                "devtools.timeline",
                "disabled-by-default-devtools.timeline",
                "v8.execute",
                "blink",
                "cc",
            ],
        )
        await asyncio.sleep(trace_s)
        trace = json.loads(await browser.stop_tracing())
        result["station"]["trace"] = {
            "seconds": trace_s,
            "self_ms_by_event": _main_thread_self_ms(trace),
        }
    await ctx.close()


__all__ = ["CHROMIUM", "bench_web", "browser_missing"]
