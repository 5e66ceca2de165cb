"""Patient streams: offsets, the live picture per stream, fan-out and race-free replay.

How offsets stay dense: :meth:`Streams.new_event` hands out the next offset once the event is
encoded, and the writer calls :meth:`Streams.settle` with every unit it is given: an event must
follow the last one submitted in its stream. When something failed between building a unit's
events and submitting them, the offsets those events took were never used; the next unit's
events then take them instead (renumbered, the unit's reading rows with them), so no failure in
one event, or one unit, leaves a gap in a stream.

How fan-out works: the bus delivers every committed event to :meth:`Streams.on_events` (one reader
per process). It folds the event into the stream's :class:`PatientState` and pushes the *same*
event object (whose frame is encoded once) to every local subscriber of that stream. ``push`` never
awaits: each subscriber has its own bounded queue and sender (see services/clients.py).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from typing import Any, Protocol

import msgspec

from vitalwire.bus import Bus
from vitalwire.core import events as ev
from vitalwire.core.state import PatientState
from vitalwire.store import ReadingRow, Store
from vitalwire.wire import Event

log = logging.getLogger("vitalwire.streams")

#: Events read from the store per query when a replay falls back to it.
STORE_PAGE = 5000
#: Events folded per stream at start-up after its saved snapshot (or, without one, its last ones).
STATE_WARMUP = 20_000
#: Stream snapshots written per statement (a few milliseconds of the store's writer each).
SNAPSHOT_WRITE_ROWS = 500


class Subscriber(Protocol):
    """Takes live events. One that also has ``push_many(events)`` (the same as ``push`` of each,
    in order) gets a commit's events for it in one call."""

    def push(self, event: Event) -> None: ...


class Streams:
    """Offsets, live state and local subscribers of every stream this process serves."""

    def __init__(self, store: Store, bus: Bus) -> None:
        self.store = store
        self.bus = bus
        self._assigned: dict[str, int] = {}  # last offset handed out (may be uncommitted)
        self._submitted: dict[str, int] = {}  # last offset handed to the writer
        self._states: dict[str, PatientState] = {}  # as of the last published event
        self._subs: dict[str, set[Subscriber]] = {}
        self._saved: dict[str, int] = {}  # offset of each stream's saved snapshot
        #: called after each published batch of events, whatever their streams (the edge's
        #: uplink wakes on it: services/uplink.py)
        self.taps: list[Any] = []
        #: Several nodes: the streams whose snapshots this node saves (the ones it writes; every
        #: node has every picture, one saves it). None: all.
        self.saves: Any = None

    async def load(self) -> None:
        """Read each stream's head; rebuild its live picture from the saved snapshot and the
        events after it (without a snapshot, from its last ``STATE_WARMUP`` events)."""
        self._assigned = await self.store.stream_heads()
        self._submitted = dict(self._assigned)
        saved = await self.store.load_snapshots()
        for stream, head in self._assigned.items():
            snap = saved.get(stream)
            if snap is not None and head - snap[0] <= STATE_WARMUP:
                state = PatientState.from_snapshot(snap[0], msgspec.json.decode(snap[1]))
                events = await self.store.events_after(stream, snap[0], STATE_WARMUP)
            else:
                state = PatientState()
                events = await self.store.recent_events(stream, STATE_WARMUP)
            for e in events:
                state.apply(e.offset, e.kind, e.ts, e.data)
            state.offset = head
            self._states[stream] = state
        self._saved = {s: o for s, (o, _) in saved.items()}

    async def save_snapshots(self, now: float, part: int = 0, parts: int = 1) -> int:
        """Save the picture of every stream that changed since its last save — or, with
        ``parts``, of the ``part``-th of ``parts`` shares of the streams (by the stream's hash).

        The server saves one share at a time, spread over the whole interval
        (``container.SNAPSHOT_PARTS``): a hospital's 10,000 pictures (7.4 MB of JSON, built and
        encoded here, then encoded again into the store's one-parameter insert) all came in the
        same second, and at hospital scale the event loop has only about a tenth of its time to
        spare, so that second's backlog put thousands of readings past 50 ms.

        Written ``SNAPSHOT_WRITE_ROWS`` streams at a time: the store has one writer, and the
        readings' commits wait behind whatever it is doing (all 10,000 streams of a hospital
        in one statement held them 50 ms). Each row stands alone (a stream's picture as of
        its offset), so a save cut short keeps the rows already written."""
        saved = 0
        rows: list[tuple[str, int, str]] = []
        # By the stream's hash (stable within the process), so a stream that ends or a new one
        # moves no other stream to another share.
        items = list(self._states.items())
        if self.saves is not None:
            items = [(s, st) for s, st in items if self.saves(s)]
        share = [(s, st) for s, st in items if hash(s) % parts == part] if parts > 1 else items
        for i, (s, st) in enumerate(share):
            if st.offset != self._saved.get(s):
                rows.append((s, st.offset, msgspec.json.encode(st.snapshot()).decode()))
            if len(rows) >= SNAPSHOT_WRITE_ROWS:
                saved += await self._save(rows, now)
                rows = []
            elif i % 200 == 199:
                await asyncio.sleep(0)  # let the fan-out run between slices
        return saved + await self._save(rows, now)

    async def _save(self, rows: list[tuple[str, int, str]], now: float) -> int:
        if rows:
            await self.store.save_snapshots(rows, now)
            for s, offset, _ in rows:
                self._saved[s] = offset
        return len(rows)

    def new_event(self, stream: str, kind: str, ts: float, data: dict[str, Any]) -> Event:
        """Create the next event of ``stream``; it must go to the writer, which commits in order.

        The event is encoded before its offset is taken: one that cannot be encoded raises here
        and leaves the stream's offsets as they were, so it can never leave a gap."""
        offset = self._assigned.get(stream, 0) + 1
        event = Event.new(stream, offset, kind, ts, data)
        self._assigned[stream] = offset
        return event

    def settle(self, events: list[Event], readings: list[ReadingRow]) -> None:
        """Called by the writer for each unit it is given, in order: make each event the one
        after the last submitted in its stream.

        Almost always a comparison per event. An event built but never submitted (an exception
        between building a unit and submitting it) leaves its offset unused: the events after it
        are renumbered into the gap, with the offsets of this unit's reading rows, and the
        stream's counter follows them. Safe because nothing has seen these offsets yet: events
        are published only after their commit."""
        done = self._submitted
        moved: dict[tuple[str, int], int] | None = None
        for e in events:
            want = done.get(e.stream, 0) + 1
            if e.offset != want:
                if moved is None:
                    moved = {}
                moved[(e.stream, e.offset)] = want
                e.offset = want
                e._frame = None  # encoded, if ever, with the old offset
            done[e.stream] = want
        if moved is not None:
            self._moved(moved, readings)

    def _moved(self, moved: dict[tuple[str, int], int], readings: list[ReadingRow]) -> None:
        for row in readings:
            if row.patient_id is not None and row.stream_offset is not None:
                new = moved.get((ev.patient_stream(row.patient_id), row.stream_offset))
                if new is not None:
                    row.stream_offset = new
        for stream in {s for s, _ in moved}:
            self._assigned[stream] = self._submitted[stream]
            log.error(
                "stream %s: offsets were taken by events that were never submitted; the next "
                "events took them (now at %d)",
                stream,
                self._submitted[stream],
            )

    def submitted_head(self, stream: str) -> int:
        """The offset of the last event of ``stream`` handed to the writer (committed, or
        about to be: the writer retries until it is)."""
        return self._submitted.get(stream, 0)

    async def take_over(self, stream: str, head: int) -> None:
        """This node now writes ``stream``, whose last committed offset is ``head`` (several
        nodes: services/cluster.py). The events up to ``head`` that this node has not seen yet
        (still on their way over the bus, or never published by a node that died) are read
        from the store and delivered first, in order; the next event written here is
        ``head + 1``."""
        have = self.head(stream)
        while have < head:
            page = await self.store.events_after(stream, have, min(STORE_PAGE, head - have))
            if not page:
                break
            self.bus.catch_up(page)
            have = max(page[-1].offset, self.head(stream))
        self._assigned[stream] = self._submitted[stream] = head

    async def fill(self, stream: str, after: int, upto: int) -> list[Event] | None:
        """Committed events ``after < offset <= upto`` from the store (the bus's gaps)."""
        out: list[Event] = []
        cursor = after
        while cursor < upto:
            page = await self.store.events_after(stream, cursor, min(STORE_PAGE, upto - cursor))
            if not page or page[0].offset != cursor + 1:
                return None
            out.extend(page)
            cursor = page[-1].offset
        return out

    def take_mirrored(self, stream: str, last: int) -> None:
        """A cloud takes an edge's events of ``stream`` up to offset ``last``, with the edge's
        own offsets (services/edges.py): the next events it hands the writer carry them.

        Raises ``ValueError`` if this node has events of the stream of its own in flight (a
        mirrored stream is written by its edge alone)."""
        if self._assigned.get(stream, 0) != self._submitted.get(stream, 0):
            raise ValueError(f"stream {stream} has events of this node in flight")
        self._assigned[stream] = last

    def patient_streams(self) -> list[str]:
        """Every patient stream with an event."""
        return [s for s in self._states if s.startswith(ev.PATIENT_PREFIX)]

    def online_devices(self) -> list[tuple[str, str]]:
        """(patient id, device id) of every device whose last status says online."""
        out = []
        for stream, state in self._states.items():
            pid = ev.stream_patient(stream)
            if pid is None:
                continue
            for did, status in state.devices.items():
                if status.get("status") == "online":
                    out.append((pid, did))
        return out

    def picture(self, stream: str) -> PatientState | None:
        """The live picture of ``stream`` as of its last published event (None: no event yet);
        what ``/ws`` sends as a subscription's snapshot. Read it, never change it."""
        return self._states.get(stream)

    def head(self, stream: str) -> int:
        """The offset of the last published event of ``stream`` (0 if none)."""
        state = self._states.get(stream)
        return state.offset if state else 0

    def on_events(self, events: Sequence[Event]) -> None:
        """The bus listener: fold and fan out committed events.

        Each subscriber gets the events of the call meant for it in one ``push_many``, in
        order (a client watching 100 patients takes a commit's events in one call, not one
        call per event).
        """
        states = self._states
        subs_of = self._subs
        mine: dict[Subscriber, list[Event]] = {}
        for e in events:
            state = states.get(e.stream)
            if state is None:
                state = states[e.stream] = PatientState()
            state.apply(e.offset, e.kind, e.ts, e.data)
            subs = subs_of.get(e.stream)
            if subs:
                for sub in subs:
                    batch = mine.get(sub)
                    if batch is None:
                        mine[sub] = [e]
                    else:
                        batch.append(e)
        for sub, batch in mine.items():
            push_many = getattr(sub, "push_many", None)
            if push_many is not None:
                push_many(batch)
            else:
                for e in batch:
                    sub.push(e)
        for tap in self.taps:
            tap(events)
        for e in events:
            e.shed()  # what the bus history keeps of it: the JSON and the frame

    def attach(self, stream: str, sub: Subscriber) -> tuple[int, dict[str, Any]]:
        """Register ``sub`` for live events and return the (offset, snapshot) it starts from.

        Synchronous on purpose: no event can be published between reading the snapshot and
        registering, so the first live event ``sub`` receives is the one after ``offset``.
        """
        self._subs.setdefault(stream, set()).add(sub)
        state = self._states.get(stream)
        if state is None:
            return 0, PatientState().snapshot()
        return state.offset, state.snapshot()

    def detach(self, stream: str, sub: Subscriber) -> None:
        subs = self._subs.get(stream)
        if subs is not None:
            subs.discard(sub)
            if not subs:
                del self._subs[stream]

    def subscriber_count(self) -> int:
        return sum(len(s) for s in self._subs.values())

    async def replay(self, stream: str, after: int, upto: int) -> list[Event] | None:
        """Events with ``after < offset <= upto``: bus history first, then the store.

        Returns ``None`` when they can no longer be replayed (older than retention).
        """
        if after >= upto:
            return []
        recent = await self.bus.history(stream, after)
        if recent is not None:
            return [e for e in recent if e.offset <= upto]
        out: list[Event] = []
        cursor = after
        while cursor < upto:
            page = await self.store.events_after(stream, cursor, min(STORE_PAGE, upto - cursor))
            if not out and (not page or page[0].offset > after + 1):
                return None  # offsets are dense: a missing first one was pruned by retention
            if not page:
                break
            out.extend(page)
            cursor = page[-1].offset
        return out
