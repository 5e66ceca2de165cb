"""REST: a patient's vitals history (``GET /patients/{id}/vitals``), raw or in buckets.

A thin adapter over :class:`vitalwire.services.history.History`: validation, access checks and
audit live there. docs/api.md ("Vitals history") documents the route.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Query, Request
from pydantic import BaseModel, Field

from vitalwire.services.auth import Principal
from vitalwire.transports.errors import ErrorBody
from vitalwire.transports.paging import DEFAULT_PAGE, MAX_PAGE, Page
from vitalwire.transports.rest import PatientId, _origin, principal, services

router = APIRouter()


class VitalPoint(BaseModel):
    """One reading: the server's receive time and offset, the device and its own timestamp."""

    ts: float
    offset: int
    device: str | None = None
    measured: float | None = None
    values: dict[str, float]
    late: bool = False


class MetricStats(BaseModel):
    min: float
    max: float
    mean: float
    count: int
    last: float


class Bucket(BaseModel):
    """The readings with ``start <= ts < start + bucket`` (and in ``[from, to)``); only metrics
    that had a value."""

    start: float
    metrics: dict[str, MetricStats]


class Gap(BaseModel):
    """A device_status event in the range: ``offline`` starts a gap, ``online`` ends it."""

    ts: float
    offset: int
    device: str | None = None
    status: str | None = None
    reason: str | None = None


class Vitals(Page[VitalPoint]):
    """Raw points (``items``, paged by ``next_cursor``) or, with ``bucket``, ``buckets``."""

    patient_id: str
    from_: float = Field(serialization_alias="from")
    to: float
    metrics: list[str]
    bucket: float | None = Field(
        None,
        description="the bucket width used: a request of 60 s or more is rounded up to a "
        "multiple of 60 s (and up until the range makes at most 2,000 buckets)",
    )
    alignment: str | None = Field(
        None,
        description='"from": buckets start at from + k*bucket; "epoch": at multiples of '
        "bucket (epoch seconds), the first and last clipped to [from, to)",
    )
    buckets: list[Bucket] | None = None
    gaps: list[Gap]


_ERRORS: dict[int | str, dict[str, object]] = {
    401: {"model": ErrorBody, "description": "no or bad bearer token"},
    403: {"model": ErrorBody, "description": "the patient is not in the caller's care"},
    404: {"model": ErrorBody, "description": "no such patient"},
    422: {"model": ErrorBody, "description": "a parameter out of its bounds (field named)"},
}


@router.get(
    "/patients/{patient_id}/vitals",
    response_model=Vitals,
    response_model_by_alias=True,
    responses=_ERRORS,
)
async def patient_vitals(
    patient_id: PatientId,
    request: Request,
    who: Annotated[Principal, Depends(principal)],
    from_: Annotated[
        float | None, Query(alias="from", description="epoch s; default: `to` - 1 h")
    ] = None,
    to: Annotated[float | None, Query(description="epoch s (exclusive); default: now")] = None,
    metrics: Annotated[
        str | None, Query(max_length=200, description="comma-separated metric codes; default all")
    ] = None,
    bucket: Annotated[
        float | None, Query(description="bucket width in s (1 s..range, <= 2,000 buckets)")
    ] = None,
    cursor: Annotated[str | None, Query(max_length=512)] = None,
    limit: Annotated[int, Query(ge=1, le=MAX_PAGE)] = DEFAULT_PAGE,
) -> Vitals:
    """A patient's readings in ``[from, to)``: raw (a page of at most ``limit`` points, ordered by
    time, with ``next_cursor``) or, with ``bucket``, downsampled (min, max, mean, count and last
    per metric); and the device offline/online markers in the range (``gaps``)."""
    svc = services(request)
    chosen = [m.strip() for m in metrics.split(",") if m.strip()] if metrics else None
    r = await svc.history.vitals(
        who, patient_id, from_, to, chosen, bucket, cursor, limit, _origin(request)
    )
    return Vitals(
        items=[VitalPoint(**p) for p in r.items],
        next_cursor=r.next_cursor,
        patient_id=r.patient_id,
        from_=r.t_from,
        to=r.t_to,
        metrics=r.metrics,
        bucket=r.bucket,
        alignment=r.alignment,
        buckets=None if r.buckets is None else [Bucket(**b) for b in r.buckets],
        gaps=[Gap(**g) for g in r.gaps],
    )


__all__ = ["router"]
