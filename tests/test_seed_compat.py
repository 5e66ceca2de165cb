"""Seed compatibility on real sockets: a device sending the seed's flat message on /ws/device
(``hello.format: "seed"``) and a client watching a patient as flat frames (``subscribe.format``)."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Any

from websockets.asyncio.client import ClientConnection, connect

from tests.conftest import RunningServer, login_token, start_server, stop_server, wait_until
from vitalwire.core import events as ev
from vitalwire.sdk.device import DeviceClient
from vitalwire.services.auth import Principal
from vitalwire.services.clients import ClientSession
from vitalwire.services.container import Services
from vitalwire.wire import Close


async def recv(ws: ClientConnection, timeout: float = 10.0) -> dict[str, Any]:
    msg: dict[str, Any] = json.loads(await asyncio.wait_for(ws.recv(), timeout))
    return msg


async def stored_readings(svc: Services, pid: str, n: int) -> list[dict[str, Any]]:
    """The patient's stored reading events once there are ``n`` (fails after 10 s)."""

    async def _wait() -> list[dict[str, Any]]:
        while True:
            await svc.writer.flush()
            events = await svc.store.events_after(ev.patient_stream(pid), 0, 10_000)
            found = [e.data for e in events if e.kind == ev.READING]
            if len(found) >= n:
                return found
            await asyncio.sleep(0.01)

    return await asyncio.wait_for(_wait(), 10)


async def flat_device(srv: RunningServer) -> tuple[ClientConnection, str]:
    did, secret, pid = srv.device(0)
    ws = await connect(srv.ws_url + "/ws/device", proxy=None)
    await ws.send(
        json.dumps({"type": "hello", "device_id": did, "secret": secret, "format": "seed"})
    )
    welcome = await recv(ws)
    assert welcome["type"] == "welcome" and welcome["patient_id"] == pid
    return ws, pid


async def test_flat_device_readings_land_numbered_and_stamped_by_the_server(
    server: RunningServer,
) -> None:
    ws, pid = await flat_device(server)
    async with ws:
        before = time.time()
        await ws.send('{"oxygen_level": 98, "heart_rate": 72}')
        await ws.send('{"oxygen_level": 96.5, "heart_rate": 80}')
        got = await stored_readings(server.services, pid, 2)
        after = time.time()
    assert [(r["seq"], r["spo2"], r["hr"]) for r in got] == [(1, 98, 72), (2, 96.5, 80)]
    assert all(before <= r["ts"] <= after for r in got)
    assert all(set(r) == {"device", "seq", "ts", "spo2", "hr"} for r in got)


async def test_flat_device_bad_messages_are_refused_naming_the_field_and_it_stays(
    server: RunningServer,
) -> None:
    ws, pid = await flat_device(server)
    async with ws:
        await ws.send('{"oxygen_level": 140, "heart_rate": 72}')
        await ws.send('{"oxygen_level": 97}')
        await ws.send("not json")
        await ws.send('{"oxygen_level": 97, "heart_rate": 72, "seq": 4}')
        await ws.send('{"oxygen_level": 97, "heart_rate": -1}')
        errors = [await recv(ws) for _ in range(5)]
        await ws.send('{"oxygen_level": 95, "heart_rate": 70}')
        got = await stored_readings(server.services, pid, 1)
        assert ws.close_code is None  # the connection stayed up through every refusal
    assert [(e["type"], e["code"], e.get("field")) for e in errors] == [
        ("error", "invalid_reading", "oxygen_level"),
        ("error", "invalid_message", "heart_rate"),
        ("error", "invalid_message", None),
        ("error", "invalid_message", "seq"),
        ("error", "invalid_reading", "heart_rate"),
    ]
    assert errors[0]["message"] == "oxygen_level must be between 0 and 100, got 140"
    assert errors[4]["message"] == "heart_rate must be between 0 and 350, got -1"
    assert "seq" not in errors[0]  # a refused flat message consumes no seq
    # the refused ones cost nothing else: the next message is the device's first reading
    assert [(r["seq"], r["spo2"], r["hr"]) for r in got] == [(1, 95, 70)]


async def test_flat_device_receives_no_acks(server: RunningServer) -> None:
    ws, pid = await flat_device(server)
    async with ws:
        await ws.send('{"oxygen_level": 98, "heart_rate": 72}')
        await stored_readings(server.services, pid, 1)
        await server.services.writer.flush()
        # a refused message is answered; had an ack been queued before it, it would come first
        await ws.send('{"oxygen_level": 101, "heart_rate": 72}')
        reply = await recv(ws)
    assert reply["type"] == "error" and reply["field"] == "oxygen_level"


async def test_hello_with_an_unknown_format_is_refused(server: RunningServer) -> None:
    did, secret, _ = server.device(0)
    async with connect(server.ws_url + "/ws/device", proxy=None) as ws:
        await ws.send(
            json.dumps({"type": "hello", "device_id": did, "secret": secret, "format": "csv"})
        )
        err = await recv(ws)
        await asyncio.wait_for(ws.wait_closed(), 10)
    assert err["field"] == "format"
    assert err["message"] == "format must be one of: seed (or absent), got 'csv'"
    assert ws.close_code == Close.UNAUTHENTICATED


# -- the flat subscription --------------------------------------------------------------------


async def flat_client(srv: RunningServer, pid: str) -> ClientConnection:
    token = await login_token(srv, "clinician")
    ws = await connect(srv.ws_url + "/ws", proxy=None)
    await ws.send(json.dumps({"type": "auth", "token": token, "id": 1}))
    assert (await recv(ws))["type"] == "result"
    sub = {"type": "subscribe", "streams": [f"patient:{pid}"], "format": "seed", "id": 2}
    await ws.send(json.dumps(sub))
    reply = await recv(ws)
    assert reply["type"] == "subscribed" and reply["id"] == 2, reply
    return ws


async def test_flat_subscription_pushes_a_change_once_and_nothing_unchanged(
    server: RunningServer,
) -> None:
    did, secret, pid = server.device(0)
    ws = await flat_client(server, pid)
    async with ws, DeviceClient(server.ws_url, did, secret) as dev:
        assert await recv(ws) == {"oxygen_level": None, "heart_rate": None}  # nothing known yet
        dev.send(spo2=97, hr=72, rr=16)
        assert await recv(ws) == {"oxygen_level": 97, "heart_rate": 72}
        dev.send(spo2=97, hr=72, rr=18)  # neither value changed: nothing
        dev.send(spo2=97)  # nothing
        dev.send(rr=20)  # nothing
        dev.send(spo2=97, hr=75)
        assert await recv(ws) == {"oxygen_level": 97, "heart_rate": 75}
        dev.send(spo2=94.5)
        assert await recv(ws) == {"oxygen_level": 94.5, "heart_rate": 75}
        await dev.flush()
        # every reading was committed; a frame for an unchanged one would be here by now
        await server.services.writer.flush()
        dev.send(spo2=93, hr=75)
        assert await recv(ws) == {"oxygen_level": 93, "heart_rate": 75}


async def test_a_reconnecting_flat_client_gets_the_current_values_at_once(
    server: RunningServer,
) -> None:
    did, secret, pid = server.device(0)
    async with DeviceClient(server.ws_url, did, secret) as dev:
        dev.send(spo2=96, hr=88)
        await dev.flush()
    ws = await flat_client(server, pid)
    async with ws:
        assert await recv(ws) == {"oxygen_level": 96, "heart_rate": 88}


async def test_flat_subscription_refusals_name_the_field(server: RunningServer) -> None:
    _, _, pid = server.device(0)
    _, _, other = server.device(1)
    stream = f"patient:{pid}"
    ws = await flat_client(server, pid)
    async with ws:
        assert (await recv(ws))["oxygen_level"] is None
        bad = [
            {"streams": [stream], "format": "xml"},
            {"streams": [stream], "format": "seed", "since": {stream: 1}},
            {"streams": [stream, f"patient:{other}"], "format": "seed"},
            {"streams": ["alerts"], "format": "seed"},
            {"streams": [stream], "format": "seed", "batch": True},
            {"streams": [f"patient:{other}"], "format": "seed"},  # needs its own connection
            {"streams": [f"patient:{other}"]},  # nor can a normal one join it
        ]
        fields = []
        for i, msg in enumerate(bad, start=10):
            await ws.send(json.dumps({"type": "subscribe", "id": i, **msg}))
            err = await recv(ws)
            assert err["type"] == "error" and err["id"] == i, err
            fields.append(err["field"])
    assert fields == ["format", "since", "streams", "streams", "batch", "format", "format"]


async def test_a_silent_flat_client_gets_no_pings_and_is_not_closed(tmp_path: Path) -> None:
    srv, task = await start_server(tmp_path, heartbeat_s=0.2)
    did, secret, pid = srv.device(0)
    try:
        flat = await flat_client(srv, pid)
        async with flat:
            assert await recv(flat) == {"oxygen_level": None, "heart_rate": None}
            # a normal client opened after it, silent too, is closed for its silence (4004):
            # by then the flat client has been silent for longer
            token = await login_token(srv, "clinician")
            async with connect(srv.ws_url + "/ws", proxy=None) as normal:
                await normal.send(json.dumps({"type": "auth", "token": token}))
                await asyncio.wait_for(normal.wait_closed(), 10)
            assert normal.close_code == Close.HEARTBEAT_TIMEOUT
            assert flat.close_code is None
            async with DeviceClient(srv.ws_url, did, secret) as dev:
                dev.send(spo2=97, hr=72)
                assert await recv(flat) == {"oxygen_level": 97, "heart_rate": 72}  # no ping first
    finally:
        await stop_server(srv, task)


async def test_a_flat_client_that_does_not_read_holds_one_frame_the_latest(
    server: RunningServer,
) -> None:
    """A session nobody drains (a client not reading) on the server's real streams."""
    did, secret, pid = server.device(0)
    svc = server.services
    session = ClientSession(Principal("admin", "admin"), svc.streams)
    session.subscribe_flat([f"patient:{pid}"], None, 1, False, "seed")
    try:
        async with DeviceClient(server.ws_url, did, secret) as dev:
            for hr in range(60, 160):
                dev.send(spo2=97, hr=hr)
            await dev.flush()
        assert session.flat is not None
        view = session.flat
        await wait_until(lambda: view.values == {"spo2": 97, "hr": 159}, 10, "the last reading")
        frames = session.take_now()
    finally:
        session.close()
    assert json.loads(frames[0])["type"] == "subscribed"
    assert frames[1:] == ['{"oxygen_level":97,"heart_rate":159}']
