"""SQLite batch writes on one dedicated connection and thread.

Through aiosqlite every statement of a batch (begin, each insert, commit, the pool's reset) is a
round trip between the event loop and SQLite's thread, and each round trip waits for the loop to
come around — under load, a millisecond or more each. Here a whole batch is **one** hop: the loop
hands the prepared statements and parameter tuples to the writer thread, which runs them in one
transaction (``BEGIN IMMEDIATE`` … ``COMMIT``, or a single statement alone), and the loop hears
back once. The SQL text
is compiled once from the SQLAlchemy tables, so the schema stays in one place. The readings and
events of a batch go in as one JSON array each (:func:`compile_json_rows`): one step of SQLite,
not one per row. And both arrays go in through **one statement** (:func:`batch_view`): an
``INSERT`` into a temporary view whose ``INSTEAD OF`` trigger runs the per-table inserts. A
single statement is a transaction by itself, so a batch of readings is one call into SQLite with
no ``BEGIN`` or ``COMMIT`` beside it.

Why one call matters: SQLite runs with the GIL released, and each return from it must take the
GIL back from the event loop's thread, which gives it up only every ``sys.getswitchinterval()``
(5 ms) while it is busy. A commit made of ``BEGIN``, two inserts and ``COMMIT`` waited for the GIL
four times: measured beside a thread busy 75 % of the time (the loop at hospital scale), a batch
of 70 readings and their events took 6.6 ms at the median instead of 1.4 ms. As one statement,
1.2 ms at the median and 6.4 ms at p90 (one wait, at the end).

Checkpoints (copying the WAL back into the database file, with an fsync) are taken off the commit
path: this connection never checkpoints by itself (``wal_autocheckpoint=0``); a checkpointer
thread runs ``wal_checkpoint(PASSIVE)`` — which never blocks the writer or readers — every
``checkpoint_every_s``, and ``TRUNCATE`` at close. Readers use the store's other connections; WAL
lets them read while this one writes.

A passive checkpoint copies the WAL into the database but never starts the WAL over: SQLite does
that only when a write begins with every frame already copied, which never happens while commits
follow each other faster than a checkpoint runs (each checkpoint ends with newer frames behind
it). Under sustained load the WAL would then grow without end, and every page lookup with it.
So once a passive checkpoint finds ``restart_frames`` frames in the WAL, the writer runs
``wal_checkpoint(RESTART)`` before its next batch: the passive one has copied nearly everything,
so this copies the few newer frames and starts the WAL over (waiting at most ``RESTART_WAIT_MS``
for readers; if one is still reading, the next round tries again). ``journal_size_limit`` then
truncates the file to 160 MB.

The restart must sync the database file before the WAL can be reused, and that sync is what it
costs. SQLite syncs the database file at the end of a checkpoint only when the checkpoint caught
up with the writer, which a passive one under load never does: so every page the passive
checkpoints copied since the last restart was still unsynced, and the restart's sync wrote them
all (measured at 10,800 readings a second: 9-20 ms, growing with the file, with 600 frames left
to copy). So the checkpointer syncs the database file itself after every passive checkpoint
(when ``synchronous`` is not ``OFF``), and when the WAL is due to start over it runs up to
``CATCH_UP_PASSES`` more passive checkpoints, each with its sync, until fewer than
``CATCH_UP_FRAMES`` frames came in during one: the restart is left a few dozen frames to copy and
sync (0-2 ms where it took 6-24 ms, in the same standalone test). While a restart is due the
checkpointer starts no pass: a restart that finds a checkpoint running gives up at once.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sqlite3
import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import msgspec
from sqlalchemy.dialects import sqlite

log = logging.getLogger("vitalwire.store")
_encode = msgspec.json.Encoder().encode
#: flushes a file's data (not its times) to the disk; fsync where there is no fdatasync
_datasync = getattr(os, "fdatasync", os.fsync)

#: Seconds between passive checkpoints of the WAL (off the commit path).
CHECKPOINT_EVERY_S = 0.25
#: WAL frames (pages; 4 KB each by default) past which the writer starts the WAL over: at
#: hospital scale (80 MB of WAL a second) once every 1.5 s.
RESTART_FRAMES = 32768
#: Before a restart, the checkpointer runs up to this many more passive checkpoints ...
CATCH_UP_PASSES = 4
#: ... until fewer than this many frames came into the WAL during one (the restart's share).
CATCH_UP_FRAMES = 200
#: How long the restart waits for readers before trying again at the next round.
RESTART_WAIT_MS = 50
#: The WAL file is truncated to this size when it starts over (above the restart size: a WAL that
#: is cut back at every restart only grows again).
WAL_SIZE_LIMIT = 160 * 1024 * 1024


def compile_positional(stmt: Any, row: dict[str, Any]) -> tuple[str, tuple[str, ...]]:
    """SQLite SQL text of ``stmt`` with ``?`` parameters, and the column of each parameter."""
    compiled = stmt.compile(dialect=sqlite.dialect(), column_keys=list(row))
    keys = tuple(compiled.positiontup or ())
    return str(compiled), keys


def compile_json_rows(stmt: Any, row: dict[str, Any]) -> tuple[str, tuple[str, ...]]:
    """Like :func:`compile_positional`, for an ``INSERT`` that takes all its rows at once in one
    parameter: a JSON array of row arrays, each in the order of the returned columns.

    ``executemany`` steps the statement once per row, and between two steps Python's sqlite3
    gives up the GIL and must take it back; on a writer thread beside a busy event loop each of
    those takes waits for the loop (thousands of waits a second at hospital scale, which held
    commits to 80 ms for 2,000 rows). One step over ``json_each`` inserts every row inside SQLite
    with the GIL released throughout. ``->>`` gives back each JSON value as SQL text, integer,
    real or NULL; doubles round-trip exactly, as :func:`json_rows` encodes them shortest-exact.
    Text must hold no NUL character (SQLite's text would end there): the tables written this
    way hold validated ids and JSON documents, which escape it.
    """
    text, keys = compile_positional(stmt, row)
    head, values, tail = text.partition(" VALUES (")
    params, _, conflict = tail.partition(")")
    if not values or params.replace("?", "").replace(", ", ""):
        raise ValueError(f"not a single-row INSERT: {text}")
    picks = ", ".join(f"value ->> {i}" for i in range(len(keys)))
    # "WHERE true": SQLite's grammar needs it before an upsert clause of INSERT ... SELECT
    return f"{head} SELECT {picks} FROM json_each(?) WHERE true{conflict}", keys


def batch_view(name: str, inserts: dict[str, str]) -> tuple[str, list[str]]:
    """One statement for several :func:`compile_json_rows` inserts, and the SQL that makes it.

    Returns ``(statement, setup)``: ``setup`` creates a temporary view ``name`` with one column
    per entry of ``inserts`` (column name → that insert's SQL) and an ``INSTEAD OF INSERT``
    trigger that runs the inserts in order, each over its column's JSON array;
    ``statement`` inserts one row of those arrays into the view (``NULL`` for none: zero rows).
    A statement and its triggers commit or fail together. Temporary objects belong to one
    connection: the setup runs on the writer's, at open.

    Raises:
        ValueError: an insert that does not take its rows as one ``json_each(?)`` parameter.
    """
    for column, sql in inserts.items():
        if sql.count("?") != 1 or sql.count("json_each(?)") != 1:
            raise ValueError(f"{column}: not a compile_json_rows insert: {sql}")
    columns = list(inserts)
    body = "; ".join(
        sql.replace("json_each(?)", f"json_each(NEW.{column})") for column, sql in inserts.items()
    )
    setup = [
        f"CREATE TEMP VIEW {name} AS SELECT " + ", ".join(f"NULL AS {c}" for c in columns),
        f"CREATE TEMP TRIGGER {name}_insert INSTEAD OF INSERT ON {name} BEGIN {body}; END",
    ]
    statement = f"INSERT INTO temp.{name} VALUES (" + ", ".join("?" for _ in columns) + ")"
    return statement, setup


def json_rows(rows: list[Any]) -> str:
    """The one parameter of a :func:`compile_json_rows` statement (text, never a blob: SQLite
    3.45 and later would read a blob as its binary JSONB)."""
    return _encode(rows).decode()


class SqliteBatchWriter:
    """One connection, one thread: ``write`` commits a list of (SQL, rows) in one transaction."""

    def __init__(
        self,
        path: str,
        *,
        synchronous: str,
        setup: Sequence[str] = (),
        checkpoint_every_s: float = CHECKPOINT_EVERY_S,
        restart_frames: int = RESTART_FRAMES,
    ) -> None:
        """``setup``: statements run on the writer's connection when it opens (temporary views
        and triggers, see :func:`batch_view`)."""
        self.path = path
        self.setup = tuple(setup)
        self.synchronous = synchronous
        self.checkpoint_every_s = checkpoint_every_s
        self.restart_frames = restart_frames
        #: set by the checkpointer when the WAL is long: the writer starts it over
        self._restart_due = False
        #: how many times the WAL was started over, and the database file synced by the
        #: checkpointer (for tests and diagnostics)
        self.restarts = 0
        self.syncs = 0
        self._synced_at = 0  # the WAL frames checkpointed at the last sync
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
            self._conn.execute(f"PRAGMA journal_size_limit={WAL_SIZE_LIMIT}")
            for sql in self.setup:
                self._conn.execute(sql)

        await loop.run_in_executor(self._exec, _open)
        self._stop.clear()
        self._checkpointer = threading.Thread(
            target=self._checkpoint_loop, name="vitalwire-sqlite-checkpoint", daemon=True
        )
        self._checkpointer.start()

    async def write(self, work: list[tuple[str, list[tuple[Any, ...]]]]) -> int:
        """Commit every (SQL, parameter rows) of ``work`` in one transaction, or none of it;
        return the number of rows the statements changed (rows changed by triggers not
        counted). One statement with one row of parameters runs as its own transaction."""
        return await asyncio.get_running_loop().run_in_executor(self._exec, self._write, work)

    async def write_counts(self, work: list[tuple[str, list[tuple[Any, ...]]]]) -> list[int]:
        """Like :meth:`write`, always in one ``BEGIN IMMEDIATE`` transaction, returning the
        rows each statement changed (retention: the events deleted beside their roll-ups)."""
        counts: list[int] = []
        await asyncio.get_running_loop().run_in_executor(self._exec, self._write, work, counts)
        return counts

    def _write(
        self, work: list[tuple[str, list[tuple[Any, ...]]]], counts: list[int] | None = None
    ) -> int:
        conn = self._conn
        assert conn is not None, "writer not opened"
        if self._restart_due:
            try:
                self._restart(conn)
            finally:  # only after it: the checkpointer starts no pass until then
                self._restart_due = False
        if counts is None and len(work) == 1 and len(work[0][1]) == 1:
            # one call into SQLite, so one wait for the GIL after it (see the module's doc)
            sql, (params,) = work[0]
            return conn.execute(sql, params).rowcount
        changed = 0
        conn.execute("BEGIN IMMEDIATE")
        try:
            for sql, rows in work:
                n = conn.executemany(sql, rows).rowcount
                changed += n
                if counts is not None:
                    counts.append(n)
            conn.execute("COMMIT")
            return changed
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise

    def _restart(self, conn: sqlite3.Connection) -> None:
        conn.execute(f"PRAGMA busy_timeout={RESTART_WAIT_MS}")
        try:
            busy, _frames, _copied = conn.execute("PRAGMA wal_checkpoint(RESTART)").fetchone()
            if not busy:
                self.restarts += 1
        except sqlite3.Error:  # a reader held on: the next round tries again
            log.debug("WAL restart skipped", exc_info=True)
        finally:
            conn.execute("PRAGMA busy_timeout=10000")

    def _checkpoint_loop(self) -> None:
        conn = self._connect()
        sync = self.synchronous.strip().upper() not in ("OFF", "0")
        # the database file, to sync what the checkpoints copied (see the module's doc)
        fd = os.open(self.path, os.O_RDONLY) if sync else -1
        try:
            while not self._stop.wait(self.checkpoint_every_s):
                self._round(conn, fd)
        finally:
            if fd >= 0:
                os.close(fd)
            conn.close()

    def _round(self, conn: sqlite3.Connection, fd: int) -> None:
        """One round of the checkpointer: a passive checkpoint, and when the WAL is long, the
        catch-up passes and the restart asked of the writer. Nothing while a restart is due:
        the writer's restart must not find a checkpoint running (it would give up at once)."""
        if self._restart_due:
            return
        try:
            frames = self._checkpoint(conn, fd)
            if frames < self.restart_frames:
                return
            for _ in range(CATCH_UP_PASSES):  # leave the restart little to copy
                before, frames = frames, self._checkpoint(conn, fd)
                if frames - before < CATCH_UP_FRAMES:  # or busy (-1)
                    break
            self._restart_due = True
        except sqlite3.Error:  # busy or locked: the next round takes it
            log.debug("passive checkpoint skipped", exc_info=True)
        except OSError:  # the restart still syncs before the WAL is reused
            log.warning("syncing the database file failed", exc_info=True)

    def _checkpoint(self, conn: sqlite3.Connection, fd: int) -> int:
        """A passive checkpoint, then the database file synced (``fd >= 0``); returns the
        frames in the WAL. SQLite itself syncs the file only after a checkpoint that caught up
        with the writer: one that did not leaves the restart to write every page it copied."""
        busy, frames, copied = conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
        if busy:  # another checkpoint was running: nothing done (-1)
            return -1
        if fd >= 0 and copied != self._synced_at:  # nothing copied since: nothing to sync
            _datasync(fd)
            self._synced_at = copied
            self.syncs += 1
        return int(frames)

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
