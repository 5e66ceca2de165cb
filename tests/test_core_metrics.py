"""The physical bounds table: each bound rejects with a message naming the field and the bound."""

from __future__ import annotations

import math

import pytest

from vitalwire.core.errors import InvalidReading
from vitalwire.core.metrics import (
    MAX_CLOCK_AHEAD_S,
    METRICS,
    MIN_TS,
    validate_header,
    validate_values,
)

NOW = 1_800_000_000.0

OUT_OF_BOUNDS = [
    ("spo2", 140, "spo2 must be between 0 and 100, got 140"),
    ("spo2", -1, "spo2 must be between 0 and 100, got -1"),
    ("pulse", 351, "pulse must be between 0 and 350, got 351"),
    ("hr", -5, "hr must be between 0 and 350, got -5"),
    ("rr", 151, "rr must be between 0 and 150, got 151"),
    ("temp_c", 9.5, "temp_c must be between 10 and 47, got 9.5"),
    ("temp_c", 47.1, "temp_c must be between 10 and 47, got 47.1"),
    ("sbp", 401, "sbp must be between 0 and 400, got 401"),
    ("dbp", 301, "dbp must be between 0 and 300, got 301"),
    ("pi", 30.5, "pi must be between 0 and 30, got 30.5"),
    ("battery", 101, "battery must be between 0 and 100, got 101"),
]


@pytest.mark.parametrize(("field", "value", "message"), OUT_OF_BOUNDS)
def test_value_outside_bound_is_rejected_naming_field_and_bound(
    field: str, value: float, message: str
) -> None:
    with pytest.raises(InvalidReading) as err:
        validate_values({field: value})
    assert (err.value.field, err.value.message) == (field, message)


def test_every_metric_has_a_bound_test() -> None:
    assert {m.name for m in METRICS} == {row[0] for row in OUT_OF_BOUNDS}


@pytest.mark.parametrize("metric", METRICS, ids=lambda m: m.name)
def test_bounds_are_inclusive_and_extremes_accepted(metric: object) -> None:
    m = metric  # type: ignore[assignment]
    assert validate_values({m.name: m.low}) == {m.name: m.low}  # type: ignore[attr-defined]
    if m.name != "dbp":  # type: ignore[attr-defined]
        assert validate_values({m.name: m.high}) == {m.name: m.high}  # type: ignore[attr-defined]


def test_clinically_extreme_values_are_accepted() -> None:
    values = {"spo2": 60.0, "hr": 220.0, "rr": 45.0, "temp_c": 41.5, "sbp": 250.0, "dbp": 140.0}
    assert validate_values(values) == values


def test_nan_is_rejected() -> None:
    with pytest.raises(InvalidReading, match="spo2 must be between 0 and 100, got nan"):
        validate_values({"spo2": math.nan})


def test_missing_values_are_dropped() -> None:
    assert validate_values({"spo2": 97.0, "hr": None}) == {"spo2": 97.0}


def test_diastolic_must_be_below_systolic() -> None:
    with pytest.raises(InvalidReading) as err:
        validate_values({"sbp": 120.0, "dbp": 130.0})
    assert err.value.field == "dbp"
    assert err.value.message == "dbp must be lower than sbp (120), got 130"


@pytest.mark.parametrize(
    ("seq", "ts", "field"),
    [
        (0, NOW, "seq"),
        (-3, NOW, "seq"),
        (2**63, NOW, "seq"),
        (1, MIN_TS - 1, "ts"),
        (1, NOW + MAX_CLOCK_AHEAD_S + 1, "ts"),
        (1, math.nan, "ts"),
    ],
)
def test_header_bounds(seq: int, ts: float, field: str) -> None:
    with pytest.raises(InvalidReading) as err:
        validate_header(seq, ts, NOW)
    assert err.value.field == field
    assert err.value.message.startswith(f"{field} must be between")


def test_header_accepts_slightly_future_device_clock() -> None:
    validate_header(1, NOW + MAX_CLOCK_AHEAD_S, NOW)
