"""The load generator behind ``vitalwire bench``: devices x rate, clients x patients each.

How it works: the main process starts the target (vitalwire, the naive server, or uses an MQTT
broker), then ``workers`` child processes share the devices and clients (the generator competes
with the server for this machine's cores; its CPU is reported too). Every device sends readings
at ``rate_hz`` stamped with the sender's wall clock (one clock: all processes run on one
machine); every client records, per device, how many distinct seqs it got, duplicates, and the
end-to-end latency of each (sampled). Readings of one device arrive in order on every transport
here, so a seq at or below the highest seen is a duplicate; lost = sent - distinct received, per
client and watched device.

``generator="node"`` runs the same workers in Node.js instead (``load.mjs``, no dependencies:
only Node's built-ins), for rates at which the Python generator saturates before the servers do.
They get their share of devices and clients as JSON on stdin and write a ``WorkerResult`` as JSON
on stdout; their timestamps come from the parent's wall clock, carried over as a (``time.time()``,
``time.monotonic()``) pair taken at one instant (Node's hrtime is the same CLOCK_MONOTONIC).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import multiprocessing as mp
import os
import random
import resource
import select
import shutil
import subprocess
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import msgspec

from vitalwire.bench.runner import percentiles

LATENCY_SAMPLES = 200_000  # per worker, reservoir
#: the timeline's bound: a timed reading slower than this counts as slow in its second
SLOW_MS = 50.0
GENERATORS = ("python", "node")
NODE_WORKER = Path(__file__).with_name("load.mjs")


@dataclass(frozen=True)
class Shape:
    devices: int = 100
    rate_hz: float = 1.0
    clients: int = 10
    patients_per_client: int = 10
    duration_s: float = 10.0
    workers: int = 2
    generator: str = "python"  # python | node: the language of the worker processes
    #: readings sent in the first seconds of the load count for loss and duplicates, not latency
    warmup_s: float = 0.0

    def watched(self, client: int) -> list[int]:
        """Device indexes client ``client`` watches (patients are one per device)."""
        k = min(self.patients_per_client, self.devices)
        return [(client * k + j) % self.devices for j in range(k)]


@dataclass(frozen=True)
class Target:
    kind: str  # vitalwire | naive | mqtt
    url: str  # http://host:port, ws://host:port or mqtt://host:port
    qos: int = 0
    devices: tuple[tuple[str, str, str], ...] = ()  # (device id, secret, patient id)
    token: str = ""
    #: several nodes of one vitalwire cluster: device and client ``i`` connect to
    #: ``urls[i % len(urls)]`` (round robin); empty: every connection goes to ``url``
    urls: tuple[str, ...] = ()
    #: the clients' nodes, when they are not ``urls`` (client ``i`` connects to
    #: ``client_urls[i % len(client_urls)]``): ``bench cluster --stages`` puts every device on
    #: one node and every client on another
    client_urls: tuple[str, ...] = ()

    def url_for(self, i: int) -> str:
        """The address connection ``i`` (a device's or a client's index) goes to."""
        return self.urls[i % len(self.urls)] if self.urls else self.url

    def client_url_for(self, i: int) -> str:
        """The address client ``i`` connects to."""
        if self.client_urls:
            return self.client_urls[i % len(self.client_urls)]
        return self.url_for(i)


@dataclass
class WorkerResult:
    sent: dict[int, int] = field(default_factory=dict)  # device index -> readings sent
    received: dict[tuple[int, int], int] = field(default_factory=dict)  # (client, device)
    duplicates: int = 0
    latencies_ms: list[float] = field(default_factory=list)
    seen: int = 0
    #: per second of the load (by arrival): [timed readings, slower than SLOW_MS, slowest ms]
    timeline: dict[int, list[float]] = field(default_factory=dict)
    #: per second of the load: this worker's longest event-loop stall (ms), which a latency
    #: measured here includes — so a slow second can be told from a slow generator
    stalls: dict[int, float] = field(default_factory=dict)
    start_at: float = 0.0
    connect_s: float = 0.0
    cpu_s: float = 0.0
    errors: list[str] = field(default_factory=list)


def patient_name(i: int) -> str:
    return f"P{i + 1:03d}"


# -------------------------------------------------------------------------------------------------
# worker processes
# -------------------------------------------------------------------------------------------------


def run_worker(
    target: Target,
    shape: Shape,
    devices: list[int],
    clients: list[int],
    connected: Any,
    go: Any,
    out: Any,
) -> None:
    """One Python worker process: connect, put ``"connected"`` on ``connected``, take the
    load's start (wall clock) from ``go``, run the load, put the result on ``out``."""
    result = asyncio.run(_worker(target, shape, devices, clients, connected, go))
    usage = resource.getrusage(resource.RUSAGE_SELF)
    result.cpu_s = usage.ru_utime + usage.ru_stime
    out.put(
        asdict(result)
        | {
            "received": list(result.received.items()),
            "timeline": [[k, *v] for k, v in sorted(result.timeline.items())],
            "stalls": list(result.stalls.items()),
        }
    )


STALL_TICK_S = 0.01


async def _sample_stalls(res: WorkerResult) -> None:
    """Record, per second of the load, how much later than asked a 10 ms sleep woke up."""
    last = time.time()
    while True:
        await asyncio.sleep(STALL_TICK_S)
        now = time.time()
        stall = max(0.0, (now - last - STALL_TICK_S) * 1000)
        last = now
        second = int(now - res.start_at)
        if stall > res.stalls.get(second, -1.0):
            res.stalls[second] = stall


async def _worker(
    target: Target, shape: Shape, devices: list[int], clients: list[int], connected: Any, go: Any
) -> WorkerResult:
    res = WorkerResult()
    stop_clients = asyncio.Event()
    t0 = time.perf_counter()
    client_tasks = []
    ready: list[asyncio.Event] = []
    for c in clients:
        ev = asyncio.Event()
        ready.append(ev)
        client_tasks.append(asyncio.create_task(_client(target, shape, c, res, ev, stop_clients)))
    await asyncio.wait_for(asyncio.gather(*(e.wait() for e in ready)), 120)
    senders = [await _open_device(target, d) for d in devices]
    res.connect_s = time.perf_counter() - t0
    connected.put("connected")
    res.start_at = await asyncio.to_thread(go.get, True, connect_timeout(shape))
    await asyncio.sleep(max(0.0, res.start_at - time.time()))
    sampler = asyncio.create_task(_sample_stalls(res))
    await asyncio.gather(
        *(_send_loop(target, shape, d, s, res) for d, s in zip(devices, senders, strict=True))
    )
    await asyncio.sleep(2.0)  # let the last readings arrive
    sampler.cancel()
    stop_clients.set()
    for s in senders:
        with contextlib.suppress(Exception):
            await s.close()
    for t in client_tasks:
        t.cancel()
    await asyncio.gather(*client_tasks, return_exceptions=True)
    return res


def _ws_url(url: str) -> str:
    return url.replace("http://", "ws://").replace("https://", "wss://").rstrip("/")


async def _open_device(target: Target, d: int) -> Any:
    if target.kind == "mqtt":
        import aiomqtt

        host, port = target.url.removeprefix("mqtt://").split(":")
        client = aiomqtt.Client(host, int(port), identifier=f"bench-dev-{os.getpid()}-{d}")
        await client.__aenter__()
        return _MqttSender(client, target.qos, patient_name(d))
    from websockets.asyncio.client import connect

    if target.kind == "naive":
        ws = await connect(_ws_url(target.url) + "/device", proxy=None, compression=None)
        return _NaiveSender(ws, patient_name(d))
    did, secret, _pid = target.devices[d]
    ws = await connect(
        _ws_url(target.url_for(d)) + "/ws/device", proxy=None, compression=None, max_size=2**22
    )
    await ws.send(json.dumps({"type": "hello", "device_id": did, "secret": secret}))
    welcome = json.loads(await ws.recv())
    if welcome.get("type") != "welcome":
        raise RuntimeError(f"device {did} refused: {welcome}")
    return _VitalwireSender(ws, welcome["high_seq"])


class _VitalwireSender:
    def __init__(self, ws: Any, high_seq: int) -> None:
        self.ws = ws
        self.base = high_seq
        self.drain = asyncio.create_task(self._drain())

    async def _drain(self) -> None:
        with contextlib.suppress(Exception):
            async for raw in self.ws:
                if '"type":"ping"' in raw:
                    await self.ws.send('{"type":"pong"}')

    async def send(self, seq: int, ts: float, sent_index: int) -> None:
        await self.ws.send(
            f'{{"type":"reading","seq":{self.base + seq},"ts":{ts},"spo2":97,"hr":72}}'
        )

    async def close(self) -> None:
        self.drain.cancel()
        await self.ws.close()


class _NaiveSender:
    def __init__(self, ws: Any, patient: str) -> None:
        self.ws = ws
        self.patient = patient

    async def send(self, seq: int, ts: float, sent_index: int) -> None:
        await self.ws.send(
            f'{{"patient":"{self.patient}","seq":{seq},"ts":{ts},"spo2":97,"hr":72}}'
        )

    async def close(self) -> None:
        await self.ws.close()


class _MqttSender:
    def __init__(self, client: Any, qos: int, patient: str) -> None:
        self.client = client
        self.qos = qos
        self.topic = f"vitalwire-bench/{patient}"

    async def send(self, seq: int, ts: float, sent_index: int) -> None:
        payload = f'{{"seq":{seq},"ts":{ts},"spo2":97,"hr":72}}'
        await self.client.publish(self.topic, payload, qos=self.qos)

    async def close(self) -> None:
        await self.client.__aexit__(None, None, None)


async def _send_loop(target: Target, shape: Shape, d: int, sender: Any, res: WorkerResult) -> None:
    period = 1.0 / shape.rate_hz
    start = time.perf_counter() + random.random() * period  # spread devices over the period
    end = start + shape.duration_s
    seq = 0
    next_at = start
    while True:
        now = time.perf_counter()
        if now >= end:
            break
        if now < next_at:
            await asyncio.sleep(next_at - now)
        seq += 1
        try:
            await sender.send(seq, time.time(), seq)
        except Exception as exc:
            res.errors.append(f"device {d}: {exc!r}")
            break
        next_at += period
    res.sent[d] = seq


class _Tracker:
    def __init__(self, res: WorkerResult, client: int, warmup_s: float = 0.0) -> None:
        self.res = res
        self.client = client
        # readings sent in the load's first warmup_s seconds (by their device timestamp, on the
        # same clock as the start): not in the latencies. By time, not by seq: against a server
        # the bench did not start, a device's seqs go on from an earlier run's.
        self.warmup_s = warmup_s
        self.highest: dict[int, int] = {}
        self.k = 0

    def got(self, d: int, seq: int, ts: float) -> None:
        res = self.res
        if seq <= self.highest.get(d, 0):
            res.duplicates += 1
            return
        self.highest[d] = seq
        key = (self.client, d)
        res.received[key] = res.received.get(key, 0) + 1
        if self.warmup_s and ts < res.start_at + self.warmup_s:
            return
        now = time.time()
        latency = (now - ts) * 1000
        res.seen += 1
        second = int(now - res.start_at)
        slot = res.timeline.get(second)
        if slot is None:
            slot = res.timeline[second] = [0, 0, 0.0]
        slot[0] += 1
        if latency > SLOW_MS:
            slot[1] += 1
        if latency > slot[2]:
            slot[2] = latency
        if len(res.latencies_ms) < LATENCY_SAMPLES:
            res.latencies_ms.append(latency)
        else:
            j = random.randrange(res.seen)
            if j < LATENCY_SAMPLES:
                res.latencies_ms[j] = latency


_frame = msgspec.json.Decoder()


async def _client(
    target: Target,
    shape: Shape,
    c: int,
    res: WorkerResult,
    ready: asyncio.Event,
    stop: asyncio.Event,
) -> None:
    watched = shape.watched(c)
    tracker = _Tracker(res, c, shape.warmup_s)
    try:
        if target.kind == "mqtt":
            await _mqtt_client(target, watched, tracker, ready)
        elif target.kind == "naive":
            await _naive_client(target, watched, tracker, ready)
        elif target.kind == "graphql":
            from vitalwire.bench.graphql import graphql_client

            await graphql_client(target, watched, tracker, ready)
        else:
            await _vitalwire_client(target, c, watched, tracker, ready)
    except asyncio.CancelledError:
        raise
    except Exception as exc:
        res.errors.append(f"client {c}: {exc!r}")
        ready.set()


async def _vitalwire_client(
    target: Target, c: int, watched: list[int], tracker: _Tracker, ready: asyncio.Event
) -> None:
    from websockets.asyncio.client import connect

    index = {f"patient:{target.devices[d][2]}": d for d in watched}
    async with connect(
        _ws_url(target.client_url_for(c)) + "/ws", proxy=None, compression=None, max_size=2**24
    ) as ws:
        await ws.send(json.dumps({"type": "auth", "token": target.token}))
        await ws.recv()
        await ws.send(
            json.dumps({"type": "subscribe", "streams": list(index), "batch": True, "id": 1})
        )
        ready.set()
        async for raw in ws:
            msg = _frame.decode(raw)
            kind = msg.get("type")
            if kind == "events":
                for item in msg["items"]:
                    if item["kind"] == "reading":
                        data = item["data"]
                        tracker.got(index[item["stream"]], data["seq"], data["ts"])
            elif kind == "event" and msg["kind"] == "reading":
                data = msg["data"]
                tracker.got(index[msg["stream"]], data["seq"], data["ts"])
            elif kind == "ping":
                await ws.send('{"type":"pong"}')


async def _naive_client(
    target: Target, watched: list[int], tracker: _Tracker, ready: asyncio.Event
) -> None:
    from websockets.asyncio.client import connect

    index = {patient_name(d): d for d in watched}
    async with connect(_ws_url(target.url) + "/client", proxy=None, compression=None) as ws:
        await ws.send(json.dumps({"subscribe": list(index)}))
        await ws.recv()
        ready.set()
        async for raw in ws:
            msg = _frame.decode(raw)
            tracker.got(index[msg["patient"]], msg["seq"], msg["ts"])


async def _mqtt_client(
    target: Target, watched: list[int], tracker: _Tracker, ready: asyncio.Event
) -> None:
    import aiomqtt

    host, port = target.url.removeprefix("mqtt://").split(":")
    index = {f"vitalwire-bench/{patient_name(d)}": d for d in watched}
    async with aiomqtt.Client(
        host, int(port), identifier=f"bench-cli-{os.getpid()}-{id(tracker)}", clean_session=True
    ) as client:
        for topic in index:
            await client.subscribe(topic, qos=target.qos)
        ready.set()
        async for message in client.messages:
            msg = _frame.decode(message.payload)
            tracker.got(index[str(message.topic)], msg["seq"], msg["ts"])


# -------------------------------------------------------------------------------------------------
# the run
# -------------------------------------------------------------------------------------------------


def proc_cpu_s(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    return (int(fields[11]) + int(fields[12])) / ticks


def proc_rss_kb(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


class PidProbe:
    """CPU seconds and resident memory of a local process, from ``/proc`` (a server the bench
    started, the naive reference, Mosquitto)."""

    def __init__(self, pid: int) -> None:
        self.pid = pid

    def cpu_s(self) -> float:
        return proc_cpu_s(self.pid)

    def rss_kb(self) -> int | None:
        return proc_rss_kb(self.pid)


class MetricsProbe:
    """CPU seconds and resident memory of a vitalwire server the bench did not start
    (``--url``), from its ``GET /metrics.json`` (``process_cpu_s``, ``process_rss_kb``): the server
    may run on another machine. ``rss_kb`` is None where the server cannot tell (not Linux)."""

    def __init__(self, url: str) -> None:
        self.url = url.rstrip("/") + "/metrics.json"

    def _get(self) -> dict[str, Any]:
        import httpx

        r = httpx.get(self.url, timeout=30)
        r.raise_for_status()
        return dict(r.json())

    def cpu_s(self) -> float:
        return float(self._get()["process_cpu_s"])

    def rss_kb(self) -> int | None:
        rss = self._get().get("process_rss_kb")
        return None if rss is None else int(rss)


Probe = PidProbe | MetricsProbe


def _history_kb(target: Target) -> float | None:
    """The replay history's memory a vitalwire server reports (``/metrics.json``
    ``bus_history_kb``); None for another target, a cluster, or a server that does not say."""
    if target.kind != "vitalwire" or target.urls or target.client_urls:
        return None
    import httpx

    try:
        r = httpx.get(target.url.rstrip("/") + "/metrics.json", timeout=30)
        r.raise_for_status()
        kb = r.json().get("bus_history_kb")
    except (httpx.HTTPError, ValueError):
        return None
    return None if kb is None else float(kb)


def _per_beside(
    rss: int | None, rss0: int | None, hist: float | None, hist0: float | None, connections: int
) -> float | None:
    """:func:`_per` less what the bus's replay history grew by meanwhile: that memory is per
    stream and bounded (``bus_history``, ``bus_history_bytes``), not per connection."""
    if rss is None or rss0 is None or hist is None or hist0 is None:
        return None
    return (rss - rss0 - (hist - hist0)) / connections


def _per(rss: int | None, rss0: int | None, connections: int) -> float | None:
    """KB of resident memory per connection over the figure before they opened (None unknown)."""
    return None if rss is None or rss0 is None else (rss - rss0) / connections


def node_path() -> str:
    """The ``node`` executable, or a clear error."""
    node = shutil.which("node")
    if node is None:
        raise RuntimeError(
            "--generator node needs Node.js (`node`, tested with v20) on PATH; none was found"
        )
    return node


def _start_node_worker(
    node: str,
    target: Target,
    shape: Shape,
    devices: list[int],
    clients: list[int],
    clock: dict[str, float],
    configs: list[str],
) -> subprocess.Popen[bytes]:
    """A Node worker with its config (a file, named in ``configs``: the device credentials of
    a hospital are far more than a pipe holds); the load's start goes to its stdin once every
    worker is connected."""
    config = {
        "target": asdict(target),
        "shape": asdict(shape),
        "devices": devices,
        "clients": clients,
        "clock": clock,
    }
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(config, f)
    configs.append(f.name)  # removed by the caller when the run ends
    return subprocess.Popen(
        [node, str(NODE_WORKER), f.name],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )


def _node_connected(proc: subprocess.Popen[bytes], deadline: float) -> None:
    """Wait for the worker's ``connected`` line."""
    assert proc.stdout is not None
    fd = proc.stdout.fileno()
    line = b""
    while not line.endswith(b"\n"):
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([fd], [], [], left)[0]:
            proc.kill()
            raise RuntimeError(f"node load worker {proc.pid}: not connected in time")
        chunk = os.read(fd, 1)  # one byte at a time: nothing past the line is taken from it
        if not chunk:
            proc.wait()
            assert proc.stderr is not None
            why = proc.stderr.read().decode(errors="replace").strip()[-2000:]
            raise RuntimeError(f"node load worker failed (exit {proc.returncode}): {why}")
        line += chunk
    if line.strip() != b"connected":
        proc.kill()
        raise RuntimeError(f"node load worker {proc.pid}: expected 'connected', got {line!r}")


def _python_connected(procs: list[Any], connected: Any, deadline: float) -> None:
    """Wait until every Python worker said ``connected``; fail at once if one died first."""
    import queue

    left = len(procs)
    while left:
        try:
            connected.get(timeout=0.5)
            left -= 1
        except queue.Empty:
            dead = [p for p in procs if p.exitcode is not None]
            if dead:
                raise RuntimeError(
                    f"load worker {dead[0].pid} exited (code {dead[0].exitcode}) "
                    "before it connected"
                ) from None
            if time.monotonic() > deadline:
                raise RuntimeError("load workers not connected in time") from None


def _node_result(proc: subprocess.Popen[bytes], timeout: float) -> dict[str, Any]:
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        raise RuntimeError(f"node load worker {proc.pid}: not done in {timeout:.0f} s") from None
    if proc.returncode != 0:
        why = err.decode(errors="replace").strip()[-2000:]
        raise RuntimeError(f"node load worker failed (exit {proc.returncode}): {why}")
    result: dict[str, Any] = json.loads(out)
    return result


#: Seconds from "every worker is connected" to the load's start: time for the start to reach them.
START_MARGIN_S = 0.3


def connect_timeout(shape: Shape) -> float:
    """How long the workers may take to open every connection (generous: a slow machine took
    79 s for 11,000; the load waits for them, however long it takes within this)."""
    return 120.0 + (shape.devices + shape.clients) / 20


def run_load(target: Target, shape: Shape, server: int | Probe | None) -> dict[str, Any]:
    """Run one load against one target; return the figures. ``server``: the process id of the
    target's server, or a probe of its CPU and memory (None: no CPU or memory figures)."""
    probe = PidProbe(server) if isinstance(server, int) else server
    if shape.generator not in GENERATORS:
        raise ValueError(f"generator must be one of {GENERATORS}, got {shape.generator!r}")
    node = node_path() if shape.generator == "node" else ""
    workers = max(1, shape.workers)
    dev_parts = [list(range(shape.devices))[i::workers] for i in range(workers)]
    cli_parts = [list(range(shape.clients))[i::workers] for i in range(workers)]
    rss0 = probe.rss_kb() if probe else None
    hist0 = _history_kb(target) if probe else None
    timeout = shape.duration_s + 300  # from the start of the load
    # The load starts once every worker has opened all its connections, however long that took:
    # the idle memory is read then, and the server's CPU counted from then on.
    if node:
        clock = {"wall": time.time(), "mono": time.monotonic()}  # one instant, one clock
        nodes: list[subprocess.Popen[bytes]] = []
        configs: list[str] = []
        try:
            for i in range(workers):
                nodes.append(
                    _start_node_worker(
                        node, target, shape, dev_parts[i], cli_parts[i], clock, configs
                    )
                )
            deadline = time.monotonic() + connect_timeout(shape)
            for p in nodes:
                _node_connected(p, deadline)
            # every connection is open but no reading flows: idle memory
            rss_idle = probe.rss_kb() if probe else None
            start_at = time.time() + START_MARGIN_S
            for p in nodes:
                assert p.stdin is not None
                p.stdin.write(json.dumps({"start_at": start_at}).encode() + b"\n")
                p.stdin.flush()  # left open: communicate() closes it
            time.sleep(max(0.0, start_at - time.time()))
            cpu0, load_t0 = (probe.cpu_s() if probe else 0.0), time.monotonic()
            results = [_node_result(p, timeout) for p in nodes]
        finally:
            for path in configs:
                with contextlib.suppress(OSError):
                    os.unlink(path)
            for p in nodes:
                if p.poll() is None:
                    p.kill()
                    p.communicate()
    else:
        ctx = mp.get_context("spawn")
        out, connected = ctx.Queue(), ctx.Queue()
        gos = [ctx.Queue() for _ in range(workers)]
        procs = [
            ctx.Process(
                target=run_worker,
                args=(target, shape, dev_parts[i], cli_parts[i], connected, gos[i], out),
            )
            for i in range(workers)
        ]
        for p in procs:
            p.start()
        try:
            _python_connected(procs, connected, time.monotonic() + connect_timeout(shape))
            # every connection is open but no reading flows yet: idle memory
            rss_idle = probe.rss_kb() if probe else None
            start_at = time.time() + START_MARGIN_S
            for go in gos:
                go.put(start_at)
            time.sleep(max(0.0, start_at - time.time()))
            cpu0, load_t0 = (probe.cpu_s() if probe else 0.0), time.monotonic()
            results = [out.get(timeout=timeout) for _ in procs]
            for p in procs:
                p.join(30)
        finally:  # a worker that failed leaves none of the others running
            for p in procs:
                if p.is_alive():
                    p.kill()
                    p.join(5)
    # the server's CPU over the load alone (from just before the first reading to the workers'
    # report), not over the connect phase before it
    cpu1, wall = (probe.cpu_s() if probe else 0.0), time.monotonic() - load_t0
    rss1 = probe.rss_kb() if probe else None
    hist1 = _history_kb(target) if hist0 is not None else None
    sent: dict[int, int] = {}
    received: dict[tuple[int, int], int] = {}
    latencies: list[float] = []
    timeline: dict[int, list[float]] = {}
    stalls: dict[int, float] = {}
    dups = 0
    errors: list[str] = []
    for r in results:
        for second, timed, slow, worst in r["timeline"]:
            slot = timeline.setdefault(int(second), [0, 0, 0.0])
            slot[0] += timed
            slot[1] += slow
            slot[2] = max(slot[2], worst)
        for second, stall in r["stalls"]:
            stalls[int(second)] = max(stalls.get(int(second), 0.0), stall)
        sent.update({int(k): v for k, v in r["sent"].items()})
        for (c, d), n in r["received"]:
            received[(c, d)] = n
        latencies.extend(r["latencies_ms"])
        dups += r["duplicates"]
        errors.extend(r["errors"])
    expected = sum(sent.get(d, 0) for c in range(shape.clients) for d in shape.watched(c))
    delivered = sum(received.values())
    published = sum(sent.values())
    connections = shape.devices + shape.clients
    return {
        "target": target.kind + (f" qos{target.qos}" if target.kind == "mqtt" else ""),
        "generator": shape.generator,
        "shape": asdict(shape),
        "load_started_at": start_at,  # wall clock (s): the timeline's second 0
        "published": published,
        "published_per_s": published / shape.duration_s,
        "delivered": delivered,
        "delivered_per_s": delivered / shape.duration_s,
        "lost": expected - delivered,
        "duplicated": dups,
        "latency_ms": percentiles(latencies),
        # where in the run the slow readings fell: a start's backlog, or stalls all along
        # (and whether the generator itself stalled then: its stall is inside those latencies)
        "timeline": [
            {
                "s": k,
                "timed": int(timeline.get(k, (0,))[0]),
                "over_50ms": int(timeline.get(k, (0, 0))[1]),
                "max_ms": timeline.get(k, (0, 0, 0.0))[2],
                "generator_stall_ms": stalls.get(k, 0.0),
            }
            for k in sorted(timeline.keys() | stalls.keys())
            if k >= 0
        ],
        "server_cpu_pct": 100 * (cpu1 - cpu0) / wall if probe else None,
        "server_rss_mb": rss1 / 1024 if rss1 is not None else None,
        "rss_per_connection_kb": _per(rss1, rss0, connections),
        # the same without the replay history's growth over the load (per stream, bounded)
        "bus_history_mb": None if hist1 is None else hist1 / 1024,
        "rss_per_connection_beside_history_kb": _per_beside(rss1, rss0, hist1, hist0, connections),
        "rss_per_idle_connection_kb": _per(rss_idle, rss0, connections),
        "generator_cpu_s": sum(r["cpu_s"] for r in results),
        "connect_s": max(r["connect_s"] for r in results),
        "errors": errors[:10],
    }
