"""``vitalwire watch``: a live terminal view of patients' vitals and device status (rich).

The first client a user sees: it logs in, subscribes to every patient's stream through
:class:`vitalwire.sdk.MonitorClient`, starts from the snapshots and applies each event with the same
fold the server uses (:class:`vitalwire.core.state.PatientState`).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import Any

import httpx
from rich.console import Console
from rich.live import Live
from rich.table import Table

from vitalwire.core import events as ev
from vitalwire.core.state import PatientState
from vitalwire.sdk.monitor import MonitorClient, login

COLUMNS = (
    ("SpO2 %", "spo2"),
    ("Pulse", "pulse"),
    ("HR", "hr"),
    ("RR", "rr"),
    ("Temp °C", "temp_c"),
    ("BP mmHg", "bp"),
    ("PI %", "pi"),
    ("Batt %", "battery"),
)


class WardView:
    """The state of every watched patient, folded from snapshots and events."""

    def __init__(self, patients: list[dict[str, Any]]) -> None:
        self.patients = {p["id"]: p for p in patients}
        self.states: dict[str, PatientState] = {pid: PatientState() for pid in self.patients}
        self.updated: dict[str, float] = {}
        self.events = 0

    def start(self, pid: str, offset: int, snapshot: dict[str, Any]) -> None:
        self.states[pid] = PatientState.from_snapshot(offset, snapshot)

    def apply(self, pid: str, offset: int, kind: str, ts: float, data: dict[str, Any]) -> None:
        self.states.setdefault(pid, PatientState()).apply(offset, kind, ts, data)
        self.updated[pid] = time.time()
        self.events += 1

    def table(self) -> Table:
        table = Table(title=f"vitalwire — {len(self.patients)} patients, {self.events} events")
        table.add_column("Patient")
        table.add_column("Name")
        for title, _ in COLUMNS:
            table.add_column(title, justify="right")
        table.add_column("NEWS2", justify="right")
        table.add_column("Alerts")
        table.add_column("Device")
        table.add_column("Updated", justify="right")
        now = time.time()
        for pid in sorted(self.states):
            st = self.states[pid]
            v = {k: x.get("value") for k, x in st.vitals.items()}
            cells = []
            for _, key in COLUMNS:
                if key == "bp":
                    sbp, dbp = v.get("sbp"), v.get("dbp")
                    cells.append(
                        f"{sbp:.0f}/{dbp:.0f}" if sbp is not None and dbp is not None else "–"
                    )
                else:
                    cells.append(_fmt(v.get(key)))
            if v.get("probe") is False:
                cells[0] = "[yellow]probe off[/yellow]"
            devices = (
                ", ".join(
                    f"{d}:{'[green]' if x['status'] == 'online' else '[red]'}{x['status']}[/]"
                    for d, x in sorted(st.devices.items())
                )
                or "–"
            )
            age = now - self.updated[pid] if pid in self.updated else None
            news2 = "–" if st.news2 is None else f"{st.news2['total']} {st.news2['band']}"
            open_alerts = st.open_alerts()
            alerts = "–"
            if open_alerts:
                top = open_alerts[0]
                colour = {"high": "bold red", "medium": "yellow"}.get(top["priority"], "cyan")
                more = f" (+{len(open_alerts) - 1})" if len(open_alerts) > 1 else ""
                ack = " ✓" if top.get("state") == "acknowledged" else ""
                alerts = f"[{colour}]{top['priority']}: {top['condition']}{ack}[/]{more}"
            table.add_row(
                pid,
                self.patients.get(pid, {}).get("name", ""),
                *cells,
                news2,
                alerts,
                devices,
                "–" if age is None else f"{age:.0f}s",
            )
        return table


def _fmt(x: Any) -> str:
    if x is None:
        return "–"
    if isinstance(x, float) and not x.is_integer():
        return f"{x:.1f}"
    return f"{x:.0f}" if isinstance(x, (int, float)) else str(x)


async def run_watch(
    url: str,
    user: str,
    password: str,
    patient_ids: list[str] | None,
    *,
    once: bool = False,
    console: Console | None = None,
) -> WardView:
    console = console or Console()
    token = await login(url, user, password)
    async with httpx.AsyncClient(base_url=url.rstrip("/"), timeout=10) as http:
        r = await http.get("/patients", headers={"Authorization": f"Bearer {token}"})
        r.raise_for_status()
        patients = [p for p in r.json() if patient_ids is None or p["id"] in patient_ids]
    view = WardView(patients)
    async with MonitorClient(url, token=token) as monitor:
        streams = [ev.patient_stream(p["id"]) for p in patients]
        if streams:
            starts = await monitor.subscribe(streams)
            for stream, start in starts.items():
                pid = ev.stream_patient(stream)
                if pid is not None:
                    view.start(pid, start.offset, start.snapshot or {})
        if once:
            console.print(view.table())
            return view
        with Live(view.table(), console=console, refresh_per_second=4) as live:

            async def refresh() -> None:
                while True:
                    await asyncio.sleep(0.5)
                    live.update(view.table())

            ticker = asyncio.create_task(refresh())
            try:
                async for e in monitor.events():
                    pid = ev.stream_patient(e.stream)
                    if pid is not None:
                        view.apply(pid, e.offset, e.kind, e.ts, e.data)
            finally:
                ticker.cancel()
                with contextlib.suppress(BaseException):
                    await ticker
    return view
