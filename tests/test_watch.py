"""``vitalwire watch`` as a person sees it: a real child process in a real pseudo-terminal, read
through a terminal emulator (pyte), against a real server."""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import re
import signal
import struct
import subprocess
import sys
import termios
import time
from collections.abc import Callable
from pathlib import Path

import pyte
import pytest
from rich.cells import cell_len
from rich.console import Console

from tests.conftest import RunningServer, start_server, stop_server
from tests.netproxy import Proxy
from vitalwire.sdk import DeviceClient
from vitalwire.watch import LAYOUTS, WardView, news2_text

#: Escape sequences a terminal interprets without printing (CSI, OSC, charset and mode switches).
ESCAPES = re.compile(
    rb"\x1b\[[0-?]*[ -/]*[@-~]|\x1b\][^\x07\x1b]*(?:\x07|\x1b\\)|\x1b[()][0-9A-Za-z]|\x1b[=>78]"
)
ESSENTIAL = ("SpO2", "HR", "RR", "BP", "Temp", "NEWS2", "Alerts")
LONG_ID = "ICU-2026-000123"
VITALS = {
    "P001": {"spo2": 93.0, "hr": 101.0, "rr": 21.0, "temp_c": 37.8, "sbp": 118.0, "dbp": 76.0},
    "P002": {"spo2": 97.0, "hr": 64.0, "rr": 14.0, "temp_c": 36.6, "sbp": 131.0, "dbp": 84.0},
    "P003": {"spo2": 95.0, "hr": 77.0, "rr": 16.0, "temp_c": 37.1, "sbp": 104.0, "dbp": 68.0},
}


class Terminal:
    """A command running in a pseudo-terminal of ``cols`` x ``rows``, its screen kept by pyte."""

    def __init__(self, args: list[str], cols: int, rows: int = 40) -> None:
        self.args = args
        self.cols, self.rows = cols, rows
        self.screen = pyte.Screen(cols, rows)
        self.stream = pyte.ByteStream(self.screen)
        self.raw = bytearray()
        self.changed = asyncio.Event()
        self.proc: subprocess.Popen[bytes] | None = None
        self.master = -1

    def start(self) -> None:
        self.master, slave = os.openpty()
        self._winsize(self.cols, self.rows)
        env = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "LINES")}
        env.update(TERM="xterm-256color", PYTHONUTF8="1")
        self.proc = subprocess.Popen(
            self.args, stdin=slave, stdout=slave, stderr=slave, env=env, start_new_session=True
        )
        os.close(slave)
        asyncio.get_running_loop().add_reader(self.master, self._read)

    def _winsize(self, cols: int, rows: int) -> None:
        fcntl.ioctl(self.master, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))

    def _read(self) -> None:
        try:
            data = os.read(self.master, 65536)
        except OSError:  # EIO: the child closed the terminal
            data = b""
        if not data:
            asyncio.get_running_loop().remove_reader(self.master)
            return
        self.raw += data
        self.stream.feed(data)
        self.changed.set()

    def resize(self, cols: int, rows: int = 40) -> None:
        """Resize the terminal as a window manager would; the child gets SIGWINCH."""
        assert self.proc is not None
        self._winsize(cols, rows)
        self.screen.resize(rows, cols)
        self.cols, self.rows = cols, rows
        self.proc.send_signal(signal.SIGWINCH)

    def lines(self) -> list[str]:
        return [line.rstrip() for line in self.screen.display]

    def text(self) -> str:
        return "\n".join(self.lines()).rstrip()

    def row(self, pid: str) -> list[str]:
        """The cells of the screen line that starts with ``pid`` (whitespace-separated)."""
        for line in self.lines():
            if line.split(" ", 1)[0] == pid:
                return line.split()
        return []

    def printed_since(self, mark: int) -> list[str]:
        """Every line the child printed after byte ``mark``, escape sequences removed."""
        text = ESCAPES.sub(b"", bytes(self.raw[mark:])).decode("utf-8", "replace")
        return [seg for line in text.split("\n") for seg in line.split("\r")]

    async def wait_for(self, check: Callable[[], bool], what: str, timeout: float = 20) -> None:
        deadline = time.monotonic() + timeout
        while not check():
            left = deadline - time.monotonic()
            if left <= 0 or (self.proc is not None and self.proc.poll() is not None):
                raise AssertionError(
                    f"{what}: not on the {self.cols}-column screen after {timeout}s "
                    f"(exit {self.proc and self.proc.poll()}):\n{self.text()}"
                )
            self.changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.changed.wait(), left)

    async def close(self) -> int | None:
        """Ctrl-C, as a user ends it; return the exit code."""
        code = None
        if self.proc is not None:
            if self.proc.poll() is None:
                self.proc.send_signal(signal.SIGINT)
            try:
                code = await asyncio.to_thread(self.proc.wait, 20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                await asyncio.to_thread(self.proc.wait, 10)
        if self.master >= 0:
            asyncio.get_running_loop().remove_reader(self.master)
            os.close(self.master)
            self.master = -1
        return code


def watch_args(url: str, srv: RunningServer) -> list[str]:
    user, password = srv.user("clinician")
    return [
        sys.executable, "-m", "vitalwire.cli", "watch",
        "--url", url, "--user", user, "--password", password,
    ]  # fmt: skip


async def send(srv: RunningServer, i: int, values: dict[str, float]) -> None:
    did, secret, _ = srv.device(i)
    async with DeviceClient(srv.url, did, secret) as dev:
        dev.send(values)
        await dev.flush()


def header(term: Terminal) -> list[str]:
    return next((line.split() for line in term.lines() if line.startswith("Patient")), [])


def shows_values(term: Terminal, pid: str, values: dict[str, float]) -> bool:
    row = term.row(pid)
    want = [f"{values['spo2']:.0f}", f"{values['hr']:.0f}", f"{values['rr']:.0f}"]
    want += [f"{values['sbp']:.0f}/{values['dbp']:.0f}", f"{values['temp_c']:.1f}"]
    return all(w in row for w in want)


def assert_fits(term: Terminal, mark: int) -> None:
    printed = term.printed_since(mark)
    assert printed, "nothing printed"
    too_wide = [line for line in printed if cell_len(line) > term.cols]
    assert not too_wide, f"lines wider than {term.cols} columns: {too_wide}"


async def test_watch_fits_80_and_120_columns_and_follows_new_patients(
    server: RunningServer,
) -> None:
    for i, pid in enumerate(VITALS):
        await send(server, i, VITALS[pid])
    term = Terminal(watch_args(server.url, server), cols=80)
    term.start()
    try:
        await term.wait_for(
            lambda: all(shows_values(term, pid, v) for pid, v in VITALS.items()),
            "every patient's snapshot values",
        )
        assert_fits(term, 0)
        narrow = header(term)
        assert set(ESSENTIAL) <= set(narrow), narrow
        assert "live" in term.lines()[0] and "connection lost" not in term.text()

        live = {**VITALS["P002"], "spo2": 89.0, "hr": 118.0}
        await send(server, 1, live)
        await term.wait_for(lambda: shows_values(term, "P002", live), "a live reading")

        term.resize(120)
        await term.wait_for(lambda: len(header(term)) > len(narrow), "the wider layout")
        mark = len(term.raw)
        await term.wait_for(lambda: len(term.raw) > mark and term.row("P003") != [], "a redraw")
        assert_fits(term, mark)
        wide = header(term)
        assert set(ESSENTIAL) <= set(wide) and "Name" in wide, (narrow, wide)
        assert "Ada" in " ".join(term.row("P001"))  # the names the room allows

        # a patient of the clinician's ward created while watch runs, with a device of its own
        svc = server.services
        await svc.registry.create_patient(LONG_ID, "Late Admission", "ward-a")
        cred = await svc.registry.create_device("mon-late", "multiparameter")
        await svc.registry.bind("mon-late", LONG_ID)
        await svc.access.refresh()
        await term.wait_for(lambda: term.row(LONG_ID) != [], "the patient added later")
        late = {"spo2": 91.0, "hr": 99.0, "rr": 23.0, "temp_c": 38.4, "sbp": 97.0, "dbp": 58.0}
        async with DeviceClient(server.url, "mon-late", cred.secret) as dev:
            dev.send(late)
            await dev.flush()
        await term.wait_for(lambda: shows_values(term, LONG_ID, late), "the new patient's values")

        wide = header(term)
        term.resize(80)
        await term.wait_for(
            lambda: set(ESSENTIAL) <= set(header(term)) and len(header(term)) < len(wide),
            "the 80-column layout again",
        )
        mark = len(term.raw)
        await term.wait_for(
            lambda: len(term.raw) > mark and shows_values(term, LONG_ID, late), "a redraw at 80"
        )
        assert_fits(term, mark)
        assert all(shows_values(term, pid, v) for pid, v in {**VITALS, "P002": live}.items())
    finally:
        await term.close()


async def test_watch_says_the_connection_is_lost_and_resumes(tmp_path: Path) -> None:
    srv, task = await start_server(tmp_path)
    proxy = Proxy("127.0.0.1", int(srv.url.rsplit(":", 1)[1]))
    await proxy.start()
    term = Terminal(watch_args(f"http://127.0.0.1:{proxy.port}", srv), cols=120)
    stopped = False
    try:
        await send(srv, 0, VITALS["P001"])
        term.start()
        await term.wait_for(lambda: shows_values(term, "P001", VITALS["P001"]), "P001's values")
        assert "connection lost" not in term.text()

        proxy.cut()
        await term.wait_for(lambda: "connection lost at" in term.text(), "the lost connection")
        assert "retrying" in term.text() and "not live" in term.text()
        assert shows_values(term, "P001", VITALS["P001"])  # the last values stay, marked

        moved = {**VITALS["P001"], "spo2": 86.0, "rr": 26.0}
        await send(srv, 0, moved)  # while the watch is away: the resume replays it
        proxy.restore()
        await term.wait_for(
            lambda: "connection lost" not in term.text() and shows_values(term, "P001", moved),
            "the resumed stream",
        )
        assert "live" in term.lines()[0]

        await stop_server(srv, task)
        stopped = True
        await term.wait_for(lambda: "connection lost at" in term.text(), "the stopped server")
        assert term.proc is not None and term.proc.poll() is None  # it keeps retrying
    finally:
        code = await term.close()
        await proxy.close()
        if not stopped:
            await stop_server(srv, task)
    assert code == 0, term.text()


class ManualClock:
    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now


async def test_watch_drops_a_patient_no_longer_visible(tmp_path: Path) -> None:
    clock = ManualClock()
    srv, task = await start_server(tmp_path, clock=clock)
    svc = srv.services
    await svc.registry.create_patient("Q001", "Other Ward", "ward-b")
    await svc.store.add_grant("clinician", "Q001", "rapid response call", clock.now, clock.now + 60)
    await svc.access.refresh()
    term = Terminal(watch_args(srv.url, srv), cols=80)
    try:
        term.start()
        await term.wait_for(lambda: term.row("Q001") != [] and term.row("P003") != [], "Q001")
        clock.now += 120  # the break-glass grant expires
        await term.wait_for(lambda: term.row("Q001") == [], "Q001 leaving the view")
        assert term.row("P001") != [] and "3 patients" in term.lines()[0]
    finally:
        await term.close()
        await stop_server(srv, task)


@pytest.mark.parametrize(
    ("news2", "shown"),
    [
        (None, "–"),
        ({"total": 7, "band": "high"}, "7 high"),
        ({"total": 5, "band": "medium", "complete": True, "display": "5, medium"}, "5, medium"),
        (
            {"total": 2, "band": "incomplete", "complete": False, "display": "≥ 2, incomplete"},
            "≥ 2, incomplete",
        ),
        ({"total": 2, "band": "incomplete", "complete": False}, "≥ 2, incomplete"),
        ({"total": 0, "band": "low", "complete": False}, "≥ 0, incomplete"),
    ],
)
def test_news2_cell_shows_the_display_and_never_low_when_incomplete(
    news2: dict[str, object] | None, shown: str
) -> None:
    assert news2_text(news2) == shown


def _ward(ids: list[str]) -> WardView:
    view = WardView([{"id": pid, "name": f"Patient {pid}"} for pid in ids])
    for i, pid in enumerate(ids):
        vitals = {k: {"value": v} for k, v in VITALS["P001"].items()} | {
            "pulse": {"value": 100.0},
            "pi": {"value": 2.5},
            "battery": {"value": 77.0},
        }
        view.start(
            pid,
            3,
            {
                "vitals": vitals,
                "devices": {f"mon-{i:03d}": {"status": "online"}},
                "alerts": [
                    {
                        "alert_id": "a",
                        "priority": "high",
                        "condition": "spo2_low",
                        "state": "active",
                        "raised_at": 1.0,
                    }
                ],
                "news2": {"total": 3, "band": "incomplete", "display": "≥ 3, incomplete"},
            },
        )
    return view


@pytest.mark.parametrize("width", [70, 80, 100, 120, 160, 200])
def test_table_fits_the_width_and_keeps_whole_ids(width: int) -> None:
    ids = ["P001", LONG_ID, "ward-b-bed-07"]
    view = _ward(ids)
    console = Console(width=width, record=True, file=open(os.devnull, "w"))  # noqa: SIM115
    with console.file:
        console.print(view.render(width))
    lines = console.export_text().splitlines()
    assert all(cell_len(line) <= width for line in lines), lines
    assert {line.split()[0] for line in lines[2:] if line and not line[0].isspace()} == set(ids)
    head = lines[1].split()
    assert set(ESSENTIAL) <= set(head), head


def test_a_wider_terminal_shows_more_columns() -> None:
    view = _ward(["P001", "P002"])
    widths = [len(view.table(w).columns) for w in (80, 120, 200)]
    assert widths[0] < widths[1] < widths[2] == len(view.table().columns)
    assert view.table(10_000).columns[1].header == "Name" and len(LAYOUTS) > 1


async def test_monitor_reports_its_connection_and_forgets_unsubscribed_streams(
    server: RunningServer,
) -> None:
    from vitalwire.sdk import MonitorClient

    proxy = Proxy("127.0.0.1", int(server.url.rsplit(":", 1)[1]))
    await proxy.start()
    user, password = server.user("clinician")
    changes: list[bool] = []
    seen = asyncio.Event()
    monitor = MonitorClient(
        f"http://127.0.0.1:{proxy.port}", username=user, password=password, backoff_max_s=0.5
    )
    try:
        await monitor.connect()
        assert monitor.connected
        monitor.on_connection = lambda up: (changes.append(up), seen.set())
        await monitor.subscribe(["patient:P001", "patient:P002"])
        await monitor.unsubscribe(["patient:P001"])
        proxy.cut()
        await asyncio.wait_for(seen.wait(), 10)
        assert changes == [False] and not monitor.connected
        seen.clear()
        proxy.restore()
        await asyncio.wait_for(seen.wait(), 10)
        assert changes == [False, True] and monitor.connected
        await send(server, 0, VITALS["P001"])  # P001: no longer followed
        await send(server, 1, VITALS["P002"])
        event = await monitor.next_event()
        while event.kind != "reading":
            event = await monitor.next_event()
        assert event.stream == "patient:P002" and "patient:P001" not in monitor.offsets
    finally:
        await monitor.close()
        await proxy.close()
