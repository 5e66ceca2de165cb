"""The edge tier in one process each side: an edge node forwards to a cloud (services/uplink.py,
services/edges.py, transports/edge_ws.py). The multi-process runs with a WAN outage, kill -9 and
a cloud restart are tests/test_edge_e2e.py."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
import websockets
from websockets.asyncio.client import connect

from tests.conftest import RunningServer, login_token, start_server, stop_server, wait_until
from vitalwire.sdk import DeviceClient, MonitorClient
from vitalwire.store import Store


async def _events(store: Store, stream: str) -> list[tuple[int, str, bytes]]:
    out = []
    after = 0
    while True:
        page = await store.events_after(stream, after, 5000)
        if not page:
            return out
        out.extend((e.offset, e.kind, e.data_json) for e in page)
        after = page[-1].offset


async def _edge_pair(tmp_path: Path, **edge: Any) -> tuple[Any, Any, Any, Any, str]:
    cloud, ctask = await start_server(tmp_path / "cloud", patients=0)
    cred = await cloud.services.registry.create_device("ward-a-gw", kind="edge")
    edge.setdefault("upstream", cloud.ws_url)
    e, etask = await start_server(
        tmp_path / "edge", patients=3, node_id="ward-a-gw", upstream_secret=cred.secret, **edge
    )
    return cloud, ctask, e, etask, cred.secret


@pytest.fixture
def dirs(tmp_path: Path) -> Path:
    (tmp_path / "cloud").mkdir()
    (tmp_path / "edge").mkdir()
    return tmp_path


async def _connected(cloud: RunningServer, e: RunningServer) -> None:
    await wait_until(lambda: e.services.uplink.connected, 15, "the uplink")
    await wait_until(lambda: "ward-a-gw" in cloud.services.edges.links, 5, "the cloud's link")


async def test_edge_streams_reach_the_cloud_with_the_edges_offsets(dirs: Path) -> None:
    cloud, ctask, e, etask, _ = await _edge_pair(dirs)
    try:
        await _connected(cloud, e)
        did, secret, pid = e.device(0)
        stream = f"patient:{pid}"
        user, pw = cloud.user("clinician")
        mon = MonitorClient(cloud.url, username=user, password=pw)
        await mon.connect()
        try:
            await wait_until(lambda: cloud.services.edges.owner(pid) == "ward-a-gw", 5, "claim")
            await mon.subscribe([stream])
            async with DeviceClient(e.url, did, secret) as dev:
                for i in range(20):
                    dev.send(spo2=97, hr=70 + i)
                await dev.flush(10)

            def offline() -> bool:  # the device's goodbye is committed at the edge
                picture = e.services.streams.picture(stream)
                return picture is not None and picture.devices[did].get("status") == "offline"

            await wait_until(offline, 10, "the device offline at the edge")
            want = await _events(e.services.store, stream)
            await wait_until(
                lambda: cloud.services.streams.head(stream) >= want[-1][0], 10, "the mirror"
            )
            got = await _events(cloud.services.store, stream)
            assert got == want  # the same events, with the same offsets and bodies
            seen = []
            while len(seen) < 20:
                ev_ = await mon.next_event()
                if ev_.kind == "reading":
                    seen.append(ev_.data["hr"])
            assert seen == [70 + i for i in range(20)]
            # the cloud shows the node, connected, nothing left behind
            token = await login_token(cloud, "clinician")
            async with httpx.AsyncClient(base_url=cloud.url) as http:
                r = await http.get("/edges", headers={"Authorization": f"Bearer {token}"})
            assert r.status_code == 200, r.text
            (node,) = r.json()["edges"]
            assert node["node"] == "ward-a-gw" and node["connected"] is True
            assert node["patients"] == 3
            async with httpx.AsyncClient(base_url=cloud.url) as http:
                r = await http.get("/patients", headers={"Authorization": f"Bearer {token}"})
            listed = {p["id"]: p for p in r.json()}
            assert listed[pid]["edge"] == {"node": "ward-a-gw", "connected": True, "since": None}
            async with httpx.AsyncClient() as http:
                cloud_metrics = (await http.get(cloud.url + "/metrics")).text
                edge_metrics = (await http.get(e.url + "/metrics")).text
            assert 'vitalwire_edge_connected{node="ward-a-gw"} 1.0' in cloud_metrics
            assert "vitalwire_uplink_connected 1.0" in edge_metrics
        finally:
            await mon.close()
    finally:
        await stop_server(e, etask)
        await stop_server(cloud, ctask)


async def test_a_wrong_secret_is_refused_and_said(dirs: Path) -> None:
    cloud, ctask = await start_server(dirs / "cloud", patients=0)
    try:
        await cloud.services.registry.create_device("gw", kind="edge")
        await cloud.services.registry.create_device("mon-x", kind="monitor")
        url = cloud.ws_url + "/ws/edge"
        async with connect(url) as ws:
            await ws.send(json.dumps({"type": "edge_hello", "node": "gw", "secret": "nope"}))
            err = json.loads(await ws.recv())
            assert err["type"] == "error" and err["code"] == "unauthenticated"
            with pytest.raises(websockets.ConnectionClosed):
                await ws.recv()
        assert ws.close_code == 4001
        mon = await cloud.services.registry.rotate_device_secret("mon-x")
        async with connect(url) as ws:  # a device that is not an edge node
            hello = {"type": "edge_hello", "node": "mon-x", "secret": mon.secret}
            await ws.send(json.dumps(hello))
            err = json.loads(await ws.recv())
            assert err["code"] == "unauthenticated" and "not an edge node" in err["message"]
    finally:
        await stop_server(cloud, ctask)


async def test_cloud_requests_go_down_and_refuse_while_unreachable(dirs: Path) -> None:
    cloud, ctask, e, etask, _ = await _edge_pair(dirs)
    try:
        await _connected(cloud, e)
        did, secret, pid = e.device(0)
        token = await login_token(cloud, "clinician")
        auth = {"Authorization": f"Bearer {token}"}
        async with httpx.AsyncClient(base_url=cloud.url, headers=auth) as http:
            await wait_until(lambda: cloud.services.edges.owner(pid) is not None, 5, "claim")
            # limits set on the cloud apply at the edge, and the cloud shows them back
            r = await http.put(f"/patients/{pid}/limits", json={"limits": {"spo2": {"low": 93}}})
            assert r.status_code == 200, r.text
            assert e.services.alerts.limits(pid)["spo2"]["low"] == 93
            # a refusal at the edge comes back with the edge's message
            r = await http.put(f"/patients/{pid}/limits", json={"limits": {"spo2": {"low": 140}}})
            assert r.status_code == 422 and "spo2" in r.json()["message"], r.text
            # a command reaches the device at the edge; its result comes back to the cloud
            async with DeviceClient(e.url, did, secret) as dev:
                dev.on_command("report_now", lambda cmd: {"ok": 1})
                r = await http.post(
                    f"/patients/{pid}/commands", json={"name": "report_now", "args": {}}
                )
                assert r.status_code in (200, 201, 202), r.text
                cid = r.json()["command"]["command_id"]
                stream = f"patient:{pid}"
                statuses: list[str] = []

                async def done() -> bool:
                    statuses[:] = [
                        json.loads(d).get("status")
                        for _, kind, d in await _events(cloud.services.store, stream)
                        if kind == "command" and json.loads(d).get("command_id") == cid
                    ]
                    return "completed" in statuses

                await until(done, 15, "the command's completion in the cloud's store")
                assert statuses == ["queued", "sent", "acknowledged", "completed"], statuses
            # the uplink drops: the cloud says the ward is unreachable and sends nothing
            await stop_server(e, etask)
            etask = None
            await wait_until(lambda: "ward-a-gw" not in cloud.services.edges.links, 5, "gone")
            r = await http.post(f"/patients/{pid}/commands", json={"name": "report_now"})
            assert r.status_code == 503, r.text
            assert "ward-a-gw is unreachable since" in r.json()["message"]
            r = await http.get("/edges")
            (node,) = r.json()["edges"]
            assert node["connected"] is False and node["down_since"] is not None
    finally:
        if etask is not None:
            await stop_server(e, etask)
        await stop_server(cloud, ctask)


async def until(pred: Callable[[], Awaitable[bool]], timeout: float, what: str) -> None:
    """Wait for an async ``pred`` to hold (it reads a store: polled), failing after ``timeout``."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not await pred():
        if loop.time() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(0.02)


async def test_the_cloud_never_writes_into_an_edges_stream(dirs: Path) -> None:
    """Binding a cloud device to an edge's patient, or discharging one at the cloud, would put
    the cloud's own events into the edge's stream: refused, naming the node."""
    cloud, ctask, e, etask, _ = await _edge_pair(dirs)
    try:
        await _connected(cloud, e)
        _, _, pid = e.device(0)
        await wait_until(lambda: cloud.services.edges.owner(pid) is not None, 5, "claim")
        await cloud.services.registry.create_device("cloud-mon", kind="monitor")
        token = await login_token(cloud, "admin")
        auth = {"Authorization": f"Bearer {token}"}
        async with httpx.AsyncClient(base_url=cloud.url, headers=auth) as http:
            r = await http.put("/admin/bindings/cloud-mon", json={"patient_id": pid})
            assert r.status_code == 409, r.text
            assert "belongs to edge node ward-a-gw" in r.json()["message"]
            r = await http.post(f"/admin/patients/{pid}/discharge")
            assert r.status_code == 409, r.text
        # nothing of the cloud's own went into the stream: it is still the edge's, event for event
        stream = f"patient:{pid}"
        await wait_until(
            lambda: cloud.services.streams.head(stream) == e.services.streams.head(stream),
            10,
            "the mirror",
        )
        assert await _events(cloud.services.store, stream) == await _events(
            e.services.store, stream
        )
    finally:
        await stop_server(e, etask)
        await stop_server(cloud, ctask)


async def test_an_edge_alert_acknowledged_and_observed_from_the_cloud(dirs: Path) -> None:
    """An alert raised at the edge shows once in the cloud; a cloud clinician acknowledges it
    (done at the edge, as ``clinician@upstream``, and mirrored back); NEWS2 observations
    recorded at the cloud are the edge's."""
    cloud, ctask, e, etask, _ = await _edge_pair(dirs)
    try:
        await _connected(cloud, e)
        did, secret, pid = e.device(0)
        stream = f"patient:{pid}"
        await wait_until(lambda: cloud.services.edges.owner(pid) is not None, 5, "claim")
        async with DeviceClient(e.url, did, secret) as dev:
            for _ in range(3):
                dev.send(spo2=70, hr=72)  # below critical_low: raised at once, no delay
            await dev.flush(10)

        def cloud_alerts() -> list[dict[str, Any]]:
            state = cloud.services.streams.picture(stream)
            return [] if state is None else state.snapshot()["alerts"]

        await wait_until(lambda: bool(cloud_alerts()), 10, "the edge's alert at the cloud")
        (alert,) = [a for a in cloud_alerts() if a["condition"].startswith("spo2")]
        token = await login_token(cloud, "clinician")
        auth = {"Authorization": f"Bearer {token}"}
        async with httpx.AsyncClient(base_url=cloud.url, headers=auth) as http:
            r = await http.post(f"/alerts/{alert['alert_id']}/acknowledge")
            assert r.status_code == 200, r.text
            assert r.json()["changes"][0]["state"] == "acknowledged"
            r = await http.post(f"/patients/{pid}/observations", json={"on_oxygen": True})
            assert r.status_code == 200, r.text
            assert r.json()["observations"]["on_oxygen"] is True
        edge_rows = await e.services.store.alerts_for(pid, 10)
        (row,) = [x for x in edge_rows if x["alert_id"] == alert["alert_id"]]
        assert row["acknowledged_by"] == "clinician@upstream"
        assert e.services.alerts._observations[pid]["on_oxygen"] is True  # the edge's own

        async def mirrored() -> bool:
            rows = await cloud.services.store.alerts_for(pid, 10)
            return any(
                x["alert_id"] == alert["alert_id"] and x["acknowledged_by"] == "clinician@upstream"
                for x in rows
            )

        await until(mirrored, 10, "the acknowledgement mirrored to the cloud")
        raised = [
            json.loads(d)
            for _, kind, d in await _events(cloud.services.store, "alerts")
            if kind == "alert"
        ]
        assert [x["action"] for x in raised if x["alert_id"] == alert["alert_id"]].count(
            "raised"
        ) == 1
    finally:
        await stop_server(e, etask)
        await stop_server(cloud, ctask)


async def test_a_discharge_at_the_edge_is_the_clouds_record_too(
    dirs: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from vitalwire.services import uplink

    monkeypatch.setattr(uplink, "PATIENTS_EVERY_S", 1.0)
    cloud, ctask, e, etask, _ = await _edge_pair(dirs)
    try:
        await _connected(cloud, e)
        _, _, pid = e.device(1)
        await wait_until(lambda: cloud.services.edges.owner(pid) is not None, 5, "claim")
        token = await login_token(e, "admin")
        async with httpx.AsyncClient(base_url=e.url) as http:
            r = await http.post(
                f"/admin/patients/{pid}/discharge", headers={"Authorization": f"Bearer {token}"}
            )
            assert r.status_code == 200, r.text

        async def discharged() -> bool:
            row = await cloud.services.store.get_patient(pid)
            return row is not None and row["discharged_at"] is not None

        await until(discharged, 10, "the discharge at the cloud")
        row = await cloud.services.store.get_patient(pid)
        assert row is not None and row["discharged_by"] == "admin@ward-a-gw"
    finally:
        await stop_server(e, etask)
        await stop_server(cloud, ctask)


async def test_an_edge_reaches_a_cloud_over_tls_with_the_hospitals_own_ca(dirs: Path) -> None:
    """``wss://`` upstream: the cloud's certificate from a private CA is trusted with
    ``upstream_cafile``; without it the edge refuses the cloud and says why."""
    import trustme

    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1")
    certfile, keyfile, cafile = dirs / "cert.pem", dirs / "key.pem", dirs / "ca.pem"
    cert.private_key_and_cert_chain_pem.write_to_path(str(certfile))
    cert.private_key_pem.write_to_path(str(keyfile))
    ca.cert_pem.write_to_path(str(cafile))
    cloud, ctask = await start_server(
        dirs / "cloud", patients=0, certfile=str(certfile), keyfile=str(keyfile)
    )
    cred = await cloud.services.registry.create_device("ward-a-gw", kind="edge")
    port = cloud.url.rsplit(":", 1)[1]
    (dirs / "edge2").mkdir()
    untrusting, utask = await start_server(
        dirs / "edge2",
        patients=1,
        upstream=f"wss://127.0.0.1:{port}",
        node_id="ward-a-gw",
        upstream_secret=cred.secret,
    )
    try:
        await wait_until(
            lambda: "CERTIFICATE_VERIFY_FAILED" in (untrusting.services.uplink.last_error or ""),
            15,
            "the edge's refusal of an unknown CA",
        )
        assert not untrusting.services.uplink.connected
    finally:
        await stop_server(untrusting, utask)
    e, etask = await start_server(
        dirs / "edge",
        patients=1,
        upstream=f"wss://127.0.0.1:{port}",
        node_id="ward-a-gw",
        upstream_secret=cred.secret,
        upstream_cafile=str(cafile),
    )
    try:
        await _connected(cloud, e)
        _, _, pid = e.device(0)
        await wait_until(lambda: cloud.services.edges.owner(pid) == "ward-a-gw", 10, "claim")
    finally:
        await stop_server(e, etask)
        await stop_server(cloud, ctask)
