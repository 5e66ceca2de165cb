"""The clinicians' web app at ``/``: one page, its ES modules and vendored libraries, no build step.

The page (``web/index.html``) and everything under ``/app/`` come from the package
(``src/vitalwire/web``). The app speaks only the public protocol and APIs (``/ws``, REST), so it
is also their example client (docs/howto-web.md).

Security headers (docs/security.md, "Web app"): the page has a Content-Security-Policy of its own
with no inline script and no inline style sheet (``script-src 'self'``, ``style-src 'self'``),
connections to this server only (``connect-src 'self'``, which covers ``ws:``/``wss:`` to the same
host), no framing (``frame-ancestors 'none'`` and ``X-Frame-Options: DENY`` from the HTTP edge),
no referrer, no forms posted anywhere (the login form is sent by script), and ``no-store`` on the
page so a shared workstation's back button shows nothing after logout. The socket's Origin check
(transports/common.py ``origin_allowed``) accepts the page's own origin.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Final

from fastapi.responses import HTMLResponse, RedirectResponse
from starlette.staticfiles import StaticFiles

if TYPE_CHECKING:
    from fastapi import FastAPI

#: The app's files in the package.
WEB_DIR: Final = Path(__file__).resolve().parent.parent / "web"
#: Where its modules, style sheet and vendored libraries are served.
APP_PATH: Final = "/app"

#: The page's Content-Security-Policy (see the module).
APP_POLICY: Final = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; font-src 'self'; manifest-src 'self'; base-uri 'none'; "
    "form-action 'none'; frame-ancestors 'none'"
)

PAGE_HEADERS: Final = {
    "Content-Security-Policy": APP_POLICY,
    "Cache-Control": "no-store",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
}


class AppFiles(StaticFiles):
    """The app's modules with the page's policy and revalidation on every load (``no-cache``:
    an upgraded server's modules are never mixed with a cached older page)."""

    async def get_response(self, path: str, scope):  # type: ignore[no-untyped-def]
        response = await super().get_response(path, scope)
        response.headers["Content-Security-Policy"] = APP_POLICY
        response.headers.setdefault("Cache-Control", "no-cache")
        return response


def install(app: FastAPI) -> None:
    """Route ``/`` (the page), ``/app/*`` (its files), and ``/dashboard`` and ``/ui`` (to ``/``);
    none in the OpenAPI schema."""
    page = (WEB_DIR / "index.html").read_bytes()
    app.mount(APP_PATH, AppFiles(directory=WEB_DIR), name="web")

    @app.api_route("/", methods=["GET", "HEAD"], include_in_schema=False)
    async def index() -> HTMLResponse:
        return HTMLResponse(page, headers=PAGE_HEADERS)

    @app.get("/dashboard", include_in_schema=False)
    @app.get("/ui", include_in_schema=False)
    async def to_index() -> RedirectResponse:
        return RedirectResponse("/", status_code=308)
