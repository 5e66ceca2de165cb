"""The store interface: a handful of methods every backend (SQLite, PostgreSQL) implements.

The event log in the store is the source of truth; the bus's history is a cache in front of it.
Writes come in batches (one transaction per batch, never one per reading).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

from vitalwire.wire import Event


@dataclass(slots=True)
class ReadingRow:
    device_id: str
    seq: int
    patient_id: str | None
    stream_offset: int | None
    device_ts: float
    received_ts: float
    unbound_data: str | None = None


@dataclass(slots=True)
class AlertRow:
    """The state of one alert after a change (upserted by ``alert_id``)."""

    alert_id: str
    patient_id: str
    condition: str
    priority: str
    category: str
    state: str
    at: float
    acknowledged_by: str | None
    escalation_level: int
    last: str  # the change, as JSON


@dataclass(slots=True)
class AuditRow:
    at: float
    actor: str
    action: str
    patient_id: str | None
    detail: str  # JSON
    origin: str | None = None


@dataclass(slots=True)
class CommandRow:
    """The state of one command after a change (upserted by ``command_id``)."""

    command_id: str
    patient_id: str
    device_id: str
    name: str
    args: str  # JSON
    status: str
    requested_by: str
    idempotency_key: str | None
    created_at: float
    ttl_s: float
    timeout_s: float
    sent_at: float | None
    updated_at: float
    message: str | None = None
    result: str | None = None  # JSON


@dataclass(frozen=True, slots=True)
class Lease:
    """A node's right to write a stream (``stream_leases``): ``epoch`` is raised by every
    acquisition; ``head`` is the stream's last offset when it was read."""

    stream: str
    node: str
    epoch: int
    head: int
    expires_at: float


class Fenced(Exception):
    """A write batch named a stream whose lease this node no longer holds (another node
    acquired it), or whose head moved: nothing of the batch was written."""

    def __init__(self, streams: set[str]) -> None:
        super().__init__(f"not this node's to write any more: {', '.join(sorted(streams))}")
        self.streams = streams


@dataclass(slots=True)
class Batch:
    """What one transaction writes.

    ``fence``: for several nodes on one store, ``stream -> (node, epoch, first offset, last
    offset)`` of the batch's events: the transaction checks each lease and moves its head, or
    raises :class:`Fenced` and writes nothing (docs/architecture.md, "One writer per stream")."""

    readings: list[ReadingRow] = field(default_factory=list)
    events: list[Event] = field(default_factory=list)
    alerts: list[AlertRow] = field(default_factory=list)
    audit: list[AuditRow] = field(default_factory=list)
    commands: list[CommandRow] = field(default_factory=list)
    fence: dict[str, tuple[str, int, int, int]] | None = None
    #: Streams whose offsets the store assigns in the transaction (several nodes write them:
    #: the ``alerts`` stream in a cluster). Their events' offsets are replaced, in batch order,
    #: by the ones after the stream's counter row, which the transaction holds locked to its
    #: commit: commits of such a stream are ordered as its offsets are.
    sequenced: frozenset[str] = frozenset()

    def __len__(self) -> int:
        return (
            len(self.readings)
            + len(self.events)
            + len(self.alerts)
            + len(self.audit)
            + len(self.commands)
        )


@dataclass(frozen=True, slots=True)
class RegistryChange:
    """One change of the registry, as the store logged it in the transaction that made it.

    ``kind`` is one of :data:`CHANGE_KINDS`: ``bind`` (``patient_id`` is the new patient,
    ``previous_patient_id`` the one the device left, if any), ``unbind`` (``previous_patient_id``:
    the patient it left, if any), ``disable``, ``enable``, ``secret`` (a new device secret), or
    ``patient`` (``patient_id`` was created). ``id`` grows in commit order. ``source`` is the
    writing store's :attr:`Store.source`; ``announced``: the writer was a running server that put
    the change's events in the streams and applied it to its sessions itself.
    """

    id: int
    at: float
    kind: str
    device_id: str | None
    patient_id: str | None
    previous_patient_id: str | None
    source: str
    announced: bool


CHANGE_KINDS = ("bind", "unbind", "disable", "enable", "secret", "patient")


@dataclass(frozen=True, slots=True)
class UserState:
    """What access control needs of a user, read from the store (never from a token)."""

    role: str
    disabled: bool
    #: tokens issued under another generation are refused (a password reset raises it)
    token_gen: int


@dataclass(frozen=True, slots=True)
class Binding:
    device_id: str
    patient_id: str
    start_ts: float
    end_ts: float | None


class Store(Protocol):
    """Persistence. ``url`` picks the backend (see :func:`vitalwire.store.open_store`)."""

    backend: str
    transactions: int  # committed write transactions, for tests and metrics
    #: this store object's random id, logged with every registry change it writes
    source: str

    async def open(self) -> None: ...
    async def close(self) -> None: ...
    async def migration_current(self) -> bool: ...

    # the event log
    async def write_batch(self, batch: Batch) -> None: ...
    async def stream_heads(self) -> dict[str, int]: ...
    # one writer per stream, for several nodes (docs/architecture.md)
    async def acquire_stream(
        self, stream: str, node: str, now: float, ttl_s: float, *, force: bool = False
    ) -> Lease | None: ...
    async def renew_streams(
        self, node: str, held: dict[str, int], now: float, ttl_s: float
    ) -> set[str]: ...
    async def release_streams(self, node: str, held: dict[str, int]) -> None: ...
    async def lapsed_leases(self, now: float, limit: int = 1000) -> list[Lease]: ...
    async def lease_summary(self) -> list[tuple[str, str, int, float]]: ...
    async def stream_lease(self, stream: str) -> Lease | None: ...
    async def events_after(self, stream: str, after: int, limit: int) -> list[Event]: ...
    async def first_offset(self, stream: str) -> int | None: ...
    async def recent_events(self, stream: str, limit: int) -> list[Event]: ...
    # vitals history: a stream's readings (with a metric) with ts_from <= ts < ts_to, ordered by
    # (ts, offset), after the position (ts, offset) ``after`` when given; its device_status
    # events in the range
    async def readings_between(
        self,
        stream: str,
        ts_from: float,
        ts_to: float,
        after: tuple[float, int] | None,
        limit: int,
    ) -> list[Event]: ...
    async def status_between(self, stream: str, ts_from: float, ts_to: float) -> list[Event]: ...
    async def rollups_between(
        self, stream: str, start_from: int, start_to: int, metrics: list[str]
    ) -> tuple[int, list[tuple[int, str, float, float, float, int, float, int, float]]]: ...
    async def delete_events_before(self, ts: float) -> int: ...
    async def device_last_seq(self, device_id: str) -> int: ...

    # registry
    # Registry changes (create_patient, set_device_secret, bind, unbind, set_device_disabled)
    # log a RegistryChange in their own transaction; ``announced`` goes into it.
    async def create_patient(
        self, pid: str, name: str, ward: str, now: float, *, announced: bool = False
    ) -> None: ...
    async def list_patients(self) -> list[dict[str, Any]]: ...
    async def get_patient(self, pid: str) -> dict[str, Any] | None: ...
    async def create_device(self, did: str, secret_hash: str, kind: str, now: float) -> None: ...
    async def set_device_secret(
        self,
        did: str,
        secret_hash: str,
        now: float,
        *,
        audit: AuditRow | None = None,
        announced: bool = False,
    ) -> None: ...
    async def get_device(self, did: str) -> dict[str, Any] | None: ...
    async def bind(
        self, did: str, pid: str, now: float, *, announced: bool = False
    ) -> Binding | None: ...
    async def unbind(self, did: str, now: float, *, announced: bool = False) -> Binding | None: ...
    async def active_binding(self, did: str) -> Binding | None: ...
    async def create_user(
        self,
        username: str,
        password_hash: str,
        role: str,
        now: float,
        *,
        audit: AuditRow | None = None,
    ) -> None: ...
    async def get_user(self, username: str) -> dict[str, Any] | None: ...
    async def list_users(self) -> list[dict[str, Any]]: ...
    # user changes write ``audit`` in their transaction and change the access version
    async def update_user(
        self,
        username: str,
        *,
        role: str | None = None,
        disabled: bool | None = None,
        password_hash: str | None = None,
        revoke_tokens: bool = False,
        audit: AuditRow | None = None,
        keep_admin: bool = False,
    ) -> dict[str, Any]: ...
    async def delete_user(
        self, username: str, *, audit: AuditRow | None = None, keep_admin: bool = False
    ) -> None: ...
    async def remove_ward_member(
        self, username: str, ward: str, *, audit: AuditRow | None = None
    ) -> bool: ...
    async def unassign(self, username: str, pid: str, *, audit: AuditRow | None = None) -> bool: ...
    async def get_meta(self, key: str) -> str | None: ...
    async def alerts_for(self, pid: str, limit: int) -> list[dict[str, Any]]: ...
    async def open_alerts(self, patient_id: str | None = None) -> list[dict[str, Any]]: ...
    async def list_alerts(
        self, filters: dict[str, Any], after: tuple[float, str] | None, limit: int
    ) -> list[dict[str, Any]]:
        """Alerts newest first (raised_at, alert_id descending), after the ``(raised_at,
        alert_id)`` position ``after``; ``filters``: ``patients`` (ids; absent: all), ``state``,
        ``priority``, ``since`` (raised_at >=), ``until`` (raised_at <)."""
        ...

    async def list_commands(
        self, filters: dict[str, Any], after: tuple[float, str] | None, limit: int
    ) -> list[dict[str, Any]]:
        """Commands (their latest state) newest first (created_at, command_id descending),
        after the ``(created_at, command_id)`` position ``after``; ``filters``: ``patients``
        (ids; absent: all), ``device``, ``status``, ``since`` (created_at >=), ``until``
        (created_at <)."""
        ...

    async def list_devices(self) -> list[dict[str, Any]]:
        """Every device by id: ``id``, ``kind``, ``disabled``, ``created_at`` and ``patient_id``
        (its active binding's patient, or None). Never its secret hash."""
        ...

    async def events_of_kind_between(
        self, stream: str, kind: str, ts_from: float, ts_to: float, limit: int
    ) -> list[Event]:
        """Events of ``kind`` in ``stream`` with ``ts_from <= ts <= ts_to`` in (ts, offset)
        order, at most ``limit``, ``kind`` not a reading: one range scan of the partial index
        ix_events_stream_kind_ts_other (a command's lifecycle)."""
        ...

    async def discharge_patient(
        self, pid: str, now: float, by: str, *, audit: AuditRow | None = None
    ) -> bool:
        """Mark a patient discharged (``discharged_at``/``discharged_by``) with ``audit`` in
        the same transaction, and change the access version. False (nothing written) when the
        patient was already discharged; NotFound when there is no such patient."""
        ...

    async def audit_log(
        self,
        limit: int,
        patient_id: str | None = None,
        *,
        actor: str | None = None,
        action: str | None = None,
        since: float | None = None,
        until: float | None = None,
        before: int | None = None,
    ) -> list[dict[str, Any]]:
        """Audit rows newest first (by id), filtered by each given field (``since <= at <
        until``; ``before``: ids below it, the keyset of the next page)."""
        ...

    async def save_snapshots(self, rows: list[tuple[str, int, str]], now: float) -> None: ...
    async def load_snapshots(self) -> dict[str, tuple[int, str]]: ...
    async def open_commands(self, patient_id: str | None = None) -> list[dict[str, Any]]: ...
    async def get_command(self, command_id: str) -> dict[str, Any] | None: ...
    async def care_teams(self, now: float) -> dict[str, Any]: ...
    async def access_version(self) -> str | None: ...
    async def add_ward_member(
        self, username: str, ward: str, *, audit: AuditRow | None = None
    ) -> bool: ...
    async def assign(self, username: str, pid: str, *, audit: AuditRow | None = None) -> bool: ...
    async def add_grant(
        self, username: str, pid: str, reason: str, now: float, expires_at: float
    ) -> None: ...
    async def set_device_disabled(
        self, did: str, disabled: bool, now: float | None = None, *, announced: bool = False
    ) -> None: ...
    async def registry_changes(self, after: int, limit: int = 1000) -> list[RegistryChange]: ...
    async def registry_change_head(self) -> int: ...
    async def patient_settings(
        self, patient_id: str | None = None
    ) -> dict[str, dict[str, Any]]: ...
    async def set_patient_settings(
        self, pid: str, limits: str | None, observations: str | None, now: float, by: str
    ) -> None: ...
    async def set_meta(self, key: str, value: str) -> None: ...
