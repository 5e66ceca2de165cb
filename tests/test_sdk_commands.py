"""Device-side commands: DeviceClient's handler API and the simulator's handlers, against a tiny
stand-in server speaking the device protocol (no vitalwire server, no conftest fixtures)."""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
import websockets
from websockets.asyncio.server import ServerConnection, serve

from vitalwire import wire
from vitalwire.sdk import DeviceClient
from vitalwire.simulator import SimDevice, SimState, pleth_shape, pleth_wave, run_device

START = 1_700_000_000.0
TIMEOUT = 10.0
CLOSED = "closed"


class FakeServer:
    """Welcomes devices, acknowledges readings, sends commands, records every frame.

    ``frames`` holds (connection number, message) in arrival order; a connection's end is
    recorded as (connection number, ``"closed"``).
    """

    def __init__(self) -> None:
        self.frames: list[tuple[int, Any]] = []
        self.hellos: list[wire.Hello] = []
        self.connections: list[ServerConnection] = []
        self.acked = 0
        self.welcome_gate = asyncio.Event()
        self.welcome_gate.set()
        self.url = ""
        self._changed = asyncio.Condition()

    async def _record(self, conn: int, item: Any) -> None:
        async with self._changed:
            self.frames.append((conn, item))
            self._changed.notify_all()

    async def handler(self, ws: ServerConnection) -> None:
        hello = wire.decode_device(await ws.recv())
        assert isinstance(hello, wire.Hello)
        conn = len(self.hellos)
        async with self._changed:
            self.hellos.append(hello)
            self._changed.notify_all()
        await self.welcome_gate.wait()
        self.connections.append(ws)
        await ws.send(wire.encode_text(wire.Welcome(server_time=time.time(), last_seq=self.acked)))
        try:
            async for raw in ws:
                msg = wire.decode_device(raw)
                seqs = []
                if isinstance(msg, wire.Reading):
                    seqs = [msg.seq]
                elif isinstance(msg, wire.Readings):
                    seqs = [r.seq for r in msg.items]
                if seqs:
                    self.acked = max(self.acked, *seqs)
                    await ws.send(wire.encode_text(wire.Ack(self.acked)))
                await self._record(conn, msg)
        except websockets.ConnectionClosed:
            pass
        finally:
            await self._record(conn, CLOSED)

    async def command(self, name: str, command_id: str = "c1", **args: Any) -> None:
        cmd = wire.Command(command_id, name, args, timeout_s=30.0)
        await self.connections[-1].send(wire.encode_text(cmd))

    async def wait(self, check: Callable[[], Any], timeout: float = TIMEOUT) -> Any:
        """Wait until ``check()`` is truthy (re-checked on every frame); return its value."""

        async def _wait() -> Any:
            async with self._changed:
                await self._changed.wait_for(check)
            return check()

        return await asyncio.wait_for(_wait(), timeout)

    # -- views of the frames ----------------------------------------------------------------

    def results(self, command_id: str) -> list[wire.CommandResult]:
        return [
            m
            for _, m in self.frames
            if isinstance(m, wire.CommandResult) and m.command_id == command_id
        ]

    def statuses(self, command_id: str) -> list[str]:
        return [r.status for r in self.results(command_id)]

    def final(self, command_id: str) -> wire.CommandResult | None:
        done = [r for r in self.results(command_id) if r.status in ("completed", "failed")]
        return done[0] if done else None

    def readings(self) -> list[wire.ReadingBody]:
        out: list[wire.ReadingBody] = []
        for _, m in self.frames:
            if isinstance(m, wire.Reading):
                out.append(m)
            elif isinstance(m, wire.Readings):
                out.extend(m.items)
        return out

    def waveforms(self, command_id: str) -> list[wire.Waveform]:
        return [
            m for _, m in self.frames if isinstance(m, wire.Waveform) and m.command_id == command_id
        ]

    def index(self, match: Callable[[int, Any], bool]) -> int:
        return next(i for i, (conn, m) in enumerate(self.frames) if match(conn, m))


async def until(check: Callable[[], Any], timeout: float = TIMEOUT) -> None:
    """Wait until ``check()`` (state outside the server's frames) is true, yielding meanwhile."""

    async def _spin() -> None:
        while not check():
            await asyncio.sleep(0)

    await asyncio.wait_for(_spin(), timeout)


@pytest.fixture
async def server() -> AsyncIterator[FakeServer]:
    fake = FakeServer()
    async with serve(fake.handler, "127.0.0.1", 0) as ws_server:
        port = next(iter(ws_server.sockets)).getsockname()[1]
        fake.url = f"http://127.0.0.1:{port}"
        yield fake
        fake.welcome_gate.set()


@pytest.fixture
async def client(server: FakeServer) -> AsyncIterator[DeviceClient]:
    device = DeviceClient(server.url, "dev-1", "s3cret", backoff_initial_s=0.01)
    yield device
    await device.close()


# -- the SDK's dispatch -----------------------------------------------------------------------


async def test_acknowledged_then_completed_with_data(
    server: FakeServer, client: DeviceClient
) -> None:
    @client.command("identify")
    async def identify(cmd: wire.Command) -> dict[str, Any]:
        return {"until": START + cmd.args["duration_s"]}

    await client.start()
    await server.command("identify", "c1", duration_s=10.0)
    final = await server.wait(lambda: server.final("c1"))
    assert server.statuses("c1") == ["acknowledged", "completed"]
    assert final.data == {"until": START + 10.0}
    assert final.message is None


async def test_sync_handler_and_registry(server: FakeServer, client: DeviceClient) -> None:
    client.on_command("report_now", lambda cmd: {"seq": 7})
    client.on_command("identify", lambda cmd: None)
    await client.start()
    await server.command("report_now", "c1")
    await server.command("identify", "c2")
    await server.wait(lambda: server.final("c1") and server.final("c2"))
    assert server.final("c1") == wire.CommandResult("c1", "completed", data={"seq": 7})
    assert server.final("c2") == wire.CommandResult("c2", "completed")


async def test_handler_exception_fails_with_its_message(
    server: FakeServer, client: DeviceClient
) -> None:
    @client.command("set_interval")
    async def set_interval(cmd: wire.Command) -> dict[str, Any]:
        raise ValueError("interval_s must be between 0.1 and 3600")

    @client.command("report_now")
    def bad_return(cmd: wire.Command) -> Any:
        return [1, 2]

    await client.start()
    await server.command("set_interval", "c1", interval_s=0.01)
    await server.command("report_now", "c2")
    await server.wait(lambda: server.final("c1") and server.final("c2"))
    assert server.statuses("c1") == ["acknowledged", "failed"]
    assert server.final("c1") == wire.CommandResult(
        "c1", "failed", message="interval_s must be between 0.1 and 3600"
    )
    bad = server.final("c2")
    assert server.statuses("c2") == ["acknowledged", "failed"]
    assert bad is not None and bad.message == "handler returned list, not a dict"


async def test_unknown_command_fails_not_supported(
    server: FakeServer, client: DeviceClient
) -> None:
    await client.start()
    await server.command("frobnicate", "c1")
    await server.wait(lambda: server.final("c1"))
    assert server.results("c1") == [
        wire.CommandResult("c1", "failed", message="not supported: frobnicate")
    ]


async def test_duplicate_command_id_runs_the_handler_once(
    server: FakeServer, client: DeviceClient
) -> None:
    calls: list[str] = []
    release = asyncio.Event()

    @client.command("report_now")
    async def report_now(cmd: wire.Command) -> dict[str, Any]:
        calls.append(cmd.command_id)
        await release.wait()
        return {"seq": 1}

    await client.start()
    await server.command("report_now", "c1")
    await server.wait(lambda: server.statuses("c1") == ["acknowledged"])
    await server.command("report_now", "c1")  # resent while it runs: acknowledged again
    await server.wait(lambda: len(server.results("c1")) == 2)
    assert server.statuses("c1") == ["acknowledged", "acknowledged"]
    release.set()
    await server.wait(lambda: server.final("c1"))
    await server.command("report_now", "c1")  # resent after it finished: the stored answer
    await server.wait(lambda: len(server.results("c1")) == 4)
    assert server.statuses("c1") == ["acknowledged", "acknowledged", "completed", "completed"]
    assert server.results("c1")[2] == server.results("c1")[3]
    assert calls == ["c1"]


async def test_reset_answers_completed_before_the_connection_drops_and_reconnects(
    server: FakeServer, client: DeviceClient
) -> None:
    @client.command("reset")
    async def reset(cmd: wire.Command) -> dict[str, Any]:
        await client.reconnect_now()  # deferred until "completed" is written
        return {"reset": True}

    await client.start()
    await server.command("reset", "r1")
    await until(lambda: client.connections == 2)
    assert len(server.hellos) == 2
    completed = server.index(
        lambda c, m: isinstance(m, wire.CommandResult) and m.status == "completed"
    )
    closed = server.index(lambda c, m: c == 0 and m == CLOSED)
    assert server.frames[completed][0] == 0  # on the connection that then closed
    assert completed < closed
    assert server.statuses("r1") == ["acknowledged", "completed"]
    assert client.close_codes == [1000]  # a clean close, not an abort


async def test_final_result_waits_for_the_next_connection(
    server: FakeServer, client: DeviceClient
) -> None:
    release = asyncio.Event()

    @client.command("request_data")
    async def request_data(cmd: wire.Command) -> dict[str, Any]:
        await release.wait()
        return {"samples": 3}

    await client.start()
    await server.command("request_data", "c1")
    await server.wait(lambda: server.statuses("c1") == ["acknowledged"])
    server.welcome_gate.clear()  # the device's next hello waits for its welcome
    await server.connections[0].close()
    await server.wait(lambda: len(server.hellos) == 2)
    assert not client.connected
    release.set()
    await until(lambda: client.commands_running == 0)  # finished while disconnected: queued
    assert server.final("c1") is None
    server.welcome_gate.set()
    final = await server.wait(lambda: server.final("c1"))
    assert final == wire.CommandResult("c1", "completed", data={"samples": 3})
    assert server.index(lambda c, m: m is final) > server.index(lambda c, m: c == 0 and m == CLOSED)
    assert [c for c, m in server.frames if m is final] == [1]


async def test_send_waveform_is_best_effort(server: FakeServer, client: DeviceClient) -> None:
    assert await client.send_waveform([0.1], 100.0, START) is False  # not connected: not kept
    await client.start()
    assert await client.send_waveform([0.1, 0.2], 100.0, START, command_id="c9") is True
    (chunk,) = await server.wait(lambda: server.waveforms("c9"))
    assert chunk == wire.Waveform(START, 100.0, [0.1, 0.2], kind="pleth", command_id="c9")


# -- the pleth waveform -----------------------------------------------------------------------


@pytest.mark.parametrize("bpm", [40.0, 72.0, 150.0])
def test_pleth_wave_is_periodic_at_the_pulse_rate_and_in_range(bpm: float) -> None:
    period = 60.0 / bpm
    ts = [i * 0.003 for i in range(3000)]
    values = [pleth_wave(t, bpm) for t in ts]
    assert all(0.0 <= v <= 1.0 for v in values)
    assert max(values) == pytest.approx(1.0, abs=0.01)
    assert min(values) == pytest.approx(0.0, abs=0.01)
    for t in ts[:400]:
        assert pleth_wave(t + period, bpm) == pytest.approx(pleth_wave(t, bpm), abs=1e-9)
        assert pleth_wave(t + 3 * period, bpm) == pytest.approx(pleth_wave(t, bpm), abs=1e-9)
    # one systolic peak per beat
    peaks = [
        i
        for i in range(1, len(values) - 1)
        if values[i] > 0.9 and values[i - 1] < values[i] >= values[i + 1]
    ]
    assert len(peaks) in (math.floor(ts[-1] / period), math.ceil(ts[-1] / period))


def test_pleth_beat_has_upstroke_notch_and_diastolic_wave() -> None:
    n = 1000
    beat = [pleth_shape(i / n) for i in range(n)]
    assert beat[0] < 0.01  # the foot of the beat
    maxima = [i for i in range(1, n - 1) if beat[i - 1] < beat[i] >= beat[i + 1]]
    assert len(maxima) == 2  # the systolic peak and the diastolic wave
    systolic, diastolic = maxima
    assert beat[systolic] == pytest.approx(1.0, abs=1e-3)
    assert 0.2 < beat[diastolic] < 0.7
    notch = min(range(systolic, diastolic), key=beat.__getitem__)
    assert 0.15 < beat[notch] < beat[diastolic] - 0.05  # the dicrotic notch
    rise = systolic - max(i for i in range(systolic) if beat[i] < 0.1)
    fall = min(i for i in range(systolic, n) if beat[i] < 0.1) - systolic
    assert rise < fall / 2  # a steep upstroke, a slow decay


# -- the simulator's handlers -----------------------------------------------------------------


class Sim:
    """run_device against the fake server, with its state."""

    def __init__(self, server: FakeServer) -> None:
        self.server = server
        self.stop = asyncio.Event()
        self.state = SimState()
        self.task: asyncio.Task[DeviceClient] | None = None

    def start(self, rate_hz: float, clock: Callable[[], float] = lambda: START) -> None:
        device = SimDevice("dev-1", "s3cret")
        self.task = asyncio.create_task(
            run_device(
                self.server.url,
                device,
                rate_hz=rate_hz,
                stop=self.stop,
                clock=clock,
                state=self.state,
            )
        )

    async def close(self) -> None:
        self.stop.set()
        if self.task is not None:
            await asyncio.wait_for(self.task, TIMEOUT)


@pytest.fixture
async def sim(server: FakeServer) -> AsyncIterator[Sim]:
    s = Sim(server)
    yield s
    await s.close()


async def test_sim_set_interval_changes_the_reading_period(server: FakeServer, sim: Sim) -> None:
    loop = asyncio.get_running_loop()
    sim.start(rate_hz=0.001, clock=loop.time)  # one reading, then the next 1000 s later
    await server.wait(lambda: len(server.readings()) == 1)
    assert sim.state.interval_s == 1000.0
    await server.command("set_interval", "c1", interval_s=0.1)
    final = await server.wait(lambda: server.final("c1"))
    assert final.data == {"interval_s": 0.1}
    assert sim.state.interval_s == 0.1
    # the next ticks come with the new period (they would be 1000 s away with the old one)
    await server.wait(lambda: len(server.readings()) >= 4)
    ts = [r.ts for r in server.readings()]
    # never faster than the new period: the k-th tick is at least k periods after the first
    # (ticks are on a grid of the period; a late tick never pulls the next ones earlier)
    assert all(t - ts[0] >= k * 0.1 - 1e-3 for k, t in enumerate(ts))
    await server.command("set_interval", "c2", interval_s=0.01)  # below the catalogue's bound
    bad = await server.wait(lambda: server.final("c2"))
    assert bad.status == "failed" and "interval_s" in (bad.message or "")
    assert sim.state.interval_s == 0.1


async def test_sim_report_now_sends_one_reading_at_once(server: FakeServer, sim: Sim) -> None:
    sim.start(rate_hz=0.001)
    await server.wait(lambda: len(server.readings()) == 1)
    await server.command("report_now", "c1")
    final = await server.wait(lambda: server.final("c1"))
    assert final.data == {"seq": 2}
    await server.wait(lambda: len(server.readings()) == 2)
    assert [r.seq for r in server.readings()] == [1, 2]
    assert server.readings()[1].hr is not None


async def test_sim_request_data_streams_a_pleth_waveform(server: FakeServer, sim: Sim) -> None:
    sim.start(rate_hz=20)
    await server.wait(lambda: server.readings())
    await server.command("request_data", "w1", kind="pleth", duration_s=1.0, rate_hz=50.0)
    final = await server.wait(lambda: server.final("w1"), timeout=15)
    assert final.status == "completed"
    assert final.data["samples"] == 50
    chunks = server.waveforms("w1")
    assert len(chunks) >= 4  # 0.25 s chunks
    assert sum(len(c.samples) for c in chunks) == 50
    assert {(c.kind, c.rate_hz) for c in chunks} == {("pleth", 50.0)}
    for a, b in zip(chunks, chunks[1:], strict=False):  # contiguous in device time
        assert b.ts == pytest.approx(a.ts + len(a.samples) / 50.0)
    samples = [v for c in chunks for v in c.samples]
    assert all(0.0 <= v <= 1.0 for v in samples)
    assert max(samples) - min(samples) > 0.5  # pulsatile, not a flat line
    # the periodic readings went on while it streamed
    first = server.index(lambda c, m: isinstance(m, wire.Waveform))
    done = server.index(lambda c, m: m is final)
    assert any(isinstance(m, wire.Reading | wire.Readings) for _, m in server.frames[first:done])


async def test_sim_request_data_burst_sends_extra_readings(server: FakeServer, sim: Sim) -> None:
    sim.start(rate_hz=0.001)
    await server.wait(lambda: len(server.readings()) == 1)
    await server.command("request_data", "b1", kind="burst", duration_s=1.0, rate_hz=10.0)
    final = await server.wait(lambda: server.final("b1"), timeout=15)
    assert final.data == {"readings": 10, "rate_hz": 10.0}
    await server.wait(lambda: len(server.readings()) == 11)
    assert [r.seq for r in server.readings()] == list(range(1, 12))


async def test_sim_silence_is_clamped_to_120_s(server: FakeServer, sim: Sim) -> None:
    sim.start(rate_hz=0.001)
    await server.wait(lambda: server.readings())
    await server.command("silence", "s1", duration_s=30.0)
    first = await server.wait(lambda: server.final("s1"))
    assert first.data == {"until": START + 30.0, "duration_s": 30.0}
    await server.command("silence", "s2", duration_s=3600.0)  # past the bound: never longer
    second = await server.wait(lambda: server.final("s2"))
    assert second.data == {"until": START + 120.0, "duration_s": 120.0}
    assert sim.state.silenced_until == START + 120.0


async def test_sim_identify_records_until(server: FakeServer, sim: Sim) -> None:
    sim.start(rate_hz=0.001)
    await server.wait(lambda: server.readings())
    await server.command("identify", "i1")
    final = await server.wait(lambda: server.final("i1"))
    assert final.data == {"until": START + 10.0}
    assert sim.state.identify_until == START + 10.0


async def test_sim_reset_reconnects_and_restores_settings(server: FakeServer, sim: Sim) -> None:
    sim.start(rate_hz=0.001)
    await server.wait(lambda: server.readings())
    await server.command("set_interval", "c1", interval_s=500.0)
    await server.command("silence", "c2", duration_s=60.0)
    await server.wait(lambda: server.final("c1") and server.final("c2"))
    await server.command("reset", "r1")
    await server.wait(lambda: len(server.hellos) == 2)
    final = server.final("r1")
    assert final is not None and final.data == {"reset": True, "interval_s": 1000.0}
    completed = server.index(lambda c, m: m is final)
    assert completed < server.index(lambda c, m: c == 0 and m == CLOSED)
    assert sim.state.resets == 1
    assert sim.state.interval_s == 1000.0
    assert sim.state.silenced_until is None
    assert server.hellos[1].last_seq == 1  # the seq numbering goes on
    await server.wait(lambda: len(server.connections) == 2)
    await server.command("report_now", "c3")
    report = await server.wait(lambda: server.final("c3"))
    assert report.data == {"seq": 2}


async def test_sim_reset_stops_a_running_data_window(server: FakeServer, sim: Sim) -> None:
    sim.start(rate_hz=0.001)
    await server.wait(lambda: server.readings())
    await server.command("request_data", "w1", kind="pleth", duration_s=30.0, rate_hz=100.0)
    await server.wait(lambda: server.waveforms("w1"))
    await server.command("reset", "r1")
    final = await server.wait(lambda: server.final("w1"))
    assert final == wire.CommandResult("w1", "failed", message="interrupted by reset")
    await server.wait(lambda: server.final("r1") and len(server.hellos) == 2)
