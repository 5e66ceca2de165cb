"""Command lifecycle (every transition and every illegal one) and argument validation."""

from __future__ import annotations

import itertools
from typing import Any

import pytest

from vitalwire.core import commands as c
from vitalwire.core.errors import InvalidMessage

LEGAL = [
    (c.QUEUED, "deliver", c.SENT),
    (c.QUEUED, "expire", c.EXPIRED),
    (c.SENT, "device_ack", c.ACKNOWLEDGED),
    (c.SENT, "device_done", c.COMPLETED),
    (c.SENT, "device_fail", c.FAILED),
    (c.SENT, "timeout", c.TIMED_OUT),
    (c.SENT, "requeue", c.QUEUED),
    (c.ACKNOWLEDGED, "device_done", c.COMPLETED),
    (c.ACKNOWLEDGED, "device_fail", c.FAILED),
    (c.ACKNOWLEDGED, "timeout", c.TIMED_OUT),
]


@pytest.mark.parametrize(("state", "event", "after"), LEGAL)
def test_every_legal_transition(state: str, event: str, after: str) -> None:
    assert c.transition(state, event) == after


ILLEGAL = [
    (s, e)
    for s, e in itertools.product(sorted(c.STATES), sorted(c.EVENTS))
    if (s, e) not in {(s2, e2) for s2, e2, _ in LEGAL}
]


@pytest.mark.parametrize(("state", "event"), ILLEGAL)
def test_every_illegal_transition_is_refused(state: str, event: str) -> None:
    with pytest.raises(c.IllegalTransition, match=f"cannot go from {state} on {event}"):
        c.transition(state, event)


def test_the_table_is_the_whole_lifecycle() -> None:
    assert {(s, e, a) for (s, e), a in c.TRANSITIONS.items()} == set(LEGAL)
    assert all(not any(s == t for s, _ in c.TRANSITIONS) for t in c.TERMINAL)


VALID = [
    ("reset", {}, {}),
    ("report_now", {}, {}),
    ("set_interval", {"interval_s": 5}, {"interval_s": 5.0}),
    ("request_data", {}, {"kind": "pleth", "duration_s": 10.0, "rate_hz": 100.0}),
    (
        "request_data",
        {"kind": "burst", "duration_s": 3},
        {"kind": "burst", "duration_s": 3.0, "rate_hz": 100.0},
    ),
    ("identify", {}, {"duration_s": 10.0}),
    ("silence", {}, {"duration_s": 120.0}),
    ("silence", {"duration_s": 30}, {"duration_s": 30.0}),
]


@pytest.mark.parametrize(("name", "args", "expected"), VALID)
def test_valid_commands_get_their_defaults(name: str, args: dict[str, Any], expected: Any) -> None:
    assert c.validate(name, args) == expected


INVALID = [
    ("launch", {}, "name", "name must be one of identify, report_now, request_data, reset"),
    ("reset", {"hard": True}, "args.hard", "reset takes no argument 'hard' (arguments: none)"),
    ("set_interval", {}, "args.interval_s", "set_interval needs interval_s"),
    (
        "set_interval",
        {"interval_s": 0},
        "args.interval_s",
        "interval_s must be between 0.1 and 3600, got 0",
    ),
    ("set_interval", {"interval_s": "5"}, "args.interval_s", "interval_s must be a number"),
    ("set_interval", {"interval_s": True}, "args.interval_s", "interval_s must be a number"),
    (
        "silence",
        {"duration_s": 121},
        "args.duration_s",
        "duration_s must be between 1 and 120, got 121",
    ),
    ("silence", {"duration_s": 0}, "args.duration_s", "duration_s must be between 1 and 120"),
    ("request_data", {"kind": "ecg"}, "args.kind", "kind must be one of pleth, burst, got 'ecg'"),
    ("request_data", {"duration_s": 61}, "args.duration_s", "between 1 and 60, got 61"),
    ("identify", {"duration_s": float("nan")}, "args.duration_s", "between 1 and 60"),
]


@pytest.mark.parametrize(("name", "args", "field", "message"), INVALID)
def test_bad_commands_name_the_field_and_bound(
    name: str, args: dict[str, Any], field: str, message: str
) -> None:
    with pytest.raises(InvalidMessage) as err:
        c.validate(name, args)
    assert err.value.field == field
    assert message in err.value.message


def test_silence_can_never_last_longer_than_two_minutes() -> None:
    (arg,) = c.CATALOGUE["silence"].args
    assert arg.high == 120 and arg.default == 120


def test_ttl_and_timeout_windows() -> None:
    assert c.check_window("ttl_s", None, 300.0, c.TTL_BOUNDS) == 300.0
    assert c.check_window("ttl_s", 5, 300.0, c.TTL_BOUNDS) == 5.0
    with pytest.raises(InvalidMessage, match="timeout_s must be between 1 and 600, got 0.5"):
        c.check_window("timeout_s", 0.5, 30.0, c.TIMEOUT_BOUNDS)
