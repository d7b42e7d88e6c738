"""X.509-SVID rules, no resumption past a certificate's life, trust bundle removals.

Real certificates made with `cryptography` (a CA issuing deliberately bad leaves) and real
handshakes on loopback, on asyncio and trio: inbound through `MTLSServer` (the authorize
hook), outbound through the mesh client (check_peer) against a server presenting the leaf.
"""

from __future__ import annotations

import datetime as dt
import socket
import ssl
from pathlib import Path
from typing import Any

import anyio
import meshcore
import pytest
from anyio.streams.tls import TLSStream
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

import meshcore_tls
from meshcore_tls import CA
from meshcore_tls._ca import cert_pem, key_pem, svid_problem, write_private

pytestmark = pytest.mark.anyio

TD = "spiffe://example.org/ns/default/sa/"


def _usage(*, sign: bool = True, cert_sign: bool = False) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=sign,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=not sign,  # OpenSSL refuses to load a certificate with no usage at all
        key_cert_sign=cert_sign,
        crl_sign=False,
        encipher_only=False,
        decipher_only=False,
    )


# variant -> (URI SANs, basicConstraints CA, keyUsage, EKU, the reason expected)
BAD = {
    "two spiffe URIs": ([TD + "{svc}", TD + "admin"], False, _usage(), True, "2 URI SANs"),
    "URI + spiffe": (["https://admin.example.org/", TD + "{svc}"], False, _usage(), True, "2 URI SANs"),
    "CA=true leaf": ([TD + "{svc}"], True, _usage(cert_sign=True), True, "basicConstraints CA=true"),
    "no SAN": ([], False, _usage(), True, "no subjectAltName"),
    "keyCertSign on a leaf": ([TD + "{svc}"], False, _usage(cert_sign=True), True, "keyCertSign"),
    "no digitalSignature": ([TD + "{svc}"], False, _usage(sign=False), True, "digitalSignature"),
}


def bad_leaf(ca_dir: Path, out: Path, variant: str, service: str) -> tuple[Path, Path]:
    uris, is_ca, usage, eku, _ = BAD[variant]
    root = CA.load(ca_dir, need_key=True)
    assert root.key is not None
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, service)]))
        .issuer_name(root.cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=1))
        .not_valid_after(now + dt.timedelta(hours=1))
        .add_extension(x509.BasicConstraints(ca=is_ca, path_length=None), critical=True)
        .add_extension(usage, critical=True)
    )
    if eku:
        builder = builder.add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
            critical=False,
        )
    if uris:
        builder = builder.add_extension(
            x509.SubjectAlternativeName(
                [x509.UniformResourceIdentifier(u.format(svc=service)) for u in uris]
            ),
            critical=False,
        )
    cert = builder.sign(root.key, hashes.SHA256())
    out.mkdir(parents=True, exist_ok=True)
    name = variant.replace(" ", "_").replace("=", "").replace("+", "")
    cert_path, key_path = out / f"{name}.crt", out / f"{name}.key"
    write_private(key_path, key_pem(key), overwrite=True)
    write_private(cert_path, cert_pem(cert), overwrite=True)
    return cert_path, key_path


def client_ctx(ca: Path, cert: Path, key: Path, max_version: Any = None) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.load_verify_locations(ca)
    ctx.load_cert_chain(cert, key)
    if max_version is not None:
        ctx.maximum_version = max_version
    return ctx


def request(
    port: int, ctx: ssl.SSLContext, session: ssl.SSLSession | None = None
) -> tuple[bytes, ssl.SSLSession | None, bool]:
    """(response or b"" when refused, the session, whether it was resumed)."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
            with ctx.wrap_socket(sock, session=session) as tls:
                tls.sendall(b"GET /x HTTP/1.1\r\nhost: orders\r\nconnection: close\r\n\r\n")
                out = b""
                while chunk := tls.recv(4096):
                    out += chunk
                return out, tls.session, tls.session_reused
    except (ssl.SSLError, OSError):
        return b"", None, False


def test_svid_rules_name_what_is_wrong(ca_dir):
    good = CA.load(ca_dir, need_key=True).issue("web")
    assert svid_problem(good.cert) is None
    for variant, (*_, reason) in BAD.items():
        cert_path, _ = bad_leaf(ca_dir, ca_dir.parent / "bad", variant, "web")
        problem = svid_problem(x509.load_pem_x509_certificate(cert_path.read_bytes()))
        assert problem is not None and reason in problem, (variant, problem)
    assert "names a trust domain" in (svid_problem(CA.load(ca_dir).cert) or "")


@pytest.mark.parametrize("variant", list(BAD))
async def test_inbound_refuses_a_client_that_is_not_one_svid(variant, ca_dir, kit, tls_mesh):
    cert, key = bad_leaf(ca_dir, ca_dir.parent / "bad", variant, "web")
    ctx = client_ctx(ca_dir / "ca.crt", cert, key)
    async with tls_mesh(kit.server_config(ca_dir, "orders")) as mesh, kit.mtls_server(mesh) as server:
        out, _, _ = await anyio.to_thread.run_sync(request, server.port, ctx)
        state = mesh.state()["state"]["tls"]
    # OpenSSL's handshake accepts every one of these (they chain to the trusted root); the
    # authorize hook refuses each with the SVID rule it breaks, never judging the first URI.
    assert out.startswith(b"HTTP/1.1 403"), out
    assert b"client certificate refused: " in out and BAD[variant][4].encode() in out
    assert state["denied"] == 1 and state["allowed"] == 0


async def _serve_leaf(cert: Path, key: Path, ca: Path, task_status: Any) -> None:
    """A TLS server presenting `cert` and answering 200 to anything."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(cert, key)
    ctx.load_verify_locations(ca)
    ctx.verify_mode = ssl.CERT_OPTIONAL

    async def serve(stream: Any) -> None:
        try:
            tls = await TLSStream.wrap(stream, server_side=True, ssl_context=ctx, standard_compatible=False)
            await tls.receive()
            await tls.send(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
            await tls.aclose()
        except (ssl.SSLError, OSError, anyio.BrokenResourceError, anyio.EndOfStream):
            await stream.aclose()

    listener = await anyio.create_tcp_listener(local_host="127.0.0.1", local_port=0)
    async with listener:
        task_status.started(listener.extra(anyio.abc.SocketAttribute.local_port))
        await listener.serve(serve)


@pytest.mark.parametrize("variant", list(BAD))
async def test_outbound_refuses_a_server_that_is_not_one_svid(variant, ca_dir, tls_mesh):
    cert, key = bad_leaf(ca_dir, ca_dir.parent / "bad", variant, "orders")
    async with anyio.create_task_group() as tg:
        port = await tg.start(_serve_leaf, cert, key, ca_dir / "ca.crt")
        config = {
            "tls": {"ca_dir": str(ca_dir), "service": "web"},
            "services": {"orders": meshcore.testing.static_service([f"127.0.0.1:{port}"])},
        }
        async with tls_mesh(config) as mesh, mesh.client() as client:
            with pytest.raises(meshcore.IdentityRejected) as info:
                await client.get("http://orders/")
            state = mesh.state()["state"]["tls"]
        tg.cancel_scope.cancel()
    assert isinstance(info.value, meshcore.IdentityRejected), info.value
    assert BAD[variant][4] in str(info.value)
    assert info.value.actual == ""
    assert state["rejected_servers"] == 1
