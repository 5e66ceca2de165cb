"""SQLite batch writes on one dedicated connection and thread.

Through aiosqlite every statement of a batch (begin, each insert, commit, the pool's reset) is a
round trip between the event loop and SQLite's thread, and each round trip waits for the loop to
come around — under load, a millisecond or more each. Here a whole batch is **one** hop: the loop
hands the prepared statements and parameter tuples to the writer thread, which runs ``BEGIN
IMMEDIATE``, ``executemany`` per table and ``COMMIT``, and the loop hears back once. The SQL text
is compiled once from the SQLAlchemy tables, so the schema stays in one place.

Checkpoints (copying the WAL back into the database file, with an fsync) are taken off the commit
path: this connection never checkpoints by itself (``wal_autocheckpoint=0``); a checkpointer
thread runs ``wal_checkpoint(PASSIVE)`` — which never blocks the writer or readers — every
``checkpoint_every_s``, and ``TRUNCATE`` at close. Readers use the store's other connections; WAL
lets them read while this one writes.
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from sqlalchemy.dialects import sqlite

log = logging.getLogger("vitalwire.store")

#: Seconds between passive checkpoints of the WAL (off the commit path).
CHECKPOINT_EVERY_S = 1.0


def compile_positional(stmt: Any, row: dict[str, Any]) -> tuple[str, tuple[str, ...]]:
    """SQLite SQL text of ``stmt`` with ``?`` parameters, and the column of each parameter."""
    compiled = stmt.compile(dialect=sqlite.dialect(), column_keys=list(row))
    keys = tuple(compiled.positiontup or ())
    return str(compiled), keys


class SqliteBatchWriter:
    """One connection, one thread: ``write`` commits a list of (SQL, rows) in one transaction."""

    def __init__(
        self, path: str, *, synchronous: str, checkpoint_every_s: float = CHECKPOINT_EVERY_S
    ) -> None:
        self.path = path
        self.synchronous = synchronous
        self.checkpoint_every_s = checkpoint_every_s
        self._exec = ThreadPoolExecutor(1, thread_name_prefix="vitalwire-sqlite-writer")
        self._conn: sqlite3.Connection | None = None
        self._stop = threading.Event()
        self._checkpointer: threading.Thread | None = None

    def _connect(self) -> sqlite3.Connection:
        conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute(f"PRAGMA synchronous={self.synchronous}")
        conn.execute("PRAGMA busy_timeout=10000")
        return conn

    async def open(self) -> None:
        loop = asyncio.get_running_loop()

        def _open() -> None:
            self._conn = self._connect()
            self._conn.execute("PRAGMA wal_autocheckpoint=0")

        await loop.run_in_executor(self._exec, _open)
        self._stop.clear()
        self._checkpointer = threading.Thread(
            target=self._checkpoint_loop, name="vitalwire-sqlite-checkpoint", daemon=True
        )
        self._checkpointer.start()

    async def write(self, work: list[tuple[str, list[tuple[Any, ...]]]]) -> int:
        """Commit every (SQL, parameter rows) of ``work`` in one transaction, or none of it;
        return the number of rows the statements changed."""
        return await asyncio.get_running_loop().run_in_executor(self._exec, self._write, work)

    def _write(self, work: list[tuple[str, list[tuple[Any, ...]]]]) -> int:
        conn = self._conn
        assert conn is not None, "writer not opened"
        changed = 0
        conn.execute("BEGIN IMMEDIATE")
        try:
            for sql, rows in work:
                changed += conn.executemany(sql, rows).rowcount
            conn.execute("COMMIT")
            return changed
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise

    def _checkpoint_loop(self) -> None:
        conn = self._connect()
        try:
            while not self._stop.wait(self.checkpoint_every_s):
                try:
                    conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
                except sqlite3.Error:  # busy or locked: the next round takes it
                    log.debug("passive checkpoint skipped", exc_info=True)
        finally:
            conn.close()

    async def close(self) -> None:
        self._stop.set()
        if self._checkpointer is not None:
            await asyncio.to_thread(self._checkpointer.join)
            self._checkpointer = None
        loop = asyncio.get_running_loop()

        def _close() -> None:
            if self._conn is not None:
                try:
                    self._conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()
                except sqlite3.Error:
                    log.debug("final checkpoint skipped", exc_info=True)
                self._conn.close()
                self._conn = None

        await loop.run_in_executor(self._exec, _close)
        self._exec.shutdown(wait=True)
