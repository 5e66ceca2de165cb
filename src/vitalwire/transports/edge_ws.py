"""``/ws/edge``: edge nodes dial in, forward their streams and answer the cloud's requests.

The protocol is docs/protocol.md, "Edge uplink"; what it means is services/edges.py (this end)
and services/uplink.py (the edge's end). The transport decodes, calls the hub and encodes.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING

from vitalwire import wire
from vitalwire.core.errors import AuthTimeout, InvalidMessage, PeerError
from vitalwire.services.edges import EdgeLink
from vitalwire.services.ingest import Unavailable
from vitalwire.transports.common import Disconnected, Outbox, Socket, close_quietly
from vitalwire.transports.errors import public_message, row_for
from vitalwire.wire import Close

if TYPE_CHECKING:
    from vitalwire.services.container import Services

log = logging.getLogger("vitalwire.edge_ws")

#: Frames queued for an edge (acks, calls) before it counts as not reading them.
OUTBOX_LIMIT = 10_000
_CLOSING: set[asyncio.Task[None]] = set()


def _error(exc: BaseException) -> str:
    row = row_for(exc)
    return wire.encode_text(
        wire.Error(code=row.code, message=public_message(exc), field=getattr(exc, "field", None))
    )


async def edge_endpoint(ws: Socket, svc: Services) -> None:
    s = svc.settings
    hub = svc.edges
    await ws.accept()
    outbox = Outbox(ws, OUTBOX_LIMIT)
    link: EdgeLink | None = None
    why = "closed"
    try:
        try:
            async with asyncio.timeout(s.auth_timeout_s):
                raw = await ws.receive_frame(s.max_frame_bytes)
            hello = wire.decode_edge(raw)
            if not isinstance(hello, wire.EdgeHello):
                raise InvalidMessage("first message must be edge_hello", field="type")

            def close(code: int, reason: str) -> None:
                outbox.close()
                task = asyncio.get_running_loop().create_task(_close(ws, outbox, code, reason))
                _CLOSING.add(task)  # held until done: the loop keeps only a weak reference
                task.add_done_callback(_CLOSING.discard)

            link = await hub.hello(hello, outbox.put, close)
        except TimeoutError:
            outbox.put(_error(AuthTimeout(f"no edge_hello within {s.auth_timeout_s:g} s")))
            await _finish(ws, outbox, Close.AUTH_TIMEOUT, "auth timeout")
            return
        except PeerError as exc:
            outbox.put(_error(exc))
            code = Close.TRY_AGAIN_LATER if isinstance(exc, Unavailable) else Close.UNAUTHENTICATED
            await _finish(ws, outbox, code, public_message(exc))
            return
        ws.authenticated()
        outbox.on_overflow = lambda: link.close(Close.SLOW_CONSUMER, "edge does not read")
        outbox.put(wire.encode_text(wire.EdgeWelcome(svc.clock(), link.node)))
        while True:
            raw = await ws.receive_frame(s.hard_frame_bytes)
            try:
                msg = wire.decode_edge(raw)
                if isinstance(msg, wire.EdgeEvents):
                    await hub.room()
                    if hub.links.get(link.node) is not link:
                        break  # replaced meanwhile
                    hub.take_events(link, msg)
                elif isinstance(msg, wire.EdgePatients):
                    outbox.put(wire.encode_text(await hub.claim(link, msg.items)))
                elif isinstance(msg, wire.EdgeStatus):
                    link.backlog = msg.backlog
                    link.last_seen = svc.clock()
                    if msg.backlog == 0:
                        link.lag_s = 0.0
                elif isinstance(msg, wire.EdgeReply):
                    hub.on_reply(link, msg)
                elif isinstance(msg, wire.Ping):
                    outbox.put(wire.encode_text(wire.Pong(id=msg.id, ts=msg.ts)))
                elif isinstance(msg, wire.EdgeHello):
                    raise InvalidMessage("edge_hello was already sent", field="type")
            except PeerError as exc:
                # a frame the edge should not have sent: say why and start again from the heads
                why = public_message(exc)
                outbox.put(_error(exc))
                await _finish(ws, outbox, Close.NORMAL, why[:120])
                return
    except Disconnected:
        why = "disconnected"
    except Exception:
        log.exception("edge connection failed")
        why = "server error"
        await close_quietly(ws, Close.INTERNAL_ERROR, "internal error")
    finally:
        if link is not None:
            hub.gone(link, why)
        outbox.close()
        await outbox.sender.sent(0)


async def _close(ws: Socket, outbox: Outbox, code: int, reason: str) -> None:
    await outbox.sender.sent(2.0, cancel=False)
    await close_quietly(ws, code, reason)


async def _finish(ws: Socket, outbox: Outbox, code: int, reason: str) -> None:
    outbox.close()
    await outbox.sender.sent(2.0)
    await close_quietly(ws, code, reason)
