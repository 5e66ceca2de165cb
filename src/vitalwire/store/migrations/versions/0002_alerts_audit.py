"""alerts, audit log, patient settings, stream snapshots

Revision ID: 0002
Revises: 0001
"""

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "alerts",
        sa.Column("alert_id", sa.String(160), primary_key=True),
        sa.Column("patient_id", sa.String(64), nullable=False),
        sa.Column("condition", sa.String(64), nullable=False),
        sa.Column("priority", sa.String(16), nullable=False),
        sa.Column("category", sa.String(16), nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("raised_at", sa.Float, nullable=False),
        sa.Column("updated_at", sa.Float, nullable=False),
        sa.Column("acknowledged_at", sa.Float, nullable=True),
        sa.Column("acknowledged_by", sa.String(64), nullable=True),
        sa.Column("resolved_at", sa.Float, nullable=True),
        sa.Column("escalation_level", sa.Integer, nullable=False),
        sa.Column("last", sa.Text, nullable=False),
    )
    op.create_index("ix_alerts_patient", "alerts", ["patient_id", "raised_at"])
    op.create_table(
        "audit",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("at", sa.Float, nullable=False),
        sa.Column("actor", sa.String(64), nullable=False),
        sa.Column("action", sa.String(64), nullable=False),
        sa.Column("patient_id", sa.String(64), nullable=True),
        sa.Column("origin", sa.String(128), nullable=True),
        sa.Column("detail", sa.Text, nullable=False),
    )
    op.create_index("ix_audit_at", "audit", ["at"])
    op.create_table(
        "patient_settings",
        sa.Column("patient_id", sa.String(64), primary_key=True),
        sa.Column("limits", sa.Text, nullable=True),
        sa.Column("observations", sa.Text, nullable=True),
        sa.Column("updated_at", sa.Float, nullable=False),
        sa.Column("updated_by", sa.String(64), nullable=False),
    )
    op.create_table(
        "stream_snapshots",
        sa.Column("stream", sa.String(80), primary_key=True),
        sa.Column("offset", sa.BigInteger, nullable=False),
        sa.Column("state", sa.Text, nullable=False),
        sa.Column("saved_at", sa.Float, nullable=False),
    )


def downgrade() -> None:
    for table in ("stream_snapshots", "patient_settings", "audit", "alerts"):
        op.drop_table(table)
