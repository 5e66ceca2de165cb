"""users.disabled and users.token_gen: access that can be taken back

``disabled``: the user may not log in, and every token and open session of theirs stops working.
``token_gen``: the generation of the user's tokens; a token carries the generation it was issued
under, and a password reset or a disable raises it, so every token issued before stops working
(a role change does not: the role is read from the store, never from the token).

Revision ID: 0007
Revises: 0006
"""

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("users") as batch:
        batch.add_column(
            sa.Column("disabled", sa.Boolean, nullable=False, server_default=sa.false())
        )
        batch.add_column(sa.Column("token_gen", sa.Integer, nullable=False, server_default="0"))


def downgrade() -> None:
    with op.batch_alter_table("users") as batch:
        batch.drop_column("token_gen")
        batch.drop_column("disabled")
