"""Access that can be taken back (issue 25, items 1, 3, 7): break-glass that ends, care-team and
role changes, disabled, deleted and revoked users — on every REST request and every open session,
at once; the audit of every access to patient data and of every refusal."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
import websockets
from websockets.asyncio.client import ClientConnection, connect

from tests.conftest import (
    RunningServer,
    free_port,
    login_token,
    start_server,
    stop_server,
    wait_until,
)
from vitalwire import wire
from vitalwire.bus.memory import MemoryBus
from vitalwire.core import events as ev
from vitalwire.sdk import DeviceClient, MonitorClient
from vitalwire.sdk.monitor import AccessRevoked
from vitalwire.services import access as access_mod
from vitalwire.services.access import Access
from vitalwire.services.auth import Principal, hash_password
from vitalwire.services.clients import ClientSession
from vitalwire.services.container import ACCESS_REFRESH_S
from vitalwire.services.streams import Streams
from vitalwire.store.sql import SqlStore
from vitalwire.wire import Event


@pytest.fixture
async def srv(tmp_path: Path) -> AsyncIterator[RunningServer]:
    running, task = await start_server(tmp_path, patients=2, break_glass_s=3)
    try:
        yield running
    finally:
        await stop_server(running, task)


async def _socket(srv: RunningServer, token: str, streams: list[str]) -> ClientConnection:
    ws = await connect(srv.ws_url + "/ws", proxy=None)
    await ws.send(json.dumps({"type": "auth", "token": token, "id": 1}))
    assert json.loads(await ws.recv())["type"] == "result"
    if streams:
        await ws.send(json.dumps({"type": "subscribe", "streams": streams, "id": 2}))
        reply = json.loads(await ws.recv())
        assert reply["type"] == "subscribed", reply
    return ws


async def _until(
    ws: ClientConnection, done: Callable[[dict[str, Any]], bool], timeout: float = 10.0
) -> list[dict[str, Any]]:
    """Every message up to and including the first for which ``done`` holds."""
    got: list[dict[str, Any]] = []

    async def _read() -> None:
        while True:
            msg = json.loads(await ws.recv())
            got.append(msg)
            if done(msg):
                return

    try:
        await asyncio.wait_for(_read(), timeout)
    except TimeoutError:
        raise AssertionError(f"timed out; received {got}") from None
    return got


async def _closed(ws: ClientConnection, timeout: float = 10.0) -> tuple[list[dict[str, Any]], Any]:
    """Every message until the server closes; and the close frame it sent."""
    got: list[dict[str, Any]] = []
    with pytest.raises(websockets.ConnectionClosed) as closed:
        while True:
            got.append(json.loads(await asyncio.wait_for(ws.recv(), timeout)))
    return got, closed.value.rcvd


def _reading_of(stream: str) -> Callable[[dict[str, Any]], bool]:
    return lambda m: m.get("type") == "event" and m["stream"] == stream and m["kind"] == "reading"


async def _audit(srv: RunningServer) -> list[dict[str, Any]]:
    await srv.services.writer.flush()
    return list(reversed(await srv.services.store.audit_log(1000)))


async def _out_of_care_patient(srv: RunningServer) -> str:
    """Q001, in another ward, with a monitor of its own (mon-q); returns its secret."""
    svc = srv.services
    await svc.registry.create_patient("Q001", "Other Ward", "ward-b")
    cred = await svc.registry.create_device("mon-q")
    await svc.registry.bind("mon-q", "Q001")
    await svc.access.refresh()
    return cred.secret


async def _sentinel(srv: RunningServer, ws: ClientConnection) -> list[dict[str, Any]]:
    """A reading of P001 (still watched), committed after everything before it: every event
    committed before it reaches the socket before it. Returns what came up to it."""
    did, secret, pid = srv.device(0)
    async with DeviceClient(srv.url, did, secret) as dev:
        dev.send(hr=60)
        await dev.flush()
    return await _until(ws, _reading_of(f"patient:{pid}"))


# -- break-glass ends --------------------------------------------------------------------------


async def test_break_glass_expiry_ends_the_subscription_and_nothing_of_it_follows(
    srv: RunningServer,
) -> None:
    secret = await _out_of_care_patient(srv)
    ws = await _socket(srv, await login_token(srv, "clinician"), [])
    try:
        await ws.send(
            json.dumps(
                {"type": "break_glass", "patient_id": "Q001", "reason": "rapid response, bed 12"}
            )
        )
        assert json.loads(await ws.recv())["type"] == "result"
        await ws.send(
            json.dumps({"type": "subscribe", "streams": ["patient:Q001", "patient:P001"]})
        )
        assert json.loads(await ws.recv())["type"] == "subscribed"
        async with DeviceClient(srv.url, "mon-q", secret) as dev:
            dev.send(hr=71)
            await dev.flush()
            await _until(ws, _reading_of("patient:Q001"))  # watched while the grant lasts
            ended = await _until(ws, lambda m: m["type"] == "unsubscribed")
            assert ended[-1] == {
                "type": "unsubscribed",
                "streams": ["patient:Q001"],
                "code": "forbidden",
                "reason": "break-glass expired",
            }
            dev.send(hr=72)
            dev.send(spo2=80)  # an alarm too: its alert events would go to the stream
            await dev.flush()
        after = await _sentinel(srv, ws)
    finally:
        await ws.close()
    assert not [m for m in after if m.get("stream") == "patient:Q001"], after
    rows = await _audit(srv)
    subscribed = [r for r in rows if (r["action"], r["patient_id"]) == ("subscribe", "Q001")]
    assert json.loads(subscribed[0]["detail"])["flag"] == "break_glass"
    gone = [r for r in rows if (r["action"], r["patient_id"]) == ("unsubscribe", "Q001")]
    assert json.loads(gone[0]["detail"])["reason"] == "break-glass expired"


async def test_queued_frames_of_an_ended_stream_are_dropped_before_they_are_sent() -> None:
    """The live queue holds encoded frames without their stream: ending a stream takes its
    frames out of both queues (live events, replays), and the others stay in order."""
    session = ClientSession(Principal("u", "clinician"), Streams(None, MemoryBus()))  # type: ignore[arg-type]
    await session.subscribe(["patient:P", "patient:Q"], None, 1)
    session.take_now()
    session.send(Event.new("patient:Q", 9, ev.READING, 1.0, {"device": "d", "hr": 1.0}).frame)
    for offset in (1, 2, 3):
        for stream in ("patient:P", "patient:Q"):
            session.push(Event.new(stream, offset, ev.READING, 1.0, {"device": "d", "hr": 1.0}))
    session.end_streams({"patient:Q": "break-glass expired"})
    frames = [json.loads(f) for f in session.take_now()]
    assert [(f["stream"], f["offset"]) for f in frames if f["type"] == "event"] == [
        ("patient:P", 1),
        ("patient:P", 2),
        ("patient:P", 3),
    ]
    assert [f["type"] for f in frames].count("unsubscribed") == 1  # replies go first
    assert session.subscriptions == ["patient:P"]
    session.push(Event.new("patient:Q", 4, ev.READING, 1.0, {"device": "d", "hr": 1.0}))
    assert session.take_now() == []


async def test_queued_alerts_of_a_patient_no_longer_visible_are_dropped() -> None:
    visible = {"P", "Q"}
    session = ClientSession(
        Principal("u", "clinician"),
        Streams(None, MemoryBus()),  # type: ignore[arg-type]
        patient_filter=lambda pid: pid in visible,
    )
    await session.subscribe([ev.ALERTS_STREAM], None, 1)
    session.take_now()
    for offset, pid in enumerate(("P", "Q", "P"), 1):
        session.push(Event.new(ev.ALERTS_STREAM, offset, ev.ALERT, 1.0, {"patient_id": pid}))
    visible.discard("Q")
    session.purge_alerts()
    frames = [json.loads(f) for f in session.take_now()]
    assert [f["data"]["patient_id"] for f in frames] == ["P", "P"]


# -- care teams change ---------------------------------------------------------------------------


async def test_taken_off_the_ward_or_unassigned_ends_the_subscription(srv: RunningServer) -> None:
    svc = srv.services
    await svc.registry.create_patient("R001", "Assigned", "ward-c")
    await svc.store.assign("clinician", "R001")
    await svc.access.refresh()
    ws = await _socket(srv, await login_token(srv, "clinician"), ["patient:P001", "patient:R001"])
    try:
        assert await svc.store.unassign("clinician", "R001")
        await svc.access.refresh()  # what the service making the change does
        unassigned = (await _until(ws, lambda m: m["type"] == "unsubscribed"))[-1]
        assert await svc.store.remove_ward_member("clinician", "ward-a")
        await svc.access.refresh()
        removed = (await _until(ws, lambda m: m["type"] == "unsubscribed"))[-1]
        await ws.send(json.dumps({"type": "subscribe", "streams": ["patient:P001"], "id": 7}))
        again = json.loads(await ws.recv())
    finally:
        await ws.close()
    reason = "the patient is no longer in your care"
    assert (unassigned["streams"], unassigned["reason"]) == (["patient:R001"], reason)
    assert (removed["streams"], removed["reason"]) == (["patient:P001"], reason)
    assert (again["code"], again["id"]) == ("forbidden", 7)


# -- users disabled, deleted, demoted, reset -----------------------------------------------------


@pytest.mark.parametrize(
    ("change", "message"),
    [("delete", "user no longer exists"), ("disable", "user is disabled")],
)
async def test_a_deleted_or_disabled_users_token_and_session_stop_working(
    srv: RunningServer, change: str, message: str
) -> None:
    svc = srv.services
    token = await login_token(srv, "viewer")
    headers = {"Authorization": f"Bearer {token}"}
    ws = await _socket(srv, token, ["patient:P001"])
    if change == "delete":
        await svc.store.delete_user("viewer")
    else:
        await svc.store.update_user("viewer", disabled=True)
    await svc.access.refresh()
    got, close = await _closed(ws)
    assert got[-1] == {
        "type": "error",
        "code": "unauthenticated",
        "message": message,
        "field": "token",
    }
    assert close is not None and (close.code, close.reason) == (4001, message)
    async with httpx.AsyncClient(base_url=srv.url) as http:
        r = await http.get("/patients", headers=headers)
    assert (r.status_code, r.json()["message"]) == (401, message)
    async with connect(srv.ws_url + "/ws", proxy=None) as again:
        await again.send(json.dumps({"type": "auth", "token": token}))
        refused, close = await _closed(again)
    assert refused[0]["message"] == message and close is not None and close.code == 4001


async def test_a_demoted_clinician_is_refused_as_a_viewer_with_the_old_token(
    srv: RunningServer,
) -> None:
    svc = srv.services
    ws = await _socket(srv, await login_token(srv, "clinician"), ["patient:P001"])
    admin = {"Authorization": f"Bearer {await login_token(srv, 'admin')}"}
    try:
        await svc.store.update_user("clinician", role="viewer")
        await svc.store.update_user("admin", role="viewer")
        await svc.access.refresh()
        await ws.send(
            json.dumps(
                {
                    "type": "set_limits",
                    "patient_id": "P001",
                    "limits": {"hr": {"high": 125}},
                    "id": 3,
                }
            )
        )
        limits = json.loads(await ws.recv())
        await ws.send(
            json.dumps({"type": "command", "patient_id": "P001", "name": "silence", "id": 4})
        )
        silence = json.loads(await ws.recv())
        await ws.send(json.dumps({"type": "get_limits", "patient_id": "P001", "id": 5}))
        still_watches = json.loads(await ws.recv())
    finally:
        await ws.close()
    assert (limits["code"], limits["message"]) == ("forbidden", "role viewer may not set limits")
    assert (silence["code"], silence["message"]) == (
        "forbidden",
        "role viewer may not command care",
    )
    assert still_watches["type"] == "result"
    async with httpx.AsyncClient(base_url=srv.url) as http:
        audit = await http.get("/audit", headers=admin)
    assert audit.status_code == 403 and audit.json()["message"] == "role viewer may not read audit"


async def test_a_password_reset_revokes_every_token_issued_before(srv: RunningServer) -> None:
    svc = srv.services
    token = await login_token(srv, "clinician")
    ws = await _socket(srv, token, ["patient:P001"])
    await svc.store.update_user(
        "clinician", password_hash=hash_password("a-brand-new-password"), revoke_tokens=True
    )
    await svc.access.refresh()
    message = "token was revoked (password reset)"
    got, close = await _closed(ws)
    assert got[-1]["message"] == message and close is not None and close.code == 4001
    async with httpx.AsyncClient(base_url=srv.url) as http:
        r = await http.get("/patients", headers={"Authorization": f"Bearer {token}"})
    assert (r.status_code, r.json()["message"]) == (401, message)


async def test_auth_on_an_open_socket_checks_the_token_generation(srv: RunningServer) -> None:
    """A token of the current generation opens a session; renewing it with one issued before
    the reset is refused, and the session ends."""
    import time

    svc = srv.services
    old = await login_token(srv, "clinician")
    await svc.store.update_user("clinician", revoke_tokens=True)
    await svc.access.refresh()
    fresh = svc.tokens.issue(Principal("clinician", "clinician", 1), time.time())
    ws = await _socket(srv, fresh, ["patient:P001"])
    await ws.send(json.dumps({"type": "auth", "token": old, "id": 9}))
    got, close = await _closed(ws)
    assert (got[-1]["code"], got[-1]["message"], got[-1]["id"]) == (
        "unauthenticated",
        "token was revoked (password reset)",
        9,
    )
    assert close is not None and close.code == 4001


async def test_a_change_made_by_another_process_applies_within_the_refresh_interval(
    srv: RunningServer, tmp_path: Path
) -> None:
    """The admin CLI writes with a store of its own: the server learns it from the access
    version it reads every ACCESS_REFRESH_S, and ends the session then."""
    ws = await _socket(srv, await login_token(srv, "viewer"), ["patient:P001"])
    cli = SqlStore(f"sqlite:///{tmp_path / 'vitalwire.db'}")
    await cli.open()
    try:
        await cli.update_user("viewer", disabled=True)
        got, close = await _closed(ws, timeout=ACCESS_REFRESH_S * 6)
    finally:
        await cli.close()
    assert got[-1]["message"] == "user is disabled" and close is not None and close.code == 4001


# -- the SDK ---------------------------------------------------------------------------------------


async def test_the_sdk_drops_an_ended_stream_and_stops_after_a_revocation(
    srv: RunningServer,
) -> None:
    svc = srv.services
    await svc.registry.create_patient("R001", "Assigned", "ward-c")
    await svc.store.assign("clinician", "R001")
    await svc.access.refresh()
    user, pw = srv.user("clinician")
    mon = MonitorClient(srv.url, username=user, password=pw, backoff_max_s=0.2)
    told: list[tuple[list[str], str]] = []
    mon.on_unsubscribed = lambda streams, reason: told.append((streams, reason))
    await mon.connect()
    try:
        await mon.subscribe(["patient:P001", "patient:R001"])
        await svc.store.unassign("clinician", "R001")
        await svc.access.refresh()
        await wait_until(lambda: told, 10, "the unsubscribed message")
        await mon.drop_connection()  # the resume asks only for what is still watched
        await wait_until(lambda: mon.reconnects == 1 and mon.connected, 10, "the resume")
        session = next(iter(svc.clients))
        await wait_until(lambda: session.subscriptions == ["patient:P001"], 10, "resumed")
        await svc.store.update_user("clinician", disabled=True)
        await svc.access.refresh()
        with pytest.raises(AccessRevoked, match="user is disabled"):
            while True:
                await mon.next_event()
    finally:
        await mon.close()
    assert told == [(["patient:R001"], "the patient is no longer in your care")]
    assert mon.ended == {"patient:R001": "the patient is no longer in your care"}
    assert mon.close_codes[-1] == 4001 and mon.reconnects == 1  # no reconnecting after it


async def test_the_sdk_resumes_what_it_may_when_a_stream_became_forbidden_meanwhile(
    srv: RunningServer,
) -> None:
    svc = srv.services
    await svc.registry.create_patient("R001", "Assigned", "ward-c")
    await svc.store.assign("clinician", "R001")
    await svc.access.refresh()
    user, pw = srv.user("clinician")
    mon = MonitorClient(srv.url, username=user, password=pw, backoff_max_s=0.2)
    await mon.connect()
    try:
        await mon.subscribe(["patient:P001", "patient:R001"])
        real = mon.ws_url
        mon.ws_url = f"ws://127.0.0.1:{free_port()}/ws"  # no session until the change is made
        await mon.drop_connection()
        await wait_until(lambda: not svc.clients, 10, "the session gone")
        await svc.store.unassign("clinician", "R001")
        await svc.access.refresh()
        mon.ws_url = real
        await wait_until(lambda: mon.ended, 10, "the refused stream reported")
        await wait_until(lambda: svc.clients, 10, "a new session")
        session = next(iter(svc.clients))
        await wait_until(lambda: session.subscriptions == ["patient:P001"], 10, "P001 resumed")
    finally:
        await mon.close()
    assert list(mon.ended) == ["patient:R001"] and "resume refused" in mon.ended["patient:R001"]


# -- audit and REST ------------------------------------------------------------------------------


async def test_every_access_to_patient_data_and_every_refusal_is_audited(
    srv: RunningServer,
) -> None:
    await _out_of_care_patient(srv)
    clinician = await login_token(srv, "clinician")
    ws = await _socket(srv, clinician, [])
    try:
        await ws.send(json.dumps({"type": "get_limits", "patient_id": "P001", "id": 1}))
        assert json.loads(await ws.recv())["type"] == "result"
        await ws.send(json.dumps({"type": "get_limits", "patient_id": "Q001", "id": 2}))
        assert json.loads(await ws.recv())["code"] == "forbidden"
        await ws.send(json.dumps({"type": "subscribe", "streams": ["patient:Q001"], "id": 3}))
        assert json.loads(await ws.recv())["code"] == "forbidden"
    finally:
        await ws.close()
    async with httpx.AsyncClient(base_url=srv.url) as http:
        headers = {"Authorization": f"Bearer {clinician}"}
        listed = await http.get("/patients", headers=headers)
        history = await http.get("/patients/P001/alerts", headers=headers)
        refused = await http.get("/patients/Q001/alerts", headers=headers)
        audit = await http.get("/audit", headers=headers)
    assert (listed.status_code, history.status_code) == (200, 200)
    assert (refused.status_code, audit.status_code) == (403, 403)
    rows = [
        (r["action"], r["patient_id"], json.loads(r["detail"]))
        for r in await _audit(srv)
        if r["actor"] == "clinician"
    ]
    assert ("get_limits", "P001", {}) in rows
    assert ("list_patients", None, {"count": 2, "patients": ["P001", "P002"]}) in rows
    assert ("alert_history", "P001", {"count": 0}) in rows
    refusals = [(pid, d["action"]) for a, pid, d in rows if a == "refused"]
    assert refusals == [
        ("Q001", "get_limits"),
        ("Q001", "subscribe"),
        ("Q001", "alert_history"),
        (None, "read_audit"),
    ]
    reasons = [d["reason"] for a, _, d in rows if a == "refused"]
    assert "not in your care" in reasons[0] and reasons[-1] == "role clinician may not read audit"


class _Writer:
    def __init__(self) -> None:
        self.rows: list[Any] = []

    def submit(self, readings: Any, events: Any, audit: Any = ()) -> None:
        self.rows.extend(audit)


def test_refused_attempts_are_audited_a_bounded_number_per_minute_then_summed_up() -> None:
    now = [1000.0]
    writer = _Writer()
    access = Access(None, writer, lambda: now[0])  # type: ignore[arg-type]
    n = access_mod.REFUSALS_AUDITED_PER_MIN
    for _ in range(n + 25):
        access.refused("mallory", "set_limits", "P001", "role viewer may not set limits", "a:1")
    access.refused("mallory", "set_limits", "P001", "role viewer may not set limits", "b:2")
    assert [r.action for r in writer.rows] == ["refused"] * (n + 1)
    now[0] += access_mod.REFUSAL_WINDOW_S
    access._flush_refusals(now[0])
    summary = writer.rows[-1]
    assert (summary.action, summary.actor, summary.origin) == ("refused_summary", "mallory", "a:1")
    assert json.loads(summary.detail)["not_audited"] == 25
    assert len(writer.rows) == n + 2  # the other connection had nothing left out


async def test_patient_data_responses_are_not_cached(srv: RunningServer) -> None:
    headers = {"Authorization": f"Bearer {await login_token(srv, 'admin')}"}
    async with httpx.AsyncClient(base_url=srv.url) as http:
        for path in ("/patients", "/patients/P001/alerts", "/audit"):
            r = await http.get(path, headers=headers)
            assert r.status_code == 200 and r.headers["cache-control"] == "no-store", path
        # errors too: they may name a patient or quote what was sent
        r = await http.get("/patients/NOPE/alerts", headers=headers)
        assert r.status_code == 404 and r.headers["cache-control"] == "no-store"
        r = await http.get("/patients/P001/alerts", params={"limit": 0}, headers=headers)
        assert r.status_code == 422 and r.headers["cache-control"] == "no-store"
        r = await http.get("/patients")
        assert r.status_code == 401 and r.headers["cache-control"] == "no-store"


async def test_old_tokens_without_a_generation_count_as_generation_zero(
    srv: RunningServer,
) -> None:
    import time

    import jwt

    claims = {"sub": "viewer", "role": "viewer", "exp": time.time() + 60, "typ": "access"}
    old = jwt.encode(claims, "test-secret-" + "x" * 40, algorithm="HS256")
    async with httpx.AsyncClient(base_url=srv.url) as http:
        ok = await http.get("/patients", headers={"Authorization": f"Bearer {old}"})
        await srv.services.store.update_user("viewer", revoke_tokens=True)
        await srv.services.access.refresh()
        revoked = await http.get("/patients", headers={"Authorization": f"Bearer {old}"})
    assert (ok.status_code, revoked.status_code) == (200, 401)


def test_the_unsubscribed_message_is_part_of_the_codec() -> None:
    frame = wire.encode_text(
        wire.Unsubscribed(["patient:P001"], "forbidden", "break-glass expired")
    )
    assert wire.decode_from_server_to_client(frame) == wire.Unsubscribed(
        ["patient:P001"], "forbidden", "break-glass expired"
    )
