"""The ``vitalwire`` command: serve, demo, simulate, watch, admin."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import sys
import time
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console

from vitalwire import __version__
from vitalwire.bench.cli import bench_app
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


@app.command()
def serve(
    host: Annotated[str | None, typer.Option(help="Interface to listen on.")] = None,
    port: Annotated[int | None, typer.Option(help="Port (0 picks a free one).")] = None,
    db: DbOpt = None,
    bus: Annotated[
        str | None,
        typer.Option("--bus", help="Bus URL (memory:// or redis://host:port/db?prefix=NAME)."),
    ] = None,
    certfile: Annotated[
        str | None, typer.Option(help="TLS certificate (PEM): serve https/wss.")
    ] = None,
    keyfile: Annotated[str | None, typer.Option(help="TLS private key (PEM).")] = None,
    log_level: Annotated[str, typer.Option(help="uvicorn log level.")] = "info",
) -> None:
    """Run the server. Every option may also come from VITALWIRE_* environment variables."""
    settings = _settings(host=host, port=port, db=db, bus=bus, certfile=certfile, keyfile=keyfile)
    with contextlib.suppress(KeyboardInterrupt):  # uvicorn re-raises the Ctrl-C it handled
        _uvicorn_server(settings, log_level).run()


@app.command()
def demo(
    host: Annotated[str | None, typer.Option(help="Interface [default 127.0.0.1].")] = None,
    port: Annotated[int | None, typer.Option(help="Port [default 8000].")] = None,
    db: Annotated[
        str | None, typer.Option("--db", help="Store URL [default ./vitalwire.db].")
    ] = None,
    patients: Annotated[int, typer.Option(help="Simulated patients.")] = 12,
    rate: Annotated[float, typer.Option(help="Readings per second per device.")] = 1.0,
) -> None:
    """Server + a simulated ward of 12 patients on SQLite and the in-memory bus. Ctrl-C stops.

    Host, port and store also come from VITALWIRE_HOST, VITALWIRE_PORT, VITALWIRE_DB.
    """
    settings = _settings(host=host, port=port, db=db, bus="memory://")
    with contextlib.suppress(KeyboardInterrupt):  # uvicorn re-raises the Ctrl-C it handled
        asyncio.run(_demo(settings, patients, rate))


async def _demo(settings: Settings, patients: int, rate: float) -> None:
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
    creds = await provision_ward(svc.store, patients=patients, registry=svc.registry)
    await svc.access.refresh()
    port = server.servers[0].sockets[0].getsockname()[1]
    base = f"http://{settings.host}:{port}"
    _print_banner(base, creds.users, patients, settings.db)
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
    console.rule("[bold green]vitalwire demo is running")
    console.print(f"  Health        {base}/healthz")
    console.print(f"  Login (REST)  POST {base}/auth/login")
    console.print(f"  Clients (WS)  {ws}/ws")
    console.print(f"  Devices (WS)  {ws}/ws/device")
    console.print(f"  API docs      {base}/docs")
    console.print(f"  Store         {db}   Bus memory://")
    console.print(
        f"  Simulated ward: {patients} patients (P001..), one monitor each, mixed scenarios"
    )
    console.print("  Demo users:")
    for u in users:
        console.print(f"    {u['role']:<10} {u['username']} / {u['password']}")
    console.print(
        f"  Watch live:   .venv/bin/vitalwire watch --url {base} "
        "--user clinician --password vitalwire-clinician"
    )
    console.print("  Stop:         Ctrl-C")
    console.rule()


@app.command()
def simulate(
    url: Annotated[str, typer.Option(help="Server base URL.")] = "http://127.0.0.1:8000",
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
    speed: Annotated[float, typer.Option(help="Replay speed (1 = real time, 0 = flat out).")] = 1.0,
    credentials: Annotated[
        Path | None, typer.Option(help="JSON written by `admin provision-ward`.")
    ] = None,
    db: DbOpt = None,
    prefix: Annotated[str, typer.Option(help="Id prefix when provisioning via --db.")] = "",
) -> None:
    """Simulated devices streaming realistic physiology (or a recorded file) to a server.

    Devices come from --credentials, or are provisioned in the store given by --db (default: the
    server's default SQLite file).
    """
    from vitalwire.simulator import SimDevice, replay_file, run_ward

    async def main() -> None:
        if credentials is not None:
            from vitalwire.provision import WardCredentials

            creds = WardCredentials.load(credentials)
        else:
            creds = await _provision(db, devices, prefix)
        devs = [SimDevice(d["device_id"], d["secret"], d.get("patient_id")) for d in creds.devices]
        if replay is not None:
            client = await replay_file(url, devs[0], replay, speed=speed)
            console.print(
                f"replayed {client.seq} readings from {replay}, {client.acked} acknowledged"
            )
            return
        clients = await run_ward(
            url, devs[:devices], rate_hz=rate, scenario=scenario, duration_s=duration
        )
        sent = sum(c.seq for c in clients)
        acked = sum(c.acked for c in clients)
        console.print(f"{len(clients)} devices sent {sent} readings, {acked} acknowledged")

    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(main())


async def _provision(db: str | None, patients: int, prefix: str) -> Any:
    from vitalwire.provision import provision_ward
    from vitalwire.store import open_store

    store = open_store(db or Settings().db)
    await store.open()
    try:
        return await provision_ward(store, patients=patients, prefix=prefix, users=False)
    finally:
        await store.close()


@app.command()
def watch(
    url: Annotated[str, typer.Option(help="Server base URL.")] = "http://127.0.0.1:8000",
    user: Annotated[str, typer.Option(help="Username.")] = "clinician",
    password: Annotated[
        str, typer.Option(help="Password.", envvar="VITALWIRE_PASSWORD")
    ] = "vitalwire-clinician",
    patients: Annotated[
        str | None, typer.Option(help="Comma-separated patient ids (default all).")
    ] = None,
    once: Annotated[
        bool, typer.Option(help="Print one table after the snapshot and exit.")
    ] = False,
) -> None:
    """A live terminal view of patients' vitals and device status."""
    from vitalwire.watch import run_watch

    ids = [p.strip() for p in patients.split(",")] if patients else None
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(run_watch(url, user, password, ids, once=once, console=console))


# -- clinical requests through a running server (the client WebSocket) -------------------------

UrlOpt = Annotated[str, typer.Option(help="Server base URL.")]
UserOpt = Annotated[str, typer.Option("--user", help="Username.")]
PasswordOpt = Annotated[
    str, typer.Option("--password", help="Password.", envvar="VITALWIRE_PASSWORD")
]
limits_app = typer.Typer(help="Show or override a patient's alarm limits.", no_args_is_help=True)
app.add_typer(limits_app, name="limits")


def _request(url: str, user: str, password: str, msg: Any) -> Any:
    from vitalwire import wire
    from vitalwire.sdk import MonitorClient

    async def main() -> Any:
        async with MonitorClient(url, username=user, password=password, reconnect=False) as mon:
            return await mon.request(msg)

    try:
        reply = asyncio.run(main())
    except PermissionError as exc:
        console.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(1) from None
    if isinstance(reply, wire.Error):
        console.print(f"[red]error:[/red] {reply.message} ({reply.code})")
        raise typer.Exit(1)
    return reply.data


def _parse_assignments(items: list[str]) -> dict[str, dict[str, float | None]]:
    out: dict[str, dict[str, float | None]] = {}
    for item in items:
        key, sep, value = item.partition("=")
        metric, dot, field = key.partition(".")
        if not sep or not dot:
            raise typer.BadParameter(f"expected METRIC.FIELD=VALUE, got {item!r}")
        try:
            number = None if value == "default" else float(value)
        except ValueError:
            raise typer.BadParameter(
                f"{key} must be a number or 'default', got {value!r}"
            ) from None
        out.setdefault(metric, {})[field] = number
    return out


@limits_app.command("show")
def limits_show(
    patient_id: str,
    url: UrlOpt = "http://127.0.0.1:8000",
    user: UserOpt = "clinician",
    password: PasswordOpt = "vitalwire-clinician",
) -> None:
    """Print the limits in force for a patient (defaults with overrides applied)."""
    from vitalwire import wire

    data = _request(url, user, password, wire.GetLimits(patient_id=patient_id))
    console.print(json.dumps(data["limits"], indent=2))


@limits_app.command("set")
def limits_set(
    patient_id: str,
    assignments: Annotated[list[str], typer.Argument(help="METRIC.FIELD=VALUE, e.g. spo2.low=88")],
    url: UrlOpt = "http://127.0.0.1:8000",
    user: UserOpt = "clinician",
    password: PasswordOpt = "vitalwire-clinician",
) -> None:
    """Override limits (``default`` restores a field); the change is audited."""
    from vitalwire import wire

    msg = wire.SetLimits(patient_id=patient_id, limits=_parse_assignments(assignments))
    data = _request(url, user, password, msg)
    console.print(json.dumps(data["limits"], indent=2))


@app.command()
def observe(
    patient_id: str,
    on_oxygen: Annotated[
        bool | None, typer.Option("--on-oxygen/--on-air", help="Supplemental oxygen.")
    ] = None,
    consciousness: Annotated[
        str | None, typer.Option(help="alert, confusion, voice, pain or unresponsive.")
    ] = None,
    scale: Annotated[int | None, typer.Option(help="NEWS2 SpO2 scale: 1 or 2.")] = None,
    url: UrlOpt = "http://127.0.0.1:8000",
    user: UserOpt = "clinician",
    password: PasswordOpt = "vitalwire-clinician",
) -> None:
    """Record NEWS2 observations no device measures (oxygen, consciousness, SpO2 scale)."""
    from vitalwire import wire

    msg = wire.SetObservations(
        patient_id=patient_id, on_oxygen=on_oxygen, consciousness=consciousness, scale=scale
    )
    console.print(json.dumps(_request(url, user, password, msg)["observations"]))


@app.command()
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
    url: UrlOpt = "http://127.0.0.1:8000",
    user: UserOpt = "clinician",
    password: PasswordOpt = "vitalwire-clinician",
) -> None:
    """Send a command to a patient's device and follow it until it finishes."""
    from vitalwire import wire
    from vitalwire.core.commands import TERMINAL
    from vitalwire.sdk import MonitorClient

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
                console.print(f"[red]error:[/red] {reply.message} ({reply.code})")
                return 1
            cmd = reply.data["command"]
            console.print(f"{cmd['command_id']} {cmd['status']}")
            status = cmd["status"]
            deadline = (ttl or 300.0) + 660.0  # longest TTL plus the longest answer timeout
            while status not in TERMINAL:
                e = await mon.next_event(timeout=deadline)
                if (
                    e.kind == "command"
                    and e.data["command_id"] == cmd["command_id"]
                    and e.data["status"] != status
                ):
                    status = e.data["status"]
                    extra = e.data.get("message") or e.data.get("result") or ""
                    console.print(f"{cmd['command_id']} {status} {extra}")
            return 0 if status == "completed" else 2

    raise typer.Exit(asyncio.run(main()))


@app.command("alarms-report")
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

    typer.echo(render_markdown(report(folder or default_recordings())))


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
    except PeerError as exc:
        console.print(f"[red]error:[/red] {exc.message}")
        raise typer.Exit(1) from None


@admin_app.command("create-patient")
def create_patient(
    patient_id: str,
    name: Annotated[str, typer.Option(help="Full name.")],
    ward: Annotated[str, typer.Option(help="Ward id.")] = "ward-a",
    db: DbOpt = None,
) -> None:
    """Create a patient."""
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
    cred = _run_admin(
        db,
        lambda reg, _s: reg.create_device(device_id, kind),
        "create_device",
        {"device_id": device_id, "kind": kind},
    )
    console.print(json.dumps({"device_id": cred.device_id, "secret": cred.secret}))


@admin_app.command("rotate-device-secret")
def rotate_device_secret(device_id: str, db: DbOpt = None) -> None:
    """Give a device a new secret (printed once); the old one stops working."""
    cred = _run_admin(
        db,
        lambda reg, _s: reg.rotate_device_secret(device_id),
        "rotate_device_secret",
        {"device_id": device_id},
    )
    console.print(json.dumps({"device_id": cred.device_id, "secret": cred.secret}))


@admin_app.command("bind")
def bind(device_id: str, patient_id: str, db: DbOpt = None) -> None:
    """Bind a device to a patient (ends its previous binding: a transfer)."""
    _run_admin(
        db,
        lambda reg, _s: reg.bind(device_id, patient_id),
        "bind",
        {"device_id": device_id},
        patient_id,
    )
    console.print(f"{device_id} -> {patient_id}")


@admin_app.command("unbind")
def unbind(device_id: str, db: DbOpt = None) -> None:
    """End a device's binding."""
    _run_admin(db, lambda reg, _s: reg.unbind(device_id), "unbind", {"device_id": device_id})
    console.print(f"{device_id} unbound")


@admin_app.command("create-user")
def create_user(
    username: str,
    role: Annotated[str, typer.Option(help="admin, clinician or viewer.")] = "clinician",
    password: Annotated[str | None, typer.Option(help="Password (prompted if absent).")] = None,
    db: DbOpt = None,
) -> None:
    """Create a user (password hashed with argon2)."""
    pw = password or typer.prompt("password", hide_input=True, confirmation_prompt=True)
    out = _run_admin(
        db,
        lambda reg, _s: reg.create_user(username, pw, role),
        "create_user",
        {"username": username, "role": role},
    )
    console.print(json.dumps(out))


@admin_app.command("list-patients")
def list_patients(db: DbOpt = None) -> None:
    """List patients and their bound devices."""
    rows = _run_admin(db, lambda _r, store: store.list_patients())
    for p in rows:
        console.print(f"{p['id']:<10} {p['ward']:<10} {p['name']:<24} {','.join(p['devices'])}")


@admin_app.command("add-to-ward")
def add_to_ward(username: str, ward: str, db: DbOpt = None) -> None:
    """Make a user a member of a ward's care team (they see its patients)."""
    _run_admin(
        db,
        lambda _r, store: store.add_ward_member(username, ward),
        "add_to_ward",
        {"username": username, "ward": ward},
    )
    console.print(f"{username} cares for ward {ward}")


@admin_app.command("assign")
def assign(username: str, patient_id: str, db: DbOpt = None) -> None:
    """Assign one patient to a user's care."""
    _run_admin(
        db,
        lambda _r, store: store.assign(username, patient_id),
        "assign",
        {"username": username},
        patient_id,
    )
    console.print(f"{patient_id} assigned to {username}")


@admin_app.command("disable-device")
def disable_device(device_id: str, db: DbOpt = None) -> None:
    """Refuse a device's connections (lost, stolen, retired); it can be enabled again."""
    _run_admin(
        db,
        lambda _r, store: store.set_device_disabled(device_id, True),
        "disable_device",
        {"device_id": device_id},
    )
    console.print(f"{device_id} disabled")


@admin_app.command("enable-device")
def enable_device(device_id: str, db: DbOpt = None) -> None:
    """Accept a disabled device's connections again."""
    _run_admin(
        db,
        lambda _r, store: store.set_device_disabled(device_id, False),
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


@admin_app.command("audit")
def audit(
    limit: Annotated[int, typer.Option(help="Most recent entries.")] = 50,
    patient: Annotated[str | None, typer.Option(help="Only this patient.")] = None,
    db: DbOpt = None,
) -> None:
    """Print the audit log (newest first)."""
    rows = _run_admin(db, lambda _r, store: store.audit_log(limit, patient))
    for r in rows:
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(r["at"]))
        console.print(
            f"{when}Z {r['actor']:<12} {r['action']:<16} {r['patient_id'] or '-':<8} "
            f"{r['origin'] or '-':<22} {r['detail']}",
            markup=False,
            highlight=False,
        )


@admin_app.command("provision-ward")
def provision_ward_cmd(
    patients: Annotated[int, typer.Option(help="Patients, one monitor each.")] = 12,
    out: Annotated[Path, typer.Option(help="Where to write device credentials (JSON).")] = Path(
        "vitalwire-credentials.json"
    ),
    prefix: Annotated[str, typer.Option(help="Id prefix.")] = "",
    db: DbOpt = None,
) -> None:
    """Create patients P001.., monitors mon-001.. bound to them, demo users; write credentials."""
    from vitalwire.provision import provision_ward

    creds = _run_admin(
        db, lambda _r, store: provision_ward(store, patients=patients, prefix=prefix)
    )
    creds.save(out)
    console.print(f"{len(creds.devices)} devices provisioned; credentials in {out}")


def main() -> None:
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    app()


if __name__ == "__main__":
    main()
