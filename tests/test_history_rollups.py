"""Vitals history from stored roll-ups (issue 26): the roll-ups kept with the readings (both
write paths, SQLite and PostgreSQL), merged exactly for late readings, never counting a resent
reading twice, cut with retention, backfilled by migration 0010; and the buckets served from
them equal to the raw computation over the same boundaries."""

from __future__ import annotations

import contextlib
import random
from collections.abc import AsyncIterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import httpx
import pytest
from sqlalchemy import insert, select

from tests.conftest import RunningServer, login_token, start_server, stop_server
from tests.test_pipeline import raw_device, reading, recv_json
from tests.test_store import fresh_postgres_db
from vitalwire.core.metrics import METRIC_BY_NAME
from vitalwire.services.history import MAX_BUCKETS, History
from vitalwire.store import schema as t
from vitalwire.store.base import Batch
from vitalwire.store.rollups import GRAIN, RollupBook, grain_of, rollup_rows
from vitalwire.store.sql import SqlStore
from vitalwire.wire import Event

BASE = 1_700_000_013.25  # not on a grain boundary
STREAM = "patient:P1"


@contextlib.asynccontextmanager
async def _store_url(backend: str, path: Path) -> AsyncIterator[str]:
    """A fresh store's URL: a new PostgreSQL database, or a SQLite file at ``path``."""
    if backend == "postgresql":
        async with fresh_postgres_db() as url:
            yield url
    else:
        yield f"sqlite:///{path}"


@pytest.fixture(params=["sqlite", "sqlite-engine", "postgresql"])
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[SqlStore]:
    """``sqlite``: the dedicated writer's one-statement path; ``sqlite-engine`` and
    ``postgresql``: the async engine's."""
    backend = "postgresql" if request.param == "postgresql" else "sqlite"
    async with _store_url(backend, tmp_path / "store.db") as url:
        s = SqlStore(url, dedicated_writer=request.param == "sqlite")
        await s.open()
        try:
            yield s
        finally:
            await s.close()


def _events(seed: int, n: int = 900) -> list[list[Event]]:
    """Batches of readings over ~25 min of two streams: some out of ts order (late ones landing
    in older grains), ties on ts, metrics missing, a boolean and a status among them."""
    rnd = random.Random(seed)
    offsets = {STREAM: 0, "patient:P2": 0}
    batches: list[list[Event]] = []
    batch: list[Event] = []
    for i in range(n):
        stream = STREAM if rnd.random() < 0.8 else "patient:P2"
        offsets[stream] += 1
        ts = BASE + i * 1.7
        if rnd.random() < 0.1:
            ts -= rnd.uniform(0, 400)  # late: lands in an older grain
        if rnd.random() < 0.05 and batch:
            ts = batch[-1].ts  # a tie on ts: offset orders
        if rnd.random() < 0.03:
            batch.append(Event.new(stream, offsets[stream], "device_status", ts, {"status": "x"}))
        else:
            data: dict[str, Any] = {"device": "d1", "seq": i, "ts": ts, "probe": True}
            if rnd.random() < 0.9:
                data["hr"] = float(rnd.randint(40, 140))
            if rnd.random() < 0.7:
                data["spo2"] = round(rnd.uniform(85, 100), 1)
            if rnd.random() < 0.3:
                data["temp_c"] = rnd.randint(35, 40)  # an int in the JSON
            batch.append(Event.new(stream, offsets[stream], "reading", ts, data))
        if len(batch) >= rnd.randint(1, 60):
            batches.append(batch)
            batch = []
    if batch:
        batches.append(batch)
    return batches


async def _stored(
    store: SqlStore, *, flush: bool = True
) -> dict[tuple[str, int, str], tuple[Any, ...]]:
    """The stored roll-ups; ``flush``: after the store wrote all it holds in memory."""
    if flush:
        await store.flush_rollups()
    r = t.vital_rollups
    async with store.engine.connect() as conn:
        rows = await conn.execute(select(r))
        return {(x.stream, x.start, x.metric): tuple(x)[3:] for x in rows}


async def _all_events(store: SqlStore) -> list[Event]:
    out: list[Event] = []
    for stream in (STREAM, "patient:P2"):
        out += await store.events_after(stream, 0, 1_000_000)
    return out


def _assert_rollups_equal(got: dict[Any, tuple[Any, ...]], events: list[Event]) -> None:
    """``got``: rows as stored, with the offsets' span (migration 0014) or without it."""
    want = {(r["stream"], r["start"], r["metric"]): r for r in rollup_rows(events)}
    assert set(got) == set(want)
    for key, row in got.items():
        lo, hi, total, n, lts, loff, last, first_o, last_o = (*row, None, None)[:9]
        if len(row) == 7:
            first_o, last_o = want[key]["lo_offset"], want[key]["hi_offset"]
        w = want[key]
        assert (lo, hi, n, lts, loff, last, first_o, last_o) == (
            w["vmin"],
            w["vmax"],
            w["n"],
            w["last_ts"],
            w["last_offset"],
            w["vlast"],
            w["lo_offset"],
            w["hi_offset"],
        ), key
        assert total == pytest.approx(w["vsum"], rel=1e-12), key


async def _marks(store: SqlStore) -> dict[str, int]:
    m = t.rollup_marks
    async with store.engine.connect() as conn:
        return dict((await conn.execute(select(m.c.stream, m.c.rolled_offset))).all())


async def _assert_marks_hold(store: SqlStore) -> dict[str, int]:
    """The invariant: the roll-ups hold exactly each stream's readings up to its mark."""
    marks = await _marks(store)
    rolled = [e for e in await _all_events(store) if e.offset <= marks.get(e.stream, 0)]
    _assert_rollups_equal(await _stored(store, flush=False), rolled)
    return marks


async def test_rollups_follow_every_batch_and_late_readings(store: SqlStore) -> None:
    marks_seen: list[dict[str, int]] = []
    for batch in _events(seed=1):
        await store.write_batch(Batch(events=batch))
        if len(marks_seen) < 40 or batch[0].offset % 7 == 0:
            marks_seen.append(await _assert_marks_hold(store))
    # grains were written as they ended, a stream at a time: the marks moved many times
    assert len({m.get(STREAM) for m in marks_seen}) > 5
    assert len(store.rollups) > 0  # the last grains are still in memory
    got = await _stored(store)
    assert len(store.rollups) == 0
    heads = await store.stream_heads()
    assert await _marks(store) == heads
    _assert_rollups_equal(got, await _all_events(store))
    # late readings did land in older grains, merged there
    late = [e for b in _events(seed=1) for e in b if e.kind == "reading"]
    assert any(
        b.ts < a.ts and grain_of(b.ts) < grain_of(a.ts)
        for a, b in zip(late, late[1:], strict=False)
    )


class _Access:
    def __init__(self) -> None:
        self.audited: list[Any] = []

    def check(self, who: Any, what: Any, pid: str) -> None:
        return None

    def refused(self, *a: Any) -> None:
        raise AssertionError("not refused here")

    def audit(self, *a: Any) -> None:
        self.audited.append(a)

    def via_break_glass(self, who: Any, pid: str) -> bool:
        return False


def _round(result: Any) -> list[dict[str, Any]]:
    """Buckets with each mean rounded (sums are added in another order)."""
    out = []
    for b in result.buckets:
        metrics = {m: {**s, "mean": round(s["mean"], 9)} for m, s in b["metrics"].items()}
        out.append({"start": b["start"], "metrics": metrics})
    return out


# (from, to, bucket asked, bucket used, alignment): aligned and unaligned ranges, rounding
CASES = [
    (grain_of(BASE) + 60, grain_of(BASE) + 1500, 60, 60.0, "epoch"),
    (grain_of(BASE) + 60, grain_of(BASE) + 1500, 300, 300.0, "epoch"),
    (BASE + 7.3, BASE + 1500.1, 60, 60.0, "epoch"),
    (BASE + 7.3, BASE + 1500.1, 43.2, 43.2, "from"),  # under a grain over < 3 h: as asked
    (BASE + 7.3, BASE + 1500.1, 61, 120.0, "epoch"),  # to the next multiple
    (BASE - 500, BASE + 2000, 2500, 2520.0, "epoch"),  # one bucket-ish over everything
    (BASE + 65.5, BASE + 110.5, 45, 45.0, "from"),  # under a grain: raw, from-aligned
    (BASE + 61.0, BASE + 150.0, 60, 60.0, "epoch"),  # one whole grain, two partial ones
    (BASE + 70.0, BASE + 100.0, 25, 25.0, "from"),
    (BASE + 1.0, BASE + 1200.0, 7.5, 7.5, "from"),
]


async def test_buckets_from_rollups_equal_the_raw_computation(store: SqlStore) -> None:
    await store.create_patient("P1", "One", "ward-a", BASE)
    for batch in _events(seed=2):
        await store.write_batch(Batch(events=batch))
    history = History(store, _Access(), lambda: BASE + 3000)  # type: ignore[arg-type]
    who = SimpleNamespace(name="u")
    rolled_reads = 0
    real = store.rollups_between

    async def counted(*a: Any) -> Any:
        nonlocal rolled_reads
        rolled_reads += 1
        return await real(*a)

    store.rollups_between = counted  # type: ignore[method-assign]
    for frm, to, asked, used, alignment in CASES:
        history.use_rollups = True
        fast = await history.vitals(who, "P1", frm, to, None, asked, None, 100, None)  # type: ignore[arg-type]
        history.use_rollups = False
        slow = await history.vitals(who, "P1", frm, to, None, asked, None, 100, None)  # type: ignore[arg-type]
        assert (fast.bucket, fast.alignment) == (used, alignment)
        assert (slow.bucket, slow.alignment) == (used, alignment)
        assert fast.buckets, (frm, to, asked)
        assert _round(fast) == _round(slow), (frm, to, asked)
        total = sum(b["metrics"].get("hr", {}).get("count", 0) for b in fast.buckets)
        raw = [
            e
            for b in _events(seed=2)
            for e in b
            if e.stream == STREAM and e.kind == "reading" and frm <= e.ts < to and "hr" in e.data
        ]
        assert total == len(raw)  # every reading in the range, once
        if alignment == "epoch":
            assert all(b["start"] % used == 0 for b in fast.buckets)
    assert rolled_reads == sum(1 for c in CASES if c[4] == "epoch")


def test_bucket_rounding_keeps_at_most_max_buckets() -> None:
    day = 86400.0
    assert History.bucket_plan(day / MAX_BUCKETS, 1e9 + 13, 1e9 + 13 + day) == (60.0, "epoch")
    week = 7 * day  # at least 302.4 s: 360 s
    assert History.bucket_plan(week / MAX_BUCKETS, 1e9 + 1, 1e9 + 1 + week) == (360.0, "epoch")
    # 2,000 grains, unaligned: 2,001 buckets of 60 s, so 120 s
    assert History.bucket_plan(60, 1e9 + 30, 1e9 + 30 + 2000 * 60) == (120.0, "epoch")
    assert History.bucket_plan(59.5, 0, 3600) == (59.5, "from")
    # under a grain over more than 3 h: rounded up to the grain
    assert History.bucket_plan(30, 1e9 + 1, 1e9 + 1 + 4 * 3600) == (60.0, "epoch")
    assert History.bucket_plan(GRAIN * 5, 0, 3600) == (300.0, "epoch")


def _second_store(store: SqlStore) -> SqlStore:
    """Another node (or the same one restarted) on ``store``'s database."""
    return SqlStore(store.url, dedicated_writer=store._dedicated_writer)  # noqa: SLF001


async def _history_equals_raw(store: SqlStore) -> None:
    """Day-ish buckets from roll-ups + the events above the mark = the raw computation."""
    history = History(store, _Access(), lambda: BASE + 3000)  # type: ignore[arg-type]
    who = SimpleNamespace(name="u")
    frm, to = grain_of(BASE) - 600, grain_of(BASE) + 2400
    history.use_rollups = True
    fast = await history.vitals(who, "P1", frm, to, None, 120, None, 100, None)  # type: ignore[arg-type]
    history.use_rollups = False
    slow = await history.vitals(who, "P1", frm, to, None, 120, None, 100, None)  # type: ignore[arg-type]
    assert fast.alignment == "epoch" and fast.buckets
    assert _round(fast) == _round(slow)


@pytest.mark.parametrize("startup", [True, False], ids=["restarted", "taken-over"])
async def test_readings_a_killed_node_held_in_memory_are_caught_up(
    store: SqlStore, startup: bool
) -> None:
    """A node killed before it flushed: the readings it held in memory are rolled up from the
    events table by the next node's flush (a backlog found at start-up, or the first flush of
    a stream taken over, whose base is not the stored mark); meanwhile and after, the history
    equals the raw computation and the marks' invariant holds."""
    await store.create_patient("P1", "One", "ward-a", BASE)
    batches = _events(seed=5)
    half = len(batches) // 2
    for batch in batches[:half]:
        await store.write_batch(Batch(events=batch))
    assert len(store.rollups) > 0
    marks = await _assert_marks_hold(store)
    heads = await store.stream_heads()
    assert any(marks.get(s, 0) < h for s, h in heads.items())  # readings only in memory
    store.rollups = RollupBook()  # killed: what it held is gone (close() flushes nothing)
    other = _second_store(store)
    await other.open()
    try:
        if startup:
            await other.stream_heads()  # what a node does as it starts
            assert len(other.rollups) == len(heads)
        await _history_equals_raw(other)
        for batch in batches[half:]:
            await other.write_batch(Batch(events=batch))
            await _assert_marks_hold(other)
        await _history_equals_raw(other)
        got = await _stored(other)
        assert await _marks(other) == await other.stream_heads()
        _assert_rollups_equal(got, await _all_events(other))
    finally:
        await other.close()


async def test_two_nodes_writing_a_stream_in_turn_count_each_reading_once(
    store: SqlStore,
) -> None:
    """A stream's lease moving back and forth between two nodes: each node's memory misses the
    other's offsets, so what it holds is caught up from the events instead of written as it
    is; flushes of both come in any order. Every reading is rolled up once."""
    other = _second_store(store)
    await other.open()
    rnd = random.Random(6)
    try:
        nodes = [store, other]
        for i, batch in enumerate(_events(seed=6, n=1200)):
            if i % rnd.randint(2, 9) == 0:
                nodes.reverse()
            await nodes[0].write_batch(Batch(events=batch))
            if i % 5 == 0:
                await _assert_marks_hold(store)
        await nodes[1].flush_rollups()
        got = await _stored(nodes[0])
        assert await _marks(store) == await store.stream_heads()
        _assert_rollups_equal(got, await _all_events(store))
    finally:
        await other.close()


async def test_flushes_of_everything_beside_the_writes_lose_and_double_nothing(
    store: SqlStore,
) -> None:
    """What a stop or retention does (write all the node holds) while batches keep coming:
    the book's take, commit and done of one never interleave with another's."""
    import asyncio

    finished = asyncio.Event()
    flushed = 0

    async def write() -> None:
        for batch in _events(seed=8, n=1500):
            await store.write_batch(Batch(events=batch))
            await asyncio.sleep(0)
        finished.set()

    async def flush_all() -> None:
        nonlocal flushed
        while not finished.is_set():
            flushed += await store.flush_rollups()
            await asyncio.sleep(0)

    await asyncio.gather(write(), flush_all())
    assert flushed > 20
    got = await _stored(store)
    assert await _marks(store) == await store.stream_heads()
    _assert_rollups_equal(got, await _all_events(store))


async def test_retention_cuts_the_rollups_of_the_removed_range(store: SqlStore) -> None:
    batches = _events(seed=3)
    for batch in batches:
        await store.write_batch(Batch(events=batch))
    # a third stream, silent since long before the cut: its last event (its head) is kept
    old = [Event.new("patient:P3", i, "reading", BASE - 900 + i, {"hr": 60.0 + i}) for i in (1, 2)]
    await store.write_batch(Batch(events=old))
    cut = BASE + 700.5  # mid-grain
    before = len(await _all_events(store))
    deleted = await store.delete_events_before(cut)
    left = await _all_events(store)
    assert deleted == before - len(left) + 1 and deleted > 100  # P3's first event went too
    heads = await store.events_after("patient:P3", 0, 10)
    assert [e.offset for e in heads] == [2]
    got = await _stored(store)
    _assert_rollups_equal(got, [*left, *heads])
    assert ("patient:P3", grain_of(BASE - 898), "hr") in got


def _migrate(conn: Any, direction: str, revision: str) -> None:
    """alembic upgrade or downgrade of the store on ``conn`` to ``revision``."""
    from alembic import command
    from alembic.config import Config

    from vitalwire.store.sql import _MIGRATIONS

    cfg = Config()
    cfg.set_main_option("script_location", str(_MIGRATIONS))
    cfg.attributes["connection"] = conn
    getattr(command, direction)(cfg, revision)


async def test_migration_0010_backfills_a_store_written_before_it(
    tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    from sqlalchemy.ext.asyncio import create_async_engine

    from vitalwire.store.sql import _async_url

    for backend in ("sqlite", "postgresql"):
        async with _store_url(backend, tmp_path / "old.db") as url:
            engine = create_async_engine(_async_url(url))

            events = [e for b in _events(seed=4, n=400) for e in b]
            async with engine.begin() as conn:
                await conn.run_sync(_migrate, "upgrade", "0009")
                rows = [
                    {
                        "stream": e.stream,
                        "offset": e.offset,
                        "kind": e.kind,
                        "ts": e.ts,
                        "data": e.data_json.decode(),
                    }
                    for e in events
                ]
                await conn.execute(insert(t.events), rows)
            await engine.dispose()
            s = SqlStore(url)
            await s.open()
            try:
                assert await s.migration_current()
                _assert_rollups_equal(await _stored(s, flush=False), events)
                # migration 0012: every stream was rolled up, so its mark is its head
                assert await _marks(s) == await s.stream_heads()
                assert len(s.rollups) == 0
            finally:
                await s.close()


async def test_migration_0012_downgrade_rolls_up_what_is_above_the_marks(
    tmp_path: Path,
) -> None:
    """The versions before 0012 expect every stored reading rolled up: the downgrade rolls up
    what only a node's memory held (here, a node killed before it flushed)."""
    from sqlalchemy.ext.asyncio import create_async_engine

    from vitalwire.store.sql import _async_url

    for backend in ("sqlite", "postgresql"):
        async with _store_url(backend, tmp_path / "down.db") as url:
            s = SqlStore(url)
            await s.open()
            for batch in _events(seed=7, n=500):
                await s.write_batch(Batch(events=batch))
            assert len(s.rollups) > 0
            s.rollups = RollupBook()  # killed before it flushed
            await s.close()
            engine = create_async_engine(_async_url(url))

            async with engine.begin() as conn:
                await conn.run_sync(_migrate, "downgrade", "0011")
                r = t.vital_rollups
                before_0014 = [c for c in r.c if c.name not in ("lo_offset", "hi_offset")]
                got = {
                    (x.stream, x.start, x.metric): tuple(x)[3:]
                    for x in await conn.execute(select(*before_0014))
                }
                rows = await conn.execute(select(t.events))
                events = [
                    Event.from_stored(x.stream, x.offset, x.kind, x.ts, x.data.encode())
                    for x in rows
                ]
            await engine.dispose()
            _assert_rollups_equal(got, events)


async def test_a_resent_reading_is_counted_once(tmp_path: Path) -> None:
    """A device that sends its readings again (same seqs) is deduplicated before anything is
    stored: the roll-ups count each reading once, and the buckets say so."""
    srv: RunningServer
    srv, task = await start_server(tmp_path, patients=1)
    try:
        did, secret, pid = srv.device(0)
        hrs = [61.0, 62.0, 63.0, 64.0, 65.0]
        sent = [reading(seq, hr=hr) for seq, hr in enumerate(hrs, 1)]
        async with raw_device(srv) as ws:
            for frame in sent:
                await ws.send(frame)
            while (await recv_json(ws)).get("seq") != len(hrs):
                pass
            for frame in sent:  # the same readings again, under the same seqs
                await ws.send(frame)
            await ws.send(reading(len(hrs) + 1, hr=66.0))  # acked after the resends
            while (await recv_json(ws)).get("seq") != len(hrs) + 1:
                pass
            assert srv.services.ingest.sessions[did].duplicates == len(hrs)
        hrs.append(66.0)
        await srv.services.writer.flush()
        async with httpx.AsyncClient(base_url=srv.url) as http:
            metrics = (await http.get("/metrics.json")).json()
        assert metrics["rollups_held"] == 1  # this minute's readings, in memory for now
        stored = await _stored(srv.services.store)  # type: ignore[arg-type]
        counts = [v[3] for (s, _start, m), v in stored.items() if s == f"patient:{pid}"]
        assert sum(counts) == len(hrs), stored
        events = await srv.services.store.events_after(f"patient:{pid}", 0, 1000)
        first = min(e.ts for e in events if e.kind == "reading")
        token = await login_token(srv, "clinician")
        async with httpx.AsyncClient(base_url=srv.url) as http:
            r = await http.get(
                f"/patients/{pid}/vitals",
                params={"from": grain_of(first) - 60, "to": grain_of(first) + 120, "bucket": 60},
                headers={"Authorization": f"Bearer {token}"},
            )
        assert r.status_code == 200, r.text
        body = r.json()
        assert (body["bucket"], body["alignment"]) == (60.0, "epoch")
        assert sum(b["metrics"]["hr"]["count"] for b in body["buckets"]) == len(hrs)
        assert max(b["metrics"]["hr"]["max"] for b in body["buckets"]) == 66.0
    finally:
        await stop_server(srv, task)


@pytest.mark.parametrize("db", ["sqlite", "postgresql"])
def test_bench_history_at_a_tiny_shape(db: str, tmp_path: Path) -> None:
    """``vitalwire bench history`` builds its store, times the three kinds of request (the day
    over more than 3 h, so from the roll-ups) and deletes the store."""
    import json

    from typer.testing import CliRunner

    from tests.conftest import REQUIRE_SERVICES
    from tests.test_store import POSTGRES
    from vitalwire.cli import app

    if db == "postgresql":
        import asyncio

        import asyncpg

        async def probe() -> None:
            conn = await asyncpg.connect(POSTGRES, timeout=5)
            await conn.close()

        try:
            asyncio.run(probe())
        except Exception as exc:
            reason = f"PostgreSQL is not reachable at {POSTGRES}: {exc!r}"
            if REQUIRE_SERVICES:
                pytest.fail(reason)
            pytest.skip(reason)
    out = tmp_path / "history.json"
    work = tmp_path / "work"
    work.mkdir()
    r = CliRunner().invoke(
        app,
        [
            "bench",
            "history",
            *("--db", db, "--patients", "2", "--hours", "4", "--requests", "3"),
            *("--baseline-requests", "2", "--postgres", POSTGRES, "--dir", str(work)),
            *("--json", str(out)),
        ],
    )
    assert r.exit_code == 0, r.output
    result = json.loads(out.read_text())
    assert result["events"] == 2 * 4 * 3600
    kinds = result["requests"]
    assert list(kinds) == [
        "day buckets (roll-ups)",
        "day buckets, baseline (Python over raw rows)",
        "hour raw (all pages)",
    ]
    assert [k["n"] for k in kinds.values()] == [3, 2, 3]
    assert all(0 < k["p50"] <= k["p99"] for k in kinds.values())
    assert list(work.iterdir()) == []  # the store was deleted
    assert "day buckets (roll-ups)" in r.output


def test_the_book_writes_each_ended_minute_once_spread_and_a_few_streams_a_batch() -> None:
    """A node's roll-ups in memory: a stream's minute is written once it has ended, at the
    stream's own point in the next ``SPREAD_S`` (so a minute's turn is no burst), at most
    ``FLUSH_STREAMS`` streams and about ``FLUSH_ROWS`` rows a batch; a quiet stream's last
    minute ``STALE_S`` after it ended."""
    from vitalwire.store import rollups as r

    t0 = 1_800_000_000.0  # a grain's start
    assert grain_of(t0) == t0
    book = r.RollupBook()
    streams = [f"patient:Q{i}" for i in range(300)]
    for sec in range(61):  # a minute at 1 Hz, then the next minute's first reading
        book.note(
            Event.new(s, sec + 1, "reading", t0 + sec, {"hr": 60 + sec, "spo2": 97.0})
            for s in streams
        )
    assert book.take(t0 + 60.0) == []  # nothing is due at the turn itself
    written: dict[str, r.Flush] = {}
    due_over_time = []
    for step in range(1, 31):
        now = t0 + 60 + step * r.SPREAD_S / 30
        while flushes := book.take(now):
            assert len(flushes) <= r.FLUSH_STREAMS
            assert sum(len(f.rows) for f in flushes) <= r.FLUSH_ROWS
            book.done(flushes)
            for f in flushes:
                assert f.stream not in written  # once
                written[f.stream] = f
        due_over_time.append(len(written))
    assert len(written) == len(streams)
    # spread: about a thirtieth of the streams each step, none all at once
    assert max(b - a for a, b in zip([0, *due_over_time], due_over_time, strict=False)) < 40
    for f in written.values():
        assert (f.base, f.upto) == (0, 60)  # the first minute's 60 readings, not the 61st
        rows = {m: row for _start, m, *row in f.rows}
        assert {row[3] for row in rows.values()} == {60}
        assert rows["hr"][:2] == [60, 119] and rows["hr"][6] == 119  # min, max, last
        assert all(start == t0 for start, *_ in f.rows)
    # the 61st reading's minute, the stream quiet since: written 5 s after that minute ended
    assert book.take(t0 + 120 + r.STALE_S - 0.5) == []
    late = book.take(t0 + 121 + r.STALE_S)
    assert len(late) == r.FLUSH_STREAMS and all(f.base == 60 and f.upto == 61 for f in late)
    book.done(late)
    assert len(book) == len(streams) - r.FLUSH_STREAMS
    # a backlog found at start-up: catch-ups from the events, a few a batch
    book = r.RollupBook()
    book.backlog({s: 90 for s in streams[:10]})
    seen = []
    while flushes := book.take(t0):
        assert len(flushes) <= r.FLUSH_CATCH_UPS
        assert all((f.base, f.upto, f.rows) == (r.CATCH_UP, 90, []) for f in flushes)
        book.done(flushes)
        seen += [f.stream for f in flushes]
    assert seen == streams[:10] and len(book) == 0
    book.backlog({s: 90 for s in streams[:10]})  # at a stop: all at once
    assert len(book.take(t0, everything=True)) == 10


def _with_metric(e: Event) -> bool:
    return any(
        m in METRIC_BY_NAME and isinstance(v, int | float) and not isinstance(v, bool)
        for m, v in e.data.items()
    )


# (from, to) in seconds after BASE: ranges on and off grain boundaries, inside one grain, over
# everything, before and after the readings
RANGES = [
    (0.0, 1600.0),
    (60.0, 120.0),
    (-400.0, 30.0),
    (7.3, 1500.1),
    (250.0, 251.0),
    (-1000.0, -500.0),
    (1400.0, 5000.0),
    (333.3, 900.9),
]


async def test_readings_between_finds_a_range_without_an_index_by_time(store: SqlStore) -> None:
    """Migration 0014: a range's readings come from the roll-ups' offset spans (at or below
    the mark) and the events after the mark. Late readings (receive times out of offset order),
    ties on ts and marks at every position: each range, read whole or a page of 7 at a time
    after the last position, is exactly the brute force's, in (ts, offset) order, none twice."""
    written: list[Event] = []
    checked = 0
    marks_seen: set[int] = set()
    for i, batch in enumerate(_events(seed=11, n=700)):
        await store.write_batch(Batch(events=batch))
        written += batch
        if i % 9:
            continue
        marks_seen.add((await _marks(store)).get(STREAM, 0))
        for a, b in RANGES:
            frm, to = BASE + a, BASE + b
            want = sorted(
                (
                    e
                    for e in written
                    if e.stream == STREAM
                    and e.kind == "reading"
                    and _with_metric(e)
                    and frm <= e.ts < to
                ),
                key=lambda e: (e.ts, e.offset),
            )
            whole = await store.readings_between(STREAM, frm, to, None, 100_000)
            pages: list[Event] = []
            after: tuple[float, int] | None = None
            while True:
                page = await store.readings_between(STREAM, frm, to, after, 7)
                pages += page
                if len(page) < 7:
                    break
                after = (page[-1].ts, page[-1].offset)
            for got in (whole, pages):
                keys = [(e.ts, e.offset) for e in got]
                assert keys == sorted(set(keys)), (a, b)  # ordered, none twice
                assert all(e.kind == "reading" and frm <= e.ts < to for e in got)
                assert [(e.offset, e.data) for e in got if _with_metric(e)] == [
                    (e.offset, e.data) for e in want
                ], (a, b)
            checked += 1
    assert checked > 40
    assert len(marks_seen) > 3  # read with the mark at many places, not only at the head


async def test_migration_0014_keeps_an_index_by_time_for_the_other_kinds_only(
    tmp_path: Path,
) -> None:
    """The readings' index by (stream, kind, ts) is gone, a partial one for the other kinds
    (device statuses, command lifecycles) serves their reads, and the downgrade puts the old
    index back and drops the spans."""
    from sqlalchemy import inspect, text
    from sqlalchemy.ext.asyncio import create_async_engine

    from vitalwire.store.sql import _async_url

    for backend in ("sqlite", "postgresql"):
        async with _store_url(backend, tmp_path / "spans.db") as url:
            s = SqlStore(url)
            await s.open()
            for batch in _events(seed=5, n=200):
                await s.write_batch(Batch(events=batch))
            statuses = [e for b in _events(seed=5, n=200) for e in b if e.kind == "device_status"]
            got = await s.status_between(STREAM, BASE - 1000, BASE + 5000)
            assert [e.offset for e in got] == [
                e.offset
                for e in sorted(statuses, key=lambda e: (e.ts, e.offset))
                if e.stream == STREAM
            ]
            await s.close()
            engine = create_async_engine(_async_url(url))

            def indexes(conn: Any) -> set[str]:
                return {i["name"] for i in inspect(conn).get_indexes("events")}

            def columns(conn: Any) -> set[str]:
                return {c["name"] for c in inspect(conn).get_columns("vital_rollups")}

            try:
                async with engine.begin() as conn:
                    names = await conn.run_sync(indexes)
                    assert "ix_events_stream_kind_ts_other" in names
                    assert "ix_events_stream_kind_ts" not in names
                    if backend == "sqlite":  # the status read uses the partial index
                        plan = await conn.execute(
                            text(
                                "EXPLAIN QUERY PLAN SELECT * FROM events WHERE stream = 'x' "
                                "AND kind = 'device_status' AND kind != 'reading' AND ts >= 0"
                            )
                        )
                        assert "ix_events_stream_kind_ts_other" in str(plan.all())
                    await conn.run_sync(_migrate, "downgrade", "0013")
                    names = await conn.run_sync(indexes)
                    assert "ix_events_stream_kind_ts" in names
                    assert "ix_events_stream_kind_ts_other" not in names
                    assert not {"lo_offset", "hi_offset"} & await conn.run_sync(columns)
                    await conn.run_sync(_migrate, "upgrade", "head")
                    assert {"lo_offset", "hi_offset"} <= await conn.run_sync(columns)
            finally:
                await engine.dispose()
