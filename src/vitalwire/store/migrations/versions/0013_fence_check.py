"""vitalwire_fence_held(moved, expected): the fenced write's check, raising a named error

A node writes a batch of readings as one statement on PostgreSQL, its fence included
(store/sql.py ``_FENCED_READINGS_PG``; docs/architecture.md, "One writer per stream"). When the
fence moved fewer lease heads than the batch has streams, the statement must abort whole. This
function does it with an error of its own (SQLSTATE ``VWF01``, "fenced: ..."), so that
PostgreSQL's log says what happened. SQLite has no such functions and needs none (one writer).

Revision ID: 0013
Revises: 0012
"""

from alembic import op

revision = "0013"
down_revision = "0012"
branch_labels = None
depends_on = None

FUNCTION = """
CREATE OR REPLACE FUNCTION vitalwire_fence_held(moved bigint, expected integer)
RETURNS integer LANGUAGE plpgsql VOLATILE AS $$
BEGIN
  IF moved < expected THEN
    RAISE EXCEPTION 'fenced: % of % streams of this batch are no longer this node''s to write',
      expected - moved, expected
      USING ERRCODE = 'VWF01',
            HINT = 'expected when another node took a patient (a paused node, a moved device): '
                   'the write is refused whole and the node drops what it held of them';
  END IF;
  RETURN 1;
END
$$
"""


def upgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute(FUNCTION)


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute("DROP FUNCTION IF EXISTS vitalwire_fence_held(bigint, integer)")
