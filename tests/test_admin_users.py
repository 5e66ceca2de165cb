"""User administration (services/users.py, ``vitalwire admin``) and a safe audit log.

The ``Users`` service runs on a real SQLite store; the CLI runs on a store file, in this process
and, for what a user sees on a terminal, in a child process; the audit log's bounds are checked
on every store backend.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from tests.test_store import fresh_postgres_db
from vitalwire.cli import app
from vitalwire.core.errors import Conflict, InvalidMessage, NotFound, PeerError
from vitalwire.core.text import ELLIPSIS, clip, clip_json, escape_control
from vitalwire.services.auth import verify_password
from vitalwire.services.users import Users
from vitalwire.store import AuditRow, Batch, Store
from vitalwire.store.sql import AUDIT_DETAIL_MAX, SqlStore

ACTOR, ORIGIN = "cli:tester", "cli-test"
WHO = {"actor": ACTOR, "origin": ORIGIN}
PASSWORD = "first-password-1"
NEW_PASSWORD = "second-password-2"

# -- core/text.py ---------------------------------------------------------------------------

ESCAPES = [
    ("plain", "nurse.jo-1", "nurse.jo-1"),
    ("newline", "a\nb", "a\\nb"),
    ("carriage return", "a\rb", "a\\rb"),
    ("tab", "a\tb", "a\\tb"),
    ("NUL", "a\x00b", "a\\x00b"),
    ("ESC clear screen", "\x1b[2J", "\\x1b[2J"),
    ("bell", "\x07", "\\x07"),
    ("DEL", "\x7f", "\\x7f"),
    ("C1 CSI", "\x9b2J", "\\x9b2J"),
    ("C1 NEL", "a\x85b", "a\\x85b"),
    ("line separator", "a\u2028b", "a\\u2028b"),
    ("paragraph separator", "a\u2029b", "a\\u2029b"),
    ("right-to-left override", "\u202enimda", "\\u202enimda"),
    ("left-to-right embedding", "\u202a", "\\u202a"),
    ("pop directional formatting", "\u202c", "\\u202c"),
    ("first strong isolate", "\u2068x\u2069", "\\u2068x\\u2069"),
    ("right-to-left mark", "\u200f", "\\u200f"),
    ("arabic letter mark", "\u061c", "\\u061c"),
    ("lone surrogate", "\ud800", "\\ud800"),
    ("accents and scripts stay", "Zoë 患者 مريض", "Zoë 患者 مريض"),
    ("JSON stays as it is", '{"u": "a\\nb"}', '{"u": "a\\nb"}'),
]


@pytest.mark.parametrize(("raw", "shown"), [c[1:] for c in ESCAPES], ids=[c[0] for c in ESCAPES])
def test_escape_control_shows_every_unsafe_character(raw: str, shown: str) -> None:
    out = escape_control(raw)
    assert out == shown
    assert out.isprintable()  # nothing left that a terminal would act on


CLIPS = [
    ("fits", "abc", 3, "abc"),
    ("cut", "abcdef", 4, "abc" + ELLIPSIS),
    ("empty", "", 4, ""),
]


@pytest.mark.parametrize(
    ("text", "limit", "expected"), [c[1:] for c in CLIPS], ids=[c[0] for c in CLIPS]
)
def test_clip_never_exceeds_the_limit_and_marks_a_cut(text: str, limit: int, expected: str) -> None:
    assert clip(text, limit) == expected


JSON_DOCS = [
    ("ascii", json.dumps({"username": "x" * 10_000})),
    ("escaped by json", json.dumps({"username": "é\x01" * 5_000})),
    ("raw unicode", json.dumps({"username": "患" * 10_000}, ensure_ascii=False)),
    ("quotes", json.dumps({"q": '"' * 9_000})),
]


@pytest.mark.parametrize("document", [c[1] for c in JSON_DOCS], ids=[c[0] for c in JSON_DOCS])
def test_clip_json_keeps_valid_json_within_the_limit(document: str) -> None:
    assert clip_json('{"a": 1}', 4096) == '{"a": 1}'
    out = clip_json(document, 4096)
    assert len(out) <= 4096
    parsed = json.loads(out)
    assert parsed["truncated"] is True and parsed["chars"] == len(document)
    assert document.startswith(parsed["head"]) and len(parsed["head"]) > 1000


# -- the Users service on a real store -------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        self.now += 1.0
        return self.now


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[Store]:
    """A SQLite store file with patients P1 (ward-a) and Q1 (ward-b), an admin ``root``
    and a clinician ``nurse`` who cares for ward-a and is assigned Q1."""
    s = SqlStore(f"sqlite:///{tmp_path / 'users.db'}")
    await s.open()
    try:
        users = Users(s, Clock())
        await s.create_patient("P1", "A", "ward-a", 1.0)
        await s.create_patient("Q1", "B", "ward-b", 1.0)
        await users.create("root", PASSWORD, "admin", **WHO)
        await users.create("nurse", PASSWORD, "clinician", **WHO)
        await users.add_to_ward("nurse", "ward-a", **WHO)
        await users.assign("nurse", "Q1", **WHO)
        yield s
    finally:
        await s.close()


Call = Callable[[Users], Awaitable[Any]]

# (id, call, audit action, audit detail, audit patient_id)
CHANGES: list[tuple[str, Call, str, dict[str, Any], str | None]] = [
    (
        "create",
        lambda u: u.create("porter", PASSWORD, "viewer", **WHO),
        "user_create",
        {"username": "porter", "role": "viewer"},
        None,
    ),
    (
        "set_role",
        lambda u: u.set_role("nurse", "viewer", **WHO),
        "user_role",
        {"username": "nurse", "before": "clinician", "after": "viewer"},
        None,
    ),
    (
        "disable",
        lambda u: u.disable("nurse", **WHO),
        "user_disable",
        {"username": "nurse", "role": "clinician"},
        None,
    ),
    (
        "delete",
        lambda u: u.delete("nurse", **WHO),
        "user_delete",
        {"username": "nurse", "role": "clinician", "wards": ["ward-a"], "patients": ["Q1"]},
        None,
    ),
    (
        "reset_password",
        lambda u: u.reset_password("nurse", NEW_PASSWORD, **WHO),
        "user_password_reset",
        {"username": "nurse"},
        None,
    ),
    (
        "add_to_ward",
        lambda u: u.add_to_ward("nurse", "ward-new", **WHO),
        "ward_add",
        {"username": "nurse", "ward": "ward-new"},
        None,
    ),
    (
        "remove_from_ward",
        lambda u: u.remove_from_ward("nurse", "ward-a", **WHO),
        "ward_remove",
        {"username": "nurse", "ward": "ward-a"},
        None,
    ),
    ("assign", lambda u: u.assign("nurse", "P1", **WHO), "assign", {"username": "nurse"}, "P1"),
    (
        "unassign",
        lambda u: u.unassign("nurse", "Q1", **WHO),
        "unassign",
        {"username": "nurse"},
        "Q1",
    ),
]


@pytest.mark.parametrize(
    ("call", "action", "detail", "patient"), [c[1:] for c in CHANGES], ids=[c[0] for c in CHANGES]
)
async def test_each_change_is_audited_with_actor_and_origin(
    store: Store, call: Call, action: str, detail: dict[str, Any], patient: str | None
) -> None:
    before_version = await store.access_version()
    before_log = len(await store.audit_log(1000))
    await call(Users(store, Clock()))
    log = await store.audit_log(1000)
    assert len(log) == before_log + 1  # one entry per change
    row = log[0]
    assert (row["actor"], row["origin"], row["action"]) == (ACTOR, ORIGIN, action)
    assert json.loads(row["detail"]) == detail and row["patient_id"] == patient
    assert await store.access_version() != before_version  # running servers apply it
    assert not any(  # never a password or a hash
        secret in json.dumps(r) for r in log for secret in (PASSWORD, NEW_PASSWORD, "$argon2")
    )


async def test_enable_is_audited_and_a_user_who_was_disabled_logs_in_again(store: Store) -> None:
    users = Users(store, Clock())
    await users.disable("nurse", **WHO)
    assert (await store.get_user("nurse") or {})["disabled"]
    out = await users.enable("nurse", **WHO)
    assert out["changed"] and not (await store.get_user("nurse") or {})["disabled"]
    row = (await store.audit_log(1))[0]
    assert (row["actor"], row["origin"], row["action"]) == (ACTOR, ORIGIN, "user_enable")
    assert json.loads(row["detail"]) == {"username": "nurse", "role": "clinician"}


# (id, call, error, field): refused, naming the field; nothing written
BAD, NF, CLASH = InvalidMessage, NotFound, Conflict
REFUSED: list[tuple[str, Call, type[PeerError], str]] = [
    ("create taken", lambda u: u.create("nurse", PASSWORD, "viewer", **WHO), CLASH, "id"),
    ("create bad id", lambda u: u.create("a\nb", PASSWORD, "viewer", **WHO), BAD, "username"),
    ("create bad role", lambda u: u.create("x", PASSWORD, "janitor", **WHO), BAD, "role"),
    ("create short password", lambda u: u.create("x", "short", "viewer", **WHO), BAD, "password"),
    ("set_role unknown role", lambda u: u.set_role("nurse", "janitor", **WHO), BAD, "role"),
    ("set_role no user", lambda u: u.set_role("ghost", "viewer", **WHO), NF, "username"),
    ("disable no user", lambda u: u.disable("ghost", **WHO), NF, "username"),
    ("enable no user", lambda u: u.enable("ghost", **WHO), NF, "username"),
    ("delete no user", lambda u: u.delete("ghost", **WHO), NF, "username"),
    ("reset no user", lambda u: u.reset_password("ghost", NEW_PASSWORD, **WHO), NF, "username"),
    ("reset short password", lambda u: u.reset_password("nurse", "short", **WHO), BAD, "password"),
    ("add_to_ward no user", lambda u: u.add_to_ward("ghost", "ward-a", **WHO), NF, "username"),
    ("add_to_ward bad ward", lambda u: u.add_to_ward("nurse", "ward a\x1b", **WHO), BAD, "ward"),
    ("remove no user", lambda u: u.remove_from_ward("ghost", "ward-a", **WHO), NF, "username"),
    ("remove not a member", lambda u: u.remove_from_ward("nurse", "ward-b", **WHO), NF, "ward"),
    ("assign no user", lambda u: u.assign("ghost", "P1", **WHO), NF, "username"),
    ("assign unknown patient", lambda u: u.assign("nurse", "P404", **WHO), NF, "patient_id"),
    ("unassign no user", lambda u: u.unassign("ghost", "Q1", **WHO), NF, "username"),
    ("unassign not assigned", lambda u: u.unassign("nurse", "P1", **WHO), NF, "patient_id"),
    ("demote last admin", lambda u: u.set_role("root", "clinician", **WHO), CLASH, "username"),
    ("disable last admin", lambda u: u.disable("root", **WHO), CLASH, "username"),
    ("delete last admin", lambda u: u.delete("root", **WHO), CLASH, "username"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("call", "error", "field"), [c[1:] for c in REFUSED], ids=[c[0] for c in REFUSED]
)
async def test_refused_changes_name_the_field_and_write_nothing(
    store: Store, call: Call, error: type[PeerError], field: str
) -> None:
    before = (await store.access_version(), await store.audit_log(1000), await store.list_users())
    with pytest.raises(error) as info:
        await call(Users(store, Clock()))
    assert type(info.value) is error and info.value.field == field, info.value.message
    after = (await store.access_version(), await store.audit_log(1000), await store.list_users())
    assert after == before


async def test_the_last_enabled_admin_is_kept_and_others_may_go(store: Store) -> None:
    users = Users(store, Clock())
    await users.create("root2", PASSWORD, "admin", **WHO)
    await users.disable("root2", **WHO)  # a disabled admin does not count
    with pytest.raises(Conflict, match="last enabled admin"):
        await users.set_role("root", "viewer", **WHO)
    await users.enable("root2", **WHO)
    assert (await users.set_role("root", "viewer", **WHO))["changed"]  # root2 remains
    with pytest.raises(Conflict, match="last enabled admin"):
        await users.delete("root2", **WHO)
    await users.set_role("root", "admin", **WHO)
    await users.delete("root2", **WHO)
    roles = {u["username"]: (u["role"], u["disabled"]) for u in await users.list()}
    assert roles == {"root": ("admin", False), "nurse": ("clinician", False)}


async def test_reset_password_and_disable_revoke_tokens_enable_does_not(store: Store) -> None:
    users = Users(store, Clock())

    async def gen() -> int:
        return int((await store.get_user("nurse") or {})["token_gen"])

    first = await gen()
    await users.reset_password("nurse", NEW_PASSWORD, **WHO)
    assert await gen() == first + 1
    row = await store.get_user("nurse") or {}
    assert verify_password(row["password_hash"], NEW_PASSWORD)
    assert not verify_password(row["password_hash"], PASSWORD)
    await users.disable("nurse", **WHO)
    assert await gen() == first + 2
    await users.enable("nurse", **WHO)
    await users.set_role("nurse", "viewer", **WHO)  # the role is read from the store instead
    assert await gen() == first + 2


async def test_delete_removes_memberships_assignments_and_grants(store: Store) -> None:
    users = Users(store, Clock())
    await store.add_grant("nurse", "Q1", "rapid response call", 1.0, 10.0**10)
    out = await users.delete("nurse", **WHO)
    assert out["wards"] == ["ward-a"] and out["patients"] == ["Q1"]
    teams = await store.care_teams(2.0)
    assert "nurse" not in teams["users"]
    assert "nurse" not in teams["wards"] and "nurse" not in teams["assigned"]
    assert not [key for key in teams["grants"] if key[0] == "nurse"]
    assert await store.get_user("nurse") is None
    # the name can be used again, with nothing of the old user's care
    await users.create("nurse", PASSWORD, "viewer", **WHO)
    assert [u for u in await users.list() if u["username"] == "nurse"][0]["wards"] == []


NO_OPS: list[tuple[str, Call]] = [
    ("same role", lambda u: u.set_role("nurse", "clinician", **WHO)),
    ("enable an enabled user", lambda u: u.enable("nurse", **WHO)),
    ("add a member again", lambda u: u.add_to_ward("nurse", "ward-a", **WHO)),
    ("assign again", lambda u: u.assign("nurse", "Q1", **WHO)),
]


@pytest.mark.parametrize("call", [c[1] for c in NO_OPS], ids=[c[0] for c in NO_OPS])
async def test_a_change_that_changes_nothing_writes_nothing(store: Store, call: Call) -> None:
    before = (await store.access_version(), len(await store.audit_log(1000)))
    out = await call(Users(store, Clock()))
    assert out["changed"] is False
    assert (await store.access_version(), len(await store.audit_log(1000))) == before


async def test_a_ward_without_patients_can_be_staffed(store: Store) -> None:
    users = Users(store, Clock())
    assert (await users.add_to_ward("nurse", "ward-c", **WHO))["changed"]
    await store.create_patient("C1", "C", "ward-c", 3.0)
    teams = await store.care_teams(4.0)
    assert "ward-c" in teams["wards"]["nurse"] and teams["ward_of"]["C1"] == "ward-c"


# -- the audit log's bounds, on every backend ------------------------------------------------


@pytest.fixture(params=["sqlite", "sqlite-engine", "postgresql"])
async def any_store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Store]:
    """The audit batch goes through SQLite's writer thread, the async engine, or PostgreSQL
    (whose VARCHAR columns refuse a longer value outright)."""
    async with contextlib.AsyncExitStack() as stack:
        if request.param == "postgresql":
            url = await stack.enter_async_context(fresh_postgres_db())
        else:
            url = f"sqlite:///{tmp_path / 'audit.db'}"
        s = SqlStore(url, dedicated_writer=request.param == "sqlite")
        await s.open()
        try:
            yield s
        finally:
            await s.close()


async def test_a_60kb_name_is_stored_cut_to_its_column(any_store: Store) -> None:
    huge = "A" * 60_000
    detail = json.dumps({"username": huge})
    row = AuditRow(1.0, huge, "login_failed" + "x" * 100, "P" * 100, detail, "o" * 1000)
    await any_store.write_batch(Batch(audit=[row]))
    [stored] = await any_store.audit_log(5)
    assert stored["actor"] == "A" * 63 + ELLIPSIS
    assert stored["action"] == ("login_failed" + "x" * 100)[:63] + ELLIPSIS
    assert stored["patient_id"] == "P" * 63 + ELLIPSIS
    assert stored["origin"] == "o" * 127 + ELLIPSIS
    assert len(stored["detail"]) <= AUDIT_DETAIL_MAX
    kept = json.loads(stored["detail"])  # still JSON, marked
    assert kept["truncated"] is True and kept["chars"] == len(detail)
    short = AuditRow(2.0, "nurse", "login", None, '{"role": "viewer"}', "127.0.0.1")
    await any_store.write_batch(Batch(audit=[short]))
    latest = (await any_store.audit_log(1))[0]
    assert (latest["actor"], latest["detail"], latest["origin"]) == (
        "nurse",
        '{"role": "viewer"}',
        "127.0.0.1",
    )


# -- the CLI, in a child process -------------------------------------------------------------


def vitalwire(*args: str, db: str, child: bool = False) -> tuple[int, str]:
    """``vitalwire admin ARGS --db DB``: exit status and output (stderr included), in this
    process, or in a child process as a user runs it (``child``), stdin not a terminal."""
    argv = ["admin", *args, "--db", db]
    if not child:
        result = CliRunner().invoke(app, argv)
        return result.exit_code, result.output
    env = {k: v for k, v in os.environ.items() if not k.startswith("VITALWIRE_")}
    proc = subprocess.run(
        [sys.executable, "-m", "vitalwire.cli", *argv],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=120,
        env={**env, "COLUMNS": "80"},  # narrow: a long line must still be one line
    )
    assert "Traceback" not in proc.stderr, proc.stderr
    return proc.returncode, proc.stdout + proc.stderr


def ok(ran: tuple[int, str]) -> str:
    code, out = ran
    assert code == 0, out
    return out


def one_error(ran: tuple[int, str]) -> str:
    """The single ``error:`` line a refused command prints (exit 1, no traceback)."""
    code, out = ran
    assert code == 1, out
    lines = [line for line in out.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), out
    return lines[0]


def test_cli_user_administration(tmp_path: Path) -> None:
    db = f"sqlite:///{tmp_path / 'cli.db'}"
    ok(vitalwire("create-patient", "P1", "--name", "A", db=db))
    ok(vitalwire("create-user", "root", "--role", "admin", "--password", PASSWORD, db=db))
    ok(vitalwire("create-user", "nurse", "--password", PASSWORD, db=db))
    # add-to-ward and assign refuse who and what does not exist
    refused = one_error(vitalwire("add-to-ward", "ghost", "w", db=db, child=True))
    assert "user ghost does not exist" in refused
    assert "patient P404 does not exist" in one_error(vitalwire("assign", "nurse", "P404", db=db))
    ok(vitalwire("add-to-ward", "nurse", "ward-a", db=db))
    ok(vitalwire("assign", "nurse", "P1", db=db))
    assert "nurse: clinician -> viewer" in ok(vitalwire("set-role", "nurse", "viewer", db=db))
    assert "role must be one of" in one_error(vitalwire("set-role", "nurse", "boss", db=db))
    assert "last enabled admin" in one_error(vitalwire("disable-user", "root", db=db))
    ok(vitalwire("disable-user", "nurse", db=db))
    listing = ok(vitalwire("list-users", db=db)).splitlines()
    assert re.match(r"nurse\s+viewer\s+disabled\s+wards=ward-a patients=P1$", listing[0])
    assert re.match(r"root\s+admin\s+enabled\s+wards=- patients=-$", listing[1])
    ok(vitalwire("enable-user", "nurse", db=db))
    out = ok(vitalwire("reset-password", "nurse", "--password", NEW_PASSWORD, db=db))
    assert NEW_PASSWORD not in out and "reset" in out
    # no --password and no terminal to ask on
    assert "--password" in one_error(vitalwire("reset-password", "nurse", db=db, child=True))
    ok(vitalwire("unassign", "nurse", "P1", db=db))
    assert "not assigned" in one_error(vitalwire("unassign", "nurse", "P1", db=db))
    ok(vitalwire("remove-from-ward", "nurse", "ward-a", db=db))
    assert "not a member" in one_error(vitalwire("remove-from-ward", "nurse", "ward-a", db=db))
    assert "--yes" in one_error(vitalwire("delete-user", "nurse", db=db, child=True))  # asks first
    assert re.search(r"^nurse ", ok(vitalwire("list-users", db=db)), re.M)
    ok(vitalwire("delete-user", "nurse", "--yes", db=db))
    assert "nurse" not in ok(vitalwire("list-users", db=db))
    audit = ok(vitalwire("audit", "--limit", "100", db=db))
    actions = [line.split()[3] for line in audit.splitlines()]
    assert actions == [
        "user_delete",
        "ward_remove",
        "unassign",
        "user_password_reset",
        "user_enable",
        "user_disable",
        "user_role",
        "assign",
        "ward_add",
        "user_create",
        "user_create",
        "create_patient",
    ]
    fields = [line.split() for line in audit.splitlines()]
    assert all(f[2].startswith("cli:") and f[5] == "cli" for f in fields), audit
    assert PASSWORD not in audit and NEW_PASSWORD not in audit and "argon2" not in audit


HOSTILE = [
    "x\n2026-01-01 00:00:00Z root login - 10.0.0.1 {}",
    "\x1b[2J\x1b]0;pwned\x07",
    "line\u2028separator",
    "\u202enimda",
    "nul\x00del\x7fcsi\x9b",
]


async def _failed_logins(db: str) -> None:
    """What ``POST /auth/login`` records for a wrong password: the name tried, as the actor."""
    s = SqlStore(db)
    await s.open()
    try:
        for i, name in enumerate(HOSTILE):
            row = AuditRow(10.0 + i, name, "login_failed", None, "{}", "10.0.0.9\n")
            await s.write_batch(Batch(audit=[row]))
        detail = json.dumps({"username": HOSTILE[1]}, ensure_ascii=False)
        await s.write_batch(Batch(audit=[AuditRow(20.0, "ok", "x\ny", "P\x1b", detail, None)]))
    finally:
        await s.close()


def test_cli_audit_prints_one_line_per_entry_and_nothing_raw(tmp_path: Path) -> None:
    db = f"sqlite:///{tmp_path / 'audit.db'}"
    asyncio.run(_failed_logins(db))
    out = ok(vitalwire("audit", "--limit", "100", db=db, child=True))
    lines = out.split("\n")
    assert lines[-1] == "" and len(lines[:-1]) == len(HOSTILE) + 1, out
    assert all(re.match(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\dZ ", line) for line in lines[:-1]), out
    body = "".join(lines)
    raw = [ch for ch in body if not ch.isprintable()]
    assert raw == [], raw
    for shown in ("x\\n2026", "\\x1b[2J\\x1b]0;pwned\\x07", "line\\u2028separator", "\\u202enimda"):
        assert shown in out, shown
    assert "nul\\x00del\\x7fcsi\\x9b" in out and "10.0.0.9\\n" in out and "P\\x1b" in out


async def test_two_admins_demoted_at_once_leave_one_admin(tmp_path: Path) -> None:
    """The last-admin guard holds against a race: on PostgreSQL the two changes take turns on
    the admins' rows, so the second counts what the first left and is refused."""
    async with fresh_postgres_db() as url:
        s = SqlStore(url)
        await s.open()
        try:
            users = Users(s, Clock())
            await users.create("root", PASSWORD, "admin", **WHO)
            await users.create("root2", PASSWORD, "admin", **WHO)
            # two pooled connections open, so that neither transaction waits for a connect
            await asyncio.gather(s.get_user("root"), s.get_user("root2"))
            results = await asyncio.gather(
                s.update_user("root", role="viewer", keep_admin=True),
                s.update_user("root2", disabled=True, keep_admin=True),
                return_exceptions=True,
            )
            refused = [r for r in results if isinstance(r, Conflict)]
            assert len(refused) == 1, results
            left = [u for u in await s.list_users() if u["role"] == "admin" and not u["disabled"]]
            assert len(left) == 1
        finally:
            await s.close()
