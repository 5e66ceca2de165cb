"""Alerts through the real server: recorded ICU data, acknowledgement, limits, NEWS2, escalation.

The server runs on a clock the test drives (time is injected), so a recording of 8 minutes
replays in about a second while every delay, clear time and escalation runs in patient time.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx
import pytest
from pydantic import ValidationError

from tests.conftest import RunningServer, need_data, start_server, stop_server, wait_until
from vitalwire import wire
from vitalwire.sdk import DeviceClient, MonitorClient
from vitalwire.services import alerts as alerts_service
from vitalwire.settings import Settings
from vitalwire.simulator import read_bidmc

START = 1_800_000_000.0


class ManualClock:
    def __init__(self, now: float = START) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


async def _replay(srv: RunningServer, clock: ManualClock, path: Path) -> list[dict[str, Any]]:
    """Send each row at its own time, one second of patient time per row; return alert changes."""
    did, secret, pid = srv.device(0)
    async with DeviceClient(srv.url, did, secret, clock=clock) as dev:
        for row in read_bidmc(path):
            clock.now = START + row["t"]
            srv.services.alerts.tick()
            dev.send({k: v for k, v in row.items() if k != "t"}, ts=clock.now)
            await dev.flush()
    await srv.services.writer.flush()
    events = await srv.services.store.events_after(f"patient:{pid}", 0, 100_000)
    return [e.data for e in events if e.kind == "alert"]


#: The replays send a row and wait for its ack before the clock moves on: the server's default
#: ack coalescing (at most one ack per device per 20 ms) would pace them at 20 ms a row.
PROMPT_ACKS: dict[str, Any] = {"batch_max_wait_ms": 0, "ack_min_interval_ms": 0}


@pytest.fixture
async def clocked(tmp_path: Path) -> Any:
    clock = ManualClock()
    srv, task = await start_server(tmp_path, patients=2, clock=clock, **PROMPT_ACKS)
    try:
        yield srv, clock
    finally:
        await stop_server(srv, task)


def raised(changes: list[dict[str, Any]]) -> list[tuple[str, str]]:
    return [(c["condition"], c["priority"]) for c in changes if c["action"] == "raised"]


async def test_bidmc_32_raises_a_high_priority_low_spo2_alert_at_once(clocked: Any) -> None:
    srv, clock = clocked
    changes = await _replay(srv, clock, need_data() / "bidmc_32_Numerics.csv")
    first = next(c for c in changes if c["condition"] == "spo2_low")
    assert (first["action"], first["priority"], first["at"]) == ("raised", "high", START)


async def test_bidmc_22_raises_no_spo2_alert_with_the_default_delay(clocked: Any) -> None:
    srv, clock = clocked
    changes = await _replay(srv, clock, need_data() / "bidmc_22_Numerics.csv")
    assert not [c for c in raised(changes) if c[0] == "spo2_low"]


async def test_bidmc_25_raises_a_medium_high_pulse_alert_and_no_high_one(clocked: Any) -> None:
    srv, clock = clocked
    changes = await _replay(srv, clock, need_data() / "bidmc_25_Numerics.csv")
    found = raised(changes)
    assert ("pulse_high", "medium") in found or ("hr_high", "medium") in found
    assert all(p != "high" for _, p in found), found


async def test_bidmc_19_gaps_raise_a_technical_alert_not_a_desaturation(clocked: Any) -> None:
    srv, clock = clocked
    changes = await _replay(srv, clock, need_data() / "bidmc_19_Numerics.csv")
    found = raised(changes)
    assert ("probe_off", "medium") in [(c, p) for c, p in found]
    assert all(c != "spo2_low" for c, _ in found)
    probe = next(c for c in changes if c["condition"] == "probe_off")
    assert probe["category"] == "technical"


async def _monitor(srv: RunningServer, role: str = "clinician") -> MonitorClient:
    user, pw = srv.user(role)
    mon = MonitorClient(srv.url, username=user, password=pw)
    await mon.connect()
    return mon


async def test_alert_lifecycle_over_the_client_socket(clocked: Any) -> None:
    """Raised at once (critical), in both streams and the snapshot; the viewer may not
    acknowledge; the clinician does (audited); it escalates when left alone; it latches."""
    srv, clock = clocked
    did, secret, pid = srv.device(0)
    nurse = await _monitor(srv)
    viewer = await _monitor(srv, "viewer")
    try:
        await nurse.subscribe(["alerts"])
        async with DeviceClient(srv.url, did, secret, clock=clock) as dev:
            dev.send(spo2=80, pulse=110, probe=True, pi=2.0)
            await dev.flush()
            alert = None
            while alert is None:
                e = await nurse.next_event()
                if e.kind == "alert" and e.data["condition"] == "spo2_low":
                    alert = e.data
            assert (alert["action"], alert["priority"], alert["state"]) == (
                "raised",
                "high",
                "active",
            )
            start = (await viewer.subscribe([f"patient:{pid}"]))[f"patient:{pid}"]
            assert start.snapshot["alerts"][0]["alert_id"] == alert["alert_id"]

            clock.now += 61  # unacknowledged for longer than the high-priority escalation time
            srv.services.alerts.tick()
            escalated = None
            while escalated is None:
                e = await nurse.next_event()
                if e.kind == "alert" and e.data["action"] == "escalated":
                    escalated = e.data
            assert escalated["escalation_level"] == 1

            denied = await viewer.request(wire.AckAlert(alert_id=alert["alert_id"]))
            assert isinstance(denied, wire.Error) and denied.code == "forbidden"

            clock.now += 1
            dev.send(spo2=97, pulse=80, probe=True, pi=2.0)  # the condition ends ...
            await dev.flush()
            for _ in range(10):
                clock.now += 1
                srv.services.alerts.tick()
            await srv.services.writer.flush()
            open_ids = [
                a["alert_id"]
                for a in srv.services.streams.attach(f"patient:{pid}", _Nobody())[1]["alerts"]
            ]
            assert alert["alert_id"] in open_ids  # ... but a high-priority alert latches

            ok = await nurse.request(wire.AckAlert(alert_id=alert["alert_id"]))
            assert isinstance(ok, wire.Result), ok
            states = [c["state"] for c in ok.data["changes"]]
            assert states[-1] == "resolved" and ok.data["changes"][-1]["by"] == "clinician"
    finally:
        await nurse.close()
        await viewer.close()
    (entry,) = [a for a in await srv.services.store.audit_log(50) if a["action"] == "ack_alert"]
    assert entry["actor"] == "clinician" and entry["origin"]
    history = await srv.services.store.alerts_for(pid, 10)
    row = next(r for r in history if r["alert_id"] == alert["alert_id"])
    assert (row["state"], row["acknowledged_by"], row["escalation_level"]) == (
        "resolved",
        "clinician",
        1,
    )


async def test_limit_override_is_validated_audited_and_applied(clocked: Any) -> None:
    srv, clock = clocked
    did, secret, pid = srv.device(0)
    nurse = await _monitor(srv)
    try:
        bad = await nurse.request(wire.SetLimits(patient_id=pid, limits={"spo2": {"low": 120}}))
        assert isinstance(bad, wire.Error) and bad.field == "limits.spo2.low"
        ok = await nurse.request(wire.SetLimits(patient_id=pid, limits={"hr": {"high": 100}}))
        assert isinstance(ok, wire.Result) and ok.data["limits"]["hr"]["high"] == 100
        shown = await nurse.request(wire.GetLimits(patient_id=pid))
        assert shown.data["limits"]["hr"]["high"] == 100
        async with DeviceClient(srv.url, did, secret, clock=clock) as dev:
            for _ in range(12):  # 105/min for 12 s: past the new limit longer than its delay
                dev.send(hr=105)
                await dev.flush()
                clock.now += 1
                srv.services.alerts.tick()
        await srv.services.writer.flush()
    finally:
        await nurse.close()
    (entry,) = [a for a in await srv.services.store.audit_log(50) if a["action"] == "set_limits"]
    detail = json.loads(entry["detail"])
    assert detail["old"]["hr"]["high"] == 120 and detail["new"]["hr"]["high"] == 100
    events = await srv.services.store.events_after(f"patient:{pid}", 0, 1000)
    assert ("hr_high", "medium") in raised([e.data for e in events if e.kind == "alert"])


async def test_news2_observations_change_the_score(clocked: Any) -> None:
    srv, clock = clocked
    did, secret, pid = srv.device(0)
    nurse = await _monitor(srv)
    try:
        await nurse.subscribe([f"patient:{pid}"])
        async with DeviceClient(srv.url, did, secret, clock=clock) as dev:
            dev.send(spo2=97, pulse=80, rr=16, temp_c=37.0, sbp=120, dbp=80, probe=True, pi=3.0)
            await dev.flush()
        first = None
        while first is None:
            e = await nurse.next_event()
            if e.kind == "news2":
                first = e.data
        reply = await nurse.request(
            wire.SetObservations(patient_id=pid, on_oxygen=True, consciousness="voice")
        )
        assert reply.data["observations"] == {"on_oxygen": True, "consciousness": "voice"}
        second = None
        while second is None:
            e = await nurse.next_event()
            if e.kind == "news2":
                second = e.data
        bad = await nurse.request(wire.SetObservations(patient_id=pid, consciousness="sleepy"))
    finally:
        await nurse.close()
    # every vital, but no oxygen or consciousness: a lower bound, never "low"
    assert (first["total"], first["band"], first["complete"], first["display"]) == (
        0,
        "incomplete",
        False,
        "≥ 0, incomplete",
    )
    assert first["missing"] == ["on_oxygen", "consciousness"]
    assert second["total"] == 5 and second["band"] == "medium"  # oxygen 2 + new voice 3
    assert (second["complete"], second["display"], second["missing"]) == (True, "5, medium", [])
    assert isinstance(bad, wire.Error) and bad.field == "consciousness"


async def test_alert_history_over_rest(clocked: Any) -> None:
    srv, clock = clocked
    did, secret, pid = srv.device(0)
    async with DeviceClient(srv.url, did, secret, clock=clock) as dev:
        dev.send(spo2=80, probe=True, pi=2.0)
        await dev.flush()
    await srv.services.writer.flush()
    user, pw = srv.user("viewer")
    async with httpx.AsyncClient(base_url=srv.url) as http:
        token = (await http.post("/auth/login", json={"username": user, "password": pw})).json()
        headers = {"Authorization": f"Bearer {token['access_token']}"}
        got = await http.get(f"/patients/{pid}/alerts", headers=headers)
        assert got.status_code == 200, got.text
        rows = got.json()
        missing = await http.get("/patients/nobody/alerts", headers=headers)
        audit = await http.get("/audit", headers=headers)
    assert [(r["condition"], r["priority"], r["state"]) for r in rows] == [
        ("spo2_low", "high", "active")  # device_offline waits out its grace (not raised yet)
    ]
    assert missing.status_code == 404 and missing.json()["code"] == "not_found"
    assert audit.status_code == 403


class _Nobody:
    def push(self, event: object) -> None:
        pass


async def test_device_offline_waits_for_its_grace_and_unbinding_ends_it(clocked: Any) -> None:
    srv, clock = clocked
    did, secret, pid = srv.device(0)
    svc = srv.services

    async def alerts() -> list[tuple[str, str]]:
        await svc.writer.flush()
        events = await svc.store.events_after(f"patient:{pid}", 0, 1000)
        return [(e.data["condition"], e.data["action"]) for e in events if e.kind == "alert"]

    async def connect_and_leave() -> None:
        async with DeviceClient(srv.url, did, secret, clock=clock) as dev:
            dev.send(hr=70)
            await dev.flush()
        await wait_until(lambda: did not in svc.ingest.sessions, 5, "device gone")

    await connect_and_leave()  # a blip: back within the grace
    clock.now += 5
    svc.alerts.tick()
    async with DeviceClient(srv.url, did, secret, clock=clock):
        await wait_until(lambda: did in svc.ingest.sessions, 5, "device back")
        clock.now += 20
        svc.alerts.tick()
    assert ("device_offline", "raised") not in await alerts()
    await wait_until(lambda: did not in svc.ingest.sessions, 5, "device gone")
    clock.now += 11  # away for longer than the grace
    svc.alerts.tick()
    assert ("device_offline", "raised") in await alerts()
    await svc.registry.unbind(did)  # the patient no longer has this device
    assert ("device_offline", "resolved") in await alerts()


async def test_a_ward_wide_outage_raises_device_offline_a_bounded_number_per_tick(
    clocked: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every device of a ward gone at once: no tick raises more than OFFLINE_PER_TICK of their
    device_offline alerts (one here, for two devices); the device gone longest goes first."""
    srv, clock = clocked
    svc = srv.services
    monkeypatch.setattr(alerts_service, "OFFLINE_PER_TICK", 1)
    gone = [srv.device(1), srv.device(0)]  # in the order they leave
    for did, secret, _ in gone:
        async with DeviceClient(srv.url, did, secret, clock=clock) as dev:
            dev.send(hr=70)
            await dev.flush()
        await wait_until(lambda d=did: d not in svc.ingest.sessions, 5, "device gone")
        clock.now += 1
    assert svc.alerts.offline_pending == 2
    clock.now += 10  # both past their grace

    async def offline_raised() -> list[str]:
        await svc.writer.flush()
        found = []
        for _, _, pid in gone:
            events = await svc.store.events_after(f"patient:{pid}", 0, 1000)
            if any(e.kind == "alert" and e.data["condition"] == "device_offline" for e in events):
                found.append(pid)
        return found

    svc.alerts.tick()
    assert await offline_raised() == [gone[0][2]] and svc.alerts.offline_pending == 1
    svc.alerts.tick()
    assert await offline_raised() == [gone[0][2], gone[1][2]]
    assert svc.alerts.offline_pending == 0


async def test_acknowledging_a_resolved_alert_is_a_conflict(clocked: Any) -> None:
    srv, clock = clocked
    did, secret, pid = srv.device(0)
    nurse = await _monitor(srv)
    try:
        async with DeviceClient(srv.url, did, secret, clock=clock) as dev:
            dev.send(spo2=80, probe=True, pi=2.0)
            await dev.flush()
            await srv.services.writer.flush()
            (alert,) = srv.services.streams.attach(f"patient:{pid}", _Nobody())[1]["alerts"]
            first = await nurse.request(wire.AckAlert(alert_id=alert["alert_id"]))
            assert isinstance(first, wire.Result)
            dev.send(spo2=97, probe=True, pi=2.0)
            await dev.flush()
            for _ in range(10):
                clock.now += 1
                srv.services.alerts.tick()
            again = await nurse.request(wire.AckAlert(alert_id=alert["alert_id"]))
    finally:
        await nurse.close()
    assert isinstance(again, wire.Error) and again.code == "conflict", again


async def _send_each_second(
    srv: RunningServer, clock: ManualClock, values: dict[str, Any], seconds: int
) -> list[dict[str, Any]]:
    """Device 0 sends ``values`` once a second of patient time; return the patient's events."""
    did, secret, pid = srv.device(0)
    async with DeviceClient(srv.url, did, secret, clock=clock) as dev:
        for t in range(seconds):
            clock.now = START + t
            srv.services.alerts.tick()
            dev.send(values, ts=clock.now)
            await dev.flush()
    await srv.services.writer.flush()
    events = await srv.services.store.events_after(f"patient:{pid}", 0, 100_000)
    return [{"kind": e.kind, **e.data} for e in events]


async def test_spo2_and_pulse_of_zero_raise_probe_off_not_a_desaturation(clocked: Any) -> None:
    """A pulse oximeter's 0 is "no signal": the technical alert after its 10 s delay, no
    physiological alarm, NEWS2 missing the two; the reading itself is stored as sent."""
    srv, clock = clocked
    events = await _send_each_second(srv, clock, {"spo2": 0, "pulse": 0, "rr": 16}, 12)
    alerts = [e for e in events if e["kind"] == "alert"]
    assert raised(alerts) == [("probe_off", "medium")]
    assert alerts[0]["category"] == "technical" and alerts[0]["at"] == START + 10
    news2 = [e for e in events if e["kind"] == "news2"]
    assert {"spo2", "pulse"} <= set(news2[-1]["missing"]) and news2[-1]["complete"] is False
    readings = [e for e in events if e["kind"] == "reading"]
    assert (readings[0]["spo2"], readings[0]["pulse"]) == (0, 0)  # stored as the device sent it
    pid = srv.device(0)[2]
    snapshot = srv.services.streams.attach(f"patient:{pid}", _Nobody())[1]["news2"]
    assert (snapshot["band"], snapshot["complete"], snapshot["display"]) == (
        "incomplete",
        False,
        "≥ 0, incomplete",
    )


@pytest.mark.parametrize(("env", "expected"), [("30", 30.0), ("5", 5.0), ("60", 60.0)])
def test_apnoea_delay_comes_from_the_environment(
    monkeypatch: pytest.MonkeyPatch, env: str, expected: float
) -> None:
    monkeypatch.setenv("VITALWIRE_APNOEA_DELAY_S", env)
    assert Settings().apnoea_delay_s == expected


@pytest.mark.parametrize("env", ["4", "61", "0"])
def test_apnoea_delay_out_of_bounds_is_refused_naming_it(
    monkeypatch: pytest.MonkeyPatch, env: str
) -> None:
    monkeypatch.setenv("VITALWIRE_APNOEA_DELAY_S", env)
    with pytest.raises(ValidationError, match="apnoea_delay_s"):
        Settings()


@pytest.mark.parametrize(("seconds", "expected"), [(10, []), (11, [("apnoea", "high")])])
async def test_apnoea_delay_is_a_setting(
    tmp_path: Path, seconds: int, expected: list[tuple[str, str]]
) -> None:
    """VITALWIRE_APNOEA_DELAY_S reaches the engine: 10 s of RR 0 (t = 0 .. 9) raise nothing, an
    eleventh second raises apnoea at high priority."""
    clock = ManualClock()
    srv, task = await start_server(
        tmp_path, patients=1, clock=clock, apnoea_delay_s=10.0, **PROMPT_ACKS
    )
    try:
        events = await _send_each_second(srv, clock, {"rr": 0}, seconds)
    finally:
        await stop_server(srv, task)
    found = [r for r in raised([e for e in events if e["kind"] == "alert"]) if r[0] == "apnoea"]
    assert found == expected
