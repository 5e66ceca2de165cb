"""Prometheus metrics: one registry per app, read from the services' own counters at scrape time.

Nothing here runs per reading: the collector reads what the services already count (rows written,
transactions, queues, connections) when ``GET /metrics`` is scraped. The only observations made as
things happen are the writer's (one per commit: batch size and latency). No label carries a patient,
device or user id: the numbers hold no health data (docs/security.md, "Metrics and probes").
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Histogram, ProcessCollector, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from vitalwire.core.alerts import PRIORITIES
from vitalwire.core.commands import TERMINAL
from vitalwire.services.clients import ClientSession

if TYPE_CHECKING:
    from vitalwire.services.container import Services

#: ``Content-Type`` of the text exposition format.
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
#: Commit batch sizes (rows) and latencies (seconds): the writer's range, 1 row to past its cap.
BATCH_ROWS_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000)
COMMIT_SECONDS_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5)


class _Live(Collector):
    """The services' counters and gauges, read when scraped."""

    def __init__(self, svc: Services) -> None:
        self.svc = svc

    def collect(self) -> Iterator[Metric]:
        svc = self.svc

        def counter(name: str, doc: str, value: float) -> CounterMetricFamily:
            return CounterMetricFamily(f"vitalwire_{name}", doc, value=value)

        def gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
            return GaugeMetricFamily(f"vitalwire_{name}", doc, value=value)

        yield gauge("device_connections", "Devices connected now.", len(svc.ingest.sessions))
        yield gauge("client_connections", "Clients (dashboards) connected now.", len(svc.clients))
        yield gauge(
            "subscriptions", "Stream subscriptions held now.", svc.streams.subscriber_count()
        )
        yield counter(
            "rows_written", "Rows committed (readings and their events).", svc.writer.rows_written
        )
        yield counter(
            "client_frames_sent",
            "Frames handed to client sockets (this process).",
            ClientSession.frames_sent,
        )
        yield counter("store_transactions", "Committed write transactions.", svc.store.transactions)
        yield counter("commits", "Writer commits (batches).", svc.writer.commits)
        yield gauge(
            "writer_queue_rows", "Rows waiting for the next commit.", svc.writer.pending_rows
        )
        yield gauge(
            "client_queue_frames",
            "Frames waiting in client send queues, all clients.",
            sum(c.queued for c in svc.clients),
        )
        yield counter(
            "conflicting_seqs", "Readings refused: seq already used.", svc.ingest.conflicting_seqs
        )
        if svc.mqtt is not None:  # the MQTT bridge (docs/howto-mqtt.md)
            yield counter(
                "mqtt_gaps_refused",
                "MQTT readings messages refused for a gap after the device's high seq.",
                svc.mqtt.gaps_refused,
            )
            yield counter(
                "mqtt_gaps_taken",
                "MQTT seq gaps taken after no resend came within mqtt_resend_wait_s.",
                svc.mqtt.gaps_taken,
            )
        yield counter(
            "slow_consumer_closes",
            "Clients closed because their send queue was full (this process).",
            ClientSession.slow_consumer_closes,
        )
        alerts = CounterMetricFamily(
            "vitalwire_alerts_raised", "Alerts raised, by priority.", labels=["priority"]
        )
        for p in PRIORITIES:
            alerts.add_metric([p], svc.alerts.raised[p])
        yield alerts
        commands = CounterMetricFamily(
            "vitalwire_commands_finished", "Commands settled, by final state.", labels=["state"]
        )
        for s in sorted(TERMINAL):
            commands.add_metric([s], svc.commands.settled[s])
        yield commands
        if svc.edges is not None:  # a cloud: its edge nodes (docs/howto-edge.md)
            rows = svc.edges.status()
            for name, doc, key in (
                ("edge_connected", "1 while the edge node's uplink is connected.", "connected"),
                ("edge_backlog_events", "Events committed at the edge, not yet here.", "backlog"),
                ("edge_lag_seconds", "Age of the edge's newest event when it arrived.", "lag_s"),
            ):
                family = GaugeMetricFamily(f"vitalwire_{name}", doc, labels=["node"])
                for row in rows:
                    family.add_metric([row["node"]], float(row.get(key) or 0))
                yield family
        if svc.cluster is not None:  # one node of several (docs/howto-cluster.md)
            c = svc.cluster
            yield gauge(
                "cluster_streams_held", "Patient streams this node writes now.", len(c.held)
            )
            yield counter("cluster_streams_taken", "Patient streams this node took.", c.taken)
            yield counter(
                "cluster_streams_lost", "Patient streams another node took from this one.", c.lost
            )
            yield counter(
                "cluster_requests_routed",
                "Requests sent to the node that writes the patient's stream.",
                c.routed,
            )
        if svc.uplink is not None:  # an edge node: its own link to the cloud
            up = svc.uplink
            yield gauge("uplink_connected", "1 while the uplink is connected.", up.connected)
            yield gauge("uplink_backlog_events", "Events not yet at the cloud.", up.backlog())


class Metrics:
    """The app's registry: the live collector, the writer's histograms and the process's CPU and
    memory (``process_*``, from /proc where there is one)."""

    def __init__(self, svc: Services) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.registry.register(_Live(svc))
        ProcessCollector(registry=self.registry)
        self.batch_rows = Histogram(
            "vitalwire_commit_batch_rows",
            "Rows per writer commit.",
            buckets=BATCH_ROWS_BUCKETS,
            registry=self.registry,
        )
        self.commit_seconds = Histogram(
            "vitalwire_commit_seconds",
            "Time to commit a batch (retries included).",
            buckets=COMMIT_SECONDS_BUCKETS,
            registry=self.registry,
        )
        svc.writer.on_commit = self.observe_commit

    def observe_commit(self, rows: int, seconds: float) -> None:
        self.batch_rows.observe(rows)
        self.commit_seconds.observe(seconds)

    def text(self) -> bytes:
        return generate_latest(self.registry)
