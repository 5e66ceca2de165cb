"""Provisioning a ward: reusing what exists, never rotating a secret unasked, no demo logins
outside the demo (provision_ward, `admin provision-ward`, simulate's own devices)."""

from __future__ import annotations

import json
import stat
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from typer.testing import CliRunner

from vitalwire.cli import SIM_CREDENTIALS, app
from vitalwire.core.errors import InvalidMessage, Unauthenticated
from vitalwire.provision import DEMO_USERS, SecretsUnknown, WardCredentials, provision_ward
from vitalwire.services.registry import Registry
from vitalwire.store import Store, open_store

runner = CliRunner()


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[Store]:
    s = open_store(f"sqlite:///{tmp_path / 'ward.db'}")
    await s.open()
    try:
        yield s
    finally:
        await s.close()


async def secrets_work(store: Store, creds: WardCredentials) -> bool:
    reg = Registry(store, lambda: 1.0)
    try:
        for d in creds.devices:
            await reg.authenticate_device(d["device_id"], d["secret"])
    except Unauthenticated:
        return False
    return True


async def hashes(store: Store, creds: WardCredentials) -> list[str]:
    rows = [await store.get_device(d["device_id"]) for d in creds.devices]
    return [r["secret_hash"] for r in rows if r is not None]


async def test_a_fresh_ward_has_patients_bound_monitors_and_the_users(store: Store) -> None:
    creds = await provision_ward(store, patients=3, prefix="sim-")
    assert [(d["device_id"], d["patient_id"]) for d in creds.devices] == [
        ("sim-mon-001", "sim-P001"),
        ("sim-mon-002", "sim-P002"),
        ("sim-mon-003", "sim-P003"),
    ]
    assert await secrets_work(store, creds)
    patients = await store.list_patients()
    assert [(p["id"], p["ward"], p["devices"]) for p in patients] == [
        (f"sim-P00{i}", "ward-a", [f"sim-mon-00{i}"]) for i in (1, 2, 3)
    ]
    assert creds.users == [{"username": u, "password": p, "role": r} for u, p, r in DEMO_USERS]


async def test_known_secrets_are_reused_and_nothing_is_rotated(store: Store) -> None:
    first = await provision_ward(store, patients=2, users=())
    before = await hashes(store, first)
    again = await provision_ward(store, patients=3, users=(), known_secrets=first.secrets())
    assert again.devices[:2] == first.devices
    assert await hashes(store, first) == before
    assert await secrets_work(store, again)
    assert await store.audit_log(10) == []


async def test_existing_devices_with_unknown_secrets_are_refused_before_any_change(
    store: Store,
) -> None:
    first = await provision_ward(store, patients=2, users=())
    before = await hashes(store, first)
    wrong = {"mon-001": "not-its-secret"}  # a saved file from another store: not used
    with pytest.raises(SecretsUnknown) as info:
        await provision_ward(store, patients=3, users=(), known_secrets=wrong)
    assert info.value.device_ids == ["mon-001", "mon-002"]
    assert (
        info.value.message
        == "devices mon-001, mon-002 exist already and their secrets are not known"
    )
    assert await hashes(store, first) == before and await secrets_work(store, first)
    assert [p["id"] for p in await store.list_patients()] == ["P001", "P002"]  # no P003


async def test_rotating_is_asked_for_and_audited_as_the_command(store: Store) -> None:
    first = await provision_ward(store, patients=2, users=())
    creds = await provision_ward(
        store, patients=2, users=(), rotate_secrets=True, actor="cli:simulate", origin="cli"
    )
    assert await secrets_work(store, creds) and not await secrets_work(store, first)
    rotations = [r for r in await store.audit_log(50) if r["action"] == "rotate_device_secret"]
    assert sorted(json.loads(r["detail"]).get("device_id", "") for r in rotations) == [
        "mon-001",
        "mon-002",
    ]
    assert {(r["actor"], r["origin"]) for r in rotations} == {("cli:simulate", "cli")}


async def test_an_existing_user_keeps_their_password_and_is_not_listed(store: Store) -> None:
    await Registry(store, lambda: 1.0).create_user("clinician", "their-own-password", "clinician")
    creds = await provision_ward(store, patients=1, ward="ward-b")
    assert [u["username"] for u in creds.users] == ["admin", "viewer"]
    row = await store.get_user("clinician")
    assert row is not None
    reg = Registry(store, lambda: 1.0)
    assert (await reg.authenticate_user("clinician", "their-own-password")).role == "clinician"
    teams = await store.care_teams(1.0)
    assert "clinician" not in teams["wards"] and teams["wards"]["viewer"] == {"ward-b"}


async def test_a_prefix_that_makes_a_bad_id_changes_nothing(store: Store) -> None:
    with pytest.raises(InvalidMessage, match="patient_id must be"):
        await provision_ward(store, patients=1, prefix="bad prefix ")
    assert await store.list_patients() == []


# -- admin provision-ward -------------------------------------------------------------------------


def test_provision_ward_creates_no_demo_login_and_generates_passwords(tmp_path: Path) -> None:
    db, out = f"sqlite:///{tmp_path / 'prod.db'}", tmp_path / "creds.json"
    r = runner.invoke(
        app, ["admin", "provision-ward", "--patients", "2", "--out", str(out)] + ["--db", db]
    )
    assert r.exit_code == 0, r.output
    creds = WardCredentials.load(out)
    assert stat.S_IMODE(out.stat().st_mode) == 0o600
    passwords = creds.passwords()
    assert sorted(passwords) == ["admin", "clinician", "viewer"]
    demo = {p for _, p, _ in DEMO_USERS}
    assert not demo & set(passwords.values()) and len(set(passwords.values())) == 3
    for name, password in passwords.items():
        assert f"{name} / {password}" in r.output  # printed once
    assert "vitalwire-admin" not in r.output

    # again with the same file: the same secrets and passwords, nothing rotated or printed anew
    r = runner.invoke(
        app, ["admin", "provision-ward", "--patients", "2", "--out", str(out)] + ["--db", db]
    )
    assert r.exit_code == 0, r.output
    assert WardCredentials.load(out).devices == creds.devices
    assert WardCredentials.load(out).passwords() == passwords
    assert " / " not in r.output


def test_provision_ward_refuses_unknown_secrets_unless_asked_to_rotate(tmp_path: Path) -> None:
    db = f"sqlite:///{tmp_path / 'prod.db'}"
    first, other = tmp_path / "first.json", tmp_path / "other.json"
    args = ["admin", "provision-ward", "--patients", "2", "--db", db, "--no-users"]
    assert runner.invoke(app, [*args, "--out", str(first)]).exit_code == 0
    r = runner.invoke(app, [*args, "--out", str(other)])
    assert r.exit_code == 1
    assert "mon-001, mon-002 exist already" in r.output and "--rotate-secrets" in r.output
    assert not other.exists()
    r = runner.invoke(app, [*args, "--out", str(other), "--rotate-secrets"])
    assert r.exit_code == 0, r.output
    new = WardCredentials.load(other).secrets()
    assert set(new) == {"mon-001", "mon-002"}
    assert not set(new.values()) & set(WardCredentials.load(first).secrets().values())
    r = runner.invoke(app, ["admin", "audit", "--db", db])
    assert r.output.count("rotate_device_secret") == 2 and "cli:provision-ward" in r.output


# -- simulate's own devices -----------------------------------------------------------------------


def test_simulate_refuses_devices_whose_secrets_it_does_not_have(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The demo's monitors (mon-001..) exist; `simulate --prefix ''` has no secret of theirs: it
    says what to do in one line and changes nothing (no server needed: it stops before)."""
    monkeypatch.chdir(tmp_path)
    db = f"sqlite:///{tmp_path / 'demo.db'}"
    out = tmp_path / "demo.json"
    args = ["admin", "provision-ward", "--patients", "3", "--out", str(out), "--db", db]
    assert runner.invoke(app, args).exit_code == 0
    r = runner.invoke(
        app,
        ["simulate", "--prefix", "", "--devices", "3", "--db", db, "--url", "http://127.0.0.1:1"],
    )
    assert r.exit_code == 1
    (line,) = r.output.strip().splitlines()
    assert line.startswith("error: devices mon-001..mon-003 (3) exist already")
    assert "--credentials" in line and "--rotate-secrets" in line
    assert not SIM_CREDENTIALS.exists()
    creds = WardCredentials.load(out)

    async def check() -> bool:
        s = open_store(db)
        await s.open()
        try:
            return await secrets_work(s, creds)
        finally:
            await s.close()

    import asyncio

    assert asyncio.run(check())
