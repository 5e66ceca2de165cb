"""``vitalwire bench history``: vitals history on a store holding days of 1 Hz readings.

Builds a store of ``patients`` × ``hours`` of 1 Hz readings (hr, spo2, pulse, rr: four metrics a
pulse oximeter and ECG send) through the store's own write path (``write_batch``, as the
server writes them: the events, and with them the roll-ups of the minutes that ended; all it
holds in memory written at the end, as a server does when it stops), a minute of every patient
per batch, so the rows of one patient interleave with the others' as on a ward. Then times, through
the history service (:class:`vitalwire.services.history.History`, the code behind
``GET /patients/{id}/vitals`` without HTTP and JSON), requests of each kind for random patients:

- ``day buckets``: a day (less a minute, from an unaligned start) in at most 2,000 buckets (the
  service rounds 43.2 s up to the 60 s grain: 1,440 buckets), from the roll-ups;
- ``day buckets, baseline``: the same requests computed in Python over the raw rows (the path
  before roll-ups), in the same run;
- ``hour raw``: one hour of raw points, every page walked by the cursor (1,000 a page).

SQLite goes in a temporary directory (deleted after); PostgreSQL in a new database on the
server given, dropped after.
"""

from __future__ import annotations

import contextlib
import gc
import math
import os
import random
import shutil
import tempfile
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from vitalwire.bench.runner import percentiles
from vitalwire.core import events as ev
from vitalwire.services.container import GC_THRESHOLDS
from vitalwire.services.history import MAX_BUCKETS, History
from vitalwire.store.base import Batch
from vitalwire.store.sql import SqlStore
from vitalwire.wire import Event

#: Day zero of the built store (a fixed epoch second, a multiple of the grain).
T0 = 1_767_225_600.0  # 2026-01-01T00:00:00Z
BATCH_S = 60


class _Access:
    """The service's access hooks, allowing everything (the bench measures the read)."""

    def check(self, who: Any, what: Any, pid: str) -> None:
        return None

    def refused(self, *a: Any) -> None:
        return None

    def audit(self, *a: Any) -> None:
        return None

    def via_break_glass(self, who: Any, pid: str) -> bool:
        return False


@contextlib.asynccontextmanager
async def _database(db: str, postgres: str, directory: Path | None) -> AsyncIterator[str]:
    if db == "postgresql":
        import asyncpg

        admin = await asyncpg.connect(postgres, timeout=10)
        name = f"vwbench_{uuid.uuid4().hex[:12]}"
        await admin.execute(f"CREATE DATABASE {name}")
        try:
            yield postgres.rsplit("/", 1)[0] + "/" + name
        finally:
            await admin.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
            await admin.close()
    else:
        tmp = Path(tempfile.mkdtemp(prefix="vwbench-", dir=directory))
        try:
            yield f"sqlite:///{tmp / 'history.db'}"
        finally:
            shutil.rmtree(tmp, ignore_errors=True)


async def _build(store: SqlStore, patients: int, hours: float, seed: int) -> dict[str, Any]:
    rnd = random.Random(seed)
    pids = [f"B{i:04d}" for i in range(patients)]
    for pid in pids:
        await store.create_patient(pid, f"Bench {pid}", "bench", T0)
    seconds = int(hours * 3600)
    state = {pid: [75.0, 97.0, 16.0] for pid in pids}
    started = time.perf_counter()
    events = 0
    for chunk in range(0, seconds, BATCH_S):
        batch = Batch()
        for p, pid in enumerate(pids):
            stream = ev.patient_stream(pid)
            hr, spo2, rr = state[pid]
            for s in range(chunk, min(chunk + BATCH_S, seconds)):
                hr = min(180.0, max(35.0, hr + rnd.choice((-1.0, 0.0, 1.0))))
                spo2 = min(100.0, max(80.0, spo2 + rnd.choice((-0.1, 0.0, 0.1))))
                ts = T0 + s + (p % 97) / 100  # receive times: each patient's own phase
                data = {
                    "device": f"mon-{p}",
                    "seq": s + 1,
                    "ts": ts - 0.05,
                    "hr": hr,
                    "pulse": hr,
                    "spo2": round(spo2, 1),
                    "rr": rr,
                }
                batch.events.append(Event.new(stream, s + 1, "reading", ts, data))
            state[pid] = [hr, spo2, rr]
        await store.write_batch(batch)
        events += len(batch.events)
    await store.flush_rollups()
    build_s = time.perf_counter() - started
    return {"patients": pids, "events": events, "build_s": build_s}


async def _analyze(store: SqlStore) -> None:
    from sqlalchemy import text

    if store.backend == "postgresql":
        async with store.engine.connect() as conn:
            conn = await conn.execution_options(isolation_level="AUTOCOMMIT")
            await conn.execute(text("VACUUM ANALYZE"))
    else:
        async with store.engine.begin() as conn:
            await conn.execute(text("ANALYZE"))


async def _time(fn: Any, n: int) -> dict[str, Any]:
    """Wall-clock percentiles of ``n`` calls, and (``cpu``) this process's CPU time per call
    (all its threads, SQLite's included; not PostgreSQL's server): on a shared machine the
    wall clock also counts the time other processes held the cores."""
    samples: list[float] = []
    cpu: list[float] = []
    for _ in range(n):
        started, cpu_started = time.perf_counter(), time.process_time()
        await fn()
        samples.append((time.perf_counter() - started) * 1000)
        cpu.append((time.process_time() - cpu_started) * 1000)
    out: dict[str, Any] = percentiles(samples)
    s = sorted(samples)
    out["p95"] = s[max(0, math.ceil(0.95 * len(s)) - 1)]
    out["cpu"] = percentiles(cpu)
    return out


async def bench_history(
    db: str,
    patients: int,
    hours: float,
    requests: int,
    baseline_requests: int,
    postgres: str,
    directory: Path | None = None,
    seed: int = 26,
) -> dict[str, Any]:
    """Build the store, time each kind of request; the figures as a dict."""
    thresholds = gc.get_threshold()
    async with _database(db, postgres, directory) as url:
        store = SqlStore(url)
        await store.open()
        try:
            built = await _build(store, patients, hours, seed)
            started = time.perf_counter()
            await _analyze(store)
            analyze_s = time.perf_counter() - started
            size = None
            if db == "sqlite":
                path = Path(url.removeprefix("sqlite:///"))
                size = sum(f.stat().st_size for f in path.parent.iterdir())
            # as the server does once started (services/container.py): what was built so far
            # lives on, out of every collection; the collector's thresholds the server's
            gc.collect()
            gc.freeze()
            gc.set_threshold(*GC_THRESHOLDS)
            history = History(store, _Access(), lambda: T0 + hours * 3600)  # type: ignore[arg-type]
            who = SimpleNamespace(name="bench")
            rnd = random.Random(seed + 1)
            pids: list[str] = built["patients"]
            span = min(86400.0, hours * 3600) - 60

            async def day(rollups: bool) -> None:
                history.use_rollups = rollups
                frm = T0 + rnd.uniform(0, 60)
                r = await history.vitals(
                    who, rnd.choice(pids), frm, frm + span, None, span / MAX_BUCKETS,
                    None, 100, None,
                )  # fmt: skip
                assert r.buckets and len(r.buckets) <= MAX_BUCKETS

            async def hour() -> None:
                frm = T0 + rnd.uniform(0, max(0.0, hours * 3600 - 3600))
                pid = rnd.choice(pids)
                cursor = None
                got = 0
                while True:
                    r = await history.vitals(
                        who, pid, frm, frm + 3600, None, None, cursor, 1000, None
                    )
                    got += len(r.items)
                    cursor = r.next_cursor
                    if cursor is None:
                        break
                assert got >= 3599, got

            results = {
                "day buckets (roll-ups)": await _time(lambda: day(True), requests),
                "day buckets, baseline (Python over raw rows)": await _time(
                    lambda: day(False), baseline_requests
                ),
                "hour raw (all pages)": await _time(hour, requests),
            }
        finally:
            gc.unfreeze()
            gc.set_threshold(*thresholds)
            await store.close()
    return {
        "db": db,
        "patients": patients,
        "hours": hours,
        "events": built["events"],
        "build_s": round(built["build_s"], 1),
        "analyze_s": round(analyze_s, 1),
        "sqlite_bytes": size,
        "load_average": os.getloadavg(),
        "requests": results,
    }


__all__ = ["bench_history"]
