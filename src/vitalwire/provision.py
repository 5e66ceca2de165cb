"""Provision a ward (patients, devices with secrets, bindings, users): for the demo and tests.

A device's secret is stored only hashed, so provisioning a device that exists already cannot
recover its secret: it reuses a secret it is given (``known_secrets``, checked against the
stored hash), or refuses (:class:`SecretsUnknown`), or, only when asked (``rotate_secrets``),
gives the device a new secret through :meth:`Registry.rotate_device_secret`, which audits it.
A user that exists already keeps their password: provisioning lists their login only when the
password it was given is theirs.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from vitalwire.core import events as ev
from vitalwire.core.errors import Conflict
from vitalwire.services import auth
from vitalwire.services.registry import Registry
from vitalwire.store import Store

#: The demo's logins (username, password, role): ``vitalwire demo`` only, never a real store.
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


class SecretsUnknown(Conflict):
    """Devices exist already and no valid secret of theirs was given: using them would need new
    secrets, which would cut off whoever uses the current ones."""

    def __init__(self, device_ids: Sequence[str]) -> None:
        self.device_ids = list(device_ids)
        super().__init__(
            f"devices {id_span(self.device_ids)} exist already and their secrets are not known",
            field="device_id",
        )


def id_span(ids: Sequence[str]) -> str:
    """``a`` for one id, ``a..z`` (first and last, with the count past two) for more."""
    if len(ids) <= 2:
        return ", ".join(ids)
    return f"{ids[0]}..{ids[-1]} ({len(ids)})"


@dataclass
class WardCredentials:
    """What a simulator needs: device ids, their secrets and patients; user logins."""

    devices: list[dict[str, str]] = field(default_factory=list)
    users: list[dict[str, str]] = field(default_factory=list)

    def save(self, path: str | Path) -> None:
        """Write the JSON, readable by its owner only (it holds secrets and passwords)."""
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(json.dumps(asdict(self), indent=2))
        os.chmod(path, 0o600)  # a file that existed keeps its mode through os.open

    @classmethod
    def load(cls, path: str | Path) -> WardCredentials:
        data = json.loads(Path(path).read_text())
        return cls(devices=list(data.get("devices", [])), users=list(data.get("users", [])))

    def secrets(self) -> dict[str, str]:
        """Device id -> secret, for ``provision_ward(known_secrets=...)``."""
        return {d["device_id"]: d["secret"] for d in self.devices if "secret" in d}

    def passwords(self) -> dict[str, str]:
        """Username -> password."""
        return {u["username"]: u["password"] for u in self.users if "password" in u}

    def merge(self, newer: WardCredentials) -> WardCredentials:
        """These credentials with ``newer``'s devices and users replacing those of the same id."""
        devices = {d["device_id"]: d for d in self.devices} | {
            d["device_id"]: d for d in newer.devices
        }
        users = {u["username"]: u for u in self.users} | {u["username"]: u for u in newer.users}
        return WardCredentials(devices=list(devices.values()), users=list(users.values()))


async def provision_ward(
    store: Store,
    *,
    patients: int = 12,
    ward: str = "ward-a",
    prefix: str = "",
    users: Sequence[tuple[str, str, str]] = DEMO_USERS,
    known_secrets: Mapping[str, str] | None = None,
    rotate_secrets: bool = False,
    actor: str = "provision",
    origin: str | None = None,
    clock: Callable[[], float] = time.time,
    registry: Registry | None = None,
) -> WardCredentials:
    """Create (or reuse) patients ``{prefix}P001..`` in ``ward``, one monitor
    ``{prefix}mon-001..`` each, bound to it; and ``users`` (the clinicians and viewers among them
    care for ``ward``).

    Args:
        users: (username, password, role) to create; one that exists keeps its password, and is
            in the result only when the password given is its password.
        known_secrets: device id -> secret, of devices that may exist already (a saved
            credentials file); a secret that does not match the stored hash is not used.
        rotate_secrets: give existing devices whose secret is not known a new one, audited by
            :meth:`Registry.rotate_device_secret` as ``actor`` from ``origin``. Without it such
            devices make the call fail before anything is changed.

    Returns:
        Every device's id, secret and patient; the users whose login is known.

    Raises:
        SecretsUnknown: devices exist, their secret is not known, and ``rotate_secrets`` is off.
        InvalidMessage: an id that ``prefix`` or ``ward`` makes invalid.
    """
    reg = registry or Registry(store, clock)
    known = dict(known_secrets or {})
    ev.check_id("ward", ward)
    ids = [(f"{prefix}P{i:03d}", f"{prefix}mon-{i:03d}") for i in range(1, patients + 1)]
    for pid, did in ids:
        ev.check_id("patient_id", pid)
        ev.check_id("device_id", did)
    secrets: dict[str, str | None] = {}  # None: to create
    unknown: list[str] = []
    for _, did in ids:
        row = await store.get_device(did)
        if row is None:
            secrets[did] = None
        elif did in known and auth.verify_device_secret(row["secret_hash"], known[did]):
            secrets[did] = known[did]
        else:
            unknown.append(did)
    if unknown and not rotate_secrets:
        raise SecretsUnknown(unknown)

    creds = WardCredentials()
    existing = {p["id"] for p in await store.list_patients()}
    for i, (pid, did) in enumerate(ids):
        if pid not in existing:
            await reg.create_patient(pid, _NAMES[i % len(_NAMES)], ward)
        secret = secrets.get(did)
        if did in unknown:
            secret = (await reg.rotate_device_secret(did, actor=actor, origin=origin)).secret
        elif secret is None:
            secret = (await reg.create_device(did, "multiparameter")).secret
        binding = await store.active_binding(did)
        if binding is None or binding.patient_id != pid:
            await reg.bind(did, pid)
        creds.devices.append({"device_id": did, "secret": secret, "patient_id": pid})
    for username, password, role in users:
        try:
            await reg.create_user(username, password, role)
        except Conflict:
            row = await store.get_user(username)
            if row is None or not auth.verify_password(row["password_hash"], password):
                continue  # not ours to change; its login is not known
        if role != "admin":  # clinicians and viewers care for this ward
            await store.add_ward_member(username, ward)
        creds.users.append({"username": username, "password": password, "role": role})
    return creds
