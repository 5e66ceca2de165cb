"""REST for what a client does over the socket (issue 26): limits (read, change) and NEWS2
observations, through the same service methods (access checks and audit) as the socket."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import RunningServer, login_token, start_server, stop_server, wait_until
from vitalwire import wire
from vitalwire.sdk import MonitorClient


@pytest.fixture
async def srv(tmp_path: Path) -> AsyncIterator[RunningServer]:
    running, task = await start_server(tmp_path, patients=2)
    await running.services.registry.create_patient("Q001", "Other Ward", "ward-b")
    await running.services.access.refresh()
    try:
        yield running
    finally:
        await stop_server(running, task)


async def _call(
    srv: RunningServer, method: str, path: str, role: str | None, **kw: Any
) -> httpx.Response:
    headers = {"Authorization": f"Bearer {await login_token(srv, role)}"} if role else {}
    async with httpx.AsyncClient(base_url=srv.url) as http:
        return await http.request(method, path, headers=headers, **kw)


async def _audit(srv: RunningServer, pid: str, action: str) -> list[dict[str, Any]]:
    await srv.services.writer.flush()
    return [r for r in await srv.services.store.audit_log(500, pid) if r["action"] == action]


def _error(r: httpx.Response, status: int, code: str, field: str | None) -> dict[str, Any]:
    assert r.status_code == status, r.text
    body: dict[str, Any] = r.json()
    assert set(body) == {"code", "message", "field"}, body
    assert (body["code"], body["field"]) == (code, field), body
    return body


async def test_limits_read_and_change_over_rest_show_on_the_socket_and_back(
    srv: RunningServer,
) -> None:
    pid = srv.device(0)[2]
    r = await _call(srv, "GET", f"/patients/{pid}/limits", "viewer")
    assert r.status_code == 200, r.text
    assert r.headers["cache-control"] == "no-store"
    assert r.json()["patient_id"] == pid and r.json()["limits"]["hr"]["high"] == 120
    assert len(await _audit(srv, pid, "get_limits")) == 1

    user, pw = srv.user("clinician")
    async with MonitorClient(srv.url, username=user, password=pw) as mon:
        await mon.subscribe([f"patient:{pid}"])
        # REST -> socket: a settings event with the new limits
        r = await _call(
            srv,
            "PUT",
            f"/patients/{pid}/limits",
            "clinician",
            json={"limits": {"hr": {"high": 130}}},
        )
        assert r.status_code == 200, r.text
        assert r.headers["cache-control"] == "no-store"
        assert r.json()["limits"]["hr"]["high"] == 130
        while (e := await mon.next_event()).kind != "settings":
            pass
        assert e.data["limits"]["hr"]["high"] == 130 and e.data["by"] == user
        # socket -> REST, and the socket's get_limits goes through the same service method
        reply = await mon.request(wire.SetLimits(patient_id=pid, limits={"hr": {"low": 45}}))
        assert isinstance(reply, wire.Result), reply
        got = (await _call(srv, "GET", f"/patients/{pid}/limits", "viewer")).json()["limits"]
        assert (got["hr"]["low"], got["hr"]["high"]) == (45, 130)
        reply = await mon.request(wire.GetLimits(patient_id=pid))
        assert isinstance(reply, wire.Result) and reply.data["limits"]["hr"]["low"] == 45
    assert len(await _audit(srv, pid, "set_limits")) == 2
    assert len(await _audit(srv, pid, "get_limits")) == 3


async def test_refusals_are_403_and_audited_unknown_is_404_no_token_401(
    srv: RunningServer,
) -> None:
    pid = srv.device(0)[2]
    body = {"limits": {"hr": {"high": 130}}}
    _error(
        await _call(srv, "PUT", f"/patients/{pid}/limits", "viewer", json=body),
        403,
        "forbidden",
        "role",
    )
    _error(
        await _call(
            srv, "POST", f"/patients/{pid}/observations", "viewer", json={"on_oxygen": True}
        ),
        403,
        "forbidden",
        "role",
    )
    refused = await _audit(srv, pid, "refused")
    assert [r["detail"] for r in refused if "set_" in str(r["detail"])], refused
    assert len(refused) == 2, refused
    for role in ("clinician", "viewer"):
        r = await _call(srv, "GET", "/patients/Q001/limits", role)
        assert r.status_code == 403, r.text
        assert r.json()["code"] == "forbidden"
    r = await _call(srv, "PUT", "/patients/Q001/limits", "clinician", json=body)
    assert r.status_code == 403, r.text
    assert len(await _audit(srv, "Q001", "refused")) == 3
    assert (await _call(srv, "GET", "/patients/Q001/limits", "admin")).status_code == 200
    _error(
        await _call(srv, "GET", "/patients/NOPE/limits", "clinician"),
        404,
        "not_found",
        "patient_id",
    )
    _error(
        await _call(srv, "GET", f"/patients/{pid}/limits", None),
        401,
        "unauthenticated",
        "authorization",
    )
    # the out-of-team limits were never changed
    assert srv.services.alerts.limits("Q001")["hr"]["high"] == 120


async def test_observations_are_recorded_as_a_settings_event_and_audited(
    srv: RunningServer,
) -> None:
    pid = srv.device(0)[2]
    r = await _call(
        srv,
        "POST",
        f"/patients/{pid}/observations",
        "clinician",
        json={"on_oxygen": True, "consciousness": "voice"},
    )
    assert r.status_code == 200, r.text
    assert r.headers["cache-control"] == "no-store"
    assert r.json() == {
        "patient_id": pid,
        "observations": {"on_oxygen": True, "consciousness": "voice"},
    }
    r = await _call(srv, "POST", f"/patients/{pid}/observations", "clinician", json={"scale": 2})
    assert r.json()["observations"] == {"on_oxygen": True, "consciousness": "voice", "scale": 2}
    await srv.services.writer.flush()
    events = await srv.services.store.events_after(f"patient:{pid}", 0, 1000)
    settings = [e.data for e in events if e.kind == "settings"]
    assert settings[-1]["observations"]["scale"] == 2
    assert len(await _audit(srv, pid, "set_observations")) == 2
    # read back by anyone who may view the patient (a viewer too), audited
    r = await _call(srv, "GET", f"/patients/{pid}/observations", "viewer")
    assert r.status_code == 200 and r.headers["cache-control"] == "no-store"
    assert r.json()["observations"] == {"on_oxygen": True, "consciousness": "voice", "scale": 2}
    other = srv.device(1)[2]
    r = await _call(srv, "GET", f"/patients/{other}/observations", "viewer")
    assert r.status_code == 200 and r.json()["observations"] == {}  # none recorded yet
    assert len(await _audit(srv, pid, "get_observations")) == 1
    r = await _call(srv, "GET", "/patients/NOPE/observations", "viewer")
    assert r.status_code == 404 and r.json()["field"] == "patient_id"


@pytest.mark.parametrize(
    ("method", "path", "body", "field", "bound"),
    [
        ("PUT", "limits", {"limits": {"hr": {"high": 1e9}}}, "limits.hr.high", "hr"),
        ("PUT", "limits", {"limits": {"bogus": {"high": 1}}}, "limits.bogus", "bogus"),
        ("PUT", "limits", {}, "limits", "required"),
        ("POST", "observations", {"scale": 3}, "scale", "2"),
        ("POST", "observations", {"consciousness": "asleep"}, "consciousness", "alert"),
    ],
)
async def test_bad_bodies_are_422_naming_the_field(
    srv: RunningServer, method: str, path: str, body: dict[str, Any], field: str, bound: str
) -> None:
    pid = srv.device(0)[2]
    r = await _call(srv, method, f"/patients/{pid}/{path}", "clinician", json=body)
    err = _error(r, 422, "invalid_message", field)
    assert bound.lower() in err["message"].lower(), err


async def test_the_routes_are_documented_with_their_errors(srv: RunningServer) -> None:
    async with httpx.AsyncClient(base_url=srv.url) as http:
        spec = (await http.get("/openapi.json")).json()
    for path, method in [
        ("/patients/{patient_id}/limits", "get"),
        ("/patients/{patient_id}/limits", "put"),
        ("/patients/{patient_id}/observations", "post"),
        ("/patients/{patient_id}/events", "get"),
        ("/patients/{patient_id}/news2", "get"),
        ("/alerts", "get"),
        ("/alerts/{alert_id}/acknowledge", "post"),
        ("/patients/{patient_id}/commands", "post"),
    ]:
        op = spec["paths"][path][method]
        assert {"200", "401", "403", "404", "422"} <= set(op["responses"]), (path, method)


async def _settings_events(srv: RunningServer, pid: str, n: int) -> None:
    for i in range(n):
        r = await _call(
            srv,
            "PUT",
            f"/patients/{pid}/limits",
            "clinician",
            json={"limits": {"hr": {"high": 121 + i}}},
        )
        assert r.status_code == 200, r.text
    await srv.services.writer.flush()


async def test_stream_events_after_an_offset_cursor_paged_and_audited(srv: RunningServer) -> None:
    pid = srv.device(0)[2]
    await _settings_events(srv, pid, 5)
    stored = await srv.services.store.events_after(f"patient:{pid}", 0, 1000)
    head = stored[-1].offset
    assert head >= 5
    token = await login_token(srv, "viewer")
    walked: list[dict[str, Any]] = []
    params: dict[str, Any] = {"limit": 2}
    async with httpx.AsyncClient(base_url=srv.url) as http:
        while True:
            r = await http.get(
                f"/patients/{pid}/events",
                params=params,
                headers={"Authorization": f"Bearer {token}"},
            )
            assert r.status_code == 200, r.text
            assert r.headers["cache-control"] == "no-store"
            page = r.json()
            assert len(page["items"]) <= 2 and page["head"] == head and page["recovered"]
            walked += page["items"]
            if page["next_cursor"] is None:
                break
            params = {"limit": 2, "cursor": page["next_cursor"]}
        assert [e["offset"] for e in walked] == [e.offset for e in stored]
        assert walked[-1]["kind"] == "settings" and walked[-1]["stream"] == f"patient:{pid}"
        assert walked[-1]["data"]["limits"]["hr"]["high"] == 125 and walked[-1]["ts"] > 0
        # after = head - 1: the last one; after beyond the head: an empty page
        r = await http.get(
            f"/patients/{pid}/events",
            params={"after": head - 1},
            headers={"Authorization": f"Bearer {token}"},
        )
        assert [e["offset"] for e in r.json()["items"]] == [head]
        assert r.json()["next_after"] == head and r.json()["next_cursor"] is None
        r = await http.get(
            f"/patients/{pid}/events",
            params={"after": head + 10},
            headers={"Authorization": f"Bearer {token}"},
        )
        assert r.status_code == 200 and r.json()["items"] == [] and r.json()["next_cursor"] is None
    rows = await _audit(srv, pid, "read_events")
    assert len(rows) >= 3 and '"stream"' in str(rows[0]["detail"])
    # out of team: 403, audited; unknown: 404; bad bounds: 422 naming the field
    r = await _call(srv, "GET", "/patients/Q001/events", "clinician")
    _error(r, 403, "forbidden", r.json()["field"])
    assert len(await _audit(srv, "Q001", "refused")) == 1
    _error(
        await _call(srv, "GET", "/patients/NOPE/events", "viewer"), 404, "not_found", "patient_id"
    )
    for params, field in [
        ({"limit": 1001}, "limit"),
        ({"limit": 0}, "limit"),
        ({"after": -1}, "after"),
        ({"cursor": "zz!"}, "cursor"),
    ]:
        r = await _call(srv, "GET", f"/patients/{pid}/events", "viewer", params=params)
        _error(r, 422, "invalid_message", field)


async def test_events_removed_by_retention_say_so(tmp_path: Path) -> None:
    srv, task = await start_server(tmp_path, patients=1, bus_history=2)
    try:
        pid = srv.device(0)[2]
        await _settings_events(srv, pid, 5)
        stored = await srv.services.store.events_after(f"patient:{pid}", 0, 1000)
        keep = stored[-2]  # the last two stay
        await srv.services.store.delete_events_before(keep.ts)
        first = (await srv.services.store.events_after(f"patient:{pid}", 0, 1000))[0].offset
        assert first > 1
        r = await _call(srv, "GET", f"/patients/{pid}/events", "viewer", params={"after": 0})
        assert r.status_code == 200, r.text
        page = r.json()
        assert page["recovered"] is False
        assert [e["offset"] for e in page["items"]] == list(range(first, stored[-1].offset + 1))
    finally:
        await stop_server(srv, task)


async def _alert_rows(srv: RunningServer, pid: str) -> None:
    """Alerts of two in-team patients and one out of team, written as the service writes them."""
    from vitalwire.store.base import AlertRow, Batch

    other = srv.device(1)[2]
    b = Batch()
    specs = [
        (pid, "hr_high", "medium", "active", 1000.0),
        (pid, "spo2_low", "high", "acknowledged", 1001.0),
        (pid, "rr_high", "low", "resolved", 1002.0),
        (other, "hr_low", "high", "active", 1003.0),
        ("Q001", "hr_high", "high", "active", 1004.0),
    ]
    for i, (p, cond, prio, state, at) in enumerate(specs):
        b.alerts.append(
            AlertRow(f"{p}:{cond}:{i}", p, cond, prio, "physiological", state, at, None, 0, "{}")
        )
    await srv.services.store.write_batch(b)


async def test_alerts_list_filters_pages_and_scopes_to_the_users_patients(
    srv: RunningServer,
) -> None:
    pid, other = srv.device(0)[2], srv.device(1)[2]
    await _alert_rows(srv, pid)

    async def ids(role: str, **params: Any) -> list[str]:
        r = await _call(srv, "GET", "/alerts", role, params=params)
        assert r.status_code == 200, r.text
        assert r.headers["cache-control"] == "no-store"
        return [a["patient_id"] + "/" + a["condition"] for a in r.json()["items"]]

    mine = [f"{other}/hr_low", f"{pid}/rr_high", f"{pid}/spo2_low", f"{pid}/hr_high"]
    assert await ids("clinician") == mine  # newest first; Q001 (out of team) never listed
    assert (await ids("admin"))[0] == "Q001/hr_high"
    assert await ids("viewer", patient=pid) == mine[1:]
    assert await ids("viewer", state="active") == [mine[0], mine[3]]
    assert await ids("viewer", priority="high") == [mine[0], mine[2]]
    assert await ids("viewer", since=1001, until=1003) == [mine[1], mine[2]]
    # pages of one: the same list, every alert once
    walked: list[str] = []
    params: dict[str, Any] = {"limit": 1}
    while True:
        page = (await _call(srv, "GET", "/alerts", "clinician", params=params)).json()
        walked += [a["patient_id"] + "/" + a["condition"] for a in page["items"]]
        if page["next_cursor"] is None:
            break
        params = {"limit": 1, "cursor": page["next_cursor"]}
    assert walked == mine
    assert len(await _audit(srv, pid, "list_alerts")) == 1
    # out of team: 403 and audited; unknown: 404; bad filters: 422 naming the field
    r = await _call(srv, "GET", "/alerts", "clinician", params={"patient": "Q001"})
    assert (r.status_code, r.json()["code"]) == (403, "forbidden"), r.text
    assert len(await _audit(srv, "Q001", "refused")) == 1
    r = await _call(srv, "GET", "/alerts", "clinician", params={"patient": "NOPE"})
    _error(r, 404, "not_found", "patient_id")
    for bad, field in [
        ({"state": "open"}, "state"),
        ({"priority": "urgent"}, "priority"),
        ({"limit": 1001}, "limit"),
        ({"since": 5, "until": 4}, "since"),
        ({"cursor": "%%%"}, "cursor"),
    ]:
        _error(
            await _call(srv, "GET", "/alerts", "viewer", params=bad), 422, "invalid_message", field
        )
    _error(await _call(srv, "GET", "/alerts", None), 401, "unauthenticated", "authorization")


async def test_acknowledge_over_rest(srv: RunningServer) -> None:
    from vitalwire.sdk import DeviceClient

    did, secret, pid = srv.device(0)
    async with DeviceClient(srv.url, did, secret) as dev:
        dev.send(temp_c=40.5)
        await dev.flush()
    svc = srv.services
    await wait_until(lambda: bool(svc.alerts._alert_patient), 10, "an alert raised")
    alert_id = next(iter(svc.alerts._alert_patient))
    r = await _call(srv, "POST", f"/alerts/{alert_id}/acknowledge", "viewer")
    _error(r, 403, "forbidden", r.json()["field"])
    r = await _call(srv, "POST", f"/alerts/{alert_id}/acknowledge", "clinician")
    assert r.status_code == 200, r.text
    assert r.json()["alert_id"] == alert_id and r.json()["changes"][0]["action"] == "acknowledged"
    assert len(await _audit(srv, pid, "ack_alert")) == 1
    refused = [r for r in await svc.store.audit_log(200) if r["action"] == "refused"]
    assert any(alert_id in r["detail"] for r in refused), refused
    rows = (await _call(srv, "GET", "/alerts", "viewer", params={"state": "acknowledged"})).json()
    assert [a["alert_id"] for a in rows["items"]] == [alert_id]
    _error(
        await _call(srv, "POST", "/alerts/nope/acknowledge", "clinician"),
        404,
        "not_found",
        "alert_id",
    )


async def test_news2_history_in_a_time_range(srv: RunningServer) -> None:
    from vitalwire.store.base import Batch
    from vitalwire.wire import Event

    pid = srv.device(0)[2]
    stream = f"patient:{pid}"
    start = (await srv.services.store.events_after(stream, 0, 10_000) or [None])[-1]
    base = start.offset if start is not None else 0
    b = Batch()
    for i in range(6):  # news2 at ts 100..105, a reading between each
        b.events.append(Event.new(stream, base + 2 * i + 1, "reading", 100.0 + i, {"hr": 70.0}))
        b.events.append(Event.new(stream, base + 2 * i + 2, "news2", 100.0 + i, {"score": i}))
    await srv.services.store.write_batch(b)

    r = await _call(srv, "GET", f"/patients/{pid}/news2", "viewer", params={"from": 101, "to": 105})
    assert r.status_code == 200, r.text
    assert r.headers["cache-control"] == "no-store"
    assert [e["data"]["score"] for e in r.json()["items"]] == [1, 2, 3, 4]
    assert all(e["kind"] == "news2" for e in r.json()["items"])
    walked: list[int] = []
    params: dict[str, Any] = {"limit": 4}
    while True:
        page = (await _call(srv, "GET", f"/patients/{pid}/news2", "viewer", params=params)).json()
        walked += [e["data"]["score"] for e in page["items"]]
        if page["next_cursor"] is None:
            break
        params = {"limit": 4, "cursor": page["next_cursor"]}
    assert walked == [0, 1, 2, 3, 4, 5]
    assert len(await _audit(srv, pid, "news2_history")) >= 3
    r = await _call(srv, "GET", "/patients/Q001/news2", "clinician")
    assert (r.status_code, r.json()["code"]) == (403, "forbidden")
    assert len(await _audit(srv, "Q001", "refused")) == 1
    _error(
        await _call(srv, "GET", "/patients/NOPE/news2", "viewer"), 404, "not_found", "patient_id"
    )
    for bad, field in [
        ({"from": 5, "to": 4}, "from"),
        ({"limit": 1001}, "limit"),
        ({"to": -1}, "to"),
    ]:
        r = await _call(srv, "GET", f"/patients/{pid}/news2", "viewer", params=bad)
        _error(r, 422, "invalid_message", field)


async def test_send_a_command_over_rest(srv: RunningServer) -> None:
    did, _, pid = srv.device(0)
    r = await _call(
        srv, "POST", f"/patients/{pid}/commands", "clinician", json={"name": "report_now"}
    )
    assert r.status_code == 200, r.text
    assert r.headers["cache-control"] == "no-store"
    command = r.json()["command"]
    assert (command["status"], command["device"], command["name"]) == (
        "queued",
        did,
        "report_now",
    )
    assert (await srv.services.store.get_command(command["command_id"])) is not None
    assert len(await _audit(srv, pid, "command")) == 1
    r = await _call(srv, "POST", f"/patients/{pid}/commands", "viewer", json={"name": "report_now"})
    assert (r.status_code, r.json()["code"]) == (403, "forbidden"), r.text
    assert len(await _audit(srv, pid, "refused")) == 1
    r = await _call(
        srv, "POST", "/patients/Q001/commands", "clinician", json={"name": "report_now"}
    )
    assert r.status_code == 403, r.text
    bad = {"name": "set_interval", "args": {"interval_s": 0.0}}
    r = await _call(srv, "POST", f"/patients/{pid}/commands", "clinician", json=bad)
    err = _error(r, 422, "invalid_message", r.json()["field"])
    assert "interval_s" in (err["field"] or ""), err
    r = await _call(srv, "POST", f"/patients/{pid}/commands", "clinician", json={"name": "nope"})
    _error(r, 422, "invalid_message", "name")
