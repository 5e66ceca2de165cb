"""Access and audit: the access matrix (one table), tokens, device identity, socket hardening,
TLS, and the audit trail of a scripted session."""

from __future__ import annotations

import asyncio
import json
import logging
import ssl
import time
from pathlib import Path
from typing import Any

import httpx
import jwt
import pytest
import websockets
from websockets.asyncio.client import connect

from tests.conftest import RunningServer, start_server, stop_server, wait_until
from vitalwire import wire
from vitalwire.sdk import DeviceClient, MonitorClient
from vitalwire.services.auth import Principal

# --------------------------------------------------------------------------------------------
# The access matrix. Targets, as seen by the acting user:
#   own    P001: in a ward the user belongs to (ward-a)
#   asgn   R001: in ward-c, assigned to the user individually
#   other  Q001: ward-b, not in the user's care
#   glass  Q002: ward-b, opened by the clinician with break-glass (the viewer may not)
# Each row: surface/message -> the roles and targets allowed. Every other combination is denied.
# --------------------------------------------------------------------------------------------

ALL = {"own", "asgn", "other", "glass"}
CARE = {"own", "asgn"}
MATRIX: dict[str, dict[str, set[str]]] = {
    "ws.subscribe": {"admin": ALL, "clinician": CARE | {"glass"}, "viewer": CARE},
    "ws.get_limits": {"admin": ALL, "clinician": CARE | {"glass"}, "viewer": CARE},
    "rest.alert_history": {"admin": ALL, "clinician": CARE | {"glass"}, "viewer": CARE},
    "rest.patients_list": {"admin": ALL, "clinician": CARE | {"glass"}, "viewer": CARE},
    "ws.set_limits": {"admin": ALL, "clinician": CARE, "viewer": set()},
    "ws.set_observations": {"admin": ALL, "clinician": CARE | {"glass"}, "viewer": set()},
    "ws.ack_alert": {"admin": ALL, "clinician": CARE | {"glass"}, "viewer": set()},
    "ws.command.identify": {"admin": ALL, "clinician": CARE | {"glass"}, "viewer": set()},
    "ws.command.reset": {"admin": ALL, "clinician": CARE, "viewer": set()},
    "ws.command.silence": {"admin": ALL, "clinician": CARE, "viewer": set()},
}
TARGETS = {"own": "P001", "asgn": "R001", "other": "Q001", "glass": "Q002"}
CASES = [
    (surface, role, target, target in allowed)
    for surface, roles in MATRIX.items()
    for role, allowed in roles.items()
    for target in sorted(ALL)
]


@pytest.fixture(scope="module")
def matrix_results(tmp_path_factory: pytest.TempPathFactory) -> dict[tuple[str, str, str], bool]:
    """Run every case once against one server (set up as described above)."""
    return asyncio.run(_run_matrix(tmp_path_factory.mktemp("matrix")))


async def _run_matrix(tmp: Path) -> dict[tuple[str, str, str], bool]:
    srv, task = await start_server(tmp, patients=1)
    svc = srv.services
    try:
        for pid, ward in (("Q001", "ward-b"), ("Q002", "ward-b"), ("R001", "ward-c")):
            await svc.registry.create_patient(pid, f"Patient {pid}", ward)
        for user in ("clinician", "viewer"):
            await svc.store.assign(user, "R001")
        await svc.access.refresh()
        clinician = await _mon(srv, "clinician")
        glass = await clinician.request(
            wire.BreakGlass(patient_id="Q002", reason="rapid response call, bed 12")
        )
        assert isinstance(glass, wire.Result), glass
        await clinician.close()
        # an open alert on every patient, for acknowledgement
        alert_of: dict[str, str] = {}
        for pid in TARGETS.values():
            events, rows = svc.alerts.on_reading(pid, "dev-x", {"spo2": 80.0}, svc.clock())
            await svc.writer.commit(events, alerts=rows)
            alert_of[pid] = next(e.data["alert_id"] for e in events if e.kind == "alert")
        results: dict[tuple[str, str, str], bool] = {}
        for role in ("admin", "clinician", "viewer"):
            user, pw = srv.user(role)
            async with httpx.AsyncClient(base_url=srv.url) as http:
                r = await http.post("/auth/login", json={"username": user, "password": pw})
                headers = {"Authorization": f"Bearer {r.json()['access_token']}"}
                mon = await _mon(srv, role)
                try:
                    for surface in MATRIX:
                        for target, pid in TARGETS.items():
                            results[(surface, role, target)] = await _attempt(
                                surface, pid, mon, http, headers, alert_of[pid]
                            )
                finally:
                    await mon.close()
        return results
    finally:
        await stop_server(srv, task)


async def _attempt(
    surface: str,
    pid: str,
    mon: MonitorClient,
    http: httpx.AsyncClient,
    headers: dict[str, str],
    alert_id: str,
) -> bool:
    """True if access control let the request through (it may still fail for other reasons)."""
    if surface == "rest.patients_list":
        r = await http.get("/patients", headers=headers)
        assert r.status_code == 200, r.text
        return pid in {p["id"] for p in r.json()}
    if surface == "rest.alert_history":
        r = await http.get(f"/patients/{pid}/alerts", headers=headers)
        assert r.status_code in (200, 403), r.text
        return r.status_code == 200
    msg: Any
    if surface == "ws.subscribe":
        msg = wire.Subscribe(streams=[f"patient:{pid}"])
    elif surface == "ws.get_limits":
        msg = wire.GetLimits(patient_id=pid)
    elif surface == "ws.set_limits":
        msg = wire.SetLimits(patient_id=pid, limits={"hr": {"high": 125}})
    elif surface == "ws.set_observations":
        msg = wire.SetObservations(patient_id=pid, consciousness="alert")
    elif surface == "ws.ack_alert":
        msg = wire.AckAlert(alert_id=alert_id)
    else:
        msg = wire.SendCommand(patient_id=pid, name=surface.rsplit(".", 1)[1])
    reply = await mon.request(msg)
    return not (isinstance(reply, wire.Error) and reply.code == "forbidden")


@pytest.mark.parametrize(("surface", "role", "target", "allowed"), CASES)
def test_access_matrix(
    matrix_results: dict[tuple[str, str, str], bool],
    surface: str,
    role: str,
    target: str,
    allowed: bool,
) -> None:
    assert matrix_results[(surface, role, target)] is allowed


async def _mon(srv: RunningServer, role: str) -> MonitorClient:
    user, pw = srv.user(role)
    mon = MonitorClient(srv.url, username=user, password=pw, reconnect=False)
    await mon.connect()
    return mon


async def test_viewer_may_not_break_glass_and_reasons_are_required(server: RunningServer) -> None:
    svc = server.services
    await svc.registry.create_patient("Q001", "Other Ward", "ward-b")
    await svc.access.refresh()
    viewer = await _mon(server, "viewer")
    clinician = await _mon(server, "clinician")
    try:
        denied = await viewer.request(wire.BreakGlass(patient_id="Q001", reason="just curious ok"))
        short = await clinician.request(wire.BreakGlass(patient_id="Q001", reason="because"))
        own = await clinician.request(wire.BreakGlass(patient_id="P001", reason="already mine ok"))
    finally:
        await viewer.close()
        await clinician.close()
    assert isinstance(denied, wire.Error) and denied.code == "forbidden"
    assert isinstance(short, wire.Error) and (short.code, short.field) == (
        "invalid_message",
        "reason",
    )
    assert isinstance(own, wire.Error) and "already in your care" in own.message


async def test_alerts_stream_shows_only_the_users_patients(server: RunningServer) -> None:
    svc = server.services
    await svc.registry.create_patient("Q001", "Other Ward", "ward-b")
    await svc.access.refresh()
    clinician = await _mon(server, "clinician")
    try:
        await clinician.subscribe(["alerts"])
        for pid in ("Q001", "P001"):
            events, rows = svc.alerts.on_reading(pid, "dev-x", {"spo2": 80.0}, svc.clock())
            await svc.writer.commit(events, alerts=rows)
        seen = []
        while "P001" not in seen:
            e = await clinician.next_event()
            if e.kind == "alert":
                seen.append(e.data["patient_id"])
    finally:
        await clinician.close()
    assert seen == ["P001"]


async def _ws_auth(srv: RunningServer, token: str) -> tuple[dict[str, Any], int | None]:
    async with connect(srv.ws_url + "/ws", proxy=None) as ws:
        await ws.send(json.dumps({"type": "auth", "token": token}))
        reply = json.loads(await ws.recv())
        if reply["type"] == "error":
            with pytest.raises(websockets.ConnectionClosed) as closed:
                await ws.recv()
            return reply, closed.value.rcvd.code if closed.value.rcvd else None
        return reply, None


async def test_expired_tampered_and_wrong_key_tokens_are_refused(server: RunningServer) -> None:
    tokens = server.services.tokens
    who = Principal("clinician", "clinician")
    good = tokens.issue(who, time.time())
    expired = tokens.issue(who, time.time() - 2 * tokens.ttl_s)
    head, body, sig = good.split(".")
    claims = json.loads(jwt.utils.base64url_decode(body))
    claims["role"] = "admin"
    tampered = ".".join(
        [head, jwt.utils.base64url_encode(json.dumps(claims).encode()).decode(), sig]
    )
    wrong_key = jwt.encode(
        {"sub": "clinician", "role": "admin", "exp": time.time() + 60, "typ": "access"},
        "another-key-" + "z" * 40,
        algorithm="HS256",
    )
    refresh_as_access = tokens.issue(who, time.time(), "refresh")
    for token, text in (
        (expired, "expired"),
        (tampered, "invalid"),
        (wrong_key, "invalid"),
        (refresh_as_access, "not an access token"),
    ):
        reply, code = await _ws_auth(server, token)
        assert (reply["code"], code) == ("unauthenticated", 4001), token
        assert text in reply["message"]
    reply, code = await _ws_auth(server, good)
    assert reply["type"] == "result" and code is None


async def test_refresh_flow(server: RunningServer) -> None:
    user, pw = server.user("viewer")
    async with httpx.AsyncClient(base_url=server.url) as http:
        login = (await http.post("/auth/login", json={"username": user, "password": pw})).json()
        fresh = await http.post("/auth/refresh", json={"refresh_token": login["refresh_token"]})
        assert fresh.status_code == 200 and fresh.json()["role"] == "viewer"
        wrong = await http.post("/auth/refresh", json={"refresh_token": login["access_token"]})
        assert wrong.status_code == 401 and "not an refresh token" in wrong.json()["message"]
        headers = {"Authorization": f"Bearer {fresh.json()['access_token']}"}
        assert (await http.get("/patients", headers=headers)).status_code == 200


async def test_a_device_can_only_be_itself_and_disabled_devices_are_refused(
    server: RunningServer,
) -> None:
    a, _, _ = server.device(0)
    _, secret_b, _ = server.device(1)
    async with connect(server.ws_url + "/ws/device", proxy=None) as ws:
        await ws.send(json.dumps({"type": "hello", "device_id": a, "secret": secret_b}))
        err = json.loads(await ws.recv())
    assert (err["code"], err["field"]) == ("unauthenticated", "secret")
    did, secret, _ = server.device(2)
    await server.services.store.set_device_disabled(did, True)
    dev = DeviceClient(server.url, did, secret)
    await dev.start(wait=False)
    try:
        await wait_until(lambda: dev.errors, 10, "the hello refused")
    finally:
        await dev.close()
    assert dev.errors[0].code == "unauthenticated" and "disabled" in dev.errors[0].message


async def test_origin_is_checked(tmp_path: Path) -> None:
    srv, task = await start_server(
        tmp_path, patients=1, allowed_origins=["https://ward.example.org"]
    )
    try:
        host = srv.ws_url.removeprefix("ws://")
        for path in ("/ws", "/ws/device"):
            with pytest.raises(websockets.InvalidStatus) as refused:
                async with connect(srv.ws_url + path, proxy=None, origin="https://evil.example"):
                    pass
            assert refused.value.response.status_code == 403
            for ok in ("https://ward.example.org", f"http://{host}"):
                async with connect(srv.ws_url + path, proxy=None, origin=ok) as ws:
                    await ws.send(json.dumps({"type": "ping", "id": 1}))
                    assert json.loads(await ws.recv())["type"] in ("error", "pong")
    finally:
        await stop_server(srv, task)


async def test_rate_limits_close_with_4029(tmp_path: Path) -> None:
    srv, task = await start_server(
        tmp_path,
        patients=1,
        device_msgs_per_s=1,
        device_msgs_burst=5,
        client_msgs_per_s=1,
        client_msgs_burst=3,
        max_connections_per_user=2,
    )
    try:
        did, secret, _ = srv.device(0)
        async with connect(srv.ws_url + "/ws/device", proxy=None) as ws:
            await ws.send(json.dumps({"type": "hello", "device_id": did, "secret": secret}))
            await ws.recv()
            for seq in range(1, 8):
                await ws.send(
                    json.dumps({"type": "reading", "seq": seq, "ts": time.time(), "hr": 70})
                )
            got: list[dict[str, Any]] = []
            with pytest.raises(websockets.ConnectionClosed) as closed:
                while True:
                    got.append(json.loads(await asyncio.wait_for(ws.recv(), 5)))
        assert closed.value.rcvd is not None and closed.value.rcvd.code == 4029
        assert [m["code"] for m in got if m["type"] == "error"] == ["rate_limited"]
        await srv.services.writer.flush()
        assert await srv.services.store.device_last_seq(did) == 5  # the burst was taken
        user, pw = srv.user()
        async with httpx.AsyncClient(base_url=srv.url) as http:
            token = (
                await http.post("/auth/login", json={"username": user, "password": pw})
            ).json()["access_token"]
        async with (
            connect(srv.ws_url + "/ws", proxy=None) as c1,
            connect(srv.ws_url + "/ws", proxy=None) as c2,
        ):
            for c in (c1, c2):
                await c.send(json.dumps({"type": "auth", "token": token}))
                assert json.loads(await c.recv())["type"] == "result"
            reply, code = await _ws_auth(srv, token)  # a third connection
            assert (reply["code"], code) == ("rate_limited", 4029)
            for i in range(10):
                await c1.send(json.dumps({"type": "ping", "id": i}))
            replies: list[dict[str, Any]] = []
            with pytest.raises(websockets.ConnectionClosed) as closed:
                while True:
                    replies.append(json.loads(await asyncio.wait_for(c1.recv(), 5)))
        assert closed.value.rcvd is not None and closed.value.rcvd.code == 4029
        assert [r["type"] for r in replies][:3] == ["pong"] * 3
        assert {r["code"] for r in replies if r["type"] == "error"} == {"rate_limited"}
    finally:
        await stop_server(srv, task)


async def test_tls_with_a_test_ca(tmp_path: Path) -> None:
    import trustme

    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1", "localhost")
    certfile, keyfile = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert.private_key_and_cert_chain_pem.write_to_path(str(certfile))
    cert.private_key_pem.write_to_path(str(keyfile))
    srv, task = await start_server(
        tmp_path, patients=1, certfile=str(certfile), keyfile=str(keyfile)
    )
    try:
        port = srv.url.rsplit(":", 1)[1]
        https = f"https://127.0.0.1:{port}"
        trusted = ssl.create_default_context()
        ca.configure_trust(trusted)
        did, secret, pid = srv.device(0)
        user, pw = srv.user()
        async with MonitorClient(https, username=user, password=pw, ssl=trusted) as mon:
            await mon.subscribe([f"patient:{pid}"])
            async with DeviceClient(https, did, secret, ssl=trusted) as dev:
                dev.send(hr=72)
                await dev.flush()
            while (e := await mon.next_event()).kind != "reading":
                pass
        assert e.data["hr"] == 72.0
        untrusted = MonitorClient(
            https, username=user, password=pw, ssl=ssl.create_default_context()
        )
        with pytest.raises(ConnectionError, match="TLS certificate is not trusted"):
            await untrusted.connect()
    finally:
        await stop_server(srv, task)


async def test_a_scripted_session_leaves_the_expected_audit_trail(
    server: RunningServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    svc = server.services
    did, secret, pid = server.device(0)
    user, pw = server.user("clinician")
    async with httpx.AsyncClient(base_url=server.url) as http:
        await http.post("/auth/login", json={"username": user, "password": "wrong-password"})
    mon = await _mon(server, "clinician")
    try:
        await mon.subscribe([f"patient:{pid}"])
        async with DeviceClient(server.url, did, secret) as dev:
            dev.send(spo2=81.5, hr=133)
            await dev.flush()
            while True:
                e = await mon.next_event()
                if e.kind == "alert" and e.data["condition"] == "spo2_low":
                    break
            await mon.request(wire.AckAlert(alert_id=e.data["alert_id"]))
            await mon.request(wire.SetLimits(patient_id=pid, limits={"hr": {"high": 130}}))
            await mon.request(wire.SendCommand(patient_id=pid, name="identify"))
        await mon.request(wire.Unsubscribe(streams=[f"patient:{pid}"]))
    finally:
        await mon.close()
    await svc.writer.flush()
    rows = list(reversed(await svc.store.audit_log(100)))
    actions = [(r["actor"], r["action"], r["patient_id"]) for r in rows]
    for expected in [
        ("clinician", "login_failed", None),
        ("clinician", "login", None),
        ("clinician", "subscribe", pid),
        ("clinician", "ack_alert", pid),
        ("clinician", "set_limits", pid),
        ("clinician", "command", pid),
        ("clinician", "unsubscribe", pid),
    ]:
        assert expected in actions, (expected, actions)
    watched = next(r for r in rows if r["action"] == "unsubscribe")
    assert json.loads(watched["detail"])["watched_s"] >= 0 and watched["origin"]
    logged = "\n".join(r.getMessage() for r in caplog.records)
    for secret_or_vital in (secret, pw, "wrong-password", "81.5", "133"):
        assert secret_or_vital not in logged


async def test_internal_errors_never_leak(
    server: RunningServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    def boom(*_: object, **__: object) -> None:
        raise RuntimeError("SELECT secret FROM users -- internal detail")

    monkeypatch.setattr(server.services.alerts, "limits", boom)
    mon = await _mon(server, "clinician")
    try:
        reply = await mon.request(wire.GetLimits(patient_id="P001"))
        still = await mon.request(wire.Ping())
    finally:
        await mon.close()
    assert isinstance(reply, wire.Error)
    assert (reply.code, reply.message) == ("internal", "internal error")
    assert isinstance(still, wire.Pong)  # the connection carries on


async def test_subscriptions_per_connection_are_bounded(tmp_path: Path) -> None:
    srv, task = await start_server(tmp_path, patients=3, max_streams_per_connection=2)
    try:
        mon = await _mon(srv, "clinician")
        try:
            ok = await mon.request(wire.Subscribe(streams=["patient:P001", "patient:P002"]))
            too_many = await mon.request(wire.Subscribe(streams=["patient:P003"]))
        finally:
            await mon.close()
    finally:
        await stop_server(srv, task)
    assert isinstance(ok, wire.Subscribed)
    assert isinstance(too_many, wire.Error) and too_many.field == "streams"
    assert "at most 2, got 3" in too_many.message


async def test_a_refusal_names_what_is_missing_the_role_or_the_care(server: RunningServer) -> None:
    svc = server.services
    await svc.registry.create_patient("Q001", "Other Ward", "ward-b")
    await svc.access.refresh()
    viewer = await _mon(server, "viewer")
    clinician = await _mon(server, "clinician")
    try:
        role = await viewer.request(wire.SetLimits(patient_id="P001", limits={"hr": {"high": 125}}))
        care = await clinician.request(
            wire.SetLimits(patient_id="Q001", limits={"hr": {"high": 125}})
        )
    finally:
        await viewer.close()
        await clinician.close()
    assert isinstance(role, wire.Error) and (role.field, role.message) == (
        "role",
        "role viewer may not set limits",
    )
    assert isinstance(care, wire.Error) and care.field == "patient_id"
    assert "not in your care" in care.message and "Q001" in care.message


def test_services_without_access_control_fail_closed() -> None:
    from vitalwire.core import commands as cc
    from vitalwire.core.errors import Forbidden
    from vitalwire.services.commands import _deny_all

    with pytest.raises(Forbidden):
        _deny_all(Principal("admin", "admin"), "P001", cc.CATALOGUE["identify"])


async def test_care_teams_reload_only_when_another_process_changed_them(tmp_path: Path) -> None:
    """The periodic refresh reads the store's access version and reloads the care teams only
    when it changed; a change made by another process (the admin CLI, here a second store on
    the same file) is seen at the next refresh."""
    from vitalwire.services.access import Access
    from vitalwire.store.sql import SqlStore

    url = f"sqlite:///{tmp_path / 'access.db'}"
    server_store, cli_store = SqlStore(url), SqlStore(url)
    await server_store.open()
    await cli_store.open()
    loads = 0
    care_teams = server_store.care_teams

    async def counted(now: float) -> dict[str, Any]:
        nonlocal loads
        loads += 1
        return await care_teams(now)

    server_store.care_teams = counted  # type: ignore[method-assign]
    access = Access(server_store, None, time.time)  # type: ignore[arg-type]
    who = Principal("nurse", "clinician")
    try:
        await cli_store.create_patient("P1", "One", "ward-a", time.time())
        await access.refresh()
        await access.refresh()
        assert loads == 1 and not access.in_care(who, "P1")
        for change in (
            lambda: cli_store.add_ward_member("nurse", "ward-a"),
            lambda: cli_store.create_patient("P2", "Two", "ward-b", time.time()),
            lambda: cli_store.assign("nurse", "P2"),
            lambda: cli_store.add_grant("nurse", "P3", "emergency", time.time(), time.time() + 60),
        ):
            before = loads
            await change()
            await access.refresh()
            await access.refresh()
            assert loads == before + 1
        assert access.in_care(who, "P1") and access.in_care(who, "P2")
        assert access.has_break_glass(who, "P3")
    finally:
        await server_store.close()
        await cli_store.close()
