"""vital_rollups: readings rolled up per stream, 60 s grain and metric, backfilled

Vitals history serves its buckets from these rows (store/rollups.py explains the grain and the
merge). The table's primary key (stream, start, metric) is the index a bucket read scans: one
patient's day is 1,440 consecutive keys per metric. On SQLite the table is ``WITHOUT ROWID``:
stored in key order, so those keys are consecutive rows too, not one random row lookup each.
The upgrade rolls up the readings the store already holds, in the migration's transaction.

Revision ID: 0010
Revises: 0009
"""

import sqlalchemy as sa
from alembic import op

revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "vital_rollups",
        sa.Column("stream", sa.String(80), primary_key=True),
        sa.Column("start", sa.BigInteger(), primary_key=True, autoincrement=False),
        sa.Column("metric", sa.String(32), primary_key=True),
        sa.Column("vmin", sa.Float(), nullable=False),
        sa.Column("vmax", sa.Float(), nullable=False),
        sa.Column("vsum", sa.Float(), nullable=False),
        sa.Column("n", sa.BigInteger(), nullable=False),
        sa.Column("last_ts", sa.Float(), nullable=False),
        sa.Column("last_offset", sa.BigInteger(), nullable=False),
        sa.Column("vlast", sa.Float(), nullable=False),
        sqlite_with_rowid=False,
    )
    from sqlalchemy.dialects import postgresql, sqlite

    from vitalwire.store.rollups import backfill

    bind = op.get_bind()
    backfill(bind, sqlite if bind.dialect.name == "sqlite" else postgresql, spans=False)


def downgrade() -> None:
    op.drop_table("vital_rollups")
