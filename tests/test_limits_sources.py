"""Each alarm limit says where it comes from (issue 27, the web app's limits editor): the default
adult table, or a value set for this patient; GET and PUT /patients/{id}/limits carry `sources`."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import RunningServer, login_token, start_server, stop_server
from vitalwire.core.limits import DEFAULT_LIMITS
from vitalwire.services.alerts import limit_sources


@pytest.fixture
async def srv(tmp_path: Path) -> AsyncIterator[RunningServer]:
    running, task = await start_server(tmp_path, patients=1)
    try:
        yield running
    finally:
        await stop_server(running, task)


async def _call(srv: RunningServer, method: str, path: str, role: str, **kw: Any) -> Any:
    headers = {"Authorization": f"Bearer {await login_token(srv, role)}"}
    async with httpx.AsyncClient(base_url=srv.url) as http:
        r = await http.request(method, path, headers=headers, **kw)
    assert r.status_code == 200, r.text
    return r.json()


def test_default_table_is_all_default() -> None:
    sources = limit_sources(DEFAULT_LIMITS.to_dict())
    assert set(sources) == {row.metric for row in DEFAULT_LIMITS}
    assert {s for row in sources.values() for s in row.values()} == {"default"}


def test_changed_value_is_patient_and_the_rest_default() -> None:
    table = DEFAULT_LIMITS.to_dict()
    table["spo2"]["low"] = 88.0
    table["sbp"]["critical_high"] = 200.0
    sources = limit_sources(table)
    assert sources["spo2"]["low"] == "patient" and sources["sbp"]["critical_high"] == "patient"
    assert sources["spo2"]["critical_low"] == "default" and sources["hr"]["high"] == "default"


async def test_rest_limits_carry_sources_through_set_and_restore(srv: RunningServer) -> None:
    pid = srv.device(0)[2]
    got = await _call(srv, "GET", f"/patients/{pid}/limits", "viewer")
    assert got["sources"]["hr"] == {field: "default" for field in got["limits"]["hr"]}

    put = await _call(
        srv, "PUT", f"/patients/{pid}/limits", "clinician", json={"limits": {"hr": {"high": 130}}}
    )
    assert put["limits"]["hr"]["high"] == 130 and put["sources"]["hr"]["high"] == "patient"
    assert put["sources"]["hr"]["low"] == "default"
    got = await _call(srv, "GET", f"/patients/{pid}/limits", "viewer")
    assert got["sources"] == put["sources"]

    # null restores the default, and the source with it
    put = await _call(
        srv, "PUT", f"/patients/{pid}/limits", "clinician", json={"limits": {"hr": {"high": None}}}
    )
    assert put["limits"]["hr"]["high"] == 120 and put["sources"]["hr"]["high"] == "default"
