"""Several nodes on one store and one bus: who writes each patient's stream, and requests routed
to that node (docs/architecture.md, "Several nodes"; docs/howto-cluster.md).

Every node of a cluster is the same program with ``--cluster``, on the same PostgreSQL store and
the same Redis bus (prefix), behind any load balancer. What a cluster adds to one node:

- **One writer per patient stream, fenced by the store.** The node where a device of the patient
  says hello takes the stream's lease (``force``: readings are written where their device is);
  a node that must act on a patient nobody holds (a clinician's request, a device whose node
  died) takes it if it lapsed. Taking a lease raises its epoch and returns the stream's head:
  the node reads what it has not seen of the stream from the store (``Streams.take_over``),
  rebuilds the patient's alert engine and open commands from the store, and writes from
  ``head + 1``. Every batch carries (node, epoch, first, last) per stream and the store refuses
  it, in its transaction, if the lease moved (``BatchWriter.lease_of``/``on_fenced``): a node
  that lost a stream, however slow or partitioned, can never write into it again. Its devices
  of that patient are closed (1001) and reconnect; whatever they had not been acknowledged
  they resend to the node that writes the stream now, which drops what it has by (device, seq)
  (the store's high seq per device, read at every hello).
- **Leases renewed** every ``lease_ttl_s / 3`` in one statement per 500 streams, released at a
  clean shutdown. A lease that lapsed (its node died) is taken by the first node whose reaper
  finds it, every ``lease_ttl_s``: the devices the stream still shows online are then expected
  back there, and marked offline (with their alerts) if they do not come back within their
  silence window.
- **Requests routed to the stream's writer.** A clinician's command, acknowledgement, limits or
  observations on a patient whose stream another node writes is authorised where the clinician
  is connected, then run by the writing node (Redis request/reply on one channel per node,
  answered within ``cluster_call_timeout_s``). Alerts are evaluated where the readings are
  written: once per reading.
- **The ``alerts`` stream** (every patient's alert changes, for ward lists) is written by every
  node: its offsets are assigned by the store in the write transaction (``Batch.sequenced``), and
  every node reads it from the store (``ALERTS_TAIL_S``) instead of the bus, in offset order.
- **The bus fills its gaps from the store:** a node killed before its last batches reached Redis
  leaves a hole that the next node's events reveal; the other nodes read the missing events from
  the store before delivering the next ones.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import random
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from vitalwire.core import errors as e
from vitalwire.core import events as ev
from vitalwire.services.auth import Principal
from vitalwire.services.edges import error_from, notify_watchers
from vitalwire.services.ingest import Unavailable
from vitalwire.wire import Close

if TYPE_CHECKING:
    from vitalwire.services.container import Services

log = logging.getLogger("vitalwire.cluster")

#: How often each node reads the ``alerts`` stream's new events from the store.
ALERTS_TAIL_S = 0.2
#: Events of the ``alerts`` stream read per query, at most.
ALERTS_PAGE = 1000
#: Seconds between two attempts to reach Redis again for the request channel.
RECONNECT_S = 1.0


class Cluster:
    """This node's leases, its reaper, and the request channel between nodes."""

    def __init__(self, svc: Services, node: str) -> None:
        self.svc = svc
        self.node = node
        self.ttl_s = svc.settings.lease_ttl_s
        self.call_timeout_s = svc.settings.cluster_call_timeout_s
        #: stream -> epoch of every lease this node holds
        self.held: dict[str, int] = {}
        self._taking: dict[str, asyncio.Lock] = {}
        self._calls: dict[int, asyncio.Future[Any]] = {}
        self._ids = itertools.count(1)
        #: command id -> watchers of a command this node routed (its status events go to them)
        self._watchers: dict[str, list[Any]] = {}
        self._redis: Any = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self.prefix = ""
        self.taken = 0  # leases acquired (/metrics, tests)
        self.lost = 0  # leases lost to another node
        self.routed = 0  # requests sent to another node

    # -- the writer's hooks ---------------------------------------------------------------------

    def lease_of(self, stream: str) -> tuple[str, int] | None:
        """The writer's fence for ``stream``: a patient stream this node does not hold gets
        epoch 0, which no lease has, so the store refuses it (nothing is written unfenced)."""
        if stream == ev.ALERTS_STREAM:
            return None  # offsets assigned by the store (Batch.sequenced)
        return self.node, self.held.get(stream, 0)

    def on_fenced(self, streams: set[str]) -> None:
        for stream in streams:
            if self.held.pop(stream, None) is not None:
                self.lost += 1
            self._let_go(stream)

    def holds(self, pid: str) -> bool:
        return ev.patient_stream(pid) in self.held

    # -- leases ---------------------------------------------------------------------------------

    async def ensure(self, pid: str, *, force: bool = False) -> bool:
        """Hold ``pid``'s stream: take its lease (``force``: from whoever holds it). False when
        another node holds it (not lapsed) and ``force`` is not given."""
        stream = ev.patient_stream(pid)
        if stream in self.held:
            return True
        lock = self._taking.setdefault(stream, asyncio.Lock())
        async with lock:
            if stream in self.held:
                return True
            now = self.svc.clock()
            lease = await self.svc.store.acquire_stream(
                stream, self.node, now, self.ttl_s, force=force
            )
            if lease is None:
                return False
            await self._take(pid, stream, lease.head)
            self.held[stream] = lease.epoch
            self.taken += 1
            log.info("took %s at offset %d (epoch %d)", stream, lease.head, lease.epoch)
        return True

    async def _take(self, pid: str, stream: str, head: int) -> None:
        """What a node needs to write ``stream`` from ``head + 1``: the events it has not seen,
        the patient's alert engine and open commands, as the store has them."""
        svc = self.svc
        await svc.streams.take_over(stream, head)
        await svc.alerts.take_over(pid)
        await svc.commands.take_over(pid)
        picture = svc.streams.picture(stream)
        if picture is not None:
            online = [d for d, st in picture.devices.items() if st.get("status") == "online"]
            svc.ingest.expect(pid, [d for d in online if d not in svc.ingest.sessions])

    def _let_go(self, stream: str) -> None:
        """Another node writes ``stream`` now: end what this node did for it."""
        pid = ev.stream_patient(stream)
        if pid is None:
            return
        svc = self.svc
        svc.alerts.let_go(pid)
        svc.commands.let_go(pid)
        svc.ingest.let_go(pid)
        for session in list(svc.ingest.sessions.values()):
            if session.patient_id == pid:
                session.close(
                    Close.GOING_AWAY, "another node writes this patient's stream now; reconnect"
                )

    async def renew(self) -> None:
        lost = await self.svc.store.renew_streams(
            self.node, dict(self.held), self.svc.clock(), self.ttl_s
        )
        if lost:
            log.warning("leases lost to other nodes: %s", ", ".join(sorted(lost)))
            self.on_fenced(lost)

    async def reap(self) -> int:
        """Take the lapsed leases of streams that still show a device online (their node died
        or was cut off): the devices are expected back here, or marked offline."""
        taken = 0
        for lease in await self.svc.store.lapsed_leases(self.svc.clock()):
            pid = ev.stream_patient(lease.stream)
            if pid is None or lease.stream in self.held:
                continue
            picture = self.svc.streams.picture(lease.stream)
            if picture is None or not any(
                st.get("status") == "online" for st in picture.devices.values()
            ):
                continue
            if await self.ensure(pid):
                taken += 1
        return taken

    async def release(self) -> None:
        """A clean shutdown: let every lease lapse now, so other nodes take them at once."""
        if self.held:
            await self.svc.store.release_streams(self.node, dict(self.held))
            self.held.clear()

    # -- what other paths write into a patient's stream -----------------------------------------

    def binding_event(self, pid: str, did: str, action: str, at: float, made_here: bool) -> None:
        """A device was bound to or unbound from ``pid`` (Registry.binding_writer): its event
        is written by the node that writes the stream. A change made through this node goes
        there; one made offline (``vitalwire admin``), which every node reads from the store,
        is written by the node that holds the stream, or that takes it because nobody does."""
        task = asyncio.create_task(self._binding(pid, did, action, at, made_here))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _binding(self, pid: str, did: str, action: str, at: float, made_here: bool) -> None:
        try:
            if not made_here:
                if await self.ensure(pid):
                    self.svc.registry.write_binding_event(pid, did, action, at)
                return
            node = await self.route(pid)
            if node is None:
                self.svc.registry.write_binding_event(pid, did, action, at)
            else:
                who = Principal(f"node:{self.node}", "admin", upstream=True)
                args = {"device": did, "action": action, "at": at}
                await self.call(node, "binding", who, pid, args, None)
        except Exception:
            log.exception(
                "the %s event of device %s for patient %s was not written", action, did, pid
            )

    # -- requests -------------------------------------------------------------------------------

    async def route(self, pid: str) -> str | None:
        """The node that writes ``pid``'s stream, or None when it is this one (taken here if
        nobody holds it)."""
        stream = ev.patient_stream(pid)
        for _ in range(3):
            if stream in self.held:
                return None
            lease = await self.svc.store.stream_lease(stream)
            if (
                lease is not None
                and lease.node != self.node
                and lease.expires_at > self.svc.clock()
            ):
                return lease.node
            if await self.ensure(pid):
                return None
        raise Unavailable(f"patient {pid}'s stream is changing node; try again")

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
        """Run a request (authorised here) on ``node``, which writes ``pid``'s stream."""
        if self._redis is None:
            raise Unavailable("the cluster's request channel is not connected; try again")
        cid = next(self._ids)
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._calls[cid] = fut
        message = {
            "id": cid,
            "from": self.node,
            "op": op,
            "who": who.name,
            "role": who.role,
            "pid": pid,
            "args": args,
            "origin": origin,
        }
        self.routed += 1
        try:
            heard = await self._redis.publish(self._channel(node), json.dumps(message))
            if not heard:
                raise Unavailable(f"node {node}, which writes patient {pid}, is not reachable")
            result = await asyncio.wait_for(fut, self.call_timeout_s)
        except TimeoutError:
            raise Unavailable(
                f"node {node} did not answer within {self.call_timeout_s:g} s; the request may "
                "still be carried out there: the patient's stream will show it"
            ) from None
        finally:
            self._calls.pop(cid, None)
        if watcher is not None and op == "command" and isinstance(result, dict):
            self._watchers.setdefault(str(result.get("command_id")), []).append(watcher)
        return result

    def _channel(self, node: str) -> str:
        return f"{self.prefix}:node:{node}"

    async def _serve(self) -> None:
        """Take requests and replies on this node's channel."""
        import redis.asyncio as aioredis

        from vitalwire.bus.redis import parse_url

        url, self.prefix = parse_url(self.svc.settings.bus)
        while True:
            client = aioredis.from_url(url, client_name=f"{self.prefix}-node-{self.node}")
            pubsub = client.pubsub(ignore_subscribe_messages=True)
            try:
                await pubsub.subscribe(self._channel(self.node))
                self._redis = client
                async for message in pubsub.listen():
                    if message.get("type") == "message":
                        self._received(message["data"])
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.error("cluster channel lost (%s); reconnecting", exc)
            finally:
                self._redis = None
                with contextlib.suppress(Exception):
                    await pubsub.aclose()
                with contextlib.suppress(Exception):
                    await client.aclose()
            await asyncio.sleep(RECONNECT_S)

    def _received(self, data: bytes) -> None:
        try:
            msg = json.loads(data)
        except ValueError:
            log.error("cluster channel: a message that is not JSON")
            return
        if "reply" in msg:
            fut = self._calls.get(msg.get("id"))
            if fut is None or fut.done():
                return
            err = msg.get("error")
            if err:
                fut.set_exception(
                    error_from(err.get("code", ""), err.get("message", ""), err.get("field"))
                )
            else:
                fut.set_result(msg.get("result"))
            return
        task = asyncio.create_task(self._run(msg))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _run(self, msg: dict[str, Any]) -> None:
        import msgspec

        from vitalwire.services.uplink import error_code, run_request

        # the node that sent it checked the clinician's access (the bus is the cluster's own)
        who = Principal(str(msg.get("who")), str(msg.get("role")), upstream=True)
        reply: dict[str, Any] = {"id": msg.get("id"), "reply": True}
        try:
            pid = str(msg.get("pid"))
            ev.check_id("patient_id", pid)
            if not await self.ensure(pid):
                raise Unavailable(f"patient {pid}'s stream moved to another node; try again")
            args = msg.get("args") or {}
            reply["result"] = await run_request(
                self.svc, who, str(msg.get("op")), pid, args, msg.get("origin"), internal=True
            )
        except msgspec.ValidationError as exc:
            reply["error"] = {"code": "invalid_message", "message": str(exc)}
        except e.PeerError as exc:
            reply["error"] = {"code": error_code(exc), "message": exc.message, "field": exc.field}
        except Exception:
            log.exception("cluster request %s failed", msg.get("op"))
            reply["error"] = {"code": "internal", "message": "internal error"}
        if self._redis is not None:
            with contextlib.suppress(Exception):
                await self._redis.publish(self._channel(str(msg.get("from"))), json.dumps(reply))

    # -- one node at a time ----------------------------------------------------------------------

    async def run_singleton(self, name: str, job: Callable[[], Awaitable[None]]) -> None:
        """Run ``job`` on one node of the cluster at a time: the node holding the lease of
        ``singleton:NAME`` (the MQTT bridge: every node is configured with the broker, one
        bridges it; when that node dies, another takes the lease after ``lease_ttl_s`` and
        bridges from the broker's persistent session, which kept what came meanwhile)."""
        stream = f"singleton:{name}"
        store, clock = self.svc.store, self.svc.clock
        while True:
            lease = None
            try:
                lease = await store.acquire_stream(stream, self.node, clock(), self.ttl_s)
            except Exception as exc:
                log.warning("%s: the store did not answer (%s)", name, exc)
            if lease is None:
                await asyncio.sleep(self.ttl_s / 3 * random.uniform(0.8, 1.2))
                continue
            log.info("%s runs on this node (epoch %d)", name, lease.epoch)
            task = asyncio.create_task(job(), name=name)
            renewed = clock()
            try:
                while not task.done():
                    await asyncio.wait({task}, timeout=self.ttl_s / 3)
                    if task.done():
                        break
                    try:
                        held = {stream: lease.epoch}
                        if await store.renew_streams(self.node, held, clock(), self.ttl_s):
                            log.warning("%s moved to another node", name)
                            break
                        renewed = clock()
                    except Exception as exc:
                        log.warning("%s: renewal failed (%s)", name, exc)
                        if clock() - renewed > self.ttl_s:
                            break  # another node may run it now: stop here
            except asyncio.CancelledError:
                with contextlib.suppress(Exception):
                    await store.release_streams(self.node, {stream: lease.epoch})
                raise
            finally:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)

    # -- what every node reads ------------------------------------------------------------------

    def on_events(self, events: Any) -> None:
        """A tap on every published event: remember alerts raised on other nodes (so that an
        acknowledgement made here finds its patient), tell the watchers of a routed command
        about its progress, and take the limits and observations set on the node that writes
        a patient's stream (what this node shows of them)."""
        for event in events:
            if event.kind == ev.ALERT:
                pid = ev.stream_patient(event.stream)
                if pid is not None:
                    self.svc.alerts.remember(str(event.data.get("alert_id")), pid)
            elif event.kind == ev.COMMAND and self._watchers:
                notify_watchers(self._watchers, event)
            elif event.kind == ev.SETTINGS:
                pid = ev.stream_patient(event.stream)
                if pid is not None and not self.holds(pid):  # limits shown as they are there
                    self.svc.alerts.adopt_settings(pid, event.data)

    async def tail_alerts(self) -> None:
        """The ``alerts`` stream, read from the store in offset order (every node writes it)."""
        streams = self.svc.streams
        while True:
            try:
                page = await self.svc.store.events_after(
                    ev.ALERTS_STREAM, streams.head(ev.ALERTS_STREAM), ALERTS_PAGE
                )
                if page:
                    streams.on_events(page)
                    if len(page) == ALERTS_PAGE:
                        continue
            except Exception:
                log.exception("reading the alerts stream failed")
            await asyncio.sleep(ALERTS_TAIL_S)

    async def run(self) -> None:
        """The node's cluster chores: the request channel, renewals, the reaper, the alerts."""
        tasks = [
            asyncio.create_task(self._serve(), name="cluster-channel"),
            asyncio.create_task(self.tail_alerts(), name="cluster-alerts"),
        ]
        try:
            reap_every = max(1, round(3 * random.uniform(0.8, 1.2)))
            for n in itertools.count():
                await asyncio.sleep(self.ttl_s / 3)
                try:
                    await self.renew()
                    if n % reap_every == 0:
                        await self.reap()
                except Exception:
                    log.exception("lease renewal failed")
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)


class Remotes:
    """Where a request on a patient runs: an edge node's patient goes to its edge
    (services/edges.py), a patient another node of the cluster writes goes to that node."""

    def __init__(self, edges: Any, cluster: Cluster | None) -> None:
        self.edges = edges
        self.cluster = cluster

    async def route(self, pid: str) -> str | None:
        node = self.edges.owner(pid) if self.edges is not None else None
        if node is not None or self.cluster is None:
            return node
        return await self.cluster.route(pid)

    async def call(self, node: str, op: str, who: Principal, pid: str, *rest: Any) -> Any:
        if self.edges is not None and self.edges.owner(pid) == node:
            return await self.edges.call(node, op, who, pid, *rest)
        assert self.cluster is not None
        return await self.cluster.call(node, op, who, pid, *rest)
