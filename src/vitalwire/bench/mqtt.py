"""``vitalwire bench mqtt``: the ward shape through an MQTT broker beside the WebSocket path.

How it works: one ``vitalwire serve`` (a child process on a fresh SQLite file, as for the other
load modes) bridges the broker (``mqtt_url``; a topic prefix and client id of the run's own, a
session that ends with the run). Twice ``devices`` patients are provisioned: the first half are
the WebSocket path's devices, the second half the MQTT path's, so both start from seq 1. Then,
in one run, one after the other:

- ``ws``: the load of ``vitalwire bench`` (load.py, unchanged): devices on ``/ws/device``, clients
  on ``/ws``.
- ``mqtt qos1``: the same clients (load.py's ``/ws`` client and its counting), watching the MQTT
  devices' patients; each device is one MQTT connection of its own (its own client id, as its own
  identity would be), publishing the same reading body with QoS 1 on
  ``<prefix>/devices/<id>/readings`` and reading vitalwire's ``ack`` on its ``acks`` topic. The
  devices are a minimal MQTT 3.1.1 client on asyncio's protocol layer (:class:`MqttDevice`):
  a publish is one ``write`` of a prebuilt packet, so a thousand devices at 1 Hz cost a Python
  process little, and the generator's own CPU over the load is reported beside the servers'.

Latency is the reading's device timestamp (taken just before the publish) to the client's
receipt, on one machine's clock; lost and doubled are counted per client and watched device as
in load.py. The broker is a Mosquitto the bench starts (:data:`BROKER_CONF`: howto-mqtt.md's
queue bound, no persistence), or the anonymous listener of one given (``--broker``); either way
anonymous, as the tests' brokers are: the broker's authentication is not what is measured. Its
CPU is reported when it runs on this machine.
"""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing as mp
import resource
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path
from typing import Any

import msgspec

from vitalwire.bench import load as ld
from vitalwire.bench.runner import _metrics, _pid_of, machine, percentiles, server_process
from vitalwire.transports.mqtt import (
    ACKS,
    READINGS,
    STATUS,
    parse_url,
    topic,
    utf8_string,
    varint,
)

#: the issue's bound for the MQTT path (device publish -> client socket)
P99_TARGET_MS = 15.0
#: seconds the devices wait, after their last reading, for vitalwire's ack of it
ACK_WAIT_S = 30.0
KEEPALIVE_S = 600  # no PINGREQ is sent: a device publishes far more often than this


# -------------------------------------------------------------------------------------------------
# a device as a minimal MQTT 3.1.1 client
# -------------------------------------------------------------------------------------------------


def _packet(first: int, body: bytes) -> bytes:
    return bytes([first]) + varint(len(body)) + body


_ack = msgspec.json.Decoder()


class MqttDevice(asyncio.Protocol):
    """One device: CONNECT (clean session, anonymous), SUBSCRIBE to its ``acks``, PUBLISH QoS 1
    on its ``readings``, PUBACK both ways. ``acked``: the highest seq vitalwire acknowledged;
    ``unconfirmed``: publishes the broker has not PUBACKed yet."""

    def __init__(self, prefix: str, device_id: str) -> None:
        self.device_id = device_id
        self.prefix = prefix
        self._readings = utf8_string(topic(prefix, device_id, READINGS))
        self.transport: asyncio.Transport | None = None
        self._buf = bytearray()
        self._pid = 0
        self._waiting: dict[int, asyncio.Future[int]] = {}  # 0: CONNACK; else SUBACK's id
        self.acked = 0
        self.unconfirmed = 0
        self.lost: BaseException | None = None

    # -- asyncio.Protocol --

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def connection_lost(self, exc: BaseException | None) -> None:
        self.lost = exc or ConnectionError("the broker closed the connection")
        for fut in self._waiting.values():
            if not fut.done():
                fut.set_exception(self.lost)

    def data_received(self, data: bytes) -> None:
        buf = self._buf
        buf += data
        while len(buf) >= 2:
            length, shift, i = 0, 0, 1
            while True:
                if i >= len(buf):
                    return
                length |= (buf[i] & 0x7F) << shift
                shift += 7
                i += 1
                if not buf[i - 1] & 0x80:
                    break
            end = i + length
            if len(buf) < end:
                return
            self._take(buf[0], bytes(buf[i:end]))
            del buf[:end]

    def _take(self, first: int, body: bytes) -> None:
        kind = first >> 4
        if kind == 4:  # PUBACK
            self.unconfirmed -= 1
        elif kind == 3:  # PUBLISH: vitalwire's ack on the acks topic
            n = int.from_bytes(body[:2], "big")
            pos = 2 + n
            if (first >> 1) & 3:
                assert self.transport is not None
                self.transport.write(b"\x40\x02" + body[pos : pos + 2])
                pos += 2
            with contextlib.suppress(msgspec.DecodeError):
                msg = _ack.decode(body[pos:])
                if isinstance(msg, dict) and msg.get("type") == "ack":
                    self.acked = max(self.acked, int(msg["seq"]))
        elif kind == 2:  # CONNACK
            self._resolve(0, body[1])
        elif kind == 9:  # SUBACK
            self._resolve(int.from_bytes(body[:2], "big"), body[2])

    def _resolve(self, key: int, code: int) -> None:
        fut = self._waiting.pop(key, None)
        if fut is not None and not fut.done():
            fut.set_result(code)

    def _next_id(self) -> int:
        self._pid = self._pid % 65535 + 1
        return self._pid

    async def _wait(self, key: int, what: str) -> None:
        fut = self._waiting[key] = asyncio.get_running_loop().create_future()
        code = await asyncio.wait_for(fut, 30)
        if code not in (0, 1):
            raise ConnectionError(f"device {self.device_id}: {what} refused (code {code})")

    # -- the device --

    @classmethod
    async def open(cls, host: str, port: int, prefix: str, device_id: str) -> MqttDevice:
        """Connected, subscribed to its acks, and ``online`` published (which opens its
        session in vitalwire, as a real device's presence does before its first reading)."""
        loop = asyncio.get_running_loop()
        dev = cls(prefix, device_id)
        await loop.create_connection(lambda: dev, host, port)
        assert dev.transport is not None
        connect = (
            utf8_string("MQTT")
            + bytes([4, 0x02])  # MQTT 3.1.1, clean session
            + KEEPALIVE_S.to_bytes(2, "big")
            + utf8_string(f"{prefix}-{device_id}")
        )
        dev.transport.write(_packet(0x10, connect))
        await dev._wait(0, "CONNECT")
        pid = dev._next_id()
        sub = pid.to_bytes(2, "big") + utf8_string(topic(prefix, device_id, ACKS)) + b"\x01"
        dev.transport.write(_packet(0x82, sub))
        await dev._wait(pid, "SUBSCRIBE")
        dev._publish(utf8_string(topic(prefix, device_id, STATUS)), b"online")
        return dev

    def _publish(self, topic_field: bytes, payload: bytes) -> None:
        if self.lost is not None:
            raise ConnectionError(f"device {self.device_id}: connection lost ({self.lost!r})")
        assert self.transport is not None
        body = topic_field + self._next_id().to_bytes(2, "big") + payload
        self.unconfirmed += 1
        self.transport.write(_packet(0x32, body))

    async def send(self, seq: int, ts: float, sent_index: int) -> None:
        """load.py's sender interface: the same body as its ``/ws/device`` sender's."""
        self._publish(
            self._readings,
            f'{{"type":"reading","seq":{seq},"ts":{ts},"spo2":97,"hr":72}}'.encode(),
        )

    async def close(self) -> None:
        if self.transport is not None and self.lost is None:
            self.transport.write(b"\xe0\x00")  # DISCONNECT
            self.transport.close()


# -------------------------------------------------------------------------------------------------
# the MQTT path's worker processes
# -------------------------------------------------------------------------------------------------


def run_mqtt_worker(
    target: ld.Target,
    broker: str,
    prefix: str,
    shape: ld.Shape,
    devices: list[int],
    clients: list[int],
    connected: Any,
    go: Any,
    out: Any,
) -> None:
    """One worker process of the MQTT path (as load.run_worker is for the others)."""
    result, extra = asyncio.run(
        _mqtt_worker(target, broker, prefix, shape, devices, clients, connected, go)
    )
    usage = resource.getrusage(resource.RUSAGE_SELF)
    result.cpu_s = usage.ru_utime + usage.ru_stime
    out.put(
        asdict(result)
        | extra
        | {
            "received": list(result.received.items()),
            "timeline": [[k, *v] for k, v in sorted(result.timeline.items())],
            "stalls": list(result.stalls.items()),
        }
    )


def _cpu_now() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def _mqtt_worker(
    target: ld.Target,
    broker: str,
    prefix: str,
    shape: ld.Shape,
    devices: list[int],
    clients: list[int],
    connected: Any,
    go: Any,
) -> tuple[ld.WorkerResult, dict[str, Any]]:
    res = ld.WorkerResult()
    stop_clients = asyncio.Event()
    t0 = time.perf_counter()
    ready = [asyncio.Event() for _ in clients]
    client_tasks = [
        asyncio.create_task(ld._client(target, shape, c, res, ev, stop_clients))  # noqa: SLF001
        for c, ev in zip(clients, ready, strict=True)
    ]
    await asyncio.wait_for(asyncio.gather(*(e.wait() for e in ready)), 120)
    conn = parse_url(broker)
    senders: list[MqttDevice] = []
    for d in devices:
        did = target.devices[d][0]
        senders.append(await MqttDevice.open(conn["hostname"], conn["port"], prefix, did))
    res.connect_s = time.perf_counter() - t0
    connected.put("connected")
    res.start_at = await asyncio.to_thread(go.get, True, ld.connect_timeout(shape))
    await asyncio.sleep(max(0.0, res.start_at - time.time()))
    cpu0 = _cpu_now()
    sampler = asyncio.create_task(ld._sample_stalls(res))  # noqa: SLF001
    await asyncio.gather(
        *(
            ld._send_loop(target, shape, d, s, res)  # noqa: SLF001
            for d, s in zip(devices, senders, strict=True)
        )
    )
    load_cpu_s = _cpu_now() - cpu0
    # every device's last reading acknowledged (durable in vitalwire), then the clients' share
    deadline = time.monotonic() + ACK_WAIT_S
    while time.monotonic() < deadline and any(
        s.acked < res.sent.get(d, 0) and s.lost is None
        for d, s in zip(devices, senders, strict=True)
    ):
        await asyncio.sleep(0.05)
    await asyncio.sleep(2.0)  # as load.py: the last deliveries to the clients
    sampler.cancel()
    stop_clients.set()
    unacked = sum(
        max(0, res.sent.get(d, 0) - s.acked) for d, s in zip(devices, senders, strict=True)
    )
    unconfirmed = sum(s.unconfirmed for s in senders)
    for s in senders:
        if s.lost is not None:
            res.errors.append(f"device {s.device_id}: {s.lost!r}")
        with contextlib.suppress(Exception):
            await s.close()
    for t in client_tasks:
        t.cancel()
    await asyncio.gather(*client_tasks, return_exceptions=True)
    extra = {"unacked": unacked, "unconfirmed": unconfirmed, "load_cpu_s": load_cpu_s}
    return res, extra


def _device_sessions(url: str, want: int, timeout: float) -> None:
    """Wait until vitalwire has ``want`` device sessions (the MQTT devices' ``online``; 0: the
    devices of the path before have gone, and vitalwire has raised their ``device_offline``
    alerts, which come ``offline_grace_s`` after they left: a ward's worth of alerts raised in
    the next path's first seconds would be measured as that path's)."""
    import httpx

    deadline = time.monotonic() + timeout
    n = pending = -1
    while time.monotonic() < deadline:
        m = httpx.get(url + "/metrics.json", timeout=30).json()
        n, pending = int(m["device_connections"]), int(m["offline_pending"])
        if n == want and (want or pending == 0):
            return
        time.sleep(0.1)
    raise RuntimeError(
        f"vitalwire had {n} device sessions, not {want}, and {pending} devices waiting to be "
        f"marked offline, after {timeout:.0f} s"
    )


def run_mqtt_load(
    target: ld.Target,
    broker: str,
    prefix: str,
    shape: ld.Shape,
    server: int,
    broker_pid: int | None,
) -> dict[str, Any]:
    """The MQTT path's row: load.run_load's figures, plus the broker's CPU, the generator's CPU
    over the load alone, and what vitalwire had not acknowledged to the devices at the end."""
    workers = max(1, shape.workers)
    dev_parts = [list(range(shape.devices))[i::workers] for i in range(workers)]
    cli_parts = [list(range(shape.clients))[i::workers] for i in range(workers)]
    srv, brk = ld.PidProbe(server), (ld.PidProbe(broker_pid) if broker_pid else None)
    ctx = mp.get_context("spawn")
    out, connected = ctx.Queue(), ctx.Queue()
    gos = [ctx.Queue() for _ in range(workers)]
    procs = [
        ctx.Process(
            target=run_mqtt_worker,
            args=(target, broker, prefix, shape, dev_parts[i], cli_parts[i], connected, gos[i])
            + (out,),
        )
        for i in range(workers)
    ]
    _device_sessions(target.url, 0, 60.0)  # the WebSocket path's devices are gone
    for p in procs:
        p.start()
    try:
        ld._python_connected(  # noqa: SLF001
            procs, connected, time.monotonic() + ld.connect_timeout(shape)
        )
        _device_sessions(target.url, shape.devices, 60.0)
        start_at = time.time() + ld.START_MARGIN_S
        for q in gos:
            q.put(start_at)
        time.sleep(max(0.0, start_at - time.time()))
        cpu0, bcpu0, t0 = srv.cpu_s(), (brk.cpu_s() if brk else 0.0), time.monotonic()
        results = [out.get(timeout=shape.duration_s + 300) for _ in procs]
        cpu1, bcpu1, wall = srv.cpu_s(), (brk.cpu_s() if brk else 0.0), time.monotonic() - t0
        for p in procs:
            p.join(30)
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join(5)
    row = _summary(results, shape)
    gen_load = sum(r["load_cpu_s"] for r in results)
    return row | {
        "target": "mqtt qos1",
        "load_started_at": start_at,
        "server_cpu_pct": 100 * (cpu1 - cpu0) / wall,
        "server_rss_mb": ld.proc_rss_kb(server) / 1024,
        "broker_cpu_pct": 100 * (bcpu1 - bcpu0) / wall if brk else None,
        "generator_load_cpu_pct": 100 * gen_load / shape.duration_s,
        "unacked_at_end": sum(r["unacked"] for r in results),
        "unconfirmed_at_end": sum(r["unconfirmed"] for r in results),
    }


def _summary(results: list[dict[str, Any]], shape: ld.Shape) -> dict[str, Any]:
    """The workers' counts and latencies as load.run_load sums them."""
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
    return {
        "generator": "python",
        "shape": asdict(shape),
        "published": published,
        "published_per_s": published / shape.duration_s,
        "delivered": delivered,
        "delivered_per_s": delivered / shape.duration_s,
        "lost": expected - delivered,
        "duplicated": dups,
        "latency_ms": percentiles(latencies),
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
        "generator_cpu_s": sum(r["cpu_s"] for r in results),
        "connect_s": max(r["connect_s"] for r in results),
        "errors": errors[:10],
    }


# -------------------------------------------------------------------------------------------------
# the run: one server, the WebSocket path, then the MQTT path
# -------------------------------------------------------------------------------------------------


#: The bench's own broker: howto-mqtt.md's settings (a queue for vitalwire's session far past
#: Mosquitto's default of 1000, which a second's stall of a ward's bridge overflows; no Nagle
#: delay on its sockets), no files.
BROKER_CONF = """listener {port} 127.0.0.1
allow_anonymous true
persistence false
max_queued_messages 100000
set_tcp_nodelay true
user {user}
"""


@contextlib.contextmanager
def own_broker(folder: Path) -> Iterator[tuple[str, int]]:
    """A Mosquitto of the bench's own on a free port: its URL and process id."""
    import getpass
    import shutil
    import socket
    import subprocess

    exe = shutil.which("mosquitto")
    if exe is None:
        raise RuntimeError("the mosquitto program is missing: install it, or give --broker")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = int(probe.getsockname()[1])
    conf = folder / "mosquitto.conf"
    conf.write_text(BROKER_CONF.format(port=port, user=getpass.getuser()))
    with open(folder / "mosquitto.log", "wb") as log:
        proc = subprocess.Popen([exe, "-c", str(conf)], stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 10
        while True:
            if proc.poll() is not None:
                why = (folder / "mosquitto.log").read_text(errors="replace")[-500:]
                raise RuntimeError(f"mosquitto exited at start: {why}")
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 1):
                break
            if time.monotonic() > deadline:
                raise RuntimeError("mosquitto did not start in 10 s")
            time.sleep(0.05)
        yield f"mqtt://127.0.0.1:{port}", proc.pid
    finally:
        proc.terminate()
        proc.wait(10)


async def bench_mqtt(
    shape: ld.Shape, broker: str | None = None, paths: tuple[str, ...] = ("ws", "mqtt")
) -> dict[str, Any]:
    """Both paths on one server in one run; returns ``rows`` (one per path) and the verdict.
    ``broker``: an anonymous listener to use (None: a Mosquitto of the bench's own)."""
    with tempfile.TemporaryDirectory() as tmp:
        if broker is not None:
            local = parse_url(broker)["hostname"] in ("127.0.0.1", "localhost")
            return await _bench_mqtt(shape, broker, _pid_of("mosquitto") if local else None, paths)
        with own_broker(Path(tmp)) as (url, pid):
            r = await _bench_mqtt(shape, url, pid, paths)
            return r | {"broker_config": BROKER_CONF.split("\n")[1:5]}


async def _bench_mqtt(
    shape: ld.Shape, broker: str, broker_pid: int | None, paths: tuple[str, ...]
) -> dict[str, Any]:
    from vitalwire.sdk.monitor import login

    conn = parse_url(broker)
    if conn["username"] or conn["password"]:
        raise ValueError(
            "the bench's devices use the broker's anonymous listener: give mqtt://host:port"
        )
    if shape.generator != "python":
        raise ValueError("the MQTT path's devices are Python (bench/mqtt.py): generator python")
    prefix = "vwbench-" + uuid.uuid4().hex[:10]
    env = {
        "VITALWIRE_MQTT_URL": f"mqtt://{conn['hostname']}:{conn['port']}",
        "VITALWIRE_MQTT_TOPIC_PREFIX": prefix,
        "VITALWIRE_MQTT_CLIENT_ID": prefix + "-server",
        "VITALWIRE_MQTT_SESSION_EXPIRY_S": "0",  # nothing left queued in the broker after the run
    }
    d = shape.devices
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        async with server_process(Path(tmp), 2 * d, env=env) as srv:
            user = next(u for u in srv.creds.users if u.get("role") == "clinician")
            token = await login(srv.url, user["username"], user["password"])
            creds = [(x["device_id"], x["secret"], x["patient_id"]) for x in srv.creds.devices]
            for path in paths:
                devices = tuple(creds[:d] if path == "ws" else creds[d : 2 * d])
                target = ld.Target("vitalwire", srv.url, devices=devices, token=token)
                before = await _metrics(srv.url)
                if path == "ws":
                    row = await asyncio.to_thread(ld.run_load, target, shape, srv.proc.pid)
                    row["target"] = "ws"
                else:
                    row = await asyncio.to_thread(
                        run_mqtt_load, target, broker, prefix, shape, srv.proc.pid, broker_pid
                    )
                after = await _metrics(srv.url)
                row["store_rows_per_s"] = (after["rows_written"] - before["rows_written"]) / (
                    shape.duration_s
                )
                rows.append(row)
    mq = next((r for r in rows if r["target"] == "mqtt qos1"), None)
    return {
        "broker": broker,
        "broker_auth": "anonymous listener",
        "rows": rows,
        "target_p99_ms": P99_TARGET_MS,
        "met": None if mq is None else mq["latency_ms"]["p99"] <= P99_TARGET_MS and mq["lost"] == 0,
        "machine": machine(),
    }
