"""Issue 4 item 8 through the pure engine, with the real BIDMC recordings (data/bidmc).

The recordings are from the BIDMC PPG and Respiration Dataset v1.0.0 (PhysioNet, ODC-By 1.0);
citations in vitalwire.simulator.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import need_data
from vitalwire.alarms_report import burden, render_markdown, report
from vitalwire.core.alerts import AlertChange, PatientAlerts
from vitalwire.simulator import read_bidmc


@pytest.fixture(scope="module")
def data() -> Path:
    return need_data()


def replay(data: Path, record: str) -> list[AlertChange]:
    """Replay one recording at its own pace: a reading and a tick every second."""
    engine = PatientAlerts("replay")
    changes: list[AlertChange] = []
    for row in read_bidmc(data / f"{record}_Numerics.csv"):
        t = float(row["t"])
        values = {k: v for k, v in row.items() if k != "t"}
        out = engine.on_reading(t, "monitor", values) + engine.tick(t)
        changes += [c for c in out if isinstance(c, AlertChange)]
    return changes


def test_bidmc_32_raises_high_priority_low_spo2_at_once(data: Path) -> None:
    changes = replay(data, "bidmc_32")
    first = changes[0]
    assert (first.action, first.condition, first.priority, first.at) == (
        "raised",
        "spo2_low",
        "high",
        0.0,
    )
    assert first.value is not None and first.value < 85


def test_bidmc_22_raises_no_spo2_alert_with_default_delay(data: Path) -> None:
    changes = replay(data, "bidmc_22")
    assert [c for c in changes if c.condition.startswith("spo2")] == []
    naive = burden(read_bidmc(data / "bidmc_22_Numerics.csv"))["naive"]
    assert naive.get("spo2_low", 0) >= 1  # the naive rule does alarm (t=48-49, below 90 %)


def test_bidmc_25_raises_medium_high_rate_alert_and_no_high_priority_one(data: Path) -> None:
    changes = replay(data, "bidmc_25")
    rate = [c for c in changes if c.action == "raised" and c.condition in ("hr_high", "pulse_high")]
    assert rate and {c.priority for c in rate} == {"medium"}
    assert [c for c in changes if c.priority == "high"] == []


def test_bidmc_19_raises_probe_off_not_a_desaturation(data: Path) -> None:
    changes = replay(data, "bidmc_19")
    assert any(c.action == "raised" and c.condition == "probe_off" for c in changes)
    assert {c.category for c in changes if c.condition == "probe_off"} == {"technical"}
    assert [c for c in changes if c.condition == "spo2_low"] == []


def test_report_counts_engine_alerts_and_naive_alarms(data: Path) -> None:
    rows = report(data)
    assert [r["file"] for r in rows] == [
        "bidmc_01_Numerics.csv",
        "bidmc_19_Numerics.csv",
        "bidmc_22_Numerics.csv",
        "bidmc_25_Numerics.csv",
        "bidmc_32_Numerics.csv",
    ]
    by_file = {r["file"][:8]: r for r in rows}
    assert by_file["bidmc_32"]["high_priority"] == {"spo2_low": 1}
    assert by_file["bidmc_32"]["naive_readings"]["spo2_low"] == 481
    assert by_file["bidmc_22"]["alerts"] == {}
    assert by_file["bidmc_22"]["naive"] == {"spo2_low": 1}
    assert by_file["bidmc_22"]["naive_readings"] == {"spo2_low": 2}
    engine_total = sum(r["physiological"] for r in rows)
    naive_total = sum(r["naive_total"] for r in rows)
    assert engine_total < naive_total
    table = render_markdown(rows)
    assert table.splitlines()[0].startswith("| recording |")
    assert table.splitlines()[-1].startswith("| **total** |")
    assert len(table.splitlines()) == 2 + len(rows) + 1


def test_burden_ticks_through_gaps_between_rows() -> None:
    rows: list[dict[str, float | bool]] = [{"t": 0.0, "spo2": 88.0, "probe": True}]
    rows.append({"t": 20.0, "spo2": 88.0, "probe": True})
    result = burden(rows)
    assert result["alerts"] == {"spo2_low": 1}  # raised by a tick at t=15, between the rows
    assert result["naive"] == {"spo2_low": 1}
    assert result["seconds"] == 21.0


def test_report_of_a_missing_folder(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        report(tmp_path / "nope")
    assert report(tmp_path) == []
