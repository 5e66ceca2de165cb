"""One writer per stream, fenced by the store (store/sql.py ``stream_leases``; migration 0011):
the contract for several nodes on one store, on every backend (tests/test_store.py's fixture)."""

from __future__ import annotations

import pytest

from tests.test_store import store  # noqa: F401  (the fixture: every backend)
from vitalwire.store import Batch, Fenced, Store
from vitalwire.wire import Event

TTL = 10.0


def _events(stream: str, first: int, n: int) -> list[Event]:
    return [Event.new(stream, o, "reading", 1.0, {"spo2": 97}) for o in range(first, first + n)]


def _fenced(node: str, epoch: int, *parts: tuple[str, int, int]) -> Batch:
    """A batch of ``n`` events per (stream, first offset, n), fenced by (node, epoch)."""
    b = Batch(fence={})
    for stream, first, n in parts:
        b.events.extend(_events(stream, first, n))
        assert b.fence is not None
        b.fence[stream] = (node, epoch, first, first + n - 1)
    return b


async def _offsets(s: Store, stream: str) -> list[int]:
    return [e.offset for e in await s.events_after(stream, 0, 1000)]


async def test_a_first_lease_starts_at_the_streams_head(store: Store) -> None:  # noqa: F811
    await store.write_batch(Batch(events=_events("patient:P1", 1, 3)))  # one node wrote before
    lease = await store.acquire_stream("patient:P1", "node-a", 100.0, TTL)
    assert lease is not None and (lease.node, lease.epoch, lease.head) == ("node-a", 1, 3)
    assert await store.stream_lease("patient:P1") == lease


async def test_a_live_lease_is_another_nodes_only_by_force_or_when_lapsed(
    store: Store,  # noqa: F811
) -> None:
    a = await store.acquire_stream("patient:P1", "node-a", 100.0, TTL)
    assert a is not None
    assert await store.acquire_stream("patient:P1", "node-b", 105.0, TTL) is None
    again = await store.acquire_stream("patient:P1", "node-a", 105.0, TTL)
    assert again is not None and again.epoch == 2  # every acquisition raises the epoch
    forced = await store.acquire_stream("patient:P1", "node-b", 106.0, TTL, force=True)
    assert forced is not None and (forced.node, forced.epoch) == ("node-b", 3)
    lapsed = await store.acquire_stream("patient:P1", "node-c", 106.0 + TTL + 1, TTL)
    assert lapsed is not None and (lapsed.node, lapsed.epoch) == ("node-c", 4)


async def test_a_node_that_lost_the_lease_can_never_write_again(store: Store) -> None:  # noqa: F811
    a = await store.acquire_stream("patient:P1", "node-a", 100.0, TTL)
    a2 = await store.acquire_stream("patient:P2", "node-a", 100.0, TTL)
    assert a is not None and a2 is not None
    await store.write_batch(_fenced("node-a", a.epoch, ("patient:P1", 1, 5)))
    # node b takes P1 over (its device reconnected there): the epoch goes up, the head is 5
    b = await store.acquire_stream("patient:P1", "node-b", 101.0, TTL, force=True)
    assert b is not None and (b.epoch, b.head) == (2, 5)
    # node a, paused meanwhile, writes with its old epoch: refused, and the whole batch with it
    # (its P2 events, which it still holds, are not written either: one transaction)
    stale = _fenced("node-a", a.epoch, ("patient:P1", 6, 2), ("patient:P2", 1, 2))
    with pytest.raises(Fenced) as refused:
        await store.write_batch(stale)
    assert refused.value.streams == {"patient:P1"}
    assert await _offsets(store, "patient:P2") == []
    await store.write_batch(_fenced("node-b", b.epoch, ("patient:P1", 6, 3)))
    await store.write_batch(_fenced("node-a", a2.epoch, ("patient:P2", 1, 2)))
    assert await _offsets(store, "patient:P1") == list(range(1, 9))  # one writer's offsets each
    lease = await store.stream_lease("patient:P1")
    assert lease is not None and (lease.node, lease.head) == ("node-b", 8)


async def test_a_write_that_would_leave_a_gap_or_repeat_an_offset_is_refused(
    store: Store,  # noqa: F811
) -> None:
    a = await store.acquire_stream("patient:P1", "node-a", 100.0, TTL)
    assert a is not None
    await store.write_batch(_fenced("node-a", a.epoch, ("patient:P1", 1, 3)))
    for first in (5, 3):  # a gap after 3; offset 3 again
        with pytest.raises(Fenced):
            await store.write_batch(_fenced("node-a", a.epoch, ("patient:P1", first, 1)))
    assert await _offsets(store, "patient:P1") == [1, 2, 3]


async def test_a_fenced_batch_of_readings_writes_nothing_of_itself_when_one_fence_fails(
    store: Store,  # noqa: F811
) -> None:
    """The usual batch (readings, their events and their devices' high seqs; one statement on
    PostgreSQL, fence included): a fence that fails leaves no high seq and no event behind,
    and names only the stream lost."""
    from vitalwire.store import ReadingRow

    a1 = await store.acquire_stream("patient:P1", "node-a", 100.0, TTL)
    a2 = await store.acquire_stream("patient:P2", "node-a", 100.0, TTL)
    assert a1 is not None and a2 is not None

    def readings(epoch1: int, epoch2: int, seq: int, first: int) -> Batch:
        b = _fenced("node-a", epoch1, ("patient:P1", first, 1), ("patient:P2", first, 1))
        assert b.fence is not None
        b.fence["patient:P2"] = ("node-a", epoch2, first, first)
        for stream, device in (("patient:P1", "mon-1"), ("patient:P2", "mon-2")):
            b.readings.append(ReadingRow(device, seq, stream[8:], first, 1.0, 2.0))
        return b

    await store.write_batch(readings(a1.epoch, a2.epoch, 7, 1))
    assert [await store.device_last_seq(d) for d in ("mon-1", "mon-2")] == [7, 7]
    b = await store.acquire_stream("patient:P2", "node-b", 101.0, TTL, force=True)
    assert b is not None
    with pytest.raises(Fenced) as refused:
        await store.write_batch(readings(a1.epoch, a2.epoch, 8, 2))
    assert refused.value.streams == {"patient:P2"}
    assert [await store.device_last_seq(d) for d in ("mon-1", "mon-2")] == [7, 7]
    assert await _offsets(store, "patient:P1") == [1] and await _offsets(store, "patient:P2") == [1]
    lease = await store.stream_lease("patient:P1")
    assert lease is not None and lease.head == 1  # the fence that held moved nothing either


async def test_renew_names_the_leases_lost_and_release_frees_them(store: Store) -> None:  # noqa: F811
    held = {}
    for s in ("patient:P1", "patient:P2"):
        lease = await store.acquire_stream(s, "node-a", 100.0, TTL)
        assert lease is not None
        held[s] = lease.epoch
    assert await store.renew_streams("node-a", held, 105.0, TTL) == set()
    assert await store.acquire_stream("patient:P1", "node-b", 105.0 + TTL - 1, TTL) is None
    taken = await store.acquire_stream("patient:P1", "node-b", 106.0, TTL, force=True)
    assert taken is not None
    assert await store.renew_streams("node-a", held, 107.0, TTL) == {"patient:P1"}
    await store.release_streams("node-a", {"patient:P2": held["patient:P2"]})
    freed = await store.acquire_stream("patient:P2", "node-b", 107.0, TTL)
    assert freed is not None and freed.node == "node-b"


async def test_the_writer_drops_only_the_units_of_a_stream_it_lost(store: Store) -> None:  # noqa: F811
    """The batch writer fences every batch with this node's leases; when the store refuses one,
    the units of the lost streams are dropped (never acknowledged, never shown: their devices
    resend to the node that has the stream now) and the rest commit."""
    from vitalwire.bus import open_bus
    from vitalwire.services.writer import BatchWriter

    bus = open_bus("memory://")
    shown: list[Event] = []
    await bus.open(shown.extend)
    leases = {}
    for s in ("patient:P1", "patient:P2"):
        lease = await store.acquire_stream(s, "node-a", 100.0, TTL)
        assert lease is not None
        leases[s] = ("node-a", lease.epoch)
    writer = BatchWriter(store, bus)
    writer.lease_of = leases.get
    lost: list[set[str]] = []
    writer.on_fenced = lost.append
    writer.start()
    try:
        acked: list[str] = []
        writer.submit([], _events("patient:P1", 1, 2), lambda: acked.append("p1-a"))
        await writer.flush()
        taken = await store.acquire_stream("patient:P1", "node-b", 101.0, TTL, force=True)
        assert taken is not None
        writer.submit([], _events("patient:P1", 3, 2), lambda: acked.append("p1-b"))
        writer.submit([], _events("patient:P2", 1, 2), lambda: acked.append("p2"))
        await writer.flush()
        assert lost == [{"patient:P1"}]
        assert acked == ["p1-a", "p2"]
        assert [(e.stream, e.offset) for e in shown] == [
            ("patient:P1", 1),
            ("patient:P1", 2),
            ("patient:P2", 1),
            ("patient:P2", 2),
        ]
        assert await _offsets(store, "patient:P1") == [1, 2]
        assert writer.fenced_units == 1
    finally:
        await writer.stop()
        await bus.close()


async def test_a_sequenced_stream_gets_its_offsets_from_the_store_in_commit_order(
    store: Store,  # noqa: F811
) -> None:
    """The ``alerts`` stream of a cluster: every node writes it, the store numbers its events
    in the write transaction. Placeholder offsets are replaced, other streams are untouched."""
    await store.write_batch(Batch(events=_events("alerts", 1, 2)))  # one node wrote before
    for n in (3, 1, 4):
        b = Batch(events=[*_events("alerts", 1, n), *_events("patient:P1", 1, 1)])
        b.events[-1].offset = await _head(store, "patient:P1") + 1
        b.sequenced = frozenset({"alerts"})
        await store.write_batch(b)
        assert [e.offset for e in b.events if e.stream == "alerts"][-1] == await _head(
            store, "alerts"
        )
    assert await _offsets(store, "alerts") == list(range(1, 11))
    assert await _offsets(store, "patient:P1") == [1, 2, 3]


async def test_concurrent_writers_of_a_sequenced_stream_leave_no_gap_and_no_repeat(
    store: Store,  # noqa: F811
) -> None:
    import asyncio

    async def writer(tag: str) -> None:
        for i in range(20):
            b = Batch(
                events=[
                    Event.new("alerts", 0, "alert", 1.0, {"w": tag, "i": i, "k": k})
                    for k in range(3)
                ],
                sequenced=frozenset({"alerts"}),
            )
            await store.write_batch(b)

    await asyncio.gather(writer("a"), writer("b"), writer("c"))
    events = await store.events_after("alerts", 0, 1000)
    assert [e.offset for e in events] == list(range(1, 181))
    # each batch's events stay together and in their order
    for first in range(0, 180, 3):
        group = [events[first + k].data for k in range(3)]
        assert [d["k"] for d in group] == [0, 1, 2]
        assert len({(d["w"], d["i"]) for d in group}) == 1


async def _head(s: Store, stream: str) -> int:
    offsets = await _offsets(s, stream)
    return offsets[-1] if offsets else 0


async def test_a_renewal_never_waits_for_a_lease_row_another_transaction_holds() -> None:
    """PostgreSQL: a renewal skips the lease rows locked meanwhile (a fenced write of the
    node, another node's acquisition) instead of waiting for them, so it can never close a cycle
    of lock waits with fenced writes; a skipped row still the node's is not reported lost."""
    import asyncio

    import asyncpg

    from tests.test_store import fresh_postgres_db
    from vitalwire.store.sql import SqlStore

    async with fresh_postgres_db() as url:
        s = SqlStore(url)
        await s.open()
        try:
            held = {}
            for stream in ("patient:P1", "patient:P2", "patient:P3"):
                lease = await s.acquire_stream(stream, "node-a", 100.0, TTL)
                assert lease is not None
                held[stream] = lease.epoch
            taken = await s.acquire_stream("patient:P3", "node-b", 101.0, TTL, force=True)
            assert taken is not None
            other = await asyncpg.connect(url)
            try:
                tx = other.transaction()
                await tx.start()
                # a writer holding P1's row and P3's (P3 is node b's now) until it commits
                await other.execute(
                    "SELECT 1 FROM stream_leases WHERE stream = ANY($1) FOR UPDATE",
                    ["patient:P1", "patient:P3"],
                )
                lost = await asyncio.wait_for(s.renew_streams("node-a", held, 102.0, TTL), 5)
                assert lost == {"patient:P3"}  # P1 skipped, still node a's: not lost
                await tx.rollback()
            finally:
                await other.close()
            leases = {st: await s.stream_lease(st) for st in held}
            expires = {st: lease.expires_at for st, lease in leases.items() if lease is not None}
            assert expires["patient:P2"] == 102.0 + TTL  # renewed
            assert expires["patient:P1"] == 100.0 + TTL  # skipped: the next renewal extends it
            assert await s.renew_streams("node-a", held, 103.0, TTL) == {"patient:P3"}
            lease = await s.stream_lease("patient:P1")
            assert lease is not None and lease.expires_at == 103.0 + TTL
        finally:
            await s.close()


async def test_migration_0013_gives_the_fence_a_named_error_and_takes_it_back() -> None:
    """PostgreSQL: the fence's check (``vitalwire_fence_held``) raises SQLSTATE VWF01 with a
    message that says what happened, so that PostgreSQL's log does; the downgrade drops it."""
    import asyncpg
    from sqlalchemy.ext.asyncio import create_async_engine

    from tests.test_history_rollups import _migrate
    from tests.test_store import fresh_postgres_db
    from vitalwire.store.sql import SqlStore, _async_url

    async with fresh_postgres_db() as url:
        s = SqlStore(url)
        await s.open()
        await s.close()
        conn = await asyncpg.connect(url)
        try:
            assert await conn.fetchval("SELECT vitalwire_fence_held(2, 2)") == 1
            with pytest.raises(asyncpg.PostgresError) as refused:
                await conn.fetchval("SELECT vitalwire_fence_held(1, 3)")
            assert refused.value.sqlstate == "VWF01"
            assert "fenced: 2 of 3 streams" in str(refused.value)
        finally:
            await conn.close()
        engine = create_async_engine(_async_url(url))
        try:
            async with engine.begin() as c:
                await c.run_sync(_migrate, "downgrade", "0012")
        finally:
            await engine.dispose()
        conn = await asyncpg.connect(url)
        try:
            n = await conn.fetchval(
                "SELECT count(*) FROM pg_proc WHERE proname = $1", "vitalwire_fence_held"
            )
            assert n == 0
        finally:
            await conn.close()
