"""Service policies tested without sockets: the batch writer and a client's send queue."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

import pytest

from tests.conftest import wait_until
from vitalwire.bus.memory import MemoryBus
from vitalwire.core import events as ev
from vitalwire.services.auth import Principal
from vitalwire.services.clients import ClientSession
from vitalwire.services.streams import Streams
from vitalwire.services.writer import BatchWriter
from vitalwire.store import Batch, ReadingRow
from vitalwire.wire import Close, Event


class FakeStore:
    """Records batches; can be made to fail or to block, to test the writer around it."""

    backend = "fake"

    def __init__(self) -> None:
        self.batches: list[Batch] = []
        self.transactions = 0
        self.fail_next = 0
        self.gate: asyncio.Event | None = None

    async def write_batch(self, batch: Batch) -> None:
        if self.gate is not None:
            await self.gate.wait()
        if self.fail_next:
            self.fail_next -= 1
            raise OSError("disk on fire")
        self.batches.append(batch)
        self.transactions += 1

    def __getattr__(self, name: str) -> Any:  # the rest of the Store protocol is not used
        raise AttributeError(name)


def _unit(i: int) -> tuple[list[ReadingRow], list[Event]]:
    e = Event.new("patient:P", i, ev.READING, 1.0, {"device": "d", "seq": i, "hr": 60.0})
    return [ReadingRow("d", i, "P", i, 1.0, 1.0)], [e]


async def _writer(store: FakeStore, **kw: Any) -> tuple[BatchWriter, list[Event]]:
    published: list[Event] = []
    bus = MemoryBus()

    def listener(events: Sequence[Event]) -> None:
        published.extend(events)

    await bus.open(listener)
    writer = BatchWriter(store, bus, **kw)  # type: ignore[arg-type]
    writer.start()
    return writer, published


async def test_writer_bounds_batch_rows_and_publishes_after_commit() -> None:
    store = FakeStore()
    store.gate = asyncio.Event()
    writer, published = await _writer(store, max_rows=10, max_wait_s=0.001)
    acks: list[int] = []
    for i in range(1, 26):
        writer.submit(*_unit(i), on_durable=lambda i=i: acks.append(i))
    await asyncio.sleep(0)  # let the writer take its first batch; it is blocked in the store
    assert published == [] and acks == []  # nothing shown or acked before the commit
    store.gate.set()
    await writer.stop()
    assert [len(b) for b in store.batches] == [10, 10, 10, 10, 10]
    assert [e.offset for e in published] == list(range(1, 26))
    assert acks == list(range(1, 26))


async def test_under_load_commits_start_a_min_interval_apart_but_idle_or_full_go_at_once() -> None:
    loop = asyncio.get_running_loop()
    starts: list[float] = []
    committed = asyncio.Event()

    class TimedStore(FakeStore):
        async def write_batch(self, batch: Batch) -> None:
            starts.append(loop.time())
            await super().write_batch(batch)
            committed.set()

    store = TimedStore()
    writer, _ = await _writer(store, max_rows=6, max_wait_s=0.0, min_interval_s=0.3)
    writer.submit(*_unit(1))  # an idle writer commits at once: well before 0.3 s
    await asyncio.wait_for(committed.wait(), 0.25)
    committed.clear()
    writer.submit(*_unit(2))  # right after a commit: waits for the rest of the interval
    writer.submit(*_unit(3))
    await asyncio.wait_for(committed.wait(), 5)
    committed.clear()
    assert [len(b) for b in store.batches] == [2, 4]  # units 2 and 3 went in one commit
    assert starts[1] - starts[0] >= 0.3 - 0.01
    for i in range(4, 7):  # 6 rows: a full batch does not wait for the interval
        writer.submit(*_unit(i))
    await asyncio.wait_for(committed.wait(), 0.25)
    assert [len(b) for b in store.batches] == [2, 4, 6]
    await writer.stop()


async def test_writer_retries_a_failed_commit_and_reports_failing() -> None:
    store = FakeStore()
    store.fail_next = 10**6
    writer, published = await _writer(store, max_rows=100, max_wait_s=0)
    seen_failing: list[bool] = []
    writer.submit(*_unit(1), on_durable=lambda: seen_failing.append(writer.failing))
    await wait_until(lambda: writer.failing, 5, "the writer to report failing")
    assert published == [] and seen_failing == []  # kept, not shown, not acked
    store.fail_next = 0
    await writer.flush()
    await writer.stop()
    assert store.transactions == 1 and [e.offset for e in published] == [1]
    assert seen_failing == [False] and not writer.failing


async def test_wait_for_room_blocks_until_the_writer_catches_up() -> None:
    store = FakeStore()
    store.gate = asyncio.Event()
    writer, _ = await _writer(store, max_rows=4, max_wait_s=0)
    for i in range(1, 11):
        writer.submit(*_unit(i))
    waiter = asyncio.create_task(writer.wait_for_room(4))
    await asyncio.sleep(0)
    assert not waiter.done() and writer.pending_rows > 4
    store.gate.set()
    await asyncio.wait_for(waiter, 5)
    assert writer.pending_rows <= 4
    await writer.stop()


async def test_wait_for_room_times_out_and_leaves_the_others_waiting() -> None:
    """A producer held back past its timeout gets TimeoutError; the writer's queue of waiters
    is not disturbed, and the one behind it still wakes when there is room."""
    store = FakeStore()
    store.gate = asyncio.Event()
    writer, _ = await _writer(store, max_rows=4, max_wait_s=0)
    for i in range(1, 11):
        writer.submit(*_unit(i))
    patient = asyncio.create_task(writer.wait_for_room(4))
    with pytest.raises(TimeoutError):
        await writer.wait_for_room(4, 0.01)
    assert not patient.done()
    store.gate.set()
    await asyncio.wait_for(patient, 5)
    assert writer.pending_rows <= 4
    await writer.wait_for_room(4, 0.01)  # room already: returns at once
    await writer.stop()


async def test_held_back_producers_wake_in_order_and_only_with_room() -> None:
    """A commit that leaves no room wakes nobody; room wakes the waiters oldest first, and a
    cancelled waiter does not keep the others waiting."""
    store = FakeStore()
    store.gate = asyncio.Event()
    writer, _ = await _writer(store, max_rows=2, max_wait_s=0)
    for i in range(1, 9):
        writer.submit(*_unit(i))  # 16 rows pending, 2 per batch
    woke: list[str] = []

    async def producer(name: str, bound: int) -> None:
        await writer.wait_for_room(bound)
        woke.append(name)

    first = asyncio.create_task(producer("first", 8))
    gone = asyncio.create_task(producer("gone", 8))
    second = asyncio.create_task(producer("second", 8))
    await asyncio.sleep(0)
    gone.cancel()
    assert woke == [] and len(writer._room_waiters) == 3
    store.gate.set()
    await asyncio.wait_for(asyncio.gather(first, second), 5)
    assert woke == ["first", "second"] and writer.pending_rows <= 8
    assert not writer._room_waiters
    await writer.stop()


class _NoStore:
    pass


def _session(**kw: Any) -> tuple[ClientSession, list[tuple[int, str]]]:
    closed: list[tuple[int, str]] = []
    streams = Streams(_NoStore(), MemoryBus())  # type: ignore[arg-type]
    session = ClientSession(
        Principal("u", "clinician"), streams, on_overflow=lambda c, r: closed.append((c, r)), **kw
    )
    return session, closed


def _reading(offset: int, device: str = "d1", **values: float) -> Event:
    data: dict[str, Any] = {"device": device, "seq": offset, "ts": 1.0, **(values or {"hr": 60.0})}
    return Event.new("patient:P", offset, ev.READING, 1.0, data)


def _status(offset: int) -> Event:
    data = {"device": "d1", "status": "offline", "reason": "silent"}
    return Event.new("patient:P", offset, ev.DEVICE_STATUS, 1.0, data)


async def test_over_the_soft_bound_readings_coalesce_but_status_events_never_do() -> None:
    session, closed = _session(soft_queue=3, max_queue=100)
    await session.subscribe(["patient:P"], None, 1)
    await session.take()  # the subscribed reply
    events = [_reading(1), _reading(2), _reading(3)]  # fills to the soft bound
    events += [_reading(4, hr=61.0), _status(5), _reading(6, hr=62.0)]
    events += [_reading(7, spo2=95.0), _reading(8, device="d2"), _reading(9, hr=63.0)]
    for e in events:
        session.push(e)
    frames = await session.take()
    assert frames is not None
    offsets = [int(f.split('"offset":')[1].split(",")[0]) for f in frames]
    # 4 and 6 were superseded by 9 (same device, same metrics); 5 (status), 7 (other metrics) and
    # 8 (other device) stay; order within the stream is kept
    assert offsets == [1, 2, 3, 5, 7, 8, 9]
    assert session.coalesced == 2 and closed == []


async def test_past_the_hard_bound_the_client_is_closed_and_its_queue_released() -> None:
    session, closed = _session(soft_queue=5, max_queue=5)
    await session.subscribe(["patient:P"], None, 1)
    await session.take()
    for i in range(1, 7):
        session.push(_status(i))
    assert closed == [(Close.SLOW_CONSUMER, "slow consumer: send queue full, resume by offset")]
    assert session.queued == 0 and session.overflowed and session.subscriptions == []
    session.push(_status(7))
    assert session.queued == 0


async def test_events_already_sent_or_older_are_never_sent_again() -> None:
    session, _ = _session()
    await session.subscribe(["patient:P"], None, 1)
    await session.take()
    for off in (1, 2, 2, 1, 3):
        session.push(_status(off))
    frames = await session.take()
    assert frames is not None and len(frames) == 3


def _alert(offset: int, patient: str) -> Event:
    return Event.new(ev.ALERTS_STREAM, offset, ev.ALERT, 1.0, {"patient_id": patient})


_SCENARIOS = {
    "coalescing": (
        dict(soft_queue=3, max_queue=100),
        [_reading(1), _reading(2), _reading(3), _reading(4, hr=61.0), _status(5)]
        + [_reading(6, hr=62.0), _reading(7, spo2=95.0), _reading(8, device="d2")]
        + [_reading(9, hr=63.0)],
    ),
    "overflow": (dict(soft_queue=5, max_queue=5), [_status(i) for i in range(1, 8)]),
    "repeats and alerts filtered": (
        dict(patient_filter=lambda pid: pid == "P"),
        [_status(1), _alert(1, "P"), _status(2), _status(2), _alert(2, "Q"), _status(1)]
        + [_alert(3, "P"), _status(3)],
    ),
}


@pytest.mark.parametrize("name", list(_SCENARIOS))
async def test_push_many_is_push_of_each_in_order(name: str) -> None:
    kw, events = _SCENARIOS[name]
    outcomes = []
    for many in (False, True):
        session, closed = _session(**kw)
        await session.subscribe(["patient:P", ev.ALERTS_STREAM], None, 1)
        await session.take()  # the subscribed reply
        if many:
            session.push_many(events[:4])  # in two commits
            session.push_many(events[4:])
        else:
            for e in events:
                session.push(e)
        outcomes.append((session.take_now(), session.coalesced, closed, session.overflowed))
    assert outcomes[0] == outcomes[1]
    assert outcomes[0][0] or outcomes[0][3]  # something was queued, or the client overflowed


@pytest.mark.parametrize("bad", [["nope"], ["patient:bad id"], []])
async def test_subscribe_validates_stream_names(bad: list[str]) -> None:
    from vitalwire.core.errors import InvalidMessage

    session, _ = _session()
    with pytest.raises(InvalidMessage) as err:
        await session.subscribe(bad, None, 1)
    assert err.value.field == "streams"


async def test_batching_client_gets_queued_events_in_one_frame_in_order() -> None:
    import json

    session, _ = _session()
    await session.subscribe(["patient:P"], None, 1, batch=True)
    await session.take()
    for off in (1, 2, 3):
        session.push(_status(off))
    frames = await session.take()
    assert frames is not None and len(frames) == 1
    batch = json.loads(frames[0])
    assert batch["type"] == "events" and [e["offset"] for e in batch["items"]] == [1, 2, 3]
    session.push(_status(4))  # a single event still goes as itself
    (single,) = await session.take() or []
    assert json.loads(single)["type"] == "event"


class _SnapshotStore:
    def __init__(self) -> None:
        self.writes: list[list[tuple[str, int, str]]] = []

    async def save_snapshots(self, rows: list[tuple[str, int, str]], now: float) -> None:
        self.writes.append(list(rows))


async def test_snapshots_are_written_in_bounded_slices_and_only_for_changed_streams() -> None:
    """The store has one writer that readings wait behind: a hospital's streams go in slices of
    SNAPSHOT_WRITE_ROWS, never all in one statement, and each changed stream exactly once."""
    from vitalwire.services import streams as streams_module

    store = _SnapshotStore()
    streams = Streams(store, MemoryBus())  # type: ignore[arg-type]
    bound = streams_module.SNAPSHOT_WRITE_ROWS
    count = 2 * bound + 7
    streams.on_events(
        [Event.new(f"patient:P{i}", 1, ev.READING, 1.0, {"hr": 60.0}) for i in range(count)]
    )
    assert await streams.save_snapshots(10.0) == count
    assert [len(w) for w in store.writes] == [bound, bound, 7]
    assert sorted(s for w in store.writes for s, _, _ in w) == sorted(
        f"patient:P{i}" for i in range(count)
    )
    store.writes.clear()
    assert await streams.save_snapshots(20.0) == 0 and store.writes == []  # nothing changed
    streams.on_events([Event.new("patient:P3", 2, ev.READING, 2.0, {"hr": 61.0})])
    assert await streams.save_snapshots(30.0) == 1
    assert store.writes == [[("patient:P3", 2, store.writes[0][0][2])]]


async def test_snapshot_shares_split_the_streams_and_a_round_saves_each_once() -> None:
    """The server saves one share of the streams every half second (container.SNAPSHOT_PARTS), not
    all of them at once: each share holds about 1/parts of the streams (by hash: no share as much
    as twice its part), and a whole round of shares saves every changed stream exactly once."""
    store = _SnapshotStore()
    streams = Streams(store, MemoryBus())  # type: ignore[arg-type]
    count, parts = 1000, 7
    streams.on_events(
        [Event.new(f"patient:P{i}", 1, ev.READING, 1.0, {"hr": 60.0}) for i in range(count)]
    )
    sizes = [await streams.save_snapshots(10.0, part, parts) for part in range(parts)]
    assert sum(sizes) == count and max(sizes) < 2 * count / parts
    saved = [s for w in store.writes for s, _, _ in w]
    assert sorted(saved) == sorted(f"patient:P{i}" for i in range(count))  # each once
    store.writes.clear()
    streams.on_events([Event.new("patient:P3", 2, ev.READING, 2.0, {"hr": 61.0})])
    assert [await streams.save_snapshots(20.0, part, parts) for part in range(parts)].count(1) == 1
    assert [s for w in store.writes for s, _, _ in w] == ["patient:P3"]
