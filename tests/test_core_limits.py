"""Default limits table, per-patient overrides and their plain-dict form."""

from __future__ import annotations

import math
from dataclasses import fields

import pytest

from vitalwire.core.errors import InvalidMessage
from vitalwire.core.limits import (
    DEFAULT_LIMITS,
    LIMIT_FIELDS,
    Limits,
    MetricLimits,
    override_limits,
)
from vitalwire.core.metrics import METRIC_BY_NAME


def test_default_adult_table() -> None:
    assert DEFAULT_LIMITS.to_dict() == {
        "spo2": dict(low=90, high=None, critical_low=85, critical_high=None, delay_s=15,
                     deadband=1, clear_s=5.0),
        "pulse": dict(low=50, high=120, critical_low=40, critical_high=140, delay_s=10,
                      deadband=2, clear_s=5.0),
        "hr": dict(low=50, high=120, critical_low=40, critical_high=140, delay_s=10, deadband=2,
                   clear_s=5.0),
        "rr": dict(low=8, high=30, critical_low=None, critical_high=None, delay_s=10, deadband=1,
                   clear_s=5.0),
        "temp_c": dict(low=35.0, high=39.0, critical_low=None, critical_high=None, delay_s=0,
                       deadband=0.2, clear_s=5.0),
        "sbp": dict(low=90, high=160, critical_low=None, critical_high=None, delay_s=0,
                    deadband=5, clear_s=5.0),
        "dbp": dict(low=50, high=90, critical_low=None, critical_high=None, delay_s=0,
                    deadband=5, clear_s=5.0),
    }  # fmt: skip


def test_limit_fields_are_the_row_fields() -> None:
    assert tuple(f.name for f in fields(MetricLimits)) == ("metric", *LIMIT_FIELDS)


def test_every_default_limit_is_within_physical_bounds() -> None:
    for row in DEFAULT_LIMITS:
        metric = METRIC_BY_NAME[row.metric]
        for name in ("low", "high", "critical_low", "critical_high"):
            value = getattr(row, name)
            assert value is None or metric.low <= value <= metric.high, (row.metric, name)


VIOLATIONS = [
    # metric, value, direction, (priority, limit)
    ("spo2", 90, "low", (None, None)),
    ("spo2", 89, "low", ("medium", 90)),
    ("spo2", 85, "low", ("medium", 90)),
    ("spo2", 84, "low", ("high", 85)),
    ("spo2", 100, "high", (None, None)),
    ("hr", 120, "high", (None, None)),
    ("hr", 121, "high", ("medium", 120)),
    ("hr", 140, "high", ("medium", 120)),
    ("hr", 141, "high", ("high", 140)),
    ("hr", 50, "low", (None, None)),
    ("hr", 49, "low", ("medium", 50)),
    ("hr", 40, "low", ("medium", 50)),
    ("hr", 39, "low", ("high", 40)),
    ("rr", 7, "low", ("medium", 8)),
    ("rr", 31, "high", ("medium", 30)),
    ("temp_c", 34.9, "low", ("medium", 35.0)),
    ("temp_c", 39.1, "high", ("medium", 39.0)),
    ("sbp", 89, "low", ("medium", 90)),
    ("dbp", 91, "high", ("medium", 90)),
]


@pytest.mark.parametrize(("metric", "value", "direction", "expected"), VIOLATIONS)
def test_violation_is_strictly_beyond_the_limit(
    metric: str, value: float, direction: str, expected: tuple[str | None, float | None]
) -> None:
    assert DEFAULT_LIMITS[metric].violation(value, direction) == expected


CLEAR = [
    ("spo2", 90, "low", False),
    ("spo2", 91, "low", True),
    ("spo2", 50, "high", True),  # no high limit: always clear
    ("hr", 119, "high", False),
    ("hr", 118, "high", True),
    ("hr", 51, "low", False),
    ("hr", 52, "low", True),
    ("rr", 29, "high", True),
    ("sbp", 94, "low", False),
    ("sbp", 95, "low", True),
]


@pytest.mark.parametrize(("metric", "value", "direction", "clear"), CLEAR)
def test_clear_needs_the_deadband(metric: str, value: float, direction: str, clear: bool) -> None:
    assert DEFAULT_LIMITS[metric].is_clear(value, direction) is clear


def test_override_returns_new_limits_and_leaves_the_old_alone() -> None:
    new = override_limits(DEFAULT_LIMITS, {"spo2": {"low": 88, "delay_s": 20}})
    assert new["spo2"] == MetricLimits(
        "spo2", low=88, critical_low=85, delay_s=20, deadband=1, clear_s=5
    )
    assert DEFAULT_LIMITS["spo2"].low == 90
    assert new["hr"] == DEFAULT_LIMITS["hr"]


def test_null_restores_the_default() -> None:
    moved = override_limits(DEFAULT_LIMITS, {"hr": {"high": 130, "deadband": 3}})
    assert override_limits(moved, {"hr": {"high": None, "deadband": None}}) == DEFAULT_LIMITS


def test_a_limit_the_defaults_lack_can_be_added_and_removed() -> None:
    added = override_limits(DEFAULT_LIMITS, {"sbp": {"critical_low": 70}})
    assert added["sbp"].violation(69, "low") == ("high", 70)
    assert override_limits(added, {"sbp": {"critical_low": None}}) == DEFAULT_LIMITS


def test_plain_dict_round_trip() -> None:
    limits = override_limits(DEFAULT_LIMITS, {"rr": {"high": 28}, "sbp": {"critical_low": 70}})
    assert Limits.from_dict(limits.to_dict()) == limits
    assert Limits.from_dict(DEFAULT_LIMITS.to_dict()) == DEFAULT_LIMITS
    assert Limits.from_dict({}) == DEFAULT_LIMITS


def test_get_and_missing_metric() -> None:
    assert DEFAULT_LIMITS.get("pi") is None
    assert DEFAULT_LIMITS.get("rr") == DEFAULT_LIMITS["rr"]
    with pytest.raises(KeyError):
        DEFAULT_LIMITS["battery"]


BAD_OVERRIDES = [
    (
        {"spo2": {"low": 101}},
        "limits.spo2.low",
        "limits.spo2.low must be within the physical bounds of spo2 (0 to 100), got 101",
    ),
    (
        {"temp_c": {"high": 48}},
        "limits.temp_c.high",
        "limits.temp_c.high must be within the physical bounds of temp_c (10 to 47), got 48",
    ),
    (
        {"hr": {"low": 130}},
        "limits.hr.low",
        "limits.hr.low must be below limits.hr.high (120), got 130",
    ),
    (
        {"hr": {"low": 120}},
        "limits.hr.low",
        "limits.hr.low must be below limits.hr.high (120), got 120",
    ),
    (
        {"spo2": {"critical_low": 92}},
        "limits.spo2.critical_low",
        "limits.spo2.critical_low must be below limits.spo2.low (90), got 92",
    ),
    (
        {"hr": {"critical_high": 100}},
        "limits.hr.high",
        "limits.hr.high must be below limits.hr.critical_high (100), got 120",
    ),
    (
        {"spo2": {"delay_s": 61}},
        "limits.spo2.delay_s",
        "limits.spo2.delay_s must be between 0 and 60 s, got 61",
    ),
    (
        {"spo2": {"delay_s": -1}},
        "limits.spo2.delay_s",
        "limits.spo2.delay_s must be between 0 and 60 s, got -1",
    ),
    (
        {"rr": {"clear_s": 120}},
        "limits.rr.clear_s",
        "limits.rr.clear_s must be between 0 and 60 s, got 120",
    ),
    (
        {"hr": {"deadband": 35}},
        "limits.hr.deadband",
        "limits.hr.deadband must be at least 0 and below 35 (half the gap between the limits), "
        "got 35",
    ),
    (
        {"spo2": {"deadband": -1}},
        "limits.spo2.deadband",
        "limits.spo2.deadband must be at least 0 and below 10 (half the gap between the limits), "
        "got -1",
    ),
    (
        {"spo2": {"low": "88"}},
        "limits.spo2.low",
        "limits.spo2.low must be a number, got '88'",
    ),
    ({"spo2": {"low": True}}, "limits.spo2.low", "limits.spo2.low must be a number, got True"),
    ({"spo2": {"low": math.nan}}, "limits.spo2.low", "limits.spo2.low must be a finite number"),
    (
        {"spo2": {"lo": 88}},
        "limits.spo2.lo",
        "limits.spo2.lo is not a limit field; known: low, high, critical_low, critical_high, "
        "delay_s, deadband, clear_s",
    ),
    (
        {"pi": {"low": 1}},
        "limits.pi",
        "limits.pi is not an alarm metric; known: spo2, pulse, hr, rr, temp_c, sbp, dbp",
    ),
    ({"spo2": 88}, "limits.spo2", "limits.spo2 must be an object of fields"),
]


@pytest.mark.parametrize(("overrides", "field", "message"), BAD_OVERRIDES)
def test_bad_override_names_field_and_bound(
    overrides: dict[str, object], field: str, message: str
) -> None:
    with pytest.raises(InvalidMessage) as err:
        override_limits(DEFAULT_LIMITS, overrides)
    assert err.value.field == field
    assert str(err.value) == message


def test_overrides_must_be_a_mapping() -> None:
    with pytest.raises(InvalidMessage) as err:
        override_limits(DEFAULT_LIMITS, [("spo2", 88)])  # type: ignore[arg-type]
    assert err.value.field == "limits"


def test_a_rejected_override_changes_nothing() -> None:
    limits = override_limits(DEFAULT_LIMITS, {"rr": {"high": 28}})
    with pytest.raises(InvalidMessage):
        override_limits(limits, {"rr": {"high": 25}, "spo2": {"low": 200}})
    assert limits["rr"].high == 28
