"""The alert engine: limits, delays, hysteresis, latching, escalation and NEWS2, for one patient.

How it works
------------
A :class:`PatientAlerts` holds one patient's latest vitals (value, time received, source device),
each device's state (online, probe attached, perfusion index, battery) and the patient's NEWS2
observations (oxygen, consciousness, SpO2 scale). The service feeds it readings, device status
changes, observations, acknowledgements and a ``tick`` about once a second; ``now`` is always an
argument. Each call re-evaluates every *alarm condition* and returns the changes it caused, in a
deterministic order: :class:`AlertChange` (raised, acknowledged, escalated, resolved,
priority_changed) and :class:`News2Change` (the NEWS2 risk band moved).

Every condition (``spo2_low``, ``hr_high``, ``probe_off`` of a device, ``news2_high``...) is
driven the same way from two inputs: the priority the current value *demands* (or none) and
whether the value is *clear* (back inside the limit by the deadband):

- no alert yet: a demand starts a pending timer; the alert is raised when the demand has lasted
  the condition's delay (IEC 60601-1-8 *alarm condition delay*), or at once when the value is
  beyond the critical limit (high priority). A value back inside the limit resets the timer.
- alert raised: the condition ends once the value has been clear for the clear time
  (hysteresis); a demand for a higher priority raises the alert's priority at once. Priority
  never falls within one alert: it records the worst that happened, and a high-priority alert
  then latches. The alert then moves through :data:`TRANSITIONS`.
- the value cannot be trusted (SpO2 and pulse while the probe is off or perfusion is poor, any
  value from an offline device): pending and clear timers reset, an alert already raised stays as
  it is, and the technical alert (``probe_off``, ``poor_signal``, ``device_offline``) says why.
  An SpO2 or pulse of 0 is a pulse oximeter's "no signal" reading, not a measurement: it counts
  as the probe off (``probe_off`` after its delay, no physiological alarm) and NEWS2 lists the
  parameter as missing.

The delay is measured on arrival times: a condition first seen at ``t0`` is raised by the first
reading or tick at ``t >= t0 + delay``. At 1 Hz and a 15 s delay, 15 violating readings
(``t0`` .. ``t0 + 14``) followed by a good one raise nothing; a 16th at ``t0 + 15`` raises.

Apnoea (:data:`CESSATIONS`): a respiration rate of 0 (no breath detected) for
:attr:`AlertConfig.apnoea_delay_s` (20 s) raises ``apnoea`` at high priority, besides the medium
``rr_low`` of the limit table.

Lifecycle (IEC 60601-1-8:2006+A1:2012: latching and non-latching alarm signals, the
"acknowledged" alarm signal inactivation state): ``active`` -> ``acknowledged`` -> ``resolved``.
High-priority physiological alerts latch: when their condition ends they stay ``active``
(``latched``) until acknowledged, and that acknowledgement resolves them. Medium and low alerts,
technical alerts and NEWS2 alerts do not latch: the end of the condition resolves them,
acknowledged or not. An acknowledged alert whose condition gets worse (higher priority) becomes
``active`` again: the acknowledgement was for the lesser condition. Unacknowledged active alerts
escalate every :meth:`AlertConfig.escalation_s` of their priority (60 s high, 180 s medium, low
never).

NEWS2 (Royal College of Physicians 2017, chart 1; see :mod:`vitalwire.core.news2`) is recomputed
on every call from the latest vitals. A change of band (of the band an incomplete score reaches,
too) or of the missing parameters is a :class:`News2Change`. The band the score reaches
(:attr:`News2.reached`, a lower bound when parameters are missing: a partial score past a
threshold is past it) drives the alerts: low-medium and medium raise ``news2_medium`` (medium
priority), high ``news2_high`` (high priority), each once the band has held for
:attr:`AlertConfig.news2_delay_s`; a band dropping resolves them after the clear time.
``news2_high`` supersedes (resolves) ``news2_medium``.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, replace
from functools import partial
from typing import Any, Final

import msgspec

from vitalwire.core.errors import Conflict, InvalidMessage, NotFound
from vitalwire.core.limits import DEFAULT_LIMITS, Limits, MetricLimits
from vitalwire.core.metrics import METRIC_BY_NAME, VITAL_NAMES
from vitalwire.core.news2 import (
    INCOMPLETE,
    NO_SIGNAL_ZERO,
    News2,
    check_observations,
    metric_points,
    score,
)

# -- priorities, categories, states ------------------------------------------------------------

HIGH: Final = "high"
MEDIUM: Final = "medium"
LOW: Final = "low"
#: IEC 60601-1-8 priorities, highest first.
PRIORITIES: tuple[str, ...] = (HIGH, MEDIUM, LOW)
_RANK: Final = {LOW: 0, MEDIUM: 1, HIGH: 2}

PHYSIOLOGICAL: Final = "physiological"
TECHNICAL: Final = "technical"

ACTIVE: Final = "active"
ACKNOWLEDGED: Final = "acknowledged"
RESOLVED: Final = "resolved"
STATES: tuple[str, ...] = (ACTIVE, ACKNOWLEDGED, RESOLVED)

# -- lifecycle events and the transition table -------------------------------------------------

#: A user acknowledges an alert whose condition is still present.
ACKNOWLEDGE: Final = "acknowledge"
#: A user acknowledges a latched alert (its condition has already ended).
ACKNOWLEDGE_ENDED: Final = "acknowledge_ended"
#: The condition ended (non-latching alert, or an acknowledged one).
CONDITION_ENDED: Final = "condition_ended"
#: The condition of a latching (high-priority physiological) active alert ended: it latches.
CONDITION_ENDED_LATCHING: Final = "condition_ended_latching"
#: The condition of a latched alert is present again.
CONDITION_RETURNED: Final = "condition_returned"
#: The alert stayed unacknowledged for another escalation interval.
ESCALATE: Final = "escalate"
#: The condition got worse: the alert's priority rises.
RAISE_PRIORITY: Final = "raise_priority"
EVENTS: tuple[str, ...] = (
    ACKNOWLEDGE,
    ACKNOWLEDGE_ENDED,
    CONDITION_ENDED,
    CONDITION_ENDED_LATCHING,
    CONDITION_RETURNED,
    ESCALATE,
    RAISE_PRIORITY,
)

#: (state, event) -> new state. Any pair not listed is illegal (:func:`transition` raises).
TRANSITIONS: Mapping[tuple[str, str], str] = {
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


class IllegalTransition(Conflict):
    """An alert lifecycle event that is not allowed in the alert's current state."""


def transition(state: str, event: str) -> str:
    """Apply one lifecycle event to an alert state, per :data:`TRANSITIONS`.

    Raises:
        IllegalTransition: (a :class:`~vitalwire.core.errors.Conflict`) the move is not in the
            table, e.g. acknowledging an alert that is already acknowledged or resolved.
    """
    try:
        return TRANSITIONS[(state, event)]
    except KeyError:
        raise IllegalTransition(
            f"an alert that is {state} cannot {event.replace('_', ' ')}"
        ) from None


def _checked(alert_id: str, state: str, event: str) -> str:
    try:
        return transition(state, event)
    except IllegalTransition:
        raise IllegalTransition(
            f"alert {alert_id!r:.100} is already {state}", field="alert_id"
        ) from None


# -- conditions --------------------------------------------------------------------------------

DEVICE_OFFLINE: Final = "device_offline"
PROBE_OFF: Final = "probe_off"
POOR_SIGNAL: Final = "poor_signal"
LOW_BATTERY: Final = "low_battery"
NEWS2_MEDIUM: Final = "news2_medium"
NEWS2_HIGH: Final = "news2_high"
APNOEA: Final = "apnoea"
#: Two live units authenticated as one device (a cloned device, a replaced unit still running
#: with the old credentials): the readings in the patient's stream may not all be this
#: patient's. IEC 60601-1-8:2006+A1:2012 calls an alarm condition arising from an
#: equipment-related variable a *technical alarm condition* and leaves its priority to the risk
#: analysis (6.1.2, table 1): medium, as ``device_offline``, since in both the patient's data
#: cannot be relied on and the harm is reversible if someone checks the device promptly.
DEVICE_IDENTITY_CONFLICT: Final = "device_identity_conflict"
#: Every reading of a device has been late (:class:`Timeliness`) for
#: :attr:`AlertConfig.late_only_delay_s`: its clock is behind, or it replays history and sends
#: nothing current, so none of its values is alarmed. Medium, as ``device_offline``: the
#: patient is no more monitored for alarms than if the device were gone.
DEVICE_CLOCK_BEHIND: Final = "device_clock_behind"
#: Technical conditions (one alert per device).
TECHNICAL_CONDITIONS: tuple[str, ...] = (
    DEVICE_OFFLINE,
    PROBE_OFF,
    POOR_SIGNAL,
    LOW_BATTERY,
    DEVICE_IDENTITY_CONFLICT,
    DEVICE_CLOCK_BEHIND,
)
#: Physiological conditions that never latch: NEWS2 is an aggregate whose band changes are
#: themselves events, and the vitals behind it have their own (latching) alerts.
NON_LATCHING: frozenset[str] = frozenset({NEWS2_MEDIUM, NEWS2_HIGH})
#: Metrics measured by the pulse oximeter: not trusted while its probe is off or perfusion poor.
SIGNAL_METRICS: frozenset[str] = frozenset({"spo2", "pulse"})
#: Device statuses :meth:`PatientAlerts.on_device_status` accepts.
DEVICE_STATUSES: tuple[str, ...] = ("online", "offline", "unbound")


@dataclass(frozen=True, slots=True)
class Cessation:
    """An alarm on a vital sign that has stopped: ``metric`` at or below ``at_most`` for the
    delay named by ``delay_setting`` (an :class:`AlertConfig` attribute) raises ``condition``
    at ``priority``; it ends when the value has been above ``at_most`` for ``clear_s``."""

    condition: str
    metric: str
    at_most: float
    priority: str
    delay_setting: str
    clear_s: float = 5.0


#: Cessation alarms. Apnoea: a respiration rate of 0 /min (no breath detected) for
#: ``apnoea_delay_s`` (20 s), high priority. 20 s is the American Academy of Pediatrics'
#: definition of apnoea ("cessation of breathing for 20 seconds or longer"; Am Fam Physician
#: 2005;71(12):2301, table 1) and the default apnoea delay of bedside monitors (GE CARESCAPE
#: modular monitors, impedance respiration: default 20 s, 3-30 s; Philips Efficia CM: 20-60 s),
#: which sound it as a high-priority alarm (Edan M8 manual: "a high priority red alarm"). Like a
#: limit alarm, it is held while the device is offline.
CESSATIONS: tuple[Cessation, ...] = (Cessation(APNOEA, "rr", 0.0, HIGH, "apnoea_delay_s"),)
_CESSATIONS_BY_METRIC: Final = {
    metric: tuple(c for c in CESSATIONS if c.metric == metric)
    for metric in {c.metric for c in CESSATIONS}
}
#: Largest apnoea delay (s): monitors offer 10-60 s; longer hides a respiratory arrest.
MAX_APNOEA_DELAY_S = 60.0

# -- the time of a reading -------------------------------------------------------------------

CURRENT: Final = "current"
LATE: Final = "late"
FUTURE: Final = "future"


@dataclass(frozen=True, slots=True)
class Timeliness:
    """Which readings alarms treat as the patient's present state, by device time ``ts``.

    IEC 60601-1-8 defines the alarm condition delay, latching and escalation on the *current*
    value of a monitored variable: an alarm says "act now". A reading stamped more than
    ``late_s`` before the server's clock (a spool replayed after an outage, a device's stored
    history) describes the past: it is stored and shown in the trend, marked ``late``, but feeds
    no alarm and no NEWS2 (RCP NEWS2 2017 scores the latest observations, and a value from an
    hour ago replayed now would stand in for the present one). ``late_s`` is 60 s by default:
    longer than the default alarm condition delays (10-20 s), so a reading that late could only
    start a delay that should have run out already. A reading stamped more than ``ahead_s``
    after the server's clock cannot have been measured yet: it is refused (``invalid_reading``
    naming the bound), never alarmed as current; 5 s covers network delay and the drift of an
    NTP-synchronised clock.
    """

    late_s: float = 60.0
    ahead_s: float = 5.0

    def __post_init__(self) -> None:
        if not self.late_s > 0 or not self.ahead_s >= 0:
            raise ValueError(
                f"late_s must be positive and ahead_s not negative, got {self.late_s!r}, "
                f"{self.ahead_s!r}"
            )

    def of(self, ts: float, now: float) -> str:
        """:data:`CURRENT`, :data:`LATE` or :data:`FUTURE` for a reading stamped ``ts``."""
        if ts > now + self.ahead_s:
            return FUTURE
        return LATE if ts < now - self.late_s else CURRENT


@dataclass(frozen=True, slots=True)
class AlertConfig:
    """Engine settings other than the per-metric limits (:mod:`vitalwire.core.limits`).

    Attributes:
        escalation_high_s / escalation_medium_s / escalation_low_s: an unacknowledged active
            alert of that priority escalates every this many seconds (``None``: never).
        probe_off_delay_s: how long the probe must be off before ``probe_off`` is raised.
        poor_signal_delay_s: how long perfusion must be poor before ``poor_signal`` is raised.
        technical_clear_s: how long the signal must be good again before those two end.
        perfusion_min_pct: perfusion index (%) below which SpO2 and pulse are not trusted. SpO2
            error grows as PI falls and becomes clinically significant below 0.6 % (J Emerg
            Crit Care Med, "Predictive value of perfusion index (PI) on the discrepancy between
            oxygen saturation measurement via pulse oximetry and blood gas analysis"), while
            manufacturers specify accuracy down to 0.02-0.1 %; 0.3 % sits between the two, so
            ordinary low-perfusion ICU patients keep their SpO2 alarms.
        battery_low_pct / battery_critical_pct: ``low_battery`` low priority below the first,
            medium below the second; it ends at ``battery_low_pct + battery_deadband_pct``.
        news2_max_age_s: a vital older than this does not count in NEWS2 (1 h: RCP 2017 asks
            for at least hourly observations at a medium score, and NIBP cycles of 15-60 min
            must not drop blood pressure out of the score between measurements).
        news2_delay_s: how long a NEWS2 band must hold before its alert is raised. NEWS2 was
            designed for intermittent observations; from 1 Hz numerics a band flickers with
            every artefact, so the alert needs a minute of it (the band change event is
            published at once).
        news2_clear_s: how long the band must be lower before a NEWS2 alert ends.
        apnoea_delay_s: how long the respiration rate must be 0 before ``apnoea`` is raised
            (20 s: see :data:`CESSATIONS`; at most :data:`MAX_APNOEA_DELAY_S`).
        late_only_delay_s: how long a device may send only late readings before
            ``device_clock_behind`` is raised (a spool replayed after an outage takes seconds
            and is followed by current readings; a clock that is behind never is).
        resolved_memory: how many resolved alert ids are remembered, so that acknowledging one
            is a Conflict rather than NotFound.
    """

    escalation_high_s: float | None = 60.0
    escalation_medium_s: float | None = 180.0
    escalation_low_s: float | None = None
    probe_off_delay_s: float = 10.0
    poor_signal_delay_s: float = 10.0
    technical_clear_s: float = 5.0
    perfusion_min_pct: float = 0.3
    battery_low_pct: float = 20.0
    battery_critical_pct: float = 10.0
    battery_deadband_pct: float = 2.0
    news2_max_age_s: float = 3600.0
    news2_delay_s: float = 60.0
    news2_clear_s: float = 5.0
    apnoea_delay_s: float = 20.0
    late_only_delay_s: float = 60.0
    resolved_memory: int = 1000

    def __post_init__(self) -> None:
        for name in ("escalation_high_s", "escalation_medium_s", "escalation_low_s"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise ValueError(f"{name} must be positive or None, got {value!r}")
        if not 0 < self.battery_critical_pct < self.battery_low_pct:
            raise ValueError("battery_critical_pct must be positive and below battery_low_pct")
        if not 0 < self.apnoea_delay_s <= MAX_APNOEA_DELAY_S:
            raise ValueError(
                f"apnoea_delay_s must be above 0 and at most {MAX_APNOEA_DELAY_S:g} s, "
                f"got {self.apnoea_delay_s!r}"
            )

    def escalation_s(self, priority: str) -> float | None:
        """The escalation interval of a priority, ``None`` when it never escalates."""
        return {
            HIGH: self.escalation_high_s,
            MEDIUM: self.escalation_medium_s,
            LOW: self.escalation_low_s,
        }[priority]


# -- alerts and changes ------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Alert:
    """One alert of one patient, as it stands.

    ``latched`` is True for an active high-priority physiological alert whose condition has
    ended: it stays until acknowledged. ``metric``, ``value`` and ``limit`` are those of the
    raise (or of the last priority rise); ``device`` is set for technical alerts.
    """

    alert_id: str
    patient_id: str
    condition: str
    priority: str
    category: str
    state: str
    raised_at: float
    updated_at: float
    metric: str | None = None
    value: float | None = None
    limit: float | None = None
    device: str | None = None
    latched: bool = False
    acknowledged_by: str | None = None
    acknowledged_at: float | None = None
    escalation_level: int = 0
    resolved_at: float | None = None
    message: str = ""

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return {
            "alert_id": self.alert_id,
            "patient_id": self.patient_id,
            "condition": self.condition,
            "priority": self.priority,
            "category": self.category,
            "state": self.state,
            "raised_at": self.raised_at,
            "updated_at": self.updated_at,
            "metric": self.metric,
            "value": self.value,
            "limit": self.limit,
            "device": self.device,
            "latched": self.latched,
            "acknowledged_by": self.acknowledged_by,
            "acknowledged_at": self.acknowledged_at,
            "escalation_level": self.escalation_level,
            "resolved_at": self.resolved_at,
            "message": self.message,
        }


@dataclass(frozen=True, slots=True)
class AlertChange:
    """Something happened to an alert; ``state`` and ``priority`` are those after the change.

    ``action`` is ``"raised"``, ``"acknowledged"``, ``"escalated"``, ``"resolved"`` or
    ``"priority_changed"``. ``by`` is who acknowledged (on ``acknowledged``, and on ``resolved``
    when acknowledging a latched alert resolved it). ``message`` is for humans, e.g.
    ``"SpO2 84 % below critical limit 85 %"``.
    """

    action: str
    alert_id: str
    patient_id: str
    condition: str
    priority: str
    category: str
    state: str
    metric: str | None
    value: float | None
    limit: float | None
    at: float
    by: str | None = None
    escalation_level: int = 0
    message: str = ""
    device: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return {
            "action": self.action,
            "alert_id": self.alert_id,
            "patient_id": self.patient_id,
            "condition": self.condition,
            "priority": self.priority,
            "category": self.category,
            "state": self.state,
            "metric": self.metric,
            "value": self.value,
            "limit": self.limit,
            "at": self.at,
            "by": self.by,
            "escalation_level": self.escalation_level,
            "message": self.message,
            "device": self.device,
        }


@dataclass(frozen=True, slots=True)
class News2Change:
    """The patient's NEWS2 risk band (or the band an incomplete score reaches), or the set of its
    missing parameters, changed (``previous_band`` is None for the first score). ``band``,
    ``complete`` and ``display`` are those of :class:`~vitalwire.core.news2.News2`: ``band`` is
    ``"incomplete"`` (display ``"≥ 2, incomplete"``) when parameters are missing and the partial
    score is not high."""

    patient_id: str
    total: int
    band: str
    previous_band: str | None
    parameters: dict[str, int]
    missing: tuple[str, ...]
    scale: int
    at: float
    complete: bool
    display: str

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return {
            "patient_id": self.patient_id,
            "total": self.total,
            "band": self.band,
            "previous_band": self.previous_band,
            "parameters": dict(self.parameters),
            "missing": list(self.missing),
            "complete": self.complete,
            "display": self.display,
            "scale": self.scale,
            "at": self.at,
        }


Change = AlertChange | News2Change


# -- engine internals --------------------------------------------------------------------------

_Key = tuple[str, str]  # (condition, device or "")

_VITALS: Final = frozenset(VITAL_NAMES)


def _rows_by_metric(limits: Limits) -> dict[str, tuple[MetricLimits, ...]]:
    if limits is DEFAULT_LIMITS:  # shared by every engine on the defaults (nothing changes it)
        return _DEFAULT_ROWS
    return _group_rows(limits)


def _group_rows(limits: Limits) -> dict[str, tuple[MetricLimits, ...]]:
    rows: dict[str, list[MetricLimits]] = {}
    for row in limits:
        rows.setdefault(row.metric, []).append(row)
    return {metric: tuple(r) for metric, r in rows.items()}


_DEFAULT_ROWS: Final = _group_rows(DEFAULT_LIMITS)


def _battery_class(cfg: AlertConfig, battery: float) -> tuple[str | None, bool]:
    """What the battery condition uses of a level: the priority it calls for, and whether it is
    clear (see ``_evaluate_devices``)."""
    if battery < cfg.battery_critical_pct:
        demand: str | None = MEDIUM
    elif battery < cfg.battery_low_pct:
        demand = LOW
    else:
        demand = None
    return demand, battery >= cfg.battery_low_pct + cfg.battery_deadband_pct


# An engine's per-condition, per-vital and per-device state lives as long as the patient and is
# updated in place. Those objects hold numbers and strings only, so they can never be part of a
# reference cycle, and they are kept out of the garbage collector (msgspec's ``gc=False``: the
# object, and a dict holding only such objects, is not tracked). Tracked, a hospital's 10,000
# engines were about 80,000 of the 125,000 objects that the collector's first middle-generation
# collection under load scanned, for 70-150 ms (docs/benchmarks-history.md).
class _Track(msgspec.Struct, gc=False):
    pending_since: float | None = None
    clear_since: float | None = None


class _Vital(msgspec.Struct, gc=False):
    value: float
    at: float
    device: str


class _Value(msgspec.Struct, gc=False):
    """One NEWS2 input: unpacks as ``(value, at)``, as :func:`~vitalwire.core.news2.score`
    takes it."""

    value: float
    at: float

    def __iter__(self) -> Iterator[float]:
        yield self.value
        yield self.at


def _store(news2_vitals: dict[str, _Value], name: str, value: float, now: float) -> None:
    stored = news2_vitals.get(name)
    if stored is None:
        news2_vitals[name] = _Value(value, now)
    else:  # in place: no new object per reading for the collector to scan
        stored.value, stored.at = value, now


def _no_signal(values: Mapping[str, float | bool]) -> bool:
    """Whether a reading carries a pulse oximeter's "no signal" 0 (SpO2 or pulse)."""
    for name in NO_SIGNAL_ZERO:
        value = values.get(name)
        if value is not None and not isinstance(value, bool) and value == 0:
            return True
    return False


class _Device(msgspec.Struct, gc=False):
    online: bool = True
    probe: bool | None = None
    pi: float | None = None
    battery: float | None = None
    #: a second unit with this identity was seen: ``device_identity_conflict`` until then
    conflict_until: float = -math.inf
    #: since when every reading of the device has been late (None: its last one was current)
    late_since: float | None = None


@dataclass(frozen=True, slots=True)
class _Info:
    category: str
    metric: str | None = None
    value: float | None = None
    limit: float | None = None
    device: str | None = None
    message: str = ""


_UNITS: Final = {"%": " %", "/min": " /min", "Cel": " °C", "mm[Hg]": " mmHg"}


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else f"{x:g}"


def _qty(metric: str, value: float) -> str:
    return _num(value) + _UNITS.get(METRIC_BY_NAME[metric].unit, "")


def _limit_message(metric: str, direction: str, priority: str, value: float, limit: float) -> str:
    side = "below" if direction == "low" else "above"
    kind = "critical limit" if priority == HIGH else "limit"
    label = METRIC_BY_NAME[metric].label
    return f"{label} {_qty(metric, value)} {side} {kind} {_qty(metric, limit)}"


_VITAL_KEYS: dict[tuple[str, str], tuple[str, str]] = {}


def _vital_key(metric: str, direction: str) -> tuple[str, str]:
    key = _VITAL_KEYS.get((metric, direction))
    if key is None:
        key = _VITAL_KEYS[(metric, direction)] = (f"{metric}_{direction}", "")
    return key


def _vital_info(
    row: MetricLimits, direction: str, value: float, demand: str | None, limit: float | None
) -> _Info:
    """What an alert on a vital sign says (made only when an alert changes)."""
    message = ""
    if demand is not None and limit is not None:
        message = _limit_message(row.metric, direction, demand, value, limit)
    else:
        limit = row.limit(direction)
        if limit is not None:
            label = METRIC_BY_NAME[row.metric].label
            message = f"{label} back to {_qty(row.metric, value)} (limit {_qty(row.metric, limit)})"
    return _Info(PHYSIOLOGICAL, row.metric, value, limit, None, message)


def _offline_info(device: str, online: bool) -> _Info:
    text = f"Device {device} back online" if online else f"Device {device} offline"
    return _Info(TECHNICAL, device=device, message=text)


def _conflict_info(device: str, conflict: bool) -> _Info:
    text = (
        f"Device {device} identity in use twice: another unit connects with its credentials; "
        "readings may not be this patient's"
        if conflict
        else f"Device {device} identity no longer in use twice"
    )
    return _Info(TECHNICAL, device=device, message=text)


def _clock_info(device: str, late: bool, delay_s: float) -> _Info:
    text = (
        f"Device {device} sent only late readings for {_num(delay_s)} s (clock behind?): "
        "its values raise no alarm"
        if late
        else f"Device {device} sends current readings again"
    )
    return _Info(TECHNICAL, device=device, message=text)


def _probe_info(device: str, probe_off: bool) -> _Info:
    text = (
        f"SpO2 probe off or no signal on device {device}: SpO2 and pulse alarms suspended"
        if probe_off
        else f"SpO2 signal back on device {device}"
    )
    return _Info(TECHNICAL, device=device, message=text)


def _perfusion_info(device: str, poor: bool, pi: float | None, floor: float) -> _Info:
    text = (
        f"Perfusion index {_num(pi or 0)} % below {_num(floor)} "
        f"% on device {device}: SpO2 and pulse alarms suspended"
        if poor
        else f"Perfusion back on device {device}"
    )
    return _Info(TECHNICAL, "pi", pi, floor, device, text)


def _battery_info(device: str, battery: float | None, limit: float | None) -> _Info:
    text = (
        f"Battery {_num(battery)} % below {_num(limit)} % on device {device}"
        if battery is not None and limit is not None
        else f"Battery of device {device} charged"
    )
    return _Info(TECHNICAL, "battery", battery, limit, device, text)


def _news2_info(news: News2) -> _Info:
    """What a NEWS2 alert says: the score as displayed (``"≥ 5, incomplete"`` with the band the
    partial score reaches), the points and the missing parameters."""
    scored = ", ".join(f"{name} {pts}" for name, pts in news.points.items() if pts)
    text = f"NEWS2 {news.display}"
    if news.band == INCOMPLETE:
        text += f" (at least {news.reached.replace('_', '-')} risk)"
    elif news.complete:
        text += " risk"
    if scored:
        text += f": {scored}"
    if news.missing:
        text += f"; missing {', '.join(news.missing)}"
    return _Info(PHYSIOLOGICAL, "news2", float(news.total), None, None, text)


def _cessation_info(cessation: Cessation, value: float, delay_s: float, ended: bool) -> _Info:
    name = cessation.condition.capitalize()
    label = METRIC_BY_NAME[cessation.metric].label.lower()
    qty = _qty(cessation.metric, value)
    text = f"{name} over: {label} {qty}" if ended else f"{name}: {label} {qty} for {delay_s:g} s"
    return _Info(PHYSIOLOGICAL, cessation.metric, value, cessation.at_most, None, text)


class PatientAlerts:
    """The alert engine of one patient (see the module docstring for how it works).

    Args:
        patient_id: the patient; part of every alert id.
        limits: the patient's :class:`~vitalwire.core.limits.Limits` (default adult limits).
        config: :class:`AlertConfig` (defaults).

    Every method that takes ``now`` (seconds, the server clock) re-evaluates all conditions and
    returns the resulting changes. ``now`` should not go backwards.
    """

    def __init__(
        self, patient_id: str, limits: Limits | None = None, config: AlertConfig | None = None
    ) -> None:
        self.patient_id = patient_id
        self._limits = limits if limits is not None else DEFAULT_LIMITS
        self._rows = _rows_by_metric(self._limits)
        self._config = config if config is not None else AlertConfig()
        #: evaluate in full on every input (no shortcut): what the shortcut is tested against
        self.always_full = False
        self._vitals: dict[str, _Vital] = {}
        #: NEWS2's inputs: name -> (value, time), updated in place (no object per reading)
        self._news2_vitals: dict[str, _Value] = {}
        self._devices: dict[str, _Device] = {}
        self._tracks: dict[_Key, _Track] = {}
        self._open: dict[_Key, Alert] = {}
        self._keys: dict[str, _Key] = {}
        self._next_escalation: dict[str, float] = {}
        #: inputs changed since the last evaluation (limits replaced, an alert restored)
        self._dirty = True
        #: the earliest time at which a tick with no new input can change anything
        self._next_due = -math.inf
        self._resolved: OrderedDict[str, Alert] = OrderedDict()
        self._on_oxygen: bool | None = None
        self._consciousness: str | None = None
        self._scale = 1
        self._news2: News2 | None = None

    # -- inputs --------------------------------------------------------------------------------

    @property
    def limits(self) -> Limits:
        """The patient's current limits."""
        return self._limits

    @property
    def config(self) -> AlertConfig:
        """The engine settings."""
        return self._config

    def on_reading(
        self, now: float, device: str, values: Mapping[str, float | bool]
    ) -> list[Change]:
        """Take one reading from ``device`` (values already checked by :mod:`core.metrics`).

        Args:
            now: server time of arrival; all timers run on it, not on the device timestamp.
            device: the device id.
            values: metric -> value; may include ``probe`` (bool: False means probe off / no
                signal), ``pi`` (perfusion index, %) and ``battery`` (%). A reading with
                ``spo2`` and no ``probe`` means the probe is on. Missing metrics keep their last
                value (devices may report by exception). SpO2 and pulse that arrive while the
                probe is off or perfusion is below :attr:`AlertConfig.perfusion_min_pct` are
                ignored. An SpO2 or pulse of 0 is the oximeter's "no signal": the probe counts
                as off (whatever ``probe`` says), no alarm is evaluated on it, and NEWS2 lists
                the parameter as missing until a real value arrives.

        Returns:
            The alert and NEWS2 changes, in order.
        """
        dev = self._devices.get(device)
        if (
            dev is not None
            and not self.always_full
            and self._same_outcome(now, device, dev, values)
        ):
            return []
        dev = self._devices.setdefault(device, _Device())
        dev.online = True
        dev.late_since = None
        probe = values.get("probe")
        if _no_signal(values):
            dev.probe = False  # the oximeter's 0: no signal, whatever ``probe`` says
        elif isinstance(probe, bool):
            dev.probe = probe
        elif "spo2" in values:
            dev.probe = True
        if "pi" in values:
            dev.pi = float(values["pi"])
        if "battery" in values:
            dev.battery = float(values["battery"])
        suppressed = self._suppressed(dev)
        news2_vitals = self._news2_vitals
        for name in VITAL_NAMES:
            value = values.get(name)
            if value is None or isinstance(value, bool):
                continue
            if name in SIGNAL_METRICS and suppressed:
                if value == 0 and name in NO_SIGNAL_ZERO:  # NEWS2: missing while it lasts
                    _store(news2_vitals, name, 0.0, now)
                continue
            vital = self._vitals.get(name)
            if vital is None:
                self._vitals[name] = _Vital(float(value), now, device)
            else:  # in place: no new object per reading for the collector to scan
                vital.value, vital.at, vital.device = float(value), now, device
            _store(news2_vitals, name, float(value), now)
        return self._step(now)

    def on_device_status(self, now: float, device: str, status: str) -> list[Change]:
        """A device went ``"online"``, ``"offline"`` or was ``"unbound"`` from the patient.

        Offline raises ``device_offline`` at once (the service has already waited: for silence,
        or ``offline_grace_s`` after a closed connection, before calling a device offline) and
        suspends the evaluation of the values it sent; online resolves it. Unbound resolves the
        device's technical alerts and forgets it.

        Raises:
            InvalidMessage: an unknown status (field ``status``).
        """
        if status not in DEVICE_STATUSES:
            raise InvalidMessage(
                f"status must be one of {', '.join(DEVICE_STATUSES)}, got {status!r:.40}",
                field="status",
            )
        changes: list[Change] = []
        if status == "unbound":
            for condition in TECHNICAL_CONDITIONS:
                key = (condition, device)
                alert = self._open.get(key)
                if alert is not None:
                    changes.append(
                        self._resolve(now, key, alert, CONDITION_ENDED, None, "device unbound")
                    )
                self._tracks.pop(key, None)
            self._devices.pop(device, None)
            for name in [n for n, v in self._vitals.items() if v.device == device]:
                del self._vitals[name]
        else:
            self._devices.setdefault(device, _Device()).online = status == "online"
        return changes + self._step(now)

    def on_late_reading(self, now: float, device: str) -> list[Change]:
        """``device`` sent a late reading (:class:`Timeliness`): its values are history and are
        not taken; only ``device_clock_behind`` is driven, should nothing current follow for
        :attr:`AlertConfig.late_only_delay_s`. Cheap once the device is known to be late."""
        dev = self._devices.setdefault(device, _Device())
        if dev.late_since is not None:
            return []
        dev.late_since = now
        return self._step(now)

    def on_identity_conflict(self, now: float, device: str, until: float) -> list[Change]:
        """Two live units use ``device``'s identity: ``device_identity_conflict`` (technical,
        medium) is raised at once and stays until ``until`` (a later call extends it)."""
        dev = self._devices.setdefault(device, _Device())
        dev.conflict_until = max(dev.conflict_until, until)
        return self._step(now)

    def tick(self, now: float) -> list[Change]:
        """Let time pass: delays expire, clear timers end conditions, alerts escalate.

        Cheap when nothing is due: with no delay or clear timer running, no escalation due and
        no NEWS2 value about to go stale, an evaluation could change nothing, so none is made.
        """
        if not self._dirty and now < self._next_due:
            return []
        return self._step(now)

    def acknowledge(self, alert_id: str, by: str, now: float) -> list[Change]:
        """Acknowledge an alert, recording who and when.

        An alert whose condition is present becomes ``acknowledged`` (it resolves when the
        condition ends); a latched alert (condition already ended) is resolved by it.

        Raises:
            InvalidMessage: ``by`` is empty (field ``by``).
            NotFound: no such alert (field ``alert_id``).
            IllegalTransition: (a Conflict) the alert is already acknowledged or resolved.
        """
        if not isinstance(by, str) or not by:
            raise InvalidMessage("by must name who acknowledges", field="by")
        key = self._keys.get(alert_id)
        if key is None:
            old = self._resolved.get(alert_id)
            if old is None:
                raise NotFound(f"no alert {alert_id!r:.100} for this patient", field="alert_id")
            _checked(alert_id, old.state, ACKNOWLEDGE)
            raise AssertionError("unreachable: a resolved alert cannot be acknowledged")
        alert = self._open[key]
        if alert.latched:
            _checked(alert_id, alert.state, ACKNOWLEDGE_ENDED)
            message = f"acknowledged by {by} after the condition ended"
            change = self._resolve(now, key, alert, ACKNOWLEDGE_ENDED, None, message, by=by)
            return [change, *self._step(now)]
        state = _checked(alert_id, alert.state, ACKNOWLEDGE)
        alert = replace(alert, state=state, acknowledged_by=by, acknowledged_at=now, updated_at=now)
        self._open[key] = alert
        self._next_escalation.pop(alert_id, None)
        change = self._change("acknowledged", alert, now, by=by, message=f"acknowledged by {by}")
        return [change, *self._step(now)]

    def set_observations(
        self,
        now: float,
        *,
        on_oxygen: bool | None = None,
        consciousness: str | None = None,
        scale: int | None = None,
    ) -> list[Change]:
        """Set NEWS2 observations of the patient; ``None`` leaves a value unchanged.

        Args:
            on_oxygen: on supplemental oxygen (True) or air (False).
            consciousness: ``"alert"``, ``"confusion"``, ``"voice"``, ``"pain"`` or
                ``"unresponsive"`` (ACVPU, RCP NEWS2 2017 chart 1).
            scale: SpO2 scale 1 or 2 (scale 2 only for prescribed target 88-92 %).

        Raises:
            InvalidMessage: an invalid value, naming its field.
        """
        check_observations(on_oxygen=on_oxygen, consciousness=consciousness, scale=scale)
        if on_oxygen is not None:
            self._on_oxygen = on_oxygen
        if consciousness is not None:
            self._consciousness = consciousness
        if scale is not None:
            self._scale = scale
        return self._step(now)

    def set_limits(self, limits: Limits | Mapping[str, object]) -> None:
        """Replace the patient's limits (a :class:`Limits`, or its plain-dict form, validated).

        Running timers are kept; the next call evaluates against the new limits.

        Raises:
            InvalidMessage: a plain dict with an invalid value, naming the field.
        """
        self._limits = limits if isinstance(limits, Limits) else Limits.from_dict(limits)
        self._rows = _rows_by_metric(self._limits)
        self._dirty = True

    def restore(self, change: Mapping[str, Any]) -> None:
        """Put back an open alert after a restart, from its last :meth:`AlertChange.to_dict`.

        The alert keeps its id, priority, state, escalation level and acknowledgement; its
        condition is taken as present and re-evaluated from the next values (a latched alert
        latches again when its value is found clear). ``raised_at`` comes from the alert id.
        Escalation resumes one interval after the change's ``at``. A resolved change, or one of
        another patient, is ignored.

        Raises:
            InvalidMessage: the dict is not an alert change of this engine's form.
        """
        try:
            alert_id = str(change["alert_id"])
            condition = str(change["condition"])
            state = str(change["state"])
            at = float(change["at"])
            priority = str(change["priority"])
            raised_ms = int(alert_id.rsplit(":", 1)[1].split("-")[0])
            if priority not in _RANK or state not in STATES:
                raise ValueError(priority if priority not in _RANK else state)
        except (KeyError, TypeError, ValueError, IndexError) as exc:
            raise InvalidMessage(f"not an alert change: {exc}", field="alert") from None
        if state == RESOLVED or change.get("patient_id") != self.patient_id:
            return
        device = change.get("device")
        key: _Key = (condition, str(device) if device is not None else "")
        acked = state == ACKNOWLEDGED
        alert = Alert(
            alert_id=alert_id,
            patient_id=self.patient_id,
            condition=condition,
            priority=priority,
            category=str(change.get("category", PHYSIOLOGICAL)),
            state=state,
            raised_at=raised_ms / 1000,
            updated_at=at,
            metric=change.get("metric"),
            value=change.get("value"),
            limit=change.get("limit"),
            device=key[1] or None,
            acknowledged_by=change.get("by") if acked else None,
            acknowledged_at=at if acked else None,
            escalation_level=int(change.get("escalation_level", 0)),
            message=str(change.get("message", "")),
        )
        old = self._open.get(key)
        if old is not None:
            del self._keys[old.alert_id]
            self._next_escalation.pop(old.alert_id, None)
        self._open[key] = alert
        self._keys[alert_id] = key
        interval = self._config.escalation_s(priority)
        if state == ACTIVE and interval is not None:
            self._next_escalation[alert_id] = at + interval
        self._dirty = True

    def discharge(self, now: float, by: str) -> list[Change]:
        """The patient was discharged: every open alert resolves at ``now``, latched or not.

        IEC 60601-1-8 defines an alarm condition as a state of the monitored patient or
        equipment; a patient discharged is no longer monitored here, so none of their conditions
        exists for this system any more. Left open, their alerts would keep escalating on the
        central station for nobody. What the engine held of the patient's values and devices is
        forgotten with them, so no tick raises them again; the service drops the engine too."""
        message = f"ended: patient discharged by {by}"
        changes: list[Change] = [
            self._resolve(now, key, alert, CONDITION_ENDED, None, message)
            for key, alert in list(self._open.items())
        ]
        self._vitals.clear()
        self._news2_vitals.clear()
        self._devices.clear()
        self._tracks.clear()
        self._news2 = None
        self._dirty = True
        return changes

    # -- outputs -------------------------------------------------------------------------------

    def active(self) -> list[Alert]:
        """All alerts not resolved, highest priority first, then oldest first."""
        return sorted(
            self._open.values(), key=lambda a: (-_RANK[a.priority], a.raised_at, a.alert_id)
        )

    def news2(self) -> News2 | None:
        """The latest NEWS2 score, ``None`` before the first vital sign."""
        return self._news2

    def snapshot(self) -> dict[str, Any]:
        """JSON-ready ``{"alerts": [...active, highest priority first], "news2": {...} | None}``."""
        return {
            "alerts": [alert.to_dict() for alert in self.active()],
            "news2": self._news2.to_dict() if self._news2 is not None else None,
        }

    # -- evaluation ----------------------------------------------------------------------------

    def _same_outcome(
        self, now: float, device: str, dev: _Device, values: Mapping[str, float | bool]
    ) -> bool:
        """Take a reading that cannot change any outcome without evaluating everything; False
        (nothing taken) when it might.

        A full evaluation (:meth:`_step`) depends on time only through running delay and clear
        timers, escalations and NEWS2 staleness, each of which puts ``_next_due`` at or before
        the time it starts to matter; and on the values only through each condition's
        classification: the priority a value calls for on each side, whether it is clear by the
        deadband, and its NEWS2 points. When nothing is due, the device is online, not
        suppressed and its probe state unchanged, and every value keeps its device and its
        classification and its freshness (RCP NEWS2: a stale value scores as missing), the full
        evaluation would return nothing and change no state but the stored values; those are
        updated here. ``_next_due`` stays as it was: a staleness due
        earlier than needed only brings the next full evaluation forward.
        (``tests/test_core_alerts_ticks.py`` checks this against ``always_full`` engines.)
        """
        if (
            self._dirty
            or now >= self._next_due
            or not dev.online
            or dev.probe is False
            or dev.late_since is not None
        ):
            return False
        if _no_signal(values):
            return False  # the probe state changes: the full path handles that
        probe = values.get("probe")
        if isinstance(probe, bool):
            if probe is not dev.probe:
                return False
        elif "spo2" in values and dev.probe is not True:
            return False
        cfg = self._config
        floor = cfg.perfusion_min_pct
        pi = values.get("pi")
        if dev.pi is not None and dev.pi < floor:
            return False  # suppressed: signal values are ignored, the full path handles that
        if pi is not None and (dev.pi is None or pi < floor):
            return False
        battery = values.get("battery")
        if battery is not None and (
            dev.battery is None or _battery_class(cfg, battery) != _battery_class(cfg, dev.battery)
        ):
            return False
        vitals = self._vitals
        news2_vitals = self._news2_vitals
        max_age = cfg.news2_max_age_s
        for name, value in values.items():
            if name not in _VITALS or isinstance(value, bool):
                continue
            vital = vitals.get(name)
            if vital is None or vital.device != device:
                return False
            stored = news2_vitals.get(name)
            if stored is None or now - stored.at > max_age:
                return False  # a stale value coming back changes NEWS2's missing parameters
            if value != vital.value and self._classify(name, vital.value) != self._classify(
                name, float(value)
            ):
                return False
        if pi is not None:
            dev.pi = float(pi)
        if battery is not None:
            dev.battery = float(battery)
        for name, value in values.items():
            if name not in _VITALS or isinstance(value, bool):
                continue
            vital = vitals[name]
            vital.value, vital.at = float(value), now
            stored = news2_vitals[name]  # present: checked above
            stored.value, stored.at = vital.value, now
        return True

    def _classify(self, name: str, value: float) -> tuple[object, ...]:
        """What the evaluation uses of one value: per limit row and side, the priority it calls
        for with its limit and whether it is clear; and its NEWS2 points."""
        out: list[object] = []
        for row in self._rows.get(name, ()):
            for direction in ("low", "high"):
                out.append(row.violation(value, direction))
                out.append(row.is_clear(value, direction))
        for cessation in _CESSATIONS_BY_METRIC.get(name, ()):
            out.append(value <= cessation.at_most)
        out.append(metric_points(name, value, scale=self._scale, on_oxygen=self._on_oxygen))
        return tuple(out)

    def _suppressed(self, dev: _Device) -> bool:
        if dev.probe is False:
            return True
        return dev.pi is not None and dev.pi < self._config.perfusion_min_pct

    def _usable(self, vital: _Vital) -> bool:
        dev = self._devices.get(vital.device)
        return dev is None or dev.online

    def _step(self, now: float) -> list[Change]:
        changes: list[Change] = []
        changes += self._evaluate_vitals(now)
        changes += self._evaluate_cessations(now)
        changes += self._evaluate_devices(now)
        changes += self._evaluate_news2(now)
        changes += self._escalate(now)
        self._dirty = False
        self._next_due = self._due_after(now)
        return changes

    def _due_after(self, now: float) -> float:
        """When a tick can next change something with no new input (``now``: every tick)."""
        for track in self._tracks.values():
            if track.pending_since is not None or track.clear_since is not None:
                return now  # a delay or clear timer runs
        due = min(self._next_escalation.values(), default=math.inf)
        for dev in self._devices.values():
            if now < dev.conflict_until < due:  # the identity conflict ends then
                due = dev.conflict_until
        max_age = self._config.news2_max_age_s
        for stored in self._news2_vitals.values():
            ts = stored.at
            if now <= ts + max_age < due:  # fresh until then (RCP NEWS2: stale values score 0)
                due = ts + max_age
        return due

    def _evaluate_vitals(self, now: float) -> list[Change]:
        changes: list[Change] = []
        for row in self._limits:
            vital = self._vitals.get(row.metric)
            usable = vital is not None and self._usable(vital)
            if usable and row.metric in SIGNAL_METRICS:
                assert vital is not None
                dev = self._devices.get(vital.device)
                usable = dev is None or not self._suppressed(dev)
            for direction in ("low", "high"):
                key = _vital_key(row.metric, direction)
                if vital is None or not usable:
                    self._hold(key)
                    continue
                demand, limit = row.violation(vital.value, direction)
                changes += self._drive(
                    now,
                    key,
                    demand=demand,
                    clear=row.is_clear(vital.value, direction),
                    delay_s=row.delay_s,
                    clear_s=row.clear_s,
                    immediate=demand == HIGH,
                    info=partial(_vital_info, row, direction, vital.value, demand, limit),
                )
        return changes

    def _evaluate_cessations(self, now: float) -> list[Change]:
        changes: list[Change] = []
        for cessation in CESSATIONS:
            key = (cessation.condition, "")
            vital = self._vitals.get(cessation.metric)
            if vital is None or not self._usable(vital):
                self._hold(key)
                continue
            stopped = vital.value <= cessation.at_most
            delay_s = float(getattr(self._config, cessation.delay_setting))
            changes += self._drive(
                now,
                key,
                demand=cessation.priority if stopped else None,
                clear=not stopped,
                delay_s=delay_s,
                clear_s=cessation.clear_s,
                immediate=False,
                info=partial(_cessation_info, cessation, vital.value, delay_s, not stopped),
            )
        return changes

    def _evaluate_devices(self, now: float) -> list[Change]:
        cfg = self._config
        changes: list[Change] = []
        for device in sorted(self._devices):
            dev = self._devices[device]
            changes += self._drive(
                now,
                (DEVICE_OFFLINE, device),
                demand=None if dev.online else MEDIUM,
                clear=dev.online,
                delay_s=0.0,
                clear_s=0.0,
                immediate=True,
                info=partial(_offline_info, device, dev.online),
            )
            conflict = now < dev.conflict_until
            changes += self._drive(
                now,
                (DEVICE_IDENTITY_CONFLICT, device),
                demand=MEDIUM if conflict else None,
                clear=not conflict,
                delay_s=0.0,
                clear_s=0.0,
                immediate=True,
                info=partial(_conflict_info, device, conflict),
            )
            late = dev.late_since is not None
            changes += self._drive(
                now,
                (DEVICE_CLOCK_BEHIND, device),
                demand=MEDIUM if late else None,
                clear=not late,
                delay_s=cfg.late_only_delay_s,
                clear_s=0.0,
                immediate=False,
                info=partial(_clock_info, device, late, cfg.late_only_delay_s),
            )
            if not dev.online:
                for condition in (PROBE_OFF, POOR_SIGNAL, LOW_BATTERY):
                    self._hold((condition, device))
                continue
            probe_off = dev.probe is False
            changes += self._drive(
                now,
                (PROBE_OFF, device),
                demand=MEDIUM if probe_off else None,
                clear=not probe_off,
                delay_s=cfg.probe_off_delay_s,
                clear_s=cfg.technical_clear_s,
                immediate=False,
                info=partial(_probe_info, device, probe_off),
            )
            poor = not probe_off and dev.pi is not None and dev.pi < cfg.perfusion_min_pct
            changes += self._drive(
                now,
                (POOR_SIGNAL, device),
                demand=MEDIUM if poor else None,
                clear=not poor,
                delay_s=cfg.poor_signal_delay_s,
                clear_s=cfg.technical_clear_s,
                immediate=False,
                info=partial(_perfusion_info, device, poor, dev.pi, cfg.perfusion_min_pct),
            )
            battery = dev.battery
            demand: str | None = None
            limit: float | None = None
            if battery is not None and battery < cfg.battery_critical_pct:
                demand, limit = MEDIUM, cfg.battery_critical_pct
            elif battery is not None and battery < cfg.battery_low_pct:
                demand, limit = LOW, cfg.battery_low_pct
            clear = battery is None or battery >= cfg.battery_low_pct + cfg.battery_deadband_pct
            changes += self._drive(
                now,
                (LOW_BATTERY, device),
                demand=demand,
                clear=clear,
                delay_s=0.0,
                clear_s=0.0,
                immediate=True,
                info=partial(_battery_info, device, battery, limit),
            )
        return changes

    def _evaluate_news2(self, now: float) -> list[Change]:
        if not self._news2_vitals:
            return []
        cfg = self._config
        news = score(
            self._news2_vitals,
            on_oxygen=self._on_oxygen,
            consciousness=self._consciousness,
            scale=self._scale,
            now=now,
            max_age_s=cfg.news2_max_age_s,
        )
        previous = self._news2
        if news == previous:
            news = previous  # unchanged: keep the object the collector has already seen
        self._news2 = news
        changes: list[Change] = []
        if (
            previous is None or previous.reached != news.reached or previous.missing != news.missing
        ):  # the band, the band an incomplete score reaches, or the missing parameters moved
            changes.append(
                News2Change(
                    patient_id=self.patient_id,
                    total=news.total,
                    band=news.band,
                    previous_band=previous.band if previous is not None else None,
                    parameters=dict(news.points),
                    missing=news.missing,
                    scale=news.scale,
                    at=now,
                    complete=news.complete,
                    display=news.display,
                )
            )
        info = partial(_news2_info, news)
        reached = news.reached  # a lower bound when parameters are missing: past it is past it
        high = reached == "high"
        changes += self._drive(
            now,
            (NEWS2_HIGH, ""),
            demand=HIGH if high else None,
            clear=not high,
            delay_s=cfg.news2_delay_s,
            clear_s=cfg.news2_clear_s,
            immediate=False,
            info=info,
        )
        high_open = (NEWS2_HIGH, "") in self._open
        medium_alert = self._open.get((NEWS2_MEDIUM, ""))
        if high_open and medium_alert is not None:
            changes.append(
                self._resolve(
                    now,
                    (NEWS2_MEDIUM, ""),
                    medium_alert,
                    CONDITION_ENDED,
                    float(news.total),
                    "superseded by news2_high",
                )
            )
        medium = reached in ("low_medium", "medium")
        changes += self._drive(
            now,
            (NEWS2_MEDIUM, ""),
            demand=MEDIUM if medium else None,
            clear=reached == "low",
            delay_s=cfg.news2_delay_s,
            clear_s=cfg.news2_clear_s,
            immediate=False,
            info=info,
            can_raise=not high_open,
        )
        return changes

    def _hold(self, key: _Key) -> None:
        """The condition cannot be evaluated now: its timers restart when it can."""
        track = self._tracks.get(key)
        if track is not None:
            track.pending_since = None
            track.clear_since = None

    def _drive(
        self,
        now: float,
        key: _Key,
        *,
        demand: str | None,
        clear: bool,
        delay_s: float,
        clear_s: float,
        immediate: bool,
        info: Callable[[], _Info],
        can_raise: bool = True,
    ) -> list[Change]:
        track = self._tracks.get(key)
        if track is None:
            track = self._tracks[key] = _Track()
        alert = self._open.get(key)
        if alert is None or alert.latched:
            track.clear_since = None
            if demand is None:
                track.pending_since = None
                return []
            if track.pending_since is None:
                track.pending_since = now
            if not immediate and now - track.pending_since < delay_s:
                return []
            if not can_raise:
                return []
            track.pending_since = None
            if alert is None:
                return [self._raise(now, key, demand, info())]
            alert = replace(alert, state=transition(alert.state, CONDITION_RETURNED), latched=False)
            self._open[key] = alert
            if _RANK[demand] > _RANK[alert.priority]:
                return [self._raise_priority(now, key, alert, demand, info())]
            return []
        track.pending_since = None
        changes: list[Change] = []
        if demand is not None and _RANK[demand] > _RANK[alert.priority]:
            changes.append(self._raise_priority(now, key, alert, demand, info()))
            alert = self._open[key]
        if not clear:
            track.clear_since = None
            return changes
        if track.clear_since is None:
            track.clear_since = now
        if now - track.clear_since < clear_s:
            return changes
        track.clear_since = None
        if alert.state == ACTIVE and self._latches(alert):
            state = transition(alert.state, CONDITION_ENDED_LATCHING)
            self._open[key] = replace(alert, state=state, latched=True, updated_at=now)
            return changes
        ended = info()
        changes.append(self._resolve(now, key, alert, CONDITION_ENDED, ended.value, ended.message))
        return changes

    def _latches(self, alert: Alert) -> bool:
        return (
            alert.category == PHYSIOLOGICAL
            and alert.priority == HIGH
            and alert.condition not in NON_LATCHING
        )

    def _raise(self, now: float, key: _Key, priority: str, info: _Info) -> AlertChange:
        condition = key[0]
        base = f"{self.patient_id}:{condition}:{math.floor(now * 1000)}"
        alert_id, n = base, 1
        while alert_id in self._keys or alert_id in self._resolved:
            n += 1
            alert_id = f"{base}-{n}"
        alert = Alert(
            alert_id=alert_id,
            patient_id=self.patient_id,
            condition=condition,
            priority=priority,
            category=info.category,
            state=ACTIVE,
            raised_at=now,
            updated_at=now,
            metric=info.metric,
            value=info.value,
            limit=info.limit,
            device=info.device,
            message=info.message,
        )
        self._open[key] = alert
        self._keys[alert_id] = key
        interval = self._config.escalation_s(priority)
        if interval is not None:
            self._next_escalation[alert_id] = now + interval
        return self._change("raised", alert, now)

    def _raise_priority(
        self, now: float, key: _Key, alert: Alert, priority: str, info: _Info
    ) -> AlertChange:
        state = transition(alert.state, RAISE_PRIORITY)
        alert = replace(
            alert,
            state=state,
            priority=priority,
            value=info.value,
            limit=info.limit,
            message=info.message,
            acknowledged_by=None,
            acknowledged_at=None,
            updated_at=now,
        )
        self._open[key] = alert
        interval = self._config.escalation_s(priority)
        if interval is not None:
            due = self._next_escalation.get(alert.alert_id, math.inf)
            self._next_escalation[alert.alert_id] = min(due, now + interval)
        return self._change("priority_changed", alert, now)

    def _resolve(
        self,
        now: float,
        key: _Key,
        alert: Alert,
        event: str,
        value: float | None,
        message: str,
        *,
        by: str | None = None,
    ) -> AlertChange:
        state = transition(alert.state, event)
        alert = replace(
            alert,
            state=state,
            resolved_at=now,
            updated_at=now,
            acknowledged_by=by if by is not None else alert.acknowledged_by,
            acknowledged_at=now if by is not None else alert.acknowledged_at,
        )
        del self._open[key]
        del self._keys[alert.alert_id]
        self._next_escalation.pop(alert.alert_id, None)
        self._resolved[alert.alert_id] = alert
        while len(self._resolved) > self._config.resolved_memory:
            self._resolved.popitem(last=False)
        return self._change("resolved", alert, now, by=by, value=value, message=message)

    def _escalate(self, now: float) -> list[Change]:
        changes: list[Change] = []
        for alert in self.active():
            due = self._next_escalation.get(alert.alert_id)
            interval = self._config.escalation_s(alert.priority)
            if due is None or interval is None or alert.state != ACTIVE:
                continue
            key = self._keys[alert.alert_id]
            while now >= due:
                state = transition(alert.state, ESCALATE)
                level = alert.escalation_level + 1
                alert = replace(alert, state=state, escalation_level=level, updated_at=now)
                self._open[key] = alert
                due += interval
                self._next_escalation[alert.alert_id] = due
                waited = _num(round(now - alert.raised_at))
                changes.append(
                    self._change(
                        "escalated",
                        alert,
                        now,
                        message=f"{alert.message}: unacknowledged for {waited} s "
                        f"(escalation level {level})",
                    )
                )
        return changes

    def _change(
        self,
        action: str,
        alert: Alert,
        now: float,
        *,
        by: str | None = None,
        value: float | None = None,
        message: str | None = None,
    ) -> AlertChange:
        return AlertChange(
            action=action,
            alert_id=alert.alert_id,
            patient_id=alert.patient_id,
            condition=alert.condition,
            priority=alert.priority,
            category=alert.category,
            state=alert.state,
            metric=alert.metric,
            value=value if value is not None else alert.value,
            limit=alert.limit,
            at=now,
            by=by,
            escalation_level=alert.escalation_level,
            message=message if message is not None else alert.message,
            device=alert.device,
        )
