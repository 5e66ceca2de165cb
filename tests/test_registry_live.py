"""A change made with ``vitalwire admin`` on the store takes effect at once on a running server.

Each test runs a real server on port 0 with its own SQLite file, a real ``DeviceClient``, and the
admin CLI in-process (typer's runner, in a thread: the CLI runs its own event loop) on the
server's file, or the registry in offline mode on a second store of that file.
"""

from __future__ import annotations

import asyncio
import getpass
import json
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from tests.conftest import RunningServer, start_server, stop_server, wait_until
from vitalwire.cli import app
from vitalwire.core import access as policy
from vitalwire.provision import provision_ward
from vitalwire.sdk import DeviceClient
from vitalwire.services import container
from vitalwire.services.auth import Principal
from vitalwire.services.registry import Registry
from vitalwire.store import open_store
from vitalwire.wire import Close, Event

runner = CliRunner()


async def admin(server: RunningServer, *args: str) -> str:
    """``vitalwire admin ARGS --db <the server's file>``, as an operator would run it."""
    cmd = ["admin", *args, "--db", server.services.settings.db]
    result = await asyncio.to_thread(runner.invoke, app, cmd)
    assert result.exit_code == 0, result.output
    return result.output


async def stream(server: RunningServer, pid: str) -> list[Event]:
    """Everything committed to the patient's stream so far."""
    await server.services.writer.flush()
    return await server.services.store.events_after(f"patient:{pid}", 0, 100_000)


def of_device(events: list[Event], did: str, kind: str) -> list[Event]:
    return [e for e in events if e.kind == kind and e.data.get("device") == did]


def unbinds(events: list[Event], did: str) -> list[Event]:
    return [e for e in of_device(events, did, "binding") if e.data["action"] == "unbind"]


def session_patient(server: RunningServer, did: str) -> Any:
    session = server.services.ingest.sessions.get(did)
    return "no session" if session is None else session.patient_id


async def test_a_cli_bind_sends_a_connected_devices_next_readings_to_the_new_patient(
    server: RunningServer,
) -> None:
    """The device streams throughout the transfer: each reading lands in one stream once, none
    in the old patient's after its ``unbind`` event, every one sent after the move in the new."""
    did, secret, p1 = server.device(0)
    _, _, p2 = server.device(1)
    async with DeviceClient(server.url, did, secret) as dev:
        dev.send(hr=70)
        await dev.flush()
        moved = asyncio.Event()

        async def measure() -> None:  # a 100 Hz device, until some readings follow the move
            while not moved.is_set() or dev.seq < moved_at + 20:
                dev.send(hr=71)
                await asyncio.sleep(0.01)

        moved_at = 1 << 62
        sending = asyncio.create_task(measure())
        out = await admin(server, "bind", did, p2)
        assert f"{did} -> {p2}" in out
        await wait_until(lambda: session_patient(server, did) == p2, 5, "the server's move")
        moved_at = dev.seq  # every reading after this one was taken after the move
        moved.set()
        await asyncio.wait_for(sending, 10)
        await dev.flush()
    old, new = await stream(server, p1), await stream(server, p2)
    [unbind] = unbinds(old, did)
    [bind] = of_device(new, did, "binding")
    assert bind.data["action"] == "bind"
    online = [e for e in of_device(new, did, "device_status") if e.data["status"] == "online"]
    assert online and online[0].offset > bind.offset  # the device is shown online there
    in_old = of_device(old, did, "reading")
    in_new = of_device(new, did, "reading")
    assert in_old and all(e.offset < unbind.offset for e in in_old)
    assert all(e.offset > bind.offset for e in in_new)
    assert all(e.data["seq"] <= moved_at for e in in_old)
    seqs = sorted(int(e.data["seq"]) for e in in_old + in_new)
    assert seqs == list(range(1, dev.seq + 1))  # nothing lost, nothing doubled
    assert [e.data["seq"] for e in in_new][-20:] == list(range(dev.seq - 19, dev.seq + 1))


async def test_a_cli_unbind_stops_a_connected_devices_readings_going_to_the_patient(
    server: RunningServer,
) -> None:
    did, secret, pid = server.device(0)
    async with DeviceClient(server.url, did, secret) as dev:
        dev.send(hr=70)
        await dev.flush()
        await admin(server, "unbind", did)
        await wait_until(lambda: session_patient(server, did) is None, 5, "the server's unbind")
        dev.send(hr=80)
        await dev.flush()  # still taken and acknowledged, as from any unbound device
    events = await stream(server, pid)
    assert len(unbinds(events, did)) == 1
    assert [e.data["hr"] for e in of_device(events, did, "reading")] == [70.0]
    assert await server.services.store.device_last_seq(did) == 2


async def test_a_cli_disable_ends_the_devices_session_and_refuses_it_again(
    server: RunningServer,
) -> None:
    did, secret, pid = server.device(0)
    dev = DeviceClient(server.url, did, secret)
    await dev.start()
    try:
        await admin(server, "disable-device", did)
        await wait_until(lambda: Close.UNAUTHENTICATED in dev.close_codes, 5, "the session end")
        await wait_until(
            lambda: any("is disabled" in e.message for e in dev.errors), 10, "a refused hello"
        )
        assert not dev.connected
    finally:
        await dev.close()
    offline = [e for e in of_device(await stream(server, pid), did, "device_status")][-1]
    assert (offline.data["status"], offline.data["reason"]) == ("offline", "device disabled")
    await admin(server, "enable-device", did)
    async with DeviceClient(server.url, did, secret) as back:
        back.send(hr=60)
        await back.flush()


async def test_a_cli_rotation_ends_the_session_and_only_the_new_secret_works(
    server: RunningServer,
) -> None:
    did, secret, pid = server.device(0)
    store = server.services.store
    dev = DeviceClient(server.url, did, secret)
    await dev.start()
    try:
        new = json.loads(await admin(server, "rotate-device-secret", did))["secret"]
        await wait_until(lambda: Close.UNAUTHENTICATED in dev.close_codes, 5, "the session end")
        await wait_until(
            lambda: any("wrong secret" in e.message for e in dev.errors), 10, "a refused hello"
        )
        assert not dev.connected
    finally:
        await dev.close()
    offline = [e for e in of_device(await stream(server, pid), did, "device_status")][-1]
    assert (offline.data["status"], offline.data["reason"]) == ("offline", "device secret rotated")
    async with DeviceClient(server.url, did, new) as fresh:
        fresh.send(hr=60)
        await fresh.flush()
    rows = [r for r in await store.audit_log(100) if r["action"] == "rotate_device_secret"]
    assert [(r["actor"], r["origin"], json.loads(r["detail"])) for r in rows] == [
        (f"cli:{getpass.getuser()}", "cli", {"device_id": did})
    ]


async def test_an_offline_registry_rotation_is_audited_and_ends_the_session(
    server: RunningServer,
) -> None:
    """The registry on a store of its own (as any tool of the operator's would use it)."""
    did, secret, _ = server.device(1)
    async with DeviceClient(server.url, did, secret) as dev:
        other = open_store(server.services.settings.db)
        await other.open()
        try:
            await Registry(other, lambda: 1000.0).rotate_device_secret(did)
        finally:
            await other.close()
        await wait_until(lambda: Close.UNAUTHENTICATED in dev.close_codes, 5, "the session end")
    rows = [
        r
        for r in await server.services.store.audit_log(100)
        if r["action"] == "rotate_device_secret"
    ]
    assert [(r["at"], r["actor"], r["origin"], r["detail"]) for r in rows] == [
        (1000.0, "system", None, json.dumps({"device_id": did}))
    ]


async def test_a_provisioning_rotation_on_the_server_is_audited_and_ends_the_session(
    server: RunningServer,
) -> None:
    did, secret, pid = server.device(0)
    svc = server.services
    async with DeviceClient(server.url, did, secret) as dev:
        creds = await provision_ward(
            svc.store, patients=1, users=(), rotate_secrets=True, registry=svc.registry
        )
        await wait_until(lambda: Close.UNAUTHENTICATED in dev.close_codes, 5, "the session end")
    [device] = creds.devices
    assert (device["device_id"], device["patient_id"]) == (did, pid)
    async with DeviceClient(server.url, did, device["secret"]) as fresh:
        fresh.send(hr=60)
        await fresh.flush()
    rows = [r for r in await svc.store.audit_log(100) if r["action"] == "rotate_device_secret"]
    assert [(r["actor"], json.loads(r["detail"])) for r in rows] == [
        ("provision", {"device_id": did})
    ]


async def test_the_servers_own_binding_change_is_applied_once(server: RunningServer) -> None:
    """A change made through the server's registry is logged too; following it changes nothing."""
    did, secret, _ = server.device(0)
    _, _, p2 = server.device(1)
    svc = server.services
    async with DeviceClient(server.url, did, secret):
        await svc.registry.bind(did, p2)
        assert session_patient(server, did) == p2
        await svc.registry.follow_changes()  # after this the chore has seen the change, too
        events = await stream(server, p2)
    [bind] = of_device(events, did, "binding")
    assert bind.data["action"] == "bind"
    statuses = [e.data["status"] for e in of_device(events, did, "device_status")]
    assert statuses[:1] == ["online"] and statuses.count("online") == 1


async def test_a_patient_created_by_the_cli_is_visible_to_its_ward_at_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The care teams' own refresh is put out of reach: only the registry's following can make
    the new patient visible within the wait."""
    monkeypatch.setattr(container, "ACCESS_REFRESH_S", 3600.0)
    server, task = await start_server(tmp_path, patients=1)
    try:
        nurse = Principal("clinician", "clinician")  # a member of ward-a's care team
        allowed = server.services.access.allowed
        assert not allowed(nurse, policy.VIEW, "P777")
        await admin(server, "create-patient", "P777", "--name", "New Arrival", "--ward", "ward-a")
        await wait_until(lambda: allowed(nurse, policy.VIEW, "P777"), 5, "the new patient")
    finally:
        await stop_server(server, task)


async def test_a_hello_that_read_the_binding_before_a_change_was_applied_reads_it_again(
    server: RunningServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The change commits, and the server applies it, while the device's ``hello`` waits on
    its (now stale) binding: the session opens on the new patient all the same."""
    did, secret, _ = server.device(0)
    _, _, p2 = server.device(1)
    svc = server.services
    real = svc.store.active_binding
    reads = 0

    async def read_then_change(device: str) -> Any:
        nonlocal reads
        reads += 1
        binding = await real(device)
        if reads == 1:
            other = open_store(svc.settings.db)
            await other.open()
            try:
                await Registry(other, lambda: 1000.0).bind(did, p2)
            finally:
                await other.close()
            await svc.registry.follow_changes()
        return binding

    monkeypatch.setattr(svc.store, "active_binding", read_then_change)
    async with DeviceClient(server.url, did, secret):
        assert session_patient(server, did) == p2
    assert reads == 2
