"""``vitalwire bench cluster``: the load spread over N cluster nodes, beside ONE cluster node.

Each measurement gets a fresh PostgreSQL database (dropped afterwards) and a fresh Redis key
prefix (deleted afterwards), provisioned with :func:`provision_ward`, and N ``vitalwire serve
--cluster`` processes on free ports (docs/howto-cluster.md). The load generator (bench/load.py,
Python or Node.js) spreads its devices and clients over the nodes round robin: device ``i`` and
client ``i`` connect to node ``i % N``, so most readings are written on one node and watched
from another (through the Redis bus). The baseline is the same shape against a one-node cluster
(the same store, the same bus, the same fencing), measured in the same run.

Besides the load's figures, every node's CPU and RSS, PostgreSQL's own CPU (its backends for the
database, and all its processes) and Redis's, from ``/proc`` over the same window.

``--failover K`` measures something else: a light load of SDK devices (:class:`DeviceClient`
given every node's address), a clinician watching every patient on each node, and K times
SIGKILL of the node holding the most devices, restarted each time. Per kill: the time from the
kill to the first reading sent after it by each of the killed node's devices reaching a watcher
on another node; the kill's figure is its slowest device. At the end every device's readings
are checked in the store: each seq once, none missing.

``--stages`` measures what each stage of a reading costs, per reading, to feed the model of N
nodes (docs/benchmarks.md, "Several nodes"): the same shape twice on 2 nodes, every device on
node 1, its clients first on node 1 too (``together``: node 2 only takes the bus, so its CPU is
the fold of every event into its live pictures), then on node 2 (``apart``: node 1 only writes,
node 2 folds and delivers). See :func:`stage_costs` and :func:`node_model`.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from vitalwire.bench.load import PidProbe, Shape, Target, proc_cpu_s, proc_rss_kb, run_load
from vitalwire.bench.runner import (
    BENCH_LIMITS,
    _clinician,
    _free_port,
    machine,
    percentiles,
    stop_process,
)
from vitalwire.provision import WardCredentials, provision_ward
from vitalwire.settings import Settings

#: Where the bench creates (and drops) its databases: any database of the server will do.
POSTGRES_ADMIN = "postgresql://postgres@127.0.0.1:5432/postgres"
REDIS = "redis://127.0.0.1:6379/0"

#: The bench's limits, as for a single server (runner.BENCH_LIMITS), and one secret for every
#: node.
BENCH_ENV = {"VITALWIRE_JWT_SECRET": "bench-cluster-" + "x" * 40, **BENCH_LIMITS}


class ServiceUnavailable(RuntimeError):
    """PostgreSQL or Redis cannot be reached: the cluster bench cannot run."""


async def check_services(admin: str = POSTGRES_ADMIN, redis: str = REDIS) -> None:
    """Raise :class:`ServiceUnavailable`, naming which and why, unless both answer."""
    import asyncpg
    import redis.asyncio as aioredis

    try:
        conn = await asyncpg.connect(admin, timeout=5)
        await conn.close()
    except Exception as exc:
        raise ServiceUnavailable(f"PostgreSQL is not reachable at {admin}: {exc!r}") from None
    r = aioredis.from_url(redis, socket_connect_timeout=5)
    try:
        await r.ping()
    except Exception as exc:
        raise ServiceUnavailable(f"Redis is not reachable at {redis}: {exc!r}") from None
    finally:
        await r.aclose()


@contextlib.asynccontextmanager
async def fresh_database(admin: str = POSTGRES_ADMIN) -> AsyncIterator[str]:
    """A new, empty database on ``admin``'s server (its URL), dropped afterwards."""
    import asyncpg

    try:
        conn = await asyncpg.connect(admin, timeout=5)
    except Exception as exc:
        raise ServiceUnavailable(f"PostgreSQL is not reachable at {admin}: {exc!r}") from None
    name = f"vwbench_{uuid.uuid4().hex[:12]}"
    try:
        await conn.execute(f"CREATE DATABASE {name}")
        try:
            yield admin.rsplit("/", 1)[0] + "/" + name
        finally:
            await conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
    finally:
        await conn.close()


@contextlib.asynccontextmanager
async def fresh_prefix(redis: str = REDIS) -> AsyncIterator[str]:
    """A unique key prefix on ``redis``; its keys are deleted afterwards."""
    import redis.asyncio as aioredis

    prefix = f"vwbench-{uuid.uuid4().hex[:12]}"
    try:
        yield prefix
    finally:
        r = aioredis.from_url(redis)
        try:
            keys = [k async for k in r.scan_iter(match=f"{prefix}:*")]
            for i in range(0, len(keys), 1000):
                await r.delete(*keys[i : i + 1000])
        finally:
            await r.aclose()


class Node:
    """One ``vitalwire serve --cluster`` process; :meth:`kill` and :meth:`start` again keep its
    name and port (a node restarted in place)."""

    def __init__(self, node_id: str, db: str, bus: str, folder: Path, env: dict[str, str]) -> None:
        self.node_id = node_id
        self.db = db
        self.bus = bus
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = folder / f"{node_id}.log"
        self.env = {**BENCH_ENV, **os.environ, **env}
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    async def start(self, timeout: float = 60.0) -> None:
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "vitalwire.cli",
                    "serve",
                    "--cluster",
                    "--node-id",
                    self.node_id,
                    "--db",
                    self.db,
                    "--bus",
                    self.bus,
                    "--port",
                    str(self.port),
                    "--log-level",
                    "warning",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                env=self.env,
            )
        deadline = time.monotonic() + timeout
        async with httpx.AsyncClient(base_url=self.url, timeout=5) as http:
            while True:
                if self.proc.poll() is not None:
                    tail = self.log.read_text(errors="replace")[-2000:]
                    raise RuntimeError(f"node {self.node_id} exited at start: {tail}")
                try:
                    if (await http.get("/healthz")).status_code == 200:
                        return
                except httpx.TransportError:
                    pass
                if time.monotonic() > deadline:
                    raise RuntimeError(f"node {self.node_id} not up within {timeout:g} s")
                await asyncio.sleep(0.05)

    async def kill(self) -> None:
        """SIGKILL, and wait for the exit."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        await asyncio.to_thread(self.proc.wait, 30)

    def stop(self) -> None:
        stop_process(self.proc)


@dataclass
class Cluster:
    db: str
    prefix: str
    nodes: list[Node]
    creds: WardCredentials

    @property
    def urls(self) -> list[str]:
        return [n.url for n in self.nodes]

    def urls_from(self, first: int) -> list[str]:
        """Every node's address, node ``first``'s first."""
        n = len(self.nodes)
        return [self.nodes[(first + k) % n].url for k in range(n)]


@contextlib.asynccontextmanager
async def cluster(
    n: int,
    patients: int,
    admin: str = POSTGRES_ADMIN,
    redis: str = REDIS,
    env: dict[str, str] | None = None,
) -> AsyncIterator[Cluster]:
    """N nodes on a fresh database and prefix, ``patients`` provisioned (one device each)."""
    from vitalwire.store import open_store

    if n < 1:
        raise ValueError(f"nodes must be at least 1, got {n}")
    await check_services(admin, redis)
    with tempfile.TemporaryDirectory(prefix="vwbench-cluster-") as tmp:
        async with fresh_database(admin) as db, fresh_prefix(redis) as prefix:
            store = open_store(db)
            await store.open()  # migrates: the schema exists before the nodes start
            try:
                creds = await provision_ward(store, patients=patients)
            finally:
                await store.close()
            bus = f"{redis}?prefix={prefix}"
            nodes = [Node(f"n{i + 1}", db, bus, Path(tmp), env or {}) for i in range(n)]
            try:
                await asyncio.gather(*(node.start() for node in nodes))
                yield Cluster(db, prefix, nodes, creds)
            finally:
                for node in nodes:
                    node.stop()


# -------------------------------------------------------------------------------------------------
# CPU and memory of the nodes, PostgreSQL and Redis
# -------------------------------------------------------------------------------------------------


def _processes(comm: str) -> dict[int, str]:
    """pid -> command line of every process named ``comm``."""
    out = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/comm") as f:
                if f.read().strip() != comm:
                    continue
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                out[int(entry)] = f.read().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
    return out


def _background(cmdline: str) -> bool:
    """A PostgreSQL process serving no connection: the postmaster and its background workers
    (a backend's title names its client: ``127.0.0.1(port)`` or ``[local]``)."""
    return "(" not in cmdline and "[local]" not in cmdline


def _cpu(pids: list[int]) -> dict[int, float]:
    out = {}
    for pid in pids:
        with contextlib.suppress(OSError, IndexError, ValueError):
            out[pid] = proc_cpu_s(pid)
    return out


@dataclass
class _Snapshot:
    at: float
    nodes: list[float]
    postgres_db: dict[int, float]  # the database's backends
    postgres_shared: dict[int, float]  # its background processes (WAL writer, checkpointer...)
    redis: dict[int, float]


class ClusterProbe(PidProbe):
    """The load's probe (run_load reads ``cpu_s`` when the load starts and when it ends, and
    ``rss_kb`` before, idle and after): the nodes' sum, keeping each node's figure, and the CPU
    of PostgreSQL and Redis at the same instants."""

    def __init__(self, pids: list[int], database: str, urls: list[str]) -> None:
        super().__init__(pids[0])
        self.pids = pids
        self.database = database
        self.urls = urls
        self.snapshots: list[_Snapshot] = []
        self.rss: list[int] = []
        #: the most device and client connections each node reported (its /metrics.json)
        self.devices = [0] * len(urls)
        self.clients = [0] * len(urls)

    def cpu_s(self) -> float:
        pg = _processes("postgres")
        snap = _Snapshot(
            time.monotonic(),
            [proc_cpu_s(p) for p in self.pids],
            _cpu([p for p, cmd in pg.items() if f" {self.database} " in cmd]),
            _cpu([p for p, cmd in pg.items() if _background(cmd)]),
            _cpu(list(_processes("redis-server"))),
        )
        self.snapshots.append(snap)
        return sum(snap.nodes)

    def rss_kb(self) -> int | None:
        self.rss = [proc_rss_kb(p) for p in self.pids]
        # read once idle with every connection open: where the round robin put them
        for i, url in enumerate(self.urls):
            m = httpx.get(url + "/metrics.json", timeout=30).json()
            self.devices[i] = max(self.devices[i], int(m["device_connections"]))
            self.clients[i] = max(self.clients[i], int(m["client_connections"]))
        return sum(self.rss)

    def report(self) -> dict[str, Any]:
        """Each node's CPU % and RSS, PostgreSQL's and Redis's CPU %, over the load."""
        a, b = self.snapshots[0], self.snapshots[-1]
        wall = max(b.at - a.at, 1e-9)

        def pct(before: dict[int, float], after: dict[int, float]) -> float:
            return 100 * sum(v - before.get(p, 0.0) for p, v in after.items()) / wall

        return {
            "nodes_cpu_pct": [100 * (y - x) / wall for x, y in zip(a.nodes, b.nodes, strict=True)],
            "nodes_rss_mb": [kb / 1024 for kb in self.rss],
            "postgres_db_cpu_pct": pct(a.postgres_db, b.postgres_db),
            # the server's own work for everyone (WAL, checkpoints): other databases' share too
            "postgres_shared_cpu_pct": pct(a.postgres_shared, b.postgres_shared),
            "redis_cpu_pct": pct(a.redis, b.redis),
            "nodes_devices_connected": self.devices,
            "nodes_clients_connected": self.clients,
        }


async def _rows_written(urls: list[str]) -> int:
    total = 0
    async with httpx.AsyncClient(timeout=30) as http:
        for url in urls:
            total += int((await http.get(url + "/metrics.json")).json()["rows_written"])
    return total


# -------------------------------------------------------------------------------------------------
# the load: 1 node beside N nodes
# -------------------------------------------------------------------------------------------------


async def _cluster_row(
    shape: Shape,
    n: int,
    admin: str,
    redis: str,
    devices_on: tuple[int, ...] | None = None,
    clients_on: tuple[int, ...] | None = None,
) -> dict[str, Any]:
    """The shape against a fresh ``n``-node cluster: its devices round robin over the nodes
    ``devices_on`` (indexes; None: every node), its clients over ``clients_on`` (None: as the
    devices). The load's row with the probe's report, ``nodes``, ``store_rows_per_s`` and
    ``nodes_died``."""
    from vitalwire.sdk.monitor import login

    async with cluster(n, shape.devices, admin, redis) as cl:
        device_urls = tuple(cl.urls[i] for i in devices_on or range(n))
        client_urls = tuple(cl.urls[i] for i in clients_on or ())
        user = _clinician(cl.creds)
        assert user is not None, "provision_ward writes a clinician"
        token = await login((client_urls or device_urls)[0], user["username"], user["password"])
        devices = tuple(
            (d["device_id"], d["secret"], d["patient_id"])
            for d in cl.creds.devices[: shape.devices]
        )
        target = Target(
            "vitalwire",
            device_urls[0],
            devices=devices,
            token=token,
            urls=device_urls,
            client_urls=client_urls,
        )
        probe = ClusterProbe([x.pid for x in cl.nodes], db_name(cl.db), cl.urls)
        before = await _rows_written(cl.urls)
        row = await asyncio.to_thread(run_load, target, shape, probe)
        after = await _rows_written(cl.urls)
        dead = [x.node_id for x in cl.nodes if x.proc is None or x.proc.poll() is not None]
    row |= probe.report()
    row["nodes"] = n
    row["store_rows_per_s"] = (after - before) / shape.duration_s
    row["nodes_died"] = dead
    return row


async def load_row(
    shape: Shape, n: int, admin: str = POSTGRES_ADMIN, redis: str = REDIS
) -> dict[str, Any]:
    """The shape against a fresh ``n``-node cluster, devices and clients round robin."""
    row = await _cluster_row(shape, n, admin, redis)
    row["target"] = f"{n} node" + ("s" if n > 1 else "")
    row["node_devices"] = [len(range(i, shape.devices, n)) for i in range(n)]
    row["node_clients"] = [len(range(i, shape.clients, n)) for i in range(n)]
    return row


# -------------------------------------------------------------------------------------------------
# the stages: what each part of a reading's path costs, and the model of N nodes
# -------------------------------------------------------------------------------------------------

#: ``--stages``: (node of the devices, node of the clients) of each layout, on 2 nodes.
STAGE_LAYOUTS = {"together": (0, 0), "apart": (0, 1)}
#: The cluster sizes the model is given for.
MODEL_NODES = (1, 2, 4, 8, 16)


async def stage_row(
    shape: Shape, layout: str, admin: str = POSTGRES_ADMIN, redis: str = REDIS
) -> dict[str, Any]:
    """The shape on a fresh 2-node cluster, its devices and clients where ``layout`` puts
    them (:data:`STAGE_LAYOUTS`)."""
    dev_node, cli_node = STAGE_LAYOUTS[layout]
    row = await _cluster_row(shape, 2, admin, redis, (dev_node,), (cli_node,))
    row["target"] = f"2 nodes, {layout}"
    row["layout"] = layout
    row["node_devices"] = [shape.devices if i == dev_node else 0 for i in range(2)]
    row["node_clients"] = [shape.clients if i == cli_node else 0 for i in range(2)]
    row["ratio_delivered_vs_one_node"] = None
    row["machine"] = machine()
    return row


def stage_costs(together: dict[str, Any], apart: dict[str, Any]) -> dict[str, float]:
    """Milliseconds of CPU per reading (per delivery for ``deliver_ms``) of each stage, from
    the two layouts' rows (each node's CPU % over the load, readings and deliveries per s):

    - ``fold_ms``: a node that neither writes the stream nor has a client watching it: what
      it spends on each event it takes from the bus (decoding it, the replay history, the live
      picture): node 2's CPU in ``together``, per reading.
    - ``deliver_ms``: a delivery to a watching client (its frame, the socket write): what node
      2 spends in ``apart`` beyond the fold, per delivery.
    - ``write_ms``: the node a device is on: its socket, validation, the alert engine, the
      fenced commit, the ack, the publish to Redis, and the fold of its own events: node 1's
      CPU in ``apart``, per reading.
    - ``postgres_ms``, ``redis_ms``: PostgreSQL's backends for the database and Redis, per
      reading (the mean of the two layouts: the same work in both).
    """

    def per(cpu_pct: float, per_s: float) -> float:
        return 10 * cpu_pct / per_s if per_s > 0 else float("nan")  # % of a core -> ms per item

    fold = per(together["nodes_cpu_pct"][1], together["published_per_s"])
    return {
        "fold_ms": fold,
        "deliver_ms": per(
            apart["nodes_cpu_pct"][1] - together["nodes_cpu_pct"][1], apart["delivered_per_s"]
        ),
        "write_ms": per(apart["nodes_cpu_pct"][0], apart["published_per_s"]),
        "postgres_ms": (
            per(together["postgres_db_cpu_pct"], together["published_per_s"])
            + per(apart["postgres_db_cpu_pct"], apart["published_per_s"])
        )
        / 2,
        "redis_ms": (
            per(together["redis_cpu_pct"], together["published_per_s"])
            + per(apart["redis_cpu_pct"], apart["published_per_s"])
        )
        / 2,
        "deliveries_per_reading": apart["delivered_per_s"] / apart["published_per_s"]
        if apart["published_per_s"] > 0
        else float("nan"),
    }


def node_model(costs: dict[str, float], nodes: tuple[int, ...] = MODEL_NODES) -> dict[str, Any]:
    """What N nodes on N cores hold, in readings per second, from :func:`stage_costs`.

    Each node writes 1/N of the readings (``write_ms`` less the fold of its own events, which
    is counted once in ``fold_ms``), folds every reading of the cluster (``fold_ms``: every
    node takes every event from the bus), and delivers 1/N of the deliveries. A node's core is
    full at ``1000 / ((write - fold) / N + fold + deliveries * deliver / N)`` readings per
    second. The fold alone fills a core at ``1000 / fold``, however many nodes; PostgreSQL
    takes ``postgres_ms`` of its CPU per reading wherever it runs, Redis ``redis_ms``."""
    fold = max(costs["fold_ms"], 0.0)
    own = max(costs["write_ms"] - fold, 0.0)
    deliver = max(costs["deliver_ms"], 0.0) * costs["deliveries_per_reading"]

    def limit(ms: float) -> float | None:
        return 1000 / ms if ms > 0 else None

    return {
        "nodes": {str(n): limit(own / n + fold + deliver / n) for n in nodes},
        "fold_ceiling_per_s": limit(fold),
        "postgres_per_core_per_s": limit(costs["postgres_ms"]),
        "redis_per_core_per_s": limit(costs["redis_ms"]),
    }


async def bench_stages(
    shape: Shape, admin: str = POSTGRES_ADMIN, redis: str = REDIS
) -> dict[str, Any]:
    """``--stages``: the two layouts, the stage costs and the model."""
    rows = [await stage_row(shape, layout, admin, redis) for layout in STAGE_LAYOUTS]
    costs = stage_costs(rows[0], rows[1])
    return {"rows": rows, "stage_costs": costs, "model": node_model(costs)}


def db_name(url: str) -> str:
    return url.rsplit("/", 1)[1].split("?", 1)[0]


async def bench_cluster_load(
    shape: Shape,
    nodes: int,
    only: list[str] | None = None,
    admin: str = POSTGRES_ADMIN,
    redis: str = REDIS,
) -> list[dict[str, Any]]:
    """The shape on one cluster node (the baseline), then on ``nodes`` nodes: one row each,
    with ``ratio_delivered_vs_one_node``. ``only``: the rows to run, by target name."""
    rows = []
    for n in dict.fromkeys((1, nodes)):
        name = f"{n} node" + ("s" if n > 1 else "")
        if only is None or name in only:
            rows.append(await load_row(shape, n, admin, redis))
    base = next((r for r in rows if r["nodes"] == 1), None)
    for r in rows:
        r["ratio_delivered_vs_one_node"] = (
            r["delivered_per_s"] / max(base["delivered_per_s"], 1e-9) if base else None
        )
        r["ratio_delivered_vs_vitalwire"] = r["ratio_delivered_vs_one_node"]  # bench_saturate
        r["machine"] = machine()
    return rows


# -------------------------------------------------------------------------------------------------
# failover: SIGKILL a node K times under a light load
# -------------------------------------------------------------------------------------------------


class _Watcher:
    """A clinician on one node (that node's address only), watching every patient: the arrival
    time of the first reading stamped at or after ``armed_at`` per device, while armed."""

    def __init__(self, url: str, user: dict[str, str], streams: dict[str, int]) -> None:
        from vitalwire.sdk.monitor import MonitorClient

        self.client = MonitorClient(
            url, username=user["username"], password=user["password"], reconnect=False
        )
        self.streams = streams  # stream -> device index
        self.task: asyncio.Task[None] | None = None

    async def start(self, sink: _Resumed) -> None:
        await self.client.connect()
        await self.client.subscribe(list(self.streams))
        self.task = asyncio.create_task(self._collect(sink))

    async def _collect(self, sink: _Resumed) -> None:
        with contextlib.suppress(Exception):
            async for e in self.client.events():
                if e.kind == "reading":
                    sink.got(self.streams[e.stream], float(e.data["ts"]))

    async def close(self) -> None:
        if self.task is not None:
            self.task.cancel()
            await asyncio.gather(self.task, return_exceptions=True)
        with contextlib.suppress(Exception):
            await self.client.close()


class _Resumed:
    def __init__(self) -> None:
        self.armed_at: float | None = None
        self.waiting: set[int] = set()
        self.at: dict[int, float] = {}
        self.done = asyncio.Event()

    def arm(self, at: float, devices: set[int]) -> None:
        self.armed_at, self.waiting, self.at = at, set(devices), {}
        self.done.clear()

    def disarm(self) -> None:
        self.armed_at, self.waiting = None, set()

    def got(self, d: int, ts: float) -> None:
        if self.armed_at is None or d not in self.waiting or ts < self.armed_at:
            return
        self.at[d] = time.time()
        self.waiting.discard(d)
        if not self.waiting:
            self.done.set()


async def _stored_seqs(db: str, patient_ids: list[str]) -> dict[str, list[int]]:
    """Every stored reading's seq, per patient stream, in offset order."""
    from vitalwire.core import events as ev
    from vitalwire.store import open_store

    store = open_store(db)
    await store.open()
    try:
        out = {}
        for pid in patient_ids:
            events = await store.events_after(ev.patient_stream(pid), 0, 10_000_000)
            out[pid] = [int(e.data["seq"]) for e in events if e.kind == ev.READING]
        return out
    finally:
        await store.close()


async def bench_failover(
    nodes: int = 2,
    kills: int = 20,
    devices: int = 20,
    rate: float = 5.0,
    settle_s: float = 1.0,
    lease_ttl_s: float | None = None,
    admin: str = POSTGRES_ADMIN,
    redis: str = REDIS,
) -> dict[str, Any]:
    """Kill (SIGKILL) the node holding the most devices ``kills`` times, restarting it each
    time; the time from each kill to its devices' readings flowing again through another node."""
    from vitalwire.core import events as ev
    from vitalwire.sdk.device import DeviceClient

    if nodes < 2:
        raise ValueError(f"failover needs at least 2 nodes, got {nodes}")
    env = {"VITALWIRE_LEASE_TTL_S": str(lease_ttl_s)} if lease_ttl_s is not None else {}
    ttl = lease_ttl_s if lease_ttl_s is not None else Settings.model_fields["lease_ttl_s"].default
    async with cluster(nodes, devices, admin, redis, env) as cl:
        user = _clinician(cl.creds)
        assert user is not None
        creds = cl.creds.devices[:devices]
        streams = {ev.patient_stream(d["patient_id"]): i for i, d in enumerate(creds)}
        sink = _Resumed()
        # device i tries node i % N first, then the others in turn
        clients = [
            DeviceClient(cl.urls_from(i), d["device_id"], d["secret"], buffer_size=100_000)
            for i, d in enumerate(creds)
        ]
        backoff = {
            "backoff_initial_s": clients[0].backoff_initial_s,
            "backoff_max_s": clients[0].backoff_max_s,
        }
        watchers: dict[int, _Watcher] = {}
        feeding: asyncio.Task[None] | None = None
        kills_out: list[dict[str, Any]] = []
        errors: list[str] = []

        def node_of(c: DeviceClient) -> int:
            port = c.url.split("://", 1)[1].split("/", 1)[0]
            return next(i for i, x in enumerate(cl.nodes) if x.url.endswith(port))

        async def feed() -> None:
            period = 1.0 / rate
            next_at = time.monotonic()
            while True:
                now = time.time()
                for c in clients:
                    c.send(spo2=97, hr=72, ts=now)
                next_at += period
                await asyncio.sleep(max(0.0, next_at - time.monotonic()))

        try:
            for i, node in enumerate(cl.nodes):
                watchers[i] = _Watcher(node.url, user, streams)
                await watchers[i].start(sink)
            for c in clients:
                await c.start(timeout=30)
            feeding = asyncio.create_task(feed())
            for k in range(kills):
                await asyncio.sleep(settle_s)  # the load flows on every node before the kill
                where = [node_of(c) for c in clients if c.connected]
                victim = max(range(nodes), key=where.count)
                moved = {i for i, c in enumerate(clients) if c.connected and node_of(c) == victim}
                await watchers.pop(victim).close()  # the victim's own clinician goes with it
                t_kill = time.time()
                sink.arm(t_kill, moved)
                await cl.nodes[victim].kill()
                try:
                    await asyncio.wait_for(sink.done.wait(), 60)
                except TimeoutError:
                    errors.append(f"kill {k + 1}: {len(sink.waiting)} devices not back in 60 s")
                per_device = sorted((t - t_kill) * 1000 for t in sink.at.values())
                kills_out.append(
                    {
                        "kill": k + 1,
                        "node": cl.nodes[victim].node_id,
                        "devices": len(moved),
                        "resumed": len(per_device),
                        "resume_ms": per_device[-1] if per_device else None,
                        "first_device_ms": per_device[0] if per_device else None,
                        "devices_ms": per_device,
                    }
                )
                sink.disarm()
                t_restart = time.monotonic()
                await cl.nodes[victim].start()
                kills_out[-1]["restart_s"] = time.monotonic() - t_restart
                watchers[victim] = _Watcher(cl.nodes[victim].url, user, streams)
                await watchers[victim].start(sink)
            feeding.cancel()
            await asyncio.gather(feeding, return_exceptions=True)
            feeding = None
            for c in clients:
                try:
                    await c.flush(timeout=60)
                except Exception as exc:
                    errors.append(f"{c.device_id}: flush: {exc!r}")
            sent = {d["patient_id"]: c.seq for d, c in zip(creds, clients, strict=True)}
        finally:
            if feeding is not None:
                feeding.cancel()
            for w in watchers.values():
                await w.close()
            for c in clients:
                with contextlib.suppress(Exception):
                    await c.close()
        stored = await _stored_seqs(cl.db, [d["patient_id"] for d in creds])
    lost = sum(len(set(range(1, sent[p] + 1)) - set(stored[p])) for p in sent)
    duplicated = sum(len(s) - len(set(s)) for s in stored.values())
    out_of_order = sum(s != sorted(s) for s in stored.values())
    resume = [k["resume_ms"] for k in kills_out if k["resume_ms"] is not None]
    return {
        "scenario": "cluster-failover",
        "nodes": nodes,
        "kills": kills,
        "devices": devices,
        "rate_hz": rate,
        "settle_s": settle_s,
        "resume_ms": percentiles(resume),
        "first_device_ms": percentiles(
            [k["first_device_ms"] for k in kills_out if k["first_device_ms"] is not None]
        ),
        "settings": {"lease_ttl_s": ttl, "sdk_device": backoff},
        "readings_sent": sum(sent.values()),
        "lost": lost,
        "duplicated": duplicated,
        "streams_out_of_order": out_of_order,
        "kills_detail": kills_out,
        "errors": errors[:20],
        "machine": machine(),
    }


# -------------------------------------------------------------------------------------------------
# the command's run and table
# -------------------------------------------------------------------------------------------------


async def run_cluster(
    shape: Shape,
    nodes: int,
    saturate: bool = False,
    refine: int = 2,
    repeat: int = 1,
    failover: int = 0,
    failover_devices: int = 20,
    failover_rate: float = 5.0,
    lease_ttl_s: float | None = None,
    admin: str = POSTGRES_ADMIN,
    redis: str = REDIS,
    stages: bool = False,
) -> dict[str, Any]:
    """``vitalwire bench cluster``: the load on 1 node and on ``nodes`` nodes (with
    ``saturate``: each one's highest rate held), or with ``failover`` > 0 the failover only, or
    with ``stages`` the stage costs and the model of N nodes (2 nodes, whatever ``nodes``)."""
    from vitalwire.bench.runner import bench_saturate

    await check_services(admin, redis)
    load_before = list(os.getloadavg())
    out: dict[str, Any] = {"scenario": "cluster", "nodes": nodes}
    if stages:
        out = {"scenario": "cluster-stages", "nodes": 2, **await bench_stages(shape, admin, redis)}
    elif failover:
        out = await bench_failover(
            nodes, failover, failover_devices, failover_rate, 1.0, lease_ttl_s, admin, redis
        )
    elif saturate:
        every: list[dict[str, Any]] = []  # every run of the ladder, held or not

        async def run(s: Any, against: list[str], only: Any) -> list[dict[str, Any]]:
            rows = await bench_cluster_load(s, nodes, list(only) if only else None, admin, redis)
            every.extend(_summary(r) for r in rows)
            return rows

        out["saturate"] = True
        out["rows"] = await bench_saturate(shape, [], refine=refine, repeat=repeat, run=run)
        out["ladder"] = every
    else:
        out["rows"] = await bench_cluster_load(shape, nodes, None, admin, redis)
    out["load_average_before"] = load_before
    out["load_average_after"] = list(os.getloadavg())
    out["machine"] = machine()
    return out


def _summary(row: dict[str, Any]) -> dict[str, Any]:
    """One run of a saturation ladder, in brief."""
    return {
        "target": row["target"],
        "rate_hz": row["shape"]["rate_hz"],
        "delivered_per_s": row["delivered_per_s"],
        "latency_ms": row["latency_ms"],
        "lost": row["lost"],
        "duplicated": row["duplicated"],
        "nodes_cpu_pct": row["nodes_cpu_pct"],
        "postgres_db_cpu_pct": row["postgres_db_cpu_pct"],
        "store_rows_per_s": row["store_rows_per_s"],
    }


def print_cluster(r: dict[str, Any], console: Any) -> None:
    from rich.table import Table

    def num(x: Any, fmt: str = ",.0f") -> str:
        return "-" if x is None else format(x, fmt)

    if r["scenario"] == "cluster-failover":
        t = Table(
            title=f"failover: {r['kills']} x SIGKILL of one of {r['nodes']} nodes, "
            f"{r['devices']} devices x {r['rate_hz']:g} Hz; ms from the kill to the killed "
            "node's devices' readings flowing through another node"
        )
        for col in ("", "p50 ms", "p99 ms", "max ms", "kills"):
            t.add_column(col, justify="left" if not col else "right")
        for name, key in (("all its devices", "resume_ms"), ("first device", "first_device_ms")):
            p = r[key]
            t.add_row(name, num(p["p50"]), num(p["p99"]), num(p["max"]), str(p["n"]))
        console.print(t)
        sdk = r["settings"]["sdk_device"]
        console.print(
            f"lease_ttl_s {r['settings']['lease_ttl_s']:g}; device SDK back-off "
            f"{sdk['backoff_initial_s']:g} s doubling to {sdk['backoff_max_s']:g} s (the next "
            f"node after up to {sdk['backoff_initial_s']:g} s); readings {r['readings_sent']:,}, "
            f"lost {r['lost']}, duplicated {r['duplicated']}"
        )
        for err in r["errors"]:
            console.print(f"[yellow]{err}[/yellow]")
    elif not r["rows"]:
        console.print("[red]no rate held (p99 <= 50 ms, 0 lost) on any target[/red]")
    else:
        s = r["rows"][0]["shape"]
        ladder = "saturation: last rate with p99 <= 50 ms, " if r.get("saturate") else ""
        where = (
            "devices on node 1, clients on node 1 (together) or node 2 (apart)"
            if r["scenario"] == "cluster-stages"
            else "round robin over the nodes"
        )
        t = Table(
            title=f"{ladder}cluster: {s['devices']} devices x {s['rate_hz']:g} Hz, "
            f"{s['clients']} clients x {s['patients_per_client']} patients, {where} "
            f"({s['generator']} load generator)"
        )
        cols = ("target", "rate Hz", "delivered/s", "p50 ms", "p99 ms", "p99.9 ms", "max ms")
        cols += ("lost", "dup", "nodes CPU %", "nodes RSS MB", "PG CPU %", "Redis CPU %")
        for col in cols + ("rows/s", "ratio"):
            t.add_column(col, justify="left" if col == "target" else "right")
        for row in r["rows"]:
            lat = row["latency_ms"]
            t.add_row(
                row["target"],
                num(row.get("rate_hz", s["rate_hz"]), "g"),
                num(row["delivered_per_s"]),
                *(num(lat[k], ".2f") for k in ("p50", "p99", "p99.9")),
                num(lat["max"], ".1f"),
                str(row["lost"]),
                str(row["duplicated"]),
                " + ".join(f"{x:.0f}" for x in row["nodes_cpu_pct"]),
                " + ".join(f"{x:.0f}" for x in row["nodes_rss_mb"]),
                num(row["postgres_db_cpu_pct"] + row["postgres_shared_cpu_pct"]),
                num(row["redis_cpu_pct"]),
                num(row["store_rows_per_s"]),
                num(row["ratio_delivered_vs_one_node"], ".2f"),
            )
        console.print(t)
        for row in r["rows"]:
            if row.get("failed_at_hz") is not None or r.get("saturate"):
                console.print(
                    f"{row['target']}: held {row.get('rate_hz', 0):g} Hz; failed at "
                    f"{num(row.get('failed_at_hz'), 'g')} Hz"
                )
            for err in row["errors"]:
                console.print(f"[yellow]{row['target']}: {err}[/yellow]")
            if row["nodes_died"]:
                console.print(f"[red]{row['target']}: nodes died: {row['nodes_died']}[/red]")
    if r["scenario"] == "cluster-stages":
        _print_stages(r, console, num)
    for step in r.get("ladder", []):
        lat = step["latency_ms"]
        console.print(
            f"  ladder: {step['target']} at {step['rate_hz']:g} Hz: p99 {lat['p99']:.1f} ms, "
            f"lost {step['lost']}, delivered/s {step['delivered_per_s']:,.0f}"
        )
    before = ", ".join(f"{x:.2f}" for x in r["load_average_before"])
    after = ", ".join(f"{x:.2f}" for x in r["load_average_after"])
    console.print(f"load average before: {before}; after: {after}")


def _print_stages(r: dict[str, Any], console: Any, num: Any) -> None:
    from rich.table import Table

    c = r["stage_costs"]
    t = Table(title="CPU per reading of each stage (ms of one core)")
    for col in ("stage", "where", "ms"):
        t.add_column(col, justify="right" if col == "ms" else "left")
    t.add_row("fold", "every node, every reading of the cluster", num(c["fold_ms"], ".3f"))
    t.add_row("deliver", "the watching client's node, per delivery", num(c["deliver_ms"], ".3f"))
    t.add_row("write", "the device's node (with its own fold)", num(c["write_ms"], ".3f"))
    t.add_row("PostgreSQL", "the database's backends", num(c["postgres_ms"], ".3f"))
    t.add_row("Redis", "the bus", num(c["redis_ms"], ".3f"))
    console.print(t)
    m = r["model"]
    t = Table(
        title=f"model: readings/s that N nodes on N cores hold "
        f"({c['deliveries_per_reading']:.2f} deliveries per reading)"
    )
    for col in m["nodes"]:
        t.add_column(f"{col} node" + ("s" if col != "1" else ""), justify="right")
    t.add_row(*(num(v) for v in m["nodes"].values()))
    console.print(t)
    console.print(
        f"the fold alone fills a node's core at {num(m['fold_ceiling_per_s'])} readings/s; "
        f"one core of PostgreSQL holds {num(m['postgres_per_core_per_s'])}, one of Redis "
        f"{num(m['redis_per_core_per_s'])}"
    )
