"""stream_leases: one writer per stream at a time, fenced by an epoch the store checks

A node writes a stream only under a lease (node, epoch); every write batch checks, in its own
transaction, that the epoch is still the stream's and that its first offset follows the stream's
head, and moves the head. A node that lost the lease (another node acquired it: the epoch went
up) can never write the stream again (docs/architecture.md, "One writer per stream").

Revision ID: 0011
Revises: 0010
"""

import sqlalchemy as sa
from alembic import op

revision = "0011"
down_revision = "0010"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "stream_leases",
        sa.Column("stream", sa.String(80), primary_key=True),
        sa.Column("node", sa.String(64), nullable=False),
        sa.Column("epoch", sa.BigInteger(), nullable=False),
        sa.Column("head", sa.BigInteger(), nullable=False),
        sa.Column("expires_at", sa.Float(), nullable=False),
    )
    op.create_index("ix_stream_leases_node", "stream_leases", ["node"])


def downgrade() -> None:
    op.drop_index("ix_stream_leases_node", "stream_leases")
    op.drop_table("stream_leases")
