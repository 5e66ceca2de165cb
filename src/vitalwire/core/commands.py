"""Two-way commands: the catalogue of commands with typed, bounded arguments, and the lifecycle.

How it works: a command is created ``queued``; delivered to the device it becomes ``sent``; the
device answers with ``command_result`` — ``acknowledged`` (working on it), then ``completed`` or
``failed``. A queued command whose time to live passes before delivery is ``expired``; a sent one
with no final answer within its timeout is ``timed_out``. After a server restart a command that
was sent but never answered is resolved honestly: re-queued if it is idempotent (sending it twice
does no harm), else ``timed_out`` — it is never shown as delivered when it was not. The lifecycle
is the literal table :data:`TRANSITIONS`, read by :func:`transition`, which refuses illegal moves.

``silence`` is bounded to 120 s: IEC 60601-1-8 allows an *audio paused* state only for a limited
time; a remote silence must never switch an alarm off for good.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Final

from vitalwire.core.errors import InvalidMessage

QUEUED: Final = "queued"
SENT: Final = "sent"
ACKNOWLEDGED: Final = "acknowledged"
COMPLETED: Final = "completed"
FAILED: Final = "failed"
EXPIRED: Final = "expired"
TIMED_OUT: Final = "timed_out"

TERMINAL: Final = frozenset({COMPLETED, FAILED, EXPIRED, TIMED_OUT})

# (state, event) -> next state. Events: deliver, expire, device_ack, device_done, device_fail,
# timeout, requeue (sent but unanswered across a restart, idempotent only).
TRANSITIONS: Final[dict[tuple[str, str], str]] = {
    (QUEUED, "deliver"): SENT,
    (QUEUED, "expire"): EXPIRED,
    (SENT, "device_ack"): ACKNOWLEDGED,
    (SENT, "device_done"): COMPLETED,
    (SENT, "device_fail"): FAILED,
    (SENT, "timeout"): TIMED_OUT,
    (SENT, "requeue"): QUEUED,
    (ACKNOWLEDGED, "device_done"): COMPLETED,
    (ACKNOWLEDGED, "device_fail"): FAILED,
    (ACKNOWLEDGED, "timeout"): TIMED_OUT,
}

EVENTS: Final = frozenset(e for _, e in TRANSITIONS)
STATES: Final = frozenset({QUEUED, SENT, ACKNOWLEDGED, COMPLETED, FAILED, EXPIRED, TIMED_OUT})


class IllegalTransition(Exception):
    """A lifecycle move the table does not allow (a server bug or a stale device answer)."""


def transition(state: str, event: str) -> str:
    """The state after ``event``; raises :class:`IllegalTransition` on a move not in the table."""
    try:
        return TRANSITIONS[(state, event)]
    except KeyError:
        raise IllegalTransition(f"command cannot go from {state} on {event}") from None


@dataclass(frozen=True, slots=True)
class Arg:
    """One argument: type, bounds, default (``None`` default means required unless optional)."""

    name: str
    kind: type
    low: float | None = None
    high: float | None = None
    default: Any = None
    choices: tuple[str, ...] = ()
    required: bool = False


@dataclass(frozen=True, slots=True)
class CommandSpec:
    name: str
    args: tuple[Arg, ...]
    idempotent: bool  # safe to send again after a restart when the first answer never came
    needs_care: bool  # only a clinician caring for the patient (or an admin) may send it
    doc: str


CATALOGUE: Final[dict[str, CommandSpec]] = {
    c.name: c
    for c in (
        CommandSpec("reset", (), False, True, "soft restart of the measurement; reconnects"),
        CommandSpec("report_now", (), True, False, "send a reading immediately"),
        CommandSpec(
            "set_interval",
            (Arg("interval_s", float, 0.1, 3600, required=True),),
            True,
            False,
            "change the reporting interval",
        ),
        CommandSpec(
            "request_data",
            (
                Arg("kind", str, default="pleth", choices=("pleth", "burst")),
                Arg("duration_s", float, 1, 60, default=10.0),
                Arg("rate_hz", float, 1, 500, default=100.0),
            ),
            False,
            False,
            "stream extra data (pleth waveform or a burst of readings) for a window",
        ),
        CommandSpec(
            "identify",
            (Arg("duration_s", float, 1, 60, default=10.0),),
            True,
            False,
            "blink and beep so staff can find the device",
        ),
        CommandSpec(
            "silence",
            (Arg("duration_s", float, 1, 120, default=120.0),),
            False,
            True,
            "pause the device's alarm audio, at most 120 s (IEC 60601-1-8 audio paused)",
        ),
    )
}

#: Time to live (before delivery) and answer timeout (after delivery), seconds.
TTL_BOUNDS: Final = (1.0, 86_400.0)
TIMEOUT_BOUNDS: Final = (1.0, 600.0)
DEFAULT_TTL_S: Final = 300.0
DEFAULT_TIMEOUT_S: Final = 30.0


def validate(name: str, args: dict[str, Any]) -> dict[str, Any]:
    """Check a command and its arguments; return the arguments with defaults filled in.

    Raises:
        InvalidMessage: unknown command, unknown argument, wrong type or out of bounds — naming
        the field (``name`` or ``args.<argument>``) and the bound.
    """
    spec = CATALOGUE.get(name)
    if spec is None:
        raise InvalidMessage(
            f"name must be one of {', '.join(sorted(CATALOGUE))}, got {name!r:.40}", field="name"
        )
    known = {a.name for a in spec.args}
    for key in args:
        if key not in known:
            allowed = ", ".join(sorted(known)) or "none"
            raise InvalidMessage(
                f"{name} takes no argument {key!r:.40} (arguments: {allowed})", field=f"args.{key}"
            )
    out: dict[str, Any] = {}
    for arg in spec.args:
        field = f"args.{arg.name}"
        value = args.get(arg.name, arg.default)
        if value is None:
            if arg.required:
                raise InvalidMessage(f"{name} needs {arg.name}", field=field)
            continue
        if arg.kind is float:
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise InvalidMessage(f"{arg.name} must be a number, got {value!r:.40}", field=field)
            value = float(value)
            assert arg.low is not None and arg.high is not None
            if math.isnan(value) or not arg.low <= value <= arg.high:
                raise InvalidMessage(
                    f"{arg.name} must be between {arg.low:g} and {arg.high:g}, got {value:g}",
                    field=field,
                )
        elif arg.kind is str:
            if not isinstance(value, str) or (arg.choices and value not in arg.choices):
                raise InvalidMessage(
                    f"{arg.name} must be one of {', '.join(arg.choices)}, got {value!r:.40}",
                    field=field,
                )
        out[arg.name] = value
    return out


def check_window(
    field: str, value: float | None, default: float, bounds: tuple[float, float]
) -> float:
    """A TTL or timeout from a request, defaulted and bounded."""
    if value is None:
        return default
    low, high = bounds
    if math.isnan(value) or not low <= value <= high:
        raise InvalidMessage(
            f"{field} must be between {low:g} and {high:g}, got {value:g}", field=field
        )
    return float(value)
