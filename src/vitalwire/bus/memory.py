"""In-memory bus for one process: publish calls the listener directly; bounded history."""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from itertools import islice

from vitalwire.bus.base import Listener
from vitalwire.wire import Event


class MemoryBus:
    """``memory://`` — the default for a single process."""

    backend = "memory"

    def __init__(self, history_size: int = 1000) -> None:
        if history_size < 1:
            raise ValueError(f"bus history size must be at least 1, got {history_size}")
        self.history_size = history_size
        self._history: dict[str, deque[Event]] = {}
        self._listener: Listener | None = None

    async def open(self, listener: Listener) -> None:
        self._listener = listener

    async def close(self) -> None:
        self._listener = None

    async def publish(self, events: Sequence[Event]) -> None:
        for event in events:
            ring = self._history.get(event.stream)
            if ring is None:
                ring = self._history[event.stream] = deque(maxlen=self.history_size)
            ring.append(event)
        if self._listener is not None:
            self._listener(events)

    async def history(self, stream: str, after: int) -> list[Event] | None:
        ring = self._history.get(stream)
        if not ring:
            return None
        first = ring[0].offset
        if after + 1 < first:
            return None
        return list(islice(ring, max(0, after + 1 - first), None))
