"""The bench instrument itself at a tiny size: it runs, its figures are sane, its JSON is valid."""

from __future__ import annotations

import json
from pathlib import Path

from typer.testing import CliRunner

from vitalwire.bench import percentiles
from vitalwire.cli import app


def test_percentiles_nearest_rank() -> None:
    samples = [float(i) for i in range(1, 1001)]
    p = percentiles(samples)
    assert (p["p50"], p["p99"], p["p99.9"], p["max"], p["n"]) == (500.0, 990.0, 999.0, 1000.0, 1000)
    assert percentiles([])["n"] == 0


def test_bench_ingest_and_commands_write_their_figures(tmp_path: Path) -> None:
    runner = CliRunner()
    out = tmp_path / "ingest.json"
    r = runner.invoke(
        app, ["bench", "ingest", "--devices", "2", "--readings", "400", "--json", str(out)]
    )
    assert r.exit_code == 0, r.output
    ingest = json.loads(out.read_text())
    assert ingest["readings"] == 400
    assert (
        ingest["vitalwire_readings_per_s"] > 0
        and ingest["baseline_direct_store_readings_per_s"] > 0
    )
    out = tmp_path / "commands.json"
    r = runner.invoke(app, ["bench", "commands", "--count", "5", "--json", str(out)])
    assert r.exit_code == 0, r.output
    commands = json.loads(out.read_text())
    rtt = commands["vitalwire_command_round_trip_ms"]
    assert rtt["n"] == 5 and 0 < rtt["p50"] <= rtt["max"]
    assert commands["baseline_ping_round_trip_ms"]["n"] == 5


async def test_loss_is_counted_when_the_reference_drops_frames() -> None:
    """The naive server told to drop every 5th frame: the bench must see exactly those."""
    import asyncio

    from vitalwire.bench import naive_process
    from vitalwire.bench_load import Shape, Target, run_load

    shape = Shape(
        devices=2, rate_hz=20, clients=1, patients_per_client=2, duration_s=1.0, workers=1
    )
    async with naive_process(drop_every=5) as (url, pid):
        row = await asyncio.to_thread(run_load, Target("naive", url), shape, pid)
    expected = row["published"]  # the one client watches both devices
    assert expected >= 30
    assert row["lost"] == expected // 5
    assert row["delivered"] == expected - expected // 5
    assert row["duplicated"] == 0


def test_bench_load_against_naive_and_mqtt_at_a_tiny_size(tmp_path: Path) -> None:
    import os

    runner = CliRunner()
    out = tmp_path / "load.json"
    against = ["--against", "naive"]
    if os.environ.get("VITALWIRE_REQUIRE_SERVICES") == "1" or _mqtt_up():
        against += ["--against", "mqtt://127.0.0.1:1883"]
    r = runner.invoke(
        app,
        [
            "bench",
            "--devices",
            "4",
            "--rate",
            "10",
            "--clients",
            "2",
            "--patients-per-client",
            "2",
            "--duration",
            "1",
            "--workers",
            "1",
            *against,
            "--json",
            str(out),
        ],
    )
    assert r.exit_code == 0, r.output
    rows = json.loads(out.read_text())
    assert [row["target"] for row in rows][:2] == ["vitalwire", "naive"]
    for row in rows:
        assert row["published"] >= 20 and row["lost"] == 0 and row["duplicated"] == 0, row
        assert row["delivered"] == row["published"]  # each device watched by exactly one client
        assert row["latency_ms"]["n"] == row["delivered"]
    assert rows[0]["store_rows_per_s"] > 0


def _mqtt_up() -> bool:
    import socket

    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", 1883)) == 0
