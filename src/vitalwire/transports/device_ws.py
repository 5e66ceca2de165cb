"""``/ws/device``: devices say ``hello``, then send ``reading`` / ``readings``; the server acks."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from vitalwire import wire
from vitalwire.core.errors import AuthTimeout, InvalidMessage, PeerError, RateLimited
from vitalwire.core.ratelimit import TokenBucket
from vitalwire.services.ingest import DeviceSession, IdentityInUse, Unavailable
from vitalwire.transports.common import (
    Disconnected,
    Heartbeat,
    Outbox,
    Socket,
    check_size,
    close_quietly,
    origin_allowed,
)
from vitalwire.transports.errors import public_message, row_for
from vitalwire.wire import Close

if TYPE_CHECKING:
    from vitalwire.services.container import Services

log = logging.getLogger("vitalwire.device_ws")


def _error(exc: BaseException, **extra: int | None) -> str:
    row = row_for(exc)
    field = getattr(exc, "field", None)
    return wire.encode_text(
        wire.Error(code=row.code, message=public_message(exc), field=field, **extra)
    )


PING = wire.encode_text(wire.Ping())
#: What a device in a flat format (``hello.format``) is not sent: it cannot use acks (its messages
#: carry no seq), answer commands or pings. It gets ``welcome`` and errors only.
_NOT_FOR_FLAT = ('{"type":"ack"', '{"type":"command"', '{"type":"ping"')


def _for_flat(put: Callable[[str], None]) -> Callable[[str], None]:
    def send(frame: str) -> None:
        if not frame.startswith(_NOT_FOR_FLAT):
            put(frame)

    return send


async def device_endpoint(ws: Socket, svc: Services) -> None:
    s = svc.settings
    if not origin_allowed(ws, s.allowed_origins, s.public_url):
        await ws.close(Close.FORBIDDEN)  # before accept: the handshake gets HTTP 403
        return
    await ws.accept()
    outbox = Outbox(ws)
    session: DeviceSession | None = None
    closers: set[asyncio.Task[None]] = set()
    reason = "closed"
    replaced = False
    try:
        try:
            async with asyncio.timeout(s.auth_timeout_s):
                raw = await ws.receive_frame(s.max_frame_bytes)
            hello = wire.decode_device(raw)
            if not isinstance(hello, wire.Hello):
                raise InvalidMessage("first message must be hello", field="type")
        except TimeoutError:
            outbox.put(_error(AuthTimeout(f"no hello within {s.auth_timeout_s:g} s")))
            await _finish(outbox)
            await close_quietly(ws, Close.AUTH_TIMEOUT, "auth timeout")
            return
        except PeerError as exc:
            outbox.put(_error(exc))
            await _finish(outbox)
            await close_quietly(ws, Close.UNAUTHENTICATED, "hello required")
            return

        def close(code: int, why: str, status: str | None = None) -> None:
            """Send what is queued (acks), then close with ``code`` and ``why``; ``status`` is
            the device's offline reason when it is not ``why``."""
            nonlocal reason, replaced
            reason = status or (why if code != Close.GOING_AWAY else "server shutting down")
            replaced = code == Close.REPLACED
            outbox.close()

            async def _close() -> None:
                await outbox.sender.sent(2.0, cancel=False)
                await close_quietly(ws, code, why)

            closers.add(asyncio.get_running_loop().create_task(_close()))

        outbox.on_overflow = lambda: close(Close.SLOW_CONSUMER, "device does not read its acks")
        try:
            send = outbox.put if hello.format is None else _for_flat(outbox.put)
            session, welcome = await svc.ingest.hello(hello, send, close)
        except PeerError as exc:
            outbox.put(_error(exc))
            await _finish(outbox)
            await close_quietly(ws, _refusal_code(exc), public_message(exc))
            return
        session.peer = ws.peer
        ws.authenticated()  # the pre-authentication bounds (transports/wsserver.py) are lifted
        outbox.put(wire.encode_text(welcome))
        svc.commands.deliver(session.device_id)  # commands queued while it was away, in order

        def silent() -> None:
            if not outbox.closed:
                close(Close.HEARTBEAT_TIMEOUT, "heartbeat timeout")

        ping = (lambda: outbox.put(PING)) if hello.format is None else (lambda: None)
        heartbeat = Heartbeat(s.heartbeat_s, s.heartbeat_s * 3, ping, silent)
        try:
            await _serve(ws, svc, session, outbox, heartbeat, close, hello.format)
        finally:
            heartbeat.cancel()
    except Disconnected:
        pass
    except Exception:
        log.exception("device connection failed")
        reason = "server error"
        await close_quietly(ws, Close.INTERNAL_ERROR, "internal error")
    finally:
        if session is not None:
            svc.ingest.goodbye(session, reason)
        outbox.close()
        if closers:
            await asyncio.wait(closers, timeout=5)
        await outbox.sender.sent(0)
        if session is not None and replaced and ws.close_answered(Close.REPLACED):
            # a replaced session whose peer answered the close is a second unit, not a blip
            svc.ingest.identity_conflict(session)


def _refusal_code(exc: PeerError) -> int:
    if isinstance(exc, Unavailable):
        return Close.TRY_AGAIN_LATER
    if isinstance(exc, IdentityInUse):
        return Close.IDENTITY_CONFLICT
    return Close.UNAUTHENTICATED


async def _finish(outbox: Outbox) -> None:
    outbox.close()
    await outbox.sender.sent(2.0)


async def _serve(
    ws: Socket,
    svc: Services,
    session: DeviceSession,
    outbox: Outbox,
    heartbeat: Heartbeat,
    close: Callable[[int, str, str | None], None],
    flat: str | None = None,
) -> None:
    """Take the device's frames until the session closes or the device goes.

    ``flat``: the device's ``hello.format``; its frames are then flat messages of that format
    (:func:`vitalwire.wire.decode_flat`), each one reading the server numbers and stamps.

    Frames are taken as they arrive, inside the server's read (``Socket.on_frames``): a device
    waiting for its next reading holds no coroutine, future or timer made for that frame. Only
    a frame that must wait goes through the loop below: one that arrives while the write queue
    is full (backpressure), and every frame on a server without that hook.
    """
    s = svc.settings
    writer = svc.writer
    max_rows = s.max_pending_rows
    bucket = TokenBucket(s.device_msgs_per_s, s.device_msgs_burst)

    def take(raw: str | bytes) -> None:
        """One frame's work, its size checked; never awaits."""
        if not bucket.take(time.monotonic()):
            # a refused frame followed by accepted ones could let the cumulative ack cover
            # it: a device over its rate is disconnected instead, and resends after reconnect
            limit = f"{s.device_msgs_per_s:g}/s, burst {s.device_msgs_burst}"
            outbox.put(_error(RateLimited(f"messages must be at most {limit}")))
            session.close(Close.RATE_LIMITED, "rate limited")
            return
        try:
            msg = wire.decode_device(raw)
        except PeerError as exc:
            outbox.put(_error(exc))
            return
        if isinstance(msg, (wire.Reading, wire.Readings)):
            _take(svc, session, outbox, [msg] if isinstance(msg, wire.Reading) else msg.items, None)
        elif isinstance(msg, wire.CommandResult):
            try:
                svc.commands.on_result(session, msg)
            except PeerError as exc:
                outbox.put(_error(exc))
        elif isinstance(msg, wire.Waveform):
            try:
                svc.ingest.waveform(session, msg)
            except PeerError as exc:
                outbox.put(_error(exc))
        elif isinstance(msg, wire.Ping):
            outbox.put(wire.encode_text(wire.Pong(id=msg.id, ts=msg.ts)))
        elif isinstance(msg, wire.Pong):
            pass
        elif isinstance(msg, wire.Hello):
            outbox.put(_error(InvalidMessage("hello was already received", field="type")))

    def take_flat(raw: str | bytes) -> None:
        """One flat message (``hello.format``): a reading, or an error naming the field."""
        if not bucket.take(time.monotonic()):
            limit = f"{s.device_msgs_per_s:g}/s, burst {s.device_msgs_burst}"
            outbox.put(_error(RateLimited(f"messages must be at most {limit}")))
            session.close(Close.RATE_LIMITED, "rate limited")
            return
        assert flat is not None
        try:
            values = wire.decode_flat(flat, raw)
            errors = svc.ingest.flat_reading(session, values)
        except PeerError as exc:
            outbox.put(_error(exc))
            return
        for err in errors:
            outbox.put(wire.encode_text(err))

    handle = take if flat is None else take_flat

    def arrived(raw: str | bytes) -> bool:
        """A frame, as the server read it; False leaves it to the loop below."""
        if outbox.closed:
            return False  # nothing more is taken; the loop ends on it
        if writer.pending_rows > max_rows:
            return False  # the loop waits for room first
        try:
            check_size(raw, s.max_frame_bytes)
            handle(raw)
        except PeerError as exc:
            outbox.put(_error(exc))
        except Exception:
            log.exception("device frame failed")
            close(Close.INTERNAL_ERROR, "internal error", "server error")  # as the loop's
        heartbeat.waiting()  # the silence clock starts again
        return True

    ws.on_frames(arrived)
    try:
        while not outbox.closed:
            try:
                heartbeat.waiting()
                try:
                    raw = await ws.receive_frame(s.max_frame_bytes)
                finally:
                    heartbeat.busy()
            except PeerError as exc:
                outbox.put(_error(exc))
                continue
            if outbox.closed:
                return
            if writer.pending_rows > max_rows:
                # backpressure: stop reading this device until the writer catches up; a store
                # that stays stuck past a heartbeat ends the session (the device resends later)
                try:
                    await writer.wait_for_room(max_rows, s.heartbeat_s)
                except TimeoutError:
                    outbox.put(_error(Unavailable("the store is not keeping up; reconnect later")))
                    session.close(Close.TRY_AGAIN_LATER, "store not keeping up")
                    return
            handle(raw)
    finally:
        ws.on_frames(None)  # the protocol would keep this connection's state otherwise


def _take(
    svc: Services,
    session: DeviceSession,
    outbox: Outbox,
    bodies: list[wire.ReadingBody],
    req_id: int | None,
) -> None:
    try:
        errors = svc.ingest.readings(session, bodies)
    except PeerError as exc:
        outbox.put(_error(exc, id=req_id))
        return
    for err in errors:
        outbox.put(wire.encode_text(err))
