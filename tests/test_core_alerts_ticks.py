"""Shortcuts must never change what the engine says: ticks that find nothing due skip the
evaluation, and readings that keep every value's classification skip it too.

A reference engine is forced to evaluate in full on every tick and every reading
(``always_full``); random inputs (readings crossing limits or moving within one band, repeated
readings, probe off, low perfusion and battery, devices going offline and back,
acknowledgements, limit changes, NEWS2 observations, ticks at random intervals) must give both
engines the same changes in the same order, and leave them in the same state.
"""

from __future__ import annotations

import gc
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vitalwire.core.alerts import AlertConfig, PatientAlerts
from vitalwire.core.errors import Conflict, NotFound
from vitalwire.core.limits import DEFAULT_LIMITS, override_limits

_value = {  # 0 (no signal, apnoea) and fractions at a chart row's edge (91.4, 91.5, 8.4 ...)
    "spo2": st.sampled_from([0.0, 70.0, 84.0, 89.0, 91.0, 91.4, 91.5, 93.0, 95.0, 96.0, 97.0]),
    "pulse": st.sampled_from([0.0, 40.4, 72.0, 90.4, 90.5]),
    "hr": st.sampled_from([30.0, 45.0, 60.0, 72.0, 75.0, 115.0, 135.0, 160.0]),
    "rr": st.sampled_from([0.0, 5.0, 8.4, 8.5, 9.0, 16.0, 17.0, 22.0, 26.0, 35.0]),
    "sbp": st.sampled_from([70.0, 95.0, 120.0, 125.0, 185.0, 230.0]),
    "temp_c": st.sampled_from([34.5, 35.04, 35.05, 36.5, 36.9, 38.5, 39.5]),
}

_reading = st.fixed_dictionaries(
    {},
    optional={
        **_value,
        "probe": st.booleans(),
        "pi": st.sampled_from([0.1, 0.5, 2.0]),
        "battery": st.sampled_from([3.0, 8.0, 15.0, 60.0]),
    },
)

_normal = st.fixed_dictionaries(  # values moving within their bands: the reading shortcut
    {
        "spo2": st.sampled_from([96.0, 97.0, 98.0]),
        "hr": st.sampled_from([70.0, 72.0, 75.0]),
        "rr": st.sampled_from([15.0, 16.0, 17.0]),
    },
    optional={
        "probe": st.just(True),
        "pi": st.sampled_from([2.0, 3.0]),
        "battery": st.sampled_from([60.0, 70.0]),
    },
)

_step = st.one_of(
    st.tuples(st.just("reading"), st.sampled_from(["d1", "d2"]), _reading),
    st.tuples(st.just("reading"), st.sampled_from(["d1", "d2"]), _normal),
    st.tuples(st.just("reading"), st.just("d1"), _normal),
    st.tuples(
        st.just("status"),
        st.sampled_from(["d1", "d2"]),
        st.sampled_from(["online", "offline", "unbound"]),
    ),
    st.tuples(st.just("tick"), st.floats(0.05, 200.0)),
    st.tuples(st.just("ack"), st.integers(0, 5)),
    st.tuples(st.just("limits"), st.sampled_from([90.0, 92.0, 94.0])),
    st.tuples(st.just("again"), st.integers(1, 20)),  # the last reading, n more times
    st.tuples(
        st.just("observe"), st.sampled_from([None, True, False]), st.sampled_from([None, 1, 2])
    ),
)


def _apply(engine: PatientAlerts, now: float, step: tuple[Any, ...], force: bool) -> list[Any]:
    kind = step[0]
    if kind == "reading":
        return engine.on_reading(now, step[1], step[2])
    if kind == "observe":
        return engine.set_observations(now, on_oxygen=step[1], scale=step[2])
    if kind == "status":
        return engine.on_device_status(now, step[1], step[2])
    if kind == "tick":
        if force:
            engine._dirty = True  # the reference: evaluate on every tick
        return engine.tick(now)
    if kind == "ack":
        active = engine.active()
        if not active:
            return []
        try:
            return engine.acknowledge(active[step[1] % len(active)].alert_id, "nurse", now)
        except (Conflict, NotFound):
            return []
    engine.set_limits(override_limits(DEFAULT_LIMITS, {"spo2": {"low": step[1]}}))
    return []


def _state(engine: PatientAlerts) -> Any:
    return (
        {k: (v.value, v.at, v.device) for k, v in engine._vitals.items()},
        {k: tuple(v) for k, v in engine._news2_vitals.items()},
        {k: (d.online, d.probe, d.pi, d.battery) for k, d in engine._devices.items()},
        {
            k: (t.pending_since, t.clear_since)
            for k, t in engine._tracks.items()
            if t.pending_since is not None or t.clear_since is not None
        },
        engine.news2(),
    )


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(_step, min_size=1, max_size=60))
def test_shortcuts_change_nothing(steps: list[tuple[Any, ...]]) -> None:
    config = AlertConfig(news2_max_age_s=300.0)
    fast, reference = PatientAlerts("P1", config=config), PatientAlerts("P1", config=config)
    reference.always_full = True
    now = 1_000.0
    last: tuple[Any, ...] | None = None
    for step in steps:
        todo = [step]
        if step[0] == "again":
            todo = [last] * step[1] if last is not None else []
        elif step[0] == "reading":
            last = step
        for one in todo:
            now += one[1] if one[0] == "tick" else 0.5
            got = [c.to_dict() for c in _apply(fast, now, one, force=False)]
            want = [c.to_dict() for c in _apply(reference, now, one, force=True)]
            assert got == want, one
            assert _state(fast) == _state(reference), one
    assert [a.to_dict() for a in fast.active()] == [a.to_dict() for a in reference.active()]
    assert fast.snapshot() == reference.snapshot()


def test_a_reading_within_its_bands_takes_the_shortcut_and_one_across_a_band_does_not() -> None:
    engine = PatientAlerts("P1")
    engine.on_reading(0.0, "d1", {"spo2": 97.0, "hr": 72.0, "rr": 16.0})
    assert engine._same_outcome(1.0, "d1", engine._devices["d1"], {"spo2": 98.0, "hr": 75.0})
    assert engine._vitals["hr"].value == 75.0 and tuple(engine._news2_vitals["hr"]) == (75.0, 1.0)
    # 91 -> NEWS2 2 points (RCP chart 1: SpO2 scale 1, 94-95 is 1, 92-93 is 2): a full pass
    assert not engine._same_outcome(2.0, "d1", engine._devices["d1"], {"spo2": 92.0})
    assert not engine._same_outcome(2.0, "d2", engine._devices["d1"], {"hr": 75.0})  # other device


def test_a_quiet_engine_evaluates_again_when_a_value_goes_stale() -> None:
    """The one change time alone makes without timers: a NEWS2 value ageing out."""
    engine = PatientAlerts("P1", config=AlertConfig(news2_max_age_s=60.0))
    engine.on_reading(0.0, "d1", {"spo2": 97.0, "hr": 70.0, "rr": 16.0})
    assert engine.news2() is not None and "spo2" not in engine.news2().missing
    for t in range(1, 60):
        engine.tick(float(t))
    assert "spo2" not in engine.news2().missing
    engine.tick(60.5)
    assert "spo2" in engine.news2().missing


def test_an_engines_state_is_kept_out_of_the_garbage_collector() -> None:
    """Per-vital, per-condition, per-device and NEWS2-input state lives as long as the patient
    and holds numbers and strings only: untracked (``gc=False``), with the dicts holding it, so
    a hospital's engines add nothing to the collector's pauses (docs/benchmarks.md)."""
    engine = PatientAlerts("P1")
    engine.on_reading(0.0, "d1", {"spo2": 84.0, "hr": 72.0, "rr": 16.0})  # a condition pending
    first = (engine._vitals["spo2"], engine._news2_vitals["spo2"])
    engine.on_reading(1.0, "d1", {"spo2": 85.0, "hr": 73.0})
    # updated in place: the same objects, no new ones per reading
    assert engine._vitals["spo2"] is first[0] and engine._news2_vitals["spo2"] is first[1]
    assert engine._tracks and engine._vitals and engine._devices and engine._news2_vitals
    held = [
        *engine._vitals.values(),
        *engine._news2_vitals.values(),
        *engine._devices.values(),
        *engine._tracks.values(),
    ]
    assert not any(gc.is_tracked(o) for o in held)
    assert not gc.is_tracked(engine._vitals) and not gc.is_tracked(engine._news2_vitals)
    assert tuple(engine._news2_vitals["spo2"]) == (85.0, 1.0)
