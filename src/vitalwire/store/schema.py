"""The tables, as SQLAlchemy Core metadata. Migrations (``migrations/versions``) create the same."""

from __future__ import annotations

from sqlalchemy import (
    BigInteger,
    Boolean,
    Column,
    Float,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    false,
    text,
)

metadata = MetaData()

meta = Table(
    "meta",
    metadata,
    Column("key", String(64), primary_key=True),
    Column("value", Text, nullable=False),
)

patients = Table(
    "patients",
    metadata,
    Column("id", String(64), primary_key=True),
    Column("name", String(200), nullable=False),
    Column("ward", String(64), nullable=False),
    Column("created_at", Float, nullable=False),
    # migration 0009: NULL while admitted
    Column("discharged_at", Float, nullable=True),
    Column("discharged_by", String(64), nullable=True),
)

devices = Table(
    "devices",
    metadata,
    Column("id", String(64), primary_key=True),
    Column("secret_hash", Text, nullable=False),
    Column("kind", String(64), nullable=False),
    Column("disabled", Boolean, nullable=False, default=False),
    Column("created_at", Float, nullable=False),
)

# A device is bound to one patient at a time; a transfer ends one binding and starts another, so
# history stays with the patient it was measured on.
bindings = Table(
    "bindings",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("device_id", String(64), nullable=False),
    Column("patient_id", String(64), nullable=False),
    Column("start_ts", Float, nullable=False),
    Column("end_ts", Float, nullable=True),
    Index("ix_bindings_device", "device_id", "end_ts"),
    Index("ix_bindings_patient", "patient_id"),
)

users = Table(
    "users",
    metadata,
    Column("username", String(64), primary_key=True),
    Column("password_hash", Text, nullable=False),
    Column("role", String(16), nullable=False),
    Column("created_at", Float, nullable=False),
    # a disabled user may not log in; their tokens and open sessions stop working (migration 0007)
    Column("disabled", Boolean, nullable=False, server_default=false()),
    # a token carries the generation it was issued under; a password reset or a disable raises it
    Column("token_gen", Integer, nullable=False, server_default="0"),
)

# Readings of a device bound to no patient, with their values (a bound device's readings live in
# its patient's stream as events). Until migration 0005 every accepted reading had a row here.
readings = Table(
    "readings",
    metadata,
    Column("device_id", String(64), primary_key=True),
    Column("seq", BigInteger, primary_key=True, autoincrement=False),
    Column("patient_id", String(64), nullable=True),
    Column("stream_offset", BigInteger, nullable=True),
    Column("device_ts", Float, nullable=False),
    Column("received_ts", Float, nullable=False),
    Column("unbound_data", Text, nullable=True),
)

# Each device's highest accepted seq: the deduplication key, read at a device's first hello.
# One row per device, raised (never lowered) by every batch that holds the device's readings.
device_seqs = Table(
    "device_seqs",
    metadata,
    Column("device_id", String(64), primary_key=True),
    Column("high_seq", BigInteger, nullable=False),
)

events = Table(
    "events",
    metadata,
    Column("stream", String(80), primary_key=True),
    Column("offset", BigInteger, primary_key=True, autoincrement=False),
    Column("kind", String(32), nullable=False),
    Column("ts", Float, nullable=False),
    Column("data", Text, nullable=False),
    # a patient's device statuses (vitals history's gaps) or a command's lifecycle in a time
    # range (migration 0008); not its readings (migration 0014): those are found through the
    # offsets' span of each roll-up grain (store/sql.py ``readings_between``), for the index
    # cost a page write per stream and reading
    Index(
        "ix_events_stream_kind_ts_other",
        "stream",
        "kind",
        "ts",
        sqlite_where=text("kind <> 'reading'"),
        postgresql_where=text("kind <> 'reading'"),
    ),
)

# Who may write each stream, for several nodes on one store (migration 0011; docs/architecture.md,
# "One writer per stream"): the node holding the lease, its epoch (raised by every acquisition),
# the stream's last offset written under any epoch, and when the lease lapses unless renewed. A
# write checks (epoch, head) in its own transaction: a node that lost the lease cannot write.
stream_leases = Table(
    "stream_leases",
    metadata,
    Column("stream", String(80), primary_key=True),
    Column("node", String(64), nullable=False),
    Column("epoch", BigInteger, nullable=False),
    Column("head", BigInteger, nullable=False),
    Column("expires_at", Float, nullable=False),
    Index("ix_stream_leases_node", "node"),
)

# Roll-ups of a stream's readings per 60 s grain and metric, written once a grain has ended, up
# to the stream's mark in rollup_marks (store/rollups.py; migrations 0010, 0012): vitals history
# serves its buckets from them.
vital_rollups = Table(
    "vital_rollups",
    metadata,
    Column("stream", String(80), primary_key=True),
    Column("start", BigInteger, primary_key=True, autoincrement=False),
    Column("metric", String(32), primary_key=True),
    Column("vmin", Float, nullable=False),
    Column("vmax", Float, nullable=False),
    Column("vsum", Float, nullable=False),
    Column("n", BigInteger, nullable=False),
    Column("last_ts", Float, nullable=False),
    Column("last_offset", BigInteger, nullable=False),
    Column("vlast", Float, nullable=False),
    # the lowest and highest offset of the readings counted (migration 0014): where a time
    # range's readings lie in the events' primary key; NULL when retention deleted them all
    Column("lo_offset", BigInteger, nullable=True),
    Column("hi_offset", BigInteger, nullable=True),
    # SQLite: the rows stored in key order, so a patient's day is consecutive pages
    sqlite_with_rowid=False,
)

# Each stream's roll-up mark (store/rollups.py; migration 0012): ``vital_rollups`` holds exactly
# the stream's readings at offsets up to ``rolled_offset``; readers take the events above it raw.
rollup_marks = Table(
    "rollup_marks",
    metadata,
    Column("stream", String(80), primary_key=True),
    Column("rolled_offset", BigInteger, nullable=False),
)

# The latest state of every alert ever raised (its history of changes is in the patient's stream).
alerts = Table(
    "alerts",
    metadata,
    Column("alert_id", String(160), primary_key=True),
    Column("patient_id", String(64), nullable=False),
    Column("condition", String(64), nullable=False),
    Column("priority", String(16), nullable=False),
    Column("category", String(16), nullable=False),
    Column("state", String(16), nullable=False),
    Column("raised_at", Float, nullable=False),
    Column("updated_at", Float, nullable=False),
    Column("acknowledged_at", Float, nullable=True),
    Column("acknowledged_by", String(64), nullable=True),
    Column("resolved_at", Float, nullable=True),
    Column("escalation_level", Integer, nullable=False),
    Column("last", Text, nullable=False),
    Index("ix_alerts_patient", "patient_id", "raised_at"),
)

# Append-only: who did what, when, from where (limit changes, acknowledgements, ...).
audit = Table(
    "audit",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("at", Float, nullable=False),
    Column("actor", String(64), nullable=False),
    Column("action", String(64), nullable=False),
    Column("patient_id", String(64), nullable=True),
    Column("origin", String(128), nullable=True),
    Column("detail", Text, nullable=False),
    Index("ix_audit_at", "at"),
)

# Per-patient clinical settings: limit overrides and NEWS2 observations set by clinicians.
patient_settings = Table(
    "patient_settings",
    metadata,
    Column("patient_id", String(64), primary_key=True),
    Column("limits", Text, nullable=True),
    Column("observations", Text, nullable=True),
    Column("updated_at", Float, nullable=False),
    Column("updated_by", String(64), nullable=False),
)

# The live picture of each stream as of an offset, saved periodically and at shutdown, so a
# restart rebuilds it from the snapshot plus the events after it (not from a fixed window).
stream_snapshots = Table(
    "stream_snapshots",
    metadata,
    Column("stream", String(80), primary_key=True),
    Column("offset", BigInteger, nullable=False),
    Column("state", Text, nullable=False),
    Column("saved_at", Float, nullable=False),
)

# Commands to devices: the latest state of each (its history is in the patient's stream).
commands = Table(
    "commands",
    metadata,
    Column("command_id", String(64), primary_key=True),
    Column("patient_id", String(64), nullable=False),
    Column("device_id", String(64), nullable=False),
    Column("name", String(32), nullable=False),
    Column("args", Text, nullable=False),
    Column("status", String(16), nullable=False),
    Column("requested_by", String(64), nullable=False),
    Column("idempotency_key", String(128), nullable=True),
    Column("created_at", Float, nullable=False),
    Column("ttl_s", Float, nullable=False),
    Column("timeout_s", Float, nullable=False),
    Column("sent_at", Float, nullable=True),
    Column("updated_at", Float, nullable=False),
    Column("message", Text, nullable=True),
    Column("result", Text, nullable=True),
    Index("ix_commands_status", "status"),
)

# Care teams: a user sees the patients of the wards they belong to, the patients assigned to
# them individually, and (break-glass) a patient opened with a stated reason, for a limited time.
ward_members = Table(
    "ward_members",
    metadata,
    Column("username", String(64), primary_key=True),
    Column("ward", String(64), primary_key=True),
)

assignments = Table(
    "assignments",
    metadata,
    Column("username", String(64), primary_key=True),
    Column("patient_id", String(64), primary_key=True),
)

grants = Table(
    "grants",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("username", String(64), nullable=False),
    Column("patient_id", String(64), nullable=False),
    Column("reason", Text, nullable=False),
    Column("granted_at", Float, nullable=False),
    Column("expires_at", Float, nullable=False),
    Index("ix_grants_user", "username", "expires_at"),
)

# Every change of the registry (bindings, a device's secret or disabled flag, a new patient), one
# row each, written in the transaction that makes the change. A running server reads the rows
# after the last one it saw every 0.5 s and applies them to its live sessions
# (services/registry.py), so a change made by another process (the admin CLI) takes effect at
# once. ``id`` grows in commit order (PostgreSQL writers take a lock on the table first).
# ``source`` is the writing store's random id; ``announced``: the writer was a running server
# that applied the change itself.
registry_changes = Table(
    "registry_changes",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("at", Float, nullable=False),
    Column("kind", String(16), nullable=False),
    Column("device_id", String(64), nullable=True),
    Column("patient_id", String(64), nullable=True),
    Column("previous_patient_id", String(64), nullable=True),
    Column("source", String(32), nullable=False),
    Column("announced", Boolean, nullable=False),
    sqlite_autoincrement=True,
)
