"""``vitalwire bench edge``: what the edge relay adds to a reading's latency, and how fast a
backlog left by an uplink outage is caught up.

How it works: a cloud and an edge node (``vitalwire serve --upstream``), each a child process on
a fresh SQLite file, the edge registered at the cloud as a device of kind ``edge``; the edge's
uplink goes through a TCP proxy in this process (a WAN the bench can cut). ``devices`` patients
are provisioned at the edge (ward-a, claimed by the cloud when the uplink opens), one device
each. One load worker process (spawned: it shares no event loop with the proxy) runs:

- the devices, on the **edge**'s ``/ws/device``, each sending a reading every ``1/rate`` s
  stamped with the wall clock (load.py's device sender: the same frame as ``vitalwire bench``);
- one client at the **edge** and one at the **cloud**, each on ``/ws`` subscribed (``batch``) to
  every device's patient stream.

Latency is the reading's device timestamp to its arrival at each client, on one machine's clock,
for readings stamped after ``warmup`` and before the outage (or the end); the relay's share is
the difference between the two distributions (p50 and p99) and, reading by reading, the cloud
client's arrival minus the edge client's arrival of the same (device, seq).

With ``outage`` > 0, after ``duration`` s the proxy resets the uplink and refuses it for
``outage`` s while the devices keep streaming to the edge (the backlog is made in real time, at
the load's rate, not generated faster); then it lets the uplink back and the heads of every
stream are polled at both ends (a subscribe without ``since``: the last offset each published):
``backlog drained`` is when the cloud holds every stream up to the edge's head at the restore,
``caught up`` when the cloud's heads equal the edge's heads read just before (the live load goes
on meanwhile). Speed-up = outage / catch-up. At the end the devices stop, both ends' heads must
match, and both stores are read back: every stream's offsets 1..head at the cloud with as many
events as at the edge, every (device, seq) the devices sent once at the cloud.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import multiprocessing as mp
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import msgspec

from vitalwire.bench import load as ld
from vitalwire.bench.netproxy import Proxy
from vitalwire.bench.runner import BENCH_LIMITS, _free_port, machine, percentiles, stop_process

#: the issue's bounds: what the relay adds at p99; the catch-up's speed-up over real time
P99_ADDED_TARGET_MS = 100.0
SPEEDUP_TARGET = 10.0
NODE = "bench-edge"
WARD = "ward-a"
#: seconds the clients get, after the devices stop, to receive the last readings
DRAIN_S = 60.0
POLL_S = 0.1

Progress = Callable[[str], None]


# -------------------------------------------------------------------------------------------------
# the servers
# -------------------------------------------------------------------------------------------------


def _server_env(extra: dict[str, str]) -> dict[str, str]:
    return {
        "VITALWIRE_JWT_SECRET": "bench-" + "x" * 40,
        **BENCH_LIMITS,
        # one client watches every device's patient
        "VITALWIRE_MAX_STREAMS_PER_CONNECTION": "100000",
        **os.environ,
        **extra,
    }


class Server:
    """``vitalwire serve`` in a child process, its output in ``log``."""

    def __init__(self, name: str, db: str, folder: Path, env: dict[str, str] | None = None):
        self.name = name
        self.db = db
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = folder / f"{name}.log"
        self.env = _server_env(env or {})
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    async def start(self) -> None:
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "vitalwire.cli", "serve", "--port", str(self.port)]
                + ["--db", self.db, "--log-level", "warning"],
                stdout=log,
                stderr=subprocess.STDOUT,
                env=self.env,
            )
        async with httpx.AsyncClient(base_url=self.url) as http:
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    break
                try:
                    if (await http.get("/healthz")).status_code == 200:
                        return
                except httpx.TransportError:
                    await asyncio.sleep(0.05)
        raise RuntimeError(f"the {self.name} did not start: {self.log_tail()}")

    def log_tail(self, n: int = 2000) -> str:
        with contextlib.suppress(OSError):
            return self.log.read_text()[-n:]
        return ""

    def stop(self) -> None:
        stop_process(self.proc)


async def _provision(cloud_db: str, edge_db: str, devices: int) -> tuple[Any, Any, str]:
    """The cloud's users and the edge node's device there; the edge's patients, devices and
    users. Returns (cloud credentials, edge credentials, the node's secret)."""
    from vitalwire.provision import provision_ward
    from vitalwire.services import auth
    from vitalwire.store import open_store

    secret = auth.new_device_secret()
    store = open_store(cloud_db)
    await store.open()
    try:
        cloud = await provision_ward(store, patients=0, ward=WARD)
        await store.create_device(NODE, auth.hash_device_secret(secret), "edge", 0.0)
    finally:
        await store.close()
    store = open_store(edge_db)
    await store.open()
    try:
        edge = await provision_ward(store, patients=devices, ward=WARD, prefix="gw-")
    finally:
        await store.close()
    return cloud, edge, secret


async def _token(url: str, creds: Any) -> str:
    from vitalwire.sdk.monitor import login

    user = next(u for u in creds.users if u.get("role") == "clinician")
    return await login(url, user["username"], user["password"])


async def _heads(url: str, token: str, streams: list[str]) -> dict[str, int]:
    """Each stream's last published offset: a subscribe without ``since``."""
    from websockets.asyncio.client import connect

    async with connect(
        ld._ws_url(url) + "/ws",  # noqa: SLF001
        proxy=None,
        compression=None,
        max_size=2**24,
        open_timeout=30,
    ) as ws:
        await ws.send(json.dumps({"type": "auth", "token": token}))
        await asyncio.wait_for(ws.recv(), 30)
        await ws.send(json.dumps({"type": "subscribe", "streams": streams, "id": 1}))
        while True:
            msg = json.loads(await asyncio.wait_for(ws.recv(), 30))
            if msg.get("type") == "error":
                raise RuntimeError(f"subscribe refused: {msg}")
            if msg.get("type") == "subscribed" and msg.get("id") == 1:
                return {s["stream"]: int(s["offset"]) for s in msg["streams"]}


async def _edges(url: str, token: str) -> dict[str, Any]:
    async with httpx.AsyncClient(base_url=url, timeout=30) as http:
        r = await http.get("/edges", headers={"Authorization": f"Bearer {token}"})
        r.raise_for_status()
        return {e["node"]: e for e in r.json()["edges"]}


async def _take(out: Any, proc: Any, timeout: float) -> Any:
    """The worker's next message; an error at once if the worker died without one."""
    import queue

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            return await asyncio.to_thread(out.get, True, 1.0)
        except queue.Empty:
            if not proc.is_alive():
                raise RuntimeError(f"the load worker exited (code {proc.exitcode})") from None
    raise RuntimeError(f"the load worker sent nothing in {timeout:g} s")


async def _until(check: Callable[[], Any], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if await check():
            return
        await asyncio.sleep(POLL_S)
    raise RuntimeError(f"timed out after {timeout:g} s waiting for {what}")


# -------------------------------------------------------------------------------------------------
# the load worker: the devices at the edge, a client at each end
# -------------------------------------------------------------------------------------------------


_frame = msgspec.json.Decoder()


class _Client:
    """One end's client: per device, the highest seq (a lower or equal one is a duplicate),
    distinct readings received, and the arrival time of each reading timed."""

    def __init__(self, name: str, index: dict[str, int]) -> None:
        self.name = name
        self.index = index
        self.highest: dict[int, int] = {}
        self.received = 0
        self.duplicates = 0
        self.arrivals: dict[tuple[int, int], float] = {}
        self.latencies: list[float] = []
        self.timed_from = 0.0
        self.timed_until = float("inf")
        self.error: str | None = None
        self.ready = asyncio.Event()
        self.on_reading: Callable[[], None] = lambda: None

    def got(self, d: int, seq: int, ts: float) -> None:
        if seq <= self.highest.get(d, 0):
            self.duplicates += 1
            return
        self.highest[d] = seq
        self.received += 1
        if self.timed_from <= ts < self.timed_until:
            now = time.time()
            self.arrivals[(d, seq)] = now
            self.latencies.append((now - ts) * 1000)
        self.on_reading()

    async def run(self, url: str, token: str) -> None:
        from websockets.asyncio.client import connect

        try:
            async with connect(
                ld._ws_url(url) + "/ws",  # noqa: SLF001
                proxy=None,
                compression=None,
                max_size=2**24,
                open_timeout=30,
            ) as ws:
                await ws.send(json.dumps({"type": "auth", "token": token}))
                await ws.recv()
                streams = list(self.index)
                await ws.send(
                    json.dumps({"type": "subscribe", "streams": streams, "batch": True, "id": 1})
                )
                async for raw in ws:
                    msg = _frame.decode(raw)
                    kind = msg.get("type")
                    if kind == "events":
                        for item in msg["items"]:
                            if item["kind"] == "reading":
                                data = item["data"]
                                self.got(self.index[item["stream"]], data["seq"], data["ts"])
                    elif kind == "event" and msg["kind"] == "reading":
                        data = msg["data"]
                        self.got(self.index[msg["stream"]], data["seq"], data["ts"])
                    elif kind == "subscribed" and msg.get("id") == 1:
                        self.ready.set()
                    elif kind == "error":
                        raise RuntimeError(f"{self.name} client: {msg}")
                    elif kind == "ping":
                        await ws.send('{"type":"pong"}')
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            self.error = f"{self.name} client: {exc!r}"
            self.ready.set()


def run_worker(cfg: dict[str, Any], control: Any, out: Any) -> None:
    """The load worker process: devices and the two clients; ``control`` brings the start time,
    then ``stop``; ``out`` takes ``ready`` and, at the end, the result."""
    out.put(asyncio.run(_worker(cfg, control, out)))


async def _worker(cfg: dict[str, Any], control: Any, out: Any) -> dict[str, Any]:
    devices: list[tuple[str, str, str]] = [tuple(d) for d in cfg["devices"]]  # type: ignore[misc]
    n = len(devices)
    index = {f"patient:{pid}": i for i, (_, _, pid) in enumerate(devices)}
    edge, cloud = _Client("edge", index), _Client("cloud", index)
    tasks = [
        asyncio.create_task(edge.run(cfg["edge_url"], cfg["edge_token"])),
        asyncio.create_task(cloud.run(cfg["cloud_url"], cfg["cloud_token"])),
    ]
    await asyncio.wait_for(asyncio.gather(edge.ready.wait(), cloud.ready.wait()), 120)
    errors = [c.error for c in (edge, cloud) if c.error]
    target = ld.Target("vitalwire", cfg["edge_url"], devices=tuple(devices))
    senders = [await ld._open_device(target, d) for d in range(n)]  # noqa: SLF001
    out.put({"ready": True, "errors": errors})
    start_at = float(await asyncio.to_thread(control.get, True, 300))
    for c in (edge, cloud):
        c.timed_from = start_at + cfg["warmup_s"]
        c.timed_until = start_at + cfg["timed_s"]
    await asyncio.sleep(max(0.0, start_at - time.time()))
    stop = asyncio.Event()
    sent = [0] * n
    period = 1.0 / cfg["rate_hz"]

    async def device(d: int) -> None:
        next_at = time.perf_counter() + d * period / n  # spread over the period
        while not stop.is_set():
            now = time.perf_counter()
            if now < next_at:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), next_at - now)
                if stop.is_set():
                    break
            try:
                await senders[d].send(sent[d] + 1, time.time(), sent[d] + 1)
            except Exception as exc:
                errors.append(f"device {devices[d][0]}: {exc!r}")
                return
            sent[d] += 1
            next_at += period

    runs = [asyncio.create_task(device(d)) for d in range(n)]
    await asyncio.to_thread(control.get, True, None)  # "stop"
    stop.set()
    await asyncio.gather(*runs)
    total = sum(sent)
    # the last readings at both clients (the cloud's through the relay)
    drained = asyncio.Event()

    def check() -> None:
        if edge.received >= total and cloud.received >= total:
            drained.set()

    edge.on_reading = cloud.on_reading = check
    check()
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(drained.wait(), cfg["drain_s"])
    for s in senders:
        with contextlib.suppress(Exception):
            await s.close()
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    errors += [c.error for c in (edge, cloud) if c.error]
    paired = [
        (t - edge.arrivals[k]) * 1000 for k, t in cloud.arrivals.items() if k in edge.arrivals
    ]
    return {
        "sent": sent,
        "clients": {
            c.name: {
                "received": c.received,
                "lost": total - c.received,
                "duplicated": c.duplicates,
                "latency_ms": percentiles(c.latencies),
            }
            for c in (edge, cloud)
        },
        "paired_ms": percentiles(paired),
        "errors": errors[:10],
    }


# -------------------------------------------------------------------------------------------------
# the run
# -------------------------------------------------------------------------------------------------


async def _read_back(edge_db: str, cloud_db: str, devices: list[Any], sent: list[int]) -> dict:
    """Both stores, stream by stream: heads, counts, offsets 1..head at the cloud, and every
    (device, seq) sent once at the cloud (and at the edge)."""
    from vitalwire.store import open_store

    async def read(db: str) -> dict[str, list[tuple[int, str, bytes]]]:
        store = open_store(db)
        await store.open()
        try:
            out: dict[str, list[tuple[int, str, bytes]]] = {}
            for _, _, pid in devices:
                stream = f"patient:{pid}"
                events: list[tuple[int, str, bytes]] = []
                after = 0
                while True:
                    page = await store.events_after(stream, after, 5000)
                    if not page:
                        break
                    events.extend((x.offset, x.kind, x.data_json) for x in page)
                    after = page[-1].offset
                out[stream] = events
            return out
        finally:
            await store.close()

    edge, cloud = await read(edge_db), await read(cloud_db)
    decode = msgspec.json.Decoder()
    r: dict[str, Any] = {
        "streams": len(devices),
        "edge_events": sum(len(v) for v in edge.values()),
        "cloud_events": sum(len(v) for v in cloud.values()),
        "streams_differing": 0,
        "offset_gaps": 0,
        "readings_sent": sum(sent),
        "edge_readings": 0,
        "cloud_readings": 0,
        "lost": 0,
        "duplicated": 0,
    }
    for i, (did, _, pid) in enumerate(devices):
        stream = f"patient:{pid}"
        e, c = edge[stream], cloud[stream]
        if [x[0] for x in c] != list(range(1, len(c) + 1)):
            r["offset_gaps"] += 1
        if [(o, k) for o, k, _ in e] != [(o, k) for o, k, _ in c]:
            r["streams_differing"] += 1
        for name, events in (("edge", e), ("cloud", c)):
            seqs = [
                int(body["seq"])
                for _, kind, raw in events
                if kind == "reading" and (body := decode.decode(raw)).get("device") == did
            ]
            r[f"{name}_readings"] += len(seqs)
            if name == "cloud":
                distinct = set(seqs)
                r["duplicated"] += len(seqs) - len(distinct)
                r["lost"] += len(set(range(1, sent[i] + 1)) - distinct)
    r["nothing_lost"] = (
        r["lost"] == 0
        and r["duplicated"] == 0
        and r["offset_gaps"] == 0
        and r["streams_differing"] == 0
        and r["cloud_readings"] == r["readings_sent"] == r["edge_readings"]
    )
    return r


async def bench_edge(
    devices: int = 50,
    rate_hz: float = 10.0,
    duration_s: float = 60.0,
    outage_s: float = 0.0,
    warmup_s: float = 2.0,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """One cloud, one edge through a proxy, ``devices`` x ``rate_hz`` at the edge: latency at
    both ends for ``duration_s``; then, with ``outage_s``, the uplink cut that long and the
    catch-up timed; then everything read back from both stores."""
    say = progress or (lambda _m: None)
    with tempfile.TemporaryDirectory(prefix="vw-bench-edge-") as tmp:
        folder = Path(tmp)
        cloud_db = f"sqlite:///{folder / 'cloud.db'}"
        edge_db = f"sqlite:///{folder / 'edge.db'}"
        cloud_creds, edge_creds, secret = await _provision(cloud_db, edge_db, devices)
        devs = [(x["device_id"], x["secret"], x["patient_id"]) for x in edge_creds.devices]
        streams = [f"patient:{pid}" for _, _, pid in devs]
        cloud = Server("cloud", cloud_db, folder)
        proxy: Proxy | None = None
        edge: Server | None = None
        proc: Any = None
        try:
            await cloud.start()
            proxy = Proxy("127.0.0.1", cloud.port)
            await proxy.start()
            edge = Server(
                "edge",
                edge_db,
                folder,
                {
                    "VITALWIRE_UPSTREAM": f"ws://127.0.0.1:{proxy.port}",
                    "VITALWIRE_NODE_ID": NODE,
                    "VITALWIRE_UPSTREAM_SECRET": secret,
                },
            )
            await edge.start()
            cloud_token = await _token(cloud.url, cloud_creds)
            edge_token = await _token(edge.url, edge_creds)

            async def claimed() -> bool:
                row = (await _edges(cloud.url, cloud_token)).get(NODE, {})
                return bool(row.get("connected")) and row.get("patients") == devices

            await _until(claimed, 60, f"the edge connected with its {devices} patients claimed")
            say(f"cloud {cloud.url}, edge {edge.url} (uplink through :{proxy.port}) are up")
            ctx = mp.get_context("spawn")
            control, out = ctx.Queue(), ctx.Queue()
            cfg = {
                "devices": devs,
                "edge_url": edge.url,
                "cloud_url": cloud.url,
                "edge_token": edge_token,
                "cloud_token": cloud_token,
                "rate_hz": rate_hz,
                "warmup_s": warmup_s,
                "timed_s": duration_s,
                "drain_s": DRAIN_S,
            }
            proc = ctx.Process(target=run_worker, args=(cfg, control, out))
            proc.start()
            ready = await _take(out, proc, 180)
            if ready.get("errors"):
                raise RuntimeError("; ".join(ready["errors"]))
            start_at = time.time() + 1.0
            control.put(start_at)
            cpu0 = {s.name: ld.proc_cpu_s(s.pid) for s in (cloud, edge)}
            load_before = os.getloadavg()
            t0 = time.monotonic()
            await asyncio.sleep(max(0.0, start_at + duration_s - time.time()))
            cpu1 = {s.name: ld.proc_cpu_s(s.pid) for s in (cloud, edge)}
            steady_wall = time.monotonic() - t0
            say(f"{duration_s:g} s of load measured")
            catchup = None
            if outage_s > 0:
                catchup = await _outage(
                    proxy, cloud, edge, cloud_token, edge_token, streams, outage_s, say
                )
            control.put("stop")
            result = await _take(out, proc, DRAIN_S + 120)
            proc.join(30)

            async def same_heads() -> bool:
                e = await _heads(edge.url, edge_token, streams)
                c = await _heads(cloud.url, cloud_token, streams)
                return e == c

            await _until(same_heads, 120, "the cloud's heads to equal the edge's")
            link = (await _edges(cloud.url, cloud_token)).get(NODE, {})
            load_after = os.getloadavg()
        finally:
            if proc is not None and proc.is_alive():
                proc.kill()
                proc.join(5)
            if edge is not None:
                edge.stop()
            if proxy is not None:
                await proxy.close()
            cloud.stop()
        say("reading both stores back")
        integrity = await _read_back(edge_db, cloud_db, devs, result["sent"])
    clients = result["clients"]
    e_lat, c_lat = clients["edge"]["latency_ms"], clients["cloud"]["latency_ms"]
    added = {k: c_lat[k] - e_lat[k] for k in ("p50", "p99", "p99.9", "max")}
    return {
        "mode": "edge",
        "shape": {
            "devices": devices,
            "rate_hz": rate_hz,
            "readings_per_s": devices * rate_hz,
            "duration_s": duration_s,
            "outage_s": outage_s,
            "warmup_s": warmup_s,
        },
        "latency_ms": {
            "edge": e_lat,
            "cloud": c_lat,
            "paired_cloud_minus_edge": result["paired_ms"],
        },
        "relay_added_ms": added,
        "clients": {
            k: {x: v[x] for x in ("received", "lost", "duplicated")} for k, v in clients.items()
        },
        "server_cpu_pct": {k: 100 * (cpu1[k] - cpu0[k]) / steady_wall for k in cpu0},
        "catchup": catchup,
        "integrity": integrity,
        "edge_link_at_end": link,
        "targets": {
            "relay_p99_added_ms": P99_ADDED_TARGET_MS,
            "relay_met": added["p99"] <= P99_ADDED_TARGET_MS,
            "speedup": SPEEDUP_TARGET,
            "catchup_met": None if catchup is None else catchup["speedup"] >= SPEEDUP_TARGET,
            "nothing_lost": integrity["nothing_lost"],
        },
        "errors": result["errors"],
        # the machine is shared: its load average (1, 5, 15 min) when the load started and ended
        "load_average": {"start": load_before, "end": load_after},
        "machine": machine(),
    }


async def _outage(
    proxy: Proxy,
    cloud: Server,
    edge: Server,
    cloud_token: str,
    edge_token: str,
    streams: list[str],
    outage_s: float,
    say: Progress,
) -> dict[str, Any]:
    """Cut the uplink for ``outage_s`` under the load, restore it, time the catch-up."""
    before = await _heads(edge.url, edge_token, streams)
    proxy.cut()
    say(f"uplink cut for {outage_s:g} s")
    await asyncio.sleep(outage_s)
    at_restore = await _heads(edge.url, edge_token, streams)
    cloud_at_restore = await _heads(cloud.url, cloud_token, streams)
    cpu0 = {s.name: ld.proc_cpu_s(s.pid) for s in (cloud, edge)}
    proxy.restore()
    t0 = time.monotonic()
    say("uplink restored: catching up")
    drained_s: float | None = None
    caught_s: float | None = None
    moved_s: float | None = None  # the first poll at which the cloud had more than before
    polls = 0
    deadline = t0 + max(120.0, 2 * outage_s)
    while time.monotonic() < deadline:
        e = await _heads(edge.url, edge_token, streams)
        c = await _heads(cloud.url, cloud_token, streams)
        polls += 1
        now = time.monotonic() - t0
        if moved_s is None and any(c.get(s, 0) > h for s, h in cloud_at_restore.items()):
            moved_s = now
        if drained_s is None and all(c.get(s, 0) >= h for s, h in at_restore.items()):
            drained_s = now
        if all(c.get(s, 0) >= h for s, h in e.items()):
            caught_s = now
            if drained_s is None:
                drained_s = now
            break
        await asyncio.sleep(POLL_S)
    wall = time.monotonic() - t0
    cpu = {
        k: 100 * (ld.proc_cpu_s(p) - cpu0[k]) / wall
        for k, p in (("cloud", cloud.pid), ("edge", edge.pid))
    }
    backlog = sum(at_restore[s] - cloud_at_restore.get(s, 0) for s in streams)
    made = sum(at_restore[s] - before.get(s, 0) for s in streams)
    done = caught_s
    return {
        "outage_s": outage_s,
        "backlog_events": backlog,
        "events_made_during_outage": made,
        "first_events_at_cloud_s": moved_s,
        "backlog_drained_s": drained_s,
        "caught_up_s": done,
        "events_per_s": None if not drained_s else backlog / drained_s,
        # the same, from the first events the reconnected link brought (the edge's reconnect
        # back-off and handshake left out)
        "events_per_s_once_reconnected": (
            None
            if not drained_s or moved_s is None or drained_s <= moved_s
            else backlog / (drained_s - moved_s)
        ),
        "speedup": 0.0 if not done else outage_s / done,
        "limit_s": outage_s / SPEEDUP_TARGET,
        "server_cpu_pct": cpu,
        "polls": polls,
    }


# -------------------------------------------------------------------------------------------------
# the command's table
# -------------------------------------------------------------------------------------------------


def run(
    devices: int,
    rate_hz: float,
    duration_s: float,
    outage_s: float,
    warmup_s: float,
    progress: Progress | None = None,
) -> dict[str, Any]:
    return asyncio.run(bench_edge(devices, rate_hz, duration_s, outage_s, warmup_s, progress))


def _s(x: float | None) -> str:
    return "-" if x is None else f"{x:.1f} s"


def print_edge(r: dict[str, Any], console: Any) -> None:
    from rich.table import Table

    s = r["shape"]
    t = Table(
        title=f"edge relay: {s['devices']} devices x {s['rate_hz']:g} Hz = "
        f"{s['readings_per_s']:g} readings/s at the edge, {s['duration_s']:g} s "
        f"(latency after {s['warmup_s']:g} s)"
    )
    for col in ("device ts ->", "n", "p50 ms", "p99 ms", "p99.9 ms", "max ms"):
        t.add_column(col, justify="left" if col == "device ts ->" else "right")
    lat = r["latency_ms"]
    for name, key in (
        ("a client of the edge", "edge"),
        ("a client of the cloud", "cloud"),
        ("cloud arrival - edge arrival, same reading", "paired_cloud_minus_edge"),
    ):
        p = lat[key]
        t.add_row(name, f"{p['n']:,}", *(f"{p[k]:.2f}" for k in ("p50", "p99", "p99.9", "max")))
    a = r["relay_added_ms"]
    t.add_row(
        "relay adds (cloud - edge)", "", *(f"{a[k]:.2f}" for k in ("p50", "p99", "p99.9", "max"))
    )
    console.print(t)
    cpu = r["server_cpu_pct"]
    console.print(f"server CPU under load: edge {cpu['edge']:.0f} %, cloud {cpu['cloud']:.0f} %")
    c = r["catchup"]
    if c is not None:
        done = "-" if c["caught_up_s"] is None else f"{c['caught_up_s']:.1f} s"
        drained = "-" if c["backlog_drained_s"] is None else f"{c['backlog_drained_s']:.1f} s"
        eps = "-" if c["events_per_s"] is None else f"{c['events_per_s']:,.0f}"
        console.print(
            f"catch-up after a {c['outage_s']:g} s outage: backlog {c['backlog_events']:,} "
            f"events drained in {drained} ({eps} events/s; first events at the cloud after "
            f"{_s(c['first_events_at_cloud_s'])}), heads equal to the edge's after "
            f"{done}: {c['speedup']:.1f}x real time (limit {c['limit_s']:g} s)"
        )
    i = r["integrity"]
    console.print(
        f"stores: {i['streams']} streams, edge {i['edge_events']:,} events, cloud "
        f"{i['cloud_events']:,}; readings sent {i['readings_sent']:,}, at the cloud "
        f"{i['cloud_readings']:,}: lost {i['lost']}, doubled {i['duplicated']}, offset gaps "
        f"{i['offset_gaps']}, streams differing {i['streams_differing']}"
    )
    cl = r["clients"]
    console.print(
        "clients: "
        + ", ".join(
            f"{k} got {v['received']:,} (lost {v['lost']}, dup {v['duplicated']})"
            for k, v in cl.items()
        )
    )
    tg = r["targets"]
    verdict = [
        f"relay p99 added <= {tg['relay_p99_added_ms']:g} ms: "
        + ("met" if tg["relay_met"] else "MISSED"),
        "nothing lost: " + ("yes" if tg["nothing_lost"] else "NO"),
    ]
    if tg["catchup_met"] is not None:
        verdict.append(
            f"catch-up >= {tg['speedup']:g}x: " + ("met" if tg["catchup_met"] else "MISSED")
        )
    console.print("targets: " + "; ".join(verdict))
    for err in r["errors"]:
        console.print(f"[yellow]{err}[/yellow]")
