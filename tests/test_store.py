"""Store contract: one body for every backend (SQLite now; PostgreSQL joins the parameter list)."""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import inspect

from tests.conftest import REQUIRE_SERVICES
from vitalwire.core.errors import Conflict
from vitalwire.store import Batch, ReadingRow, Store, open_store
from vitalwire.store.schema import metadata
from vitalwire.wire import Event

#: The local PostgreSQL (trust auth); each test gets a fresh database of its own on it.
POSTGRES = os.environ.get("VITALWIRE_TEST_POSTGRES", "postgresql://postgres@127.0.0.1:5432/test")


@contextlib.asynccontextmanager
async def fresh_postgres_db() -> AsyncIterator[str]:
    """A new, empty database on the local PostgreSQL, dropped afterwards; skip (fail in CI)
    when PostgreSQL is not reachable."""
    import asyncpg

    try:
        admin = await asyncpg.connect(POSTGRES, timeout=5)
    except Exception as exc:
        reason = f"PostgreSQL is not reachable at {POSTGRES}: {exc!r}"
        if REQUIRE_SERVICES:
            pytest.fail(reason)
        pytest.skip(reason)
    name = f"vwtest_{uuid.uuid4().hex[:12]}"
    try:
        await admin.execute(f"CREATE DATABASE {name}")
        try:
            yield POSTGRES.rsplit("/", 1)[0] + "/" + name
        finally:
            await admin.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
    finally:
        await admin.close()


@pytest.fixture(params=["sqlite", "sqlite-engine", "postgresql"])
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Store]:
    """``sqlite``: batches through the dedicated writer thread; ``sqlite-engine``: through the
    async engine, the path PostgreSQL takes; ``postgresql``: a fresh database on the local
    PostgreSQL server, through asyncpg."""
    from vitalwire.store.sql import SqlStore

    async with contextlib.AsyncExitStack() as stack:
        if request.param == "postgresql":
            url = await stack.enter_async_context(fresh_postgres_db())
        else:
            url = f"sqlite:///{tmp_path / 'store.db'}"
        s: Store = SqlStore(url, dedicated_writer=request.param == "sqlite")
        await s.open()
        try:
            yield s
        finally:
            await s.close()


def _batch(device: str, stream: str, seqs: range, first_offset: int) -> Batch:
    b = Batch()
    for i, seq in enumerate(seqs):
        off = first_offset + i
        b.readings.append(ReadingRow(device, seq, "P1", off, 1000.0 + seq, 2000.0))
        b.events.append(Event.new(stream, off, "reading", 2000.0, {"seq": seq, "spo2": 97.0}))
    return b


async def test_write_batch_is_one_transaction_and_events_read_back(store: Store) -> None:
    before = store.transactions
    await store.write_batch(_batch("d1", "patient:P1", range(1, 301), 1))
    assert store.transactions == before + 1
    assert await store.stream_heads() == {"patient:P1": 300}
    assert await store.device_last_seq("d1") == 300
    after = await store.events_after("patient:P1", 295, 100)
    assert [e.offset for e in after] == [296, 297, 298, 299, 300]
    assert after[0].data == {"seq": 296, "spo2": 97.0}
    assert await store.first_offset("patient:P1") == 1
    recent = await store.recent_events("patient:P1", 3)
    assert [e.offset for e in recent] == [298, 299, 300]


async def test_a_failing_batch_writes_nothing_and_the_next_one_commits(store: Store) -> None:
    """All or nothing: an event offset already taken fails the batch; none of its rows stay."""
    await store.write_batch(_batch("d1", "patient:P1", range(1, 4), 1))
    clash = _batch("d2", "patient:P1", range(1, 4), 3)  # offset 3 exists
    with pytest.raises(Exception, match="(?i)unique|constraint"):
        await store.write_batch(clash)
    assert await store.device_last_seq("d2") == 0
    assert await store.stream_heads() == {"patient:P1": 3}
    await store.write_batch(_batch("d2", "patient:P1", range(1, 4), 4))
    assert await store.device_last_seq("d2") == 3
    assert await store.stream_heads() == {"patient:P1": 6}


async def test_a_devices_high_seq_is_the_highest_ever_written_and_never_falls(
    store: Store,
) -> None:
    """The deduplication key is one row per device: each batch raises it to the batch's highest
    seq of the device, a batch with lower or repeated seqs (a retry) leaves it, and devices
    interleaved in one batch, bound or not, each keep their own."""
    await store.write_batch(_batch("d1", "patient:P1", range(1, 4), 1))
    cases = [
        ([("d1", 2)], {"d1": 3}),
        ([("d1", 3), ("d1", 1)], {"d1": 3}),
        ([("d1", 7), ("d2", 5), ("d1", 4), ("d2", 9)], {"d1": 7, "d2": 9}),
        ([("d2", 1), ("u1", 40), ("u1", 2)], {"d1": 7, "d2": 9, "u1": 40}),
    ]
    offset = 100
    for rows, expected in cases:
        batch = Batch()
        for did, seq in rows:
            if did.startswith("u"):  # an unbound device: the values stay in the readings row
                batch.readings.append(ReadingRow(did, seq, None, None, 1.0, 1.0, '{"hr": 60}'))
            else:
                offset += 1
                batch.readings.append(ReadingRow(did, seq, "P1", offset, 1.0, 1.0))
        await store.write_batch(batch)
        assert {d: await store.device_last_seq(d) for d in expected} == expected, rows


async def test_migration_0005_carries_each_devices_high_seq_over(tmp_path: Path) -> None:
    """A store written before revision 0005 kept one ``readings`` row per reading; opening it
    migrates each device's highest seq into ``device_seqs`` (and keeps the old rows)."""
    import sqlite3

    from alembic import command
    from alembic.config import Config
    from sqlalchemy import create_engine

    from vitalwire.store.sql import _MIGRATIONS, SqlStore

    path = tmp_path / "old.db"
    engine = create_engine(f"sqlite:///{path}")
    with engine.begin() as conn:  # the schema as revision 0004 left it
        cfg = Config()
        cfg.set_main_option("script_location", str(_MIGRATIONS))
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, "0004")
    engine.dispose()
    with sqlite3.connect(path) as db:
        assert "device_seqs" not in {r[0] for r in db.execute("SELECT name FROM sqlite_master")}
        db.executemany(
            "INSERT INTO readings (device_id, seq, device_ts, received_ts) VALUES (?, ?, 1, 1)",
            [("d1", 5), ("d1", 2**62 + 1), ("d2", 3), ("d2", 1)],
        )
    store = SqlStore(f"sqlite:///{path}")
    await store.open()
    try:
        assert await store.device_last_seq("d1") == 2**62 + 1
        assert await store.device_last_seq("d2") == 3
        assert await store.device_last_seq("d3") == 0
    finally:
        await store.close()
    with sqlite3.connect(path) as db:
        assert db.execute("SELECT count(*) FROM readings").fetchone() == (4,)


@pytest.mark.parametrize(
    ("text", "number"),
    [
        ('quote " backslash \\ newline \n tab \t', 0.1 + 0.2),
        ("accents é ü, line separator \u2028, emoji \U0001f600", 1e-300),
        ("", 2.0**53 + 1),
        ('{"looks": ["like", "json"]}', -1.7976931348623157e308),
    ],
)
async def test_rows_read_back_exactly_as_written(store: Store, text: str, number: float) -> None:
    """The writer thread hands a batch's readings, events and high seqs to SQLite as one JSON
    array each: text, NULL, integers past 2**53 and doubles must come back exactly as bound one
    by one. (No text column holds a NUL character: ids are validated, data is JSON, which
    escapes it.) Only the unbound reading has a ``readings`` row; both devices' seqs are kept."""
    from sqlalchemy import select

    from vitalwire.store import schema
    from vitalwire.store.sql import SqlStore

    assert isinstance(store, SqlStore)
    seq = 2**62 + 7
    rows = [
        ReadingRow("d1", seq, None, None, number, 1.5, text),
        ReadingRow(text or "d2", 3, "P1", 9, 1.0, number, None),
    ]
    event = Event.new("patient:P1", 9, "reading", number, {"text": text, "n": number})
    await store.write_batch(Batch(readings=rows, events=[event]))
    async with store.engine.connect() as conn:
        got = (await conn.execute(select(schema.readings).order_by(schema.readings.c.seq))).all()
    assert [tuple(r) for r in got] == [("d1", seq, None, None, number, 1.5, text)]
    assert await store.device_last_seq("d1") == seq
    assert await store.device_last_seq(text or "d2") == 3
    (back,) = await store.events_after("patient:P1", 0, 10)
    assert (back.offset, back.kind, back.ts) == (9, "reading", number)
    assert back.data_json == event.data_json and back.data == {"text": text, "n": number}


async def test_unknown_stream_and_device(store: Store) -> None:
    assert await store.first_offset("patient:nobody") is None
    assert await store.events_after("patient:nobody", 0, 10) == []
    assert await store.device_last_seq("nobody") == 0


async def test_bindings_follow_transfers(store: Store) -> None:
    await store.create_patient("P1", "A", "w", 1.0)
    await store.create_patient("P2", "B", "w", 1.0)
    await store.create_device("d1", "h", "monitor", 1.0)
    assert await store.bind("d1", "P1", 10.0) is None
    previous = await store.bind("d1", "P2", 20.0)
    assert previous is not None
    assert (previous.patient_id, previous.start_ts, previous.end_ts) == ("P1", 10.0, 20.0)
    active = await store.active_binding("d1")
    assert active is not None and active.patient_id == "P2"
    patients = {p["id"]: p["devices"] for p in await store.list_patients()}
    assert patients == {"P1": [], "P2": ["d1"]}
    listed = {p["id"]: p for p in await store.list_patients()}
    assert await store.get_patient("P2") == listed["P2"]  # one patient, as the list gives it
    assert await store.get_patient("P1") == listed["P1"]
    assert await store.get_patient("P3") is None
    ended = await store.unbind("d1", 30.0)
    assert ended is not None and ended.patient_id == "P2"
    assert await store.active_binding("d1") is None


async def test_every_registry_change_is_logged_in_commit_order(store: Store) -> None:
    """A running server follows these rows: each change of the registry logs one, in the
    transaction that makes it, numbered in commit order, naming the writing store."""
    assert await store.registry_change_head() == 0
    assert await store.registry_changes(0) == []
    await store.create_patient("P1", "A", "w", 1.0)
    await store.create_patient("P2", "B", "w", 2.0, announced=True)
    await store.create_device("d1", "h", "monitor", 3.0)  # a new device changes no session
    await store.bind("d1", "P1", 4.0)
    await store.bind("d1", "P2", 5.0, announced=True)
    await store.unbind("d1", 6.0)
    await store.unbind("d1", 7.0)  # nothing to end: still logged, with no previous patient
    await store.set_device_disabled("d1", True, 8.0)
    await store.set_device_disabled("d1", False, 9.0)
    await store.set_device_secret("d1", "h2", 10.0)
    changes = await store.registry_changes(0)
    got = [
        (c.at, c.kind, c.device_id, c.patient_id, c.previous_patient_id, c.announced)
        for c in changes
    ]
    assert got == [
        (1.0, "patient", None, "P1", None, False),
        (2.0, "patient", None, "P2", None, True),
        (4.0, "bind", "d1", "P1", None, False),
        (5.0, "bind", "d1", "P2", "P1", True),
        (6.0, "unbind", "d1", None, "P2", False),
        (7.0, "unbind", "d1", None, None, False),
        (8.0, "disable", "d1", None, None, False),
        (9.0, "enable", "d1", None, None, False),
        (10.0, "secret", "d1", None, None, False),
    ]
    ids = [c.id for c in changes]
    assert ids == sorted(set(ids)) and {c.source for c in changes} == {store.source}
    assert await store.registry_change_head() == ids[-1]
    assert [c.kind for c in await store.registry_changes(ids[1], limit=2)] == ["bind", "bind"]
    assert await store.registry_changes(ids[-1]) == []


async def test_a_registry_change_by_another_store_is_read_with_its_source(store: Store) -> None:
    """The admin CLI writes through a store of its own; a server's store reads its rows."""
    from vitalwire.store.sql import SqlStore

    assert isinstance(store, SqlStore)
    head = await store.registry_change_head()
    other = SqlStore(store.url)
    await other.open()
    try:
        assert other.source != store.source
        await other.create_patient("P9", "C", "w", 1.0)
    finally:
        await other.close()
    [change] = await store.registry_changes(head)
    assert (change.kind, change.patient_id, change.source) == ("patient", "P9", other.source)


async def test_a_secret_rotation_and_its_audit_row_are_one_transaction(store: Store) -> None:
    from vitalwire.core.errors import NotFound
    from vitalwire.store import AuditRow

    await store.create_device("d1", "h1", "monitor", 1.0)
    row = AuditRow(2.0, "cli:nurse", "rotate_device_secret", None, '{"device_id": "d1"}', "cli")
    await store.set_device_secret("d1", "h2", 2.0, audit=row)
    device = await store.get_device("d1")
    assert device is not None and device["secret_hash"] == "h2"
    [logged] = await store.audit_log(10)
    assert (logged["actor"], logged["action"], logged["detail"], logged["origin"]) == (
        "cli:nurse",
        "rotate_device_secret",
        '{"device_id": "d1"}',
        "cli",
    )
    head = await store.registry_change_head()
    with pytest.raises(NotFound, match="device nobody does not exist"):
        await store.set_device_secret("nobody", "h3", 3.0, audit=row)
    with pytest.raises(NotFound, match="device nobody does not exist"):
        await store.set_device_disabled("nobody", True, 3.0)
    assert len(await store.audit_log(10)) == 1  # nothing of a refused change is written
    assert await store.registry_change_head() == head


async def test_duplicate_ids_conflict(store: Store) -> None:
    await store.create_patient("P1", "A", "w", 1.0)
    with pytest.raises(Conflict, match="patient P1 already exists"):
        await store.create_patient("P1", "A", "w", 1.0)
    await store.create_user("u", "hash", "viewer", 1.0)
    with pytest.raises(Conflict):
        await store.create_user("u", "hash", "viewer", 1.0)


async def test_meta_upsert(store: Store) -> None:
    assert await store.get_meta("k") is None
    await store.set_meta("k", "1")
    await store.set_meta("k", "2")
    assert await store.get_meta("k") == "2"


async def test_migrations_create_the_schema_the_code_uses(store: Store) -> None:
    from vitalwire.store.sql import SqlStore

    assert isinstance(store, SqlStore)
    async with store.engine.connect() as conn:
        tables = await conn.run_sync(lambda c: set(inspect(c).get_table_names()))
        columns = await conn.run_sync(
            lambda c: {t: {col["name"] for col in inspect(c).get_columns(t)} for t in tables}
        )
    for table in metadata.sorted_tables:
        assert table.name in tables
        assert columns[table.name] == {c.name for c in table.columns}, table.name


async def test_sqlite_runs_in_wal_mode(tmp_path: Path) -> None:
    from sqlalchemy import text

    from vitalwire.store.sql import SqlStore

    s = SqlStore(f"sqlite:///{tmp_path / 'wal.db'}", sqlite_synchronous="FULL")
    await s.open()
    try:
        async with s.engine.connect() as conn:
            assert (await conn.execute(text("PRAGMA journal_mode"))).scalar() == "wal"
            assert (await conn.execute(text("PRAGMA synchronous"))).scalar() == 2  # FULL
    finally:
        await s.close()


def test_bad_urls_and_modes_are_refused() -> None:
    with pytest.raises(ValueError, match="db URL must start with"):
        open_store("mysql://x/y")
    with pytest.raises(ValueError, match="sqlite synchronous must be one of"):
        open_store("sqlite:///x.db", sqlite_synchronous="SOMETIMES")


async def test_alert_rows_upsert_keeping_when_raised_and_who_acknowledged(store: Store) -> None:
    from vitalwire.store import AlertRow, AuditRow

    def row(state: str, at: float, by: str | None = None, level: int = 0) -> AlertRow:
        return AlertRow(
            "P1:spo2_low:1", "P1", "spo2_low", "high", "physiological", state, at, by, level, "{}"
        )

    await store.write_batch(Batch(alerts=[row("active", 10.0)]))
    await store.write_batch(Batch(alerts=[row("active", 70.0, level=1)]))
    await store.write_batch(Batch(alerts=[row("acknowledged", 80.0, "nurse", 1)]))
    await store.write_batch(
        Batch(
            alerts=[row("resolved", 90.0)],
            audit=[AuditRow(80.0, "nurse", "ack_alert", "P1", '{"alert_id": "P1:spo2_low:1"}')],
        )
    )
    (alert,) = await store.alerts_for("P1", 10)
    assert {
        k: alert[k]
        for k in (
            "state",
            "raised_at",
            "updated_at",
            "acknowledged_at",
            "acknowledged_by",
            "resolved_at",
            "escalation_level",
        )
    } == {
        "state": "resolved",
        "raised_at": 10.0,
        "updated_at": 90.0,
        "acknowledged_at": 80.0,
        "acknowledged_by": "nurse",
        "resolved_at": 90.0,
        "escalation_level": 0,
    }
    assert await store.open_alerts() == []
    (entry,) = await store.audit_log(10)
    assert (entry["actor"], entry["action"], entry["patient_id"]) == ("nurse", "ack_alert", "P1")


async def test_patient_settings_upsert(store: Store) -> None:
    await store.set_patient_settings("P1", '{"spo2": {"low": 88}}', None, 1.0, "dr")
    await store.set_patient_settings(
        "P1", '{"spo2": {"low": 87}}', '{"on_oxygen": true}', 2.0, "dr"
    )
    settings = await store.patient_settings()
    assert settings["P1"]["limits"] == '{"spo2": {"low": 87}}'
    assert settings["P1"]["observations"] == '{"on_oxygen": true}'


async def test_retention_deletes_old_events_but_keeps_each_streams_head(store: Store) -> None:
    b = Batch()
    for off in range(1, 6):  # P1: ts 1..5; P2: one old event, its head
        b.events.append(Event.new("patient:P1", off, "reading", float(off), {"n": off}))
    b.events.append(Event.new("patient:P2", 1, "reading", 1.0, {"n": 1}))
    await store.write_batch(b)
    assert await store.delete_events_before(4.0) == 3
    assert await store.first_offset("patient:P1") == 4
    assert await store.stream_heads() == {"patient:P1": 5, "patient:P2": 1}
    assert await store.delete_events_before(100.0) == 1  # P1 keeps offset 5, P2 its only event
    assert await store.stream_heads() == {"patient:P1": 5, "patient:P2": 1}


async def test_snapshots_are_upserted_per_stream(store: Store) -> None:
    await store.save_snapshots([("patient:P1", 3, '{"a":1}'), ("patient:P2", 1, "{}")], 10.0)
    await store.save_snapshots([("patient:P1", 7, '{"a":2}')], 20.0)
    await store.save_snapshots([], 30.0)
    assert await store.load_snapshots() == {
        "patient:P1": (7, '{"a":2}'),
        "patient:P2": (1, "{}"),
    }
    # several rows at once, one of them replacing a saved one (one JSON array on SQLite files)
    await store.save_snapshots([("patient:P2", 4, '{"b":"é"}'), ("patient:P3", 1, "{}")], 40.0)
    assert await store.load_snapshots() == {
        "patient:P1": (7, '{"a":2}'),
        "patient:P2": (4, '{"b":"é"}'),
        "patient:P3": (1, "{}"),
    }


def _wal_db(path: Path) -> str:
    """A new WAL-mode SQLite file with one table ``t (x, pad)``, for the writer's tests."""
    import sqlite3

    setup = sqlite3.connect(path)
    setup.execute("PRAGMA journal_mode=WAL")
    setup.execute("CREATE TABLE t (x INTEGER, pad TEXT)")
    setup.close()
    return str(path)


async def _write_until_restarts(writer: Any, restarts: int) -> int:
    """Commit 5 rows of 2 KB at a time until the writer has started the WAL over ``restarts``
    times; returns the number of commits."""
    commits = 0
    while writer.restarts < restarts:
        await writer.write([("INSERT INTO t VALUES (?, ?)", [(commits, "x" * 2000)] * 5)])
        commits += 1
        assert commits < 20_000, "the WAL never started over"
    return commits


async def test_the_wal_starts_over_under_sustained_writes(tmp_path: Path) -> None:
    """A passive checkpoint never restarts the WAL while commits keep coming; the writer does,
    once the WAL is long, so it stays bounded instead of holding every frame ever written."""
    import sqlite3

    from vitalwire.store.sqlite_writer import SqliteBatchWriter

    path = _wal_db(tmp_path / "wal.db")
    writer = SqliteBatchWriter(
        path, synchronous="NORMAL", checkpoint_every_s=0.01, restart_frames=20
    )
    await writer.open()
    try:
        commits = await _write_until_restarts(writer, 3)
        probe = sqlite3.connect(path)
        _busy, frames, _copied = probe.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
        probe.close()
        assert frames < commits  # each commit adds frames: the WAL holds only the recent ones
    finally:
        await writer.close()
    check = sqlite3.connect(path)
    assert check.execute("SELECT count(*) FROM t").fetchone()[0] == commits * 5  # nothing lost
    check.close()


@pytest.mark.parametrize("synchronous", ["NORMAL", "OFF"])
async def test_the_checkpointer_syncs_the_database_file_before_a_restart_needs_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, synchronous: str
) -> None:
    """SQLite syncs the database file after a checkpoint only when it caught up with the
    writer, so under sustained writes the restart would sync every page copied since the last
    one. The checkpointer syncs the database file after each passive checkpoint instead, and
    before a restart catches up until little came in during one pass. With synchronous=OFF
    nothing is synced."""
    import sqlite3

    from vitalwire.store import sqlite_writer
    from vitalwire.store.sqlite_writer import CATCH_UP_PASSES, SqliteBatchWriter

    path = _wal_db(tmp_path / "sync.db")
    synced: list[int] = []  # inode of each file synced
    real_sync = sqlite_writer._datasync
    monkeypatch.setattr(
        sqlite_writer, "_datasync", lambda fd: (synced.append(os.fstat(fd).st_ino), real_sync(fd))
    )
    writer = SqliteBatchWriter(
        path, synchronous=synchronous, checkpoint_every_s=0.01, restart_frames=20
    )
    steps: list[tuple[str, int]] = []  # ("pass", frames in the WAL) and ("restart", 0), in order
    real_checkpoint, real_restart = writer._checkpoint, writer._restart

    def checkpoint(conn: sqlite3.Connection, fd: int) -> int:
        frames = real_checkpoint(conn, fd)
        steps.append(("pass", frames))
        return frames

    def restart(conn: sqlite3.Connection) -> None:
        steps.append(("restart", 0))
        real_restart(conn)

    monkeypatch.setattr(writer, "_checkpoint", checkpoint)
    monkeypatch.setattr(writer, "_restart", restart)
    await writer.open()
    try:
        await _write_until_restarts(writer, 3)
    finally:
        await writer.close()
    passes = [frames for step, frames in steps if step == "pass"]
    if synchronous == "OFF":
        assert synced == [] and writer.syncs == 0 and passes
        return
    # a sync after each passive checkpoint that copied something ...
    assert writer.syncs == len(synced) and writer.restarts <= len(synced) <= len(passes)
    assert set(synced) == {os.stat(path).st_ino}  # ... of the database file itself
    # each restart comes after the pass that found the WAL long (>= 20 frames) and at least one
    # catch-up pass (at most CATCH_UP_PASSES), with no restart between them
    restarts = [i for i, (step, _) in enumerate(steps) if step == "restart"]
    assert len(restarts) >= 3
    for i in restarts:
        before = [frames for _, frames in steps[max(0, i - 1 - CATCH_UP_PASSES) : i]]
        assert steps[i - 1][0] == steps[i - 2][0] == "pass"
        assert before[-1] >= 20 and before[-2] >= 20, steps[max(0, i - 6) : i + 1]


async def test_no_checkpoint_runs_while_a_restart_is_due(tmp_path: Path) -> None:
    """A restart that finds a checkpoint running gives up at once, so once the checkpointer has
    asked the writer for one it starts no pass until the writer has run it."""
    import sqlite3

    from vitalwire.store.sqlite_writer import SqliteBatchWriter

    path = _wal_db(tmp_path / "due.db")
    # the checkpointer thread never wakes in this test: its rounds are run here, one by one
    writer = SqliteBatchWriter(
        path, synchronous="NORMAL", checkpoint_every_s=3600, restart_frames=20
    )
    passes: list[int] = []  # frames in the WAL after each pass
    real_checkpoint = writer._checkpoint

    def checkpoint(conn: sqlite3.Connection, fd: int) -> int:
        passes.append(real_checkpoint(conn, fd))
        return passes[-1]

    writer._checkpoint = checkpoint  # type: ignore[method-assign]
    await writer.open()
    conn = sqlite3.connect(path, isolation_level=None)
    fd = os.open(path, os.O_RDONLY)
    try:
        await writer.write([("INSERT INTO t VALUES (?, ?)", [(i, "x" * 2000) for i in range(60)])])
        writer._round(conn, fd)
        assert passes[0] >= 20 and len(passes) >= 2  # long: catch-up passes, then ...
        assert writer._restart_due and writer.restarts == 0  # ... a restart asked of the writer
        done = len(passes)
        writer._round(conn, fd)
        assert len(passes) == done  # no pass while the restart is due
        await writer.write([("INSERT INTO t VALUES (?, ?)", [(99, "y")])])
        assert writer.restarts == 1 and not writer._restart_due  # the writer ran it
        writer._round(conn, fd)
        assert len(passes) == done + 1 and passes[-1] < 20  # passes again, on a short WAL
    finally:
        os.close(fd)
        conn.close()
        await writer.close()


async def test_a_batch_of_readings_and_events_is_one_statement(tmp_path: Path) -> None:
    """One call into SQLite per batch on the hot path: no BEGIN or COMMIT around the inserts
    (each return from SQLite waits for the GIL; see store/sqlite_writer.py), and the trigger
    behind it writes both tables."""
    from vitalwire.store.sql import SqlStore

    store = SqlStore(f"sqlite:///{tmp_path / 'one.db'}")
    await store.open()
    try:
        assert store._fast is not None and store._fast._conn is not None
        traced: list[str] = []
        store._fast._conn.set_trace_callback(traced.append)
        await store.write_batch(_batch("d1", "patient:P1", range(1, 51), 1))
        store._fast._conn.set_trace_callback(None)
        # the trigger's steps trace as the statement that fired them: one statement, no BEGIN
        assert {s.partition(" VALUES")[0] for s in traced} == {"INSERT INTO temp.reading_batch"}
        assert await store.device_last_seq("d1") == 50
        assert await store.stream_heads() == {"patient:P1": 50}
    finally:
        await store.close()


def test_a_batch_view_takes_only_json_array_inserts() -> None:
    """Any other parameter would be left unbound inside the trigger: refused, naming the column."""
    from vitalwire.store.sqlite_writer import batch_view

    with pytest.raises(ValueError, match="audit: not a compile_json_rows insert"):
        batch_view("b", {"audit": "INSERT INTO audit (at) VALUES (?)"})
    statement, setup = batch_view(
        "b", {"t": "INSERT INTO t (x) SELECT value ->> 0 FROM json_each(?) WHERE true"}
    )
    assert statement == "INSERT INTO temp.b VALUES (?)"
    assert "json_each(NEW.t)" in setup[1] and "?" not in setup[1]
