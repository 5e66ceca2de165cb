"""The cloud's side of the edge tier: edge nodes' streams mirrored here, requests sent down.

An edge node (``vitalwire serve --upstream URL --node-id NAME``, services/uplink.py) owns its
patients' streams: it takes their devices' readings, evaluates their alerts and hands out their
offsets. It dials out to a cloud's ``/ws/edge`` (transports/edge_ws.py) and forwards every event
its streams commit. The cloud (this module):

- **claims** the edge's patients (creates those it does not know, in the edge's ward) and answers
  with the last offset it holds of each stream; the edge sends what follows;
- **mirrors** each event with the edge's own offset: one that is not past the cloud's head is a
  duplicate (a resend after a drop) and is skipped; one that leaves a gap is refused (the edge
  starts again from the heads). An event goes to the writer, then to the cloud's clients, like
  any other; an acknowledgement goes back once it is durable. Nothing is evaluated again: an
  alert change of the edge is shown and stored (and added to the cloud's ``alerts`` stream),
  never raised a second time;
- **forwards** clinicians' requests on an edge's patients (a command, an acknowledgement, limits,
  observations) down the uplink after its own access check, and returns the edge's answer; while
  the edge is not connected the request is refused (``unavailable``), naming the node and since
  when: nothing is queued at the cloud (a command queued at the edge for an absent device keeps
  its own lifecycle there).

Which node owns which patient is kept in the store (meta ``edges``), so a cloud that restarts
still knows, and still refuses to write into an edge's stream itself.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from vitalwire import wire
from vitalwire.core import errors as e
from vitalwire.core import events as ev
from vitalwire.services.auth import Principal
from vitalwire.services.ingest import Unavailable
from vitalwire.store import AlertRow
from vitalwire.wire import Close, Event

if TYPE_CHECKING:
    from vitalwire.services.container import Services

log = logging.getLogger("vitalwire.edges")

#: The device kind an edge node is registered with at the cloud.
EDGE_KIND = "edge"
#: The store's meta key holding which node owns which patients.
META_KEY = "edges"
#: Rows the writer may hold before an edge's next frame waits (its devices wait for nothing).
MAX_PENDING_ROWS = 20_000

#: Error codes of an edge's reply, back to the classes the cloud's transports map again.
_ERROR_CLASSES: dict[str, type[e.PeerError]] = {
    "invalid_message": e.InvalidMessage,
    "invalid_reading": e.InvalidReading,
    "forbidden": e.Forbidden,
    "not_found": e.NotFound,
    "conflict": e.Conflict,
    "rate_limited": e.RateLimited,
    "unavailable": Unavailable,
}


def notify_watchers(watchers: dict[str, list[Any]], event: Event) -> None:
    """A command event of a command sent to another node (an edge, or the cluster node that
    writes the patient's stream): to the watchers of that command, forgotten once final."""
    data = event.data
    cid = data.get("command_id")
    mine = watchers.get(cid) if cid else None
    if not mine:
        return
    for w in mine:
        w.push_direct(event)
    if data.get("status") in ("completed", "failed", "expired", "timed_out"):
        del watchers[cid]


def error_from(code: str, message: str, field: str | None) -> e.PeerError:
    """A request's error as the node that ran it named it (uplink.error_code), raised here."""
    return _ERROR_CLASSES.get(code, e.PeerError)(message, field=field)


@dataclass(eq=False)
class EdgeLink:
    """One connected edge node."""

    node: str
    send: Callable[[str], None]
    close: Callable[[int, str], None]
    since: float
    last_seen: float = 0.0
    backlog: int = 0
    #: how old the newest event of the last frame was when it arrived here (0 when idle)
    lag_s: float = 0.0
    events: int = 0  # mirrored since the link opened (duplicates not counted)
    duplicates: int = 0
    calls: dict[int, asyncio.Future[Any]] = field(default_factory=dict)


class EdgeHub:
    """Edge nodes connected to this cloud, and the patients each one owns."""

    def __init__(self, svc: Services) -> None:
        self.svc = svc
        self._owned: dict[str, set[str]] = {}  # node -> patient ids
        self._owner: dict[str, str] = {}  # patient id -> node
        self.links: dict[str, EdgeLink] = {}
        self._down_since: dict[str, float] = {}
        self._next_call = 0
        #: command id -> watchers of a command sent down (its status events go to them)
        self._watchers: dict[str, list[Any]] = {}

    async def load(self) -> None:
        raw = await self.svc.store.get_meta(META_KEY)
        owned = json.loads(raw) if raw else {}
        self._owned = {node: set(pids) for node, pids in owned.items()}
        self._owner = {pid: node for node, pids in self._owned.items() for pid in pids}
        now = self.svc.clock()
        for node in self._owned:
            self._down_since.setdefault(node, now)

    def owner(self, pid: str) -> str | None:
        """The edge node that owns ``pid``'s stream (None: this node writes it)."""
        return self._owner.get(pid)

    # -- the link ---------------------------------------------------------------------------

    async def hello(
        self, msg: wire.EdgeHello, send: Callable[[str], None], close: Callable[[int, str], None]
    ) -> EdgeLink:
        """Authenticate an edge node (a device of kind ``edge`` here) and open its link; an
        earlier link of the same node is closed (replaced)."""
        if msg.protocol != wire.EDGE_PROTOCOL:
            raise e.InvalidMessage(
                f"protocol must be {wire.EDGE_PROTOCOL}, got {msg.protocol}", field="protocol"
            )
        ev.check_id("node", msg.node)
        if self.svc.cluster is not None:
            raise Unavailable(
                "this node is one of a cluster, which does not take edge nodes yet: connect "
                "the edge to a single-node cloud (docs/howto-cluster.md)"
            )
        row = await self.svc.registry.authenticate_device(msg.node, msg.secret)
        if row["kind"] != EDGE_KIND:
            raise e.Unauthenticated(
                f"device {msg.node} is a {row['kind']}, not an edge node (kind {EDGE_KIND})",
                field="node",
            )
        old = self.links.get(msg.node)
        if old is not None:
            self.gone(old, "replaced")
            old.close(Close.REPLACED, "replaced by a new connection of the same edge node")
        now = self.svc.clock()
        link = EdgeLink(msg.node, send, close, now, last_seen=now)
        self.links[msg.node] = link
        self._down_since.pop(msg.node, None)
        log.info("edge node %s connected", msg.node)
        return link

    def gone(self, link: EdgeLink, why: str) -> None:
        if self.links.get(link.node) is not link:
            return
        del self.links[link.node]
        self._down_since[link.node] = self.svc.clock()
        for fut in link.calls.values():
            if not fut.done():
                fut.set_exception(self._unreachable(link.node, f"the link closed ({why})"))
        link.calls.clear()
        log.warning("edge node %s disconnected: %s", link.node, why)

    async def claim(self, link: EdgeLink, patients: list[wire.EdgePatient]) -> wire.EdgeHeads:
        """Take the edge's patients: create the ones this cloud does not know (in the edge's
        ward), refuse one that another node owns or that has events of this cloud's own."""
        svc = self.svc
        heads: dict[str, int] = {}
        refused: dict[str, str] = {}
        changed = created = False
        for p in patients:
            pid = p.id
            try:
                ev.check_id("patient_id", pid)
                ev.check_id("ward", p.ward)
            except e.InvalidMessage as exc:
                refused[pid[:64]] = exc.message
                continue
            stream = ev.patient_stream(pid)
            owner = self._owner.get(pid)
            if owner is not None and owner != link.node:
                refused[pid] = f"patient {pid} belongs to edge node {owner}"
                continue
            if owner is None:
                if await svc.store.get_patient(pid) is None:
                    try:
                        await svc.registry.create_patient(pid, p.name, p.ward)
                        created = True
                    except e.Conflict:
                        pass  # made meanwhile by another request: claimed below as known
                elif svc.streams.submitted_head(stream) > 0:
                    refused[pid] = f"patient {pid} has a stream of this cloud's own"
                    continue
                self._owner[pid] = link.node
                self._owned.setdefault(link.node, set()).add(pid)
                changed = True
            if p.discharged_at is not None:  # discharged at the edge: so here
                by = f"{p.discharged_by or 'unknown'}@{link.node}"[:64]
                if await svc.store.discharge_patient(pid, p.discharged_at, by):
                    created = True  # the access cache must drop them from the care teams
            heads[stream] = svc.streams.submitted_head(stream)
        if changed:
            owned = {node: sorted(pids) for node, pids in self._owned.items()}
            await svc.store.set_meta(META_KEY, json.dumps(owned))
        if created:
            await svc.access.refresh()
        for why in refused.values():
            log.warning("edge node %s: %s", link.node, why)
        return wire.EdgeHeads(heads, refused)

    def take_events(self, link: EdgeLink, msg: wire.EdgeEvents) -> None:
        """Mirror one frame of the edge's events; acknowledge it once durable.

        Raises :class:`~vitalwire.core.errors.Conflict` on an event of a stream the edge does
        not own here, or one past the next offset (a gap): the link is then closed and the edge
        starts again from the heads."""
        svc = self.svc
        now = svc.clock()
        link.last_seen = now
        link.backlog = msg.backlog
        heads: dict[str, int] = {}
        events: list[Event] = []
        rows: list[AlertRow] = []
        commands: list[Event] = []
        newest = 0.0
        for f in msg.items:
            stream = f.stream
            head = heads.get(stream)
            if head is None:
                pid = ev.stream_patient(stream)
                if pid is None or self._owner.get(pid) != link.node:
                    raise e.Conflict(
                        f"stream {stream!r:.80} is not one of edge node {link.node}'s patients",
                        field="items.stream",
                    )
                head = svc.streams.submitted_head(stream)
            if f.offset <= head:
                link.duplicates += 1
                heads[stream] = head
                continue
            if f.offset != head + 1:
                raise e.Conflict(
                    f"stream {stream}: offset {f.offset} would leave a gap after {head}",
                    field="items.offset",
                )
            heads[stream] = f.offset
            event = Event.from_stored(stream, f.offset, f.kind, f.ts, bytes(f.data))
            events.append(event)
            newest = max(newest, f.ts)
            if f.kind == ev.ALERT:
                rows.append(self._alert_row(event))
            elif f.kind == ev.COMMAND:
                commands.append(event)
            elif f.kind == ev.SETTINGS:
                svc.alerts.adopt_settings(ev.stream_patient(stream) or "", event.data)
        if events:
            for stream in {x.stream for x in events}:
                svc.streams.take_mirrored(stream, heads[stream])
            # the ward overview: the cloud's own ``alerts`` stream, offsets of its own
            link.events += len(events)
            overview = [
                svc.streams.new_event(ev.ALERTS_STREAM, ev.ALERT, x.ts, x.data)
                for x in events
                if x.kind == ev.ALERT
            ]
            events.extend(overview)
            link.lag_s = max(0.0, now - newest)
        else:
            link.lag_s = 0.0
        ack = wire.encode_text(wire.EdgeAck(heads)) if heads else None

        def durable() -> None:
            if ack is not None and self.links.get(link.node) is link:
                link.send(ack)
            for c in commands:
                self._notify(c)

        svc.writer.submit([], events, durable, alerts=rows)

    async def room(self) -> None:
        """Wait while the writer holds more than :data:`MAX_PENDING_ROWS` (an edge catching up
        after an outage must not crowd out this cloud's own devices)."""
        await self.svc.writer.wait_for_room(MAX_PENDING_ROWS)

    def _alert_row(self, event: Event) -> AlertRow:
        d = event.data
        pid = ev.stream_patient(event.stream) or ""
        self.svc.alerts.remember(d.get("alert_id", ""), pid)
        return AlertRow(
            str(d.get("alert_id", "")),
            pid,
            str(d.get("condition", "")),
            str(d.get("priority", "")),
            str(d.get("category", "")),
            str(d.get("state", "")),
            float(d.get("at", event.ts)),
            d.get("by"),
            int(d.get("escalation_level", 0)),
            event.data_json.decode(),
        )

    def _notify(self, event: Event) -> None:
        notify_watchers(self._watchers, event)

    # -- requests sent down -------------------------------------------------------------------

    async def call(
        self,
        node: str,
        op: str,
        who: Principal,
        pid: str,
        args: dict[str, Any],
        origin: str | None,
        watcher: Any = None,
    ) -> Any:
        """Send a request the cloud authorised to the edge that owns ``pid``; its answer."""
        link = self.links.get(node)
        if link is None:
            raise self._unreachable(node, "")
        self._next_call += 1
        cid = self._next_call
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        link.calls[cid] = fut
        frame = wire.EdgeCall(cid, op, who.name, who.role, pid, args, origin)
        link.send(wire.encode_text(frame))
        detail: dict[str, Any] = {"edge": node, "op": op}
        if op == "ack_alert":
            detail["alert_id"] = args.get("alert_id")
        self.svc.access.audit(who.name, "edge_request", pid, detail, origin)
        timeout = self.svc.settings.upstream_call_timeout_s
        try:
            result = await asyncio.wait_for(fut, timeout)
        except TimeoutError:
            raise Unavailable(
                f"the ward gateway {node} did not answer within {timeout:g} s; the request may "
                f"still be carried out there: the patient's stream will show it"
            ) from None
        finally:
            link.calls.pop(cid, None)
        if watcher is not None and op == "command" and isinstance(result, dict):
            self._watchers.setdefault(str(result.get("command_id")), []).append(watcher)
        return result

    def on_reply(self, link: EdgeLink, msg: wire.EdgeReply) -> None:
        fut = link.calls.get(msg.id)
        if fut is None or fut.done():
            return  # answered after the caller gave up
        if msg.error is not None:
            fut.set_exception(error_from(msg.error.code, msg.error.message, msg.error.field))
        else:
            fut.set_result(msg.result)

    def _unreachable(self, node: str, why: str) -> Unavailable:
        since = self._down_since.get(node)
        when = "" if since is None else f" since {_iso(since)}"
        tail = f" ({why})" if why else ""
        return Unavailable(
            f"the ward gateway {node} is unreachable{when}{tail}; the request was not sent"
        )

    # -- what the cloud shows -----------------------------------------------------------------

    def status(self) -> list[dict[str, Any]]:
        """Every edge node known here: connected or since when not, lag and backlog."""
        out = []
        now = self.svc.clock()
        for node in sorted(set(self._owned) | set(self.links)):
            link = self.links.get(node)
            row: dict[str, Any] = {
                "node": node,
                "connected": link is not None,
                "patients": len(self._owned.get(node, ())),
            }
            if link is not None:
                row.update(
                    since=link.since,
                    last_seen_s=round(max(0.0, now - link.last_seen), 3),
                    backlog=link.backlog,
                    lag_s=round(link.lag_s, 3),
                    events=link.events,
                    duplicates=link.duplicates,
                )
            else:
                row["down_since"] = self._down_since.get(node)
            out.append(row)
        return out

    def reachable(self, pid: str) -> dict[str, Any] | None:
        """For an edge's patient: its node and whether it is connected now (None: not an
        edge's patient)."""
        node = self._owner.get(pid)
        if node is None:
            return None
        if node in self.links:
            return {"node": node, "connected": True}
        return {"node": node, "connected": False, "since": self._down_since.get(node)}


def _iso(ts: float) -> str:
    import datetime as dt

    return dt.datetime.fromtimestamp(ts, dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def encode_reply(cid: int, result: Any = None, error: wire.Error | None = None) -> str:
    return wire.encode_text(wire.EdgeReply(cid, result, error))
