"""Small pieces both WebSocket transports share."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable

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
    if ws.application_state == WebSocketState.DISCONNECTED:
        return
    with contextlib.suppress(Exception):
        await asyncio.wait_for(ws.close(code, reason[:120]), timeout)


class Outbox:
    """A bounded queue of frames for a device connection."""

    def __init__(self, limit: int = 1000) -> None:
        self.limit = limit
        self._frames: list[str] = []
        self._wake = asyncio.Event()
        self.closed = False
        self.overflowed = False

    def put(self, frame: str) -> None:
        if self.closed:
            return
        if len(self._frames) >= self.limit:
            self.overflowed = True
            self.close()
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
