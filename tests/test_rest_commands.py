"""REST commands (issue 26): list them, and one command's lifecycle, after a real command ran
through a device socket."""

from __future__ import annotations

import json
from typing import Any

import httpx

from tests.conftest import RunningServer, login_token, wait_until
from tests.test_commands import answer, device, next_command


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def run_command(srv: RunningServer, http: httpx.AsyncClient, i: int) -> str:
    """A command sent over REST, delivered to device ``i``, acknowledged and completed."""
    _, _, pid = srv.device(i)
    async with device(srv, i) as dev:
        r = await http.post(
            f"/patients/{pid}/commands", json={"name": "set_interval", "args": {"interval_s": 5}}
        )
        assert r.status_code == 200, r.text
        cid: str = r.json()["command"]["command_id"]
        got = await next_command(dev)
        assert got["command_id"] == cid
        await answer(dev, cid, "acknowledged")
        await answer(dev, cid, "completed")
        await wait_until(
            lambda: srv.services.commands._open.get(cid) is None, 5, "the command to finish"
        )
    await srv.services.writer.flush()
    return cid


async def test_lifecycle_lists_every_status_with_its_time(server: RunningServer) -> None:
    h = bearer(await login_token(server, "clinician"))
    async with httpx.AsyncClient(base_url=server.url, headers=h) as http:
        cid = await run_command(server, http, 0)
        r = await http.get(f"/commands/{cid}")
        assert r.status_code == 200, r.text
        assert r.headers["cache-control"] == "no-store"
        body = r.json()
        assert body["command"]["status"] == "completed"
        assert body["command"]["args"] == {"interval_s": 5.0}
        steps = body["lifecycle"]
        assert [s["status"] for s in steps] == ["queued", "sent", "acknowledged", "completed"]
        times = [s["at"] for s in steps]
        assert times == sorted(times) and times[0] == body["command"]["created_at"]
        r = await http.get("/commands/no-such-command")
        assert (r.status_code, r.json()["field"]) == (404, "command_id")
    await server.services.writer.flush()
    rows = await server.services.store.audit_log(100)
    assert any(
        r["action"] == "read_command" and json.loads(r["detail"])["command_id"] == cid for r in rows
    )


async def test_list_filters_pages_and_keeps_to_the_users_patients(server: RunningServer) -> None:
    h = bearer(await login_token(server, "clinician"))
    async with httpx.AsyncClient(base_url=server.url, headers=h) as http:
        ids = [await run_command(server, http, i) for i in (0, 1)]
        _, _, p1 = server.device(0)
        page = (await http.get("/commands", params={"patient": p1})).json()
        assert [c["command_id"] for c in page["items"]] == [ids[0]]
        r = await http.get("/commands", params={"status": "completed", "limit": 1})
        first = r.json()
        assert [c["command_id"] for c in first["items"]] == [ids[1]]  # newest first
        second = (
            await http.get("/commands", params={"limit": 1, "cursor": first["next_cursor"]})
        ).json()
        assert [c["command_id"] for c in second["items"]] == [ids[0]]
        did, _, _ = server.device(1)
        by_device = (await http.get("/commands", params={"device": did})).json()["items"]
        assert [c["command_id"] for c in by_device] == [ids[1]]
        bad: list[tuple[dict[str, Any], str]] = [
            ({"status": "nope"}, "status"),
            ({"limit": 1001}, "limit"),
            ({"since": 10, "until": 5}, "since"),
            ({"cursor": "zz"}, "cursor"),
        ]
        for params, field in bad:
            r = await http.get("/commands", params=params)
            assert (r.status_code, r.json()["field"]) == (422, field), r.text
        r = await http.get("/commands", params={"patient": "P404"})
        assert (r.status_code, r.json()["field"]) == (404, "patient")

    # a patient outside the viewer's care team: refused (audited), their commands not listed
    svc = server.services
    await svc.registry.create_patient("PX1", "Elsewhere", "ward-z")
    await svc.access.refresh()
    viewer = bearer(await login_token(server, "viewer"))
    async with httpx.AsyncClient(base_url=server.url, headers=viewer) as http:
        listed = (await http.get("/commands")).json()["items"]
        assert {c["command_id"] for c in listed} == set(ids)
        r = await http.get("/commands", params={"patient": "PX1"})
        assert r.status_code == 403
        r = await http.get("/commands")
        assert r.status_code == 200
    async with httpx.AsyncClient(base_url=server.url) as anonymous:
        assert (await anonymous.get("/commands")).status_code == 401
    await svc.writer.flush()
    refused = [r for r in await svc.store.audit_log(200) if r["action"] == "refused"]
    assert any(json.loads(r["detail"])["action"] == "list_commands" for r in refused)
