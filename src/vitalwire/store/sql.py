"""SQLAlchemy 2 async Core store for SQLite (aiosqlite, the default) and PostgreSQL (asyncpg).

SQLite runs in WAL mode. ``synchronous`` is configurable: ``NORMAL`` (default) survives a kill -9
of the server (the WAL is in the OS page cache); ``FULL`` also survives power loss, at the cost of
an fsync per commit (docs/reliability.md).
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import (
    Connection,
    and_,
    bindparam,
    case,
    delete,
    event,
    func,
    insert,
    literal_column,
    or_,
    select,
    text,
    update,
)
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DBAPIError, IntegrityError
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine
from sqlalchemy.sql.dml import Insert

from vitalwire.core.errors import Conflict, NotFound
from vitalwire.core.events import DEVICE_STATUS, READING
from vitalwire.core.text import clip, clip_json
from vitalwire.store import rollups
from vitalwire.store import schema as t
from vitalwire.store.base import (
    AlertRow,
    AuditRow,
    Batch,
    Binding,
    CommandRow,
    Fenced,
    Lease,
    ReadingRow,
    RegistryChange,
    UserState,
)
from vitalwire.store.sqlite_writer import (
    SqliteBatchWriter,
    batch_view,
    compile_json_rows,
    compile_positional,
    json_rows,
)
from vitalwire.wire import Event

_MIGRATIONS = Path(__file__).parent / "migrations"
#: The ``meta`` key whose value changes with every change of the care teams (a random token).
ACCESS_VERSION_KEY = "access_version"
SYNCHRONOUS_MODES = ("OFF", "NORMAL", "FULL", "EXTRA")
#: Leases renewed per transaction (see SqlStore.renew_streams).
RENEW_ROWS = 100
#: A renewal on PostgreSQL: extend the node's leases among ``:s``, skipping the rows another
#: transaction holds (the writer's fence, an acquisition): a renewal never waits for a lease
#: row, so it can never close a cycle of lock waits with the fenced writes (which lock their
#: rows in whatever order the UPDATE's join takes them). A row skipped stays the node's; the
#: next renewal extends it.
_RENEW_PG = text(
    "UPDATE stream_leases SET expires_at = :x WHERE stream IN ("
    "SELECT stream FROM stream_leases WHERE stream = ANY(CAST(:s AS text[])) AND node = :node "
    "FOR UPDATE SKIP LOCKED) RETURNING stream, epoch"
)
#: The fenced write's check on PostgreSQL: every stream of the batch in one statement, its
#: fences as arrays (one statement text whatever the batch: prepared once per connection).
_FENCE_PG = text(
    "UPDATE stream_leases AS l SET head = f.last "
    "FROM unnest(CAST(:s AS text[]), CAST(:n AS text[]), CAST(:e AS bigint[]), "
    "CAST(:f AS bigint[]), CAST(:l AS bigint[])) AS f(stream, node, epoch, first, last) "
    "WHERE l.stream = f.stream AND l.node = f.node AND l.epoch = f.epoch "
    "AND l.head = f.first - 1 RETURNING l.stream"
)

#: A batch of readings' events on PostgreSQL in one statement: the devices' high seqs and the
#: events, each as arrays joined by ``unnest``; one statement text, prepared once per connection.
#: Built row by row through SQLAlchemy (one statement per table, their parameters made on the
#: event loop's thread), a ward's batch took about 10 ms (docs/benchmarks.md, "The PostgreSQL
#: store"). The roll-ups due ride in the same transaction (:data:`rollups.PG_FLUSH`).
_READINGS_PG = text(
    "WITH seqs AS ("
    "INSERT INTO device_seqs (device_id, high_seq) "
    "SELECT * FROM unnest(CAST(:sd AS text[]), CAST(:sq AS bigint[])) "
    "ON CONFLICT (device_id) DO UPDATE "
    "SET high_seq = greatest(device_seqs.high_seq, excluded.high_seq)"
    ") "
    'INSERT INTO events (stream, "offset", kind, ts, data) '
    "SELECT * FROM unnest(CAST(:es AS text[]), CAST(:eo AS bigint[]), CAST(:ek AS text[]), "
    "CAST(:et AS float8[]), CAST(:ed AS text[]))"
)
#: A fenced batch of readings on PostgreSQL: the fence (:data:`_FENCE_PG`) and the readings
#: (:data:`_READINGS_PG`) in ONE statement, run outside an explicit transaction (a statement is
#: its own): one round trip where BEGIN, the lease rows' lock, the fence, the readings and
#: COMMIT were five. ``held`` raises the error ``VWF01`` (``vitalwire_fence_held``, migration
#: 0013) when the fence moved fewer heads than the batch has streams (a stream is at most once
#: in the arrays), which aborts the whole statement (fence, high seqs and events alike):
#: :meth:`SqlStore._write_readings_pg` then reads which leases were lost.
_FENCED_READINGS_PG = text(
    "WITH fence AS ("
    "UPDATE stream_leases AS l SET head = f.last "
    "FROM unnest(CAST(:s AS text[]), CAST(:n AS text[]), CAST(:e AS bigint[]), "
    "CAST(:f AS bigint[]), CAST(:l AS bigint[])) AS f(stream, node, epoch, first, last) "
    "WHERE l.stream = f.stream AND l.node = f.node AND l.epoch = f.epoch "
    "AND l.head = f.first - 1 RETURNING 1"
    "), held AS ("
    "SELECT vitalwire_fence_held(count(*), cardinality(CAST(:s AS text[]))) AS ok FROM fence"
    "), seqs AS ("
    "INSERT INTO device_seqs (device_id, high_seq) "
    "SELECT * FROM unnest(CAST(:sd AS text[]), CAST(:sq AS bigint[])) "
    "WHERE (SELECT ok FROM held) = 1 "
    "ON CONFLICT (device_id) DO UPDATE "
    "SET high_seq = greatest(device_seqs.high_seq, excluded.high_seq)"
    ") "
    'INSERT INTO events (stream, "offset", kind, ts, data) '
    "SELECT * FROM unnest(CAST(:es AS text[]), CAST(:eo AS bigint[]), CAST(:ek AS text[]), "
    "CAST(:et AS float8[]), CAST(:ed AS text[])) WHERE (SELECT ok FROM held) = 1"
)
#: The SQLSTATE of ``vitalwire_fence_held``'s error: :data:`_FENCED_READINGS_PG`'s "fenced".
_FENCED_SQLSTATE = "VWF01"
#: The condition of the events' partial index by time (migration 0014), as the index has it:
#: SQLite uses a partial index only for a query whose WHERE names its condition, literal included.
_NOT_READING = t.events.c.kind != literal_column("'reading'")
_PG_FLUSH = text(rollups.PG_FLUSH)
_PG_NEW_MARKS = text(rollups.PG_NEW_MARKS)


def _readings_pg_params(batch: Batch) -> dict[str, list[Any]] | None:
    """:data:`_READINGS_PG`'s arrays for ``batch``; None when it holds more than readings'
    events and high seqs (unbound readings, alerts, commands, audit: the general path)."""
    if batch.alerts or batch.commands or batch.audit:
        return None
    high: dict[str, int] = {}
    for r in batch.readings:
        if r.unbound_data is not None:
            return None
        if r.seq > high.get(r.device_id, 0):
            high[r.device_id] = r.seq
    evs = batch.events
    seqs = sorted(high.items())  # rows locked in one order, as the general path does
    return {
        "sd": [d for d, _ in seqs],
        "sq": [q for _, q in seqs],
        "es": [e.stream for e in evs],
        "eo": [e.offset for e in evs],
        "ek": [e.kind for e in evs],
        "et": [e.ts for e in evs],
        "ed": [e.data_json.decode() for e in evs],
    }


def _async_url(url: str) -> str:
    u = make_url(url)
    if u.drivername in ("sqlite", "sqlite+aiosqlite"):
        return str(u.set(drivername="sqlite+aiosqlite"))
    if u.drivername in ("postgresql", "postgres", "postgresql+asyncpg"):
        return str(u.set(drivername="postgresql+asyncpg"))
    raise ValueError(f"db URL must start with sqlite:/// or postgresql://, got {u.drivername}://")


def _run_migrations(conn: Connection) -> None:
    cfg = Config()
    cfg.set_main_option("script_location", str(_MIGRATIONS))
    cfg.attributes["connection"] = conn
    command.upgrade(cfg, "head")


def _reading_row(r: ReadingRow) -> dict[str, Any]:
    return {
        "device_id": r.device_id,
        "seq": r.seq,
        "patient_id": r.patient_id,
        "stream_offset": r.stream_offset,
        "device_ts": r.device_ts,
        "received_ts": r.received_ts,
        "unbound_data": r.unbound_data,
    }


def _event_row(e: Event) -> dict[str, Any]:
    return {
        "stream": e.stream,
        "offset": e.offset,
        "kind": e.kind,
        "ts": e.ts,
        "data": e.data_json.decode(),
    }


def _alert_row(a: AlertRow) -> dict[str, Any]:
    return {
        "alert_id": a.alert_id,
        "patient_id": a.patient_id,
        "condition": a.condition,
        "priority": a.priority,
        "category": a.category,
        "state": a.state,
        "raised_at": a.at,
        "updated_at": a.at,
        "acknowledged_at": a.at if a.acknowledged_by else None,
        "acknowledged_by": a.acknowledged_by,
        "resolved_at": a.at if a.state == "resolved" else None,
        "escalation_level": a.escalation_level,
        "last": a.last,
    }


def _command_row(c: CommandRow) -> dict[str, Any]:
    return {
        "command_id": c.command_id,
        "patient_id": c.patient_id,
        "device_id": c.device_id,
        "name": c.name,
        "args": c.args,
        "status": c.status,
        "requested_by": c.requested_by,
        "idempotency_key": c.idempotency_key,
        "created_at": c.created_at,
        "ttl_s": c.ttl_s,
        "timeout_s": c.timeout_s,
        "sent_at": c.sent_at,
        "updated_at": c.updated_at,
        "message": c.message,
        "result": c.result,
    }


#: The most characters of an audit entry's ``detail`` kept (docs/security.md, "Audit log").
AUDIT_DETAIL_MAX = 4096
_AUDIT_COLUMNS = {
    name: t.audit.c[name].type.length for name in ("actor", "action", "patient_id", "origin")
}


def _audit_row(a: AuditRow) -> dict[str, Any]:
    """An audit entry as stored, bounded: anyone can put text in it (a failed login records
    the name tried), so each text is cut to its column (marked with an ellipsis) and the
    detail to :data:`AUDIT_DETAIL_MAX` (still JSON, marked ``truncated``)."""
    size = _AUDIT_COLUMNS
    return {
        "at": a.at,
        "actor": clip(a.actor, size["actor"]),
        "action": clip(a.action, size["action"]),
        "patient_id": None if a.patient_id is None else clip(a.patient_id, size["patient_id"]),
        "origin": None if a.origin is None else clip(a.origin, size["origin"]),
        "detail": clip_json(a.detail, AUDIT_DETAIL_MAX),
    }


log = logging.getLogger(__name__)

_READING0 = ReadingRow("d", 1, "p", 1, 0.0, 0.0, None)
_EVENT0 = Event.from_stored("s", 1, "reading", 0.0, b"{}")
_ROLLUP_COLUMNS = tuple("start metric vmin vmax vsum n last_ts last_offset vlast".split())
_ROLLUP0 = rollups.rollup_rows([Event.new("s", 1, "reading", 0.0, {"hr": 1.0})])[0]
_ALERT0 = AlertRow("a", "p", "c", "high", "clinical", "active", 0.0, None, 0, "{}")
_COMMAND0 = CommandRow(
    "c", "p", "d", "n", "{}", "queued", "u", None, 0.0, 1.0, 1.0, None, 0.0, None, None
)
_AUDIT0 = AuditRow(0.0, "u", "a", None, "{}")


def _alert_upsert(dialect: Any) -> Any:
    """An alert's row after a change: the first acknowledgement is kept, the rest follows."""
    stmt = dialect.insert(t.alerts)
    ex = stmt.excluded
    return stmt.on_conflict_do_update(
        index_elements=["alert_id"],
        set_={
            "priority": ex.priority,
            "state": ex.state,
            "updated_at": ex.updated_at,
            "acknowledged_at": func.coalesce(t.alerts.c.acknowledged_at, ex.acknowledged_at),
            "acknowledged_by": func.coalesce(t.alerts.c.acknowledged_by, ex.acknowledged_by),
            "resolved_at": ex.resolved_at,
            "escalation_level": ex.escalation_level,
            "last": ex.last,
        },
    )


def _seq_upsert(dialect: Any) -> Any:
    """A device's highest accepted seq, raised and never lowered (a batch may come in after a
    later one only on a retry, but the store does not rely on the order)."""
    stmt = dialect.insert(t.device_seqs)
    larger = func.max if dialect is sqlite else func.greatest  # SQLite's max(a, b) is scalar
    return stmt.on_conflict_do_update(
        index_elements=["device_id"],
        set_={"high_seq": larger(t.device_seqs.c.high_seq, stmt.excluded.high_seq)},
    )


def _high_seqs(readings: list[ReadingRow]) -> dict[str, int]:
    """Each device's highest seq among a batch's readings."""
    high: dict[str, int] = {}
    for r in readings:
        if r.seq > high.get(r.device_id, 0):
            high[r.device_id] = r.seq
    return high


def _command_upsert(dialect: Any) -> Any:
    stmt = dialect.insert(t.commands)
    ex = stmt.excluded
    return stmt.on_conflict_do_update(
        index_elements=["command_id"],
        set_={k: ex[k] for k in ("status", "sent_at", "updated_at", "message", "result")},
    )


class SqlStore:
    """The :class:`~vitalwire.store.base.Store` on SQLAlchemy async Core."""

    def __init__(
        self, url: str, *, sqlite_synchronous: str = "NORMAL", dedicated_writer: bool = True
    ) -> None:
        """``dedicated_writer``: SQLite files write batches through :mod:`.sqlite_writer` (one
        thread hop per batch); off, they go through the async engine as PostgreSQL's do."""
        self.url = _async_url(url)
        self.backend = "sqlite" if self.url.startswith("sqlite") else "postgresql"
        sync = sqlite_synchronous.upper()
        if sync not in SYNCHRONOUS_MODES:
            raise ValueError(f"sqlite synchronous must be one of {SYNCHRONOUS_MODES}, got {sync}")
        self._synchronous = sync
        self.transactions = 0
        self.source = secrets.token_hex(8)
        self._engine: AsyncEngine | None = None
        self._head: str | None = None  # the migrations' head revision (migration_current)
        self._dialect: Any = sqlite if self.backend == "sqlite" else postgresql
        #: SQLite files: batches go through one dedicated connection on its own thread
        self._fast: SqliteBatchWriter | None = None
        self._dedicated_writer = dedicated_writer
        self._fast_sql: dict[str, tuple[str, tuple[str, ...]]] = {}
        self._reading_batch = ""  # the statement taking a batch's readings and events at once
        #: the roll-ups of what this node committed and has not flushed (store/rollups.py)
        self.rollups = rollups.RollupBook()
        self._marked: set[str] = set()  # streams known to have a rollup_marks row (PostgreSQL)
        #: held by retention while it rebuilds roll-ups: batches flush none meanwhile
        self._flush_lock = asyncio.Lock()
        #: held by each write for its take, commit, done and note of the roll-ups' book
        self._book_lock = asyncio.Lock()

    @property
    def engine(self) -> AsyncEngine:
        assert self._engine is not None, "store not opened"
        return self._engine

    async def open(self) -> None:
        kwargs: dict[str, Any] = {"hide_parameters": True}  # no health data in logs or errors
        engine = create_async_engine(self.url, **kwargs)
        if self.backend == "sqlite":
            synchronous = self._synchronous

            @event.listens_for(engine.sync_engine, "connect")
            def _pragmas(dbapi_conn: Any, _record: Any) -> None:
                cur = dbapi_conn.cursor()
                cur.execute("PRAGMA journal_mode=WAL")
                cur.execute(f"PRAGMA synchronous={synchronous}")
                cur.execute("PRAGMA busy_timeout=10000")
                cur.close()

        self._engine = engine
        async with engine.begin() as conn:
            await conn.run_sync(_run_migrations)
        database = make_url(self.url).database
        if (
            self._dedicated_writer
            and self.backend == "sqlite"
            and database not in (None, "", ":memory:")
        ):
            self._fast_sql = {
                # the two tables written for every reading take a batch's rows in one step
                "readings": compile_json_rows(
                    self._insert_ignore(t.readings), _reading_row(_READING0)
                ),
                "events": compile_json_rows(insert(t.events), _event_row(_EVENT0)),
                "seqs": compile_json_rows(_seq_upsert(sqlite), {"device_id": "d", "high_seq": 1}),
                "rollups": compile_json_rows(rollups.upsert(sqlite), _ROLLUP0),  # retention
                "alerts": compile_positional(_alert_upsert(sqlite), _alert_row(_ALERT0)),
                "commands": compile_positional(_command_upsert(sqlite), _command_row(_COMMAND0)),
                "audit": compile_positional(insert(t.audit), _audit_row(_AUDIT0)),
            }
            for name, row in (
                ("readings", _reading_row(_READING0)),
                ("events", _event_row(_EVENT0)),
            ):
                if self._fast_sql[name][1] != tuple(row):  # _fast_work builds these in this order
                    raise RuntimeError(f"{name}: parameter order {self._fast_sql[name][1]}")
            if self._fast_sql["seqs"][1] != ("device_id", "high_seq"):
                raise RuntimeError(f"seqs: parameter order {self._fast_sql['seqs'][1]}")
            # a batch's readings, events and high seqs: one statement, so one call into SQLite
            # ... and the roll-ups due (store/rollups.py: the rows, the catch-ups, the marks)
            self._reading_batch, setup = batch_view(
                "reading_batch",
                {
                    **{n: self._fast_sql[n][0] for n in ("readings", "events", "seqs")},
                    "flush_rows": rollups.SQLITE_FLUSH_ROWS,
                    "flush_catch_up": rollups.SQLITE_FLUSH_CATCH_UP,
                    "flush_marks": rollups.SQLITE_FLUSH_MARKS,
                },
            )
            self._fast = SqliteBatchWriter(database, synchronous=self._synchronous, setup=setup)
            await self._fast.open()

    def _fast_work(
        self, batch: Batch, flushes: list[rollups.Flush]
    ) -> list[tuple[str, list[tuple[Any, ...]]]]:
        """The batch and the roll-ups due as (SQL, parameter tuples) in write order, built on
        the caller's thread."""
        work: list[tuple[str, list[tuple[Any, ...]]]] = []
        sql = self._fast_sql
        readings = events = seqs = rolled = marks = None
        if batch.readings:
            high: dict[str, int] = {}
            unbound: list[tuple[Any, ...]] = []
            for r in batch.readings:  # one pass: each device's high seq, the unbound rows
                if r.seq > high.get(r.device_id, 0):
                    high[r.device_id] = r.seq
                if r.unbound_data is not None:  # columns in ReadingRow's order (checked)
                    unbound.append(
                        (
                            r.device_id,
                            r.seq,
                            r.patient_id,
                            r.stream_offset,
                            r.device_ts,
                            r.received_ts,
                            r.unbound_data,
                        )
                    )
            if unbound:
                readings = json_rows(unbound)
            seqs = json_rows(list(high.items()))
        if batch.events:
            events = json_rows(
                [(e.stream, e.offset, e.kind, e.ts, e.data_json.decode()) for e in batch.events]
            )
        if flushes:
            rows, due = rollups.sqlite_flush_params(flushes)
            rolled, marks = json_rows(rows), json_rows(due)
        if readings is not None or events is not None or seqs is not None or marks is not None:
            work.append((self._reading_batch, [(readings, events, seqs, rolled, marks, marks)]))
        for name, rows, to_row in (
            ("alerts", batch.alerts, _alert_row),
            ("commands", batch.commands, _command_row),
            ("audit", batch.audit, _audit_row),
        ):
            if rows:
                text, keys = sql[name]
                work.append((text, [tuple(d[k] for k in keys) for d in map(to_row, rows)]))
        return work

    async def migration_current(self) -> bool:
        """The store's alembic revision is the code's head (/readyz); raises if the store does
        not answer."""
        async with self.engine.connect() as conn:
            current = await conn.run_sync(
                lambda c: MigrationContext.configure(c).get_current_revision()
            )
        if self._head is None:  # the code's head: read once from the migration scripts
            cfg = Config()
            cfg.set_main_option("script_location", str(_MIGRATIONS))
            self._head = ScriptDirectory.from_config(cfg).get_current_head()
        return bool(current == self._head)

    async def close(self) -> None:
        if self._engine is not None:
            try:  # what this node holds in memory, so a restart has nothing to catch up
                await self.flush_rollups()
            except Exception:
                log.warning("roll-ups not flushed at close: caught up at the next start")
        if self._fast is not None:
            await self._fast.close()
            self._fast = None
        if self._engine is not None:
            await self._engine.dispose()
            self._engine = None

    def _insert_ignore(self, table: Any) -> Any:
        return self._dialect.insert(table).on_conflict_do_nothing()

    # -- the event log ------------------------------------------------------------------------

    async def write_batch(self, batch: Batch) -> None:
        """Commit ``batch``, and with it the roll-ups due (store/rollups.py); then count its
        readings into this node's roll-ups. The book's take, done and note of one batch are
        never interleaved with another write's (``_book_lock``: uncontended, as the writer
        commits one batch at a time, except while :meth:`flush_rollups` writes)."""
        async with self._book_lock:
            flushes: list[rollups.Flush] = []
            if not self._flush_lock.locked():  # retention rebuilding roll-ups: none flushed
                flushes = self.rollups.take(time.time())
            await self._write_batch(batch, flushes)
            self.transactions += 1
            if flushes:
                self.rollups.done(flushes)
                self._marked.update(f.stream for f in flushes)
            self.rollups.note(batch.events)

    async def flush_rollups(self) -> int:
        """Write every roll-up this node holds, open grains too (at shutdown, and for tests);
        returns the streams flushed."""
        async with self._book_lock:
            flushes = self.rollups.take(time.time(), everything=True)
            if flushes:
                await self._write_batch(Batch(), flushes)
                self.rollups.done(flushes)
                self._marked.update(f.stream for f in flushes)
        return len(flushes)

    async def _write_batch(self, batch: Batch, flushes: list[rollups.Flush]) -> None:
        if self._fast is not None and batch.fence is None and not batch.sequenced:
            await self._fast.write(self._fast_work(batch, flushes))
            return
        one = None
        if self.backend == "postgresql" and not batch.sequenced and batch.events:
            one = _readings_pg_params(batch)
            if one is not None and not flushes:  # the usual batch: one statement, alone
                await self._write_readings_pg(batch.fence, one)
                return
        async with self.engine.begin() as conn:
            if batch.fence:
                await self._check_fence(conn, batch.fence)
            if one is not None:  # the usual batch on PostgreSQL: one statement
                await conn.execute(_READINGS_PG, one)
            else:
                await self._write_rows(conn, batch)
            if flushes:
                await self._flush(conn, flushes)

    async def _flush(self, conn: Any, flushes: list[rollups.Flush]) -> None:
        """The roll-ups due, in the caller's transaction (the async engine's path)."""
        if self.backend == "postgresql":
            new = sorted({f.stream for f in flushes} - self._marked)
            if new:
                await conn.execute(_PG_NEW_MARKS, {"s": new})
            await conn.execute(_PG_FLUSH, rollups.pg_flush_params(flushes))
            return
        rows, due = rollups.sqlite_flush_params(flushes)
        for sql, param in (
            (rollups.SQLITE_FLUSH_ROWS, rows),
            (rollups.SQLITE_FLUSH_CATCH_UP, due),
            (rollups.SQLITE_FLUSH_MARKS, due),
        ):
            await conn.exec_driver_sql(sql, (json_rows(param),))

    async def _write_rows(self, conn: Any, batch: Batch) -> None:
        """The batch's rows, a statement per table (in the caller's transaction)."""
        if batch.sequenced:
            await self._sequence(conn, batch)
        if batch.readings:
            unbound = [_reading_row(r) for r in batch.readings if r.unbound_data is not None]
            if unbound:
                await conn.execute(self._insert_ignore(t.readings), unbound)
            high = _high_seqs(batch.readings)
            await conn.execute(
                _seq_upsert(self._dialect),
                [{"device_id": d, "high_seq": seq} for d, seq in sorted(high.items())],
            )
        if batch.events:
            await conn.execute(insert(t.events), [_event_row(e) for e in batch.events])
        # in order: later changes of one alert or command win
        if batch.alerts:
            rows = [_alert_row(a) for a in batch.alerts]
            await conn.execute(_alert_upsert(self._dialect), rows)
        if batch.commands:
            rows = [_command_row(c) for c in batch.commands]
            await conn.execute(_command_upsert(self._dialect), rows)
        if batch.audit:
            await conn.execute(insert(t.audit), [_audit_row(a) for a in batch.audit])

    async def open_commands(self, patient_id: str | None = None) -> list[dict[str, Any]]:
        done = ("completed", "failed", "expired", "timed_out")
        q = (
            select(t.commands)
            .where(t.commands.c.status.not_in(done))
            .order_by(t.commands.c.created_at)
        )
        if patient_id is not None:
            q = q.where(t.commands.c.patient_id == patient_id)
        async with self.engine.connect() as conn:
            return [dict(r._mapping) for r in await conn.execute(q)]

    async def get_command(self, command_id: str) -> dict[str, Any] | None:
        q = select(t.commands).where(t.commands.c.command_id == command_id)
        async with self.engine.connect() as conn:
            row = (await conn.execute(q)).first()
            return None if row is None else dict(row._mapping)

    async def list_commands(
        self, filters: dict[str, Any], after: tuple[float, str] | None, limit: int
    ) -> list[dict[str, Any]]:
        c = t.commands.c
        q = select(t.commands).order_by(c.created_at.desc(), c.command_id.desc()).limit(limit)
        if filters.get("patients") is not None:
            q = q.where(c.patient_id.in_(list(filters["patients"])))
        if filters.get("device") is not None:
            q = q.where(c.device_id == filters["device"])
        if filters.get("status") is not None:
            q = q.where(c.status == filters["status"])
        if filters.get("since") is not None:
            q = q.where(c.created_at >= filters["since"])
        if filters.get("until") is not None:
            q = q.where(c.created_at < filters["until"])
        if after is not None:
            q = q.where(
                or_(
                    c.created_at < after[0],
                    and_(c.created_at == after[0], c.command_id < after[1]),
                )
            )
        async with self.engine.connect() as conn:
            return [dict(r._mapping) for r in await conn.execute(q)]

    async def list_devices(self) -> list[dict[str, Any]]:
        q = (
            select(
                t.devices.c.id,
                t.devices.c.kind,
                t.devices.c.disabled,
                t.devices.c.created_at,
                t.bindings.c.patient_id,
            )
            .select_from(
                t.devices.outerjoin(
                    t.bindings,
                    and_(t.bindings.c.device_id == t.devices.c.id, t.bindings.c.end_ts.is_(None)),
                )
            )
            .order_by(t.devices.c.id)
        )
        async with self.engine.connect() as conn:
            return [dict(r._mapping) for r in await conn.execute(q)]

    async def alerts_for(self, pid: str, limit: int) -> list[dict[str, Any]]:
        q = (
            select(t.alerts)
            .where(t.alerts.c.patient_id == pid)
            .order_by(t.alerts.c.raised_at.desc())
            .limit(limit)
        )
        async with self.engine.connect() as conn:
            return [dict(r._mapping) for r in await conn.execute(q)]

    async def list_alerts(
        self, filters: dict[str, Any], after: tuple[float, str] | None, limit: int
    ) -> list[dict[str, Any]]:
        c = t.alerts.c
        q = select(t.alerts).order_by(c.raised_at.desc(), c.alert_id.desc()).limit(limit)
        if filters.get("patients") is not None:
            q = q.where(c.patient_id.in_(list(filters["patients"])))
        if filters.get("state") is not None:
            q = q.where(c.state == filters["state"])
        if filters.get("priority") is not None:
            q = q.where(c.priority == filters["priority"])
        if filters.get("since") is not None:
            q = q.where(c.raised_at >= filters["since"])
        if filters.get("until") is not None:
            q = q.where(c.raised_at < filters["until"])
        if after is not None:
            q = q.where(
                or_(c.raised_at < after[0], and_(c.raised_at == after[0], c.alert_id < after[1]))
            )
        async with self.engine.connect() as conn:
            return [dict(r._mapping) for r in await conn.execute(q)]

    async def open_alerts(self, patient_id: str | None = None) -> list[dict[str, Any]]:
        q = select(t.alerts).where(t.alerts.c.state != "resolved").order_by(t.alerts.c.raised_at)
        if patient_id is not None:
            q = q.where(t.alerts.c.patient_id == patient_id)
        async with self.engine.connect() as conn:
            return [dict(r._mapping) for r in await conn.execute(q)]

    async def audit_log(
        self,
        limit: int,
        patient_id: str | None = None,
        *,
        actor: str | None = None,
        action: str | None = None,
        since: float | None = None,
        until: float | None = None,
        before: int | None = None,
    ) -> list[dict[str, Any]]:
        c = t.audit.c
        q = select(t.audit).order_by(c.id.desc()).limit(limit)
        if patient_id is not None:
            q = q.where(c.patient_id == patient_id)
        if actor is not None:
            q = q.where(c.actor == actor)
        if action is not None:
            q = q.where(c.action == action)
        if since is not None:
            q = q.where(c.at >= since)
        if until is not None:
            q = q.where(c.at < until)
        if before is not None:
            q = q.where(c.id < before)
        async with self.engine.connect() as conn:
            return [dict(r._mapping) for r in await conn.execute(q)]

    async def save_snapshots(self, rows: list[tuple[str, int, str]], now: float) -> None:
        if not rows:
            return
        stmt = self._dialect.insert(t.stream_snapshots)
        stmt = stmt.on_conflict_do_update(
            index_elements=["stream"],
            set_={k: stmt.excluded[k] for k in ("offset", "state", "saved_at")},
        )
        await self._write(
            stmt, [{"stream": s, "offset": o, "state": j, "saved_at": now} for s, o, j in rows]
        )

    async def _write(self, stmt: Any, rows: list[dict[str, Any]]) -> int:
        """One write statement (executed once per row) in its own transaction; on SQLite files
        through the batch writer, so it never waits on the writer's lock (nor the writer on
        it). Returns the rows changed."""
        if self._fast is not None:
            if len(rows) > 1 and isinstance(stmt, Insert):
                # many rows (every stream's snapshot): one step, see compile_json_rows
                text, keys = compile_json_rows(stmt, rows[0])
                data = json_rows([[r[k] for k in keys] for r in rows])
                return await self._fast.write([(text, [(data,)])])
            text, keys = compile_positional(stmt, rows[0])
            return await self._fast.write([(text, [tuple(r[k] for k in keys) for r in rows])])
        async with self.engine.begin() as conn:
            result = await conn.execute(stmt, rows[0] if len(rows) == 1 else rows)
        return int(result.rowcount or 0)

    async def load_snapshots(self) -> dict[str, tuple[int, str]]:
        async with self.engine.connect() as conn:
            rows = await conn.execute(select(t.stream_snapshots))
            return {r.stream: (int(r.offset), r.state) for r in rows}

    async def care_teams(self, now: float) -> dict[str, Any]:
        """Wards per user, patients assigned per user, active grants, ward of each patient, and
        each user's :class:`UserState` (role, disabled, token generation)."""
        async with self.engine.connect() as conn:
            wards: dict[str, set[str]] = {}
            for user, ward in await conn.execute(select(t.ward_members)):
                wards.setdefault(user, set()).add(ward)
            assigned: dict[str, set[str]] = {}
            for user, pid in await conn.execute(select(t.assignments)):
                assigned.setdefault(user, set()).add(pid)
            grants: dict[tuple[str, str], float] = {}
            q = select(t.grants.c.username, t.grants.c.patient_id, t.grants.c.expires_at).where(
                t.grants.c.expires_at > now
            )
            for user, pid, until in await conn.execute(q):
                grants[(user, pid)] = max(until, grants.get((user, pid), 0.0))
            ward_of = {
                pid: ward
                for pid, ward in await conn.execute(select(t.patients.c.id, t.patients.c.ward))
            }
            u = t.users.c
            users = {
                name: UserState(role, bool(disabled), int(gen))
                for name, role, disabled, gen in await conn.execute(
                    select(u.username, u.role, u.disabled, u.token_gen)
                )
            }
        return {
            "wards": wards,
            "assigned": assigned,
            "grants": grants,
            "ward_of": ward_of,
            "users": users,
        }

    async def access_version(self) -> str | None:
        return await self.get_meta(ACCESS_VERSION_KEY)

    async def _access_changed(self, conn: Any) -> None:
        """In the transaction that changes the care teams: a new access version, so that every
        process reloads them (and none reloads them while they stay the same)."""
        token = secrets.token_hex(8)
        await conn.execute(self._insert_ignore(t.meta).values(key=ACCESS_VERSION_KEY, value=token))
        await conn.execute(
            update(t.meta).where(t.meta.c.key == ACCESS_VERSION_KEY).values(value=token)
        )

    async def add_ward_member(
        self, username: str, ward: str, *, audit: AuditRow | None = None
    ) -> bool:
        """Put a user in a ward's care team; False (nothing written) when they were in it."""
        async with self.engine.begin() as conn:
            result = await conn.execute(
                self._insert_ignore(t.ward_members).values(username=username, ward=ward)
            )
            if not result.rowcount:
                return False
            if audit is not None:
                await conn.execute(insert(t.audit), [_audit_row(audit)])
            await self._access_changed(conn)
            return True

    async def assign(self, username: str, pid: str, *, audit: AuditRow | None = None) -> bool:
        """Assign a patient to a user; False (nothing written) when they were assigned."""
        async with self.engine.begin() as conn:
            result = await conn.execute(
                self._insert_ignore(t.assignments).values(username=username, patient_id=pid)
            )
            if not result.rowcount:
                return False
            if audit is not None:
                await conn.execute(insert(t.audit), [_audit_row(audit)])
            await self._access_changed(conn)
            return True

    async def add_grant(
        self, username: str, pid: str, reason: str, now: float, expires_at: float
    ) -> None:
        row = {
            "username": username,
            "patient_id": pid,
            "reason": reason,
            "granted_at": now,
            "expires_at": expires_at,
        }
        async with self.engine.begin() as conn:
            await conn.execute(insert(t.grants), [row])
            await self._access_changed(conn)

    async def set_device_disabled(
        self, did: str, disabled: bool, now: float | None = None, *, announced: bool = False
    ) -> None:
        async with self.engine.begin() as conn:
            await self._lock_changes(conn)
            result = await conn.execute(
                update(t.devices).where(t.devices.c.id == did).values(disabled=disabled)
            )
            if not result.rowcount:  # raised inside: nothing is written
                raise NotFound(f"device {did} does not exist", field="device_id")
            kind = "disable" if disabled else "enable"
            at = time.time() if now is None else now
            await self._log_change(conn, kind, at, device=did, announced=announced)

    # -- registry changes -----------------------------------------------------------------------

    async def _lock_changes(self, conn: Any) -> None:
        """First thing in a transaction that changes the registry: on PostgreSQL, writers of
        registry changes take turns until they commit, so ``registry_changes.id`` (handed out at
        insert) grows in commit order and a reader never passes an id still to be committed.
        SQLite has one writer at a time anyway."""
        if self.backend == "postgresql":
            await conn.execute(text("LOCK TABLE registry_changes IN SHARE ROW EXCLUSIVE MODE"))

    async def _log_change(
        self,
        conn: Any,
        kind: str,
        now: float,
        *,
        device: str | None = None,
        patient: str | None = None,
        previous: str | None = None,
        announced: bool = False,
    ) -> None:
        row = {
            "at": now,
            "kind": kind,
            "device_id": device,
            "patient_id": patient,
            "previous_patient_id": previous,
            "source": self.source,
            "announced": announced,
        }
        await conn.execute(insert(t.registry_changes), [row])

    async def registry_changes(self, after: int, limit: int = 1000) -> list[RegistryChange]:
        """The registry changes after the one numbered ``after``, oldest first."""
        c = t.registry_changes.c
        q = select(t.registry_changes).where(c.id > after).order_by(c.id).limit(limit)
        async with self.engine.connect() as conn:
            rows = await conn.execute(q)
            return [
                RegistryChange(
                    int(r.id),
                    r.at,
                    r.kind,
                    r.device_id,
                    r.patient_id,
                    r.previous_patient_id,
                    r.source,
                    bool(r.announced),
                )
                for r in rows
            ]

    async def registry_change_head(self) -> int:
        """The number of the last registry change (0 when there is none)."""
        async with self.engine.connect() as conn:
            value = await conn.scalar(select(func.max(t.registry_changes.c.id)))
            return int(value or 0)

    async def patient_settings(self, patient_id: str | None = None) -> dict[str, dict[str, Any]]:
        q = select(t.patient_settings)
        if patient_id is not None:
            q = q.where(t.patient_settings.c.patient_id == patient_id)
        async with self.engine.connect() as conn:
            rows = await conn.execute(q)
            return {r.patient_id: dict(r._mapping) for r in rows}

    async def set_patient_settings(
        self, pid: str, limits: str | None, observations: str | None, now: float, by: str
    ) -> None:
        row = {
            "patient_id": pid,
            "limits": limits,
            "observations": observations,
            "updated_at": now,
            "updated_by": by,
        }
        stmt = self._dialect.insert(t.patient_settings).values(row)
        stmt = stmt.on_conflict_do_update(
            index_elements=["patient_id"],
            set_={
                k: stmt.excluded[k] for k in ("limits", "observations", "updated_at", "updated_by")
            },
        )
        async with self.engine.begin() as conn:
            await conn.execute(stmt)

    # -- one writer per stream (several nodes; docs/architecture.md) ---------------------------

    async def _check_fence(self, conn: Any, fence: dict[str, tuple[str, int, int, int]]) -> None:
        """In the batch's transaction: each stream's lease is still (node, epoch) and its head
        is the offset before the batch's first; move the head to the batch's last. Otherwise
        raise :class:`Fenced` (the transaction rolls back: nothing of the batch is written).

        On PostgreSQL one statement for the whole batch (an UPDATE joined to the batch's fences,
        returning the streams it moved): a statement per stream cost about 0.45 ms each, 90 ms
        for a batch of 200 streams, which held a cluster node to a quarter of a ward.
        The UPDATE takes the lease rows' locks until the commit, so a node acquiring a lease
        meanwhile waits for this write and then sees its head."""
        c = t.stream_leases.c
        rows = [(s, n, e, first, last) for s, (n, e, first, last) in sorted(fence.items())]
        moved: set[str] = set()
        if self.backend == "sqlite":  # no VALUES with column names there; one writer anyway
            for s, n, e, first, last in rows:
                result = await conn.execute(
                    update(t.stream_leases)
                    .where(c.stream == s, c.node == n, c.epoch == e, c.head == first - 1)
                    .values(head=last)
                )
                if result.rowcount == 1:
                    moved.add(s)
            rows = []
        if rows:  # PostgreSQL: the batch's fences as five arrays, one statement text
            result = await conn.execute(
                _FENCE_PG,
                {
                    "s": [r[0] for r in rows],
                    "n": [r[1] for r in rows],
                    "e": [r[2] for r in rows],
                    "f": [r[3] for r in rows],
                    "l": [r[4] for r in rows],
                },
            )
            moved.update(r[0] for r in result)
        lost = set(fence) - moved
        if lost:
            raise Fenced(lost)

    async def _write_readings_pg(
        self, fence: dict[str, tuple[str, int, int, int]] | None, readings: dict[str, list[Any]]
    ) -> None:
        """A batch of readings' events on PostgreSQL, one statement committed alone (no BEGIN
        and COMMIT round trips beside it): :data:`_READINGS_PG`, or with a ``fence``
        :data:`_FENCED_READINGS_PG`. Raises :class:`Fenced` with the streams whose lease or
        head no longer matches when the fence did not hold (nothing of the batch is written)."""
        statement, params = _READINGS_PG, readings
        if fence:
            rows = sorted(fence.items())
            statement = _FENCED_READINGS_PG
            params = {
                "s": [s for s, _ in rows],
                "n": [f[0] for _, f in rows],
                "e": [f[1] for _, f in rows],
                "f": [f[2] for _, f in rows],
                "l": [f[3] for _, f in rows],
                **readings,
            }
        try:
            async with self.engine.connect() as conn:
                conn = await conn.execution_options(isolation_level="AUTOCOMMIT")
                await conn.execute(statement, params)
        except DBAPIError as exc:
            if not fence or getattr(exc.orig, "sqlstate", None) != _FENCED_SQLSTATE:
                raise
            lost = await self._lost_fences(fence)
            if not lost:  # cannot be (epochs and heads only grow): let the writer retry
                raise RuntimeError("the fence failed but every lease still matches") from exc
            raise Fenced(lost) from None

    async def _lost_fences(self, fence: dict[str, tuple[str, int, int, int]]) -> set[str]:
        """The streams of ``fence`` whose lease is no longer (node, epoch) with its head just
        before the batch's first offset."""
        c = t.stream_leases.c
        async with self.engine.connect() as conn:
            rows = await conn.execute(
                select(c.stream, c.node, c.epoch, c.head).where(c.stream.in_(list(fence)))
            )
            now = {s: (n, int(e), int(h)) for s, n, e, h in rows}
        return {s for s, (n, e, first, _) in fence.items() if now.get(s) != (n, e, first - 1)}

    async def _sequence(self, conn: Any, batch: Batch) -> None:
        """In the batch's transaction: give the events of each ``batch.sequenced`` stream the
        offsets after its counter (a ``stream_leases`` row of no node), moved past them by an
        UPDATE whose row lock is held to the commit: another node's batch of the stream waits
        for this one, so the stream's offsets are committed in order, without a gap."""
        c = t.stream_leases.c
        for stream in sorted(batch.sequenced):
            mine = [e for e in batch.events if e.stream == stream]
            if not mine:
                continue
            bump = update(t.stream_leases).where(c.stream == stream)
            bump = bump.values(head=c.head + len(mine)).returning(c.head)
            last = (await conn.execute(bump)).scalar()
            if last is None:  # the stream's first sequenced write: its counter starts at its head
                head = (
                    await conn.execute(
                        select(func.max(t.events.c.offset)).where(t.events.c.stream == stream)
                    )
                ).scalar()
                await conn.execute(
                    self._insert_ignore(t.stream_leases).values(
                        stream=stream, node="", epoch=0, head=int(head or 0), expires_at=0.0
                    )
                )
                last = (await conn.execute(bump)).scalar()
            first = int(last) - len(mine) + 1
            for i, e in enumerate(mine):
                e.offset = first + i
                e._frame = None  # noqa: SLF001 (encoded, if ever, with the old offset)

    async def lease_summary(self) -> list[tuple[str, str, int, float]]:
        """Per node and kind of lease (``patient`` or ``singleton:NAME``): how many, and the
        latest expiry (GET /cluster)."""
        c = t.stream_leases.c
        kind = case((c.stream.startswith("patient:"), "patient"), else_=c.stream)
        q = (
            select(c.node, kind, func.count(), func.max(c.expires_at))
            .where(c.node != "")
            .group_by(c.node, kind)
            .order_by(c.node, kind)
        )
        async with self.engine.connect() as conn:
            rows = (await conn.execute(q)).all()
        return [(str(n), str(k), int(count), float(exp)) for n, k, count, exp in rows]

    async def lapsed_leases(self, now: float, limit: int = 1000) -> list[Lease]:
        """Leases of patient streams that lapsed (their node died or left), oldest first."""
        c = t.stream_leases.c
        q = (
            select(t.stream_leases)
            .where(c.expires_at < now, c.node != "", c.stream.startswith("patient:"))
            .order_by(c.expires_at)
            .limit(limit)
        )
        async with self.engine.connect() as conn:
            rows = (await conn.execute(q)).all()
        return [
            Lease(r.stream, r.node, int(r.epoch), int(r.head), float(r.expires_at)) for r in rows
        ]

    async def acquire_stream(
        self, stream: str, node: str, now: float, ttl_s: float, *, force: bool = False
    ) -> Lease | None:
        """Take the lease of ``stream`` for ``node`` with a new epoch: when nobody holds it,
        it lapsed, ``node`` holds it already, or ``force`` (a device of the stream's patient
        is on ``node`` now). None when another node holds it and it has not lapsed.

        A stream with no lease yet starts at its head in the event log (a store that one node
        wrote before several did)."""
        c = t.stream_leases.c
        async with self.engine.begin() as conn:
            row = (
                await conn.execute(
                    select(t.stream_leases).where(c.stream == stream).with_for_update()
                )
            ).first()
            if row is None:
                head = (
                    await conn.execute(
                        select(func.max(t.events.c.offset)).where(t.events.c.stream == stream)
                    )
                ).scalar()
                lease = Lease(stream, node, 1, int(head or 0), now + ttl_s)
                inserted = await conn.execute(
                    self._insert_ignore(t.stream_leases).values(
                        stream=stream,
                        node=node,
                        epoch=1,
                        head=lease.head,
                        expires_at=lease.expires_at,
                    )
                )
                # another node inserted it first: its lease, not lapsed
                return lease if inserted.rowcount == 1 else None
            if row.node != node and row.expires_at > now and not force:
                return None
            lease = Lease(stream, node, int(row.epoch) + 1, int(row.head), now + ttl_s)
            await conn.execute(
                update(t.stream_leases)
                .where(c.stream == stream)
                .values(node=node, epoch=lease.epoch, expires_at=lease.expires_at)
            )
            return lease

    async def renew_streams(
        self, node: str, held: dict[str, int], now: float, ttl_s: float
    ) -> set[str]:
        """Extend ``node``'s leases (stream -> epoch); return the streams it no longer holds.

        :data:`RENEW_ROWS` streams per transaction: the node's writer fences the same rows and
        waits for a renewal that holds them, so a renewal holds few at a time (2,000 streams
        in one transaction held a node's commits about 100 ms every renewal). On PostgreSQL a
        renewal skips the rows locked meanwhile (:data:`_RENEW_PG`); a skipped row that is
        still the node's, at the same epoch, is not lost: it is extended at the next renewal
        (every third of the lease time)."""
        if not held:
            return set()
        c = t.stream_leases.c
        kept: set[str] = set()
        streams = sorted(held)
        for i in range(0, len(streams), RENEW_ROWS):
            part = streams[i : i + RENEW_ROWS]
            async with self.engine.begin() as conn:
                if self.backend == "postgresql":
                    rows = await conn.execute(
                        _RENEW_PG, {"s": part, "node": node, "x": now + ttl_s}
                    )
                else:  # one writer: nothing to skip
                    rows = await conn.execute(
                        update(t.stream_leases)
                        .where(c.node == node, c.stream.in_(part))
                        .values(expires_at=now + ttl_s)
                        .returning(c.stream, c.epoch)
                    )
                kept.update(s for s, epoch in rows if held.get(s) == epoch)
        missing = [s for s in streams if s not in kept]
        if missing and self.backend == "postgresql":  # skipped, or lost: read them unlocked
            async with self.engine.connect() as conn:
                rows = await conn.execute(
                    select(c.stream, c.node, c.epoch).where(c.stream.in_(missing))
                )
                kept.update(s for s, n, epoch in rows if n == node and held.get(s) == epoch)
        return set(streams) - kept

    async def release_streams(self, node: str, held: dict[str, int]) -> None:
        """Let the leases lapse at once (a clean shutdown): another node may take them."""
        c = t.stream_leases.c
        async with self.engine.begin() as conn:
            for stream, epoch in sorted(held.items()):
                await conn.execute(
                    update(t.stream_leases)
                    .where(c.stream == stream, c.node == node, c.epoch == epoch)
                    .values(expires_at=0.0)
                )

    async def stream_lease(self, stream: str) -> Lease | None:
        c = t.stream_leases.c
        async with self.engine.connect() as conn:
            row = (await conn.execute(select(t.stream_leases).where(c.stream == stream))).first()
        if row is None:
            return None
        return Lease(row.stream, row.node, int(row.epoch), int(row.head), float(row.expires_at))

    async def stream_heads(self) -> dict[str, int]:
        """Every stream's last offset. Read at start-up, so it also finds the patient streams
        whose roll-up mark is behind their head (a node killed before it flushed) and queues
        their catch-up (store/rollups.py)."""
        m = t.rollup_marks
        async with self.engine.connect() as conn:
            rows = await conn.execute(
                select(t.events.c.stream, func.max(t.events.c.offset)).group_by(t.events.c.stream)
            )
            heads = {stream: int(head) for stream, head in rows}
            marks = dict((await conn.execute(select(m.c.stream, m.c.rolled_offset))).all())
        self._marked.update(marks)
        self.rollups.backlog(
            {
                s: head
                for s, head in heads.items()
                if s.startswith("patient:") and head > marks.get(s, 0)
            }
        )
        return heads

    async def events_after(self, stream: str, after: int, limit: int) -> list[Event]:
        q = (
            select(t.events.c.offset, t.events.c.kind, t.events.c.ts, t.events.c.data)
            .where(t.events.c.stream == stream, t.events.c.offset > after)
            .order_by(t.events.c.offset)
            .limit(limit)
        )
        async with self.engine.connect() as conn:
            rows = await conn.execute(q)
            return [Event.from_stored(stream, o, k, ts, d.encode()) for o, k, ts, d in rows]

    async def first_offset(self, stream: str) -> int | None:
        async with self.engine.connect() as conn:
            value = await conn.scalar(
                select(func.min(t.events.c.offset)).where(t.events.c.stream == stream)
            )
            return None if value is None else int(value)

    async def recent_events(self, stream: str, limit: int) -> list[Event]:
        q = (
            select(t.events.c.offset, t.events.c.kind, t.events.c.ts, t.events.c.data)
            .where(t.events.c.stream == stream)
            .order_by(t.events.c.offset.desc())
            .limit(limit)
        )
        async with self.engine.connect() as conn:
            rows = list(await conn.execute(q))
        return [Event.from_stored(stream, o, k, ts, d.encode()) for o, k, ts, d in reversed(rows)]

    async def readings_between(
        self,
        stream: str,
        ts_from: float,
        ts_to: float,
        after: tuple[float, int] | None,
        limit: int,
    ) -> list[Event]:
        """Readings of ``stream`` with ``ts_from <= ts < ts_to`` and at least one metric (the
        readings roll-ups count), in (ts, offset) order, after the position ``after``.

        No index orders readings by time (migration 0014: it cost a page write per stream and
        batch). Those at or below the stream's roll-up mark lie within the offsets' span of the
        roll-up rows of the range's grains (``lo_offset`` … ``hi_offset``); those above it are
        the events after the mark. So: two range scans of the events' primary key, merged. The
        mark is read before the spans: a flush in between moves both, and the rows it adds above
        the mark read here are cut off (the scan after the mark holds them), so nothing is read
        twice or missed. A span is as wide as its grain's readings' offsets: narrow while
        receive times follow offsets (one node's clock); a clock stepped back only widens it."""
        e, r, m = t.events, t.vital_rollups, t.rollup_marks
        begin = ts_from if after is None else max(ts_from, after[0])
        q = select(e.c.offset, e.c.kind, e.c.ts, e.c.data).where(
            e.c.stream == stream, e.c.kind == READING, e.c.ts >= ts_from, e.c.ts < ts_to
        )
        if after is not None:
            a_ts, a_off = after
            q = q.where(or_(e.c.ts > a_ts, and_(e.c.ts == a_ts, e.c.offset > a_off)))
        q = q.order_by(e.c.ts, e.c.offset).limit(limit)
        async with self.engine.connect() as conn:
            mark = (await conn.scalar(select(m.c.rolled_offset).where(m.c.stream == stream))) or 0
            lo, hi = (
                await conn.execute(
                    select(func.min(r.c.lo_offset), func.max(r.c.hi_offset)).where(
                        r.c.stream == stream,
                        r.c.start >= rollups.grain_of(begin),
                        r.c.start < ts_to,
                    )
                )
            ).one()
            rows = list(await conn.execute(q.where(e.c.offset > mark)))
            if lo is not None and lo <= mark:
                span = (e.c.offset >= lo, e.c.offset <= min(hi, mark))
                rows += await conn.execute(q.where(*span))
                rows.sort(key=lambda x: (x[2], x[0]))
                del rows[limit:]
            return [Event.from_stored(stream, o, k, ts, d.encode()) for o, k, ts, d in rows]

    async def events_of_kind_between(
        self, stream: str, kind: str, ts_from: float, ts_to: float, limit: int
    ) -> list[Event]:
        e = t.events
        q = (
            select(e.c.offset, e.c.kind, e.c.ts, e.c.data)
            .where(
                e.c.stream == stream,
                e.c.kind == kind,
                _NOT_READING,
                e.c.ts >= ts_from,
                e.c.ts <= ts_to,
            )
            .order_by(e.c.ts, e.c.offset)
            .limit(limit)
        )
        async with self.engine.connect() as conn:
            rows = await conn.execute(q)
            return [Event.from_stored(stream, o, k, ts, d.encode()) for o, k, ts, d in rows]

    async def discharge_patient(
        self, pid: str, now: float, by: str, *, audit: AuditRow | None = None
    ) -> bool:
        p = t.patients
        async with self.engine.begin() as conn:
            row = (await conn.execute(select(p.c.discharged_at).where(p.c.id == pid))).first()
            if row is None:
                raise NotFound(f"patient {pid} does not exist", field="patient_id")
            if row.discharged_at is not None:
                return False
            await conn.execute(
                update(p).where(p.c.id == pid).values(discharged_at=now, discharged_by=by)
            )
            if audit is not None:
                await conn.execute(insert(t.audit), [_audit_row(audit)])
            await self._access_changed(conn)
            return True

    async def status_between(self, stream: str, ts_from: float, ts_to: float) -> list[Event]:
        e = t.events
        q = (
            select(e.c.offset, e.c.kind, e.c.ts, e.c.data)
            .where(
                e.c.stream == stream,
                e.c.kind == DEVICE_STATUS,
                _NOT_READING,
                e.c.ts >= ts_from,
                e.c.ts < ts_to,
            )
            .order_by(e.c.ts, e.c.offset)
        )
        async with self.engine.connect() as conn:
            rows = await conn.execute(q)
            return [Event.from_stored(stream, o, k, ts, d.encode()) for o, k, ts, d in rows]

    async def delete_events_before(self, ts: float) -> int:
        """Delete events older than ``ts``, always keeping each stream's last event: it holds
        the stream's head, so offsets keep growing after a restart.

        The roll-ups of every grain the range touches go, and are made again from the readings
        those grains keep (each stream's head; the part of the cut grain at or after ``ts``)
        that are at or below the stream's mark (the rest is rolled up by a later flush). First
        this node flushes what it holds if any of it is of a grain the cut touches (so no
        reading deleted here stays in its memory), and
        no flush may move a mark meanwhile: this node flushes none while it runs, and on
        PostgreSQL the marks are locked, so other nodes' flushes skip them (caught up later).
        Other nodes hold in memory only readings received in the last minute or so, far newer
        than any retention cut."""
        e, last = t.events, t.events.alias("last")
        head = select(func.max(last.c.offset)).where(last.c.stream == e.c.stream).scalar_subquery()
        before = bindparam("before", type_=t.events.c.ts.type)
        drop = e.delete().where(e.c.ts < before, e.c.offset < head)
        r = t.vital_rollups
        undo = r.delete().where(r.c.start < bindparam("before", type_=r.c.start.type))
        if self.rollups.holds_before(rollups.grain_of(ts) + rollups.GRAIN):
            await self.flush_rollups()
        async with self._flush_lock:
            async with self._book_lock:
                pass  # a batch in flight, flushing, is committed: the next ones flush none
            if self._fast is not None:
                async with self.engine.connect() as conn:
                    rolled = await self._rollups_kept(conn, ts)
                work: list[tuple[str, list[tuple[Any, ...]]]] = []
                for stmt in (drop, undo):
                    text, keys = compile_positional(stmt, {"before": ts})
                    work.append((text, [tuple(ts for _ in keys)]))
                if rolled:
                    text, keys = self._fast_sql["rollups"]
                    work.append((text, [(json_rows([tuple(x[k] for k in keys) for x in rolled]),)]))
                return (await self._fast.write_counts(work))[0]
            async with self.engine.begin() as conn:
                if self.backend == "postgresql":
                    m = t.rollup_marks
                    await conn.execute(select(m.c.stream).order_by(m.c.stream).with_for_update())
                rolled = await self._rollups_kept(conn, ts)
                deleted = await conn.execute(drop, {"before": ts})
                await conn.execute(undo, {"before": ts})
                if rolled:
                    await conn.execute(rollups.upsert(self._dialect), rolled)
            return int(deleted.rowcount or 0)

    async def _rollups_kept(self, conn: Any, ts: float) -> list[dict[str, Any]]:
        """Retention: the roll-up rows of what ``delete_events_before(ts)`` keeps in the grains
        it cuts, at or below each stream's mark. Receive times in the past never change, so
        reading these before the delete is safe."""
        e, last, r = t.events, t.events.alias("last"), t.vital_rollups
        head = select(func.max(last.c.offset)).where(last.c.stream == e.c.stream).scalar_subquery()
        cut = rollups.grain_of(ts)
        heads = await conn.execute(
            select(e.c.stream, e.c.offset, e.c.kind, e.c.ts, e.c.data).where(
                e.c.kind == READING, e.c.ts < ts, e.c.offset == head
            )
        )
        keep = [Event.from_stored(s, o, k, x, d.encode()) for s, o, k, x, d in heads]
        if cut < ts:
            streams = await conn.scalars(select(r.c.stream).where(r.c.start == cut).distinct())
            for stream in list(streams):
                keep += await self.readings_between(
                    stream, ts, cut + rollups.GRAIN, None, 1_000_000
                )
        m = t.rollup_marks
        marks = dict((await conn.execute(select(m.c.stream, m.c.rolled_offset))).all())
        return rollups.rollup_rows([x for x in keep if x.offset <= marks.get(x.stream, 0)])

    async def rollups_between(
        self, stream: str, start_from: int, start_to: int, metrics: list[str]
    ) -> tuple[int, list[tuple[int, str, float, float, float, int, float, int, float]]]:
        """Roll-ups of ``stream`` with ``start_from <= start < start_to`` for ``metrics``, as
        (start, metric, min, max, sum, count, last_ts, last_offset, last) in start order (one
        range scan of the table's primary key (stream, start, metric)), and the stream's mark:
        they hold its readings at offsets up to the mark, none above it. Rows and mark are
        moved in one transaction; the mark is read before and after the rows, and read again
        if a flush came in between (marks only go up)."""
        r, m = t.vital_rollups, t.rollup_marks
        mark_q = select(m.c.rolled_offset).where(m.c.stream == stream)
        q = (
            select(*(r.c[k] for k in _ROLLUP_COLUMNS))
            .where(
                r.c.stream == stream,
                r.c.start >= start_from,
                r.c.start < start_to,
                r.c.metric.in_(metrics),
            )
            .order_by(r.c.start)
        )
        async with self.engine.connect() as conn:
            before = await conn.scalar(mark_q)
            while True:
                rows = [tuple(row) for row in await conn.execute(q)]
                after = await conn.scalar(mark_q)
                if after == before:
                    return int(after or 0), rows  # type: ignore[return-value]
                before = after

    async def device_last_seq(self, device_id: str) -> int:
        async with self.engine.connect() as conn:
            value = await conn.scalar(
                select(t.device_seqs.c.high_seq).where(t.device_seqs.c.device_id == device_id)
            )
            return int(value or 0)

    # -- registry ----------------------------------------------------------------------------

    async def _insert_new(self, table: Any, what: str, row: dict[str, Any]) -> None:
        try:
            async with self.engine.begin() as conn:
                await conn.execute(insert(table), [row])
        except IntegrityError:
            raise Conflict(f"{what} already exists", field="id") from None

    async def create_patient(
        self, pid: str, name: str, ward: str, now: float, *, announced: bool = False
    ) -> None:
        row = {"id": pid, "name": name, "ward": ward, "created_at": now}
        try:
            async with self.engine.begin() as conn:
                await self._lock_changes(conn)
                await conn.execute(insert(t.patients), [row])
                await self._access_changed(conn)  # a patient's ward decides who may see them
                await self._log_change(conn, "patient", now, patient=pid, announced=announced)
        except IntegrityError:
            raise Conflict(f"patient {pid} already exists", field="id") from None

    async def list_patients(self) -> list[dict[str, Any]]:
        async with self.engine.connect() as conn:
            rows = await conn.execute(select(t.patients).order_by(t.patients.c.id))
            out = [dict(r._mapping) for r in rows]
            active = await conn.execute(
                select(t.bindings.c.patient_id, t.bindings.c.device_id).where(
                    t.bindings.c.end_ts.is_(None)
                )
            )
            devices: dict[str, list[str]] = {}
            for pid, did in active:
                devices.setdefault(pid, []).append(did)
        for p in out:
            p["devices"] = sorted(devices.get(p["id"], []))
        return out

    async def create_device(self, did: str, secret_hash: str, kind: str, now: float) -> None:
        row = {
            "id": did,
            "secret_hash": secret_hash,
            "kind": kind,
            "disabled": False,
            "created_at": now,
        }
        await self._insert_new(t.devices, f"device {did}", row)

    async def set_device_secret(
        self,
        did: str,
        secret_hash: str,
        now: float,
        *,
        audit: AuditRow | None = None,
        announced: bool = False,
    ) -> None:
        """A device's new secret hash, with ``audit`` (its record) in the same transaction."""
        async with self.engine.begin() as conn:
            await self._lock_changes(conn)
            result = await conn.execute(
                update(t.devices).where(t.devices.c.id == did).values(secret_hash=secret_hash)
            )
            if not result.rowcount:  # raised inside: nothing is written
                raise NotFound(f"device {did} does not exist", field="device_id")
            if audit is not None:
                await conn.execute(insert(t.audit), [_audit_row(audit)])
            await self._log_change(conn, "secret", now, device=did, announced=announced)

    async def get_patient(self, pid: str) -> dict[str, Any] | None:
        """One patient as :meth:`list_patients` gives it (with its bound devices), or None."""
        async with self.engine.connect() as conn:
            row = (await conn.execute(select(t.patients).where(t.patients.c.id == pid))).first()
            if row is None:
                return None
            bound = await conn.execute(
                select(t.bindings.c.device_id).where(
                    t.bindings.c.patient_id == pid, t.bindings.c.end_ts.is_(None)
                )
            )
            return dict(row._mapping) | {"devices": sorted(d for (d,) in bound)}

    async def get_device(self, did: str) -> dict[str, Any] | None:
        async with self.engine.connect() as conn:
            row = (await conn.execute(select(t.devices).where(t.devices.c.id == did))).first()
            return None if row is None else dict(row._mapping)

    async def bind(
        self, did: str, pid: str, now: float, *, announced: bool = False
    ) -> Binding | None:
        async with self.engine.begin() as conn:
            await self._lock_changes(conn)
            previous = await self._end_binding(conn, did, now)
            await conn.execute(
                insert(t.bindings),
                [{"device_id": did, "patient_id": pid, "start_ts": now, "end_ts": None}],
            )
            before = previous.patient_id if previous else None
            await self._log_change(
                conn, "bind", now, device=did, patient=pid, previous=before, announced=announced
            )
        return previous

    async def unbind(self, did: str, now: float, *, announced: bool = False) -> Binding | None:
        async with self.engine.begin() as conn:
            await self._lock_changes(conn)
            previous = await self._end_binding(conn, did, now)
            before = previous.patient_id if previous else None
            await self._log_change(
                conn, "unbind", now, device=did, previous=before, announced=announced
            )
            return previous

    async def _end_binding(self, conn: Any, did: str, now: float) -> Binding | None:
        row = (
            await conn.execute(
                select(t.bindings).where(
                    t.bindings.c.device_id == did, t.bindings.c.end_ts.is_(None)
                )
            )
        ).first()
        if row is None:
            return None
        await conn.execute(update(t.bindings).where(t.bindings.c.id == row.id).values(end_ts=now))
        return Binding(did, row.patient_id, row.start_ts, now)

    async def active_binding(self, did: str) -> Binding | None:
        async with self.engine.connect() as conn:
            row = (
                await conn.execute(
                    select(t.bindings).where(
                        t.bindings.c.device_id == did, t.bindings.c.end_ts.is_(None)
                    )
                )
            ).first()
        return None if row is None else Binding(did, row.patient_id, row.start_ts, None)

    async def create_user(
        self,
        username: str,
        password_hash: str,
        role: str,
        now: float,
        *,
        audit: AuditRow | None = None,
    ) -> None:
        row = {
            "username": username,
            "password_hash": password_hash,
            "role": role,
            "created_at": now,
            "disabled": False,
            "token_gen": 0,
        }
        try:
            async with self.engine.begin() as conn:
                await conn.execute(insert(t.users), [row])
                if audit is not None:
                    await conn.execute(insert(t.audit), [_audit_row(audit)])
                await self._access_changed(conn)  # every server learns the user at once
        except IntegrityError:
            raise Conflict(f"user {username} already exists", field="id") from None

    async def list_users(self) -> list[dict[str, Any]]:
        """Every user (no password hash) with their wards and assigned patients."""
        c = t.users.c
        async with self.engine.connect() as conn:
            rows = await conn.execute(
                select(c.username, c.role, c.disabled, c.created_at).order_by(c.username)
            )
            users = [dict(r._mapping) | {"wards": [], "patients": []} for r in rows]
            by_name = {u["username"]: u for u in users}
            for user, ward in await conn.execute(select(t.ward_members)):
                if user in by_name:
                    by_name[user]["wards"].append(ward)
            for user, pid in await conn.execute(select(t.assignments)):
                if user in by_name:
                    by_name[user]["patients"].append(pid)
        for u in users:
            u["disabled"] = bool(u["disabled"])
            u["wards"].sort()
            u["patients"].sort()
        return users

    async def update_user(
        self,
        username: str,
        *,
        role: str | None = None,
        disabled: bool | None = None,
        password_hash: str | None = None,
        revoke_tokens: bool = False,
        audit: AuditRow | None = None,
        keep_admin: bool = False,
    ) -> dict[str, Any]:
        """Change a user's role, disabled flag or password; ``revoke_tokens`` raises the token
        generation (every token issued before stops working). ``audit`` is written in the same
        transaction; the access version changes with it, so every server applies it at once.
        ``keep_admin``: refuse (Conflict, nothing written) when no enabled admin would be left.
        Returns the user as it was before the change. Raises NotFound."""
        c = t.users.c
        values: dict[str, Any] = {}
        if role is not None:
            values["role"] = role
        if disabled is not None:
            values["disabled"] = disabled
        if password_hash is not None:
            values["password_hash"] = password_hash
        if revoke_tokens:
            values["token_gen"] = c.token_gen + 1
        async with self.engine.begin() as conn:
            if keep_admin:
                await self._lock_admins(conn)
            before = (
                await conn.execute(
                    select(c.username, c.role, c.disabled, c.token_gen).where(
                        c.username == username
                    )
                )
            ).first()
            if before is None:  # raised inside: nothing is written
                raise NotFound(f"user {username} does not exist", field="username")
            if values:
                await conn.execute(update(t.users).where(c.username == username).values(**values))
            if keep_admin:
                await self._check_an_admin_left(conn, username)
            if audit is not None:
                await conn.execute(insert(t.audit), [_audit_row(audit)])
            await self._access_changed(conn)
        return dict(before._mapping) | {"disabled": bool(before.disabled)}

    async def _lock_admins(self, conn: Any) -> None:
        """First in a transaction that may demote, disable or delete an admin: on PostgreSQL,
        lock the admins' rows, so two such changes made at once take turns and the second one
        counts what the first left (SQLite has one writer at a time anyway)."""
        if self.backend == "postgresql":
            await conn.execute(
                select(t.users.c.username).where(t.users.c.role == "admin").with_for_update()
            )

    async def _check_an_admin_left(self, conn: Any, username: str) -> None:
        """Raise Conflict (rolling the transaction back) when no enabled admin is left."""
        c = t.users.c
        q = select(c.username).where(c.role == "admin", c.disabled.is_(False)).limit(1)
        if (await conn.execute(q)).first() is None:
            raise Conflict(
                f"user {username} is the last enabled admin: make another admin first",
                field="username",
            )

    async def delete_user(
        self, username: str, *, audit: AuditRow | None = None, keep_admin: bool = False
    ) -> None:
        """Delete a user with their ward memberships, assignments and break-glass grants (the
        audit log keeps their name). ``keep_admin`` as in :meth:`update_user`. Raises NotFound."""
        async with self.engine.begin() as conn:
            if keep_admin:
                await self._lock_admins(conn)
            result = await conn.execute(delete(t.users).where(t.users.c.username == username))
            if not result.rowcount:
                raise NotFound(f"user {username} does not exist", field="username")
            if keep_admin:
                await self._check_an_admin_left(conn, username)
            for table in (t.ward_members, t.assignments, t.grants):
                await conn.execute(delete(table).where(table.c.username == username))
            if audit is not None:
                await conn.execute(insert(t.audit), [_audit_row(audit)])
            await self._access_changed(conn)

    async def remove_ward_member(
        self, username: str, ward: str, *, audit: AuditRow | None = None
    ) -> bool:
        """Take a user out of a ward's care team; False when they were not in it."""
        m = t.ward_members.c
        return await self._remove_from_care(
            delete(t.ward_members).where(m.username == username, m.ward == ward), audit
        )

    async def unassign(self, username: str, pid: str, *, audit: AuditRow | None = None) -> bool:
        """End a patient's individual assignment to a user; False when there was none."""
        a = t.assignments.c
        return await self._remove_from_care(
            delete(t.assignments).where(a.username == username, a.patient_id == pid), audit
        )

    async def _remove_from_care(self, stmt: Any, audit: AuditRow | None) -> bool:
        """Run a DELETE of a care-team row; with its audit row and a new access version when it
        removed one (False, nothing written, when there was none)."""
        async with self.engine.begin() as conn:
            if not (await conn.execute(stmt)).rowcount:
                return False
            if audit is not None:
                await conn.execute(insert(t.audit), [_audit_row(audit)])
            await self._access_changed(conn)
            return True

    async def get_user(self, username: str) -> dict[str, Any] | None:
        async with self.engine.connect() as conn:
            row = (
                await conn.execute(select(t.users).where(t.users.c.username == username))
            ).first()
            return None if row is None else dict(row._mapping)

    async def get_meta(self, key: str) -> str | None:
        async with self.engine.connect() as conn:
            return await conn.scalar(select(t.meta.c.value).where(t.meta.c.key == key))

    async def set_meta(self, key: str, value: str) -> None:
        async with self.engine.begin() as conn:
            stmt = self._insert_ignore(t.meta).values(key=key, value=value)
            await conn.execute(stmt)
            await conn.execute(update(t.meta).where(t.meta.c.key == key).values(value=value))
