"""Alembic environment: runs on the connection vitalwire hands over (see store/sql.py)."""

from __future__ import annotations

from alembic import context

from vitalwire.store.schema import metadata

connection = context.config.attributes.get("connection")
if connection is None:  # pragma: no cover - only when someone runs `alembic` by hand
    raise RuntimeError(
        "vitalwire migrates the store when it opens it: run `vitalwire serve`, or any "
        "`vitalwire admin` command with --db (e.g. `vitalwire admin list-patients --db URL`)"
    )
context.configure(connection=connection, target_metadata=metadata, render_as_batch=True)
with context.begin_transaction():
    context.run_migrations()
