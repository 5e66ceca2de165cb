"""``vitalwire watch``: a live terminal view of patients' vitals and device status (rich).

The first client a user sees: it logs in, subscribes to every patient's stream through
:class:`vitalwire.sdk.MonitorClient`, starts from the snapshots and applies each event with the same
fold the server uses (:class:`vitalwire.core.state.PatientState`).

How it works: one asyncio loop runs three things. The event consumer folds every event into a
:class:`WardView`. The poller re-reads ``GET /patients`` every few seconds (and at once after a
reconnect): a patient that became visible is subscribed to, one that is no longer visible leaves
the view. The painter redraws the view twice a second, on a reconnection or a drop, and when the
terminal is resized (SIGWINCH); each redraw lays the table out for the terminal's width at that
moment (:meth:`WardView.table`), dropping and merging the less important columns first. When the
connection drops (:attr:`MonitorClient.on_connection`) the view says so at once and marks every
value as not live; the client resumes by offset and the banner goes.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import signal
import ssl as ssl_module
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import httpx
import jwt
from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.table import Table
from rich.text import Text

from vitalwire.core import events as ev
from vitalwire.core.state import PatientState
from vitalwire.sdk import tls
from vitalwire.sdk.errors import ConnectFailed, LoginRefused, RequestError, connect_reason
from vitalwire.sdk.monitor import MonitorClient, login

#: Seconds between two reads of the patient list (``GET /patients``).
POLL_S = 5.0
#: Seconds between two redraws when nothing else asks for one.
REDRAW_S = 0.5

#: The vitals columns, most important first: (key, header, short header). ``bp`` is sbp/dbp.
COLUMNS = (
    ("spo2", "SpO2 %", "SpO2"),
    ("pulse", "Pulse", "PR"),
    ("hr", "HR", "HR"),
    ("rr", "RR", "RR"),
    ("bp", "BP mmHg", "BP"),
    ("temp_c", "Temp °C", "Temp"),
    ("pi", "PI %", "PI"),
    ("battery", "Batt %", "Batt"),
)


@dataclass(frozen=True, slots=True)
class Layout:
    """Which columns a table shows and how: the widest first, each step drops or merges one."""

    name: bool = True
    pi: bool = True
    battery: bool = True
    updated: bool = True
    #: ``"ids"`` (each device with its status), ``"status"`` (the statuses only) or ``None``
    device: str | None = "ids"
    #: one ``HR`` column (ECG heart rate, else the oximeter's pulse) instead of Pulse and HR
    merge_hr: bool = False
    short: bool = False


#: The layouts tried in turn until one fits the terminal's width. SpO2, heart rate, RR, BP,
#: temperature, NEWS2 and the alerts are in every one; so is the whole patient id.
LAYOUTS: tuple[Layout, ...] = (
    Layout(),
    Layout(device="status"),
    Layout(device="status", pi=False),
    Layout(device="status", pi=False, short=True),
    Layout(device="status", pi=False, short=True, merge_hr=True),
    Layout(device="status", pi=False, short=True, merge_hr=True, battery=False),
    Layout(device="status", pi=False, short=True, merge_hr=True, battery=False, name=False),
    Layout(
        device="status", pi=False, short=True, merge_hr=True, battery=False, name=False,
        updated=False,
    ),
    Layout(
        device=None, pi=False, short=True, merge_hr=True, battery=False, name=False,
        updated=False,
    ),
)  # fmt: skip


def news2_text(news2: dict[str, Any] | None) -> str:
    """The NEWS2 cell: the server's ``display`` when it has one, else ``"total band"``; a score
    with parameters missing reads as a lower bound, never as "low"."""
    if news2 is None:
        return "–"
    display = news2.get("display")
    if display:
        return str(display)
    total, band = news2.get("total"), news2.get("band")
    if news2.get("complete") is False or band == "incomplete":
        return f"≥ {total}, incomplete"
    return f"{total} {band}"


class WardView:
    """The state of every watched patient, folded from snapshots and events."""

    def __init__(
        self, patients: list[dict[str, Any]], clock: Callable[[], float] = time.time
    ) -> None:
        self.patients = {p["id"]: p for p in patients}
        self.states: dict[str, PatientState] = {pid: PatientState() for pid in self.patients}
        self.updated: dict[str, float] = {}
        self.events = 0
        self.clock = clock
        #: False from the moment the connection drops until the client has resumed.
        self.live = True
        #: When the connection dropped (while :attr:`live` is False).
        self.lost_at: float | None = None

    def start(self, pid: str, offset: int, snapshot: dict[str, Any]) -> None:
        self.states[pid] = PatientState.from_snapshot(offset, snapshot)

    def apply(self, pid: str, offset: int, kind: str, ts: float, data: dict[str, Any]) -> None:
        if pid not in self.patients:
            return  # a late event of a patient that left the view
        self.states.setdefault(pid, PatientState()).apply(offset, kind, ts, data)
        self.updated[pid] = self.clock()
        self.events += 1

    def set_patients(self, patients: Iterable[dict[str, Any]]) -> tuple[list[str], list[str]]:
        """Follow the patient list: return the ids added and the ids removed."""
        fresh = {p["id"]: p for p in patients}
        added = sorted(pid for pid in fresh if pid not in self.patients)
        removed = sorted(pid for pid in self.patients if pid not in fresh)
        self.patients = fresh
        for pid in removed:
            self.states.pop(pid, None)
            self.updated.pop(pid, None)
        for pid in added:
            self.states.setdefault(pid, PatientState())
        return added, removed

    def connection(self, up: bool) -> None:
        """The client's connection went up (resumed) or down."""
        if up:
            self.live, self.lost_at = True, None
        elif self.live:
            self.live, self.lost_at = False, self.clock()

    def banner(self) -> Text:
        """The line above the table: the ward's summary, or the lost connection in red."""
        if not self.live and self.lost_at is not None:
            at = time.strftime("%H:%M:%S", time.localtime(self.lost_at))
            return Text(
                f"connection lost at {at}, retrying… values below are not live",
                style="bold white on red",
            )
        return Text(f"vitalwire — {len(self.patients)} patients, {self.events} events, live")

    def render(self, width: int | None = None) -> RenderableType:
        """The banner and the table laid out for ``width`` columns."""
        return Group(self.banner(), self.table(width))

    def table(self, width: int | None = None) -> Table:
        """The table for a terminal ``width`` columns wide: the widest layout that fits (every
        layout when ``width`` is None); the last layout when none does."""
        if width is None:
            return self._table(LAYOUTS[0])
        measure = Console(width=10_000, file=io.StringIO(), color_system=None)
        table = self._table(LAYOUTS[-1])
        for layout in LAYOUTS:
            candidate = self._table(layout)
            if measure.measure(candidate).maximum <= width:
                return candidate
        return table

    def _table(self, layout: Layout) -> Table:
        table = Table(box=None, padding=(0, 1), pad_edge=False, header_style="bold underline")
        ids = sorted(self.states)
        table.add_column("Patient", no_wrap=True, min_width=max([len("Patient"), *map(len, ids)]))
        if layout.name:
            table.add_column("Name", overflow="fold")
        keys = self._keys(layout)
        for key, long, short in COLUMNS:
            if key in keys:
                header = (
                    "HR" if key == "hr" and layout.merge_hr else (short if layout.short else long)
                )
                table.add_column(header, justify="right", no_wrap=True)
        table.add_column("NEWS2", justify="right")
        table.add_column("Alerts", overflow="fold")
        if layout.device is not None:
            table.add_column("Device" if not layout.short else "Dev", overflow="fold")
        if layout.updated:
            table.add_column("Updated" if not layout.short else "Age", justify="right")
        now = self.clock()
        for pid in ids:
            table.add_row(*self._row(pid, layout, keys, now))
        return table

    @staticmethod
    def _keys(layout: Layout) -> list[str]:
        keys = [key for key, _, _ in COLUMNS]
        if not layout.pi:
            keys.remove("pi")
        if not layout.battery:
            keys.remove("battery")
        if layout.merge_hr:
            keys.remove("pulse")
        return keys

    def _row(self, pid: str, layout: Layout, keys: list[str], now: float) -> list[str]:
        st = self.states[pid]
        v = {k: x.get("value") for k, x in st.vitals.items()}
        stale = "" if self.live else "[dim]"
        cells = []
        for key in keys:
            if key == "bp":
                sbp, dbp = v.get("sbp"), v.get("dbp")
                text = f"{sbp:.0f}/{dbp:.0f}" if sbp is not None and dbp is not None else "–"
            elif key == "hr" and layout.merge_hr:
                text = _fmt(v.get("hr") if v.get("hr") is not None else v.get("pulse"))
            else:
                text = _fmt(v.get(key))
            if key == "spo2" and v.get("probe") is False:
                text = "[yellow]probe off[/yellow]"
            cells.append(f"{stale}{text}")
        news2 = f"{stale}{_escape(news2_text(st.news2))}"
        row = [pid]
        if layout.name:
            row.append(_escape(str(self.patients.get(pid, {}).get("name", ""))))
        row += [*cells, news2, self._alerts(st), *self._device_and_age(pid, st, layout, now)]
        return row

    def _alerts(self, st: PatientState) -> str:
        open_alerts = st.open_alerts()
        if not open_alerts:
            return "–" if self.live else "[dim]–[/]"
        top = open_alerts[0]
        colour = {"high": "bold red", "medium": "yellow"}.get(top["priority"], "cyan")
        if not self.live:
            colour = "dim"
        more = f" (+{len(open_alerts) - 1})" if len(open_alerts) > 1 else ""
        ack = " ✓" if top.get("state") == "acknowledged" else ""
        return f"[{colour}]{top['priority']}: {top['condition']}{ack}[/]{more}"

    def _device_and_age(self, pid: str, st: PatientState, layout: Layout, now: float) -> list[str]:
        out = []

        def status(s: str) -> str:
            colour = "dim" if not self.live else ("green" if s == "online" else "red")
            return f"[{colour}]{s}[/]"

        if layout.device == "ids":
            out.append(
                ", ".join(f"{d}:{status(x['status'])}" for d, x in sorted(st.devices.items()))
                or "–"
            )
        elif layout.device == "status":
            states = sorted({x["status"] for x in st.devices.values()})
            out.append(", ".join(status(s) for s in states) or "–")
        if layout.updated:
            age = now - self.updated[pid] if pid in self.updated else None
            out.append("–" if age is None else f"{age:.0f}s")
        return out


def _escape(text: str) -> str:
    return text.replace("[", r"\[")


def _fmt(x: Any) -> str:
    if x is None:
        return "–"
    if isinstance(x, float) and not x.is_integer():
        return f"{x:.1f}"
    return f"{x:.0f}" if isinstance(x, (int, float)) else str(x)


def _renew_at(token: str, now: float) -> float | None:
    """When to log in again: at 80 % of the access token's life (None: it does not say)."""
    try:
        claims = jwt.decode(token, options={"verify_signature": False})
    except jwt.PyJWTError:
        return None
    exp = claims.get("exp")
    if not isinstance(exp, (int, float)):
        return None
    iat = claims.get("iat")
    start = float(iat) if isinstance(iat, (int, float)) else now
    return start + 0.8 * (float(exp) - start)


class _Ward:
    """The REST side of a watch: the patient list, and a fresh token before the old expires."""

    def __init__(
        self,
        http: httpx.AsyncClient,
        url: str,
        user: str,
        password: str,
        token: str,
        patient_ids: list[str] | None,
        ssl: ssl_module.SSLContext | None,
    ) -> None:
        self.http = http
        self.url = url
        self.user = user
        self.password = password
        self.token = token
        self.patient_ids = patient_ids
        self.ssl = ssl
        self.renew_at = _renew_at(token, time.time())

    async def patients(self) -> list[dict[str, Any]]:
        """``GET /patients``, filtered by the ids asked for; one new login on a 401.

        Raises:
            ConnectFailed: the server cannot be reached.
            RequestError: the server refused (code and message from its answer).
        """
        if self.renew_at is not None and time.time() >= self.renew_at:
            await self.relogin()
        r = await self._get()
        if r.status_code == 401:
            await self.relogin()
            r = await self._get()
        if r.status_code != 200:
            try:
                body = r.json()
                code, message = str(body["code"]), str(body["message"])
            except (ValueError, KeyError, TypeError):
                code, message = str(r.status_code), r.reason_phrase
            raise RequestError(code, f"GET /patients: {message}")
        wanted = self.patient_ids
        return [p for p in r.json() if wanted is None or p["id"] in wanted]

    async def _get(self) -> httpx.Response:
        try:
            return await self.http.get(
                "/patients", headers={"Authorization": f"Bearer {self.token}"}
            )
        except httpx.TransportError as exc:
            raise ConnectFailed(str(self.http.base_url), connect_reason(exc)) from exc

    async def relogin(self) -> None:
        self.token = await login(self.url, self.user, self.password, self.ssl)
        self.renew_at = _renew_at(self.token, time.time())


async def _follow(monitor: MonitorClient, view: WardView, patients: list[dict[str, Any]]) -> None:
    """Make the view and the subscriptions follow ``patients``."""
    added, removed = view.set_patients(patients)
    if removed:
        await monitor.unsubscribe([ev.patient_stream(pid) for pid in removed])
    if added:
        streams = [ev.patient_stream(pid) for pid in added]
        try:
            starts = await monitor.subscribe(streams)
        except BaseException:
            # not followed after all: the next poll tries again
            view.set_patients(p for p in patients if p["id"] not in added)
            with contextlib.suppress(Exception):
                await monitor.unsubscribe(streams)
            raise
        for stream, start in starts.items():
            pid = ev.stream_patient(stream)
            if pid is not None and pid in view.patients:
                view.start(pid, start.offset, start.snapshot or {})


async def run_watch(
    url: str,
    user: str,
    password: str,
    patient_ids: list[str] | None,
    *,
    once: bool = False,
    console: Console | None = None,
    ssl: ssl_module.SSLContext | None = None,
    poll_s: float = POLL_S,
) -> WardView:
    """Watch the patients ``user`` may see (only ``patient_ids`` when given) until cancelled.

    Raises what :func:`login` raises for a wrong password or an unreachable server, and
    ``PermissionError`` when a later login or resume is refused.
    """
    console = console or Console()
    token = await login(url, user, password, ssl)
    verify = ssl if ssl is not None else tls.client_context()
    base = url.rstrip("/").removesuffix("/ws").replace("ws://", "http://")
    base = base.replace("wss://", "https://")
    async with httpx.AsyncClient(base_url=base, timeout=10, verify=verify) as http:
        ward = _Ward(http, url, user, password, token, patient_ids, ssl)
        patients = await ward.patients()
        for pid in patient_ids or []:  # asked for by name: one the user cannot see is an error
            if pid not in {p["id"] for p in patients}:
                raise RequestError("not_found", f"patient {pid} does not exist")
        view = WardView([])
        async with MonitorClient(url, token=ward.token, ssl=ssl) as monitor:
            await _follow(monitor, view, patients)
            if once:
                console.print(view.render(console.width))
                return view
            await _live(monitor, view, ward, console, poll_s)
    return view


async def _live(
    monitor: MonitorClient, view: WardView, ward: _Ward, console: Console, poll_s: float
) -> None:
    redraw = asyncio.Event()
    repoll = asyncio.Event()

    def on_connection(up: bool) -> None:
        view.connection(up)
        redraw.set()
        if up:
            repoll.set()

    monitor.on_connection = on_connection
    view.connection(monitor.connected)
    loop = asyncio.get_running_loop()
    resize = getattr(signal, "SIGWINCH", None)
    if resize is not None:
        with contextlib.suppress(ValueError, RuntimeError, NotImplementedError):
            loop.add_signal_handler(resize, redraw.set)

    async def consume() -> None:
        async for e in monitor.events():
            pid = ev.stream_patient(e.stream)
            if pid is not None:
                view.apply(pid, e.offset, e.kind, e.ts, e.data)

    async def poll() -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(repoll.wait(), poll_s)
            repoll.clear()
            if not monitor.connected:
                continue  # the banner says so; the reconnection polls at once
            try:
                patients = await ward.patients()
                monitor.token = ward.token  # a resume authenticates with the fresh token
                await _follow(monitor, view, patients)
            except LoginRefused:
                raise  # the password no longer works: end the watch with that message
            except (TimeoutError, ConnectionError, OSError, ValueError):
                continue  # the connection is going down (the banner shows it), or a refusal
            redraw.set()

    with Live(
        view.render(console.width), console=console, auto_refresh=False, transient=False
    ) as live:

        async def paint() -> None:
            while True:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(redraw.wait(), REDRAW_S)
                redraw.clear()
                live.update(view.render(console.width), refresh=True)

        tasks = [asyncio.create_task(f()) for f in (consume, poll, paint)]
        try:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
            for task in done:
                task.result()  # re-raise what ended the watch
        finally:
            monitor.on_connection = None
            for task in tasks:
                task.cancel()
            for task in tasks:
                with contextlib.suppress(BaseException):
                    await task
            if resize is not None:
                with contextlib.suppress(ValueError, RuntimeError, NotImplementedError):
                    loop.remove_signal_handler(resize)
