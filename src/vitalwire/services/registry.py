"""Patients, devices, bindings and users: creation, device and user authentication.

How a change reaches a running server: every change of a binding, of a device's secret or
disabled flag, and every new patient is logged by the store in the transaction that makes it (a
:class:`~vitalwire.store.base.RegistryChange`). A server's own changes apply at once, through the
hooks below. A change made by another process (``vitalwire admin`` on the store) is read by the
server's :meth:`Registry.follow_changes` every ``REGISTRY_REFRESH_S`` (0.5 s, services/container):
a binding moves a connected device's session before the next reading is taken (the streams get
the ``binding`` events the server would have written itself), a disabled device or a rotated
secret ends the device's session, a new patient reaches the access cache.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from vitalwire.core import events as ev
from vitalwire.core.errors import Conflict, InvalidMessage, NotFound, Unauthenticated
from vitalwire.services import auth
from vitalwire.services.streams import Streams
from vitalwire.services.writer import BatchWriter
from vitalwire.store import AuditRow, Binding, Store
from vitalwire.store.base import RegistryChange

log = logging.getLogger("vitalwire.registry")

#: The offline reason and close reason of a device session ended by a registry change.
DISABLED = "device disabled"
ROTATED = "device secret rotated"


@dataclass(frozen=True, slots=True)
class DeviceCredential:
    device_id: str
    secret: str


class Registry:
    """Creates and looks up patients, devices, users; binds devices to patients."""

    def __init__(
        self,
        store: Store,
        clock: Callable[[], float],
        streams: Streams | None = None,
        writer: BatchWriter | None = None,
    ) -> None:
        self.store = store
        self.clock = clock
        self.streams = streams
        self.writer = writer
        #: On a cloud: patient id -> the edge node that owns it, or None (services/edges.py)
        self.edge_owner: Callable[[str], str | None] | None = None
        #: (device, new patient or None, previous patient or None); never awaits, so the next
        #: reading the server takes goes to the new patient
        self.on_binding_change: Callable[[str, str | None, str | None], None] | None = None
        #: (device, reason): the device was disabled or its secret rotated; end its session
        self.on_revoked: Callable[[str, str], Awaitable[None]] | None = None
        #: patients were created (by any process): the access cache loads them
        self.on_new_patients: Callable[[], Awaitable[None]] | None = None
        #: Several nodes (services/cluster.py): writes a binding event where the patient's
        #: stream is written, ``(patient, device, action, at, made_here)``; ``made_here``: the
        #: change was made through this node (else every node read it from the store)
        self.binding_writer: Callable[[str, str, str, float, bool], None] | None = None
        self._seen: int | None = None  # the last registry change followed
        self._following = asyncio.Lock()  # one reader at a time: each change applies once

    @property
    def live(self) -> bool:
        """In a running server (with its streams): changes are applied here as they are made.
        Without (``vitalwire admin`` on the store), a running server applies them when it reads
        them (:meth:`follow_changes`)."""
        return self.streams is not None and self.writer is not None

    async def create_patient(self, pid: str, name: str, ward: str) -> dict[str, Any]:
        ev.check_id("patient_id", pid)
        ev.check_id("ward", ward)
        if not name.strip() or len(name) > 200:
            raise InvalidMessage("name must be 1 to 200 characters", field="name")
        await self.store.create_patient(pid, name, ward, self.clock(), announced=self.live)
        return {"id": pid, "name": name, "ward": ward}

    async def create_device(self, did: str, kind: str = "monitor") -> DeviceCredential:
        """Create a device and return its secret: shown once, stored only hashed."""
        ev.check_id("device_id", did)
        ev.check_id("kind", kind)
        secret = auth.new_device_secret()
        await self.store.create_device(did, auth.hash_device_secret(secret), kind, self.clock())
        return DeviceCredential(did, secret)

    async def rotate_device_secret(
        self, did: str, *, actor: str = "system", origin: str | None = None
    ) -> DeviceCredential:
        """Give a device a new secret (shown once); the old one stops working, and a session
        the device has open on a running server ends (close 4001, ``device secret rotated``).

        The audit log gets ``rotate_device_secret`` by ``actor`` from ``origin`` (detail: the
        device id) in the same transaction as the new secret.

        Raises:
            NotFound: no such device.
        """
        secret = auth.new_device_secret()
        now = self.clock()
        detail = json.dumps({"device_id": did})
        row = AuditRow(now, actor, "rotate_device_secret", None, detail, origin)
        await self.store.set_device_secret(
            did, auth.hash_device_secret(secret), now, audit=row, announced=self.live
        )
        if self.live and self.on_revoked is not None:
            await self.on_revoked(did, ROTATED)
        return DeviceCredential(did, secret)

    async def set_device_disabled(self, did: str, disabled: bool) -> None:
        """Refuse (or accept again) a device's connections; disabling ends a session it has
        open on a running server (close 4001, ``device disabled``).

        Raises:
            NotFound: no such device.
        """
        await self.store.set_device_disabled(did, disabled, self.clock(), announced=self.live)
        if disabled and self.live and self.on_revoked is not None:
            await self.on_revoked(did, DISABLED)

    async def create_user(self, username: str, password: str, role: str) -> dict[str, str]:
        ev.check_id("username", username)
        auth.check_role(role)
        await self.store.create_user(username, auth.hash_password(password), role, self.clock())
        return {"username": username, "role": role}

    async def bind(self, did: str, pid: str) -> Binding | None:
        """Bind a device to a patient, ending its previous binding (a transfer). A discharged
        patient gets no new binding (``Conflict`` naming ``patient_id``)."""
        if await self.store.get_device(did) is None:
            raise NotFound(f"device {did} does not exist", field="device_id")
        patient = await self.store.get_patient(pid)
        if patient is None:
            raise NotFound(f"patient {pid} does not exist", field="patient_id")
        if patient.get("discharged_at") is not None:
            raise Conflict(f"patient {pid} was discharged: no new bindings", field="patient_id")
        self.refuse_edge_patient(pid, "bind their devices")
        now = self.clock()
        previous = await self.store.bind(did, pid, now, announced=self.live)
        if previous is not None and previous.patient_id != pid:
            self._binding_event(previous.patient_id, did, "unbind", now, True)
        self._binding_event(pid, did, "bind", now, True)
        if self.on_binding_change is not None:
            self.on_binding_change(did, pid, previous.patient_id if previous else None)
        return previous

    def refuse_edge_patient(self, pid: str, what: str) -> None:
        """On a cloud, a patient an edge node owns is changed at that edge, never here (this
        node must not write into the edge's stream: services/edges.py)."""
        node = self.edge_owner(pid) if self.edge_owner is not None else None
        if node is not None:
            raise Conflict(
                f"patient {pid} belongs to edge node {node}: {what} there", field="patient_id"
            )

    async def unbind(self, did: str) -> Binding | None:
        now = self.clock()
        previous = await self.store.unbind(did, now, announced=self.live)
        if previous is not None:
            self._binding_event(previous.patient_id, did, "unbind", now, True)
        if self.on_binding_change is not None:
            self.on_binding_change(did, None, previous.patient_id if previous else None)
        return previous

    async def start_following(self) -> None:
        """Follow registry changes from now on (the server's state already holds the older)."""
        self._seen = await self.store.registry_change_head()

    async def follow_changes(self) -> list[RegistryChange]:
        """Apply the registry changes made since the last call by anyone but this server
        (which applied its own as it made them); return every change read.

        One query when nothing changed. The bindings are applied in the store's commit order
        with no await between reading them and applying the last, so a reading taken after this
        call read a change never goes to the patient the change took the device from.
        """
        async with self._following:
            return await self._follow()

    async def _follow(self) -> list[RegistryChange]:
        if self._seen is None:
            await self.start_following()
        assert self._seen is not None
        changes = await self.store.registry_changes(self._seen)
        if not changes:
            return changes
        self._seen = changes[-1].id
        now = self.clock()
        revoked: list[tuple[str, str]] = []
        for c in changes:
            if c.kind == "patient" or c.device_id is None:
                continue
            if c.announced and c.source == self.store.source:
                continue  # this server's own change: applied when it was made
            did, pid, old = c.device_id, c.patient_id, c.previous_patient_id
            if c.kind == "bind" and pid is not None:
                if not c.announced:  # made offline: the events are for this server to write
                    if old is not None and old != pid:
                        self._binding_event(old, did, "unbind", now, False)
                    self._binding_event(pid, did, "bind", now, False)
                if self.on_binding_change is not None:
                    self.on_binding_change(did, pid, old)
            elif c.kind == "unbind":
                if not c.announced and old is not None:
                    self._binding_event(old, did, "unbind", now, False)
                if self.on_binding_change is not None:
                    self.on_binding_change(did, None, old)
            elif c.kind in ("disable", "secret"):
                revoked.append((did, DISABLED if c.kind == "disable" else ROTATED))
        for did, why in revoked:
            if self.on_revoked is not None:
                try:
                    await self.on_revoked(did, why)
                except Exception:  # the others still apply
                    log.exception("ending the session of device %s failed", did)
        if self.on_new_patients is not None and any(c.kind == "patient" for c in changes):
            await self.on_new_patients()
        return changes

    def _binding_event(self, pid: str, did: str, action: str, now: float, made_here: bool) -> None:
        if self.streams is None or self.writer is None:
            return  # offline administration (CLI on the store): the server is not running here
        if self.binding_writer is not None:
            self.binding_writer(pid, did, action, now, made_here)
        else:
            self.write_binding_event(pid, did, action, now)

    def write_binding_event(self, pid: str, did: str, action: str, now: float) -> None:
        """The ``binding`` event of ``pid``'s stream, written by this node."""
        assert self.streams is not None and self.writer is not None
        event = self.streams.new_event(
            ev.patient_stream(pid), ev.BINDING, now, {"device": did, "action": action}
        )
        self.writer.submit([], [event])

    async def authenticate_device(self, did: str, secret: str) -> dict[str, Any]:
        row = await self.store.get_device(did)
        if row is None or not auth.verify_device_secret(row["secret_hash"], secret):
            raise Unauthenticated("unknown device or wrong secret", field="secret")
        if row["disabled"]:
            raise Unauthenticated(f"device {did} is disabled", field="device_id")
        return row

    async def authenticate_user(
        self,
        username: str,
        password: str,
        verify: Callable[[str | None, str], Awaitable[bool]] | None = None,
    ) -> auth.Principal:
        """The user, when the password is theirs and they are not disabled.

        The argon2 check takes about 100 ms of CPU: it never runs on the event loop (alarms wait
        behind it there). ``verify`` runs it (the server's login service: a bounded pool of
        threads); without it, a thread of its own (the CLI, tests)."""
        row = await self.store.get_user(username)
        stored = row["password_hash"] if row else None
        if verify is None:
            ok = await asyncio.to_thread(auth.verify_password, stored, password)
        else:
            ok = await verify(stored, password)
        if row is None or not ok:
            raise Unauthenticated("wrong username or password", field="password")
        if row.get("disabled"):
            raise Unauthenticated(f"user {username} is disabled", field="username")
        return auth.Principal(row["username"], row["role"], row.get("token_gen") or 0)
