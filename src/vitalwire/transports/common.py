"""Small pieces both WebSocket transports share."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

from starlette.websockets import WebSocket, WebSocketDisconnect, WebSocketState

from vitalwire.core.errors import FrameTooLarge


class Disconnected(Exception):
    pass


async def receive_frame(ws: WebSocket, max_bytes: int) -> str | bytes:
    """The next text or binary frame. Raises Disconnected, or FrameTooLarge past ``max_bytes``."""
    message = await ws.receive()
    if message["type"] == "websocket.disconnect":
        raise Disconnected(message.get("code"))
    data: str | bytes | None = message.get("text")
    if data is None:
        data = message.get("bytes") or b""
    size = (
        len(data) if isinstance(data, bytes) or len(data) * 4 <= max_bytes else len(data.encode())
    )
    if size > max_bytes:
        raise FrameTooLarge(f"frame must be at most {max_bytes} bytes, got {size}", field="frame")
    return data


async def pump(ws: WebSocket, take: Callable[[], Awaitable[list[str] | None]]) -> None:
    """Send frames as the session hands them over, until it says stop or the socket fails."""
    try:
        while (frames := await take()) is not None:
            for frame in frames:
                await ws.send_text(frame)
    except (WebSocketDisconnect, RuntimeError, OSError):
        return


async def close_quietly(ws: WebSocket, code: int, reason: str = "", timeout: float = 2.0) -> None:
    """Send a close frame; if the peer does not take it within ``timeout``, drop the connection.

    A peer that stopped reading leaves the server's socket unwritable, and ASGI cannot send the
    close frame past a full buffer; aborting the transport is then the only way to free it.
    """
    if ws.application_state == WebSocketState.DISCONNECTED:
        return
    try:
        await asyncio.wait_for(ws.close(code, reason[:120]), timeout)
    except Exception:
        abort(ws)


TRANSPORT_KEY = "vitalwire.transport"


def origin_allowed(ws: WebSocket, allowed: list[str]) -> bool:
    """Browsers send Origin; allow the server's own (same host) and the configured list. A
    request without Origin is not from a browser (devices, SDK, CLI) and is allowed."""
    origin = ws.headers.get("origin")
    if origin is None:
        return True
    if origin in allowed:
        return True
    host = ws.headers.get("host", "")
    return origin.split("://", 1)[-1].rstrip("/") == host


class TransportHandle:
    """ASGI middleware: remember the server's transport of each WebSocket in its scope, so a
    connection whose peer stopped reading can be aborted (ASGI itself offers no way)."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "websocket":
            transport = getattr(getattr(send, "__self__", None), "transport", None)
            if transport is not None:
                scope[TRANSPORT_KEY] = transport
        await self.app(scope, receive, send)


def abort(ws: WebSocket) -> bool:
    """Abort the TCP connection under ``ws``; False when the server does not expose it."""
    transport = ws.scope.get(TRANSPORT_KEY)
    if transport is None or not hasattr(transport, "abort"):
        return False
    transport.abort()
    return True


class Outbox:
    """A bounded queue of frames for a device connection."""

    def __init__(self, limit: int = 1000) -> None:
        self.limit = limit
        self._frames: list[str] = []
        self._wake = asyncio.Event()
        self.closed = False
        self.overflowed = False
        self.on_overflow: Callable[[], None] | None = None

    def put(self, frame: str) -> None:
        if self.closed:
            return
        if len(self._frames) >= self.limit:
            self.overflowed = True
            self._frames.clear()
            self.close()
            if self.on_overflow is not None:
                self.on_overflow()
            return
        self._frames.append(frame)
        self._wake.set()

    async def take(self) -> list[str] | None:
        while not self._frames:
            if self.closed:
                return None
            self._wake.clear()
            await self._wake.wait()
        out, self._frames = self._frames, []
        return out

    def close(self) -> None:
        self.closed = True
        self._wake.set()
