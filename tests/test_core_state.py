"""The live picture folded from a stream's events."""

from __future__ import annotations

from vitalwire.core import events as ev
from vitalwire.core.state import PatientState


def test_latest_value_of_each_vital_and_device_status() -> None:
    s = PatientState()
    s.apply(1, ev.DEVICE_STATUS, 10.0, {"device": "d1", "status": "online"})
    s.apply(2, ev.READING, 11.0, {"device": "d1", "seq": 1, "ts": 10.5, "spo2": 97.0, "hr": 70.0})
    s.apply(3, ev.READING, 12.0, {"device": "d1", "seq": 2, "ts": 11.5, "spo2": 95.0})
    assert s.snapshot() == {
        "vitals": {
            "spo2": {"value": 95.0, "ts": 11.5, "device": "d1", "offset": 3},
            "hr": {"value": 70.0, "ts": 10.5, "device": "d1", "offset": 2},
        },
        "devices": {"d1": {"status": "online", "ts": 10.0, "reason": None}},
        "alerts": [],
        "news2": None,
    }
    assert s.offset == 3


def test_old_or_repeated_offsets_are_ignored() -> None:
    s = PatientState()
    s.apply(2, ev.READING, 1.0, {"device": "d", "ts": 1.0, "hr": 80.0})
    s.apply(2, ev.READING, 1.0, {"device": "d", "ts": 1.0, "hr": 10.0})
    s.apply(1, ev.READING, 1.0, {"device": "d", "ts": 1.0, "hr": 20.0})
    assert s.vitals["hr"]["value"] == 80.0


def test_unbind_removes_device() -> None:
    s = PatientState()
    s.apply(1, ev.DEVICE_STATUS, 1.0, {"device": "d", "status": "online"})
    s.apply(2, ev.BINDING, 2.0, {"device": "d", "action": "unbind"})
    assert s.devices == {}


def test_stream_names() -> None:
    assert ev.patient_stream("P1") == "patient:P1"
    assert ev.stream_patient("patient:P1") == "P1"
    assert ev.stream_patient("alerts") is None
    assert ev.check_stream("alerts") == "alerts"


def _alert(alert_id: str, priority: str, state: str, at: float) -> dict[str, object]:
    return {"alert_id": alert_id, "priority": priority, "state": state, "at": at}


def test_open_alerts_highest_priority_first_then_oldest_and_resolved_leave() -> None:
    s = PatientState()
    s.apply(1, ev.ALERT, 1.0, _alert("a", "medium", "active", 1.0))
    s.apply(2, ev.ALERT, 2.0, _alert("b", "high", "active", 2.0))
    s.apply(3, ev.ALERT, 3.0, _alert("c", "medium", "active", 3.0))
    s.apply(4, ev.ALERT, 4.0, _alert("d", "low", "active", 4.0))
    s.apply(5, ev.ALERT, 5.0, _alert("a", "medium", "acknowledged", 5.0))
    s.apply(6, ev.ALERT, 6.0, _alert("c", "medium", "resolved", 6.0))
    snap = s.snapshot()["alerts"]
    assert [(a["alert_id"], a["state"]) for a in snap] == [
        ("b", "active"),
        ("a", "acknowledged"),
        ("d", "active"),
    ]
    assert snap[1]["raised_at"] == 1.0  # the acknowledgement keeps when it was raised


def test_latest_news2_is_kept() -> None:
    s = PatientState()
    s.apply(1, ev.NEWS2, 1.0, {"total": 3, "band": "low"})
    s.apply(2, ev.NEWS2, 2.0, {"total": 7, "band": "high"})
    assert s.snapshot()["news2"] == {"total": 7, "band": "high"}
