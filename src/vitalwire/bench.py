"""``vitalwire bench``: measure the server, always beside a baseline from the same run.

Each scenario starts ``vitalwire serve`` in a child process on a fresh SQLite file (so the load
generator, in this process, does not share the server's event loop), drives it through the SDK,
and prints the figures with the baseline next to them:

- ``ingest``: readings/s acknowledged as durable (the device only counts an ``ack``, sent after
  the commit), beside the same rows written straight into a store with no server in front.
- ``commands``: command round trip client -> server -> device -> server -> client (queued, sent,
  acknowledged and completed are each committed), beside a client ping -> pong on the same socket.
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
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from vitalwire import wire
from vitalwire.provision import WardCredentials, provision_ward
from vitalwire.sdk import DeviceClient, MonitorClient
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


@contextlib.asynccontextmanager
async def server_process(folder: Path, patients: int) -> AsyncIterator[ServerProcess]:
    """``vitalwire serve`` on a fresh SQLite file with ``patients`` provisioned patients."""
    db = f"sqlite:///{folder / 'bench.db'}"
    store = open_store(db)
    await store.open()
    try:
        creds = await provision_ward(store, patients=patients)
    finally:
        await store.close()
    port = _free_port()
    env = {
        "VITALWIRE_JWT_SECRET": "bench-" + "x" * 40,
        # the load generator sends far faster than one real device may
        "VITALWIRE_DEVICE_MSGS_PER_S": "1000000",
        "VITALWIRE_DEVICE_MSGS_BURST": "1000000",
        # the bench's clients all log in as one user; they stand for many
        "VITALWIRE_MAX_CONNECTIONS_PER_USER": "100000",
        "VITALWIRE_CLIENT_MSGS_PER_S": "1000000",
        "VITALWIRE_CLIENT_MSGS_BURST": "1000000",
        **os.environ,
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
        proc.terminate()
        proc.wait(30)


async def bench_ingest(
    devices: int = 20, readings: int = 20_000, batch: int = 200
) -> dict[str, Any]:
    """Durable ingest through the server vs the same rows written directly into a store."""
    per_device = readings // devices
    with tempfile.TemporaryDirectory() as tmp:
        async with server_process(Path(tmp), devices) as srv:
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
        base = await _direct_store(Path(tmp), total, batch_rows=500)
    return {
        "scenario": "ingest",
        "devices": devices,
        "readings": total,
        "vitalwire_readings_per_s": total / elapsed,
        "baseline_direct_store_readings_per_s": base,
        "ratio": (total / elapsed) / base,
        "machine": machine(),
    }


async def _direct_store(folder: Path, total: int, batch_rows: int) -> float:
    """Rows/s writing the same readings + events straight into SQLite (no server)."""
    store = open_store(f"sqlite:///{folder / 'direct.db'}")
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


def write_json(path: Path, result: dict[str, Any]) -> None:
    path.write_text(json.dumps(result, indent=2) + "\n")


# -------------------------------------------------------------------------------------------------
# the load scenario: devices x rate, clients x patients, against vitalwire and references
# -------------------------------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def naive_process(drop_every: int = 0) -> AsyncIterator[tuple[str, int]]:
    """The naive reference server (vitalwire.bench_naive) in a child process."""
    port = _free_port()
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "vitalwire.bench_naive",
        str(port),
        str(drop_every),
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
        r = await http.get("/metrics")
        return dict(r.json())


async def bench_load(shape: Any, against: list[str]) -> list[dict[str, Any]]:
    """Run the load shape against vitalwire, then each reference; return one row per target."""
    from vitalwire.bench_load import Target, run_load

    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        async with server_process(Path(tmp), shape.devices) as srv:
            from vitalwire.sdk.monitor import login

            token = await login(srv.url, "clinician", "vitalwire-clinician")
            devices = tuple(
                (d["device_id"], d["secret"], d["patient_id"]) for d in srv.creds.devices
            )
            target = Target("vitalwire", srv.url, devices=devices, token=token)
            before = await _metrics(srv.url)
            row = await asyncio.to_thread(run_load, target, shape, srv.proc.pid)
            after = await _metrics(srv.url)
            row["store_rows_per_s"] = (after["rows_written"] - before["rows_written"]) / (
                shape.duration_s
            )
            rows.append(row)
    for ref in against:
        if ref == "naive":
            async with naive_process() as (url, pid):
                rows.append(await asyncio.to_thread(run_load, Target("naive", url), shape, pid))
        elif ref.startswith("mqtt://"):
            pid = _pid_of("mosquitto")
            for qos in (0, 1):
                rows.append(
                    await asyncio.to_thread(run_load, Target("mqtt", ref, qos=qos), shape, pid)
                )
        else:
            raise ValueError(f"--against must be naive or mqtt://host:port, got {ref!r}")
    base = rows[0]["delivered_per_s"] or 1.0
    for row in rows:
        row["ratio_delivered_vs_vitalwire"] = row["delivered_per_s"] / base
        row["machine"] = machine()
    return rows


async def bench_saturate(
    shape: Any, against: list[str], p99_bound_ms: float = 50.0, steps: int = 6
) -> list[dict[str, Any]]:
    """Double the rate until p99 passes ``p99_bound_ms`` or readings are lost; per target, the
    last rate that held."""
    from dataclasses import replace

    held: dict[str, dict[str, Any]] = {}
    curve: dict[str, list[dict[str, float]]] = {}  # every step, for the latency/throughput plot
    rate = shape.rate_hz
    for _ in range(steps):
        step = replace(shape, rate_hz=rate)
        rows = await bench_load(step, against)
        done = True
        for row in rows:
            curve.setdefault(row["target"], []).append(
                {
                    "rate_hz": rate,
                    "delivered_per_s": row["delivered_per_s"],
                    "p99_ms": row["latency_ms"]["p99"],
                    "lost": row["lost"],
                }
            )
            ok = row["latency_ms"]["p99"] <= p99_bound_ms and row["lost"] == 0
            if ok:
                held[row["target"]] = row | {"rate_hz": rate}
                done = False
        if done:
            break
        rate *= 2
    return [row | {"steps": curve.get(target, [])} for target, row in held.items()]
