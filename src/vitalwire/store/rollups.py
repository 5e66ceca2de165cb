"""Stored roll-ups of readings: per stream, per ``GRAIN`` seconds, per metric (migration 0010).

A row of ``vital_rollups`` summarises one metric of one patient's readings whose receive time
``ts`` falls in ``[start, start + GRAIN)``: min, max, sum, count and the last value with its
``(ts, offset)``, so ``last`` stays exact when rows merge. Rows merge by upsert (min of mins, max
of maxes, sums and counts added, the later ``(ts, offset)`` keeps its ``last``): a late reading
landing in an old grain keeps the row exact. Only events the store holds count (a reading a
device resends is dropped by the seq check before it becomes an event, so it is never counted
twice).

**When rows are written (migration 0012).** Each stream has a *mark* in ``rollup_marks``: the
roll-ups hold exactly the stream's readings at offsets up to the mark, and none after it; the
store moves the mark in the same transaction as the rows. Readers (vitals history) take the
roll-ups for what is at or below the mark and the raw events for what is above it, so an answer
is exact whatever has been rolled up yet.

The writing node keeps, per stream, the roll-up of the readings it committed since the mark in
memory (:class:`RollupBook`) and writes a grain's rows once, after the grain ends: when the
stream's first reading of a later grain is committed, or ``STALE_S`` after the grain ended for a
stream gone quiet. Before, every batch upserted its readings' rows, so a stream at 1 Hz rewrote
each row 60 times; a ward's server spent about 10 points of a core on it (docs/benchmarks.md,
"What a node costs since 2026-11-27"). A flush is a compare-and-set: its rows count only if the
stored mark is still where the node's roll-up began (``base``); otherwise (the node restarted
after a crash, another node wrote the stream in between, a flush of another node went first)
the store rolls up the events above the stored mark from the events table itself, in SQL, in the
same transaction (the *catch-up*; slower per reading, but only for what no live node holds in
memory). On PostgreSQL the marks are locked ``FOR UPDATE SKIP LOCKED``: two nodes never flush a
stream at once, and the one that skips leaves the work to the next flush's catch-up. A node that
stops cleanly flushes all it holds (``SqlStore.close``), so a rolling restart costs no catch-up;
after a kill the next flush of each of its streams catches up (at most about a grain and a half
of readings a stream), and a node starting up queues a catch-up for every patient stream whose
mark is behind its head.

Why 60 s: the history's target (one day in at most 2,000 buckets) needs buckets of at least
43.2 s, so a 60 s grain serves a day with 1,440 rows per metric, and the widest range (7 days,
buckets of at least 302.4 s, rounded to 360 s) with 10,080. A 10 s grain would make 6 times the
rows to read and to write for no bucket a chart asks for; at 1 Hz a 60 s grain writes one row
per metric for 60 readings.
"""

from __future__ import annotations

import heapq
import zlib
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Final, NamedTuple

from sqlalchemy import Connection, and_, case, func, or_, select

from vitalwire.core.events import READING
from vitalwire.core.metrics import METRIC_BY_NAME
from vitalwire.store import schema as t
from vitalwire.wire import Event

#: The roll-up grain (seconds); bucket starts are multiples of it (epoch seconds).
GRAIN: Final = 60
#: Events read at a time while backfilling.
BACKFILL_CHUNK: Final = 20000
#: A stream gone quiet has its last grain flushed this long after the grain ended (seconds).
STALE_S: Final = 5.0
#: A stream's ended grain is written up to this long after the grain's end (seconds), at a point
#: of its own (a hash of the stream's name): at a minute's turn every stream of a hospital has a
#: grain to write, and written at once they held a ward's readings back by a second (8,000 rows
#: at about 18 µs each on SQLite, in 16 commits). Spread so, each batch carries a few.
SPREAD_S: Final = 30.0
#: At most this many streams' roll-ups ride on one batch of readings, and about this many rows
#: (a stream's are never split).
FLUSH_STREAMS: Final = 32
FLUSH_ROWS: Final = 128
#: At most this many known catch-ups a batch (a backlog found at start-up, a gap in a stream's
#: offsets): each reads and rolls up about a minute and a half of its stream's events in SQL,
#: about 2 ms a stream on SQLite at 1 Hz, where a row written from memory costs about 18 µs.
#: After a crash, a hospital's 10,000 streams are caught up 4 a batch instead of 32 at 70 ms.
FLUSH_CATCH_UPS: Final = 4
#: A flush whose ``base`` is this always catches up from the events table (a backlog found at
#: start-up: no node holds those readings in memory).
CATCH_UP: Final = -1


def grain_of(ts: float) -> int:
    """The start of the grain holding ``ts``."""
    return int(ts // GRAIN) * GRAIN


def _number(v: object) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


def rollup_rows(events: Iterable[Event], *, spans: bool = True) -> list[dict[str, Any]]:
    """The roll-up rows of ``events`` (readings only; other kinds are skipped), merged per
    (stream, grain, metric), ready for :func:`upsert`. ``spans``: with the offsets' span
    (``lo_offset``, ``hi_offset``: migration 0014; False for the migrations before it)."""
    per: dict[str, dict[tuple[int, str], _Acc]] = {}
    for e in events:
        if e.kind == READING:
            _add(per.setdefault(e.stream, {}), e)
    out = [
        {
            "stream": s,
            "start": start,
            "metric": m,
            "vmin": float(r[0]),
            "vmax": float(r[1]),
            "vsum": float(r[2]),
            "n": r[3],
            "last_ts": r[4],
            "last_offset": r[5],
            "vlast": float(r[6]),
            "lo_offset": r[7],
            "hi_offset": r[8],
        }
        for s, rows in per.items()
        for (start, m), r in rows.items()
    ]
    if not spans:
        for row in out:
            del row["lo_offset"], row["hi_offset"]
    return out


def upsert(dialect: Any, *, spans: bool = True) -> Any:
    """INSERT ... ON CONFLICT that merges a row into the stored one (SQLite and PostgreSQL);
    ``spans`` as :func:`rollup_rows`'s."""
    r = t.vital_rollups
    stmt = dialect.insert(r)
    x = stmt.excluded
    later = or_(
        x.last_ts > r.c.last_ts, and_(x.last_ts == r.c.last_ts, x.last_offset > r.c.last_offset)
    )
    merged = {
        "vmin": case((x.vmin < r.c.vmin, x.vmin), else_=r.c.vmin),
        "vmax": case((x.vmax > r.c.vmax, x.vmax), else_=r.c.vmax),
        "vsum": r.c.vsum + x.vsum,
        "n": r.c.n + x.n,
        "last_ts": case((later, x.last_ts), else_=r.c.last_ts),
        "last_offset": case((later, x.last_offset), else_=r.c.last_offset),
        "vlast": case((later, x.vlast), else_=r.c.vlast),
    }
    if spans:  # a row whose span was never known (retention emptied it) takes the new one's
        merged["lo_offset"] = case(
            (or_(r.c.lo_offset.is_(None), x.lo_offset < r.c.lo_offset), x.lo_offset),
            else_=r.c.lo_offset,
        )
        merged["hi_offset"] = case(
            (or_(r.c.hi_offset.is_(None), x.hi_offset > r.c.hi_offset), x.hi_offset),
            else_=r.c.hi_offset,
        )
    return stmt.on_conflict_do_update(
        index_elements=[r.c.stream, r.c.start, r.c.metric], set_=merged
    )


def backfill(
    conn: Connection, dialect: Any, before: float | None = None, *, spans: bool = True
) -> int:
    """Roll up the readings a store holds (all, or those with ``ts < before``) into
    ``vital_rollups``, merging with what is there; returns the events read. Reads the events in
    (stream, offset) order a chunk at a time (migration 0010, retention); ``spans`` as
    :func:`rollup_rows`'s."""
    e = t.events
    stmt = upsert(dialect, spans=spans)
    after: tuple[str, int] | None = None
    seen = 0
    while True:
        q = select(e.c.stream, e.c.offset, e.c.kind, e.c.ts, e.c.data).where(e.c.kind == READING)
        if before is not None:
            q = q.where(e.c.ts < before)
        if after is not None:
            q = q.where(
                or_(e.c.stream > after[0], and_(e.c.stream == after[0], e.c.offset > after[1]))
            )
        q = q.order_by(e.c.stream, e.c.offset).limit(BACKFILL_CHUNK)
        rows = list(conn.execute(q))
        if not rows:
            return seen
        seen += len(rows)
        batch = [Event.from_stored(s, o, k, ts, d.encode()) for s, o, k, ts, d in rows]
        out = rollup_rows(batch, spans=spans)
        if out:
            conn.execute(stmt, out)
        after = (rows[-1][0], rows[-1][1])


def upsert_above_marks(conn: Connection, dialect: Any, *, spans: bool = True) -> int:
    """Roll up every stream's readings above its mark into ``vital_rollups`` (migration 0012's
    downgrade: the versions before it expect every stored reading rolled up); returns the events
    read. ``spans`` as :func:`rollup_rows`'s."""
    e, m = t.events, t.rollup_marks
    heads = conn.execute(select(e.c.stream, func.max(e.c.offset)).group_by(e.c.stream)).all()
    marks = dict(conn.execute(select(m.c.stream, m.c.rolled_offset)).all())
    stmt = upsert(dialect, spans=spans)
    seen = 0
    for stream, head in heads:
        after = int(marks.get(stream, 0))
        while after < head:
            q = (
                select(e.c.offset, e.c.kind, e.c.ts, e.c.data)
                .where(e.c.stream == stream, e.c.offset > after)
                .order_by(e.c.offset)
                .limit(BACKFILL_CHUNK)
            )
            rows = conn.execute(q).all()
            if not rows:
                break
            seen += len(rows)
            batch = [Event.from_stored(stream, o, k, ts, d.encode()) for o, k, ts, d in rows]
            if out := rollup_rows(batch, spans=spans):
                conn.execute(stmt, out)
            after = int(rows[-1][0])
    return seen


#: One metric's running roll-up: [min, max, sum, count, last_ts, last_offset, last], and in a
#: node's book (not vitals history's buckets) the span of its readings' offsets [lo, hi].
_Acc = list[Any]


def _add(rows: dict[tuple[int, str], _Acc], e: Event) -> None:
    start = grain_of(e.ts)
    off = e.offset
    for m, v in e.data.items():
        if m not in METRIC_BY_NAME or not _number(v):
            continue
        r = rows.get((start, m))
        if r is None:
            rows[(start, m)] = [v, v, v, 1, e.ts, off, v, off, off]
        else:
            if v < r[0]:
                r[0] = v
            if v > r[1]:
                r[1] = v
            r[2] += v
            r[3] += 1
            if (e.ts, off) > (r[4], r[5]):
                r[4], r[5], r[6] = e.ts, off, v
            if off < r[7]:
                r[7] = off
            if off > r[8]:
                r[8] = off


def merge(acc: _Acc | None, other: _Acc) -> _Acc:
    """``other`` merged into ``acc`` (a copy of ``other`` when ``acc`` is None): the row of
    both sets of readings. Also vitals history's, over roll-ups and raw readings (rows of 7,
    without the offsets' span)."""
    if acc is None:
        return list(other)
    if other[0] < acc[0]:
        acc[0] = other[0]
    if other[1] > acc[1]:
        acc[1] = other[1]
    acc[2] += other[2]
    acc[3] += other[3]
    if (other[4], other[5]) > (acc[4], acc[5]):
        acc[4], acc[5], acc[6] = other[4], other[5], other[6]
    if len(acc) > 7:
        if other[7] < acc[7]:
            acc[7] = other[7]
        if other[8] > acc[8]:
            acc[8] = other[8]
    return acc


def _merge_into(into: dict[tuple[int, str], _Acc], rows: dict[tuple[int, str], _Acc]) -> None:
    for key, o in rows.items():
        r = into.get(key)
        into[key] = o if r is None else merge(r, o)


class Flush(NamedTuple):
    """One stream's roll-ups to write: its rows stand for the events in ``(base, upto]``; they
    count only if the stored mark is ``base``, else the store catches up from the events."""

    stream: str
    base: int
    upto: int
    #: (start, metric, min, max, sum, count, last_ts, last_offset, last, lo_offset, hi_offset)
    rows: list[tuple[Any, ...]]


@dataclass(slots=True)
class _Stream:
    base: int  # the offset the stored mark is expected at (where this roll-up began)
    last: int  # the last offset committed (any kind of event)
    grain: int  # the newest grain a reading fell in
    open: dict[tuple[int, str], _Acc] = field(default_factory=dict)  # events (cut, last]
    closed: dict[tuple[int, str], _Acc] | None = None  # events (base, cut], ready to flush
    cut: int = 0


class RollupBook:
    """A node's roll-ups of the readings it committed and has not flushed, per stream.

    Fed after each commit (:meth:`note`); each batch asks :meth:`take` for the streams due, writes
    them in its transaction and, once committed, calls :meth:`done`. A stream whose offsets this
    node did not see all of (another node wrote some: a lease moved and came back; a backlog
    found at start-up) is held as a catch-up (``base`` is ``CATCH_UP``): its next flush rolls up
    from the events table whatever is above the stored mark. Event-loop only."""

    def __init__(self) -> None:
        self._streams: dict[str, _Stream] = {}
        self._ready: deque[str] = deque()
        self._later: list[tuple[float, str]] = []  # (when due, stream): a heap
        self._queued: set[str] = set()
        self._scanned = 0.0

    def __len__(self) -> int:
        """Streams holding readings not yet flushed."""
        return len(self._streams)

    def note(self, events: Iterable[Event]) -> None:
        """Committed events, in offset order within each stream."""
        for e in events:
            st = self._streams.get(e.stream)
            if st is None:
                if e.kind != READING:
                    continue
                st = self._streams[e.stream] = _Stream(e.offset - 1, e.offset - 1, grain_of(e.ts))
            elif e.offset != st.last + 1 and st.base != CATCH_UP:
                # offsets this node never saw: what it holds no longer follows the mark
                st.base, st.open, st.closed = CATCH_UP, {}, None
                self._queue(e.stream)
            before, st.last = st.last, e.offset
            if e.kind != READING or st.base == CATCH_UP:
                continue
            g = grain_of(e.ts)
            if g > st.grain:
                if st.open:  # the grain before ended: what came up to here can be written
                    self._close(e.stream, st, before, g + _spread(e.stream))
                st.grain = g
            _add(st.open, e)

    def _queue(self, stream: str, due: float | None = None) -> None:
        """To be flushed by the next batches (``due``: from that time on)."""
        if stream not in self._queued:
            self._queued.add(stream)
            if due is None:
                self._ready.append(stream)
            else:
                heapq.heappush(self._later, (due, stream))

    def _close(self, stream: str, st: _Stream, cut: int, due: float | None = None) -> None:
        """What ``st`` holds up to offset ``cut`` (its last) is to be written (from ``due``)."""
        if st.closed is None:
            st.closed = st.open
        else:
            _merge_into(st.closed, st.open)
        st.open = {}
        st.cut = cut
        self._queue(stream, due)

    def holds_before(self, ts: float) -> bool:
        """Whether this node holds readings of a grain that starts before ``ts``
        (retention, once an hour: in practice it holds only the last minute or so)."""
        return any(
            start < ts
            for st in self._streams.values()
            for start, _ in (*st.open, *(st.closed or ()))
        )

    def backlog(self, streams: dict[str, int]) -> None:
        """Streams (→ head) whose stored mark is behind their head with no node holding the
        difference (start-up): each is caught up by a flush of its own."""
        for s, head in streams.items():
            if s not in self._streams:
                self._streams[s] = _Stream(CATCH_UP, head, 0)
                self._queue(s)

    def take(self, now: float, *, everything: bool = False) -> list[Flush]:
        """The flushes due (at most ``FLUSH_STREAMS`` streams and about ``FLUSH_ROWS`` rows;
        ``everything``: all a node holds, closing every stream's open grain: at shutdown). The
        book is unchanged until :meth:`done`."""
        if everything or now - self._scanned >= 1.0:
            self._scanned = now
            for s, st in self._streams.items():
                if st.open and (everything or st.grain + GRAIN + STALE_S <= now):
                    self._close(s, st, st.last)
        later = self._later
        while later and (everything or later[0][0] <= now):
            self._ready.append(heapq.heappop(later)[1])
        out: list[Flush] = []
        rows = catch_ups = 0
        for s in self._ready:
            if not everything and (len(out) >= FLUSH_STREAMS or rows >= FLUSH_ROWS):
                break
            st = self._streams[s]
            if st.base == CATCH_UP:
                if not everything and catch_ups >= FLUSH_CATCH_UPS:
                    break
                catch_ups += 1
                out.append(Flush(s, CATCH_UP, st.last, []))
                continue
            assert st.closed is not None
            flat = [(start, m, *r) for (start, m), r in st.closed.items()]
            rows += len(flat)
            out.append(Flush(s, st.base, st.cut, flat))
        return out

    def done(self, flushes: list[Flush]) -> None:
        """``flushes`` (the first of :meth:`take`'s answer, in order) are committed."""
        for f in flushes:
            popped = self._ready.popleft()
            assert popped == f.stream, (popped, f.stream)
            self._queued.discard(f.stream)
            st = self._streams[f.stream]
            st.base = f.upto
            st.closed = None
            if not st.open and st.last == f.upto:
                del self._streams[f.stream]  # quiet: a later reading starts a new roll-up


def _spread(stream: str) -> float:
    """The stream's point in ``[0, SPREAD_S)``: the same on every node and run."""
    return zlib.crc32(stream.encode()) % 1000 * SPREAD_S / 1000


#: The metrics rolled up, as an SQL list (a fixed registry: core/metrics.py).
_METRICS_SQL = ", ".join(f"'{m}'" for m in METRIC_BY_NAME)
_MERGE_SET = (
    "vmin = {least}(vital_rollups.vmin, excluded.vmin), "
    "vmax = {greatest}(vital_rollups.vmax, excluded.vmax), "
    "vsum = vital_rollups.vsum + excluded.vsum, "
    "n = vital_rollups.n + excluded.n, "
    "last_ts = CASE WHEN (excluded.last_ts, excluded.last_offset) > "
    "(vital_rollups.last_ts, vital_rollups.last_offset) "
    "THEN excluded.last_ts ELSE vital_rollups.last_ts END, "
    "last_offset = CASE WHEN (excluded.last_ts, excluded.last_offset) > "
    "(vital_rollups.last_ts, vital_rollups.last_offset) "
    "THEN excluded.last_offset ELSE vital_rollups.last_offset END, "
    "vlast = CASE WHEN (excluded.last_ts, excluded.last_offset) > "
    "(vital_rollups.last_ts, vital_rollups.last_offset) "
    "THEN excluded.vlast ELSE vital_rollups.vlast END, "
    "lo_offset = {least}(coalesce(vital_rollups.lo_offset, excluded.lo_offset), "
    "excluded.lo_offset), "
    "hi_offset = {greatest}(coalesce(vital_rollups.hi_offset, excluded.hi_offset), "
    "excluded.hi_offset)"
)
_COLUMNS = (
    "(stream, start, metric, vmin, vmax, vsum, n, last_ts, last_offset, vlast, lo_offset, "
    "hi_offset)"
)
_SQLITE_MARK = "coalesce((SELECT m.rolled_offset FROM rollup_marks m WHERE m.stream = {s}), 0)"

#: SQLite, one JSON parameter of rows ``[stream, base, start, metric, min, max, sum, count,
#: last_ts, last_offset, last, lo_offset, hi_offset]``: the rows whose stream's stored mark is
#: ``base``.
SQLITE_FLUSH_ROWS: Final = (
    f"INSERT INTO vital_rollups {_COLUMNS} SELECT value ->> 0, value ->> 2, value ->> 3, "
    "value ->> 4, value ->> 5, value ->> 6, value ->> 7, value ->> 8, value ->> 9, value ->> 10, "
    "value ->> 11, value ->> 12 "
    f"FROM json_each(?) WHERE {_SQLITE_MARK.format(s='value ->> 0')} = value ->> 1 "
    "ON CONFLICT (stream, start, metric) DO UPDATE SET "
    + _MERGE_SET.format(least="min", greatest="max")
)
#: SQLite, one JSON parameter of ``[stream, base, upto]``: the catch-up of each stream whose
#: stored mark is not ``base``, from its events in ``(mark, upto]``; ``last`` by (ts, offset).
SQLITE_FLUSH_CATCH_UP: Final = (
    f"INSERT INTO vital_rollups {_COLUMNS} "
    "SELECT stream, start, metric, min(v), max(v), sum(v), count(*), max(lts), max(loff), "
    "max(lv), min(o), max(o) FROM (SELECT e.stream AS stream, "
    'CAST(e.ts / 60 AS INTEGER) * 60 AS start, e."offset" AS o, '
    "j.key AS metric, j.value AS v, first_value(e.ts) OVER w AS lts, "
    'first_value(e."offset") OVER w AS loff, first_value(j.value) OVER w AS lv '
    "FROM json_each(?) d JOIN events e ON e.stream = d.value ->> 0 "
    f'AND e."offset" > {_SQLITE_MARK.format(s="d.value ->> 0")} '
    'AND e."offset" <= d.value ->> 2 '
    f"AND {_SQLITE_MARK.format(s='d.value ->> 0')} <> d.value ->> 1 "
    "JOIN json_each(e.data) j "
    f"WHERE e.kind = 'reading' AND j.key IN ({_METRICS_SQL}) AND j.type IN ('integer', 'real') "
    "WINDOW w AS (PARTITION BY e.stream, CAST(e.ts / 60 AS INTEGER), j.key "
    'ORDER BY e.ts DESC, e."offset" DESC)) WHERE true GROUP BY stream, start, metric '
    "ON CONFLICT (stream, start, metric) DO UPDATE SET "
    + _MERGE_SET.format(least="min", greatest="max")
)
#: SQLite, the same parameter: each stream's mark moved up to ``upto``.
SQLITE_FLUSH_MARKS: Final = (
    "INSERT INTO rollup_marks (stream, rolled_offset) SELECT value ->> 0, value ->> 2 "
    "FROM json_each(?) WHERE true ON CONFLICT (stream) DO UPDATE SET "
    "rolled_offset = max(rollup_marks.rolled_offset, excluded.rolled_offset)"
)

#: PostgreSQL: the marks of streams flushed for the first time (the flush locks existing rows).
PG_NEW_MARKS: Final = (
    "INSERT INTO rollup_marks (stream, rolled_offset) "
    "SELECT unnest(CAST(:s AS text[])), 0 ON CONFLICT (stream) DO NOTHING"
)
_PG_LAST = '(array_agg({x} ORDER BY e.ts DESC, e."offset" DESC))[1]'
#: PostgreSQL: a batch's flushes in one statement. The marks are locked ``SKIP LOCKED`` (a
#: stream another node is flushing right now is left out, caught up by a later flush); the rows
#: of the streams whose mark is ``base`` merged in; the others caught up from their events
#: above the mark; the marks moved up to ``upto``.
PG_FLUSH: Final = (
    "WITH f AS (SELECT * FROM unnest(CAST(:fs AS text[]), CAST(:fb AS bigint[]), "
    "CAST(:fu AS bigint[])) AS f(stream, base, upto)), "
    "m AS (SELECT k.stream, k.rolled_offset AS mark, f.base, f.upto "
    "FROM rollup_marks k JOIN f ON f.stream = k.stream FOR UPDATE OF k SKIP LOCKED), "
    f"kept AS (INSERT INTO vital_rollups {_COLUMNS} "
    "SELECT r.* FROM unnest(CAST(:rs AS text[]), CAST(:rt AS bigint[]), CAST(:rm AS text[]), "
    "CAST(:rlo AS float8[]), CAST(:rhi AS float8[]), CAST(:rsum AS float8[]), "
    "CAST(:rn AS bigint[]), CAST(:rlts AS float8[]), CAST(:rloff AS bigint[]), "
    "CAST(:rlast AS float8[]), CAST(:rlof AS bigint[]), CAST(:rhof AS bigint[])) "
    "AS r(stream, start, metric, vmin, vmax, vsum, n, last_ts, last_offset, vlast, lo_offset, "
    "hi_offset) JOIN m ON m.stream = r.stream AND m.mark = m.base "
    "ON CONFLICT (stream, start, metric) DO UPDATE SET "
    + _MERGE_SET.format(least="least", greatest="greatest")
    + " RETURNING 1), "
    f"caught AS (INSERT INTO vital_rollups {_COLUMNS} "
    "SELECT e.stream, CAST(floor(e.ts / 60) AS bigint) * 60, j.key, min(x.v), max(x.v), "
    f"sum(x.v), count(*), {_PG_LAST.format(x='e.ts')}, {_PG_LAST.format(x='e.offset')}, "
    f'{_PG_LAST.format(x="x.v")}, min(e."offset"), max(e."offset") '
    'FROM m JOIN events e ON e.stream = m.stream AND e."offset" > m.mark '
    'AND e."offset" <= m.upto AND m.mark <> m.base '
    "CROSS JOIN LATERAL jsonb_each(CAST(e.data AS jsonb)) AS j(key, value) "
    "CROSS JOIN LATERAL (SELECT CASE WHEN jsonb_typeof(j.value) = 'number' "
    "THEN CAST(j.value AS float8) END AS v) AS x "
    f"WHERE e.kind = 'reading' AND j.key IN ({_METRICS_SQL}) AND x.v IS NOT NULL "
    "GROUP BY e.stream, CAST(floor(e.ts / 60) AS bigint), j.key "
    "ON CONFLICT (stream, start, metric) DO UPDATE SET "
    + _MERGE_SET.format(least="least", greatest="greatest")
    + " RETURNING 1) "
    "UPDATE rollup_marks k SET rolled_offset = greatest(k.rolled_offset, m.upto) "
    "FROM m WHERE k.stream = m.stream"
)


def sqlite_flush_params(flushes: list[Flush]) -> tuple[list[list[Any]], list[list[Any]]]:
    """:data:`SQLITE_FLUSH_ROWS`'s rows and the streams' ``[stream, base, upto]``."""
    rows = [[f.stream, f.base, *r] for f in flushes for r in f.rows]
    return rows, [[f.stream, f.base, f.upto] for f in flushes]


def pg_flush_params(flushes: list[Flush]) -> dict[str, list[Any]]:
    """:data:`PG_FLUSH`'s arrays."""
    rows = [(f.stream, *r) for f in flushes for r in f.rows]
    names = ("rs", "rt", "rm", "rlo", "rhi", "rsum", "rn", "rlts", "rloff", "rlast", "rlof", "rhof")
    cols = list(zip(*rows, strict=True)) if rows else [()] * len(names)
    out: dict[str, list[Any]] = {k: list(c) for k, c in zip(names, cols, strict=True)}
    for k in ("rlo", "rhi", "rsum", "rlast"):  # ints in JSON are floats in the table
        out[k] = [float(v) for v in out[k]]
    out["fs"] = [f.stream for f in flushes]
    out["fb"] = [f.base for f in flushes]
    out["fu"] = [f.upto for f in flushes]
    return out


__all__ = [
    "CATCH_UP",
    "GRAIN",
    "Flush",
    "RollupBook",
    "backfill",
    "grain_of",
    "merge",
    "rollup_rows",
    "upsert",
    "upsert_above_marks",
]
