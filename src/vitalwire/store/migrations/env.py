"""Alembic environment: runs on the connection vitalwire hands over (see store/sql.py)."""

from __future__ import annotations

from alembic import context

from vitalwire.store.schema import metadata

connection = context.config.attributes.get("connection")
if connection is None:  # pragma: no cover - only when someone runs `alembic` by hand
    raise RuntimeError("run migrations through `vitalwire serve` or `vitalwire admin migrate`")
context.configure(connection=connection, target_metadata=metadata, render_as_batch=True)
with context.begin_transaction():
    context.run_migrations()
