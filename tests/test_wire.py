"""The wire codec: shape and type errors name the field."""

from __future__ import annotations

import pytest

from vitalwire import wire
from vitalwire.core.errors import InvalidMessage

BAD_DEVICE_FRAMES = [
    (b"{not json", None, "malformed JSON"),
    (b"[]", None, "Expected `object`"),
    (b'{"seq": 1}', "type", "type must be one of: hello, reading, readings"),
    (b'{"type": "launch"}', "type", "type must be one of"),
    (b'{"type": "reading", "seq": "one", "ts": 1}', "seq", "Expected `int`, got `str`"),
    (b'{"type": "reading", "ts": 1}', "seq", "missing required field `seq`"),
    (b'{"type": "reading", "seq": 1, "ts": 1, "spo3": 90}', "spo3", "unknown field `spo3`"),
    (b'{"type": "reading", "seq": 1, "ts": 1, "probe": "yes"}', "probe", "Expected `bool"),
    (b'{"type": "readings", "items": [{"seq": 1, "ts": 1}, {"seq": 2}]}', "items[1].ts", "ts"),
]


@pytest.mark.parametrize(("frame", "field", "text"), BAD_DEVICE_FRAMES)
def test_bad_device_frame_names_the_field(frame: bytes, field: str | None, text: str) -> None:
    with pytest.raises(InvalidMessage) as err:
        wire.decode_device(frame)
    assert err.value.field == field
    assert text in err.value.message


def test_reading_round_trip() -> None:
    msg = wire.decode_device(b'{"type":"reading","seq":3,"ts":1.5,"spo2":97,"probe":true}')
    assert msg == wire.Reading(seq=3, ts=1.5, spo2=97.0, probe=True)
    assert wire.decode_device(wire.encode(msg)) == msg


def test_client_unknown_type() -> None:
    with pytest.raises(InvalidMessage, match="auth, subscribe, unsubscribe"):
        wire.decode_client(b'{"type":"hello"}')


def test_event_frame_is_encoded_once_and_embeds_data() -> None:
    e = wire.Event.new("patient:P1", 7, "reading", 2.0, {"spo2": 97.0})
    assert e.frame is e.frame
    decoded = wire.decode_from_server_to_client(e.frame)
    assert isinstance(decoded, wire.EventFrame)
    assert (decoded.stream, decoded.offset, decoded.kind, bytes(decoded.data)) == (
        "patient:P1",
        7,
        "reading",
        b'{"spo2":97.0}',
    )


def test_events_are_not_tracked_by_the_garbage_collector() -> None:
    """The bus keeps up to a thousand events per stream; the collector must not scan them."""
    import gc

    from vitalwire.wire import Event

    event = Event.new("patient:P1", 1, "reading", 1.0, {"device": "d1", "seq": 1, "spo2": 97.0})
    stored = Event.from_stored("patient:P1", 2, "reading", 1.0, b'{"device":"d1","seq":2}')
    assert event.frame.startswith('{"type":"event"')
    assert not gc.is_tracked(event) and not gc.is_tracked(stored)
    assert not gc.is_tracked(event.data)  # flat readings hold no containers
