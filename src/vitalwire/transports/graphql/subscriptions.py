"""Subscriptions: a patient's stream and the ward's alerts, fed by the same streams as ``/ws``.

Each subscription is a :class:`~vitalwire.services.clients.ClientSession` of its own, so it gets
the socket's guarantees unchanged: it registers for live events (held), replays from the bus
history or the store after the ``after`` offset asked for, then releases the held events,
dropping any at or below the last offset sent (nothing lost at the seam, nothing doubled); its
queue is bounded with the same slow-consumer policy; and it sits in ``svc.clients``, so the
access-change hook (``Access.recheck``) ends it the moment its user's access is taken back
(token revoked, user disabled or deleted, role changed, patient taken off the care team).
Each event is also checked against the access as it is now before it is handed out.

One subscription may watch several patients (``patientsEvents``): one session, one queue and one
task for all of them, as one ``/ws`` client, each stream resumed from its own offset.

The fast path (:class:`FastFrames`): over graphql-transport-ws, a subscription selecting only
``StreamEvent``'s plain fields does not run GraphQL per event; its ``next`` frame is built from
the event frame ``/ws`` sends (encoded once per event) and written to the socket by the same
:class:`~vitalwire.transports.common.Sender` that serves ``/ws`` (woken by the session's queue,
no task per batch). Everything before the write (the session, its checks, the queue, the errors
that end it: :class:`_Watch`) is the same code for both paths.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, Callable
from contextvars import ContextVar
from typing import TYPE_CHECKING, Any, Final

import msgspec
from graphql.language import FieldNode
from strawberry.subscriptions.protocols.graphql_transport_ws.handlers import (
    BaseGraphQLTransportWSHandler,
    Operation,
)

from vitalwire.core import access as policy
from vitalwire.core import events as ev
from vitalwire.core.errors import Forbidden, InvalidMessage, PeerError
from vitalwire.services.clients import ClientSession
from vitalwire.transports.common import Sender, Socket

if TYPE_CHECKING:
    from strawberry.types import Info

    from vitalwire.services.auth import Principal
    from vitalwire.services.container import Services


class GraphQLSubscription(ClientSession):
    """A :class:`ClientSession` serving one GraphQL subscription (so what counts a user's
    ``/ws`` connections in ``svc.clients`` can tell it apart)."""

    __slots__ = ()
    counts_as_connection = False


class SlowConsumer(PeerError):
    """The subscriber did not take its events fast enough; resume with ``after``."""


class _Watch:
    """One subscription's session over ``streams`` and the checks every batch of its frames
    passes, shared by both paths (:func:`stream_events` and :func:`fast_events`)."""

    def __init__(
        self,
        svc: Services,
        who: Principal,
        streams: list[str],
        after: dict[str, int] | None,
        origin: str | None,
    ) -> None:
        s = svc.settings
        self.svc = svc
        self.who = who = svc.access.current_now(who)
        self.streams = streams
        self.after = after
        self.origin = origin
        #: Why it ended (the first reason), set by the session's callbacks.
        self.ended: list[PeerError] = []
        #: Called (never awaited) when the session ends by itself (revoked, overflowed).
        self.on_end: Callable[[], None] | None = None

        def audit(action: str, pid: str | None, detail: dict[str, Any]) -> None:
            svc.access.audit(who.name, action, pid, detail, origin)

        def on_overflow(code: int, reason: str) -> None:
            self.ended.append(SlowConsumer(reason, field="after"))
            if self.on_end is not None:
                self.on_end()

        self.session = session = GraphQLSubscription(
            who,
            svc.streams,
            authorize=svc.access.stream_check(who),
            patient_filter=svc.access.patient_filter(who),
            audit=audit,
            clock=svc.clock,
            max_queue=s.client_queue_max,
            soft_queue=s.client_queue_soft,
            max_streams=len(streams),
            max_replay=s.max_replay,
            on_overflow=on_overflow,
        )

        def revoked(exc: PeerError) -> None:
            self.ended.append(exc)
            session.close()
            if self.on_end is not None:
                self.on_end()

        session.on_revoked = revoked
        session.origin = origin
        # the patient of an event frame, from the stream's encoded name right after EVENT_HEAD
        self.pids = {_encode(st).decode(): ev.stream_patient(st) for st in streams}
        self.only = ev.stream_patient(streams[0]) if len(streams) == 1 else None

    async def open(self) -> None:
        """Register the session and subscribe (the reply and any replay are queued)."""
        self.svc.clients.add(self.session)
        try:
            await self.session.subscribe(self.streams, self.after or None, None)
        except Forbidden as exc:
            self.svc.access.refused(self.who.name, "subscribe", self.only, exc.message, self.origin)
            raise

    def close(self) -> None:
        self.session.close()
        self.svc.clients.discard(self.session)

    def sort(self, frames: list[str]) -> tuple[list[str], PeerError | None]:
        """The event frames of ``frames`` to hand out, in order, and why the subscription must
        end after them (``None`` while it goes on): the access as it is now is checked at every
        event (the hook ends it too), and the control frames are read (a resume that could not
        be honoured, an ``unsubscribed``)."""
        svc = self.svc
        ready: list[str] = []
        single = len(self.streams) == 1
        for frame in frames:
            if frame.startswith(EVENT_HEAD):
                if single:
                    pid = self.only
                else:
                    key = frame[_STREAM_AT : frame.index(',"offset":', _STREAM_AT)]
                    pids = self.pids
                    pid = pids[key] if key in pids else ev.stream_patient(_decode_str(key))
                if pid is not None:
                    now_who = svc.access.current_now(self.session.principal)
                    if not svc.access.allowed(now_who, policy.VIEW, pid):
                        why = svc.access.view_lost(now_who, pid, self.who.role) or "access ended"
                        return ready, Forbidden(why, field="patient_id")
                ready.append(frame)
                continue
            msg = msgspec.json.decode(frame)
            kind = msg.get("type")
            if kind == "subscribed":
                for start in msg["streams"]:
                    if not start["recovered"]:
                        which = "" if single else f" of {start['stream']}"
                        return ready, InvalidMessage(
                            f"after{which} must be an offset between the oldest kept and "
                            f"the head ({start['offset']}), at most {svc.settings.max_replay} "
                            "behind it",
                            field="after",
                        )
            elif kind == "unsubscribed":
                return ready, Forbidden(msg.get("reason") or "access ended", field="patient_id")
        return ready, None


async def stream_events(
    svc: Services,
    who: Principal,
    streams: list[str],
    after: dict[str, int] | None,
    origin: str | None,
) -> AsyncGenerator[list[str], None]:
    """The events of ``streams`` with offsets after ``after[stream]`` (from now for a stream
    without one), then live, each as its encoded ``/ws`` event frame
    (``{"type":"event","stream":..,"offset":..,"kind":..,"ts":..,"data":..}``, encoded once per
    event for every subscriber), in lists of those queued together. Ends with an error naming
    why when the right to watch ends (``Unauthenticated`` or ``Forbidden``) or the queue
    overflows."""
    watch = _Watch(svc, who, streams, after, origin)
    try:
        await watch.open()
        while True:
            frames = await watch.session.take()
            if frames is None:
                if watch.ended:
                    raise watch.ended[0]
                return
            ready, error = watch.sort(frames)
            if ready:
                yield ready  # those before it, then why it ends
            if error is not None:
                raise error
    finally:
        watch.close()


async def fast_events(
    svc: Services,
    who: Principal,
    streams: list[str],
    after: dict[str, int] | None,
    origin: str | None,
    fast: FastFrames,
) -> None:
    """:func:`stream_events` for the fast path, driven as ``/ws`` drives a client: the session's
    queue wakes a :class:`~vitalwire.transports.common.Sender` (one callback per turn of the
    event loop, no task while the socket takes the frames), which writes the ``next`` frames
    built by ``fast``. Returns when the operation completes; raises why it ended otherwise."""
    loop = asyncio.get_running_loop()
    finished: asyncio.Future[PeerError | None] = loop.create_future()
    watch = _Watch(svc, who, streams, after, origin)

    def end(error: PeerError | None) -> None:
        if not finished.done():
            finished.set_result(error)

    def take() -> list[str]:
        if finished.done():
            return []
        if fast.operation.completed:
            end(None)
            return []
        ready, error = watch.sort(watch.session.take_now())
        if error is not None:
            loop.call_soon(end, error)  # after the frames before it are written
        if not ready:
            return []
        FastFrames.sent += len(ready)
        return [fast.build(frame) for frame in ready]

    sender = Sender(fast.socket, take)
    watch.on_end = lambda: end(watch.ended[0] if watch.ended else None)
    watch.session.notify = sender.kick
    try:
        await watch.open()
        sender.kick()  # the reply and any replay queued by the subscribe
        error = await finished
        if error is not None:
            raise error
    finally:
        sender.stop()
        watch.close()


# -- the fast path --------------------------------------------------------------------------------

#: How every encoded event frame starts (wire.EventFrame: its tag first, then the stream).
EVENT_HEAD: Final = '{"type":"event",'
_STREAM_AT: Final = len(EVENT_HEAD) + len('"stream":')
#: The fields of ``StreamEvent`` in the order of the event frame (and of the type).
EVENT_FIELDS: Final = ("stream", "offset", "kind", "ts", "data")
_TYPENAME: Final = '"StreamEvent"'
_encode = msgspec.json.encode
_decode_str = msgspec.json.Decoder(str).decode


class _Parts(msgspec.Struct):
    """An event frame's fields, ``data`` left encoded."""

    stream: str
    offset: int
    kind: str
    ts: float
    data: msgspec.Raw


_parts = msgspec.json.Decoder(_Parts)

#: Where transports/graphql/router.py leaves the socket in the ASGI scope.
SOCKET_KEY: Final = "vitalwire.socket"
#: Where the socket's graphql-transport-ws handler is left in the context.
HANDLER_KEY: Final = "vitalwire.handler"

#: The operation of the running graphql-transport-ws task (set by :class:`TransportWSHandler`).
_OPERATION: ContextVar[Operation[Any, Any] | None] = ContextVar("vitalwire_gql_op", default=None)


class TransportWSHandler(BaseGraphQLTransportWSHandler[Any, Any]):
    """Strawberry's graphql-transport-ws handler, telling each operation's resolvers which
    operation they serve (so a subscription can write its ``next`` frames itself)."""

    async def handle_connection_init(self, message: Any) -> None:
        if isinstance(self.context, dict):
            self.context[HANDLER_KEY] = self  # the socket's operations, for router.py
        await super().handle_connection_init(message)

    async def run_operation(self, operation: Operation[Any, Any]) -> None:
        _OPERATION.set(operation)  # the operation's own task: its resolvers see it, no other
        await super().run_operation(operation)


class FastFrames:
    """Builds a subscription's ``next`` frames from event frames without running GraphQL.

    ``/ws`` encodes an event once and sends the same text to every subscriber; GraphQL would
    execute the selection, process the result and encode JSON again for every subscriber and
    event. For a selection of ``StreamEvent``'s plain fields (:func:`FastFrames.of` says when),
    the ``next`` frame is the event frame's own text between a per-operation prefix and suffix:
    the whole frame when the selection is ``stream offset kind ts data`` in that order, else its
    fields decoded (``data`` left encoded) and joined in the order selected. The frame is the
    JSON Strawberry would send for the same event (tests/test_graphql_ws.py compares them)."""

    __slots__ = ("operation", "socket", "prefix", "fields", "whole")

    #: ``next`` frames this process built on the fast path (all operations).
    sent = 0

    def __init__(
        self,
        operation: Operation[Any, Any],
        socket: Socket,
        root: str,
        fields: list[tuple[str, str]],
    ) -> None:
        self.operation = operation
        self.socket = socket
        self.prefix = (
            '{"id":'
            + _encode(operation.id).decode()
            + ',"type":"next","payload":{"data":{'
            + _encode(root).decode()
            + ":"
        )
        self.fields = [(_encode(key).decode() + ":", name) for key, name in fields]
        self.whole = [(k, n) for k, n in fields] == [(n, n) for n in EVENT_FIELDS]

    @classmethod
    def of(cls, info: Info) -> FastFrames | None:
        """The frame builder for this resolver's operation, or ``None`` when the slow path must
        run: not over graphql-transport-ws, or a selection with anything but plain fields of
        ``StreamEvent`` (fragments, directives)."""
        operation = _OPERATION.get()
        request = info.context.get("request")
        socket = None if request is None else request.scope.get(SOCKET_KEY)
        if operation is None or socket is None:
            return None
        raw = info._raw_info  # noqa: SLF001 (the field's nodes, as graphql-core gives them)
        if len(raw.field_nodes) != 1:
            return None
        node = raw.field_nodes[0]
        if node.directives or node.selection_set is None:
            return None
        fields: list[tuple[str, str]] = []
        for sel in node.selection_set.selections:
            if not isinstance(sel, FieldNode) or sel.directives or sel.selection_set:
                return None
            name = sel.name.value
            if name not in EVENT_FIELDS and name != "__typename":
                return None
            key = sel.alias.value if sel.alias else name
            if any(k == key for k, _ in fields):
                return None  # a field selected twice (merged by GraphQL): leave it to it
            fields.append((key, name))
        return cls(operation, socket, str(raw.path.key), fields)

    def build(self, frame: str) -> str:
        """The ``next`` frame of one event frame."""
        if self.whole:
            body = "{" + frame[len(EVENT_HEAD) :]
        else:
            p = _parts.decode(frame)
            out = []
            for key, name in self.fields:
                if name == "stream":
                    value = _encode(p.stream).decode()
                elif name == "offset":
                    value = str(p.offset)
                elif name == "kind":
                    value = _encode(p.kind).decode()
                elif name == "ts":
                    value = _encode(p.ts).decode()
                elif name == "data":
                    value = bytes(p.data).decode()
                else:
                    value = _TYPENAME
                out.append(key + value)
            body = "{" + ",".join(out) + "}"
        return self.prefix + body + "}}}"
