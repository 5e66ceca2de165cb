"""The ``vitalwire`` command: serve, demo, simulate, watch, admin."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Annotated, Any, NoReturn

import typer
from rich.console import Console

from vitalwire import __version__
from vitalwire.bench.cli import bench_app
from vitalwire.cli_common import (
    DEFAULT_URL,
    CacertOpt,
    CliError,
    PasswordOpt,
    UrlOpt,
    UserOpt,
    client_setup,
    one_line_errors,
    use_cacert,
)
from vitalwire.settings import Settings

app = typer.Typer(help="vitalwire: real-time vital-signs monitoring.", no_args_is_help=True)
admin_app = typer.Typer(
    help="Administer patients, devices, bindings and users.", no_args_is_help=True
)
app.add_typer(admin_app, name="admin")
app.add_typer(bench_app, name="bench")
console = Console()

DbOpt = Annotated[
    str | None, typer.Option("--db", help="Store URL (sqlite:///... or postgresql://...).")
]


def _settings(**overrides: Any) -> Settings:
    return Settings(**{k: v for k, v in overrides.items() if v is not None})


def _uvicorn_server(settings: Settings, log_level: str = "info", asgi: Any = None) -> Any:
    from vitalwire.app import make_server

    return make_server(settings, asgi, log_level)


@app.command()
def version() -> None:
    """Print the version."""
    console.print(__version__)


# The settings' defaults, for options that show them in --help (each option reads the same
# VITALWIRE_* environment variable as its setting).
_HOST: str = Settings.model_fields["host"].default
_PORT: int = Settings.model_fields["port"].default
_DB: str = Settings.model_fields["db"].default
_BUS: str = Settings.model_fields["bus"].default


HostOpt = Annotated[str, typer.Option(envvar="VITALWIRE_HOST", help="Interface to listen on.")]
PortOpt = Annotated[int, typer.Option(envvar="VITALWIRE_PORT", help="Port (0 picks a free one).")]


@app.command()
@one_line_errors
def serve(
    host: HostOpt = _HOST,
    port: PortOpt = _PORT,
    db: Annotated[
        str,
        typer.Option(
            "--db", envvar="VITALWIRE_DB", help="Store URL (sqlite:///... or postgresql://...)."
        ),
    ] = _DB,
    bus: Annotated[
        str,
        typer.Option(
            "--bus",
            envvar="VITALWIRE_BUS",
            help="Bus URL (memory:// or redis://host:port/db?prefix=NAME).",
        ),
    ] = _BUS,
    certfile: Annotated[
        str | None,
        typer.Option(
            envvar="VITALWIRE_CERTFILE",
            help="TLS certificate (PEM): serve https/wss; needs --keyfile.",
            show_default="none: plain http/ws",
        ),
    ] = None,
    keyfile: Annotated[
        str | None,
        typer.Option(
            envvar="VITALWIRE_KEYFILE",
            help="TLS private key (PEM) of --certfile.",
            show_default="none",
        ),
    ] = None,
    log_level: Annotated[str, typer.Option(help="uvicorn log level.")] = "info",
    upstream: Annotated[
        str | None,
        typer.Option(
            envvar="VITALWIRE_UPSTREAM",
            help="Edge node of this cloud (ws:// or wss://; docs/howto-edge.md).",
            show_default="none: not an edge node",
        ),
    ] = None,
    node_id: Annotated[
        str | None,
        typer.Option(
            envvar="VITALWIRE_NODE_ID",
            help="This node's name: at the cloud (an edge node), or in a cluster.",
            show_default="none",
        ),
    ] = None,
    cluster: Annotated[
        bool | None,
        typer.Option(
            "--cluster",
            envvar="VITALWIRE_CLUSTER",
            help="One of several nodes on the same PostgreSQL store and Redis bus "
            "(docs/howto-cluster.md).",
            show_default="one node",
        ),
    ] = None,
    upstream_secret_file: Annotated[
        str | None,
        typer.Option(
            envvar="VITALWIRE_UPSTREAM_SECRET_FILE",
            help="A file holding the node's secret at the cloud (or VITALWIRE_UPSTREAM_SECRET).",
            show_default="none",
        ),
    ] = None,
) -> None:
    """Run the server. Every option may also come from VITALWIRE_* environment variables."""
    settings = _settings(
        host=host,
        port=port,
        db=db,
        bus=bus,
        certfile=certfile,
        keyfile=keyfile,
        upstream=upstream,
        node_id=node_id,
        upstream_secret_file=upstream_secret_file,
        cluster=cluster,
    )
    if settings.upstream_secret_file and not Path(settings.upstream_secret_file).is_file():
        raise CliError(f"--upstream-secret-file {settings.upstream_secret_file}: no such file")
    if settings.upstream and not (settings.upstream_secret or settings.upstream_secret_file):
        raise CliError(
            "--upstream needs the node's secret: --upstream-secret-file or "
            "VITALWIRE_UPSTREAM_SECRET"
        )
    for name in ("certfile", "keyfile"):
        path = getattr(settings, name)
        if path is not None and not Path(path).is_file():
            raise CliError(f"--{name} {path}: no such file")
    with contextlib.suppress(KeyboardInterrupt):  # uvicorn re-raises the Ctrl-C it handled
        _uvicorn_server(settings, log_level).run()


@app.command()
def demo(
    host: HostOpt = _HOST,
    port: PortOpt = _PORT,
    db: Annotated[str, typer.Option("--db", envvar="VITALWIRE_DB", help="Store URL.")] = _DB,
    patients: Annotated[int, typer.Option(help="Simulated patients.")] = 12,
    rate: Annotated[float, typer.Option(help="Readings per second per device.")] = 1.0,
    open_browser: Annotated[
        bool,
        typer.Option(
            "--open/--no-open",
            help="Open the web app in a browser (a terminal with a desktop session only).",
        ),
    ] = True,
) -> None:
    """Server + a simulated ward (12 patients by default) on SQLite and the in-memory bus.
    Ctrl-C stops."""
    settings = _settings(host=host, port=port, db=db, bus="memory://")
    with contextlib.suppress(KeyboardInterrupt):  # uvicorn re-raises the Ctrl-C it handled
        asyncio.run(_demo(settings, patients, rate, open_browser))


def _desktop() -> bool:
    """A person at a desktop: a terminal on stdout and a graphical session (or macOS, Windows).
    Without it, ``webbrowser`` could start a text browser in this terminal."""
    if not sys.stdout.isatty():
        return False
    if sys.platform in ("darwin", "win32"):
        return True
    return bool(os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY"))


async def _demo(settings: Settings, patients: int, rate: float, open_browser: bool = False) -> None:
    from vitalwire.app import create_app
    from vitalwire.provision import provision_ward
    from vitalwire.simulator import SimDevice, run_ward

    asgi = create_app(settings)
    server = _uvicorn_server(settings, "warning", asgi)
    serving = asyncio.create_task(server.serve())
    while not server.started:  # uvicorn offers no event for this; poll its flag
        if serving.done():
            await serving
            return
        await asyncio.sleep(0.05)
    svc = asgi.state.services
    # the demo's own monitors: after a restart their secrets are unknown (stored hashed), so
    # they get new ones, audited as the demo's
    creds = await provision_ward(
        svc.store,
        patients=patients,
        registry=svc.registry,
        rotate_secrets=True,
        actor="cli:demo",
        origin="cli",
    )
    await svc.access.refresh()
    port = server.servers[0].sockets[0].getsockname()[1]
    base = f"http://{settings.host}:{port}"
    _print_banner(base, creds.users, patients, settings.db)
    if open_browser and _desktop():
        import webbrowser

        with contextlib.suppress(Exception):  # no browser: the URL is printed above
            webbrowser.open(f"{base}/")
    devices = [SimDevice(d["device_id"], d["secret"], d["patient_id"]) for d in creds.devices]
    stop = asyncio.Event()
    ward = asyncio.create_task(run_ward(base, devices, rate_hz=rate, scenario="mixed", stop=stop))
    try:
        await serving
    finally:
        stop.set()
        with contextlib.suppress(BaseException):
            await asyncio.wait_for(ward, 15)
        console.print("[bold]vitalwire demo stopped.[/bold]")


def _print_banner(base: str, users: list[dict[str, str]], patients: int, db: str) -> None:
    ws = base.replace("http://", "ws://")
    out = Console(soft_wrap=True)  # a URL cut at the terminal's width is no URL
    out.rule("[bold green]vitalwire demo is running")
    out.print(f"  Web app       {base}/   (open it in a browser; log in as a demo user below)")
    out.print(f"  URL           {base}")
    out.print(f"  Health        {base}/healthz")
    out.print(f"  Login (REST)  POST {base}/auth/login")
    out.print(f"  Clients (WS)  {ws}/ws")
    out.print(f"  Devices (WS)  {ws}/ws/device")
    out.print(f"  API docs      {base}/docs")
    out.print(f"  Store         {db}   Bus memory://")
    out.print(f"  Simulated ward: {patients} patients (P001..), one monitor each, mixed scenarios")
    out.print("  Demo users (the demo's only: no other command has a default login):")
    for u in users:
        out.print(f"    {u['role']:<10} {u['username']} / {u['password']}")
    clinician = next((u for u in users if u["role"] == "clinician"), None)
    if clinician is not None:
        out.print("  Log the client commands in (once per terminal):")
        out.print(
            f"    export VITALWIRE_USER={clinician['username']} "
            f"VITALWIRE_PASSWORD={clinician['password']}",
            markup=False,
        )
    out.print(f"  Watch live:   .venv/bin/vitalwire watch --url {base}", markup=False)
    out.print("  Stop:         Ctrl-C")
    out.rule()


#: Where ``simulate`` keeps the secrets of the devices it provisions (the working directory).
SIM_CREDENTIALS = Path("vitalwire-sim-credentials.json")


@app.command()
@one_line_errors
def simulate(
    url: Annotated[
        str,
        typer.Option(
            help="Server base URL; several, comma-separated, for a cluster's nodes (a device "
            "tries the next when one fails)."
        ),
    ] = "http://127.0.0.1:8000",
    devices: Annotated[int, typer.Option(help="Number of simulated devices.")] = 12,
    rate: Annotated[float, typer.Option(help="Readings per second per device.")] = 1.0,
    scenario: Annotated[
        str,
        typer.Option(
            help="normal, desaturation, tachycardia, bradycardia, "
            "probe_off, battery_drain, disconnect, or mixed."
        ),
    ] = "mixed",
    duration: Annotated[
        float | None, typer.Option(help="Seconds to run (default: until Ctrl-C).")
    ] = None,
    replay: Annotated[
        Path | None, typer.Option(help="Replay a BIDMC numerics CSV on one device.")
    ] = None,
    speed: Annotated[
        float,
        typer.Option(
            help="Replay speed (1 = real time, 0 = flat out). Readings are stamped when sent and "
            "alarm timers run on arrival time, so at 10 every alarm delay spans ten times as "
            "much of the recording: an accelerated replay cannot check alarms (`vitalwire "
            "alarms-report` replays recordings accelerated through the alert engine)."
        ),
    ] = 1.0,
    credentials: Annotated[
        Path | None,
        typer.Option(
            help="Devices from this JSON (`admin provision-ward --out`, or a saved "
            f"{SIM_CREDENTIALS}); the store is not touched."
        ),
    ] = None,
    db: DbOpt = None,
    cacert: CacertOpt = None,
    prefix: Annotated[
        str, typer.Option(help="Id prefix of the devices and patients simulate provisions.")
    ] = "sim-",
    ward: Annotated[str, typer.Option(help="Ward of the patients simulate provisions.")] = "ward-a",
    rotate_secrets: Annotated[
        bool,
        typer.Option(
            "--rotate-secrets",
            help="Give provisioned devices whose secrets are unknown new ones (audited; the old "
            "secrets stop working).",
        ),
    ] = False,
    mqtt: Annotated[
        str | None,
        typer.Option(
            "--mqtt",
            help="Publish through this MQTT broker (mqtt://host:port) instead of the device "
            "socket; the server bridges it (VITALWIRE_MQTT_URL). No commands.",
        ),
    ] = None,
    mqtt_passwords: Annotated[
        Path | None,
        typer.Option(
            help="Device MQTT passwords, a 'device password' line each (`vitalwire admin "
            "mqtt-acl --print-passwords`)."
        ),
    ] = None,
    mqtt_prefix: Annotated[str, typer.Option(help="The MQTT topic prefix.")] = "vitalwire",
) -> None:
    """Simulated devices streaming realistic physiology (or a recorded file) to a server.

    Devices come from --credentials, or simulate provisions its own in the store given by --db
    (default: the server's, ./vitalwire.db): patients sim-P001.. in ward-a (the demo's ward), one
    monitor sim-mon-001.. each, their secrets kept in ./vitalwire-sim-credentials.json and reused
    next time. Devices that exist but whose secrets it does not have are refused, unless
    --rotate-secrets. A replay uses one device (the first).
    """
    from vitalwire.simulator import SimDevice, read_bidmc, replay_file, run_ward

    use_cacert(cacert)

    if replay is not None:  # a missing or malformed file is refused before anything is provisioned
        try:
            read_bidmc(replay)
        except ValueError as exc:
            _fail(str(exc))

    async def main() -> None:
        if credentials is not None:
            from vitalwire.provision import WardCredentials

            creds = WardCredentials.load(credentials)
        else:
            creds = await _provision(
                db, 1 if replay is not None else devices, prefix, ward, rotate_secrets
            )
        devs = [SimDevice(d["device_id"], d["secret"], d.get("patient_id")) for d in creds.devices]
        if replay is not None:
            try:
                client = await replay_file(url, devs[0], replay, speed=speed)
            except ValueError as exc:
                _fail(str(exc))
            console.print(
                f"replayed {client.seq} readings from {replay} on {devs[0].device_id} "
                f"(patient {devs[0].patient_id}), {client.acked} acknowledged"
            )
            return
        options = None
        if mqtt is not None:
            from vitalwire.simulator import MqttOptions

            lines = mqtt_passwords.read_text().split("\n") if mqtt_passwords else []
            pws = dict(line.split(" ", 1) for line in lines if line.count(" ") == 1)
            options = MqttOptions(mqtt, mqtt_prefix, pws)
        try:
            clients = await run_ward(
                url,
                devs[:devices],
                rate_hz=rate,
                scenario=scenario,
                duration_s=duration,
                mqtt=options,
            )
        except ValueError as exc:
            _fail(str(exc))
        sent = sum(c.seq for c in clients)
        acked = sum(c.acked for c in clients)
        console.print(f"{len(clients)} devices sent {sent} readings, {acked} acknowledged")

    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(main())


async def _provision(
    db: str | None, patients: int, prefix: str, ward: str, rotate_secrets: bool
) -> Any:
    """simulate's own devices: provisioned in the store, their secrets kept in
    :data:`SIM_CREDENTIALS` and reused; existing devices with unknown secrets are refused unless
    ``rotate_secrets`` (then rotated, audited as ``cli:simulate``)."""
    from vitalwire.core.errors import PeerError
    from vitalwire.provision import SecretsUnknown, WardCredentials, id_span, provision_ward
    from vitalwire.store import open_store

    saved = WardCredentials()
    if SIM_CREDENTIALS.exists():
        try:
            saved = WardCredentials.load(SIM_CREDENTIALS)
            saved.secrets()
        except (ValueError, TypeError, KeyError, AttributeError):
            _fail(f"{SIM_CREDENTIALS} is not a credentials file; move it away and run again")
    store = open_store(db or Settings().db)
    await store.open()
    try:
        creds = await provision_ward(
            store,
            patients=patients,
            prefix=prefix,
            ward=ward,
            users=(),
            known_secrets=saved.secrets(),
            rotate_secrets=rotate_secrets,
            actor="cli:simulate",
            origin="cli",
        )
    except SecretsUnknown as exc:
        _fail(
            f"{exc.message} (not in {SIM_CREDENTIALS}): give --credentials FILE with their "
            "secrets, another --prefix, or --rotate-secrets to replace them (audited; the old "
            "secrets stop working)"
        )
    except PeerError as exc:
        _fail(exc.message)
    finally:
        await store.close()
    saved.merge(creds).save(SIM_CREDENTIALS)
    dids = [d["device_id"] for d in creds.devices]
    pids = [d["patient_id"] for d in creds.devices]
    console.print(
        f"devices {id_span(dids)} on patients {id_span(pids)} in {ward}; "
        f"their secrets are kept in {SIM_CREDENTIALS}",
        markup=False,
        highlight=False,
    )
    return creds


def _fail(message: str) -> NoReturn:
    """One line on stderr, exit status 1."""
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(1)


@app.command()
@one_line_errors
def watch(
    url: UrlOpt = DEFAULT_URL,
    user: UserOpt = None,
    password: PasswordOpt = None,
    cacert: CacertOpt = None,
    patients: Annotated[
        str | None, typer.Option(help="Comma-separated patient ids (default all).")
    ] = None,
    once: Annotated[
        bool, typer.Option(help="Print one table after the snapshot and exit.")
    ] = False,
) -> None:
    """A live terminal view of patients' vitals and device status."""
    from vitalwire.watch import run_watch

    user, password = client_setup(user, password, cacert)
    ids = [p.strip() for p in patients.split(",")] if patients else None
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(run_watch(url, user, password, ids, once=once, console=console))


# -- clinical requests through a running server (the client WebSocket) -------------------------

limits_app = typer.Typer(help="Show or override a patient's alarm limits.", no_args_is_help=True)
app.add_typer(limits_app, name="limits")


def _request(url: str, user: str, password: str, msg: Any) -> Any:
    """Send one request over the client WebSocket; return the result's data (a refusal raises
    :class:`~vitalwire.sdk.RequestError`, printed as one line by :func:`one_line_errors`)."""
    from vitalwire import wire
    from vitalwire.sdk import MonitorClient, RequestError

    async def main() -> Any:
        async with MonitorClient(url, username=user, password=password, reconnect=False) as mon:
            return await mon.request(msg)

    reply = asyncio.run(main())
    if isinstance(reply, wire.Error):
        raise RequestError(reply.code, reply.message, reply.field)
    return reply.data


def _parse_assignments(items: list[str]) -> dict[str, dict[str, float | None]]:
    """``METRIC.FIELD=VALUE`` items as ``{metric: {field: number}}`` (``default``: None). A value
    that is not a finite number is refused with the field's bound: JSON has no NaN or infinity
    (they would travel as null, which restores the default)."""
    import math

    from vitalwire.core.limits import MAX_CLEAR_S, MAX_DELAY_S
    from vitalwire.core.metrics import METRIC_BY_NAME

    out: dict[str, dict[str, float | None]] = {}
    for item in items:
        key, sep, value = item.partition("=")
        metric, dot, field = key.partition(".")
        if not sep or not dot:
            raise CliError(f"expected METRIC.FIELD=VALUE, got {item!r}")
        try:
            number = None if value == "default" else float(value)
        except ValueError:
            number = math.nan
        if number is not None and not math.isfinite(number):
            m = METRIC_BY_NAME.get(metric)
            bound = {"delay_s": f"0 to {MAX_DELAY_S:g} s", "clear_s": f"0 to {MAX_CLEAR_S:g} s"}
            if m is not None:
                bound.update(
                    dict.fromkeys(
                        ("low", "high", "critical_low", "critical_high"), f"{m.low:g} to {m.high:g}"
                    )
                )
            within = f" ({bound[field]})" if field in bound else ""
            raise CliError(f"{key} must be a number{within} or 'default', got {value!r}")
        out.setdefault(metric, {})[field] = number
    return out


@limits_app.command("show")
@one_line_errors
def limits_show(
    patient_id: str,
    url: UrlOpt = DEFAULT_URL,
    user: UserOpt = None,
    password: PasswordOpt = None,
    cacert: CacertOpt = None,
) -> None:
    """Print the limits in force for a patient (defaults with overrides applied)."""
    from vitalwire import wire

    user, password = client_setup(user, password, cacert)
    data = _request(url, user, password, wire.GetLimits(patient_id=patient_id))
    typer.echo(json.dumps(data["limits"], indent=2))


@limits_app.command("set")
@one_line_errors
def limits_set(
    patient_id: str,
    assignments: Annotated[list[str], typer.Argument(help="METRIC.FIELD=VALUE, e.g. spo2.low=88")],
    url: UrlOpt = DEFAULT_URL,
    user: UserOpt = None,
    password: PasswordOpt = None,
    cacert: CacertOpt = None,
) -> None:
    """Override limits (``default`` restores a field); the change is audited."""
    from vitalwire import wire

    limits = _parse_assignments(assignments)
    user, password = client_setup(user, password, cacert)
    data = _request(url, user, password, wire.SetLimits(patient_id=patient_id, limits=limits))
    typer.echo(json.dumps(data["limits"], indent=2))


@app.command()
@one_line_errors
def observe(
    patient_id: str,
    on_oxygen: Annotated[
        bool | None, typer.Option("--on-oxygen/--on-air", help="Supplemental oxygen.")
    ] = None,
    consciousness: Annotated[
        str | None, typer.Option(help="alert, confusion, voice, pain or unresponsive.")
    ] = None,
    scale: Annotated[int | None, typer.Option(help="NEWS2 SpO2 scale: 1 or 2.")] = None,
    url: UrlOpt = DEFAULT_URL,
    user: UserOpt = None,
    password: PasswordOpt = None,
    cacert: CacertOpt = None,
) -> None:
    """Record NEWS2 observations no device measures (oxygen, consciousness, SpO2 scale)."""
    from vitalwire import wire

    user, password = client_setup(user, password, cacert)
    msg = wire.SetObservations(
        patient_id=patient_id, on_oxygen=on_oxygen, consciousness=consciousness, scale=scale
    )
    typer.echo(json.dumps(_request(url, user, password, msg)["observations"]))


@app.command()
@one_line_errors
def command(
    patient_id: str,
    name: Annotated[
        str,
        typer.Argument(help="reset, report_now, set_interval, request_data, identify or silence."),
    ],
    args: Annotated[list[str] | None, typer.Argument(help="NAME=VALUE arguments.")] = None,
    device: Annotated[str | None, typer.Option(help="Device, if the patient has several.")] = None,
    ttl: Annotated[float | None, typer.Option(help="Seconds to wait for delivery.")] = None,
    key: Annotated[str | None, typer.Option(help="Idempotency key.")] = None,
    no_wait: Annotated[
        bool, typer.Option("--no-wait", help="Print the command id and its status, and exit.")
    ] = False,
    url: UrlOpt = DEFAULT_URL,
    user: UserOpt = None,
    password: PasswordOpt = None,
    cacert: CacertOpt = None,
) -> None:
    """Send a command to a patient's device and follow it until it finishes (exit 0 completed,
    2 failed, expired or timed out, 1 refused). A device that is offline gets it when it comes
    back, unless the command expires first; the CLI says so and waits (or --no-wait)."""
    from vitalwire import wire
    from vitalwire.core.commands import TERMINAL
    from vitalwire.sdk import MonitorClient, RequestError

    user, password = client_setup(user, password, cacert)
    parsed: dict[str, Any] = {}
    for item in args or []:
        k, _, v = item.partition("=")
        try:
            parsed[k] = float(v)
        except ValueError:
            parsed[k] = v
    msg = wire.SendCommand(
        patient_id=patient_id,
        name=name,
        args=parsed,
        device_id=device,
        ttl_s=ttl,
        idempotency_key=key,
    )

    async def main() -> int:
        async with MonitorClient(url, username=user, password=password, reconnect=False) as mon:
            reply = await mon.request(msg)
            if isinstance(reply, wire.Error):
                raise RequestError(reply.code, reply.message, reply.field)
            cmd = reply.data["command"]
            cid, status = cmd["command_id"], cmd["status"]
            typer.echo(f"{cid} {status}")
            if status == "queued" and cmd.get("device_connected") is False:
                typer.echo(_offline_note(cmd))
            if no_wait:
                return 0
            # the longest wait between two steps: the time to live, then the answer timeout
            deadline = (ttl or 300.0) + 660.0
            while status not in TERMINAL:
                e = await mon.next_event(timeout=deadline)
                if (
                    e.kind == "command"
                    and e.data["command_id"] == cid
                    and e.data["status"] != status
                ):
                    status = e.data["status"]
                    extra = e.data.get("message") or e.data.get("result") or ""
                    typer.echo(f"{cid} {status} {extra}".rstrip())
            return 0 if status == "completed" else 2

    raise typer.Exit(asyncio.run(main()))


def _offline_note(cmd: dict[str, Any]) -> str:
    """What a queued command for a device that is not connected will do."""
    import datetime

    expires = cmd.get("expires_at")
    when = ""
    if isinstance(expires, int | float):
        at = datetime.datetime.fromtimestamp(expires).astimezone()
        left = max(0, round(expires - time.time()))
        when = f" at {at:%Y-%m-%d %H:%M:%S %Z} (in {left} s)"
    return (
        f"{cmd['command_id']} waits: device {cmd['device']} is offline; it is sent when the "
        f"device reconnects, or expires{when}"
    )


@app.command("alarms-report")
@one_line_errors
def alarms_report(
    folder: Annotated[
        Path | None,
        typer.Argument(
            help="Folder of BIDMC *_Numerics.csv recordings [default: $VITALWIRE_VITALS_DIR, "
            "else data/bidmc, the five the repository ships].",
            show_default=False,
        ),
    ] = None,
) -> None:
    """Replay recordings through the alert engine: alerts raised with the default delays versus a
    naive alarm-on-every-reading rule (a Markdown table)."""
    from vitalwire.alarms_report import default_recordings, render_markdown, report

    where = folder or default_recordings()
    if not where.is_dir():
        raise CliError(f"{where}: no such folder of recordings")
    if not any(where.glob("*.csv")):
        raise CliError(f"{where}: no BIDMC *_Numerics.csv recordings in this folder")
    typer.echo(render_markdown(report(where)))


# -- admin ------------------------------------------------------------------------------------


def _run_admin(
    db: str | None,
    fn: Any,
    action: str | None = None,
    detail: dict[str, Any] | None = None,
    patient: str | None = None,
) -> Any:
    """Run ``fn(registry, store)`` on the store; record an admin change in the audit log."""
    import getpass

    from vitalwire.core.errors import PeerError
    from vitalwire.services.registry import Registry
    from vitalwire.store import AuditRow, Batch, open_store

    async def main() -> Any:
        store = open_store(db or Settings().db)
        await store.open()
        try:
            result = await fn(Registry(store, time.time), store)
            if action is not None:
                row = AuditRow(
                    time.time(),
                    f"cli:{getpass.getuser()}",
                    action,
                    patient,
                    json.dumps(detail or {}),
                    "cli",
                )
                await store.write_batch(Batch(audit=[row]))
            return result
        finally:
            await store.close()

    try:
        return asyncio.run(main())
    except PeerError as exc:  # one line on stderr; a name given may hold anything
        from vitalwire.cli_common import fail
        from vitalwire.core.text import escape_control

        fail(escape_control(exc.message))


def _run_users(db: str | None, fn: Any) -> Any:
    """Run ``fn(users, actor)`` with the store's :class:`~vitalwire.services.users.Users`,
    which checks the change and audits it (actor ``cli:<system user>``, origin ``cli``) in the
    transaction that makes it. A running server on the store applies it at once: it follows
    the store's access version."""
    import getpass

    from vitalwire.services.users import Users

    actor = f"cli:{getpass.getuser()}"
    return _run_admin(db, lambda _r, store: fn(Users(store, time.time), actor))


def _new_password(password: str | None, what: str) -> str:
    """``--password``, else asked for twice with hidden input on a terminal."""
    if password is not None:
        return password
    if not sys.stdin.isatty():
        _fail(f"no password: give --password (stdin is not a terminal to ask for {what} on)")
    return str(typer.prompt(what, hide_input=True, confirmation_prompt=True))


#: ``vitalwire admin --url URL ...``: the server to act through (empty: the store directly)
_API: dict[str, Any] = {}


@admin_app.callback()
def admin_options(
    url: Annotated[
        str | None,
        typer.Option(
            "--url",
            envvar="VITALWIRE_URL",
            help="Act through the API of the server at URL (admin login) instead of on the "
            "store (--db); the store mode is for the first setup.",
            show_default=False,
        ),
    ] = None,
    user: UserOpt = None,
    token: Annotated[
        str | None,
        typer.Option(
            "--token",
            envvar="VITALWIRE_TOKEN",
            help="An admin's access token (instead of --user and VITALWIRE_PASSWORD).",
            show_default=False,
        ),
    ] = None,
    cacert: CacertOpt = None,
) -> None:
    """Administer patients, devices, bindings and users: on the store (--db), or through a
    running server's API (--url; the password from VITALWIRE_PASSWORD or a hidden prompt)."""
    _API.clear()
    if url:
        _API.update(url=url.rstrip("/"), user=user, token=token, cacert=cacert)


def _api(method: str, path: str, body: Any = None, params: dict[str, Any] | None = None) -> Any:
    """One admin request to ``--url``: logs in first (``--user`` and VITALWIRE_PASSWORD, or a
    hidden prompt) unless ``--token``; an error answer is printed as one line, exit 1."""
    import os

    import httpx

    from vitalwire.cli_common import credentials, error_line, fail
    from vitalwire.core.text import escape_control

    verify: Any = str(_API["cacert"]) if _API.get("cacert") else True
    try:
        with httpx.Client(base_url=_API["url"], verify=verify, timeout=30) as http:
            token = _API.get("token")
            if not token:
                name, pw = credentials(_API.get("user"), os.environ.get("VITALWIRE_PASSWORD"))
                r = http.post("/auth/login", json={"username": name, "password": pw})
                if r.status_code != 200:
                    fail(escape_control(_error_text(r)))
                token = _API["token"] = r.json()["access_token"]
            r = http.request(
                method, path, json=body, params=params, headers={"Authorization": f"Bearer {token}"}
            )
    except (httpx.HTTPError, CliError) as exc:
        fail(error_line(exc) or str(exc))
    if r.status_code >= 400:
        fail(escape_control(_error_text(r)))
    return r.json()


def _error_text(r: Any) -> str:
    """An error answer in the one shape as ``message (code)``; anything else by its status."""
    try:
        body = r.json()
        return f"{body['message']} ({body['code']})"
    except (ValueError, KeyError, TypeError):
        return f"HTTP {r.status_code}"


def _api_all(path: str, params: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """Every item of a cursor-paged admin list."""
    items: list[dict[str, Any]] = []
    query = dict(params or {}, limit=1000)
    while True:
        page = _api("GET", path, params=query)
        items += page["items"]
        if not page.get("next_cursor"):
            return items
        query["cursor"] = page["next_cursor"]


@admin_app.command("create-patient")
def create_patient(
    patient_id: str,
    name: Annotated[str, typer.Option(help="Full name.")],
    ward: Annotated[str, typer.Option(help="Ward id.")] = "ward-a",
    db: DbOpt = None,
) -> None:
    """Create a patient (a running server shows it to the ward's care team within a second)."""
    if _API:
        body = {"id": patient_id, "name": name, "ward": ward}
        console.print(json.dumps(_api("POST", "/admin/patients", body)))
        return
    out = _run_admin(
        db,
        lambda reg, _s: reg.create_patient(patient_id, name, ward),
        "create_patient",
        {"ward": ward},
        patient_id,
    )
    console.print(json.dumps(out))


@admin_app.command("create-device")
def create_device(
    device_id: str,
    kind: Annotated[str, typer.Option(help="Device kind.")] = "monitor",
    db: DbOpt = None,
) -> None:
    """Create a device and print its secret (shown once, stored hashed)."""
    if _API:
        out = _api("POST", "/admin/devices", {"device_id": device_id, "kind": kind})
        console.print(json.dumps({"device_id": out["device_id"], "secret": out["secret"]}))
        return
    cred = _run_admin(
        db,
        lambda reg, _s: reg.create_device(device_id, kind),
        "create_device",
        {"device_id": device_id, "kind": kind},
    )
    console.print(json.dumps({"device_id": cred.device_id, "secret": cred.secret}))


@admin_app.command("rotate-device-secret")
def rotate_device_secret(device_id: str, db: DbOpt = None) -> None:
    """Give a device a new secret (printed once); the old one stops working, and a running
    server ends the device's session within a second."""
    import getpass

    if _API:
        out = _api("POST", f"/admin/devices/{device_id}/rotate-secret")
        console.print(json.dumps({"device_id": out["device_id"], "secret": out["secret"]}))
        return
    actor = f"cli:{getpass.getuser()}"
    # audited by the registry, in the transaction that stores the new secret
    cred = _run_admin(
        db, lambda reg, _s: reg.rotate_device_secret(device_id, actor=actor, origin="cli")
    )
    console.print(json.dumps({"device_id": cred.device_id, "secret": cred.secret}))


@admin_app.command("bind")
def bind(device_id: str, patient_id: str, db: DbOpt = None) -> None:
    """Bind a device to a patient (ends its previous binding: a transfer). A running server
    sends the device's next readings to the new patient within a second (at once with --url).
    ``move`` is the same command."""
    if _API:
        _api("PUT", f"/admin/bindings/{device_id}", {"patient_id": patient_id})
        console.print(f"{device_id} -> {patient_id}")
        return
    _run_admin(
        db,
        lambda reg, _s: reg.bind(device_id, patient_id),
        "bind",
        {"device_id": device_id},
        patient_id,
    )
    console.print(f"{device_id} -> {patient_id}")


admin_app.command("move", help="Move a device to another patient (the same as bind).")(bind)


@admin_app.command("unbind")
def unbind(device_id: str, db: DbOpt = None) -> None:
    """End a device's binding (a running server stops filing its readings under the patient
    within a second)."""
    if _API:
        _api("DELETE", f"/admin/bindings/{device_id}")
    else:
        _run_admin(db, lambda reg, _s: reg.unbind(device_id), "unbind", {"device_id": device_id})
    console.print(f"{device_id} unbound")


@admin_app.command("create-user")
def create_user(
    username: str,
    role: Annotated[str, typer.Option(help="admin, clinician or viewer.")] = "clinician",
    password: Annotated[str | None, typer.Option(help="Password (prompted if absent).")] = None,
    db: DbOpt = None,
) -> None:
    """Create a user; a running server accepts their login at once.

    The password is hashed with argon2; audited as ``user_create``."""
    pw = _new_password(password, "password")
    if _API:
        body = {"username": username, "password": pw, "role": role}
        console.print(json.dumps(_api("POST", "/admin/users", body)))
        return
    out = _run_users(
        db, lambda users, actor: users.create(username, pw, role, actor=actor, origin="cli")
    )
    console.print(json.dumps(out))


@admin_app.command("list-users")
def list_users(db: DbOpt = None) -> None:
    """List users: role, enabled or disabled, wards, assigned patients."""
    from vitalwire.core.text import escape_control

    rows = _api_all("/admin/users") if _API else _run_users(db, lambda u, _a: u.list())
    for u in rows:
        state = "disabled" if u["disabled"] else "enabled"
        wards = ",".join(u["wards"]) or "-"
        patients = ",".join(u["patients"]) or "-"
        typer.echo(
            escape_control(
                f"{u['username']:<16} {u['role']:<10} {state:<9} wards={wards} patients={patients}"
            )
        )


@admin_app.command("set-role")
def set_role(username: str, role: str, db: DbOpt = None) -> None:
    """Change a user's role (admin, clinician, viewer), at once on a running server.

    It applies to the user's next request and to their open sessions. The last enabled admin
    keeps theirs."""
    out = (
        _api("PUT", f"/admin/users/{username}/role", {"role": role})
        if _API
        else _run_users(
            db, lambda users, actor: users.set_role(username, role, actor=actor, origin="cli")
        )
    )
    if out["changed"]:
        typer.echo(f"{username}: {out['before']} -> {role}")
    else:
        typer.echo(f"{username} is {role} already")


@admin_app.command("disable-user")
def disable_user(username: str, db: DbOpt = None) -> None:
    """Disable a user, at once on a running server.

    They cannot log in, every token issued to them is refused and their open sessions end. The
    last enabled admin cannot be disabled."""
    out = (
        _api("POST", f"/admin/users/{username}/disable")
        if _API
        else _run_users(db, lambda u, actor: u.disable(username, actor=actor, origin="cli"))
    )
    typer.echo(f"{username} disabled" if out["changed"] else f"{username} is disabled already")


@admin_app.command("enable-user")
def enable_user(username: str, db: DbOpt = None) -> None:
    """Let a disabled user log in again, at once (tokens issued before stay refused)."""
    out = (
        _api("POST", f"/admin/users/{username}/enable")
        if _API
        else _run_users(db, lambda u, actor: u.enable(username, actor=actor, origin="cli"))
    )
    typer.echo(f"{username} enabled" if out["changed"] else f"{username} is enabled already")


@admin_app.command("delete-user")
def delete_user(
    username: str,
    yes: Annotated[bool, typer.Option("--yes", help="Do not ask for confirmation.")] = False,
    db: DbOpt = None,
) -> None:
    """Delete a user, at once on a running server (asks first, unless --yes).

    Their ward memberships, assignments and break-glass grants go with them, their tokens are
    refused and their open sessions end; the audit log keeps their name. The last enabled admin
    cannot be deleted."""
    if not yes:
        if not sys.stdin.isatty():
            _fail(f"delete-user {username} asks for confirmation: give --yes")
        typer.confirm(f"delete user {username}?", abort=True)
    out = (
        _api("DELETE", f"/admin/users/{username}")
        if _API
        else _run_users(db, lambda u, actor: u.delete(username, actor=actor, origin="cli"))
    )
    typer.echo(
        f"{username} deleted (wards: {','.join(out['wards']) or '-'}; "
        f"patients: {','.join(out['patients']) or '-'})"
    )


@admin_app.command("reset-password")
def reset_password(
    username: str,
    password: Annotated[
        str | None, typer.Option(help="The new password (asked for, hidden, if absent).")
    ] = None,
    db: DbOpt = None,
) -> None:
    """Give a user a new password; at once, every token issued to them before is refused.

    They log in again with the new one. Prints nothing secret."""
    pw = _new_password(password, f"new password for {username}")
    if _API:
        _api("POST", f"/admin/users/{username}/password", {"password": pw})
    else:
        _run_users(
            db,
            lambda users, actor: users.reset_password(username, pw, actor=actor, origin="cli"),
        )
    typer.echo(f"password of {username} reset; tokens issued before are refused")


@admin_app.command("list-patients")
def list_patients(
    include_discharged: Annotated[
        bool, typer.Option("--include-discharged", help="Also list discharged patients.")
    ] = False,
    db: DbOpt = None,
) -> None:
    """List patients and their bound devices (discharged ones with --include-discharged)."""
    if _API:
        rows = _api_all("/admin/patients", {"include_discharged": include_discharged})
    else:
        rows = [
            p
            for p in _run_admin(db, lambda _r, store: store.list_patients())
            if include_discharged or p.get("discharged_at") is None
        ]
    for p in rows:
        gone = " discharged" if p.get("discharged_at") is not None else ""
        console.print(
            f"{p['id']:<10} {p['ward']:<10} {p['name']:<24} {','.join(p['devices'])}{gone}"
        )


@admin_app.command("discharge")
def discharge(patient_id: str, db: DbOpt = None) -> None:
    """Discharge a patient: every device bound to them is unbound (their next readings go to no
    patient) and they get no new binding; their record stays readable by their care team.

    With --url, the running server also resolves their open alerts; on the store alone (no
    --url) a running server keeps those open until acknowledged."""
    if _API:
        out = _api("POST", f"/admin/patients/{patient_id}/discharge")
    else:
        import getpass

        from vitalwire.services.auth import Principal

        async def act(reg: Any, store: Any) -> Any:
            from vitalwire.services.admin import discharge_offline

            who = Principal(f"cli:{getpass.getuser()}", "admin", 0)
            return await discharge_offline(store, reg, who, patient_id, "cli")

        out = _run_admin(db, act)
    unbound = ",".join(out["unbound"]) or "-"
    typer.echo(
        f"{patient_id} discharged (unbound: {unbound})"
        if out["changed"]
        else f"{patient_id} was discharged already"
    )


@admin_app.command("list-devices")
def list_devices(db: DbOpt = None) -> None:
    """List devices: kind, enabled or disabled, the patient each is bound to."""
    rows = _api_all("/admin/devices") if _API else _run_admin(db, lambda _r, s: s.list_devices())
    for d in rows:
        state = "disabled" if d["disabled"] else "enabled"
        console.print(f"{d['id']:<12} {d['kind']:<10} {state:<9} {d['patient_id'] or '-'}")


@admin_app.command("add-to-ward")
def add_to_ward(username: str, ward: str, db: DbOpt = None) -> None:
    """Put a user in a ward's care team; at once, they see its patients on a running server.

    The ward may have no patients yet."""
    out = (
        _api("PUT", f"/admin/care-teams/{ward}/members/{username}")
        if _API
        else _run_users(
            db, lambda users, actor: users.add_to_ward(username, ward, actor=actor, origin="cli")
        )
    )
    verb = "cares" if out["changed"] else "cares already"
    typer.echo(f"{username} {verb} for ward {ward}")


@admin_app.command("remove-from-ward")
def remove_from_ward(username: str, ward: str, db: DbOpt = None) -> None:
    """Take a user out of a ward's care team, at once on a running server.

    Their subscriptions to its patients end (unless the patient is assigned to them)."""
    if _API:
        _api("DELETE", f"/admin/care-teams/{ward}/members/{username}")
    else:
        _run_users(
            db,
            lambda users, actor: users.remove_from_ward(username, ward, actor=actor, origin="cli"),
        )
    typer.echo(f"{username} no longer cares for ward {ward}")


@admin_app.command("assign")
def assign(username: str, patient_id: str, db: DbOpt = None) -> None:
    """Assign one patient to a user's care: at once, they see the patient on a running server."""
    out = (
        _api("PUT", f"/admin/users/{username}/patients/{patient_id}")
        if _API
        else _run_users(
            db, lambda users, actor: users.assign(username, patient_id, actor=actor, origin="cli")
        )
    )
    verb = "assigned" if out["changed"] else "assigned already"
    typer.echo(f"{patient_id} {verb} to {username}")


@admin_app.command("unassign")
def unassign(username: str, patient_id: str, db: DbOpt = None) -> None:
    """End a patient's assignment to a user, at once on a running server.

    Their subscription to the patient ends (unless the patient's ward is theirs)."""
    if _API:
        _api("DELETE", f"/admin/users/{username}/patients/{patient_id}")
    else:
        _run_users(
            db,
            lambda users, actor: users.unassign(username, patient_id, actor=actor, origin="cli"),
        )
    typer.echo(f"{patient_id} no longer assigned to {username}")


@admin_app.command("disable-device")
def disable_device(device_id: str, db: DbOpt = None) -> None:
    """Refuse a device's connections (lost, stolen, retired); it can be enabled again. A
    running server ends the device's session within a second (at once with --url)."""
    if _API:
        _api("POST", f"/admin/devices/{device_id}/disable")
    else:
        _run_admin(
            db,
            lambda reg, _s: reg.set_device_disabled(device_id, True),
            "disable_device",
            {"device_id": device_id},
        )
    console.print(f"{device_id} disabled")


@admin_app.command("enable-device")
def enable_device(device_id: str, db: DbOpt = None) -> None:
    """Accept a disabled device's connections again."""
    if _API:
        _api("POST", f"/admin/devices/{device_id}/enable")
    else:
        _run_admin(
            db,
            lambda reg, _s: reg.set_device_disabled(device_id, False),
            "enable_device",
            {"device_id": device_id},
        )
    console.print(f"{device_id} enabled")


@admin_app.command("rotate-jwt-key")
def rotate_jwt_key(db: DbOpt = None) -> None:
    """Replace the token signing key: every issued token stops working when the server
    restarts (a VITALWIRE_JWT_SECRET in the environment takes precedence over the stored key)."""
    import secrets as _secrets

    _run_admin(
        db,
        lambda _r, store: store.set_meta("jwt_secret", _secrets.token_urlsafe(48)),
        "rotate_jwt_key",
        {},
    )
    console.print("signing key replaced; restart the server to apply it")


@admin_app.command("mqtt-acl")
def mqtt_acl(
    passwords: Annotated[Path, typer.Option("--passwords", help="Mosquitto password file.")],
    acl: Annotated[Path, typer.Option("--acl", help="Mosquitto ACL file.")],
    print_passwords: Annotated[
        bool,
        typer.Option(
            "--print-passwords", help="Print each device's MQTT password (to provision it)."
        ),
    ] = False,
    db: DbOpt = None,
) -> None:
    """Write Mosquitto's password and ACL files from the device registry (docs/howto-mqtt.md):
    each enabled device may publish only on its own topics; the server's user (from
    VITALWIRE_MQTT_URL) on all. A device's password is derived from a server key and its
    current secret: rotating the secret changes it. Reload the broker after (SIGHUP)."""
    from vitalwire.transports.mqtt import MqttUrlError, broker_files, parse_url

    settings = Settings()
    try:
        conn = parse_url(settings.mqtt_url)
    except MqttUrlError as exc:
        _fail(f"VITALWIRE_MQTT_URL: {exc}")
    if not conn["username"] or not conn["password"]:
        _fail("VITALWIRE_MQTT_URL must name the server's MQTT user and password")
    try:
        pw_text, acl_text, devices = _run_admin(
            db,
            lambda _r, store: broker_files(
                store, settings.mqtt_topic_prefix, conn["username"], conn["password"]
            ),
            "mqtt_acl",
            {"passwords": str(passwords), "acl": str(acl)},
        )
    except MqttUrlError as exc:
        _fail(str(exc))
    for path, text in ((passwords, pw_text), (acl, acl_text)):
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(text)
    if print_passwords:
        for did, pw in devices.items():
            console.print(f"{did} {pw}", markup=False)
    console.print(f"{len(devices)} devices written to {passwords} and {acl}", markup=False)


@admin_app.command("audit")
def audit(
    limit: Annotated[int, typer.Option(help="Most recent entries.")] = 50,
    patient: Annotated[str | None, typer.Option(help="Only this patient.")] = None,
    db: DbOpt = None,
) -> None:
    """Print the audit log (newest first), one line per entry.

    Every control, line-breaking and bidi character in it is shown escaped (\\n, \\x1b),
    never sent raw to the terminal: anyone can put text in the log (a failed login records the
    name tried)."""
    from vitalwire.core.text import escape_control as esc

    rows = (
        _api("GET", "/audit", params={"limit": limit, "patient_id": patient})
        if _API
        else _run_admin(db, lambda _r, store: store.audit_log(limit, patient))
    )
    for r in rows:
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(r["at"]))
        typer.echo(
            f"{when}Z {esc(r['actor']):<12} {esc(r['action']):<16} "
            f"{esc(r['patient_id'] or '-'):<8} {esc(r['origin'] or '-'):<22} {esc(r['detail'])}"
        )


@admin_app.command("provision-ward")
def provision_ward_cmd(
    patients: Annotated[int, typer.Option(help="Patients, one monitor each.")] = 12,
    out: Annotated[
        Path, typer.Option(help="Where to write device secrets and user passwords (JSON).")
    ] = Path("vitalwire-credentials.json"),
    prefix: Annotated[str, typer.Option(help="Id prefix.")] = "",
    ward: Annotated[str, typer.Option(help="Ward of the patients.")] = "ward-a",
    users: Annotated[
        bool, typer.Option(help="Also create users admin, clinician and viewer.")
    ] = True,
    rotate_secrets: Annotated[
        bool,
        typer.Option(
            "--rotate-secrets",
            help="Give existing devices whose secrets --out does not hold new ones (audited; "
            "the old secrets stop working).",
        ),
    ] = False,
    db: DbOpt = None,
) -> None:
    """Create patients P001.. in a ward, monitors mon-001.. bound to them, and users admin,
    clinician and viewer (the clinician and the viewer care for the ward); write every device
    secret and user password to --out (readable by its owner only).

    New users get a generated password, printed once and kept in --out; a user that exists keeps
    theirs. Run again with the same --out, it reuses the devices and secrets that --out holds;
    devices that exist with secrets --out does not hold are refused, unless --rotate-secrets.
    """
    import secrets as _secrets

    from vitalwire.core.errors import Conflict
    from vitalwire.provision import SecretsUnknown, WardCredentials, provision_ward

    previous = WardCredentials()
    if out.exists():
        try:
            previous = WardCredentials.load(out)
            previous.secrets(), previous.passwords()
        except (ValueError, TypeError, KeyError, AttributeError):
            _fail(f"--out {out} exists and is not a credentials file; name another file")
    known, passwords = previous.secrets(), previous.passwords()
    wanted = [
        (name, passwords.get(name) or _secrets.token_urlsafe(12), name)
        for name in (("admin", "clinician", "viewer") if users else ())
    ]

    async def provision(reg: Any, store: Any) -> Any:
        try:
            return await provision_ward(
                store,
                patients=patients,
                ward=ward,
                prefix=prefix,
                users=wanted,
                known_secrets=known,
                rotate_secrets=rotate_secrets,
                actor="cli:provision-ward",
                origin="cli",
                registry=reg,
            )
        except SecretsUnknown as exc:
            raise Conflict(
                f"{exc.message} (not in {out}): give --out the file that holds them, another "
                "--prefix, or --rotate-secrets to replace them (audited; the old secrets stop "
                "working)",
                field="device_id",
            ) from None

    creds = _run_admin(db, provision)
    previous.merge(creds).save(out)
    console.print(f"{len(creds.devices)} devices provisioned; credentials in {out}")
    got = {u["username"] for u in creds.users}
    for name, password, role in wanted:
        if name not in got:
            console.print(f"  user {name} exists already: its password is unchanged (not in {out})")
        elif name not in passwords:
            console.print(
                f"  {role:<10} {name} / {password}   (new: shown once, kept in {out})",
                markup=False,
            )


@app.command()
@one_line_errors
def gateway(
    source: Annotated[
        str,
        typer.Option(
            "--from",
            help="The sensor's WebSocket URL (ws:// or wss://); it pushes flat messages.",
            show_default=False,
        ),
    ],
    device: Annotated[
        str,
        typer.Option(
            help="The vitalwire device the sensor's readings come from.", show_default=False
        ),
    ],
    fmt: Annotated[
        str,
        typer.Option(
            "--format",
            help='The sensor\'s message format: seed = {"oxygen_level": %, "heart_rate": /min}.',
        ),
    ] = "seed",
    url: UrlOpt = DEFAULT_URL,
    secret: Annotated[
        str | None,
        typer.Option(
            envvar="VITALWIRE_DEVICE_SECRET",
            help="The device's secret (else from --credentials).",
            show_default="none",
        ),
    ] = None,
    credentials: Annotated[
        Path | None,
        typer.Option(
            help="Take the device's secret from this JSON (`admin provision-ward --out`, or "
            f"{SIM_CREDENTIALS}).",
            show_default="none",
        ),
    ] = None,
    cacert: Annotated[
        Path | None,
        typer.Option(
            "--cacert",
            help="CA certificate(s) (PEM) to trust for an https --url.",
            show_default="none: the system store",
        ),
    ] = None,
    spool: Annotated[
        Path | None,
        typer.Option(
            help="SQLite file keeping unacknowledged readings across a restart of the gateway.",
            show_default="./vitalwire-gateway-<device>.spool",
        ),
    ] = None,
    backoff_max: Annotated[
        float, typer.Option(help="Longest wait, s, between reconnects to the sensor.")
    ] = 10.0,
    duration: Annotated[
        float | None,
        typer.Option(help="Seconds to run.", show_default="until Ctrl-C or SIGTERM"),
    ] = None,
    log_level: Annotated[
        str, typer.Option(help="debug, info (connections), warning (refused messages only).")
    ] = "info",
) -> None:
    """Connect to a sensor that pushes flat messages (the seed's WebSocket server) and feed
    them to vitalwire as --device, with the device SDK's guarantees (seq, spool, acks).

    oxygen_level becomes spo2 (%), heart_rate becomes hr (/min); a reading's time is the time
    the gateway received it (the message carries none). A message that is not the format's
    shape is refused with one log line naming the field and the bound; the sensor connection
    stays. The gateway reconnects to the sensor, and to vitalwire, with backoff.
    """
    import signal

    from vitalwire import wire
    from vitalwire.core.errors import InvalidMessage
    from vitalwire.gateway import Gateway
    from vitalwire.sdk.device import DeviceClient

    try:
        wire.check_format("--format", fmt)
    except InvalidMessage as exc:
        _fail(exc.message)
    if not source.startswith(("ws://", "wss://")):
        _fail(f"--from must be a ws:// or wss:// URL, got {source!r}")
    if backoff_max <= 0:
        _fail(f"--backoff-max must be above 0, got {backoff_max:g}")
    if log_level.lower() not in ("debug", "info", "warning"):
        _fail(f"--log-level must be one of: debug, info, warning, got {log_level!r}")
    if secret is None and credentials is not None:
        from vitalwire.provision import WardCredentials

        secret = WardCredentials.load(credentials).secrets().get(device)
        if secret is None:
            _fail(f"device {device} is not in {credentials}")
    if secret is None:
        _fail("give the device's secret: --secret, VITALWIRE_DEVICE_SECRET or --credentials")
    use_cacert(cacert)
    logging.getLogger("vitalwire.gateway").setLevel(log_level.upper())
    spool_path = spool or Path(f"vitalwire-gateway-{device}.spool")

    async def main() -> None:
        client = DeviceClient(
            url, device, secret, firmware="vitalwire-gateway", spool_path=str(spool_path)
        )
        gw = Gateway(source, fmt, client, backoff_max_s=backoff_max)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await client.start(wait=False)
        task = asyncio.create_task(gw.run())
        try:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), duration)
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            with contextlib.suppress(Exception):
                await client.flush(5.0)
            await client.close()
        console.print(
            f"gateway {source} -> {device}: {gw.received} readings, {gw.refused} refused, "
            f"{client.acked} acknowledged, {client.unacked} kept in {spool_path}",
            markup=False,
            highlight=False,
        )

    asyncio.run(main())


def main() -> None:
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    app()


if __name__ == "__main__":
    main()
