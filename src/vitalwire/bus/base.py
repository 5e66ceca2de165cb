"""The bus interface: carries committed events to every vitalwire process and keeps recent history.

Offsets are assigned when an event is committed to the store (docs/reliability.md), so the bus
carries events that already have them; it never invents one. Each process attaches exactly one
listener (its fan-out hub): one bus reader per process, however many clients watch.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Protocol

from vitalwire.wire import Event

Listener = Callable[[Sequence[Event]], None]


class Bus(Protocol):
    backend: str

    async def open(self, listener: Listener) -> None:
        """Start delivering every published event, in offset order per stream, to ``listener``."""

    async def close(self) -> None: ...

    async def publish(self, events: Sequence[Event]) -> None:
        """Publish committed events (in offset order per stream)."""

    async def history(self, stream: str, after: int) -> list[Event] | None:
        """Events of ``stream`` with offset > ``after`` from the recent history, oldest first.

        Returns ``None`` when the history does not reach back to ``after + 1`` (the caller then
        reads the store).
        """
