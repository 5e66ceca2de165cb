"""Bus contract: one body for every backend (memory and Redis), then what only Redis does:
carry events between processes (here, between bus instances with the same key prefix)."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import REQUIRE_SERVICES, RunningServer, start_server, stop_server, wait_until
from vitalwire.bus import Bus, open_bus
from vitalwire.bus.base import event_cost
from vitalwire.bus.redis import RedisBus, parse_url
from vitalwire.wire import Event

REDIS = "redis://127.0.0.1:6379/0"


async def _need_redis() -> str:
    """A fresh key prefix on the local Redis; skip (fail in CI) when Redis is not reachable."""
    import redis.asyncio as aioredis

    r = aioredis.from_url(REDIS)
    try:
        await r.ping()
    except Exception as exc:
        reason = f"Redis is not reachable at {REDIS}: {exc}"
        if REQUIRE_SERVICES:
            pytest.fail(reason)
        pytest.skip(reason)
    finally:
        await r.aclose()
    return f"vwtest-{uuid.uuid4().hex[:12]}"


async def _drop_keys(prefix: str) -> None:
    import redis.asyncio as aioredis

    r = aioredis.from_url(REDIS)
    try:
        keys = [k async for k in r.scan_iter(match=f"{prefix}:*")]
        if keys:
            await r.delete(*keys)
    finally:
        await r.aclose()


@pytest.fixture
async def prefix() -> AsyncIterator[str]:
    p = await _need_redis()
    try:
        yield p
    finally:
        await _drop_keys(p)


class Received:
    def __init__(self) -> None:
        self.events: list[Event] = []

    def __call__(self, events: Sequence[Event]) -> None:
        self.events.extend(events)

    @property
    def offsets(self) -> list[tuple[str, int]]:
        return [(e.stream, e.offset) for e in self.events]


@pytest.fixture(params=["memory", "redis"])
async def bus(request: pytest.FixtureRequest) -> AsyncIterator[tuple[Bus, Received]]:
    received = Received()
    prefix = None
    if request.param == "redis":
        prefix = await _need_redis()
        b = open_bus(f"{REDIS}?prefix={prefix}", history_size=5)
    else:
        b = open_bus("memory://", history_size=5)
    await b.open(received)
    try:
        yield b, received
    finally:
        await b.close()
        if prefix is not None:
            await _drop_keys(prefix)


def _events(stream: str, offsets: range, tag: str = "") -> list[Event]:
    return [Event.new(stream, o, "reading", float(o), {"o": o, "tag": tag}) for o in offsets]


async def test_published_events_reach_the_listener_in_order(bus: tuple[Bus, Received]) -> None:
    b, received = bus
    await b.publish(_events("patient:A", range(1, 4)))
    await b.publish(_events("patient:B", range(1, 3)))
    assert received.offsets == [
        ("patient:A", 1),
        ("patient:A", 2),
        ("patient:A", 3),
        ("patient:B", 1),
        ("patient:B", 2),
    ]


async def test_history_is_bounded_and_says_when_it_cannot_reach_back(
    bus: tuple[Bus, Received],
) -> None:
    b, _ = bus
    assert await b.history("patient:A", 0) is None  # nothing known: ask the store
    await b.publish(_events("patient:A", range(1, 9)))  # history keeps 4..8
    assert [e.offset for e in await b.history("patient:A", 5) or []] == [6, 7, 8]
    assert [e.offset for e in await b.history("patient:A", 3) or []] == [4, 5, 6, 7, 8]
    assert await b.history("patient:A", 8) == []
    assert await b.history("patient:A", 2) is None


def test_unknown_bus_scheme() -> None:
    with pytest.raises(ValueError, match="bus URL must start with memory:// or redis://"):
        open_bus("carrier-pigeon://")


def test_redis_url_prefix() -> None:
    assert parse_url("redis://h:1/2?prefix=ward7") == ("redis://h:1/2", "ward7")
    assert parse_url("redis://h:1/2") == ("redis://h:1/2", "vitalwire")
    with pytest.raises(ValueError, match="prefix must be a plain non-empty name"):
        parse_url("redis://h:1/2?prefix=a*b")


async def test_redis_unreachable_fails_at_open_without_showing_the_password() -> None:
    b = open_bus("redis://:hunter2@127.0.0.1:1/0?prefix=nowhere")
    with pytest.raises(ConnectionError, match="cannot reach Redis at redis://127.0.0.1:1/0") as e:
        await b.open(Received())
    assert "hunter2" not in str(e.value)


async def test_a_foreign_message_on_the_channel_is_skipped(prefix: str) -> None:
    import redis.asyncio as aioredis

    a, _ = await _open(prefix)
    b, got_b = await _open(prefix)
    r = aioredis.from_url(REDIS)
    try:
        await r.publish(f"{prefix}:events", b"x" * 16 + b"not msgpack")
        await a.publish(_events("patient:A", range(1, 3)))
        await wait_until(lambda: len(got_b.events) == 2, what="the events after it")
        assert got_b.offsets == [("patient:A", 1), ("patient:A", 2)]
        assert b.connected
    finally:
        await r.aclose()
        await a.close()
        await b.close()


# -- between processes (Redis only) --------------------------------------------------------------


async def _open(prefix: str, size: int = 5) -> tuple[RedisBus, Received]:
    b = open_bus(f"{REDIS}?prefix={prefix}", history_size=size)
    assert isinstance(b, RedisBus)
    received = Received()
    await b.open(received)
    return b, received


async def test_events_reach_the_other_process_once_in_order(prefix: str) -> None:
    a, got_a = await _open(prefix)
    b, got_b = await _open(prefix)
    try:
        await a.publish(_events("patient:A", range(1, 4)))
        await a.publish(_events("patient:B", range(1, 3)) + _events("patient:A", range(4, 5)))
        want = [("patient:A", o) for o in (1, 2, 3)] + [
            ("patient:B", 1),
            ("patient:B", 2),
            ("patient:A", 4),
        ]
        await wait_until(lambda: len(got_b.events) >= 6, what="events at the other process")
        assert got_b.offsets == want
        assert [e.data for e in got_b.events[:2]] == [{"o": 1, "tag": ""}, {"o": 2, "tag": ""}]
        assert got_a.offsets == want  # the publisher's own: once, not again from the channel
        # the other process answers history from what it received, without asking the publisher
        assert [e.offset for e in await b.history("patient:A", 2) or []] == [3, 4]
    finally:
        await a.close()
        await b.close()
    assert got_a.offsets == want and len(got_b.events) == 6


async def test_a_process_started_later_reads_history_from_redis(prefix: str) -> None:
    a, _ = await _open(prefix)
    try:
        await a.publish(_events("patient:A", range(1, 9), tag="x"))  # Redis keeps 4..8
    finally:
        await a.close()  # waits until the batches reached Redis
    c, got_c = await _open(prefix)
    try:
        assert got_c.events == []
        hist = await c.history("patient:A", 5)
        assert [(e.offset, e.data["tag"]) for e in hist or []] == [(6, "x"), (7, "x"), (8, "x")]
        assert [e.offset for e in await c.history("patient:A", 3) or []] == [4, 5, 6, 7, 8]
        assert await c.history("patient:A", 8) == []
        assert await c.history("patient:A", 2) is None
        assert await c.history("patient:Z", 0) is None
    finally:
        await c.close()


async def _cut_channel(r: Any, bus: Any) -> None:
    """Kill ``bus``'s channel connection on the Redis side (what a network blip does) and wait
    until it notices; it subscribes again after ``RECONNECT_S``."""
    clients = await r.client_list(_type="pubsub")
    mine = [c for c in clients if c.get("name") == bus.client_name]
    assert len(mine) == 1, clients
    await r.client_kill_filter(_id=mine[0]["id"])
    await wait_until(lambda: not bus.connected, what="the bus to notice the lost channel")


async def test_a_process_that_lost_the_channel_gets_what_it_missed(prefix: str) -> None:
    import redis.asyncio as aioredis

    a, _ = await _open(prefix, size=100)
    b, got_b = await _open(prefix, size=100)
    r = aioredis.from_url(REDIS)
    try:
        await a.publish(_events("patient:A", range(1, 4)))
        await wait_until(lambda: len(got_b.events) == 3, what="the first events at b")
        await _cut_channel(r, b)
        await a.publish(_events("patient:A", range(4, 7)))  # b misses these on the channel
        await wait_until(lambda: b.connected, what="b to subscribe again")
        await a.publish(_events("patient:A", range(7, 8)))
        await wait_until(lambda: len(got_b.events) >= 7, what="the rest at b")
        assert [e.offset for e in got_b.events] == [1, 2, 3, 4, 5, 6, 7]
    finally:
        await r.aclose()
        await a.close()
        await b.close()


async def test_a_gap_no_history_fills_is_not_answered_from_around_it(prefix: str) -> None:
    import redis.asyncio as aioredis

    a, _ = await _open(prefix, size=2)  # Redis keeps the last 2 events of each stream
    b, got_b = await _open(prefix, size=100)
    r = aioredis.from_url(REDIS)
    try:
        await a.publish(_events("patient:A", range(1, 4)))
        await wait_until(lambda: len(got_b.events) == 3, what="the first events at b")
        await _cut_channel(r, b)
        await a.publish(_events("patient:A", range(4, 9)))  # Redis keeps only 7 and 8
        await wait_until(lambda: b.connected, what="b to subscribe again")
        await a.publish(_events("patient:A", range(9, 10)))
        await wait_until(lambda: got_b.offsets[-1:] == [("patient:A", 9)], what="9 at b")
        assert [e.offset for e in got_b.events] == [1, 2, 3, 9]  # 4..8 are only in the store
        assert await b.history("patient:A", 5) is None  # not [] nor events from around the gap
        assert await b.history("patient:A", 2) is None
        assert [e.offset for e in await b.history("patient:A", 8) or []] == [9]
    finally:
        await r.aclose()
        await a.close()
        await b.close()


async def test_history_from_an_earlier_store_is_started_over_but_a_resend_is_not(
    prefix: str,
) -> None:
    a, _ = await _open(prefix)
    try:
        await a.publish(_events("patient:A", range(1, 6), tag="old"))
    finally:
        await a.close()
    # the same events again (a retry whose reply was lost): the history is kept as it is
    b, _ = await _open(prefix)
    try:
        await b.publish(_events("patient:A", range(4, 6), tag="old"))
    finally:
        await b.close()
    c, _ = await _open(prefix, size=10)
    try:
        assert [e.offset for e in await c.history("patient:A", 0) or []] == [1, 2, 3, 4, 5]
        # a new store starts the stream at 1 again with other events: the old history goes;
        # 6 and 7 went in after the old 5 before the refusal of 1..5 was seen: kept, in order
        await c.publish(_events("patient:A", range(1, 8), tag="new"))
    finally:
        await c.close()
    d, _ = await _open(prefix, size=10)
    try:
        hist = await d.history("patient:A", 0)
        assert [(e.offset, e.data["tag"]) for e in hist or []] == [(o, "new") for o in range(1, 8)]
    finally:
        await d.close()


async def test_a_stream_taken_over_by_another_node_keeps_its_history_and_fills_the_hole(
    prefix: str,
) -> None:
    """Several nodes (services/cluster.py): node a wrote 1..3 and was killed before 4..5
    reached Redis; node b took the stream at head 5 and writes 6.. The hole is filled from the
    store (``fill``) at every other process, the history in Redis answers "not here" across
    it, and a's late publication of 4..5 neither wipes b's history nor reaches anyone twice."""
    stored = {o: e for o, e in enumerate(_events("patient:A", range(1, 8)), start=1)}

    async def fill(stream: str, after: int, upto: int) -> list[Event]:
        return [stored[o] for o in range(after + 1, upto + 1)]

    a, _ = await _open(prefix, size=100)
    b, _ = await _open(prefix, size=100)
    c, got_c = await _open(prefix, size=100)
    c.fill = fill  # type: ignore[attr-defined]
    try:
        await a.publish([stored[o] for o in (1, 2, 3)])
        await wait_until(lambda: len(got_c.events) == 3, what="1..3 at c")
        await b.publish([stored[o] for o in (6, 7)])  # b took over at 5
        await wait_until(lambda: len(got_c.events) == 7, what="4..7 at c")
        assert [e.offset for e in got_c.events] == [1, 2, 3, 4, 5, 6, 7]
        assert await c.history("patient:A", 0) is not None
        fresh, _ = await _open(prefix, size=100)
        try:  # Redis holds 1..3 and 6..7: across the hole it says "read the store"
            assert await fresh.history("patient:A", 3) is None
            assert [e.offset for e in await fresh.history("patient:A", 5) or []] == [6, 7]
        finally:
            await fresh.close()
        await a.publish([stored[o] for o in (4, 5)])  # a, paused, publishes late: refused
        await a.close()  # its round reached Redis (and was refused there)
        later, _ = await _open(prefix, size=100)
        try:  # b's history is still there
            assert [e.offset for e in await later.history("patient:A", 5) or []] == [6, 7]
        finally:
            await later.close()
        assert [e.offset for e in got_c.events] == [1, 2, 3, 4, 5, 6, 7]
    finally:
        await b.close()
        await c.close()


async def test_server_on_the_redis_bus_serves_its_clients_and_other_processes(
    tmp_path: Path, prefix: str
) -> None:
    from tests.test_pipeline import monitor
    from vitalwire.sdk import DeviceClient

    other, got = await _open(prefix, size=100)  # another vitalwire process, as far as the bus goes
    srv: RunningServer
    srv, task = await start_server(tmp_path, bus=f"{REDIS}?prefix={prefix}")  # type: ignore[arg-type]
    try:
        assert srv.services.bus.backend == "redis"
        did, secret, pid = srv.device(0)
        mon = await monitor(srv)
        try:
            await mon.subscribe([f"patient:{pid}"])
            async with DeviceClient(srv.url, did, secret) as dev:
                seqs = [dev.send(spo2=96, hr=72) for _ in range(3)]
                readings = []
                while len(readings) < 3:
                    e = await mon.next_event()
                    if e.kind == "reading":
                        readings.append(e)
            assert [e.data["seq"] for e in readings] == seqs
        finally:
            await mon.close()
        stream = f"patient:{pid}"

        def at_other() -> list[Event]:
            return [e for e in got.events if e.stream == stream and e.kind == "reading"]

        await wait_until(lambda: len(at_other()) == 3, what="the readings at the other process")
        assert [(e.offset, e.data["seq"]) for e in at_other()] == [
            (e.offset, e.data["seq"]) for e in readings
        ]
    finally:
        await stop_server(srv, task)
        await other.close()


async def test_the_redis_bus_bounds_its_own_history_in_bytes_and_reads_the_rest_from_redis(
    prefix: str,
) -> None:
    cost = event_cost(_events("patient:A", range(1, 2))[0])  # the same for offsets 1 to 9
    b = RedisBus(f"{REDIS}?prefix={prefix}", history_size=5, history_bytes=cost * 3)
    await b.open(Received())
    try:
        await b.publish(_events("patient:A", range(1, 5)))
        await b.publish(_events("patient:B", range(1, 3)))
        # in memory: the three latest of all; the oldest went first, whatever their stream
        assert b.recent.bytes == cost * 3
        held = [(e.stream, e.offset) for s in "AB" for e in b.recent.ring(f"patient:{s}") or ()]
        assert held == [("patient:A", 4), ("patient:B", 1), ("patient:B", 2)]
        await wait_until(lambda: not b._pending, what="the events in Redis")
        # what memory let go of, Redis still has (it keeps history_size per stream)
        assert [e.offset for e in await b.history("patient:A", 1) or []] == [2, 3, 4]
    finally:
        await b.close()


# -- what the history holds of an event ------------------------------------------------------


@pytest.mark.parametrize("extra", [{}, {"note": "x" * 100}, {"note": "y" * 400}])
def test_an_event_shed_costs_what_the_history_estimates(extra: dict[str, Any]) -> None:
    """The estimate the byte bound counts with (event_cost) stays within a quarter of what a
    shed event holds, measured with tracemalloc, for small and large bodies."""
    import tracemalloc

    def made(i: int) -> Event:
        data = {"device": f"dev-{i:05d}", "seq": i, "ts": 1.7e9 + i, "spo2": 97.0, "hr": 72.0}
        e = Event.new(f"patient:P{i % 500:04d}", i, "reading", 1.7e9 + i, data | extra)
        assert e.frame and e.coalesce_key  # as fan-out leaves it
        e.shed()
        return e

    n = 5000
    tracemalloc.start()
    try:
        before = tracemalloc.take_snapshot()
        held = [made(i) for i in range(n)]
        after = tracemalloc.take_snapshot()
    finally:
        tracemalloc.stop()
    measured = sum(s.size_diff for s in after.compare_to(before, "filename")) / n - 8  # list
    estimated = event_cost(held[0])
    assert 0.75 * estimated <= measured <= 1.25 * estimated, (measured, estimated)


async def test_events_fanned_out_keep_only_their_json_and_replay_the_same_frames(
    tmp_path: Path,
) -> None:
    """After the fold and fan-out, an event in the history holds neither its decoded body nor
    its frame; a replay sends the frame the live subscriber got, and does not keep it."""
    from vitalwire.services.streams import Streams
    from vitalwire.store import open_store

    store = open_store(f"sqlite:///{tmp_path / 'shed.db'}")
    await store.open()
    bus = open_bus("memory://")
    streams = Streams(store, bus)
    await bus.open(streams.on_events)
    got: list[str] = []

    class Sub:
        def push(self, event: Event) -> None:
            got.append(event.frame)

    try:
        streams.attach("patient:A", Sub())
        events = [Event.new("patient:A", i, "reading", 1.0 + i, {"hr": 60 + i}) for i in (1, 2)]
        await bus.publish(events)
        held = list(bus.recent.ring("patient:A") or ())
        assert [e.offset for e in held] == [1, 2]
        assert all(e._data is None and e._frame is None for e in held)
        assert [e.replay_frame() for e in held] == got
        assert all(e._frame is None for e in held)  # the replay kept nothing
        assert [e.data["hr"] for e in held] == [61, 62]  # decoded again on demand
    finally:
        await bus.close()
        await store.close()
