"""Support for the browser tests (tests/test_web.py): Debian's Chromium driven by Playwright.

- :func:`need_browser` skips a test with the reason when Chromium or Playwright is missing, and
  fails it instead under ``VITALWIRE_REQUIRE_SERVICES=1`` (as CI runs ``make test``, which
  installs Chromium with apt-get when it runs as root). Playwright's own browser downloads do not
  work here: the browser is always Debian's (``executable_path``).
- :class:`Tab` is a page that records what must never happen: console errors, uncaught page
  errors and Content-Security-Policy violations (the page's policy allows no inline script or
  style, docs/security.md "Web app"); :meth:`Tab.check` asserts there were none, except the
  messages a test expects (a refused request, a server that is down).
- :class:`Ward` runs the provisioned ward's devices as simulated devices over real sockets
  (:func:`vitalwire.simulator.run_device`), and :class:`ScriptedDevice` a device whose values a
  test sets (a desaturation at once: SpO2 below the critical limit 85 % is high priority at
  once, docs/alerts.md).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import re
import time
from collections.abc import AsyncIterator, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import REQUIRE_SERVICES
from vitalwire.sdk import DeviceClient
from vitalwire.simulator import PatientModel, SimDevice, run_device

#: Debian's Chromium (the issue's ``executable_path``); VITALWIRE_CHROMIUM names another binary.
CHROMIUM = Path(os.environ.get("VITALWIRE_CHROMIUM") or "/usr/bin/chromium")
#: Screenshots the test run writes for the README and docs/howto-web.md.
IMG_DIR = Path(__file__).resolve().parents[1] / "docs" / "img"
#: How long a test waits for something on screen (ms): a reading a second, a socket that
#: reconnects after 1, 2, 4 s...
WAIT_MS = 15_000

# Installed before any script of the page: CSP violations (also logged on the console, but this
# names the directive), and every patient a tile or a banner row was ever shown for, so a test
# can say that an out-of-team patient "never" appeared, not only "is not there now".
_INIT_SCRIPT = """
(() => {
  const seen = { csp: [], tiles: new Set(), banner: new Set() };
  window.__vwTest = seen;
  document.addEventListener('securitypolicyviolation', (e) => {
    const where = `${e.sourceFile}:${e.lineNumber}`;
    seen.csp.push(`${e.violatedDirective} blocked ${e.blockedURI || 'inline'} at ${where}`);
  });
  const note = (el) => {
    if (!(el instanceof Element)) return;
    for (const t of [el, ...el.querySelectorAll('[data-patient]')]) {
      const id = t.getAttribute && t.getAttribute('data-patient');
      if (!id) continue;
      const kind = t.getAttribute('data-testid');
      if (kind === 'tile') seen.tiles.add(id);
      if (kind === 'banner-alert') seen.banner.add(id);
    }
  };
  new MutationObserver((records) => {
    for (const r of records) {
      if (r.type === 'attributes') note(r.target);
      for (const n of r.addedNodes) note(n);
    }
  }).observe(document, { subtree: true, childList: true, attributes: true,
                         attributeFilter: ['data-patient'] });
})();
"""


def need_browser() -> None:
    """Skip (or fail under VITALWIRE_REQUIRE_SERVICES=1) when Playwright or Chromium is missing."""
    reason = None
    try:
        import playwright.async_api  # noqa: F401
    except ImportError:
        reason = "Playwright is not installed (pip install -e '.[test]')"
    if reason is None and not os.access(CHROMIUM, os.X_OK):
        reason = (
            f"Chromium not found at {CHROMIUM} (make test installs Debian's chromium with "
            "apt-get when it runs as root; or apt-get install chromium)"
        )
    if reason is not None:
        if REQUIRE_SERVICES:
            pytest.fail(reason)
        pytest.skip(reason)


@contextlib.asynccontextmanager
async def chromium() -> AsyncIterator[Any]:
    """A headless Debian Chromium (``--no-sandbox`` when running as root, as in CI)."""
    from playwright.async_api import async_playwright

    args = ["--no-sandbox"] if hasattr(os, "geteuid") and os.geteuid() == 0 else []
    async with async_playwright() as p:
        browser = await p.chromium.launch(executable_path=str(CHROMIUM), args=args)
        try:
            yield browser
        finally:
            await browser.close()


@dataclass
class Tab:
    """A page of its own browser context (its own session: sessionStorage is per tab)."""

    page: Any
    base_url: str
    problems: list[str] = field(default_factory=list)

    @classmethod
    async def open(
        cls, browser: Any, base_url: str, width: int = 1280, height: int = 800, phone: bool = False
    ) -> Tab:
        context = await browser.new_context(
            viewport={"width": width, "height": height},
            is_mobile=phone,
            has_touch=phone,
            device_scale_factor=2 if phone else 1,
        )
        page = await context.new_page()
        page.set_default_timeout(WAIT_MS)
        tab = cls(page, base_url)
        await page.add_init_script(_INIT_SCRIPT)
        page.on("console", tab._console)
        page.on("pageerror", lambda e: tab.problems.append(f"page error: {e}"))
        return tab

    def _console(self, msg: Any) -> None:
        if msg.type in ("error", "assert"):
            where = msg.location.get("url", "") if msg.location else ""
            self.problems.append(f"console {msg.type}: {msg.text} ({where})")

    async def login(self, user: str, password: str, hash_route: str = "#/") -> None:
        """Open the app, log in through the form, go to ``hash_route`` and wait until live."""
        page = self.page
        await page.goto(self.base_url + "/")
        await page.fill("#login-user", user)
        await page.fill("#login-password", password)
        await page.click("#login-submit")
        await page.wait_for_selector("[data-testid=conn-status]")
        await self.goto(hash_route)
        await self.wait_live(True)

    async def goto(self, hash_route: str) -> None:
        await self.page.evaluate("(h) => { location.hash = h; }", hash_route)

    async def wait_live(self, live: bool, timeout: int = WAIT_MS) -> None:
        await self.page.wait_for_selector(
            f"[data-testid=conn-status][data-live={str(live).lower()}]", timeout=timeout
        )

    async def seen(self) -> dict[str, list[str]]:
        """Patients ever shown in a tile or a banner row since the page loaded."""
        got: dict[str, list[str]] = await self.page.evaluate(
            "() => ({tiles: [...window.__vwTest.tiles], banner: [...window.__vwTest.banner]})"
        )
        return got

    async def scroll_width(self) -> int:
        width: int = await self.page.evaluate("document.documentElement.scrollWidth")
        return width

    async def check(self, allow: Iterable[str] = ()) -> None:
        """No console error, page error or CSP violation, except those matching ``allow``."""
        csp = await self.page.evaluate("window.__vwTest ? window.__vwTest.csp : []")
        problems = self.problems + [f"CSP violation: {c}" for c in csp]
        patterns = [re.compile(a) for a in allow]
        unexpected = [p for p in problems if not any(a.search(p) for a in patterns)]
        assert not unexpected, "\n".join(unexpected)

    async def screenshot(self, name: str) -> None:
        IMG_DIR.mkdir(parents=True, exist_ok=True)
        await self.page.screenshot(path=str(IMG_DIR / name))

    async def close(self) -> None:
        await self.page.context.close()


#: Console lines Chromium writes for a request the server refused or could not take: a test that
#: expects them passes these to :meth:`Tab.check`.
def refused(status: int) -> str:
    return rf"Failed to load resource: the server responded with a status of {status}"


SERVER_DOWN = (
    r"Failed to load resource: net::ERR_CONNECTION_REFUSED",
    r"WebSocket connection to .* failed",
)

#: A patient's values while well, and while desaturating below the critical limit (85 %).
WELL: dict[str, float | bool] = {
    "spo2": 97, "pulse": 72, "hr": 72, "rr": 14, "temp_c": 36.8, "sbp": 121, "dbp": 78,
    "pi": 3.1, "battery": 90, "probe": True,
}  # fmt: skip
DESATURATED: dict[str, float | bool] = {**WELL, "spo2": 80, "pulse": 112, "hr": 112, "rr": 24}


class ScriptedDevice:
    """A device that sends ``values`` (set by the test) every ``period_s``, with a small wobble
    of heart rate so every reading differs."""

    def __init__(
        self,
        url: str,
        device_id: str,
        secret: str,
        values: dict[str, float | bool] | None = None,
        period_s: float = 0.5,
    ) -> None:
        self.client = DeviceClient(url, device_id, secret)
        self.values = dict(values or WELL)
        self.period_s = period_s
        self._task: asyncio.Task[None] | None = None

    async def _run(self) -> None:
        n = 0
        while True:
            n += 1
            values = dict(self.values)
            values["hr"] = float(values["hr"]) + n % 3
            self.client.send(values)
            await asyncio.sleep(self.period_s)

    async def __aenter__(self) -> ScriptedDevice:
        await self.client.start()
        self._task = asyncio.create_task(self._run())
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await self.client.close()


async def backfill(url: str, device: dict[str, str], minutes: int = 10, seed: int = 0) -> None:
    """The last ``minutes`` of a simulated patient's readings, sent now with their past device
    times (a spool replayed after an outage: stored and drawn in the trends, never alarmed when
    older than 60 s, docs/protocol.md "Timestamps"), so a screenshot shows a trend."""
    start = time.time() - minutes * 60
    model = PatientModel("normal", rng=random.Random(seed), start_ts=start)
    client = DeviceClient(url, device["device_id"], device["secret"])
    await client.start()
    try:
        for i in range(minutes * 60):
            client.send(model.sample(start + i), ts=start + i)
        await client.flush(timeout=30)
    finally:
        await client.close()


class Ward:
    """Simulated devices (the simulator's physiology and command answers) until the block ends."""

    def __init__(
        self, url: str, devices: Sequence[dict[str, str]], scenario: str = "normal"
    ) -> None:
        self.url = url
        self.devices = [SimDevice(d["device_id"], d["secret"], d["patient_id"]) for d in devices]
        self.scenario = scenario
        self.stop = asyncio.Event()
        self.tasks: list[asyncio.Task[DeviceClient]] = []

    async def __aenter__(self) -> Ward:
        self.tasks = [
            asyncio.create_task(
                run_device(self.url, d, rate_hz=1.0, scenario=self.scenario, seed=i, stop=self.stop)
            )
            for i, d in enumerate(self.devices)
        ]
        return self

    async def finish(self) -> None:
        """Stop measuring and wait until every reading sent is acknowledged (durable)."""
        self.stop.set()
        if self.tasks:
            await asyncio.wait_for(asyncio.gather(*self.tasks), 30)

    async def __aexit__(self, *exc: object) -> None:
        self.stop.set()
        for t in self.tasks:
            if not t.done():
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(asyncio.shield(t), 15)
            if not t.done():
                t.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
