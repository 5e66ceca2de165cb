"""End to end over real sockets: device -> server -> store -> client."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
import websockets
from websockets.asyncio.client import ClientConnection, connect

from tests.conftest import RunningServer, start_server, stop_server, wait_until
from vitalwire import wire
from vitalwire.sdk import DeviceClient, MonitorClient


@asynccontextmanager
async def raw_device(srv: RunningServer, i: int = 0) -> AsyncIterator[ClientConnection]:
    did, secret, _ = srv.device(i)
    async with connect(srv.ws_url + "/ws/device", proxy=None, max_size=2**22) as ws:
        await ws.send(json.dumps({"type": "hello", "device_id": did, "secret": secret}))
        welcome = json.loads(await ws.recv())
        assert welcome["type"] == "welcome", welcome
        yield ws


async def recv_json(ws: ClientConnection, timeout: float = 5.0) -> dict[str, Any]:
    while True:
        msg: dict[str, Any] = json.loads(await asyncio.wait_for(ws.recv(), timeout))
        if msg["type"] != "ping":
            return msg


def reading(seq: int, **values: Any) -> str:
    return json.dumps({"type": "reading", "seq": seq, "ts": time.time(), **values})


async def monitor(srv: RunningServer, role: str = "clinician") -> MonitorClient:
    user, pw = srv.user(role)
    client = MonitorClient(srv.url, username=user, password=pw)
    await client.connect()
    return client


async def test_healthz_names_version_and_backends(server: RunningServer) -> None:
    async with httpx.AsyncClient(base_url=server.url) as http:
        r = await http.get("/healthz")
    assert r.status_code == 200
    assert r.json() == {"status": "ok", "version": "0.1.0", "db": "sqlite", "bus": "memory"}


async def test_reading_flows_from_device_to_subscribed_client(server: RunningServer) -> None:
    did, secret, pid = server.device(0)
    mon = await monitor(server)
    try:
        await mon.subscribe([f"patient:{pid}"])
        async with DeviceClient(server.url, did, secret) as dev:
            online = await mon.next_event()
            assert (online.kind, online.data["status"]) == ("device_status", "online")
            seqs = [
                dev.send(
                    spo2=96,
                    pulse=71,
                    hr=72,
                    rr=16,
                    temp_c=36.8,
                    sbp=121,
                    dbp=79,
                    pi=2.5,
                    battery=88,
                    probe=True,
                )
                for _ in range(3)
            ]
            everything = []
            while sum(e.kind == "reading" for e in everything) < 3:
                everything.append(await mon.next_event())
        got = [e for e in everything if e.kind == "reading"]
        assert {e.kind for e in everything} <= {"reading", "news2"}  # NEWS2 follows the vitals
        assert [e.data["seq"] for e in got] == seqs
        assert got[0].data | {"ts": 0} == {
            "device": did,
            "seq": seqs[0],
            "ts": 0,
            "spo2": 96.0,
            "pulse": 71.0,
            "hr": 72.0,
            "rr": 16.0,
            "temp_c": 36.8,
            "sbp": 121.0,
            "dbp": 79.0,
            "pi": 2.5,
            "battery": 88.0,
            "probe": True,
        }
        offsets = [e.offset for e in [online, *everything]]
        assert offsets == list(range(offsets[0], offsets[0] + len(offsets)))
    finally:
        await mon.close()


async def test_subscribe_reply_carries_snapshot_and_offset(server: RunningServer) -> None:
    did, secret, pid = server.device(1)
    async with DeviceClient(server.url, did, secret) as dev:
        dev.send(spo2=95, hr=80)
        dev.send(spo2=93, rr=18)
        await dev.flush()
        mon = await monitor(server, "viewer")
        try:
            starts = await mon.subscribe([f"patient:{pid}"])
        finally:
            await mon.close()
    start = starts[f"patient:{pid}"]
    head = server.services.streams.head(f"patient:{pid}")
    assert start.offset >= 3 and start.recovered
    vitals = {k: v["value"] for k, v in start.snapshot["vitals"].items()}
    assert vitals == {"spo2": 93.0, "hr": 80.0, "rr": 18.0}
    assert start.snapshot["devices"][did]["status"] == "online"
    assert head >= start.offset


BAD_FRAMES = [
    ("{oops", "invalid_message", None),
    ('{"type": "teleport"}', "invalid_message", "type"),
    ('{"type": "reading", "seq": "x", "ts": 1}', "invalid_message", "seq"),
    ('{"type": "reading", "seq": 5, "ts": 1, "heart": 60}', "invalid_message", "heart"),
    ('{"type": "hello", "device_id": "a", "secret": "b"}', "invalid_message", "type"),
    (reading(5, spo2=140), "invalid_reading", "spo2"),
    (reading(6, hr=-1), "invalid_reading", "hr"),
    (reading(7, temp_c=60), "invalid_reading", "temp_c"),
    (reading(8, sbp=100, dbp=120), "invalid_reading", "dbp"),
    (reading(0, spo2=90), "invalid_reading", "seq"),
    (json.dumps({"type": "reading", "seq": 9, "ts": 5.0, "spo2": 97}), "invalid_reading", "ts"),
]


@pytest.mark.parametrize(
    ("frame", "code", "field"),
    BAD_FRAMES,
    ids=[f"{i}-{code}-{field}" for i, (_, code, field) in enumerate(BAD_FRAMES)],  # no times
)
async def test_bad_frame_gets_error_and_connection_stays_usable(
    server: RunningServer, frame: str, code: str, field: str | None
) -> None:
    async with raw_device(server) as ws:
        await ws.send(reading(1, spo2=97))
        assert await recv_json(ws) == {"type": "ack", "seq": 1}
        await ws.send(frame)
        err = await recv_json(ws)
        assert (err["type"], err["code"], err.get("field")) == ("error", code, field)
        assert err["message"]
        await ws.send(reading(20, spo2=96))
        assert await recv_json(ws) == {"type": "ack", "seq": 20}
    rows = await server.services.store.events_after(f"patient:{server.device(0)[2]}", 0, 100)
    assert [e.data.get("seq") for e in rows if e.kind == "reading"] == [1, 20]


async def test_error_message_names_the_bound(server: RunningServer) -> None:
    async with raw_device(server) as ws:
        await ws.send(reading(1, spo2=140))
        err = await recv_json(ws)
    assert err == {
        "type": "error",
        "code": "invalid_reading",
        "message": "spo2 must be between 0 and 100, got 140",
        "field": "spo2",
        "seq": 1,
    }


async def test_one_bad_reading_in_a_batch_is_rejected_alone(server: RunningServer) -> None:
    now = time.time()
    items = [{"seq": s, "ts": now, "spo2": 97} for s in range(1, 6)]
    items[2]["spo2"] = 101
    async with raw_device(server) as ws:
        await ws.send(json.dumps({"type": "readings", "items": items}))
        err = await recv_json(ws)
        ack = await recv_json(ws)
    assert (err["code"], err["field"], err["seq"]) == ("invalid_reading", "spo2", 3)
    assert ack == {"type": "ack", "seq": 5}
    rows = await server.services.store.events_after(f"patient:{server.device(0)[2]}", 0, 100)
    assert [e.data["seq"] for e in rows if e.kind == "reading"] == [1, 2, 4, 5]


async def test_oversized_frame_is_rejected_alone(server: RunningServer) -> None:
    limit = server.services.settings.max_frame_bytes
    async with raw_device(server) as ws:
        await ws.send(
            json.dumps({"type": "reading", "seq": 1, "ts": time.time(), "x": "a" * limit})
        )
        err = await recv_json(ws)
        assert (err["code"], err["field"]) == ("frame_too_large", "frame")
        assert f"at most {limit} bytes" in err["message"]
        await ws.send(reading(2, spo2=97))
        assert await recv_json(ws) == {"type": "ack", "seq": 2}


async def test_frame_past_the_hard_limit_closes_with_1009(server: RunningServer) -> None:
    hard = server.services.settings.hard_frame_bytes
    async with raw_device(server) as ws:
        await ws.send("x" * (hard + 1))
        with pytest.raises(websockets.ConnectionClosed) as closed:
            await recv_json(ws)
    assert closed.value.rcvd is not None and closed.value.rcvd.code == 1009


async def test_too_many_readings_in_one_frame(server: RunningServer) -> None:
    n = server.services.settings.max_batch + 1
    items = [{"seq": s, "ts": time.time(), "hr": 70} for s in range(1, n + 1)]
    async with raw_device(server) as ws:
        await ws.send(json.dumps({"type": "readings", "items": items}))
        err = await recv_json(ws)
    assert (err["code"], err["field"]) == ("invalid_message", "items")
    assert f"at most {n - 1} readings, got {n}" in err["message"]


async def test_duplicate_seq_is_dropped_and_acked(server: RunningServer) -> None:
    """A true resend (same seq, same reading) is acked; another reading under a used seq is
    refused with ``conflicting_seq`` naming the seq and the high seq, not acked, counted."""
    sent = {seq: reading(seq, hr=70 + seq) for seq in (1, 2, 3)}
    async with raw_device(server) as ws:
        for frame in sent.values():
            await ws.send(frame)
        acks = [await recv_json(ws)]
        while acks[-1]["seq"] < 3:  # cumulative, and at most one per ack_min_interval_ms
            acks.append(await recv_json(ws))
        assert acks[-1] == {"type": "ack", "seq": 3} and all(a["type"] == "ack" for a in acks)
        await ws.send(sent[2])
        assert await recv_json(ws) == {"type": "ack", "seq": 3}
        await ws.send(reading(2, hr=99))
        err = await recv_json(ws)
        assert (err["type"], err["code"], err["field"], err["seq"]) == (
            "error",
            "conflicting_seq",
            "seq",
            2,
        )
        assert "seq 2 is at or below this device's high seq 3" in err["message"]
        assert "number new readings after 3" in err["message"]
        await ws.send(reading(4, hr=74))
        assert await recv_json(ws) == {"type": "ack", "seq": 4}  # nothing else came between
    assert server.services.ingest.conflicting_seqs == 1
    async with httpx.AsyncClient(base_url=server.url) as http:
        metrics = (await http.get("/metrics.json")).json()
    assert metrics["conflicting_seqs"] == 1
    rows = await server.services.store.events_after(f"patient:{server.device(0)[2]}", 0, 100)
    readings = [e.data for e in rows if e.kind == "reading"]
    assert [(r["seq"], r["hr"]) for r in readings] == [(1, 71.0), (2, 72.0), (3, 73.0), (4, 74.0)]


async def test_many_readings_are_written_in_few_transactions(server: RunningServer) -> None:
    store = server.services.store
    did, secret, pid = server.device(0)
    async with DeviceClient(server.url, did, secret, max_batch=500) as dev:
        await dev.flush()
        before = store.transactions
        for i in range(2000):
            dev.send(hr=60 + i % 40, ts=time.time())
        await dev.flush(timeout=30)
    used = store.transactions - before
    assert dev.acked == 2000
    assert 1 <= used <= 12, f"2000 readings took {used} transactions"
    assert await store.device_last_seq(did) == 2000


async def test_concurrent_devices_share_transactions(server: RunningServer) -> None:
    store = server.services.store
    clients = [DeviceClient(server.url, *server.device(i)[:2]) for i in range(3)]
    for c in clients:
        await c.start()
    try:
        before = store.transactions
        for _ in range(100):
            for c in clients:
                c.send(spo2=97, ts=time.time())
        await asyncio.gather(*(c.flush(timeout=30) for c in clients))
        used = store.transactions - before
    finally:
        for c in clients:
            await c.close()
    assert used < 300 / 10, f"300 readings took {used} transactions"


async def test_wrong_device_secret_is_refused(server: RunningServer) -> None:
    did, _, _ = server.device(0)
    async with connect(server.ws_url + "/ws/device", proxy=None) as ws:
        await ws.send(json.dumps({"type": "hello", "device_id": did, "secret": "nope"}))
        err = json.loads(await ws.recv())
        with pytest.raises(websockets.ConnectionClosed) as closed:
            await ws.recv()
    assert (err["code"], err["field"]) == ("unauthenticated", "secret")
    assert closed.value.rcvd is not None and closed.value.rcvd.code == 4001


async def test_first_device_message_must_be_hello(server: RunningServer) -> None:
    async with connect(server.ws_url + "/ws/device", proxy=None) as ws:
        await ws.send(reading(1, hr=70))
        err = json.loads(await ws.recv())
        with pytest.raises(websockets.ConnectionClosed) as closed:
            await ws.recv()
    assert err["code"] == "invalid_message"
    assert closed.value.rcvd is not None and closed.value.rcvd.code == 4001


async def test_device_disconnect_is_a_status_event(server: RunningServer) -> None:
    did, secret, pid = server.device(2)
    mon = await monitor(server)
    try:
        await mon.subscribe([f"patient:{pid}"])
        dev = DeviceClient(server.url, did, secret)
        await dev.start()
        assert (await mon.next_event()).data["status"] == "online"
        await dev.close()
        offline = await mon.next_event()
    finally:
        await mon.close()
    assert (offline.kind, offline.data["device"], offline.data["status"]) == (
        "device_status",
        did,
        "offline",
    )


async def test_transfer_moves_the_stream_not_the_history(server: RunningServer) -> None:
    did, secret, p1 = server.device(0)
    _, _, p2 = server.device(1)
    store = server.services.store
    async with DeviceClient(server.url, did, secret) as dev:
        dev.send(hr=70)
        await dev.flush()
        await server.services.registry.bind(did, p2)
        dev.send(hr=90)
        await dev.flush()
    h1 = [e.data for e in await store.events_after(f"patient:{p1}", 0, 100) if e.kind == "reading"]
    h2 = [e.data for e in await store.events_after(f"patient:{p2}", 0, 100) if e.kind == "reading"]
    assert [r["hr"] for r in h1] == [70.0]
    assert [r["hr"] for r in h2] == [90.0]


async def test_two_clients_receive_identical_frames(server: RunningServer) -> None:
    did, secret, pid = server.device(0)
    user, pw = server.user()
    async with httpx.AsyncClient(base_url=server.url) as http:
        login = await http.post("/auth/login", json={"username": user, "password": pw})
    token = login.json()["access_token"]
    frames: list[list[str]] = [[], []]
    async with (
        connect(server.ws_url + "/ws", proxy=None) as a,
        connect(server.ws_url + "/ws", proxy=None) as b,
    ):
        for ws in (a, b):
            await ws.send(json.dumps({"type": "auth", "token": token, "id": 1}))
            assert (await recv_json(ws))["ok"] is True
            await ws.send(json.dumps({"type": "subscribe", "streams": [f"patient:{pid}"], "id": 2}))
            assert (await recv_json(ws))["type"] == "subscribed"
        async with DeviceClient(server.url, did, secret) as dev:
            dev.send(spo2=97)
            await dev.flush()
            for ws, out in ((a, frames[0]), (b, frames[1])):
                while len(out) < 2:
                    raw = await asyncio.wait_for(ws.recv(), 5)
                    if '"type":"event"' in raw:
                        out.append(raw)
    assert frames[0] == frames[1]


async def test_login_and_token_checks(server: RunningServer) -> None:
    user, pw = server.user("clinician")
    async with httpx.AsyncClient(base_url=server.url) as http:
        bad = await http.post("/auth/login", json={"username": user, "password": "wrong-password"})
        assert bad.status_code == 401
        assert bad.json()["code"] == "unauthenticated"
        assert (await http.get("/patients")).status_code == 401
        ok = await http.post("/auth/login", json={"username": user, "password": pw})
        assert ok.status_code == 200 and ok.json()["role"] == "clinician"
        token = ok.json()["access_token"]
        patients = await http.get("/patients", headers={"Authorization": f"Bearer {token}"})
        assert [p["id"] for p in patients.json()] == ["P001", "P002", "P003"]
        assert patients.json()[0]["devices"] == ["mon-001"]


async def test_client_with_bad_token_is_closed_4001(server: RunningServer) -> None:
    async with connect(server.ws_url + "/ws", proxy=None) as ws:
        await ws.send(json.dumps({"type": "auth", "token": "not-a-jwt"}))
        err = json.loads(await ws.recv())
        with pytest.raises(websockets.ConnectionClosed) as closed:
            await ws.recv()
    assert (err["code"], err["field"]) == ("unauthenticated", "token")
    assert closed.value.rcvd is not None and closed.value.rcvd.code == 4001


async def test_client_errors_keep_the_connection(server: RunningServer) -> None:
    mon = await monitor(server)
    try:
        bad = await mon.request(wire.Subscribe(streams=["weather"]))
        assert (bad.code, bad.field) == ("invalid_message", "streams")
        ok = await mon.subscribe(["alerts"])
        assert ok["alerts"].recovered
    finally:
        await mon.close()


async def test_auth_timeout_closes_4002(tmp_path: Path) -> None:
    srv, task = await start_server(tmp_path, patients=1, auth_timeout_s=0.2)
    try:
        for path in ("/ws", "/ws/device"):
            async with connect(srv.ws_url + path, proxy=None) as ws:
                err = json.loads(await asyncio.wait_for(ws.recv(), 5))
                with pytest.raises(websockets.ConnectionClosed) as closed:
                    await asyncio.wait_for(ws.recv(), 5)
            assert (err["type"], err["code"]) == ("error", "auth_timeout")
            assert closed.value.rcvd is not None and closed.value.rcvd.code == 4002
    finally:
        await stop_server(srv, task)


async def test_resume_replays_from_bus_history_then_store(tmp_path: Path) -> None:
    srv, task = await start_server(tmp_path, patients=1, bus_history=5)
    try:
        did, secret, pid = srv.device(0)
        stream = f"patient:{pid}"
        async with DeviceClient(srv.url, did, secret) as dev:
            for i in range(20):
                dev.send(hr=60 + i)
            await dev.flush()
        await wait_until(lambda: did not in srv.services.ingest.sessions, 5, "device offline")
        await srv.services.writer.flush()  # the offline status event
        head = srv.services.streams.head(stream)
        for since in (head - 3, 2):  # in the bus history, then only in the store
            mon = await monitor(srv)
            try:
                start = (await mon.subscribe([stream], since={stream: since}))[stream]
                got = [await mon.next_event() for _ in range(head - since)]
            finally:
                await mon.close()
            assert start.recovered and start.replayed == head - since
            assert [e.offset for e in got] == list(range(since + 1, head + 1))
    finally:
        await stop_server(srv, task)


async def test_wait_until_reports_what_it_waited_for() -> None:
    with pytest.raises(AssertionError, match="timed out after 0.01s waiting for never"):
        await wait_until(lambda: False, 0.01, "never")


@pytest.mark.parametrize("enabled", [False, True])
async def test_permessage_deflate_is_accepted_only_when_configured(
    tmp_path: Path, enabled: bool
) -> None:
    """``ws_compression`` off (the default): a client offering deflate is served uncompressed,
    and everything still works; on: the extension is negotiated."""
    srv, task = await start_server(tmp_path, patients=1, ws_compression=enabled)
    try:
        async with connect(srv.ws_url + "/ws", compression="deflate") as ws:
            ext = ws.response.headers.get("Sec-WebSocket-Extensions", "")
            assert ("permessage-deflate" in ext) is enabled, ext
            await ws.send(json.dumps({"type": "ping", "id": 7}))  # before auth: refused
            reply = json.loads(await asyncio.wait_for(ws.recv(), 5))
            assert reply["type"] == "error" and "auth" in reply["message"], reply
    finally:
        await stop_server(srv, task)


async def test_a_fast_device_gets_one_cumulative_ack_per_interval_and_the_last_at_shutdown(
    tmp_path: Path,
) -> None:
    srv, task = await start_server(tmp_path, patients=1, ack_min_interval_ms=1000)
    stopped = False
    try:
        async with raw_device(srv) as ws:
            await ws.send(reading(1))
            assert await recv_json(ws) == {"type": "ack", "seq": 1}  # after a quiet interval
            for seq in range(2, 51):
                await ws.send(reading(seq))
            # all committed long before the interval ends: one ack covers them all
            assert await recv_json(ws, timeout=10) == {"type": "ack", "seq": 50}
            await ws.send(reading(51))
            await wait_until(lambda: srv.services.ingest._durable[srv.device(0)[0]] == 51, 5)
            srv.server.should_exit = True  # graceful shutdown sends the deferred ack first
            assert await recv_json(ws, timeout=10) == {"type": "ack", "seq": 51}
            with pytest.raises(websockets.ConnectionClosed) as closed:
                await recv_json(ws, timeout=10)
            assert closed.value.rcvd is not None and closed.value.rcvd.code == 1001
        await asyncio.wait_for(task, 20)
        stopped = True
    finally:
        if not stopped:
            await stop_server(srv, task)
