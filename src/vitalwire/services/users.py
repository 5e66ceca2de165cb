"""User and care-team administration: the one place that checks and audits such a change.

``vitalwire admin`` calls it now, the REST admin API will call it too, so every way in refuses
the same things and writes the same audit entry. Each change is written by the store with its
audit entry in one transaction and sets a new access version, which running servers follow: a
disabled or deleted user, a new role, a care team that shrank applies to their open sessions as
well as to new requests. Nothing here keeps state between calls.

What it refuses (each error names the field): a user, patient, ward membership or assignment
that does not exist (``NotFound``); an unknown role, a bad id or a short password
(``InvalidMessage``); disabling, demoting or deleting the last enabled admin (``Conflict``, checked
by the store in the change's transaction), so that the system cannot lock its administrators
out. A change that would change nothing (a role already held, a user already disabled, a member
added again) writes nothing and reports ``changed: false``. No password or hash ever reaches
the audit log.
"""

from __future__ import annotations

import asyncio
import builtins
import json
from collections.abc import Awaitable, Callable
from typing import Any

from vitalwire.core import events as ev
from vitalwire.core.errors import NotFound
from vitalwire.core.text import clip
from vitalwire.services.auth import check_role, hash_password
from vitalwire.store import AuditRow, Store

#: How much of a name an error message quotes.
_QUOTED = 80


def _q(name: str) -> str:
    return clip(name, _QUOTED)


async def _hash_in_thread(password: str) -> str:
    return await asyncio.to_thread(hash_password, password)


def _no_user(username: str) -> NotFound:
    return NotFound(f"user {_q(username)} does not exist", field="username")


class Users:
    """Creates, changes and deletes users; puts them in and out of care teams.

    Every change takes the ``actor`` (who asks: ``cli:<system user>``, later an admin's name)
    and the ``origin`` (``cli``, later a client address) that its audit entry records."""

    def __init__(
        self,
        store: Store,
        clock: Callable[[], float],
        hasher: Callable[[str], Awaitable[str]] | None = None,
    ) -> None:
        self.store = store
        self.clock = clock
        #: hashes a new password off the event loop (a server passes its bounded login pool)
        self.hasher = hasher or _hash_in_thread

    def _audit(
        self,
        actor: str,
        origin: str | None,
        action: str,
        detail: dict[str, Any],
        patient_id: str | None = None,
    ) -> AuditRow:
        return AuditRow(self.clock(), actor, action, patient_id, json.dumps(detail), origin)

    async def _user(self, username: str) -> dict[str, Any]:
        """The user's row (role, disabled flag); NotFound naming ``username`` otherwise."""
        user = await self.store.get_user(username)
        if user is None:
            raise _no_user(username)
        return user | {"disabled": bool(user["disabled"])}

    # -- users ------------------------------------------------------------------------------

    async def list(self) -> builtins.list[dict[str, Any]]:  # the method's name hides the type
        """Every user with role, disabled flag, wards and assigned patients (no password hash)."""
        return await self.store.list_users()

    async def create(
        self, username: str, password: str, role: str, *, actor: str, origin: str | None
    ) -> dict[str, Any]:
        """A new user, password hashed with argon2 (off the event loop). Conflict when the name
        is taken."""
        ev.check_id("username", username)
        check_role(role)
        password_hash = await self.hasher(password)
        row = self._audit(actor, origin, "user_create", {"username": username, "role": role})
        await self.store.create_user(username, password_hash, role, self.clock(), audit=row)
        return {"username": username, "role": role}

    async def set_role(
        self, username: str, role: str, *, actor: str, origin: str | None
    ) -> dict[str, Any]:
        """Give a user another role; it applies to their next request and open sessions (the
        role is read from the store, never from a token)."""
        check_role(role)
        user = await self._user(username)
        out = {"username": username, "before": user["role"], "after": role}
        if user["role"] == role:
            return out | {"changed": False}
        await self.store.update_user(
            username,
            role=role,
            audit=self._audit(actor, origin, "user_role", out),
            keep_admin=True,
        )
        return out | {"changed": True}

    async def disable(self, username: str, *, actor: str, origin: str | None) -> dict[str, Any]:
        """Stop a user: no login, every token issued to them refused, their sessions ended."""
        user = await self._user(username)
        out = {"username": username, "role": user["role"]}
        if user["disabled"]:
            return out | {"changed": False}
        await self.store.update_user(
            username,
            disabled=True,
            revoke_tokens=True,
            audit=self._audit(actor, origin, "user_disable", out),
            keep_admin=True,
        )
        return out | {"changed": True}

    async def enable(self, username: str, *, actor: str, origin: str | None) -> dict[str, Any]:
        """Let a disabled user log in again (the tokens they had stay refused)."""
        user = await self._user(username)
        out = {"username": username, "role": user["role"]}
        if not user["disabled"]:
            return out | {"changed": False}
        await self.store.update_user(
            username, disabled=False, audit=self._audit(actor, origin, "user_enable", out)
        )
        return out | {"changed": True}

    async def delete(self, username: str, *, actor: str, origin: str | None) -> dict[str, Any]:
        """Delete a user with their ward memberships, assignments and break-glass grants; the
        audit entry lists what they had (the log keeps their name in older entries)."""
        # the listing, for what they had (wards and patients) to go in the audit entry
        everyone = await self.store.list_users()
        user = next((u for u in everyone if u["username"] == username), None)
        if user is None:
            raise _no_user(username)
        detail = {k: user[k] for k in ("username", "role", "wards", "patients")}
        await self.store.delete_user(
            username, audit=self._audit(actor, origin, "user_delete", detail), keep_admin=True
        )
        return detail | {"changed": True}

    async def reset_password(
        self, username: str, password: str, *, actor: str, origin: str | None
    ) -> dict[str, Any]:
        """Give a user a new password; every token issued to them before stops working."""
        await self._user(username)
        password_hash = await self.hasher(password)
        out = {"username": username}
        await self.store.update_user(
            username,
            password_hash=password_hash,
            revoke_tokens=True,
            audit=self._audit(actor, origin, "user_password_reset", out),
        )
        return out | {"changed": True}

    # -- care teams -------------------------------------------------------------------------

    async def add_to_ward(
        self, username: str, ward: str, *, actor: str, origin: str | None
    ) -> dict[str, Any]:
        """Make a user a member of a ward's care team. The ward need not have patients yet (a
        ward is staffed before its first admission); its name must be a valid id."""
        ev.check_id("ward", ward)
        await self._user(username)
        out = {"username": username, "ward": ward}
        added = await self.store.add_ward_member(
            username, ward, audit=self._audit(actor, origin, "ward_add", out)
        )
        return out | {"changed": added}

    async def remove_from_ward(
        self, username: str, ward: str, *, actor: str, origin: str | None
    ) -> dict[str, Any]:
        """Take a user out of a ward's care team (NotFound when they were not in it)."""
        await self._user(username)
        out = {"username": username, "ward": ward}
        if not await self.store.remove_ward_member(
            username, ward, audit=self._audit(actor, origin, "ward_remove", out)
        ):
            raise NotFound(f"user {_q(username)} is not a member of ward {_q(ward)}", field="ward")
        return out | {"changed": True}

    async def assign(
        self, username: str, patient_id: str, *, actor: str, origin: str | None
    ) -> dict[str, Any]:
        """Put one patient in a user's care, whatever their wards."""
        await self._user(username)
        if await self.store.get_patient(patient_id) is None:
            raise NotFound(f"patient {_q(patient_id)} does not exist", field="patient_id")
        out = {"username": username, "patient_id": patient_id}
        row = self._audit(actor, origin, "assign", {"username": username}, patient_id)
        return out | {"changed": await self.store.assign(username, patient_id, audit=row)}

    async def unassign(
        self, username: str, patient_id: str, *, actor: str, origin: str | None
    ) -> dict[str, Any]:
        """End a patient's individual assignment to a user (NotFound when there was none)."""
        await self._user(username)
        out = {"username": username, "patient_id": patient_id}
        row = self._audit(actor, origin, "unassign", {"username": username}, patient_id)
        if not await self.store.unassign(username, patient_id, audit=row):
            raise NotFound(
                f"patient {_q(patient_id)} is not assigned to {_q(username)}",
                field="patient_id",
            )
        return out | {"changed": True}
