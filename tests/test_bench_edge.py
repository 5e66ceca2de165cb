"""``vitalwire bench edge`` at a tiny size: a cloud and an edge as processes, a 2 s uplink
outage under load, the catch-up timed, both stores read back with nothing lost."""

from __future__ import annotations

import json
from pathlib import Path

from typer.testing import CliRunner

from vitalwire.bench import edge as bench_edge
from vitalwire.cli import app


def test_bench_edge_measures_relay_and_catch_up(tmp_path: Path) -> None:
    out = tmp_path / "edge.json"
    args = ["--devices", "3", "--rate", "5", "--duration", "3", "--warmup", "0.5"]
    r = CliRunner().invoke(app, ["bench", "edge", *args, "--outage", "2", "--json", str(out)])
    assert r.exit_code == 0, r.output
    report = json.loads(out.read_text())
    assert report["errors"] == []
    assert report["shape"]["readings_per_s"] == 15
    lat = report["latency_ms"]
    for end in ("edge", "cloud", "paired_cloud_minus_edge"):
        assert lat[end]["n"] > 0, end
        assert 0 < lat[end]["p50"] <= lat[end]["p99"] <= lat[end]["max"], end
    # the cloud's client is one hop further than the edge's, reading by reading
    assert lat["paired_cloud_minus_edge"]["p50"] > 0
    assert set(report["relay_added_ms"]) == {"p50", "p99", "p99.9", "max"}
    # the outage left a backlog at the edge; its catch-up was timed
    c = report["catchup"]
    assert c["outage_s"] == 2
    assert c["backlog_events"] > 0
    assert c["caught_up_s"] is not None and c["caught_up_s"] >= c["backlog_drained_s"] > 0
    assert c["speedup"] == c["outage_s"] / c["caught_up_s"]
    # both stores: every reading the devices sent, once, at the cloud, as at the edge
    i = report["integrity"]
    assert i["readings_sent"] > 3 * 5 * 3 // 2
    assert i["cloud_readings"] == i["edge_readings"] == i["readings_sent"]
    assert i["cloud_events"] == i["edge_events"]
    assert (i["lost"], i["duplicated"], i["offset_gaps"], i["streams_differing"]) == (0, 0, 0, 0)
    assert i["nothing_lost"] is True and report["targets"]["nothing_lost"] is True
    for name, client in report["clients"].items():
        assert client["received"] == i["readings_sent"], name
        assert (client["lost"], client["duplicated"]) == (0, 0), name
    assert isinstance(report["targets"]["catchup_met"], bool)
    assert "catch-up after a 2 s outage" in r.output


async def test_read_back_counts_what_the_cloud_does_not_have(tmp_path: Path) -> None:
    """The check is not vacuous: readings a device sent that no store holds are lost."""
    cloud_db = f"sqlite:///{tmp_path / 'cloud.db'}"
    edge_db = f"sqlite:///{tmp_path / 'edge.db'}"
    _, edge, _ = await bench_edge._provision(cloud_db, edge_db, 2)  # noqa: SLF001
    devs = [(d["device_id"], d["secret"], d["patient_id"]) for d in edge.devices]
    r = await bench_edge._read_back(edge_db, cloud_db, devs, [3, 0])  # noqa: SLF001
    assert (r["readings_sent"], r["cloud_readings"], r["lost"]) == (3, 0, 3)
    assert r["nothing_lost"] is False
    ok = await bench_edge._read_back(edge_db, cloud_db, devs, [0, 0])  # noqa: SLF001
    assert ok["nothing_lost"] is True
