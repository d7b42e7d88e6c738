"""Fixtures for the tls plugin: throwaway CAs and a real mTLS HTTP server.

`MTLSServer` is the inbound side as the sidecar will run it: an anyio TLS listener on
127.0.0.1 using the server context from `meshcore_server_tls`, the `authorize` hook per
request, answering 200 with the peer's SPIFFE ID (and serial) or 403 with the reason. It runs
on the test's own event loop, so it works on asyncio and trio alike.
"""

from __future__ import annotations

import ssl
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import meshcore
import pytest
from anyio.streams.tls import TLSStream
from cryptography import x509
from meshcore.testing import static_service

from meshcore_tls import CA, spiffe_ids_of


@pytest.fixture
def ca_dir(tmp_path: Path) -> Path:
    d = tmp_path / "ca"
    CA.create("example.org").save(d)
    return d


@pytest.fixture
def other_ca_dir(tmp_path: Path) -> Path:
    d = tmp_path / "other-ca"
    CA.create("example.org").save(d)  # same trust domain, different root: must not be trusted
    return d


def write_leaf(
    ca_dir: Path, out: Path, service: str, namespace: str = "default", **kw: Any
) -> tuple[Path, Path]:
    issued = CA.load(ca_dir, need_key=True).issue(service, namespace, **kw)
    out.mkdir(parents=True, exist_ok=True)
    cert, key = out / f"{service}.crt", out / f"{service}.key"
    from meshcore_tls._ca import write_private

    write_private(key, issued.key_pem, overwrite=True)
    write_private(cert, issued.cert_pem, overwrite=True)
    return cert, key


class MTLSServer:
    def __init__(self, mesh: meshcore.Mesh, close_every: int = 0) -> None:
        self.mesh = mesh
        self.close_every = close_every
        self.port = 0
        self.handshake_errors: list[str] = []
        self.seen: list[tuple[str, str, str, str]] = []  # (identity, serial, method, path)
        self.connections = 0

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    async def _serve(self, stream: Any) -> None:
        ctx = self.mesh.plugins.server_tls(self.mesh)
        try:
            tls = await TLSStream.wrap(
                stream, server_side=True, ssl_context=ctx, standard_compatible=False
            )
        except (ssl.SSLError, OSError, anyio.BrokenResourceError, anyio.EndOfStream) as exc:
            self.handshake_errors.append(f"{type(exc).__name__}: {exc}")
            await stream.aclose()
            return
        self.connections += 1
        peer = tls.extra(anyio.streams.tls.TLSAttribute.ssl_object)
        buf = b""
        served = 0
        try:
            while True:
                while b"\r\n\r\n" not in buf:
                    data = await tls.receive()
                    buf += data
                head, _, buf = buf.partition(b"\r\n\r\n")
                lines = head.decode("latin-1").split("\r\n")
                method, target, _ = lines[0].split(" ", 2)
                headers = [
                    tuple(x.strip() for x in line.split(":", 1))
                    for line in lines[1:]
                    if ":" in line
                ]
                length = int(dict((k.lower(), v) for k, v in headers).get("content-length", "0"))
                while len(buf) < length:
                    buf += await tls.receive()
                buf = buf[length:]
                request = meshcore.Request(method, f"https://orders{target}", headers)
                reason = self.mesh.plugins.authorize(request, peer, self.mesh)
                der = peer.getpeercert(binary_form=True)
                cert = x509.load_der_x509_certificate(der)
                ids = spiffe_ids_of(cert)
                identity, serial = (ids[0] if ids else ""), f"{cert.serial_number:x}"
                self.seen.append((identity, serial, method, request.url.path))
                served += 1
                close = (self.close_every and served >= self.close_every) or any(
                    k.lower() == "connection" and v.lower() == "close" for k, v in headers
                )
                if reason is None:
                    status, body = "200 OK", identity.encode()
                else:
                    status, body = "403 Forbidden", reason.encode()
                response = (
                    f"HTTP/1.1 {status}\r\ncontent-length: {len(body)}\r\nx-peer-serial: {serial}\r\n"
                    f"{'connection: close' if close else 'connection: keep-alive'}\r\n\r\n"
                ).encode() + body
                await tls.send(response)
                if close:
                    break
        except (anyio.EndOfStream, anyio.BrokenResourceError, ssl.SSLError, OSError) as exc:
            if not self.seen or served == 0:
                self.handshake_errors.append(f"{type(exc).__name__}: {exc}")
        finally:
            await tls.aclose()


@asynccontextmanager
async def mtls_server(mesh: meshcore.Mesh, **kw: Any) -> AsyncIterator[MTLSServer]:
    server = MTLSServer(mesh, **kw)
    listener = await anyio.create_tcp_listener(local_host="127.0.0.1", local_port=0)
    server.port = listener.extra(anyio.abc.SocketAttribute.local_port)
    async with listener, anyio.create_task_group() as tg:
        tg.start_soon(listener.serve, server._serve)
        try:
            yield server
        finally:
            tg.cancel_scope.cancel()


def server_config(
    ca_dir: Path, service: str = "orders", namespace: str = "default", **tls: Any
) -> dict[str, Any]:
    return {
        "tls": {"ca_dir": str(ca_dir), "service": service, "namespace": namespace, **tls},
        "services": {},
    }


def client_config(
    tls: dict[str, Any], server: MTLSServer, service: str = "orders"
) -> dict[str, Any]:
    return {"tls": tls, "services": {service: static_service([server.address])}}


@pytest.fixture
def tls_mesh() -> Callable[..., meshcore.Mesh]:
    """`tls_mesh(config)`: a Mesh with the tls plugin loaded by entry point, sending through
    the core's default connector (the HTTP/1.1 engine, `check_peer` wired to verify_peer)."""

    def make(config: dict[str, Any], **kwargs: Any) -> meshcore.Mesh:
        return meshcore.Mesh(config, ["tls"], **kwargs)

    return make


@pytest.fixture
def kit() -> Any:
    """The helpers above, for tests (importlib import mode cannot import conftest by name)."""
    from types import SimpleNamespace

    return SimpleNamespace(
        write_leaf=write_leaf,
        mtls_server=mtls_server,
        server_config=server_config,
        client_config=client_config,
    )
