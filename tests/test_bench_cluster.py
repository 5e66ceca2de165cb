"""``vitalwire bench cluster`` in a tiny shape: the load on 1 node beside 2 real node processes
(fresh PostgreSQL database, fresh Redis prefix), then 2 SIGKILLs of a node under a light load.
Timing is not asserted (tests/test_bench.py's rule); the report's structure, the spread over
the nodes, and that nothing was lost or doubled, are."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REQUIRE_SERVICES
from vitalwire.bench.cluster import POSTGRES_ADMIN, REDIS, ServiceUnavailable, check_services

#: the PostgreSQL server the bench creates its databases on (any database of it names it)
POSTGRES = os.environ.get("VITALWIRE_TEST_POSTGRES", POSTGRES_ADMIN)


async def _need_services() -> None:
    try:
        await check_services(POSTGRES, REDIS)
    except ServiceUnavailable as exc:
        if REQUIRE_SERVICES:
            pytest.fail(str(exc))
        pytest.skip(str(exc))


def _bench(tmp_path: Path, name: str, *args: str) -> dict:
    """Run ``vitalwire bench cluster`` as the user does (a child process: its load workers
    are spawned processes) and return its JSON."""
    out = tmp_path / f"{name}.json"
    proc = subprocess.run(
        [
            *(sys.executable, "-m", "vitalwire.cli", "bench", "cluster", *args),
            *("--postgres", POSTGRES, "--redis", REDIS, "--json", str(out)),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(out.read_text())


async def test_cluster_load_beside_one_node_and_failover(tmp_path: Path) -> None:
    await _need_services()
    r = _bench(
        tmp_path,
        "load",
        *("--nodes", "2", "--devices", "6", "--rate", "4", "--clients", "2"),
        *("--patients-per-client", "6", "--duration", "3", "--workers", "1"),
    )
    assert r["scenario"] == "cluster"
    assert len(r["load_average_before"]) == 3 and len(r["load_average_after"]) == 3
    rows = {row["target"]: row for row in r["rows"]}
    assert list(rows) == ["1 node", "2 nodes"]
    for n, row in ((1, rows["1 node"]), (2, rows["2 nodes"])):
        assert row["nodes"] == n
        # every node was measured, and carried its share of the connections (round robin)
        assert len(row["nodes_cpu_pct"]) == n and len(row["nodes_rss_mb"]) == n
        assert all(cpu > 0 for cpu in row["nodes_cpu_pct"]), row["nodes_cpu_pct"]
        assert all(mb > 10 for mb in row["nodes_rss_mb"]), row["nodes_rss_mb"]
        # what each node itself reported with every connection open: the round robin
        assert row["nodes_devices_connected"] == [6 // n] * n, row["nodes_devices_connected"]
        assert row["nodes_clients_connected"] == [2 // n] * n, row["nodes_clients_connected"]
        assert row["postgres_db_cpu_pct"] > 0  # the nodes' backends wrote the readings
        assert row["nodes_died"] == [] and row["errors"] == []
        # each client watches all 6 devices: every reading reached both clients, once
        assert row["published"] >= 6 * 4 * 3 - 6
        assert row["lost"] == 0 and row["duplicated"] == 0
        assert row["delivered"] == 2 * row["published"]
        lat = row["latency_ms"]
        assert lat["n"] > 0 and 0 < lat["p50"] <= lat["p99"] <= lat["p99.9"] <= lat["max"]
        assert row["store_rows_per_s"] > 0
    assert rows["1 node"]["ratio_delivered_vs_one_node"] == 1.0

    f = _bench(
        tmp_path,
        "failover",
        *("--nodes", "2", "--failover", "2", "--failover-devices", "4"),
        *("--failover-rate", "5", "--lease-ttl", "2"),
    )
    assert f["scenario"] == "cluster-failover"
    assert f["errors"] == []
    assert f["settings"]["lease_ttl_s"] == 2.0
    assert f["settings"]["sdk_device"]["backoff_initial_s"] > 0
    assert len(f["kills_detail"]) == 2
    for k in f["kills_detail"]:
        # the node holding the devices was killed, and every one of them came back elsewhere
        assert k["devices"] > 0 and k["resumed"] == k["devices"]
        assert 0 < k["first_device_ms"] <= k["resume_ms"] < 60_000
    # the second kill takes the other node (it holds every device after the first)
    assert {k["node"] for k in f["kills_detail"]} == {"n1", "n2"}
    assert f["kills_detail"][1]["devices"] == 4
    assert f["resume_ms"]["n"] == 2 and f["resume_ms"]["p50"] <= f["resume_ms"]["max"]
    assert f["readings_sent"] > 4 * 5
    assert f["lost"] == 0 and f["duplicated"] == 0 and f["streams_out_of_order"] == 0
