"""Who may do what: one policy table, read by one function, for every surface.

A user's *care* covers the patients of the wards they belong to and the patients assigned to them
individually. Break-glass gives a clinician time-limited, audited access to a patient outside
their care — enough to view, acknowledge and record observations in an emergency, but not the
commands that change the device itself (``reset``, ``silence``), which stay with the care team.
Admins manage the system and may act on every patient.
"""

from __future__ import annotations

from typing import Final

VIEW: Final = "view"  # subscribe, snapshot, limits, alert history
ACKNOWLEDGE: Final = "acknowledge"
SET_LIMITS: Final = "set_limits"
OBSERVE: Final = "observe"  # NEWS2 observations
COMMAND: Final = "command"
COMMAND_CARE: Final = "command_care"  # reset, silence: the patient must be in the user's care
BREAK_GLASS: Final = "break_glass"
READ_AUDIT: Final = "read_audit"
MANAGE: Final = "manage"  # patients, devices, users, bindings, care teams

#: action -> (roles allowed, whether break-glass access counts as care for it)
POLICY: Final[dict[str, tuple[frozenset[str], bool]]] = {
    VIEW: (frozenset({"admin", "clinician", "viewer"}), True),
    ACKNOWLEDGE: (frozenset({"admin", "clinician"}), True),
    SET_LIMITS: (frozenset({"admin", "clinician"}), False),
    OBSERVE: (frozenset({"admin", "clinician"}), True),
    COMMAND: (frozenset({"admin", "clinician"}), True),
    COMMAND_CARE: (frozenset({"admin", "clinician"}), False),
    BREAK_GLASS: (frozenset({"clinician"}), False),
    READ_AUDIT: (frozenset({"admin"}), False),
    MANAGE: (frozenset({"admin"}), False),
}

#: Actions that concern one patient (the others are system-wide).
PATIENT_ACTIONS: Final = frozenset(
    {VIEW, ACKNOWLEDGE, SET_LIMITS, OBSERVE, COMMAND, COMMAND_CARE, BREAK_GLASS}
)


def decide(role: str, action: str, *, in_care: bool, break_glass: bool) -> tuple[bool, str]:
    """Allow or deny; the reason names what is missing.

    Args:
        role: admin, clinician or viewer.
        action: a key of :data:`POLICY`.
        in_care: the patient is in the user's wards or assigned to them.
        break_glass: the user holds an active break-glass grant for the patient.
    """
    roles, glass_counts = POLICY[action]
    if role not in roles:
        return False, f"role {role} may not {action.replace('_', ' ')}"
    if role == "admin" or action not in PATIENT_ACTIONS:
        return True, ""
    if action == BREAK_GLASS:
        return (not in_care, "the patient is already in your care" if in_care else "")
    if in_care or (break_glass and glass_counts):
        return True, ""
    if break_glass:
        return False, f"{action.replace('_', ' ')} needs the patient in your care (not break-glass)"
    return False, "the patient is not in your care (break-glass with a reason to open it)"
