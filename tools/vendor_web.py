"""Refresh the web app's vendored libraries (Preact, htm, uPlot) from npm, at pinned versions.

Usage: python tools/vendor_web.py      (or: make web-vendor)

Runs `npm pack NAME@VERSION` for each library (npm checks each tarball's integrity against the
registry's), takes only the ES modules the app imports, their stylesheet and their licences,
and writes them to src/vitalwire/web/vendor/ with a VERSIONS file. The app runs with no build
step: the one bare import in these files (Preact's hooks import "preact") is rewritten to the
relative path of the vendored file, so no import map is needed. To move to another version,
change PACKAGES here, run it, and run the browser tests (tests/test_web*.py).
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

#: npm package, version, and (file in the tarball, name in vendor/) pairs.
PACKAGES: tuple[tuple[str, str, tuple[tuple[str, str], ...]], ...] = (
    (
        "preact",
        "10.29.8",
        (
            ("dist/preact.module.js", "preact.module.js"),
            ("hooks/dist/hooks.module.js", "preact-hooks.module.js"),
            ("LICENSE", "LICENSE-preact"),
        ),
    ),
    ("htm", "3.1.1", (("dist/htm.module.js", "htm.module.js"), ("LICENSE", "LICENSE-htm"))),
    (
        "uplot",
        "1.6.32",
        (
            ("dist/uPlot.esm.js", "uPlot.esm.js"),
            ("dist/uPlot.min.css", "uPlot.min.css"),
            ("LICENSE", "LICENSE-uplot"),
        ),
    ),
)

#: Bare import specifiers and the vendored file each one means.
REWRITES = {
    'from"preact"': 'from"./preact.module.js"',
    "from 'preact'": "from './preact.module.js'",
}

DEST = Path(__file__).resolve().parent.parent / "src" / "vitalwire" / "web" / "vendor"


def vendor(dest: Path = DEST) -> None:
    npm = shutil.which("npm")
    if npm is None:
        sys.exit("npm not found on PATH: install Node.js (with npm) to refresh the web libraries")
    dest.mkdir(parents=True, exist_ok=True)
    lines = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, version, files in PACKAGES:
            out = subprocess.run(
                [npm, "pack", f"{name}@{version}", "--pack-destination", tmp, "--silent"],
                check=True,
                capture_output=True,
                text=True,
            )
            tarball = Path(tmp) / out.stdout.strip().splitlines()[-1]
            with tarfile.open(tarball) as tar:
                for inside, target in files:
                    member = tar.extractfile(f"package/{inside}")
                    if member is None:
                        sys.exit(f"{name}@{version} has no {inside}")
                    data = member.read()
                    if target.endswith(".js"):
                        text = data.decode()
                        for bare, local in REWRITES.items():
                            text = text.replace(bare, local)
                        data = text.encode()
                    (dest / target).write_bytes(data)
            lines.append(f"{name} {version}")
    (dest / "VERSIONS").write_text("\n".join(lines) + "\n")
    print(f"{', '.join(lines)} -> {dest}")


if __name__ == "__main__":
    vendor()
