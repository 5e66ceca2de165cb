"""NEWS2: the National Early Warning Score 2 of the Royal College of Physicians (RCP), 2017.

Source: Royal College of Physicians, *National Early Warning Score (NEWS) 2: Standardising the
assessment of acute-illness severity in the NHS*, London, RCP 2017 — chart 1 (the NEWS2 scoring
system) for the bands below, chart 2 (SpO2 scale 2 for hypercapnic respiratory failure, to be
used only when a clinician has decided so for the patient) and the "clinical risk" thresholds:
aggregate 0-4 low, a score of 3 in any single parameter low-medium, 5-6 medium, 7 or more high.

Every band table is data: ``(upper bound inclusive, points)`` rows in rising order, the last row
open-ended. The chart's rows are inclusive whole numbers (temperature in 0.1 Cel steps); a value
between two rows (a device averaging to 8.5 /min) scores with the row above it.

Parameters without a value, or whose value is older than ``max_age_s``, score 0 and are listed
in :attr:`News2.missing`: a score from partial data is a lower bound of the full score.
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
#: SpO2 scales.
SCALES: tuple[int, ...] = (1, 2)


@dataclass(frozen=True, slots=True)
class News2:
    """One NEWS2 result.

    Attributes:
        total: aggregate score (0-20).
        band: clinical risk, one of :data:`BANDS`.
        scale: SpO2 scale used (1 or 2).
        points: points per parameter of :data:`PARAMETERS` (0 for a missing one).
        missing: parameters with no value or a value older than ``max_age_s``.
    """

    total: int
    band: str
    scale: int
    points: dict[str, int]
    missing: tuple[str, ...]

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return {
            "total": self.total,
            "band": self.band,
            "scale": self.scale,
            "points": dict(self.points),
            "missing": list(self.missing),
        }


def points(bands: Bands, value: float) -> int:
    """Points of ``value`` in a band table: the first row whose upper bound is >= ``value``."""
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
    as :func:`score` counts it; None for a metric NEWS2 does not use. Two values with the same
    points leave the score unchanged."""
    if name == "spo2":
        if scale == 1:
            return points(SPO2_SCALE1_BANDS, value)
        return points(SPO2_SCALE2_OXYGEN_BANDS if on_oxygen else SPO2_SCALE2_AIR_BANDS, value)
    bands = _METRIC_BANDS.get(name)
    return None if bands is None else points(bands, value)


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
        return value if now - ts <= max_age_s else None

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
        band=band_of(total, ordered),
        scale=scale,
        points=ordered,
        missing=tuple(name for name in PARAMETERS if name in missing),
    )
