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
