"""Alarm burden: recorded vitals replayed through the alert engine versus a naive monitor.

:func:`burden` replays the rows of one BIDMC numerics file (:func:`vitalwire.simulator.read_bidmc`,
one row per second) through :class:`vitalwire.core.alerts.PatientAlerts` with the default limits
and delays, calling ``tick`` every second, and counts the alerts raised per condition. Against it
stands the naive rule of a monitor without alarm condition delay, hysteresis or signal-quality
checks: it alarms whenever a reading is past a limit. A naive monitor's alarm starts when the value
crosses the limit and stops when it comes back, so one *contiguous excursion* past a limit (one
reading or many in a row) is one alarm; this is how alarm-burden studies count alarms (Lansdowne et
al., BMC Nursing 2016;15:36; Welch, Biomed Instrum Technol 2011;45(s1):46-52). The number of
readings past a limit (alarm-seconds at 1 Hz) is reported too. A missing value (sensor off) ends an
excursion. The naive rule uses the same limits table; like a monitor's separate "low" and "desat"
alarms, an excursion past a critical limit is an alarm of its own.

``vitalwire alarms-report DIR`` calls :func:`report` and prints :func:`render_markdown`; so does
``python -m vitalwire.alarms_report [DIR]``.

The recordings are from the BIDMC PPG and Respiration Dataset v1.0.0 (PhysioNet, ODC-By 1.0); see
:mod:`vitalwire.simulator` for the citations. They are engineering test material, not clinical
ground truth.
"""

from __future__ import annotations

import math
import os
import sys
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from vitalwire.core.alerts import PHYSIOLOGICAL, AlertChange, PatientAlerts
from vitalwire.core.limits import DEFAULT_LIMITS, Limits
from vitalwire.simulator import read_bidmc

#: Names the folder of recordings when none is given (default: ``data/bidmc`` of the working
#: directory, where a clone keeps the five BIDMC records it ships).
VITALS_DIR_ENV = "VITALWIRE_VITALS_DIR"


def default_recordings() -> Path:
    """``$VITALWIRE_VITALS_DIR``, else ``data/bidmc`` (run from the repository's folder)."""
    return Path(os.environ.get(VITALS_DIR_ENV) or Path("data") / "bidmc")


#: Device id used for the replayed recording.
REPLAY_DEVICE = "replay"


def burden(
    rows: Sequence[Mapping[str, float | bool]], limits: Limits | None = None
) -> dict[str, Any]:
    """Replay one recording through the engine and the naive rule.

    Args:
        rows: rows of :func:`~vitalwire.simulator.read_bidmc` (``t`` in seconds, metrics, probe).
        limits: the limits both use (default adult limits).

    Returns:
        A JSON-ready dict: ``seconds`` (duration), ``alerts`` (condition -> alerts raised by the
        engine), ``high_priority`` (condition -> alerts raised at, or raised to, high priority),
        ``physiological`` / ``technical`` / ``news2`` (alerts raised per kind; ``physiological``
        counts limit alerts only, NEWS2 alerts are ``news2``), ``naive`` (condition -> naive
        alarms, one per contiguous excursion past the limit and one per excursion past the
        critical limit), ``naive_readings`` (condition -> readings past the limit), and
        ``naive_total``.
    """
    limits = limits if limits is not None else DEFAULT_LIMITS
    engine = PatientAlerts("replay", limits)
    changes: list[AlertChange] = []
    last_tick: float | None = None
    for row in rows:
        t = float(row["t"])
        if last_tick is not None:
            # tick each whole second of a gap between rows
            step = last_tick + 1
            while step < t:
                changes += _alerts(engine.tick(step))
                step += 1
        values = {k: v for k, v in row.items() if k != "t"}
        changes += _alerts(engine.on_reading(t, REPLAY_DEVICE, values))
        changes += _alerts(engine.tick(t))
        last_tick = t

    raised = Counter(c.condition for c in changes if c.action == "raised")
    high = Counter(
        c.condition
        for c in changes
        if c.priority == "high" and c.action in ("raised", "priority_changed")
    )
    kinds: Counter[str] = Counter()
    for c in changes:
        if c.action != "raised":
            continue
        if c.condition.startswith("news2_"):
            kinds["news2"] += 1
        elif c.category == PHYSIOLOGICAL:
            kinds["physiological"] += 1
        else:
            kinds["technical"] += 1

    naive: Counter[str] = Counter()
    naive_readings: Counter[str] = Counter()
    inside: dict[tuple[str, str], bool] = {}
    for row in rows:
        for lim in limits:
            value = row.get(lim.metric)
            if value is None or isinstance(value, bool) or math.isnan(value):
                value = None
            for direction in ("low", "high"):
                condition = f"{lim.metric}_{direction}"
                critical = lim.critical_low if direction == "low" else lim.critical_high
                for level, limit in (("limit", lim.limit(direction)), ("critical", critical)):
                    past = (
                        value is not None
                        and limit is not None
                        and (value < limit if direction == "low" else value > limit)
                    )
                    if past and level == "limit":
                        naive_readings[condition] += 1
                    if past and not inside.get((condition, level)):
                        naive[condition] += 1
                    inside[(condition, level)] = past

    seconds = float(rows[-1]["t"]) - float(rows[0]["t"]) + 1 if rows else 0.0
    return {
        "seconds": seconds,
        "alerts": dict(sorted(raised.items())),
        "high_priority": dict(sorted(high.items())),
        "physiological": kinds["physiological"],
        "technical": kinds["technical"],
        "news2": kinds["news2"],
        "naive": dict(sorted(naive.items())),
        "naive_readings": dict(sorted(naive_readings.items())),
        "naive_total": sum(naive.values()),
    }


def _alerts(changes: Sequence[object]) -> list[AlertChange]:
    return [c for c in changes if isinstance(c, AlertChange)]


def report(folder: str | Path, limits: Limits | None = None) -> list[dict[str, Any]]:
    """:func:`burden` of every ``*.csv`` recording in ``folder``, sorted by file name.

    Returns:
        One dict per file: ``{"file": name, **burden(...)}``.

    Raises:
        FileNotFoundError: ``folder`` is not a directory.
        ValueError: a file is not a BIDMC numerics file (naming the file and line).
    """
    path = Path(folder)
    if not path.is_dir():
        raise FileNotFoundError(f"{folder}: not a directory")
    return [
        {"file": file.name, **burden(read_bidmc(file), limits)}
        for file in sorted(path.glob("*.csv"))
    ]


def _counts(counts: Mapping[str, int]) -> str:
    return ", ".join(f"{name} {n}" for name, n in counts.items()) or "-"


def render_markdown(rows: Sequence[Mapping[str, Any]]) -> str:
    """A Markdown table of :func:`report` rows, one line per file and a total line."""
    head = (
        "| recording | s | naive alarms | readings past a limit | limit alerts (high) "
        "| technical alerts | NEWS2 alerts | alerts by condition |\n"
        "|---|---:|---:|---:|---:|---:|---:|---|\n"
    )
    lines = []
    total_alerts: Counter[str] = Counter()
    totals: Counter[str] = Counter()
    for row in rows:
        readings = sum(row["naive_readings"].values())
        high = sum(row["high_priority"].values())
        lines.append(
            f"| {row['file']} | {row['seconds']:g} | {row['naive_total']} | {readings} "
            f"| {row['physiological']} ({high}) | {row['technical']} | {row['news2']} "
            f"| {_counts(row['alerts'])} |"
        )
        total_alerts.update(row["alerts"])
        totals.update(
            {
                "seconds": int(row["seconds"]),
                "naive": row["naive_total"],
                "readings": readings,
                "physiological": row["physiological"],
                "high": high,
                "technical": row["technical"],
                "news2": row["news2"],
            }
        )
    lines.append(
        f"| **total** | {totals['seconds']} | {totals['naive']} | {totals['readings']} "
        f"| {totals['physiological']} ({totals['high']}) | {totals['technical']} "
        f"| {totals['news2']} | {_counts(dict(sorted(total_alerts.items())))} |"
    )
    return head + "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m vitalwire.alarms_report [DIR]`` (default: :func:`default_recordings`)."""
    args = list(sys.argv[1:] if argv is None else argv)
    folder = Path(args[0]) if args else default_recordings()
    print(render_markdown(report(folder)), end="")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
