"""In-memory bus for one process: publish calls the listener directly; bounded history."""

from __future__ import annotations

from collections.abc import Sequence

from vitalwire.bus.base import HISTORY_BYTES, History, Listener
from vitalwire.wire import Event


class MemoryBus:
    """``memory://`` — the default for a single process."""

    backend = "memory"

    def __init__(self, history_size: int = 1000, history_bytes: int = HISTORY_BYTES) -> None:
        self.history_size = history_size
        #: ``history_size`` events per stream, ``history_bytes`` in all (bus/base.py)
        self.recent = History(history_size, history_bytes)
        self._listener: Listener | None = None

    async def open(self, listener: Listener) -> None:
        self._listener = listener

    async def close(self) -> None:
        self._listener = None

    async def ready(self) -> bool:
        return True

    async def publish(self, events: Sequence[Event]) -> None:
        add = self.recent.add
        for event in events:
            add(event)
        if self._listener is not None:
            self._listener(events)

    def catch_up(self, events: Sequence[Event]) -> None:
        """Deliver committed events read from the store (one process: never needed, kept for
        the interface)."""
        if self._listener is not None:
            self._listener(events)

    async def history(self, stream: str, after: int) -> list[Event] | None:
        return self.recent.after(stream, after)
