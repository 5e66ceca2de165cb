"""The WebSocket transports' per-connection machinery: raw ASGI dispatch, the lazy sender, the
heartbeat timer, and the leaner uvicorn protocol (issue 7: cost per connection)."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import websockets
from websockets.asyncio.client import connect

from tests.conftest import RunningServer, start_server, stop_server, wait_until
from vitalwire.core.errors import FrameTooLarge
from vitalwire.transports.common import Disconnected, Heartbeat, Outbox, Sender, Socket
from vitalwire.transports.wsserver import Gate, Inbox, LeanWebSocketProtocol, text_frames


def _socket(send: Any = None, receive: Any = None) -> Socket:
    async def _nothing(*_: Any) -> Any:
        return {"type": "websocket.connect"}

    return Socket({"type": "websocket", "headers": []}, receive or _nothing, send or _nothing)


async def _device(srv: RunningServer, i: int) -> Any:
    did, secret, _ = srv.device(i)
    ws = await connect(srv.ws_url + "/ws/device", proxy=None)
    await ws.send(json.dumps({"type": "hello", "device_id": did, "secret": secret}))
    assert json.loads(await ws.recv())["type"] == "welcome"
    return ws


async def _client(srv: RunningServer, streams: list[str]) -> Any:
    user, pw = srv.user()
    async with httpx.AsyncClient(base_url=srv.url) as http:
        token = (await http.post("/auth/login", json={"username": user, "password": pw})).json()
    ws = await connect(srv.ws_url + "/ws", proxy=None)
    await ws.send(json.dumps({"type": "auth", "token": token["access_token"], "id": 1}))
    assert json.loads(await ws.recv())["type"] == "result"
    await ws.send(json.dumps({"type": "subscribe", "streams": streams, "id": 2}))
    assert json.loads(await ws.recv())["type"] == "subscribed"
    return ws


def _server_tasks() -> tuple[int, list[str]]:
    """uvicorn's connection tasks, and every other task running transport code."""
    connections = 0
    transport = []
    for task in asyncio.all_tasks():
        code = getattr(task.get_coro(), "cr_code", None)
        if code is None:
            continue
        if code.co_qualname == "WebSocketsSansIOProtocol.run_asgi":
            connections += 1
        elif "vitalwire/transports" in code.co_filename:
            transport.append(code.co_qualname)
    return connections, transport


async def test_an_idle_connection_holds_no_task_of_its_own(tmp_path: Path) -> None:
    srv, task = await start_server(tmp_path, patients=3, heartbeat_s=60)
    sockets: list[Any] = []
    try:
        sockets += [await _device(srv, i) for i in range(3)]
        sockets += [await _client(srv, ["alerts", f"patient:{srv.device(0)[2]}"]) for _ in range(2)]
        await wait_until(lambda: len(srv.services.ingest.sessions) == 3, 5, "devices")
        await wait_until(lambda: _server_tasks()[1] == [], 5, "senders done")
        # one task per connection (uvicorn's), none of ours: no sender, heartbeat or timeout task
        assert _server_tasks() == (5, [])
    finally:
        for ws in sockets:
            await ws.close()
        await stop_server(srv, task)


async def test_the_server_runs_the_lean_protocol_without_the_handshake(
    server: RunningServer,
) -> None:
    ws = await _device(server, 0)
    try:
        protocols = [
            p
            for p in server.server.server_state.connections
            if isinstance(p, LeanWebSocketProtocol)
        ]
        assert len(protocols) == 1
        (proto,) = protocols
        assert isinstance(proto.queue, Inbox) and isinstance(proto.writable, Gate)
        assert proto.request is None and proto.response is None
        assert not hasattr(proto, "__dict__") or "queue" not in proto.__dict__  # slots
        # the connection works both ways on it
        await ws.send(json.dumps({"type": "ping", "id": 7}))
        assert json.loads(await ws.recv()) == {"type": "pong", "id": 7}
    finally:
        await ws.close()


async def test_other_websocket_paths_still_go_through_fastapi(server: RunningServer) -> None:
    with pytest.raises(websockets.InvalidStatus) as refused:
        async with connect(server.ws_url + "/ws/elsewhere", proxy=None):
            pass
    assert refused.value.response.status_code == 403
    async with httpx.AsyncClient(base_url=server.url) as http:
        assert (await http.get("/healthz")).status_code == 200


async def test_a_silent_client_is_closed_4004_after_its_pings(tmp_path: Path) -> None:
    srv, task = await start_server(tmp_path, patients=1, heartbeat_s=0.2)
    try:
        ws = await _client(srv, ["alerts"])
        kinds = []
        with pytest.raises(websockets.ConnectionClosed) as closed:
            while True:  # read, never answer
                kinds.append(json.loads(await asyncio.wait_for(ws.recv(), 5))["type"])
        assert closed.value.rcvd is not None and closed.value.rcvd.code == 4004
        assert closed.value.rcvd.reason == "heartbeat timeout"
        assert kinds.count("ping") >= 2
        await wait_until(lambda: not srv.services.clients, 5, "client gone")
    finally:
        await stop_server(srv, task)


async def test_a_client_that_answers_pings_stays(tmp_path: Path) -> None:
    srv, task = await start_server(tmp_path, patients=1, heartbeat_s=0.1)
    try:
        ws = await _client(srv, ["alerts"])
        loop = asyncio.get_running_loop()
        until = loop.time() + 1.0  # 10 heartbeats, over 3 silence windows
        while loop.time() < until:
            msg = json.loads(await asyncio.wait_for(ws.recv(), 5))
            if msg["type"] == "ping":
                await ws.send('{"type":"pong"}')
        assert len(srv.services.clients) == 1
        await ws.close()
    finally:
        await stop_server(srv, task)


# -- the pieces, alone -------------------------------------------------------------------------


async def test_sender_sends_in_order_in_batches_and_only_while_frames_wait() -> None:
    sent: list[str] = []

    async def send(message: dict[str, Any]) -> None:
        sent.append(message["text"])
        await asyncio.sleep(0)

    queued: list[str] = []

    def take() -> list[str]:
        out = queued[:]
        queued.clear()
        return out

    sender = Sender(_socket(send), take)  # a server with no send_now: a task sends
    for frame in ("a", "b"):
        queued.append(frame)
        sender.kick()
    assert sender._task is None  # frames of one loop turn are taken together, at its end
    await asyncio.sleep(0)
    assert sender._task is not None
    queued.append("c")  # while it sends: the same task takes it
    sender.kick()
    await sender.sent(1.0, cancel=False)
    assert sent == ["a", "b", "c"] and sender._task is None and not sender.stopped


def test_text_frames_parse_back_as_final_unmasked_text_frames_at_every_length_size() -> None:
    from websockets.frames import Frame, Opcode
    from websockets.streams import StreamReader

    texts = ["", "é" * 62, "x" * 125, "y" * 126, "z" * 65535, "w" * 65536, '{"type":"ping"}']
    reader = StreamReader()
    reader.feed_data(text_frames(texts))
    reader.feed_eof()
    got = []
    for _ in texts:
        parser = Frame.parse(reader.read_exact, mask=False)
        with pytest.raises(StopIteration) as done:
            next(parser)
        frame = done.value.value
        assert frame.opcode is Opcode.TEXT and frame.fin
        got.append(frame.data.decode())
    assert got == texts and not reader.buffer  # nothing left over: the lengths were exact


class _Protocol:
    """A server protocol with ``send_now`` (as transports/wsserver.py's), paused on demand."""

    def __init__(self) -> None:
        self.paused = False
        self.written: list[list[str]] = []
        self.awaited: list[str] = []
        self.room = asyncio.Event()

    def send_now(self, texts: list[str]) -> bool:
        if self.paused:
            return False
        self.written.append(list(texts))
        return True

    async def send(self, message: dict[str, Any]) -> None:
        await self.room.wait()
        self.awaited.append(message["text"])


async def test_sender_writes_a_turns_frames_at_once_and_awaits_only_a_paused_transport() -> None:
    proto = _Protocol()
    queued: list[str] = []

    def take() -> list[str]:
        out = queued[:]
        queued.clear()
        return out

    sender = Sender(_socket(proto.send), take)
    for frame in ("a", "b"):
        queued.append(frame)
        sender.kick()
    await asyncio.sleep(0)
    assert proto.written == [["a", "b"]] and sender._task is None  # one write, no task

    proto.paused = True  # a full buffer: a task waits for room, later frames queue behind it
    queued.append("c")
    sender.kick()
    await asyncio.sleep(0)
    assert sender._task is not None and proto.written == [["a", "b"]]
    queued.append("d")
    sender.kick()
    proto.paused = False
    proto.room.set()
    await sender.sent(1.0, cancel=False)
    assert proto.awaited == ["c", "d"] and sender._task is None

    queued.append("e")  # queued and not yet flushed when the transport asks for it: out now
    sender.kick()
    await sender.sent(0)
    assert proto.written[-1] == ["e"]


async def test_sender_stops_when_the_socket_fails_and_sent_cancels_a_stuck_one() -> None:
    async def broken(message: dict[str, Any]) -> None:
        raise OSError("gone")

    frames = ["x"]
    sender = Sender(_socket(broken), lambda: [frames.pop()] if frames else [])
    sender.kick()
    await sender.sent(1.0, cancel=False)
    assert sender.stopped
    sender.kick()
    assert sender._task is None  # a failed socket gets no new sender

    never = asyncio.Event()

    async def stuck(message: dict[str, Any]) -> None:
        await never.wait()

    frames = ["y"]
    sender = Sender(_socket(stuck), lambda: [frames.pop()] if frames else [])
    sender.kick()
    await asyncio.sleep(0.01)
    await sender.sent(0.05)
    assert sender.stopped and sender._task is None


async def test_outbox_past_its_limit_overflows_once_and_takes_no_more() -> None:
    never = asyncio.Event()

    async def stuck(message: dict[str, Any]) -> None:
        await never.wait()

    outbox = Outbox(_socket(stuck), limit=3)
    overflows = []
    outbox.on_overflow = lambda: overflows.append(1)
    for i in range(10):
        outbox.put(str(i))
        await asyncio.sleep(0)
    assert overflows == [1] and outbox.overflowed and outbox.closed
    await outbox.sender.sent(0)


async def test_socket_after_close_sends_nothing_more() -> None:
    sent: list[dict[str, Any]] = []

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    ws = _socket(send)
    await ws.close(4000, "bye")
    await ws.close(4001, "again")
    with pytest.raises(Disconnected):
        await ws.send_all(["late"])
    assert sent == [{"type": "websocket.close", "code": 4000, "reason": "bye"}]


async def test_socket_reads_frames_then_disconnect() -> None:
    messages = [
        {"type": "websocket.receive", "text": "hi"},
        {"type": "websocket.receive", "bytes": b"\x01"},
        {"type": "websocket.receive", "text": "x" * 20},
        {"type": "websocket.disconnect", "code": 1000},
    ]

    async def receive() -> dict[str, Any]:
        return messages.pop(0)

    ws = _socket(receive=receive)
    assert await ws.receive_frame(10) == "hi"
    assert await ws.receive_frame(10) == b"\x01"
    with pytest.raises(FrameTooLarge):
        await ws.receive_frame(10)
    for _ in range(2):  # the disconnect, then no more reads from the server
        with pytest.raises(Disconnected):
            await ws.receive_frame(10)


async def test_heartbeat_pings_and_expires_only_while_waiting() -> None:
    pings: list[float] = []
    expired: list[float] = []
    loop = asyncio.get_running_loop()
    beat = Heartbeat(0.05, 0.15, lambda: pings.append(loop.time()), lambda: expired.append(1))
    try:
        beat.busy()
        await asyncio.sleep(0.3)  # busy: pings go on, silence does not count
        assert len(pings) >= 4 and expired == []
        start = loop.time()
        beat.waiting()
        await wait_until(lambda: expired, 2, "expiry")
        assert 0.14 <= loop.time() - start < 0.5 and expired == [1]
        count = len(pings)
        await asyncio.sleep(0.15)
        assert len(pings) == count  # expired: the timer stopped
    finally:
        beat.cancel()
    with pytest.raises(ValueError):
        Heartbeat(1.0, 0.5, lambda: None, lambda: None)


async def test_inbox_hands_messages_over_in_order_and_survives_a_cancelled_read() -> None:
    inbox = Inbox(asyncio.get_running_loop())
    reader = asyncio.create_task(inbox.get())
    await asyncio.sleep(0)
    with pytest.raises(RuntimeError):
        await inbox.get()  # one reader at a time
    inbox.put_nowait(1)
    inbox.put_nowait(2)
    assert await reader == 1 and inbox.qsize() == 1 and not inbox.empty()
    assert await inbox.get() == 2 and inbox.empty()
    cancelled = asyncio.create_task(inbox.get())
    await asyncio.sleep(0)
    cancelled.cancel()
    with pytest.raises(asyncio.CancelledError):
        await cancelled
    inbox.put_nowait(3)
    assert await inbox.get() == 3


async def test_gate_releases_every_waiter_and_forgets_cancelled_ones() -> None:
    gate = Gate(asyncio.get_running_loop())
    gate.set()
    assert gate.is_set() and await gate.wait()
    gate.clear()
    waiters = [asyncio.create_task(gate.wait()) for _ in range(3)]
    await asyncio.sleep(0)
    waiters[0].cancel()
    await asyncio.sleep(0)
    assert gate._waiters is not None and len(gate._waiters) == 2
    gate.set()
    assert await waiters[1] and await waiters[2]
    assert gate._waiters is None


# -- the protocol's own frame reading (transports/wsserver.py), byte by byte ---------------------


class _Wire:
    """A client that writes hand-made frames (any split, any flags) and parses what comes back
    with websockets' client protocol."""

    def __init__(self, url: str) -> None:
        from websockets.client import ClientProtocol
        from websockets.uri import parse_uri

        self.uri = parse_uri(url)
        self.proto = ClientProtocol(self.uri, max_size=None)
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def connect(self) -> None:
        from websockets.http11 import Response

        self.reader, self.writer = await asyncio.open_connection(self.uri.host, self.uri.port)
        self.proto.send_request(self.proto.connect())
        for data in self.proto.data_to_send():
            self.writer.write(data)
        while not any(isinstance(e, Response) for e in self.proto.events_received()):
            self.proto.receive_data(await self.reader.read(65536))

    def write(self, data: bytes, chunk: int = 0) -> None:
        assert self.writer is not None
        if not chunk:
            self.writer.write(data)
            return
        for i in range(0, len(data), chunk):
            self.writer.write(data[i : i + chunk])

    async def frames(self, until: Any, timeout: float = 10.0) -> list[Any]:
        """Frames from the server until ``until(frames)`` or the connection ends."""
        assert self.reader is not None
        got: list[Any] = []

        async def _read() -> None:
            while not until(got):
                data = await self.reader.read(65536)  # type: ignore[union-attr]
                if not data:
                    return
                self.proto.receive_data(data)
                got.extend(self.proto.events_received())

        await asyncio.wait_for(_read(), timeout)
        return got

    def close(self) -> None:
        if self.writer is not None:
            self.writer.transport.abort()


def _frame(
    opcode: int, payload: bytes | str, *, fin: bool = True, mask: bool = True, rsv: int = 0
) -> bytes:
    import os

    from websockets.frames import apply_mask

    data = payload.encode() if isinstance(payload, str) else payload
    head = bytes([(0x80 if fin else 0) | rsv | opcode])
    n = len(data)
    bit = 0x80 if mask else 0
    if n < 126:
        head += bytes([bit | n])
    elif n < 65536:
        head += bytes([bit | 126]) + n.to_bytes(2, "big")
    else:
        head += bytes([bit | 127]) + n.to_bytes(8, "big")
    if not mask:
        return head + data
    key = os.urandom(4)
    return head + key + apply_mask(data, key)


def _protocols(srv: RunningServer) -> list[Any]:
    return [p for p in srv.server.server_state.connections if isinstance(p, LeanWebSocketProtocol)]


def _texts(frames: list[Any]) -> list[dict[str, Any]]:
    return [json.loads(f.data) for f in frames if f.opcode.name == "TEXT"]


def _close_code(frames: list[Any]) -> int | None:
    from websockets.frames import Close

    for f in frames:
        if f.opcode.name == "CLOSE":
            return Close.parse(f.data).code
    return None


async def _hello(srv: RunningServer, wire: _Wire, chunk: int = 0) -> None:
    did, secret, _ = srv.device(0)
    wire.write(_frame(1, json.dumps({"type": "hello", "device_id": did, "secret": secret})), chunk)
    got = await wire.frames(lambda fs: bool(_texts(fs)))
    assert _texts(got)[0]["type"] == "welcome"


@contextlib.asynccontextmanager
async def _device_wire(
    tmp_path: Path, **overrides: Any
) -> AsyncIterator[tuple[RunningServer, _Wire]]:
    """A server with one patient, and a hand-made device connection past its ``hello``."""
    srv, task = await start_server(tmp_path, patients=1, **overrides)
    wire = _Wire(srv.ws_url + "/ws/device")
    try:
        await wire.connect()
        await _hello(srv, wire)
        yield srv, wire
    finally:
        wire.close()
        await stop_server(srv, task)


def _reading(seq: int) -> str:
    import time

    return json.dumps({"type": "reading", "seq": seq, "ts": time.time(), "spo2": 97, "hr": 70})


@pytest.mark.parametrize("chunk", [0, 1, 3, 7])
async def test_frames_in_one_write_or_split_anywhere_with_pings_are_all_read(
    tmp_path: Path, chunk: int
) -> None:
    srv, task = await start_server(tmp_path, patients=1)
    wire = _Wire(srv.ws_url + "/ws/device")
    try:
        await wire.connect()
        await _hello(srv, wire, chunk)
        items = [{"seq": s, "ts": 1.7e9 + s, "hr": 70, "spo2": 97} for s in range(2, 8)]
        long_reading = json.dumps({"type": "readings", "items": items})
        assert 126 <= len(long_reading) < 65536  # a 16-bit length
        data = (
            _frame(1, _reading(1))
            + _frame(9, b"ping!")  # a protocol ping: pong with the same payload
            + _frame(1, long_reading)
            + _frame(10, b"unsolicited")  # a pong nobody asked for: ignored
            + _frame(2, b'{"type":"ping","id":5}')  # binary frames are read too
        )
        wire.write(data, chunk)

        def done(fs: list[Any]) -> bool:
            texts = _texts(fs)
            return any(t.get("type") == "pong" for t in texts) and any(
                t.get("type") == "ack" and t["seq"] == 7 for t in texts
            )

        got = await wire.frames(done)
        assert [f.data for f in got if f.opcode.name == "PONG"] == [b"ping!"]
        assert {"type": "pong", "id": 5} in [
            {k: v for k, v in t.items() if k in ("type", "id")} for t in _texts(got)
        ]
        assert not [t for t in _texts(got) if t["type"] == "error"]
        assert srv.services.ingest._durable[srv.device(0)[0]] == 7
        assert [p._fast for p in _protocols(srv)] == [True]  # all read by the fast path
    finally:
        wire.close()
        await stop_server(srv, task)


async def test_a_fragmented_message_hands_the_rest_of_the_connection_to_websockets(
    tmp_path: Path,
) -> None:
    srv, task = await start_server(tmp_path, patients=1)
    wire = _Wire(srv.ws_url + "/ws/device")
    try:
        await wire.connect()
        await _hello(srv, wire)
        text = _reading(1)
        wire.write(_frame(1, text[:10], fin=False) + _frame(0, text[10:]) + _frame(1, _reading(2)))
        got = await wire.frames(lambda fs: any(t.get("seq") == 2 for t in _texts(fs)))
        assert [t["type"] for t in _texts(got)] == ["ack"] * len(_texts(got))
        assert [p._fast for p in _protocols(srv)] == [False]  # websockets reads from here on
        wire.write(_frame(8, (1000).to_bytes(2, "big")))  # a close, answered with a close
        got = await wire.frames(lambda fs: _close_code(fs) is not None)
        assert _close_code(got) == 1000
    finally:
        wire.close()
        await stop_server(srv, task)


@pytest.mark.parametrize(
    ("frame", "code"),
    [
        (_frame(1, b"\xff\xfe not utf-8"), 1007),  # invalid UTF-8
        (_frame(1, b'{"type":"ping"}', mask=False), 1002),  # an unmasked client frame
        (_frame(1, b'{"type":"ping"}', rsv=0x40), 1002),  # a reserved bit, no extension
        (_frame(9, b"p" * 126), 1002),  # a control frame over 125 bytes
        (_frame(1, "x" * 5000), 1009),  # past hard_frame_bytes
    ],
    ids=["not-utf-8", "unmasked", "reserved-bit", "long-control", "past-hard-bytes"],
)
async def test_a_bad_frame_gets_websockets_own_close_code(
    tmp_path: Path, frame: bytes, code: int
) -> None:
    srv, task = await start_server(
        tmp_path, patients=1, max_frame_bytes=2048, hard_frame_bytes=4096
    )
    wire = _Wire(srv.ws_url + "/ws/device")
    try:
        await wire.connect()
        await _hello(srv, wire)
        wire.write(frame)
        got = await wire.frames(lambda fs: _close_code(fs) is not None)
        assert _close_code(got) == code
    finally:
        wire.close()
        await stop_server(srv, task)


async def test_device_frames_are_taken_as_they_arrive_without_waking_a_coroutine(
    tmp_path: Path,
) -> None:
    async with _device_wire(tmp_path) as (srv, wire):
        (proto,) = _protocols(srv)
        assert proto.on_frame is not None
        await wait_until(lambda: proto.queue._waiter is not None, 5, "the handler waits")
        waiting = proto.queue._waiter  # the read the handler's coroutine is suspended in
        wire.write(b"".join(_frame(1, _reading(s)) for s in range(1, 6)))
        got = await wire.frames(lambda fs: any(t.get("seq") == 5 for t in _texts(fs)))
        assert [t["type"] for t in _texts(got)] == ["ack"] * len(_texts(got))
        assert srv.services.ingest._durable[srv.device(0)[0]] == 5
        # the five frames were taken inside the server's read: nothing woke the coroutine, which
        # still waits in the same read (no coroutine, future or message made per frame)
        assert proto.queue._waiter is waiting and proto.queue.empty()
        wire.write(_frame(8, (1000).to_bytes(2, "big")))
        await wire.frames(lambda fs: _close_code(fs) is not None)
        # the handler let go of its hook when it ended (the protocol would keep its state)
        await wait_until(lambda: proto.on_frame is None, 5, "the hook released")


async def test_a_device_frame_arriving_past_the_write_queue_bound_waits_and_keeps_its_order(
    tmp_path: Path,
) -> None:
    """Backpressure with frames taken as they arrive: a frame that comes while more than
    ``max_pending_rows`` rows wait is declined by the fast path, the handler waits for room,
    and it and every frame behind it are then taken in order, none lost or doubled."""
    srv, task = await start_server(tmp_path, patients=1, max_pending_rows=1000)
    svc = srv.services
    store = svc.store
    release = asyncio.Event()
    real_write = store.write_batch

    async def stalled(batch: Any) -> None:
        await release.wait()
        await real_write(batch)

    store.write_batch = stalled  # type: ignore[method-assign]
    wire = _Wire(srv.ws_url + "/ws/device")
    did = srv.device(0)[0]

    def batch(first: int, n: int) -> bytes:
        items = [{"seq": s, "ts": 1.7e9 + s, "hr": 70, "spo2": 97} for s in range(first, first + n)]
        return _frame(1, json.dumps({"type": "readings", "items": items}))

    try:
        await wire.connect()
        await _hello(srv, wire)
        # frames of 300 readings (600 rows: reading + event) until more than 1,000 rows wait
        # behind the stalled commit; each is taken while the queue is within its bound
        last = 0
        while svc.writer.pending_rows <= 1000:
            wire.write(batch(last + 1, 300))
            last += 300
            await wait_until(lambda n=last: svc.ingest._high.get(did) == n, 5, "frame taken")
        assert last <= 900
        wire.write(_frame(1, _reading(last + 1)) + _frame(1, _reading(last + 2)))
        await wait_until(lambda: bool(svc.writer._room_waiters), 5, "the handler waits for room")
        assert svc.ingest._high[did] == last  # the two are held back, not taken
        release.set()
        got = await wire.frames(lambda fs: any(t.get("seq") == last + 2 for t in _texts(fs)))
        assert not [t for t in _texts(got) if t["type"] == "error"]
        assert svc.ingest._durable[did] == last + 2
        # and frames are taken as they arrive again
        wire.write(_frame(1, _reading(last + 3)))
        await wire.frames(lambda fs: any(t.get("seq") == last + 3 for t in _texts(fs)))
        events = await store.events_after(f"patient:{srv.device(0)[2]}", 0, 10_000)
        seqs = [e.data["seq"] for e in events if e.kind == "reading"]
        assert seqs == list(range(1, last + 4))  # every reading stored once, in order
    finally:
        wire.close()
        await stop_server(srv, task)


async def test_a_peer_that_sends_but_never_answers_websocket_pings_is_closed_1011(
    tmp_path: Path,
) -> None:
    """The keepalive (WebSocket pings, on the Ticker): a device that keeps sending, so the 4004
    silence rule never fires, but never answers a WebSocket ping, is closed with 1011 once a
    ping goes unanswered for 4 × ``heartbeat_s``."""
    # the hand-made client never writes back the pongs its parser queues
    async with _device_wire(tmp_path, heartbeat_s=0.1) as (_srv, wire):
        loop = asyncio.get_running_loop()
        start = loop.time()
        got: list[Any] = []
        n = 0
        while _close_code(got) is None and loop.time() - start < 5:
            n += 1
            wire.write(_frame(1, json.dumps({"type": "ping", "id": n})))
            with contextlib.suppress(TimeoutError):
                got += await wire.frames(lambda fs: bool(fs), timeout=0.05)
        assert _close_code(got) == 1011
        assert [f.data for f in got if f.opcode.name == "CLOSE"][0][2:] == b"keepalive ping timeout"
        pings = [f for f in got if f.opcode.name == "PING"]
        assert len(pings) == 1  # one ping, unanswered; its deadline, not the next ping, came
        assert 0.4 <= loop.time() - start < 2.0  # ping after 0.1 s, then 4 × 0.1 s for a pong
        assert any(t.get("type") == "pong" for t in _texts(got))  # it was not silent


async def test_ticker_runs_entries_in_due_order_never_early_and_forgets_withdrawn_ones() -> None:
    from vitalwire.transports.common import TICK_S, ticker

    loop = asyncio.get_running_loop()
    t = ticker(loop)
    assert ticker(loop) is t  # one per loop
    ran: list[tuple[str, float]] = []

    class Entry:
        def __init__(self, name: str, when: float) -> None:
            self.name, self.when = name, when

        def due(self) -> None:
            ran.append((self.name, loop.time()))

    now = loop.time()
    entries = [Entry(n, now + d) for n, d in (("c", 0.09), ("a", 0.03), ("x", 0.05), ("b", 0.06))]
    keys = {e.name: t.add(e, e.when) for e in entries}
    t.discard(entries[2], keys["x"])  # withdrawn: never runs

    class Rival:  # two in one slot, each withdrawing the other: whichever runs first wins
        other: Rival

        def due(self) -> None:
            t.discard(self.other, key)
            ran.append(("rival", loop.time()))

    r1, r2 = Rival(), Rival()
    r1.other, r2.other = r2, r1
    key = t.add(r1, now + 0.06)
    assert t.add(r2, now + 0.06) == key
    await wait_until(lambda: "c" in [n for n, _ in ran], 2, "entries run")
    assert [n for n, _ in ran] == ["a", "b", "rival", "c"] or [n for n, _ in ran] == [
        "a",
        "rival",
        "b",
        "c",
    ]
    for name, at in ran:
        if name in keys:
            assert at >= next(e.when for e in entries if e.name == name) - 0.001  # never early
    assert len(t) == 0
    assert TICK_S <= 0.01
