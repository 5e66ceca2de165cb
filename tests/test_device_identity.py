"""A device's identity, seqs and clock under hostile conditions, through real servers.

Two units with one identity (a cloned device, a replaced unit still running): the displaced one
stops and reports, the server raises ``device_identity_conflict`` and audits it, and an old
client that comes back anyway is refused for a cool-down. A reading under a seq already used by
another reading is refused (``conflicting_seq``), never acknowledged. Readings replayed from a
spool after an outage are stored and shown but raise no live alarm; future-dated ones are
refused.
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import websockets
from websockets.asyncio.client import ClientConnection, connect

from tests.conftest import RunningServer, start_server, stop_server, wait_until
from tests.netproxy import Proxy
from vitalwire.sdk import DeviceClient
from vitalwire.sdk.device import IdentityConflict
from vitalwire.wire import Close

CONFLICT = "device_identity_conflict"


class ManualClock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture
async def srv(tmp_path: Path) -> AsyncIterator[RunningServer]:
    running, task = await start_server(tmp_path, patients=1)
    try:
        yield running
    finally:
        await stop_server(running, task)


async def stream_events(srv: RunningServer, pid: str) -> list[Any]:
    await srv.services.writer.flush()
    return await srv.services.store.events_after(f"patient:{pid}", 0, 100_000)


async def conflict_alerts(srv: RunningServer, pid: str) -> list[dict[str, Any]]:
    events = await stream_events(srv, pid)
    return [e.data for e in events if e.kind == "alert" and e.data["condition"] == CONFLICT]


@asynccontextmanager
async def raw_device(srv: RunningServer) -> AsyncIterator[ClientConnection]:
    did, secret, _ = srv.device(0)
    async with connect(srv.ws_url + "/ws/device", proxy=None) as ws:
        await ws.send(json.dumps({"type": "hello", "device_id": did, "secret": secret}))
        welcome = json.loads(await ws.recv())
        assert welcome["type"] == "welcome", welcome
        yield ws


async def recv_json(ws: ClientConnection, timeout: float = 5.0) -> dict[str, Any]:
    while True:
        msg: dict[str, Any] = json.loads(await asyncio.wait_for(ws.recv(), timeout))
        if msg["type"] != "ping":
            return msg


def reading(seq: int, ts: float | None = None, **values: Any) -> str:
    return json.dumps(
        {"type": "reading", "seq": seq, "ts": time.time() if ts is None else ts, **values}
    )


# -- two units, one identity -------------------------------------------------------------------


async def test_the_displaced_unit_stops_keeps_its_readings_and_the_server_alerts_once(
    srv: RunningServer, tmp_path: Path
) -> None:
    did, secret, pid = srv.device(0)
    first = DeviceClient(srv.url, did, secret, spool_path=str(tmp_path / "first.db"))
    second = DeviceClient(srv.url, did, secret, spool_path=str(tmp_path / "second.db"))
    sent: dict[str, list[float]] = {"first": [], "second": []}
    try:
        await first.start()
        for i in range(20):
            first.send(hr=40 + i)
            sent["first"].append(40.0 + i)
        await first.flush()
        await second.start()  # the clone: the first is displaced (4009)
        assert first._task is not None
        await asyncio.wait_for(asyncio.shield(first._task), 10)  # it stops: no reconnect
        assert isinstance(first.failure, IdentityConflict)
        assert first.close_codes[-1] == Close.REPLACED and first.connections == 1
        for i in range(5):  # measured after it stopped: kept, never reported as delivered
            first.send(hr=70 + i)
            sent["first"].append(70.0 + i)
        with pytest.raises(IdentityConflict, match="another unit uses it"):
            await first.flush(timeout=5)
        assert first.unacked == 5
        for i in range(20):
            second.send(hr=100 + i)
            sent["second"].append(100.0 + i)
        await second.flush()
        await wait_until(
            lambda: any(a.condition == CONFLICT for a in srv.services.alerts.engine(pid).active()),
            what="the identity conflict alert",
        )
    finally:
        await first.close()
        await second.close()
    assert second.connections == 1 and second.failure is None  # never displaced in turn
    alerts = await conflict_alerts(srv, pid)
    assert [(a["action"], a["priority"], a["category"], a["device"]) for a in alerts] == [
        ("raised", "medium", "technical", did)
    ]
    audit = [r for r in await srv.services.store.audit_log(100) if r["action"] == CONFLICT]
    assert len(audit) == 1 and audit[0]["actor"] == did and audit[0]["patient_id"] == pid
    detail = json.loads(audit[0]["detail"])
    assert detail["displaced"] and detail["current"] and detail["displaced"] != detail["current"]
    assert audit[0]["origin"] == f"{detail['displaced']}, {detail['current']}"
    # nothing lost without a trace: every reading is stored or still in its unit's spool
    stored = [e.data["hr"] for e in await stream_events(srv, pid) if e.kind == "reading"]
    spooled = [
        b.hr
        for b in DeviceClient(srv.url, did, secret, spool_path=str(tmp_path / "first.db"))._buffer
    ]
    assert spooled == [70.0 + i for i in range(5)]
    assert sorted(stored + spooled) == sorted(sent["first"] + sent["second"])
    # and no interleaving: once the second unit is on, every reading is its own
    assert stored == sent["first"][:20] + sent["second"]


async def test_an_old_client_that_comes_back_is_refused_for_a_cooldown(srv: RunningServer) -> None:
    """Clients that reconnect at once after 4009 would take turns forever: after
    ``identity_conflict_max`` conflicts new sessions of the identity are refused (4010) and the
    one connected keeps the identity; the alert stays active."""
    ingest = srv.services.ingest
    ingest.identity_conflict_max = 2
    ingest.identity_cooldown_s = 600
    did, _, pid = srv.device(0)
    async with raw_device(srv) as a:
        async with raw_device(srv) as b:  # a is displaced and answers the close
            with pytest.raises(websockets.ConnectionClosed):
                await recv_json(a)
            assert a.close_code == Close.REPLACED
            await wait_until(lambda: ingest.identity_conflicts == 1, what="first conflict")
            async with raw_device(srv) as a2:  # a comes back at once: b is displaced
                with pytest.raises(websockets.ConnectionClosed):
                    await recv_json(b)
                await wait_until(lambda: ingest.identity_conflicts == 2, what="second conflict")
                for _ in range(2):  # whichever unit tries now is refused
                    d, secret, _ = srv.device(0)
                    async with connect(srv.ws_url + "/ws/device", proxy=None) as c:
                        await c.send(
                            json.dumps({"type": "hello", "device_id": d, "secret": secret})
                        )
                        err = await recv_json(c)
                        with pytest.raises(websockets.ConnectionClosed):
                            await recv_json(c)
                    assert c.close_code == Close.IDENTITY_CONFLICT
                    assert (err["code"], err["field"]) == ("conflict", "device_id")
                    assert "used by two units" in err["message"]
                await a2.send(reading(1, hr=70))  # the session in place goes on
                assert await recv_json(a2) == {"type": "ack", "seq": 1}
    assert [a.condition for a in srv.services.alerts.engine(pid).active()] == [CONFLICT]
    await srv.services.writer.flush()
    assert [a["action"] for a in await conflict_alerts(srv, pid)] == ["raised"]
    audit = [r for r in await srv.services.store.audit_log(100) if r["action"] == CONFLICT]
    assert [json.loads(r["detail"]).get("cooldown_s") for r in audit] == [600, None]


async def test_replacing_a_dead_connection_is_not_an_identity_conflict(
    srv: RunningServer,
) -> None:
    """A device that reconnects while its old connection is half-open (a network blip: the old
    socket never answers the close) is not a second unit: no alert, no audit. A live second
    unit afterwards is."""
    did, secret, pid = srv.device(0)
    port = int(srv.url.rsplit(":", 1)[1])
    proxy = Proxy("127.0.0.1", port)
    await proxy.start()
    hello = json.dumps({"type": "hello", "device_id": did, "secret": secret})
    try:
        async with connect(f"ws://127.0.0.1:{proxy.port}/ws/device", proxy=None) as old:
            await old.send(hello)
            assert json.loads(await old.recv())["type"] == "welcome"
            proxy.freeze()  # half-open: no bytes either way, no FIN, no RST
            async with raw_device(srv) as again, raw_device(srv) as clone:  # a blip, a clone
                proxy.cut()  # the dead connection finally goes
                proxy.thaw()
                with pytest.raises(websockets.ConnectionClosed):
                    await recv_json(again)
                connections = srv.server.server_state.connections
                await wait_until(lambda: len(connections) == 1, what="only the clone left")
                await clone.send(reading(1, hr=70))  # a round trip: the old handler has ended
                assert await recv_json(clone) == {"type": "ack", "seq": 1}
    finally:
        await proxy.close()
    await srv.services.writer.flush()
    audit = [r for r in await srv.services.store.audit_log(100) if r["action"] == CONFLICT]
    assert len(audit) == 1 and srv.services.ingest.identity_conflicts == 1
    assert [a["action"] for a in await conflict_alerts(srv, pid)] == ["raised"]


# -- seqs already used -------------------------------------------------------------------------


def lock_store(tmp_path: Path) -> sqlite3.Connection:
    """Take SQLite's write lock from another connection (ROLLBACK releases it): the server's
    commits wait and retry meanwhile, so readings stay in flight, taken but not durable."""
    db = sqlite3.connect(tmp_path / "vitalwire.db", isolation_level=None)
    db.execute("BEGIN IMMEDIATE")
    return db


async def test_readings_in_flight_from_a_replaced_session_are_not_acked_to_the_next(
    srv: RunningServer, tmp_path: Path
) -> None:
    """Another unit connecting while the first one's readings are still being written must not
    get their ack: it would take it for its own readings under those seqs."""
    did, _, pid = srv.device(0)
    async with raw_device(srv) as first:
        lock = lock_store(tmp_path)
        for seq in range(1, 6):
            await first.send(reading(seq, hr=60 + seq))
        await wait_until(lambda: srv.services.ingest._high[did] == 5, what="taken")
        async with raw_device(srv) as second:  # welcome: last_seq 0, high_seq 5
            with pytest.raises(websockets.ConnectionClosed):
                await recv_json(first)
            lock.execute("ROLLBACK")
            lock.close()
            await wait_until(lambda: srv.services.ingest._durable[did] == 5, what="durable")
            await second.send(reading(3, hr=99))  # its own reading under a seq the first used
            err = await recv_json(second)
            assert (err["code"], err["seq"]) == ("conflicting_seq", 3), err
            await second.send(reading(6, hr=98))
            assert await recv_json(second) == {"type": "ack", "seq": 6}  # the first ack it gets
    events = await stream_events(srv, pid)
    assert [e.data["hr"] for e in events if e.kind == "reading"] == [61, 62, 63, 64, 65, 98]


async def test_the_sdk_does_not_resend_a_conflicting_seq_and_reports_it(
    srv: RunningServer, tmp_path: Path
) -> None:
    """A unit whose numbering overlaps readings still in flight from another: its readings
    under those seqs are refused once each, kept aside (never acked, never resent), and it
    goes on with new seqs."""
    did, secret, pid = srv.device(0)
    spool = str(tmp_path / "unit.db")
    unit = DeviceClient(srv.url, did, secret, spool_path=spool)
    for i in range(3):
        unit.send(hr=90 + i)  # seqs 1-3, numbering kept in its spool
    await unit.close()
    seen: list[str] = []
    async with raw_device(srv) as first:
        lock = lock_store(tmp_path)
        for seq in range(1, 4):
            await first.send(reading(seq, hr=60 + seq))
        await wait_until(lambda: srv.services.ingest._high[did] == 3, what="taken")
        unit = DeviceClient(srv.url, did, secret, spool_path=spool)
        unit.on_error = lambda err: seen.append(err.code)
        await unit.start()
        await wait_until(lambda: len(unit.conflicted) == 3, what="three conflicts")
        lock.execute("ROLLBACK")
        lock.close()
        unit.send(hr=80)
        await unit.flush()
        await unit.close()
    assert seen == ["conflicting_seq"] * 3 and [e.seq for e in unit.errors] == [1, 2, 3]
    assert [b.hr for b in unit.conflicted] == [90, 91, 92] and unit.acked == 4
    assert srv.services.ingest.conflicting_seqs == 3  # each refused once: no resend loop
    events = await stream_events(srv, pid)
    assert [(e.data["seq"], e.data["hr"]) for e in events if e.kind == "reading"] == [
        (1, 61),
        (2, 62),
        (3, 63),
        (4, 80),
    ]


# -- late and future readings ------------------------------------------------------------------


async def test_a_spool_replayed_after_an_outage_raises_no_live_alarm(
    srv: RunningServer, tmp_path: Path
) -> None:
    """Readings measured during an outage reach the stream (the trend) marked late, and raise
    nothing; the same value measured now raises its alarm."""
    did, secret, pid = srv.device(0)
    spool = str(tmp_path / "spool.db")
    offline = DeviceClient(srv.url, did, secret, spool_path=spool)
    outage = time.time() - 600
    for i in range(30):  # ten minutes ago, at 1 Hz: an SpO2 past the critical limit
        offline.send(spo2=80, pulse=70, ts=outage + i)
    await offline.close()
    async with DeviceClient(srv.url, did, secret, spool_path=spool) as dev:
        await dev.flush()
        await srv.services.writer.flush()
        assert srv.services.alerts.engine(pid).active() == []
        dev.send(spo2=80, pulse=70)  # now
        await dev.flush()
    events = await stream_events(srv, pid)
    readings = [e.data for e in events if e.kind == "reading"]
    assert [r.get("late", False) for r in readings] == [True] * 30 + [False]
    assert [r["ts"] for r in readings[:30]] == [outage + i for i in range(30)]
    raised = [e.data for e in events if e.kind == "alert" and e.data["action"] == "raised"]
    assert [(a["condition"], a["value"]) for a in raised] == [("spo2_low", 80)]
    assert raised[0]["at"] >= readings[-1]["ts"] - 5  # raised by the current reading


@pytest.mark.parametrize(("ahead_s", "refused"), [(3600, True), (60, True), (2, False)])
async def test_a_future_dated_reading_is_refused(
    srv: RunningServer, ahead_s: float, refused: bool
) -> None:
    did, _, pid = srv.device(0)
    async with raw_device(srv) as ws:
        await ws.send(reading(1, ts=time.time() + ahead_s, spo2=80))
        reply = await recv_json(ws)
    if refused:
        assert (reply["code"], reply["field"], reply["seq"]) == ("invalid_reading", "ts", 1)
        assert "(server time + 5 s)" in reply["message"]
    else:
        assert reply == {"type": "ack", "seq": 1}
    await srv.services.writer.flush()
    alerts = [a.condition for a in srv.services.alerts.engine(pid).active()]
    assert alerts == ([] if refused else ["spo2_low"])


async def test_a_device_whose_clock_is_behind_is_flagged_not_silently_unalarmed(
    tmp_path: Path,
) -> None:
    """Every reading of a device whose clock runs two minutes behind is late: none of its
    values alarms, and after late_only_delay_s (60 s) a technical alert says so."""
    clock = ManualClock(1_800_000_000.0)
    srv, task = await start_server(tmp_path, patients=1, clock=clock)
    did, secret, pid = srv.device(0)
    try:
        async with DeviceClient(srv.url, did, secret, clock=lambda: clock.now - 120) as dev:
            for _ in range(62):
                dev.send(spo2=80, pulse=70)
                await dev.flush()
                srv.services.alerts.tick()
                clock.now += 1
        await srv.services.writer.flush()
        active = srv.services.alerts.engine(pid).active()
        assert [(a.condition, a.priority, a.device) for a in active] == [
            ("device_clock_behind", "medium", did)
        ]
    finally:
        await stop_server(srv, task)
