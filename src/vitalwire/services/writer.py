"""The batch writer: group commit of readings and events, then fan-out, then acknowledgements.

How it works: producers ``submit`` units (reading rows + events + a callback) without awaiting. One
task takes whatever is pending, up to ``max_rows``, waiting at most ``max_wait_s`` for a batch to
fill, and writes it in **one transaction**. Only after the commit are the events published on the
bus and the callbacks (device acks) run, so nothing is shown or acknowledged before it is durable,
and an offset a client saw is never reassigned after a crash. While one commit runs, the next batch
accumulates: that is the group commit that keeps latency low under load. Under heavy load commits
start at least ``min_interval_s`` apart (a full batch excepted), so that a stream of tiny commits
does not spend the CPU on per-commit work (a store round trip, an ack per device, a frame per
client) that one larger commit does once.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections import deque
from collections.abc import Callable
from typing import Any

from vitalwire.bus import Bus
from vitalwire.store import AlertRow, AuditRow, Batch, CommandRow, Fenced, ReadingRow, Store
from vitalwire.wire import Event

log = logging.getLogger("vitalwire.writer")


_NONE: list[Any] = []  # shared, never appended to: a unit's absent rows


class _Unit:
    """What one ``submit`` hands over: rows to commit together, and what to run after."""

    __slots__ = ("readings", "events", "on_durable", "alerts", "audit", "commands", "rows")

    def __init__(
        self,
        readings: list[ReadingRow],
        events: list[Event],
        on_durable: Callable[[], None] | None,
        alerts: list[AlertRow],
        audit: list[AuditRow],
        commands: list[CommandRow],
    ) -> None:
        self.readings = readings
        self.events = events
        self.on_durable = on_durable
        self.alerts = alerts
        self.audit = audit
        self.commands = commands
        self.rows = len(readings) + len(events) + len(alerts) + len(audit) + len(commands)


def _time_out(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_exception(TimeoutError())


class BatchWriter:
    """One writer per process. ``max_rows`` and ``max_wait_s`` bound a batch's size and latency."""

    def __init__(
        self,
        store: Store,
        bus: Bus,
        *,
        max_rows: int = 500,
        max_wait_s: float = 0.005,
        min_interval_s: float = 0.0,
        settle: Callable[[list[Event], list[ReadingRow]], None] | None = None,
    ) -> None:
        self.store = store
        self.bus = bus
        #: Sees every unit's events and reading rows as they are submitted, in order, and keeps
        #: each stream's offsets dense (``Streams.settle``).
        self.settle = settle
        self.max_rows = max_rows
        self.max_wait_s = max_wait_s
        self.min_interval_s = min_interval_s
        self.commits = 0
        self._pending: deque[_Unit] = deque()
        self._pending_rows = 0
        self._wake = asyncio.Event()
        self._full = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        #: producers held back by ``wait_for_room``, oldest first: (their bound, their future)
        self._room_waiters: deque[tuple[int, asyncio.Future[None]]] = deque()
        self._loop: asyncio.AbstractEventLoop | None = None  # kept from start()
        #: True while commits fail (the batch is kept and retried); health reports it.
        self.failing = False
        self._task: asyncio.Task[None] | None = None
        self._stopping = False
        self.rows_written = 0
        #: called once per commit with its rows and seconds (services/metrics.py)
        self.on_commit: Callable[[int, float], None] | None = None
        #: Several nodes on one store (docs/architecture.md, "One writer per stream"): the
        #: (node, epoch) of this node's lease of a stream, or None for a stream written
        #: without one. Each batch then carries a fence the store checks in its transaction.
        self.lease_of: Callable[[str], tuple[str, int] | None] | None = None
        #: Called with the streams whose lease this node lost, when the store refused a batch
        #: for them: their units were dropped (not acknowledged, not shown; devices resend).
        self.on_fenced: Callable[[set[str]], None] | None = None
        #: Called with the reading rows of the units dropped that way (ingest forgets it took
        #: them, so that their devices' resends are taken again: Ingest.dropped).
        self.on_dropped: Callable[[list[ReadingRow]], None] | None = None
        self.fenced_units = 0
        #: Streams several nodes write, whose offsets the store assigns at the commit
        #: (``Batch.sequenced``): they are not published on the bus (every node reads them
        #: from the store in offset order: services/cluster.py).
        self.sequenced: frozenset[str] = frozenset()

    @property
    def pending_rows(self) -> int:
        return self._pending_rows

    def submit(
        self,
        readings: list[ReadingRow],
        events: list[Event],
        on_durable: Callable[[], None] | None = None,
        *,
        alerts: list[AlertRow] | None = None,
        audit: list[AuditRow] | None = None,
        commands: list[CommandRow] | None = None,
    ) -> None:
        """Queue rows for the next batch; ``on_durable`` runs after their commit."""
        if events and self.settle is not None:
            self.settle(events, readings)
        unit = _Unit(
            readings, events, on_durable, alerts or _NONE, audit or _NONE, commands or _NONE
        )
        self._pending.append(unit)
        self._pending_rows += unit.rows
        self._idle.clear()
        self._wake.set()
        if self._pending_rows >= self.max_rows:
            self._full.set()

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._task = self._loop.create_task(self._run(), name="vitalwire-writer")

    async def wait_for_room(self, max_pending_rows: int, timeout: float | None = None) -> None:
        """Backpressure: wait until at most ``max_pending_rows`` rows wait to be committed;
        TimeoutError after ``timeout`` seconds.

        Waiters are woken in arrival order, and only while there is room for them: a commit
        does not wake every held-back device at once (thousands, at hospital scale) only for
        most of them to wait again. (No ``asyncio.timeout``: it looks the loop up, a system
        call, and thousands of held-back devices come through here.)"""
        if self._pending_rows <= max_pending_rows:
            return
        loop = self._loop or asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        while self._pending_rows > max_pending_rows:
            waiter = loop.create_future()
            self._room_waiters.append((max_pending_rows, waiter))
            timer = None if deadline is None else loop.call_at(deadline, _time_out, waiter)
            try:
                await waiter
            except asyncio.CancelledError:
                if waiter.done() and not waiter.cancelled():
                    self._wake_room()  # pass the turn on
                raise
            finally:
                if timer is not None:
                    timer.cancel()

    def _wake_room(self) -> None:
        waiters = self._room_waiters
        while waiters:
            bound, waiter = waiters[0]
            if waiter.done():
                waiters.popleft()
                continue
            if self._pending_rows > bound:
                return
            waiters.popleft()
            waiter.set_result(None)

    async def commit(
        self,
        events: list[Event],
        *,
        alerts: list[AlertRow] | None = None,
        audit: list[AuditRow] | None = None,
        commands: list[CommandRow] | None = None,
    ) -> None:
        """Submit and wait until durable (for requests whose reply must follow the commit)."""
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.submit(
            [],
            events,
            lambda: done.done() or done.set_result(None),
            alerts=alerts,
            audit=audit,
            commands=commands,
        )
        await done

    async def flush(self) -> None:
        """Wait until everything submitted so far is committed and published."""
        while self._pending or not self._idle.is_set():
            await self._idle.wait()

    async def stop(self) -> None:
        """Flush, then stop the writer task."""
        await self.flush()
        self._stopping = True
        self._wake.set()
        if self._task is not None:
            await self._task
            self._task = None

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        started = -math.inf  # when the last commit started
        while True:
            await self._wake.wait()
            if self._stopping and not self._pending:
                return
            wait = 0.0
            if self._pending_rows < self.max_rows and not self._stopping:
                wait = max(self.max_wait_s, started + self.min_interval_s - loop.time())
            if wait > 0:
                try:
                    await asyncio.wait_for(self._full.wait(), wait)
                except TimeoutError:
                    pass
            started = loop.time()
            self.commits += 1
            units = self._take()
            if not self._pending:
                self._wake.clear()
                self._full.clear()
            await self._commit(units)
            if not self._pending:
                self._idle.set()

    def _take(self) -> list[_Unit]:
        units: list[_Unit] = []
        rows = 0
        while self._pending and (not units or rows + self._pending[0].rows <= self.max_rows):
            unit = self._pending.popleft()
            rows += unit.rows
            units.append(unit)
        self._pending_rows -= rows
        if self._pending_rows < self.max_rows:
            self._full.clear()
        return units

    def _batch(self, units: list[_Unit]) -> Batch:
        batch = Batch()
        for unit in units:
            batch.readings.extend(unit.readings)
            batch.events.extend(unit.events)
            batch.alerts.extend(unit.alerts)
            batch.audit.extend(unit.audit)
            batch.commands.extend(unit.commands)
        if self.lease_of is not None and batch.events:
            fence: dict[str, tuple[str, int, int, int]] = {}
            for e in batch.events:
                held = fence.get(e.stream)
                if held is not None:
                    fence[e.stream] = (held[0], held[1], held[2], e.offset)
                elif (lease := self.lease_of(e.stream)) is not None:
                    fence[e.stream] = (lease[0], lease[1], e.offset, e.offset)
            batch.fence = fence or None
        if self.sequenced:
            batch.sequenced = self.sequenced
        return batch

    async def _commit(self, units: list[_Unit]) -> None:
        batch = self._batch(units)
        delay = 0.05
        started = time.perf_counter()
        while True:
            try:
                await self.store.write_batch(batch)
                break
            except Fenced as exc:  # another node writes these streams now: drop their units
                kept = [u for u in units if not any(e.stream in exc.streams for e in u.events)]
                self.fenced_units += len(units) - len(kept)
                log.warning("lost the lease of %s: %d units dropped", exc, len(units) - len(kept))
                if self.on_dropped is not None:
                    gone = [r for u in units if u not in kept for r in u.readings]
                    if gone:
                        self.on_dropped(gone)
                if self.on_fenced is not None:
                    self.on_fenced(exc.streams)
                units = kept
                batch = self._batch(units)
                if not units:
                    break
            except Exception:  # keep the batch; nothing was acknowledged or shown
                self.failing = True
                log.exception("store write failed; retrying in %.2f s", delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 2.0)
        self.failing = False
        self.rows_written += len(batch)
        if self.on_commit is not None:
            self.on_commit(len(batch), time.perf_counter() - started)
        self._wake_room()
        if batch.events:
            if self.sequenced:
                await self.bus.publish([e for e in batch.events if e.stream not in self.sequenced])
            else:
                await self.bus.publish(batch.events)
        for unit in units:
            if unit.on_durable is not None:
                unit.on_durable()
