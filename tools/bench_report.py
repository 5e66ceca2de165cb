"""Plot p99 latency against delivered events/s from `vitalwire bench --saturate --json` files.

Usage: python tools/bench_report.py docs/bench/saturation.json docs/bench/saturation.png
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def main(src: str, dst: str) -> None:
    rows = json.loads(Path(src).read_text())
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for row in rows:
        steps = row.get("steps") or [
            {"delivered_per_s": row["delivered_per_s"], "p99_ms": row["latency_ms"]["p99"]}
        ]
        ax.plot(
            [s["delivered_per_s"] for s in steps],
            [s["p99_ms"] for s in steps],
            marker="o",
            label=row["target"],
        )
    ax.axhline(50, color="grey", linestyle="--", linewidth=0.8, label="p99 bound 50 ms")
    ax.set_xlabel("delivered events/s")
    ax.set_ylabel("p99 end-to-end latency (ms)")
    ax.set_yscale("log")
    ax.set_title("vitalwire vs references, same load, same run")
    ax.legend()
    fig.tight_layout()
    fig.savefig(dst, dpi=120)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
