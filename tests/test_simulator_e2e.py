"""The simulator and a recorded file through the real server to a monitor."""

from __future__ import annotations

import asyncio

from tests.conftest import RunningServer, need_data
from vitalwire.sdk import MonitorClient
from vitalwire.simulator import SimDevice, read_bidmc, replay_file, run_ward


async def test_bidmc_replay_arrives_complete_and_in_order(server: RunningServer) -> None:
    path = need_data() / "bidmc_01_Numerics.csv"
    rows = read_bidmc(path)
    did, secret, pid = server.device(0)
    user, pw = server.user()
    async with MonitorClient(server.url, username=user, password=pw) as mon:
        await mon.subscribe([f"patient:{pid}"])
        client = await replay_file(server.url, SimDevice(did, secret, pid), path, speed=0)
        assert client.acked == len(rows) == 481
        got = []
        while len(got) < len(rows):
            e = await mon.next_event()
            if e.kind == "reading":
                got.append(e)
    assert [e.data["seq"] for e in got] == list(range(1, 482))
    offsets = [e.offset for e in got]
    assert offsets == sorted(offsets) and len(set(offsets)) == 481
    start = got[0].data["ts"]
    for row, e in zip(rows, got, strict=True):
        sent = {k: v for k, v in row.items() if k != "t"}
        received = {k: v for k, v in e.data.items() if k not in ("device", "seq", "ts")}
        assert received == sent
        assert abs(e.data["ts"] - (start + row["t"])) < 1e-6


async def test_simulated_ward_streams_every_patient(server: RunningServer) -> None:
    devices = [SimDevice(*server.device(i)) for i in range(3)]
    user, pw = server.user()
    stop = asyncio.Event()
    async with MonitorClient(server.url, username=user, password=pw) as mon:
        await mon.subscribe([f"patient:{d.patient_id}" for d in devices])
        ward = asyncio.create_task(
            run_ward(server.url, devices, rate_hz=20, scenario="mixed", stop=stop)
        )
        seen: dict[str, int] = {}
        while len([s for s, n in seen.items() if n >= 3]) < 3:
            e = await mon.next_event()
            if e.kind == "reading":
                seen[e.stream] = seen.get(e.stream, 0) + 1
        stop.set()
        clients = await asyncio.wait_for(ward, 20)
    assert sorted(seen) == sorted(f"patient:{d.patient_id}" for d in devices)
    assert all(c.acked == c.seq > 0 for c in clients)
