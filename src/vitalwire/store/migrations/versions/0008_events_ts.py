"""events (stream, kind, ts): a patient's readings and device statuses in a time range

Vitals history (``GET /patients/{id}/vitals``) reads one stream's readings between two times,
and its device_status events (the gap markers) in the same range: one range scan of this index
instead of the whole stream.

Revision ID: 0008
Revises: 0007
"""

from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_index("ix_events_stream_kind_ts", "events", ["stream", "kind", "ts"])


def downgrade() -> None:
    op.drop_index("ix_events_stream_kind_ts", table_name="events")
