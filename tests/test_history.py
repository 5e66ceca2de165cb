"""Vitals history (issue 26): ``GET /patients/{id}/vitals``, raw pages or buckets, gap markers;
the store's range reads on SQLite and PostgreSQL."""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import pytest_asyncio

from tests.conftest import RunningServer, login_token, start_server, stop_server, wait_until
from tests.test_store import fresh_postgres_db
from vitalwire.sdk import DeviceClient
from vitalwire.store import Store
from vitalwire.store.base import Batch
from vitalwire.store.sql import SqlStore
from vitalwire.wire import Event

# -- the store -----------------------------------------------------------------------------------


@pytest.fixture(params=["sqlite", "postgresql"])
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Store]:
    async with contextlib.AsyncExitStack() as stack:
        if request.param == "postgresql":
            url = await stack.enter_async_context(fresh_postgres_db())
        else:
            url = f"sqlite:///{tmp_path / 'store.db'}"
        s: Store = SqlStore(url)
        await s.open()
        try:
            yield s
        finally:
            await s.close()


async def test_readings_and_statuses_between_times_in_ts_then_offset_order(store: Store) -> None:
    b = Batch()
    # offsets 1..12; ts out of offset order (two share ts 105), a status among them, another stream
    stamps = [100, 101, 105, 102, 105, 103, 110, 111, 99, 104, 120, 106]
    for off, ts in enumerate(stamps, 1):
        kind = "device_status" if off == 7 else "reading"
        data = {"device": "d1", "status": "offline"} if off == 7 else {"hr": float(off)}
        b.events.append(Event.new("patient:P1", off, kind, float(ts), data))
    b.events.append(Event.new("patient:P2", 1, "reading", 101.0, {"hr": 1.0}))
    await store.write_batch(b)

    got = await store.readings_between("patient:P1", 100.0, 111.0, None, 100)
    order = [(e.ts, e.offset) for e in got]
    expected = sorted(
        (float(ts), off)
        for off, ts in enumerate(stamps, 1)
        if off != 7 and 100 <= ts < 111  # [from, to): 99, 111 and 120 are out
    )
    assert order == expected
    # walking with the (ts, offset) cursor, two at a time: every one once, in order
    walked: list[tuple[float, int]] = []
    after = None
    while True:
        page = await store.readings_between("patient:P1", 100.0, 111.0, after, 2)
        walked += [(e.ts, e.offset) for e in page]
        if len(page) < 2:
            break
        after = (page[-1].ts, page[-1].offset)
    assert walked == expected
    status = await store.status_between("patient:P1", 100.0, 111.0)
    assert [(e.offset, e.data["status"]) for e in status] == [(7, "offline")]
    assert await store.status_between("patient:P1", 111.0, 200.0) == []


# -- the route, end to end -----------------------------------------------------------------------


@pytest.fixture
async def srv(tmp_path: Path) -> AsyncIterator[RunningServer]:
    running, task = await start_server(tmp_path, patients=2)
    try:
        yield running
    finally:
        await stop_server(running, task)


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def shared_srv(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[RunningServer]:
    """One server for the tests that only read (bad parameters, the OpenAPI document): they and
    this fixture run on the module's event loop."""
    running, task = await start_server(tmp_path_factory.mktemp("history"), patients=2)
    try:
        yield running
    finally:
        await stop_server(running, task)


async def _get(srv: RunningServer, token: str, pid: str, **params: Any) -> httpx.Response:
    async with httpx.AsyncClient(base_url=srv.url) as http:
        return await http.get(
            f"/patients/{pid}/vitals",
            params=params,
            headers={"Authorization": f"Bearer {token}"},
        )


async def _readings(srv: RunningServer, pid: str) -> int:
    events = await srv.services.store.events_after(f"patient:{pid}", 0, 10_000)
    return sum(e.kind == "reading" for e in events)


async def test_raw_pages_buckets_and_gaps_end_to_end(srv: RunningServer) -> None:
    did, secret, pid = srv.device(0)
    t0 = time.time() - 1
    hrs = [60.0, 75.5, 58.0, 91.0, 66.0, 70.0, 82.0]
    spo2 = [97.0, 95.0, 99.0]
    async with DeviceClient(srv.url, did, secret) as dev:
        for i, hr in enumerate(hrs):
            values: dict[str, Any] = {"hr": hr}
            if i < len(spo2):
                values["spo2"] = spo2[i]
            dev.send(values)
        dev.send(hr=50.0, ts=time.time() - 120)  # late (> reading_late_s 60 s): stored, marked
        await dev.flush()
    hrs.append(50.0)
    # closing the device makes its offline marker; reconnecting, its online one
    await wait_until(lambda: not srv.services.ingest.sessions, 10, "the device gone")
    async with DeviceClient(srv.url, did, secret) as dev:
        dev.send(hr=64.0)
        await dev.flush()
    hrs.append(64.0)
    await srv.services.writer.flush()
    await wait_until(lambda: not srv.services.ingest.sessions, 10, "the device gone again")
    await srv.services.writer.flush()
    assert await _readings(srv, pid) == len(hrs)
    t1 = time.time() + 1

    token = await login_token(srv, "clinician")
    # raw: pages of 3, walked by the cursor: every reading once, in order
    seen: list[dict[str, Any]] = []
    params: dict[str, Any] = {"from": t0, "to": t1, "limit": 3}
    pages = 0
    while True:
        r = await _get(srv, token, pid, **params)
        assert r.status_code == 200, r.text
        assert r.headers["cache-control"] == "no-store"
        body = r.json()
        assert len(body["items"]) <= 3 and body["buckets"] is None
        seen += body["items"]
        pages += 1
        if body["next_cursor"] is None:
            break
        params = {"cursor": body["next_cursor"], "limit": 3}
    assert pages >= 4
    offsets = [p["offset"] for p in seen]
    assert len(offsets) == len(set(offsets)) == len(hrs)
    assert [(p["ts"], p["offset"]) for p in seen] == sorted((p["ts"], p["offset"]) for p in seen)
    assert sorted(p["values"]["hr"] for p in seen) == sorted(hrs)
    assert sum("spo2" in p["values"] for p in seen) == len(spo2)
    assert [p["values"]["hr"] for p in seen if p["late"]] == [50.0]
    assert {p["device"] for p in seen} == {did}

    # gaps: offline then online, within the range
    statuses = [g["status"] for g in body["gaps"]]
    assert statuses[:3] == ["online", "offline", "online"], body["gaps"]

    # one metric only
    r = await _get(srv, token, pid, **{"from": t0, "to": t1, "metrics": "spo2", "limit": 100})
    assert r.status_code == 200, r.text
    assert [sorted(p["values"]) for p in r.json()["items"]] == [["spo2"]] * len(spo2)
    # ...paged: a page is filled past readings without it, and none is missed
    got_spo2: list[float] = []
    params = {"from": t0, "to": t1, "metrics": "spo2", "limit": 2}
    while True:
        body = (await _get(srv, token, pid, **params)).json()
        got_spo2 += [p["values"]["spo2"] for p in body["items"]]
        if body["next_cursor"] is None:
            break
        params = {"cursor": body["next_cursor"], "metrics": "spo2", "limit": 2}
    assert got_spo2 == spo2

    # buckets of 1 s: computed independently from the raw points
    r = await _get(srv, token, pid, **{"from": t0, "to": t1, "bucket": 1, "metrics": "hr,spo2"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["items"] == [] and body["next_cursor"] is None and body["bucket"] == 1
    want: dict[float, dict[str, list[float]]] = {}
    for p in seen:  # seen is in (ts, offset) order: the last value is the bucket's last
        start = t0 + ((p["ts"] - t0) // 1) * 1
        for m, v in p["values"].items():
            want.setdefault(start, {}).setdefault(m, []).append(v)
    got = {b["start"]: b["metrics"] for b in body["buckets"]}
    assert sorted(got) == pytest.approx(sorted(want))
    for (start, per), (gstart, gper) in zip(sorted(want.items()), sorted(got.items()), strict=True):
        assert gstart == pytest.approx(start)
        assert set(gper) == set(per)
        for m, vs in per.items():
            assert gper[m] == {
                "min": min(vs),
                "max": max(vs),
                "mean": pytest.approx(sum(vs) / len(vs)),
                "count": len(vs),
                "last": vs[-1],
            }
    # one bucket over the whole range holds every reading
    r = await _get(srv, token, pid, **{"from": t0, "to": t1, "bucket": t1 - t0})
    (whole,) = r.json()["buckets"]
    assert whole["metrics"]["hr"]["count"] == len(hrs)
    assert (whole["metrics"]["hr"]["min"], whole["metrics"]["hr"]["max"]) == (50.0, 91.0)
    assert whole["metrics"]["hr"]["last"] == seen[-1]["values"]["hr"]

    # the reads were audited
    await srv.services.writer.flush()
    rows = await srv.services.store.audit_log(100, pid)
    assert any(row["action"] == "vitals_history" for row in rows), rows


async def test_out_of_care_is_403_and_audited_unknown_is_404(srv: RunningServer) -> None:
    svc = srv.services
    await svc.registry.create_patient("Q001", "Other Ward", "ward-b")
    await svc.access.refresh()
    for role in ("clinician", "viewer"):
        r = await _get(srv, await login_token(srv, role), "Q001")
        assert r.status_code == 403, r.text
        assert r.json()["code"] == "forbidden"
    r = await _get(srv, await login_token(srv, "clinician"), "NOPE")
    assert (r.status_code, r.json()["code"], r.json()["field"]) == (404, "not_found", "patient_id")
    await svc.writer.flush()
    rows = await svc.store.audit_log(100, "Q001")
    refused = [row for row in rows if row["action"] == "refused"]
    assert len(refused) == 2, rows
    async with httpx.AsyncClient(base_url=srv.url) as http:
        r = await http.get(f"/patients/{srv.device(0)[2]}/vitals")
    assert (r.status_code, r.json()["code"]) == (401, "unauthenticated"), r.text


@pytest.mark.parametrize(
    ("params", "field", "bound"),
    [
        ({"from": 200, "to": 100}, "from", "before"),
        ({"from": 0, "to": 8 * 86400}, "from", "604800"),
        ({"from": 0, "to": 100, "bucket": 0.5}, "bucket", "1 s"),
        ({"from": 0, "to": 100, "bucket": 101}, "bucket", "100 s"),
        ({"from": 0, "to": 86400, "bucket": 10}, "bucket", "2000"),
        ({"metrics": "hr,bogus"}, "metrics", "bogus"),
        ({"limit": 1001}, "limit", "1000"),
        ({"limit": 0}, "limit", "1"),
        ({"cursor": "not-a-cursor!"}, "cursor", "cursor"),
        ({"from": "nan", "to": 100}, "from", "finite"),
    ],
)
@pytest.mark.asyncio(loop_scope="module")
async def test_bad_parameters_are_422_naming_the_field(
    shared_srv: RunningServer, params: dict[str, Any], field: str, bound: str
) -> None:
    srv = shared_srv
    r = await _get(srv, await login_token(srv, "clinician"), srv.device(0)[2], **params)
    assert r.status_code == 422, r.text
    body = r.json()
    assert (body["code"], body["field"]) == ("invalid_message", field), body
    assert bound in body["message"], body


@pytest.mark.asyncio(loop_scope="module")
async def test_the_route_is_documented_with_its_errors(shared_srv: RunningServer) -> None:
    async with httpx.AsyncClient(base_url=shared_srv.url) as http:
        spec = (await http.get("/openapi.json")).json()
    op = spec["paths"]["/patients/{patient_id}/vitals"]["get"]
    assert {"200", "401", "403", "404", "422"} <= set(op["responses"])
    names = {p["name"] for p in op["parameters"]}
    assert {"from", "to", "metrics", "bucket", "cursor", "limit"} <= names
