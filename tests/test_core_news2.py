"""NEWS2 (RCP 2017 chart 1): every band edge on both SpO2 scales, risk bands, missing values."""

from __future__ import annotations

import pytest

from vitalwire.core.errors import InvalidMessage
from vitalwire.core.news2 import PARAMETERS, News2, band_of, score

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
    }


def test_missing_parameters_count_zero_and_are_listed() -> None:
    news = score({"rr": (25.0, NOW)}, on_oxygen=None, consciousness=None, scale=1, now=NOW,
                 max_age_s=60)  # fmt: skip
    assert news.total == 3
    assert news.band == "low_medium"
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


def test_fractional_values_score_with_the_row_above() -> None:
    news = score({"rr": (8.5, NOW), "temp_c": (35.05, NOW)}, **ALL_OBS, scale=1, now=NOW,
                 max_age_s=60)  # fmt: skip
    assert news.points["rr"] == 1
    assert news.points["temp_c"] == 1


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
