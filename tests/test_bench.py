"""The bench instrument itself at a tiny size: it runs, its figures are sane, its JSON is valid."""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
import time
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from tests.conftest import REQUIRE_SERVICES
from vitalwire.bench.runner import percentiles
from vitalwire.cli import app


def _need_node() -> None:
    """``--generator node`` runs Node.js workers: skip without ``node`` (CI has it: fail there)."""
    if shutil.which("node") is None:
        reason = "node (Node.js) is not on PATH: --generator node needs it"
        if REQUIRE_SERVICES:
            pytest.fail(reason)
        pytest.skip(reason)


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


def test_bench_ingest_on_postgresql(tmp_path: Path) -> None:
    """--postgres: the server and the baseline on fresh databases of that PostgreSQL server
    (dropped afterwards); an unreachable server is said in one line."""
    import asyncio

    from tests.test_store import POSTGRES, fresh_postgres_db

    async def reachable() -> None:
        async with fresh_postgres_db():
            pass  # skips (fails in CI) when PostgreSQL cannot be reached

    asyncio.run(reachable())
    admin = POSTGRES.rsplit("/", 1)[0] + "/postgres"
    runner = CliRunner()
    out = tmp_path / "ingest-pg.json"
    args = ["bench", "ingest", "--devices", "2", "--readings", "400", "--json", str(out)]
    r = runner.invoke(app, [*args, "--postgres", admin])
    assert r.exit_code == 0, r.output
    ingest = json.loads(out.read_text())
    assert (ingest["store"], ingest["readings"]) == ("postgresql", 400)
    assert ingest["vitalwire_readings_per_s"] > 0
    assert ingest["baseline_direct_store_readings_per_s"] > 0
    r = runner.invoke(app, [*args, "--postgres", "postgresql://postgres@127.0.0.1:1/postgres"])
    assert r.exit_code == 1 and "PostgreSQL is not reachable" in r.output, r.output


def test_bench_catchup_replays_every_missed_event_once(tmp_path: Path) -> None:
    """2 patients x 30 s at 1 Hz: a client that went away gets every missed event back, once."""
    runner = CliRunner()
    out = tmp_path / "catchup.json"
    r = runner.invoke(
        app,
        [
            "bench",
            "catchup",
            *("--patients", "2", "--minutes", "0.5", "--rounds", "1", "--json", str(out)),
        ],
    )
    assert r.exit_code == 0, r.output
    result = json.loads(out.read_text())
    assert result["readings_fed"] == 60
    runs = result["vitalwire"]
    assert [run["batch"] for run in runs] == [True, False]
    for run in runs:
        assert run["lost"] == 0 and run["dup"] == 0 and run["recovered"], run
        assert run["readings"] == 60  # every reading fed, each offset exactly once
        assert run["events"] == result["events"] >= 60
        assert sum(run["kinds"].values()) == run["events"]
        assert run["catch_up_ms"] > 0
    assert result["baseline_store_events_after"]["median_ms"] > 0
    assert result["baseline_sqlite3_select"]["median_ms"] > 0


async def test_catchup_counts_lost_and_duplicated_offsets() -> None:
    """A fake server replays offsets 6, 7, 7 (again, in an events frame) and 9 of 6..10: the
    catch-up client must count 2 lost and 1 duplicated, and stop waiting after its quiet time."""
    from websockets.asyncio.server import ServerConnection, serve

    from vitalwire import wire
    from vitalwire.bench.runner import _resume

    def event(offset: int) -> str:
        return wire.Event.new("patient:P1", offset, "reading", 1.0, {"seq": offset}).frame

    async def handler(ws: ServerConnection) -> None:
        await ws.recv()  # auth
        await ws.send(wire.encode_text(wire.Result(id=0, data={})))
        sub = wire.decode_client(await ws.recv())
        assert isinstance(sub, wire.Subscribe) and sub.since == {"patient:P1": 5}
        start = wire.StreamStart("patient:P1", 10, True, {}, 5)
        await ws.send(wire.encode_text(wire.Subscribed(streams=[start], id=sub.id)))
        await ws.send(event(6))
        await ws.send('{"type":"events","items":[' + event(7) + "," + event(7) + "]}")
        await ws.send(event(9))
        await ws.wait_closed()

    async with serve(handler, "127.0.0.1", 0) as server:
        port = server.sockets[0].getsockname()[1]
        run = await _resume(
            f"http://127.0.0.1:{port}", "t", {"patient:P1": 5}, batch=True, quiet_s=0.5
        )
    assert (run["events"], run["lost"], run["dup"], run["readings"]) == (5, 2, 1, 3)
    assert run["frames"] == 3 and run["events_frames"] == 1 and run["recovered"]


async def _naive_run(
    generator: str,
    drop_every: int = 0,
    stall_every: int = 0,
    device_open_delay_s: float = 0.0,
    **shape: Any,
) -> dict[str, Any]:
    """A small load (2 devices at 20 Hz, one client watching both) through the naive server."""
    import asyncio

    from vitalwire.bench.load import Shape, Target, run_load
    from vitalwire.bench.runner import naive_process

    if generator == "node":
        _need_node()
    load = Shape(
        devices=2, rate_hz=20, clients=1, patients_per_client=2, workers=1, generator=generator
    )
    load = dataclasses.replace(load, **shape)
    async with naive_process(drop_every, stall_every, device_open_delay_s) as (url, pid):
        row: dict[str, Any] = await asyncio.to_thread(run_load, Target("naive", url), load, pid)
    return row


@pytest.mark.parametrize("generator", ["python", "node"])
async def test_loss_is_counted_when_the_reference_drops_frames(generator: str) -> None:
    """The naive server told to drop every 5th frame: the bench must see exactly those, with
    either load generator."""
    row = await _naive_run(generator, drop_every=5, duration_s=1.0)
    assert row["generator"] == generator
    expected = row["published"]  # the one client watches both devices
    assert expected >= 30
    assert row["lost"] == expected // 5
    assert row["delivered"] == expected - expected // 5
    assert row["duplicated"] == 0


@pytest.mark.parametrize("generator", ["python", "node"])
async def test_the_load_starts_once_every_connection_is_open(generator: str) -> None:
    """The naive server holds each device's opening handshake 2 s, so the worker needs at
    least 4 s to open its two devices: the load (second 0 of the timeline, the idle memory
    reading, the CPU window) starts only then, whatever was planned, and every reading of the
    1 s load is counted from its first second."""
    before = time.time()
    row = await _naive_run(generator, device_open_delay_s=2.0, duration_s=1.0)
    assert row["connect_s"] >= 4.0
    assert row["load_started_at"] >= before + 4.0
    assert row["lost"] == 0 and row["delivered"] == row["published"] >= 30
    first = min(t["s"] for t in row["timeline"] if t["timed"])
    assert first == 0, row["timeline"]


@pytest.mark.parametrize("generator", ["python", "node"])
async def test_a_warm_up_leaves_its_readings_out_of_the_latencies_only(generator: str) -> None:
    """``--warmup 1`` at 20 Hz: the readings sent in the load's first second still count as
    delivered (and would count as lost), but only the later ones are timed: 20 per device, 19
    or 21 at the second's edge (a reading due just before it sent just after, or the worker's
    clock a millisecond off the parent's). Without a warm-up every reading is timed (the other
    tests: ``latency_ms.n == delivered``), even one stamped a hair before the start."""
    row = await _naive_run(generator, duration_s=2.0, warmup_s=1.0)
    assert row["shape"]["warmup_s"] == 1.0
    assert row["lost"] == 0 and row["delivered"] == row["published"] >= 60
    assert 2 * 19 <= row["delivered"] - row["latency_ms"]["n"] <= 2 * 21


@pytest.mark.parametrize("generator", ["python", "node"])
async def test_the_timeline_places_the_slow_readings_in_their_second(generator: str) -> None:
    """The naive server told to stall 120 ms before every 15th frame (2 s at 2 x 20 Hz: 5 or
    so stalls): the timeline counts every timed reading once, in the second it arrived, finds
    at least one reading over 50 ms per stall, and its slowest is the run's slowest; every second
    of the load and its drain has the generator's longest stall beside it."""
    from vitalwire.bench.naive import STALL_S

    row = await _naive_run(generator, stall_every=15, duration_s=2.0)
    timeline = row["timeline"]
    lat = row["latency_ms"]
    assert row["lost"] == 0 and lat["n"] == row["delivered"] >= 60
    assert sum(s["timed"] for s in timeline) == lat["n"]
    seconds = [s["s"] for s in timeline]
    assert seconds == sorted(set(seconds)) and 0 <= seconds[0] and seconds[-1] <= 5
    # the generator's own stalls, sampled every 10 ms through the load and its drain
    assert {0, 1, 2, 3} <= set(seconds)
    assert all(s["generator_stall_ms"] >= 0 for s in timeline)
    stalls = row["delivered"] // 15
    assert sum(s["over_50ms"] for s in timeline) >= stalls >= 3
    assert max(s["max_ms"] for s in timeline) == lat["max"] >= STALL_S * 1000
    # second 0 on the wall clock: the load of this run began before now, and not long before
    assert 0 < time.time() - row["load_started_at"] < 60


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
    # the server's CPU over the load window: never more than every core, all the time
    assert 0 < rows[0]["server_cpu_pct"] <= 100 * (rows[0]["machine"]["cores"] or 1) * 1.05


def test_bench_load_with_the_node_generator_at_a_tiny_size(tmp_path: Path) -> None:
    """``--generator node``: the same figures from Node.js workers, against vitalwire, the naive
    server and (when the broker is there) MQTT QoS 0 and 1; two workers share the devices."""
    import os

    _need_node()
    runner = CliRunner()
    out = tmp_path / "load.json"
    with_mqtt = os.environ.get("VITALWIRE_REQUIRE_SERVICES") == "1" or _mqtt_up()
    against = ["--against", "naive"] + (["--against", "mqtt://127.0.0.1:1883"] if with_mqtt else [])
    r = runner.invoke(
        app,
        [
            "bench",
            *("--devices", "4", "--rate", "10", "--clients", "2", "--patients-per-client", "2"),
            *("--duration", "1", "--workers", "2", "--generator", "node", *against),
            *("--json", str(out)),
        ],
    )
    assert r.exit_code == 0, r.output
    assert "node load generator" in r.output
    rows = json.loads(out.read_text())
    targets = [row["target"] for row in rows]
    assert targets[:2] == ["vitalwire", "naive"]
    assert targets[2:] == (["mqtt qos0", "mqtt qos1"] if with_mqtt else [])
    for row in rows:
        assert row["generator"] == row["shape"]["generator"] == "node"
        assert row["errors"] == [], row["errors"]
        assert row["published"] >= 20 and row["lost"] == 0 and row["duplicated"] == 0, row
        assert row["delivered"] == row["published"]  # each device watched by exactly one client
        lat = row["latency_ms"]
        assert lat["n"] == row["delivered"] and 0 < lat["p50"] <= lat["p99"] <= lat["max"], lat
        assert row["generator_cpu_s"] > 0
    assert rows[0]["store_rows_per_s"] > 0
    # the replay history's memory, reported apart from the connections' (vitalwire only)
    ours = rows[0]
    assert ours["bus_history_mb"] > 0
    beside = ours["rss_per_connection_beside_history_kb"]
    connections = ours["shape"]["devices"] + ours["shape"]["clients"]
    grown_kb = (ours["rss_per_connection_kb"] - beside) * connections  # the history's growth
    assert 0 < grown_kb <= ours["bus_history_mb"] * 1024 + 0.01
    assert all(r["bus_history_mb"] is None for r in rows[1:])


def _mqtt_up() -> bool:
    import socket

    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", 1883)) == 0


def test_a_warm_up_must_be_shorter_than_the_load() -> None:
    r = CliRunner().invoke(app, ["bench", "--duration", "2", "--warmup", "2"])
    assert r.exit_code == 2
    assert "--warmup" in r.output and "must be less than --duration (2 s), got 2" in r.output
    negative = CliRunner().invoke(app, ["bench", "--warmup", "-1"])
    assert negative.exit_code == 2 and "--warmup" in negative.output


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ["--refine", "3"],
            "Invalid value for --refine: narrows a --saturate ladder: use it with --saturate "
            "(got 3 without)",
        ),
        (["--saturate", "--refine", "7"], "--refine': Input should be less than or equal to 6"),
        (
            ["--repeat", "3"],
            "Invalid value for --repeat: repeats the steps of a --saturate ladder: use it with "
            "--saturate (got 3 without)",
        ),
        (["--saturate", "--repeat", "6"], "--repeat': Input should be less than or equal to 5"),
    ],
)
def test_refine_and_repeat_are_bounded_and_only_with_saturate(
    args: list[str], message: str
) -> None:
    """``--refine`` narrows a saturation ladder and ``--repeat`` repeats its steps: alone
    either is an error, as is one past its bound (6 halvings, 5 runs); all are refused
    before anything runs."""
    result = CliRunner().invoke(app, ["bench", *args])
    assert result.exit_code == 2
    # the error box's lines joined: it wraps by terminal width
    assert message in " ".join(result.output.replace("│", " ").split())


async def test_saturate_doubles_then_halves_each_targets_interval() -> None:
    """Targets with known limits (a fake run stands in for the loads): the doubling finds each
    one's step, then two refinements halve each interval between the last rate that held and
    the first that failed, running only the targets whose middle it is — together when they
    share it. A reading lost fails a rate as a p99 past the bound does."""
    from vitalwire.bench.load import Shape
    from vitalwire.bench.runner import bench_saturate

    p99_limit = {"vitalwire": 100.0, "naive": 90.0, "mqtt qos0": 1000.0, "mqtt qos1": 1000.0}
    lossless_up_to = {"mqtt qos1": 60.0}
    calls: list[tuple[float, list[str] | None]] = []

    async def run(shape: Any, against: list[str], only: Any) -> list[dict[str, Any]]:
        rate = shape.rate_hz
        calls.append((rate, None if only is None else sorted(only)))
        return [
            {
                "target": t,
                "delivered_per_s": rate * 1000,
                "latency_ms": {"p99": 10.0 if rate <= limit else 80.0},
                "lost": 0 if rate <= lossless_up_to.get(t, math.inf) else 7,
            }
            for t, limit in p99_limit.items()
            if only is None or t in only
        ]

    shape = Shape(devices=1, rate_hz=10, clients=1, patients_per_client=1)
    rows = await bench_saturate(shape, ["naive", "mqtt://x"], steps=6, refine=2, run=run)

    assert calls == [
        *((r, None) for r in (10, 20, 40, 80, 160, 320)),
        (60, ["mqtt qos1"]),  # held 40, failed 80
        (120, ["naive", "vitalwire"]),  # both held 80, failed 160
        (70, ["mqtt qos1"]),
        (100, ["naive", "vitalwire"]),
    ]
    got = {r["target"]: (r["rate_hz"], r["failed_at_hz"]) for r in rows}
    assert got == {
        "vitalwire": (100, 120),
        "naive": (80, 100),
        "mqtt qos0": (320, None),  # never failed within the steps: nothing to narrow
        "mqtt qos1": (60, 70),
    }
    by_target = {r["target"]: r for r in rows}
    assert by_target["naive"]["ratio_delivered_vs_vitalwire"] == pytest.approx(0.8)
    assert by_target["mqtt qos0"]["ratio_delivered_vs_vitalwire"] == pytest.approx(3.2)
    steps = [s["rate_hz"] for s in by_target["vitalwire"]["steps"]]
    assert steps == [10, 20, 40, 80, 100, 120, 160, 320]  # by rate, for the plot
    assert [s["lost"] for s in by_target["mqtt qos1"]["steps"]] == [0, 0, 0, 0, 7, 7, 7, 7]


async def test_saturate_repeat_takes_the_majority_of_each_steps_runs() -> None:
    """With ``repeat``, a step holds when most of its runs held (a tie fails) and reports the
    run of the median p99: one bad run in three does not end a ladder, two do."""
    from vitalwire.bench.load import Shape
    from vitalwire.bench.runner import bench_saturate

    # the p99 of each run at each rate, in run order (vitalwire only: no references)
    p99s = {
        10: [5.0, 70.0, 6.0],  # one bad run of three: holds
        20: [60.0, 8.0, 9.0],  # holds again
        40: [7.0, 90.0, 95.0],  # two bad runs: fails
        30: [40.0, 45.0, 55.0],  # the refinement's middle: holds, median 45
        35: [51.0, 52.0, 20.0],  # fails
    }
    seen: dict[float, int] = {}

    async def run(shape: Any, against: list[str], only: Any) -> list[dict[str, Any]]:
        rate = shape.rate_hz
        i = seen[rate] = seen.get(rate, -1) + 1
        return [
            {
                "target": "vitalwire",
                "delivered_per_s": rate * 1000 + i,  # which run was reported
                "latency_ms": {"p99": p99s[int(rate)][i]},
                "lost": 0,
            }
        ]

    shape = Shape(devices=1, rate_hz=10, clients=1, patients_per_client=1)
    (row,) = await bench_saturate(shape, [], steps=6, refine=2, run=run, repeat=3)
    assert seen == {10: 2, 20: 2, 40: 2, 30: 2, 35: 2}  # every step ran three times
    assert (row["rate_hz"], row["failed_at_hz"]) == (30, 35)
    assert row["delivered_per_s"] == 30_000 + 1  # the median run: p99 45 ms
    steps = {s["rate_hz"]: s for s in row["steps"]}
    assert steps[10]["p99_ms"] == 6.0 and steps[10]["runs_held"] == 2
    assert steps[40]["runs_p99_ms"] == [7.0, 90.0, 95.0] and steps[40]["runs_held"] == 1

    seen.clear()  # two runs: a tie (one held, one failed) fails the step, so nothing held
    p99s[10] = [5.0, 70.0]
    assert await bench_saturate(shape, [], steps=1, refine=0, run=run, repeat=2) == []
    assert seen == {10: 1}
    with pytest.raises(ValueError, match="repeat must be at least 1, got 0"):
        await bench_saturate(shape, [], run=run, repeat=0)


async def test_a_load_runs_only_the_targets_named() -> None:
    """``bench_load(..., only=...)``, as the refinement calls it: the naive reference alone,
    for real, at a tiny size; no vitalwire row, so no ratio to it."""
    from vitalwire.bench.load import Shape
    from vitalwire.bench.runner import bench_load

    shape = Shape(
        devices=2, rate_hz=10, clients=1, patients_per_client=2, duration_s=1.0, workers=1
    )
    rows = await bench_load(shape, ["naive"], only={"naive"})
    assert [r["target"] for r in rows] == ["naive"]
    assert rows[0]["published"] >= 20 and rows[0]["lost"] == 0
    assert rows[0]["ratio_delivered_vs_vitalwire"] is None


@pytest.mark.parametrize("generator", ["python", "node"])
async def test_bench_loads_a_server_it_did_not_start_and_runs_again_on_it(
    tmp_path: Path, generator: str
) -> None:
    """``--url`` with ``--credentials`` from ``admin provision-ward``: the load runs against a
    server started outside the bench, its CPU and memory come from its ``/metrics.json``, and a
    second run on the same server (as a ladder's next step) loses nothing although the
    devices' seqs go on from the first run's."""
    import asyncio

    import httpx

    from tests.conftest import ServerProcess, free_port

    if generator == "node":
        _need_node()
    db, creds = f"sqlite:///{tmp_path / 'given.db'}", tmp_path / "creds.json"
    runner = CliRunner()
    r = await asyncio.to_thread(
        runner.invoke,
        app,
        ["admin", "provision-ward", "--patients", "4", "--out", str(creds), "--db", db],
    )
    assert r.exit_code == 0, r.output
    srv = ServerProcess(db, free_port(), tmp_path)
    await srv.start()
    try:
        metrics = httpx.get(srv.url + "/metrics.json").json()
        assert metrics["process_cpu_s"] > 0 and metrics["process_rss_kb"] > 10_000
        rows = []
        for run in (1, 2):
            out = tmp_path / f"run{run}.json"
            args = ["bench", "--url", srv.url, "--credentials", str(creds), "--devices", "4"]
            args += ["--rate", "5", "--clients", "2", "--patients-per-client", "4"]
            args += ["--duration", "1.5", "--workers", "1", "--generator", generator]
            r = await asyncio.to_thread(runner.invoke, app, [*args, "--json", str(out)])
            assert r.exit_code == 0, r.output
            (row,) = json.loads(out.read_text())
            rows.append(row)
        for row in rows:
            assert row["target"] == "vitalwire" and row["server_url"] == srv.url
            assert row["published"] >= 4 * 5, row
            assert row["lost"] == 0 and row["duplicated"] == 0, row
            assert row["delivered"] == 2 * row["published"], row  # both clients watch all 4
            assert row["server_cpu_pct"] > 0 and row["server_rss_mb"] > 10
            assert row["rss_per_idle_connection_kb"] is not None
            assert row["store_rows_per_s"] > 0
        after = httpx.get(srv.url + "/metrics.json").json()
        assert after["rows_written"] >= rows[0]["published"] + rows[1]["published"]
    finally:
        srv.stop()


def test_bench_url_and_credentials_errors_name_the_option(tmp_path: Path) -> None:
    creds = tmp_path / "creds.json"
    creds.write_text(
        json.dumps(
            {
                "devices": [{"device_id": "mon-001", "secret": "s", "patient_id": "P001"}],
                "users": [{"username": "clinician", "password": "p", "role": "clinician"}],
            }
        )
    )
    a_list, no_secret = tmp_path / "list.json", tmp_path / "no-secret.json"
    a_list.write_text("[]")
    no_secret.write_text(
        json.dumps({"devices": [{"device_id": "mon-001", "patient_id": "P001"}], "users": []})
    )
    no_users = tmp_path / "no-users.json"
    no_users.write_text(json.dumps({"devices": json.loads(creds.read_text())["devices"]}))
    cases = [
        (["--url", "http://127.0.0.1:1"], "--url", "give --credentials FILE"),
        (["--credentials", str(creds)], "--credentials", "give --url too"),
        (["--url", "ws://x:1", "--credentials", str(creds)], "--url", "http:// or https://"),
        (
            ["--url", "http://127.0.0.1:1", "--credentials", str(creds), "--devices", "3"],
            "--credentials",
            "needs 3 devices, the credentials name 1",
        ),
        (
            ["--url", "http://127.0.0.1:1", "--credentials", str(no_users), "--devices", "1"],
            "--credentials",
            "no clinician user",
        ),
        (
            ["--url", "http://127.0.0.1:1", "--credentials", str(tmp_path / "none.json")],
            "--credentials",
            "none.json",
        ),
        (
            ["--url", "http://127.0.0.1:1", "--credentials", str(a_list), "--devices", "1"],
            "--credentials",
            "is not a credentials file",
        ),
        (
            ["--url", "http://127.0.0.1:1", "--credentials", str(no_secret), "--devices", "1"],
            "--credentials",
            "devices[0] has no secret",
        ),
    ]
    for args, option, words in cases:
        r = CliRunner().invoke(app, ["bench", *args], terminal_width=400)
        assert r.exit_code == 2, (args, r.output)
        # (rich wraps the error box at its own width, anywhere in a long path: compare the
        # text without its white space)
        flat = "".join(r.output.replace("│", " ").split())
        assert "".join(option.split()) in flat and "".join(words.split()) in flat, (args, flat)


def test_bench_login_flood_measures_each_phase_beside_idle(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Idle, right-password and wrong-password phases on one server: the readings arrive in
    each, the logins are counted by status, and the wrong passwords meet the throttle."""
    from argon2 import PasswordHasher

    from vitalwire.services import auth

    # the bench provisions its users here: at argon2's real cost, which the flood is about
    # (tests/conftest.py makes it cheap for the other tests)
    monkeypatch.setattr(auth, "_hasher", PasswordHasher())
    # the server the bench starts inherits this: each address is held after its first failure
    # (a busy machine answers few logins in a 2 s phase: the low-priority hashing thread waits)
    monkeypatch.setenv("VITALWIRE_LOGIN_ADDRESS_FREE", "1")
    out = tmp_path / "login-flood.json"
    r = CliRunner().invoke(
        app,
        [
            "bench",
            "login-flood",
            *("--loops", "2", "--duration", "2", "--devices", "2", "--clients", "1"),
            *("--json", str(out)),
        ],
    )
    assert r.exit_code == 0, r.output
    result = json.loads(out.read_text())
    idle, right, wrong = result["phases"]
    assert [p["phase"] for p in (idle, right, wrong)] == [
        "idle",
        "right password",
        "wrong password",
    ]
    for p in (idle, right, wrong):
        assert p["lost"] == 0 and p["latency_ms"]["n"] > 0 and p["ping_ms"]["n"] > 0, p
        assert p["logins_other"] == 0, p
    assert idle["logins_answered_per_s"] == 0 and idle["p99_vs_idle"] == 1.0
    assert right["logins_ok"] > 0 and right["logins_refused_401"] == 0
    assert wrong["logins_ok"] == 0 and wrong["logins_refused_401"] > 0
    assert wrong["logins_throttled_429"] > 0
