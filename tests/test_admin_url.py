"""``vitalwire admin --url``: the admin commands acting through a running server's API, in a
child process as an operator runs them."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys

from tests.conftest import RunningServer


async def vitalwire(srv: RunningServer, *args: str, password: str | None) -> tuple[int, str]:
    """``vitalwire admin --url <server> --user <admin> ARGS`` in a child process (stdin not a
    terminal; the password from VITALWIRE_PASSWORD)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("VITALWIRE_")}
    if password is not None:
        env["VITALWIRE_PASSWORD"] = password
    user, _ = srv.user("admin")
    argv = [sys.executable, "-m", "vitalwire.cli", "admin", "--url", srv.url, "--user", user]
    proc = await asyncio.to_thread(
        subprocess.run,
        [*argv, *args],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=120,
        env={**env, "COLUMNS": "200"},
    )
    assert "Traceback" not in proc.stderr, proc.stderr
    return proc.returncode, proc.stdout + proc.stderr


async def test_admin_url_creates_disables_and_lists_through_the_api(
    server: RunningServer,
) -> None:
    admin_name, pw = server.user("admin")
    code, out = await vitalwire(
        server, "create-user", "nurse-url", "--role", "viewer", "--password", "p" * 12, password=pw
    )
    assert code == 0, out
    assert json.loads(out) == {"username": "nurse-url", "role": "viewer"}
    code, out = await vitalwire(server, "disable-user", "nurse-url", password=pw)
    assert (code, out.strip()) == (0, "nurse-url disabled"), out
    code, out = await vitalwire(server, "list-users", password=pw)
    assert code == 0, out
    [line] = [line for line in out.splitlines() if line.startswith("nurse-url ")]
    assert line.split()[:3] == ["nurse-url", "viewer", "disabled"]
    code, out = await vitalwire(server, "list-devices", password=pw)
    did, _, pid = server.device(0)
    assert code == 0 and f"{did}" in out and pid in out, out

    # an error answer is one line naming what was wrong, exit 1
    code, out = await vitalwire(server, "set-role", "nobody", "viewer", password=pw)
    assert code == 1 and out.strip() == "error: user nobody does not exist (not_found)", out
    code, out = await vitalwire(server, "list-users", password="wrong")
    assert code == 1 and out.count("\n") == 1 and "unauthenticated" in out, out

    # the acts went through the API: audited with the admin's name and the client's address
    await server.services.writer.flush()
    rows = await server.services.store.audit_log(200)
    made = {r["action"]: r for r in rows if r["action"] in ("user_create", "user_disable")}
    assert {r["actor"] for r in made.values()} == {admin_name}
    assert {r["origin"] for r in made.values()} == {"127.0.0.1"}


async def test_discharge_and_list_devices_on_the_store_without_url(server: RunningServer) -> None:
    """The direct-to-store mode gains the new acts too; a running server follows the unbind."""
    from typer.testing import CliRunner

    from vitalwire.cli import app

    did, _, pid = server.device(2)
    db = server.services.settings.db

    def run(*args: str) -> str:
        env = {k: "" for k in os.environ if k.startswith("VITALWIRE_")}
        result = CliRunner().invoke(app, ["admin", *args, "--db", db], env=env)
        assert result.exit_code == 0, result.output
        return result.output

    out = await asyncio.to_thread(run, "discharge", pid)
    assert out.strip() == f"{pid} discharged (unbound: {did})"
    out = await asyncio.to_thread(run, "list-devices")
    [line] = [x for x in out.splitlines() if x.startswith(did + " ")]
    assert line.split()[-1] == "-"
    out = await asyncio.to_thread(run, "list-patients")
    assert pid not in out
    assert pid in await asyncio.to_thread(run, "list-patients", "--include-discharged")
    await server.services.writer.flush()
    [row] = [
        r for r in await server.services.store.audit_log(100) if r["action"] == "patient_discharge"
    ]
    assert row["origin"] == "cli" and row["actor"].startswith("cli:")
