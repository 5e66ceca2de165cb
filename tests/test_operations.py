"""Operations: Prometheus ``/metrics`` (and its token), ``/metrics.json``, ``/readyz``."""

from __future__ import annotations

import asyncio
import sqlite3
import time
from pathlib import Path
from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import RunningServer, start_server, stop_server
from vitalwire.bus.memory import MemoryBus
from vitalwire.bus.redis import RedisBus
from vitalwire.sdk import DeviceClient

FAMILIES = (
    "vitalwire_device_connections",
    "vitalwire_client_connections",
    "vitalwire_subscriptions",
    "vitalwire_rows_written",
    "vitalwire_client_frames_sent",
    "vitalwire_store_transactions",
    "vitalwire_commits",
    "vitalwire_writer_queue_rows",
    "vitalwire_client_queue_frames",
    "vitalwire_conflicting_seqs",
    "vitalwire_slow_consumer_closes",
    "vitalwire_alerts_raised",
    "vitalwire_commands_finished",
    "vitalwire_commit_batch_rows",
    "vitalwire_commit_seconds",
    "process_cpu_seconds",
    "process_resident_memory_bytes",
)


def scrape(text: str) -> dict[str, float]:
    """Every sample of a scrape by name and labels (``name{k=v}``)."""
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(s.labels.items()))
            out[f"{s.name}{{{labels}}}" if labels else s.name] = s.value
    return out


def families(text: str) -> set[str]:
    return {f.name for f in text_string_to_metric_families(text)}


async def test_metrics_is_prometheus_text_and_moves_with_readings(server: RunningServer) -> None:
    async with httpx.AsyncClient(base_url=server.url) as http:
        r = await http.get("/metrics")
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/plain; version=0.0.4")
        missing = set(FAMILIES) - families(r.text)
        assert not missing, missing
        before = scrape(r.text)
        did, secret, pid = server.device(0)
        async with DeviceClient(server.url, did, secret) as dev:
            for i in range(20):
                dev.send(hr=70 + i % 5, spo2=80, ts=time.time())
            await dev.flush(timeout=30)
            during = scrape((await http.get("/metrics")).text)
            assert during["vitalwire_device_connections"] == 1

            async def alerted() -> bool:
                now = scrape((await http.get("/metrics")).text)
                return now["vitalwire_alerts_raised_total{priority=high}"] > 0

            await _wait_async(alerted, "a high alert counted")
        after = scrape((await http.get("/metrics")).text)
        assert pid not in r.text and did not in r.text  # no patient or device in any label
    assert after["vitalwire_rows_written_total"] >= before["vitalwire_rows_written_total"] + 20
    assert after["vitalwire_commits_total"] > before["vitalwire_commits_total"]
    assert after["vitalwire_commit_batch_rows_count"] > before["vitalwire_commit_batch_rows_count"]
    assert (
        after["vitalwire_commit_batch_rows_sum"] >= before["vitalwire_commit_batch_rows_sum"] + 20
    )
    assert after["vitalwire_commit_seconds_count"] > before["vitalwire_commit_seconds_count"]
    assert (
        after["vitalwire_store_transactions_total"] > before["vitalwire_store_transactions_total"]
    )
    assert after["process_resident_memory_bytes"] > 0
    for state in ("completed", "expired", "failed", "timed_out"):
        assert f"vitalwire_commands_finished_total{{state={state}}}" in after


async def _wait_async(check: Any, what: str, timeout: float = 20.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not await check():
        assert asyncio.get_running_loop().time() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.05)


async def test_metrics_json_keeps_the_bench_keys(server: RunningServer) -> None:
    async with httpx.AsyncClient(base_url=server.url) as http:
        r = await http.get("/metrics.json")
    assert r.status_code == 200
    assert set(r.json()) >= {
        "rows_written",
        "transactions",
        "pending_rows",
        "device_connections",
        "conflicting_seqs",
        "bus_history_kb",
        "client_connections",
        "subscriptions",
        "process_cpu_s",
        "process_rss_kb",
    }


async def test_metrics_json_counts_the_bus_history_memory(server: RunningServer) -> None:
    """``bus_history_kb``: the replay history's estimated memory, which grows by each event
    committed (about 0.4 KB for a reading), whatever the connections."""
    recent = server.services.bus.recent
    async with httpx.AsyncClient(base_url=server.url) as http:
        before = (await http.get("/metrics.json")).json()["bus_history_kb"]
        assert before == round(recent.bytes / 1024, 1)
        did, secret, _ = server.device(1)
        async with DeviceClient(server.url, did, secret) as dev:
            for i in range(10):
                dev.send(hr=70 + i, spo2=97, ts=time.time())
            await dev.flush(timeout=30)
        await server.services.writer.flush()
        after = (await http.get("/metrics.json")).json()["bus_history_kb"]
    assert after == round(recent.bytes / 1024, 1)
    assert after - before >= 10 * 0.3  # ten readings' events at least


async def test_metrics_token_guards_both_paths(tmp_path: Path) -> None:
    running, task = await start_server(tmp_path, metrics_token="m" * 32)
    try:
        async with httpx.AsyncClient(base_url=running.url) as http:
            for path in ("/metrics", "/metrics.json"):
                assert (await http.get(path)).status_code == 401
                wrong = {"Authorization": "Bearer " + "x" * 32}
                assert (await http.get(path, headers=wrong)).status_code == 401
                right = {"Authorization": "Bearer " + "m" * 32}
                assert (await http.get(path, headers=right)).status_code == 200
            assert (await http.get("/readyz")).status_code == 200  # probes stay open
    finally:
        await stop_server(running, task)


async def test_readyz_ready_then_names_the_migrations(
    server: RunningServer, tmp_path: Path
) -> None:
    async with httpx.AsyncClient(base_url=server.url) as http:
        r = await http.get("/readyz")
        assert r.status_code == 200
        assert r.json() == {"status": "ready", "store": "ok", "bus": "ok", "migrations": "ok"}
        with sqlite3.connect(tmp_path / "vitalwire.db") as db:
            (head,) = db.execute("SELECT version_num FROM alembic_version").fetchone()
            db.execute("UPDATE alembic_version SET version_num = '0001'")
        try:
            r = await http.get("/readyz")
            assert r.status_code == 503
            assert r.json()["migrations"] == "behind" and r.json()["store"] == "ok"
        finally:
            with sqlite3.connect(tmp_path / "vitalwire.db") as db:
                db.execute("UPDATE alembic_version SET version_num = ?", (head,))


async def test_readyz_names_the_store_when_it_does_not_answer(server: RunningServer) -> None:
    store: Any = server.services.store
    engine = store._engine
    store._engine = None  # the store does not answer (its engine is gone)
    try:
        async with httpx.AsyncClient(base_url=server.url) as http:
            r = await http.get("/readyz")
        assert r.status_code == 503
        assert r.json()["status"] == "not_ready" and r.json()["store"] == "unreachable"
        assert r.json()["bus"] == "ok"
    finally:
        store._engine = engine


async def test_readyz_names_the_bus_when_it_does_not_answer(
    server: RunningServer, monkeypatch: Any
) -> None:
    async def down() -> bool:
        return False

    monkeypatch.setattr(server.services.bus, "ready", down)
    async with httpx.AsyncClient(base_url=server.url) as http:
        r = await http.get("/readyz")
    assert r.status_code == 503
    assert r.json()["bus"] == "unreachable" and r.json()["store"] == "ok"


async def test_bus_ready() -> None:
    assert await MemoryBus().ready()
    bus = RedisBus("redis://127.0.0.1:1")
    assert not await bus.ready()  # not open
    import redis.asyncio as aioredis

    bus._redis = aioredis.from_url("redis://127.0.0.1:1")  # open, then Redis went away
    try:
        assert not await bus.ready()
    finally:
        await bus._redis.aclose()
        bus._redis = None
