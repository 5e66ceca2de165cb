"""NEWS2: the National Early Warning Score 2 of the Royal College of Physicians (RCP), 2017.

Source: Royal College of Physicians, *National Early Warning Score (NEWS) 2: Standardising the
assessment of acute-illness severity in the NHS*, London, RCP 2017 — chart 1 (the NEWS2 scoring
system) for the bands below, chart 2 (SpO2 scale 2 for hypercapnic respiratory failure, to be
used only when a clinician has decided so for the patient) and the "clinical risk" thresholds:
aggregate 0-4 low, a score of 3 in any single parameter low-medium, 5-6 medium, 7 or more high.

Every band table is data: ``(upper bound inclusive, points)`` rows in rising order, the last row
open-ended.

Resolution. Chart 1 is written in whole numbers (respiration rate, SpO2, systolic pressure and
pulse) and in tenths of a degree (temperature): its rows meet edge to edge at that resolution
(``<= 8``, ``9-11``; ``<= 35.0``, ``35.1-36.0``) and leave nothing in between. A device averaging
to 8.4 /min or 91.4 % reports a value the chart has no row for, so each value is first taken to
the chart's resolution (:data:`RESOLUTION`), rounding half up, as a nurse charting it would write
it down: SpO2 91.4 -> 91 (3 points), RR 8.4 -> 8 (3), pulse 40.4 -> 40 (3), systolic 90.4 -> 90
(3), temperature 35.04 -> 35.0 (3); and on the other side 8.5 -> 9 (1), 91.5 -> 92 (2). Scoring
the raw value against the row bounds instead would put 8.4 /min in the 9-11 row: one point for a
respiration rate the chart scores 3, under-scoring exactly the dangerous low side. Half up (the
school rule for the nearest charted value), not Python's half-to-even, which would chart 8.5 as 8
but 9.5 as 10: the same half step must land the same way on every row.

Missing parameters. Parameters without a value, or whose value is older than ``max_age_s``,
score 0 and are listed in :attr:`News2.missing`; a pulse oximeter's SpO2 or pulse of 0 is its
"no signal" reading, not a measurement, and counts as missing too. A score from partial data is a
lower bound of the full score, so it never names a band the full score could exceed:
:attr:`News2.band` is ``"incomplete"`` unless the partial score already reaches ``"high"``
(missing parameters can only add points), and :attr:`News2.display` reads ``"≥ 2, incomplete"``.
:attr:`News2.reached` is the band the partial score reaches, which the alert engine uses: a
lower bound past a threshold is past it.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from vitalwire.core.errors import InvalidMessage

Bands = tuple[tuple[float, int], ...]

#: Respiration rate (/min): <=8 -> 3, 9-11 -> 1, 12-20 -> 0, 21-24 -> 2, >=25 -> 3 (chart 1).
RR_BANDS: Bands = ((8, 3), (11, 1), (20, 0), (24, 2), (math.inf, 3))
#: SpO2 scale 1 (%): <=91 -> 3, 92-93 -> 2, 94-95 -> 1, >=96 -> 0 (chart 1).
SPO2_SCALE1_BANDS: Bands = ((91, 3), (93, 2), (95, 1), (math.inf, 0))
#: SpO2 scale 2 on air (%): <=83 -> 3, 84-85 -> 2, 86-87 -> 1, 88-92 and >=93 on air -> 0.
SPO2_SCALE2_AIR_BANDS: Bands = ((83, 3), (85, 2), (87, 1), (math.inf, 0))
#: SpO2 scale 2 on oxygen (%): as on air up to 92, then 93-94 -> 1, 95-96 -> 2, >=97 -> 3.
SPO2_SCALE2_OXYGEN_BANDS: Bands = (
    (83, 3),
    (85, 2),
    (87, 1),
    (92, 0),
    (94, 1),
    (96, 2),
    (math.inf, 3),
)
#: Air or oxygen: supplemental oxygen -> 2, air -> 0 (chart 1).
AIR_OR_OXYGEN_POINTS: Mapping[bool, int] = {False: 0, True: 2}
#: Systolic blood pressure (mmHg): <=90 -> 3, 91-100 -> 2, 101-110 -> 1, 111-219 -> 0, >=220 -> 3.
SBP_BANDS: Bands = ((90, 3), (100, 2), (110, 1), (219, 0), (math.inf, 3))
#: Pulse (/min): <=40 -> 3, 41-50 -> 1, 51-90 -> 0, 91-110 -> 1, 111-130 -> 2, >=131 -> 3.
PULSE_BANDS: Bands = ((40, 3), (50, 1), (90, 0), (110, 1), (130, 2), (math.inf, 3))
#: Consciousness (ACVPU): alert -> 0; new confusion, voice, pain, unresponsive -> 3 (chart 1).
CONSCIOUSNESS_POINTS: Mapping[str, int] = {
    "alert": 0,
    "confusion": 3,
    "voice": 3,
    "pain": 3,
    "unresponsive": 3,
}
#: Temperature (Cel): <=35.0 -> 3, 35.1-36.0 -> 1, 36.1-38.0 -> 0, 38.1-39.0 -> 1, >=39.1 -> 2.
TEMP_BANDS: Bands = ((35.0, 3), (36.0, 1), (38.0, 0), (39.0, 1), (math.inf, 2))

#: The seven NEWS2 parameters, in chart order.
PARAMETERS: tuple[str, ...] = (
    "rr",
    "spo2",
    "on_oxygen",
    "sbp",
    "pulse",
    "consciousness",
    "temp_c",
)
#: Risk bands, lowest first.
BANDS: tuple[str, ...] = ("low", "low_medium", "medium", "high")
#: The ``band`` of a score with missing parameters that does not already reach ``"high"``.
INCOMPLETE = "incomplete"
#: The chart's resolution per vital sign (RCP 2017 chart 1: whole numbers, temperature in
#: tenths); a value is rounded half up to it before it is scored (see the module docstring).
RESOLUTION: Mapping[str, float] = {
    "rr": 1,
    "spo2": 1,
    "sbp": 1,
    "pulse": 1,
    "hr": 1,
    "temp_c": 0.1,
}
#: A pulse oximeter reports 0 for these when it has no signal: 0 counts as missing.
NO_SIGNAL_ZERO: frozenset[str] = frozenset({"spo2", "pulse"})
#: SpO2 scales.
SCALES: tuple[int, ...] = (1, 2)


@dataclass(frozen=True, slots=True)
class News2:
    """One NEWS2 result.

    Attributes:
        total: aggregate score (0-20); with missing parameters, a lower bound of the full score.
        band: clinical risk, one of :data:`BANDS` when the score is complete; with missing
            parameters :data:`INCOMPLETE`, or ``"high"`` when the partial score reaches it.
        scale: SpO2 scale used (1 or 2).
        points: points per parameter of :data:`PARAMETERS` (0 for a missing one).
        missing: parameters with no value, a value older than ``max_age_s``, or a pulse
            oximeter's 0 (no signal).
    """

    total: int
    band: str
    scale: int
    points: dict[str, int]
    missing: tuple[str, ...]

    @property
    def complete(self) -> bool:
        """Every parameter has a value: ``total`` is the score, not a lower bound."""
        return not self.missing

    @property
    def reached(self) -> str:
        """The band of :data:`BANDS` the score reaches as it stands (a lower bound of the full
        score's band when parameters are missing)."""
        return band_of(self.total, self.points)

    @property
    def display(self) -> str:
        """The score for people: ``"5, medium"``; ``"≥ 2, incomplete"`` with missing parameters
        (``"≥ 8, high, incomplete"`` when the partial score already reaches high)."""
        if self.complete:
            return f"{self.total}, {self.band.replace('_', '-')}"
        if self.band == INCOMPLETE:
            return f"≥ {self.total}, {INCOMPLETE}"
        return f"≥ {self.total}, {self.band.replace('_', '-')}, {INCOMPLETE}"

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return {
            "total": self.total,
            "band": self.band,
            "scale": self.scale,
            "points": dict(self.points),
            "missing": list(self.missing),
            "complete": self.complete,
            "display": self.display,
        }


def chart_value(name: str, value: float) -> float:
    """``value`` at the chart's resolution for vital ``name`` (:data:`RESOLUTION`), rounded half
    up: 91.4 -> 91, 91.5 -> 92, temperature 35.04 -> 35.0, 35.05 -> 35.1 (RCP 2017 chart 1 is
    written in whole numbers, temperature in tenths). A name without a resolution is returned
    as it is."""
    step = RESOLUTION.get(name)
    if step is None:
        return value
    per_unit = round(1 / step)  # 1, or 10 for tenths
    scaled = round(value * per_unit, 6)  # 35.05 * 10 is 350.49999999999994: drop the float noise
    return math.floor(scaled + 0.5) / per_unit


def points(bands: Bands, value: float) -> int:
    """Points of ``value`` in a band table: the first row whose upper bound is >= ``value``.
    ``value`` is at the chart's resolution already (:func:`chart_value`)."""
    for upper, pts in bands:
        if value <= upper:
            return pts
    raise ValueError(f"no band for {value!r}")  # unreachable: the last row is open-ended


#: The band table each vital scores on, SpO2 aside (its table depends on the scale): RCP 2017
#: chart 1. ``hr`` stands in for ``pulse`` when the pulse is missing (see :func:`score`).
_METRIC_BANDS: dict[str, Bands] = {
    "rr": RR_BANDS,
    "sbp": SBP_BANDS,
    "pulse": PULSE_BANDS,
    "hr": PULSE_BANDS,
    "temp_c": TEMP_BANDS,
}


def metric_points(name: str, value: float, *, scale: int, on_oxygen: bool | None) -> int | None:
    """The points one vital scores on its own (RCP 2017 chart 1, chart 2 for SpO2 on scale 2),
    at the chart's resolution, as :func:`score` counts it; None for a metric NEWS2 does not use,
    and for a pulse oximeter's 0 (no signal: missing). Two values with the same points leave the
    score unchanged."""
    if value == 0 and name in NO_SIGNAL_ZERO:
        return None
    value = chart_value(name, value)
    if name == "spo2":
        if scale == 1:
            return points(SPO2_SCALE1_BANDS, value)
        return points(SPO2_SCALE2_OXYGEN_BANDS if on_oxygen else SPO2_SCALE2_AIR_BANDS, value)
    bands = _METRIC_BANDS.get(name)
    return None if bands is None else points(bands, value)


def reported_band(total: int, parameter_points: Mapping[str, int], complete: bool) -> str:
    """The ``band`` a score reports: :func:`band_of` when it is complete; with missing
    parameters :data:`INCOMPLETE`, unless the partial score already reaches ``"high"``, which
    missing parameters (they can only add points) cannot lower."""
    band = band_of(total, parameter_points)
    return band if complete or band == "high" else INCOMPLETE


def band_of(total: int, parameter_points: Mapping[str, int]) -> str:
    """Clinical risk of a score (RCP 2017): 7+ high, 5-6 medium, any single 3 low-medium, else low.

    The low-medium band ("a score of 3 in any individual parameter") applies only while the
    aggregate is below 5; from 5 on the aggregate decides.
    """
    if total >= 7:
        return "high"
    if total >= 5:
        return "medium"
    if any(p >= 3 for p in parameter_points.values()):
        return "low_medium"
    return "low"


def check_observations(
    *, on_oxygen: object = None, consciousness: object = None, scale: object = None
) -> None:
    """Validate patient observations; ``None`` means "not given".

    Raises:
        InvalidMessage: naming ``on_oxygen``, ``consciousness`` or ``scale``.
    """
    if on_oxygen is not None and not isinstance(on_oxygen, bool):
        raise InvalidMessage(
            f"on_oxygen must be true or false, got {on_oxygen!r:.40}", field="on_oxygen"
        )
    if consciousness is not None and consciousness not in CONSCIOUSNESS_POINTS:
        raise InvalidMessage(
            f"consciousness must be one of {', '.join(CONSCIOUSNESS_POINTS)}, "
            f"got {consciousness!r:.40}",
            field="consciousness",
        )
    if scale is not None and (isinstance(scale, bool) or scale not in SCALES):
        raise InvalidMessage(f"scale must be 1 or 2, got {scale!r:.40}", field="scale")


def score(
    vitals: Mapping[str, Iterable[float]],
    *,
    on_oxygen: bool | None,
    consciousness: str | None,
    scale: int,
    now: float,
    max_age_s: float,
) -> News2:
    """Compute NEWS2 (RCP 2017, chart 1) from the latest vitals and patient observations.

    Each value is scored at the chart's resolution (:func:`chart_value`); an SpO2 or pulse of 0
    (a pulse oximeter's "no signal") is missing.

    Args:
        vitals: metric name -> ``(value, ts)``; uses ``rr``, ``spo2``, ``sbp``, ``temp_c`` and
            ``pulse``, or ``hr`` for the pulse parameter when ``pulse`` is missing or stale.
        on_oxygen: supplemental oxygen (True), air (False) or unknown (None: missing).
        consciousness: ACVPU: ``"alert"``, ``"confusion"`` (new confusion), ``"voice"``,
            ``"pain"``, ``"unresponsive"``, or None (missing).
        scale: SpO2 scale, 1 or 2 (scale 2 only when set for the patient, RCP chart 2). On scale
            2 with ``on_oxygen`` unknown, SpO2 >= 93 % scores as on air (0).
        now: current time (s), the same clock as the ``ts`` of ``vitals``.
        max_age_s: a value older than this is missing.

    Returns:
        A :class:`News2`.

    Raises:
        InvalidMessage: an invalid ``consciousness``, ``on_oxygen`` or ``scale``.
    """
    check_observations(on_oxygen=on_oxygen, consciousness=consciousness, scale=scale)

    def fresh(name: str) -> float | None:
        entry = vitals.get(name)
        if entry is None:
            return None
        value, ts = entry
        if now - ts > max_age_s or (value == 0 and name in NO_SIGNAL_ZERO):
            return None
        return chart_value(name, value)

    pts: dict[str, int] = {}
    missing: list[str] = []

    def put(name: str, value: float | None, bands: Bands) -> None:
        if value is None:
            pts[name] = 0
            missing.append(name)
        else:
            pts[name] = points(bands, value)

    put("rr", fresh("rr"), RR_BANDS)
    spo2 = fresh("spo2")
    if scale == 1:
        put("spo2", spo2, SPO2_SCALE1_BANDS)
    else:
        bands = SPO2_SCALE2_OXYGEN_BANDS if on_oxygen else SPO2_SCALE2_AIR_BANDS
        put("spo2", spo2, bands)
    if on_oxygen is None:
        pts["on_oxygen"] = 0
        missing.append("on_oxygen")
    else:
        pts["on_oxygen"] = AIR_OR_OXYGEN_POINTS[on_oxygen]
    put("sbp", fresh("sbp"), SBP_BANDS)
    pulse = fresh("pulse")
    put("pulse", pulse if pulse is not None else fresh("hr"), PULSE_BANDS)
    if consciousness is None:
        pts["consciousness"] = 0
        missing.append("consciousness")
    else:
        pts["consciousness"] = CONSCIOUSNESS_POINTS[consciousness]
    put("temp_c", fresh("temp_c"), TEMP_BANDS)

    ordered = {name: pts[name] for name in PARAMETERS}
    total = sum(ordered.values())
    return News2(
        total=total,
        band=reported_band(total, ordered, complete=not missing),
        scale=scale,
        points=ordered,
        missing=tuple(name for name in PARAMETERS if name in missing),
    )
