"""Administration over the API (issue 26): one audited service for every administrative act.

Every method takes the acting :class:`~vitalwire.services.auth.Principal` and the client
address (``origin``); it refuses anyone but an admin (policy ``manage``, the refusal audited as
``refused``), acts, audits the act with the admin's name as actor, and makes it take effect at
once for live sessions:

- users and care teams go through :class:`~vitalwire.services.users.Users` (each change written
  with its audit row in one transaction), then the access cache is refreshed, which re-checks
  every open client session: a disabled or deleted user's sockets close (4001), a shrunk care
  team ends the subscriptions it no longer covers;
- devices and bindings go through this server's :class:`~vitalwire.services.registry.Registry`,
  which applies its own changes as it makes them: a device bound elsewhere has its next reading
  filed under its new patient, a disabled device or a rotated secret ends its session (4001);
- a discharged patient (``discharged_at``/``discharged_by`` set, with the audit row, in one
  transaction) loses every active binding (``binding`` ``unbind`` events on the patient's
  stream; the devices' next readings are filed under no patient) and cannot be bound again
  (409 naming ``patient_id``). Their record stays readable by their care team (history,
  alerts, audit); ``/admin/patients`` lists them only with ``include_discharged``. Open alerts
  are not resolved by the discharge: with no device bound no new alert is raised, and the open
  ones stay for the care team to acknowledge.
"""

from __future__ import annotations

import builtins
import json
from collections.abc import Awaitable, Callable
from typing import Any

from vitalwire.core import access as policy
from vitalwire.core import events as ev
from vitalwire.core.errors import Forbidden, NotFound
from vitalwire.services.access import Access
from vitalwire.services.alerts import AlertService
from vitalwire.services.auth import Principal
from vitalwire.services.registry import Registry
from vitalwire.services.users import Users
from vitalwire.store import AuditRow, Store


class Admin:
    """Users, care teams, patients, devices and bindings, for admins only."""

    def __init__(
        self,
        store: Store,
        registry: Registry,
        access: Access,
        clock: Callable[[], float],
        hasher: Callable[[str], Awaitable[str]] | None = None,
        alerts: AlertService | None = None,
    ) -> None:
        self.store = store
        self.registry = registry
        self.access = access
        self.clock = clock
        self.users = Users(store, clock, hasher=hasher)
        #: a live server's alert engines: a discharge ends the patient's open alerts
        self.alerts = alerts

    # -- helpers --------------------------------------------------------------------------------

    def check(self, who: Principal, attempted: str, origin: str | None, **detail: Any) -> None:
        """Admins only (policy ``manage``); a refusal is audited (``refused``) and raised."""
        try:
            self.access.check(who, policy.MANAGE)
        except Forbidden as exc:
            self.access.refused(who.name, attempted, None, exc.message, origin, **detail)
            raise

    def _audit(
        self,
        who: Principal,
        action: str,
        detail: dict[str, Any],
        origin: str | None,
        pid: str | None = None,
    ) -> None:
        self.access.audit(who.name, action, pid, detail, origin)

    async def _users_act(self, who: Principal, coro: Awaitable[dict[str, Any]]) -> dict[str, Any]:
        out = await coro
        if out.get("changed", True):
            await self.access.refresh()  # open sessions see the change now, not in 0.5 s
        return out

    # -- users ----------------------------------------------------------------------------------

    async def list_users(self, who: Principal, origin: str | None) -> builtins.list[dict[str, Any]]:
        self.check(who, "admin_list_users", origin)
        rows = await self.users.list()
        self._audit(who, "admin_list_users", {"count": len(rows)}, origin)
        return rows

    async def create_user(
        self, who: Principal, username: str, password: str, role: str, origin: str | None
    ) -> dict[str, Any]:
        self.check(who, "user_create", origin, username=username)
        return await self._users_act(
            who, self.users.create(username, password, role, actor=who.name, origin=origin)
        )

    async def set_role(
        self, who: Principal, username: str, role: str, origin: str | None
    ) -> dict[str, Any]:
        self.check(who, "user_role", origin, username=username)
        return await self._users_act(
            who, self.users.set_role(username, role, actor=who.name, origin=origin)
        )

    async def set_disabled(
        self, who: Principal, username: str, disabled: bool, origin: str | None
    ) -> dict[str, Any]:
        self.check(who, "user_disable" if disabled else "user_enable", origin, username=username)
        act = self.users.disable if disabled else self.users.enable
        return await self._users_act(who, act(username, actor=who.name, origin=origin))

    async def delete_user(
        self, who: Principal, username: str, origin: str | None
    ) -> dict[str, Any]:
        self.check(who, "user_delete", origin, username=username)
        return await self._users_act(
            who, self.users.delete(username, actor=who.name, origin=origin)
        )

    async def reset_password(
        self, who: Principal, username: str, password: str, origin: str | None
    ) -> dict[str, Any]:
        self.check(who, "user_password_reset", origin, username=username)
        return await self._users_act(
            who, self.users.reset_password(username, password, actor=who.name, origin=origin)
        )

    # -- care teams -----------------------------------------------------------------------------

    async def care_teams(self, who: Principal, origin: str | None) -> builtins.list[dict[str, Any]]:
        """Every ward (with a member or a patient) with its members and its patients, by name."""
        self.check(who, "admin_care_teams", origin)
        wards: dict[str, dict[str, Any]] = {}

        def ward(name: str) -> dict[str, Any]:
            return wards.setdefault(name, {"ward": name, "members": [], "patients": []})

        for u in await self.store.list_users():
            for w in u.get("wards") or ():
                ward(w)["members"].append(u["username"])
        for p in await self.store.list_patients():
            if p.get("discharged_at") is None:
                ward(p["ward"])["patients"].append(p["id"])
        out = [wards[k] for k in sorted(wards)]
        for w in out:
            w["members"].sort()
            w["patients"].sort()
        self._audit(who, "admin_care_teams", {"count": len(out)}, origin)
        return out

    async def add_member(
        self, who: Principal, ward: str, username: str, origin: str | None
    ) -> dict[str, Any]:
        self.check(who, "ward_add", origin, username=username, ward=ward)
        return await self._users_act(
            who, self.users.add_to_ward(username, ward, actor=who.name, origin=origin)
        )

    async def remove_member(
        self, who: Principal, ward: str, username: str, origin: str | None
    ) -> dict[str, Any]:
        self.check(who, "ward_remove", origin, username=username, ward=ward)
        return await self._users_act(
            who, self.users.remove_from_ward(username, ward, actor=who.name, origin=origin)
        )

    async def assign(
        self, who: Principal, username: str, pid: str, origin: str | None
    ) -> dict[str, Any]:
        self.check(who, "assign", origin, username=username, patient_id=pid)
        return await self._users_act(
            who, self.users.assign(username, pid, actor=who.name, origin=origin)
        )

    async def unassign(
        self, who: Principal, username: str, pid: str, origin: str | None
    ) -> dict[str, Any]:
        self.check(who, "unassign", origin, username=username, patient_id=pid)
        return await self._users_act(
            who, self.users.unassign(username, pid, actor=who.name, origin=origin)
        )

    # -- patients -------------------------------------------------------------------------------

    async def list_patients(
        self, who: Principal, include_discharged: bool, origin: str | None
    ) -> builtins.list[dict[str, Any]]:
        self.check(who, "admin_list_patients", origin)
        rows = [
            p
            for p in await self.store.list_patients()
            if include_discharged or p.get("discharged_at") is None
        ]
        self._audit(who, "admin_list_patients", {"count": len(rows)}, origin)
        return rows

    async def admit(
        self, who: Principal, pid: str, name: str, ward: str, origin: str | None
    ) -> dict[str, Any]:
        """A new patient in a ward (its care team sees them at once)."""
        self.check(who, "patient_admit", origin, patient_id=pid)
        out = await self.registry.create_patient(pid, name, ward)
        self._audit(who, "patient_admit", {"ward": ward}, origin, pid)
        await self.access.refresh()
        return out

    async def discharge(self, who: Principal, pid: str, origin: str | None) -> dict[str, Any]:
        """Discharge (see :func:`discharge_offline`), then the access cache is refreshed."""
        self.check(who, "patient_discharge", origin, patient_id=pid)
        self.registry.refuse_edge_patient(pid, "discharge them")
        out = await discharge_offline(self.store, self.registry, who, pid, origin)
        if self.alerts is not None:  # after the devices left: no offline alarm follows them
            out["alerts_ended"] = await self.alerts.discharge(pid, who.name)
        if out["changed"]:
            await self.access.refresh()
        return out

    # -- devices --------------------------------------------------------------------------------

    async def list_devices(
        self, who: Principal, origin: str | None
    ) -> builtins.list[dict[str, Any]]:
        self.check(who, "admin_list_devices", origin)
        rows = await self.store.list_devices()
        for r in rows:
            r["disabled"] = bool(r["disabled"])
        self._audit(who, "admin_list_devices", {"count": len(rows)}, origin)
        return rows

    async def register_device(
        self, who: Principal, did: str, kind: str, origin: str | None
    ) -> dict[str, Any]:
        """A new device; its secret is in the answer, once (stored only hashed)."""
        self.check(who, "device_register", origin, device_id=did)
        cred = await self.registry.create_device(did, kind)
        self._audit(who, "device_register", {"device_id": did, "kind": kind}, origin)
        return {"device_id": did, "kind": kind, "secret": cred.secret}

    async def rotate_secret(self, who: Principal, did: str, origin: str | None) -> dict[str, Any]:
        """A new secret (shown once); the device's open session ends (audited by Registry)."""
        self.check(who, "rotate_device_secret", origin, device_id=did)
        ev.check_id("device_id", did)
        cred = await self.registry.rotate_device_secret(did, actor=who.name, origin=origin)
        return {"device_id": did, "secret": cred.secret}

    async def set_device_disabled(
        self, who: Principal, did: str, disabled: bool, origin: str | None
    ) -> dict[str, Any]:
        """Disable (its open session ends at once, close 4001) or enable a device."""
        action = "device_disable" if disabled else "device_enable"
        self.check(who, action, origin, device_id=did)
        ev.check_id("device_id", did)
        await self.registry.set_device_disabled(did, disabled)
        self._audit(who, action, {"device_id": did}, origin)
        return {"device_id": did, "disabled": disabled}

    # -- bindings -------------------------------------------------------------------------------

    async def bind(self, who: Principal, did: str, pid: str, origin: str | None) -> dict[str, Any]:
        """Bind a device to a patient (a move when it was bound to another): its next reading
        is filed under ``pid``."""
        self.check(who, "bind", origin, device_id=did, patient_id=pid)
        ev.check_id("device_id", did)
        ev.check_id("patient_id", pid)
        previous = await self.registry.bind(did, pid)
        before = previous.patient_id if previous else None
        self._audit(who, "bind", {"device_id": did, "previous_patient_id": before}, origin, pid)
        return {"device_id": did, "patient_id": pid, "previous_patient_id": before}

    async def unbind(self, who: Principal, did: str, origin: str | None) -> dict[str, Any]:
        self.check(who, "unbind", origin, device_id=did)
        ev.check_id("device_id", did)
        if await self.store.get_device(did) is None:
            raise NotFound(f"device {did} does not exist", field="device_id")
        previous = await self.registry.unbind(did)
        before = previous.patient_id if previous else None
        self._audit(who, "unbind", {"device_id": did}, origin, before)
        return {"device_id": did, "previous_patient_id": before, "changed": previous is not None}


async def discharge_offline(
    store: Store, registry: Registry, who: Principal, pid: str, origin: str | None
) -> dict[str, Any]:
    """Discharge ``pid`` (no access check: the caller made it, or is the CLI on the store):
    marked with its audit row in one transaction, then every active binding ends through
    ``registry`` (announced on the patient's stream by a live server; a server following the
    store applies an offline one within a second). Discharging again changes nothing."""
    ev.check_id("patient_id", pid)
    patient = await store.get_patient(pid)
    if patient is None:
        raise NotFound(f"patient {pid} does not exist", field="patient_id")
    now = registry.clock()
    devices = list(patient.get("devices") or ())
    row = AuditRow(
        now, who.name, "patient_discharge", pid, json.dumps({"devices": devices}), origin
    )
    changed = await store.discharge_patient(pid, now, who.name, audit=row)
    unbound: list[str] = []
    for did in devices:  # marked first: no new binding can slip in meanwhile
        previous = await registry.unbind(did)
        if previous is not None and previous.patient_id == pid:
            unbound.append(did)
        elif previous is not None:  # moved meanwhile: not this patient's device any more
            await registry.bind(did, previous.patient_id)
    return {"id": pid, "discharged_at": now, "unbound": unbound, "changed": changed}
