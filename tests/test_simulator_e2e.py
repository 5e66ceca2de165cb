"""The simulator and a recorded file through the real server to a monitor."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

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
    for row, e in zip(rows, got, strict=True):
        sent = {k: v for k, v in row.items() if k != "t"}
        received = {k: v for k, v in e.data.items() if k not in ("device", "seq", "ts")}
        assert received == sent
    stamps = [e.data["ts"] for e in got]
    assert stamps == sorted(stamps) and stamps[-1] <= time.time()  # flat out, stamped as sent


async def test_accelerated_replay_sends_no_reading_from_the_future(
    server: RunningServer, tmp_path: Path
) -> None:
    """At --speed 10 the recording's 9 s take 0.9 s; every reading is stamped when sent, so none
    is ahead of the server's clock when it arrives (they were stamped up to 8 s ahead)."""
    path = tmp_path / "ten.csv"
    rows = "".join(f"{t},{80 + t},{80 + t},16,97\n" for t in range(10))
    path.write_text("Time [s], HR, PULSE, RESP, SpO2\n" + rows)
    did, secret, pid = server.device(0)
    user, pw = server.user()
    async with MonitorClient(server.url, username=user, password=pw) as mon:
        await mon.subscribe([f"patient:{pid}"])
        replay = asyncio.create_task(
            replay_file(server.url, SimDevice(did, secret, pid), path, speed=10)
        )
        arrivals: list[tuple[float, float]] = []  # (stamp, server clock when it arrived)
        while len(arrivals) < 10:
            e = await mon.next_event(timeout=10)
            if e.kind == "reading":
                arrivals.append((e.data["ts"], server.services.clock()))
        client = await asyncio.wait_for(replay, 10)
    assert client.acked == 10
    assert all(ts <= now for ts, now in arrivals), arrivals
    span = arrivals[-1][0] - arrivals[0][0]
    assert 0.9 - 0.01 <= span < 5  # the pacing kept (9 s / 10), not the recording's 9 s


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
