"""Vitals history: a patient's readings in a time range, raw or downsampled, with gap markers.

One service for every transport (REST today; GraphQL and FHIR call the same): it validates the
request (each refusal names the field and the bound), checks VIEW access (a refusal is audited),
audits the read, and answers with either

- raw points, ordered by (ts, offset), a page at a time behind an opaque cursor, or
- buckets of ``bucket_s`` seconds aligned on ``t_from``: per metric min, max, mean, count and last
  (the extremes survive downsampling, so a trend chart keeps them),

and, either way, the device_status events in the range (``offline``/``online``): gap markers, so a
chart shows "no data" instead of joining the line.

Times are the server's receive times (the indexed ``events.ts``); each raw point also carries the
device's own timestamp (``measured``).

Buckets come from two sources. A bucket of at least the roll-up grain (``GRAIN``, 60 s;
store/rollups.py), or any bucket over a range longer than 3 h, is rounded **up** to a multiple
of the grain (and up again, a grain at a time, until the range makes at most ``MAX_BUCKETS``);
such buckets are aligned on multiples of their width (epoch seconds), the first and the last
clipped to ``[from, to)``. The whole grains inside the range are read from the stored roll-ups
(one range scan of their primary key) up to the stream's roll-up mark, and the readings above
the mark (not rolled up yet: about the last minute) from the raw events; the partial grains at
the range's edges from the raw readings. The answer is the one the raw computation gives over
the same boundaries (min, max, count and last exactly; the mean up to float rounding: sums are
added in another order). A smaller bucket over at most 3 h is computed in Python over the
range's rows, aligned on ``from`` as before (measured on SQLite, 86,400 rows of 1 Hz, 2
metrics: 350-470 ms; that is why roll-ups exist). docs/api.md, "Vitals history", documents the
route; docs/benchmarks.md, "Vitals history", has the figures.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

from vitalwire.core import access as policy
from vitalwire.core import events as ev
from vitalwire.core.errors import Forbidden, InvalidMessage, NotFound
from vitalwire.core.metrics import METRIC_BY_NAME
from vitalwire.services.access import Access
from vitalwire.services.auth import Principal
from vitalwire.store import Store
from vitalwire.store.rollups import GRAIN
from vitalwire.store.rollups import merge as _merge
from vitalwire.transports.paging import DEFAULT_PAGE, MAX_PAGE, decode_cursor, encode_cursor

#: The longest range one request covers (seconds): 7 days.
MAX_RANGE_S: Final = 7 * 86400.0
#: The most buckets one request makes (and the shortest bucket, seconds).
MAX_BUCKETS: Final = 2000
MIN_BUCKET_S: Final = 1.0
#: The default range when ``from`` is not given: the hour before ``to``.
DEFAULT_RANGE_S: Final = 3600.0
#: The longest range whose buckets under a grain are computed from the raw rows, as asked (3 h:
#: 10,800 rows at 1 Hz); a longer range gets buckets of at least a grain, from the roll-ups.
RAW_BUCKET_SPAN_S: Final = 3 * 3600.0
#: Rows read from the store at a time while bucketing.
SCAN_CHUNK: Final = 5000
_META: Final = frozenset({"device", "seq", "ts", "late", "probe"})


#: One metric's running summary: [min, max, sum, count, last_ts, last_offset, last].
Acc = list[Any]


def _out(a: Acc) -> dict[str, Any]:
    return {"min": a[0], "max": a[1], "mean": a[2] / a[3], "count": a[3], "last": a[6]}


@dataclass(slots=True)
class Stat:
    min: float
    max: float
    total: float
    count: int
    last: float

    def add(self, v: float) -> None:
        if v < self.min:
            self.min = v
        if v > self.max:
            self.max = v
        self.total += v
        self.count += 1
        self.last = v

    def out(self) -> dict[str, Any]:
        return {
            "min": self.min,
            "max": self.max,
            "mean": self.total / self.count,
            "count": self.count,
            "last": self.last,
        }


@dataclass(slots=True)
class VitalsResult:
    """What :meth:`History.vitals` answers: raw ``items`` (with ``next_cursor``) or ``buckets``."""

    patient_id: str
    t_from: float
    t_to: float
    metrics: list[str]
    bucket: float | None
    #: "from": buckets start at ``from`` + k × bucket; "epoch": at multiples of ``bucket``
    #: (roll-ups), the first and the last clipped to the range
    alignment: str | None = None
    items: list[dict[str, Any]] = field(default_factory=list)
    next_cursor: str | None = None
    buckets: list[dict[str, Any]] | None = None
    gaps: list[dict[str, Any]] = field(default_factory=list)


def _number(v: object) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


class History:
    def __init__(self, store: Store, access: Access, clock: Callable[[], float]) -> None:
        self.store = store
        self.access = access
        self.clock = clock
        #: serve buckets of a grain or more from the stored roll-ups (False: from the raw rows
        #: over the same boundaries; the bench's baseline and the tests' reference)
        self.use_rollups = True

    # -- validation -------------------------------------------------------------------------------

    def _range(
        self, t_from: float | None, t_to: float | None, cursor: dict[str, Any] | None
    ) -> tuple[float, float]:
        if cursor is not None:  # a cursor walks the range of its first page, whatever is passed
            t_from, t_to = cursor.get("f"), cursor.get("t")
            if not (_number(t_from) and _number(t_to)):
                raise InvalidMessage("cursor is not a cursor this server gave", field="cursor")
        for name, value in (("from", t_from), ("to", t_to)):
            if value is not None and not math.isfinite(value):
                raise InvalidMessage(f"{name} must be a finite number of seconds", field=name)
        to = self.clock() if t_to is None else float(t_to)
        frm = to - DEFAULT_RANGE_S if t_from is None else float(t_from)
        if frm >= to:
            raise InvalidMessage(f"from ({frm}) must be before to ({to})", field="from")
        if to - frm > MAX_RANGE_S:
            raise InvalidMessage(
                f"from..to may span at most {MAX_RANGE_S:.0f} s (7 days), got {to - frm:.0f} s",
                field="from",
            )
        return frm, to

    @staticmethod
    def _metrics(metrics: Sequence[str] | None) -> list[str]:
        if not metrics:
            return list(METRIC_BY_NAME)
        chosen: list[str] = []
        for m in metrics:
            if m not in METRIC_BY_NAME:
                known = ", ".join(METRIC_BY_NAME)
                raise InvalidMessage(
                    f"metrics: unknown metric {m!r:.40}; known: {known}", field="metrics"
                )
            if m not in chosen:
                chosen.append(m)
        return chosen

    @staticmethod
    def _bucket(bucket_s: float | None, span: float) -> float | None:
        if bucket_s is None:
            return None
        if not math.isfinite(bucket_s) or bucket_s < MIN_BUCKET_S or bucket_s > span:
            raise InvalidMessage(
                f"bucket must be between {MIN_BUCKET_S:.0f} s and the range ({span:g} s)",
                field="bucket",
            )
        if math.ceil(span / bucket_s) > MAX_BUCKETS:
            raise InvalidMessage(
                f"bucket must make at most {MAX_BUCKETS} buckets: at least "
                f"{span / MAX_BUCKETS:g} s for this range",
                field="bucket",
            )
        return float(bucket_s)

    @staticmethod
    def bucket_plan(bucket_s: float, frm: float, to: float) -> tuple[float, str]:
        """The bucket width used and its alignment for a validated ``bucket_s``: below the
        grain over at most ``RAW_BUCKET_SPAN_S``, as asked, aligned on ``from``; otherwise
        rounded up to a multiple of ``GRAIN``, then up a grain at a time until the
        epoch-aligned buckets of ``[frm, to)`` are at most ``MAX_BUCKETS``."""
        if bucket_s < GRAIN and to - frm <= RAW_BUCKET_SPAN_S:
            return bucket_s, "from"
        width = math.ceil(bucket_s / GRAIN - 1e-9) * GRAIN
        while math.ceil(to / width) - math.floor(frm / width) > MAX_BUCKETS:
            width += GRAIN
        return float(width), "epoch"

    # -- the read ---------------------------------------------------------------------------------

    async def vitals(
        self,
        who: Principal,
        pid: str,
        t_from: float | None,
        t_to: float | None,
        metrics: Sequence[str] | None,
        bucket_s: float | None,
        cursor: str | None,
        limit: int,
        origin: str | None,
    ) -> VitalsResult:
        """A patient's vitals between ``t_from`` and ``t_to`` (``to`` defaults to now, ``from`` to
        an hour before it): raw pages, or buckets when ``bucket_s`` is given.

        Raises:
            InvalidMessage: a bad parameter (the field and its bound named).
            NotFound: no such patient.
            Forbidden: the patient is not in ``who``'s care (audited).
        """
        ev.check_id("patient_id", pid)
        if not 1 <= limit <= MAX_PAGE:
            raise InvalidMessage(f"limit must be between 1 and {MAX_PAGE}", field="limit")
        position = decode_cursor(cursor)
        frm, to = self._range(t_from, t_to, position)
        chosen = self._metrics(metrics)
        bucket = self._bucket(bucket_s, to - frm)
        if bucket is not None and position is not None:
            raise InvalidMessage("cursor pages raw reads only (no bucket)", field="cursor")
        if await self.store.get_patient(pid) is None:
            raise NotFound(f"patient {pid} does not exist", field="patient_id")
        try:
            self.access.check(who, policy.VIEW, pid)
        except Forbidden as exc:
            self.access.refused(who.name, "vitals_history", pid, exc.message, origin)
            raise
        stream = ev.patient_stream(pid)
        result = VitalsResult(pid, frm, to, chosen, bucket)
        if bucket is None:
            await self._raw(result, stream, position, limit)
        else:
            result.bucket, result.alignment = self.bucket_plan(bucket, frm, to)
            if result.alignment == "epoch" and self.use_rollups:
                await self._rolled_buckets(result, stream)
            else:
                await self._buckets(result, stream)
        result.gaps = [
            {
                "ts": e.ts,
                "offset": e.offset,
                "device": e.data.get("device"),
                "status": e.data.get("status"),
                "reason": e.data.get("reason"),
            }
            for e in await self.store.status_between(stream, frm, to)
        ]
        detail: dict[str, Any] = {"from": frm, "to": to}
        if bucket is not None:
            detail["bucket"] = result.bucket
            detail["count"] = len(result.buckets or ())
        else:
            detail["count"] = len(result.items)
        if self.access.via_break_glass(who, pid):
            detail["flag"] = "break_glass"
        self.access.audit(who.name, "vitals_history", pid, detail, origin)
        return result

    async def _raw(
        self, result: VitalsResult, stream: str, position: dict[str, Any] | None, limit: int
    ) -> None:
        after: tuple[float, int] | None = None
        if position is not None:
            ts, off = position.get("ts"), position.get("o")
            if not (_number(ts) and isinstance(off, int)):
                raise InvalidMessage("cursor is not a cursor this server gave", field="cursor")
            after = (float(ts), off)  # type: ignore[arg-type]
        wanted = set(result.metrics)
        items = result.items
        more = False
        while len(items) < limit:
            rows = await self.store.readings_between(
                stream, result.t_from, result.t_to, after, limit
            )
            more = len(rows) == limit  # the store may hold more after these
            for i, e in enumerate(rows):
                after = (e.ts, e.offset)
                data = e.data
                # the reading's own metrics (a handful), not every metric asked for
                values = {
                    m: v
                    for m, v in data.items()
                    if m in wanted and (type(v) is float or type(v) is int)
                }
                if values:
                    items.append(
                        {
                            "ts": e.ts,
                            "offset": e.offset,
                            "device": data.get("device"),
                            "measured": data.get("ts"),
                            "values": values,
                            "late": bool(data.get("late", False)),
                        }
                    )
                    if len(items) == limit:
                        more = more or i < len(rows) - 1  # rows of this read left unsent
                        break
            if not more:
                break
        if more and after is not None:
            result.next_cursor = encode_cursor(
                {"ts": after[0], "o": after[1], "f": result.t_from, "t": result.t_to}
            )

    async def _scan(
        self,
        stream: str,
        frm: float,
        to: float,
        wanted: list[str],
        origin: float,
        width: float,
        stats: dict[int, dict[str, Acc]],
    ) -> None:
        """Add the readings of ``[frm, to)`` to ``stats``: bucket k holds
        ``origin + k * width <= ts < origin + (k + 1) * width``."""
        after: tuple[float, int] | None = None
        while True:
            rows = await self.store.readings_between(stream, frm, to, after, SCAN_CHUNK)
            for e in rows:
                data = e.data
                per = stats.get(k := int((e.ts - origin) // width))
                if per is None:
                    per = stats[k] = {}
                for m in wanted:
                    v = data.get(m)
                    if v is None or not _number(v):
                        continue
                    a = per.get(m)
                    if a is None:
                        per[m] = [v, v, v, 1, e.ts, e.offset, v]
                    else:  # rows come in (ts, offset) order: this one is the last so far
                        if v < a[0]:
                            a[0] = v
                        if v > a[1]:
                            a[1] = v
                        a[2] += v
                        a[3] += 1
                        a[4], a[5], a[6] = e.ts, e.offset, v
            if len(rows) < SCAN_CHUNK:
                return
            after = (rows[-1].ts, rows[-1].offset)

    @staticmethod
    def _emit(
        result: VitalsResult, origin: float, width: float, stats: dict[int, dict[str, Acc]]
    ) -> None:
        result.buckets = [
            {"start": origin + k * width, "metrics": {m: _out(a) for m, a in per.items()}}
            for k, per in sorted(stats.items())
            if per
        ]

    async def _buckets(self, result: VitalsResult, stream: str) -> None:
        """Buckets computed from the raw rows (either alignment)."""
        assert result.bucket is not None
        origin = result.t_from if result.alignment == "from" else 0.0
        stats: dict[int, dict[str, Acc]] = {}
        await self._scan(
            stream, result.t_from, result.t_to, result.metrics, origin, result.bucket, stats
        )
        self._emit(result, origin, result.bucket, stats)

    async def _rolled_buckets(self, result: VitalsResult, stream: str) -> None:
        """Epoch-aligned buckets: the whole grains from the roll-ups and, above the stream's
        roll-up mark (what is not rolled up yet: about the last minute), from the raw events;
        the partial grains at the range's edges from the raw rows."""
        assert result.bucket is not None
        width, frm, to, wanted = result.bucket, result.t_from, result.t_to, result.metrics
        first = math.ceil(frm / GRAIN) * GRAIN  # the whole grains: [first, end)
        end = math.floor(to / GRAIN) * GRAIN
        stats: dict[int, dict[str, Acc]] = {}
        if first >= end:  # no whole grain in the range
            await self._scan(stream, frm, to, wanted, 0.0, width, stats)
            self._emit(result, 0.0, width, stats)
            return
        if frm < first:
            await self._scan(stream, frm, first, wanted, 0.0, width, stats)
        if end < to:
            await self._scan(stream, end, to, wanted, 0.0, width, stats)
        mark, rows = await self.store.rollups_between(stream, int(first), int(end), wanted)
        for start, m, lo, hi, total, n, lts, loff, last in rows:
            per = stats.get(k := int(start // width))
            if per is None:
                per = stats[k] = {}
            per[m] = _merge(per.get(m), [lo, hi, total, n, lts, loff, last])
        after = mark
        while True:  # the events above the mark, in offset order (the primary key)
            events = await self.store.events_after(stream, after, SCAN_CHUNK)
            for e in events:
                if e.kind != ev.READING or not first <= e.ts < end:
                    continue
                data = e.data
                per = stats.get(k := int(e.ts // width))
                if per is None:
                    per = stats[k] = {}
                for m in wanted:
                    v = data.get(m)
                    if v is not None and _number(v):
                        per[m] = _merge(per.get(m), [v, v, v, 1, e.ts, e.offset, v])
            if len(events) < SCAN_CHUNK:
                break
            after = events[-1].offset
        self._emit(result, 0.0, width, stats)


__all__ = [
    "DEFAULT_PAGE",
    "GRAIN",
    "MAX_BUCKETS",
    "MAX_RANGE_S",
    "History",
    "VitalsResult",
]
