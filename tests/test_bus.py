"""Bus contract: one body for every backend (memory now; Redis joins the parameter list)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence

import pytest

from vitalwire.bus import Bus, open_bus
from vitalwire.wire import Event


@pytest.fixture(params=["memory://"])
async def bus(request: pytest.FixtureRequest) -> AsyncIterator[tuple[Bus, list[Event]]]:
    received: list[Event] = []

    def listener(events: Sequence[Event]) -> None:
        received.extend(events)

    b = open_bus(request.param, history_size=5)
    await b.open(listener)
    try:
        yield b, received
    finally:
        await b.close()


def _events(stream: str, offsets: range) -> list[Event]:
    return [Event.new(stream, o, "reading", float(o), {"o": o}) for o in offsets]


async def test_published_events_reach_the_listener_in_order(bus: tuple[Bus, list[Event]]) -> None:
    b, received = bus
    await b.publish(_events("patient:A", range(1, 4)))
    await b.publish(_events("patient:B", range(1, 3)))
    assert [(e.stream, e.offset) for e in received] == [
        ("patient:A", 1),
        ("patient:A", 2),
        ("patient:A", 3),
        ("patient:B", 1),
        ("patient:B", 2),
    ]


async def test_history_is_bounded_and_says_when_it_cannot_reach_back(
    bus: tuple[Bus, list[Event]],
) -> None:
    b, _ = bus
    assert await b.history("patient:A", 0) is None  # nothing known: ask the store
    await b.publish(_events("patient:A", range(1, 9)))  # history keeps 4..8
    assert [e.offset for e in await b.history("patient:A", 5) or []] == [6, 7, 8]
    assert [e.offset for e in await b.history("patient:A", 3) or []] == [4, 5, 6, 7, 8]
    assert await b.history("patient:A", 8) == []
    assert await b.history("patient:A", 2) is None


def test_unknown_bus_scheme() -> None:
    with pytest.raises(ValueError, match="bus URL must start with"):
        open_bus("carrier-pigeon://")
