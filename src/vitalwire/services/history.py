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
device's own timestamp (``measured``). Bucketing runs in Python over the range's rows. Measured
on SQLite (86,400 rows of 1 Hz, 2 metrics, 2,000 buckets): Python 350-470 ms; ``json_extract``
grouped in SQL 170 ms *without* ``last`` (which needs a second, per-metric query). Neither meets the
100 ms target, so the simpler path that serves SQLite and PostgreSQL alike was kept; the target
needs stored roll-ups (docs/api-history.md, "Choices").
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
from vitalwire.transports.paging import DEFAULT_PAGE, MAX_PAGE, decode_cursor, encode_cursor

#: The longest range one request covers (seconds): 7 days.
MAX_RANGE_S: Final = 7 * 86400.0
#: The most buckets one request makes (and the shortest bucket, seconds).
MAX_BUCKETS: Final = 2000
MIN_BUCKET_S: Final = 1.0
#: The default range when ``from`` is not given: the hour before ``to``.
DEFAULT_RANGE_S: Final = 3600.0
#: Rows read from the store at a time while bucketing.
SCAN_CHUNK: Final = 5000
_META: Final = frozenset({"device", "seq", "ts", "late", "probe"})


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
            detail["bucket"] = bucket
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
        wanted = result.metrics
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
                values = {m: data[m] for m in wanted if _number(data.get(m))}
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

    async def _buckets(self, result: VitalsResult, stream: str) -> None:
        assert result.bucket is not None
        width, frm, wanted = result.bucket, result.t_from, result.metrics
        stats: dict[int, dict[str, Stat]] = {}
        after: tuple[float, int] | None = None
        while True:
            rows = await self.store.readings_between(stream, frm, result.t_to, after, SCAN_CHUNK)
            for e in rows:
                data = e.data
                per = stats.get(k := int((e.ts - frm) // width))
                if per is None:
                    per = stats[k] = {}
                for m in wanted:
                    v = data.get(m)
                    if v is None or not _number(v):
                        continue
                    s = per.get(m)
                    if s is None:
                        per[m] = Stat(v, v, v, 1, v)
                    else:
                        s.add(v)
            if len(rows) < SCAN_CHUNK:
                break
            after = (rows[-1].ts, rows[-1].offset)
        result.buckets = [
            {"start": frm + k * width, "metrics": {m: s.out() for m, s in per.items()}}
            for k, per in sorted(stats.items())
            if per
        ]


__all__ = ["DEFAULT_PAGE", "MAX_BUCKETS", "MAX_RANGE_S", "History", "VitalsResult"]
