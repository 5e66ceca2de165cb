"""The edge's side of the edge tier: forward every committed event to the cloud, take its requests.

An edge node is a whole vitalwire (its devices, clients, store, alerts and commands work as on any
server) that also dials out to a cloud (``--upstream``; hospital firewalls let nothing in) over
one WebSocket, ``/ws/edge`` (services/edges.py is the other end):

1. ``edge_hello`` (node id and secret, a device of kind ``edge`` at the cloud) -> ``edge_welcome``;
2. ``edge_patients``: the patients whose streams this node owns -> ``edge_heads``: the last offset
   the cloud holds of each stream;
3. then, for as long as the link lasts: every event after those heads, read from this node's own
   event log (the bus's history, then the store: the source of truth), in each stream's order,
   ``edge_events`` frames of at most :data:`BATCH` events, with at most ``upstream_window``
   events unacknowledged; the cloud acknowledges (``edge_ack``) once they are durable there.

Store and forward is that and nothing more: the edge keeps no outbox of its own. Its store holds
every event it committed, and the cloud's heads say where to start; an outage, a restart of
either side or a kill -9 ends in the same reconnect, and the cloud drops what it already has by
offset. Events are forwarded only once committed here (the bus publishes after the commit), so
an offset the cloud holds can never be given to another event here.

The cloud's requests (``edge_call``: a command, an acknowledgement, limits, observations) run
through this node's own services as the cloud's clinician (``Principal.upstream``: the cloud
checked their access), and are answered with ``edge_reply``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import msgspec
import websockets
from websockets.asyncio.client import ClientConnection, connect

from vitalwire import wire
from vitalwire.core import errors as e
from vitalwire.core import events as ev
from vitalwire.sdk import tls
from vitalwire.services.auth import Principal
from vitalwire.services.ingest import Unavailable

if TYPE_CHECKING:
    from vitalwire.services.container import Services

log = logging.getLogger("vitalwire.uplink")

#: Events per ``edge_events`` frame, at most.
BATCH = 1000
#: Reconnect back-off: the first wait, doubled up to the last (with jitter).
BACKOFF_S = (0.2, 5.0)
#: ... and at most about this many bytes (the cloud reads frames up to ``hard_frame_bytes``,
#: 1 MiB by default; waveform chunks are large events).
BATCH_BYTES = 512 * 1024
#: How often the edge reports its backlog to the cloud.
STATUS_EVERY_S = 1.0
#: How often the edge looks for changes of its patients' records (a discharge) to send.
PATIENTS_EVERY_S = 5.0
#: A frame from the cloud is at most this large (acks and calls are small).
MAX_FRAME = 1 << 20

_ERROR_CODES: tuple[tuple[type[BaseException], str], ...] = (
    (e.InvalidReading, "invalid_reading"),
    (e.InvalidMessage, "invalid_message"),
    (e.Forbidden, "forbidden"),
    (e.NotFound, "not_found"),
    (e.Conflict, "conflict"),
    (e.RateLimited, "rate_limited"),
    (Unavailable, "unavailable"),
)


def error_code(exc: e.PeerError) -> str:
    """The wire code of a request's error (its class on the other side: edges.error_from)."""
    return next((c for cls, c in _ERROR_CODES if isinstance(exc, cls)), "bad_request")


async def run_request(
    svc: Services,
    who: Principal,
    op: str,
    pid: str,
    args: dict[str, Any],
    origin: str | None,
    *,
    internal: bool = False,
) -> Any:
    """Run a request another node authorised for ``who`` (a cloud for its edge, or a node of
    the cluster for the node that writes the patient's stream) through this node's services.

    ``op``: ``command``, ``ack_alert``, ``set_limits`` or ``set_observations``; between the
    nodes of a cluster (``internal``) also ``discharge`` (the patient's open alerts end) and
    ``binding`` (a device bound or unbound: the stream's event)."""
    ev.check_id("patient_id", pid)
    if internal and op == "discharge":
        return await svc.alerts.discharge(pid, str(args.get("by", who.name)))
    if internal and op == "binding":
        did, action = str(args.get("device", "")), str(args.get("action", ""))
        ev.check_id("device_id", did)
        svc.registry.write_binding_event(pid, did, action, float(args.get("at", svc.clock())))
        return None
    if op == "command":
        body = {**args, "patient_id": pid, "type": "command"}
        req = msgspec.convert(body, wire.SendCommand)
        return await svc.commands.send(who, req, None, origin)
    if op == "ack_alert":
        return await svc.alerts.acknowledge(who, str(args.get("alert_id", "")), origin)
    if op == "set_limits":
        return await svc.alerts.set_limits(who, pid, args.get("overrides") or {}, origin)
    if op == "set_observations":
        return await svc.alerts.set_observations(who, pid, args.get("observations") or {}, origin)
    raise e.InvalidMessage(f"unknown op {op!r:.40}", field="op")


def upstream_url(url: str) -> str:
    """The cloud's ``/ws/edge`` for ``--upstream``: the path is added when none is given."""
    parts = urlsplit(url)
    return url.rstrip("/") + "/ws/edge" if parts.path in ("", "/") else url


def upstream_secret(settings: Any) -> str:
    if settings.upstream_secret_file:
        return str(Path(settings.upstream_secret_file).read_text().strip())
    return str(settings.upstream_secret)


class Uplink:
    """The edge node's link to its cloud: ``run`` keeps it up for the life of the server."""

    def __init__(self, svc: Services) -> None:
        self.svc = svc
        s = svc.settings
        self.url = upstream_url(s.upstream)
        self.node = s.node_id
        self.window = s.upstream_window
        self.connected = False
        self.connected_since: float | None = None
        self.down_since: float | None = svc.clock()
        self.last_error: str | None = None
        self.sessions = 0  # links opened
        self.refused: dict[str, str] = {}  # patient -> why the cloud refused it
        self._acked: dict[str, int] = {}  # stream -> durable at the cloud up to
        self._sent: dict[str, int] = {}  # stream -> sent up to (claimed streams only)
        self._claimed: set[str] = set()  # patients sent in edge_patients on this link
        self._wake = asyncio.Event()
        self._ws: ClientConnection | None = None
        self._calls: set[asyncio.Task[None]] = set()
        svc.streams.taps.append(self._on_events)

    # -- what the edge shows ------------------------------------------------------------------

    def backlog(self) -> int:
        """Events committed here that the cloud has not acknowledged (every patient stream)."""
        streams = self.svc.streams
        total = 0
        for stream in streams.patient_streams():
            total += max(0, streams.head(stream) - self._acked.get(stream, 0))
        return total

    def status(self) -> dict[str, Any]:
        return {
            "upstream": self.url,
            "node": self.node,
            "connected": self.connected,
            "since": self.connected_since if self.connected else self.down_since,
            "backlog": self.backlog() if self._acked or self.connected else None,
            "refused": dict(self.refused),
            "last_error": self.last_error,
        }

    # -- the link -----------------------------------------------------------------------------

    def _on_events(self, events: Any) -> None:
        self._wake.set()

    async def run(self) -> None:
        delay = BACKOFF_S[0]
        secret = upstream_secret(self.svc.settings)
        while True:
            try:
                await self._session(secret)
                delay = BACKOFF_S[0]
            except asyncio.CancelledError:
                raise
            except e.Unauthenticated as exc:  # wrong credential: slow down, say why
                self.last_error = exc.message
                log.error("upstream %s refused this node: %s", self.url, exc.message)
                delay = BACKOFF_S[1]
            except (OSError, websockets.WebSocketException, TimeoutError, e.PeerError) as exc:
                self.last_error = str(exc) or type(exc).__name__
                log.warning("uplink to %s: %s", self.url, self.last_error)
            except Exception:
                self.last_error = "internal error"
                log.exception("uplink failed")
            finally:
                if self.connected:
                    self.connected = False
                    self.down_since = self.svc.clock()
                self._ws = None
            await asyncio.sleep(delay * (0.5 + random.random()))
            delay = min(delay * 2, BACKOFF_S[1])

    async def _session(self, secret: str) -> None:
        opts: dict[str, Any] = {}
        if self.url.startswith("wss://"):
            opts["ssl"] = tls.client_context(self.svc.settings.upstream_cafile)
        async with connect(
            self.url,
            open_timeout=10,
            ping_interval=5,
            ping_timeout=10,
            max_size=MAX_FRAME,
            compression=None,
            **opts,
        ) as ws:
            self._ws = ws
            await ws.send(wire.encode_text(wire.EdgeHello(self.node, secret)))
            welcome = await self._expect(ws, wire.EdgeWelcome)
            log.info("uplink to %s open (node %s)", self.url, welcome.node)
            self._acked.clear()
            self._sent.clear()
            self._claimed.clear()
            await self._claim(ws, await self._patients())
            heads = await self._expect(ws, wire.EdgeHeads)
            self._take_heads(heads)
            self.connected = True
            self.connected_since = self.svc.clock()
            self.sessions += 1
            tasks = [
                asyncio.create_task(self._read(ws), name="uplink-read"),
                asyncio.create_task(self._status(ws), name="uplink-status"),
                asyncio.create_task(self._forward(ws), name="uplink-forward"),
            ]
            try:
                done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
                for t in done:
                    t.result()  # raises what ended the link
            finally:
                for t in tasks:
                    t.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)

    async def _expect(self, ws: ClientConnection, kind: type) -> Any:
        async with asyncio.timeout(15):
            msg = wire.decode_cloud(await ws.recv())
        if isinstance(msg, wire.Error):
            cls = e.Unauthenticated if msg.code == "unauthenticated" else e.PeerError
            raise cls(f"{msg.code}: {msg.message}", field=msg.field)
        if not isinstance(msg, kind):
            raise e.InvalidMessage(f"expected {kind.__name__} from upstream, got {msg!r:.80}")
        return msg

    async def _patients(self) -> list[wire.EdgePatient]:
        """Every patient of this node, discharged ones with when and by whom."""
        rows = await self.svc.store.list_patients()
        return [
            wire.EdgePatient(
                r["id"],
                r["name"],
                r["ward"],
                r.get("discharged_at"),
                (r.get("discharged_by") or "")[:64] or None,
            )
            for r in rows
        ]

    async def _claim(self, ws: ClientConnection, patients: list[wire.EdgePatient]) -> None:
        for i in range(0, max(1, len(patients)), wire.EDGE_MAX_PATIENTS):  # one, if empty
            part = patients[i : i + wire.EDGE_MAX_PATIENTS]
            await ws.send(wire.encode_text(wire.EdgePatients(part)))
        self._claimed.update(p.id for p in patients)

    def _take_heads(self, msg: wire.EdgeHeads) -> None:
        streams = self.svc.streams
        for stream, head in msg.heads.items():
            if head > streams.submitted_head(stream):
                # the cloud holds events this node no longer has (its store lost committed
                # events: a power loss under sqlite_synchronous NORMAL, a restored backup); the
                # next events here take offsets the cloud has, and it will keep its own
                log.error(
                    "the cloud holds %s up to %d, this node only up to %d: events were lost "
                    "here; the cloud keeps its copy of those offsets",
                    stream,
                    head,
                    streams.submitted_head(stream),
                )
            self._acked[stream] = max(self._acked.get(stream, 0), head)
            self._sent[stream] = max(self._sent.get(stream, 0), head)
        for pid, why in msg.refused.items():
            if self.refused.get(pid) != why:
                log.error("upstream refused patient %s: %s", pid, why)
            self.refused[pid] = why
        self._wake.set()

    async def _read(self, ws: ClientConnection) -> None:
        async for raw in ws:
            msg = wire.decode_cloud(raw)
            if isinstance(msg, wire.EdgeAck):
                for stream, head in msg.heads.items():
                    if head > self._acked.get(stream, 0):
                        self._acked[stream] = head
                self._wake.set()
            elif isinstance(msg, wire.EdgeCall):
                task = asyncio.create_task(self._call(ws, msg))
                self._calls.add(task)
                task.add_done_callback(self._calls.discard)
            elif isinstance(msg, wire.EdgeHeads):
                self._take_heads(msg)
            elif isinstance(msg, wire.Error):
                raise e.PeerError(f"upstream: {msg.code}: {msg.message}", field=msg.field)
            elif isinstance(msg, wire.Ping):
                await ws.send(wire.encode_text(wire.Pong(id=msg.id, ts=msg.ts)))

    async def _status(self, ws: ClientConnection) -> None:
        """The backlog every second; the patients again when they changed here (a discharge,
        a new name), checked every :data:`PATIENTS_EVERY_S`."""
        ticks = 0
        last = await self._patients()
        while True:
            await asyncio.sleep(STATUS_EVERY_S)
            n = len(self._sent)
            await ws.send(wire.encode_text(wire.EdgeStatus(self.backlog(), n)))
            ticks += 1
            if ticks % round(PATIENTS_EVERY_S / STATUS_EVERY_S) == 0:
                now = await self._patients()
                changed = [p for p in now if p.id in self._claimed and p not in last]
                if changed:
                    await self._claim(ws, changed)
                last = now

    async def _forward(self, ws: ClientConnection) -> None:
        streams = self.svc.streams
        while True:
            self._wake.clear()
            new = [
                p
                for s in streams.patient_streams()
                if (p := ev.stream_patient(s)) is not None and p not in self._claimed
            ]
            if new:  # admitted here since the link opened: claim them (heads come back)
                rows = {p.id: p for p in await self._patients()}
                await self._claim(ws, [rows[p] for p in new if p in rows])
                self._claimed.update(new)  # a discharged one is not claimed again
            inflight = sum(self._sent[s] - self._acked.get(s, 0) for s in self._sent)
            budget = self.window - inflight
            frames: list[str] = []
            size = 0
            for stream in list(self._sent):
                if budget <= 0:
                    break
                sent = self._sent[stream]
                head = streams.head(stream)
                if head <= sent:
                    continue
                upto = min(head, sent + min(budget, BATCH))
                events = await streams.replay(stream, sent, upto)
                if not events:
                    if events is None:  # pruned here by retention before it could be sent
                        log.error("stream %s: events after %d are gone here", stream, sent)
                    continue
                self._sent[stream] = events[-1].offset
                budget -= len(events)
                for x in events:
                    frame = x.replay_frame()
                    if frames and (len(frames) >= BATCH or size + len(frame) > BATCH_BYTES):
                        await ws.send(wire.edge_events_frame(frames, self.backlog()))
                        frames = []
                        size = 0
                    frames.append(frame)
                    size += len(frame)
            if frames:
                await ws.send(wire.edge_events_frame(frames, self.backlog()))
            if not self._wake.is_set():
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), STATUS_EVERY_S)

    async def _call(self, ws: ClientConnection, msg: wire.EdgeCall) -> None:
        who = Principal(f"{msg.who}@upstream", msg.role, upstream=True)
        origin = f"upstream:{msg.origin}" if msg.origin else "upstream"
        try:
            result = await run_request(self.svc, who, msg.op, msg.patient_id, msg.args, origin)
            reply = wire.EdgeReply(msg.id, result)
        except msgspec.ValidationError as exc:
            reply = wire.EdgeReply(msg.id, error=wire.Error("invalid_message", str(exc)))
        except e.PeerError as exc:
            reply = wire.EdgeReply(
                msg.id, error=wire.Error(error_code(exc), exc.message, exc.field)
            )
        except Exception:
            log.exception("upstream call %s failed", msg.op)
            reply = wire.EdgeReply(msg.id, error=wire.Error("internal", "internal error"))
        with contextlib.suppress(websockets.ConnectionClosed):
            await ws.send(wire.encode_text(reply))
