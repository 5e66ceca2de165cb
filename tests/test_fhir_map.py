"""FHIR mapping (transports/fhir/mapping.py), table-driven: every resource it makes validates with
the fhir.resources R4B models; ids round-trip; FHIR dates parse to their precision ranges."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest
from fhir.resources.R4B.bundle import Bundle
from fhir.resources.R4B.capabilitystatement import CapabilityStatement
from fhir.resources.R4B.device import Device
from fhir.resources.R4B.observation import Observation
from fhir.resources.R4B.operationoutcome import OperationOutcome
from fhir.resources.R4B.patient import Patient

from vitalwire.core.metrics import METRIC_BY_NAME, VITAL_NAMES
from vitalwire.transports.fhir import mapping as fm

T = 1_764_950_400.123456  # 2025-12-05T16:00:00.123456Z


def _item(values: dict[str, float], **extra: Any) -> dict[str, Any]:
    return {
        "offset": 42,
        "ts": T,
        "measured": T - 0.5,
        "device": "mon-001",
        "values": values,
    } | extra


@pytest.mark.parametrize(
    ("values", "keys"),
    [
        ({"hr": 72.0}, ["hr"]),  # one metric
        ({"spo2": 97.0, "pulse": 71.0, "hr": 72.0, "rr": 16.0}, ["spo2", "hr", "pulse", "rr"]),
        ({"sbp": 120.0, "dbp": 80.0}, ["bp"]),  # the panel
        ({"sbp": 120.0}, ["bp"]),  # a panel missing diastolic
        ({"dbp": 0.0}, ["bp"]),  # ... and systolic; a zero value
        ({"temp_c": 36.6, "spo2": 100.0}, ["spo2", "temp"]),
        ({"temp_c": 10.0, "rr": 150.0, "hr": 350.0, "spo2": 0.0}, ["spo2", "hr", "rr", "temp"]),
        ({"hr": 60.5, "pi": 3.0, "battery": 50.0}, ["hr"]),  # signal quality is no vital sign
        ({}, []),
    ],
)
def test_observations_of_a_reading_validate_as_r4b(
    values: dict[str, float], keys: list[str]
) -> None:
    got = fm.observations("P001", _item(values))
    assert [o["id"].rsplit("-", 1)[1] for o in got] == keys
    for o in got:
        obs = Observation.model_validate(o)
        assert obs.status == "final" and obs.category[0].coding[0].code == "vital-signs"
        assert o["id"].startswith("P001-42-") and fm.FHIR_ID_RE.fullmatch(o["id"])
        assert o["subject"] == {"reference": "Patient/P001"}
        assert o["device"] == {"reference": "Device/mon-001"}
        assert o["issued"] == o["meta"]["lastUpdated"] == "2025-12-05T16:00:00.123456Z"
        assert o["effectiveDateTime"].startswith("2025-12-05T15:59:59.62345")  # the device's
        vital = fm.VITAL_BY_KEY[o["id"].rsplit("-", 1)[1]]
        assert [c["code"] for c in o["code"]["coding"]] == [c.code for c in vital.codes]
        if vital.key == "bp":
            comps = {c["code"]["coding"][0]["code"]: c for c in o["component"]}
            for metric, code in (("sbp", "8480-6"), ("dbp", "8462-4")):
                if metric in values:
                    q = comps[code]["valueQuantity"]
                    assert q == {
                        "value": values[metric],
                        "unit": "mm[Hg]",
                        "system": fm.UCUM,
                        "code": "mm[Hg]",
                    }
                else:
                    assert "valueQuantity" not in comps[code]
                    assert comps[code]["dataAbsentReason"]["coding"][0]["code"] == "not-performed"
        else:
            (metric,) = vital.metrics
            assert o["valueQuantity"]["value"] == values[metric]
            assert o["valueQuantity"]["code"] == METRIC_BY_NAME[metric].unit


def test_the_table_covers_every_vital_metric_with_its_loinc_code_and_unit() -> None:
    covered = {m for v in fm.VITALS for m in v.metrics}
    assert covered == set(VITAL_NAMES)
    for v in fm.VITALS:
        for m, comp in zip(v.metrics, v.components or v.codes[:1], strict=False):
            assert METRIC_BY_NAME[m].unit == v.unit
            assert comp.code in METRIC_BY_NAME[m].loinc
    assert fm.VITAL_BY_CODE["59408-5"] is fm.VITAL_BY_CODE["2708-6"] is fm.VITAL_BY_KEY["spo2"]
    assert fm.VITAL_BY_CODE["85354-9"].key == "bp"


def test_a_reading_without_device_time_uses_the_receive_time() -> None:
    (o,) = fm.observations("P001", _item({"rr": 12.0}, measured=None, device=None))
    Observation.model_validate(o)
    assert o["effectiveDateTime"] == o["issued"] and "device" not in o


@pytest.mark.parametrize(
    "vid", ["P001", "a", "bed.1", "ward_a-bed_2", "x" * 64, "._._", "a..u", "-0-"]
)
def test_ids_escape_reversibly_into_fhir_ids(vid: str) -> None:
    fid = fm.fhir_id(vid)
    assert set(fid) <= set("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-.")
    assert fm.vitalwire_id(fid) == vid
    oid = fm.observation_id(vid, 7, "bp")
    assert fm.parse_observation_id(oid) == (vid, 7, "bp")


@pytest.mark.parametrize("oid", ["P001", "P001-x-hr", "P001-1-zz", "P.x-1-hr", "-1-hr", "P-1"])
def test_foreign_observation_ids_are_not_ours(oid: str) -> None:
    assert fm.parse_observation_id(oid) is None


def _epoch(*args: int, micro: int = 0) -> float:
    return datetime(*args, microsecond=micro, tzinfo=UTC).timestamp()


@pytest.mark.parametrize(
    ("text", "start", "end"),
    [
        ("2026", _epoch(2026, 1, 1), _epoch(2027, 1, 1)),
        ("2026-12", _epoch(2026, 12, 1), _epoch(2027, 1, 1)),
        ("2026-02", _epoch(2026, 2, 1), _epoch(2026, 3, 1)),
        ("2026-12-05", _epoch(2026, 12, 5), _epoch(2026, 12, 6)),
        ("2026-12-05T10:00Z", _epoch(2026, 12, 5, 10), _epoch(2026, 12, 5, 10, 1)),
        ("2026-12-05T10:00:05Z", _epoch(2026, 12, 5, 10, 0, 5), _epoch(2026, 12, 5, 10, 0, 6)),
        ("2026-12-05T12:00:05+02:00", _epoch(2026, 12, 5, 10, 0, 5), _epoch(2026, 12, 5, 10, 0, 6)),
        (
            "2026-12-05T10:00:05.25Z",
            _epoch(2026, 12, 5, 10, 0, 5, micro=250000),
            _epoch(2026, 12, 5, 10, 0, 5, micro=260000),
        ),
    ],
)
def test_dates_parse_to_their_precision_range(text: str, start: float, end: float) -> None:
    got = fm.parse_date(text)
    assert got == pytest.approx((start, end), abs=1e-6)


@pytest.mark.parametrize(
    "text", ["", "yesterday", "2026-13-01", "2026-12-05T10:00:00", "2026-12-05 10:00Z", "1e9"]
)
def test_bad_dates_are_refused(text: str) -> None:
    with pytest.raises(ValueError, match="date"):
        fm.parse_date(text)


@pytest.mark.parametrize("ts", [T, 1e9, 946_684_800.0, 1_764_950_400.999999, 1_764_950_400.0000001])
def test_an_instant_is_within_the_range_it_parses_back_to(ts: float) -> None:
    start, end = fm.parse_date(fm.instant(ts))
    assert start <= ts < end


@pytest.mark.parametrize(
    "row",
    [
        {"id": "P001", "name": "Ada Lovelace", "ward": "ward-a", "created_at": T},
        {"id": "P_2", "name": "B", "ward": "w", "created_at": T, "discharged_at": T + 60},
    ],
)
def test_patients_validate(row: dict[str, Any]) -> None:
    p = Patient.model_validate(fm.patient(row))
    assert p.active is (row.get("discharged_at") is None)
    assert p.identifier[0].value == row["id"] and fm.vitalwire_id(p.id) == row["id"]


@pytest.mark.parametrize("bound", ["P001", None])
@pytest.mark.parametrize("disabled", [False, True])
def test_devices_validate(bound: str | None, disabled: bool) -> None:
    row = {"id": "mon-001", "kind": "monitor", "disabled": disabled, "created_at": T}
    d = Device.model_validate(fm.device(row, bound))
    assert d.status == ("inactive" if disabled else "active")
    assert (d.patient.reference if d.patient else None) == (bound and f"Patient/{bound}")


def test_bundle_outcome_and_capability_statement_validate() -> None:
    obs = fm.observations("P001", _item({"hr": 70.0, "sbp": 110.0, "dbp": 70.0}))
    b = fm.bundle(obs, "http://x/fhir", "http://x/fhir/Observation?patient=P001", "http://x/n", 2)
    parsed = Bundle.model_validate(b)
    assert parsed.type == "searchset" and len(parsed.entry) == 2
    assert [link.relation for link in parsed.link] == ["self", "next"]
    Bundle.model_validate(fm.bundle([], "http://x/fhir", "http://x/fhir/Observation", None))
    for code in fm.ISSUE_TYPE:
        oo = OperationOutcome.model_validate(fm.operation_outcome(code, "m", "date"))
        assert oo.issue[0].details.coding[0].code == code
    cs = CapabilityStatement.model_validate(
        fm.capability_statement("http://x/fhir", "2026-12-05", "1")
    )
    assert {r.type for r in cs.rest[0].resource} == {"Patient", "Device", "Observation"}
