"""NEWS2 (RCP 2017 chart 1): every band edge on both SpO2 scales, risk bands, missing values,
fractional values at the chart's resolution, and incomplete scores."""

from __future__ import annotations

import pytest

from vitalwire.core.errors import InvalidMessage
from vitalwire.core.news2 import PARAMETERS, News2, band_of, chart_value, score

NOW = 1_000.0
ALL_OBS = {"on_oxygen": False, "consciousness": "alert"}

# (parameter, value, points): both sides of every edge of chart 1.
VITAL_EDGES = [
    ("rr", 8, 3),
    ("rr", 9, 1),
    ("rr", 11, 1),
    ("rr", 12, 0),
    ("rr", 20, 0),
    ("rr", 21, 2),
    ("rr", 24, 2),
    ("rr", 25, 3),
    ("sbp", 90, 3),
    ("sbp", 91, 2),
    ("sbp", 100, 2),
    ("sbp", 101, 1),
    ("sbp", 110, 1),
    ("sbp", 111, 0),
    ("sbp", 219, 0),
    ("sbp", 220, 3),
    ("pulse", 40, 3),
    ("pulse", 41, 1),
    ("pulse", 50, 1),
    ("pulse", 51, 0),
    ("pulse", 90, 0),
    ("pulse", 91, 1),
    ("pulse", 110, 1),
    ("pulse", 111, 2),
    ("pulse", 130, 2),
    ("pulse", 131, 3),
    ("temp_c", 35.0, 3),
    ("temp_c", 35.1, 1),
    ("temp_c", 36.0, 1),
    ("temp_c", 36.1, 0),
    ("temp_c", 38.0, 0),
    ("temp_c", 38.1, 1),
    ("temp_c", 39.0, 1),
    ("temp_c", 39.1, 2),
]


@pytest.mark.parametrize(("parameter", "value", "expected"), VITAL_EDGES)
@pytest.mark.parametrize("scale", [1, 2])
def test_vital_band_edges(parameter: str, value: float, expected: int, scale: int) -> None:
    news = score({parameter: (value, NOW)}, **ALL_OBS, scale=scale, now=NOW, max_age_s=60)
    assert news.points[parameter] == expected
    assert news.total == expected


# (scale, on_oxygen, spo2, points)
SPO2_EDGES = [
    (1, False, 91, 3),
    (1, False, 92, 2),
    (1, False, 93, 2),
    (1, False, 94, 1),
    (1, False, 95, 1),
    (1, False, 96, 0),
    (1, True, 96, 0),  # scale 1 ignores oxygen for the SpO2 points
    (2, False, 83, 3),
    (2, False, 84, 2),
    (2, False, 85, 2),
    (2, False, 86, 1),
    (2, False, 87, 1),
    (2, False, 88, 0),
    (2, False, 92, 0),
    (2, False, 93, 0),
    (2, False, 97, 0),
    (2, False, 100, 0),
    (2, True, 83, 3),
    (2, True, 84, 2),
    (2, True, 85, 2),
    (2, True, 86, 1),
    (2, True, 87, 1),
    (2, True, 88, 0),
    (2, True, 92, 0),
    (2, True, 93, 1),
    (2, True, 94, 1),
    (2, True, 95, 2),
    (2, True, 96, 2),
    (2, True, 97, 3),
    (2, True, 100, 3),
]


@pytest.mark.parametrize(("scale", "on_oxygen", "spo2", "expected"), SPO2_EDGES)
def test_spo2_band_edges(scale: int, on_oxygen: bool, spo2: float, expected: int) -> None:
    news = score(
        {"spo2": (spo2, NOW)},
        on_oxygen=on_oxygen,
        consciousness="alert",
        scale=scale,
        now=NOW,
        max_age_s=60,
    )
    assert news.points["spo2"] == expected
    assert news.points["on_oxygen"] == (2 if on_oxygen else 0)
    assert news.total == expected + news.points["on_oxygen"]


@pytest.mark.parametrize(
    ("consciousness", "expected"),
    [("alert", 0), ("confusion", 3), ("voice", 3), ("pain", 3), ("unresponsive", 3)],
)
def test_consciousness_points(consciousness: str, expected: int) -> None:
    news = score({}, on_oxygen=False, consciousness=consciousness, scale=1, now=NOW, max_age_s=60)
    assert news.points["consciousness"] == expected


def test_supplemental_oxygen_scores_two() -> None:
    news = score({}, on_oxygen=True, consciousness="alert", scale=1, now=NOW, max_age_s=60)
    assert news.points["on_oxygen"] == 2


BANDS = [
    # per-parameter points, band
    ({}, "low"),
    ({"rr": 1, "spo2": 1, "pulse": 2}, "low"),
    ({"rr": 2, "spo2": 2}, "low"),
    ({"rr": 3}, "low_medium"),
    ({"rr": 3, "pulse": 1}, "low_medium"),
    ({"rr": 2, "spo2": 2, "temp_c": 1}, "medium"),
    ({"rr": 3, "pulse": 2}, "medium"),
    ({"rr": 3, "spo2": 3}, "medium"),
    ({"rr": 3, "spo2": 3, "pulse": 1}, "high"),
    ({"rr": 2, "spo2": 2, "pulse": 2, "temp_c": 1}, "high"),
]


@pytest.mark.parametrize(("parameter_points", "band"), BANDS)
def test_risk_bands(parameter_points: dict[str, int], band: str) -> None:
    assert band_of(sum(parameter_points.values()), parameter_points) == band


def test_whole_score_with_every_parameter() -> None:
    vitals = {
        "rr": (22.0, NOW),  # 2
        "spo2": (95.0, NOW - 10),  # 1
        "sbp": (105.0, NOW),  # 1
        "pulse": (95.0, NOW),  # 1
        "hr": (150.0, NOW),  # ignored: pulse is fresh
        "temp_c": (38.5, NOW),  # 1
    }
    news = score(vitals, on_oxygen=True, consciousness="alert", scale=1, now=NOW, max_age_s=60)
    assert news == News2(
        total=8,
        band="high",
        scale=1,
        points={
            "rr": 2,
            "spo2": 1,
            "on_oxygen": 2,
            "sbp": 1,
            "pulse": 1,
            "consciousness": 0,
            "temp_c": 1,
        },
        missing=(),
    )
    assert news.to_dict() == {
        "total": 8,
        "band": "high",
        "scale": 1,
        "points": dict(news.points),
        "missing": [],
        "complete": True,
        "display": "8, high",
    }


def test_missing_parameters_count_zero_and_are_listed() -> None:
    news = score({"rr": (25.0, NOW)}, on_oxygen=None, consciousness=None, scale=1, now=NOW,
                 max_age_s=60)  # fmt: skip
    assert news.total == 3
    assert news.band == "incomplete"  # a lower bound: low-medium at least, maybe more
    assert news.reached == "low_medium"
    assert news.missing == ("spo2", "on_oxygen", "sbp", "pulse", "consciousness", "temp_c")
    assert tuple(news.points) == PARAMETERS


def test_stale_values_are_missing() -> None:
    vitals = {"rr": (25.0, NOW - 61), "spo2": (85.0, NOW - 60)}
    news = score(vitals, **ALL_OBS, scale=1, now=NOW, max_age_s=60)
    assert news.points["rr"] == 0
    assert news.points["spo2"] == 3  # exactly max_age_s old still counts
    assert news.missing == ("rr", "sbp", "pulse", "temp_c")


def test_pulse_falls_back_to_heart_rate_when_pulse_is_stale() -> None:
    vitals = {"pulse": (70.0, NOW - 120), "hr": (135.0, NOW)}
    news = score(vitals, **ALL_OBS, scale=1, now=NOW, max_age_s=60)
    assert news.points["pulse"] == 3
    assert "pulse" not in news.missing


def test_pulse_missing_when_neither_pulse_nor_heart_rate() -> None:
    news = score({"hr": (135.0, NOW - 120)}, **ALL_OBS, scale=1, now=NOW, max_age_s=60)
    assert news.points["pulse"] == 0
    assert "pulse" in news.missing


def test_scale_2_with_oxygen_unknown_scores_as_air() -> None:
    news = score({"spo2": (97.0, NOW)}, on_oxygen=None, consciousness="alert", scale=2, now=NOW,
                 max_age_s=60)  # fmt: skip
    assert news.points["spo2"] == 0
    assert news.missing == ("rr", "on_oxygen", "sbp", "pulse", "temp_c")


# (parameter, value, value at the chart's resolution, points): rounded half up to whole numbers
# (temperature to tenths), then scored on chart 1. Scoring the raw value against the row bounds
# gave the low side the row above (91.4 -> 2, 8.4 -> 1, 40.4 -> 1, 90.4 -> 2, 35.04 -> 1) and
# the high side the row above too (20.4 -> 2, 90.4 -> 1, 38.04 -> 1).
FRACTIONAL = [
    # the dangerous low side: each of these scored one row too low before
    ("spo2", 91.4, 91, 3),
    ("rr", 8.4, 8, 3),
    ("pulse", 40.4, 40, 3),
    ("sbp", 90.4, 90, 3),
    ("temp_c", 35.04, 35.0, 3),
    # half a step up rounds to the next row
    ("spo2", 91.5, 92, 2),
    ("rr", 8.5, 9, 1),
    ("pulse", 40.5, 41, 1),
    ("sbp", 90.5, 91, 2),
    ("temp_c", 35.05, 35.1, 1),
    # the high side, symmetric: below half a step stays in the row, half a step moves up
    ("spo2", 95.4, 95, 1),
    ("spo2", 95.5, 96, 0),
    ("rr", 20.4, 20, 0),
    ("rr", 20.5, 21, 2),
    ("rr", 24.4, 24, 2),
    ("rr", 24.5, 25, 3),
    ("pulse", 90.4, 90, 0),
    ("pulse", 90.5, 91, 1),
    ("pulse", 130.4, 130, 2),
    ("pulse", 130.5, 131, 3),
    ("sbp", 219.4, 219, 0),
    ("sbp", 219.5, 220, 3),
    ("temp_c", 38.04, 38.0, 0),
    ("temp_c", 38.05, 38.1, 1),
    ("temp_c", 39.04, 39.0, 1),
    ("temp_c", 39.05, 39.1, 2),
]


@pytest.mark.parametrize(("parameter", "value", "charted", "expected"), FRACTIONAL)
def test_fractional_values_score_at_the_charts_resolution(
    parameter: str, value: float, charted: float, expected: int
) -> None:
    assert chart_value(parameter, value) == charted
    news = score({parameter: (value, NOW)}, **ALL_OBS, scale=1, now=NOW, max_age_s=60)
    assert news.points[parameter] == expected


# (vitals, on_oxygen, consciousness, total, band, complete, display)
COMPLETENESS = [
    # device-only: no oxygen, consciousness, BP or temperature; 0 points is not "low"
    ({"rr": 16.0, "spo2": 97.0, "pulse": 70.0}, None, None, 0, "incomplete", False,
     "≥ 0, incomplete"),
    ({"rr": 22.0, "spo2": 97.0, "pulse": 70.0}, None, None, 2, "incomplete", False,
     "≥ 2, incomplete"),
    # a single 3 or a medium aggregate is still only a lower bound
    ({"rr": 25.0, "spo2": 97.0, "pulse": 70.0}, None, None, 3, "incomplete", False,
     "≥ 3, incomplete"),
    ({"rr": 25.0, "spo2": 93.0, "pulse": 70.0}, None, None, 5, "incomplete", False,
     "≥ 5, incomplete"),
    # high cannot be lowered by missing parameters: it is said
    ({"rr": 25.0, "spo2": 91.0, "pulse": 135.0}, None, None, 9, "high", False,
     "≥ 9, high, incomplete"),
    # complete: the band and the score itself
    ({"rr": 16.0, "spo2": 97.0, "pulse": 70.0, "sbp": 120.0, "temp_c": 37.0}, False, "alert",
     0, "low", True, "0, low"),
    ({"rr": 25.0, "spo2": 97.0, "pulse": 70.0, "sbp": 120.0, "temp_c": 37.0}, False, "alert",
     3, "low_medium", True, "3, low-medium"),
    ({"rr": 25.0, "spo2": 93.0, "pulse": 70.0, "sbp": 120.0, "temp_c": 37.0}, False, "alert",
     5, "medium", True, "5, medium"),
    ({"rr": 25.0, "spo2": 93.0, "pulse": 70.0, "sbp": 120.0, "temp_c": 37.0}, True, "alert",
     7, "high", True, "7, high"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("vitals", "on_oxygen", "consciousness", "total", "band", "complete", "display"),
    COMPLETENESS,
)
def test_an_incomplete_score_says_so_and_is_never_low(
    vitals: dict[str, float],
    on_oxygen: bool | None,
    consciousness: str | None,
    total: int,
    band: str,
    complete: bool,
    display: str,
) -> None:
    news = score(
        {name: (value, NOW) for name, value in vitals.items()},
        on_oxygen=on_oxygen,
        consciousness=consciousness,
        scale=1,
        now=NOW,
        max_age_s=60,
    )
    assert (news.total, news.band, news.complete, news.display) == (
        total,
        band,
        complete,
        display,
    )
    data = news.to_dict()
    assert (data["band"], data["complete"], data["display"]) == (band, complete, display)
    assert data["missing"] == list(news.missing) and bool(news.missing) is not complete


# (vitals, points of spo2 and pulse, missing among spo2 and pulse): a pulse oximeter's 0 is
# "no signal", not a measurement; the ECG's heart rate stands in for a pulse of 0.
NO_SIGNAL = [
    ({"spo2": 0.0, "pulse": 0.0}, (0, 0), ("spo2", "pulse")),
    ({"spo2": 0.0, "pulse": 72.0}, (0, 0), ("spo2",)),
    ({"spo2": 97.0, "pulse": 0.0}, (0, 0), ("pulse",)),
    ({"spo2": 97.0, "pulse": 0.0, "hr": 135.0}, (0, 3), ()),
    ({"spo2": 0.5, "pulse": 0.4}, (3, 3), ()),  # not 0: a value (the engine alarms on it)
]


@pytest.mark.parametrize(("vitals", "expected", "missing"), NO_SIGNAL)
def test_spo2_or_pulse_of_zero_is_missing(
    vitals: dict[str, float], expected: tuple[int, int], missing: tuple[str, ...]
) -> None:
    news = score(
        {name: (value, NOW) for name, value in vitals.items()},
        **ALL_OBS,
        scale=1,
        now=NOW,
        max_age_s=60,
    )
    assert (news.points["spo2"], news.points["pulse"]) == expected
    assert tuple(m for m in news.missing if m in ("spo2", "pulse")) == missing


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"scale": 3}, "scale"),
        ({"scale": True}, "scale"),
        ({"scale": 1, "consciousness": "drowsy"}, "consciousness"),
        ({"scale": 1, "on_oxygen": "yes"}, "on_oxygen"),
    ],
)
def test_invalid_observations_name_the_field(kwargs: dict[str, object], field: str) -> None:
    args: dict[str, object] = {"on_oxygen": None, "consciousness": None, **kwargs}
    with pytest.raises(InvalidMessage) as err:
        score({}, now=NOW, max_age_s=60, **args)  # type: ignore[arg-type]
    assert err.value.field == field
