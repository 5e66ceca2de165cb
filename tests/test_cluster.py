"""Three vitalwire nodes as real processes on one PostgreSQL database and one Redis prefix
(docs/howto-cluster.md): any device or clinician on any node, requests routed to the node that
writes the patient's stream, and a node killed with SIGKILL under load."""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import (
    RunningServer,
    ServerProcess,
    free_port,
    login_token,
    provision_db,
    wait_until,
)
from tests.test_bus import _drop_keys, _need_redis
from tests.test_store import fresh_postgres_db
from vitalwire.bench.netproxy import Proxy
from vitalwire.core import events as ev
from vitalwire.core.metrics import METRIC_BY_NAME
from vitalwire.sdk.device import DeviceClient
from vitalwire.sdk.monitor import MonitorClient, StreamEvent
from vitalwire.store import open_store
from vitalwire.store.rollups import rollup_rows


class Cluster:
    """Three nodes; ``urls(i)``: every node's address, node ``i``'s first."""

    def __init__(
        self,
        tmp: Path,
        db: str,
        prefix: str,
        n: int = 3,
        redis_port: int = 6379,
        **settings: str,
    ) -> None:
        bus = f"redis://127.0.0.1:{redis_port}/0?prefix={prefix}"
        self.nodes: list[ServerProcess] = []
        for i in range(n):
            (tmp / f"n{i}").mkdir()
            self.nodes.append(
                ServerProcess(
                    db,
                    free_port(),
                    tmp / f"n{i}",
                    cluster="1",
                    node_id=f"n{i}",
                    bus=bus,
                    lease_ttl_s="2",
                    device_max_silence_s="5",
                    **settings,
                )
            )

    async def start(self) -> None:
        await asyncio.gather(*(n.start() for n in self.nodes))

    def urls(self, first: int) -> list[str]:
        n = len(self.nodes)
        return [self.nodes[(first + k) % n].url for k in range(n)]

    def stop(self) -> None:
        for n in self.nodes:
            n.stop()


async def _until(predicate: Any, timeout: float, what: str) -> None:
    async def wait() -> None:
        while not await predicate():
            await asyncio.sleep(0.05)

    try:
        await asyncio.wait_for(wait(), timeout)
    except TimeoutError:
        raise AssertionError(f"timed out waiting for {what}") from None


async def _store_events(db: str, stream: str) -> list[tuple[int, str, Any]]:
    store = open_store(db)
    await store.open()
    try:
        events = await store.events_after(stream, 0, 1_000_000)
    finally:
        await store.close()
    return [(e.offset, e.kind, e.data) for e in events]


class Watcher:
    """A clinician's live view: every event it was given, per stream."""

    def __init__(self, urls: list[str], user: dict[str, str], ssl: Any = None) -> None:
        self.client = MonitorClient(
            urls, username=user["username"], password=user["password"], ssl=ssl
        )
        self.seen: dict[str, list[StreamEvent]] = {}
        self._task: asyncio.Task[None] | None = None

    async def start(self, streams: list[str]) -> None:
        await self.client.connect()
        await self.client.subscribe(streams)
        self._task = asyncio.create_task(self._collect())

    async def _collect(self) -> None:
        async for e in self.client.events():
            self.seen.setdefault(e.stream, []).append(e)

    def head(self, stream: str) -> int:
        got = self.seen.get(stream)
        return got[-1].offset if got else 0

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        await self.client.close()


class Feed:
    """``devices`` each sending a reading every 50 ms, counted per device (``sent``): SpO2 97,
    or ``spo2[device id]``."""

    def __init__(self, devices: list[DeviceClient], spo2: dict[str, float] | None = None) -> None:
        self.devices = devices
        self.spo2 = spo2 or {}
        self.sent: Counter[str] = Counter()
        self.task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self.task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        while True:
            for c in self.devices:
                c.send(spo2=self.spo2.get(c.device_id, 97.0), hr=72, rr=16)
                self.sent[c.device_id] += 1
            await asyncio.sleep(0.05)

    async def stop(self, flush_s: float | None = None) -> None:
        """Stop sending; with ``flush_s``, then wait for every reading's ack."""
        if self.task is not None:
            self.task.cancel()
            await asyncio.gather(self.task, return_exceptions=True)
            self.task = None
        if flush_s is not None:
            for c in self.devices:
                await c.flush(flush_s)


async def _flowing(w: Watcher, streams: list[str], timeout: float, n: int = 40) -> None:
    """Wait until ``w`` has seen ``n`` more events of every one of ``streams``."""
    start = [w.head(s) for s in streams]

    async def moved() -> bool:
        return all(w.head(s) >= h + n for s, h in zip(streams, start, strict=True))

    await _until(moved, timeout, "every patient's readings flowing")


async def _login(url: str, user: dict[str, str]) -> dict[str, str]:
    async with httpx.AsyncClient(base_url=url, timeout=10) as http:
        r = await http.post(
            "/auth/login", json={"username": user["username"], "password": user["password"]}
        )
        assert r.status_code == 200, r.text
        return {"Authorization": f"Bearer {r.json()['access_token']}"}


async def _check(
    db: str, devices: list[dict[str, str]], sent: Counter[str], watchers: list[Watcher]
) -> None:
    """What a cluster must keep whatever happened to its nodes: in the store, each patient
    stream's offsets contiguous and every (device, seq) once, in order; every watcher saw every
    event of every stream once, as stored; the ``alerts`` stream holds every alert change of
    every patient stream once."""
    streams = [ev.patient_stream(d["patient_id"]) for d in devices]
    for d, stream in zip(devices, streams, strict=True):
        stored = await _store_events(db, stream)
        assert [o for o, _, _ in stored] == list(range(1, len(stored) + 1)), stream
        seqs = [x["seq"] for _, k, x in stored if k == ev.READING]
        assert seqs == list(range(1, sent[d["device_id"]] + 1)), stream
    for stream in [*streams, ev.ALERTS_STREAM]:
        stored = await _store_events(db, stream)
        for w in watchers:

            async def caught_up(w: Watcher = w, s: str = stream, n: int = len(stored)) -> bool:
                return w.head(s) >= n

            await _until(caught_up, 20, f"{stream} on a watcher")
            got = [(e.offset, e.kind, e.data) for e in w.seen.get(stream, [])]
            assert got == stored, stream
    every: Counter[tuple[str, str]] = Counter()
    for stream in streams:
        every.update(
            (x["alert_id"], x["action"])
            for _, k, x in await _store_events(db, stream)
            if k == ev.ALERT
        )
    alerts = await _store_events(db, ev.ALERTS_STREAM)
    assert Counter((x["alert_id"], x["action"]) for _, _, x in alerts) == every
    for stream in streams:
        await _rolled_up_to_the_mark(db, stream)


async def _rolled_up_to_the_mark(db: str, stream: str, everything: bool = False) -> None:
    """The stream's roll-ups hold exactly its readings up to its mark (store/rollups.py),
    whatever the nodes did; ``everything``: after a node started on the store (it catches up
    what nodes killed before they flushed held) and flushed, the mark is the stream's head."""
    store = open_store(db)
    await store.open()
    try:
        if everything:
            await store.stream_heads()  # what a starting node does: the catch-ups are queued
            await store.flush_rollups()
        mark, rows = await store.rollups_between(stream, 0, 2**62, list(METRIC_BY_NAME))
        events = await store.events_after(stream, 0, mark) if mark else []
        if everything:
            assert mark == (await store.stream_heads())[stream] and mark > 0, stream
        want = {(r["start"], r["metric"]): r for r in rollup_rows(events)}
        got = {(start, m): (lo, hi, n, last, sum_) for start, m, lo, hi, sum_, n, *_, last in rows}
        assert set(got) == set(want), stream
        for key, (lo, hi, n, last, sum_) in got.items():
            w = want[key]
            assert (lo, hi, n, last) == (w["vmin"], w["vmax"], w["n"], w["vlast"]), (stream, key)
            assert sum_ == pytest.approx(w["vsum"], rel=1e-9), (stream, key)
    finally:
        await store.close()


async def test_three_nodes_any_connection_any_node_and_a_node_killed(tmp_path: Path) -> None:
    prefix = await _need_redis()
    async with fresh_postgres_db() as db:
        creds = await provision_db(db, patients=5)
        cluster = Cluster(tmp_path, db, prefix)
        devices: list[DeviceClient] = []
        watchers: list[Watcher] = []
        feed: Feed | None = None
        try:
            await cluster.start()
            clinician = next(u for u in creds.users if u["role"] == "clinician")
            # device i connects to node i first; P1's device is on n0, the node killed below
            for i, d in enumerate(creds.devices[:3]):
                c = DeviceClient(cluster.urls(i), d["device_id"], d["secret"])
                c.on_command("report_now", lambda cmd: {"reported": True})
                devices.append(c)
            pids = [d["patient_id"] for d in creds.devices[:3]]
            streams = [ev.patient_stream(p) for p in pids]
            # one clinician on n1, one on n0 (moved to n1 when n0 dies), both watching all
            for first in (1, 0):
                w = Watcher(cluster.urls(first), clinician)
                await w.start([*streams, ev.ALERTS_STREAM])
                watchers.append(w)
            # P4's device knows n0 alone: when n0 dies, another node takes P4's stream (its
            # lease lapsed) and marks the device offline when it does not come back
            d4 = creds.devices[3]
            lone = DeviceClient([cluster.nodes[0].url], d4["device_id"], d4["secret"])
            for c in [*devices, lone]:
                await c.start()
                await c.wait_connected(10)
            lone.send(spo2=97.0, hr=70, rr=14)
            await lone.flush(10)
            # P5's device was on n0 and left: n0 still writes P5's stream, and queues there a
            # command sent meanwhile; n0 dies before the device is back
            d5 = creds.devices[4]
            away = DeviceClient(cluster.urls(0), d5["device_id"], d5["secret"])
            away.on_command("report_now", lambda cmd: {"reported": True})
            await away.start()
            await away.wait_connected(10)
            away.send(spo2=97.0, hr=70, rr=14)
            await away.flush(10)
            await away.close()
            # P1's SpO2 under the critical limit: one alarm, raised once
            feed = Feed(devices, spo2={devices[0].device_id: 80.0})
            feed.start()

            # a clinician on n2 commands P1's device, which is on n0
            auth = await _login(cluster.nodes[2].url, clinician)
            async with httpx.AsyncClient(base_url=cluster.nodes[2].url, timeout=30) as http:
                r = await http.post(
                    f"/patients/{pids[0]}/commands", json={"name": "report_now"}, headers=auth
                )
                assert r.status_code == 200, r.text
                cid = r.json()["command"]["command_id"]

                async def command_done() -> bool:
                    got = [
                        e.data["status"]
                        for e in watchers[0].seen.get(streams[0], [])
                        if e.kind == ev.COMMAND and e.data.get("command_id") == cid
                    ]
                    return "completed" in got

                await _until(command_done, 30, "the command's result on n1's watcher")

                # ...and acknowledges P1's alarm, raised on n0, from n2
                async def alarm() -> str | None:
                    for e in watchers[0].seen.get(streams[0], []):
                        if e.kind == ev.ALERT and e.data.get("action") == "raised":
                            return str(e.data["alert_id"])
                    return None

                await _until(alarm, 30, "P1's alarm")
                alert_id = await alarm()
                r = await http.post(f"/alerts/{alert_id}/acknowledge", headers=auth)
                assert r.status_code == 200, r.text
                assert r.json()["changes"][0]["state"] == "acknowledged", r.text
                r = await http.post(
                    f"/patients/{d5['patient_id']}/commands",
                    json={"name": "report_now"},
                    headers=auth,
                )
                assert r.status_code == 200, r.text
                assert r.json()["command"]["status"] == "queued", r.text
                queued = r.json()["command"]["command_id"]
                # limits set on n2 for P2 (written by n1) apply there, and n0 shows them
                r = await http.put(
                    f"/patients/{pids[1]}/limits",
                    json={"limits": {"spo2": {"low": 93}}},
                    headers=auth,
                )
                assert r.status_code == 200, r.text
                r = await http.put(
                    f"/patients/{pids[1]}/limits",
                    json={"limits": {"spo2": {"low": 140}}},
                    headers=auth,
                )
                assert r.status_code == 422 and "spo2" in r.json()["message"], r.text
            auth0 = await _login(cluster.nodes[0].url, clinician)
            async with httpx.AsyncClient(base_url=cluster.nodes[0].url, timeout=30) as http:

                async def limits_shown() -> bool:
                    r = await http.get(f"/patients/{pids[1]}/limits", headers=auth0)
                    return bool(r.json()["limits"]["spo2"]["low"] == 93)

                await _until(limits_shown, 10, "P2's new limits on n0")

            # n0 dies under load: its device moves to n1 and resends; its watcher resumes there
            def readings(w: Watcher) -> int:
                return sum(e.kind == ev.READING for e in w.seen.get(streams[0], []))

            async def loaded() -> bool:
                return readings(watchers[1]) >= 60

            await _until(loaded, 30, "P1's readings before the kill")
            before = readings(watchers[1])
            assert await cluster.nodes[0].signal(signal.SIGKILL) == -signal.SIGKILL

            async def flowing_again() -> bool:
                return readings(watchers[1]) >= before + 60

            await _until(flowing_again, 30, "P1's readings through another node")
            assert watchers[1].client.reconnects >= 1
            assert devices[0].url != devices[0].urls[0]  # the device moved on

            p4 = ev.patient_stream(d4["patient_id"])

            async def p4_offline() -> bool:
                return any(
                    e.kind == ev.DEVICE_STATUS and e.data.get("status") == "offline"
                    for e in watchers[0].seen.get(p4, [])
                )

            await watchers[0].client.subscribe([p4])
            await _until(p4_offline, 40, "P4's device marked offline by another node")
            await lone.close()
            # P5's device comes back to another node: the command n0 queued reaches it there
            away = DeviceClient(cluster.urls(1), d5["device_id"], d5["secret"])
            away.on_command("report_now", lambda cmd: {"reported": True})
            await away.start()
            p5 = ev.patient_stream(d5["patient_id"])

            async def p5_done() -> bool:
                return "completed" in [
                    x["status"]
                    for _, k, x in await _store_events(db, p5)
                    if k == ev.COMMAND and x["command_id"] == queued
                ]

            await _until(p5_done, 30, "the command queued on n0, completed through n1")
            await away.close()
            statuses = [
                x["status"]
                for _, k, x in await _store_events(db, p5)
                if k == ev.COMMAND and x["command_id"] == queued
            ]
            assert statuses == ["queued", "sent", "acknowledged", "completed"], statuses
            await feed.stop(flush_s=30)
            await _check(db, creds.devices[:3], feed.sent, watchers)
            # GET /cluster: who writes what; n0's leases lapsed or were taken
            auth1 = await _login(cluster.nodes[1].url, clinician)
            async with httpx.AsyncClient(base_url=cluster.nodes[1].url, timeout=10) as http:
                view = (await http.get("/cluster", headers=auth1)).json()
                metrics = (await http.get("/metrics")).text
            assert view["cluster"] is True and view["node"] == "n1", view
            alive = {n["node"] for n in view["nodes"] if n["alive"]}
            assert "n0" not in alive and alive <= {"n1", "n2"}, view
            assert sum(n["streams"] for n in view["nodes"] if n["alive"]) >= 3, view
            assert "vitalwire_cluster_streams_held" in metrics
            # the alarm was raised once, acknowledged once, and the alerts stream holds every
            # alert change of every patient stream once
            p1 = await _store_events(db, streams[0])
            changes = [(x["alert_id"], x["action"]) for _, k, x in p1 if k == ev.ALERT]
            assert changes.count((alert_id, "raised")) == 1, changes
            assert changes.count((alert_id, "acknowledged")) == 1, changes
        finally:
            await _end(feed, watchers, devices, cluster)
            await _drop_keys(prefix)
        # every node was killed at the end, n0 under load: a node starting on the store rolls
        # up from the events what they held in memory, and every reading is rolled up once
        for stream in streams:
            await _rolled_up_to_the_mark(db, stream, everything=True)


async def _end(
    feed: Feed | None,
    watchers: list[Watcher],
    devices: list[DeviceClient],
    cluster: Cluster,
) -> None:
    if feed is not None:
        await feed.stop()
    for w in watchers:
        await w.close()
    for c in devices:
        with contextlib.suppress(Exception):
            await c.close()
    cluster.stop()


async def test_one_node_says_it_is_not_a_cluster(server: RunningServer) -> None:
    token = await login_token(server, "clinician")
    async with httpx.AsyncClient(base_url=server.url) as http:
        r = await http.get("/cluster", headers={"Authorization": f"Bearer {token}"})
        assert r.status_code == 200 and r.json() == {"cluster": False, "node": None, "nodes": []}
        assert (await http.get("/cluster")).status_code == 401


def test_cluster_settings_name_what_they_need() -> None:
    from pydantic import ValidationError

    from vitalwire.settings import Settings

    with pytest.raises(ValidationError, match="cluster needs a PostgreSQL store"):
        Settings(cluster=True, db="sqlite:///x.db", bus="redis://127.0.0.1:6379/0")
    with pytest.raises(ValidationError, match="cluster needs a Redis bus"):
        Settings(cluster=True, db="postgresql://h/db", bus="memory://")
    with pytest.raises(ValidationError, match="node_id needs upstream or cluster"):
        Settings(node_id="n1")
    s = Settings(cluster=True, db="postgresql://h/db", bus="redis://h:6379/0", node_id="n1")
    assert s.lease_ttl_s == 5.0 and s.node_id == "n1"


class PrivateRedis:
    """A Redis server of the test's own (no persistence), to restart it under load."""

    def __init__(self, tmp: Path) -> None:
        self.port = free_port()
        self.tmp = tmp
        self.proc: subprocess.Popen[bytes] | None = None

    async def start(self) -> None:
        self.proc = subprocess.Popen(
            [
                "redis-server",
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(self.tmp),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )

        async def answers() -> bool:
            try:
                _, w = await asyncio.open_connection("127.0.0.1", self.port)
            except OSError:
                return False
            w.close()
            return True

        await _until(answers, 10, "the private Redis")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


async def test_a_rolling_restart_of_every_node_and_a_redis_restart_under_load(
    tmp_path: Path,
) -> None:
    await _need_redis()  # the machine's Redis stands for "Redis is installed here"
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is not installed")
    redis = PrivateRedis(tmp_path)
    await redis.start()
    async with fresh_postgres_db() as db:
        creds = await provision_db(db, patients=3)
        cluster = Cluster(tmp_path, db, "roll", redis_port=redis.port)
        devices: list[DeviceClient] = []
        watchers: list[Watcher] = []
        feed: Feed | None = None
        try:
            await cluster.start()
            clinician = next(u for u in creds.users if u["role"] == "clinician")
            for i, d in enumerate(creds.devices[:3]):
                devices.append(DeviceClient(cluster.urls(i), d["device_id"], d["secret"]))
            pids = [d["patient_id"] for d in creds.devices[:3]]
            streams = [ev.patient_stream(p) for p in pids]
            w = Watcher(cluster.urls(2), clinician)
            await w.start([*streams, ev.ALERTS_STREAM])
            watchers.append(w)
            for c in devices:
                await c.start()
                await c.wait_connected(10)
            feed = Feed(devices, spo2={devices[0].device_id: 80.0})
            feed.start()
            await _flowing(w, streams, 40)
            for node in cluster.nodes:  # one at a time: drain (SIGTERM), then start again
                # uvicorn drains, then ends by the signal it caught
                assert await node.signal(signal.SIGTERM) in (0, -signal.SIGTERM)
                await _flowing(w, streams, 40)
                await node.start()
                await _flowing(w, streams, 40)
            redis.stop()
            await redis.start()
            await _flowing(w, streams, 40)
            await feed.stop(flush_s=30)
            await _check(db, creds.devices[:3], feed.sent, watchers)
            p1 = await _store_events(db, streams[0])
            raised = [x["alert_id"] for _, k, x in p1 if k == ev.ALERT and x["action"] == "raised"]
            assert len(raised) == 1, raised  # the alarm outlived every node's restart, once
        finally:
            await _end(feed, watchers, devices, cluster)
            redis.stop()


async def test_the_store_cut_off_under_load_loses_and_doubles_nothing(tmp_path: Path) -> None:
    """PostgreSQL unreachable for longer than the leases last (every connection reset, new
    ones refused: what a restart or a failover looks like from the nodes), under load: the
    nodes wait and recover; nothing acknowledged is lost, nothing is written twice."""
    prefix = await _need_redis()
    async with fresh_postgres_db() as db:
        creds = await provision_db(db, patients=2)
        host, _, rest = db.rpartition("@")[2].partition("/")
        pg = Proxy(host.split(":")[0], int(host.split(":")[1]))
        await pg.start()
        cluster = Cluster(tmp_path, db.replace(host, f"127.0.0.1:{pg.port}"), prefix, n=2)
        devices: list[DeviceClient] = []
        watchers: list[Watcher] = []
        feed: Feed | None = None
        try:
            await cluster.start()
            clinician = next(u for u in creds.users if u["role"] == "clinician")
            for i, d in enumerate(creds.devices[:2]):
                devices.append(DeviceClient(cluster.urls(i), d["device_id"], d["secret"]))
            streams = [ev.patient_stream(d["patient_id"]) for d in creds.devices[:2]]
            w = Watcher(cluster.urls(1), clinician)
            await w.start([*streams, ev.ALERTS_STREAM])
            watchers.append(w)
            for c in devices:
                await c.start()
                await c.wait_connected(10)
            feed = Feed(devices)
            feed.start()
            await _flowing(w, streams, 60)
            pg.cut()  # the outage lasts 3 s: longer than a lease (2 s)
            await asyncio.sleep(1)  # what was committed before the cut has arrived by now
            held = [w.head(s) for s in streams]
            await asyncio.sleep(2)
            assert [w.head(s) for s in streams] == held  # nothing shown that is not durable
            pg.restore()
            await _flowing(w, streams, 60)
            await feed.stop(flush_s=60)
            await _check(db, creds.devices[:2], feed.sent, watchers)
        finally:
            await _end(feed, watchers, devices, cluster)
            await pg.close()
            await _drop_keys(prefix)


async def test_three_nodes_behind_nginx_a_node_killed(tmp_path: Path) -> None:
    """The shipped nginx config with one ``server`` line per node, TLS ending at nginx: devices
    and a clinician know nginx's one address; the node writing a patient's stream is killed
    and nginx sends the reconnections to the live nodes."""
    from tests.test_proxy_nginx import need_nginx, nginx_in_front

    need_nginx()
    prefix = await _need_redis()
    async with fresh_postgres_db() as db:
        creds = await provision_db(db, patients=3)
        cluster = Cluster(tmp_path, db, prefix)
        devices: list[DeviceClient] = []
        watchers: list[Watcher] = []
        feed: Feed | None = None
        try:
            await cluster.start()
            nodes = [n.url.removeprefix("http://") for n in cluster.nodes]
            async with nginx_in_front(tmp_path / "nginx", nodes) as nx:
                clinician = next(u for u in creds.users if u["role"] == "clinician")
                for d in creds.devices[:3]:
                    devices.append(
                        DeviceClient(nx.https, d["device_id"], d["secret"], ssl=nx.context)
                    )
                streams = [ev.patient_stream(d["patient_id"]) for d in creds.devices[:3]]
                w = Watcher([nx.https], clinician, ssl=nx.context)
                await w.start([*streams, ev.ALERTS_STREAM])
                watchers.append(w)
                for c in devices:
                    await c.start()
                    await c.wait_connected(10)
                feed = Feed(devices)
                feed.start()
                await _flowing(w, streams, 40)
                store = open_store(db)
                await store.open()
                try:
                    lease = await store.stream_lease(streams[0])
                finally:
                    await store.close()
                assert lease is not None
                victim = cluster.nodes[int(lease.node.removeprefix("n"))]
                assert await victim.signal(signal.SIGKILL) == -signal.SIGKILL
                await _flowing(w, streams, 40)
                await feed.stop(flush_s=30)
                await _check(db, creds.devices[:3], feed.sent, watchers)
        finally:
            await _end(feed, watchers, devices, cluster)
            await _drop_keys(prefix)


async def test_administration_on_one_node_writes_where_the_patients_stream_is(
    tmp_path: Path,
) -> None:
    """Binding events and a discharge's end of the open alerts go to the node that writes the
    patient's stream, once: a change made through another node's API, and one made offline
    with ``vitalwire admin`` that every node reads from the store."""
    prefix = await _need_redis()
    async with fresh_postgres_db() as db:
        creds = await provision_db(db, patients=2)
        cluster = Cluster(tmp_path, db, prefix, n=2)
        devices: list[DeviceClient] = []
        try:
            await cluster.start()
            admin = next(u for u in creds.users if u["role"] == "admin")
            d1, d2 = creds.devices[:2]
            p1, p2 = ev.patient_stream(d1["patient_id"]), ev.patient_stream(d2["patient_id"])
            # P1's device on n0; P2's device on n1, in alarm (SpO2 80)
            for d, first in ((d1, 0), (d2, 1)):
                devices.append(DeviceClient(cluster.urls(first), d["device_id"], d["secret"]))
            for c in devices:
                await c.start()
                await c.wait_connected(10)
            for _ in range(3):
                devices[0].send(spo2=97.0, hr=70, rr=14)
                devices[1].send(spo2=80.0, hr=70, rr=14)
            for c in devices:
                await c.flush(10)

            async def kinds(stream: str, kind: str) -> list[Any]:
                return [x for _, k, x in await _store_events(db, stream) if k == kind]

            async def p2_alarm() -> bool:
                return any(x["action"] == "raised" for x in await kinds(p2, ev.ALERT))

            await _until(p2_alarm, 20, "P2's alarm")
            auth = await _login(cluster.nodes[0].url, admin)
            async with httpx.AsyncClient(base_url=cluster.nodes[0].url, timeout=30) as http:
                r = await http.post("/admin/devices", json={"device_id": "spare-1"}, headers=auth)
                assert r.status_code == 201, r.text
                # through n0's API, for P1 (written by n0) and... bound to P2 (written by n1)
                r = await http.put(
                    "/admin/bindings/spare-1", json={"patient_id": d2["patient_id"]}, headers=auth
                )
                assert r.status_code == 200, r.text

                async def bound() -> bool:
                    return len(await kinds(p2, ev.BINDING)) >= 1

                await _until(bound, 20, "the bind event in P2's stream")
            # offline, on the store: every node reads it, one writes it
            unbind = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "vitalwire.cli",
                "admin",
                "unbind",
                "spare-1",
                "--db",
                db,
                stdout=asyncio.subprocess.DEVNULL,
            )
            assert await unbind.wait() == 0

            async def unbound() -> bool:
                return len(await kinds(p2, ev.BINDING)) >= 2

            await _until(unbound, 20, "the unbind event in P2's stream")
            auth1 = await _login(cluster.nodes[0].url, admin)
            async with httpx.AsyncClient(base_url=cluster.nodes[0].url, timeout=30) as http:
                r = await http.post(f"/admin/patients/{d2['patient_id']}/discharge", headers=auth1)
                assert r.status_code == 200, r.text
                assert r.json()["alerts_ended"] == 1, r.text  # P2's engine is on n1
            binding = [(x["device"], x["action"]) for x in await kinds(p2, ev.BINDING)]
            assert binding.count(("spare-1", "bind")) == 1, binding
            assert binding.count(("spare-1", "unbind")) == 1, binding
            ends = [x for x in await kinds(p2, ev.ALERT) if x["action"] != "raised"]
            assert len(ends) == 1, ends
            for stream in (p1, p2):
                stored = await _store_events(db, stream)
                assert [o for o, _, _ in stored] == list(range(1, len(stored) + 1))
        finally:
            await _end(None, [], devices, cluster)
            await _drop_keys(prefix)


async def test_a_node_whose_stream_was_taken_takes_the_resent_readings_again(
    tmp_path: Path,
) -> None:
    """Another node took a patient's stream while this node had its readings in flight: the
    store refused them (fenced), the node closed the device (1001) and forgot them; the device,
    which knows this node alone, comes back, resends, and they are stored, once."""
    prefix = await _need_redis()
    async with fresh_postgres_db() as db:
        creds = await provision_db(db, patients=1)
        cluster = Cluster(tmp_path, db, prefix, n=1)
        d = creds.devices[0]
        stream = ev.patient_stream(d["patient_id"])
        device = DeviceClient(cluster.urls(0), d["device_id"], d["secret"])
        feeding: asyncio.Task[None] | None = None
        sent = 0
        store = open_store(db)
        try:
            await cluster.start()
            await store.open()
            await device.start()
            await device.wait_connected(10)

            async def feed() -> None:
                nonlocal sent
                while True:
                    device.send(spo2=97.0, hr=72, rr=16)
                    sent += 1
                    await asyncio.sleep(0.01)

            feeding = asyncio.create_task(feed())

            async def some() -> bool:
                return device.acked >= 50

            await _until(some, 20, "readings acknowledged")
            # another node takes the stream (as a device's hello there would)
            taken = await store.acquire_stream(stream, "elsewhere", time.time(), 30, force=True)
            assert taken is not None

            async def back() -> bool:
                lease = await store.stream_lease(stream)
                return lease is not None and lease.node == "n0" and device.acked >= 150

            await _until(back, 30, "the device back on n0, which took its stream again")
            feeding.cancel()
            await asyncio.gather(feeding, return_exceptions=True)
            await device.flush(30)
            assert device.acked == sent
            stored = await _store_events(db, stream)
            assert [o for o, _, _ in stored] == list(range(1, len(stored) + 1))
            seqs = [x["seq"] for _, k, x in stored if k == ev.READING]
            assert seqs == list(range(1, sent + 1))
        finally:
            if feeding is not None:
                feeding.cancel()
                await asyncio.gather(feeding, return_exceptions=True)
            with contextlib.suppress(Exception):
                await device.close()
            await store.close()
            cluster.stop()
            await _drop_keys(prefix)


async def test_mqtt_devices_one_bridging_node_at_a_time_and_it_killed_mid_stream(
    tmp_path: Path,
) -> None:
    """Every node is configured with the broker; one bridges it at a time (a lease). Killed
    while a device publishes, another node takes the bridge after the lease time, from the
    broker's persistent session. The device resends from vitalwire's last ack when refused
    for a gap (what the dead node took and never committed: the broker will not deliver it
    again) and when acks stop: every reading is stored once, in order, and acknowledged. A
    clinician on the node that does not bridge commands the device, through the one that
    does."""
    import asyncpg

    from tests.test_mqtt import Device, need_broker
    from vitalwire.transports import mqtt

    need_broker()
    prefix = await _need_redis()
    topics = "vwtest-" + uuid.uuid4().hex[:10]
    async with fresh_postgres_db() as db:
        creds = await provision_db(db, patients=1)
        cluster = Cluster(
            tmp_path,
            db,
            prefix,
            n=2,
            mqtt_url="mqtt://127.0.0.1:1883",
            mqtt_topic_prefix=topics,
            mqtt_client_id=topics + "-server",
            mqtt_session_expiry_s="300",
        )
        d = creds.devices[0]
        stream = ev.patient_stream(d["patient_id"])
        store = open_store(db)
        n = 150
        t0 = time.time() - n * 0.02
        bodies = [
            {"type": "reading", "seq": s, "ts": t0 + s * 0.02, "spo2": 97, "pulse": 70}
            for s in range(n + 1)
        ]
        try:
            await cluster.start()
            await store.open()

            async def bridging() -> str | None:
                lease = await store.stream_lease("singleton:mqtt")
                if lease is None or lease.expires_at < time.time():
                    return None
                return lease.node

            await _until(bridging, 20, "a node to bridge the broker")
            first = await bridging()
            async with Device(topics, d["device_id"]) as dev:
                sent = 0  # the last seq published

                async def device() -> None:
                    """Publish 1..n at 50 a second; publish again from the last ack when
                    refused for a gap, or when no new ack came for 2 s after the last seq."""
                    nonlocal sent
                    loop = asyncio.get_running_loop()
                    seen_errors, acked, quiet_since = 0, 0, loop.time()
                    while dev.acked() < n:
                        errors = dev.of(mqtt.ERRORS)
                        refused = any(e["code"] == "seq_gap" for e in errors[seen_errors:])
                        seen_errors = len(errors)
                        if dev.acked() > acked:
                            acked, quiet_since = dev.acked(), loop.time()
                        if refused or (sent >= n and loop.time() - quiet_since > 2):
                            sent, quiet_since = dev.acked(), loop.time()
                        if sent < n:
                            sent += 1
                            await dev.publish(mqtt.READINGS, bodies[sent])
                        await asyncio.sleep(0.02)  # the device's rate, and its poll of acks

                feeder = asyncio.create_task(device())
                victim = cluster.nodes[int(str(first).removeprefix("n"))]
                blocker = await asyncpg.connect(db, timeout=10)
                try:
                    await wait_until(lambda: dev.acked() >= 30, 20, "30 readings acknowledged")
                    # the victim's commits wait behind a lock: it takes (and PUBACKs to the
                    # broker) readings it will never commit, which the broker will not deliver
                    # to the next node
                    tx = blocker.transaction()
                    await tx.start()
                    await blocker.execute("LOCK TABLE events IN SHARE MODE")

                    async def holding() -> bool:
                        async with httpx.AsyncClient() as http:
                            got = await http.get(victim.url + "/metrics.json", timeout=5)
                        return int(got.json()["pending_rows"]) >= 10

                    await _until(holding, 20, "readings taken and held by the bridging node")
                    assert await victim.signal(signal.SIGKILL) == -signal.SIGKILL
                    await tx.rollback()
                    acked_at_kill, sent_at_kill = dev.acked(), sent
                    assert sent_at_kill < n  # the kill was mid-stream

                    async def moved() -> bool:
                        node = await bridging()
                        return node is not None and node != first

                    await _until(moved, 30, "another node to bridge the broker")
                    await asyncio.wait_for(feeder, 60)
                finally:
                    feeder.cancel()
                    await blocker.close()
                assert 30 <= acked_at_kill < n and dev.acked() == n
                refusals = [e["code"] for e in dev.of(mqtt.ERRORS)]

                # the killed node, back, does not bridge: a clinician on it commands the
                # device, which only the bridging node hears; the result comes back the same way
                await victim.start()
                clinician = next(u for u in creds.users if u["role"] == "clinician")
                auth = await _login(victim.url, clinician)
                async with httpx.AsyncClient(base_url=victim.url, timeout=30) as http:
                    r = await http.post(
                        f"/patients/{d['patient_id']}/commands",
                        json={"name": "report_now"},
                        headers=auth,
                    )
                assert r.status_code == 200, r.text
                cid = r.json()["command"]["command_id"]
                await wait_until(
                    lambda: any(c["command_id"] == cid for c in dev.of(mqtt.COMMANDS)),
                    20,
                    "the command, published to the device by the bridging node",
                )
                for status in ("acknowledged", "completed"):
                    body = {"type": "command_result", "command_id": cid, "status": status}
                    await dev.publish(mqtt.COMMAND_RESULTS, body)

                async def completed() -> bool:
                    return any(
                        k == ev.COMMAND and x["command_id"] == cid and x["status"] == "completed"
                        for _, k, x in await _store_events(db, stream)
                    )

                await _until(completed, 20, "the command completed")
                assert await bridging() != first  # the bridge stayed where it moved
            stored = await _store_events(db, stream)
            assert [o for o, _, _ in stored] == list(range(1, len(stored) + 1))
            assert [x["seq"] for _, k, x in stored if k == ev.READING] == list(range(1, n + 1))
            # the next node refused the first reading after what the dead one held
            assert "seq_gap" in refusals
        finally:
            await store.close()
            cluster.stop()
            await _drop_keys(prefix)
