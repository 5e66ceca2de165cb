"""The edge tier as it runs: a cloud and two edge nodes as real processes, each edge's uplink
through a TCP proxy the test can cut (a WAN outage), devices streaming to the edges all along.

After each disruption (an outage under load; an edge killed with -9 during an outage; the cloud
killed with -9 and restarted), with the load going on: every event of every edge stream is in
the cloud's store once, in order, with the edge's offsets and bodies. At the end: every (device,
seq) the devices sent once at the cloud; each alert raised once, at the edge, and each of its
changes once in the cloud's ``alerts`` stream; a cloud clinician's command reaches a device on an
edge and its result comes back."""

from __future__ import annotations

import asyncio
import json
import signal
from collections import Counter
from pathlib import Path
from typing import Any

import httpx

from tests.conftest import ServerProcess, free_port, provision_db
from tests.netproxy import Proxy
from tests.test_edge import until
from vitalwire.provision import provision_ward
from vitalwire.sdk import DeviceClient
from vitalwire.services import auth
from vitalwire.store import open_store

NODES = ("gw-a", "gw-b")
#: Each edge's ward: the cloud's provisioned clinician cares for ward-a (provision_ward's default)
WARDS = {"gw-a": "ward-a", "gw-b": "ward-b"}


async def _stream_events(db: str, stream: str) -> list[tuple[int, str, str]]:
    store = open_store(db)
    await store.open()
    try:
        out: list[tuple[int, str, str]] = []
        after = 0
        while True:
            page = await store.events_after(stream, after, 5000)
            if not page:
                return out
            out.extend((e.offset, e.kind, e.data_json.decode()) for e in page)
            after = page[-1].offset
    finally:
        await store.close()


async def _heads(db: str) -> dict[str, int]:
    store = open_store(db)
    await store.open()
    try:
        return {s: h for s, h in (await store.stream_heads()).items() if s.startswith("patient:")}
    finally:
        await store.close()


class Ward:
    """An edge node, its proxy to the cloud, and its devices streaming from the test."""

    def __init__(self, tmp: Path, node: str, secret: str, cloud_port: int) -> None:
        self.node = node
        self.db = f"sqlite:///{tmp / (node + '.db')}"
        self.secret = secret
        self.proxy = Proxy("127.0.0.1", cloud_port)
        self.proc: ServerProcess | None = None
        self.tmp = tmp
        self.devices: list[dict[str, str]] = []
        self.clients: list[DeviceClient] = []
        self.sent: Counter[str] = Counter()
        self.spo2 = 97.0
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        if self.proc is None:
            await self.proxy.start()
            creds = await provision_db_ward(self.db, self.node)
            self.devices = creds
            self.port = free_port()
        (self.tmp / self.node).mkdir(exist_ok=True)
        self.proc = ServerProcess(
            self.db,
            self.port,
            self.tmp / self.node,
            upstream=f"ws://127.0.0.1:{self.proxy.port}",
            node_id=self.node,
            upstream_secret=self.secret,
        )
        await self.proc.start()

    def stream(self) -> None:
        self.clients = [
            DeviceClient(f"http://127.0.0.1:{self.port}", d["device_id"], d["secret"])
            for d in self.devices
        ]
        for c in self.clients:
            c.on_command("report_now", lambda cmd: {"reported": True})
        self._task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        for c in self.clients:
            await c.start()
        while True:
            for c in self.clients:
                c.send(spo2=self.spo2, hr=72, rr=16)
                self.sent[c.device_id] += 1
            await asyncio.sleep(0.05)

    async def stop_streaming(self) -> None:
        assert self._task is not None
        self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)
        for c in self.clients:
            await c.flush(30)
            await c.close()


async def provision_db_ward(db: str, node: str) -> list[dict[str, str]]:
    store = open_store(db)
    await store.open()
    try:
        creds = await provision_ward(
            store, patients=2, ward=WARDS[node], prefix=node + "-", users=()
        )
        return creds.devices
    finally:
        await store.close()


async def _mirrored(ward: Ward, cloud_db: str) -> None:
    """Wait until the cloud holds every stream of the edge up to the edge's head; then compare
    them event by event."""
    edge_heads = await _heads(ward.db)
    assert edge_heads, "the edge has no streams"

    async def caught_up() -> bool:
        cloud = await _heads(cloud_db)
        return all(cloud.get(s, 0) >= h for s, h in edge_heads.items())

    await until(caught_up, 60, f"the cloud to catch up with {ward.node}")
    for stream in edge_heads:
        edge = await _stream_events(ward.db, stream)
        cloud = await _stream_events(cloud_db, stream)
        assert cloud[: len(edge)] == edge, f"{stream}: the cloud's copy differs"
        assert [o for o, _, _ in cloud] == list(range(1, len(cloud) + 1))


async def _readings_once(ward: Ward, cloud_db: str) -> None:
    """Every reading the devices were acknowledged for is in the cloud once, in seq order."""
    for d in ward.devices:
        events = await _stream_events(cloud_db, f"patient:{d['patient_id']}")
        seqs = [
            json.loads(body)["seq"]
            for _, kind, body in events
            if kind == "reading" and json.loads(body).get("device") == d["device_id"]
        ]
        assert len(seqs) == len(set(seqs)), f"{d['device_id']}: a reading twice in the cloud"
        assert seqs == sorted(seqs)
        assert len(seqs) == ward.sent[d["device_id"]], (len(seqs), ward.sent[d["device_id"]])


async def test_cloud_and_two_edges_through_outage_kill_and_restart(tmp_path: Path) -> None:
    cloud_db = f"sqlite:///{tmp_path / 'cloud.db'}"
    users = await provision_db(cloud_db, patients=0)
    secrets: dict[str, str] = {}
    store = open_store(cloud_db)
    await store.open()
    try:
        for node in NODES:
            secrets[node] = auth.new_device_secret()
            await store.create_device(node, auth.hash_device_secret(secrets[node]), "edge", 0.0)
    finally:
        await store.close()
    cloud_port = free_port()
    cloud = ServerProcess(cloud_db, cloud_port, tmp_path)
    await cloud.start()
    viewer = await _login(cloud, "viewer", "vitalwire-viewer")
    wards = [Ward(tmp_path, node, secrets[node], cloud_port) for node in NODES]
    try:
        for w in wards:
            await w.start()
            w.stream()
        a, b = wards
        # 1. a WAN outage under load: both uplinks cut, devices keep streaming to their edges
        await _wait_edges(cloud, NODES, viewer)
        for w in wards:
            w.proxy.cut()
        await _running_for(1.5)
        a.spo2 = 80.0  # a desaturation at ward a while its uplink is down: raised at the edge
        await _running_for(6.0)
        a.spo2 = 97.0
        for w in wards:
            w.proxy.restore()
        for w in wards:  # caught up, under the load that goes on
            await _mirrored(w, cloud_db)
        # 2. kill -9 of edge b during a second outage; it restarts with its store
        b.proxy.cut()
        await _running_for(1.0)
        assert b.proc is not None
        b.proc.proc.send_signal(signal.SIGKILL)  # type: ignore[union-attr]
        b.proc.proc.wait(10)  # type: ignore[union-attr]
        await b.start()
        await _running_for(1.0)
        b.proxy.restore()
        await _mirrored(b, cloud_db)
        # 3. the cloud restarted (kill -9) under load
        await _wait_edges(cloud, NODES, viewer)
        cloud.proc.send_signal(signal.SIGKILL)  # type: ignore[union-attr]
        cloud.proc.wait(10)  # type: ignore[union-attr]
        await cloud.start()
        await _wait_edges(cloud, NODES, viewer)
        for w in wards:
            await _mirrored(w, cloud_db)
        for w in wards:
            await w.stop_streaming()
        for w in wards:
            await _mirrored(w, cloud_db)
            await _readings_once(w, cloud_db)
        # alerts: raised once at edge a, the same changes in the cloud, once each
        edge_alerts = await _alert_changes(a.db, "patient:" + a.devices[0]["patient_id"])
        assert any(c[1] == "raised" for c in edge_alerts), "no alert raised at the edge"
        cloud_alerts = await _alert_changes(cloud_db, "alerts")
        mine = [c for c in cloud_alerts if c[0] in {x[0] for x in edge_alerts}]
        assert sorted(mine) == sorted(edge_alerts)
        raised = Counter(c[0] for c in cloud_alerts if c[1] == "raised")
        assert raised and max(raised.values()) == 1
        # 4. a cloud clinician commands a device on edge a; the result comes back
        a.stream()
        await _command_round_trip(cloud, a, users)
        await a.stop_streaming()
    finally:
        for w in wards:
            if w.proc is not None:
                w.proc.stop()
            await w.proxy.close()
        cloud.stop()


async def _running_for(seconds: float) -> None:
    """The devices stream meanwhile (their own task): the time is the load's duration."""
    await asyncio.sleep(seconds)


async def _login(cloud: ServerProcess, user: str, password: str) -> str:
    # the password check runs at low priority (services/login.py): a busy machine slows it
    async with httpx.AsyncClient(base_url=cloud.url, timeout=60) as http:
        r = await http.post("/auth/login", json={"username": user, "password": password})
        assert r.status_code == 200, r.text
        token: str = r.json()["access_token"]
        return token


async def _wait_edges(cloud: ServerProcess, nodes: tuple[str, ...], token: str) -> None:
    async with httpx.AsyncClient(base_url=cloud.url, timeout=30) as http:

        async def up() -> bool:
            r = await http.get("/edges", headers={"Authorization": f"Bearer {token}"})
            got = {e["node"]: e["connected"] for e in r.json()["edges"]}
            return all(got.get(n) for n in nodes)

        await until(up, 30, f"edges {nodes} connected to the cloud")


async def _alert_changes(db: str, stream: str) -> list[tuple[str, str, int]]:
    return [
        (d["alert_id"], d.get("action", d.get("state")), int(d.get("escalation_level", 0)))
        for _, kind, body in await _stream_events(db, stream)
        if kind == "alert"
        for d in [json.loads(body)]
    ]


async def _command_round_trip(cloud: ServerProcess, ward: Ward, users: Any) -> None:
    pid = ward.devices[0]["patient_id"]
    user = next(u for u in users.users if u["role"] == "clinician")
    token = await _login(cloud, user["username"], user["password"])
    async with httpx.AsyncClient(base_url=cloud.url, timeout=30) as http:
        auth_h = {"Authorization": f"Bearer {token}"}
        r = await http.post(
            f"/patients/{pid}/commands", json={"name": "report_now"}, headers=auth_h
        )
        assert r.status_code == 200, r.text
        cid = r.json()["command"]["command_id"]
        statuses: list[str] = []

        async def completed() -> bool:
            r = await http.get(f"/patients/{pid}/events", headers=auth_h, params={"after": 0})
            statuses[:] = []
            body = r.json()
            while True:
                statuses.extend(
                    e["data"]["status"]
                    for e in body["items"]
                    if e["kind"] == "command" and e["data"].get("command_id") == cid
                )
                if not body.get("next_cursor"):
                    break
                r = await http.get(
                    f"/patients/{pid}/events",
                    headers=auth_h,
                    params={"cursor": body["next_cursor"]},
                )
                body = r.json()
            return "completed" in statuses

        await until(completed, 30, "the command's result in the cloud")
        assert statuses == ["queued", "sent", "acknowledged", "completed"], statuses
