"""The clinicians' web app in a real browser (issue 27): Debian's Chromium driven by Playwright
against a real server (port 0, a real SQLite file) with simulated devices over real sockets.

Each test follows one of the issue's stories: the central station and an alarm acknowledged from
its banner (and audited), a command's whole lifecycle on the patient view, a server restart under
the open page (not live, then resumed with nothing missed or doubled), and what a viewer, a phone
and a refused limit look like. Every page is checked for console errors, page errors and
Content-Security-Policy violations. The screenshots in docs/img/ are written by this run.

Skipped with the reason when Chromium or Playwright is missing; failed instead under
VITALWIRE_REQUIRE_SERVICES=1 (tests/browser.py).
"""

from __future__ import annotations

import re
import signal
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import pytest_asyncio

from tests.browser import (
    DESATURATED,
    SERVER_DOWN,
    WAIT_MS,
    WELL,
    ScriptedDevice,
    Tab,
    Ward,
    backfill,
    chromium,
    need_browser,
    refused,
)
from tests.conftest import ServerProcess, free_port, provision_db, start_server, stop_server

try:
    from playwright.async_api import expect
except ImportError:  # need_browser() skips (or fails) each test with the reason
    expect = None  # type: ignore[assignment]

TILE = "[data-testid=tile]"


def tile(pid: str) -> str:
    return f'{TILE}[data-patient="{pid}"]'


def view(pid: str) -> str:
    return f'[data-testid=patient-view][data-patient="{pid}"]'


def banner(pid: str) -> str:
    return f'[data-testid=banner-alert][data-patient="{pid}"]'


# One Chromium for the module (each test opens its own contexts, so no state is shared): the
# tests and the fixture run on the module's event loop.
pytestmark = pytest.mark.asyncio(loop_scope="module")


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def chromium_browser() -> AsyncIterator[Any]:
    need_browser()
    expect.set_options(timeout=WAIT_MS)
    async with chromium() as b:
        yield b


@pytest.fixture
def browser(chromium_browser: Any) -> Any:
    need_browser()  # each test says why it skips
    return chromium_browser


async def token(base_url: str, user: str, password: str) -> str:
    async with httpx.AsyncClient(base_url=base_url) as http:
        r = await http.post("/auth/login", json={"username": user, "password": password})
    assert r.status_code == 200, r.text
    access: str = r.json()["access_token"]
    return access


async def stream_readings(base_url: str, bearer: str, pid: str) -> list[dict[str, Any]]:
    """Every reading event of ``patient:<pid>``, from ``GET /patients/{id}/events`` walked to the
    head."""
    items: list[dict[str, Any]] = []
    after = 0
    async with httpx.AsyncClient(
        base_url=base_url, headers={"Authorization": f"Bearer {bearer}"}
    ) as http:
        while True:
            r = await http.get(f"/patients/{pid}/events", params={"after": after, "limit": 1000})
            assert r.status_code == 200, r.text
            page = r.json()
            items += [e for e in page["items"] if e["kind"] == "reading"]
            if not page["items"] or page["next_after"] >= page["head"]:
                return items
            after = page["next_after"]


# -- a. the central station, an alarm, acknowledged from the banner, audited ---------------------


async def test_station_fills_goes_live_alarms_and_the_ack_is_audited(
    tmp_path: Path, browser: Any
) -> None:
    srv, task = await start_server(tmp_path, patients=4)
    svc = srv.services
    # a patient of another ward, with a device streaming an alarm: never on this clinician's screen
    await svc.registry.create_patient("Q001", "Out Of Team", "ward-b")
    other = await svc.registry.create_device("mon-q01", "multiparameter")
    await svc.registry.bind("mon-q01", "Q001")
    await svc.access.refresh()
    did, secret, pid = srv.device(0)
    try:
        async with (
            ScriptedDevice(srv.url, did, secret, WELL) as scripted,
            ScriptedDevice(srv.url, "mon-q01", other.secret, DESATURATED),
            Ward(srv.url, srv.creds.devices[1:]),
        ):
            nurse = await Tab.open(browser, srv.url)
            await nurse.login(*srv.user("clinician"))
            page = nurse.page
            await expect(page.locator("[data-testid=station]")).to_be_visible()
            # one tile per patient of the care team, in order of id
            await expect(page.locator(TILE)).to_have_count(4)
            ids = await page.locator(TILE).evaluate_all("ts => ts.map(t => t.dataset.patient)")
            assert ids == ["P001", "P002", "P003", "P004"]
            # values change live
            p2 = page.locator(tile("P002"))
            await expect(p2.locator('[data-metric="hr"]')).not_to_have_text("—")
            first = await p2.get_attribute("data-offset")
            await expect(p2).not_to_have_attribute("data-offset", first or "")
            await expect(page.locator(tile(pid))).to_have_attribute("data-priority", "none")

            # a desaturation below the critical limit: high priority at once
            scripted.values = dict(DESATURATED)
            p1 = page.locator(tile(pid))
            await expect(p1).to_have_attribute("data-priority", "high")
            await expect(p1).to_have_attribute("data-flashing", "true")
            await expect(p1.locator('[data-metric="spo2"]')).to_have_text("80")
            row = page.locator(banner(pid))
            await expect(row).to_have_count(1)
            await expect(row).to_have_attribute("data-priority", "high")
            await expect(row).to_have_attribute("data-state", "active")
            await nurse.screenshot("station.png")

            # the audible alarm: off until turned on, then the high-priority signal; "audio
            # paused" for at most 2 minutes (IEC 60601-1-8), with its countdown
            audio = "window.vitalwire.audio"
            await page.wait_for_function(f"() => {audio} && {audio}.enabled === false")
            await page.locator("[data-testid=audio-toggle]").click()
            await page.wait_for_function(f"() => {audio}.playing === 'high'")
            await page.locator("[data-testid=mute]").click()
            await expect(page.locator("[data-testid=mute-remaining]")).to_be_visible()
            left = await page.evaluate(f"{audio}.mutedUntil - Date.now() / 1000")
            assert 110 <= left <= 120.5, left
            assert await page.evaluate(f"{audio}.playing") is None

            # acknowledged from the banner: the tile keeps its colour and stops flashing
            alert_id = await row.get_attribute("data-alert-id")
            await row.locator("[data-testid=ack]").click()
            await expect(p1).to_have_attribute("data-flashing", "false")
            await expect(p1).to_have_attribute("data-priority", "high")
            await expect(row).to_have_attribute("data-state", "acknowledged")

            # the out-of-team patient's alarm is real (an admin sees it), yet never shown here
            admin_bearer = await token(srv.url, *srv.user("admin"))
            async with httpx.AsyncClient(base_url=srv.url) as http:
                r = await http.get(
                    "/alerts",
                    params={"patient": "Q001", "state": "active"},
                    headers={"Authorization": f"Bearer {admin_bearer}"},
                )
            assert r.status_code == 200 and r.json()["items"], r.text
            seen = await nurse.seen()
            assert "Q001" not in seen["tiles"] and "Q001" not in seen["banner"], seen
            await expect(page.locator(tile("Q001"))).to_have_count(0)
            await nurse.check()

            # the audit log, as an admin, shows who acknowledged
            admin = await Tab.open(browser, srv.url)
            await admin.login(*srv.user("admin"), hash_route="#/admin/audit")
            apage = admin.page
            await expect(apage.locator("[data-testid=audit-search]")).to_be_visible()
            await apage.locator("[data-testid=audit-action]").fill("ack_alert")
            await apage.locator("[data-testid=audit-action]").press("Enter")
            acked = apage.locator(
                '[data-testid=audit-row][data-action="ack_alert"][data-actor="clinician"]'
            )
            await expect(acked).to_have_count(1)
            await expect(acked).to_contain_text(alert_id or "")
            actions = await apage.locator("[data-testid=audit-row]").evaluate_all(
                "rs => rs.map(r => r.dataset.action)"
            )
            assert set(actions) == {"ack_alert"}, actions
            await admin.check()
    finally:
        await stop_server(srv, task)


# -- b. a command's lifecycle on the patient view --------------------------------------------------


async def test_a_command_runs_through_its_lifecycle_on_the_patient_view(
    tmp_path: Path, browser: Any
) -> None:
    srv, task = await start_server(tmp_path, patients=2)
    try:
        await backfill(srv.url, srv.creds.devices[0])  # ten minutes of trend for the screenshot
        async with Ward(srv.url, srv.creds.devices):
            doctor = await Tab.open(browser, srv.url)
            await doctor.login(*srv.user("clinician"), hash_route="#/patient/P001")
            page = doctor.page
            await expect(page.locator(view("P001"))).to_be_visible()
            panel = page.locator("[data-testid=command-panel]")
            await expect(panel).to_be_visible()
            await panel.locator("[data-testid=command-name]").select_option("report_now")
            await panel.locator("[data-testid=command-send]").click()
            row = page.locator("[data-testid=command-row]")
            await expect(row).to_have_count(1)
            await expect(row).to_have_attribute("data-status", "completed")
            steps = await row.locator("[data-testid=command-step]").evaluate_all(
                "ss => ss.map(s => s.dataset.status)"
            )
            assert steps == ["queued", "sent", "acknowledged", "completed"], steps
            # the same lifecycle as the server's record of it
            command_id = await row.get_attribute("data-command-id")
            bearer = await token(srv.url, *srv.user("clinician"))
            async with httpx.AsyncClient(base_url=srv.url) as http:
                r = await http.get(
                    f"/commands/{command_id}", headers={"Authorization": f"Bearer {bearer}"}
                )
            assert r.status_code == 200, r.text
            assert [s["status"] for s in r.json()["lifecycle"]] == steps
            await expect(page.locator("[data-testid=trend-chart]").first).to_be_visible()
            await page.wait_for_function(
                "() => window.vitalwire.patientTrend && "
                "window.vitalwire.patientTrend().offsets.length >= 600"
            )
            await doctor.screenshot("patient.png")

            # the pleth waveform asked of the device (request_data) arrives on screen
            await page.locator("[data-testid=waveform-request]").click()
            await expect(page.locator("[data-testid=waveform]")).to_be_visible()
            await page.wait_for_function(
                "() => window.vitalwire.ward.model('P001').waveform.length >= 2"
            )
            await expect(page.locator("[data-testid=waveform] canvas").first).to_be_visible()
            await doctor.check()
    finally:
        await stop_server(srv, task)


# -- c. the server restarts under the open page ----------------------------------------------------


async def test_a_server_restart_shows_not_live_then_resumes_with_nothing_missed_or_doubled(
    tmp_path: Path, browser: Any
) -> None:
    db = f"sqlite:///{tmp_path / 'vitalwire.db'}"
    creds = await provision_db(db, patients=3)
    user = next((u["username"], u["password"]) for u in creds.users if u["role"] == "clinician")
    proc = ServerProcess(db, free_port(), tmp_path)
    await proc.start()
    try:
        async with Ward(proc.url, creds.devices) as ward:
            station = await Tab.open(browser, proc.url)
            await station.login(*user)
            sp = station.page
            await expect(sp.locator(TILE)).to_have_count(3)
            await expect(sp.locator(f"{TILE}[data-live=true]")).to_have_count(3)
            viewer = await Tab.open(browser, proc.url)
            await viewer.login(*user, hash_route="#/patient/P001")
            vp = viewer.page
            await vp.locator("[data-testid=range-15m]").click()
            await vp.wait_for_function(
                "() => window.vitalwire.patientTrend && "
                "window.vitalwire.patientTrend().offsets.length >= 3"
            )

            assert await proc.signal(signal.SIGKILL) == -signal.SIGKILL
            for tab in (station, viewer):
                await tab.wait_live(False)
            stale = sp.locator(f"{TILE} [data-testid=stale]")
            await expect(stale).to_have_count(3)
            for i in range(3):
                await expect(stale.nth(i)).to_have_text(re.compile(r"^not live since \d"))
            await expect(sp.locator(f"{TILE}[data-live=false]")).to_have_count(3)
            await expect(vp.locator("[data-testid=stale]")).to_have_count(1)

            await proc.start()  # the same port and file
            for tab in (station, viewer):
                await tab.wait_live(True, timeout=30_000)
            await expect(stale).to_have_count(0)
            await expect(vp.locator("[data-testid=stale]")).to_have_count(0)
            first = await sp.locator(tile("P002")).get_attribute("data-offset")
            await expect(sp.locator(tile("P002"))).not_to_have_attribute("data-offset", first or "")

            # stop the devices (every reading acknowledged, so durable), then the trend on screen
            # holds exactly the stream's readings
            await ward.finish()
            bearer = await token(proc.url, *user)
            readings = await stream_readings(proc.url, bearer, "P001")
            want = [e["offset"] for e in readings]
            assert len(want) >= 5, want
            try:
                await vp.wait_for_function(
                    "(want) => JSON.stringify(window.vitalwire.patientTrend().offsets) === want",
                    arg=str(want).replace(" ", ""),
                )
            except Exception:
                got = await vp.evaluate("window.vitalwire.patientTrend().offsets")
                missed = sorted(set(want) - set(got))
                extra = sorted(set(got) - set(want))
                doubled = sorted({o for o in got if got.count(o) > 1})
                raise AssertionError(
                    f"trend offsets differ from the stream: missed {missed}, not in the stream "
                    f"{extra}, doubled {doubled}"
                ) from None
            trend = await vp.evaluate("window.vitalwire.patientTrend()")
            hr = [v for v in trend["values"].get("hr", []) if v is not None]
            assert hr == [e["data"]["hr"] for e in readings], "hr on screen != the stream's"
            for tab in (station, viewer):
                await tab.check(allow=SERVER_DOWN)
    finally:
        proc.stop()


# -- d. a viewer, a phone, a refused limit ---------------------------------------------------------


async def test_a_viewer_sees_no_controls(tmp_path: Path, browser: Any) -> None:
    srv, task = await start_server(tmp_path, patients=2)
    did, secret, pid = srv.device(0)
    try:
        async with (
            ScriptedDevice(srv.url, did, secret, DESATURATED),
            Ward(srv.url, srv.creds.devices[1:]),
        ):
            viewer = await Tab.open(browser, srv.url)
            await viewer.login(*srv.user("viewer"))
            page = viewer.page
            await expect(page.locator(TILE)).to_have_count(2)
            await expect(page.locator(banner(pid))).to_have_count(1)
            await expect(page.locator("[data-testid=ack]")).to_have_count(0)

            await viewer.goto(f"#/patient/{pid}")
            await expect(page.locator(view(pid))).to_be_visible()
            await expect(page.locator("[data-testid=limits-editor]")).to_be_visible()
            await expect(page.locator("[data-testid=alert-row]").first).to_be_visible()
            for absent in (
                "[data-testid=ack]",
                "[data-testid=command-panel]",
                "[data-testid=command-send]",
                "[data-testid=limits-save]",
                "[data-testid=limits-editor] input",
                "[data-testid=limits-editor] select",
                'input[data-testid^="limit-"]',
            ):
                await expect(page.locator(absent)).to_have_count(0)
            await viewer.check()
    finally:
        await stop_server(srv, task)


async def test_the_phone_layout_puts_alerts_first_and_taps_to_a_patient(
    tmp_path: Path, browser: Any
) -> None:
    srv, task = await start_server(tmp_path, patients=3)
    did, secret, pid = srv.device(1)
    try:
        async with (
            ScriptedDevice(srv.url, did, secret, DESATURATED),
            Ward(srv.url, [srv.creds.devices[0], srv.creds.devices[2]]),
        ):
            phone = await Tab.open(browser, srv.url, 390, 844, phone=True)
            await phone.login(*srv.user("clinician"))
            page = phone.page
            await expect(page.locator(TILE)).to_have_count(3)
            await expect(page.locator(banner(pid))).to_have_count(1)
            await expect(page.locator(tile(pid))).to_have_attribute("data-priority", "high")
            # alerts first: the banner is above the first tile
            banner_box = await page.locator("[data-testid=alarm-banner]").bounding_box()
            tile_box = await page.locator(TILE).first.bounding_box()
            assert banner_box and tile_box, (banner_box, tile_box)
            assert banner_box["y"] < tile_box["y"], (banner_box, tile_box)
            assert await phone.scroll_width() <= 390
            await phone.screenshot("phone.png")

            await page.locator(tile("P003")).tap()
            await expect(page.locator(view("P003"))).to_be_visible()
            assert page.url.endswith("#/patient/P003"), page.url
            await expect(page.locator("[data-testid=trend-chart]").first).to_be_visible()
            assert await phone.scroll_width() <= 390
            await phone.check()
    finally:
        await stop_server(srv, task)


async def test_the_limits_editor_shows_the_servers_refusal(tmp_path: Path, browser: Any) -> None:
    srv, task = await start_server(tmp_path, patients=1)
    try:
        async with Ward(srv.url, srv.creds.devices):
            # what the server answers to a critical low above the low limit (90 %)
            bearer = await token(srv.url, *srv.user("clinician"))
            async with httpx.AsyncClient(base_url=srv.url) as http:
                r = await http.put(
                    "/patients/P001/limits",
                    json={"limits": {"spo2": {"critical_low": 95}}},
                    headers={"Authorization": f"Bearer {bearer}"},
                )
            assert r.status_code == 422, r.text
            message = r.json()["message"]

            doctor = await Tab.open(browser, srv.url)
            await doctor.login(*srv.user("clinician"), hash_route="#/patient/P001")
            page = doctor.page
            field = page.locator('[data-testid="limit-spo2-critical_low"]')
            await expect(field).to_be_editable()
            await field.fill("95")
            await page.locator("[data-testid=limits-save]").click()
            error = page.locator("[data-testid=limits-error]")
            await expect(error).to_contain_text(message)
            await expect(page.locator("[data-testid=limits-saved]")).to_have_count(0)
            await doctor.check(allow=[refused(422)])
    finally:
        await stop_server(srv, task)


async def test_at_the_cloud_an_unreachable_ward_gateway_is_said_on_its_tiles(
    tmp_path: Path, browser: Any
) -> None:
    """The cloud's station shows an edge node's patients live through its uplink; when the
    edge is gone, their tiles and patient view say the ward gateway is unreachable and since
    when (docs/howto-edge.md), while the cloud's own socket stays live."""
    (tmp_path / "cloud").mkdir()
    (tmp_path / "edge").mkdir()
    cloud, ctask = await start_server(tmp_path / "cloud", patients=0)
    cred = await cloud.services.registry.create_device("gw-web", kind="edge")
    edge, etask = await start_server(
        tmp_path / "edge",
        patients=2,
        upstream=cloud.ws_url,
        node_id="gw-web",
        upstream_secret=cred.secret,
    )
    pid = edge.device(0)[2]
    try:
        async with Ward(edge.url, edge.creds.devices):
            tab = await Tab.open(browser, cloud.url)
            await tab.login(*cloud.user("clinician"))
            page = tab.page
            await expect(page.locator(TILE)).to_have_count(2)
            first = int(await page.locator(tile(pid)).get_attribute("data-offset") or 0)

            async def later() -> bool:
                now = await page.locator(tile(pid)).get_attribute("data-offset")
                return int(now or 0) > first

            for _ in range(600):  # live through the uplink: the tile's offset moves on
                if await later():
                    break
                await page.wait_for_timeout(25)
            assert await later(), "the edge's readings never reached the cloud's station"
            await expect(page.locator("[data-testid=gateway]")).to_have_count(0)
            await stop_server(edge, etask)
            etask = None
            mark = page.locator(f"{tile(pid)} [data-testid=gateway]")
            await expect(mark).to_contain_text("ward gateway gw-web unreachable since")
            await expect(page.locator(tile(pid))).to_have_class(re.compile(r"\bstale\b"))
            await expect(page.locator(f"{tile(pid)} [data-testid=stale]")).to_have_count(0)
            await tab.goto(f"#/patient/{pid}")
            await expect(page.locator(f"{view(pid)} [data-testid=gateway]")).to_contain_text(
                "cannot reach the ward"
            )
            await tab.check()
    finally:
        if etask is not None:
            await stop_server(edge, etask)
        await stop_server(cloud, ctask)
