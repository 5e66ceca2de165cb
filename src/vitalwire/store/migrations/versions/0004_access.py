"""care teams: ward members, individual assignments, break-glass grants

Revision ID: 0004
Revises: 0003
"""

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "ward_members",
        sa.Column("username", sa.String(64), primary_key=True),
        sa.Column("ward", sa.String(64), primary_key=True),
    )
    op.create_table(
        "assignments",
        sa.Column("username", sa.String(64), primary_key=True),
        sa.Column("patient_id", sa.String(64), primary_key=True),
    )
    op.create_table(
        "grants",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("username", sa.String(64), nullable=False),
        sa.Column("patient_id", sa.String(64), nullable=False),
        sa.Column("reason", sa.Text, nullable=False),
        sa.Column("granted_at", sa.Float, nullable=False),
        sa.Column("expires_at", sa.Float, nullable=False),
    )
    op.create_index("ix_grants_user", "grants", ["username", "expires_at"])


def downgrade() -> None:
    for table in ("grants", "assignments", "ward_members"):
        op.drop_table(table)
