"""rollup_marks: how far each stream's roll-ups reach, so grains are written once

Until now every batch of readings upserted its roll-ups (60 rewrites of a row per minute at
1 Hz). From here a node keeps a stream's open grains in memory and writes them once the grain
ends; ``rollup_marks`` says, per stream, the offset up to which ``vital_rollups`` holds the
readings, and readers take the events above it raw (store/rollups.py explains the flush and the
catch-up after a crash). Every event stored so far was rolled up in its own transaction, so the
upgrade sets each stream's mark at its head; the downgrade rolls up what is above the marks,
since the version before rolls up nothing after the fact.

Revision ID: 0012
Revises: 0011
"""

import sqlalchemy as sa
from alembic import op

revision = "0012"
down_revision = "0011"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "rollup_marks",
        sa.Column("stream", sa.String(80), primary_key=True),
        sa.Column("rolled_offset", sa.BigInteger(), nullable=False),
    )
    op.execute(
        'INSERT INTO rollup_marks (stream, rolled_offset) SELECT stream, max("offset") '
        "FROM events GROUP BY stream"
    )


def downgrade() -> None:
    from sqlalchemy.dialects import postgresql, sqlite

    from vitalwire.store.rollups import upsert_above_marks

    bind = op.get_bind()
    upsert_above_marks(bind, sqlite if bind.dialect.name == "sqlite" else postgresql, spans=False)
    op.drop_table("rollup_marks")
