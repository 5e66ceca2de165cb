"""Alerts: one pure engine per patient (core.alerts), fed with readings, device status and time.

How it works: ingest hands every accepted reading and device status change to
:meth:`AlertService.on_reading` / :meth:`on_device_status` *before* submitting its batch, and the
engine's changes become events in the same batch: an alert raised by a reading commits in the same
transaction as that reading and reaches clients with it. A chore calls :meth:`tick` every second
for delays, clear timers and escalation. Every alert change goes to the patient's stream and to
the ``alerts`` stream (offsets, replay, never coalesced) and updates the ``alerts`` table (the
latest state per alert, queryable as history). Acknowledgements, limit overrides and NEWS2
observations come from clients, are checked by role, written to the audit log and answered only
once durable.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from collections.abc import Callable
from typing import Any

from vitalwire.core import access as policy
from vitalwire.core import events as ev
from vitalwire.core.alerts import PRIORITIES as ALERT_PRIORITIES
from vitalwire.core.alerts import STATES as ALERT_STATES
from vitalwire.core.alerts import AlertChange, AlertConfig, News2Change, PatientAlerts
from vitalwire.core.errors import Forbidden, InvalidMessage, NotFound
from vitalwire.core.limits import DEFAULT_LIMITS, Limits, override_limits
from vitalwire.services.access import Access
from vitalwire.services.auth import Principal
from vitalwire.services.streams import Streams
from vitalwire.services.writer import BatchWriter
from vitalwire.store import AlertRow, AuditRow, Store
from vitalwire.wire import Event

log = logging.getLogger("vitalwire.alerts")

#: Alert ids remembered (open or resolved) for acknowledgements.
ALERT_MEMORY = 100_000
Change = AlertChange | News2Change


#: NEWS2 history: events read per store call, and at most per request (a page may then hold
#: fewer than ``limit`` events and a cursor to go on).
NEWS2_PAGE = 1000
NEWS2_SCAN = 20_000


def limit_sources(limits: dict[str, dict[str, Any]]) -> dict[str, dict[str, str]]:
    """Where each value of a patient's limits table comes from: ``"default"`` when it is the
    value of the default adult table (core/limits.py ``DEFAULT_ROWS``), ``"patient"`` when it was
    set for this patient. The store keeps the whole table in force, so an override equal to the
    default reads as ``"default"`` (and ``null`` in ``set_limits`` restores it)."""
    defaults = DEFAULT_LIMITS.to_dict()
    return {
        metric: {
            field: "default" if value == defaults.get(metric, {}).get(field) else "patient"
            for field, value in row.items()
        }
        for metric, row in limits.items()
    }


#: At most this many ``device_offline`` alerts raised per tick (the server ticks every 100 ms:
#: 2,000 a second). A ward-wide outage (a switch restarted: 2,000 devices gone at once) whose
#: grace ends in one tick would otherwise raise every alert in one hold of the event loop (about
#: 60 ms to raise 2,000, then as long again to commit and deliver them), delaying every other
#: reading; the rest wait for the next ticks, the devices gone longest first.
OFFLINE_PER_TICK = 200


class AlertService:
    def __init__(
        self,
        store: Store,
        streams: Streams,
        writer: BatchWriter,
        clock: Callable[[], float],
        config: AlertConfig | None = None,
        access: Access | None = None,
        offline_grace_s: float = 10.0,
    ) -> None:
        self.access = access
        self.store = store
        self.streams = streams
        self.writer = writer
        self.clock = clock
        self.config = config or AlertConfig()
        self._engines: dict[str, PatientAlerts] = {}
        self._limits: dict[str, Limits] = {}  # patient -> limits in force (overrides applied)
        self._observations: dict[str, dict[str, Any]] = {}
        self._alert_patient: dict[str, str] = {}  # alert id -> patient id
        #: devices whose socket closed, not yet back: (patient, device) -> since
        self._offline_since: dict[tuple[str, str], float] = {}
        self.offline_grace_s = offline_grace_s
        self.raised: Counter[str] = Counter()  # alerts raised, by priority (/metrics)
        #: On a cloud: the edge nodes that own some patients (services/edges.py). Requests on
        #: those patients go down to their edge, which raises and ends their alerts.
        self.remote: Any = None
        #: In a cluster: whether this node writes a patient's stream (only those engines tick)
        self.holds: Callable[[str], bool] | None = None

    async def load(self, engines: bool = True) -> None:
        """Per-patient limits and observations from the store; open alerts back into engines.

        ``engines=False`` (a node of a cluster): only which patient each open alert is of; a
        patient's engine is built when this node takes the patient's stream (take_over)."""
        for pid, row in (await self.store.patient_settings()).items():
            self._settings_from(pid, row)
        for row in await self.store.open_alerts():
            self._alert_patient[row["alert_id"]] = row["patient_id"]
            if engines:
                self.engine(row["patient_id"]).restore(json.loads(row["last"]))

    def _settings_from(self, pid: str, row: dict[str, Any] | None) -> None:
        self._limits.pop(pid, None)
        self._observations.pop(pid, None)
        if row and row["limits"]:
            self._limits[pid] = Limits.from_dict(json.loads(row["limits"]))
        if row and row["observations"]:
            self._observations[pid] = json.loads(row["observations"])

    # -- several nodes (services/cluster.py) ------------------------------------------------------

    async def take_over(self, pid: str) -> None:
        """This node now writes ``pid``'s stream: its engine as the store has it (limits,
        observations, open alerts with their state, acknowledgement and escalation). What an
        engine holds only in memory (a condition's delay that had started, NEWS2's inputs)
        starts again with the next readings here."""
        self._settings_from(pid, (await self.store.patient_settings(pid)).get(pid))
        self._engines.pop(pid, None)
        engine = self.engine(pid)
        for row in await self.store.open_alerts(pid):
            self._alert_patient[row["alert_id"]] = pid
            engine.restore(json.loads(row["last"]))

    def let_go(self, pid: str) -> None:
        """Another node writes ``pid``'s stream now: its engine there raises and ends alerts."""
        self._engines.pop(pid, None)
        for key in [k for k in self._offline_since if k[0] == pid]:
            del self._offline_since[key]

    def engine(self, pid: str) -> PatientAlerts:
        engine = self._engines.get(pid)
        if engine is None:
            engine = PatientAlerts(pid, self._limits.get(pid), self.config)
            obs = self._observations.get(pid)
            if obs:
                engine.set_observations(self.clock(), **obs)
            self._engines[pid] = engine
        return engine

    # -- feeding (called by ingest, synchronous) ---------------------------------------------------

    @property
    def offline_pending(self) -> int:
        """Devices whose connection closed, waiting out ``offline_grace_s`` (or their tick)."""
        return len(self._offline_since)

    def on_reading(
        self, pid: str, device: str, values: dict[str, Any], now: float
    ) -> tuple[list[Event], list[AlertRow]]:
        return self._to_events(pid, self.engine(pid).on_reading(now, device, values), now)

    def on_device_status(
        self, pid: str, device: str, status: str, now: float, reason: str | None = None
    ) -> tuple[list[Event], list[AlertRow]]:
        """A device's status changed. A socket that closes (a reset, a network blip) raises
        ``device_offline`` only if the device is not back within ``offline_grace_s``; a device
        found silent has already been waited for, and raises at once."""
        key = (pid, device)
        if status == "offline" and reason != "silent":
            self._offline_since.setdefault(key, now)
            return [], []
        if status != "offline":
            was_pending = self._offline_since.pop(key, None) is not None
            if was_pending and status == "online":
                return [], []  # back within the grace: nothing was raised, nothing to resolve
        return self._to_events(pid, self.engine(pid).on_device_status(now, device, status), now)

    def on_late_reading(
        self, pid: str, device: str, now: float
    ) -> tuple[list[Event], list[AlertRow]]:
        """A late reading (history): no alarm from its values (core.alerts.Timeliness)."""
        return self._to_events(pid, self.engine(pid).on_late_reading(now, device), now)

    def on_identity_conflict(
        self, pid: str, device: str, now: float, until: float
    ) -> tuple[list[Event], list[AlertRow]]:
        """Two live units use ``device``'s identity: ``device_identity_conflict`` till ``until``."""
        return self._to_events(pid, self.engine(pid).on_identity_conflict(now, device, until), now)

    def tick(self, part: int = 0, parts: int = 1) -> int:
        """Advance the timers of one ``part`` of ``parts`` of the engines (the server ticks a
        tenth every 100 ms, so no single call holds the event loop for long); submit what
        changed. Returns the number of changes."""
        now = self.clock()
        events: list[Event] = []
        rows: list[AlertRow] = []
        count = 0
        holds = self.holds
        budget = OFFLINE_PER_TICK
        for key, since in list(self._offline_since.items()):
            if holds is not None and not holds(key[0]):
                del self._offline_since[key]
            elif now - since >= self.offline_grace_s:
                if budget == 0:
                    continue  # the next tick's (a ward-wide outage, spread: see the constant)
                budget -= 1
                del self._offline_since[key]
                pid, device = key
                e, r = self._to_events(
                    pid, self.engine(pid).on_device_status(now, device, "offline"), now
                )
                events.extend(e)
                rows.extend(r)
        pids = list(self._engines)
        for pid in pids[part::parts] if parts > 1 else pids:
            if holds is not None and not holds(pid):
                continue
            engine = self._engines[pid]
            changes = engine.tick(now)
            if changes:
                count += len(changes)
                e, r = self._to_events(pid, changes, now)
                events.extend(e)
                rows.extend(r)
        if events:
            self.writer.submit([], events, alerts=rows)
        return count

    async def discharge(self, pid: str, by: str) -> int:
        """``pid`` was discharged: their open alerts resolve (core ``PatientAlerts.discharge``)
        and their engine is dropped, with any device-offline grace still running. Returns how
        many alerts ended, once durable.

        In a cluster the node that writes the patient's stream does it (services/cluster.py)."""
        if self.remote is not None and (node := await self.remote.route(pid)) is not None:
            who = Principal(by, "admin", upstream=True)
            return int(await self.remote.call(node, "discharge", who, pid, {"by": by}, None))
        for key in [k for k in self._offline_since if k[0] == pid]:
            del self._offline_since[key]
        engine = self._engines.pop(pid, None)
        if engine is None:
            return 0
        now = self.clock()
        changes = engine.discharge(now, by)
        events, rows = self._to_events(pid, changes, now)
        if events:
            await self.writer.commit(events, alerts=rows)
        return len(changes)

    # -- clinicians' requests -----------------------------------------------------------------

    async def acknowledge(self, who: Principal, alert_id: str, origin: str | None = None) -> Any:
        """Acknowledge an alert; return its change once durable."""
        pid = self._alert_patient.get(alert_id)
        if pid is None:
            raise NotFound(f"alert {alert_id} is not open", field="alert_id")
        self._check(who, policy.ACKNOWLEDGE, pid)
        if self.remote is not None and (node := await self.remote.route(pid)) is not None:
            args = {"alert_id": alert_id}
            return await self.remote.call(node, "ack_alert", who, pid, args, origin)
        now = self.clock()
        changes = self.engine(pid).acknowledge(alert_id, who.name, now)
        events, rows = self._to_events(pid, changes, now)
        audit = AuditRow(
            now, who.name, "ack_alert", pid, json.dumps({"alert_id": alert_id}), origin
        )
        await self.writer.commit(events, alerts=rows, audit=[audit])
        return [_change_data(c) for c in changes]

    async def list_alerts(
        self,
        who: Principal,
        filters: dict[str, Any],
        after: tuple[float, str] | None,
        limit: int,
        origin: str | None = None,
    ) -> list[dict[str, Any]]:
        """Alerts of the patients ``who`` may VIEW, newest first (store ``list_alerts``).
        ``filters["patient"]`` names one patient (404 unknown; 403, audited, out of care);
        without it, every patient the user may see. Audited ``list_alerts``."""
        if self.access is None:
            raise Forbidden("no access control configured", field="role")  # fail closed
        if filters.get("state") is not None and filters["state"] not in ALERT_STATES:
            raise InvalidMessage(f"state must be one of {', '.join(ALERT_STATES)}", field="state")
        if filters.get("priority") is not None and filters["priority"] not in ALERT_PRIORITIES:
            raise InvalidMessage(
                f"priority must be one of {', '.join(ALERT_PRIORITIES)}", field="priority"
            )
        query = {k: v for k, v in filters.items() if k != "patient"}
        pid = filters.get("patient")
        if pid is not None:
            await self.require_patient(pid)
            try:
                self.access.check(who, policy.VIEW, pid)
            except Forbidden as exc:
                self.access.refused(who.name, "list_alerts", pid, exc.message, origin)
                raise
            query["patients"] = [pid]
        else:
            every = [p["id"] for p in await self.store.list_patients()]
            seen = [p for p in every if self.access.allowed(who, policy.VIEW, p)]
            query["patients"] = None if len(seen) == len(every) else seen
        rows = await self.store.list_alerts(query, after, limit)
        for r in rows:
            # what the latest change said (message for people, the metric and its value)
            last = r.pop("last", None)
            data = json.loads(last) if last else {}
            for key in ("message", "metric", "value"):
                r[key] = data.get(key) if isinstance(data, dict) else None
        detail: dict[str, Any] = {"count": len(rows)}
        detail.update({k: v for k, v in filters.items() if v is not None and k != "patient"})
        if pid is not None and self.access.via_break_glass(who, pid):
            detail["flag"] = "break_glass"
        self.access.audit(who.name, "list_alerts", pid, detail, origin)
        return rows

    def limits(self, pid: str) -> dict[str, Any]:
        return self.engine(pid).limits.to_dict()

    async def get_limits(
        self, who: Principal, pid: str, origin: str | None = None, audit_refusal: bool = True
    ) -> dict[str, Any]:
        """A patient's alarm limits, for anyone who may VIEW them; audited ``get_limits`` (flagged
        ``break_glass`` when seen through a grant). A refusal is audited too, unless the caller
        audits its refusals itself (``audit_refusal=False``: the socket does, for every message)."""
        await self.require_patient(pid)
        try:
            self._check(who, policy.VIEW, pid)
        except Forbidden as exc:
            if audit_refusal and self.access is not None:
                self.access.refused(who.name, "get_limits", pid, exc.message, origin)
            raise
        assert self.access is not None
        detail: dict[str, Any] = {}
        if self.access.via_break_glass(who, pid):
            detail["flag"] = "break_glass"
        self.access.audit(who.name, "get_limits", pid, detail, origin)
        return self.limits(pid)

    async def get_observations(
        self, who: Principal, pid: str, origin: str | None = None
    ) -> dict[str, Any]:
        """A patient's NEWS2 observations as recorded (``on_oxygen``, ``consciousness``,
        ``scale``; a value never recorded is absent), for anyone who may VIEW them; audited
        ``get_observations`` (a refusal audited ``refused``)."""
        await self.require_patient(pid)
        try:
            self._check(who, policy.VIEW, pid)
        except Forbidden as exc:
            if self.access is not None:
                self.access.refused(who.name, "get_observations", pid, exc.message, origin)
            raise
        assert self.access is not None
        detail: dict[str, Any] = {}
        if self.access.via_break_glass(who, pid):
            detail["flag"] = "break_glass"
        self.access.audit(who.name, "get_observations", pid, detail, origin)
        return dict(self._observations.get(pid, {}))

    async def stream_events(
        self, who: Principal, pid: str, after: int, limit: int, origin: str | None = None
    ) -> tuple[list[Event], int, bool]:
        """Up to ``limit`` events of a patient's stream after offset ``after``, for a client that
        cannot hold a socket: VIEW access, audited ``read_events`` (as the socket's ``subscribe``,
        flagged ``break_glass`` through a grant). Returns (events, head, recovered): recovered is
        False when events after ``after`` were removed by retention (the page then starts at the
        oldest event kept), as the socket's ``recovered: false``."""
        await self.require_patient(pid)
        try:
            self._check(who, policy.VIEW, pid)
        except Forbidden as exc:
            if self.access is not None:
                self.access.refused(who.name, "read_events", pid, exc.message, origin)
            raise
        assert self.access is not None
        stream = ev.patient_stream(pid)
        head = self.streams.head(stream)
        recovered = True
        events = await self.streams.replay(stream, after, min(head, after + limit))
        if events is None:
            recovered = False
            first = await self.store.first_offset(stream)
            start = head if first is None else first - 1
            events = await self.streams.replay(stream, start, min(head, start + limit)) or []
        detail: dict[str, Any] = {"stream": stream, "after": after, "count": len(events)}
        if self.access.via_break_glass(who, pid):
            detail["flag"] = "break_glass"
        self.access.audit(who.name, "read_events", pid, detail, origin)
        return events[:limit], head, recovered

    async def news2_history(
        self,
        who: Principal,
        pid: str,
        t_from: float | None,
        t_to: float | None,
        after: int,
        limit: int,
        origin: str | None = None,
    ) -> tuple[list[Event], int | None]:
        """The ``news2`` events of a patient's stream with ``t_from <= ts < t_to``, in offset
        order after offset ``after``, up to ``limit``: VIEW, audited ``news2_history``. Reads
        the stream by offset (``events_after``), filtering by kind and time, at most
        :data:`NEWS2_SCAN` events per call; returns (events, the offset to continue after, or
        None when the stream's end was reached)."""
        await self.require_patient(pid)
        try:
            self._check(who, policy.VIEW, pid)
        except Forbidden as exc:
            if self.access is not None:
                self.access.refused(who.name, "news2_history", pid, exc.message, origin)
            raise
        assert self.access is not None
        stream = ev.patient_stream(pid)
        out: list[Event] = []
        cursor, scanned, more = after, 0, True
        while len(out) < limit and scanned < NEWS2_SCAN:
            page = await self.store.events_after(stream, cursor, NEWS2_PAGE)
            if not page:
                more = False
                break
            for e in page:
                cursor = e.offset
                scanned += 1
                if (
                    e.kind == ev.NEWS2
                    and (t_from is None or e.ts >= t_from)
                    and (t_to is None or e.ts < t_to)
                ):
                    out.append(e)
                    if len(out) == limit:
                        break
            if len(page) < NEWS2_PAGE and cursor == page[-1].offset and len(out) < limit:
                more = False
                break
        detail: dict[str, Any] = {"count": len(out), "from": t_from, "to": t_to}
        if self.access.via_break_glass(who, pid):
            detail["flag"] = "break_glass"
        self.access.audit(who.name, "news2_history", pid, detail, origin)
        return out, cursor if more else None

    async def set_limits(
        self,
        who: Principal,
        pid: str,
        overrides: dict[str, dict[str, float | None]],
        origin: str | None = None,
    ) -> dict[str, Any]:
        """Override a patient's limits (validated against the physical bounds); audited."""
        await self.require_patient(pid)
        self._check(who, policy.SET_LIMITS, pid)
        if self.remote is not None and (node := await self.remote.route(pid)) is not None:
            args = {"overrides": overrides}
            return await self.remote.call(node, "set_limits", who, pid, args, origin)
        engine = self.engine(pid)
        old = engine.limits.to_dict()
        new_limits = override_limits(engine.limits, overrides)
        new = new_limits.to_dict()
        engine.set_limits(new_limits)
        self._limits[pid] = new_limits
        now = self.clock()
        await self._save_settings(pid, who, now)
        detail = {"old": _diff(old, new), "new": _diff(new, old)}
        audit = AuditRow(now, who.name, "set_limits", pid, json.dumps(detail), origin)
        event = self.streams.new_event(
            ev.patient_stream(pid), ev.SETTINGS, now, {"limits": new, "by": who.name}
        )
        await self.writer.commit([event], audit=[audit])
        return new

    async def set_observations(
        self, who: Principal, pid: str, obs: dict[str, Any], origin: str | None = None
    ) -> dict[str, Any]:
        """Set NEWS2 observations no device measures (oxygen, consciousness, SpO2 scale)."""
        await self.require_patient(pid)
        self._check(who, policy.OBSERVE, pid)
        if self.remote is not None and (node := await self.remote.route(pid)) is not None:
            args = {"observations": obs}
            return await self.remote.call(node, "set_observations", who, pid, args, origin)
        given = {k: v for k, v in obs.items() if v is not None}
        now = self.clock()
        changes = self.engine(pid).set_observations(now, **given)
        merged = {**self._observations.get(pid, {}), **given}
        self._observations[pid] = merged
        await self._save_settings(pid, who, now)
        events, rows = self._to_events(pid, changes, now)
        events.append(  # created last, so it has the highest offset: list stays in order
            self.streams.new_event(
                ev.patient_stream(pid), ev.SETTINGS, now, {"observations": merged, "by": who.name}
            )
        )
        audit = AuditRow(now, who.name, "set_observations", pid, json.dumps(given), origin)
        await self.writer.commit(events, alerts=rows, audit=[audit])
        return merged

    # -- an edge's patients, on a cloud (services/edges.py) ----------------------------------

    def remember(self, alert_id: str, pid: str) -> None:
        """An edge's alert mirrored here: acknowledging it finds its patient (and its edge)."""
        self._alert_patient[alert_id] = pid
        while len(self._alert_patient) > ALERT_MEMORY:
            del self._alert_patient[next(iter(self._alert_patient))]

    def adopt_settings(self, pid: str, data: dict[str, Any]) -> None:
        """An edge's limits or observations changed: shown here as they are there."""
        limits = data.get("limits")
        if isinstance(limits, dict):
            self._limits[pid] = Limits.from_dict(limits)
            engine = self._engines.get(pid)
            if engine is not None:
                engine.set_limits(self._limits[pid])
        obs = data.get("observations")
        if isinstance(obs, dict):
            self._observations[pid] = obs

    # -- helpers --------------------------------------------------------------------------------

    def _check(self, who: Principal, action: str, pid: str) -> None:
        if self.access is None:
            raise Forbidden("no access control configured", field="role")  # fail closed
        self.access.check(who, action, pid)

    async def require_patient(self, pid: str) -> None:
        ev.check_id("patient_id", pid)
        if pid not in self._engines and await self.store.get_patient(pid) is None:
            raise NotFound(f"patient {pid} does not exist", field="patient_id")

    async def _save_settings(self, pid: str, who: Principal, now: float) -> None:
        limits = self._limits.get(pid)
        obs = self._observations.get(pid)
        await self.store.set_patient_settings(
            pid,
            None if limits is None else json.dumps(limits.to_dict()),
            None if not obs else json.dumps(obs),
            now,
            who.name,
        )

    def _to_events(
        self, pid: str, changes: list[Change], now: float
    ) -> tuple[list[Event], list[AlertRow]]:
        if not changes:
            return [], []
        events: list[Event] = []
        rows: list[AlertRow] = []
        stream = ev.patient_stream(pid)
        for change in changes:
            data = _change_data(change)
            if isinstance(change, AlertChange):
                self.raised[change.priority] += change.action == "raised"
                self._alert_patient[change.alert_id] = pid  # kept once resolved: acknowledging
                while len(self._alert_patient) > ALERT_MEMORY:  # it then says "conflict"
                    del self._alert_patient[next(iter(self._alert_patient))]
                events.append(self.streams.new_event(stream, ev.ALERT, now, data))
                events.append(self.streams.new_event(ev.ALERTS_STREAM, ev.ALERT, now, data))
                rows.append(
                    AlertRow(
                        change.alert_id,
                        pid,
                        change.condition,
                        change.priority,
                        change.category,
                        change.state,
                        change.at,
                        change.by,  # who acknowledged (on acknowledged, or on a latched resolve)
                        change.escalation_level,
                        json.dumps(data),
                    )
                )
            else:
                events.append(self.streams.new_event(stream, ev.NEWS2, now, data))
        return events, rows


def _change_data(change: Change) -> dict[str, Any]:
    return change.to_dict()


def _diff(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in a.items() if b.get(k) != v}
