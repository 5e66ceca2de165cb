"""Provision a ward (patients, devices with secrets, bindings, users): for the demo and tests."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from vitalwire.core.errors import Conflict
from vitalwire.services.registry import Registry
from vitalwire.store import Store

DEMO_USERS: tuple[tuple[str, str, str], ...] = (
    ("admin", "vitalwire-admin", "admin"),
    ("clinician", "vitalwire-clinician", "clinician"),
    ("viewer", "vitalwire-viewer", "viewer"),
)

_NAMES = (
    "Ada Lovelace",
    "Alan Turing",
    "Grace Hopper",
    "Edsger Dijkstra",
    "Barbara Liskov",
    "Donald Knuth",
    "Frances Allen",
    "John Backus",
    "Margaret Hamilton",
    "Ken Thompson",
    "Radia Perlman",
    "Tony Hoare",
    "Niklaus Wirth",
    "Karen Sparck Jones",
    "Leslie Lamport",
)


@dataclass
class WardCredentials:
    """What a simulator needs: device ids, their secrets and patients; demo user logins."""

    devices: list[dict[str, str]] = field(default_factory=list)
    users: list[dict[str, str]] = field(default_factory=list)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(asdict(self), indent=2))

    @classmethod
    def load(cls, path: str | Path) -> WardCredentials:
        data = json.loads(Path(path).read_text())
        return cls(devices=list(data.get("devices", [])), users=list(data.get("users", [])))


async def provision_ward(
    store: Store,
    *,
    patients: int = 12,
    ward: str = "ward-a",
    prefix: str = "",
    users: bool = True,
    clock: Callable[[], float] = time.time,
    registry: Registry | None = None,
) -> WardCredentials:
    """Create (or reuse) ``patients`` patients ``P001..``, one monitor each, bound; and demo users.

    Devices that exist already get a fresh secret, since secrets are stored only hashed.
    """
    reg = registry or Registry(store, clock)
    creds = WardCredentials()
    existing = {p["id"]: p for p in await store.list_patients()}
    for i in range(1, patients + 1):
        pid, did = f"{prefix}P{i:03d}", f"{prefix}mon-{i:03d}"
        if pid not in existing:
            await reg.create_patient(pid, _NAMES[(i - 1) % len(_NAMES)], ward)
        if await store.get_device(did) is None:
            cred = await reg.create_device(did, "multiparameter")
        else:
            cred = await reg.rotate_device_secret(did)
        binding = await store.active_binding(did)
        if binding is None or binding.patient_id != pid:
            await reg.bind(did, pid)
        creds.devices.append({"device_id": did, "secret": cred.secret, "patient_id": pid})
    if users:
        for username, password, role in DEMO_USERS:
            try:
                await reg.create_user(username, password, role)
            except Conflict:
                pass
            if role != "admin":  # the demo's clinician and viewer care for this ward
                await store.add_ward_member(username, ward)
            creds.users.append({"username": username, "password": password, "role": role})
    return creds
