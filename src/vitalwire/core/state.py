"""The live picture of one patient, folded from its stream's events.

A subscriber's snapshot is this picture as of an offset: the latest value of every vital (with its
device timestamp and offset) and each bound device's status. It is a pure fold, so the server, a
client and a test can rebuild it from the same events.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from vitalwire.core import events
from vitalwire.core.metrics import METRIC_BY_NAME


@dataclass(slots=True)
class PatientState:
    """Latest values and device status of one patient stream, as of ``offset``."""

    offset: int = 0
    vitals: dict[str, dict[str, Any]] = field(default_factory=dict)
    devices: dict[str, dict[str, Any]] = field(default_factory=dict)

    def apply(self, offset: int, kind: str, ts: float, data: dict[str, Any]) -> None:
        """Fold one event in. Events must come in offset order; older ones are ignored."""
        if offset <= self.offset:
            return
        self.offset = offset
        if kind == events.READING:
            device = data.get("device")
            for name, value in data.items():
                if name in METRIC_BY_NAME:
                    self.vitals[name] = {
                        "value": value,
                        "ts": data.get("ts", ts),
                        "device": device,
                        "offset": offset,
                    }
            if "probe" in data:
                self.vitals["probe"] = {
                    "value": data["probe"],
                    "ts": data.get("ts", ts),
                    "device": device,
                    "offset": offset,
                }
        elif kind == events.DEVICE_STATUS:
            self.devices[data["device"]] = {
                "status": data["status"],
                "ts": ts,
                "reason": data.get("reason"),
            }
        elif kind == events.BINDING and data.get("action") == "unbind":
            self.devices.pop(data["device"], None)

    def snapshot(self) -> dict[str, Any]:
        """A JSON-ready copy of the picture."""
        return {
            "vitals": {k: dict(v) for k, v in self.vitals.items()},
            "devices": {k: dict(v) for k, v in self.devices.items()},
        }
