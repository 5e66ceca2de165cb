"""Administration over REST (issue 26): admin only, audited, taking effect at once, over real
sockets against a server on port 0."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import httpx
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from tests.conftest import RunningServer, login_token, wait_until
from vitalwire.sdk import DeviceClient
from vitalwire.wire import Close, Event

PASSWORD = "correct horse battery staple"


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def audit_rows(srv: RunningServer, action: str) -> list[dict[str, Any]]:
    await srv.services.writer.flush()
    return [r for r in await srv.services.store.audit_log(1000) if r["action"] == action]


async def stream(srv: RunningServer, pid: str) -> list[Event]:
    await srv.services.writer.flush()
    return await srv.services.store.events_after(f"patient:{pid}", 0, 100_000)


def of_device(events: list[Event], did: str, kind: str) -> list[Event]:
    return [e for e in events if e.kind == kind and e.data.get("device") == did]


async def test_user_acts_are_audited_and_a_disabled_users_socket_closes(
    server: RunningServer,
) -> None:
    token = await login_token(server, "admin")
    admin_name, _ = server.user("admin")
    async with httpx.AsyncClient(base_url=server.url, headers=bearer(token)) as http:
        r = await http.post(
            "/admin/users", json={"username": "nurse-1", "password": PASSWORD, "role": "viewer"}
        )
        assert r.status_code == 201, r.text
        assert r.headers["cache-control"] == "no-store"
        r = await http.put("/admin/users/nurse-1/role", json={"role": "clinician"})
        assert r.json() == {
            "username": "nurse-1",
            "before": "viewer",
            "after": "clinician",
            "changed": True,
        }
        r = await http.put("/admin/care-teams/ward-a/members/nurse-1")
        assert r.status_code == 200 and r.json()["changed"] is True
        teams = (await http.get("/admin/care-teams")).json()["items"]
        ward_a = next(w for w in teams if w["ward"] == "ward-a")
        assert "nurse-1" in ward_a["members"] and "P001" in ward_a["patients"]

        # nurse-1 logs in and watches a patient over /ws
        r = await http.post("/auth/login", json={"username": "nurse-1", "password": PASSWORD})
        nurse_token = r.json()["access_token"]
        async with connect(server.ws_url + "/ws", proxy=None) as ws:
            await ws.send(json.dumps({"type": "auth", "token": nurse_token, "id": 1}))
            reply = json.loads(await asyncio.wait_for(ws.recv(), 5))
            assert reply["type"] != "error", reply
            r = await http.post("/admin/users/nurse-1/disable")
            assert r.json()["changed"] is True

            async def closed() -> None:
                while True:
                    await ws.recv()

            try:
                await asyncio.wait_for(closed(), 5)
            except ConnectionClosed:
                pass
            assert ws.close_code == Close.UNAUTHENTICATED == 4001
        r = await http.post("/auth/login", json={"username": "nurse-1", "password": PASSWORD})
        assert r.status_code == 401
        r = await http.post("/admin/users/nurse-1/password", json={"password": "x" * 12})
        assert r.json()["changed"] is True
        r = await http.delete("/admin/users/nurse-1")
        assert r.status_code == 200 and r.json()["wards"] == ["ward-a"]
        r = await http.delete("/admin/users/nurse-1")
        assert (r.status_code, r.json()["field"]) == (404, "username")
    for action in ("user_create", "user_role", "ward_add", "user_disable", "user_delete"):
        [row] = await audit_rows(server, action)
        assert row["actor"] == admin_name and row["origin"] == "127.0.0.1", row
    [reset] = await audit_rows(server, "user_password_reset")
    assert PASSWORD not in json.dumps(reset) and "argon2" not in json.dumps(reset)


async def test_clinician_and_viewer_are_refused_and_audited_anonymous_is_401(
    server: RunningServer,
) -> None:
    async with httpx.AsyncClient(base_url=server.url) as http:
        r = await http.get("/admin/users")
        assert (r.status_code, r.json()["code"]) == (401, "unauthenticated")
        for role in ("clinician", "viewer"):
            h = bearer(await login_token(server, role))
            r = await http.post(
                "/admin/devices", json={"device_id": "rogue-1", "kind": "monitor"}, headers=h
            )
            assert (r.status_code, r.json()["code"], r.json()["field"]) == (
                403,
                "forbidden",
                "role",
            )
            r = await http.get("/admin/patients", headers=h)
            assert r.status_code == 403
    refused = await audit_rows(server, "refused")
    attempts = {(r["actor"], json.loads(r["detail"])["action"]) for r in refused}
    for role in ("clinician", "viewer"):
        name, _ = server.user(role)
        assert {(name, "device_register"), (name, "admin_list_patients")} <= attempts
    assert await server.services.store.get_device("rogue-1") is None


async def test_validation_errors_name_the_field_and_lists_page(server: RunningServer) -> None:
    h = bearer(await login_token(server, "admin"))
    async with httpx.AsyncClient(base_url=server.url, headers=h) as http:
        bad = [
            ("/admin/users", {"username": "no spaces", "password": PASSWORD, "role": "viewer"}),
            ("/admin/users", {"username": "ok", "password": PASSWORD, "role": "god"}),
            ("/admin/users", {"username": "ok", "password": "", "role": "viewer"}),
            ("/admin/patients", {"id": "P9", "name": "", "ward": "ward-a"}),
            ("/admin/devices", {"device_id": "d" * 65}),
        ]
        fields = []
        for path, body in bad:
            r = await http.post(path, json=body)
            assert r.status_code == 422, r.text
            fields.append(r.json()["field"])
        assert fields == ["username", "role", "password", "name", "device_id"]
        r = await http.get("/admin/devices", params={"limit": 1001})
        assert (r.status_code, r.json()["field"]) == (422, "limit")
        r = await http.get("/admin/users", params={"cursor": "nonsense!"})
        assert (r.status_code, r.json()["field"]) == (422, "cursor")
        r = await http.post("/admin/patients", json={"id": "P001", "name": "X", "ward": "ward-a"})
        assert r.status_code == 409

        for path, key in (("/admin/users", "username"), ("/admin/devices", "id")):
            seen: list[str] = []
            cursor = None
            while True:
                params: dict[str, Any] = {"limit": 1}
                if cursor:
                    params["cursor"] = cursor
                page = (await http.get(path, params=params)).json()
                seen += [item[key] for item in page["items"]]
                cursor = page["next_cursor"]
                if cursor is None:
                    break
            full = [item[key] for item in (await http.get(path)).json()["items"]]
            assert seen == full and len(full) >= 3


async def test_a_moved_devices_next_reading_lands_on_the_new_patient(
    server: RunningServer,
) -> None:
    did, secret, p1 = server.device(0)
    _, _, p2 = server.device(1)
    h = bearer(await login_token(server, "admin"))
    async with (
        httpx.AsyncClient(base_url=server.url, headers=h) as http,
        DeviceClient(server.url, did, secret) as dev,
    ):
        dev.send(hr=70)
        await dev.flush()
        r = await http.put(f"/admin/bindings/{did}", json={"patient_id": p2})
        assert r.json() == {"device_id": did, "patient_id": p2, "previous_patient_id": p1}
        dev.send(hr=99)  # the very next reading
        await dev.flush()
        devices = (await http.get("/admin/devices")).json()["items"]
        assert next(d for d in devices if d["id"] == did)["patient_id"] == p2
    old, new = await stream(server, p1), await stream(server, p2)
    assert [e.data["hr"] for e in of_device(old, did, "reading")] == [70.0]
    assert [e.data["hr"] for e in of_device(new, did, "reading")] == [99.0]
    [row] = await audit_rows(server, "bind")
    assert row["patient_id"] == p2 and json.loads(row["detail"])["previous_patient_id"] == p1


async def test_device_register_rotate_disable_and_discharge(server: RunningServer) -> None:
    h = bearer(await login_token(server, "admin"))
    did, secret, pid = server.device(2)
    async with httpx.AsyncClient(base_url=server.url, headers=h) as http:
        r = await http.post("/admin/devices", json={"device_id": "ex-001"})
        assert r.status_code == 201 and len(r.json()["secret"]) >= 20
        new_secret = r.json()["secret"]
        r = await http.post("/admin/devices/ex-001/rotate-secret")
        assert r.json()["secret"] != new_secret
        r = await http.post("/admin/patients", json={"id": "P900", "name": "Ex", "ward": "ward-a"})
        assert r.status_code == 201
        r = await http.put("/admin/bindings/ex-001", json={"patient_id": "P900"})
        assert r.status_code == 200

        # a disabled device's live session ends at once
        dev = DeviceClient(server.url, did, secret)
        await dev.start()
        try:
            await wait_until(lambda: dev.connected, 5, "the device session")
            r = await http.post(f"/admin/devices/{did}/disable")
            assert r.json() == {"device_id": did, "disabled": True}
            await wait_until(lambda: Close.UNAUTHENTICATED in dev.close_codes, 5, "session end")
        finally:
            await dev.close()
        r = await http.post(f"/admin/devices/{did}/enable")
        assert r.json()["disabled"] is False

        # discharge: bindings end (announced), listing hides them, no new binding
        r = await http.post("/admin/patients/P900/discharge")
        assert r.json()["unbound"] == ["ex-001"] and r.json()["changed"] is True
        assert (await http.post("/admin/patients/P900/discharge")).json()["changed"] is False
        listed = [p["id"] for p in (await http.get("/admin/patients")).json()["items"]]
        assert "P900" not in listed and pid in listed
        r = await http.get("/admin/patients", params={"include_discharged": "true"})
        gone = next(p for p in r.json()["items"] if p["id"] == "P900")
        assert gone["discharged_at"] is not None and gone["devices"] == []
        r = await http.put("/admin/bindings/ex-001", json={"patient_id": "P900"})
        assert (r.status_code, r.json()["field"]) == (409, "patient_id")
        r = await http.delete("/admin/bindings/ex-001")
        assert r.json()["changed"] is False
    unbind = of_device(await stream(server, "P900"), "ex-001", "binding")
    assert [e.data["action"] for e in unbind] == ["bind", "unbind"]
    for action in ("device_register", "rotate_device_secret", "device_disable", "patient_admit"):
        assert await audit_rows(server, action), action
    [discharged] = await audit_rows(server, "patient_discharge")
    assert discharged["patient_id"] == "P900"
    assert json.loads(discharged["detail"]) == {"devices": ["ex-001"]}


async def test_discharge_ends_the_patients_open_alerts(server: RunningServer) -> None:
    """A discharged patient's alarms do not go on escalating on the central station: their open
    alerts resolve with the discharge, durable before the answer, on the stream for every
    watcher."""
    did, secret, pid = server.device(0)
    async with DeviceClient(server.url, did, secret) as dev:
        dev.send(spo2=80, pulse=72, probe=True)  # past the critical limit: high, at once
        await dev.flush()
    await wait_until(
        lambda: any(a.condition == "spo2_low" for a in server.services.alerts.engine(pid).active()),
        5,
        "the high SpO2 alert",
    )
    h = bearer(await login_token(server, "admin"))
    async with httpx.AsyncClient(base_url=server.url, headers=h) as http:
        r = await http.post(f"/admin/patients/{pid}/discharge")
    assert r.status_code == 200, r.text
    assert r.json()["alerts_ended"] >= 1 and r.json()["unbound"] == [did]
    rows = await server.services.store.alerts_for(pid, 10)
    assert rows and all(row["state"] == "resolved" for row in rows), rows
    ended = [
        e.data
        for e in await stream(server, pid)
        if e.kind == "alert" and e.data["action"] == "resolved"
    ]
    assert [d["condition"] for d in ended if d["condition"] == "spo2_low"] == ["spo2_low"]
    assert all(d["message"] == "ended: patient discharged by admin" for d in ended)
    assert server.services.alerts.engine(pid).active() == []
