"""The services container: settings -> store, bus and every service, with their chores.

Transports receive a :class:`Services` and call what it holds; ``app.py`` builds one per process in
its lifespan (:func:`open_services`) and drains it on shutdown (:func:`drain`).
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import secrets
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from vitalwire.bus import Bus, open_bus
from vitalwire.core import access as policy
from vitalwire.core import events as ev
from vitalwire.core.alerts import AlertConfig, Timeliness
from vitalwire.core.commands import CommandSpec
from vitalwire.services.access import Access
from vitalwire.services.alerts import AlertService
from vitalwire.services.auth import Principal, TokenService
from vitalwire.services.clients import ClientSession
from vitalwire.services.cluster import Cluster, Remotes
from vitalwire.services.commands import CommandService
from vitalwire.services.history import History
from vitalwire.services.ingest import Ingest
from vitalwire.services.login import LoginService
from vitalwire.services.metrics import Metrics
from vitalwire.services.registry import Registry
from vitalwire.services.streams import Streams
from vitalwire.services.writer import BatchWriter
from vitalwire.settings import Settings
from vitalwire.store import Store, open_store
from vitalwire.wire import Close

log = logging.getLogger("vitalwire")

#: How often each changed stream's live picture is saved (restart rebuilds from it).
SNAPSHOT_EVERY_S = 30.0
#: ...saved a share at a time: every SNAPSHOT_EVERY_S / SNAPSHOT_PARTS seconds (0.5 s), one share
SNAPSHOT_PARTS = 60
#: Collector thresholds: measured with `vitalwire bench` at 2,000 devices and 200 clients, the
#: default (700, 10, 10) put p99 near 900 ms (long collections of the live state). With the
#: start-up objects frozen, a young collection costs about 0.7-1 us per young object on a slow
#: machine: 50,000 held the loop 32-61 ms at once (every device's first reading makes one), a
#: young generation of 10,000 holds it 5-14 ms, five times as often, for the same total
#: (docs/benchmarks-history.md, "The collector's young generation"). The middle generation is
#: collected every 5 young collections, not 50: it holds what outlived a young collection (a
#: commit's pending rows, connections being set up), and at 10,000 devices 50 young collections'
#: worth took 52-193 ms to scan at once; 5 take 2-24 ms (docs/benchmarks-history.md, "The middle
#: generation").
GC_THRESHOLDS = (10_000, 5, 1000)
#: Care teams and users edited outside this process (the admin CLI) apply within this many
#: seconds: one read of the store's access version (an indexed meta row) when nothing changed.
#: Changes made through this process apply at once (Access.refresh right after them).
ACCESS_REFRESH_S = 0.5
#: Registry changes made outside this process (``vitalwire admin bind``, ``unbind``,
#: ``disable-device``, ``rotate-device-secret``, ``create-patient``) are read this often (one
#: query on an indexed table when nothing changed) and applied at once (services/registry.py).
REGISTRY_REFRESH_S = 0.5
#: How long shutdown waits for the store before giving up (nothing unacked is lost: devices resend).
STOP_TIMEOUT_S = 10.0


@dataclass
class Services:
    """Everything a transport may call. Built and torn down by :func:`open_services`."""

    settings: Settings
    clock: Callable[[], float]
    store: Store
    bus: Bus
    streams: Streams
    writer: BatchWriter
    registry: Registry
    ingest: Ingest
    tokens: TokenService
    alerts: AlertService
    commands: CommandService
    access: Access
    login: LoginService
    history: History
    clients: set[ClientSession] = field(default_factory=set)
    metrics: Metrics | None = None  # the app's Prometheus registry (services/metrics.py)
    mqtt: Any = None  # the MQTT bridge when mqtt_url is set (transports/mqtt.py)
    #: edge nodes connected to this node as their cloud (services/edges.py)
    edges: Any = None
    #: this node's link to its cloud when it is an edge node (services/uplink.py)
    uplink: Any = None
    #: this node's leases and request channel when it is one of a cluster (services/cluster.py)
    cluster: Any = None


@contextlib.asynccontextmanager
async def open_services(
    settings: Settings, clock: Callable[[], float] = time.time
) -> AsyncIterator[Services]:
    """Open the store and bus, start the writer; on exit flush every write and close."""
    store = open_store(settings.db, sqlite_synchronous=settings.sqlite_synchronous)
    await store.open()
    bus = open_bus(
        settings.bus,
        history_size=settings.bus_history,
        history_bytes=settings.bus_history_bytes,
    )
    streams = Streams(store, bus)
    writer = BatchWriter(
        store,
        bus,
        max_rows=settings.batch_max_rows,
        max_wait_s=settings.batch_max_wait_ms / 1000,
        min_interval_s=settings.batch_min_interval_ms / 1000,
        settle=streams.settle,
    )
    try:
        await streams.load()
        await bus.open(streams.on_events)
        restarted_at = clock()
        secret = settings.jwt_secret or await store.get_meta("jwt_secret")
        if not secret:
            secret = secrets.token_urlsafe(48)
            await store.set_meta("jwt_secret", secret)
        registry = Registry(store, clock, streams, writer)
        alert_config = AlertConfig(
            escalation_high_s=settings.alert_escalation_high_s,
            escalation_medium_s=settings.alert_escalation_medium_s,
            news2_max_age_s=settings.news2_max_age_s,
            apnoea_delay_s=settings.apnoea_delay_s,
        )
        access = Access(store, writer, clock, settings.break_glass_s)
        await access.refresh()
        alerts = AlertService(store, streams, writer, clock, alert_config, access)
        await alerts.load(engines=not settings.cluster)
        ingest = Ingest(
            store,
            streams,
            writer,
            registry,
            clock,
            heartbeat_s=settings.heartbeat_s,
            max_frame_bytes=settings.max_frame_bytes,
            max_batch=settings.max_batch,
            max_silence_s=settings.device_max_silence_s,
            alerts=alerts,
            ack_interval_s=settings.ack_min_interval_ms / 1000,
            timeliness=Timeliness(settings.reading_late_s, settings.reading_max_ahead_s),
            identity_conflict_max=settings.identity_conflict_max,
            identity_conflict_window_s=settings.identity_conflict_window_s,
            identity_cooldown_s=settings.identity_cooldown_s,
        )
        if not settings.cluster:  # a cluster's reaper finds the devices of a node that died
            ingest.expect_back(streams.online_devices(), restarted_at)
        registry.on_new_patients = access.refresh
        await registry.start_following()
        commands = CommandService(
            store, streams, writer, ingest, clock, authorize=_command_access(access)
        )
        svc = Services(
            settings,
            clock,
            store,
            bus,
            streams,
            writer,
            registry,
            ingest,
            TokenService(secret, settings.token_ttl_s, settings.refresh_ttl_s),
            alerts,
            commands,
            access,
            LoginService.from_settings(settings, registry, access, clock),
            History(store, access, clock),
        )
        from vitalwire.services.edges import EdgeHub

        svc.edges = EdgeHub(svc)
        await svc.edges.load()
        if settings.cluster:  # several nodes (services/cluster.py)
            svc.cluster = _cluster(svc)
        alerts.remote = commands.remote = Remotes(svc.edges, svc.cluster)
        registry.edge_owner = svc.edges.owner
        svc.metrics = Metrics(svc)
        # access taken back ends what depended on it in every open session, at once
        access.on_change = lambda: access.recheck(svc.clients)
        writer.start()
        if svc.cluster is None:  # a cluster's node loads a patient's commands as it takes it
            await commands.load()
        # what start-up built lives as long as the process: keep it out of every collection
        # (the collector's pauses are the tail of the latency otherwise)
        gc.collect()
        gc.freeze()
        gc.set_threshold(*GC_THRESHOLDS)
        chores = [
            asyncio.create_task(_every(1.0, lambda: _check_silence(svc)), name="silence"),
            asyncio.create_task(_tick_alerts(svc), name="alerts"),
            asyncio.create_task(_every(0.5, lambda: _tick_commands(svc)), name="commands"),
            asyncio.create_task(
                _every(ACCESS_REFRESH_S, access.refresh, delay_first=True), name="access"
            ),
            asyncio.create_task(
                _every(REGISTRY_REFRESH_S, registry.follow_changes, delay_first=True),
                name="registry",
            ),
            asyncio.create_task(_retention(svc), name="retention"),
            asyncio.create_task(_save_snapshots(streams, clock), name="snapshots"),
        ]
        if settings.mqtt_url:  # MQTT devices (transports/mqtt.py)
            from vitalwire.transports.mqtt import MqttBridge, run_bridge

            if svc.cluster is None:
                svc.mqtt = MqttBridge(svc)
                chores.append(asyncio.create_task(run_bridge(svc.mqtt), name="mqtt"))
            else:  # one node of the cluster bridges the broker at a time

                async def bridge() -> None:
                    svc.mqtt = MqttBridge(svc)
                    try:
                        await run_bridge(svc.mqtt)
                    finally:
                        svc.mqtt = None

                chores.append(
                    asyncio.create_task(svc.cluster.run_singleton("mqtt", bridge), name="mqtt")
                )
        if svc.cluster is not None:
            chores.append(asyncio.create_task(svc.cluster.run(), name="cluster"))
        if settings.upstream:  # an edge node: forward to the cloud (services/uplink.py)
            from vitalwire.services.uplink import Uplink

            svc.uplink = Uplink(svc)
            chores.append(asyncio.create_task(svc.uplink.run(), name="uplink"))
        try:
            yield svc
        finally:
            access.stop()
            for chore in chores:
                chore.cancel()
            await asyncio.gather(*chores, return_exceptions=True)
            svc.login.close()  # its pool's thread would outlive the server otherwise
            try:
                await asyncio.wait_for(writer.stop(), STOP_TIMEOUT_S)
                await asyncio.wait_for(streams.save_snapshots(clock()), STOP_TIMEOUT_S)
                if svc.cluster is not None:  # other nodes take its patients at once
                    await asyncio.wait_for(svc.cluster.release(), STOP_TIMEOUT_S)
            except TimeoutError:
                log.error("shutdown: the store did not answer; uncommitted rows were not acked")
    finally:
        await bus.close()
        await store.close()


def _cluster(svc: Services) -> Cluster:
    """Make this node one of a cluster: its writer fences every patient stream with its lease,
    its devices' hellos take their patient's stream, its engines tick only for its streams."""
    name = svc.settings.node_id or f"{socket.gethostname()}-{os.getpid()}"
    cluster = Cluster(svc, name)
    svc.writer.lease_of = cluster.lease_of
    svc.writer.on_fenced = cluster.on_fenced
    svc.writer.on_dropped = svc.ingest.dropped
    svc.writer.sequenced = frozenset({ev.ALERTS_STREAM})
    svc.ingest.claim = lambda pid: cluster.ensure(pid, force=True)
    svc.alerts.holds = cluster.holds
    svc.registry.binding_writer = cluster.binding_event
    svc.streams.taps.append(cluster.on_events)
    svc.streams.saves = cluster.held.__contains__
    if hasattr(svc.bus, "fill"):
        svc.bus.fill = svc.streams.fill
    return cluster


async def _every(
    interval: float, job: Callable[[], Awaitable[object]], delay_first: bool = False
) -> None:
    if delay_first:
        await asyncio.sleep(interval)
    while True:
        try:
            await job()
        except Exception:
            log.exception("periodic job failed")
        await asyncio.sleep(interval)


async def _retention(svc: Services) -> None:
    """Hourly: events past the retention period go (in a cluster, one node does it)."""

    def job() -> Awaitable[None]:
        return _every(3600.0, lambda: prune(svc))

    if svc.cluster is None:
        await job()
    else:
        await svc.cluster.run_singleton("retention", job)


async def _save_snapshots(
    streams: Streams, clock: Callable[[], float], parts: int = SNAPSHOT_PARTS
) -> None:
    """Every stream's picture once per ``SNAPSHOT_EVERY_S``, one share of the streams at a time
    spread evenly over it (see ``Streams.save_snapshots``)."""
    part = 0
    while True:
        await asyncio.sleep(SNAPSHOT_EVERY_S / parts)
        try:
            await streams.save_snapshots(clock(), part, parts)
        except Exception:
            log.exception("snapshot save failed")
        part = (part + 1) % parts


async def _check_silence(svc: Services) -> None:
    svc.ingest.check_silence()


async def _tick_alerts(svc: Services, parts: int = 10) -> None:
    """Every engine once a second, a tenth at a time: short holds of the event loop."""
    part = 0
    while True:
        try:
            svc.alerts.tick(part, parts)
        except Exception:
            log.exception("alert tick failed")
        part = (part + 1) % parts
        await asyncio.sleep(1.0 / parts)


def _command_access(access: Access) -> Callable[[Principal, str, CommandSpec], None]:
    def authorize(who: Principal, pid: str, spec: CommandSpec) -> None:
        access.check(who, policy.COMMAND_CARE if spec.needs_care else policy.COMMAND, pid)

    return authorize


async def _tick_commands(svc: Services) -> None:
    svc.commands.tick()


async def prune(svc: Services) -> int:
    """Delete stream events older than the retention period."""
    cutoff = svc.clock() - svc.settings.retention_days * 86400
    return await svc.store.delete_events_before(cutoff)


async def drain(svc: Services, timeout: float = 10.0) -> None:
    """Graceful shutdown: take no more readings, commit what was taken (so its acks go out),
    then close every socket with going-away (1001). Idempotent."""
    svc.ingest.stopping = True
    try:
        await asyncio.wait_for(svc.writer.flush(), timeout)
    except TimeoutError:  # the store is down: nothing pending was acked, devices will resend
        log.error("shutdown: %d rows could not be committed", svc.writer.pending_rows)
    svc.ingest.flush_acks()
    for session in list(svc.ingest.sessions.values()):
        session.close(Close.GOING_AWAY, "server shutting down")
    for client in list(svc.clients):
        if client.shut is not None:
            client.shut(Close.GOING_AWAY, "server shutting down")
        else:
            client.close()

    async def _gone() -> None:
        while svc.ingest.sessions or svc.clients:
            await asyncio.sleep(0.01)

    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(_gone(), timeout)
