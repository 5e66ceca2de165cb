"""Stored roll-ups of readings: per stream, per ``GRAIN`` seconds, per metric (migration 0010).

A row of ``vital_rollups`` summarises one metric of one patient's readings whose receive time
``ts`` falls in ``[start, start + GRAIN)``: min, max, sum, count and the last value with its
``(ts, offset)``, so ``last`` stays exact when rows merge. The store writes them in the same
transaction as the events they summarise (``write_batch``, both write paths), so a roll-up is
never behind nor ahead of what is durable. Rows merge by upsert (min of mins, max of maxes, sums
and counts added, the later ``(ts, offset)`` keeps its ``last``): a late reading landing in an
old grain keeps the row exact. Only events the batch inserts count (a reading a device resends is
dropped by the seq check before it becomes an event, so it is never counted twice).

Why 60 s: the history's target (one day in at most 2,000 buckets) needs buckets of at least
43.2 s, so a 60 s grain serves a day with 1,440 rows per metric, and the widest range (7 days,
buckets of at least 302.4 s, rounded to 360 s) with 10,080. A 10 s grain would make 6 times the
rows to read and to write for no bucket a chart asks for; at 1 Hz a 60 s grain writes one row
per metric for 60 readings.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Final

from sqlalchemy import Connection, and_, case, or_, select

from vitalwire.core.events import READING
from vitalwire.core.metrics import METRIC_BY_NAME
from vitalwire.store import schema as t
from vitalwire.wire import Event

#: The roll-up grain (seconds); bucket starts are multiples of it (epoch seconds).
GRAIN: Final = 60
#: Events read at a time while backfilling.
BACKFILL_CHUNK: Final = 20000


def grain_of(ts: float) -> int:
    """The start of the grain holding ``ts``."""
    return int(ts // GRAIN) * GRAIN


def _number(v: object) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


def rollup_rows(events: Iterable[Event]) -> list[dict[str, Any]]:
    """The roll-up rows of ``events`` (readings only; other kinds are skipped), merged per
    (stream, grain, metric), ready for :func:`upsert`."""
    acc: dict[tuple[str, int, str], list[Any]] = {}
    for e in events:
        if e.kind != READING:
            continue
        start = grain_of(e.ts)
        for m, v in e.data.items():
            if m not in METRIC_BY_NAME or not _number(v):
                continue
            key = (e.stream, start, m)
            r = acc.get(key)
            if r is None:
                acc[key] = [v, v, v, 1, e.ts, e.offset, v]
            else:
                if v < r[0]:
                    r[0] = v
                if v > r[1]:
                    r[1] = v
                r[2] += v
                r[3] += 1
                if (e.ts, e.offset) > (r[4], r[5]):
                    r[4], r[5], r[6] = e.ts, e.offset, v
    return [
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
        }
        for (s, start, m), r in acc.items()
    ]


def upsert(dialect: Any) -> Any:
    """INSERT ... ON CONFLICT that merges a row into the stored one (SQLite and PostgreSQL)."""
    r = t.vital_rollups
    stmt = dialect.insert(r)
    x = stmt.excluded
    later = or_(
        x.last_ts > r.c.last_ts, and_(x.last_ts == r.c.last_ts, x.last_offset > r.c.last_offset)
    )
    return stmt.on_conflict_do_update(
        index_elements=[r.c.stream, r.c.start, r.c.metric],
        set_={
            "vmin": case((x.vmin < r.c.vmin, x.vmin), else_=r.c.vmin),
            "vmax": case((x.vmax > r.c.vmax, x.vmax), else_=r.c.vmax),
            "vsum": r.c.vsum + x.vsum,
            "n": r.c.n + x.n,
            "last_ts": case((later, x.last_ts), else_=r.c.last_ts),
            "last_offset": case((later, x.last_offset), else_=r.c.last_offset),
            "vlast": case((later, x.vlast), else_=r.c.vlast),
        },
    )


def backfill(conn: Connection, dialect: Any, before: float | None = None) -> int:
    """Roll up the readings a store holds (all, or those with ``ts < before``) into
    ``vital_rollups``, merging with what is there; returns the events read. Reads the events in
    (stream, offset) order a chunk at a time (migration 0010, retention)."""
    e = t.events
    stmt = upsert(dialect)
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
        out = rollup_rows(batch)
        if out:
            conn.execute(stmt, out)
        after = (rows[-1][0], rows[-1][1])


__all__ = ["GRAIN", "backfill", "grain_of", "rollup_rows", "upsert"]
