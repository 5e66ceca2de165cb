"""``vitalwire gateway`` against the seed's own example sensor (a few lines of ``websockets``
below) and a real vitalwire: mapping, refusals, sensor restarts, vitalwire restarts."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from websockets.asyncio.server import Server, ServerConnection, serve

from tests.conftest import (
    ServerProcess,
    free_port,
    provision_db,
    start_server,
    stop_server,
    wait_until,
)
from vitalwire import wire
from vitalwire.core import events as ev
from vitalwire.core.metrics import METRIC_BY_NAME
from vitalwire.gateway import MAX_MESSAGE_BYTES, Gateway
from vitalwire.sdk.device import DeviceClient
from vitalwire.store import open_store


@asynccontextmanager
async def seed_sensor(
    messages: Any, interval_s: float = 0.01, port: int = 0
) -> AsyncIterator[Server]:
    """The seed's example: a WebSocket server pushing its flat message to whoever connects.
    ``messages()`` yields the frames, from its own count, so a reconnect continues."""

    async def push(ws: ServerConnection) -> None:
        for frame in messages():
            await ws.send(frame)
            await asyncio.sleep(interval_s)  # the sensor's own rate (the seed's: 1 s)
        await ws.wait_closed()

    async with serve(push, "127.0.0.1", port) as server:
        yield server


def port_of(server: Server) -> int:
    port: int = next(iter(server.sockets)).getsockname()[1]
    return port


async def readings_in(db_url: str, pid: str) -> list[dict[str, Any]]:
    store = open_store(db_url)
    await store.open()
    try:
        events = await store.events_after(ev.patient_stream(pid), 0, 100_000)
    finally:
        await store.close()
    return [e.data for e in events if e.kind == ev.READING]


async def readings_once(db_url: str, pid: str, n: int) -> list[dict[str, Any]]:
    """The patient's stored readings once there are ``n`` (fails after 20 s)."""

    async def _wait() -> list[dict[str, Any]]:
        while len(got := await readings_in(db_url, pid)) < n:
            await asyncio.sleep(0.05)
        return got

    return await asyncio.wait_for(_wait(), 20)


def test_the_seed_format_maps_to_metrics_with_their_units() -> None:
    assert wire.FORMATS["seed"] == (("oxygen_level", "spo2", "%"), ("heart_rate", "hr", "/min"))
    for _, name, unit in wire.FORMATS["seed"]:
        assert METRIC_BY_NAME[name].unit == unit


async def test_gateway_command_feeds_the_seed_sensor_into_the_patient_stream(
    tmp_path: Path,
) -> None:
    srv, task = await start_server(tmp_path)
    did, secret, pid = srv.device(0)
    frames = [
        '{"oxygen_level": 98, "heart_rate": 72}',
        '{"oxygen_level": 140, "heart_rate": 72}',
        '{"oxygen_level": 97}',
        "not json",
        '{"oxygen_level": 97, "heart_rate": 73}',
    ]
    connections = 0

    def messages() -> Any:
        nonlocal connections
        connections += 1
        return iter(frames)

    before = time.time()
    try:
        async with seed_sensor(messages) as sensor:
            proc = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "vitalwire.cli",
                "gateway",
                "--from",
                f"ws://127.0.0.1:{port_of(sensor)}",
                "--format",
                "seed",
                "--device",
                did,
                "--url",
                srv.url,
                "--spool",
                str(tmp_path / "gw.spool"),
                env={**os.environ, "VITALWIRE_DEVICE_SECRET": secret},
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
            )
            try:
                got = await readings_once(srv.services.settings.db, pid, 2)
            finally:
                proc.send_signal(signal.SIGTERM)
                out, err = await asyncio.wait_for(proc.communicate(), 20)
    finally:
        await stop_server(srv, task)
    assert proc.returncode == 0, err.decode()
    assert [(r["seq"], r["spo2"], r["hr"]) for r in got] == [(1, 98, 72), (2, 97, 73)]
    assert all(before <= r["ts"] <= time.time() for r in got)  # the time of receipt
    refused = [line for line in err.decode().splitlines() if "message refused" in line]
    assert len(refused) == 3, err.decode()
    assert "oxygen_level must be between 0 and 100, got 140 (field oxygen_level)" in refused[0]
    assert "(field heart_rate)" in refused[1]
    assert "malformed JSON" in refused[2]
    assert connections == 1  # refusals did not drop the sensor's connection
    assert "2 readings, 3 refused, 2 acknowledged" in out.decode()


async def test_gateway_reconnects_when_the_sensor_restarts(tmp_path: Path) -> None:
    srv, task = await start_server(tmp_path)
    did, secret, pid = srv.device(0)
    try:
        async with DeviceClient(srv.ws_url, did, secret) as client:
            first = ['{"oxygen_level": 95, "heart_rate": 60}']
            async with seed_sensor(lambda: iter(first)) as sensor:
                port = port_of(sensor)
                gw = Gateway(f"ws://127.0.0.1:{port}", "seed", client, backoff_max_s=0.2)
                run = asyncio.create_task(gw.run())
                await wait_until(lambda: gw.received == 1, 10, "the first sensor's message")
            # the sensor is gone (its server closed); the same sensor comes back on its port
            second = ['{"oxygen_level": 96, "heart_rate": 61}']
            async with seed_sensor(lambda: iter(second), port=port):
                await wait_until(lambda: gw.received == 2, 20, "the restarted sensor's message")
            run.cancel()
            await client.flush()
        got = await readings_in(srv.services.settings.db, pid)
    finally:
        await stop_server(srv, task)
    assert gw.connections == 2
    assert [(r["spo2"], r["hr"]) for r in got] == [(95, 60), (96, 61)]


async def test_vitalwire_stopped_and_started_under_the_gateway_loses_and_doubles_nothing(
    tmp_path: Path,
) -> None:
    db = f"sqlite:///{tmp_path / 'vw.db'}"
    creds = await provision_db(db, patients=1)
    dev = creds.devices[0]
    proc = ServerProcess(db, free_port(), tmp_path)
    await proc.start()
    pushing = True
    pushed = 0

    def messages() -> Any:
        nonlocal pushed
        while pushing:  # distinct values: (spo2, hr) names the message
            i = pushed
            pushed += 1
            yield json.dumps({"oxygen_level": 90 + (i // 300) % 10, "heart_rate": 30 + i % 300})

    taken: list[tuple[int, dict[str, float]]] = []
    try:
        async with (
            DeviceClient(
                proc.url,
                dev["device_id"],
                dev["secret"],
                backoff_max_s=0.2,
                spool_path=str(tmp_path / "gw.spool"),
            ) as client,
            seed_sensor(messages) as sensor,
        ):
            gw = Gateway(f"ws://127.0.0.1:{port_of(sensor)}", "seed", client)
            gw.on_reading = lambda seq, values: taken.append((seq, values))
            run = asyncio.create_task(gw.run())
            await wait_until(lambda: client.acked >= 20, 20, "readings acknowledged")
            assert await proc.signal(signal.SIGKILL) == -signal.SIGKILL
            down = gw.received
            await wait_until(
                lambda: gw.received >= down + 30, 20, "readings while vitalwire is down"
            )
            assert client.unacked >= 30  # kept by the SDK (buffer and spool)
            await proc.start()
            up = gw.received
            await wait_until(lambda: gw.received >= up + 30, 20, "readings after the restart")
            pushing = False
            await wait_until(lambda: gw.received == pushed, 20, "every message pushed")
            run.cancel()
            await client.flush(20)
        got = await readings_in(db, dev["patient_id"])
    finally:
        proc.stop()
    sent = [(seq, v["spo2"], v["hr"]) for seq, v in taken]
    assert [(r["seq"], r["spo2"], r["hr"]) for r in got] == sent
    assert [s for s, _, _ in sent] == list(range(1, len(sent) + 1))


async def test_a_sensor_frame_past_the_bound_drops_that_connection_and_the_gateway_returns(
    tmp_path: Path,
) -> None:
    srv, task = await start_server(tmp_path)
    did, secret, _ = srv.device(0)
    big = json.dumps({"oxygen_level": 97, "heart_rate": 72, "pad": "x" * MAX_MESSAGE_BYTES})
    connections = 0

    def messages() -> Any:
        nonlocal connections
        connections += 1
        return iter([big] if connections == 1 else ['{"oxygen_level": 97, "heart_rate": 72}'])

    try:
        async with (
            DeviceClient(srv.ws_url, did, secret) as client,
            seed_sensor(messages) as sensor,
        ):
            gw = Gateway(f"ws://127.0.0.1:{port_of(sensor)}", "seed", client, backoff_max_s=0.2)
            run = asyncio.create_task(gw.run())
            await wait_until(lambda: gw.received == 1, 20, "the message after the big one")
            run.cancel()
            await client.flush()
    finally:
        await stop_server(srv, task)
    assert (gw.connections, gw.refused) == (2, 0)


def test_gateway_help_shows_every_default() -> None:
    from typer.testing import CliRunner

    from vitalwire.cli import app

    result = CliRunner().invoke(app, ["gateway", "--help"], env={"COLUMNS": "300"})
    assert result.exit_code == 0, result.output
    options = {
        m.group(1): line
        for line in result.output.splitlines()
        if (m := re.search(r"(--[\w-]+)", line)) and m.group(1) != "--help"
    }
    expected = {
        "--format": "seed",
        "--url": "http://127.0.0.1:8000",
        "--secret": "none",
        "--credentials": "none",
        "--cacert": "none: the system store",
        "--spool": "./vitalwire-gateway-<device>.spool",
        "--backoff-max": "10.0",
        "--duration": "until Ctrl-C or SIGTERM",
        "--log-level": "info",
    }
    assert set(options) == {*expected, "--from", "--device"}, result.output
    for option in ("--from", "--device"):
        assert "[required]" in options[option], result.output
    for option, default in expected.items():
        assert re.search(rf"\[default: \(?{re.escape(default)}\)?\]", options[option]), (
            f"{option}: no default {default!r} in\n{result.output}"
        )
