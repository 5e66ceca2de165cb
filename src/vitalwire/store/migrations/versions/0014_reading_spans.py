"""vital_rollups.lo_offset/hi_offset: where a grain's readings lie; no index of readings by time

Every reading used to write a row of ``ix_events_stream_kind_ts`` (stream, kind, ts) as well as
the events' primary key. The index is keyed by stream first, so a batch of readings of many
patients dirtied one more page per patient, written to the WAL at each commit and copied back by
the checkpoint: on SQLite twice the page writes of the events alone (docs/benchmarks.md, "Where a
reading's extra cost since 2026-11-27 goes"). Readings in a time range are now found through
the roll-ups: each row keeps the lowest and highest offset of the readings it counts, so a
range's readings at or below the stream's mark lie in one offset range of the primary key, and
those above the mark are the events after it (store/sql.py ``readings_between``). The index
stays for the other kinds (device statuses, command lifecycles: a few events a patient), as a
partial index.

The upgrade fills the span of the rows already stored from the events (through the old index,
before it is dropped). Like 0012, stop every node before it: a node of an earlier release
would write roll-up rows without a span, whose readings a range read would then miss.

Revision ID: 0014
Revises: 0013
"""

import sqlalchemy as sa
from alembic import op

revision = "0014"
down_revision = "0013"
branch_labels = None
depends_on = None

OTHER = "kind <> 'reading'"
#: The readings a row counts: its stream's, in its grain, with its metric as a number.
_COUNTED = (
    "FROM events e WHERE e.stream = vital_rollups.stream AND e.kind = 'reading' "
    "AND e.ts >= vital_rollups.start AND e.ts < vital_rollups.start + 60 AND {number}"
)
NUMBER = {
    "sqlite": "json_type(e.data, '$.' || vital_rollups.metric) IN ('integer', 'real')",
    "postgresql": "jsonb_typeof(CAST(e.data AS jsonb) -> vital_rollups.metric) = 'number'",
}


def span(dialect: str) -> str:
    """The UPDATE that fills every row's span from the events it counts (a row whose readings
    retention deleted keeps NULL: there is nothing to find)."""
    counted = _COUNTED.format(number=NUMBER[dialect])
    return (
        f'UPDATE vital_rollups SET lo_offset = (SELECT min(e."offset") {counted}), '
        f'hi_offset = (SELECT max(e."offset") {counted})'
    )


def upgrade() -> None:
    op.add_column("vital_rollups", sa.Column("lo_offset", sa.BigInteger(), nullable=True))
    op.add_column("vital_rollups", sa.Column("hi_offset", sa.BigInteger(), nullable=True))
    op.execute(span(op.get_bind().dialect.name))
    op.drop_index("ix_events_stream_kind_ts", table_name="events")
    op.create_index(
        "ix_events_stream_kind_ts_other",
        "events",
        ["stream", "kind", "ts"],
        sqlite_where=sa.text(OTHER),
        postgresql_where=sa.text(OTHER),
    )


def downgrade() -> None:
    op.create_index("ix_events_stream_kind_ts", "events", ["stream", "kind", "ts"])
    op.drop_index("ix_events_stream_kind_ts_other", table_name="events")
    op.drop_column("vital_rollups", "hi_offset")
    op.drop_column("vital_rollups", "lo_offset")
