"""device_seqs: each device's highest accepted seq, one row per device

The deduplication key moves out of ``readings`` (one row per reading, keyed by device and seq)
into one row per device. A batch of readings from many devices touched a page of the readings
index per device; it now raises a few rows of one small table. ``readings`` keeps the readings
of unbound devices (their values live nowhere else) and every row written before this revision.

Revision ID: 0005
Revises: 0004
"""

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "device_seqs",
        sa.Column("device_id", sa.String(64), primary_key=True),
        sa.Column("high_seq", sa.BigInteger, nullable=False),
    )
    op.execute(
        "INSERT INTO device_seqs (device_id, high_seq) "
        "SELECT device_id, max(seq) FROM readings GROUP BY device_id"
    )


def downgrade() -> None:
    op.drop_table("device_seqs")
