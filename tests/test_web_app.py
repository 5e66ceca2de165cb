"""The web app as files and HTTP answers, without a browser (tests/test_web.py drives one): the
page's security headers, how its modules are served, the old dashboard paths, no external URL and
no inline script or style, the vendored libraries at their pinned versions with their licences,
every module the page imports present, and the socket's Origin check for the page."""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path

import httpx
import pytest
import websockets
from websockets.asyncio.client import connect

from tests.conftest import RunningServer, login_token

ROOT = Path(__file__).resolve().parents[1]
WEB = ROOT / "src" / "vitalwire" / "web"
VENDOR = WEB / "vendor"

_URL = re.compile(r"https?://[^\s\"'`)<>]+")
#: XML namespace names are identifiers, never fetched (Preact's SVG and MathML, the favicon).
_NAMESPACES = re.compile(r"https?://www\.w3\.org/(2000/svg|1999/xhtml|1998/Math/MathML|1999/xlink)")
_BLOCK_COMMENT = re.compile(r"/\*.*?\*/", re.DOTALL)
_LINE_COMMENT = re.compile(r"(^|[\s;{}(,])//.*$", re.MULTILINE)
_HTML_COMMENT = re.compile(r"<!--.*?-->", re.DOTALL)
_IMPORT = re.compile(
    r"""(?:\bimport|\bexport)\s*(?:[\w*{}\s,$]+?\s*from\s*)?["']([^"']+)["']"""
    r"""|\bimport\s*\(\s*["']([^"']+)["']\s*\)""",
)


def _load_vendor_tool():  # type: ignore[no-untyped-def]
    spec = importlib.util.spec_from_file_location("vendor_web", ROOT / "tools" / "vendor_web.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _code_of(path: Path) -> str:
    """The file without its comments (licence files are skipped by the caller)."""
    text = path.read_text(encoding="utf-8")
    if path.suffix in (".html", ".svg"):
        return _HTML_COMMENT.sub("", text)
    if path.suffix in (".js", ".mjs", ".css"):
        text = _BLOCK_COMMENT.sub("", text)
        if path.suffix != ".css":
            text = _LINE_COMMENT.sub(r"\1", text)
    return text


async def test_the_page_is_served_with_its_security_headers(server: RunningServer) -> None:
    async with httpx.AsyncClient(base_url=server.url) as http:
        r = await http.get("/")
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/html")
    csp = {
        d.strip().split()[0]: d.strip().split()[1:]
        for d in r.headers["content-security-policy"].split(";")
        if d.strip()
    }
    script = csp.get("script-src", csp.get("default-src"))
    assert script == ["'self'"], csp
    assert "'unsafe-inline'" not in csp.get("style-src", []) and "'unsafe-eval'" not in script
    assert csp["frame-ancestors"] == ["'none'"]
    assert csp["connect-src"] == ["'self'"]
    assert csp["default-src"] == ["'none'"]
    assert r.headers["x-frame-options"] == "DENY"
    assert r.headers["referrer-policy"] == "no-referrer"
    assert "no-store" in r.headers["cache-control"]
    assert '<div id="app">' in r.text


async def test_the_modules_are_served_as_javascript(server: RunningServer) -> None:
    async with httpx.AsyncClient(base_url=server.url) as http:
        main = await http.get("/app/js/main.js")
        css = await http.get("/app/app.css")
        missing = await http.get("/app/js/nope.js")
    assert main.status_code == 200
    kind = main.headers["content-type"].split(";")[0]
    assert kind in ("text/javascript", "application/javascript"), kind
    assert "no-cache" in main.headers["cache-control"]
    assert css.status_code == 200 and css.headers["content-type"].startswith("text/css")
    assert missing.status_code == 404


@pytest.mark.parametrize("path", ["/dashboard", "/ui"])
async def test_the_old_paths_redirect_to_the_page(server: RunningServer, path: str) -> None:
    async with httpx.AsyncClient(base_url=server.url) as http:
        r = await http.get(path)
    assert r.status_code in (301, 302, 303, 307, 308)
    assert r.headers["location"] == "/"


def test_no_file_of_the_app_references_an_external_url() -> None:
    found = []
    for path in sorted(WEB.rglob("*")):
        if not path.is_file() or path.name.startswith("LICENSE") or path.name == "VERSIONS":
            continue
        for url in _URL.findall(_code_of(path)):
            if not _NAMESPACES.match(url):
                found.append(f"{path.relative_to(WEB)}: {url}")
    assert not found, found


def test_the_page_has_no_inline_script_or_style() -> None:
    page = _HTML_COMMENT.sub("", (WEB / "index.html").read_text(encoding="utf-8"))
    scripts = re.findall(r"<script\b([^>]*)>(.*?)</script>", page, re.DOTALL | re.IGNORECASE)
    assert scripts, "the page loads its module with a <script src>"
    for attrs, body in scripts:
        assert "src=" in attrs and not body.strip(), (attrs, body)
    assert not re.search(r"<style\b", page, re.IGNORECASE)
    assert not re.search(r"\sstyle\s*=", page, re.IGNORECASE)
    assert not re.search(r"\son[a-z]+\s*=", page, re.IGNORECASE), "inline event handler"
    # every file the page names is in the package
    for ref in re.findall(r"""(?:src|href)=["'](/app/[^"']+)["']""", page):
        assert (WEB / ref.removeprefix("/app/")).is_file(), ref


def test_the_vendored_libraries_are_the_pinned_versions_with_their_licences() -> None:
    tool = _load_vendor_tool()
    pinned = [f"{name} {version}" for name, version, _ in tool.PACKAGES]
    assert (VENDOR / "VERSIONS").read_text().split("\n")[:-1] == pinned
    for name, _, files in tool.PACKAGES:
        targets = [target for _, target in files]
        assert any(t.startswith("LICENSE") for t in targets), name
        for target in targets:
            assert (VENDOR / target).is_file(), f"{name}: vendor/{target} missing"
            assert (VENDOR / target).stat().st_size > 0, target
    # no bare specifier left: the browser loads them without an import map
    for js in VENDOR.glob("*.js"):
        for m in _IMPORT.finditer(js.read_text(encoding="utf-8")):
            spec = m.group(1) or m.group(2)
            assert spec.startswith("./"), f"{js.name} imports {spec!r}"


def imports_of(path: Path) -> list[str]:
    return [m.group(1) or m.group(2) for m in _IMPORT.finditer(_code_of(path))]


def test_every_module_the_page_imports_exists() -> None:
    seen: set[Path] = set()
    todo = [WEB / "js" / "main.js"]
    missing = []
    while todo:
        path = todo.pop()
        if path in seen:
            continue
        seen.add(path)
        for spec in imports_of(path):
            assert spec.startswith((".", "/")), f"{path.relative_to(WEB)}: bare import {spec!r}"
            target = (path.parent / spec).resolve() if spec.startswith(".") else None
            if spec.startswith("/app/"):
                target = WEB / spec.removeprefix("/app/")
            if target is None or not target.is_file():
                missing.append(f"{path.relative_to(WEB)} imports {spec}")
            else:
                todo.append(target)
    assert not missing, missing
    names = {p.relative_to(WEB).as_posix() for p in seen}
    for needed in ("js/station.js", "js/patient.js", "js/admin.js", "vendor/uPlot.esm.js"):
        assert needed in names, sorted(names)


async def test_the_socket_accepts_the_pages_origin_and_refuses_another(
    server: RunningServer,
) -> None:
    bearer = await login_token(server, "clinician")
    host = server.url.removeprefix("http://")
    for origin in (server.url, f"http://localhost:{host.rsplit(':', 1)[1]}"):
        async with connect(server.ws_url + "/ws", proxy=None, origin=origin) as ws:
            await ws.send(json.dumps({"type": "auth", "token": bearer, "id": 1}))
            reply = json.loads(await ws.recv())
            assert reply["type"] == "result" and reply["id"] == 1, reply
    for other in ("https://evil.example", "http://127.0.0.1:1", f"https://{host}"):
        with pytest.raises(websockets.InvalidStatus) as refused:
            async with connect(server.ws_url + "/ws", proxy=None, origin=other):
                pass
        assert refused.value.response.status_code == 403, other
