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
