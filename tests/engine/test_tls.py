"""TLS through the engine: the connector's ssl_context and verify_peer hook, and the server's
view of the peer (ConnectionInfo.ssl_object, https URLs). Certificates are made on the fly
with `cryptography`: a CA, a server certificate and a client certificate (mutual TLS)."""

from __future__ import annotations

import datetime
import ssl
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import pytest
from anyio.streams.tls import TLSListener
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from meshcore._endpoints import Endpoint
from meshcore._errors import EndpointConnectError
from meshcore._http import (
    ConnectionInfo,
    HTTPConnector,
    ServerLimits,
    serve_connection,
    serve_http,
)
from meshcore._models import Request, Response

pytestmark = pytest.mark.anyio


@dataclass
class Pki:
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path


def _issue(name: str, issuer_key, issuer_name, key, *, ca: bool = False, san: list | None = None):  # type: ignore[no-untyped-def]
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
        .issuer_name(issuer_name or x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if san:
        builder = builder.add_extension(x509.SubjectAlternativeName(san), critical=False)
    return builder.sign(issuer_key, hashes.SHA256())


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    import ipaddress

    tmp = tmp_path_factory.mktemp("pki")
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = _issue("test ca", ca_key, None, ca_key, ca=True)
    out = {}
    for who, san in (
        (
            "server",
            [
                x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
                x509.UniformResourceIdentifier("spiffe://test/ns/default/sa/orders"),
            ],
        ),
        ("client", [x509.UniformResourceIdentifier("spiffe://test/ns/default/sa/web")]),
    ):
        key = ec.generate_private_key(ec.SECP256R1())
        cert = _issue(who, ca_key, ca.subject, key, san=san)
        (tmp / f"{who}.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        (tmp / f"{who}.key").write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
        out[who] = (tmp / f"{who}.pem", tmp / f"{who}.key")
    (tmp / "ca.pem").write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    return Pki(tmp / "ca.pem", *out["server"], *out["client"])


def _uri_sans(ssl_object: ssl.SSLObject) -> list[str]:
    der = ssl_object.getpeercert(binary_form=True)
    cert = x509.load_der_x509_certificate(der)
    return cert.extensions.get_extension_for_class(
        x509.SubjectAlternativeName
    ).value.get_values_for_type(x509.UniformResourceIdentifier)


async def app(request: Request, conn: ConnectionInfo) -> Response:
    peer = ",".join(_uri_sans(conn.ssl_object)) if conn.ssl_object else "-"
    return Response(200, [], f"{request.url} tls={conn.tls} peer={peer}".encode())


@pytest.fixture
async def tls_server(anyio_backend: str, pki: Pki) -> AsyncIterator[int]:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=str(pki.ca))
    context.load_cert_chain(pki.server_cert, pki.server_key)
    context.verify_mode = ssl.CERT_REQUIRED
    tcp = await anyio.create_tcp_listener(local_host="127.0.0.1")
    port = tcp.extra(anyio.abc.SocketAttribute.local_port)
    listener = TLSListener(tcp, context, standard_compatible=False)
    async with anyio.create_task_group() as tg:
        tg.start_soon(lambda: serve_http(listener, app))
        yield port
        tg.cancel_scope.cancel()


def client_context(pki: Pki) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(pki.ca))
    context.load_cert_chain(pki.client_cert, pki.client_key)
    return context


async def test_mutual_tls_round_trip_and_verify_peer(tls_server: int, pki: Pki) -> None:
    seen: list[tuple[Endpoint, list[str]]] = []

    def verify(endpoint: Endpoint, ssl_object: ssl.SSLObject) -> None:
        seen.append((endpoint, _uri_sans(ssl_object)))

    endpoint = Endpoint("127.0.0.1", tls_server)
    async with HTTPConnector(ssl_context=client_context(pki), verify_peer=verify) as connector:
        for _ in range(3):
            response = await connector.send(
                endpoint, Request("GET", f"https://127.0.0.1:{tls_server}/x")
            )
            body = await response.aread()
            assert (
                body
                == (
                    f"https://127.0.0.1:{tls_server}/x tls=True "
                    f"peer=spiffe://test/ns/default/sa/web"
                ).encode()
            )
    # one handshake, one verification, then the connection was reused
    assert seen == [(endpoint, ["spiffe://test/ns/default/sa/orders"])]


async def test_verify_peer_rejection_propagates(tls_server: int, pki: Pki) -> None:
    class WrongPeer(Exception):
        pass

    def reject(endpoint: Endpoint, ssl_object: ssl.SSLObject) -> None:
        raise WrongPeer(f"{endpoint.id} is not payments")

    endpoint = Endpoint("127.0.0.1", tls_server)
    async with HTTPConnector(ssl_context=client_context(pki), verify_peer=reject) as connector:
        with pytest.raises(WrongPeer):
            await connector.send(endpoint, Request("GET", f"https://127.0.0.1:{tls_server}/"))
        assert connector.stats()[endpoint.id]["open"] == 0


async def test_untrusted_server_is_connect_error(tls_server: int) -> None:
    endpoint = Endpoint("127.0.0.1", tls_server)
    async with HTTPConnector(ssl_context=ssl.create_default_context()) as connector:
        with pytest.raises(EndpointConnectError) as info:
            await connector.send(endpoint, Request("GET", f"https://127.0.0.1:{tls_server}/"))
        assert info.value.endpoint == endpoint and info.value.replayable


# the server's own handshake: serve_http(tls=...) drives TLS on the socket ---------------------

BIG = bytes(range(256)) * 24576  # 6 MiB: more than a socket buffer holds (4 MiB at most here)


async def big_app(request: Request, conn: ConnectionInfo) -> Response:
    if request.url.path == "/echo":
        body = await request.aread()
        return Response(200, [("X-Len", str(len(body)))], body)
    if request.url.path == "/big":
        return Response(200, [], BIG)
    return await app(request, conn)


def server_context(pki: Pki) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=str(pki.ca))
    context.load_cert_chain(pki.server_cert, pki.server_key)
    context.verify_mode = ssl.CERT_REQUIRED
    return context


@pytest.fixture(params=["socket", "stream"])
async def direct_tls_server(
    anyio_backend: str, pki: Pki, request: pytest.FixtureRequest
) -> AsyncIterator[tuple[int, Any]]:
    """A server doing its own handshakes (`serve_connection(tls=...)` on a plain TCP
    listener); yields (port, a stream of the handshake failures it reported). Twice: TLS on
    the socket taken from the loop, and TLS on a stream the engine cannot take (its
    `TLSSocket` over the stream adapter)."""
    from .test_server import Wrapped

    failures, receive = anyio.create_memory_object_stream[tuple[ConnectionInfo, BaseException]](10)
    # Short only where a test waits for the cut: a good client's handshake on a loaded
    # machine can take longer than the stall test wants to wait.
    marker = request.node.get_closest_marker("handshake_timeout")
    handshake_timeout = marker.args[0] if marker else 10.0
    tcp = await anyio.create_tcp_listener(local_host="127.0.0.1")
    port = tcp.extra(anyio.abc.SocketAttribute.local_port)

    def on_connection(stream):  # type: ignore[no-untyped-def]
        return serve_connection(
            Wrapped(stream) if request.param == "stream" else stream, big_app, tls=server_context(pki),
            limits=ServerLimits(handshake_timeout=handshake_timeout),
            on_tls_error=lambda info, exc: failures.send_nowait((info, exc)),
        )

    async with failures, receive, anyio.create_task_group() as tg:
        tg.start_soon(tcp.serve, on_connection)
        yield port, receive
        tg.cancel_scope.cancel()


async def test_server_handshake_mutual_tls_keepalive_and_large_bodies(
    direct_tls_server: tuple[int, Any], pki: Pki
) -> None:
    port, failures = direct_tls_server
    endpoint = Endpoint("127.0.0.1", port)
    async with HTTPConnector(ssl_context=client_context(pki)) as connector:
        for _ in range(2):
            response = await connector.send(endpoint, Request("GET", f"https://127.0.0.1:{port}/x"))
            assert await response.aread() == (
                f"https://127.0.0.1:{port}/x tls=True peer=spiffe://test/ns/default/sa/web"
            ).encode()
        # Large bodies both ways over the same connection: sends the socket takes in parts.
        response = await connector.send(
            endpoint, Request("POST", f"https://127.0.0.1:{port}/echo", stream=BIG)
        )
        assert response.headers.get("x-len") == str(len(BIG)) and await response.aread() == BIG
        response = await connector.send(endpoint, Request("GET", f"https://127.0.0.1:{port}/big"))
        assert await response.aread() == BIG
        assert connector.stats()[endpoint.id]["open"] == 1  # one connection, one handshake
    assert failures.statistics().current_buffer_used == 0  # no handshake failed


async def test_server_handshake_with_an_independent_client(
    direct_tls_server: tuple[int, Any], pki: Pki
) -> None:
    """Python's own blocking TLS client (not our engine) against the server's handshake,
    reading through a small window: the server's sends of the 6 MiB response are taken in
    parts (TLSSocket's backlog)."""
    port, _ = direct_tls_server

    def go() -> bytes:
        import socket

        with socket.socket() as raw:
            raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            raw.settimeout(5)
            raw.connect(("127.0.0.1", port))
            with client_context(pki).wrap_socket(raw, server_hostname="127.0.0.1") as s:
                s.sendall(b"GET /big HTTP/1.1\r\nHost: x\r\n\r\n")
                s.sendall(b"GET /y HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                out = b""
                while True:
                    try:
                        got = s.recv(65536)
                    except ssl.SSLError:
                        break
                    if not got:
                        break
                    out += got
                return out

    out = await anyio.to_thread.run_sync(go)
    assert out.startswith(b"HTTP/1.1 200 OK") and BIG in out
    assert out.endswith(b"/y tls=True peer=spiffe://test/ns/default/sa/web")


async def test_server_handshake_failures_are_reported_and_survived(
    direct_tls_server: tuple[int, Any], pki: Pki
) -> None:
    port, failures = direct_tls_server

    def plain_http() -> bytes:
        import socket

        with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
            s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            try:
                return s.recv(65536)
            except ConnectionResetError:
                return b""

    assert not (await anyio.to_thread.run_sync(plain_http)).startswith(b"HTTP/")
    endpoint = Endpoint("127.0.0.1", port)
    no_cert = ssl.create_default_context(cafile=str(pki.ca))  # the server requires one
    async with HTTPConnector(ssl_context=no_cert) as connector:
        with pytest.raises(Exception):  # noqa: B017 - TLS 1.3 may fail at the first read
            response = await connector.send(endpoint, Request("GET", f"https://127.0.0.1:{port}/"))
            await response.aread()
    with anyio.fail_after(5):
        reported = [await failures.receive() for _ in range(2)]  # plain HTTP, then no cert
    assert all(isinstance(exc, OSError) for _, exc in reported)  # ssl.SSLError among them
    assert reported[0][0].client[0] == "127.0.0.1"
    async with HTTPConnector(ssl_context=client_context(pki)) as connector:  # still serving
        response = await connector.send(endpoint, Request("GET", f"https://127.0.0.1:{port}/z"))
        assert response.status_code == 200


@pytest.mark.handshake_timeout(0.3)
async def test_server_handshake_that_stalls_or_breaks_off_is_ended(
    direct_tls_server: tuple[int, Any], pki: Pki
) -> None:
    """A client that connects and says nothing is cut at `handshake_timeout` (0.3 s here), one
    that leaves halfway through the handshake is reported; neither takes the server down."""
    port, failures = direct_tls_server
    import socket

    with socket.create_connection(("127.0.0.1", port), timeout=5) as silent:
        with anyio.fail_after(5):
            info, exc = await failures.receive()
        assert isinstance(exc, TimeoutError)
        silent.settimeout(5)
        # and the server closed the connection (read in a thread: closing a stream takes
        # the server's loop a turn or two)
        assert await anyio.to_thread.run_sync(silent.recv, 10) == b""

    def half_a_handshake() -> None:
        incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        tls = client_context(pki).wrap_bio(incoming, outgoing, server_hostname="127.0.0.1")
        with pytest.raises(ssl.SSLWantReadError):
            tls.do_handshake()
        with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
            s.sendall(outgoing.read())  # the ClientHello, then gone

    await anyio.to_thread.run_sync(half_a_handshake)
    with anyio.fail_after(5):
        info, exc = await failures.receive()
    # a reset seen through an anyio stream is BrokenResourceError (it depends on timing)
    assert isinstance(exc, (OSError, anyio.EndOfStream, anyio.BrokenResourceError))
    endpoint = Endpoint("127.0.0.1", port)
    async with HTTPConnector(ssl_context=client_context(pki)) as connector:  # still serving
        response = await connector.send(endpoint, Request("GET", f"https://127.0.0.1:{port}/ok"))
        assert response.status_code == 200
