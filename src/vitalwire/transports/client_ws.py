"""``/ws``: clients authenticate with their first message, subscribe to streams, receive events."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING, Any

from vitalwire import wire
from vitalwire.core import access as policy
from vitalwire.core import events as ev
from vitalwire.core.errors import (
    AuthTimeout,
    Forbidden,
    InvalidMessage,
    PeerError,
    RateLimited,
    Unauthenticated,
)
from vitalwire.core.ratelimit import TokenBucket
from vitalwire.services.auth import Principal
from vitalwire.services.clients import ClientSession
from vitalwire.transports.common import (
    Disconnected,
    Heartbeat,
    Sender,
    Socket,
    close_quietly,
    origin_allowed,
)
from vitalwire.transports.errors import public_message, row_for
from vitalwire.wire import Close

if TYPE_CHECKING:
    from vitalwire.services.container import Services

log = logging.getLogger("vitalwire.client_ws")

#: A slow consumer gets this long to take the 4008 close frame before its TCP connection is cut.
SLOW_CLOSE_TIMEOUT_S = 5.0


def _error(exc: BaseException, req_id: int | None = None) -> str:
    row = row_for(exc)
    if row.code == "internal":
        log.error("internal error on client request", exc_info=exc)
    return wire.encode_text(
        wire.Error(
            code=row.code, message=public_message(exc), field=getattr(exc, "field", None), id=req_id
        )
    )


PING = wire.encode_text(wire.Ping())


async def _authenticate(ws: Socket, svc: Services) -> tuple[Principal, int | None]:
    s = svc.settings
    async with asyncio.timeout(s.auth_timeout_s):
        raw = await ws.receive_frame(s.max_frame_bytes)
    msg = wire.decode_client(raw)
    if not isinstance(msg, wire.Auth):
        raise Unauthenticated("first message must be auth", field="type")
    return await svc.access.current(svc.tokens.verify(msg.token, svc.clock())), msg.id


async def client_endpoint(ws: Socket, svc: Services) -> None:
    s = svc.settings
    if not origin_allowed(ws, s.allowed_origins, s.public_url):
        await ws.close(Close.FORBIDDEN)  # before accept: the handshake gets HTTP 403
        return
    await ws.accept()
    try:
        principal, auth_id = await _authenticate(ws, svc)
        open_now = sum(
            1
            for c in svc.clients
            if c.counts_as_connection and c.principal.name == principal.name
        )
        if open_now >= s.max_connections_per_user:
            raise RateLimited(
                f"connections per user must be at most {s.max_connections_per_user}",
                field="connections",
            )
    except TimeoutError:
        await _send_quietly(ws, _error(AuthTimeout(f"no auth within {s.auth_timeout_s:g} s")))
        await close_quietly(ws, Close.AUTH_TIMEOUT, "no auth within the auth timeout")
        return
    except Disconnected:
        return
    except PeerError as exc:
        await _send_quietly(ws, _error(exc))
        code = Close.RATE_LIMITED if isinstance(exc, RateLimited) else Close.UNAUTHENTICATED
        await close_quietly(ws, code, public_message(exc))
        return
    ws.authenticated()  # the pre-authentication bounds (transports/wsserver.py) are lifted
    closing: list[tuple[int, str]] = []
    closers: set[asyncio.Task[None]] = set()

    def on_overflow(code: int, reason: str) -> None:
        """Too slow: stop sending now, close (or drop the connection if it cannot take it)."""
        closing.append((code, reason))
        sender.stop()
        closers.add(
            asyncio.get_running_loop().create_task(
                close_quietly(ws, code, reason, SLOW_CLOSE_TIMEOUT_S)
            )
        )

    def shut(code: int, reason: str) -> None:
        """Server going away: send what is queued, then close."""
        closing.append((code, reason))
        session.close()

        async def _close() -> None:
            await sender.sent(2.0, cancel=False)
            await close_quietly(ws, code, reason)

        closers.add(asyncio.get_running_loop().create_task(_close()))

    origin = ws.peer

    def audit(action: str, pid: str | None, detail: dict[str, Any]) -> None:
        if pid is not None and svc.access.via_break_glass(session.principal, pid):
            detail = {**detail, "flag": "break_glass"}
        svc.access.audit(session.principal.name, action, pid, detail, origin)

    def revoked(exc: PeerError) -> None:
        """The user may no longer use this connection: say why, then close (4001)."""
        session.send(_error(exc))
        shut(Close.UNAUTHENTICATED, public_message(exc))

    session = ClientSession(
        principal,
        svc.streams,
        authorize=svc.access.stream_check(principal),
        patient_filter=svc.access.patient_filter(principal),
        audit=audit,
        clock=svc.clock,
        max_queue=s.client_queue_max,
        soft_queue=s.client_queue_soft,
        max_streams=s.max_streams_per_connection,
        max_replay=s.max_replay,
        on_overflow=on_overflow,
    )
    session.shut = shut
    session.on_revoked = revoked
    session.origin = origin
    sender = Sender(ws, session.take_now)
    session.notify = sender.kick
    svc.clients.add(session)
    session.send(
        wire.encode_text(
            wire.Result(
                id=auth_id,
                data={
                    "user": principal.name,
                    "role": principal.role,
                    "server_time": svc.clock(),
                    "heartbeat_s": s.heartbeat_s,
                },
            )
        )
    )

    def silent() -> None:
        if not closing and session.flat is None:  # a flat client need not send anything
            shut(Close.HEARTBEAT_TIMEOUT, "heartbeat timeout")

    def ping() -> None:
        if session.flat is None:  # a flat client gets flat frames only
            session.send(PING)

    heartbeat = Heartbeat(s.heartbeat_s, s.heartbeat_s * 3, ping, silent)
    bucket = TokenBucket(s.client_msgs_per_s, s.client_msgs_burst)
    refused = 0
    try:
        while not closing:
            heartbeat.waiting()
            try:
                raw = await ws.receive_frame(s.max_frame_bytes)
            except PeerError as exc:
                session.send(_error(exc))
                continue
            finally:
                heartbeat.busy()
            if not bucket.take(time.monotonic()):
                refused += 1
                limit = f"{s.client_msgs_per_s:g}/s, burst {s.client_msgs_burst}"
                session.send(_error(RateLimited(f"messages must be at most {limit}")))
                if refused > s.client_msgs_burst:  # it keeps going: close
                    shut(Close.RATE_LIMITED, "rate limited")
                continue
            refused = 0
            req_id: int | None = None
            msg: object = None
            try:
                msg = wire.decode_client(raw)
                req_id = getattr(msg, "id", None)
                await _handle(svc, session, msg)
            except Unauthenticated as exc:  # a failed re-auth ends the session
                session.send(_error(exc, req_id))
                shut(Close.UNAUTHENTICATED, public_message(exc))
            except Forbidden as exc:
                _audit_refusal(svc, session, msg, exc)
                session.send(_error(exc, req_id))
            except PeerError as exc:
                session.send(_error(exc, req_id))
            except Exception as exc:  # never leak internals; keep serving
                session.send(_error(exc, req_id))
    except Disconnected:
        pass
    finally:
        heartbeat.cancel()
        session.close()
        svc.clients.discard(session)
        if closers:
            await asyncio.wait(closers, timeout=5)
        await sender.sent(1.0)


async def _send_quietly(ws: Socket, frame: str) -> None:
    try:
        await ws.send_all([frame])
    except Disconnected:
        pass


def _audit_refusal(svc: Services, session: ClientSession, msg: object, exc: Forbidden) -> None:
    """Audit a refused request: who, what, which patient, why (bounded per connection)."""
    config = getattr(type(msg), "__struct_config__", None)
    kind = str(getattr(config, "tag", None) or type(msg).__name__)
    extra: dict[str, Any] = {}
    pid = getattr(msg, "patient_id", None)
    if isinstance(msg, wire.AckAlert):
        pid = msg.alert_id.partition(":")[0]  # alert ids start with their patient
    elif isinstance(msg, wire.Subscribe):
        pid = next(
            (
                p
                for s in msg.streams
                if (p := _stream_patient(s)) is not None
                and not svc.access.allowed(session.principal, policy.VIEW, p)
            ),
            None,
        )
    elif isinstance(msg, wire.SendCommand):
        extra["name"] = msg.name
    if pid is not None and not _is_id(pid):
        pid = None  # the audit log keeps only well-formed ids from a peer
    svc.access.refused(
        session.principal.name, kind, pid, public_message(exc), session.origin, **extra
    )


def _stream_patient(stream: str) -> str | None:
    try:
        return ev.stream_patient(ev.check_stream(stream))
    except InvalidMessage:
        return None


def _is_id(value: str) -> bool:
    try:
        ev.check_id("patient_id", value)
    except InvalidMessage:
        return False
    return True


async def _handle(svc: Services, session: ClientSession, msg: object) -> None:
    if isinstance(msg, wire.Subscribe):
        await session.subscribe(msg.streams, msg.since, msg.id, msg.batch, msg.format)
    elif isinstance(msg, wire.Unsubscribe):
        gone = session.unsubscribe(msg.streams)
        session.send(wire.encode_text(wire.Result(id=msg.id, data={"unsubscribed": gone})))
    elif isinstance(msg, wire.Ping):
        session.send(wire.encode_text(wire.Pong(id=msg.id, ts=msg.ts)))
    elif isinstance(msg, wire.Pong):
        return
    elif isinstance(msg, wire.AckAlert):
        changes = await svc.alerts.acknowledge(session.principal, msg.alert_id, session.origin)
        session.send(wire.encode_text(wire.Result(id=msg.id, data={"changes": changes})))
    elif isinstance(msg, wire.SetLimits):
        limits = await svc.alerts.set_limits(
            session.principal, msg.patient_id, msg.limits, session.origin
        )
        data = {"patient_id": msg.patient_id, "limits": limits}
        session.send(wire.encode_text(wire.Result(id=msg.id, data=data)))
    elif isinstance(msg, wire.BreakGlass):
        grant = await svc.access.break_glass(
            session.principal, msg.patient_id, msg.reason, session.origin
        )
        session.send(wire.encode_text(wire.Result(id=msg.id, data=grant)))
    elif isinstance(msg, wire.GetLimits):
        limits = await svc.alerts.get_limits(
            session.principal, msg.patient_id, session.origin, audit_refusal=False
        )
        data = {"patient_id": msg.patient_id, "limits": limits}
        session.send(wire.encode_text(wire.Result(id=msg.id, data=data)))
    elif isinstance(msg, wire.SetObservations):
        obs = {"on_oxygen": msg.on_oxygen, "consciousness": msg.consciousness, "scale": msg.scale}
        merged = await svc.alerts.set_observations(
            session.principal, msg.patient_id, obs, session.origin
        )
        data = {"patient_id": msg.patient_id, "observations": merged}
        session.send(wire.encode_text(wire.Result(id=msg.id, data=data)))
    elif isinstance(msg, wire.SendCommand):
        command = await svc.commands.send(session.principal, msg, session, session.origin)
        session.send(wire.encode_text(wire.Result(id=msg.id, data={"command": command})))
    elif isinstance(msg, wire.Auth):
        who = await svc.access.current(svc.tokens.verify(msg.token, svc.clock()))
        if who.name != session.principal.name:
            raise Unauthenticated("a connection cannot change user; reconnect", field="token")
        session.reauthorize(who, svc.access.stream_check(who), svc.access.patient_filter(who))
        session.send(
            wire.encode_text(wire.Result(id=msg.id, data={"user": session.principal.name}))
        )
    else:
        raise InvalidMessage("unsupported message", field="type")
