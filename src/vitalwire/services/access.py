"""Access control: the one mechanism every surface calls (client socket, REST, commands).

It keeps the care teams (ward members, individual assignments, break-glass grants, each
patient's ward) in memory, refreshed from the store every few seconds (when the store's access
version changed: each change of the care teams sets a new one) and after every change made
through it, and answers with :func:`vitalwire.core.access.decide`.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from vitalwire.core import access as policy
from vitalwire.core import events as ev
from vitalwire.core.errors import Forbidden, InvalidMessage, NotFound
from vitalwire.services.auth import Principal
from vitalwire.services.writer import BatchWriter
from vitalwire.store import AuditRow, Store


class Access:
    def __init__(
        self,
        store: Store,
        writer: BatchWriter,
        clock: Callable[[], float],
        break_glass_s: float = 3600.0,
    ) -> None:
        self.store = store
        self.writer = writer
        self.clock = clock
        self.break_glass_s = break_glass_s
        self._wards: dict[str, set[str]] = {}
        self._assigned: dict[str, set[str]] = {}
        self._grants: dict[tuple[str, str], float] = {}
        self._ward_of: dict[str, str] = {}
        self._loaded = False
        self._version: str | None = None

    async def refresh(self) -> None:
        """Reload the care teams, unless the store's access version says they did not change
        since the last load: reading every patient's ward each time held the event loop for
        50 ms and more every few seconds at hospital scale (10,000 patients). The version is
        read first, so a change made while the teams are read is loaded again next time."""
        version = await self.store.access_version()
        if self._loaded and version == self._version:
            return
        teams = await self.store.care_teams(self.clock())
        self._version = version
        self._loaded = True
        self._wards = teams["wards"]
        self._assigned = teams["assigned"]
        self._grants = teams["grants"]
        self._ward_of = teams["ward_of"]

    # -- questions ------------------------------------------------------------------------------

    def in_care(self, who: Principal, pid: str) -> bool:
        ward = self._ward_of.get(pid)
        return (ward is not None and ward in self._wards.get(who.name, ())) or pid in (
            self._assigned.get(who.name, ())
        )

    def has_break_glass(self, who: Principal, pid: str) -> bool:
        return self._grants.get((who.name, pid), 0.0) > self.clock()

    def allowed(self, who: Principal, action: str, pid: str | None = None) -> bool:
        return self._decide(who, action, pid)[0]

    def check(self, who: Principal, action: str, pid: str | None = None) -> None:
        """Raise :class:`Forbidden` naming what is missing, unless allowed."""
        ok, why = self._decide(who, action, pid)
        if not ok:
            role_missing = who.role not in policy.POLICY[action][0]
            target = f" (patient {pid})" if pid and not role_missing else ""
            raise Forbidden(
                f"{why}{target}", field="role" if role_missing or not pid else "patient_id"
            )

    def _decide(self, who: Principal, action: str, pid: str | None) -> tuple[bool, str]:
        if pid is not None and pid not in self._ward_of:
            return who.role == "admin" or action not in policy.PATIENT_ACTIONS, "unknown patient"
        return policy.decide(
            who.role,
            action,
            in_care=pid is not None and self.in_care(who, pid),
            break_glass=pid is not None and self.has_break_glass(who, pid),
        )

    def patient_filter(self, who: Principal) -> Callable[[str], bool]:
        """A predicate: may ``who`` see this patient (for the ``alerts`` stream)."""
        if who.role == "admin":
            return lambda pid: True
        return lambda pid: self.allowed(who, policy.VIEW, pid)

    def stream_check(self, who: Principal) -> Callable[[str], None]:
        """A check for subscribing to a stream: patient streams need view access."""

        def check(stream: str) -> None:
            pid = ev.stream_patient(stream)
            if pid is not None:
                if pid not in self._ward_of:
                    raise NotFound(f"patient {pid} does not exist", field="streams")
                self.check(who, policy.VIEW, pid)

        return check

    # -- changes --------------------------------------------------------------------------------

    async def break_glass(
        self, who: Principal, pid: str, reason: str, origin: str | None = None
    ) -> dict[str, Any]:
        """Open a patient outside the user's care, for a limited time; audited and flagged."""
        ev.check_id("patient_id", pid)
        reason = reason.strip()
        if not 10 <= len(reason) <= 500:
            raise InvalidMessage(
                f"reason must be 10 to 500 characters, got {len(reason)}", field="reason"
            )
        if pid not in self._ward_of:
            raise NotFound(f"patient {pid} does not exist", field="patient_id")
        self.check(who, policy.BREAK_GLASS, pid)
        now = self.clock()
        until = now + self.break_glass_s
        await self.store.add_grant(who.name, pid, reason, now, until)
        detail = {"reason": reason, "until": until, "flag": "break_glass"}
        audit = AuditRow(now, who.name, "break_glass", pid, json.dumps(detail), origin)
        await self.writer.commit([], audit=[audit])
        await self.refresh()
        return {"patient_id": pid, "until": until}

    def audit(
        self, who: str, action: str, pid: str | None, detail: dict[str, Any], origin: str | None
    ) -> None:
        """Append to the audit log (in the next write batch)."""
        row = AuditRow(self.clock(), who, action, pid, json.dumps(detail), origin)
        self.writer.submit([], [], audit=[row])
