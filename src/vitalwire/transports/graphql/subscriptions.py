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
the event frame ``/ws`` sends (encoded once per event) and written to the socket. Everything
before the write (the session, its checks, the queue, the errors that end it) is the same code
for both paths.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator
from contextvars import ContextVar
from typing import TYPE_CHECKING, Any, Final

import msgspec
from graphql.language import FieldNode
from strawberry.http.exceptions import WebSocketDisconnected
from strawberry.subscriptions.protocols.graphql_transport_ws.handlers import (
    BaseGraphQLTransportWSHandler,
    Operation,
)

from vitalwire.core import access as policy
from vitalwire.core import events as ev
from vitalwire.core.errors import Forbidden, InvalidMessage, PeerError
from vitalwire.services.clients import ClientSession
from vitalwire.transports.common import Disconnected, Socket

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
    s = svc.settings
    who = svc.access.current_now(who)
    ended: list[PeerError] = []

    def audit(action: str, pid: str | None, detail: dict[str, Any]) -> None:
        svc.access.audit(who.name, action, pid, detail, origin)

    def on_overflow(code: int, reason: str) -> None:
        ended.append(SlowConsumer(reason, field="after"))

    session = GraphQLSubscription(
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
        ended.append(exc)
        session.close()

    session.on_revoked = revoked
    session.origin = origin
    # the patient of an event frame, from the stream's encoded name right after EVENT_HEAD
    pids = {_encode(st).decode(): ev.stream_patient(st) for st in streams}
    only = ev.stream_patient(streams[0]) if len(streams) == 1 else None
    svc.clients.add(session)
    try:
        try:
            await session.subscribe(streams, after or None, None)
        except Forbidden as exc:
            svc.access.refused(who.name, "subscribe", only, exc.message, origin)
            raise
        while True:
            frames = await session.take()
            if frames is None:
                if ended:
                    raise ended[0]
                return
            ready: list[str] = []
            for frame in frames:
                if frame.startswith(EVENT_HEAD):
                    if len(streams) == 1:
                        pid = only
                    else:
                        key = frame[_STREAM_AT : frame.index(',"offset":', _STREAM_AT)]
                        pid = pids[key] if key in pids else ev.stream_patient(_decode_str(key))
                    if pid is not None:
                        # the access as it is now, at every event (the hook ends it too)
                        now_who = svc.access.current_now(session.principal)
                        if not svc.access.allowed(now_who, policy.VIEW, pid):
                            if ready:
                                yield ready  # those before it, then why it ends
                            why = svc.access.view_lost(now_who, pid, who.role) or "access ended"
                            raise Forbidden(why, field="patient_id")
                    ready.append(frame)
                    continue
                if ready:
                    yield ready
                    ready = []
                msg = msgspec.json.decode(frame)
                kind = msg.get("type")
                if kind == "subscribed":
                    for start in msg["streams"]:
                        if not start["recovered"]:
                            which = "" if len(streams) == 1 else f" of {start['stream']}"
                            raise InvalidMessage(
                                f"after{which} must be an offset between the oldest kept and "
                                f"the head ({start['offset']}), at most {s.max_replay} behind it",
                                field="after",
                            )
                elif kind == "unsubscribed":
                    raise Forbidden(msg.get("reason") or "access ended", field="patient_id")
            if ready:
                yield ready
    finally:
        session.close()
        svc.clients.discard(session)


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

#: The operation of the running graphql-transport-ws task (set by :class:`TransportWSHandler`).
_OPERATION: ContextVar[Operation[Any, Any] | None] = ContextVar("vitalwire_gql_op", default=None)


class TransportWSHandler(BaseGraphQLTransportWSHandler[Any, Any]):
    """Strawberry's graphql-transport-ws handler, telling each operation's resolvers which
    operation they serve (so a subscription can write its ``next`` frames itself)."""

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

    async def send(self, frames: list[str]) -> None:
        """Write the ``next`` frames of event ``frames`` to the socket as ``/ws`` writes its
        frames (transports/common.py ``Sender``: at once in one write when the transport takes
        them, else awaiting room); nothing once the operation is complete."""
        if self.operation.completed:
            return
        texts = [self.build(frame) for frame in frames]
        socket = self.socket
        if not socket.send_now(texts):
            try:
                await socket.send_all(texts)
            except Disconnected as exc:
                raise WebSocketDisconnected from exc
        FastFrames.sent += len(texts)
