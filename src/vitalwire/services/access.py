"""Access control: the one mechanism every surface calls (client socket, REST, commands).

It keeps the care teams (ward members, individual assignments, break-glass grants, each
patient's ward) and every user's current state (role, disabled, token generation) in memory,
refreshed from the store every half second (when the store's access version changed: each change
of the care teams or of a user sets a new one) and after every change made through it, and
answers with :func:`vitalwire.core.access.decide`.

Access can be taken back: a token names a user, never their rights. :meth:`Access.current` gives
the user as they are now (their current role), or refuses a user who was disabled, deleted, or
whose tokens were revoked. After every refresh that changed something, and at the moment each
break-glass grant expires, :attr:`Access.on_change` runs (the container re-checks every open
client session with :meth:`Access.recheck`): sessions of users who may no longer connect end,
sessions take the user's new role, and subscriptions whose right ended stop at once.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any, Final

from vitalwire.core import access as policy
from vitalwire.core import events as ev
from vitalwire.core.errors import Forbidden, InvalidMessage, NotFound, Unauthenticated
from vitalwire.services.auth import Principal
from vitalwire.services.writer import BatchWriter
from vitalwire.store import AuditRow, Store, UserState

if TYPE_CHECKING:
    from vitalwire.services.clients import ClientSession

log = logging.getLogger("vitalwire.access")

#: Refused attempts audited one by one per connection (REST: per user and address) and minute;
#: past it they are counted, and one ``refused_summary`` row gives the count when the minute ends,
#: so a client hammering a forbidden request cannot flood the audit log.
REFUSALS_AUDITED_PER_MIN: Final = 10
REFUSAL_WINDOW_S: Final = 60.0
#: Why a subscription ended, when a grant it relied on ran out.
BREAK_GLASS_EXPIRED: Final = "break-glass expired"


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
        self._users: dict[str, UserState] = {}
        self._loaded = False
        self._version: str | None = None
        #: Grants that ran out since the last re-check: the reason a subscription ends.
        self._lapsed: set[tuple[str, str]] = set()
        self._expiry: asyncio.TimerHandle | None = None
        #: (actor, origin) -> [window start, rows written, attempts not written]
        self._refusals: dict[tuple[str, str | None], list[float]] = {}
        #: Called (never awaited) after every refresh that changed something and at every
        #: grant's expiry; the container re-checks the open client sessions with it.
        self.on_change: Callable[[], None] | None = None

    async def refresh(self) -> None:
        """Reload the care teams, unless the store's access version says they did not change
        since the last load: reading every patient's ward each time held the event loop for
        50 ms and more every few seconds at hospital scale (10,000 patients). The version is
        read first, so a change made while the teams are read is loaded again next time.

        Also writes the summaries of refused attempts whose minute ended."""
        self._flush_refusals(self.clock())
        version = await self.store.access_version()
        if self._loaded and version == self._version:
            return
        now = self.clock()
        teams = await self.store.care_teams(now)
        self._version = version
        self._loaded = True
        self._wards = teams["wards"]
        self._assigned = teams["assigned"]
        grants: dict[tuple[str, str], float] = teams["grants"]
        self._lapsed |= {k for k, until in self._grants.items() if until <= now and k not in grants}
        self._grants = grants
        self._ward_of = teams["ward_of"]
        self._users = teams["users"]
        self._arm_expiry()
        self._changed()

    def stop(self) -> None:
        """Cancel the grant-expiry timer (shutdown)."""
        if self._expiry is not None:
            self._expiry.cancel()
            self._expiry = None

    def _arm_expiry(self) -> None:
        """A timer for the next grant to run out, so the sessions relying on it are re-checked
        at that moment (not at the next refresh)."""
        self.stop()
        if self._grants:
            delay = min(self._grants.values()) - self.clock()
            loop = asyncio.get_running_loop()
            self._expiry = loop.call_later(max(delay, 0.0), self._expire)

    def _expire(self) -> None:
        self._expiry = None
        now = self.clock()
        ended = {k for k, until in self._grants.items() if until <= now}
        for k in ended:
            del self._grants[k]
        self._lapsed |= ended
        self._arm_expiry()
        if ended:
            self._changed()

    def _changed(self) -> None:
        try:
            if self.on_change is not None:
                self.on_change()
        except Exception:  # a failed re-check must not fail the change that caused it
            log.exception("re-checking open sessions failed")
        finally:
            self._lapsed.clear()

    # -- who is on the other end ----------------------------------------------------------------

    async def current(self, who: Principal) -> Principal:
        """The user behind a token as they are now: their current role (never the token's).

        A user this process does not know yet, or a token of a newer generation (both made a
        moment ago by another process, e.g. the admin CLI), reloads the care teams first.

        Raises:
            Unauthenticated: the user was deleted or disabled, or their tokens were revoked.
        """
        state = self._users.get(who.name)
        if state is None or who.gen > state.token_gen:
            await self.refresh()
        return self.current_now(who)

    def current_now(self, who: Principal) -> Principal:
        """:meth:`current` from what is loaded (no store read)."""
        state = self._users.get(who.name)
        if state is None:
            raise Unauthenticated("user no longer exists", field="token")
        if state.disabled:
            raise Unauthenticated("user is disabled", field="token")
        if state.token_gen != who.gen:
            raise Unauthenticated("token was revoked (password reset)", field="token")
        return who if who.role == state.role else Principal(who.name, state.role, who.gen)

    # -- questions ------------------------------------------------------------------------------

    def in_care(self, who: Principal, pid: str) -> bool:
        ward = self._ward_of.get(pid)
        return (ward is not None and ward in self._wards.get(who.name, ())) or pid in (
            self._assigned.get(who.name, ())
        )

    def has_break_glass(self, who: Principal, pid: str) -> bool:
        return self._grants.get((who.name, pid), 0.0) > self.clock()

    def via_break_glass(self, who: Principal, pid: str) -> bool:
        """``who`` sees ``pid`` only through a break-glass grant (audit rows are flagged)."""
        return who.role != "admin" and not self.in_care(who, pid) and self.has_break_glass(who, pid)

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
        if who.upstream:  # checked by the cloud before it sent the request down the uplink
            return True, ""
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

    def view_lost(self, who: Principal, pid: str, role_was: str) -> str | None:
        """``None`` while ``who`` may still watch ``pid``; else why not, for people."""
        if self.allowed(who, policy.VIEW, pid):
            return None
        if pid not in self._ward_of:
            return "the patient no longer exists"
        if (who.name, pid) in self._lapsed:
            return BREAK_GLASS_EXPIRED
        if who.role != role_was:
            return f"role changed to {who.role}"
        return "the patient is no longer in your care"

    # -- open sessions --------------------------------------------------------------------------

    def recheck(self, sessions: Iterable[ClientSession]) -> None:
        """Apply the access as it is now to open client sessions: a session whose user may no
        longer connect ends (an error naming why, then close 4001); a session takes its user's
        current role; a subscription whose right ended stops, and what of it is still queued is
        dropped; queued ``alerts`` events of patients no longer visible are dropped."""
        for session in list(sessions):
            if session.closed:
                continue
            was = session.principal
            try:
                who = self.current_now(was)
            except Unauthenticated as exc:
                session.revoke(exc)
                continue
            if who != was:
                session.reauthorize(who, self.stream_check(who), self.patient_filter(who))
            lost: dict[str, str] = {}
            for stream in session.subscriptions:
                pid = ev.stream_patient(stream)
                if pid is not None and (why := self.view_lost(who, pid, was.role)) is not None:
                    lost[stream] = why
            if lost:
                session.end_streams(lost)
            session.purge_alerts()

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

    def refused(
        self,
        who: str,
        attempted: str,
        pid: str | None,
        reason: str,
        origin: str | None,
        **detail: Any,
    ) -> None:
        """Audit a refused attempt (``refused``: the action attempted, the patient, why): the
        first :data:`REFUSALS_AUDITED_PER_MIN` of a minute per actor and origin (one connection
        on the socket), then only counted; the count goes in one ``refused_summary`` row when
        the minute ends."""
        now = self.clock()
        key = (who, origin)
        window = self._refusals.get(key)
        if window is not None and now - window[0] >= REFUSAL_WINDOW_S:
            self._summarise(key, window)
            window = None
        if window is None:
            window = self._refusals[key] = [now, 0, 0]
        if window[1] >= REFUSALS_AUDITED_PER_MIN:
            window[2] += 1
            return
        window[1] += 1
        self.audit(who, "refused", pid, {"action": attempted, "reason": reason, **detail}, origin)

    def _flush_refusals(self, now: float) -> None:
        ended = [k for k, w in self._refusals.items() if now - w[0] >= REFUSAL_WINDOW_S]
        for key in ended:
            self._summarise(key, self._refusals[key])

    def _summarise(self, key: tuple[str, str | None], window: list[float]) -> None:
        del self._refusals[key]
        if window[2]:
            detail = {
                "not_audited": int(window[2]),
                "since": window[0],
                "window_s": REFUSAL_WINDOW_S,
            }
            self.audit(key[0], "refused_summary", None, detail, key[1])
