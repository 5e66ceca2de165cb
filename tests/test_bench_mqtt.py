"""``vitalwire bench mqtt`` at a tiny size: both paths measured in one run, nothing lost."""

from __future__ import annotations

import json
from pathlib import Path

from typer.testing import CliRunner

from tests.test_mqtt import need_mosquitto
from vitalwire.bench import mqtt as bench_mqtt
from vitalwire.cli import app


def test_bench_mqtt_measures_both_paths_in_one_run(tmp_path: Path) -> None:
    need_mosquitto()  # the bench starts a broker of its own
    out = tmp_path / "mqtt.json"
    args = ["--devices", "8", "--clients", "2", "--patients-per-client", "4", "--rate", "4"]
    r = CliRunner().invoke(
        app, ["bench", "mqtt", *args, "--duration", "2", "--workers", "1", "--json", str(out)]
    )
    assert r.exit_code == 0, r.output
    report = json.loads(out.read_text())
    assert report["broker_auth"] == "anonymous listener"
    assert isinstance(report["met"], bool) and report["target_p99_ms"] == 15.0
    rows = {row["target"]: row for row in report["rows"]}
    assert list(rows) == ["ws", "mqtt qos1"]
    for name, row in rows.items():
        assert row["errors"] == [], (name, row["errors"])
        assert row["published"] >= 8, name  # every device sent
        # 2 clients x 4 patients: every watched device's readings, once each
        assert (row["lost"], row["duplicated"]) == (0, 0), name
        assert row["delivered"] == row["latency_ms"]["n"] > 0, name
        assert 0 < row["latency_ms"]["p50"] <= row["latency_ms"]["p99"] <= row["latency_ms"]["max"]
        assert row["store_rows_per_s"] > 0, name
        assert row["server_cpu_pct"] > 0, name
    mq = rows["mqtt qos1"]
    # vitalwire acknowledged every reading to its device, and the broker every publish
    assert (mq["unacked_at_end"], mq["unconfirmed_at_end"]) == (0, 0)
    assert mq["generator_load_cpu_pct"] > 0
    assert mq["broker_cpu_pct"] >= 0  # its own broker: a process it knows
    assert "max_queued_messages 100000" in report["broker_config"]
    assert "MQTT path p99 <= 15 ms" in r.output


def test_bench_mqtt_refuses_a_broker_url_with_credentials() -> None:
    r = CliRunner().invoke(
        app, ["bench", "mqtt", "--devices", "1", "--broker", "mqtt://u:p@127.0.0.1:1"]
    )
    assert r.exit_code == 1 and "anonymous listener" in r.output, r.output


def test_mqtt_remaining_lengths_are_variable_byte_integers() -> None:
    """MQTT 3.1.1 section 2.2.3: 7 bits a byte, the high bit set while more follow (the bench's
    devices and the bridge encode them with the same function)."""
    cases = {0: b"\x00", 127: b"\x7f", 128: b"\x80\x01", 321: b"\xc1\x02", 16384: b"\x80\x80\x01"}
    assert {n: bench_mqtt.varint(n) for n in cases} == cases
