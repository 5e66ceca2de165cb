"""Pure mapping from vitalwire's rows and events to FHIR R4 JSON (dicts): no I/O, no access.

The codes follow the FHIR R4 vital-signs profile (http://hl7.org/fhir/R4/observation-vitalsigns.html):
category ``vital-signs``, LOINC codes, UCUM units. :data:`VITALS` is that table, one row per
kind of Observation vitalwire makes; each row names the vitalwire metrics it is made of.

Ids: FHIR ids match ``[A-Za-z0-9\\-.]{1,64}``; vitalwire ids may also hold ``_``. :func:`fhir_id`
escapes reversibly (``.`` -> ``.d``, ``_`` -> ``.u``), so ``P001`` stays ``P001``. An Observation
is one metric (or the blood-pressure panel) of one reading: its id is
``<patient>-<offset>-<key>`` (the reading's offset on the patient's stream, the row's ``key``),
stable for ever since stream events are immutable.

Times: ``effectiveDateTime`` is the device's measurement time (the reading's ``ts``), ``issued``
and ``meta.lastUpdated`` the server's receive time (the event's ``ts``, what searches by ``date``
match). Instants are written to the microsecond, truncated (never rounded up), so a search bound
copied from a resource includes it.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Final

#: FHIR R4 id pattern.
FHIR_ID_RE: Final = re.compile(r"[A-Za-z0-9\-.]{1,64}")
LOINC: Final = "http://loinc.org"
UCUM: Final = "http://unitsofmeasure.org"
CATEGORY_SYSTEM: Final = "http://terminology.hl7.org/CodeSystem/observation-category"
DATA_ABSENT_SYSTEM: Final = "http://terminology.hl7.org/CodeSystem/data-absent-reason"
PROFILE: Final = "http://hl7.org/fhir/StructureDefinition/"
#: Identifier systems for vitalwire's own ids, and for its error codes in an OperationOutcome.
PATIENT_SYSTEM: Final = "urn:vitalwire:patient"
DEVICE_SYSTEM: Final = "urn:vitalwire:device"
ERROR_SYSTEM: Final = "urn:vitalwire:error"
#: The FHIR version the resources follow (R4; they also validate as R4B).
FHIR_VERSION: Final = "4.0.1"
_EPOCH: Final = datetime(1970, 1, 1, tzinfo=UTC)


@dataclass(frozen=True, slots=True)
class Coding:
    code: str
    display: str


@dataclass(frozen=True, slots=True)
class Vital:
    """One kind of vital-signs Observation (FHIR R4 vital-signs profile, table "Vital Signs")."""

    key: str  # the last part of the Observation id
    metrics: tuple[str, ...]  # the vitalwire metrics it is made of
    codes: tuple[Coding, ...]  # Observation.code.coding, the profile's code first
    unit: str  # UCUM
    profile: str  # the vital-signs profile it conforms to
    components: tuple[Coding, ...] = ()  # the panel's components, one per metric


#: Source: FHIR R4 vital-signs profile, http://hl7.org/fhir/R4/observation-vitalsigns.html, and
#: LOINC (loinc.org) for the displays. Pulse by oximetry (8889-8) is a heart rate measured by
#: another method: it is coded as itself, under the generic profile, so ``code=8867-4`` finds the
#: ECG heart rate only.
VITALS: Final[tuple[Vital, ...]] = (
    Vital(
        "spo2",
        ("spo2",),
        (
            Coding("59408-5", "Oxygen saturation in Arterial blood by Pulse oximetry"),
            Coding("2708-6", "Oxygen saturation in Arterial blood"),
        ),
        "%",
        "oxygensat",
    ),
    Vital("hr", ("hr",), (Coding("8867-4", "Heart rate"),), "/min", "heartrate"),
    Vital("pulse", ("pulse",), (Coding("8889-8", "Heart rate by Pulse oximetry"),), "/min", ""),
    Vital("rr", ("rr",), (Coding("9279-1", "Respiratory rate"),), "/min", "resprate"),
    Vital("temp", ("temp_c",), (Coding("8310-5", "Body temperature"),), "Cel", "bodytemp"),
    Vital(
        "bp",
        ("sbp", "dbp"),
        (Coding("85354-9", "Blood pressure panel with all children optional"),),
        "mm[Hg]",
        "bp",
        (Coding("8480-6", "Systolic blood pressure"), Coding("8462-4", "Diastolic blood pressure")),
    ),
)
VITAL_BY_KEY: Final[dict[str, Vital]] = {v.key: v for v in VITALS}
#: A LOINC code (of Observation.code) -> the Observation kind it names.
VITAL_BY_CODE: Final[dict[str, Vital]] = {c.code: v for v in VITALS for c in v.codes}


# -- ids and times ---------------------------------------------------------------------------


def fhir_id(vid: str) -> str:
    """A vitalwire id as a FHIR id (reversible: :func:`vitalwire_id`)."""
    return vid.replace(".", ".d").replace("_", ".u")


def vitalwire_id(fid: str) -> str | None:
    """The vitalwire id a FHIR id names, or None when :func:`fhir_id` cannot have made it."""
    out: list[str] = []
    i = 0
    while i < len(fid):
        ch = fid[i]
        if ch == ".":
            nxt = fid[i + 1 : i + 2]
            if nxt not in ("d", "u"):
                return None
            out.append("." if nxt == "d" else "_")
            i += 2
        else:
            out.append(ch)
            i += 1
    return "".join(out)


def observation_id(pid: str, offset: int, key: str) -> str:
    return f"{fhir_id(pid)}-{offset}-{key}"


def parse_observation_id(oid: str) -> tuple[str, int, str] | None:
    """(patient id, offset, key) of an Observation id, or None when it is not one of ours."""
    parts = oid.rsplit("-", 2)
    if len(parts) != 3 or not parts[1].isdigit() or parts[2] not in VITAL_BY_KEY:
        return None
    pid = vitalwire_id(parts[0])
    if not pid or len(parts[1]) > 19:
        return None
    return pid, int(parts[1]), parts[2]


def instant(ts: float) -> str:
    """Epoch seconds as a FHIR instant in UTC, truncated to the microsecond."""
    micros = math.floor(ts * 1_000_000)
    return (_EPOCH + timedelta(microseconds=micros)).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


_DATE_RE: Final = re.compile(
    r"(?P<y>\d{4})(?:-(?P<m>\d{2})(?:-(?P<d>\d{2})"
    r"(?:T(?P<H>\d{2}):(?P<M>\d{2})(?::(?P<S>\d{2})(?:\.(?P<f>\d{1,9}))?)?"
    r"(?P<tz>Z|[+-]\d{2}:\d{2}))?)?)?"
)


def parse_date(text: str) -> tuple[float, float]:
    """A FHIR date/dateTime/instant as the range it covers: (start, end) epoch seconds, ``end``
    exclusive. ``2026-12-05`` is that day (UTC), ``...T10:00:00Z`` that second, ``...T10:00:00.25Z``
    that hundredth: FHIR's implicit precision ranges (http://hl7.org/fhir/R4/search.html#date).
    A time needs a zone (``Z`` or ``+hh:mm``).

    Raises:
        ValueError: not a FHIR date, naming what is wrong.
    """
    m = _DATE_RE.fullmatch(text)
    if m is None:
        raise ValueError(
            f"{text!r:.60} is not a FHIR date (YYYY, YYYY-MM, YYYY-MM-DD or "
            "YYYY-MM-DDThh:mm[:ss[.fff]] with Z or +hh:mm)"
        )
    g = m.groupdict()
    y, mo, d = int(g["y"]), int(g["m"] or 1), int(g["d"] or 1)
    try:
        if g["H"] is None:
            start = datetime(y, mo, d, tzinfo=UTC)
            if g["d"]:
                end = start + timedelta(days=1)
            elif g["m"]:
                end = datetime(y + mo // 12, mo % 12 + 1, 1, tzinfo=UTC)
            else:
                end = datetime(y + 1, 1, 1, tzinfo=UTC)
            return start.timestamp(), end.timestamp()
        tz = g["tz"]
        offset = 0 if tz == "Z" else (1 if tz[0] == "+" else -1) * (int(tz[1:3]) * 60 + int(tz[4:]))
        local = datetime(y, mo, d, int(g["H"]), int(g["M"]), int(g["S"] or 0), tzinfo=UTC)
    except ValueError as exc:
        raise ValueError(f"{text!r:.60} is not a valid date: {exc}") from None
    base = (local - _EPOCH).total_seconds() - offset * 60
    if g["f"] is not None:
        digits = g["f"]
        return base + int(digits) / 10 ** len(digits), base + (int(digits) + 1) / 10 ** len(digits)
    width = 60.0 if g["S"] is None else 1.0
    return base, base + width


# -- resources ----------------------------------------------------------------------------------


def patient(row: Mapping[str, Any]) -> dict[str, Any]:
    """A vitalwire patient row (``id``, ``name``, ``ward``, ``created_at``, ``discharged_at``)."""
    discharged = row.get("discharged_at")
    updated = max(row.get("created_at") or 0.0, discharged or 0.0)
    return {
        "resourceType": "Patient",
        "id": fhir_id(row["id"]),
        "meta": {"lastUpdated": instant(updated)},
        "identifier": [{"system": PATIENT_SYSTEM, "value": row["id"]}],
        "active": discharged is None,
        "name": [{"text": row["name"]}],
    }


def device(row: Mapping[str, Any], patient_id: str | None) -> dict[str, Any]:
    """A vitalwire device row (``id``, ``kind``, ``disabled``) and the patient it is bound to."""
    out: dict[str, Any] = {
        "resourceType": "Device",
        "id": fhir_id(row["id"]),
        "identifier": [{"system": DEVICE_SYSTEM, "value": row["id"]}],
        "status": "inactive" if row.get("disabled") else "active",
        "type": {"text": row.get("kind") or "monitor"},
    }
    if patient_id is not None:
        out["patient"] = {"reference": f"Patient/{fhir_id(patient_id)}"}
    return out


def _quantity(value: float, unit: str) -> dict[str, Any]:
    return {"value": value, "unit": unit, "system": UCUM, "code": unit}


def _concept(codes: Sequence[Coding]) -> dict[str, Any]:
    return {
        "coding": [{"system": LOINC, "code": c.code, "display": c.display} for c in codes],
        "text": codes[0].display,
    }


def observation(
    pid: str,
    offset: int,
    received: float,
    measured: float | None,
    device_id: str | None,
    values: Mapping[str, float],
    vital: Vital,
) -> dict[str, Any] | None:
    """The Observation of ``vital`` in one reading, or None when the reading has none of its
    metrics. A panel missing one of its components gives that component a dataAbsentReason."""
    present = [m for m in vital.metrics if values.get(m) is not None]
    if not present:
        return None
    profiles = [PROFILE + "vitalsigns"]
    if vital.profile:
        profiles.append(PROFILE + vital.profile)
    obs: dict[str, Any] = {
        "resourceType": "Observation",
        "id": observation_id(pid, offset, vital.key),
        "meta": {"lastUpdated": instant(received), "profile": profiles},
        "status": "final",
        "category": [
            {
                "coding": [
                    {"system": CATEGORY_SYSTEM, "code": "vital-signs", "display": "Vital Signs"}
                ],
                "text": "Vital Signs",
            }
        ],
        "code": _concept(vital.codes),
        "subject": {"reference": f"Patient/{fhir_id(pid)}"},
        "effectiveDateTime": instant(received if measured is None else measured),
        "issued": instant(received),
    }
    if device_id:
        obs["device"] = {"reference": f"Device/{fhir_id(device_id)}"}
    if vital.components:
        comps = []
        for metric, coding in zip(vital.metrics, vital.components, strict=True):
            comp: dict[str, Any] = {"code": _concept((coding,))}
            v = values.get(metric)
            if v is None:
                comp["dataAbsentReason"] = {
                    "coding": [{"system": DATA_ABSENT_SYSTEM, "code": "not-performed"}]
                }
            else:
                comp["valueQuantity"] = _quantity(v, vital.unit)
            comps.append(comp)
        obs["component"] = comps
    else:
        obs["valueQuantity"] = _quantity(values[vital.metrics[0]], vital.unit)
    return obs


def observations(
    pid: str, item: Mapping[str, Any], vitals: Iterable[Vital] = VITALS
) -> list[dict[str, Any]]:
    """The Observations of one raw history item (services/history.py: ``offset``, ``ts``,
    ``measured``, ``device``, ``values``), in :data:`VITALS` order."""
    out = []
    for vital in vitals:
        obs = observation(
            pid,
            item["offset"],
            item["ts"],
            item.get("measured"),
            item.get("device"),
            item["values"],
            vital,
        )
        if obs is not None:
            out.append(obs)
    return out


def bundle(
    entries: Sequence[dict[str, Any]],
    base: str,
    self_url: str,
    next_url: str | None,
    total: int | None = None,
) -> dict[str, Any]:
    """A ``searchset`` Bundle of ``entries`` (resources) with ``self`` and ``next`` links."""
    links = [{"relation": "self", "url": self_url}]
    if next_url is not None:
        links.append({"relation": "next", "url": next_url})
    out: dict[str, Any] = {"resourceType": "Bundle", "type": "searchset"}
    if total is not None:
        out["total"] = total
    out["link"] = links
    out["entry"] = [
        {
            "fullUrl": f"{base}/{r['resourceType']}/{r['id']}",
            "resource": r,
            "search": {"mode": "match"},
        }
        for r in entries
    ]
    return out


#: The project's error code -> the FHIR issue type (http://hl7.org/fhir/R4/valueset-issue-type.html).
ISSUE_TYPE: Final[dict[str, str]] = {
    "invalid_message": "invalid",
    "invalid_reading": "invalid",
    "bad_request": "invalid",
    "not_supported": "not-supported",
    "frame_too_large": "too-long",
    "unauthenticated": "login",
    "auth_timeout": "login",
    "forbidden": "forbidden",
    "not_found": "not-found",
    "method_not_allowed": "not-supported",
    "conflict": "conflict",
    "rate_limited": "throttled",
    "unavailable": "transient",
    "internal": "exception",
}


def operation_outcome(code: str, message: str, field: str | None) -> dict[str, Any]:
    """An error as an OperationOutcome: the project's code in ``details.coding`` (system
    ``urn:vitalwire:error``), its message in ``diagnostics`` and ``details.text``, the parameter
    or field in ``expression``."""
    issue: dict[str, Any] = {
        "severity": "error",
        "code": ISSUE_TYPE.get(code, "processing"),
        "details": {"coding": [{"system": ERROR_SYSTEM, "code": code}], "text": message},
        "diagnostics": message,
    }
    if field:
        issue["expression"] = [field]
    return {"resourceType": "OperationOutcome", "issue": [issue]}


def capability_statement(base: str, date: str, software_version: str) -> dict[str, Any]:
    """What /fhir implements, exactly (read-only, JSON)."""

    def param(name: str, kind: str, doc: str) -> dict[str, Any]:
        return {"name": name, "type": kind, "documentation": doc}

    count = param("_count", "number", "page size, 1..1000, default 100")
    updated = param("_lastUpdated", "date", "prefixes ge, gt, le, lt, eq (or none)")
    return {
        "resourceType": "CapabilityStatement",
        "status": "active",
        "date": date,
        "kind": "instance",
        "software": {"name": "vitalwire", "version": software_version},
        "implementation": {"description": "vitalwire FHIR R4 (read-only)", "url": base},
        "fhirVersion": FHIR_VERSION,
        "format": ["json"],
        "rest": [
            {
                "mode": "server",
                "security": {
                    "description": "Authorization: Bearer <access token> from POST /auth/login; "
                    "care-team scoping (an out-of-team patient is not found); every read audited"
                },
                "resource": [
                    {
                        "type": "Patient",
                        "interaction": [{"code": "read"}, {"code": "search-type"}],
                        "searchParam": [
                            param("_id", "token", "the patient id"),
                            param("active", "token", "true: admitted, false: discharged"),
                            updated,
                            count,
                        ],
                        "operation": [
                            {
                                "name": "everything",
                                "definition": "http://hl7.org/fhir/OperationDefinition/"
                                "Patient-everything",
                            }
                        ],
                    },
                    {
                        "type": "Device",
                        "interaction": [{"code": "read"}, {"code": "search-type"}],
                        "searchParam": [
                            param("_id", "token", "device ids, comma-separated"),
                            param("patient", "reference", "bound now to Patient/<id>"),
                            count,
                        ],
                    },
                    {
                        "type": "Observation",
                        "profile": PROFILE + "vitalsigns",
                        "interaction": [{"code": "read"}, {"code": "search-type"}],
                        "searchParam": [
                            param("patient", "reference", "required: Patient/<id> or <id>"),
                            param("subject", "reference", "the same as patient"),
                            param("code", "token", "LOINC codes, comma-separated (OR)"),
                            param(
                                "date",
                                "date",
                                "the receive time (issued); prefixes ge, gt, le, lt, eq",
                            ),
                            updated,
                            count,
                        ],
                    },
                ],
            }
        ],
    }
