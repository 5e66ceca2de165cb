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
from vitalwire.bench.cluster import (
    POSTGRES_ADMIN,
    REDIS,
    ServiceUnavailable,
    check_services,
    node_model,
    stage_costs,
)

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


@pytest.mark.parametrize("generator", ["python", "node"])
async def test_stages_put_every_device_on_one_node_and_the_clients_where_the_layout_says(
    tmp_path: Path, generator: str
) -> None:
    await _need_services()
    r = _bench(
        tmp_path,
        "stages",
        *("--stages", "--devices", "6", "--rate", "4", "--clients", "2"),
        *("--patients-per-client", "6", "--duration", "3", "--workers", "1"),
        *("--generator", generator),
    )
    assert r["scenario"] == "cluster-stages" and r["nodes"] == 2
    rows = {row["layout"]: row for row in r["rows"]}
    assert list(rows) == ["together", "apart"]
    # what each node itself reported with every connection open
    assert rows["together"]["nodes_devices_connected"] == [6, 0]
    assert rows["together"]["nodes_clients_connected"] == [2, 0]
    assert rows["apart"]["nodes_devices_connected"] == [6, 0]
    assert rows["apart"]["nodes_clients_connected"] == [0, 2]
    for row in rows.values():
        assert row["errors"] == [] and row["nodes_died"] == []
        assert row["lost"] == 0 and row["duplicated"] == 0
        assert row["delivered"] == 2 * row["published"] > 0
        # node 2 took every event from the bus, with or without clients
        assert all(cpu > 0 for cpu in row["nodes_cpu_pct"]), row["nodes_cpu_pct"]
    # the costs and the model are the functions of these rows (tested on their own below)
    assert r["stage_costs"] == pytest.approx(stage_costs(rows["together"], rows["apart"]))
    model = node_model(r["stage_costs"])
    assert r["model"]["nodes"] == pytest.approx(model.pop("nodes"))
    assert {k: r["model"][k] for k in model} == pytest.approx(model)
    assert r["stage_costs"]["deliveries_per_reading"] == pytest.approx(2.0)


def _row(nodes_cpu: list[float], readings: float, deliveries: float, pg: float, redis: float):
    return {
        "nodes_cpu_pct": nodes_cpu,
        "published_per_s": readings,
        "delivered_per_s": deliveries,
        "postgres_db_cpu_pct": pg,
        "redis_cpu_pct": redis,
    }


#: (together, apart, expected stage costs in ms per reading / per delivery)
STAGE_CASES = [
    (  # 2,000 readings/s, 2 deliveries each: node 2 spends 6 % folding, 14 % with the clients
        _row([60.0, 6.0], 2000, 4000, 40.0, 2.0),
        _row([55.0, 14.0], 2000, 4000, 36.0, 2.0),
        {
            "fold_ms": 0.03,
            "deliver_ms": 0.02,
            "write_ms": 0.275,
            "postgres_ms": 0.19,
            "redis_ms": 0.01,
            "deliveries_per_reading": 2.0,
        },
    ),
    (  # one client per reading, a busier fold
        _row([80.0, 20.0], 1000, 1000, 30.0, 1.0),
        _row([70.0, 30.0], 1000, 1000, 30.0, 3.0),
        {
            "fold_ms": 0.2,
            "deliver_ms": 0.1,
            "write_ms": 0.7,
            "postgres_ms": 0.3,
            "redis_ms": 0.02,
            "deliveries_per_reading": 1.0,
        },
    ),
]


@pytest.mark.parametrize(("together", "apart", "expected"), STAGE_CASES)
def test_stage_costs_from_the_two_layouts(together: dict, apart: dict, expected: dict) -> None:
    assert stage_costs(together, apart) == pytest.approx(expected)


def test_the_node_model_adds_the_fold_on_every_node_to_a_share_of_the_rest() -> None:
    costs = {
        "fold_ms": 0.05,
        "deliver_ms": 0.1,
        "write_ms": 0.25,  # 0.2 of its own beside the fold of its events
        "postgres_ms": 0.2,
        "redis_ms": 0.01,
        "deliveries_per_reading": 2.0,
    }
    m = node_model(costs, nodes=(1, 2, 4))
    # per reading on one node of N: 0.2 / N + 0.05 + 2 * 0.1 / N ms
    assert m["nodes"] == pytest.approx({"1": 1000 / 0.45, "2": 1000 / 0.25, "4": 1000 / 0.15})
    assert m["fold_ceiling_per_s"] == pytest.approx(20_000)
    assert m["postgres_per_core_per_s"] == pytest.approx(5_000)
    assert m["redis_per_core_per_s"] == pytest.approx(100_000)
    # more nodes never hold less, and never more than the fold's ceiling
    held = list(node_model(costs, nodes=(1, 2, 4, 8, 64, 1024))["nodes"].values())
    assert held == sorted(held) and held[-1] < m["fold_ceiling_per_s"]
    # a negative difference of two noisy CPU readings counts as no cost, not as a gain
    m0 = node_model({**costs, "deliver_ms": -0.01}, nodes=(1,))
    assert m0["nodes"]["1"] == pytest.approx(1000 / 0.25)


@pytest.mark.parametrize(
    ("args", "option", "words"),
    [
        (["--stages", "--failover", "2"], "--stages", "not with --failover or --saturate"),
        (["--stages", "--saturate"], "--stages", "not with --failover or --saturate"),
        (["--failover", "2", "--nodes", "1"], "--nodes", "failover needs at least 2 nodes"),
    ],
)
def test_cluster_option_conflicts_name_the_option(args: list[str], option: str, words: str) -> None:
    from typer.testing import CliRunner

    from vitalwire.cli import app

    r = CliRunner().invoke(app, ["bench", "cluster", *args], terminal_width=400)
    assert r.exit_code == 2, r.output
    flat = "".join(r.output.replace("│", " ").split())  # rich wraps the box at its own width
    assert "".join(option.split()) in flat and "".join(words.split()) in flat, r.output
