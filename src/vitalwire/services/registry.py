"""Patients, devices, bindings and users: creation, device and user authentication."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from vitalwire.core import events as ev
from vitalwire.core.errors import InvalidMessage, NotFound, Unauthenticated
from vitalwire.services import auth
from vitalwire.services.streams import Streams
from vitalwire.services.writer import BatchWriter
from vitalwire.store import Binding, Store


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
        #: (device, new patient or None, previous patient or None)
        self.on_binding_change: Callable[[str, str | None, str | None], None] | None = None

    async def create_patient(self, pid: str, name: str, ward: str) -> dict[str, Any]:
        ev.check_id("patient_id", pid)
        ev.check_id("ward", ward)
        if not name.strip() or len(name) > 200:
            raise InvalidMessage("name must be 1 to 200 characters", field="name")
        await self.store.create_patient(pid, name, ward, self.clock())
        return {"id": pid, "name": name, "ward": ward}

    async def create_device(self, did: str, kind: str = "monitor") -> DeviceCredential:
        """Create a device and return its secret: shown once, stored only hashed."""
        ev.check_id("device_id", did)
        ev.check_id("kind", kind)
        secret = auth.new_device_secret()
        await self.store.create_device(did, auth.hash_device_secret(secret), kind, self.clock())
        return DeviceCredential(did, secret)

    async def rotate_device_secret(self, did: str) -> DeviceCredential:
        """Give a device a new secret (shown once); the old one stops working."""
        if await self.store.get_device(did) is None:
            raise NotFound(f"device {did} does not exist", field="device_id")
        secret = auth.new_device_secret()
        await self.store.set_device_secret(did, auth.hash_device_secret(secret))
        return DeviceCredential(did, secret)

    async def create_user(self, username: str, password: str, role: str) -> dict[str, str]:
        ev.check_id("username", username)
        auth.check_role(role)
        await self.store.create_user(username, auth.hash_password(password), role, self.clock())
        return {"username": username, "role": role}

    async def bind(self, did: str, pid: str) -> Binding | None:
        """Bind a device to a patient, ending its previous binding (a transfer)."""
        if await self.store.get_device(did) is None:
            raise NotFound(f"device {did} does not exist", field="device_id")
        if await self.store.get_patient(pid) is None:
            raise NotFound(f"patient {pid} does not exist", field="patient_id")
        now = self.clock()
        previous = await self.store.bind(did, pid, now)
        if previous is not None and previous.patient_id != pid:
            self._binding_event(previous.patient_id, did, "unbind", now)
        self._binding_event(pid, did, "bind", now)
        if self.on_binding_change is not None:
            self.on_binding_change(did, pid, previous.patient_id if previous else None)
        return previous

    async def unbind(self, did: str) -> Binding | None:
        now = self.clock()
        previous = await self.store.unbind(did, now)
        if previous is not None:
            self._binding_event(previous.patient_id, did, "unbind", now)
        if self.on_binding_change is not None:
            self.on_binding_change(did, None, previous.patient_id if previous else None)
        return previous

    def _binding_event(self, pid: str, did: str, action: str, now: float) -> None:
        if self.streams is None or self.writer is None:
            return  # offline administration (CLI on the store): the server is not running here
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

    async def authenticate_user(self, username: str, password: str) -> auth.Principal:
        row = await self.store.get_user(username)
        ok = auth.verify_password(row["password_hash"] if row else None, password)
        if row is None or not ok:
            raise Unauthenticated("wrong username or password", field="password")
        return auth.Principal(row["username"], row["role"])
