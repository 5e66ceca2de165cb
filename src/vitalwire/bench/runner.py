"""``vitalwire bench``: measure the server, always beside a baseline from the same run.

Each scenario starts ``vitalwire serve`` in a child process on a fresh SQLite file (so the load
generator, in this process, does not share the server's event loop), drives it through the SDK,
and prints the figures with the baseline next to them:

- ``ingest``: readings/s acknowledged as durable (the device only counts an ``ack``, sent after
  the commit), beside the same rows written straight into a store with no server in front.
- ``commands``: command round trip client -> server -> device -> server -> client (queued, sent,
  acknowledged and completed are each committed), beside a client ping -> pong on the same socket.
- ``catchup``: a client that saw the patients' streams, went away while minutes of readings were
  stored, resumes with ``since``: time from its ``subscribe`` to the last missed event, each offset
  checked received once; beside the same events read straight from the SQLite file.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Collection
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import httpx

from vitalwire import wire
from vitalwire.provision import WardCredentials, provision_ward
from vitalwire.sdk import DeviceClient, MonitorClient
from vitalwire.settings import Settings
from vitalwire.store import Batch, ReadingRow, open_store
from vitalwire.wire import Event


def percentiles(samples_ms: list[float]) -> dict[str, float]:
    """p50, p99, p99.9 and max of a list of milliseconds (nearest-rank)."""
    if not samples_ms:
        return {"p50": 0.0, "p99": 0.0, "p99.9": 0.0, "max": 0.0, "n": 0}
    s = sorted(samples_ms)

    def rank(q: float) -> float:
        return s[min(len(s) - 1, max(0, math.ceil(q * len(s)) - 1))]

    return {"p50": rank(0.50), "p99": rank(0.99), "p99.9": rank(0.999), "max": s[-1], "n": len(s)}


def machine() -> dict[str, Any]:
    return {
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "platform": platform.platform(terse=True),
    }


@dataclass
class ServerProcess:
    url: str
    proc: subprocess.Popen[bytes]
    creds: WardCredentials


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


#: The limits every server a bench starts runs with (``VITALWIRE_*``; the environment and a
#: mode's own settings win over them).
BENCH_LIMITS = {
    # the load generator sends far faster than one real device may
    "VITALWIRE_DEVICE_MSGS_PER_S": "1000000",
    "VITALWIRE_DEVICE_MSGS_BURST": "1000000",
    # the bench's clients all log in as one user; they stand for many
    "VITALWIRE_MAX_CONNECTIONS_PER_USER": "100000",
    "VITALWIRE_CLIENT_MSGS_PER_S": "1000000",
    "VITALWIRE_CLIENT_MSGS_BURST": "1000000",
    # every device and client connects from this one address, all at once
    "VITALWIRE_PRE_AUTH_PER_ADDRESS": "100000",
    "VITALWIRE_PRE_AUTH_TOTAL": "100000",
}


def stop_process(proc: subprocess.Popen[bytes] | None) -> None:
    """SIGTERM ``proc`` if it runs and wait for it; SIGKILL it after 30 s."""
    if proc is not None and proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


@contextlib.asynccontextmanager
async def server_process(
    folder: Path, patients: int, env: dict[str, str] | None = None, db: str | None = None
) -> AsyncIterator[ServerProcess]:
    """``vitalwire serve`` on a fresh SQLite file (or the empty database ``db``) with
    ``patients`` provisioned patients; ``env`` (``VITALWIRE_*`` settings) wins over the
    environment."""
    db = db or f"sqlite:///{folder / 'bench.db'}"
    store = open_store(db)
    await store.open()
    try:
        creds = await provision_ward(store, patients=patients)
    finally:
        await store.close()
    port = _free_port()
    env = {
        "VITALWIRE_JWT_SECRET": "bench-" + "x" * 40,
        **BENCH_LIMITS,
        **os.environ,
        **(env or {}),
    }
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "vitalwire.cli",
            "serve",
            "--port",
            str(port),
            "--db",
            db,
            "--log-level",
            "warning",
        ],
        env=env,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        async with httpx.AsyncClient(base_url=url) as http:
            for _ in range(300):
                try:
                    if (await http.get("/healthz")).status_code == 200:
                        break
                except httpx.TransportError:
                    await asyncio.sleep(0.05)
            else:
                raise RuntimeError("server did not start")
        yield ServerProcess(url, proc, creds)
    finally:
        stop_process(proc)


async def bench_ingest(
    devices: int = 20, readings: int = 20_000, batch: int = 200, postgres: str | None = None
) -> dict[str, Any]:
    """Durable ingest through the server vs the same rows written directly into a store: a
    fresh SQLite file, or with ``postgres`` (a server's admin URL) fresh databases there, one
    for the server and one for the baseline, dropped afterwards."""
    if postgres is None:
        with tempfile.TemporaryDirectory() as tmp:
            return await _bench_ingest(devices, readings, batch, Path(tmp), None, None)
    from vitalwire.bench.cluster import fresh_database

    with tempfile.TemporaryDirectory() as tmp:
        async with fresh_database(postgres) as db, fresh_database(postgres) as direct:
            return await _bench_ingest(devices, readings, batch, Path(tmp), db, direct)


async def _bench_ingest(
    devices: int, readings: int, batch: int, tmp: Path, db: str | None, direct: str | None
) -> dict[str, Any]:
    per_device = readings // devices
    async with server_process(tmp, devices, db=db) as srv:
        clients = [
            DeviceClient(
                srv.url,
                d["device_id"],
                d["secret"],
                max_batch=batch,
                buffer_size=per_device + 10,
            )
            for d in srv.creds.devices
        ]
        for c in clients:
            await c.start()
        t0 = time.perf_counter()
        now = time.time()
        for i in range(per_device):
            for c in clients:
                c.send(spo2=97, pulse=70 + i % 20, hr=70 + i % 20, rr=16, ts=now)
        await asyncio.gather(*(c.flush(timeout=600) for c in clients))
        elapsed = time.perf_counter() - t0
        for c in clients:
            await c.close()
    total = per_device * devices
    base = await _direct_store(tmp, total, batch_rows=500, db=direct)
    return {
        "scenario": "ingest",
        "store": "postgresql" if db else "sqlite",
        "devices": devices,
        "readings": total,
        "vitalwire_readings_per_s": total / elapsed,
        "baseline_direct_store_readings_per_s": base,
        "ratio": (total / elapsed) / base,
        "machine": machine(),
    }


async def _direct_store(folder: Path, total: int, batch_rows: int, db: str | None = None) -> float:
    """Rows/s writing the same readings + events straight into the store (no server): a SQLite
    file in ``folder``, or the empty database ``db``."""
    store = open_store(db or f"sqlite:///{folder / 'direct.db'}")
    await store.open()
    try:
        t0 = time.perf_counter()
        per = batch_rows // 2
        for start in range(0, total, per):
            b = Batch()
            for seq in range(start + 1, min(total, start + per) + 1):
                data = {"device": "d", "seq": seq, "ts": 1.0, "spo2": 97.0, "hr": 70.0}
                b.readings.append(ReadingRow("d", seq, "P", seq, 1.0, 1.0))
                b.events.append(Event.new("patient:P", seq, "reading", 1.0, data))
            await store.write_batch(b)
        return total / (time.perf_counter() - t0)
    finally:
        await store.close()


async def bench_commands(count: int = 200) -> dict[str, Any]:
    """Command round trip vs ping round trip, same client socket, same server."""
    with tempfile.TemporaryDirectory() as tmp:
        async with server_process(Path(tmp), 1) as srv:
            d = srv.creds.devices[0]
            dev = DeviceClient(srv.url, d["device_id"], d["secret"])
            dev.on_command("identify", lambda cmd: {"ok": True})
            await dev.start()
            mon = MonitorClient(srv.url, username="clinician", password="vitalwire-clinician")
            await mon.connect()
            rtt: list[float] = []
            ping: list[float] = []
            try:
                for _ in range(count):
                    t0 = time.perf_counter()
                    reply = await mon.request(wire.Ping())
                    assert isinstance(reply, wire.Pong)
                    ping.append((time.perf_counter() - t0) * 1000)
                    t0 = time.perf_counter()
                    reply = await mon.request(
                        wire.SendCommand(patient_id=d["patient_id"], name="identify")
                    )
                    cid = reply.data["command"]["command_id"]
                    while True:
                        e = await mon.next_event(timeout=30)
                        if (
                            e.kind == "command"
                            and e.data["command_id"] == cid
                            and e.data["status"] in ("completed", "failed", "timed_out")
                        ):
                            break
                    rtt.append((time.perf_counter() - t0) * 1000)
                    assert e.data["status"] == "completed", e.data
            finally:
                await mon.close()
                await dev.close()
    return {
        "scenario": "commands",
        "count": count,
        "vitalwire_command_round_trip_ms": percentiles(rtt),
        "baseline_ping_round_trip_ms": percentiles(ping),
        "machine": machine(),
    }


# -------------------------------------------------------------------------------------------------
# catch-up: a client resumes with ``since`` after minutes away
# -------------------------------------------------------------------------------------------------


async def _client_socket(url: str, token: str, compression: bool = True) -> Any:
    """A raw ``/ws`` connection, authenticated (no SDK: every frame is counted as it comes).
    ``compression`` offers permessage-deflate, as the SDK's client and browsers do."""
    from websockets.asyncio.client import connect

    ws = await connect(
        url.replace("http://", "ws://") + "/ws",
        proxy=None,
        max_size=2**24,
        open_timeout=10,
        compression="deflate" if compression else None,
    )
    await ws.send(wire.encode_text(wire.Auth(token=token, id=0)))
    reply = wire.decode_from_server_to_client(await asyncio.wait_for(ws.recv(), 10))
    if not isinstance(reply, wire.Result) or not reply.ok:
        await ws.close()
        raise RuntimeError(f"auth refused: {reply!r}")
    return ws


async def _stream_heads(url: str, token: str, streams: list[str]) -> dict[str, int]:
    """Subscribe without ``since`` and return each stream's offset (the last event published)."""
    ws = await _client_socket(url, token)
    try:
        await ws.send(wire.encode_text(wire.Subscribe(streams=streams, id=1)))
        while True:
            msg = wire.decode_from_server_to_client(await asyncio.wait_for(ws.recv(), 10))
            if isinstance(msg, wire.Error):
                raise RuntimeError(f"subscribe refused: {msg.code}: {msg.message}")
            if isinstance(msg, wire.Subscribed) and msg.id == 1:
                return {s.stream: s.offset for s in msg.streams}
    finally:
        await ws.close()


async def _resume(
    url: str,
    token: str,
    since: dict[str, int],
    batch: bool,
    compression: bool = True,
    quiet_s: float = 10.0,
) -> dict[str, Any]:
    """Reconnect, subscribe with ``since`` and take every event up to the heads the ``subscribed``
    reply names. The clock starts when the subscribe is sent and stops at the last of them."""
    ws = await _client_socket(url, token, compression)
    streams = list(since)
    expected: dict[str, tuple[int, int]] = {}  # stream -> (since, head)
    seen: dict[str, set[int]] = {s: set() for s in streams}
    early: list[wire.EventFrame] = []  # events before the reply (the protocol says: none)
    remaining = -1
    dup = frames = events_frames = nbytes = 0
    kinds: dict[str, int] = {}
    recovered = True
    t_reply = t_first = t_last = 0.0

    def take(e: wire.EventFrame) -> None:
        nonlocal remaining, dup, t_last
        got = seen.get(e.stream)
        if got is None:
            return
        if e.offset in got:
            dup += 1
            return
        got.add(e.offset)
        lo, hi = expected[e.stream]
        if lo < e.offset <= hi:
            remaining -= 1
            kinds[e.kind] = kinds.get(e.kind, 0) + 1
            if remaining == 0:
                t_last = time.perf_counter()

    try:
        t0 = time.perf_counter()
        await ws.send(
            wire.encode_text(wire.Subscribe(streams=streams, since=since, batch=batch, id=1))
        )
        loop = asyncio.get_running_loop()
        deadline = asyncio.timeout(quiet_s)  # pushed back at each frame (cheaper than wait_for)
        with contextlib.suppress(TimeoutError):  # what never came is counted as lost
            async with deadline:
                while remaining != 0:
                    raw = await ws.recv()
                    deadline.reschedule(loop.time() + quiet_s)
                    nbytes += len(raw)
                    msg = wire.decode_from_server_to_client(raw)
                    if isinstance(msg, wire.EventFrame):
                        frames += 1
                        t_first = t_first or time.perf_counter()
                        if remaining < 0:
                            early.append(msg)
                        else:
                            take(msg)
                    elif isinstance(msg, wire.Events):
                        frames += 1
                        events_frames += 1
                        t_first = t_first or time.perf_counter()
                        for item in msg.items:
                            if remaining < 0:
                                early.append(item)
                            else:
                                take(item)
                    elif isinstance(msg, wire.Subscribed) and msg.id == 1:
                        t_reply = time.perf_counter()
                        expected = {s.stream: (since[s.stream], s.offset) for s in msg.streams}
                        recovered = all(s.recovered for s in msg.streams)
                        remaining = sum(hi - lo for lo, hi in expected.values())
                        for e in early:
                            take(e)
                    elif isinstance(msg, wire.Error):
                        raise RuntimeError(f"subscribe refused: {msg.code}: {msg.message}")
    finally:
        await ws.close()
    if remaining < 0:
        raise RuntimeError(f"no subscribed reply within {quiet_s:g} s")
    total = sum(hi - lo for lo, hi in expected.values())
    elapsed = (t_last or time.perf_counter()) - t0
    return {
        "batch": batch,
        "events": total,
        "readings": kinds.get("reading", 0),
        "kinds": kinds,
        "catch_up_ms": elapsed * 1000,
        "subscribed_ms": (t_reply - t0) * 1000 if t_reply else None,
        "first_event_ms": (t_first - t0) * 1000 if t_first else None,
        "events_per_s": total / elapsed if elapsed > 0 else 0.0,
        "lost": max(0, remaining),
        "dup": dup,
        "recovered": recovered,
        "frames": frames,
        "events_frames": events_frames,
        "bytes": nbytes,
        "heads": {s: hi for s, (_, hi) in expected.items()},
    }


async def _baseline_store_read(db: str, since: dict[str, int], heads: dict[str, int]) -> float:
    """Seconds to read the same events through the store (``events_after`` in the server's page
    size, as its replay from the store does), each stream one after another, no server."""
    from vitalwire.services.streams import STORE_PAGE

    store = open_store(db)
    await store.open()
    try:
        t0 = time.perf_counter()
        n = 0
        for s, after in since.items():
            cursor, upto = after, heads[s]
            while cursor < upto:
                page = await store.events_after(s, cursor, min(STORE_PAGE, upto - cursor))
                if not page:
                    break
                n += len(page)
                cursor = page[-1].offset
        elapsed = time.perf_counter() - t0
    finally:
        await store.close()
    expected = sum(heads[s] - a for s, a in since.items())
    if n != expected:
        raise RuntimeError(f"store read {n} events, expected {expected}")
    return elapsed


def _baseline_sqlite_read(path: Path, since: dict[str, int], heads: dict[str, int]) -> float:
    """Seconds for a plain ``sqlite3`` SELECT of the same rows (the floor: no decoding at all)."""
    import sqlite3

    conn = sqlite3.connect(path)
    try:
        t0 = time.perf_counter()
        n = 0
        for s, after in since.items():
            rows = conn.execute(
                "SELECT offset, kind, ts, data FROM events WHERE stream = ? AND offset > ? "
                "AND offset <= ? ORDER BY offset",
                (s, after, heads[s]),
            ).fetchall()
            n += len(rows)
        elapsed = time.perf_counter() - t0
    finally:
        conn.close()
    expected = sum(heads[s] - a for s, a in since.items())
    if n != expected:
        raise RuntimeError(f"sqlite3 read {n} rows, expected {expected}")
    return elapsed


async def _cpu_idle_pct(seconds: float) -> float | None:
    """Idle share of all CPUs over ``seconds`` (from /proc/stat; None elsewhere)."""

    def sample() -> tuple[int, int]:
        with open("/proc/stat") as f:
            ticks = [int(x) for x in f.readline().split()[1:]]
        return sum(ticks), ticks[3] + ticks[4]  # idle + iowait

    try:
        total0, idle0 = sample()
        await asyncio.sleep(seconds)
        total1, idle1 = sample()
    except (OSError, ValueError, IndexError):
        return None
    return 100.0 * (idle1 - idle0) / max(1, total1 - total0)


async def bench_catchup(
    patients: int = 20,
    minutes: float = 10.0,
    rate: float = 1.0,
    rounds: int = 5,
    bus_history: int | None = None,
    compression: bool = True,
) -> dict[str, Any]:
    """A client resumes after ``minutes`` away from ``patients`` patients whose devices sent
    ``rate`` readings/s: time to every missed event, with and without ``events`` frames, beside
    the same events read straight from the SQLite file."""
    per_device = max(1, round(minutes * 60 * rate))
    idle_before = await _cpu_idle_pct(1.0)  # the machine may be shared: say how busy it was
    env = {} if bus_history is None else {"VITALWIRE_BUS_HISTORY": str(bus_history)}
    runs: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        async with server_process(folder, patients, env) as srv:
            from vitalwire.sdk.monitor import login

            token = await login(srv.url, "clinician", "vitalwire-clinician")
            streams = [f"patient:{d['patient_id']}" for d in srv.creds.devices]
            devices = [
                DeviceClient(
                    srv.url, d["device_id"], d["secret"], max_batch=200, buffer_size=per_device + 10
                )
                for d in srv.creds.devices
            ]
            for c in devices:
                await c.start()
            try:
                # 1. the client watches, notes the last offset of each stream, and goes away
                since = await _stream_heads(srv.url, token, streams)
                # 2. meanwhile the devices' readings of the last `minutes` are stored
                t_feed = time.perf_counter()
                start = time.time() - minutes * 60
                for i in range(per_device):
                    ts = start + i / rate
                    for c in devices:
                        c.send(spo2=97, pulse=70 + i % 20, hr=70 + i % 20, rr=16, ts=ts)
                await asyncio.gather(*(c.flush(timeout=600) for c in devices))
                feed_s = time.perf_counter() - t_feed
                # 3. it comes back: resume from the noted offsets, with and without events frames
                for r in range(1, rounds + 1):
                    for batch in (True, False):
                        run = await _resume(srv.url, token, since, batch, compression)
                        runs.append({"round": r, **run})
                        await asyncio.sleep(0.2)
            finally:
                for c in devices:
                    await c.close()
        heads = runs[0]["heads"]
        db = f"sqlite:///{folder / 'bench.db'}"
        store_s = [await _baseline_store_read(db, since, heads) for _ in range(rounds)]
        sqlite_s = [_baseline_sqlite_read(folder / "bench.db", since, heads) for _ in range(rounds)]
    events = runs[0]["events"]
    readings = patients * per_device
    # the server replays from its bus history when it reaches back far enough (protocol.md)
    history = bus_history or Settings.model_fields["bus_history"].default
    longest = max(heads[s] - after for s, after in since.items())

    def baseline(seconds: list[float]) -> dict[str, Any]:
        ms = sorted(s * 1000 for s in seconds)
        median = ms[len(ms) // 2]
        return {"ms": ms, "median_ms": median, "events_per_s": events / (median / 1000)}

    def median_ms(batch: bool) -> float:
        ms: list[float] = sorted(r["catch_up_ms"] for r in runs if r["batch"] is batch)
        return ms[len(ms) // 2]

    return {
        "scenario": "catchup",
        "patients": patients,
        "minutes": minutes,
        "rate_hz": rate,
        "readings_fed": readings,
        "feed_readings_per_s": readings / feed_s,
        "events": events,
        "replay_from": "bus history" if longest <= history else "store",
        "bus_history": bus_history,
        "compression": compression,
        "target_ms": 250.0,
        "cpu_idle_pct_before": idle_before,
        "vitalwire": [{k: v for k, v in r.items() if k != "heads"} for r in runs],
        "vitalwire_median_ms": {"batch": median_ms(True), "no_batch": median_ms(False)},
        "baseline_store_events_after": baseline(store_s),
        "baseline_sqlite3_select": baseline(sqlite_s),
        "machine": machine(),
    }


def write_json(path: Path, result: dict[str, Any]) -> None:
    path.write_text(json.dumps(result, indent=2) + "\n")


# -------------------------------------------------------------------------------------------------
# the load scenario: devices x rate, clients x patients, against vitalwire and references
# -------------------------------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def naive_process(
    drop_every: int = 0, stall_every: int = 0, device_open_delay_s: float = 0.0
) -> AsyncIterator[tuple[str, int]]:
    """The naive reference server (vitalwire.bench.naive) in a child process; ``drop_every``,
    ``stall_every`` and ``device_open_delay_s`` make it misbehave for the bench's own tests."""
    port = _free_port()
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "vitalwire.bench.naive",
        str(port),
        str(drop_every),
        str(stall_every),
        str(device_open_delay_s),
        stdout=asyncio.subprocess.PIPE,
    )
    assert proc.stdout is not None
    line = await asyncio.wait_for(proc.stdout.readline(), 30)
    if b"listening" not in line:
        raise RuntimeError("naive server did not start")
    try:
        yield f"ws://127.0.0.1:{port}", proc.pid
    finally:
        proc.terminate()
        await proc.wait()


def _pid_of(name: str) -> int | None:
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/comm") as f:
                    if f.read().strip() == name:
                        return int(entry)
            except OSError:
                continue
    return None


async def _metrics(url: str) -> dict[str, Any]:
    async with httpx.AsyncClient(base_url=url) as http:
        r = await http.get("/metrics.json")
        return dict(r.json())


@dataclass(frozen=True)
class GivenServer:
    """A vitalwire server the bench did not start (``--url``), with the ward provisioned in its
    store by ``vitalwire admin provision-ward`` (whose credentials file names the devices, their
    secrets and patients, and the users it created)."""

    url: str
    creds: WardCredentials

    def check(self, devices: int) -> None:
        """Refuse a load the credentials cannot drive, naming what to do instead."""
        have = len(self.creds.devices)
        if have < devices:
            raise ValueError(
                f"the load needs {devices} devices, the credentials name {have}: provision "
                f"them with `vitalwire admin provision-ward --patients {devices} --out FILE`"
            )
        for i, d in enumerate(self.creds.devices[:devices]):
            missing = [k for k in ("device_id", "secret", "patient_id") if not d.get(k)]
            if missing:
                raise ValueError(f"devices[{i}] has no {', '.join(missing)}")
        if _clinician(self.creds) is None:
            raise ValueError(
                "the credentials name no clinician user: write them with "
                "`vitalwire admin provision-ward` (it creates a clinician)"
            )


def _clinician(creds: WardCredentials) -> dict[str, str] | None:
    """The first clinician among the credentials' users: the bench's clients log in as it."""
    return next((u for u in creds.users if u.get("role") == "clinician"), None)


async def bench_load(
    shape: Any,
    against: list[str],
    only: Collection[str] | None = None,
    server: GivenServer | None = None,
) -> list[dict[str, Any]]:
    """Run the load shape against vitalwire, then each reference; return one row per target.

    ``only``: the targets to run, by their row's name (``vitalwire``, ``naive``, ``mqtt qos0``,
    ``mqtt qos1``); all of them when None. Each row's ratio is its delivered/s over
    vitalwire's in the same run (None when vitalwire did not run). ``server``: load that
    server instead of starting one (its CPU and memory then come from its ``/metrics.json``)."""
    from vitalwire.bench.load import MetricsProbe, Target, run_load
    from vitalwire.sdk.monitor import login

    def wanted(name: str) -> bool:
        return only is None or name in only

    async def vitalwire_row(
        url: str, creds: WardCredentials, probe: Any, kind: str = "vitalwire"
    ) -> dict[str, Any]:
        user = _clinician(creds)
        assert user is not None, "provision_ward writes a clinician"
        token = await login(url, user["username"], user["password"])
        devices = tuple(
            (d["device_id"], d["secret"], d["patient_id"]) for d in creds.devices[: shape.devices]
        )
        target = Target(kind, url, devices=devices, token=token)
        # the GraphQL subscribers are Python (bench/graphql.py), whatever the /ws generator
        run_shape = replace(shape, generator="python") if kind == "graphql" else shape
        before = await _metrics(url)
        row = await asyncio.to_thread(run_load, target, run_shape, probe)
        after = await _metrics(url)
        row["store_rows_per_s"] = (after["rows_written"] - before["rows_written"]) / (
            shape.duration_s
        )
        return row

    # GraphQL subscribers (--against graphql) load the same server as /ws, right after it
    kinds = [k for k in ("vitalwire", "graphql") if wanted(k) and (k != "graphql" or k in against)]
    rows: list[dict[str, Any]] = []
    if kinds and server is not None:
        server.check(shape.devices)
        for kind in kinds:
            row = await vitalwire_row(server.url, server.creds, MetricsProbe(server.url), kind)
            rows.append(row | {"server_url": server.url})
    elif kinds:
        with tempfile.TemporaryDirectory() as tmp:
            async with server_process(Path(tmp), shape.devices) as srv:
                for kind in kinds:
                    rows.append(await vitalwire_row(srv.url, srv.creds, srv.proc.pid, kind))
    for ref in against:
        if ref == "graphql":
            continue
        if ref == "naive":
            if wanted("naive"):
                async with naive_process() as (url, pid):
                    rows.append(await asyncio.to_thread(run_load, Target("naive", url), shape, pid))
        elif ref.startswith("mqtt://"):
            broker = _pid_of("mosquitto")
            for qos in (0, 1):
                if wanted(f"mqtt qos{qos}"):
                    rows.append(
                        await asyncio.to_thread(
                            run_load, Target("mqtt", ref, qos=qos), shape, broker
                        )
                    )
        else:
            raise ValueError(f"--against must be naive, graphql or mqtt://host:port, got {ref!r}")
    _ratios(rows)
    for row in rows:
        row["machine"] = machine()
    return rows


def _ratios(rows: list[dict[str, Any]]) -> None:
    """Each row's delivered/s over vitalwire's row's (None without a vitalwire row)."""
    base = next((r["delivered_per_s"] for r in rows if r["target"] == "vitalwire"), None)
    ws = next((r for r in rows if r["target"] == "vitalwire"), None)
    for row in rows:
        if row["target"] == "graphql" and ws is not None:  # the same server, the same run
            row["p99_vs_ws"] = row["latency_ms"]["p99"] / max(ws["latency_ms"]["p99"], 1e-9)
    for row in rows:
        row["ratio_delivered_vs_vitalwire"] = (
            row["delivered_per_s"] / (base or 1.0) if base is not None else None
        )


#: Runs a load shape against the targets named (all when None): :func:`bench_load`'s signature.
LoadRunner = Callable[[Any, list[str], Collection[str] | None], Awaitable[list[dict[str, Any]]]]


async def bench_saturate(
    shape: Any,
    against: list[str],
    p99_bound_ms: float = 50.0,
    steps: int = 6,
    refine: int = 2,
    run: LoadRunner | None = None,
    repeat: int = 1,
) -> list[dict[str, Any]]:
    """Per target, the highest rate at which p99 stays within ``p99_bound_ms`` with nothing
    lost: a rate *holds* then, and *fails* otherwise.

    First the rate doubles from ``shape.rate_hz``, every target at each step, for at most
    ``steps`` steps or until every target has failed once (a target that failed is still
    measured while another holds, for the curve). Then ``refine`` times, each target's
    interval between the last rate that held and the first that failed is halved: it runs
    at the interval's middle (targets with the same middle together, the others not at all)
    and keeps the half the limit is in. With the default 2, a limit is known to a quarter of
    its doubling step: held at 160 Hz and failed at 320 Hz becomes 200, 240 or 280 Hz.

    Returns, per target that held at least once, the row of its highest rate that held,
    with ``rate_hz``, ``failed_at_hz`` (the lowest rate that failed above it; None if none
    did), ``steps`` (every rate measured, by rate) and its ratio to vitalwire's held rate's
    delivered/s. ``run`` replaces :func:`bench_load` (tests).

    ``repeat`` runs every step that many times: near a limit one 8 s run's p99 is decided by
    a second or two, so the same build may hold a rate in one run and fail it in the next. A
    step then holds when a majority of its runs held (a tie fails), and its row is the run of
    the median p99 (the higher of the two middle ones for an even count); each step lists
    every run's p99 (``runs_p99_ms``) and how many held (``runs_held``).
    """
    if repeat < 1:
        raise ValueError(f"repeat must be at least 1, got {repeat}")
    run = run or bench_load
    held: dict[str, dict[str, Any]] = {}
    failed_at: dict[str, float] = {}  # the lowest failing rate above the held one
    curve: dict[str, list[dict[str, Any]]] = {}  # every step, for the latency/throughput plot

    def holds(row: dict[str, Any]) -> bool:
        return bool(row["latency_ms"]["p99"] <= p99_bound_ms and row["lost"] == 0)

    async def step(shape_at: Any, only: list[str] | None) -> list[tuple[dict[str, Any], bool]]:
        """Each target's row at one rate and whether the rate held (over ``repeat`` runs)."""
        runs: dict[str, list[dict[str, Any]]] = {}
        for _ in range(repeat):
            for row in await run(shape_at, against, only):
                runs.setdefault(row["target"], []).append(row)
        out = []
        for target, rows_of in runs.items():
            ordered = sorted(rows_of, key=lambda r: (r["latency_ms"]["p99"], r["lost"]))
            row = ordered[len(ordered) // 2]  # the median run (the upper one of an even count)
            held_runs = sum(holds(r) for r in rows_of)
            ok = 2 * held_runs > len(rows_of)
            curve.setdefault(target, []).append(
                {
                    "rate_hz": shape_at.rate_hz,
                    "delivered_per_s": row["delivered_per_s"],
                    "p99_ms": row["latency_ms"]["p99"],
                    "lost": row["lost"],
                    "runs_p99_ms": [r["latency_ms"]["p99"] for r in rows_of],
                    "runs_held": held_runs,
                }
            )
            out.append((row, ok))
        return out

    rate = shape.rate_hz
    for _ in range(steps):
        done = True
        for row, ok in await step(replace(shape, rate_hz=rate), None):
            target = row["target"]
            if not ok:
                failed_at.setdefault(target, rate)
            elif target not in failed_at:
                held[target] = row | {"rate_hz": rate}
                done = False
        if done:
            break
        rate *= 2
    for _ in range(refine):
        middles: dict[float, list[str]] = {}
        for target, row in held.items():
            hi = failed_at.get(target)
            if hi is not None and row["rate_hz"] < (mid := (row["rate_hz"] + hi) / 2) < hi:
                middles.setdefault(mid, []).append(target)
        if not middles:
            break
        for mid, targets in sorted(middles.items()):
            for row, ok in await step(replace(shape, rate_hz=mid), targets):
                target = row["target"]
                if target not in targets:
                    continue
                if ok:
                    held[target] = row | {"rate_hz": mid}
                else:
                    failed_at[target] = mid
    rows = [
        row
        | {
            "failed_at_hz": failed_at.get(target),
            "steps": sorted(curve.get(target, []), key=lambda s: s["rate_hz"]),
        }
        for target, row in held.items()
    ]
    _ratios(rows)
    return rows
