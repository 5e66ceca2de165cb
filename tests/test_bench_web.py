"""``vitalwire bench web`` at a tiny size: the central station in Chromium under 4 devices gives
latency samples, main-thread busy and heap figures for it and the baseline (no timing
assertions: the figures are the bench's output, not a test's)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from tests.conftest import REQUIRE_SERVICES
from vitalwire.bench.web import _busy, _pct, browser_missing
from vitalwire.cli import app


def _need_browser() -> None:
    """Skip without Playwright or Chromium (``make test`` installs them: fail there)."""
    why = browser_missing()
    if why:
        reason = f"the browser bench needs Playwright and Chromium: {why}"
        if REQUIRE_SERVICES:
            pytest.fail(reason)
        pytest.skip(reason)


def test_latency_percentiles_are_nearest_rank_in_ms() -> None:
    p = _pct([i / 1000 for i in range(1, 101)])
    assert (p["n"], p["p50"], p["p95"], p["p99"], p["max"]) == pytest.approx((100, 50, 95, 99, 100))
    assert _pct([]) == {"n": 0, "p50": None, "p95": None, "p99": None, "max": None}


def test_busy_is_task_time_over_wall_time() -> None:
    m0 = {"Timestamp": 10.0, "TaskDuration": 1.0, "ScriptDuration": 0.5}
    m1 = {"Timestamp": 20.0, "TaskDuration": 2.5, "ScriptDuration": 1.0}
    b = _busy(m0, m1)
    assert (b["wall_s"], b["busy_pct"]) == pytest.approx((10.0, 15.0))
    assert b["busy_by_kind"] == pytest.approx({"script": 5.0})


def test_bench_web_measures_the_station_and_the_baseline(tmp_path: Path) -> None:
    _need_browser()
    out = tmp_path / "web.json"
    r = CliRunner().invoke(
        app,
        ["bench", "web", "--beds", "4", "--duration", "4", "--warmup", "1", "--json", str(out)],
    )
    assert r.exit_code == 0, r.output
    res = json.loads(out.read_text())
    st, base = res["station"], res["baseline"]
    assert res["readings_sent"] > 0
    assert st["latency_raf_ms"]["n"] > 0 and st["latency_mutation_ms"]["n"] > 0
    assert base["latency_raf_ms"]["n"] > 0 and base["latency_message_ms"]["n"] > 0
    assert st["wall_s"] > 0 and st["busy_pct"] > 0 and base["busy_pct"] > 0
    assert st["heap_first"]["js_heap_used_mb"] > 0 and st["heap_end"]["js_heap_used_mb"] > 0
    assert st["heap_growth_pct"] is not None
    assert set(res["verdict"]) == {"p99_ms", "busy_pct", "heap_growth_pct"}
    assert res["errors"] == [] and res["csp_violations"] == []
    assert [e for e in res["console_errors"] if not e.startswith("warning")] == []
    assert "web: central station, 4 beds" in r.output
