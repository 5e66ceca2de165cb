"""``vitalwire bench``: the command's options and tables (the measurements live in runner.py)."""

from __future__ import annotations

import asyncio
import functools
import json
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console

bench_app = typer.Typer(help="Measure the server beside a baseline from the same run.")
console = Console()


JsonOpt = Annotated[Path | None, typer.Option("--json", help="Also write the figures here.")]


class LoadGenerator(StrEnum):
    python = "python"
    node = "node"


@bench_app.callback(invoke_without_command=True)
def bench_main(
    ctx: typer.Context,
    devices: Annotated[int, typer.Option(help="Device connections.")] = 100,
    rate: Annotated[float, typer.Option(help="Readings per second per device.")] = 1.0,
    clients: Annotated[int, typer.Option(help="Client connections.")] = 10,
    patients_per_client: Annotated[int, typer.Option(help="Patients each client watches.")] = 10,
    duration: Annotated[float, typer.Option(help="Seconds of load.")] = 10.0,
    workers: Annotated[int, typer.Option(help="Load generator processes.")] = 2,
    generator: Annotated[
        LoadGenerator,
        typer.Option(
            help="Load generator workers: python (asyncio) or node (Node.js, no dependencies; "
            "for rates at which the Python generator saturates first)."
        ),
    ] = LoadGenerator.python,
    against: Annotated[
        list[str] | None,
        typer.Option(
            help="naive, graphql (the same shape as GraphQL subscriptions on /graphql, on "
            "the same server right after /ws), or mqtt://host:port (QoS 0 and 1)."
        ),
    ] = None,
    saturate: Annotated[
        bool,
        typer.Option(
            help="Double the rate until p99 > 50 ms or a reading is lost, then narrow each "
            "target's limit (--refine); report the last rate that held."
        ),
    ] = False,
    refine: Annotated[
        int | None,
        typer.Option(
            min=0,
            max=6,
            help="With --saturate: times each target's interval between the last rate that "
            "held and the first that failed is halved (default 2: to a quarter of the "
            "doubling step).",
            show_default=False,
        ),
    ] = None,
    repeat: Annotated[
        int | None,
        typer.Option(
            min=1,
            max=5,
            help="With --saturate: runs of each step; a rate holds when a majority of its "
            "runs held, and the run of the median p99 is reported (default 1).",
            show_default=False,
        ),
    ] = None,
    warmup: Annotated[
        float,
        typer.Option(
            min=0,
            help="Seconds at the start of the load whose readings count for loss and "
            "duplicates but not for latency (every device's first reading costs more).",
        ),
    ] = 0.0,
    url: Annotated[
        str | None,
        typer.Option(
            help="Load this running vitalwire server (http://host:port) instead of starting "
            "one; needs --credentials. Its CPU and memory come from its /metrics.json.",
            show_default=False,
        ),
    ] = None,
    credentials: Annotated[
        Path | None,
        typer.Option(
            help="With --url: the JSON written by `vitalwire admin provision-ward --patients "
            "N` on that server's store (N >= --devices).",
            show_default=False,
        ),
    ] = None,
    json_path: JsonOpt = None,
) -> None:
    """Load vitalwire (and references) with devices x rate and clients x patients; print
    delivered/s, end-to-end latency, loss, duplicates, server CPU and memory side by side."""
    if ctx.invoked_subcommand is not None:
        return
    from rich.console import Console
    from rich.table import Table

    from vitalwire.bench.load import Shape, node_path
    from vitalwire.bench.runner import bench_load, bench_saturate

    if generator is LoadGenerator.node:
        try:
            node_path()
        except RuntimeError as exc:
            raise typer.BadParameter(str(exc), param_hint="--generator") from None
    if refine is not None and not saturate:
        raise typer.BadParameter(
            f"narrows a --saturate ladder: use it with --saturate (got {refine} without)",
            param_hint="--refine",
        )
    if repeat is not None and not saturate:
        raise typer.BadParameter(
            f"repeats the steps of a --saturate ladder: use it with --saturate "
            f"(got {repeat} without)",
            param_hint="--repeat",
        )
    if warmup >= duration:
        raise typer.BadParameter(
            f"must be less than --duration ({duration:g} s), got {warmup:g}", param_hint="--warmup"
        )
    server = _given_server(url, credentials, devices)
    shape = Shape(
        devices, rate, clients, patients_per_client, duration, workers, generator.value, warmup
    )
    refs = against or []
    load = functools.partial(bench_load, server=server)
    rows = asyncio.run(
        bench_saturate(
            shape, refs, refine=2 if refine is None else refine, repeat=repeat or 1, run=load
        )
        if saturate
        else load(shape, refs)
    )
    title = (
        f"{devices} devices x {rate:g} Hz, {clients} clients x {patients_per_client} patients"
        f" ({generator.value} load generator"
        + (f"; latency after a {warmup:g} s warm-up)" if warmup else ")")
    )
    runs = f" in most of {repeat} runs" if repeat and repeat > 1 else ""
    ladder = f"saturation: last rate with p99 <= 50 ms{runs}, " if saturate else ""
    t = Table(title=ladder + title)
    for col in (
        "target",
        "rate Hz",
        "published/s",
        "delivered/s",
        "p50 ms",
        "p99 ms",
        "p99.9 ms",
        "max ms",
        "lost",
        "dup",
        "server CPU %",
        "RSS MB",
        "KB/idle conn",
        "connect s",
        "gen CPU s",
        "ratio",
    ):
        t.add_column(col, justify="left" if col == "target" else "right")
    for r in rows:
        lat = r["latency_ms"]

        def num(x: Any, fmt: str = ",.0f") -> str:
            return "-" if x is None else format(x, fmt)

        t.add_row(
            r["target"],
            num(r.get("rate_hz", rate), "g"),
            num(r["published_per_s"]),
            num(r["delivered_per_s"]),
            num(lat["p50"], ".2f"),
            num(lat["p99"], ".2f"),
            num(lat["p99.9"], ".2f"),
            num(lat["max"], ".1f"),
            str(r["lost"]),
            str(r["duplicated"]),
            num(r["server_cpu_pct"]),
            num(r["server_rss_mb"], ".0f"),
            num(r["rss_per_idle_connection_kb"], ".1f"),
            num(r["connect_s"], ".1f"),
            num(r["generator_cpu_s"], ".1f"),
            num(r["ratio_delivered_vs_vitalwire"], ".2f"),
        )
    wide = Console(width=max(console.width, 170))
    wide.print(t)
    if saturate:
        for r in rows:
            above = r.get("failed_at_hz")
            limit = f"failed at {above:g} Hz" if above is not None else "none failed"
            console.print(f"{r['target']}: held {r['rate_hz']:g} Hz; {limit}")
    for r in rows:
        slow = [s for s in r.get("timeline", []) if s["over_50ms"]]
        if slow:  # where the tail came from: the start's backlog, or stalls all along
            seconds = ", ".join(_slow_second(s) for s in slow[:12])
            more = f"(+{len(slow) - 12} more seconds)" if len(slow) > 12 else ""
            console.print(f"{r['target']}: readings over 50 ms, by second of the load: {seconds}")
            if more:
                console.print(f"  {more.strip()}")
    for r in rows:
        for err in r["errors"]:
            console.print(f"[yellow]{r['target']}: {err}[/yellow]")
    if json_path:
        json_path.write_text(json.dumps(rows, indent=2) + "\n")


def _given_server(url: str | None, credentials: Path | None, devices: int) -> Any:
    """--url and --credentials as the server to load (None: the bench starts one)."""
    from vitalwire.bench.runner import GivenServer
    from vitalwire.provision import WardCredentials

    if credentials is not None and url is None:
        raise typer.BadParameter(
            "names the devices of a --url server: give --url too", param_hint="--credentials"
        )
    if url is None:
        return None
    if not url.startswith(("http://", "https://")):
        raise typer.BadParameter(
            f"must start with http:// or https://, got {url!r}", param_hint="--url"
        )
    if credentials is None:
        raise typer.BadParameter(
            "a server the bench did not start needs its devices' credentials: give "
            "--credentials FILE (from `vitalwire admin provision-ward --out FILE`)",
            param_hint="--url",
        )
    try:
        server = GivenServer(url, WardCredentials.load(credentials))
        server.check(devices)
    except (OSError, ValueError) as exc:
        raise typer.BadParameter(str(exc), param_hint="--credentials") from None
    except (AttributeError, TypeError):  # JSON, but not the object provision-ward writes
        raise typer.BadParameter(
            f"{credentials} is not a credentials file from `vitalwire admin provision-ward`",
            param_hint="--credentials",
        ) from None
    return server


def _slow_second(s: dict[str, Any]) -> str:
    """``12s 1,208``, and the generator's own stall that second when it is large enough to
    matter (its stall is inside the latencies it measured)."""
    stall = s.get("generator_stall_ms", 0.0)
    note = f" (generator stalled {stall:.0f} ms)" if stall >= 20 else ""
    return f"{s['s']}s {s['over_50ms']:,}{note}"


@bench_app.command("ingest")
def bench_ingest_cmd(
    devices: Annotated[int, typer.Option(help="Device connections.")] = 20,
    readings: Annotated[int, typer.Option(help="Readings in all.")] = 20_000,
    batch: Annotated[int, typer.Option(help="Readings per device frame.")] = 200,
    postgres: Annotated[
        str | None,
        typer.Option(
            help="Store on this PostgreSQL server instead of SQLite: its admin URL "
            "(postgresql://user@host:port/postgres); fresh databases, dropped afterwards.",
            show_default=False,
        ),
    ] = None,
    json_path: JsonOpt = None,
) -> None:
    """Durable ingest (readings acknowledged per second) beside a direct store write."""
    from rich.table import Table

    from vitalwire.bench.runner import bench_ingest, write_json

    try:
        r = asyncio.run(bench_ingest(devices, readings, batch, postgres))
    except RuntimeError as exc:  # the PostgreSQL server unreachable, said as such
        console.print(f"[red]the ingest bench failed: {exc}[/red]")
        raise typer.Exit(1) from None
    store = "PostgreSQL" if postgres else "SQLite"
    t = Table(title=f"ingest: {r['readings']} readings from {devices} devices ({store})")
    t.add_column("")
    t.add_column("readings/s", justify="right")
    t.add_row(
        "vitalwire (validated, deduplicated, durable, acked)",
        f"{r['vitalwire_readings_per_s']:,.0f}",
    )
    t.add_row(
        f"baseline: same rows straight into {store}",
        f"{r['baseline_direct_store_readings_per_s']:,.0f}",
    )
    t.add_row("ratio", f"{r['ratio']:.2f}")
    console.print(t)
    if json_path:
        write_json(json_path, r)


@bench_app.command("commands")
def bench_commands_cmd(
    count: Annotated[int, typer.Option(help="Commands to send, one after another.")] = 200,
    json_path: JsonOpt = None,
) -> None:
    """Command round trip (client -> server -> device -> server -> client) beside a ping."""
    from rich.table import Table

    from vitalwire.bench.runner import bench_commands, write_json

    r = asyncio.run(bench_commands(count))
    t = Table(title=f"command round trip, {count} commands")
    for col in ("", "p50 ms", "p99 ms", "max ms"):
        t.add_column(col, justify="right" if col else "left")
    for name, key in (
        ("vitalwire command (4 durable states)", "vitalwire_command_round_trip_ms"),
        ("baseline: ping -> pong, same socket", "baseline_ping_round_trip_ms"),
    ):
        p = r[key]
        t.add_row(name, f"{p['p50']:.2f}", f"{p['p99']:.2f}", f"{p['max']:.2f}")
    console.print(t)
    if json_path:
        write_json(json_path, r)


@bench_app.command("catchup")
def bench_catchup_cmd(
    patients: Annotated[
        int, typer.Option(min=1, help="Patients (one device each) the client watches.")
    ] = 20,
    minutes: Annotated[float, typer.Option(min=0.01, help="Minutes the client was away.")] = 10.0,
    rate: Annotated[float, typer.Option(min=0.01, help="Readings per second per device.")] = 1.0,
    rounds: Annotated[int, typer.Option(min=1, help="Resumes per mode, alternating.")] = 5,
    bus_history: Annotated[
        int | None,
        typer.Option(min=1, help="Server's bus history per stream (1: replay from the store)."),
    ] = None,
    compression: Annotated[
        bool, typer.Option(help="Client offers permessage-deflate (as the SDK and browsers do).")
    ] = True,
    json_path: JsonOpt = None,
) -> None:
    """A client resuming after minutes away: time from its subscribe (with since) to the last
    missed event, each offset checked once, beside the same events read from the SQLite file."""
    from rich.table import Table

    from vitalwire.bench.runner import bench_catchup, write_json

    r = asyncio.run(bench_catchup(patients, minutes, rate, rounds, bus_history, compression))
    t = Table(
        title=(
            f"catch-up: {r['events']:,} events after {minutes:g} min away from {patients} patients"
            f" at {rate:g} Hz (replayed from {r['replay_from']}"
            f"{'' if compression else ', no compression'}; target {r['target_ms']:g} ms)"
        )
    )
    for col in (
        "",
        "round",
        "events",
        "catch-up ms",
        "subscribed ms",
        "events/s",
        "lost",
        "dup",
        "recovered",
        "frames",
    ):
        t.add_column(col, justify="left" if col == "" else "right")
    for run in r["vitalwire"]:
        t.add_row(
            "vitalwire, " + ("events frames (batch)" if run["batch"] else "one frame per event"),
            str(run["round"]),
            f"{run['events']:,}",
            f"{run['catch_up_ms']:.1f}",
            "-" if run["subscribed_ms"] is None else f"{run['subscribed_ms']:.1f}",
            f"{run['events_per_s']:,.0f}",
            str(run["lost"]),
            str(run["dup"]),
            "yes" if run["recovered"] else "no",
            f"{run['frames']:,}",
        )
    for name, key in (
        ("baseline: store.events_after, pages of 5000", "baseline_store_events_after"),
        ("baseline: sqlite3 SELECT, no decoding", "baseline_sqlite3_select"),
    ):
        b = r[key]
        t.add_row(
            name,
            f"median of {len(b['ms'])}",
            f"{r['events']:,}",
            f"{b['median_ms']:.1f}",
            "-",
            f"{b['events_per_s']:,.0f}",
            "-",
            "-",
            "-",
            "-",
        )
    wide = Console(width=max(console.width, 150))
    wide.print(t)
    idle = r["cpu_idle_pct_before"]
    first = r["vitalwire"][0]
    med = r["vitalwire_median_ms"]
    wide.print(
        f"median catch-up: {med['batch']:.1f} ms with batch, {med['no_batch']:.1f} ms without."
        f" {r['readings_fed']:,} readings fed at {r['feed_readings_per_s']:,.0f}/s (acknowledged);"
        f" events by kind: {first['kinds']}; with batch: {first['frames']:,} frames, of which"
        f" {first['events_frames']:,} events frames."
        + ("" if idle is None else f" CPU idle before the run: {idle:.0f} %.")
    )
    if json_path:
        write_json(json_path, r)


@bench_app.command("login-flood")
def bench_login_flood_cmd(
    loops: Annotated[int, typer.Option(min=1, max=200, help="Parallel login loops.")] = 8,
    duration: Annotated[float, typer.Option(min=1, help="Seconds of load per phase.")] = 20.0,
    devices: Annotated[int, typer.Option(min=1, help="Device connections.")] = 20,
    rate: Annotated[float, typer.Option(min=0.1, help="Readings per second per device.")] = 5.0,
    clients: Annotated[int, typer.Option(min=1, help="Clients, each watching every device.")] = 4,
    json_path: JsonOpt = None,
) -> None:
    """The alarm path (reading -> client) idle, then under parallel right-password and
    wrong-password login loops, on one server: p99 beside idle, logins/s, 429s, ping."""
    from rich.table import Table

    from vitalwire.bench.login_flood import bench_login_flood
    from vitalwire.bench.runner import write_json

    r = asyncio.run(bench_login_flood(loops, duration, devices, rate, clients))
    t = Table(
        title=(
            f"login flood: {loops} login loops; {devices} devices x {rate:g} Hz, {clients} "
            f"clients; {duration:g} s per phase (target: flood p99 within 2x of idle)"
        )
    )
    for col in (
        "phase",
        "p50 ms",
        "p99 ms",
        "p99 / idle",
        "max ms",
        "lost",
        "ping p99 ms",
        "ping max ms",
        "logins/s",
        "200",
        "401",
        "429",
        "server CPU %",
    ):
        t.add_column(col, justify="left" if col == "phase" else "right")
    for p in r["phases"]:
        lat, ping = p["latency_ms"], p["ping_ms"]
        t.add_row(
            p["phase"],
            f"{lat['p50']:.2f}",
            f"{lat['p99']:.2f}",
            "-" if p["p99_vs_idle"] is None else f"{p['p99_vs_idle']:.2f}",
            f"{lat['max']:.1f}",
            str(p["lost"]),
            f"{ping['p99']:.2f}",
            f"{ping['max']:.1f}",
            f"{p['logins_answered_per_s']:,.1f}",
            str(p["logins_ok"]),
            str(p["logins_refused_401"]),
            str(p["logins_throttled_429"]),
            "-" if p["server_cpu_pct"] is None else f"{p['server_cpu_pct']:.0f}",
        )
    Console(width=max(console.width, 150)).print(t)
    for p in r["phases"]:
        slow = [s for s in p["timeline"] if s["over_50ms"]]
        if slow:
            seconds = ", ".join(f"{s['s']}s {s['over_50ms']:,}" for s in slow[:12])
            console.print(f"{p['phase']}: readings over 50 ms, by second of the phase: {seconds}")
    for p in r["phases"]:
        for err in p["errors"]:
            console.print(f"[yellow]{p['phase']}: {err}[/yellow]")
    if json_path:
        write_json(json_path, r)


class HistoryDb(StrEnum):
    sqlite = "sqlite"
    postgresql = "postgresql"


@bench_app.command("mqtt")
def bench_mqtt_cmd(
    devices: Annotated[int, typer.Option(min=1, help="Devices on each path.")] = 2000,
    rate: Annotated[float, typer.Option(min=0.1, help="Readings per second per device.")] = 1.0,
    clients: Annotated[int, typer.Option(min=1, help="Client connections (/ws).")] = 200,
    patients_per_client: Annotated[int, typer.Option(min=1, help="Patients each watches.")] = 20,
    duration: Annotated[float, typer.Option(min=1, help="Seconds of load per path.")] = 20.0,
    workers: Annotated[int, typer.Option(min=1, help="Load generator processes.")] = 2,
    warmup: Annotated[float, typer.Option(min=0, help="Seconds not in the latency.")] = 0.0,
    broker: Annotated[
        str | None,
        typer.Option(
            help="Use this broker's anonymous listener (mqtt://host:port) instead of starting "
            "a Mosquitto of the bench's own with howto-mqtt.md's settings.",
            show_default=False,
        ),
    ] = None,
    json_path: JsonOpt = None,
) -> None:
    """The ward shape's devices on /ws/device, then publishing QoS 1 through the MQTT broker
    that vitalwire bridges, with the same /ws clients: one server, one run (target for the MQTT
    path: p99 <= 15 ms from the device's publish to the client's socket, 0 lost)."""
    from rich.table import Table

    from vitalwire.bench.load import Shape
    from vitalwire.bench.mqtt import bench_mqtt
    from vitalwire.bench.runner import write_json

    if warmup >= duration:
        raise typer.BadParameter(
            f"must be less than --duration ({duration:g} s), got {warmup:g}", param_hint="--warmup"
        )
    shape = Shape(devices, rate, clients, patients_per_client, duration, workers, "python", warmup)
    try:
        r = asyncio.run(bench_mqtt(shape, broker))
    except (ValueError, RuntimeError) as exc:
        console.print(f"[red]the MQTT bench failed: {exc}[/red]")
        raise typer.Exit(1) from None
    t = Table(
        title=f"mqtt: {devices} devices x {rate:g} Hz per path, {clients} clients x "
        f"{patients_per_client} patients, {duration:g} s each (broker {r['broker_auth']})"
    )
    cols = ("path", "delivered/s", "p50 ms", "p99 ms", "p99.9 ms", "max ms", "lost", "dup")
    for col in cols + ("server CPU %", "broker CPU %", "gen CPU s", "unacked"):
        t.add_column(col, justify="left" if col == "path" else "right")
    for row in r["rows"]:
        lat = row["latency_ms"]
        bcpu = row.get("broker_cpu_pct")
        t.add_row(
            row["target"],
            f"{row['delivered_per_s']:,.0f}",
            *(f"{lat[k]:.2f}" for k in ("p50", "p99", "p99.9", "max")),
            str(row["lost"]),
            str(row["duplicated"]),
            f"{row['server_cpu_pct']:.0f}",
            "-" if bcpu is None else f"{bcpu:.0f}",
            f"{row['generator_cpu_s']:.1f}",
            str(row.get("unacked_at_end", "-")),
        )
    Console(width=max(console.width, 150)).print(t)
    if r["met"] is not None:
        verdict = "met" if r["met"] else "MISSED"
        console.print(f"MQTT path p99 <= {r['target_p99_ms']:g} ms with 0 lost: {verdict}")
    for row in r["rows"]:
        for err in row["errors"]:
            console.print(f"[yellow]{row['target']}: {err}[/yellow]")
    if json_path:
        write_json(json_path, r)


@bench_app.command("history")
def bench_history_cmd(
    db: Annotated[HistoryDb, typer.Option(help="The store's backend.")] = HistoryDb.sqlite,
    patients: Annotated[int, typer.Option(min=1, help="Patients in the store.")] = 100,
    hours: Annotated[float, typer.Option(min=1, help="Hours of 1 Hz readings each.")] = 24.0,
    requests: Annotated[int, typer.Option(min=1, help="Requests timed of each kind.")] = 100,
    baseline_requests: Annotated[
        int, typer.Option(min=1, help="Requests timed on the baseline (slow).")
    ] = 10,
    postgres: Annotated[
        str, typer.Option(help="--db postgresql: a server where a database may be created.")
    ] = "postgresql://postgres@127.0.0.1:5432/test",
    directory: Annotated[
        Path | None, typer.Option("--dir", help="--db sqlite: where the temporary file goes.")
    ] = None,
    json_path: JsonOpt = None,
) -> None:
    """Vitals history on a store of PATIENTS x HOURS of 1 Hz readings: a day in <= 2,000
    buckets (from roll-ups, and the Python baseline over raw rows) and an hour raw; p50/p95/p99
    through the history service. The store is built, measured and deleted."""
    from rich.table import Table

    from vitalwire.bench.history import bench_history
    from vitalwire.bench.runner import write_json

    r = asyncio.run(
        bench_history(db.value, patients, hours, requests, baseline_requests, postgres, directory)
    )
    size = "" if r["sqlite_bytes"] is None else f", {r['sqlite_bytes'] / 2**30:.2f} GiB"
    t = Table(
        title=(
            f"vitals history on {db.value}: {patients} patients x {hours:g} h of 1 Hz = "
            f"{r['events']:,} readings (built in {r['build_s']:,.0f} s{size})"
        )
    )
    for col in ("request", "n", "p50 ms", "p95 ms", "p99 ms", "max ms", "CPU p50", "CPU p99"):
        t.add_column(col, justify="left" if col == "request" else "right")
    for name, p in r["requests"].items():
        t.add_row(
            name,
            str(p["n"]),
            f"{p['p50']:.1f}",
            f"{p['p95']:.1f}",
            f"{p['p99']:.1f}",
            f"{p['max']:.1f}",
            f"{p['cpu']['p50']:.1f}",
            f"{p['cpu']['p99']:.1f}",
        )
    Console(width=max(console.width, 140)).print(t)
    load = ", ".join(f"{x:.1f}" for x in r["load_average"])
    console.print(f"load average at the end: {load} (CPU: this process's, per request, in ms)")
    if json_path:
        write_json(json_path, r)


@bench_app.command("web")
def bench_web_cmd(
    beds: Annotated[int, typer.Option(min=1, max=200, help="Patients on the station.")] = 64,
    rate: Annotated[float, typer.Option(min=0.1, help="Readings per second per device.")] = 1.0,
    duration: Annotated[float, typer.Option(min=1, help="Seconds measured.")] = 300.0,
    heap_at: Annotated[
        float, typer.Option(min=1, help="Seconds into the measurement of the first heap sample.")
    ] = 60.0,
    warmup: Annotated[
        float, typer.Option(min=0, help="Seconds after the station is up that are not measured.")
    ] = 5.0,
    trace: Annotated[
        float,
        typer.Option(
            min=0,
            help="Then trace the station for this many seconds and list its main thread's "
            "time by event (0: no trace).",
        ),
    ] = 0.0,
    json_path: JsonOpt = None,
) -> None:
    """The clinicians' central station in headless Chromium with BEDS devices x RATE:
    reading-to-screen latency, main-thread busy and JS heap, beside a bare page that only parses
    the same socket frames (targets: p99 <= 250 ms, busy <= 20 %, heap within 10 %)."""
    from rich.table import Table

    from vitalwire.bench.runner import write_json
    from vitalwire.bench.web import bench_web, browser_missing

    why = browser_missing()
    if why:
        console.print(f"[red]cannot run the browser bench: {why}[/red]")
        raise typer.Exit(1)
    from playwright.async_api import Error as BrowserError

    try:
        r = asyncio.run(
            bench_web(
                beds,
                rate,
                duration,
                heap_at,
                warmup,
                trace_s=trace,
                progress=lambda m: console.print(f"[dim]{m}"),
            )
        )
    except (RuntimeError, BrowserError) as exc:
        console.print(f"[red]the browser bench failed: {exc}[/red]")
        raise typer.Exit(1) from None
    st, base = r["station"], r["baseline"]

    def ms(x: Any) -> str:
        return "-" if x is None else f"{x:.1f}"

    t = Table(
        title=(
            f"web: central station, {beds} beds x {rate:g} Hz in headless Chromium, "
            f"{duration:g} s measured after {warmup:g} s"
        )
    )
    for col in ("", "n", "p50 ms", "p95 ms", "p99 ms", "max ms", "main-thread busy %"):
        t.add_column(col, justify="left" if col == "" else "right")
    for name, p, busy in (
        ("station: data-ts -> next frame", st["latency_raf_ms"], f"{st['busy_pct']:.1f}"),
        ("station: data-ts -> DOM mutation", st["latency_mutation_ms"], ""),
        (
            "baseline: bare page, frame -> next frame",
            base["latency_raf_ms"],
            f"{base['busy_pct']:.1f}",
        ),
        ("baseline: bare page, onmessage", base["latency_message_ms"], ""),
    ):
        t.add_row(name, f"{p['n']:,}", ms(p["p50"]), ms(p["p95"]), ms(p["p99"]), ms(p["max"]), busy)
    Console(width=max(console.width, 140)).print(t)
    h0, h1 = st["heap_first"], st["heap_end"]
    if h0 and h1:
        growth = st["heap_growth_pct"]
        console.print(
            f"JS heap after GC: {h0['js_heap_used_mb']:.2f} MB at {h0['at_s']:.0f} s, "
            f"{h1['js_heap_used_mb']:.2f} MB at {h1['at_s']:.0f} s "
            f"({'-' if growth is None else f'{growth:+.1f} %'}); DOM nodes "
            f"{h0['dom_nodes']:.0f} -> {h1['dom_nodes']:.0f}; points in the models' trends "
            f"{h0['trend_points']:,} -> {h1['trend_points']:,}"
        )
    parts = ", ".join(f"{k} {v:.1f}" for k, v in st["busy_by_kind"].items() if v >= 0.05)
    console.print(
        f"readings sent {r['readings_sent']:,}; station busy % by kind: {parts}; long tasks "
        f"{st['long_tasks']} ({st['long_tasks_ms']:.0f} ms, longest {st['longest_tasks_ms'][:3]})"
    )
    slow = [s for s in r["timeline"] if s.get("station_over_100ms")]
    if slow:  # where the tail came from: the station alone, or the baseline too (the pipeline)
        console.print(
            "seconds with readings over 100 ms (station/baseline, bench loop stall ms): "
            + ", ".join(
                f"{s['s']}s {s.get('station_over_100ms', 0)}/{s.get('baseline_over_100ms', 0)}"
                + (f" ({s['bench_loop_stall_ms']})" if "bench_loop_stall_ms" in s else "")
                for s in slow[:15]
            )
            + (f" (+{len(slow) - 15} more)" if len(slow) > 15 else "")
        )
    if "trace" in st:
        top = st["trace"]["self_ms_by_event"]
        console.print(
            f"station main thread in a {st['trace']['seconds']:g} s trace, ms by event: "
            + ", ".join(f"{k} {v:,.0f}" for k, v in list(top.items())[:10])
        )
    verdict = ", ".join(
        f"{k} {'-' if v is None else 'met' if v else 'MISSED'}" for k, v in r["verdict"].items()
    )
    console.print(f"targets: {verdict}")
    for line in r["errors"] + r["console_errors"] + r["csp_violations"]:
        console.print(f"[yellow]{line}[/yellow]")
    if json_path:
        write_json(json_path, r)


@bench_app.command("edge")
def bench_edge_cmd(
    devices: Annotated[int, typer.Option(min=1, help="Devices at the edge.")] = 50,
    rate: Annotated[float, typer.Option(min=0.1, help="Readings per second per device.")] = 10.0,
    duration: Annotated[float, typer.Option(min=1, help="Seconds of load timed.")] = 60.0,
    outage: Annotated[
        float, typer.Option(min=0, help="Then cut the uplink this long, time the catch-up.")
    ] = 0.0,
    warmup: Annotated[float, typer.Option(min=0, help="Seconds not in the latency.")] = 2.0,
    json_path: JsonOpt = None,
) -> None:
    """A cloud and an edge node (processes) with the uplink through a TCP proxy: what the relay
    adds to a reading's latency (edge client vs cloud client, one run), and with --outage the
    catch-up after the uplink was cut under load; then both stores compared (targets: p99 added
    <= 100 ms, catch-up >= 10x real time, nothing lost)."""
    from vitalwire.bench.edge import print_edge
    from vitalwire.bench.edge import run as run_edge

    if warmup >= duration:
        raise typer.BadParameter(
            f"must be less than --duration ({duration:g} s), got {warmup:g}", param_hint="--warmup"
        )
    r = run_edge(devices, rate, duration, outage, warmup, lambda m: console.print(f"[dim]{m}"))
    print_edge(r, Console(width=max(console.width, 140)))
    if json_path:
        json_path.write_text(json.dumps(r, indent=2) + "\n")


@bench_app.command("cluster")
def bench_cluster_cmd(
    nodes: Annotated[
        int, typer.Option(min=1, help="Cluster nodes beside the 1-node baseline.")
    ] = 2,
    devices: Annotated[int, typer.Option(min=1, help="Device connections.")] = 2000,
    rate: Annotated[float, typer.Option(min=0.1, help="Readings per second per device.")] = 1.0,
    clients: Annotated[int, typer.Option(min=1, help="Client connections.")] = 200,
    patients_per_client: Annotated[int, typer.Option(min=1, help="Patients each watches.")] = 20,
    duration: Annotated[float, typer.Option(min=1, help="Seconds of load per target.")] = 20.0,
    workers: Annotated[int, typer.Option(min=1, help="Load generator processes.")] = 2,
    generator: Annotated[
        LoadGenerator, typer.Option(help="Load generator workers: python or node.")
    ] = LoadGenerator.python,
    warmup: Annotated[float, typer.Option(min=0, help="Seconds not in the latency.")] = 0.0,
    saturate: Annotated[
        bool, typer.Option(help="Each target's highest rate held (p99 <= 50 ms, 0 lost).")
    ] = False,
    refine: Annotated[int, typer.Option(min=0, max=6, help="With --saturate.")] = 2,
    repeat: Annotated[int, typer.Option(min=1, max=5, help="With --saturate.")] = 1,
    failover: Annotated[
        int,
        typer.Option(
            min=0,
            help="Instead of the load: SIGKILL the node holding the most devices this many "
            "times (restarting it each time) under a light load; time until its devices' "
            "readings flow through another node.",
        ),
    ] = 0,
    stages: Annotated[
        bool,
        typer.Option(
            help="Instead of the load beside one node: the CPU per reading of each stage (the "
            "fold on every node, the deliveries, the writing node, PostgreSQL, Redis) from two "
            "layouts of the shape on 2 nodes, and the model of N nodes on N cores.",
        ),
    ] = False,
    failover_devices: Annotated[int, typer.Option(min=1, help="With --failover.")] = 20,
    failover_rate: Annotated[float, typer.Option(min=0.1, help="With --failover (Hz).")] = 5.0,
    lease_ttl: Annotated[
        float | None,
        typer.Option(help="The nodes' lease_ttl_s (default: the setting's).", show_default=False),
    ] = None,
    postgres: Annotated[
        str, typer.Option(help="A database URL of the PostgreSQL server the bench uses.")
    ] = "postgresql://postgres@127.0.0.1:5432/postgres",
    redis: Annotated[str, typer.Option(help="The Redis the nodes' bus uses.")] = (
        "redis://127.0.0.1:6379/0"
    ),
    json_path: JsonOpt = None,
) -> None:
    """The load spread round robin over N `serve --cluster` nodes (fresh PostgreSQL database,
    fresh Redis prefix), beside the same load on one cluster node; or --failover K; or
    --stages."""
    from vitalwire.bench.cluster import ServiceUnavailable, print_cluster, run_cluster
    from vitalwire.bench.load import Shape, node_path
    from vitalwire.bench.runner import write_json

    if generator is LoadGenerator.node:
        try:
            node_path()
        except RuntimeError as exc:
            raise typer.BadParameter(str(exc), param_hint="--generator") from None
    if warmup >= duration:
        raise typer.BadParameter(
            f"must be less than --duration ({duration:g} s), got {warmup:g}", param_hint="--warmup"
        )
    if failover and nodes < 2:
        raise typer.BadParameter("failover needs at least 2 nodes", param_hint="--nodes")
    if stages and (failover or saturate):
        raise typer.BadParameter(
            "--stages is a measurement of its own: not with --failover or --saturate",
            param_hint="--stages",
        )
    shape = Shape(
        devices, rate, clients, patients_per_client, duration, workers, generator.value, warmup
    )
    try:
        r = asyncio.run(
            run_cluster(
                shape,
                nodes,
                saturate,
                refine,
                repeat,
                failover,
                failover_devices,
                failover_rate,
                lease_ttl,
                postgres,
                redis,
                stages,
            )
        )
    except ServiceUnavailable as exc:
        console.print(f"[red]{exc}[/red]")
        raise typer.Exit(1) from None
    if json_path:
        write_json(json_path, r)
    print_cluster(r, Console(width=max(console.width, 170)))
