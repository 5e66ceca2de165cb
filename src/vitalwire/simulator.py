"""Simulated patients and devices: realistic vitals, scripted scenarios, replay of recorded vitals.

How it works: a :class:`PatientModel` holds one patient's baseline (drawn from an injected
``random.Random``) and, per metric, a slow Ornstein-Uhlenbeck deviation around a *target* that the
scenario moves over time (SpO2 sliding down under ``desaturation``, HR up under ``tachycardia``...).
Each :meth:`PatientModel.sample` advances the deviations by the time since the previous sample and
adds Gaussian measurement noise, so the same seed and the same timestamps give the same samples.
Heart rate follows SpO2 (hypoxaemia raises HR), the oximeter's pulse rate tracks HR closely, and
every value is kept inside the physical bounds of :mod:`vitalwire.core.metrics`.

:func:`run_device` drives one model through a :class:`~vitalwire.sdk.DeviceClient` at a fixed rate
(a scheduler that does not drift); :func:`run_ward` runs many at once; :func:`replay_file` streams a
recorded BIDMC numerics file through a device.

Commands: a simulated device answers every command of the catalogue (see :func:`run_device`):
``reset`` reconnects, ``report_now`` sends at once, ``set_interval`` changes the tick period,
``request_data`` streams a synthetic pleth waveform (:func:`pleth_shape`) or a burst of readings,
``identify`` and ``silence`` (at most 120 s) are recorded in a :class:`SimState`.

Recorded vitals: :func:`read_bidmc` parses the 1 Hz numerics files of the BIDMC PPG and Respiration
Dataset v1.0.0 (PhysioNet), used under the Open Data Commons Attribution License v1.0 (ODC-By 1.0).
Cite: Pimentel MAF, Johnson AEW, Charlton PH, Birrenkott D, Watkinson PJ, Tarassenko L, Clifton DA.
"Toward a Robust Estimation of Respiratory Rate From Pulse Oximeters", IEEE Trans Biomed Eng
64(8):1914-1923, 2017, doi:10.1109/TBME.2016.2613124; the dataset: Pimentel M, Johnson A,
Charlton P, Clifton D, BIDMC PPG and Respiration Dataset (v1.0.0), PhysioNet, 2018,
doi:10.13026/C2208R; and PhysioNet: Goldberger AL et al., Circulation 101(23):e215-e220, 2000.
The data are engineering test material, not clinical ground truth.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import math
import os
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from vitalwire import wire
from vitalwire.core.commands import CATALOGUE
from vitalwire.core.metrics import METRIC_BY_NAME
from vitalwire.sdk import DeviceClient, ReportByException

#: Scenario names accepted by :class:`PatientModel`, :func:`run_device` and :func:`run_ward`.
SCENARIOS: tuple[str, ...] = (
    "normal",
    "desaturation",
    "tachycardia",
    "bradycardia",
    "probe_off",
    "battery_drain",
    "disconnect",
)

#: The abnormal scenarios a ``"mixed"`` ward gets one device each of (the rest are ``normal``).
MIXED_ABNORMAL: tuple[str, ...] = (
    "desaturation",
    "tachycardia",
    "bradycardia",
    "probe_off",
    "battery_drain",
)

#: Header of a BIDMC numerics file, after stripping each name.
BIDMC_HEADER: tuple[str, ...] = ("Time [s]", "HR", "PULSE", "RESP", "SpO2")

_Sample = dict[str, float | bool]


@dataclass(frozen=True)
class SimDevice:
    """A provisioned device: its id and secret, and the patient it is bound to (if known)."""

    device_id: str
    secret: str
    patient_id: str | None = None


def addresses(url: str) -> list[str]:
    """``--url``: one address, or several separated by commas (a cluster's nodes: a device
    whose connection fails or ends tries the next)."""
    return [u.strip() for u in url.split(",") if u.strip()]


def _check_scenario(scenario: str) -> None:
    if scenario not in SCENARIOS:
        raise ValueError(f"unknown scenario {scenario!r}; valid scenarios: {', '.join(SCENARIOS)}")


def _ramp(elapsed: float, start: float, duration: float) -> float:
    """0 before ``start``, 1 after ``start + duration``, linear in between."""
    if elapsed <= start:
        return 0.0
    if elapsed >= start + duration:
        return 1.0
    return (elapsed - start) / duration


def _clamp(value: float, low: float, high: float) -> float:
    return min(max(value, low), high)


def _bounded(name: str, value: float) -> float:
    metric = METRIC_BY_NAME[name]
    return _clamp(value, metric.low, metric.high)


class _OU:
    """An Ornstein-Uhlenbeck deviation around 0 with time constant ``tau_s`` and stationary SD."""

    __slots__ = ("tau_s", "sd", "x")

    def __init__(self, rng: random.Random, tau_s: float, sd: float) -> None:
        self.tau_s = tau_s
        self.sd = sd
        self.x = rng.gauss(0.0, sd)

    def step(self, rng: random.Random, dt: float) -> float:
        a = math.exp(-dt / self.tau_s)
        # Always draw, even for dt == 0, so rng use does not depend on the timestamps.
        z = rng.gauss(0.0, 1.0)
        self.x = self.x * a + self.sd * math.sqrt(1.0 - a * a) * z
        return self.x


class PatientModel:
    """Realistic physiology for one simulated patient, shaped over time by a scenario.

    Per-patient baseline from ``rng``; per metric a slow Ornstein-Uhlenbeck drift around the
    scenario's target plus Gaussian measurement noise. HR rises as SpO2 falls (about 1.5 /min per
    % of desaturation), ``pulse`` tracks ``hr`` within a beat or two, ``dbp`` stays below ``sbp``,
    ``battery`` drains slowly (fast under ``battery_drain``). Every value stays inside the physical
    bounds of :mod:`vitalwire.core.metrics`; ``spo2``, ``pulse``, ``hr``, ``rr``, ``sbp``, ``dbp``
    and ``battery`` are whole numbers, ``temp_c`` has 1 decimal and ``pi`` 2.

    Scenarios (time measured from ``start_ts``):

    - ``normal``: a stable adult within normal ranges.
    - ``desaturation``: from ~20 s SpO2 slides over 1-2 min to 82-85 % and stays; HR and RR rise.
    - ``tachycardia``: HR/pulse rise within ~30 s to 125-150 /min.
    - ``bradycardia``: HR/pulse fall within ~30 s to 35-48 /min.
    - ``probe_off``: recurring periods (10-25 s, every ~1 min) with ``probe`` False and no
      ``spo2``, ``pulse`` or ``pi`` (an oximeter gives no SpO2 without its probe).
    - ``battery_drain``: battery starts at 45-65 % and falls 1 % every 10 s down to 0.
    - ``disconnect``: normal physiology; :meth:`wants_disconnect` is True for 5-10 s about every
      minute.

    Args:
        scenario: one of :data:`SCENARIOS`.
        rng: the source of randomness (seed it for reproducible patients).
        start_ts: device time (s) at which the scenario starts.

    Raises:
        ValueError: ``scenario`` is not one of :data:`SCENARIOS`.
    """

    #: Desaturation: how much HR rises (/min) per % of SpO2 below baseline.
    HR_PER_SPO2: float = 1.5
    #: Desaturation: how much RR rises (/min) per % of SpO2 below baseline.
    RR_PER_SPO2: float = 0.4

    def __init__(self, scenario: str = "normal", *, rng: random.Random, start_ts: float = 0.0):
        _check_scenario(scenario)
        self.scenario = scenario
        self.start_ts = start_ts
        self._rng = rng
        # Baseline of this patient (a healthy-ish adult at rest).
        self.base_spo2 = rng.uniform(96.0, 99.0)
        self.base_hr = rng.uniform(62.0, 88.0)
        self.base_rr = rng.uniform(12.0, 18.0)
        self.base_temp_c = rng.uniform(36.5, 37.2)
        self.base_sbp = rng.uniform(108.0, 132.0)
        self.base_dbp = rng.uniform(65.0, 82.0)
        self.base_pi = rng.uniform(1.5, 5.0)
        self.base_battery = rng.uniform(60.0, 100.0)
        self.battery_drain_per_s = 1.0 / 3600.0  # ~1 % per hour in normal use
        # Scenario parameters (always drawn, so a seed gives the same baseline in every scenario).
        self.desat_target = rng.uniform(82.5, 85.0)
        self.desat_start_s = 20.0
        self.desat_duration_s = rng.uniform(60.0, 120.0)
        self.tachy_target = rng.uniform(132.0, 142.0)
        self.brady_target = rng.uniform(39.0, 44.0)
        self.rate_ramp_s = 30.0
        drain_start = rng.uniform(45.0, 65.0)
        if scenario == "battery_drain":
            self.base_battery = drain_start
            self.battery_drain_per_s = 0.1  # 1 % every 10 s
        # Slow drifts (tau s, stationary SD) around the targets.
        self._drift = {
            "spo2": _OU(rng, 60.0, 0.7),
            "hr": _OU(rng, 90.0, 3.0),
            "rr": _OU(rng, 60.0, 1.0),
            "temp_c": _OU(rng, 900.0, 0.1),
            "sbp": _OU(rng, 120.0, 4.0),
            "dbp": _OU(rng, 120.0, 3.0),
            "pi": _OU(rng, 60.0, 0.3),
        }
        # Event schedules (probe-off periods, network outages) from their own stream of randomness,
        # so they do not depend on how many samples were taken.
        self._schedule_rng = random.Random(rng.getrandbits(64))
        self._probe_off: list[tuple[float, float]] = []
        self._outages: list[tuple[float, float]] = []
        self._last_ts: float | None = None

    # -- schedules ----------------------------------------------------------------------------

    def _periods(
        self,
        periods: list[tuple[float, float]],
        elapsed: float,
        first: tuple[float, float],
        gap: tuple[float, float],
        length: tuple[float, float],
    ) -> list[tuple[float, float]]:
        r = self._schedule_rng
        while not periods or periods[-1][0] <= elapsed:
            begin = r.uniform(*first) if not periods else periods[-1][1] + r.uniform(*gap)
            periods.append((begin, begin + r.uniform(*length)))
        return periods

    @staticmethod
    def _inside(periods: Sequence[tuple[float, float]], elapsed: float) -> bool:
        i = bisect.bisect_right(periods, (elapsed, math.inf)) - 1
        return i >= 0 and periods[i][0] <= elapsed < periods[i][1]

    def probe_attached(self, ts: float) -> bool:
        """Whether the oximeter probe is on the patient at device time ``ts``."""
        if self.scenario != "probe_off":
            return True
        elapsed = ts - self.start_ts
        periods = self._periods(self._probe_off, elapsed, (20.0, 40.0), (35.0, 60.0), (10.0, 25.0))
        return not self._inside(periods, elapsed)

    def wants_disconnect(self, ts: float) -> bool:
        """True while the ``disconnect`` scenario has the network down (5-10 s about every minute).

        Always False for the other scenarios.
        """
        if self.scenario != "disconnect":
            return False
        elapsed = ts - self.start_ts
        periods = self._periods(self._outages, elapsed, (45.0, 60.0), (50.0, 55.0), (5.0, 10.0))
        return self._inside(periods, elapsed)

    # -- measurements -------------------------------------------------------------------------

    def sample(self, ts: float) -> dict[str, float | bool]:
        """One measurement set at device time ``ts`` (s), as the ``values`` of a reading.

        Deterministic given the rng's seed and the sequence of timestamps. Always has ``hr``,
        ``rr``, ``temp_c``, ``sbp``, ``dbp``, ``battery`` and ``probe``; ``spo2``, ``pulse`` and
        ``pi`` only while the probe is attached.
        """
        rng = self._rng
        dt = 0.0 if self._last_ts is None else max(0.0, ts - self._last_ts)
        self._last_ts = ts if self._last_ts is None else max(ts, self._last_ts)
        elapsed = max(0.0, ts - self.start_ts)
        d = {name: ou.step(rng, dt) for name, ou in self._drift.items()}
        noise = {
            name: rng.gauss(0.0, sd)
            for name, sd in (
                ("spo2", 0.4),
                ("hr", 1.0),
                ("pulse", 0.7),
                ("rr", 0.5),
                ("temp_c", 0.03),
                ("sbp", 2.0),
                ("dbp", 1.5),
                ("pi", 0.08),
            )
        }

        # SpO2: the "true" saturation (target + drift) drives HR and RR.
        spo2_target = self.base_spo2
        if self.scenario == "desaturation":
            ramp = _ramp(elapsed, self.desat_start_s, self.desat_duration_s)
            spo2_target += (self.desat_target - self.base_spo2) * ramp
        spo2_true = _clamp(spo2_target + d["spo2"], 50.0, 100.0)
        hypoxia = max(0.0, self.base_spo2 - spo2_true)

        hr_target = self.base_hr + self.HR_PER_SPO2 * hypoxia
        hr_band = (25.0, 220.0)
        if self.scenario in ("tachycardia", "bradycardia"):
            goal, band = (
                (self.tachy_target, (125.0, 150.0))
                if self.scenario == "tachycardia"
                else (self.brady_target, (35.0, 48.0))
            )
            ramp = _ramp(elapsed, 0.0, self.rate_ramp_s)
            hr_target += (goal - self.base_hr) * ramp
            if ramp >= 1.0:
                hr_band = band
        hr_true = _clamp(hr_target + d["hr"], *hr_band)
        hr = round(_clamp(hr_true + noise["hr"], *hr_band))
        pulse = round(_clamp(hr + noise["pulse"], *hr_band))

        spo2 = round(_bounded("spo2", spo2_true + noise["spo2"]))
        rr = round(_clamp(self.base_rr + self.RR_PER_SPO2 * hypoxia + d["rr"] + noise["rr"], 6, 40))
        temp_c = round(_clamp(self.base_temp_c + d["temp_c"] + noise["temp_c"], 35.0, 39.5), 1)
        sbp = round(_clamp(self.base_sbp + d["sbp"] + noise["sbp"], 80.0, 190.0))
        dbp = round(_clamp(self.base_dbp + d["dbp"] + noise["dbp"], 40.0, 110.0))
        dbp = min(dbp, sbp - 20)  # pulse pressure of at least 20 mmHg: dbp < sbp always
        pi = round(_clamp(self.base_pi + d["pi"] + noise["pi"], 0.2, 20.0), 2)
        battery = round(
            max(0.0, min(100.0, self.base_battery - self.battery_drain_per_s * elapsed))
        )

        out: _Sample = {
            "hr": hr,
            "rr": rr,
            "temp_c": temp_c,
            "sbp": sbp,
            "dbp": dbp,
            "battery": battery,
        }
        probe = self.probe_attached(ts)
        if probe:
            out["spo2"] = spo2
            out["pulse"] = pulse
            out["pi"] = pi
        out["probe"] = probe
        return out


# -- recorded vitals ------------------------------------------------------------------------------


def read_bidmc(path: str | os.PathLike[str]) -> list[dict[str, float | bool]]:
    """Parse a BIDMC numerics CSV (``Time [s], HR, PULSE, RESP, SpO2``, 1 row per second).

    The files come from the BIDMC PPG and Respiration Dataset v1.0.0 (PhysioNet,
    doi:10.13026/C2208R; Pimentel et al., IEEE TBME 2017), ODC-By 1.0: see the module docstring
    for the citations that must accompany them.

    Args:
        path: the CSV file.

    Returns:
        One dict per row: ``t`` (s, ``-0`` read as 0.0), ``hr``, ``pulse``, ``rr``, ``spo2`` as
        floats, each omitted when ``NaN``, and ``probe``: True when SpO2 is present, False when it
        is not (no valid oximeter signal), in which case ``pulse`` is omitted too.

    Raises:
        ValueError: a wrong header or a malformed row, naming the file and the line.
    """
    name = os.fspath(path)
    rows: list[dict[str, float | bool]] = []
    with open(path, encoding="utf-8", newline="") as f:
        header = f.readline()
        names = tuple(n.strip() for n in header.strip().lstrip("\ufeff").split(","))
        if names != BIDMC_HEADER:
            expected = ", ".join(BIDMC_HEADER)
            raise ValueError(
                f"{name}: line 1: expected header {expected!r}, got {header.strip()!r}"
            )
        for lineno, line in enumerate(f, start=2):
            if not line.strip():
                continue
            cells = [c.strip() for c in line.strip().split(",")]
            if len(cells) != len(BIDMC_HEADER):
                raise ValueError(
                    f"{name}: line {lineno}: expected {len(BIDMC_HEADER)} values, "
                    f"got {len(cells)}: {line.strip()!r}"
                )
            values: list[float] = []
            for column, cell in zip(BIDMC_HEADER, cells, strict=True):
                try:
                    value = float(cell)
                except ValueError:
                    raise ValueError(
                        f"{name}: line {lineno}: {column} is not a number: {cell!r}"
                    ) from None
                if math.isinf(value) or (column == "Time [s]" and math.isnan(value)):
                    raise ValueError(f"{name}: line {lineno}: {column} is not valid: {cell!r}")
                values.append(value)
            t, hr, pulse, rr, spo2 = values
            row: dict[str, float | bool] = {"t": 0.0 if t == 0 else t}
            if not math.isnan(hr):
                row["hr"] = hr
            probe = not math.isnan(spo2)
            if probe and not math.isnan(pulse):
                row["pulse"] = pulse
            if not math.isnan(rr):
                row["rr"] = rr
            if probe:
                row["spo2"] = spo2
            row["probe"] = probe
            rows.append(row)
    return rows


# -- devices --------------------------------------------------------------------------------------


async def _sleep_until(deadline: float, stop: asyncio.Event | None) -> None:
    """Sleep until loop time ``deadline``, or until ``stop`` is set."""
    delay = deadline - asyncio.get_running_loop().time()
    if stop is None or delay <= 0 or stop.is_set():
        await asyncio.sleep(max(0.0, delay))  # always yield, even when late
        return
    try:
        async with asyncio.timeout(delay):
            await stop.wait()
    except TimeoutError:
        pass


async def _pause_until(deadline: float, wake: asyncio.Event) -> bool:
    """Sleep until loop time ``deadline``; return True when ``wake`` cut it short (and clear it)."""
    if not wake.is_set():
        delay = deadline - asyncio.get_running_loop().time()
        if delay <= 0:
            await asyncio.sleep(0)  # always yield, even when late
            return False
        try:
            async with asyncio.timeout(delay):
                await wake.wait()
        except TimeoutError:
            return False
    else:
        await asyncio.sleep(0)
    wake.clear()
    return True


# -- the pleth (PPG) waveform ----------------------------------------------------------------------


def _beat(phase: float, centre: float, rise: float, fall: float) -> float:
    """A skewed Gaussian pulse at ``centre`` of a beat (``rise``/``fall``: widths before/after)."""
    d = (phase - centre + 0.5) % 1.0 - 0.5  # distance on the circle of one beat
    width = rise if d < 0 else fall
    return math.exp(-0.5 * (d / width) ** 2)


def _pleth_raw(phase: float) -> float:
    # Systolic wave: a steep upstroke and a slower fall; the diastolic (reflected) wave after it
    # leaves the dicrotic notch between the two.
    return _beat(phase, 0.17, 0.045, 0.07) + 0.45 * _beat(phase, 0.42, 0.08, 0.12)


_PLETH_MAX = max(_pleth_raw(i / 2000) for i in range(2000))


def pleth_shape(phase: float) -> float:
    """One beat of a photoplethysmogram at ``phase`` (0..1, the foot of the beat at 0), in [0, 1].

    A steep systolic upstroke to the peak (phase ~0.17), a slower fall to the dicrotic notch
    (~0.33), the smaller diastolic wave (~0.42) and a decay back to the foot.
    """
    return min(1.0, max(0.0, _pleth_raw(phase % 1.0) / _PLETH_MAX))


def pleth_wave(t: float, pulse_bpm: float) -> float:
    """A noiseless pleth (PPG) waveform at time ``t`` (s) for a steady pulse rate, in [0, 1].

    Periodic with period ``60 / pulse_bpm``; a beat starts (its foot) at ``t = 0``.
    """
    return pleth_shape(t * pulse_bpm / 60.0)


# -- devices --------------------------------------------------------------------------------------


@dataclass
class SimState:
    """What a simulated device's commands change; pass one to :func:`run_device` to watch it.

    Times are device time (the ``clock`` of :func:`run_device`, epoch seconds).
    """

    #: The reading period (s); ``set_interval`` changes it, ``reset`` restores the start value.
    interval_s: float = 1.0
    #: Until when the device's alarm audio is paused (``silence``, at most 120 s), or None.
    silenced_until: float | None = None
    #: Until when the device blinks and beeps (``identify``), or None.
    identify_until: float | None = None
    #: How many times ``reset`` restarted the measurement.
    resets: int = 0
    #: The last measurement taken (periodic, ``report_now`` or a burst).
    last_values: dict[str, float | bool] = field(default_factory=dict)
    #: Every command handled: (name, command id), in order of arrival.
    commands: list[tuple[str, str]] = field(default_factory=list)
    #: Set when the reading period changed (the scheduler re-plans its next tick).
    wake: asyncio.Event = field(default_factory=asyncio.Event, repr=False)
    _initial_interval_s: float | None = field(default=None, repr=False)


#: Longest remote silence (s): IEC 60601-1-8 audio paused is time-limited; never switch it off.
MAX_SILENCE_S = 120.0
#: A pleth stream is sent in chunks of this many seconds.
PLETH_CHUNK_S = 0.25
#: The highest rate (Hz) of a ``request_data`` burst of readings.
MAX_BURST_HZ = 50.0


def _number(cmd: wire.Command, name: str, *, clamp: bool = False) -> float:
    """Argument ``name`` of ``cmd`` (its catalogue default if absent), checked against the
    catalogue's bounds: out of bounds is an error, or clamped into them with ``clamp``."""
    spec = {a.name: a for a in CATALOGUE[cmd.name].args}[name]
    value = cmd.args.get(name, spec.default)
    if value is None:
        raise ValueError(f"{name} is required")
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ValueError(f"{name} must be a number, got {value!r:.40}")
    value = float(value)
    low = -math.inf if spec.low is None else spec.low
    high = math.inf if spec.high is None else spec.high
    if clamp:
        return _clamp(value, low, high)
    if not low <= value <= high:
        raise ValueError(f"{name} must be between {low:g} and {high:g}, got {value:g}")
    return value


class _Commands:
    """The simulated device's answers to every command of the catalogue."""

    def __init__(
        self,
        client: DeviceClient,
        model: PatientModel,
        state: SimState,
        clock: Callable[[], float],
        seed: int,
    ) -> None:
        self.client = client
        self.model = model
        self.state = state
        self.clock = clock
        self.noise = random.Random(f"pleth-{seed}")  # not the model's rng: readings stay the same

    def register(self) -> None:
        for name, handler in (
            ("reset", self.reset),
            ("report_now", self.report_now),
            ("set_interval", self.set_interval),
            ("request_data", self.request_data),
            ("identify", self.identify),
            ("silence", self.silence),
        ):
            self.client.on_command(name, handler)

    def _seen(self, cmd: wire.Command) -> None:
        self.state.commands.append((cmd.name, cmd.command_id))

    def _measure(self, *, force: bool) -> int:
        ts = self.clock()
        values = self.model.sample(ts)
        self.state.last_values = values
        return self.client.send(values, ts=ts, force=force)

    async def reset(self, cmd: wire.Command) -> dict[str, Any]:
        """Soft restart: the measurement settings go back to their start values (reading period,
        no silence, no identify) and running ``request_data`` windows stop; then the device
        answers and reconnects. The patient and the seq numbering go on."""
        self._seen(cmd)
        st = self.state
        st.resets += 1
        if st._initial_interval_s is not None:
            st.interval_s = st._initial_interval_s
        st.silenced_until = None
        st.identify_until = None
        st.wake.set()
        await self.client.reconnect_now()  # waits until "completed" is written
        return {"reset": True, "interval_s": st.interval_s}

    async def report_now(self, cmd: wire.Command) -> dict[str, Any]:
        self._seen(cmd)
        return {"seq": self._measure(force=True)}

    async def set_interval(self, cmd: wire.Command) -> dict[str, Any]:
        self._seen(cmd)
        interval = _number(cmd, "interval_s")
        self.state.interval_s = interval
        self.state.wake.set()  # the scheduler re-plans its next tick with the new period
        return {"interval_s": interval}

    async def identify(self, cmd: wire.Command) -> dict[str, Any]:
        self._seen(cmd)
        until = self.clock() + _number(cmd, "duration_s")
        self.state.identify_until = until
        return {"until": until}

    async def silence(self, cmd: wire.Command) -> dict[str, Any]:
        self._seen(cmd)
        duration = min(_number(cmd, "duration_s", clamp=True), MAX_SILENCE_S)
        until = self.clock() + duration
        self.state.silenced_until = until
        return {"until": until, "duration_s": duration}

    async def request_data(self, cmd: wire.Command) -> dict[str, Any]:
        self._seen(cmd)
        kind = cmd.args.get("kind", "pleth")
        duration = _number(cmd, "duration_s")
        rate = _number(cmd, "rate_hz")
        if kind == "pleth":
            return await self._pleth(cmd, duration, rate)
        if kind == "burst":
            return await self._burst(duration, rate)
        raise ValueError(f"kind must be pleth or burst, got {kind!r:.40}")

    def _interrupted(self, resets: int) -> None:
        if self.state.resets != resets:
            raise RuntimeError("interrupted by reset")

    async def _pleth(self, cmd: wire.Command, duration: float, rate: float) -> dict[str, Any]:
        """Stream a synthetic PPG at ``rate`` Hz for ``duration`` s, in chunks of 0.25 s, each
        sent once its samples are "acquired"; the beat follows the model's current pulse."""
        loop = asyncio.get_running_loop()
        total = max(1, round(duration * rate))
        t0, start, resets = self.clock(), loop.time(), self.state.resets
        phase, done, sent, chunk = 0.0, 0, 0, 0
        while done < total:
            chunk += 1
            end = min(total, round(chunk * PLETH_CHUNK_S * rate))
            if end <= done:
                continue
            await asyncio.sleep(max(0.0, start + end / rate - loop.time()))
            self._interrupted(resets)
            last = self.state.last_values
            probe = bool(last.get("probe", True))
            bpm = float(last.get("pulse", last.get("hr", self.model.base_hr)))
            samples: list[float] = []
            for _ in range(done, end):
                signal = pleth_shape(phase) if probe else 0.02  # probe off: no pulsatile signal
                samples.append(round(_clamp(signal + self.noise.gauss(0.0, 0.01), 0.0, 1.0), 4))
                phase = (phase + bpm / 60.0 / rate) % 1.0
            if await self.client.send_waveform(
                samples, rate, t0 + done / rate, kind="pleth", command_id=cmd.command_id
            ):
                sent += len(samples)
            done = end
        return {"samples": sent, "rate_hz": rate, "duration_s": duration}

    async def _burst(self, duration: float, rate: float) -> dict[str, Any]:
        """Readings at ``rate`` Hz (at most :data:`MAX_BURST_HZ`) for ``duration`` s, besides the
        periodic ones."""
        loop = asyncio.get_running_loop()
        rate = min(rate, MAX_BURST_HZ)
        count = max(1, round(duration * rate))
        start, resets = loop.time(), self.state.resets
        for i in range(count):
            await asyncio.sleep(max(0.0, start + i / rate - loop.time()))
            self._interrupted(resets)
            self._measure(force=True)
        return {"readings": count, "rate_hz": rate}


async def run_device(
    url: str,
    device: SimDevice,
    *,
    rate_hz: float = 1.0,
    scenario: str = "normal",
    duration_s: float | None = None,
    seed: int = 0,
    stop: asyncio.Event | None = None,
    report: ReportByException | None = None,
    clock: Callable[[], float] = time.time,
    state: SimState | None = None,
    mqtt: MqttOptions | None = None,
) -> DeviceClient:
    """Run one simulated device: sample a :class:`PatientModel` at ``rate_hz`` and send it.

    Ticks are scheduled on the event loop's monotonic clock (``next tick = start + n * period``),
    so the rate does not drift; a tick missed by more than a period is skipped rather than bunched
    up. Under ``disconnect`` the connection is aborted whenever
    :meth:`PatientModel.wants_disconnect` turns True; the SDK reconnects and resends what was not
    acknowledged, and measuring goes on.

    The device answers every command of :data:`vitalwire.core.commands.CATALOGUE`:

    - ``reset``: answers ``{"reset": true}``, then drops its connection and reconnects; the
      reading period goes back to ``1 / rate_hz``, silence and identify end, running
      ``request_data`` windows stop (``failed``: interrupted). The patient and the seq go on.
    - ``report_now``: a reading now, outside the schedule (even under report by exception):
      ``{"seq": n}``.
    - ``set_interval``: the period from the next tick on: one new period after the last tick (at
      once if that is already past), then every period: ``{"interval_s": x}``.
    - ``request_data``: ``pleth`` streams a synthetic PPG (:func:`pleth_shape` at the current
      pulse, plus noise) at ``rate_hz`` in 0.25 s ``waveform`` chunks, then ``{"samples": n}``;
      ``burst`` sends extra readings at ``rate_hz`` (at most 50 Hz), then ``{"readings": n}``.
      Both run beside the periodic readings.
    - ``identify``: ``{"until": ts}``; ``silence``: ``{"until": ts}``, never more than 120 s.

    Args:
        url: the server's base URL (``http://host:port``) or device WebSocket URL.
        device: the provisioned device to act as.
        rate_hz: measurements per second (until a ``set_interval``).
        scenario: one of :data:`SCENARIOS`.
        duration_s: stop after this long (``None``: until ``stop`` is set).
        seed: seed of the patient model.
        stop: set it to stop the device.
        report: report-by-exception policy passed to the :class:`DeviceClient`.
        clock: device clock for reading timestamps (epoch seconds).
        state: the device's command state (:class:`SimState`), to watch it from outside; its
            ``interval_s`` is set to ``1 / rate_hz`` at the start.
        mqtt: publish to this MQTT broker instead (:class:`MqttDevice`; no commands).

    Returns:
        The closed client (``seq``, ``acked``, ``dropped``, ``skipped``, ``connections``...).

    Raises:
        ValueError: unknown ``scenario`` or ``rate_hz`` not positive.
    """
    _check_scenario(scenario)
    if not rate_hz > 0 or math.isinf(rate_hz):
        raise ValueError(f"rate_hz must be a positive number, got {rate_hz}")
    state = SimState() if state is None else state
    state.interval_s = state._initial_interval_s = 1.0 / rate_hz
    model = PatientModel(scenario, rng=random.Random(seed), start_ts=clock())
    client: Any
    if mqtt is not None:
        password = mqtt.passwords.get(device.device_id)
        client = MqttDevice(mqtt.url, device.device_id, password, mqtt.prefix, clock)
    else:
        client = DeviceClient(
            addresses(url), device.device_id, device.secret, report=report, clock=clock
        )
    if hasattr(client, "on_command"):  # stand-ins for DeviceClient in tests may have no commands
        _Commands(client, model, state, clock, seed).register()
    wake = state.wake
    wake.clear()
    loop = asyncio.get_running_loop()

    async def forward_stop(stop: asyncio.Event) -> None:
        await stop.wait()
        wake.set()

    stopper = None if stop is None else asyncio.create_task(forward_stop(stop))
    await client.start(wait=False)
    try:
        # The next tick is at seg_start + n * period. A new period (set_interval, reset) starts a
        # new segment at the last tick, or now when that is already more than a period ago.
        origin = seg_start = loop.time()
        period = state.interval_s
        n = 0
        down = False
        while not (stop is not None and stop.is_set()):
            if state.interval_s != period:
                last = seg_start + (n - 1) * period
                period = state.interval_s
                if n > 0:
                    now = loop.time()
                    seg_start, n = (last, 1) if last + period > now else (now, 0)
            if n > 0:
                behind = loop.time() - (seg_start + n * period)
                if behind > period:  # the loop stalled: skip the missed ticks, do not bunch them
                    n += math.floor(behind / period)
            planned = (seg_start - origin) + n * period  # since the start, for duration_s
            if duration_s is not None and planned >= duration_s - 1e-9 * period:
                break
            if n > 0 and await _pause_until(seg_start + n * period, wake):
                continue  # woken early: stopped, or the period changed
            ts = clock()
            values = model.sample(ts)
            state.last_values = values
            client.send(values, ts=ts)
            wants = model.wants_disconnect(ts)
            if wants and not down:
                await client.drop_connection()
            down = wants
            n += 1
        try:
            await client.flush(timeout=10)
        except TimeoutError:
            pass
    finally:
        if stopper is not None:
            stopper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await stopper
        await client.close()
    return client


@dataclass
class MqttOptions:
    """Simulated devices publish to this broker (``mqtt://host:port``), on topics under
    ``prefix``, as user = device id with ``passwords[device id]`` (none: anonymous)."""

    url: str
    prefix: str = "vitalwire"
    passwords: dict[str, str] = field(default_factory=dict)


class MqttDevice:
    """A simulated device that publishes to an MQTT broker (docs/howto-mqtt.md), with the
    interface :func:`run_device` uses of a :class:`DeviceClient` (no commands).

    It keeps every reading vitalwire has not acknowledged on its ``acks`` topic (in memory,
    bounded) and publishes them again after a reconnect, when no ack came for
    :attr:`RESEND_S`, and when vitalwire refused a reading with ``seq_gap`` or ``rate_limited``
    (at most once a second: every message in flight behind the refused one is refused too);
    its last will is ``offline`` on its ``status`` topic, and it says
    ``online`` on connect. Its seq starts after vitalwire's last durable one (the ack
    vitalwire publishes when the device's session opens)."""

    RESEND_S = 5.0
    FIRST_ACK_S = 2.0
    BUFFER = 10_000

    def __init__(
        self,
        url: str,
        device_id: str,
        password: str | None = None,
        prefix: str = "vitalwire",
        clock: Callable[[], float] = time.time,
    ) -> None:
        from vitalwire.transports.mqtt import parse_url

        self.conn = parse_url(url)
        self.device_id = device_id
        self.password = password
        self.prefix = prefix
        self.clock = clock
        self.seq = 0
        self.acked = 0
        self.dropped = 0
        self.skipped = 0
        self.connections = 0
        self.errors: list[dict[str, Any]] = []
        self._spool: dict[int, bytes] = {}
        self._client: Any = None
        self._acks = asyncio.Event()
        self._refused = asyncio.Event()  # seq_gap or rate_limited: publish again now
        self._task: asyncio.Task[None] | None = None
        self._stop = False

    def _topic(self, kind: str) -> str:
        return f"{self.prefix}/devices/{self.device_id}/{kind}"

    async def start(self, *, wait: bool = True, timeout: float = 10.0) -> None:
        """Connect; then wait (at most :attr:`FIRST_ACK_S`) for the ack vitalwire publishes
        when it knows readings of this device already, so new seqs follow them. ``wait``: fail
        when the broker cannot be reached within ``timeout``; else go on (readings are kept)."""
        first = asyncio.get_running_loop().create_future()
        self._task = asyncio.create_task(self._run(first))
        try:
            await asyncio.wait_for(asyncio.shield(first), timeout if wait else self.FIRST_ACK_S)
        except TimeoutError:
            if wait:
                raise
            return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._acks.wait(), self.FIRST_ACK_S)

    async def _run(self, first: asyncio.Future[None]) -> None:
        import aiomqtt

        will = aiomqtt.Will(self._topic("status"), b"offline", qos=1, retain=True)
        while not self._stop:
            client = aiomqtt.Client(
                self.conn["hostname"],
                self.conn["port"],
                username=self.device_id if self.password else None,
                password=self.password,
                identifier=f"{self.prefix}-{self.device_id}",
                protocol=aiomqtt.ProtocolVersion.V5,
                will=will,
            )
            try:
                async with client:
                    for kind in ("acks", "errors"):
                        await client.subscribe(self._topic(kind), qos=1)
                    await client.publish(self._topic("status"), b"online", qos=1, retain=True)
                    self.connections += 1
                    self._client = client
                    if not first.done():
                        first.set_result(None)
                    resender = asyncio.create_task(self._resend())
                    try:
                        async for m in client.messages:
                            self._take(m.topic.value.rsplit("/", 1)[1], m.payload)
                    finally:
                        resender.cancel()
            except aiomqtt.MqttError:
                pass
            finally:
                self._client = None
            if not self._stop:
                await asyncio.sleep(1.0)  # reconnect interval

    def _take(self, kind: str, payload: Any) -> None:
        import json

        try:
            msg = json.loads(payload)
        except ValueError:
            return
        if kind == "acks" and msg.get("type") == "ack":
            seq = int(msg["seq"])
            if seq > self.acked:
                self.acked = seq
                self.seq = max(self.seq, seq)
                for s in [s for s in self._spool if s <= seq]:
                    del self._spool[s]
            self._acks.set()
        elif kind == "errors":
            self.errors.append(msg)
            if msg.get("code") in ("seq_gap", "rate_limited"):
                self._refused.set()

    async def _resend(self) -> None:
        """Everything not acknowledged, at once; then whenever acks stop for RESEND_S, or
        vitalwire refused a reading until the device publishes again (at most once a
        second)."""
        loop = asyncio.get_running_loop()
        while True:
            for seq in sorted(self._spool):
                self._publish(self._spool[seq])
            sent_at = loop.time()
            self._acks.clear()
            self._refused.clear()
            while True:
                waits = [asyncio.ensure_future(e.wait()) for e in (self._acks, self._refused)]
                done, _ = await asyncio.wait(
                    waits, timeout=self.RESEND_S, return_when=asyncio.FIRST_COMPLETED
                )
                for w in waits:
                    w.cancel()
                if not done:
                    break  # no ack for RESEND_S
                if self._refused.is_set():
                    # the refusals of the messages already in flight follow: one resend
                    await asyncio.sleep(max(0.0, sent_at + 1.0 - loop.time()))
                    break
                self._acks.clear()

    def _publish(self, body: bytes) -> None:
        if self._client is not None:
            self._client._client.publish(self._topic("readings"), body, 1)  # noqa: SLF001

    def send(self, values: dict[str, Any] | None = None, ts: float | None = None, **kw: Any) -> int:
        kw.pop("force", None)
        values = {**(values or {}), **kw}
        self.seq += 1
        ts = self.clock() if ts is None else ts
        body = wire.encode(wire.Reading(seq=self.seq, ts=ts, **values))
        self._spool[self.seq] = body
        if len(self._spool) > self.BUFFER:
            del self._spool[min(self._spool)]
            self.dropped += 1
        self._publish(body)
        return self.seq

    async def flush(self, timeout: float = 10.0) -> None:
        async def _acked() -> None:
            while self._spool:
                self._acks.clear()
                await self._acks.wait()

        await asyncio.wait_for(_acked(), timeout)

    async def drop_connection(self) -> None:
        if self._client is not None:
            self._client._client.disconnect()  # noqa: SLF001

    async def close(self) -> None:
        self._stop = True
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task


def ward_scenarios(n: int, scenario: str | Sequence[str] = "normal") -> list[str]:
    """The scenario of each of ``n`` devices, as :func:`run_ward` assigns them.

    A single name applies to every device, except ``"mixed"``: one device each of
    :data:`MIXED_ABNORMAL` (cycled through when there are fewer devices), the rest ``normal``.

    Raises:
        ValueError: an unknown scenario, or a list whose length is not ``n``.
    """
    if isinstance(scenario, str):
        if scenario == "mixed":
            return [MIXED_ABNORMAL[i] if i < len(MIXED_ABNORMAL) else "normal" for i in range(n)]
        _check_scenario(scenario)
        return [scenario] * n
    names = list(scenario)
    if len(names) != n:
        raise ValueError(f"got {len(names)} scenarios for {n} devices")
    for name in names:
        _check_scenario(name)
    return names


async def run_ward(
    url: str,
    devices: list[SimDevice],
    *,
    rate_hz: float = 1.0,
    scenario: str | list[str] = "normal",
    duration_s: float | None = None,
    seed: int = 0,
    stop: asyncio.Event | None = None,
    mqtt: MqttOptions | None = None,
) -> list[DeviceClient]:
    """Run every device concurrently (see :func:`run_device`); device ``i`` uses seed ``seed + i``.

    Args:
        scenario: one name for all, ``"mixed"`` for a realistic ward (see :func:`ward_scenarios`),
            or one name per device.

    Returns:
        The clients, in the order of ``devices``.

    Raises:
        ValueError: an unknown scenario or a scenario list of the wrong length (before any device
            starts).
    """
    scenarios = ward_scenarios(len(devices), scenario)
    return list(
        await asyncio.gather(
            *(
                run_device(
                    url,
                    device,
                    rate_hz=rate_hz,
                    scenario=name,
                    duration_s=duration_s,
                    seed=seed + i,
                    stop=stop,
                    mqtt=mqtt,
                )
                for i, (device, name) in enumerate(zip(devices, scenarios, strict=True))
            )
        )
    )


async def replay_file(
    url: str,
    device: SimDevice,
    path: str | os.PathLike[str],
    *,
    speed: float = 1.0,
    clock: Callable[[], float] = time.time,
) -> DeviceClient:
    """Replay a BIDMC numerics file (see :func:`read_bidmc`) through a device.

    Row ``t`` is sent ``t / speed`` seconds after the replay started (``speed`` 0 or infinite:
    as fast as possible) and stamped with the device clock when it is sent, as a live device
    stamps its readings: never in the future, whatever the speed. The recording's relative times
    are kept in the pacing; at a speed above 1 they shrink in the stamps, so every alarm delay
    (the server times it on arrival) spans ``speed`` times as much of the recording.

    Args:
        url: the server's base URL or device WebSocket URL.
        device: the provisioned device to act as.
        path: the CSV file.
        speed: replay speed (2.0 = twice real time).
        clock: device clock (epoch seconds) that stamps each reading.

    Returns:
        The closed client.

    Raises:
        ValueError: a malformed file or a negative ``speed``.
        TimeoutError: the server did not acknowledge every reading within 30 s.
    """
    if math.isnan(speed) or speed < 0:
        raise ValueError(f"speed must be 0 (as fast as possible) or positive, got {speed}")
    rows = read_bidmc(path)
    realtime = 0 < speed < math.inf
    client = DeviceClient(addresses(url), device.device_id, device.secret, clock=clock)
    loop = asyncio.get_running_loop()
    await client.start(wait=False)
    try:
        start = loop.time()
        for row in rows:
            if realtime:
                await _sleep_until(start + float(row["t"]) / speed, None)
            values = {k: v for k, v in row.items() if k != "t"}
            client.send(values, ts=clock())
        await client.flush(timeout=30)
    finally:
        await client.close()
    return client


__all__ = [
    "BIDMC_HEADER",
    "MAX_SILENCE_S",
    "MIXED_ABNORMAL",
    "SCENARIOS",
    "PatientModel",
    "SimDevice",
    "SimState",
    "pleth_shape",
    "pleth_wave",
    "read_bidmc",
    "replay_file",
    "run_device",
    "run_ward",
    "ward_scenarios",
]
