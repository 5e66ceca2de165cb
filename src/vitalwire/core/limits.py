"""Default adult alarm limits, alarm condition delays and hysteresis: one table, plus overrides.

Each :class:`MetricLimits` row says, for one vital sign, when a value is an alarm condition:

- ``low`` / ``high``: a value *below* ``low`` or *above* ``high`` is a medium-priority condition;
- ``critical_low`` / ``critical_high``: a value beyond these is a high-priority condition and is
  raised at once, without waiting for the delay (IEC 60601-1-8:2006+A1:2012, table 1: the
  priority follows the potential harm of not responding and how fast it arrives);
- ``delay_s``: how long a medium violation must persist before the alert is raised (the *alarm
  condition delay* of IEC 60601-1-8);
- ``deadband`` and ``clear_s``: the condition ends only after the value is back inside the limit
  by ``deadband`` for ``clear_s`` seconds (hysteresis).

A limit set to ``None`` does not exist. Comparisons are strict: SpO2 90 % does not violate a low
limit of 90 %, 89 % does.

Per-patient limits are the defaults with overrides applied by :func:`override_limits`, which
validates every value and names the offending field (``limits.spo2.low``) and the bound in an
:class:`~vitalwire.core.errors.InvalidMessage`. :meth:`Limits.to_dict` and
:meth:`Limits.from_dict` turn limits into plain dicts and back, for the audit record (old, new)
of a change.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

from vitalwire.core.errors import InvalidMessage
from vitalwire.core.metrics import METRIC_BY_NAME

#: The settable fields of one row, in the order of the plain-dict form.
LIMIT_FIELDS: tuple[str, ...] = (
    "low",
    "high",
    "critical_low",
    "critical_high",
    "delay_s",
    "deadband",
    "clear_s",
)
_BOUND_FIELDS: tuple[str, ...] = ("critical_low", "low", "high", "critical_high")
#: Largest alarm condition delay an override may set (s): longer delays hide real deterioration.
MAX_DELAY_S = 60.0
#: Largest clear time an override may set (s).
MAX_CLEAR_S = 60.0


@dataclass(frozen=True, slots=True)
class MetricLimits:
    """Alarm limits, delay and hysteresis of one vital sign (see the module docstring)."""

    metric: str
    low: float | None = None
    high: float | None = None
    critical_low: float | None = None
    critical_high: float | None = None
    delay_s: float = 0.0
    deadband: float = 0.0
    clear_s: float = 5.0

    def violation(self, value: float, direction: str) -> tuple[str | None, float | None]:
        """The priority a value calls for on one side (``"low"`` or ``"high"``) and its limit.

        Returns:
            ``("high", critical limit)`` beyond the critical limit, ``("medium", limit)`` beyond
            the medium limit only, else ``(None, None)``.
        """
        if direction == "low":
            if self.critical_low is not None and value < self.critical_low:
                return "high", self.critical_low
            if self.low is not None and value < self.low:
                return "medium", self.low
        else:
            if self.critical_high is not None and value > self.critical_high:
                return "high", self.critical_high
            if self.high is not None and value > self.high:
                return "medium", self.high
        return None, None

    def limit(self, direction: str) -> float | None:
        """The least severe limit on one side: the one a condition must come back inside of."""
        if direction == "low":
            return self.low if self.low is not None else self.critical_low
        return self.high if self.high is not None else self.critical_high

    def is_clear(self, value: float, direction: str) -> bool:
        """Whether ``value`` is back inside the limit on one side by at least the deadband."""
        limit = self.limit(direction)
        if limit is None:
            return True
        if direction == "low":
            return value >= limit + self.deadband
        return value <= limit - self.deadband

    def to_dict(self) -> dict[str, float | None]:
        """The row as a plain dict (without the metric name)."""
        return {name: getattr(self, name) for name in LIMIT_FIELDS}


# The default adult table. Sources:
#   [I4]   vitalwire issue 4, item 1 and 3 (limits, delays, deadbands, 5 s clear time).
#   [IEC]  IEC 60601-1-8:2006+A1:2012 (alarm systems): priorities (table 1), alarm condition delay.
#   [RCP]  Royal College of Physicians, National Early Warning Score (NEWS) 2, 2017, chart 1:
#          the same thresholds score 3 (e.g. pulse <= 40, RR <= 8, SBP <= 90, temp <= 35.0).
#   [Welch] Welch J, "An evidence-based approach to reduce nuisance alarms and alarm fatigue",
#          Biomed Instrum Technol 2011;45(s1):46-52: a 15 s delay on a 90 % SpO2 low limit cut
#          low-SpO2 alarms by about 60 % (Rheineck); Lansdowne K et al., BMC Nursing 2016;15:36
#          (1 Hz MIMIC-II SpO2, thresholds 84-90 %, delays 10-60 s) shows the same trade-off.
#   [ISO81060] ISO 81060-2 (NIBP validation) accepts a mean error up to +-5 mmHg: a smaller
#          deadband would let measurement error end a blood-pressure condition.
# NIBP and temperature are spot measurements (one value per cuff cycle or probe reading, minutes
# apart), not a noisy 1 Hz stream: each value is already a completed measurement, and any delay
# could only be met by the *next* measurement a whole cycle later. So their delay is 0 s.
DEFAULT_ROWS: tuple[MetricLimits, ...] = (
    # SpO2 < 90 % medium, < 85 % high, 15 s delay, 1 % deadband: [I4]; delay [Welch]
    MetricLimits("spo2", low=90, critical_low=85, delay_s=15, deadband=1),
    # Pulse rate (oximeter) like HR: 50-120 /min medium, < 40 or > 140 high: [I4]; <= 40 [RCP]
    MetricLimits(
        "pulse", low=50, high=120, critical_low=40, critical_high=140, delay_s=10, deadband=2
    ),
    # Heart rate (ECG) 50-120 /min medium, < 40 or > 140 high, 10 s, 2 /min: [I4]
    MetricLimits(
        "hr", low=50, high=120, critical_low=40, critical_high=140, delay_s=10, deadband=2
    ),
    # Respiratory rate 8-30 /min medium, 10 s, 1 /min: [I4]. A rate of 0 also raises apnoea (high)
    # after AlertConfig.apnoea_delay_s: core.alerts.CESSATIONS, not a limit of this table.
    MetricLimits("rr", low=8, high=30, delay_s=10, deadband=1),
    # Temperature 35.0-39.0 Cel medium: [I4] ([RCP] <= 35.0 scores 3); 0 s spot value; 0.2 Cel
    # deadband = two display steps of 0.1 Cel.
    MetricLimits("temp_c", low=35.0, high=39.0, delay_s=0, deadband=0.2),
    # Systolic 90-160 mmHg medium: [I4] ([RCP] <= 90 scores 3); 0 s spot value; 5 mmHg [ISO81060]
    MetricLimits("sbp", low=90, high=160, delay_s=0, deadband=5),
    # Diastolic 50-90 mmHg medium: [I4]; 0 s spot value; 5 mmHg [ISO81060]
    MetricLimits("dbp", low=50, high=90, delay_s=0, deadband=5),
)


@dataclass(frozen=True, slots=True)
class Limits:
    """The limits of one patient: one :class:`MetricLimits` row per alarm metric."""

    rows: tuple[MetricLimits, ...] = DEFAULT_ROWS

    def __iter__(self) -> Iterator[MetricLimits]:
        return iter(self.rows)

    def __getitem__(self, metric: str) -> MetricLimits:
        for row in self.rows:
            if row.metric == metric:
                return row
        raise KeyError(metric)

    def get(self, metric: str) -> MetricLimits | None:
        """The row of ``metric``, ``None`` when it has no alarm limits."""
        for row in self.rows:
            if row.metric == metric:
                return row
        return None

    def to_dict(self) -> dict[str, dict[str, float | None]]:
        """Plain, JSON-ready form: ``{"spo2": {"low": 90, ..., "clear_s": 5.0}, ...}``."""
        return {row.metric: row.to_dict() for row in self.rows}

    @classmethod
    def from_dict(cls, data: Mapping[str, object]) -> Limits:
        """Rebuild limits from :meth:`to_dict` output (validated like an override).

        Metrics missing from ``data`` keep their defaults.

        Raises:
            InvalidMessage: a value is invalid, naming the field and the bound.
        """
        return override_limits(DEFAULT_LIMITS, data)


#: The default adult limits.
DEFAULT_LIMITS = Limits()


def override_limits(limits: Limits, overrides: Mapping[str, object]) -> Limits:
    """Apply per-patient overrides to ``limits`` and return the new limits.

    Args:
        limits: the current limits (left unchanged).
        overrides: ``{metric: {field: value}}``, e.g. ``{"spo2": {"low": 88, "delay_s": 20}}``.
            Fields are those of :data:`LIMIT_FIELDS`. ``None`` restores the field's default: a
            limit the default table defines can be moved but never switched off, and a limit it
            lacks (e.g. a critical systolic limit) can be added and removed again.

    Returns:
        New :class:`Limits`.

    Raises:
        InvalidMessage: naming the field (``limits.spo2.low``) and the bound it breaks: an
            unknown metric or field, a non-number, a limit outside the metric's physical bounds
            (:mod:`vitalwire.core.metrics`), limits out of order (``critical_low < low < high <
            critical_high``), a delay outside 0-60 s, a clear time outside 0-60 s, or a deadband
            that is negative or too wide for the limits.
    """
    if not isinstance(overrides, Mapping):
        raise InvalidMessage("limits must be an object of metric -> fields", field="limits")
    rows = {row.metric: row for row in limits.rows}
    defaults = {row.metric: row for row in DEFAULT_ROWS}
    for metric, changes in overrides.items():
        if not isinstance(metric, str) or metric not in rows:
            known = ", ".join(rows)
            raise InvalidMessage(
                f"limits.{metric} is not an alarm metric; known: {known}", field=f"limits.{metric}"
            )
        if not isinstance(changes, Mapping):
            raise InvalidMessage(
                f"limits.{metric} must be an object of fields", field=f"limits.{metric}"
            )
        new: dict[str, float | None] = {}
        for name, value in changes.items():
            field = f"limits.{metric}.{name}"
            if name not in LIMIT_FIELDS:
                raise InvalidMessage(
                    f"{field} is not a limit field; known: {', '.join(LIMIT_FIELDS)}", field=field
                )
            if value is None:
                new[name] = getattr(defaults[metric], name)
                continue
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise InvalidMessage(f"{field} must be a number, got {value!r:.40}", field=field)
            if not math.isfinite(value):
                raise InvalidMessage(f"{field} must be a finite number", field=field)
            new[name] = float(value)
        values = rows[metric].to_dict()
        values.update(new)
        row = _row(metric, values)
        _check_row(row)
        rows[metric] = row
    return Limits(tuple(rows[row.metric] for row in limits.rows))


def _row(metric: str, v: Mapping[str, float | None]) -> MetricLimits:
    def number(name: str) -> float:
        value = v[name]
        assert value is not None  # only the bounds may be None (checked by the caller)
        return value

    return MetricLimits(
        metric,
        low=v["low"],
        high=v["high"],
        critical_low=v["critical_low"],
        critical_high=v["critical_high"],
        delay_s=number("delay_s"),
        deadband=number("deadband"),
        clear_s=number("clear_s"),
    )


def _check_row(row: MetricLimits) -> None:
    metric = METRIC_BY_NAME[row.metric]
    prefix = f"limits.{row.metric}"
    present = [(name, getattr(row, name)) for name in _BOUND_FIELDS]
    for name, value in present:
        if value is not None and not metric.low <= value <= metric.high:
            raise InvalidMessage(
                f"{prefix}.{name} must be within the physical bounds of {row.metric} "
                f"({_fmt(metric.low)} to {_fmt(metric.high)}), got {_fmt(value)}",
                field=f"{prefix}.{name}",
            )
    bounds = [(name, value) for name, value in present if value is not None]
    for (lower_name, lower), (upper_name, upper) in zip(bounds, bounds[1:], strict=False):
        if not lower < upper:
            raise InvalidMessage(
                f"{prefix}.{lower_name} must be below {prefix}.{upper_name} ({_fmt(upper)}), "
                f"got {_fmt(lower)}",
                field=f"{prefix}.{lower_name}",
            )
    for name, top in (("delay_s", MAX_DELAY_S), ("clear_s", MAX_CLEAR_S)):
        value = getattr(row, name)
        if not 0 <= value <= top:
            raise InvalidMessage(
                f"{prefix}.{name} must be between 0 and {_fmt(top)} s, got {_fmt(value)}",
                field=f"{prefix}.{name}",
            )
    low, high = row.limit("low"), row.limit("high")
    widest = (high - low) / 2 if low is not None and high is not None else metric.high / 10
    if not 0 <= row.deadband < widest:
        raise InvalidMessage(
            f"{prefix}.deadband must be at least 0 and below {_fmt(widest)} "
            f"(half the gap between the limits), got {_fmt(row.deadband)}",
            field=f"{prefix}.deadband",
        )


def _fmt(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else f"{x:g}"
