"""vitalwire behind Debian's nginx with the shipped config (deploy/nginx/vitalwire.conf): TLS
ends at nginx, and through it work a REST login, a device on /ws/device whose readings reach a
clinician on /ws, a GraphQL subscription over graphql-transport-ws, the forwarded client address,
the browser origin of ``public_url``, the redirect from plain HTTP, and metrics kept per node.

nginx runs as a child process in the test's temporary folder (its own prefix, pid file and logs)
with the config as shipped, only its lines marked ``site:`` rewritten for the test's ports,
certificate and node. Without ``/usr/sbin/nginx`` the tests skip saying why; under
``VITALWIRE_REQUIRE_SERVICES=1`` they fail instead (``make test`` installs nginx as root).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import signal
import ssl
import subprocess
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import trustme
import websockets

from tests.conftest import (
    REQUIRE_SERVICES,
    RunningServer,
    free_port,
    start_server,
    stop_server,
    wait_until,
)
from vitalwire.sdk import DeviceClient, MonitorClient, login, tls

ROOT = Path(__file__).resolve().parents[1]
SITE_CONF = ROOT / "deploy" / "nginx" / "vitalwire.conf"
#: Debian's nginx (apt-get install nginx-light); VITALWIRE_NGINX names another binary.
NGINX = Path(os.environ.get("VITALWIRE_NGINX") or "/usr/sbin/nginx")
#: The address the test's own clients connect from when the forwarded address is checked: any
#: loopback address but nginx's (127.0.0.1), so the node's answer tells the two apart.
CLIENT_ADDRESS = "127.0.0.5"
GRAPHQL_WS = "graphql-transport-ws"
EVENTS = """subscription($p: String!) {
  patientEvents(patientId: $p) { stream offset kind data }
}"""


def need_nginx() -> None:
    """Skip (or fail under VITALWIRE_REQUIRE_SERVICES=1) when nginx is not installed."""
    if os.access(NGINX, os.X_OK):
        return
    reason = (
        f"nginx not found at {NGINX} (make test installs Debian's nginx-light with apt-get when "
        "it runs as root; or apt-get install nginx-light)"
    )
    if REQUIRE_SERVICES:
        pytest.fail(reason + " and VITALWIRE_REQUIRE_SERVICES=1")
    pytest.skip(reason)


def render_site(
    text: str,
    *,
    https_port: int,
    http_port: int,
    node: str | list[str],
    certfile: Path,
    keyfile: Path,
) -> str:
    """The shipped config with each ``site:`` line set for this test (``node``: one node's
    address, or several: one ``server`` line each); fails on a ``site:`` line it does not know,
    so a new one in the config is not silently left at its example value."""
    nodes = [node] if isinstance(node, str) else node
    out = []
    for line in text.splitlines():
        if "# site:" not in line or line.lstrip().startswith("#"):
            out.append(line)
            continue
        directive = line.split("#", 1)[0].strip()
        if directive.startswith("listen [::]"):
            continue  # loopback IPv4 only: the test machine may have no IPv6
        if directive == "listen 80;":
            line = line.replace("listen 80;", f"listen 127.0.0.1:{http_port};")
        elif directive == "listen 443 ssl;":
            line = line.replace("listen 443 ssl;", f"listen 127.0.0.1:{https_port} ssl;")
        elif directive.startswith("server_name "):
            line = re.sub(r"server_name \S+;", "server_name localhost;", line)
        elif directive.startswith("ssl_certificate "):
            line = re.sub(r"ssl_certificate \S+;", f"ssl_certificate {certfile};", line)
        elif directive.startswith("ssl_certificate_key "):
            line = re.sub(r"ssl_certificate_key \S+;", f"ssl_certificate_key {keyfile};", line)
        elif directive.startswith("server ") and "max_fails" in directive:
            line = "\n".join(re.sub(r"server \S+", f"server {n}", line, count=1) for n in nodes)
        else:
            raise AssertionError(f"a site: line the test does not know: {line.strip()}")
        out.append(line)
    return "\n".join(out) + "\n"


def main_conf(prefix: Path) -> str:
    """What /etc/nginx/nginx.conf holds around conf.d/*.conf, in the test's folder."""
    user = "user root;\n" if os.geteuid() == 0 else ""  # workers must reach the 0700 tmp folder
    temp = "\n".join(
        f"    {name}_temp_path {prefix / name};"
        for name in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )
    return (
        f"{user}worker_processes 1;\n"
        f"error_log {prefix / 'error.log'} warn;\n"
        "events { worker_connections 256; }\n"
        "http {\n"
        f"    access_log {prefix / 'access.log'};\n"
        f"{temp}\n"
        f"    include {prefix / 'vitalwire.conf'};\n"
        "}\n"
    )


@dataclass
class Proxied:
    """A vitalwire node behind nginx."""

    srv: RunningServer
    https: str  # the public URL: nginx, TLS
    http: str  # nginx's plain-HTTP port (redirects)
    context: ssl.SSLContext  # trusts the test CA that signed nginx's certificate
    prefix: Path

    def access_log(self) -> str:
        return (self.prefix / "access.log").read_text()


@dataclass
class Nginx:
    """nginx running with the shipped config in front of some nodes."""

    https: str
    http: str
    context: ssl.SSLContext
    prefix: Path


@contextlib.asynccontextmanager
async def nginx_in_front(
    prefix: Path, nodes: list[str], https_port: int = 0, http_port: int = 0
) -> AsyncIterator[Nginx]:
    """Debian's nginx with the shipped config (its ``site:`` lines set for the test: a test CA's
    certificate, the ports (0: free ones), one ``server`` line per node) as a child process in
    ``prefix``."""
    need_nginx()
    prefix.mkdir()
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1", "localhost")
    certfile, keyfile, cafile = prefix / "cert.pem", prefix / "key.pem", prefix / "ca.pem"
    cert.private_key_and_cert_chain_pem.write_to_path(str(certfile))
    cert.private_key_pem.write_to_path(str(keyfile))
    ca.cert_pem.write_to_path(str(cafile))
    https_port, http_port = https_port or free_port(), http_port or free_port()
    https = f"https://127.0.0.1:{https_port}"
    (prefix / "vitalwire.conf").write_text(
        render_site(
            SITE_CONF.read_text(),
            https_port=https_port,
            http_port=http_port,
            node=nodes,
            certfile=certfile,
            keyfile=keyfile,
        )
    )
    (prefix / "nginx.conf").write_text(main_conf(prefix))
    proc = subprocess.Popen(
        [
            str(NGINX),
            "-e",
            str(prefix / "error.log"),
            "-p",
            str(prefix),
            "-c",
            str(prefix / "nginx.conf"),
            "-g",
            f"daemon off; pid {prefix / 'nginx.pid'};",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        context = tls.client_context(str(cafile))
        await _until_serving(proc, https, context, prefix / "error.log")
        yield Nginx(https, f"http://127.0.0.1:{http_port}", context, prefix)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)  # nginx's fast shutdown
            try:
                await asyncio.to_thread(proc.wait, 10)
            except subprocess.TimeoutExpired:
                proc.kill()
                await asyncio.to_thread(proc.wait, 10)


@pytest.fixture
async def proxied(tmp_path: Path) -> AsyncIterator[Proxied]:
    need_nginx()
    https_port, http_port = free_port(), free_port()
    https = f"https://127.0.0.1:{https_port}"
    srv, task = await start_server(tmp_path, patients=2, public_url=https)
    try:
        node = srv.url.removeprefix("http://")
        async with nginx_in_front(tmp_path / "nginx", [node], https_port, http_port) as nx:
            yield Proxied(srv, nx.https, nx.http, nx.context, nx.prefix)
    finally:
        await stop_server(srv, task)


async def _until_serving(
    proc: subprocess.Popen[bytes], https: str, context: ssl.SSLContext, error_log: Path
) -> None:
    """Wait for nginx to answer /healthz from the node over TLS (or fail with its error log)."""

    def log() -> str:
        return error_log.read_text() if error_log.exists() else "(no error log)"

    async with httpx.AsyncClient(base_url=https, verify=context, timeout=5) as http:

        async def serving() -> None:
            while True:
                assert proc.poll() is None, f"nginx exited {proc.returncode}:\n{log()}"
                try:
                    if (await http.get("/healthz")).status_code == 200:
                        return
                except httpx.TransportError:
                    await asyncio.sleep(0.05)

        try:
            await asyncio.wait_for(serving(), 20)
        except TimeoutError:
            raise AssertionError(f"nginx did not serve within 20 s:\n{log()}") from None


async def test_login_and_a_devices_readings_reach_a_clinician_through_nginx(
    proxied: Proxied,
) -> None:
    srv = proxied.srv
    did, secret, pid = srv.device(0)
    user, password = srv.user("clinician")
    token = await login(proxied.https, user, password, proxied.context)
    async with MonitorClient(proxied.https, token=token, ssl=proxied.context) as mon:
        assert mon.ws_url == proxied.https.replace("https://", "wss://") + "/ws"
        await mon.subscribe([f"patient:{pid}"])
        async with DeviceClient(proxied.https, did, secret, ssl=proxied.context) as dev:
            assert dev.url.startswith("wss://127.0.0.1:")
            for hr in (61, 62, 63):
                dev.send(hr=hr)
            await dev.flush()
            assert dev.acked == 3
        seen: list[float] = []
        while len(seen) < 3:
            event = await mon.next_event(10)
            if event.kind == "reading":
                seen.append(event.data["hr"])
    assert seen == [61.0, 62.0, 63.0]
    # both sockets were upgraded by nginx (101), not served some other way
    log = proxied.access_log()
    assert re.search(r'"GET /ws/device HTTP/1\.1" 101 ', log), log
    assert re.search(r'"GET /ws HTTP/1\.1" 101 ', log), log
    assert re.search(r'"POST /auth/login HTTP/1\.1" 200 ', log), log


async def test_graphql_subscription_over_graphql_transport_ws_through_nginx(
    proxied: Proxied,
) -> None:
    srv = proxied.srv
    did, secret, pid = srv.device(0)
    user, password = srv.user("clinician")
    token = await login(proxied.https, user, password, proxied.context)
    url = proxied.https.replace("https://", "wss://") + "/graphql"
    async with websockets.connect(
        url,
        ssl=proxied.context,
        subprotocols=[GRAPHQL_WS],  # type: ignore[list-item]
    ) as ws:
        assert ws.subprotocol == GRAPHQL_WS  # the node's choice came back through nginx
        init = {"type": "connection_init", "payload": {"Authorization": f"Bearer {token}"}}
        await ws.send(json.dumps(init))
        assert json.loads(await asyncio.wait_for(ws.recv(), 10))["type"] == "connection_ack"
        sub = {"query": EVENTS, "variables": {"p": pid}}
        await ws.send(json.dumps({"id": "s", "type": "subscribe", "payload": sub}))
        await wait_until(
            lambda: srv.services.streams.subscriber_count() == 1, 10, "the subscription"
        )
        async with DeviceClient(proxied.https, did, secret, ssl=proxied.context) as dev:
            dev.send(hr=77)
            await dev.flush()
        reading: dict[str, Any] | None = None
        while reading is None:
            msg = json.loads(await asyncio.wait_for(ws.recv(), 10))
            assert (msg["id"], msg["type"]) == ("s", "next"), msg
            event = msg["payload"]["data"]["patientEvents"]
            if event["kind"] == "reading":
                reading = event
    assert reading["stream"] == f"patient:{pid}"
    assert reading["data"]["hr"] == 77.0


async def test_the_node_sees_the_clients_address_not_the_proxys_or_a_forged_one(
    proxied: Proxied,
) -> None:
    """nginx connects to the node from 127.0.0.1 and the client from CLIENT_ADDRESS: the node
    (uvicorn trusting X-Forwarded-* from 127.0.0.1, its default) audits the client's address,
    and an X-Forwarded-For the client made up is replaced by nginx, not believed."""
    srv = proxied.srv
    user, password = srv.user("clinician")
    token = await login(proxied.https, user, password, proxied.context)
    transport = httpx.AsyncHTTPTransport(verify=proxied.context, local_address=CLIENT_ADDRESS)
    async with httpx.AsyncClient(base_url=proxied.https, transport=transport) as http:
        r = await http.get(
            "/patients",
            headers={"Authorization": f"Bearer {token}", "X-Forwarded-For": "203.0.113.7"},
        )
    assert r.status_code == 200, r.text
    assert r.headers["strict-transport-security"] == "max-age=31536000"
    await srv.services.writer.flush()
    rows = await srv.services.store.audit_log(10, action="list_patients")
    assert [(row["actor"], row["origin"]) for row in rows] == [(user, CLIENT_ADDRESS)]


async def test_a_browser_origin_is_allowed_by_public_url_through_nginx(proxied: Proxied) -> None:
    """The node checks a browser's Origin against public_url (set to nginx's URL): the page's
    own origin opens a socket, another origin is refused at the handshake."""
    url = proxied.https.replace("https://", "wss://") + "/ws"
    async with websockets.connect(url, ssl=proxied.context, origin=proxied.https) as ws:  # type: ignore[arg-type]
        assert ws.response is not None and ws.response.status_code == 101
    with pytest.raises(websockets.InvalidStatus) as refused:
        async with websockets.connect(
            url,
            ssl=proxied.context,
            origin="https://elsewhere.example",  # type: ignore[arg-type]
        ):
            pass
    assert refused.value.response.status_code == 403


@pytest.mark.parametrize("path", ["/ws", "/ws/device", "/ws/edge"])
async def test_every_websocket_path_is_upgraded_through_nginx(proxied: Proxied, path: str) -> None:
    """The handshake reaches the node and its 101 comes back; a first frame that is not JSON
    gets the node's error frame and close code (4001) back through nginx."""
    url = proxied.https.replace("https://", "wss://") + path
    async with websockets.connect(url, ssl=proxied.context) as ws:
        assert ws.response is not None and ws.response.status_code == 101
        await ws.send("not json")
        error = json.loads(await asyncio.wait_for(ws.recv(), 10))
        assert (error["type"], error["code"]) == ("error", "invalid_message"), error
        with pytest.raises(websockets.ConnectionClosed):
            await asyncio.wait_for(ws.recv(), 10)
    assert ws.close_code == 4001


async def test_plain_http_redirects_and_metrics_stay_per_node(proxied: Proxied) -> None:
    async with httpx.AsyncClient() as http:
        r = await http.get(proxied.http + "/patients?x=1")
        assert r.status_code == 301
        assert r.headers["location"] == "https://127.0.0.1/patients?x=1"
        assert (await http.get(proxied.srv.url + "/metrics")).status_code == 200
    async with httpx.AsyncClient(base_url=proxied.https, verify=proxied.context) as http:
        assert (await http.get("/metrics")).status_code == 404
        assert (await http.get("/metrics.json")).status_code == 404
        assert (await http.get("/healthz")).json()["status"] == "ok"
