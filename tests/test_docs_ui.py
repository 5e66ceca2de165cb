"""/docs is Swagger UI served from the package: it works with no internet."""

from __future__ import annotations

import fnmatch
import re
import runpy
import tomllib
from pathlib import Path

import httpx

from tests.conftest import RunningServer
from vitalwire.app import SWAGGER_UI_DIR

ROOT = Path(__file__).resolve().parent.parent

#: What each asset the page links must be served as (Python 3.11 names .js application/...).
CONTENT_TYPES = {
    ".js": ("text/javascript", "application/javascript"),
    ".css": ("text/css",),
    ".png": ("image/png",),
}


def linked_assets(html: str) -> list[str]:
    return re.findall(r'(?:src|href)="([^"]+)"', html)


async def test_docs_page_names_no_host_but_the_server(server: RunningServer) -> None:
    async with httpx.AsyncClient(base_url=server.url) as http:
        r = await http.get("/docs")
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/html")
    urls = re.findall(r"[a-z][a-z0-9+.-]*://[^\s\"'<>)]+", r.text, flags=re.IGNORECASE)
    assert urls == []  # every URL in the page is a path on this server
    assets = linked_assets(r.text)
    assert sorted(assets) == [
        "/static/swagger-ui/favicon-32x32.png",
        "/static/swagger-ui/swagger-ui-bundle.js",
        "/static/swagger-ui/swagger-ui.css",
    ]
    assert "url: '/openapi.json'" in r.text
    assert '"validatorUrl": null' in r.text  # no call to the public validator service


async def test_every_asset_the_docs_page_links_is_served(server: RunningServer) -> None:
    async with httpx.AsyncClient(base_url=server.url) as http:
        html = (await http.get("/docs")).text
        assets = linked_assets(html)
        assert assets
        for path in assets:
            r = await http.get(path)
            assert r.status_code == 200, path
            media = r.headers["content-type"].split(";")[0]
            assert media in CONTENT_TYPES[Path(path).suffix], (path, media)
            assert r.content == (SWAGGER_UI_DIR / Path(path).name).read_bytes()


async def test_openapi_still_served_without_the_docs_routes(server: RunningServer) -> None:
    async with httpx.AsyncClient(base_url=server.url) as http:
        r = await http.get("/openapi.json")
        redoc = await http.get("/redoc")
    assert r.status_code == 200
    paths = r.json()["paths"]
    assert "/healthz" in paths and "/patients" in paths
    assert [p for p in paths if p == "/docs" or p.startswith("/static")] == []
    assert redoc.status_code == 404  # Redoc is off: it would load from a CDN


def test_vendored_swagger_ui_is_the_pinned_version_and_ships_in_the_package() -> None:
    script = runpy.run_path(str(ROOT / "tools" / "vendor_swagger_ui.py"))
    version = script["SWAGGER_UI_VERSION"]
    assert (SWAGGER_UI_DIR / "VERSION").read_text() == f"swagger-ui-dist {version}\n"
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    globs = pyproject["tool"]["setuptools"]["package-data"]["vitalwire"]
    package = ROOT / "src" / "vitalwire"
    for name in script["FILES"]:
        rel = (SWAGGER_UI_DIR / name).relative_to(package).as_posix()
        assert (SWAGGER_UI_DIR / name).is_file(), rel
        assert any(fnmatch.fnmatch(rel, g) for g in globs), f"{rel} not in package-data"
