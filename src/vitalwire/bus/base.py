"""The bus interface: carries committed events to every vitalwire process and keeps recent history.

Offsets are assigned when an event is committed to the store (docs/reliability.md), so the bus
carries events that already have them; it never invents one. Each process attaches exactly one
listener (its fan-out hub): one bus reader per process, however many clients watch.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Sequence
from itertools import islice
from typing import Protocol

from vitalwire.wire import Event

Listener = Callable[[Sequence[Event]], None]


class Bus(Protocol):
    backend: str

    async def open(self, listener: Listener) -> None:
        """Start delivering every published event, in offset order per stream, to ``listener``."""

    async def close(self) -> None: ...

    async def ready(self) -> bool:
        """True when the bus answers now (/readyz)."""

    async def publish(self, events: Sequence[Event]) -> None:
        """Publish committed events (in offset order per stream)."""

    def catch_up(self, events: Sequence[Event]) -> None:
        """Deliver committed events read from the store, skipping the ones already delivered
        (a node taking a stream over: services/cluster.py)."""

    async def history(self, stream: str, after: int) -> list[Event] | None:
        """Events of ``stream`` with offset > ``after`` from the recent history, oldest first.

        Returns ``None`` when the history does not reach back to ``after + 1`` (the caller then
        reads the store).
        """


#: The default bound of the history over all streams (the ``bus_history_bytes`` setting).
HISTORY_BYTES = 256 * 1_048_576

#: What a retained event costs in memory, estimated from its JSON body: the event itself with its
#: numbers, its JSON (a bytes object) and its places in the history's queues. Its frame and
#: decoded body are not kept once it has been fanned out (``Event.shed``). Measured with
#: tracemalloc: 356 bytes for a 92-byte reading, 516 for 187 bytes, 989 for 502; estimated 378,
#: 520 and 993 (docs/architecture.md). Before the shedding a 112-byte reading held 820.
EVENT_FIXED_BYTES = 240


def event_cost(event: Event) -> int:
    """The memory ``event`` holds, estimated (see :data:`EVENT_FIXED_BYTES`): 1.5 bytes per
    byte of its JSON beside the fixed part."""
    n = len(event.data_json)
    return EVENT_FIXED_BYTES + n + (n >> 1)


class History:
    """The recent events of every stream, in memory: at most ``size`` per stream and about
    ``max_bytes`` in all (:func:`event_cost`). Past the byte bound the oldest events go first,
    whatever their stream; an evicted event is still in the store, which replay then reads.

    The global order is a queue of stream names, one per event added (a reference to a string
    the event holds anyway: 8 bytes). An event dropped by the per-stream bound leaves its entry
    behind; such entries are counted per stream (they are that stream's earliest entries) and
    skipped when reached, and the queue is compacted when they are half of it.
    """

    __slots__ = ("size", "max_bytes", "bytes", "_rings", "_order", "_stale", "_stale_total")

    def __init__(self, size: int, max_bytes: int) -> None:
        if size < 1:
            raise ValueError(f"bus history size must be at least 1, got {size}")
        if max_bytes < 1:
            raise ValueError(f"bus history bytes must be at least 1, got {max_bytes}")
        self.size = size
        self.max_bytes = max_bytes
        #: The estimated memory of the events held now.
        self.bytes = 0
        self._rings: dict[str, deque[Event]] = {}
        self._order: deque[str] = deque()
        self._stale: dict[str, int] = {}
        self._stale_total = 0

    def __len__(self) -> int:
        return sum(len(ring) for ring in self._rings.values())

    def ring(self, stream: str) -> deque[Event] | None:
        """The events held of ``stream``, oldest first (not to be changed), or None."""
        return self._rings.get(stream)

    def add(self, event: Event) -> None:
        """Append ``event`` (the next offset of its stream, or after :meth:`clear`)."""
        stream = event.stream
        ring = self._rings.get(stream)
        if ring is None:
            ring = self._rings[stream] = deque()
        ring.append(event)
        self._order.append(stream)
        self.bytes += event_cost(event)
        if len(ring) > self.size:
            self.bytes -= event_cost(ring.popleft())
            self._skip(stream, 1)
        while self.bytes > self.max_bytes:
            self._evict_oldest()

    def after(self, stream: str, after: int) -> list[Event] | None:
        """Events of ``stream`` past offset ``after``; None when those held start later."""
        ring = self._rings.get(stream)
        if not ring:
            return None
        first = ring[0].offset
        if after + 1 < first:
            return None
        return list(islice(ring, max(0, after + 1 - first), None))

    def clear(self, stream: str) -> None:
        """Forget the events held of ``stream``."""
        ring = self._rings.pop(stream, None)
        if ring:
            self.bytes -= sum(event_cost(e) for e in ring)
            self._skip(stream, len(ring))

    def _skip(self, stream: str, n: int) -> None:
        """``n`` more of ``stream``'s earliest entries in the order refer to events gone."""
        self._stale[stream] = self._stale.get(stream, 0) + n
        self._stale_total += n
        if self._stale_total > 1024 and self._stale_total * 2 > len(self._order):
            self._compact()

    def _evict_oldest(self) -> None:
        order = self._order
        stale = self._stale
        while order:
            stream = order.popleft()
            n = stale.get(stream)
            if n:
                self._stale_total -= 1
                if n == 1:
                    del stale[stream]
                else:
                    stale[stream] = n - 1
                continue
            ring = self._rings[stream]
            self.bytes -= event_cost(ring.popleft())
            if not ring:
                del self._rings[stream]
            return

    def _compact(self) -> None:
        """Drop the stale entries from the order (linear, at most once per as many adds)."""
        stale = self._stale
        kept: deque[str] = deque()
        for stream in self._order:
            n = stale.get(stream)
            if n:
                if n == 1:
                    del stale[stream]
                else:
                    stale[stream] = n - 1
                continue
            kept.append(stream)
        self._order = kept
        self._stale_total = 0
