"""A client (clinician app, dashboard, ``vitalwire watch``) connection, independent of transport.

How the send path works: the fan-out calls :meth:`ClientSession.push` without awaiting. Frames go
into two queues: ``_control`` (replies, snapshots, replayed events) first, then ``_live`` (live
events). The transport drains them with :meth:`ClientSession.take_now` from a sender task it starts
when :attr:`ClientSession.notify` tells it frames wait (so an idle connection has no sender task);
:meth:`ClientSession.take` waits for frames instead. A stream's ``subscribed`` reply and replay are
queued before any of its live events can be, so per-stream order holds.

Slow consumers: while ``_live`` holds more than ``soft_queue`` frames, a new reading replaces the
queued reading of the same patient with the same set of metrics (it carries newer values of each),
moving to the back of the queue so per-stream order holds. Alert, command and status events are
never coalesced. Past ``max_queue`` frames the client is closed with the slow-consumer code
(4008) and resumes from its last offset; memory per client stays bounded either way.

Resume is race-free: on subscribe the session first registers for live events (which it *holds*),
then replays from the bus history or the store up to the offset it registered at, then releases
the held events, dropping any at or below the last offset sent. Nothing is missed at the seam and
nothing is sent twice.

Access can end while the session is open (services/access.py re-checks every session when it
changes): :meth:`ClientSession.end_streams` stops subscriptions whose right ended and drops what of
them is still queued, :meth:`ClientSession.revoke` ends the session. The live queue holds encoded
frames without their stream; an event frame starts with its stream (the codec writes ``type`` then
``stream``), so those rare purges find a stream's frames by that prefix and the fan-out does no
extra work per event.

Flat subscriptions (``subscribe`` with ``format``, for the seed's minimal clients): the stream's
subscriber is then a :class:`FlatView`, not the session, so the fan-out to every other client is
unchanged. The view keeps the latest value of each of its metrics and, when a reading changes one,
queues the flat frame (``{"oxygen_level":97,"heart_rate":72}``) under one key of the live queue:
a newer frame replaces one not yet sent, so a slow flat client holds at most one frame.
"""

from __future__ import annotations

import asyncio
import itertools
from collections import OrderedDict, deque
from collections.abc import Callable, Hashable
from typing import Any

import msgspec

from vitalwire.core import events as ev
from vitalwire.core.errors import InvalidMessage, PeerError
from vitalwire.services.auth import Principal
from vitalwire.services.streams import Streams
from vitalwire.wire import (
    FORMATS,
    Close,
    Event,
    EventFrame,
    StreamStart,
    Subscribed,
    Unsubscribed,
    check_format,
    encode_flat,
    encode_text,
)

#: The live-queue key of a flat subscription's frame (other keys are ints or coalesce tuples).
FLAT_KEY = "flat"


def frame_prefix(stream: str) -> str:
    """How every encoded event frame of ``stream`` starts (the codec's own output, cut before
    the offset): ``{"type":"event","stream":"patient:P001",``."""
    frame = encode_text(EventFrame(stream, 0, "", 0.0, msgspec.Raw(b"0")))
    return frame[: frame.index('"offset":')]


class ClientSession:
    """Subscriptions and the bounded outgoing queues of one client connection."""

    #: this process's slow-consumer closes and frames handed to sockets, all sessions (/metrics)
    slow_consumer_closes = 0
    frames_sent = 0

    #: Counted in the per-user limit of ``/ws`` connections (a GraphQL subscription is not).
    counts_as_connection = True

    __slots__ = (
        "principal",
        "streams",
        "max_queue",
        "soft_queue",
        "max_streams",
        "max_replay",
        "on_overflow",
        "authorize",
        "patient_filter",
        "audit",
        "clock",
        "_watch_since",
        "_last",
        "_holding",
        "_control",
        "_live",
        "_keys",
        "_wake",
        "closed",
        "overflowed",
        "coalesced",
        "batch_events",
        "notify",
        "shut",
        "on_revoked",
        "origin",
        "flat",
    )

    def __init__(
        self,
        principal: Principal,
        streams: Streams,
        *,
        max_queue: int = 5000,
        soft_queue: int = 1000,
        max_streams: int = 200,
        max_replay: int = 50_000,
        on_overflow: Callable[[int, str], None] | None = None,
        authorize: Callable[[str], None] | None = None,
        patient_filter: Callable[[str], bool] | None = None,
        audit: Callable[[str, str | None, dict[str, Any]], None] | None = None,
        clock: Callable[[], float] | None = None,
    ) -> None:
        self.principal = principal
        self.streams = streams
        self.max_queue = max_queue
        self.soft_queue = min(soft_queue, max_queue)
        self.max_streams = max_streams
        self.max_replay = max_replay
        self.on_overflow = on_overflow
        #: Raises Forbidden/NotFound for a stream this client may not watch (access control).
        self.authorize = authorize or (lambda stream: None)
        #: Which patients' alerts this client may see on the ``alerts`` stream.
        self.patient_filter = patient_filter
        self.audit = audit
        self.clock = clock
        self._watch_since: dict[str, float] = {}
        self._last: dict[str, int] = {}  # last offset queued per subscribed stream
        self._holding: dict[str, list[Event]] = {}
        self._control: deque[str] = deque()
        self._live: OrderedDict[Hashable, str] = OrderedDict()
        self._keys = itertools.count()
        self._wake: asyncio.Event | None = None  # made by the first take() that has to wait
        self.closed = False
        self.overflowed = False
        self.coalesced = 0
        #: Set by a subscribe with ``batch``: live events queued together go in one frame.
        self.batch_events = False
        #: Set by the transport: called (never awaited) each time frames are queued.
        self.notify: Callable[[], None] | None = None
        #: Set by the transport: send what is queued, then close the connection with a code.
        self.shut: Callable[[int, str], None] | None = None
        #: Set by the transport: the user may no longer use this connection (why): tell the
        #: client and close.
        self.on_revoked: Callable[[PeerError], None] | None = None
        #: Where the client connects from (for the audit log).
        self.origin: str | None = None
        #: The connection's flat subscription (``subscribe`` with ``format``), if it has one.
        self.flat: FlatView | None = None

    # -- fan-out side (never awaits) ------------------------------------------------------------

    def push(self, event: Event) -> None:
        self.push_many([event])

    def push_many(self, events: list[Event]) -> None:
        """:meth:`push` each of ``events``, in order, with one wake-up of the sender at the end
        (the fan-out path: one call per client and commit)."""
        alerts_filter = self.patient_filter
        holding = self._holding
        last_of = self._last
        live = self._live
        max_queue = self.max_queue
        soft_queue = self.soft_queue
        queued = False
        for event in events:
            stream = event.stream
            if (
                alerts_filter is not None
                and stream == ev.ALERTS_STREAM
                and not alerts_filter(event.data.get("patient_id", ""))
            ):
                continue
            held = holding.get(stream)
            if held is not None:
                held.append(event)
                continue
            last = last_of.get(stream)
            if last is None or event.offset <= last or self.closed:
                continue
            last_of[stream] = event.offset
            n = len(live)
            if n >= max_queue:
                self._overflow()
                return
            if n >= soft_queue and event.kind == ev.READING:
                key: Hashable = event.coalesce_key
                if live.pop(key, None) is not None:
                    self.coalesced += 1
            else:
                key = next(self._keys)
            live[key] = event.frame
            queued = True
        if queued:
            self._queued()

    def push_direct(self, event: Event) -> None:
        """An event this client asked for (its command's status), subscribed or not. When the
        client watches the stream the event arrives there; otherwise it comes as a reply."""
        if event.stream in self._last or event.stream in self._holding:
            return
        try:
            self.authorize(event.stream)
        except PeerError:
            return  # the right to watch the patient ended since the command was sent
        self.send(event.frame)

    def push_flat(self, frame: str) -> None:
        """Queue a flat subscription's frame, replacing one still queued (latest values only)."""
        if self.closed:
            return
        live = self._live
        live.pop(FLAT_KEY, None)
        live[FLAT_KEY] = frame
        self._queued()

    def send(self, frame: str) -> None:
        """Queue a reply or control frame."""
        if self.closed:
            return
        self._control.append(frame)
        self._queued()

    def _queued(self) -> None:
        if self.notify is not None:
            self.notify()
        if self._wake is not None:
            self._wake.set()

    def _overflow(self) -> None:
        if self.overflowed:
            return
        self.overflowed = True
        ClientSession.slow_consumer_closes += 1
        self.close()
        self._live.clear()
        self._control.clear()
        if self.on_overflow is not None:
            self.on_overflow(
                Close.SLOW_CONSUMER, "slow consumer: send queue full, resume by offset"
            )

    # -- sender side ----------------------------------------------------------------------------

    async def take(self) -> list[str] | None:
        """Wait for frames to send; ``None`` once the session is closed."""
        while not self._control and not self._live:
            if self.closed or self.overflowed:
                return None
            if self._wake is None:
                self._wake = asyncio.Event()
            self._wake.clear()
            await self._wake.wait()
        return self.take_now()

    def take_now(self) -> list[str]:
        """Every frame queued, in sending order (empty when none is)."""
        out = list(self._control)
        self._control.clear()
        live = self._live
        if live:
            if self.batch_events and len(live) > 1:
                # the frames are already encoded: joining them costs no re-encoding
                out.append('{"type":"events","items":[' + ",".join(live.values()) + "]}")
            else:
                out.extend(live.values())
            live.clear()
        ClientSession.frames_sent += len(out)
        return out

    @property
    def queued(self) -> int:
        return len(self._control) + len(self._live)

    # -- requests -----------------------------------------------------------------------------

    async def subscribe(
        self,
        streams: list[str],
        since: dict[str, int] | None,
        req_id: int | None,
        batch: bool = False,
        fmt: str | None = None,
    ) -> None:
        """Subscribe to ``streams``; queue the ``subscribed`` reply, the replay, then go live.

        With ``fmt`` (a flat format): see :meth:`subscribe_flat`."""
        if fmt is not None:
            self.subscribe_flat(streams, since, req_id, batch, fmt)
            return
        if self.flat is not None:
            raise InvalidMessage(
                f"this connection watches {self.flat.stream} with format {self.flat.fmt!r}, "
                "which needs a connection of its own: unsubscribe it first",
                field="format",
            )
        names = list(dict.fromkeys(ev.check_stream(s) for s in streams))
        if batch:
            self.batch_events = True
        if not names:
            raise InvalidMessage("streams must name at least one stream", field="streams")
        since = since or {}
        for s in since:
            if s not in names:
                raise InvalidMessage(f"since names {s!r}, which is not in streams", field="since")
        self._authorize_all(names)
        new = [s for s in names if s not in self._last]
        if len(self._last) + len(new) > self.max_streams:
            raise InvalidMessage(
                f"streams per connection must be at most {self.max_streams}, "
                f"got {len(self._last) + len(new)}",
                field="streams",
            )
        starts: list[tuple[str, int, dict[str, Any]]] = []
        for s in names:
            self._holding[s] = []
            self.streams.detach(s, self)
            offset, snapshot = self.streams.attach(s, self)
            starts.append((s, offset, snapshot))
        replays: dict[str, list[Event] | None] = {}
        try:
            for s, offset, _ in starts:
                after = since.get(s)
                if after is None:
                    replays[s] = []
                elif after < 0 or after > offset or offset - after > self.max_replay:
                    replays[s] = None
                else:
                    replays[s] = await self.streams.replay(s, after, offset)
            self._authorize_all(names)  # access may have changed while the replay was read
        except BaseException:
            for s, _, _ in starts:
                self._holding.pop(s, None)
                self.streams.detach(s, self)
                self._last.pop(s, None)
            raise
        reply = Subscribed(streams=[], id=req_id)
        frames: list[str] = []
        for s, offset, snapshot in starts:
            replay = replays[s]
            if s == ev.ALERTS_STREAM and self.patient_filter is not None:
                allowed = self.patient_filter
                snapshot["alerts"] = [
                    a for a in snapshot["alerts"] if allowed(a.get("patient_id", ""))
                ]
                replay = (
                    None
                    if replay is None
                    else [e for e in replay if allowed(e.data.get("patient_id", ""))]
                )
            self._watching(s)
            reply.streams.append(
                StreamStart(s, offset, replay is not None, snapshot, len(replay or ()))
            )
            last = offset
            for e in replay or ():
                frames.append(e.replay_frame())
                last = e.offset
            self._last[s] = last
        self.send(encode_text(reply))
        self._control.extend(frames)
        for s, _, _ in starts:
            for e in self._holding.pop(s):
                self.push(e)

    def subscribe_flat(
        self,
        streams: list[str],
        since: dict[str, int] | None,
        req_id: int | None,
        batch: bool,
        fmt: str,
    ) -> None:
        """Watch one patient stream as flat frames of ``fmt``: the ``subscribed`` reply (as
        usual), the current values at once, then a frame each time a reading changes one.

        No offsets: ``since`` and ``batch`` are refused, and the connection may hold no other
        subscription. Subscribing again restarts it (the current values again)."""
        check_format("format", fmt)
        names = list(dict.fromkeys(ev.check_stream(s) for s in streams))
        if len(names) != 1 or ev.stream_patient(names[0]) is None:
            raise InvalidMessage(
                f"streams must name exactly one patient stream with format {fmt!r}, "
                f"got {', '.join(names) or 'none'}",
                field="streams",
            )
        if since:
            raise InvalidMessage(
                f"since cannot be used with format {fmt!r}: it has no offsets (it starts "
                "from the current values)",
                field="since",
            )
        if batch:
            raise InvalidMessage(f"batch cannot be used with format {fmt!r}", field="batch")
        stream = names[0]
        others = sorted(s for s in self._last if s != stream)
        if others:
            raise InvalidMessage(
                f"format {fmt!r} needs a connection of its own: unsubscribe "
                f"{', '.join(others)} first",
                field="format",
            )
        self.authorize(stream)
        self._detach(stream)
        view = FlatView(self, stream, fmt)
        offset, snapshot = self.streams.attach(stream, view)
        view.start(snapshot)
        self.flat = view
        self._watching(stream)
        self._last[stream] = offset
        self.send(
            encode_text(
                Subscribed(streams=[StreamStart(stream, offset, True, snapshot, 0)], id=req_id)
            )
        )
        self.push_flat(view.frame())

    def _detach(self, stream: str) -> None:
        self.streams.detach(stream, self)
        flat = self.flat
        if flat is not None and flat.stream == stream:
            self.streams.detach(stream, flat)
            self.flat = None
            self._live.pop(FLAT_KEY, None)

    def _authorize_all(self, streams: list[str]) -> None:
        for s in streams:
            self.authorize(s)

    def unsubscribe(self, streams: list[str]) -> list[str]:
        gone = []
        for s in streams:
            if s in self._last:
                self._detach(s)
                del self._last[s]
                self._unwatched(s)
                gone.append(s)
        return gone

    def _watching(self, stream: str) -> None:
        pid = ev.stream_patient(stream)
        if pid is None or stream in self._watch_since or self.clock is None:
            return
        self._watch_since[stream] = self.clock()
        if self.audit is not None:
            self.audit("subscribe", pid, {"stream": stream})

    def _unwatched(self, stream: str, reason: str | None = None) -> None:
        since = self._watch_since.pop(stream, None)
        pid = ev.stream_patient(stream)
        if since is None or pid is None or self.clock is None or self.audit is None:
            return
        detail: dict[str, Any] = {
            "stream": stream,
            "since": since,
            "watched_s": round(self.clock() - since, 3),
        }
        if reason is not None:
            detail["reason"] = reason
        self.audit("unsubscribe", pid, detail)

    # -- access taken back ----------------------------------------------------------------------

    def reauthorize(
        self,
        principal: Principal,
        authorize: Callable[[str], None],
        patient_filter: Callable[[str], bool] | None,
    ) -> None:
        """The user as they are now (a new role, a renewed token): every later check uses it."""
        self.principal = principal
        self.authorize = authorize
        self.patient_filter = patient_filter

    def end_streams(self, lost: dict[str, str]) -> None:
        """The right to watch these streams ended (stream -> why): stop them now, drop every
        frame of theirs still queued (live events, replays, command statuses), and tell the
        client with one ``unsubscribed`` per reason. Nothing of them is sent after this call."""
        for stream, reason in lost.items():
            if self._last.pop(stream, None) is not None:
                self._detach(stream)
                self._unwatched(stream, reason)
        prefixes = tuple(frame_prefix(stream) for stream in lost)
        self._drop(lambda frame: frame.startswith(prefixes))
        by_reason: dict[str, list[str]] = {}
        for stream, reason in lost.items():
            by_reason.setdefault(reason, []).append(stream)
        for reason, streams in by_reason.items():
            self.send(encode_text(Unsubscribed(streams, "forbidden", reason)))

    def purge_alerts(self) -> None:
        """Drop queued ``alerts`` events of patients this client may no longer see (the stream
        is filtered when an event is queued; this covers those queued before the change)."""
        allowed = self.patient_filter
        if allowed is None or ev.ALERTS_STREAM not in self._last:
            return
        prefix = frame_prefix(ev.ALERTS_STREAM)

        def forbidden(frame: str) -> bool:
            if not frame.startswith(prefix):
                return False
            data = msgspec.json.decode(frame).get("data") or {}
            return not allowed(data.get("patient_id", ""))

        self._drop(forbidden)

    def revoke(self, exc: PeerError) -> None:
        """The user may no longer use this connection (disabled, deleted, tokens revoked): drop
        everything queued, then the transport sends why and closes."""
        self._live.clear()
        self._control.clear()
        if self.on_revoked is not None:
            self.on_revoked(exc)
        else:
            self.close()

    def _drop(self, unwanted: Callable[[str], bool]) -> None:
        live = self._live
        for key in [k for k, frame in live.items() if unwanted(frame)]:
            del live[key]
        if any(unwanted(frame) for frame in self._control):
            self._control = deque(f for f in self._control if not unwanted(f))

    @property
    def subscriptions(self) -> list[str]:
        return sorted(self._last)

    def close(self) -> None:
        """Detach from every stream; the sender stops."""
        for s in list(self._last):
            self._detach(s)
            self._unwatched(s)
        self._last.clear()
        self.closed = True
        if self._wake is not None:
            self._wake.set()


class FlatView:
    """A flat subscription's subscriber (:meth:`ClientSession.subscribe_flat`): the latest value
    of each metric of its format, and the flat frame when a reading changes one."""

    __slots__ = ("session", "stream", "fmt", "metrics", "values")

    def __init__(self, session: ClientSession, stream: str, fmt: str) -> None:
        self.session = session
        self.stream = stream
        self.fmt = fmt
        self.metrics = tuple(name for _, name, _ in FORMATS[fmt])
        self.values: dict[str, float | None] = dict.fromkeys(self.metrics)

    def start(self, snapshot: dict[str, Any]) -> None:
        vitals = snapshot.get("vitals") or {}
        for name in self.metrics:
            entry = vitals.get(name)
            self.values[name] = None if entry is None else entry.get("value")

    def frame(self) -> str:
        return encode_flat(self.fmt, self.values)

    def push(self, event: Event) -> None:
        self.push_many([event])

    def push_many(self, events: list[Event]) -> None:
        values = self.values
        changed = False
        for event in events:
            if event.kind != ev.READING or event.stream != self.stream:
                continue
            data = event.data
            for name in self.metrics:
                value = data.get(name)
                if value is not None and value != values[name]:
                    values[name] = value
                    changed = True
        if changed:
            self.session.push_flat(self.frame())
