"""The policy judges the request the app receives (issue 16; Istio CVE-2021-31920, CVE-2021-39156).

A sidecar with mTLS and a policy that allows the caller only `/public` sits in front of real
servers: a WSGI app on the standard library's wsgiref, Starlette on uvicorn, and nginx with
`location /admin` and `location /public`. A corpus of path spellings goes over raw TLS sockets
(exact bytes, the client's mesh certificate) and no spelling may reach an admin handler. The
WSGI router is deliberately lax (case-insensitive, `;params` stripped, dots resolved, prefix
routed) so that it routes to /admin whatever any common framework would; nginx echoes
`$request_uri`, which must be exactly the path the policy judged.
"""

from __future__ import annotations

import contextlib
import json
import os
import posixpath
import socket
import ssl
import subprocess
import threading
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

import anyio
import meshcore_tls
import pytest

from meshcore import PathRejected, normalize_target
from meshcore._sidecar._runtime import Sidecar
from meshcore.testing import free_port, require_binary, wait_listening

from .conftest import LOOPBACK

pytestmark = pytest.mark.anyio

BACKENDS = [
    "asyncio",
    "trio",
    pytest.param(("asyncio", {"use_uvloop": True}), id="uvloop"),
]

TRUST_DOMAIN = "paths.meshcore.test"
WEB = meshcore_tls.spiffe_id(TRUST_DOMAIN, "default", "web")

# Every spelling an audit or an advisory used to reach /admin through a /public rule (or to
# make a denied /admin look like something else).
CORPUS = [
    "/admin",
    "/admin/",
    "/admin/x",
    "/admin/../admin",
    "/admin/../public",  # judged /public, prefix-routed to /admin before the fix
    "/admin/..%2fpublic",
    "/public/../admin",
    "/public/./../admin",
    "/public/../../admin",
    "/public/%2e%2e/admin",
    "/public/%2E%2E/admin",
    "/public/.%2e/admin",
    "/public/%2e%2e/%2e%2e/admin",
    "/public/%2e%2e%2fadmin",
    "/%2e%2e/admin",
    "/%61dmin",
    "/%61dmin/x",
    "/admin%2fx",
    "/admin%2Fx",
    "/public/..%2fadmin",
    "/public/..%2Fadmin",
    "/public%2f..%2fadmin",
    "/public/x/..%2f..%2fadmin",
    "/public/..%5cadmin",
    "/public/..%5Cadmin",
    "/public\\..\\admin",
    "/public/..\\admin",
    "//admin",
    "///admin",
    "/./admin",
    "/admin#x",
    "/public#/../admin",
    "/public/x#/../../admin",
    "/ADMIN",
    "/Admin/x",
    "/admin;x",
    "/admin;x/y",
    "/public/..;/admin",
    "/public;/../admin",
    "/public/%2e%2e;/admin",
    "/public/%252e%252e/admin",
    "/public/%25%32%65%25%32%65/admin",
    "/public/..//admin",
    "/public//../admin",
    "/public/.../admin",
    "/public/../admin?x=1",
    "/public?/../admin",
    "/public/..%00/admin",
    "/public/%zz/../admin",
]
CONTROLS = {"/public": "public", "/public/x": "public", "/public/%61": "public"}


# -- the apps ----------------------------------------------------------------------------------


def lax_route(path: str) -> str:
    """Where a lax router sends a (decoded) path: prefix-routed, case-insensitive, `;params`
    stripped, dots and backslashes resolved; "admin" if any of those readings says so."""
    readings = [path, "/" + posixpath.normpath(path.replace("\\", "/")).lstrip("/")]
    for reading in readings:
        segments = [s.split(";")[0].lower() for s in reading.split("/")[1:]]
        first = next((s for s in segments if s), "")
        if first == "admin":
            return "admin"
    first = path.split("/")[1].split(";")[0].lower() if path.count("/") else ""
    return "public" if first == "public" else "none"


class WSGIApp:
    """wsgiref in a thread; records the handler each request reached, echoes its environ."""

    def __init__(self) -> None:
        self.served: list[tuple[str, str]] = []

        class Quiet(WSGIRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

        self.server: WSGIServer = make_server("127.0.0.1", 0, self.app, handler_class=Quiet)
        self.address = f"127.0.0.1:{self.server.server_port}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def app(self, environ: dict[str, Any], start_response: Any) -> list[bytes]:
        path = environ["PATH_INFO"]  # percent-decoded by wsgiref
        handler = lax_route(path)
        self.served.append((handler, path))
        if path == "/public/environ":
            http = {k: v for k, v in environ.items() if k.startswith("HTTP_")}
            body = json.dumps(http).encode()
        else:
            body = f"{handler} {path}\n".encode("utf-8", "surrogateescape")
        start_response("200 OK" if handler != "none" else "404 Not Found",
                       [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))])
        return [body]


@pytest.fixture(scope="module")
def wsgi_app() -> Iterator[WSGIApp]:
    app = WSGIApp()
    app.thread.start()
    yield app
    app.server.shutdown()
    app.server.server_close()


class StarletteApp:
    def __init__(self) -> None:
        pytest.importorskip("starlette")
        uvicorn = pytest.importorskip("uvicorn")
        from starlette.applications import Starlette
        from starlette.requests import Request
        from starlette.responses import PlainTextResponse
        from starlette.routing import Route

        self.served: list[tuple[str, str]] = []

        def handler(name: str) -> Any:
            async def endpoint(request: Request) -> PlainTextResponse:
                self.served.append((name, request.url.path))
                return PlainTextResponse(f"{name} {request.url.path}\n")

            return endpoint

        app = Starlette(
            routes=[
                Route("/admin", handler("admin")),
                Route("/admin/{rest:path}", handler("admin")),
                Route("/public", handler("public")),
                Route("/public/{rest:path}", handler("public")),
            ]
        )
        port = free_port()
        self.address = f"127.0.0.1:{port}"
        config = uvicorn.Config(app, host="127.0.0.1", port=port, log_level="error", lifespan="off")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        wait_listening(port)


@pytest.fixture(scope="module")
def starlette_app() -> Iterator[StarletteApp]:
    app = StarletteApp()
    yield app
    app.server.should_exit = True
    app.thread.join(5)


NGINX_CONF = """
daemon off;
master_process off;
worker_processes 1;
error_log {prefix}/error.log warn;
pid {prefix}/nginx.pid;
events {{ worker_connections 256; }}
http {{
    access_log off;
    client_body_temp_path {prefix}/body;
    proxy_temp_path {prefix}/proxy;
    fastcgi_temp_path {prefix}/fastcgi;
    uwsgi_temp_path {prefix}/uwsgi;
    scgi_temp_path {prefix}/scgi;
    default_type text/plain;
    server {{
        listen 127.0.0.1:{port};
        location /admin {{ return 200 "admin $request_uri\\n"; }}
        location /public {{ return 200 "public $request_uri\\n"; }}
        location / {{ return 404 "none $request_uri\\n"; }}
    }}
}}
"""


class NginxApp:
    def __init__(self, prefix: Path) -> None:
        binary = os.environ.get("MESHCORE_NGINX") or require_binary("nginx")
        port = free_port()
        self.address = f"127.0.0.1:{port}"
        conf = prefix / "nginx.conf"
        conf.write_text(NGINX_CONF.format(prefix=prefix, port=port))
        self.proc = subprocess.Popen(
            [binary, "-p", str(prefix), "-c", str(conf), "-e", str(prefix / "error.log")],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        try:
            wait_listening(port)
        except RuntimeError:
            self.proc.kill()
            stderr = self.proc.stderr.read().decode() if self.proc.stderr else ""
            raise RuntimeError(f"nginx did not start: {stderr}") from None


@pytest.fixture(scope="module")
def nginx_app(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NginxApp]:
    app = NginxApp(tmp_path_factory.mktemp("nginx-paths"))
    yield app
    app.proc.terminate()
    app.proc.wait(5)


# -- mesh and raw TLS client ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def mesh_ca(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, ssl.SSLContext]:
    """A mesh CA directory and a client TLS context holding WEB's certificate."""
    tmp = tmp_path_factory.mktemp("mesh-ca")
    ca_dir = tmp / "ca"
    ca = meshcore_tls.CA.create(TRUST_DOMAIN)
    ca.save(ca_dir)
    issued = ca.issue("web", "default")
    chain = tmp / "web.pem"
    chain.write_bytes(issued.cert_pem + issued.key_pem)
    ctx = ssl.create_default_context(cafile=str(ca_dir / "ca.crt"))
    ctx.check_hostname = False  # mesh peers are identified by SPIFFE ID, not host name
    ctx.load_cert_chain(str(chain))
    return ca_dir, ctx


def config(ca_dir: Path, app: str, **sidecar: Any) -> dict[str, Any]:
    return {
        "sidecar": {**LOOPBACK, "service": "app", "app": app, "drain": 1.0, **sidecar},
        "tls": {
            "ca_dir": str(ca_dir),
            "service": "app",
            "allow": [{"identities": [WEB], "paths": ["/public"]}],
        },
    }


@contextlib.asynccontextmanager
async def mtls_sidecar(ca_dir: Path, app: str, **sidecar: Any) -> AsyncIterator[Sidecar]:
    async with Sidecar(config(ca_dir, app, **sidecar), ["tls"]) as running:
        yield running


async def tls_exchange(sidecar: Sidecar, ctx: ssl.SSLContext, data: bytes) -> bytes:
    """Send exact bytes over mTLS to the inbound listener; read until it closes."""
    address = sidecar.addresses["inbound"]
    received = b""
    with anyio.fail_after(10):
        stream = await anyio.connect_tcp(
            address.host, address.port, ssl_context=ctx, tls_standard_compatible=False
        )
        async with stream:
            await stream.send(data)
            while True:
                try:
                    received += await stream.receive()
                except (anyio.EndOfStream, anyio.BrokenResourceError):
                    return received


def parse(raw: bytes) -> tuple[int, dict[str, str], str]:
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ")[1])
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return status, headers, body.decode("utf-8", "replace")


def get(target: str, *extra: str) -> bytes:
    fields = "".join(f"{f}\r\n" for f in extra)
    return f"GET {target} HTTP/1.1\r\nHost: app\r\n{fields}Connection: close\r\n\r\n".encode(
        "latin-1"
    )


async def run_corpus(sidecar: Sidecar, ctx: ssl.SSLContext) -> dict[str, tuple[int, dict[str, str], str]]:
    results = {}
    for target in [*CORPUS, *CONTROLS]:
        raw = await tls_exchange(sidecar, ctx, get(target))
        results[target] = parse(raw) if raw else (0, {}, "")
    return results


def reached_admin(results: dict[str, tuple[int, dict[str, str], str]]) -> list[str]:
    return [t for t, (_, headers, body) in results.items()
            if "x-meshcore-error" not in headers and body.startswith("admin")]


def check_controls(results: dict[str, tuple[int, dict[str, str], str]]) -> None:
    """The allowed paths do reach the app (so the test could fail), and /admin is denied."""
    for target, handler in CONTROLS.items():
        status, headers, body = results[target]
        assert (status, body.split(" ")[0]) == (200, handler), (target, results[target])
    assert (results["/admin"][0], results["/admin"][1].get("x-meshcore-error")) == (403, "denied")
    assert results["/public/../admin"][1].get("x-meshcore-error") == "denied"
    assert results["/admin#x"][1].get("x-meshcore-error") == "bad_path"
    assert results["/public/..%2fadmin"][1].get("x-meshcore-error") == "bad_path"
    assert "escaped slash" in results["/public/..%2fadmin"][2]


# -- tests ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("anyio_backend", BACKENDS)
async def test_no_spelling_reaches_a_denied_wsgi_handler(anyio_backend, mesh_ca, wsgi_app):
    ca_dir, ctx = mesh_ca
    before = len(wsgi_app.served)
    async with mtls_sidecar(ca_dir, wsgi_app.address) as sidecar:
        results = await run_corpus(sidecar, ctx)
    assert reached_admin(results) == []
    assert [s for s in wsgi_app.served[before:] if s[0] == "admin"] == []
    check_controls(results)
    # before the fix this one was judged /public and routed to /admin; now the app gets /public
    assert results["/admin/../public"][2] == "public /public\n"


@pytest.mark.parametrize("anyio_backend", ["asyncio", "trio"])
async def test_without_normalization_the_policy_refuses_dot_segments(anyio_backend, mesh_ca, wsgi_app):
    """`path_normalization = "NONE"` forwards the target as sent, so the policy (which then
    sees the raw path) denies what a router could resolve elsewhere."""
    ca_dir, ctx = mesh_ca
    before = len(wsgi_app.served)
    async with mtls_sidecar(ca_dir, wsgi_app.address, path_normalization="NONE") as sidecar:
        results = await run_corpus(sidecar, ctx)
    assert reached_admin(results) == []
    assert [s for s in wsgi_app.served[before:] if s[0] == "admin"] == []
    assert results["/admin/../public"][1]["x-meshcore-error"] == "denied"
    assert "dot segments" in results["/admin/../public"][2]
    assert results["/public/%61"][2] == "public /public/a\n"  # forwarded raw, decoded by wsgiref


@pytest.mark.parametrize("anyio_backend", BACKENDS)
async def test_no_spelling_reaches_a_denied_starlette_route(anyio_backend, mesh_ca, starlette_app):
    ca_dir, ctx = mesh_ca
    before = len(starlette_app.served)
    async with mtls_sidecar(ca_dir, starlette_app.address) as sidecar:
        results = await run_corpus(sidecar, ctx)
    assert reached_admin(results) == []
    assert [s for s in starlette_app.served[before:] if s[0] == "admin"] == []
    check_controls(results)


@pytest.mark.parametrize(
    "settings",
    [
        {},
        {"path_normalization": "MERGE_SLASHES"},
        {"path_normalization": "DECODE_AND_MERGE_SLASHES"},
        {"path_with_escaped_slashes_action": "KEEP_UNCHANGED"},
        {"path_with_escaped_slashes_action": "UNESCAPE_AND_FORWARD"},
        {"path_with_escaped_slashes_action": "UNESCAPE_AND_REDIRECT"},
        {"path_normalization": "NONE"},  # forwarded as sent: the policy refuses what is unsafe
    ],
    ids=lambda s: "-".join(s.values()) or "defaults",
)
@pytest.mark.parametrize("anyio_backend", BACKENDS)
async def test_nginx_receives_exactly_the_judged_path(anyio_backend, mesh_ca, nginx_app, settings):
    ca_dir, ctx = mesh_ca
    async with mtls_sidecar(ca_dir, nginx_app.address, **settings) as sidecar:
        results = await run_corpus(sidecar, ctx)
    assert reached_admin(results) == [], settings
    mode = settings.get("path_normalization", "BASE")
    action = settings.get("path_with_escaped_slashes_action", "REJECT_REQUEST")
    for target, (status, headers, body) in results.items():
        if body.startswith("public "):
            # nginx's $request_uri is the target as it arrived: the one the policy judged
            assert body == f"public {normalize_target(target, mode, action)}\n", target
        elif "x-meshcore-error" in headers:
            try:
                normal = normalize_target(target, mode, action)
            except PathRejected:
                assert headers["x-meshcore-error"] in ("bad_path", "denied"), target
            else:
                assert headers["x-meshcore-error"] in ("denied", "path_redirect"), target
                if headers["x-meshcore-error"] == "path_redirect":
                    assert (status, headers["location"]) == (307, normal)
        else:
            assert status == 400, (target, status, body)  # the engine's own parser refused it
    if not settings:
        check_controls(results)


def test_nginx_itself_resolves_the_spellings(nginx_app):
    """Without the sidecar nginx routes these to /admin: what the corpus is about."""
    host, port = nginx_app.address.split(":")
    for target in ("/public/%2e%2e/admin", "/public/..%2fadmin", "/%61dmin"):
        with socket.create_connection((host, int(port)), timeout=5) as sock:
            sock.sendall(get(target))
            data = b""
            while chunk := sock.recv(4096):
                data += chunk
        assert parse(data)[2].startswith("admin"), target


@pytest.mark.parametrize("anyio_backend", BACKENDS)
async def test_identity_headers_come_only_from_the_sidecar(anyio_backend, mesh_ca, wsgi_app):
    """WSGI maps `X_Forwarded_Client_Cert` onto the same variable as the real field."""
    ca_dir, ctx = mesh_ca
    forged = (
        "X_Forwarded_Client_Cert: URI=spiffe://evil/ns/x/sa/y",
        "x-FORWARDED-client-CERT: URI=spiffe://evil/ns/x/sa/z",
        "X-Forwarded_Client-Cert: URI=spiffe://evil/ns/x/sa/w",
        "X_Forwarded_For: 10.6.6.6",
        "X_Custom: 1",
        "X-Fine: 2",
    )
    request = get("/public/environ", *forged)
    async with mtls_sidecar(ca_dir, wsgi_app.address) as sidecar:  # DROP_HEADER by default
        status, _, body = parse(await tls_exchange(sidecar, ctx, request))
    environ = json.loads(body)
    assert status == 200
    assert environ["HTTP_X_FORWARDED_CLIENT_CERT"] == f"URI={WEB}"
    assert "10.6.6.6" not in environ["HTTP_X_FORWARDED_FOR"]
    assert "HTTP_X_CUSTOM" not in environ and environ["HTTP_X_FINE"] == "2"

    async with mtls_sidecar(ca_dir, wsgi_app.address, headers_with_underscores_action="ALLOW") as sidecar:
        status, _, body = parse(await tls_exchange(sidecar, ctx, request))
    environ = json.loads(body)
    assert environ["HTTP_X_FORWARDED_CLIENT_CERT"] == f"URI={WEB}"
    assert "10.6.6.6" not in environ["HTTP_X_FORWARDED_FOR"]
    assert environ["HTTP_X_CUSTOM"] == "1"

    async with mtls_sidecar(
        ca_dir, wsgi_app.address, headers_with_underscores_action="REJECT_REQUEST"
    ) as sidecar:
        status, headers, body = parse(await tls_exchange(sidecar, ctx, request))
    assert (status, headers["x-meshcore-error"]) == (400, "bad_header")
    assert "X_Forwarded_Client_Cert" in body
