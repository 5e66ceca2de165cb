"""Event kinds and stream names.

Every patient has one ordered stream, ``patient:<id>``; ``alerts`` carries every alert change for
ward overviews. Each event in a stream has an ``offset``: a per-stream integer that only grows,
assigned when the event is committed to the store (docs/reliability.md explains why).
"""

from __future__ import annotations

import re
from typing import Final

from vitalwire.core.errors import InvalidMessage

READING: Final = "reading"
DEVICE_STATUS: Final = "device_status"
BINDING: Final = "binding"
ALERT: Final = "alert"  # an alert change: raised, acknowledged, escalated, resolved, ...
NEWS2: Final = "news2"  # the patient's NEWS2 risk band changed
SETTINGS: Final = "settings"  # limits or NEWS2 observations changed by a clinician
COMMAND: Final = "command"  # a command's status changed: queued, sent, ..., completed
WAVEFORM: Final = "waveform"  # a chunk of waveform samples (request_data)

KINDS: Final = frozenset(
    {READING, DEVICE_STATUS, BINDING, ALERT, NEWS2, SETTINGS, COMMAND, WAVEFORM}
)

ALERTS_STREAM: Final = "alerts"
PATIENT_PREFIX: Final = "patient:"

#: Patient and device ids: letters, digits, ``_ . -``; 1 to 64 characters. Always matched with
#: ``fullmatch``: a ``$``-anchored ``match`` lets a trailing newline through.
ID_RE: Final = re.compile(r"[A-Za-z0-9_.\-]{1,64}")


def check_id(field: str, value: str) -> str:
    """Return ``value`` when it is a valid patient/device/user id, else raise naming ``field``."""
    if not ID_RE.fullmatch(value):
        raise InvalidMessage(
            f"{field} must be 1 to 64 letters, digits, '_', '.' or '-', got {value!r:.80}",
            field=field,
        )
    return value


def patient_stream(patient_id: str) -> str:
    """The stream name of a patient."""
    return PATIENT_PREFIX + patient_id


def stream_patient(stream: str) -> str | None:
    """The patient id of a patient stream, ``None`` for other streams."""
    return stream[len(PATIENT_PREFIX) :] if stream.startswith(PATIENT_PREFIX) else None


def check_stream(stream: str) -> str:
    """Validate a stream name from a peer."""
    if stream == ALERTS_STREAM:
        return stream
    pid = stream_patient(stream)
    if pid is None:
        raise InvalidMessage(
            f"stream must be 'alerts' or 'patient:<id>', got {stream!r:.80}", field="streams"
        )
    check_id("streams", pid)
    return stream
