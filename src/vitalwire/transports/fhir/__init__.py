"""FHIR R4, read-only, at ``/fhir``: :mod:`.mapping` (pure row -> resource functions, the
LOINC/UCUM table) and :mod:`.routes` (the APIRouter)."""

from vitalwire.transports.fhir.routes import router

__all__ = ["router"]
