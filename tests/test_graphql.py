"""GraphQL over HTTP (/graphql): queries, care-team scoping, mutations through the services with
their audit, depth and cost refusals, and the DataLoader's bounded store-query count."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import event

from tests.conftest import RunningServer, login_token, start_server, stop_server, wait_until

WARD = """{ patients { id name ward offset vitals news2 openAlerts limits
  devices { id kind disabled patientId status } } }"""


@pytest.fixture
async def srv(tmp_path: Path) -> AsyncIterator[RunningServer]:
    running, task = await start_server(tmp_path, patients=3)
    await running.services.registry.create_patient("Q001", "Other Ward", "ward-b")
    await running.services.access.refresh()
    try:
        yield running
    finally:
        await stop_server(running, task)


async def gql(
    srv: RunningServer, query: str, role: str | None, variables: dict[str, Any] | None = None
) -> httpx.Response:
    headers = {"Authorization": f"Bearer {await login_token(srv, role)}"} if role else {}
    async with httpx.AsyncClient(base_url=srv.url) as http:
        return await http.post(
            "/graphql", json={"query": query, "variables": variables or {}}, headers=headers
        )


def errors(r: httpx.Response) -> list[tuple[str, str | None]]:
    return [(e["extensions"]["code"], e["extensions"].get("field")) for e in r.json()["errors"]]


async def _audit(srv: RunningServer, action: str, pid: str | None = None) -> list[dict[str, Any]]:
    await srv.services.writer.flush()
    return [r for r in await srv.services.store.audit_log(500, pid) if r["action"] == action]


async def test_patients_are_scoped_to_the_care_team_with_their_live_picture(
    srv: RunningServer,
) -> None:
    from vitalwire.sdk import DeviceClient

    did, secret, pid = srv.device(0)
    async with DeviceClient(srv.url, did, secret) as dev:
        dev.send(hr=72.0, spo2=97.0)
        await dev.flush()
    await wait_until(lambda: srv.services.streams.head(f"patient:{pid}") > 1, 10, "a reading")
    await wait_until(
        lambda: "hr" in srv.services.streams._states[f"patient:{pid}"].vitals, 10, "hr"
    )

    r = await gql(srv, WARD, "clinician")
    assert r.status_code == 200 and "errors" not in r.json(), r.text
    assert r.headers["cache-control"] == "no-store"
    patients = {p["id"]: p for p in r.json()["data"]["patients"]}
    assert set(patients) == {"P001", "P002", "P003"}  # not Q001 (ward-b)
    me = patients[pid]
    assert me["vitals"]["hr"]["value"] == 72.0, me["vitals"]
    # the device came and went: its status is the live picture's
    assert me["devices"][0]["id"] == did and me["devices"][0]["status"]["status"] == "offline"
    assert me["offset"] == srv.services.streams.head(f"patient:{pid}")
    assert me["limits"]["hr"]["high"] == 120
    admin = await gql(srv, "{ patients { id } }", "admin")
    assert {p["id"] for p in admin.json()["data"]["patients"]} == {"P001", "P002", "P003", "Q001"}
    listed = await _audit(srv, "list_patients")
    assert len(listed) == 2, listed  # one row per request

    # an out-of-team patient is not found, as one that does not exist: null, never partly
    for pid_asked in ("Q001", "NOPE"):
        r = await gql(
            srv, "query($id: String!) { patient(id: $id) { id name } }", "viewer", {"id": pid_asked}
        )
        assert r.json()["data"] == {"patient": None}, r.text
        assert errors(r) == [("not_found", "id")]
    r = await gql(srv, '{ history(patientId: "Q001") { patientId } }', "clinician")
    assert r.json()["data"] is None and errors(r) == [("not_found", "patient_id")]
    assert len(await _audit(srv, "refused", "Q001")) == 2  # both refusals audited
    r = await gql(srv, '{ patient(id: "P001") { id news2 } }', "viewer")
    assert r.json()["data"]["patient"]["id"] == "P001"

    # no token, a bad token: 401 in GraphQL's shape, nothing run
    r = await gql(srv, "{ patients { id } }", None)
    assert r.status_code == 401 and errors(r) == [("unauthenticated", "authorization")]
    async with httpx.AsyncClient(base_url=srv.url) as http:
        r = await http.post(
            "/graphql",
            json={"query": "{ patients { id } }"},
            headers={"Authorization": "Bearer nope"},
        )
    assert r.status_code == 401 and errors(r)[0][0] == "unauthenticated"
    # kept out of the OpenAPI schema (the REST fuzzing reads it)
    async with httpx.AsyncClient(base_url=srv.url) as http:
        assert "/graphql" not in (await http.get("/openapi.json")).json()["paths"]


async def test_history_alerts_events_commands_devices_and_care_teams(srv: RunningServer) -> None:
    from vitalwire.sdk import DeviceClient

    did, secret, pid = srv.device(0)
    async with DeviceClient(srv.url, did, secret) as dev:
        dev.send(temp_c=40.5)
        await dev.flush()
    svc = srv.services
    await wait_until(lambda: bool(svc.alerts._alert_patient), 10, "an alert raised")
    q = """query($p: String!) {
      history(patientId: $p, bucket: 60) { patientId bucket buckets gaps }
      alerts(patientId: $p) { items { alertId state priority } nextCursor }
      events(patientId: $p, after: 0, limit: 2) { items { offset kind } head nextCursor }
      news2History(patientId: $p) { items { offset } }
      commands(patientId: $p) { items nextCursor }
      devices { id patientId }
    }"""
    r = await gql(srv, q, "clinician", {"p": pid})
    assert "errors" not in r.json(), r.text
    data = r.json()["data"]
    assert data["history"]["bucket"] == 60.0 and data["history"]["buckets"]
    assert data["alerts"]["items"][0]["state"] == "active"
    assert [e["offset"] for e in data["events"]["items"]] == [1, 2]
    assert data["events"]["nextCursor"] is not None
    assert {d["patientId"] for d in data["devices"]} <= {"P001", "P002", "P003"}
    assert len(await _audit(srv, "vitals_history", pid)) == 1
    assert len(await _audit(srv, "list_alerts", pid)) == 1
    r = await gql(srv, "{ careTeams }", "clinician")
    assert errors(r) == [("forbidden", "role")]
    r = await gql(srv, "{ careTeams }", "admin")
    assert r.json()["data"]["careTeams"]["wardOf"]["Q001"] == "ward-b"
    r = await gql(srv, "{ alerts(limit: 5000) { nextCursor } }", "clinician")
    assert errors(r) == [("invalid_message", "limit")]
    r = await gql(srv, '{ alerts(state: "weird") { nextCursor } }', "clinician")
    assert errors(r) == [("invalid_message", "state")]


async def test_mutations_go_through_the_services_with_their_audit(srv: RunningServer) -> None:
    from vitalwire.sdk import DeviceClient

    svc = srv.services
    did, secret, pid = srv.device(0)
    set_limits = "mutation($p: String!) { setLimits(patientId: $p, limits: {hr: {high: 130}}) }"
    r = await gql(srv, set_limits, "viewer", {"p": pid})
    assert errors(r) == [("forbidden", "role")]
    assert len(await _audit(srv, "refused", pid)) == 1
    r = await gql(srv, set_limits, "clinician", {"p": "Q001"})
    assert errors(r)[0][0] == "forbidden"
    assert svc.alerts.limits("Q001")["hr"]["high"] == 120  # never changed
    r = await gql(srv, set_limits, "clinician", {"p": pid})
    assert r.json()["data"]["setLimits"]["hr"]["high"] == 130, r.text
    assert len(await _audit(srv, "set_limits", pid)) == 1

    obs = "mutation($p: String!) { recordObservations(patientId: $p, onOxygen: true, scale: 1) }"
    r = await gql(srv, obs, "clinician", {"p": pid})
    assert r.json()["data"]["recordObservations"]["on_oxygen"] is True, r.text
    assert len(await _audit(srv, "set_observations", pid)) == 1
    r = await gql(srv, obs.replace("scale: 1", "scale: 3"), "clinician", {"p": pid})
    assert errors(r) == [("invalid_message", "scale")]

    async with DeviceClient(srv.url, did, secret) as dev:
        dev.send(temp_c=40.5)
        await dev.flush()
        await wait_until(lambda: bool(svc.alerts._alert_patient), 10, "an alert raised")
        alert_id = next(iter(svc.alerts._alert_patient))
        ack = "mutation($a: String!) { acknowledgeAlert(alertId: $a) }"
        r = await gql(srv, ack, "viewer", {"a": alert_id})
        assert errors(r)[0][0] == "forbidden"
        r = await gql(srv, ack, "clinician", {"a": alert_id})
        assert r.json()["data"]["acknowledgeAlert"][0]["action"] == "acknowledged", r.text
        assert len(await _audit(srv, "ack_alert", pid)) == 1
        r = await gql(srv, ack, "clinician", {"a": "nope"})
        assert errors(r) == [("not_found", "alert_id")]

        cmd = 'mutation($p: String!) { sendCommand(patientId: $p, name: "identify") }'
        r = await gql(srv, cmd, "clinician", {"p": pid})
        assert r.json()["data"]["sendCommand"]["status"] == "queued", r.text
        assert len(await _audit(srv, "command", pid)) == 1
        cid = r.json()["data"]["sendCommand"]["command_id"]
        q = "query($c: String!) { command(commandId: $c) commands { items } }"
        r = await gql(srv, q, "viewer", {"c": cid})
        data = r.json()["data"]
        assert data["command"]["lifecycle"][0]["status"] == "queued", r.text
        assert [c["command_id"] for c in data["commands"]["items"]] == [cid]
        assert len(await _audit(srv, "read_command", pid)) == 1
        r = await gql(srv, cmd.replace("identify", "selfdestruct"), "clinician", {"p": pid})
        assert errors(r)[0][0] == "invalid_message"


async def test_depth_alias_and_cost_limits_refuse_before_anything_runs(srv: RunningServer) -> None:
    from vitalwire.transports.graphql.schema import MAX_COST, MAX_DEPTH

    q = "{ a: patients { devices { status } } }"
    assert "errors" not in (await gql(srv, q, "clinician")).json()
    # deeper than the limit: refused in validation (it names the depth), nothing resolved
    deep = "{ patients { devices { status { a { b { c { d } } } } } } }"
    r = await gql(srv, deep, "clinician")
    assert r.json()["data"] is None
    assert ("invalid_message", "query") in errors(r), r.text
    assert any(f"depth of {MAX_DEPTH}" in e["message"] for e in r.json()["errors"]), r.text
    histories = " ".join(f'h{i}: history(patientId: "P001") {{ bucket }}' for i in range(6))
    r = await gql(srv, "{ " + histories + " }", "clinician")
    assert errors(r)[0] == ("invalid_message", "query"), r.text
    assert f"at most {MAX_COST}" in r.json()["errors"][0]["message"]
    assert await _audit(srv, "vitals_history", "P001") == []  # nothing ran
    aliases = " ".join(f"p{i}: patients {{ id }}" for i in range(20))
    r = await gql(srv, "{ " + aliases + " }", "clinician")
    assert errors(r)[0][0] == "invalid_message"


def request_statements(statements: list[str]) -> list[str]:
    """The statements of the request: the server's own chores (following registry changes made
    by other processes, the access version) run beside it and are left out."""
    chores = ("registry_changes", "meta")
    return [s for s in statements if not any(c in s.lower() for c in chores)]


async def test_a_ward_query_makes_the_same_store_queries_for_3_or_30_patients(
    srv: RunningServer,
) -> None:
    svc = srv.services
    statements: list[str] = []

    def count(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        if statement.lstrip().upper().startswith("SELECT"):
            statements.append(statement)

    engine = svc.store.engine.sync_engine
    token = await login_token(srv, "clinician")

    async def ward_queries() -> int:
        await svc.writer.flush()
        statements.clear()
        event.listen(engine, "before_cursor_execute", count)
        try:
            async with httpx.AsyncClient(base_url=srv.url) as http:
                r = await http.post(
                    "/graphql", json={"query": WARD}, headers={"Authorization": f"Bearer {token}"}
                )
        finally:
            event.remove(engine, "before_cursor_execute", count)
        assert "errors" not in r.json(), r.text
        return len(r.json()["data"]["patients"])

    assert await ward_queries() == 3
    small = request_statements(statements)
    for i in range(4, 31):
        await svc.registry.create_patient(f"P{i:03d}", f"Patient {i}", "ward-a")
    await svc.access.refresh()
    assert await ward_queries() == 30
    large = request_statements(statements)
    # list_patients (patients, bindings) and list_devices: three, whatever the ward's size
    assert len(large) == len(small) == 3, [s[:90] for s in small + ["--"] + large]
