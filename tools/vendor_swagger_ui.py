"""Refresh the vendored Swagger UI (the viewer at /docs) from npm, at the pinned version.

Usage: python tools/vendor_swagger_ui.py [VERSION]      (or: make web-vendor)

Runs `npm pack swagger-ui-dist@VERSION` (npm checks the tarball's integrity against the
registry's), takes only the files the app serves and their licences, and writes them to
src/vitalwire/static/swagger-ui/ with a VERSION file. To move to another version, change
SWAGGER_UI_VERSION here, run it, and check /docs in a browser.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

SWAGGER_UI_VERSION = "5.35.0"

#: What the app serves (bundle, stylesheet, icon) and the licences that travel with them.
FILES = (
    "swagger-ui-bundle.js",
    "swagger-ui.css",
    "favicon-32x32.png",
    "LICENSE",
    "NOTICE",
    "swagger-ui-bundle.js.LICENSE.txt",
)

DEST = Path(__file__).resolve().parent.parent / "src" / "vitalwire" / "static" / "swagger-ui"


def vendor(version: str, dest: Path = DEST) -> None:
    npm = shutil.which("npm")
    if npm is None:
        sys.exit("npm not found on PATH: install Node.js (with npm) to refresh Swagger UI")
    with tempfile.TemporaryDirectory() as tmp:
        out = subprocess.run(
            [npm, "pack", f"swagger-ui-dist@{version}", "--pack-destination", tmp, "--silent"],
            check=True,
            capture_output=True,
            text=True,
        )
        tarball = Path(tmp) / out.stdout.strip().splitlines()[-1]
        dest.mkdir(parents=True, exist_ok=True)
        with tarfile.open(tarball) as tar:
            for name in FILES:
                member = tar.extractfile(f"package/{name}")
                if member is None:
                    sys.exit(f"swagger-ui-dist@{version} has no {name}")
                (dest / name).write_bytes(member.read())
    (dest / "VERSION").write_text(f"swagger-ui-dist {version}\n")
    print(f"swagger-ui-dist {version} -> {dest}")


if __name__ == "__main__":
    vendor(sys.argv[1] if len(sys.argv) > 1 else SWAGGER_UI_VERSION)
