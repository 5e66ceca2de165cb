"""Simulated patients and devices: physiology, scenarios, BIDMC files, device loops (no server)."""

from __future__ import annotations

import asyncio
import random
import statistics
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import need_data
from vitalwire import simulator
from vitalwire.core.metrics import METRIC_BY_NAME, validate_values
from vitalwire.simulator import (
    SCENARIOS,
    PatientModel,
    SimDevice,
    read_bidmc,
    replay_file,
    run_device,
    run_ward,
    ward_scenarios,
)

START = 1_700_000_000.0
BIDMC_FILES = ("bidmc_01", "bidmc_19", "bidmc_22", "bidmc_25", "bidmc_32")
INTEGER_METRICS = ("spo2", "pulse", "hr", "rr", "sbp", "dbp", "battery")


def run_model(scenario: str, seed: int = 0, seconds: int = 600) -> list[dict[str, Any]]:
    model = PatientModel(scenario, rng=random.Random(seed), start_ts=START)
    return [model.sample(START + i) for i in range(seconds)]


def fraction(samples: list[dict[str, Any]], test: Any) -> float:
    return sum(1 for s in samples if test(s)) / len(samples)


def bidmc(name: str) -> Path:
    return need_data() / f"{name}_Numerics.csv"


# -- physiology -----------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("scenario", SCENARIOS)
def test_samples_stay_inside_physical_bounds(scenario: str, seed: int) -> None:
    for sample in run_model(scenario, seed):
        values = {k: v for k, v in sample.items() if k != "probe"}
        assert set(values) <= set(METRIC_BY_NAME)
        assert validate_values(values) == values
        assert values["dbp"] < values["sbp"]
        assert isinstance(sample["probe"], bool)


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_samples_are_rounded(scenario: str) -> None:
    for sample in run_model(scenario, seconds=120):
        for name in INTEGER_METRICS:
            if name in sample:
                assert isinstance(sample[name], int) and not isinstance(sample[name], bool)
        assert round(sample["temp_c"], 1) == sample["temp_c"]
        if "pi" in sample:
            assert round(sample["pi"], 2) == sample["pi"]


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_pulse_tracks_hr(scenario: str) -> None:
    for sample in run_model(scenario):
        if "pulse" in sample:
            assert abs(sample["pulse"] - sample["hr"]) <= 4


@pytest.mark.parametrize("seed", range(5))
def test_normal_stays_in_normal_ranges(seed: int) -> None:
    samples = run_model("normal", seed)
    assert fraction(samples, lambda s: s["spo2"] >= 94) >= 0.95
    assert fraction(samples, lambda s: 50 <= s["hr"] <= 110) >= 0.95
    assert fraction(samples, lambda s: 10 <= s["rr"] <= 22) >= 0.95
    assert all(s["probe"] for s in samples)


@pytest.mark.parametrize("seed", range(5))
def test_desaturation_reaches_86_within_3_minutes_and_stays(seed: int) -> None:
    samples = run_model("desaturation", seed)
    assert min(s["spo2"] for s in samples[:180]) <= 86
    assert statistics.mean(s["spo2"] for s in samples[240:]) <= 87
    assert min(s["spo2"] for s in samples) >= 78


@pytest.mark.parametrize("seed", range(5))
def test_desaturation_raises_hr(seed: int) -> None:
    samples = run_model("desaturation", seed)
    spo2 = [float(s["spo2"]) for s in samples]
    hr = [float(s["hr"]) for s in samples]
    assert statistics.correlation(spo2, hr) < -0.5
    assert statistics.mean(hr[240:]) >= statistics.mean(hr[:15]) + 10


@pytest.mark.parametrize("seed", range(5))
def test_tachycardia_keeps_hr_above_120(seed: int) -> None:
    samples = run_model("tachycardia", seed)
    assert fraction(samples, lambda s: s["hr"] > 120) >= 0.9
    assert fraction(samples, lambda s: s["pulse"] > 120) >= 0.9
    assert all(125 <= s["hr"] <= 150 for s in samples[60:])


@pytest.mark.parametrize("seed", range(5))
def test_bradycardia_keeps_hr_below_50(seed: int) -> None:
    samples = run_model("bradycardia", seed)
    assert fraction(samples, lambda s: s["hr"] < 50) >= 0.9
    assert all(35 <= s["hr"] <= 48 and 35 <= s["pulse"] <= 48 for s in samples[60:])


@pytest.mark.parametrize("seed", range(5))
def test_probe_off_omits_oximeter_values(seed: int) -> None:
    samples = run_model("probe_off", seed)
    off = [s for s in samples if not s["probe"]]
    on = [s for s in samples if s["probe"]]
    assert off and on
    assert all("spo2" not in s and "pulse" not in s and "pi" not in s for s in off)
    assert all("hr" in s for s in off)
    assert all("spo2" in s and "pulse" in s and "pi" in s for s in on)


@pytest.mark.parametrize("seed", range(5))
def test_battery_drain_falls_to_zero_and_never_below(seed: int) -> None:
    battery = [s["battery"] for s in run_model("battery_drain", seed, seconds=900)]
    assert min(battery[:600]) < 20
    assert battery == sorted(battery, reverse=True)
    assert battery[-1] == 0 and min(battery) == 0


def test_battery_drains_slowly_otherwise() -> None:
    battery = [s["battery"] for s in run_model("normal", seconds=600)]
    assert battery[0] - battery[-1] <= 1


@pytest.mark.parametrize("seed", range(5))
def test_disconnect_wants_disconnect_periodically(seed: int) -> None:
    model = PatientModel("disconnect", rng=random.Random(seed), start_ts=START)
    down = [model.wants_disconnect(START + i) for i in range(300)]
    outages = sum(1 for i in range(1, 300) if down[i] and not down[i - 1])
    assert outages >= 3
    assert 0.05 <= sum(down) / len(down) <= 0.25
    samples = [model.sample(START + i) for i in range(300)]
    assert fraction(samples, lambda s: s["spo2"] >= 94 and 50 <= s["hr"] <= 110) >= 0.9


@pytest.mark.parametrize("scenario", [s for s in SCENARIOS if s != "disconnect"])
def test_other_scenarios_never_want_disconnect(scenario: str) -> None:
    model = PatientModel(scenario, rng=random.Random(0), start_ts=START)
    assert not any(model.wants_disconnect(START + i) for i in range(600))


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_same_seed_gives_same_samples(scenario: str) -> None:
    assert run_model(scenario, seed=7) == run_model(scenario, seed=7)
    assert run_model(scenario, seed=7) != run_model(scenario, seed=8)


def test_schedule_does_not_depend_on_sampling_rate() -> None:
    a = PatientModel("probe_off", rng=random.Random(3), start_ts=START)
    b = PatientModel("probe_off", rng=random.Random(3), start_ts=START)
    for i in range(0, 600, 5):
        a.sample(START + i)
    assert [a.probe_attached(START + i) for i in range(600)] == [
        b.probe_attached(START + i) for i in range(600)
    ]


@pytest.mark.parametrize("name", ["sepsis", "", "Normal", "mixed"])
def test_unknown_scenario_names_the_valid_ones(name: str) -> None:
    with pytest.raises(ValueError) as info:
        PatientModel(name, rng=random.Random(0))
    for valid in SCENARIOS:
        assert valid in str(info.value)


# -- ward mix -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("n", "scenario", "expected"),
    [
        (3, "tachycardia", ["tachycardia"] * 3),
        (2, "mixed", ["desaturation", "tachycardia"]),
        (
            8,
            "mixed",
            ["desaturation", "tachycardia", "bradycardia", "probe_off", "battery_drain"]
            + ["normal"] * 3,
        ),
        (2, ["normal", "disconnect"], ["normal", "disconnect"]),
        (0, "mixed", []),
    ],
)
def test_ward_scenarios(n: int, scenario: str | list[str], expected: list[str]) -> None:
    assert ward_scenarios(n, scenario) == expected


@pytest.mark.parametrize(("n", "scenario"), [(2, "sepsis"), (2, ["normal"]), (1, ["mixed"])])
def test_ward_scenarios_rejects_bad_input(n: int, scenario: str | list[str]) -> None:
    with pytest.raises(ValueError):
        ward_scenarios(n, scenario)


# -- BIDMC files ----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", BIDMC_FILES)
def test_read_bidmc_reads_every_row(name: str) -> None:
    rows = read_bidmc(bidmc(name))
    assert len(rows) == 481
    assert [r["t"] for r in rows] == [float(i) for i in range(481)]
    for row in rows:
        assert set(row) <= {"t", "hr", "pulse", "rr", "spo2", "probe"}
        assert row["probe"] is ("spo2" in row)
        if not row["probe"]:
            assert "pulse" not in row
        values = {k: v for k, v in row.items() if k not in ("t", "probe")}
        assert all(type(v) is float for v in values.values())
        validate_values(values)


def test_read_bidmc_sustained_hypoxaemia_record() -> None:
    rows = read_bidmc(bidmc("bidmc_32"))
    assert rows[0]["t"] == 0.0 and str(rows[0]["t"]) == "0.0"  # written "-0" in the file
    assert all(83 <= r["spo2"] <= 87 for r in rows)
    assert rows[0] == {"t": 0.0, "hr": 81.0, "pulse": 80.0, "rr": 25.0, "spo2": 84.0, "probe": True}


def test_read_bidmc_probe_off_gaps() -> None:
    rows = read_bidmc(bidmc("bidmc_19"))
    off = [r for r in rows if not r["probe"]]
    assert off and all("spo2" not in r and "pulse" not in r for r in off)
    assert rows[0] == {"t": 0.0, "hr": 74.0, "rr": 15.0, "probe": False}
    assert "rr" not in rows[19]  # RESP is NaN at t=19-22


@pytest.mark.parametrize(
    ("content", "line"),
    [
        ("Time [s], HR, PULSE, RESP\n0,80,80,16\n", "line 1"),
        ("", "line 1"),
        ("Time [s], HR, PULSE, RESP, SpO2\n0,80,80,16,97\n1,80,80,16\n", "line 3"),
        ("Time [s], HR, PULSE, RESP, SpO2\n0,80,80,16,97\n1,80,eighty,16,97\n", "line 3"),
        ("Time [s], HR, PULSE, RESP, SpO2\nNaN,80,80,16,97\n", "line 2"),
        ("Time [s], HR, PULSE, RESP, SpO2\n0,inf,80,16,97\n", "line 2"),
    ],
)
def test_read_bidmc_rejects_malformed_file(tmp_path: Path, content: str, line: str) -> None:
    path = tmp_path / "broken_Numerics.csv"
    path.write_text(content)
    with pytest.raises(ValueError, match=line) as info:
        read_bidmc(path)
    assert "broken_Numerics.csv" in str(info.value)


def test_read_bidmc_tolerates_crlf_and_trailing_blank_line(tmp_path: Path) -> None:
    path = tmp_path / "x.csv"
    path.write_bytes(b"Time [s], HR, PULSE, RESP, SpO2\r\n0,80,NaN,16,NaN\r\n\r\n")
    assert read_bidmc(path) == [{"t": 0.0, "hr": 80.0, "rr": 16.0, "probe": False}]


# -- device loops, with a stand-in for DeviceClient -----------------------------------------------


class FakeClient:
    """Records what the simulator does with its DeviceClient."""

    flush_error: type[BaseException] | None = None

    def __init__(self, url: str, device_id: str, secret: str, **kw: Any) -> None:
        self.url = url
        self.device_id = device_id
        self.secret = secret
        self.kw = kw
        self.sent: list[tuple[float | None, dict[str, Any]]] = []
        self.drops: list[int] = []
        self.events: list[str] = []
        self.seq = 0
        self.on_send: Any = None

    async def start(self, *, wait: bool = True, timeout: float = 10.0) -> None:
        self.events.append(f"start wait={wait}")

    def send(self, values: dict[str, Any] | None = None, ts: float | None = None) -> int:
        self.seq += 1
        self.sent.append((ts, dict(values or {})))
        if self.on_send is not None:
            self.on_send(self)
        return self.seq

    async def drop_connection(self) -> None:
        self.drops.append(len(self.sent))

    async def flush(self, timeout: float = 10.0) -> None:
        self.events.append(f"flush {timeout}")
        if self.flush_error is not None:
            raise self.flush_error()

    async def close(self) -> None:
        self.events.append("close")


@pytest.fixture
def clients(monkeypatch: pytest.MonkeyPatch) -> list[FakeClient]:
    made: list[FakeClient] = []

    def factory(*args: Any, **kw: Any) -> FakeClient:
        client = FakeClient(*args, **kw)
        made.append(client)
        return client

    monkeypatch.setattr(simulator, "DeviceClient", factory)
    return made


def fake(client: object) -> FakeClient:
    assert isinstance(client, FakeClient)
    return client


class StepClock:
    """A device clock that moves one second per reading."""

    def __init__(self, now: float = START) -> None:
        self.now = now

    def __call__(self) -> float:
        self.now += 1.0
        return self.now


DEVICE = SimDevice("dev-1", "s3cret", "pat-1")


async def test_run_device_sends_samples_then_flushes_and_closes(clients: list[FakeClient]) -> None:
    client = fake(
        await run_device(
            "http://x", DEVICE, rate_hz=100, duration_s=0.05, seed=1, clock=StepClock()
        )
    )
    assert clients == [client]
    assert (client.device_id, client.secret) == ("dev-1", "s3cret")
    n = len(client.sent)
    assert 1 <= n <= 5  # 5 ticks; fewer only if the loop stalled past a period and skipped some
    assert [ts for ts, _ in client.sent] == [START + 2 + i for i in range(n)]
    assert client.events == ["start wait=False", "flush 10", "close"]
    model = PatientModel("normal", rng=random.Random(1), start_ts=START + 1)
    assert [v for _, v in client.sent] == [model.sample(START + 2 + i) for i in range(n)]


async def test_run_device_stops_when_asked(clients: list[FakeClient]) -> None:
    stop = asyncio.Event()
    task = asyncio.create_task(run_device("http://x", DEVICE, rate_hz=0.001, stop=stop))
    while not (clients and clients[0].sent):
        await asyncio.sleep(0)
    stop.set()  # the next tick is 1000 s away: stop must cut the wait short
    client = fake(await asyncio.wait_for(task, 5))
    assert len(client.sent) == 1
    assert client.events == ["start wait=False", "flush 10", "close"]


async def test_run_device_drops_the_connection_in_disconnect_scenario(
    clients: list[FakeClient],
) -> None:
    stop = asyncio.Event()

    def stop_after_300(c: FakeClient) -> None:
        if len(c.sent) >= 300:
            stop.set()

    clock = StepClock()
    task = asyncio.create_task(
        run_device(
            "http://x",
            DEVICE,
            rate_hz=10_000,
            scenario="disconnect",
            seed=2,
            stop=stop,
            clock=clock,
        )
    )
    while not clients:
        await asyncio.sleep(0)
    clients[0].on_send = stop_after_300
    client = fake(await asyncio.wait_for(task, 10))
    assert len(client.sent) == 300  # measuring went on through the outages
    model = PatientModel("disconnect", rng=random.Random(2), start_ts=START + 1)
    flips = [
        i + 1
        for i in range(300)
        if model.wants_disconnect(START + 2 + i) and not model.wants_disconnect(START + 1 + i)
    ]
    assert len(flips) >= 3
    assert client.drops == flips


async def test_run_device_ignores_a_flush_timeout(
    clients: list[FakeClient], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(FakeClient, "flush_error", TimeoutError)
    client = fake(await run_device("http://x", DEVICE, rate_hz=1000, duration_s=0.003))
    assert client.events[-2:] == ["flush 10", "close"]


@pytest.mark.parametrize(("kw"), [{"scenario": "sepsis"}, {"rate_hz": 0}, {"rate_hz": -1}])
async def test_run_device_rejects_bad_arguments(
    clients: list[FakeClient], kw: dict[str, Any]
) -> None:
    with pytest.raises(ValueError):
        await run_device("http://x", DEVICE, **kw)
    assert clients == []


async def test_run_ward_runs_every_device_with_its_own_seed(clients: list[FakeClient]) -> None:
    devices = [SimDevice(f"dev-{i}", f"s{i}") for i in range(3)]
    ward = await run_ward("http://x", devices, rate_hz=1000, duration_s=0.005, scenario="mixed")
    result = [fake(c) for c in ward]
    assert [c.device_id for c in result] == ["dev-0", "dev-1", "dev-2"]
    assert all(1 <= len(c.sent) <= 5 for c in result)
    firsts = [c.sent[0][1] for c in result]
    assert firsts[0] != firsts[1] != firsts[2]


async def test_run_ward_rejects_unknown_scenario_before_starting(
    clients: list[FakeClient],
) -> None:
    with pytest.raises(ValueError, match="desaturation"):
        await run_ward("http://x", [DEVICE], scenario="sepsis", duration_s=1)
    assert clients == []


class QuarterClock:
    """A device clock that moves a quarter of a second each time it is read."""

    def __init__(self, now: float = START) -> None:
        self.now = now

    def __call__(self) -> float:
        self.now += 0.25
        return self.now


async def test_replay_file_sends_every_row_stamped_when_sent(clients: list[FakeClient]) -> None:
    path = bidmc("bidmc_19")
    client = fake(await replay_file("http://x", DEVICE, path, speed=0, clock=QuarterClock()))
    rows = read_bidmc(path)
    assert len(client.sent) == 481
    # one clock reading per row, at its send: not the file's t (1 s apart)
    assert [ts for ts, _ in client.sent] == [START + 0.25 * (i + 1) for i in range(481)]
    assert [v for _, v in client.sent] == [{k: v for k, v in r.items() if k != "t"} for r in rows]
    assert client.events == ["start wait=False", "flush 30", "close"]


async def test_replay_file_keeps_the_recordings_pacing_divided_by_speed(
    clients: list[FakeClient], tmp_path: Path
) -> None:
    path = tmp_path / "short.csv"
    rows = "".join(f"{t},80,80,16,97\n" for t in (0, 1, 2, 4, 5))
    path.write_text("Time [s], HR, PULSE, RESP, SpO2\n" + rows)
    loop = asyncio.get_running_loop()
    client = fake(await replay_file("http://x", DEVICE, path, speed=50, clock=loop.time))
    done = loop.time()
    stamps = [ts for ts, _ in client.sent]
    assert len(stamps) == 5 and all(ts is not None and ts <= done for ts in stamps)
    since = [ts - stamps[0] for ts in stamps if ts is not None]
    # row t goes t / 50 s after the first (the loop may wake a clock tick early), never bunched
    for got, t in zip(since, (0, 1, 2, 4, 5), strict=True):
        assert got >= t / 50 - 0.002, (got, t)
    assert since == sorted(since)
    assert since[-1] < 2.5  # stamped as sent: not the recording's 5 s


async def test_replay_file_lets_a_flush_timeout_propagate(
    clients: list[FakeClient], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setattr(FakeClient, "flush_error", TimeoutError)
    path = tmp_path / "short.csv"
    path.write_text("Time [s], HR, PULSE, RESP, SpO2\n0,80,80,16,97\n1,81,80,16,97\n")
    with pytest.raises(TimeoutError):
        await replay_file("http://x", DEVICE, path, speed=float("inf"), clock=QuarterClock())
    assert clients[0].events[-1] == "close"
    assert [ts for ts, _ in clients[0].sent] == [START + 0.25, START + 0.5]


async def test_replay_file_rejects_negative_speed(clients: list[FakeClient]) -> None:
    with pytest.raises(ValueError, match="speed"):
        await replay_file("http://x", DEVICE, "unused.csv", speed=-1)
    assert clients == []


def test_report_by_exception_sends_on_change_or_after_max_silence() -> None:
    from vitalwire.sdk import ReportByException

    policy = ReportByException(deadbands={"spo2": 1.0, "hr": 2.0}, max_silence_s=30.0)
    sent = []
    for t, values in [
        (0.0, {"spo2": 97.0, "hr": 70.0}),  # first: always
        (1.0, {"spo2": 97.4, "hr": 71.0}),  # inside both deadbands: skipped
        (2.0, {"spo2": 96.0, "hr": 71.0}),  # spo2 moved by 1: sent
        (3.0, {"spo2": 96.0, "hr": 71.5}),  # hr within 2 of the last sent (71): skipped
        (33.0, {"spo2": 96.0, "hr": 71.0}),  # 31 s of silence: sent (heartbeat value)
        (34.0, {"spo2": 96.0, "hr": 71.0, "probe": False}),  # a new field: sent
        (35.0, {"spo2": 96.0, "hr": 71.0, "probe": True}),  # a boolean changed: sent
    ]:
        if policy.should_send(values, t):
            policy.sent(values, t)
            sent.append(t)
    assert sent == [0.0, 2.0, 33.0, 34.0, 35.0]
