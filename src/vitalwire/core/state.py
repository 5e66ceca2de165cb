"""The live picture of one stream, folded from its events.

A subscriber's snapshot is this picture as of an offset: the latest value of every vital (with its
device timestamp and offset), each bound device's status, every alert not yet resolved (highest
priority first, then oldest) and the latest NEWS2. The ``alerts`` stream folds to the open alerts
of every patient. It is a pure fold, so the server, a client and a test can rebuild it from the
same events.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from vitalwire.core import events
from vitalwire.core.metrics import METRIC_BY_NAME

#: Sort order of alarm priorities (IEC 60601-1-8: high before medium before low).
PRIORITY_RANK: dict[str, int] = {"high": 0, "medium": 1, "low": 2}


@dataclass(slots=True)
class PatientState:
    """Latest values and device status of one patient stream, as of ``offset``."""

    offset: int = 0
    vitals: dict[str, dict[str, Any]] = field(default_factory=dict)
    devices: dict[str, dict[str, Any]] = field(default_factory=dict)
    alerts: dict[str, dict[str, Any]] = field(default_factory=dict)
    news2: dict[str, Any] | None = None

    def apply(self, offset: int, kind: str, ts: float, data: dict[str, Any]) -> None:
        """Fold one event in. Events must come in offset order; older ones are ignored."""
        if offset <= self.offset:
            return
        self.offset = offset
        if kind == events.READING:
            device = data.get("device")
            at = data.get("ts", ts)
            vitals = self.vitals
            for name, value in data.items():
                if name in METRIC_BY_NAME or name == "probe":
                    entry = vitals.get(name)
                    if entry is None:
                        vitals[name] = {
                            "value": value,
                            "ts": at,
                            "device": device,
                            "offset": offset,
                        }
                    else:  # in place: no new dict per value for the collector to track
                        entry["value"] = value
                        entry["ts"] = at
                        entry["device"] = device
                        entry["offset"] = offset
        elif kind == events.DEVICE_STATUS:
            self.devices[data["device"]] = {
                "status": data["status"],
                "ts": ts,
                "reason": data.get("reason"),
            }
        elif kind == events.BINDING and data.get("action") == "unbind":
            self.devices.pop(data["device"], None)
        elif kind == events.ALERT:
            self.apply_alert(data)
        elif kind == events.NEWS2:
            self.news2 = dict(data)

    def apply_alert(self, change: dict[str, Any]) -> None:
        """Fold one alert change: resolved alerts leave the picture."""
        alert_id = change["alert_id"]
        if change.get("state") == "resolved":
            self.alerts.pop(alert_id, None)
            return
        previous = self.alerts.get(alert_id)
        alert = dict(change)
        alert["raised_at"] = previous["raised_at"] if previous else change.get("at")
        self.alerts[alert_id] = alert

    def open_alerts(self) -> list[dict[str, Any]]:
        """Alerts not resolved, highest priority first, then oldest first (IEC 60601-1-8)."""
        return sorted(
            self.alerts.values(),
            key=lambda a: (PRIORITY_RANK.get(a.get("priority", ""), 9), a.get("raised_at") or 0),
        )

    @classmethod
    def from_snapshot(cls, offset: int, snap: dict[str, Any]) -> PatientState:
        """The inverse of :meth:`snapshot`: the picture as of ``offset``."""
        state = cls(offset=offset)
        state.vitals = {k: dict(v) for k, v in snap.get("vitals", {}).items()}
        state.devices = {k: dict(v) for k, v in snap.get("devices", {}).items()}
        state.alerts = {a["alert_id"]: dict(a) for a in snap.get("alerts", [])}
        news2 = snap.get("news2")
        state.news2 = None if news2 is None else dict(news2)
        return state

    def snapshot(self) -> dict[str, Any]:
        """A JSON-ready copy of the picture."""
        return {
            "vitals": {k: dict(v) for k, v in self.vitals.items()},
            "devices": {k: dict(v) for k, v in self.devices.items()},
            "alerts": [dict(a) for a in self.open_alerts()],
            "news2": None if self.news2 is None else dict(self.news2),
        }
