"""patients.discharged_at, discharged_by: a patient discharged keeps their record and history

Discharge (``POST /admin/patients/{id}/discharge``) ends the patient's device bindings and takes
them off the ward's live lists; what was recorded stays readable by the care team (history,
alerts, FHIR) for the retention period. NULL: admitted.

Revision ID: 0009
Revises: 0008
"""

import sqlalchemy as sa
from alembic import op

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("patients") as batch:
        batch.add_column(sa.Column("discharged_at", sa.Float(), nullable=True))
        batch.add_column(sa.Column("discharged_by", sa.String(64), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("patients") as batch:
        batch.drop_column("discharged_by")
        batch.drop_column("discharged_at")
