"""The reference a tutorial writes: a naive WebSocket fan-out server, no store, no auth.

One ``websockets`` handler per connection. A device sends ``{"patient", "seq", "ts", ...}``
frames; every client subscribed to that patient gets the frame, each send awaited in turn. It is
what ``vitalwire bench --against naive`` measures our full pipeline against.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import sys
import time
from typing import Any

import websockets
from websockets.asyncio.server import ServerConnection, serve

_subscribers: dict[str, set[ServerConnection]] = {}
#: Tests of the bench itself: drop every Nth forwarded frame (0: never), to check loss counting.
DROP_EVERY = 0
#: Tests of the bench itself: stall the whole server ``STALL_S`` before every Nth forwarded frame
#: (0: never), to check that the timeline finds the slow readings.
STALL_EVERY = 0
STALL_S = 0.12
#: Tests of the bench itself: hold each device connection's opening handshake this long (0:
#: not at all), to check that the load waits until every connection is open.
DEVICE_OPEN_DELAY_S = 0.0
_forwarded = 0


async def _process_request(connection: ServerConnection, request: Any) -> None:
    if DEVICE_OPEN_DELAY_S and request.path.startswith("/device"):
        await asyncio.sleep(DEVICE_OPEN_DELAY_S)


async def _handler(ws: ServerConnection) -> None:
    with contextlib.suppress(websockets.ConnectionClosed):
        await _serve(ws)


async def _serve(ws: ServerConnection) -> None:
    global _forwarded
    path = ws.request.path if ws.request else "/"
    if path.startswith("/device"):
        async for raw in ws:
            msg = json.loads(raw)
            for client in list(_subscribers.get(msg["patient"], ())):
                _forwarded += 1
                if DROP_EVERY and _forwarded % DROP_EVERY == 0:
                    continue
                if STALL_EVERY and _forwarded % STALL_EVERY == 0:
                    time.sleep(STALL_S)  # the event loop held, as a long pause would
                try:
                    await client.send(raw)
                except Exception:
                    pass
        return
    mine: list[str] = []
    try:
        async for raw in ws:
            msg = json.loads(raw)
            for patient in msg.get("subscribe", []):
                _subscribers.setdefault(patient, set()).add(ws)
                mine.append(patient)
            await ws.send(json.dumps({"subscribed": len(mine)}))
    finally:
        for patient in mine:
            _subscribers.get(patient, set()).discard(ws)


async def main(port: int) -> None:
    async with serve(
        _handler,
        "127.0.0.1",
        port,
        max_size=2**20,
        compression=None,
        process_request=_process_request,
    ) as server:
        print(f"naive listening {port}", flush=True)
        await server.serve_forever()


if __name__ == "__main__":
    # Past its limit this server writes to clients the bench has already closed, and asyncio
    # warns "socket.send() raised exception." for each: dozens of lines in the bench's output
    # that say nothing about the figures (which count what arrived).
    logging.getLogger("asyncio").setLevel(logging.ERROR)
    if len(sys.argv) > 2:
        DROP_EVERY = int(sys.argv[2])
    if len(sys.argv) > 3:
        STALL_EVERY = int(sys.argv[3])
    if len(sys.argv) > 4:
        DEVICE_OPEN_DELAY_S = float(sys.argv[4])
    asyncio.run(main(int(sys.argv[1])))
