"""Measurements vitalwire accepts, their units, codes and physical bounds: one table.

Each row names the metric as it travels on the wire (``spo2``), its UCUM unit, its LOINC
code(s) so a FHIR export is a mapping rather than a guess, and the *physically possible*
range. A value outside that range cannot come from a living patient or a working sensor, so it
is rejected with an error naming the field and the bound. Clinically extreme values inside the
range are accepted: they are what alarms are for (docs/protocol.md).

Sources for the codes: LOINC 2.7x (loinc.org) — 59408-5 "Oxygen saturation in Arterial blood by
Pulse oximetry" (with 2708-6), 8889-8 "Heart rate by Pulse oximetry", 8867-4 "Heart rate",
9279-1 "Respiratory rate", 8310-5 "Body temperature", 8480-6 / 8462-4 "Systolic / Diastolic blood
pressure". Units are UCUM (unitsofmeasure.org).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

from vitalwire.core.errors import InvalidReading

#: Earliest device timestamp accepted (2000-01-01T00:00:00Z): anything older is a clock fault.
MIN_TS = 946_684_800.0
#: How far ahead of the server clock a device timestamp may be at most (seconds); ingest holds
#: readings to a much smaller skew (:class:`vitalwire.core.alerts.Timeliness`).
MAX_CLOCK_AHEAD_S = 3600.0
#: Largest ``seq`` a device may use (signed 64-bit, what every store column holds).
MAX_SEQ = 2**63 - 1


@dataclass(frozen=True, slots=True)
class Metric:
    """One measurement kind: wire name, label, UCUM unit, LOINC codes and physical bounds."""

    name: str
    label: str
    unit: str
    loinc: tuple[str, ...]
    low: float
    high: float
    vital: bool = True  # a clinical vital sign (vs. signal quality or device data)


METRICS: tuple[Metric, ...] = (
    Metric("spo2", "SpO2", "%", ("59408-5", "2708-6"), 0, 100),
    Metric("pulse", "Pulse rate", "/min", ("8889-8",), 0, 350),
    Metric("hr", "Heart rate", "/min", ("8867-4",), 0, 350),
    Metric("rr", "Respiratory rate", "/min", ("9279-1",), 0, 150),
    # Lowest survived core temperature 13.7 Cel, highest recorded 46.5 Cel.
    Metric("temp_c", "Body temperature", "Cel", ("8310-5",), 10, 47),
    Metric("sbp", "Systolic blood pressure", "mm[Hg]", ("8480-6",), 0, 400),
    Metric("dbp", "Diastolic blood pressure", "mm[Hg]", ("8462-4",), 0, 300),
    # Signal quality: perfusion index (%) of the pulse oximeter; probe attachment is a boolean.
    Metric("pi", "Perfusion index", "%", (), 0, 30, vital=False),
    Metric("battery", "Battery", "%", (), 0, 100, vital=False),
)

METRIC_BY_NAME: dict[str, Metric] = {m.name: m for m in METRICS}
VITAL_NAMES: tuple[str, ...] = tuple(m.name for m in METRICS if m.vital)


def check_bound(field: str, value: float, low: float, high: float) -> None:
    """Raise :class:`InvalidReading` naming ``field`` and its bound when ``value`` is outside."""
    if not (low <= value <= high) or math.isnan(value):
        raise InvalidReading(
            f"{field} must be between {_fmt(low)} and {_fmt(high)}, got {_fmt(value)}", field=field
        )


def validate_values(values: Mapping[str, float | None]) -> dict[str, float]:
    """Check each present metric against its physical bound; return the present ones.

    Args:
        values: metric name -> value, ``None`` meaning "not measured".

    Returns:
        A new dict holding only the measured metrics.

    Raises:
        InvalidReading: the first value outside its bound, or diastolic not below systolic.
    """
    out: dict[str, float] = {}
    for name, value in values.items():
        if value is None:
            continue
        metric = METRIC_BY_NAME[name]
        if not metric.low <= value <= metric.high:  # NaN fails this too
            check_bound(name, value, metric.low, metric.high)  # raises, naming field and bound
        out[name] = value
    sbp, dbp = out.get("sbp"), out.get("dbp")
    if sbp is not None and dbp is not None and dbp >= sbp:
        raise InvalidReading(
            f"dbp must be lower than sbp ({_fmt(sbp)}), got {_fmt(dbp)}", field="dbp"
        )
    return out


def validate_header(seq: int, ts: float, now: float, ahead_s: float = MAX_CLOCK_AHEAD_S) -> None:
    """Check a reading's ``seq`` and device timestamp ``ts`` (epoch seconds) against ``now``:
    at most ``ahead_s`` after it (ingest passes :attr:`core.alerts.Timeliness.ahead_s`)."""
    if not 1 <= seq <= MAX_SEQ:
        raise InvalidReading(f"seq must be between 1 and {MAX_SEQ}, got {seq}", field="seq")
    if math.isnan(ts) or not MIN_TS <= ts <= now + ahead_s:
        raise InvalidReading(
            f"ts must be between {_fmt(MIN_TS)} and {_fmt(now + ahead_s)} "
            f"(server time + {_fmt(ahead_s)} s), got {_fmt(ts)}",
            field="ts",
        )


def _fmt(x: float) -> str:
    if float(x).is_integer():
        return str(int(x))
    return f"{x:g}" if abs(x) < 1e6 else f"{x:.3f}"
