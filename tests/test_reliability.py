"""Nothing lost, nothing doubled: crashes, network loss, resume, slow clients, shutdown.

Each test names the guarantee it proves; each would fail if that guarantee were removed.
"""

from __future__ import annotations

import asyncio
import json
import random
import signal
import sqlite3
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from websockets.asyncio.client import ClientConnection, connect

from tests.conftest import (
    RunningServer,
    ServerProcess,
    free_port,
    login_token,
    provision_db,
    start_server,
    stop_server,
    wait_until,
)
from tests.netproxy import Proxy
from tests.rawws import StalledClient
from vitalwire.bus import open_bus
from vitalwire.sdk import DeviceClient, MonitorClient, StreamEvent
from vitalwire.services.container import prune
from vitalwire.services.streams import Streams
from vitalwire.services.writer import BatchWriter
from vitalwire.store import ReadingRow, open_store
from vitalwire.wire import Event


def store_rows(db_path: Path) -> tuple[dict[str, list[int]], dict[str, list[int]], list[Any]]:
    """Read the store with plain sqlite3: the seqs of each device's stored reading events (in
    order; a reading stored twice shows twice), offsets per stream, reading events. Each
    device's high seq (the deduplication key) must be its last stored seq."""
    db = sqlite3.connect(db_path)
    try:
        offsets: dict[str, list[int]] = {}
        for stream, off in db.execute('SELECT stream, "offset" FROM events ORDER BY 1, 2'):
            offsets.setdefault(stream, []).append(off)
        readings = [
            json.loads(d) for (d,) in db.execute("SELECT data FROM events WHERE kind='reading'")
        ]
        seqs: dict[str, list[int]] = {}
        for r in readings:
            seqs.setdefault(r["device"], []).append(r["seq"])
        for got in seqs.values():
            got.sort()
        high = dict(db.execute("SELECT device_id, high_seq FROM device_seqs"))
        assert high == {did: got[-1] for did, got in seqs.items()}, high
        return seqs, offsets, readings
    finally:
        db.close()


async def collect(monitor: MonitorClient, into: list[StreamEvent]) -> None:
    async for e in monitor.events():
        into.append(e)


async def produce(dev: DeviceClient, total: int, stop_at: asyncio.Event | None = None) -> None:
    """Measure at about 400 Hz until ``total`` readings, whatever the connection does."""
    while dev.seq < total:
        dev.send(hr=60 + dev.seq % 50, spo2=90 + dev.seq % 10)
        await asyncio.sleep(0.0025)


def assert_exactly_once(seqs: dict[str, list[int]], devices: list[str], total: int) -> None:
    for did in devices:
        assert seqs.get(did) == list(range(1, total + 1)), f"{did}: store seqs not 1..{total}"


def assert_contiguous(offsets: dict[str, list[int]]) -> None:
    for stream, offs in offsets.items():
        assert offs == list(range(1, len(offs) + 1)), f"{stream}: offsets have gaps or repeats"


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM], ids=["kill-9", "sigterm"])
async def test_server_crash_or_stop_loses_and_doubles_nothing(tmp_path: Path, sig: int) -> None:
    db_path = tmp_path / "crash.db"
    db_url = f"sqlite:///{db_path}"
    creds = await provision_db(db_url, patients=3)
    proc = ServerProcess(db_url, free_port(), tmp_path, batch_max_wait_ms="2")
    total = 600
    devices = [
        DeviceClient(proc.url, d["device_id"], d["secret"], backoff_max_s=0.3)
        for d in creds.devices
    ]
    streams = [f"patient:{d['patient_id']}" for d in creds.devices]
    seen: list[StreamEvent] = []
    await proc.start()
    try:
        monitor = MonitorClient(
            proc.url, username="clinician", password="vitalwire-clinician", backoff_max_s=0.3
        )
        await monitor.connect()
        await monitor.subscribe(streams)
        reader = asyncio.create_task(collect(monitor, seen))
        for d in devices:
            await d.start()
        producers = [asyncio.create_task(produce(d, total)) for d in devices]
        await wait_until(lambda: all(d.acked >= 150 for d in devices), 30, "150 acks each")
        acked_before = {d.device_id: d.acked for d in devices}
        code = await proc.signal(sig)
        assert code != 0 if sig == signal.SIGKILL else code in (0, -signal.SIGTERM)
        # acknowledged means durable: everything acked before the stop is in the store
        seqs, _, _ = store_rows(db_path)
        for did, acked in acked_before.items():
            assert seqs[did][:acked] == list(range(1, acked + 1))
        if sig == signal.SIGTERM:  # graceful: sockets were closed with going-away
            assert all(1001 in d.close_codes for d in devices)
        await proc.start()  # same file, same port: devices and the monitor come back by themselves
        await asyncio.gather(*producers)
        await asyncio.gather(*(d.flush(timeout=60) for d in devices))
        await wait_until(
            lambda: sum(e.kind == "reading" for e in seen) >= 3 * total, 60, "monitor catch-up"
        )
        reader.cancel()
        await monitor.close()
    finally:
        for d in devices:
            await d.close()
        proc.stop()
    seqs, offsets, readings = store_rows(db_path)
    assert_exactly_once(seqs, [d.device_id for d in devices], total)
    assert_contiguous(offsets)
    keys = [(r["device"], r["seq"]) for r in readings]
    assert len(keys) == len(set(keys)) == 3 * total
    got = [(e.data["device"], e.data["seq"]) for e in seen if e.kind == "reading"]
    assert sorted(got) == sorted(keys), "monitor must see every reading exactly once"
    per_stream: dict[str, list[int]] = {}
    for e in seen:
        per_stream.setdefault(e.stream, []).append(e.offset)
    for offs in per_stream.values():
        assert offs == sorted(set(offs))
    assert monitor.reconnects >= 1


async def test_device_network_loss_resends_everything_in_order(server: RunningServer) -> None:
    proxy = Proxy("127.0.0.1", int(server.url.rsplit(":", 1)[1]))
    await proxy.start()
    did, secret, pid = server.device(0)
    dev = DeviceClient(f"http://127.0.0.1:{proxy.port}", did, secret, backoff_max_s=0.2)
    try:
        await dev.start()
        for _ in range(50):
            dev.send(hr=70)
        await dev.flush()
        proxy.cut()  # the network is gone; the device keeps measuring
        measured_offline = 0
        deadline = time.monotonic() + 1.5
        while time.monotonic() < deadline:
            dev.send(hr=80)
            measured_offline += 1
            await asyncio.sleep(0.01)
        assert not dev.connected and dev.unacked == measured_offline
        proxy.restore()
        for _ in range(50):
            dev.send(hr=90)
        await dev.flush(timeout=20)
    finally:
        await dev.close()
        await proxy.close()
    total = 100 + measured_offline
    events = await server.services.store.events_after(f"patient:{pid}", 0, 10_000)
    seqs = [e.data["seq"] for e in events if e.kind == "reading"]
    assert seqs == list(range(1, total + 1))
    assert dev.connections >= 2


async def _raw_client(srv: RunningServer, token: str) -> ClientConnection:
    ws = await connect(srv.ws_url + "/ws", proxy=None, max_size=2**24)
    await ws.send(json.dumps({"type": "auth", "token": token, "id": 1}))
    assert json.loads(await ws.recv())["ok"] is True
    return ws


async def test_resume_during_a_live_stream_has_no_gap_and_no_duplicate(tmp_path: Path) -> None:
    # bus history of 5 forces most replays to the store (a real await while events keep coming)
    srv, task = await start_server(tmp_path, patients=1, bus_history=5, batch_max_wait_ms=1)
    did, secret, pid = srv.device(0)
    stream = f"patient:{pid}"
    rng = random.Random(7)
    dev = DeviceClient(srv.url, did, secret, max_batch=20)
    received: list[int] = []
    try:
        token = await login_token(srv, "clinician")  # one login: each reconnect reuses it
        await dev.start()
        producer = asyncio.create_task(produce(dev, 10**9))
        await wait_until(lambda: dev.acked > 20, 10, "stream running")
        since = 3
        for _ in range(40):
            ws = await _raw_client(srv, token)
            try:
                await ws.send(
                    json.dumps(
                        {
                            "type": "subscribe",
                            "streams": [stream],
                            "since": {stream: since},
                            "id": 2,
                        }
                    )
                )
                reply = json.loads(await ws.recv())
                while reply["type"] != "subscribed":
                    reply = json.loads(await ws.recv())
                assert reply["streams"][0]["recovered"] is True
                want = rng.randint(1, 60)
                got = 0
                while got < want:
                    msg = json.loads(await asyncio.wait_for(ws.recv(), 10))
                    if msg["type"] == "event":
                        received.append(msg["offset"])
                        got += 1
            finally:
                ws.transport.abort()  # drop, do not close politely
            since = received[-1]
        producer.cancel()
    finally:
        await dev.close()
        await stop_server(srv, task)
    assert received == list(range(4, 4 + len(received)))


async def test_since_older_than_retention_is_not_recovered(tmp_path: Path) -> None:
    # a bus history of 2 cannot cover the gap either (it would, and rightly, recover from it)
    srv, task = await start_server(tmp_path, patients=1, retention_days=1e-9, bus_history=2)
    try:
        did, secret, pid = srv.device(0)
        stream = f"patient:{pid}"
        async with DeviceClient(srv.url, did, secret) as dev:
            for _ in range(10):
                dev.send(spo2=95)
            await dev.flush()
        await wait_until(lambda: did not in srv.services.ingest.sessions, 5, "device gone")
        await srv.services.writer.flush()
        head = srv.services.streams.head(stream)
        assert await prune(srv.services) > 0
        # only the stream's last event stays: it keeps the head, so offsets keep growing
        assert await srv.services.store.first_offset(stream) == head
        user, pw = srv.user()
        async with MonitorClient(srv.url, username=user, password=pw) as mon:
            old = (await mon.subscribe([stream], since={stream: 2}))[stream]
            head = srv.services.streams.head(stream)
            now = (await mon.subscribe([stream], since={stream: head}))[stream]
        assert old.recovered is False and old.replayed == 0
        assert old.snapshot["vitals"]["spo2"]["value"] == 95.0  # reload from the snapshot
        assert now.recovered is True
    finally:
        await stop_server(srv, task)


async def test_resume_past_max_replay_is_not_recovered(tmp_path: Path) -> None:
    srv, task = await start_server(tmp_path, patients=1, max_replay=5)
    try:
        did, secret, pid = srv.device(0)
        stream = f"patient:{pid}"
        async with DeviceClient(srv.url, did, secret) as dev:
            for _ in range(10):
                dev.send(spo2=95)
            await dev.flush()
        user, pw = srv.user()
        async with MonitorClient(srv.url, username=user, password=pw) as mon:
            head = srv.services.streams.head(stream)
            far = (await mon.subscribe([stream], since={stream: head - 6}))[stream]
            near = (await mon.subscribe([stream], since={stream: head - 5}))[stream]
        assert (far.recovered, near.recovered, near.replayed) == (False, True, 5)
    finally:
        await stop_server(srv, task)


async def test_stalled_client_is_closed_4008_and_others_keep_up(tmp_path: Path) -> None:
    srv, task = await start_server(
        tmp_path, patients=1, client_queue_soft=2000, client_queue_max=2000
    )
    did, secret, pid = srv.device(0)
    stream = f"patient:{pid}"
    user, pw = srv.user()
    total = 20_000
    try:
        async with httpx.AsyncClient(base_url=srv.url) as http:
            r = await http.post("/auth/login", json={"username": user, "password": pw})
        stalled = StalledClient(srv.ws_url + "/ws")
        await stalled.connect()
        stalled.send({"type": "auth", "token": r.json()["access_token"]})
        stalled.send({"type": "subscribe", "streams": [stream]})
        await wait_until(
            lambda: (
                len(srv.services.clients) == 1
                and next(iter(srv.services.clients)).subscriptions == [stream]
            ),
            5,
            "sub",
        )
        slow = next(iter(srv.services.clients))

        async def wake_when_dropped() -> int | None:
            """Once the server gives up on it, read again: in-flight events, then the close."""
            await wait_until(lambda: slow.overflowed, 60, "overflow")
            return await stalled.read_until_closed()

        woken = asyncio.create_task(wake_when_dropped())
        async with MonitorClient(srv.url, username=user, password=pw) as fast:
            await fast.subscribe([stream])
            peak = 0
            async with DeviceClient(srv.url, did, secret, buffer_size=total) as dev:
                for _ in range(total // 100):  # about 10,000 readings/s
                    for _ in range(100):
                        dev.send(hr=75)
                    peak = max(peak, slow.queued)
                    await asyncio.sleep(0.01)
                got = 0
                while got < total:  # the fast client gets every reading while the slow one is stuck
                    e = await fast.next_event(timeout=20)
                    got += e.kind == "reading"
                    peak = max(peak, slow.queued)
                await dev.flush(timeout=30)
            assert fast.close_codes == [] and fast.reconnects == 0
        assert slow.overflowed, "the stalled client should have overflowed its queue"
        assert peak <= 2000
        assert slow.queued == 0  # its queue was released at once
        assert await woken == 4008
        stalled.abort()
    finally:
        await stop_server(srv, task)


async def test_silent_device_gets_offline_then_online_gap_markers(tmp_path: Path) -> None:
    srv, task = await start_server(tmp_path, patients=1, device_max_silence_s=1)
    did, secret, pid = srv.device(0)
    user, pw = srv.user()
    try:
        async with MonitorClient(srv.url, username=user, password=pw) as mon:
            await mon.subscribe([f"patient:{pid}"])

            async def next_of(*kinds: str) -> StreamEvent:
                while True:
                    e = await mon.next_event(timeout=10)
                    if e.kind in kinds:
                        return e

            async with DeviceClient(srv.url, did, secret) as dev:
                dev.send(hr=70)
                first = [await next_of("device_status", "reading") for _ in range(2)]
                silent = await next_of("device_status", "reading")  # nothing sent for > 1.5 s
                dev.send(hr=71)
                back = await next_of("device_status", "reading")
                reading = await next_of("device_status", "reading")
        assert [(e.kind, e.data.get("status")) for e in first] == [
            ("device_status", "online"),
            ("reading", None),
        ]
        assert (silent.kind, silent.data["status"], silent.data["reason"]) == (
            "device_status",
            "offline",
            "silent",
        )
        assert (back.kind, back.data["status"], back.data["reason"]) == (
            "device_status",
            "online",
            "resumed",
        )
        assert reading.data["hr"] == 71.0
    finally:
        await stop_server(srv, task)


async def test_half_open_device_connection_is_detected_and_closed(tmp_path: Path) -> None:
    srv, task = await start_server(tmp_path, patients=1, heartbeat_s=0.3)
    did, secret, pid = srv.device(0)
    proxy = Proxy("127.0.0.1", int(srv.url.rsplit(":", 1)[1]))
    await proxy.start()
    user, pw = srv.user()
    try:
        async with MonitorClient(srv.url, username=user, password=pw) as mon:
            await mon.subscribe([f"patient:{pid}"])
            dev = DeviceClient(f"http://127.0.0.1:{proxy.port}", did, secret, backoff_initial_s=30)
            await dev.start()
            assert (await mon.next_event()).data["status"] == "online"
            proxy.freeze()  # no bytes either way, no FIN, no RST: half-open
            offline = await mon.next_event(timeout=10)
            proxy.cut()  # else the device's own close waits out its close handshake's timeout
            await dev.close()
        assert (offline.data["status"], offline.data["reason"]) == ("offline", "heartbeat timeout")
        assert did not in srv.services.ingest.sessions
    finally:
        proxy.thaw()
        await proxy.close()
        await stop_server(srv, task)


async def test_sdk_spool_survives_a_device_restart(server: RunningServer, tmp_path: Path) -> None:
    did, secret, pid = server.device(0)
    spool = str(tmp_path / "spool.db")
    offline = DeviceClient(f"http://127.0.0.1:{free_port()}", did, secret, spool_path=spool)
    await offline.start(wait=False)  # nothing listens there: readings stay in the spool
    for i in range(30):
        offline.send(hr=60 + i)
    await offline.close()  # the device powers off
    rebooted = DeviceClient(server.url, did, secret, spool_path=spool)
    assert rebooted.unacked == 30
    async with rebooted:
        rebooted.send(hr=99)
        await rebooted.flush()
    events = await server.services.store.events_after(f"patient:{pid}", 0, 100)
    readings = [(e.data["seq"], e.data["hr"]) for e in events if e.kind == "reading"]
    assert readings == [(i + 1, 60.0 + i) for i in range(30)] + [(31, 99.0)]
    assert DeviceClient(server.url, did, secret, spool_path=spool).unacked == 0


@pytest.mark.parametrize("measured_offline", [2, 7])
async def test_device_restarted_without_spool_is_renumbered(
    server: RunningServer, measured_offline: int
) -> None:
    """Fewer or more new readings than the server has seen from the device's last life: none of
    them may be mistaken for a duplicate."""
    did, secret, pid = server.device(0)
    async with DeviceClient(server.url, did, secret) as first:
        for _ in range(5):
            first.send(hr=70)
        await first.flush()
    second = DeviceClient(server.url, did, secret)  # lost its memory: numbering restarts at 1
    for i in range(measured_offline):
        second.send(hr=80 + i)
    async with second:
        second.send(hr=99)
        await second.flush()
    events = await server.services.store.events_after(f"patient:{pid}", 0, 100)
    readings = [(e.data["seq"], e.data["hr"]) for e in events if e.kind == "reading"]
    expected_new = [80.0 + i for i in range(measured_offline)] + [99.0]
    assert readings == [(s, 70.0) for s in range(1, 6)] + [
        (6 + i, hr) for i, hr in enumerate(expected_new)
    ]


async def test_sdk_never_sends_a_frame_past_the_servers_limit(tmp_path: Path) -> None:
    srv, task = await start_server(tmp_path, patients=1, max_frame_bytes=1024)
    did, secret, pid = srv.device(0)
    try:
        async with DeviceClient(srv.url, did, secret, max_batch=200) as dev:
            await dev.wait_connected()
            for _ in range(200):
                dev.send(spo2=97, pulse=70, hr=70, rr=16, temp_c=36.9, pi=3.3, battery=80)
            await dev.flush()
        assert dev.errors == []
        events = await srv.services.store.events_after(f"patient:{pid}", 0, 1000)
        assert [e.data["seq"] for e in events if e.kind == "reading"] == list(range(1, 201))
    finally:
        await stop_server(srv, task)


def test_sdk_buffer_is_bounded_and_drops_the_oldest() -> None:
    dev = DeviceClient("http://127.0.0.1:9", "d", "s", buffer_size=10)
    for i in range(25):
        dev.send(hr=60 + i, ts=1_800_000_000.0 + i)
    assert (dev.unacked, dev.dropped) == (10, 15)
    assert [b.seq for b in dev._buffer] == list(range(16, 26))


async def test_restart_rebuilds_the_snapshot_beyond_recent_events(tmp_path: Path) -> None:
    """A vital measured once (blood pressure) stays in the snapshot after a restart, however
    many readings of other vitals followed it."""
    import vitalwire.services.streams as streams_mod

    srv, task = await start_server(tmp_path, patients=1)
    did, secret, pid = srv.device(0)
    stream = f"patient:{pid}"
    try:
        async with DeviceClient(srv.url, did, secret) as dev:
            dev.send(sbp=118, dbp=76)
            for _ in range(60):
                dev.send(spo2=96)
            await dev.flush()
        before = srv.services.streams.attach(stream, _Nobody())[1]
    finally:
        await stop_server(srv, task)  # saves snapshots on the way out
    old = streams_mod.STATE_WARMUP
    streams_mod.STATE_WARMUP = 20  # far fewer than the 60 readings after the blood pressure
    try:
        srv, task = await start_server(tmp_path, patients=1)
        try:
            after = srv.services.streams.attach(stream, _Nobody())[1]
        finally:
            await stop_server(srv, task)
    finally:
        streams_mod.STATE_WARMUP = old
    assert after["vitals"]["sbp"]["value"] == 118.0
    assert after["vitals"] == before["vitals"]


class _Nobody:
    def push(self, event: object) -> None:
        pass


def _unencodable() -> dict[str, Any]:
    """An event body msgspec cannot encode: nested past the interpreter's recursion limit (what a
    device's ``command_result.data`` did before it was bounded at decode time)."""
    body: dict[str, Any] = {}
    inner = body
    for _ in range(5000):
        inner["a"] = inner = {}
    return body


async def _stream_past_an_unencodable_event(tmp_path: Path) -> tuple[str, list[int]]:
    """Start a server on the store in ``tmp_path``; 10 readings with an event that cannot be
    encoded built in their middle; return the device and the offsets a subscriber saw."""
    srv, task = await start_server(tmp_path, patients=1)
    did, secret, pid = srv.device(0)
    stream = f"patient:{pid}"
    user, pw = srv.user()
    mon = MonitorClient(srv.url, username=user, password=pw)
    received: list[StreamEvent] = []
    try:
        await mon.connect()
        await mon.subscribe([stream], since={stream: 0})
        reader = asyncio.create_task(collect(mon, received))
        async with DeviceClient(srv.url, did, secret) as dev:
            for i in range(10):
                if i == 5:
                    with pytest.raises(RecursionError):
                        srv.services.streams.new_event(
                            stream, "command", srv.services.clock(), _unencodable()
                        )
                dev.send(hr=60 + i)
                await dev.flush()
        head = srv.services.streams.head(stream)
        await wait_until(lambda: received and received[-1].offset >= head, 10, "the stream")
        reader.cancel()
    finally:
        await mon.close()
        await stop_server(srv, task)
    return did, [e.offset for e in received]


async def test_an_event_that_cannot_be_encoded_leaves_no_gap_in_its_stream(tmp_path: Path) -> None:
    for run in range(2):  # the second is a restart on the same store
        did, seen = await _stream_past_an_unencodable_event(tmp_path)
        assert seen == list(range(1, len(seen) + 1)), f"run {run}: a client saw a gap"
        seqs, offsets, _ = store_rows(tmp_path / "vitalwire.db")
        assert_contiguous(offsets)
        assert len(seqs[did]) == 10 * (run + 1)


async def _build_and_abandon(db: str) -> list[int]:
    """Open the store; submit units of a reading and an alert change as ingest builds them, and
    build two more that are never submitted; return the offsets of the middle unit."""
    stream, alerts = "patient:P001", "alerts"
    store = open_store(db)
    await store.open()
    bus = open_bus("memory://")
    streams = Streams(store, bus)
    await streams.load()
    await bus.open(streams.on_events)
    writer = BatchWriter(store, bus, settle=streams.settle)
    writer.start()

    def unit(hr: float) -> tuple[list[ReadingRow], list[Event]]:
        data = {"device": "d", "seq": int(hr), "hr": hr}
        e = streams.new_event(stream, "reading", 1.0, data)
        a = streams.new_event(alerts, "alert", 1.0, {"alert_id": f"A{hr:g}", "state": "resolved"})
        return [ReadingRow("d", int(hr), "P001", e.offset, 1.0, 1.0)], [e, a]

    try:
        writer.submit(*unit(1))
        unit(2)  # built, then abandoned: an exception before it reached the writer
        rows, events = unit(3)
        unit(4)  # abandoned after another unit was built
        writer.submit(rows, events)
        assert rows[0].stream_offset == events[0].offset  # the reading's row follows it
        writer.submit(*unit(5))
        await writer.flush()
    finally:
        await writer.stop()
        await bus.close()
        await store.close()
    return [e.offset for e in events]


async def test_events_built_but_never_submitted_leave_no_gap(tmp_path: Path) -> None:
    """Whatever fails between building a unit's events and submitting them (here: nothing
    submits them), the offsets they took go to the next events submitted."""
    db = f"sqlite:///{tmp_path / 'gap.db'}"
    assert await _build_and_abandon(db) == [2, 2]
    assert await _build_and_abandon(db) == [5, 5]  # a restart: on from the store's heads
    _, offsets, _ = store_rows(tmp_path / "gap.db")
    assert offsets == {"patient:P001": [1, 2, 3, 4, 5, 6], "alerts": [1, 2, 3, 4, 5, 6]}
