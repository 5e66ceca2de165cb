"""The device client: hello, send readings, reconnect with backoff, resend what is not acknowledged.

How it works: every reading gets the next ``seq`` and goes into a bounded buffer of unacknowledged
readings. A sender task transmits the buffer in order; the server's cumulative ``ack`` trims it.
After a reconnect the server's ``welcome`` says the last durable seq: everything after it is sent
again (the server drops duplicates by (device, seq)). Past ``buffer_size`` the oldest readings are
dropped and counted in :attr:`DeviceClient.dropped`.

Store-and-forward: with ``spool_path`` the buffer lives in an SQLite file as well, so readings
survive a device restart; the next run loads them and resends. A device that restarted without
a spool learns from ``welcome.high_seq`` where the server's numbering stands and renumbers its
unsent readings after it, so they are not mistaken for duplicates.

One identity, one unit: when the server closes the connection with 4009 (``REPLACED``: another
connection of this device id took over while this one was alive), another unit is using this
identity (a cloned device, a replaced unit still running). The client does not fight for it: it
stops, keeps its unacknowledged readings (buffer and spool) for whoever sorts it out, logs a
warning and sets :attr:`DeviceClient.failure` to :class:`IdentityConflict`, which
:meth:`DeviceClient.wait_connected` and :meth:`DeviceClient.flush` raise. A reading answered with
``conflicting_seq`` (its seq was already used by another reading) is not resent: it moves from the
buffer to :attr:`DeviceClient.conflicted` and is reported like any error (:attr:`errors`,
``on_error``, a warning in the log).

Report by exception (push on change): with a :class:`ReportByException` policy, a measurement is
sent only when a metric moved past its deadband since the last one sent, or when ``max_silence_s``
has passed, so a stable patient costs little bandwidth and silence never looks like a dead device.

Commands (server -> device): register a handler per command name with
:meth:`DeviceClient.on_command` or the :meth:`DeviceClient.command` decorator; a handler takes the
:class:`~vitalwire.wire.Command` and returns a dict (the result's ``data``) or ``None``, sync or
async. When a ``command`` arrives the client answers ``acknowledged`` at once and runs the handler
in its own task (the receive loop never waits for it), then answers ``completed`` with the returned
data, or ``failed`` with the exception's message; a name without a handler is ``failed`` with
"not supported: <name>". A final answer that cannot be sent because the connection dropped is kept
(a small bounded queue) and sent right after the next ``welcome``. The last 1000 command ids are
remembered: the same id again (the server may resend an idempotent command after a restart) never
runs the handler twice: it gets the stored final answer, or ``acknowledged`` while the handler
still runs. :meth:`DeviceClient.send_waveform` streams samples (best effort, not buffered) and
:meth:`DeviceClient.reconnect_now` drops the connection and reconnects at once; called from a
handler (``reset``), it waits until that command's final answer has been written.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import inspect
import logging
import random
import sqlite3
import ssl as ssl_module
import time
from collections import OrderedDict, deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import msgspec
import websockets
from websockets.asyncio.client import ClientConnection, connect

from vitalwire import wire
from vitalwire.sdk import tls
from vitalwire.sdk.errors import ConnectFailed, connect_reason

log = logging.getLogger("vitalwire.sdk.device")

#: A command handler: takes the command, returns the result's ``data`` (or ``None``); may be async.
CommandHandler = Callable[[wire.Command], Awaitable[dict[str, Any] | None] | dict[str, Any] | None]

#: Command ids remembered so a resent command does not run twice.
REMEMBERED_COMMANDS = 1000
#: Final command results kept while disconnected, sent after the next welcome.
PENDING_RESULTS = 256
#: Readings refused with ``conflicting_seq`` kept in :attr:`DeviceClient.conflicted`.
CONFLICTED_KEPT = 1000


class IdentityConflict(ConnectFailed):
    """The server replaced this connection with another of the same device id (close 4009):
    another unit uses this identity, and this client stopped."""


#: The (client, command id) whose handler is running in this task, for :meth:`reconnect_now`.
_HANDLING: contextvars.ContextVar[tuple[object, str] | None] = contextvars.ContextVar(
    "vitalwire_handling_command", default=None
)

#: Default deadbands for report by exception (units of each metric).
DEFAULT_DEADBANDS: dict[str, float] = {
    "spo2": 1.0,
    "pulse": 2.0,
    "hr": 2.0,
    "rr": 1.0,
    "temp_c": 0.1,
    "sbp": 3.0,
    "dbp": 3.0,
    "pi": 0.5,
    "battery": 5.0,
}


@dataclass
class ReportByException:
    """Send a measurement only when it changed past a deadband, or after ``max_silence_s``."""

    deadbands: dict[str, float] = field(default_factory=lambda: dict(DEFAULT_DEADBANDS))
    max_silence_s: float = 30.0
    _last: dict[str, Any] = field(default_factory=dict)
    _last_ts: float | None = None

    def should_send(self, values: dict[str, Any], ts: float) -> bool:
        if self._last_ts is None or ts - self._last_ts >= self.max_silence_s:
            return True
        if set(values) != set(self._last):
            return True
        for name, value in values.items():
            old = self._last.get(name)
            if isinstance(value, bool) or name not in self.deadbands:
                if value != old:
                    return True
            elif old is None or abs(float(value) - float(old)) >= self.deadbands[name]:
                return True
        return False

    def sent(self, values: dict[str, Any], ts: float) -> None:
        self._last = dict(values)
        self._last_ts = ts


def _device_url(url: str) -> str:
    """``http(s)://host[:port]`` or a ``ws(s)://`` URL -> the ``/ws/device`` URL."""
    url = url.rstrip("/")
    url += "" if url.endswith("/ws/device") else "/ws/device"
    return url.replace("http://", "ws://").replace("https://", "wss://")


class DeviceClient:
    """A device's connection to vitalwire. Use as an async context manager or start()/close()."""

    def __init__(
        self,
        url: str | Sequence[str],
        device_id: str,
        secret: str,
        *,
        firmware: str | None = "vitalwire-sdk",
        buffer_size: int = 10_000,
        report: ReportByException | None = None,
        clock: Callable[[], float] = time.time,
        backoff_initial_s: float = 0.2,
        backoff_max_s: float = 10.0,
        max_batch: int = 200,
        spool_path: str | None = None,
        ssl: ssl_module.SSLContext | None = None,
    ) -> None:
        #: Every address of the service (several nodes, or a load balancer's): a device whose
        #: connection fails or ends tries the next one (docs/howto-cluster.md).
        self.urls = [_device_url(u) for u in ([url] if isinstance(url, str) else url)]
        if not self.urls:
            raise ValueError("url: give at least one address")
        self.url = self.urls[0]
        self.device_id = device_id
        self.secret = secret
        self.firmware = firmware
        self.buffer_size = buffer_size
        self.report = report
        self.clock = clock
        self.backoff_initial_s = backoff_initial_s
        self.backoff_max_s = backoff_max_s
        self.max_batch = max_batch
        #: TLS context for wss://: certificates are always verified, by default against
        #: :func:`vitalwire.sdk.tls.client_context` (system store, SSL_CERT_FILE, --cacert)
        self.ssl = ssl
        if ssl is None and self.url.startswith("wss://"):
            self.ssl = tls.client_context()
        #: Why the last connection attempt failed (``None`` once one succeeds).
        self.last_error: str | None = None
        #: Set when the client gave up: the server's TLS certificate is not trusted (retrying
        #: cannot help); :meth:`wait_connected` and :meth:`flush` raise it.
        self.failure: ConnectFailed | None = None
        self.max_frame_bytes = 65536  # until the server's welcome says otherwise
        # False until a welcome confirms our numbering continues the server's; a device that
        # restarted without its spool must renumber readings the server has already seen
        self._numbering_known = False
        self.seq = 0
        self.acked = 0
        self.dropped = 0
        self.skipped = 0  # measurements not sent because of report by exception
        self.errors: list[wire.Error] = []
        self.patient_id: str | None = None
        self.connections = 0
        self.close_codes: list[int | None] = []  # close code of each connection that ended
        self.on_error: Callable[[wire.Error], None] | None = None
        self.on_message: Callable[[Any], Awaitable[None] | None] | None = None
        self.results_dropped = 0  # final command results lost: the pending queue overflowed
        #: readings the server refused as ``conflicting_seq`` (the last CONFLICTED_KEPT)
        self.conflicted: deque[wire.ReadingBody] = deque(maxlen=CONFLICTED_KEPT)
        self._handlers: dict[str, CommandHandler] = {}
        self._handled: OrderedDict[str, wire.CommandResult | None] = OrderedDict()
        self._command_tasks: dict[str, asyncio.Task[None]] = {}
        self._pending_results: deque[wire.CommandResult] = deque()
        self._drop_after: set[str] = set()
        self._reconnect_fast = False
        self._buffer: deque[wire.ReadingBody] = deque()
        self._sent_upto = 0
        self._new = asyncio.Event()
        self._acked_cond = asyncio.Condition()
        self._connected = asyncio.Event()
        self._ws: ClientConnection | None = None
        self._task: asyncio.Task[None] | None = None
        self._closing = False
        self._spool: sqlite3.Connection | None = None
        if spool_path is not None:
            self._open_spool(spool_path)

    # -- spool ----------------------------------------------------------------------------------

    def _open_spool(self, path: str) -> None:
        db = sqlite3.connect(path, isolation_level=None)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=NORMAL")
        db.execute("CREATE TABLE IF NOT EXISTS spool (seq INTEGER PRIMARY KEY, body BLOB NOT NULL)")
        db.execute("CREATE TABLE IF NOT EXISTS state (k TEXT PRIMARY KEY, v INTEGER NOT NULL)")
        self._spool = db
        row = db.execute("SELECT v FROM state WHERE k = 'seq'").fetchone()
        self.seq = int(row[0]) if row else 0
        self._numbering_known = row is not None  # the spool carries the numbering across runs
        for (body,) in db.execute("SELECT body FROM spool ORDER BY seq"):
            reading = msgspec.json.decode(body, type=wire.ReadingBody)
            self._buffer.append(reading)
            self.seq = max(self.seq, reading.seq)

    def _spool_add(self, body: wire.ReadingBody, dropped_upto: int | None) -> None:
        db = self._spool
        assert db is not None
        db.execute("BEGIN")
        db.execute("INSERT OR REPLACE INTO spool VALUES (?, ?)", (body.seq, wire.encode(body)))
        db.execute("INSERT OR REPLACE INTO state VALUES ('seq', ?)", (self.seq,))
        if dropped_upto is not None:
            db.execute("DELETE FROM spool WHERE seq <= ?", (dropped_upto,))
        db.execute("COMMIT")

    def _spool_trim(self, upto: int) -> None:
        if self._spool is not None:
            self._spool.execute("DELETE FROM spool WHERE seq <= ?", (upto,))

    def _spool_rewrite(self) -> None:
        db = self._spool
        if db is None:
            return
        db.execute("BEGIN")
        db.execute("DELETE FROM spool")
        db.executemany(
            "INSERT INTO spool VALUES (?, ?)", [(b.seq, wire.encode(b)) for b in self._buffer]
        )
        db.execute("INSERT OR REPLACE INTO state VALUES ('seq', ?)", (self.seq,))
        db.execute("COMMIT")

    def _spool_remove(self, seq: int) -> None:
        if self._spool is not None:
            self._spool.execute("DELETE FROM spool WHERE seq = ?", (seq,))

    # -- lifecycle ------------------------------------------------------------------------------

    async def __aenter__(self) -> DeviceClient:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def start(self, *, wait: bool = True, timeout: float = 10.0) -> None:
        """Start connecting (and reconnecting). With ``wait``, return once welcomed."""
        self._task = asyncio.create_task(self._run(), name=f"device-{self.device_id}")
        if wait:
            await self.wait_connected(timeout)

    async def wait_connected(self, timeout: float = 10.0) -> None:
        """Wait for a session (a ``welcome``).

        Raises:
            ConnectFailed: the client gave up (:attr:`failure`), or it has never connected and
                ``timeout`` passed (naming the last attempt's error).
            TimeoutError: ``timeout`` passed otherwise.
        """
        connected = asyncio.ensure_future(self._connected.wait())
        waits: set[asyncio.Future[Any]] = {connected}
        if self._task is not None:
            waits.add(self._task)
        try:
            await asyncio.wait(waits, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        finally:
            connected.cancel()
        if self._connected.is_set():
            return
        self._raise_if_unreachable()
        raise TimeoutError(f"device {self.device_id}: no session within {timeout} s")

    def _raise_if_unreachable(self) -> None:
        if self.failure is not None:
            raise self.failure
        if self.connections == 0 and self.last_error is not None:
            raise ConnectFailed(self.url, self.last_error)

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    async def close(self) -> None:
        self._closing = True
        tasks = list(self._command_tasks.values())
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(BaseException):
                await task
        if self._ws is not None:
            with contextlib.suppress(Exception):
                await self._ws.close()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(BaseException):
                await self._task
        if self._spool is not None:
            self._spool.close()
            self._spool = None

    async def drop_connection(self) -> None:
        """Abort the current connection (tests, simulated network loss); it reconnects."""
        ws = self._ws
        if ws is not None:
            ws.transport.abort()

    async def reconnect_now(self) -> None:
        """Close the connection cleanly and reconnect at once (no backoff), e.g. for ``reset``.

        Called from a command handler, the close waits until that command's final result has been
        written, so the server gets ``completed`` before the connection ends.
        """
        handling = _HANDLING.get()
        if handling is not None and handling[0] is self and handling[1] in self._command_tasks:
            self._drop_after.add(handling[1])
            return
        ws = self._ws
        if ws is not None:
            await self._close_for_reconnect(ws)

    async def _close_for_reconnect(self, ws: ClientConnection) -> None:
        if ws is not self._ws:
            return  # that connection is gone already
        self._reconnect_fast = True
        with contextlib.suppress(Exception):
            await ws.close()

    # -- commands -------------------------------------------------------------------------------

    def on_command(self, name: str, handler: CommandHandler) -> None:
        """Handle the command ``name`` with ``handler`` (replacing any earlier one)."""
        self._handlers[name] = handler

    def command(self, name: str) -> Callable[[CommandHandler], CommandHandler]:
        """Decorator form of :meth:`on_command`: ``@client.command("reset")``."""

        def register(handler: CommandHandler) -> CommandHandler:
            self.on_command(name, handler)
            return handler

        return register

    @property
    def commands_running(self) -> int:
        return len(self._command_tasks)

    async def send_waveform(
        self,
        samples: list[float],
        rate_hz: float,
        ts: float,
        kind: str = "pleth",
        command_id: str | None = None,
    ) -> bool:
        """Send a chunk of waveform samples now; return whether it was sent.

        Best effort: nothing is buffered while disconnected (a waveform is for live viewing).
        """
        ws = self._ws
        if ws is None or not self._connected.is_set():
            return False
        frame = wire.Waveform(ts, rate_hz, list(samples), kind=kind, command_id=command_id)
        try:
            await ws.send(wire.encode_text(frame))
        except Exception as exc:  # the connection just dropped
            log.debug("device %s waveform not sent: %r", self.device_id, exc)
            return False
        return True

    async def _on_command(self, ws: ClientConnection, cmd: wire.Command) -> None:
        """A command arrived (in the receive loop: never wait for the handler here)."""
        cid = cmd.command_id
        if cid in self._handled:
            known = self._handled[cid]
            self._handled.move_to_end(cid)
            if known is None:  # still running
                known = wire.CommandResult(cid, "acknowledged")
            await ws.send(wire.encode_text(known))
            return
        handler = self._handlers.get(cmd.name)
        if handler is None:
            result = wire.CommandResult(cid, "failed", message=f"not supported: {cmd.name}")
            self._remember(cid, result)
            await ws.send(wire.encode_text(result))
            return
        self._remember(cid, None)
        try:  # acknowledged goes out before the handler can answer anything
            await ws.send(wire.encode_text(wire.CommandResult(cid, "acknowledged")))
        finally:  # it arrived, so it runs even if the ack was lost; the result waits if need be
            self._command_tasks[cid] = asyncio.create_task(
                self._run_command(cmd, handler), name=f"command-{cmd.name}-{cid}"
            )

    def _remember(self, cid: str, result: wire.CommandResult | None) -> None:
        self._handled[cid] = result
        self._handled.move_to_end(cid)
        while len(self._handled) > REMEMBERED_COMMANDS:
            self._handled.popitem(last=False)

    async def _run_command(self, cmd: wire.Command, handler: CommandHandler) -> None:
        cid = cmd.command_id
        _HANDLING.set((self, cid))
        try:
            try:
                out = handler(cmd)
                if inspect.isawaitable(out):
                    out = await out
                if out is not None and not isinstance(out, dict):
                    raise TypeError(f"handler returned {type(out).__name__}, not a dict")
                result = wire.CommandResult(cid, "completed", data=out)
                wire.encode(result)  # a result that cannot be encoded is a failure, not a crash
            except asyncio.CancelledError:
                task = asyncio.current_task()
                if self._closing or (task is not None and task.cancelling()):
                    raise
                result = wire.CommandResult(cid, "failed", message="cancelled")
            except Exception as exc:
                log.info("device %s command %s (%s) failed: %r", self.device_id, cmd.name, cid, exc)
                result = wire.CommandResult(cid, "failed", message=str(exc) or type(exc).__name__)
            self._remember(cid, result)
            sent_on = await self._deliver(result)
            if cid in self._drop_after and sent_on is not None:
                await self._close_for_reconnect(sent_on)
        finally:
            self._drop_after.discard(cid)
            self._command_tasks.pop(cid, None)

    async def _deliver(self, result: wire.CommandResult) -> ClientConnection | None:
        """Send a final result now, or queue it for the next connection. Return the connection
        it was written to (``None``: queued)."""
        ws = self._ws
        if ws is not None and self._connected.is_set() and not self._pending_results:
            try:
                await ws.send(wire.encode_text(result))
                return ws
            except Exception as exc:  # dropped meanwhile: keep it for the next connection
                log.debug("device %s result queued: %r", self.device_id, exc)
        self._pending_results.append(result)
        while len(self._pending_results) > PENDING_RESULTS:
            self._pending_results.popleft()
            self.results_dropped += 1
        return None

    async def _send_pending_results(self, ws: ClientConnection) -> None:
        # Results finishing meanwhile are appended (not connected yet) and sent by this loop.
        while self._pending_results:
            await ws.send(wire.encode_text(self._pending_results[0]))
            self._pending_results.popleft()

    # -- sending --------------------------------------------------------------------------------

    def send(
        self,
        values: dict[str, Any] | None = None,
        ts: float | None = None,
        *,
        force: bool = False,
        **kw: Any,
    ) -> int:
        """Queue one reading; return its seq, or 0 when report by exception skipped it.

        ``force`` sends it even when report by exception would not (``report_now``, bursts).
        """
        values = {**(values or {}), **kw}
        ts = self.clock() if ts is None else ts
        if self.report is not None:
            if not force and not self.report.should_send(values, ts):
                self.skipped += 1
                return 0
            self.report.sent(values, ts)
        self.seq += 1
        body = wire.ReadingBody(seq=self.seq, ts=ts, **values)
        self._buffer.append(body)
        dropped_upto = None
        while len(self._buffer) > self.buffer_size:
            dropped_upto = self._buffer.popleft().seq
            self.dropped += 1
        if self._spool is not None:
            self._spool_add(body, dropped_upto)
        self._new.set()
        return self.seq

    @property
    def unacked(self) -> int:
        return len(self._buffer)

    async def flush(self, timeout: float = 10.0) -> None:
        """Wait until every reading sent so far is acknowledged (durable on the server).

        Raises:
            ConnectFailed: the client gave up (:attr:`failure`), or it never connected within
                ``timeout`` (naming why).
            TimeoutError: not everything was acknowledged within ``timeout``.
        """
        target = self.seq

        async def _wait() -> None:
            async with self._acked_cond:
                await self._acked_cond.wait_for(
                    lambda: self.acked >= target or not self._buffer or self.failure is not None
                )

        try:
            await asyncio.wait_for(_wait(), timeout)
        except TimeoutError:
            self._raise_if_unreachable()
            raise
        if self.failure is not None:
            raise self.failure

    async def send_raw(self, frame: str) -> None:
        """Send a frame as-is (tests of the server's validation)."""
        assert self._ws is not None
        await self._ws.send(frame)

    # -- connection loop ------------------------------------------------------------------------

    async def _run(self) -> None:
        delay = self.backoff_initial_s
        while not self._closing:
            try:
                async with connect(
                    self.url,
                    proxy=None,
                    max_size=2**20,
                    ping_interval=20,
                    open_timeout=5,
                    ssl=self.ssl if self.url.startswith("wss://") else None,
                ) as ws:
                    self._ws = ws
                    await self._session(ws)
                    delay = self.backoff_initial_s
                if ws.close_code == wire.Close.REPLACED and not self._closing:
                    await self._stop_replaced()
                    return
            except asyncio.CancelledError:
                raise
            except ssl_module.SSLCertVerificationError as exc:  # configuration, not the network
                self.failure = ConnectFailed(self.url, connect_reason(exc))
                log.info("device %s: %s", self.device_id, self.failure)
                async with self._acked_cond:
                    self._acked_cond.notify_all()
                return
            except Exception as exc:  # network errors, server restarts: retry with backoff
                log.debug("device %s connection ended: %r", self.device_id, exc)
                if not self._connected.is_set():  # refused before a welcome: say why
                    self.last_error = connect_reason(exc)
            finally:
                self._ws = None
                self._connected.clear()
            if self._closing:
                return
            if len(self.urls) > 1:  # the next address: this one failed, or its node went away
                self.url = self.urls[(self.urls.index(self.url) + 1) % len(self.urls)]
                if self.url != self.urls[0]:
                    # a node down: the next one at once (the back-off grows once per round)
                    await asyncio.sleep(self.backoff_initial_s * random.random())
                    continue
            if self._reconnect_fast:  # reconnect_now(): come back at once
                self._reconnect_fast = False
                delay = self.backoff_initial_s
                continue
            await asyncio.sleep(delay * (0.5 + random.random()))
            delay = min(delay * 2, self.backoff_max_s)

    async def _stop_replaced(self) -> None:
        """Another unit took this identity over while we were connected: stop, keep what is
        unacknowledged, and say so (a displaced device that reconnected would displace the
        other in turn, and both units' readings would interleave in one patient's stream)."""
        kept = "in its spool" if self._spool is not None else "in its buffer"
        self.failure = IdentityConflict(
            self.url,
            f"device {self.device_id} was replaced by another connection with its identity "
            f"(close 4009): another unit uses it; this one stopped, and its {self.unacked} "
            f"unacknowledged readings stay {kept}",
        )
        log.warning("device %s: %s", self.device_id, self.failure)
        async with self._acked_cond:
            self._acked_cond.notify_all()

    async def _session(self, ws: ClientConnection) -> None:
        hello = wire.Hello(
            self.device_id,
            self.secret,
            self.firmware,
            last_seq=self.seq,
            max_silence_s=self.report.max_silence_s if self.report is not None else None,
        )
        await ws.send(wire.encode_text(hello))
        welcome = wire.decode_from_server_to_device(await ws.recv())
        if isinstance(welcome, wire.Error):
            self.errors.append(welcome)
            raise ConnectionError(f"{welcome.code}: {welcome.message}")
        assert isinstance(welcome, wire.Welcome)
        self.patient_id = welcome.patient_id
        first_unsent = self._buffer[0].seq if self._buffer else self.seq + 1
        if welcome.high_seq > self.seq or (
            not self._numbering_known and first_unsent <= welcome.high_seq
        ):
            # we restarted without our numbering: the server has seen these seqs already
            self._renumber(welcome.high_seq)
        self._numbering_known = True
        self.max_frame_bytes = welcome.max_frame_bytes
        await self._on_ack(welcome.last_seq)
        self._sent_upto = welcome.last_seq
        self.max_batch = min(self.max_batch, welcome.max_batch)
        await self._send_pending_results(ws)
        self.connections += 1
        self.last_error = None
        self._connected.set()
        sender = asyncio.create_task(self._sender(ws))
        try:
            async for raw in ws:
                msg = wire.decode_from_server_to_device(raw)
                if isinstance(msg, wire.Ack):
                    await self._on_ack(msg.seq)
                elif isinstance(msg, wire.Error):
                    self._on_server_error(msg)
                elif isinstance(msg, wire.Ping):
                    await ws.send(wire.encode_text(wire.Pong(id=msg.id, ts=msg.ts)))
                elif isinstance(msg, wire.Command):
                    await self._on_command(ws, msg)
                if self.on_message is not None:
                    result = self.on_message(msg)
                    if result is not None:
                        await result
        except websockets.ConnectionClosed:
            pass
        finally:
            self.close_codes.append(ws.close_code)
            sender.cancel()
            with contextlib.suppress(BaseException):
                await sender

    async def _sender(self, ws: ClientConnection) -> None:
        while True:
            pending = [b for b in self._buffer if b.seq > self._sent_upto]
            if not pending:
                self._new.clear()
                await self._new.wait()
                continue
            for i in range(0, len(pending), self.max_batch):
                for chunk, frame in self._frames(pending[i : i + self.max_batch]):
                    await ws.send(frame)
                    self._sent_upto = chunk[-1].seq

    def _frames(self, chunk: list[wire.ReadingBody]) -> list[tuple[list[wire.ReadingBody], str]]:
        """Encode readings as frames within the server's frame limit (a frame refused whole
        could let a later ack cover readings never stored, so none is ever sent too big)."""
        if len(chunk) == 1:
            return [(chunk, wire.encode_text(wire.Reading(**_fields(chunk[0]))))]
        frame = wire.encode_text(wire.Readings(chunk))
        if len(frame.encode()) <= self.max_frame_bytes:
            return [(chunk, frame)]
        half = len(chunk) // 2
        return self._frames(chunk[:half]) + self._frames(chunk[half:])

    def _renumber(self, high: int) -> None:
        """The server has seen seqs up to ``high`` but we have not: we restarted without a spool.
        Number our unsent readings after it."""
        log.info("device %s renumbers after seq %d (restarted?)", self.device_id, high)
        renumbered: deque[wire.ReadingBody] = deque()
        for i, body in enumerate(self._buffer, start=high + 1):
            renumbered.append(msgspec.structs.replace(body, seq=i))
        self._buffer = renumbered
        self.seq = high + len(renumbered)
        self._spool_rewrite()

    async def _on_ack(self, seq: int) -> None:
        if seq > self.acked:
            self.acked = seq
        trimmed = False
        while self._buffer and self._buffer[0].seq <= self.acked:
            self._buffer.popleft()
            trimmed = True
        if trimmed:
            self._spool_trim(self.acked)
        async with self._acked_cond:
            self._acked_cond.notify_all()

    def _on_server_error(self, err: wire.Error) -> None:
        self.errors.append(err)
        if err.seq is not None:  # this reading was rejected for good: never resend it
            if err.code == "conflicting_seq":
                self.conflicted.extend(b for b in self._buffer if b.seq == err.seq)
                log.warning("device %s: %s", self.device_id, err.message)
            self._buffer = deque(b for b in self._buffer if b.seq != err.seq)
            self._spool_remove(err.seq)
        if self.on_error is not None:
            self.on_error(err)


def _fields(body: wire.ReadingBody) -> dict[str, Any]:
    return {f: getattr(body, f) for f in body.__struct_fields__}
