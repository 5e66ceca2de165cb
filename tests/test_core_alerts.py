"""The alert engine: lifecycle table, delay, hysteresis, latching, signal quality, escalation,
technical alerts, NEWS2 alerts and snapshot order."""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Sequence

import pytest

from vitalwire.core.alerts import (
    ACKNOWLEDGE,
    ACKNOWLEDGE_ENDED,
    ACKNOWLEDGED,
    ACTIVE,
    CONDITION_ENDED,
    CONDITION_ENDED_LATCHING,
    CONDITION_RETURNED,
    CURRENT,
    DEVICE_CLOCK_BEHIND,
    DEVICE_IDENTITY_CONFLICT,
    ESCALATE,
    EVENTS,
    FUTURE,
    LATE,
    RAISE_PRIORITY,
    RESOLVED,
    STATES,
    TRANSITIONS,
    AlertChange,
    AlertConfig,
    IllegalTransition,
    News2Change,
    PatientAlerts,
    Timeliness,
    transition,
)
from vitalwire.core.errors import Conflict, InvalidMessage, NotFound
from vitalwire.core.limits import DEFAULT_LIMITS, override_limits

P = "P1"
Row = tuple[str, str, str, str, float]  # action, condition, priority, state, at


def summary(changes: Iterable[object], *conditions: str) -> list[Row]:
    """Alert changes as (action, condition, priority, state, at), optionally of some conditions."""
    return [
        (c.action, c.condition, c.priority, c.state, c.at)
        for c in changes
        if isinstance(c, AlertChange) and (not conditions or c.condition in conditions)
    ]


def feed(
    engine: PatientAlerts,
    times: Iterable[float],
    values: dict[str, float | bool],
    device: str = "d1",
) -> list[object]:
    """One reading per time, then a tick at the same time (like the server's 1 s chore)."""
    out: list[object] = []
    for t in times:
        out += engine.on_reading(t, device, values)
        out += engine.tick(t)
    return out


def ticks(engine: PatientAlerts, times: Iterable[float]) -> list[object]:
    out: list[object] = []
    for t in times:
        out += engine.tick(t)
    return out


def only_id(engine: PatientAlerts, condition: str) -> str:
    (alert,) = [a for a in engine.active() if a.condition == condition]
    return alert.alert_id


# -- the lifecycle table -----------------------------------------------------------------------


def test_transition_table() -> None:
    assert dict(TRANSITIONS) == {
        (ACTIVE, ACKNOWLEDGE): ACKNOWLEDGED,
        (ACTIVE, ACKNOWLEDGE_ENDED): RESOLVED,
        (ACTIVE, CONDITION_ENDED): RESOLVED,
        (ACTIVE, CONDITION_ENDED_LATCHING): ACTIVE,
        (ACTIVE, CONDITION_RETURNED): ACTIVE,
        (ACTIVE, ESCALATE): ACTIVE,
        (ACTIVE, RAISE_PRIORITY): ACTIVE,
        (ACKNOWLEDGED, CONDITION_ENDED): RESOLVED,
        (ACKNOWLEDGED, RAISE_PRIORITY): ACTIVE,
    }


@pytest.mark.parametrize(("move", "new_state"), sorted(TRANSITIONS.items()))
def test_every_legal_transition(move: tuple[str, str], new_state: str) -> None:
    assert transition(*move) == new_state


ILLEGAL = sorted(set(itertools.product(STATES, EVENTS)) - set(TRANSITIONS))


@pytest.mark.parametrize(("state", "event"), ILLEGAL)
def test_every_illegal_transition_raises(state: str, event: str) -> None:
    with pytest.raises(IllegalTransition):
        transition(state, event)


def test_illegal_transition_is_a_conflict() -> None:
    assert issubclass(IllegalTransition, Conflict)
    assert len(ILLEGAL) == len(STATES) * len(EVENTS) - len(TRANSITIONS)


# -- delay, critical, hysteresis ---------------------------------------------------------------


def test_spo2_alert_waits_for_delay() -> None:
    engine = PatientAlerts(P)
    out = feed(engine, range(0, 16), {"spo2": 88.0})
    (change,) = [c for c in out if isinstance(c, AlertChange)]
    assert change == AlertChange(
        action="raised",
        alert_id="P1:spo2_low:15000",
        patient_id=P,
        condition="spo2_low",
        priority="medium",
        category="physiological",
        state="active",
        metric="spo2",
        value=88.0,
        limit=90,
        at=15.0,
        message="SpO2 88 % below limit 90 %",
    )


def test_delay_restarts_when_value_comes_back_inside() -> None:
    engine = PatientAlerts(P)
    out = feed(engine, range(0, 10), {"spo2": 88.0})
    out += feed(engine, [10], {"spo2": 95.0})
    out += feed(engine, range(11, 27), {"spo2": 88.0})
    assert summary(out) == [("raised", "spo2_low", "medium", "active", 26.0)]


def test_tick_raises_from_held_value_reported_by_exception() -> None:
    engine = PatientAlerts(P)
    assert summary(engine.on_reading(0.0, "d1", {"hr": 130.0})) == []
    assert summary(ticks(engine, [5.0, 9.0])) == []
    assert summary(engine.tick(10.0)) == [("raised", "hr_high", "medium", "active", 10.0)]


def test_critical_value_raises_at_once() -> None:
    engine = PatientAlerts(P)
    out = engine.on_reading(0.0, "d1", {"spo2": 84.0})
    (change,) = [c for c in out if isinstance(c, AlertChange)]
    assert (change.action, change.priority, change.limit, change.message) == (
        "raised",
        "high",
        85,
        "SpO2 84 % below critical limit 85 %",
    )


def test_medium_alert_escalates_to_high_on_critical_value() -> None:
    engine = PatientAlerts(P)
    out = feed(engine, range(0, 11), {"hr": 130.0})
    out += feed(engine, [11], {"hr": 145.0})
    assert summary(out) == [
        ("raised", "hr_high", "medium", "active", 10.0),
        ("priority_changed", "hr_high", "high", "active", 11.0),
    ]
    assert [c.message for c in out if isinstance(c, AlertChange)][-1] == (
        "Heart rate 145 /min above critical limit 140 /min"
    )


def test_priority_does_not_fall_back_within_an_alert() -> None:
    engine = PatientAlerts(P)
    feed(engine, range(0, 11), {"hr": 130.0})
    feed(engine, [11], {"hr": 145.0})
    assert summary(feed(engine, range(12, 30), {"hr": 130.0})) == []
    assert [a.priority for a in engine.active()] == ["high"]


def test_hysteresis_needs_deadband_for_clear_time() -> None:
    engine = PatientAlerts(P)
    feed(engine, range(0, 11), {"hr": 130.0})
    # 119 is inside the 120 limit but not by the 2 /min deadband: the condition goes on.
    assert summary(feed(engine, range(11, 40), {"hr": 119.0})) == []
    # 118 for 4 s, then back to 119: the clear timer restarts.
    assert summary(feed(engine, range(40, 44), {"hr": 118.0})) == []
    assert summary(feed(engine, [44], {"hr": 119.0})) == []
    out = feed(engine, range(45, 51), {"hr": 118.0})
    assert summary(out) == [("resolved", "hr_high", "medium", "resolved", 50.0)]
    assert [c.message for c in out if isinstance(c, AlertChange)] == [
        "Heart rate back to 118 /min (limit 120 /min)"
    ]


# -- latching ----------------------------------------------------------------------------------


def test_medium_alert_does_not_latch() -> None:
    engine = PatientAlerts(P)
    feed(engine, range(0, 11), {"rr": 35.0})
    out = feed(engine, range(11, 17), {"rr": 20.0})
    assert summary(out) == [("resolved", "rr_high", "medium", "resolved", 16.0)]
    assert engine.active() == []


def test_acknowledged_medium_alert_resolves_when_condition_ends() -> None:
    engine = PatientAlerts(P)
    feed(engine, range(0, 11), {"rr": 35.0})
    out = engine.acknowledge(only_id(engine, "rr_high"), "nurse", 12.0)
    out += feed(engine, range(13, 19), {"rr": 20.0})
    assert summary(out) == [
        ("acknowledged", "rr_high", "medium", "acknowledged", 12.0),
        ("resolved", "rr_high", "medium", "resolved", 18.0),
    ]


def test_high_alert_latches_until_acknowledged() -> None:
    engine = PatientAlerts(P)
    feed(engine, [0], {"spo2": 84.0})
    assert summary(feed(engine, range(1, 30), {"spo2": 97.0})) == []
    (alert,) = engine.active()
    assert (alert.state, alert.latched) == ("active", True)
    out = engine.acknowledge(alert.alert_id, "nurse", 31.0)
    assert summary(out) == [("resolved", "spo2_low", "high", "resolved", 31.0)]
    change = out[0]
    assert isinstance(change, AlertChange)
    assert (change.by, change.message) == (
        "nurse",
        "acknowledged by nurse after the condition ended",
    )
    assert engine.active() == []


def test_acknowledged_high_alert_resolves_when_condition_ends() -> None:
    engine = PatientAlerts(P)
    feed(engine, [0], {"spo2": 84.0})
    out = engine.acknowledge(only_id(engine, "spo2_low"), "nurse", 1.0)
    out += feed(engine, range(2, 8), {"spo2": 97.0})
    assert summary(out) == [
        ("acknowledged", "spo2_low", "high", "acknowledged", 1.0),
        ("resolved", "spo2_low", "high", "resolved", 7.0),
    ]


def test_latched_alert_whose_condition_returns_is_the_same_alert() -> None:
    engine = PatientAlerts(P)
    feed(engine, [0], {"spo2": 84.0})
    alert_id = only_id(engine, "spo2_low")
    feed(engine, range(1, 10), {"spo2": 97.0})
    assert summary(feed(engine, [10], {"spo2": 83.0})) == []
    (alert,) = engine.active()
    assert (alert.alert_id, alert.latched) == (alert_id, False)
    out = engine.acknowledge(alert_id, "nurse", 11.0)
    assert summary(out) == [("acknowledged", "spo2_low", "high", "acknowledged", 11.0)]


def test_acknowledgement_records_who_and_when() -> None:
    engine = PatientAlerts(P)
    feed(engine, [0], {"spo2": 84.0})
    engine.acknowledge(only_id(engine, "spo2_low"), "dr.who", 3.5)
    (alert,) = engine.active()
    assert (alert.state, alert.acknowledged_by, alert.acknowledged_at) == (
        "acknowledged",
        "dr.who",
        3.5,
    )


def test_acknowledging_unknown_alert_is_not_found() -> None:
    engine = PatientAlerts(P)
    with pytest.raises(NotFound) as err:
        engine.acknowledge("P1:spo2_low:0", "nurse", 1.0)
    assert err.value.field == "alert_id"


def test_acknowledging_twice_is_a_conflict() -> None:
    engine = PatientAlerts(P)
    feed(engine, [0], {"spo2": 84.0})
    alert_id = only_id(engine, "spo2_low")
    engine.acknowledge(alert_id, "nurse", 1.0)
    with pytest.raises(Conflict, match="already acknowledged"):
        engine.acknowledge(alert_id, "nurse", 2.0)


def test_acknowledging_a_resolved_alert_is_a_conflict() -> None:
    engine = PatientAlerts(P)
    feed(engine, range(0, 11), {"rr": 35.0})
    alert_id = only_id(engine, "rr_high")
    feed(engine, range(11, 17), {"rr": 20.0})
    with pytest.raises(Conflict, match="already resolved"):
        engine.acknowledge(alert_id, "nurse", 20.0)


def test_acknowledgement_needs_a_name() -> None:
    engine = PatientAlerts(P)
    feed(engine, [0], {"spo2": 84.0})
    with pytest.raises(InvalidMessage) as err:
        engine.acknowledge(only_id(engine, "spo2_low"), "", 1.0)
    assert err.value.field == "by"


def test_acknowledged_alert_that_gets_worse_is_active_again() -> None:
    engine = PatientAlerts(P)
    feed(engine, range(0, 11), {"hr": 130.0})
    engine.acknowledge(only_id(engine, "hr_high"), "nurse", 11.0)
    out = feed(engine, [12], {"hr": 150.0})
    assert summary(out) == [("priority_changed", "hr_high", "high", "active", 12.0)]
    (alert,) = engine.active()
    assert (alert.acknowledged_by, alert.acknowledged_at) == (None, None)
    # it escalates again, one high-priority interval after the rise
    out = feed(engine, range(13, 73), {"hr": 150.0})
    assert summary(out, "hr_high") == [("escalated", "hr_high", "high", "active", 72.0)]


# -- signal quality ----------------------------------------------------------------------------


def test_probe_off_suppresses_spo2_and_raises_probe_off() -> None:
    engine = PatientAlerts(P)
    out = feed(engine, range(0, 10), {"spo2": 88.0, "pulse": 80.0})
    out += feed(engine, range(10, 22), {"probe": False})
    out += feed(engine, range(22, 38), {"spo2": 88.0, "pulse": 80.0, "probe": True})
    assert summary(out) == [
        ("raised", "probe_off", "medium", "active", 20.0),
        ("resolved", "probe_off", "medium", "resolved", 27.0),
        # the SpO2 delay started again when the probe came back
        ("raised", "spo2_low", "medium", "active", 37.0),
    ]
    raised = [c for c in out if isinstance(c, AlertChange)][0]
    assert (raised.category, raised.device) == ("technical", "d1")


def test_values_sent_with_probe_off_are_ignored() -> None:
    engine = PatientAlerts(P)
    out = feed(engine, range(0, 30), {"spo2": 70.0, "pulse": 30.0, "probe": False})
    assert summary(out) == [("raised", "probe_off", "medium", "active", 10.0)]


def test_low_perfusion_suppresses_spo2_and_raises_poor_signal() -> None:
    engine = PatientAlerts(P)
    out = feed(engine, range(0, 12), {"spo2": 80.0, "pi": 0.2})
    assert summary(out) == [("raised", "poor_signal", "medium", "active", 10.0)]
    out = feed(engine, [12], {"spo2": 80.0, "pi": 1.5})
    assert summary(out) == [("raised", "spo2_low", "high", "active", 12.0)]
    poor = [a for a in engine.active() if a.condition == "poor_signal"][0]
    assert (poor.metric, poor.value, poor.limit) == ("pi", 0.2, 0.3)


def test_probe_off_does_not_suppress_ecg_heart_rate() -> None:
    engine = PatientAlerts(P)
    out = feed(engine, [0], {"hr": 150.0, "probe": False})
    assert summary(out) == [("raised", "hr_high", "high", "active", 0.0)]


def test_short_probe_off_raises_nothing() -> None:
    engine = PatientAlerts(P)
    out = feed(engine, range(0, 9), {"probe": False})
    out += feed(engine, range(9, 20), {"spo2": 97.0})
    assert summary(out) == []


# -- technical alerts --------------------------------------------------------------------------


def test_device_offline_raised_and_resolved_on_online() -> None:
    engine = PatientAlerts(P)
    engine.on_reading(0.0, "d1", {"hr": 70.0})
    out = engine.on_device_status(5.0, "d1", "offline")
    out += engine.on_device_status(9.0, "d1", "online")
    assert summary(out) == [
        ("raised", "device_offline", "medium", "active", 5.0),
        ("resolved", "device_offline", "medium", "resolved", 9.0),
    ]
    assert [c.message for c in out if isinstance(c, AlertChange)] == [
        "Device d1 offline",
        "Device d1 back online",
    ]


def test_values_of_an_offline_device_raise_nothing() -> None:
    engine = PatientAlerts(P)
    feed(engine, range(0, 5), {"spo2": 88.0})
    engine.on_device_status(5.0, "d1", "offline")
    assert summary(ticks(engine, range(6, 40)), "spo2_low") == []


def test_unknown_device_status_is_rejected() -> None:
    engine = PatientAlerts(P)
    with pytest.raises(InvalidMessage) as err:
        engine.on_device_status(0.0, "d1", "sleeping")
    assert err.value.field == "status"


def test_unbinding_a_device_resolves_its_technical_alerts() -> None:
    engine = PatientAlerts(P)
    engine.on_reading(0.0, "d1", {"battery": 5.0})
    out = engine.on_device_status(1.0, "d1", "offline")
    out += engine.on_device_status(2.0, "d1", "unbound")
    assert summary(out) == [
        ("raised", "device_offline", "medium", "active", 1.0),
        ("resolved", "device_offline", "medium", "resolved", 2.0),
        ("resolved", "low_battery", "medium", "resolved", 2.0),
    ]
    assert engine.active() == []


def test_low_battery_priorities_and_hysteresis() -> None:
    engine = PatientAlerts(P)
    out = feed(engine, [0], {"battery": 19.0})
    out += feed(engine, [1], {"battery": 9.0})
    out += feed(engine, [2], {"battery": 21.0})
    out += feed(engine, [3], {"battery": 22.0})
    assert summary(out) == [
        ("raised", "low_battery", "low", "active", 0.0),
        ("priority_changed", "low_battery", "medium", "active", 1.0),
        ("resolved", "low_battery", "medium", "resolved", 3.0),
    ]
    assert [c.message for c in out if isinstance(c, AlertChange)][:2] == [
        "Battery 19 % below 20 % on device d1",
        "Battery 9 % below 10 % on device d1",
    ]


def test_alerts_are_per_device() -> None:
    engine = PatientAlerts(P)
    engine.on_reading(0.0, "a", {"hr": 70.0})
    engine.on_reading(0.0, "b", {"hr": 70.0})
    out = engine.on_device_status(1.0, "a", "offline")
    out += engine.on_device_status(1.0, "b", "offline")
    assert [c.alert_id for c in out if isinstance(c, AlertChange)] == [
        "P1:device_offline:1000",
        "P1:device_offline:1000-2",
    ]


# -- escalation --------------------------------------------------------------------------------


def test_unacknowledged_high_alert_escalates_every_60_s() -> None:
    engine = PatientAlerts(P)
    feed(engine, [0], {"spo2": 84.0})
    out = ticks(engine, range(1, 125))
    escalated = [c for c in out if isinstance(c, AlertChange) and c.condition == "spo2_low"]
    assert [(c.at, c.escalation_level) for c in escalated] == [
        (60.0, 1),
        (120.0, 2),
    ]
    assert summary(escalated)[0] == ("escalated", "spo2_low", "high", "active", 60.0)


def test_unacknowledged_medium_alert_escalates_every_180_s() -> None:
    engine = PatientAlerts(P)
    feed(engine, range(0, 11), {"rr": 35.0})
    out = ticks(engine, range(11, 400))
    escalated = [c for c in out if isinstance(c, AlertChange) and c.condition == "rr_high"]
    assert [(c.at, c.escalation_level) for c in escalated] == [
        (190.0, 1),
        (370.0, 2),
    ]


def test_low_priority_alert_never_escalates() -> None:
    engine = PatientAlerts(P)
    feed(engine, [0], {"battery": 15.0})
    assert summary(ticks(engine, range(1, 2000))) == []


def test_acknowledged_alert_does_not_escalate() -> None:
    engine = PatientAlerts(P)
    feed(engine, [0], {"spo2": 84.0})
    engine.acknowledge(only_id(engine, "spo2_low"), "nurse", 30.0)
    assert summary(ticks(engine, range(31, 300)), "spo2_low") == []


def test_escalation_interval_is_configurable() -> None:
    engine = PatientAlerts(P, config=AlertConfig(escalation_high_s=10.0))
    feed(engine, [0], {"spo2": 84.0})
    out = ticks(engine, range(1, 31))
    assert [(c.at, c.escalation_level) for c in out if isinstance(c, AlertChange)] == [
        (10.0, 1),
        (20.0, 2),
        (30.0, 3),
    ]


def test_latched_alert_keeps_escalating() -> None:
    engine = PatientAlerts(P)
    feed(engine, [0], {"spo2": 84.0})
    out = feed(engine, range(1, 61), {"spo2": 98.0})
    assert summary(out) == [("escalated", "spo2_low", "high", "active", 60.0)]


# -- NEWS2 -------------------------------------------------------------------------------------


def test_news2_is_none_before_the_first_vital() -> None:
    engine = PatientAlerts(P)
    assert engine.news2() is None
    assert engine.snapshot() == {"alerts": [], "news2": None}


def test_news2_change_when_the_band_changes() -> None:
    engine = PatientAlerts(P)
    engine.set_observations(0.0, on_oxygen=False, consciousness="alert")
    normal = {"spo2": 97.0, "sbp": 120.0, "pulse": 70.0, "temp_c": 37.0}
    first = engine.on_reading(0.0, "d1", {"rr": 16.0, **normal})
    same = engine.on_reading(1.0, "d1", {"rr": 18.0})
    worse = engine.on_reading(2.0, "d1", {"rr": 25.0})
    assert first == [
        News2Change(
            patient_id=P,
            total=0,
            band="low",
            previous_band=None,
            parameters={
                "rr": 0,
                "spo2": 0,
                "on_oxygen": 0,
                "sbp": 0,
                "pulse": 0,
                "consciousness": 0,
                "temp_c": 0,
            },
            missing=(),
            scale=1,
            at=0.0,
            complete=True,
            display="0, low",
        )
    ]
    assert same == []
    assert [(c.band, c.previous_band, c.total) for c in worse if isinstance(c, News2Change)] == [
        ("low_medium", "low", 3)
    ]


def test_news2_medium_alert_after_the_band_holds_and_resolved_when_it_drops() -> None:
    engine = PatientAlerts(P, config=AlertConfig(news2_delay_s=30.0))
    out = feed(engine, range(0, 31), {"rr": 25.0})  # 3 points: low-medium band
    out += feed(engine, range(31, 37), {"rr": 16.0})
    assert summary(out) == [
        ("raised", "news2_medium", "medium", "active", 30.0),
        ("resolved", "news2_medium", "medium", "resolved", 36.0),
    ]


def test_news2_high_supersedes_news2_medium() -> None:
    engine = PatientAlerts(P, config=AlertConfig(news2_delay_s=0.0))
    engine.set_observations(0.0, on_oxygen=False, consciousness="alert")
    out = feed(engine, [0], {"rr": 25.0, "spo2": 97.0})
    out += engine.set_observations(1.0, consciousness="voice")  # 3 + 3 = 6: medium
    out += engine.set_observations(2.0, on_oxygen=True)  # + 2 = 8: high
    assert summary(out, "news2_medium", "news2_high") == [
        ("raised", "news2_medium", "medium", "active", 0.0),
        ("raised", "news2_high", "high", "active", 2.0),
        ("resolved", "news2_medium", "medium", "resolved", 2.0),
    ]
    bands = [(c.previous_band, c.band, c.display) for c in out if isinstance(c, News2Change)]
    assert bands == [  # sbp, pulse and temperature missing: a lower bound until it is high
        (None, "incomplete", "≥ 3, incomplete"),
        ("incomplete", "incomplete", "≥ 6, incomplete"),  # at least medium now
        ("incomplete", "high", "≥ 8, high, incomplete"),
    ]


def test_news2_high_falls_back_to_news2_medium() -> None:
    engine = PatientAlerts(P, config=AlertConfig(news2_delay_s=0.0))
    engine.set_observations(0.0, on_oxygen=True, consciousness="voice")
    feed(engine, [0], {"rr": 25.0})  # 2 + 3 + 3 = 8: high
    out = engine.set_observations(1.0, on_oxygen=False)  # 6: medium
    out += ticks(engine, range(2, 7))
    assert summary(out) == [
        ("resolved", "news2_high", "high", "resolved", 6.0),
        ("raised", "news2_medium", "medium", "active", 6.0),
    ]


def test_stale_vitals_drop_out_of_news2() -> None:
    engine = PatientAlerts(P, config=AlertConfig(news2_max_age_s=60.0))
    engine.on_reading(0.0, "d1", {"rr": 25.0})
    out = engine.tick(61.0)
    assert [(c.band, c.total, c.missing[0]) for c in out if isinstance(c, News2Change)] == [
        ("incomplete", 0, "rr")
    ]


def test_set_observations_validates() -> None:
    engine = PatientAlerts(P)
    for kwargs, field in [
        ({"consciousness": "sleepy"}, "consciousness"),
        ({"scale": 3}, "scale"),
        ({"on_oxygen": 1}, "on_oxygen"),
    ]:
        with pytest.raises(InvalidMessage) as err:
            engine.set_observations(0.0, **kwargs)  # type: ignore[arg-type]
        assert err.value.field == field


def test_scale_2_changes_the_spo2_points() -> None:
    engine = PatientAlerts(P)
    engine.on_reading(0.0, "d1", {"spo2": 89.0, "probe": True})
    news = engine.news2()
    assert news is not None and news.points["spo2"] == 3
    engine.set_observations(1.0, scale=2)
    news = engine.news2()
    assert news is not None and (news.scale, news.points["spo2"]) == (2, 0)


# -- limits, snapshot, ids, restore -------------------------------------------------------------


def test_patient_limits_apply() -> None:
    limits = override_limits(DEFAULT_LIMITS, {"spo2": {"low": 86, "critical_low": 80}})
    engine = PatientAlerts(P, limits)
    assert summary(feed(engine, range(0, 30), {"spo2": 87.0})) == []
    engine.set_limits(DEFAULT_LIMITS.to_dict())
    assert engine.limits == DEFAULT_LIMITS
    assert summary(feed(engine, range(30, 46), {"spo2": 87.0})) == [
        ("raised", "spo2_low", "medium", "active", 45.0)
    ]


def test_snapshot_lists_active_alerts_highest_priority_first_then_oldest() -> None:
    engine = PatientAlerts(P)
    feed(engine, [0], {"battery": 15.0})  # low
    feed(engine, range(1, 12), {"rr": 35.0})  # medium rr_high at 11
    feed(engine, [12], {"spo2": 84.0})  # high at 12
    engine.on_device_status(13.0, "d2", "offline")  # medium at 13
    snap = engine.snapshot()
    assert [(a["condition"], a["priority"]) for a in snap["alerts"]] == [
        ("spo2_low", "high"),
        ("rr_high", "medium"),
        ("device_offline", "medium"),
        ("low_battery", "low"),
    ]
    assert snap["alerts"][0] == {
        "alert_id": "P1:spo2_low:12000",
        "patient_id": P,
        "condition": "spo2_low",
        "priority": "high",
        "category": "physiological",
        "state": "active",
        "raised_at": 12.0,
        "updated_at": 12.0,
        "metric": "spo2",
        "value": 84.0,
        "limit": 85,
        "device": None,
        "latched": False,
        "acknowledged_by": None,
        "acknowledged_at": None,
        "escalation_level": 0,
        "resolved_at": None,
        "message": "SpO2 84 % below critical limit 85 %",
    }
    # spo2 3 + rr 3 with five parameters missing: at least medium, but only a lower bound
    assert (snap["news2"]["band"], snap["news2"]["display"]) == ("incomplete", "≥ 6, incomplete")
    assert snap["news2"]["complete"] is False


def test_alert_ids_are_deterministic() -> None:
    engine = PatientAlerts("bed-7")
    engine.on_reading(1_800_000_000.25, "d1", {"spo2": 80.0})
    assert only_id(engine, "spo2_low") == "bed-7:spo2_low:1800000000250"


def test_restore_puts_an_open_alert_back() -> None:
    before = PatientAlerts(P)
    out = feed(before, [0], {"spo2": 84.0})
    out += ticks(before, range(1, 61))
    last = [c for c in out if isinstance(c, AlertChange)][-1]
    after = PatientAlerts(P)
    after.restore(last.to_dict())
    (alert,) = after.active()
    assert (alert.alert_id, alert.priority, alert.state, alert.escalation_level) == (
        "P1:spo2_low:0",
        "high",
        "active",
        1,
    )
    assert summary(ticks(after, [119, 120])) == [("escalated", "spo2_low", "high", "active", 120)]
    out = after.acknowledge(alert.alert_id, "nurse", 121.0)
    assert summary(out) == [("acknowledged", "spo2_low", "high", "acknowledged", 121.0)]


def test_restore_ignores_resolved_changes_and_rejects_garbage() -> None:
    engine = PatientAlerts(P)
    feed(engine, range(0, 11), {"rr": 35.0})
    out = feed(engine, range(11, 17), {"rr": 20.0})
    resolved = [c for c in out if isinstance(c, AlertChange)][-1]
    fresh = PatientAlerts(P)
    fresh.restore(resolved.to_dict())
    assert fresh.active() == []
    with pytest.raises(InvalidMessage):
        fresh.restore({"alert_id": "x"})


def test_changes_are_json_ready() -> None:
    engine = PatientAlerts(P)
    out: Sequence[object] = engine.on_reading(0.0, "d1", {"spo2": 84.0})
    change = [c for c in out if isinstance(c, AlertChange)][0]
    assert change.to_dict()["action"] == "raised"
    news = [c for c in out if isinstance(c, News2Change)][0]
    assert news.to_dict()["missing"] == ["rr", "on_oxygen", "sbp", "pulse", "consciousness",
                                         "temp_c"]  # fmt: skip


# -- the delay boundary, exactly -----------------------------------------------------------------

# (metric, violating value, delay_s, condition): at 1 Hz, `delay_s` readings in a row
# (t = 0 .. delay_s - 1) have lasted delay_s - 1 seconds: no alarm; the next one, at t = delay_s,
# has lasted the delay and raises.
DELAY_EDGES = [
    ("spo2", 88.0, 15, "spo2_low"),
    ("pulse", 45.0, 10, "pulse_low"),
    ("hr", 130.0, 10, "hr_high"),
    ("rr", 5.0, 10, "rr_low"),
]


@pytest.mark.parametrize(("metric", "value", "delay_s", "condition"), DELAY_EDGES)
def test_a_run_of_exactly_the_delay_does_not_alarm(
    metric: str, value: float, delay_s: int, condition: str
) -> None:
    assert DEFAULT_LIMITS[metric].delay_s == delay_s
    engine = PatientAlerts(P)
    out = feed(engine, range(0, delay_s), {metric: value})  # delay_s samples
    out += feed(engine, [delay_s], {metric: DEFAULT_LIMITS[metric].limit("low") + 10})
    out += ticks(engine, range(delay_s + 1, delay_s + 30))
    assert summary(out, condition) == []


@pytest.mark.parametrize(("metric", "value", "delay_s", "condition"), DELAY_EDGES)
def test_one_sample_more_than_the_delay_alarms(
    metric: str, value: float, delay_s: int, condition: str
) -> None:
    engine = PatientAlerts(P)
    out = feed(engine, range(0, delay_s + 1), {metric: value})  # delay_s + 1 samples
    assert summary(out, condition) == [("raised", condition, "medium", "active", float(delay_s))]


# -- a pulse oximeter's 0: no signal -------------------------------------------------------------

# (reading repeated at 1 Hz for 30 s): each is the oximeter saying "no signal"
NO_SIGNAL_READINGS = [
    {"spo2": 0.0, "pulse": 0.0},
    {"spo2": 0.0, "pulse": 0.0, "probe": True},  # a 0 is no signal whatever probe says
    {"spo2": 0.0},
    {"pulse": 0.0},
    {"spo2": 0.0, "pulse": 0.0, "pi": 0.0},
]


@pytest.mark.parametrize("reading", NO_SIGNAL_READINGS)
def test_spo2_or_pulse_of_zero_raises_probe_off_not_a_physiological_alarm(
    reading: dict[str, float | bool],
) -> None:
    engine = PatientAlerts(P)
    out = feed(engine, range(0, 30), reading)
    assert summary(out) == [("raised", "probe_off", "medium", "active", 10.0)]
    (alert,) = engine.active()
    assert (alert.category, alert.device) == ("technical", "d1")
    assert "no signal" in alert.message
    news = engine.news2()
    assert news is not None
    assert {"spo2", "pulse"} & set(reading) <= set(news.missing)
    assert news.points["spo2"] == news.points["pulse"] == 0


def test_zero_after_good_values_suspends_alarms_until_a_real_value() -> None:
    engine = PatientAlerts(P)
    out = feed(engine, range(0, 5), {"spo2": 97.0, "pulse": 72.0})
    out += feed(engine, range(5, 20), {"spo2": 0.0, "pulse": 0.0})
    news = engine.news2()
    assert news is not None and {"spo2", "pulse"} <= set(news.missing)
    out += feed(engine, range(20, 40), {"spo2": 97.0, "pulse": 72.0})
    assert summary(out) == [
        ("raised", "probe_off", "medium", "active", 15.0),
        ("resolved", "probe_off", "medium", "resolved", 25.0),
    ]
    news = engine.news2()
    assert news is not None and not {"spo2", "pulse"} & set(news.missing)


def test_ecg_heart_rate_of_zero_is_still_an_alarm() -> None:
    """Only the pulse oximeter's 0 means "no signal"; an ECG's 0 is asystole."""
    engine = PatientAlerts(P)
    assert summary(feed(engine, [0], {"hr": 0.0})) == [("raised", "hr_low", "high", "active", 0.0)]


# -- apnoea --------------------------------------------------------------------------------------

# (apnoea_delay_s, samples of RR 0 at 1 Hz before RR 12, apnoea raised at): both sides of the delay
APNOEA_EDGES = [
    (None, 20, None),  # the default 20 s: 20 samples (t = 0 .. 19) have lasted 19 s
    (None, 21, 20.0),
    (30.0, 30, None),
    (30.0, 31, 30.0),
    (10.0, 10, None),
    (10.0, 11, 10.0),
]


@pytest.mark.parametrize(("delay_s", "samples", "raised_at"), APNOEA_EDGES)
def test_apnoea_after_its_delay(
    delay_s: float | None, samples: int, raised_at: float | None
) -> None:
    config = AlertConfig() if delay_s is None else AlertConfig(apnoea_delay_s=delay_s)
    engine = PatientAlerts(P, config=config)
    out = feed(engine, range(0, samples), {"rr": 0.0})
    out += feed(engine, range(samples, samples + 10), {"rr": 12.0})
    raised = summary(out, "apnoea")[:1]
    assert raised == (
        [] if raised_at is None else [("raised", "apnoea", "high", "active", raised_at)]
    )


def test_apnoea_is_high_priority_latches_and_says_so() -> None:
    engine = PatientAlerts(P)
    out = feed(engine, range(0, 25), {"rr": 0.0})
    out += feed(engine, range(25, 40), {"rr": 14.0})
    assert summary(out, "apnoea", "rr_low") == [
        ("raised", "rr_low", "medium", "active", 10.0),
        ("raised", "apnoea", "high", "active", 20.0),
        ("resolved", "rr_low", "medium", "resolved", 30.0),
    ]
    (apnoea,) = [a for a in engine.active() if a.condition == "apnoea"]
    assert apnoea.latched  # high priority physiological: stays until acknowledged
    raised = [c for c in out if isinstance(c, AlertChange) and c.condition == "apnoea"][0]
    assert (raised.category, raised.metric, raised.value, raised.limit) == (
        "physiological",
        "rr",
        0.0,
        0.0,
    )
    assert raised.message == "Apnoea: respiratory rate 0 /min for 20 s"


@pytest.mark.parametrize("rr", [1.0, 3.0])
def test_a_slow_breath_rate_is_not_apnoea(rr: float) -> None:
    engine = PatientAlerts(P)
    assert summary(feed(engine, range(0, 60), {"rr": rr}), "apnoea") == []


def test_apnoea_is_held_while_the_device_is_offline() -> None:
    engine = PatientAlerts(P)
    out = feed(engine, range(0, 10), {"rr": 0.0})
    out += engine.on_device_status(10.0, "d1", "offline")
    out += ticks(engine, range(11, 60))
    assert summary(out, "apnoea") == []


@pytest.mark.parametrize("bad", [0.0, -1.0, 61.0])
def test_apnoea_delay_is_bounded(bad: float) -> None:
    with pytest.raises(ValueError, match="apnoea_delay_s must be above 0 and at most 60 s"):
        AlertConfig(apnoea_delay_s=bad)


# -- NEWS2 from a partial score --------------------------------------------------------------------

# (observations, reading, condition, message): a lower bound past a threshold raises the alert,
# and the message says the score is incomplete
PARTIAL_NEWS2 = [
    (
        {},
        {"rr": 25.0, "spo2": 97.0},
        "news2_medium",
        "NEWS2 ≥ 3, incomplete (at least low-medium risk): rr 3; "
        "missing on_oxygen, sbp, pulse, consciousness, temp_c",
    ),
    (
        {"consciousness": "voice"},
        {"rr": 25.0, "spo2": 97.0},
        "news2_medium",
        "NEWS2 ≥ 6, incomplete (at least medium risk): rr 3, consciousness 3; "
        "missing on_oxygen, sbp, pulse, temp_c",
    ),
    (
        {"on_oxygen": True, "consciousness": "voice"},
        {"rr": 25.0, "spo2": 97.0},
        "news2_high",
        "NEWS2 ≥ 8, high, incomplete: rr 3, on_oxygen 2, consciousness 3; "
        "missing sbp, pulse, temp_c",
    ),
    (
        {"on_oxygen": False, "consciousness": "alert"},
        {"rr": 25.0, "spo2": 93.0, "pulse": 70.0, "sbp": 120.0, "temp_c": 37.0},
        "news2_medium",
        "NEWS2 5, medium risk: rr 3, spo2 2",
    ),
]


@pytest.mark.parametrize(("obs", "reading", "condition", "message"), PARTIAL_NEWS2)
def test_news2_alert_from_a_partial_score_says_incomplete(
    obs: dict[str, object], reading: dict[str, float], condition: str, message: str
) -> None:
    engine = PatientAlerts(P, config=AlertConfig(news2_delay_s=0.0))
    if obs:
        engine.set_observations(0.0, **obs)  # type: ignore[arg-type]
    out = feed(engine, [0], reading)
    (change,) = [c for c in out if isinstance(c, AlertChange) and c.condition == condition]
    assert (change.action, change.message) == ("raised", message)


def test_news2_change_when_a_missing_parameter_arrives() -> None:
    """The band stays "incomplete" but the missing parameters change: an event, so that the
    snapshot's `missing`, `complete` and `display` follow."""
    engine = PatientAlerts(P)
    first = engine.on_reading(0.0, "d1", {"rr": 16.0})
    second = engine.on_reading(1.0, "d1", {"sbp": 120.0})
    third = engine.on_reading(2.0, "d1", {"sbp": 121.0})
    got = [
        (c.band, c.previous_band, c.missing, c.complete, c.display)
        for c in first + second + third
        if isinstance(c, News2Change)
    ]
    assert got == [
        (
            "incomplete",
            None,
            ("spo2", "on_oxygen", "sbp", "pulse", "consciousness", "temp_c"),
            False,
            "≥ 0, incomplete",
        ),
        (
            "incomplete",
            "incomplete",
            ("spo2", "on_oxygen", "pulse", "consciousness", "temp_c"),
            False,
            "≥ 0, incomplete",
        ),
    ]


# -- identity conflict and the time of a reading ---------------------------------------------------


def test_identity_conflict_is_a_medium_technical_alert_while_it_lasts() -> None:
    """Raised at once, once; a later conflict extends it; it ends on its own when the time runs
    out with no new conflict (a tick), and unbinding the device ends it too."""
    engine = PatientAlerts(P, config=AlertConfig(escalation_medium_s=None))
    raised = engine.on_identity_conflict(0.0, "d1", until=300.0)
    assert summary(raised) == [("raised", DEVICE_IDENTITY_CONFLICT, "medium", ACTIVE, 0.0)]
    assert raised[0].category == "technical" and raised[0].device == "d1"  # type: ignore[union-attr]
    assert "identity in use twice" in raised[0].message  # type: ignore[union-attr]
    assert engine.on_identity_conflict(100.0, "d1", until=400.0) == []  # no second alert
    assert engine.tick(399.0) == []
    assert summary(engine.tick(400.0)) == [
        ("resolved", DEVICE_IDENTITY_CONFLICT, "medium", RESOLVED, 400.0)
    ]
    engine.on_identity_conflict(500.0, "d1", until=800.0)
    assert summary(engine.on_device_status(510.0, "d1", "unbound"), DEVICE_IDENTITY_CONFLICT) == [
        ("resolved", DEVICE_IDENTITY_CONFLICT, "medium", RESOLVED, 510.0)
    ]


def test_identity_conflict_stays_while_the_device_is_offline() -> None:
    engine = PatientAlerts(P)
    engine.on_identity_conflict(0.0, "d1", until=300.0)
    changes = engine.on_device_status(1.0, "d1", "offline")
    assert summary(changes, DEVICE_IDENTITY_CONFLICT) == []
    assert {a.condition for a in engine.active()} == {DEVICE_IDENTITY_CONFLICT, "device_offline"}


@pytest.mark.parametrize(
    ("ts", "expected"),
    [
        (1000.0, CURRENT),
        (1005.0, CURRENT),  # at the skew bound
        (1005.001, FUTURE),
        (4600.0, FUTURE),  # an hour ahead
        (940.0, CURRENT),  # at the late bound
        (939.999, LATE),
        (400.0, LATE),  # a spool replayed ten minutes after an outage
    ],
)
def test_a_reading_is_current_late_or_future_by_its_device_time(ts: float, expected: str) -> None:
    assert Timeliness(late_s=60.0, ahead_s=5.0).of(ts, now=1000.0) == expected


def test_timeliness_bounds_are_checked() -> None:
    with pytest.raises(ValueError, match="late_s must be positive"):
        Timeliness(late_s=0.0)
    with pytest.raises(ValueError, match="ahead_s not negative"):
        Timeliness(ahead_s=-1.0)


def test_late_readings_raise_nothing_but_a_device_sending_only_late_ones_is_flagged() -> None:
    """A replayed spool (late readings, then current ones) raises nothing; a device whose every
    reading stays late for late_only_delay_s (its clock is behind: none of its values would ever
    alarm) raises device_clock_behind, which its next current reading ends."""
    engine = PatientAlerts(P, config=AlertConfig(escalation_medium_s=None))
    changes = [c for t in range(30) for c in engine.on_late_reading(float(t), "d1")]
    changes += feed(engine, [30.0], {"spo2": 97, "hr": 70})
    assert summary(changes) == []
    changes = [c for t in range(31, 91) for c in engine.on_late_reading(float(t), "d1")]
    changes += engine.tick(90.0)
    assert summary(changes) == []
    assert summary(engine.tick(91.0)) == [("raised", DEVICE_CLOCK_BEHIND, "medium", ACTIVE, 91.0)]
    assert summary(engine.on_reading(92.0, "d1", {"spo2": 97}), DEVICE_CLOCK_BEHIND) == [
        ("resolved", DEVICE_CLOCK_BEHIND, "medium", RESOLVED, 92.0)
    ]


# -- discharge ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("history", "open_before"),
    [
        ("active", [("spo2_low", "high", "active")]),
        ("latched", [("spo2_low", "high", "active")]),
        ("acknowledged", [("spo2_low", "high", "acknowledged")]),
        ("two", [("spo2_low", "high", "active"), ("hr_high", "high", "active")]),
        ("none", []),
    ],
)
def test_discharge_resolves_every_open_alert(
    history: str, open_before: list[tuple[str, str, str]]
) -> None:
    engine = PatientAlerts(P)
    if history != "none":
        values = {"spo2": 84.0, "hr": 150.0} if history == "two" else {"spo2": 84.0}
        feed(engine, [0], values)
    if history == "latched":  # the condition ended, the high alert stays latched
        feed(engine, range(1, 30), {"spo2": 97.0})
    if history == "acknowledged":
        engine.acknowledge(only_id(engine, "spo2_low"), "nurse", 1.0)
    assert sorted((a.condition, a.priority, a.state) for a in engine.active()) == sorted(
        open_before
    )
    out = engine.discharge(40.0, "admin")
    assert sorted(summary(out)) == sorted(
        ("resolved", cond, prio, "resolved", 40.0) for cond, prio, _ in open_before
    )
    assert all(
        c.message == "ended: patient discharged by admin" for c in out if isinstance(c, AlertChange)
    )
    assert engine.active() == [] and engine.tick(200.0) == []  # nothing escalates after
