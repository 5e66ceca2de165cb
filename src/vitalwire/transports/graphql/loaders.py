"""DataLoaders: a ward-wide query makes a bounded number of store queries whatever its size.

Patients and devices are each read with one store call per request (every id asked for in the
request is answered from it); a patient's latest vitals, NEWS2, device status and open alerts
come from the live picture the server keeps per stream (what ``/ws`` sends as its snapshot on
subscribe), with no store query at all.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from strawberry.dataloader import DataLoader

from vitalwire.core import events as ev

if TYPE_CHECKING:
    from vitalwire.services.container import Services


def live_picture(svc: Services, pid: str) -> dict[str, Any]:
    """The live picture of ``pid``'s stream (vitals, devices, open alerts, NEWS2) as of its last
    published event; the empty picture for a stream with no event yet. No store query."""
    state = svc.streams.picture(ev.patient_stream(pid))
    if state is None:
        return {"vitals": {}, "devices": {}, "alerts": [], "news2": None}
    return state.snapshot()


class Loaders:
    """The loaders of one GraphQL request (their caches live as long as it)."""

    def __init__(self, svc: Services) -> None:
        self.svc = svc
        self.patient = DataLoader(self._patients)
        self.device = DataLoader(self._devices)

    async def _patients(self, ids: list[str]) -> list[dict[str, Any] | None]:
        by_id = {p["id"]: p for p in await self.svc.store.list_patients()}
        return [by_id.get(i) for i in ids]

    async def _devices(self, ids: list[str]) -> list[dict[str, Any] | None]:
        by_id = {d["id"]: d for d in await self.svc.store.list_devices()}
        return [by_id.get(i) for i in ids]
