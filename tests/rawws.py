"""A WebSocket client that reads only when told to: a real stalled client for slow-consumer tests.

Built on websockets' sans-I/O ``ClientProtocol`` over a plain socket with a small receive buffer,
so when the test stops reading, the server's writes back up within a few kilobytes.
"""

from __future__ import annotations

import asyncio
import json
import socket
from typing import Any

from websockets.client import ClientProtocol
from websockets.frames import Close
from websockets.http11 import Response
from websockets.uri import parse_uri


class StalledClient:
    def __init__(self, url: str, rcvbuf: int = 4096) -> None:
        self.url = url
        self.rcvbuf = rcvbuf
        self.proto = ClientProtocol(parse_uri(url))
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None
        self.close_code: int | None = None

    async def connect(self) -> None:
        uri = parse_uri(self.url)
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, self.rcvbuf)
        sock.setblocking(False)
        await asyncio.get_running_loop().sock_connect(sock, (uri.host, uri.port))
        self.reader, self.writer = await asyncio.open_connection(sock=sock, limit=4096)
        self.proto.send_request(self.proto.connect())
        self._flush()
        while not any(isinstance(e, Response) for e in self.proto.events_received()):
            self.proto.receive_data(await self.reader.read(4096))
        assert self.proto.handshake_exc is None, self.proto.handshake_exc

    def send(self, msg: dict[str, Any]) -> None:
        self.proto.send_text(json.dumps(msg).encode())
        self._flush()

    def _flush(self) -> None:
        assert self.writer is not None
        for data in self.proto.data_to_send():
            if data:
                self.writer.write(data)

    async def read_until_closed(self, timeout: float = 10.0) -> int | None:
        """Read everything the server sent; return the close code it ended with."""
        assert self.reader is not None

        async def _read() -> None:
            while True:
                data = await self.reader.read(65536)  # type: ignore[union-attr]
                if not data:
                    self.proto.receive_eof()
                    return
                self.proto.receive_data(data)
                for frame in self.proto.events_received():
                    if frame.opcode.name == "CLOSE":
                        self.close_code = Close.parse(frame.data).code
                        self._flush()
                        return

        await asyncio.wait_for(_read(), timeout)
        return self.close_code

    def abort(self) -> None:
        if self.writer is not None:
            self.writer.transport.abort()
