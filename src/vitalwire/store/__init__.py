"""Persistence behind a small interface; the URL scheme picks the backend."""

from __future__ import annotations

from vitalwire.store.base import (
    AlertRow,
    AuditRow,
    Batch,
    Binding,
    CommandRow,
    Fenced,
    Lease,
    ReadingRow,
    Store,
    UserState,
)


def open_store(url: str, *, sqlite_synchronous: str = "NORMAL") -> Store:
    """Return an (unopened) store for ``url``: ``sqlite:///path`` or ``postgresql://...``."""
    from vitalwire.store.sql import SqlStore

    return SqlStore(url, sqlite_synchronous=sqlite_synchronous)


__all__ = [
    "AlertRow",
    "AuditRow",
    "Batch",
    "Binding",
    "CommandRow",
    "Fenced",
    "Lease",
    "ReadingRow",
    "Store",
    "UserState",
    "open_store",
]
