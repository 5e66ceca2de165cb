"""FHIR R4 at /fhir (issue 26), end to end on a real server: every resource returned validates
with the fhir.resources R4B models, over a replayed BIDMC recording and edge cases; paging,
date bounds, scoping, audit, errors as OperationOutcome, the CapabilityStatement."""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from fhir.resources.R4B.bundle import Bundle
from fhir.resources.R4B.capabilitystatement import CapabilityStatement
from fhir.resources.R4B.device import Device
from fhir.resources.R4B.observation import Observation
from fhir.resources.R4B.operationoutcome import OperationOutcome
from fhir.resources.R4B.patient import Patient

from tests.conftest import RunningServer, login_token, need_data, start_server, stop_server
from vitalwire.sdk import DeviceClient
from vitalwire.simulator import SimDevice, read_bidmc, replay_file

FHIR_JSON = "application/fhir+json"


@pytest.fixture
async def srv(tmp_path: Path) -> AsyncIterator[RunningServer]:
    running, task = await start_server(tmp_path, patients=2)
    try:
        yield running
    finally:
        await stop_server(running, task)


async def _get(srv: RunningServer, path: str, token: str | None, **params: Any) -> httpx.Response:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    async with httpx.AsyncClient(base_url=srv.url) as http:
        r = await http.get(path, params=params, headers=headers)
    assert r.headers["content-type"].startswith(FHIR_JSON), r.text
    return r


def _bundle(r: httpx.Response) -> dict[str, Any]:
    assert r.status_code == 200, r.text
    assert r.headers["cache-control"] == "no-store"
    body: dict[str, Any] = r.json()
    Bundle.model_validate(body)
    for e in body.get("entry", ()):
        model = {"Observation": Observation, "Patient": Patient, "Device": Device}
        model[e["resource"]["resourceType"]].model_validate(e["resource"])
    return body


def _outcome(r: httpx.Response, status: int, code: str, field: str | None = None) -> str:
    assert r.status_code == status, r.text
    body = r.json()
    OperationOutcome.model_validate(body)
    issue = body["issue"][0]
    assert issue["details"]["coding"][0]["code"] == code
    if field is not None:
        assert issue["expression"] == [field], issue
    return str(issue["diagnostics"])


async def _walk(srv: RunningServer, token: str, path: str, **params: Any) -> list[dict[str, Any]]:
    """Follow ``next`` links to the end: every resource of every page, in order."""
    got: list[dict[str, Any]] = []
    r = await _get(srv, path, token, **params)
    while True:
        body = _bundle(r)
        got += [e["resource"] for e in body.get("entry", ())]
        nxt = [link["url"] for link in body["link"] if link["relation"] == "next"]
        if not nxt:
            return got
        assert nxt[0].startswith(srv.url + "/fhir/")
        async with httpx.AsyncClient() as http:
            r = await http.get(nxt[0], headers={"Authorization": f"Bearer {token}"})


async def _audit_rows(srv: RunningServer, pid: str, action: str) -> list[dict[str, Any]]:
    await srv.services.writer.flush()
    rows = await srv.services.store.audit_log(10_000, pid)
    return [r for r in rows if r["action"] == action]


async def test_replayed_recording_searched_paged_read_and_everything(srv: RunningServer) -> None:
    path = need_data() / "bidmc_01_Numerics.csv"
    rows = read_bidmc(path)
    did, secret, pid = srv.device(0)
    t0 = time.time() - 1
    client = await replay_file(srv.url, SimDevice(did, secret, pid), path, speed=0)
    assert client.acked == len(rows)
    await srv.services.writer.flush()
    t1 = time.time() + 1
    token = await login_token(srv, "clinician")
    expected = sum(sum(k in row for k in ("spo2", "hr", "pulse", "rr")) for row in rows)
    since = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t0))
    until = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t1 + 1))
    window = {"date": [f"ge{since}", f"lt{until}"]}

    before = len(await _audit_rows(srv, pid, "vitals_history"))
    obs = await _walk(srv, token, "/fhir/Observation", patient=pid, _count=37, **window)
    ids = [o["id"] for o in obs]
    assert len(ids) == len(set(ids)) == expected  # every observation once
    pages = -(-expected // 37)
    # one audit row per request (a page of readings can take two requests to send)
    audited = len(await _audit_rows(srv, pid, "vitals_history")) - before
    assert pages <= audited <= 2 * pages
    assert [o["issued"] for o in obs] == sorted(o["issued"] for o in obs)
    hr_values = [
        o["valueQuantity"]["value"] for o in obs if o["code"]["coding"][0]["code"] == "8867-4"
    ]
    assert hr_values == [row["hr"] for row in rows if "hr" in row]
    spo2 = [o for o in obs if o["id"].endswith("-spo2")]
    assert spo2 and all(
        [c["code"] for c in o["code"]["coding"]] == ["59408-5", "2708-6"] for o in spo2
    )
    assert {o["device"]["reference"] for o in obs} == {f"Device/{did}"}

    # one code, as a token with its system: the same heart rates
    hr = await _walk(
        srv, token, "/fhir/Observation", patient=f"Patient/{pid}", code="http://loinc.org|8867-4",
        _count=1000, **window,
    )  # fmt: skip
    assert [o["valueQuantity"]["value"] for o in hr] == hr_values

    # date bounds at an exact instant: ge/le on an observation's issued time include it, gt not
    some = obs[len(obs) // 2]
    exact = await _walk(
        srv,
        token,
        "/fhir/Observation",
        patient=pid,
        date=[f"ge{some['issued']}", f"le{some['issued']}"],
    )
    assert some["id"] in {o["id"] for o in exact}
    assert all(o["issued"] == some["issued"] for o in exact)
    after = await _walk(
        srv, token, "/fhir/Observation", patient=pid, date=[f"gt{some['issued']}", f"lt{until}"],
        _count=1000,
    )  # fmt: skip
    assert some["id"] not in {o["id"] for o in after}
    assert len(after) == sum(o["issued"] > some["issued"] for o in obs)

    # a read by id gives what the search gave
    r = await _get(srv, f"/fhir/Observation/{some['id']}", token)
    assert r.status_code == 200 and r.headers["cache-control"] == "no-store"
    assert Observation.model_validate(r.json()) and r.json() == some

    # $everything: the patient, the bound device, then every observation once
    every = await _walk(
        srv, token, f"/fhir/Patient/{pid}/$everything", start=since, end=until, _count=500
    )
    assert [e["resourceType"] for e in every[:2]] == ["Patient", "Device"]
    assert every[0]["id"] == pid and every[1]["id"] == did
    assert [o["id"] for o in every[2:]] == ids


async def test_edge_cases_validate_and_errors_name_the_parameter(srv: RunningServer) -> None:
    did, secret, pid = srv.device(0)
    t0 = time.time() - 1
    async with DeviceClient(srv.url, did, secret) as dev:
        dev.send(hr=70.0)  # one metric
        dev.send(sbp=120.0, dbp=80.0)  # the BP panel
        dev.send(sbp=130.0)  # a panel missing its diastolic
        dev.send(temp_c=36.6, rr=14.0)
        await dev.flush()
    await srv.services.writer.flush()
    token = await login_token(srv, "clinician")
    all_obs = await _walk(srv, token, "/fhir/Observation", patient=pid, _count=2)
    assert [o["id"].rsplit("-", 1)[1] for o in all_obs] == ["hr", "bp", "bp", "rr", "temp"]
    bp = await _walk(srv, token, "/fhir/Observation", patient=pid, code="85354-9")
    assert [[c.get("valueQuantity", {}).get("value") for c in o["component"]] for o in bp] == [
        [120.0, 80.0],
        [130.0, None],
    ]
    assert bp[1]["component"][1]["dataAbsentReason"]["coding"][0]["code"] == "not-performed"
    temp = await _walk(srv, token, "/fhir/Observation", patient=pid, code="8310-5,9279-1")
    assert [(o["valueQuantity"]["value"], o["valueQuantity"]["code"]) for o in temp] == [
        (14.0, "/min"),
        (36.6, "Cel"),
    ]
    # the last page has no next link; an empty search is an empty Bundle
    body = _bundle(await _get(srv, "/fhir/Observation", token, patient=pid, _count=5))
    assert [link["relation"] for link in body["link"]] == ["self"] and len(body["entry"]) == 5
    body = _bundle(await _get(srv, "/fhir/Observation", token, patient=pid, date="lt2001-01-01"))
    assert body["entry"] == []
    soon = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() + 3600))
    body = _bundle(await _get(srv, "/fhir/Observation", token, patient=pid, date=f"ge{soon}"))
    assert body["entry"] == [] and [link["relation"] for link in body["link"]] == ["self"]
    early = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t0 - 120))
    body = _bundle(await _get(srv, "/fhir/Observation", token, patient=pid, date=f"le{early}"))
    assert body["entry"] == []

    obs = "/fhir/Observation"
    bad: list[tuple[dict[str, Any], str]] = [
        ({"date": "yesterday"}, "date"),
        ({"date": "ge2026-12-05T10:00:00"}, "date"),  # a time needs its zone
        ({"_lastUpdated": "gt2026-99"}, "_lastUpdated"),
        ({"date": "ge2001-01-01"}, "date"),  # more than 7 days up to now
        ({"code": "1234-5"}, "code"),
        ({"code": "http://snomed.info/sct|8867-4"}, "code"),
        ({"_sort": "date"}, "_sort"),  # strict: an unsupported parameter is named
        ({"_count": 0}, "_count"),
        ({"_count": 1001}, "_count"),
        ({"_cursor": "zz"}, "_cursor"),
        ({"subject": pid}, "patient"),  # patient and subject: one of them, once
    ]
    for params, field in bad:
        r = await _get(srv, obs, token, patient=pid, **params)
        msg = _outcome(r, 400, "invalid_message", field)
        assert r.headers["cache-control"] == "no-store"
        if params == {"date": "ge2001-01-01"}:
            assert "7 days" in msg  # the service's bound, named
    _outcome(await _get(srv, obs, token), 400, "invalid_message", "patient")
    # _lastUpdated is the receive time too: at or after the last reading's, that reading only
    last = all_obs[-1]["meta"]["lastUpdated"]
    tail = await _walk(srv, token, obs, patient=pid, _lastUpdated=f"ge{last}")
    assert {o["meta"]["lastUpdated"] for o in tail} == {last}
    assert [o["id"] for o in tail] == [o["id"] for o in all_obs if o["issued"] == last]
    _outcome(await _get(srv, f"{obs}/{pid}-999999-hr", token), 404, "not_found")
    _outcome(await _get(srv, f"{obs}/nonsense", token), 404, "not_found")
    _outcome(await _get(srv, "/fhir/Encounter", token), 404, "not_found")
    async with httpx.AsyncClient(base_url=srv.url) as http:  # read-only: a write is 405
        r = await http.post("/fhir/Patient", json={"resourceType": "Patient"})
    assert r.headers["content-type"].startswith(FHIR_JSON)
    _outcome(r, 405, "method_not_allowed")

    # a discharged patient (admin reads it): active false, validates
    await srv.services.store.discharge_patient(pid, time.time(), "tests")
    await srv.services.access.refresh()
    admin = await login_token(srv, "admin")
    r = await _get(srv, f"/fhir/Patient/{pid}", admin)
    assert r.status_code == 200 and Patient.model_validate(r.json()).active is False
    body = _bundle(await _get(srv, "/fhir/Patient", admin, active="false"))
    assert [e["resource"]["id"] for e in body["entry"]] == [pid] and body["total"] == 1
    assert len(await _walk(srv, admin, obs, patient=pid)) == 5  # its history stays readable


async def test_scoping_audit_anonymous_and_metadata(srv: RunningServer) -> None:
    did, _, pid = srv.device(0)
    now = time.time()
    await srv.services.store.create_patient("Q900", "Other Ward", "ward-b", now)
    await srv.services.access.refresh()
    viewer = await login_token(srv, "viewer")

    # Patient search lists the in-team patients only; reads of them validate
    body = _bundle(await _get(srv, "/fhir/Patient", viewer, _count=1))
    assert body["total"] == 2 and len(body["entry"]) == 1
    listed = await _walk(srv, viewer, "/fhir/Patient", _count=1)
    assert sorted(p["id"] for p in listed) == [srv.device(0)[2], srv.device(1)[2]]
    r = await _get(srv, f"/fhir/Patient/{pid}", viewer)
    assert r.status_code == 200 and Patient.model_validate(r.json()).id == pid
    none = _bundle(await _get(srv, "/fhir/Patient", viewer, _lastUpdated="lt2001"))
    assert none["total"] == 0 and none["entry"] == []
    since = "ge" + time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(now - 600))  # provisioned
    body = _bundle(await _get(srv, "/fhir/Patient", viewer, _lastUpdated=since, _id=pid))
    assert [e["resource"]["id"] for e in body["entry"]] == [pid]
    r = await _get(srv, f"/fhir/Device/{did}", viewer)
    assert r.status_code == 200
    assert Device.model_validate(r.json()).patient.reference == f"Patient/{pid}"
    reads = await _audit_rows(srv, pid, "fhir_read")
    assert [json.loads(a["detail"])["resource"] for a in reads[:2]] == ["Device", "Patient"]

    # another ward's patient is not found, like an unknown one; the refusal is audited
    for path in (
        "/fhir/Patient/Q900",
        "/fhir/Patient/Q900/$everything",
        "/fhir/Observation/Q900-1-hr",
        "/fhir/Patient/NOPE",
    ):
        _outcome(await _get(srv, path, viewer), 404, "not_found")
    _outcome(await _get(srv, "/fhir/Observation", viewer, patient="Q900"), 404, "not_found")
    refused = await _audit_rows(srv, "Q900", "refused")
    assert len(refused) == 4
    admin = await login_token(srv, "admin")
    r = await _get(srv, "/fhir/Patient/Q900", admin)
    assert r.status_code == 200 and Patient.model_validate(r.json()).active is True

    # anonymous: 401 OperationOutcome, with the challenge
    for path in ("/fhir/Patient", f"/fhir/Patient/{pid}", "/fhir/Observation"):
        r = await _get(srv, path, None)
        _outcome(r, 401, "unauthenticated")
        assert r.headers["www-authenticate"] == "Bearer"
    r = await _get(srv, "/fhir/Patient", "not-a-token")
    _outcome(r, 401, "unauthenticated")

    # metadata: public, a CapabilityStatement listing exactly what is implemented
    r = await _get(srv, "/fhir/metadata", None)
    assert r.status_code == 200
    cs = CapabilityStatement.model_validate(r.json())
    resources = {res.type: res for res in cs.rest[0].resource}
    assert set(resources) == {"Patient", "Device", "Observation"}
    assert {p.name for p in resources["Observation"].searchParam} == {
        "patient", "subject", "code", "date", "_lastUpdated", "_count",
    }  # fmt: skip
    assert [i.code for i in resources["Device"].interaction] == ["read", "search-type"]
    assert {p.name for p in resources["Device"].searchParam} == {"_id", "patient", "_count"}


async def test_device_search_is_scoped_paged_and_filtered_by_patient(srv: RunningServer) -> None:
    (d0, _, p0), (d1, _, p1) = srv.device(0), srv.device(1)
    svc = srv.services
    now = time.time()
    await svc.store.create_patient("Q901", "Other Ward", "ward-b", now)
    await svc.registry.create_device("other-mon", "monitor")
    await svc.registry.bind("other-mon", "Q901")
    await svc.registry.create_device("spare-mon", "monitor")  # bound to nobody
    await svc.access.refresh()
    viewer = await login_token(srv, "viewer")
    admin = await login_token(srv, "admin")

    # a viewer sees the devices of their patients only, each with its patient, page by page
    seen = await _walk(srv, viewer, "/fhir/Device", _count=1)
    assert sorted((d["id"], d["patient"]["reference"]) for d in seen) == sorted(
        [(d0, f"Patient/{p0}"), (d1, f"Patient/{p1}")]
    )
    # an admin every device (the unbound one without a patient)
    every = {d["id"]: d for d in await _walk(srv, admin, "/fhir/Device", _count=2)}
    assert {d0, d1, "other-mon", "spare-mon"} <= set(every)
    assert "patient" not in every["spare-mon"]
    # by patient; by id
    body = _bundle(await _get(srv, "/fhir/Device", viewer, patient=f"Patient/{p1}"))
    assert [e["resource"]["id"] for e in body["entry"]] == [d1]
    body = _bundle(await _get(srv, "/fhir/Device", admin, _id="other-mon,spare-mon"))
    assert sorted(e["resource"]["id"] for e in body["entry"]) == ["other-mon", "spare-mon"]
    # another ward's patient is not found for the viewer; a bad parameter is a 400 naming it
    _outcome(await _get(srv, "/fhir/Device", viewer, patient="Q901"), 404, "not_found")
    _outcome(await _get(srv, "/fhir/Device", viewer, kind="x"), 400, "invalid_message", "kind")
    _outcome(await _get(srv, "/fhir/Device", viewer, patient="a b"), 400, "invalid_message")
    searched = await _audit_rows(srv, p1, "fhir_search")
    assert searched and json.loads(searched[0]["detail"])["devices"] == [d1]
