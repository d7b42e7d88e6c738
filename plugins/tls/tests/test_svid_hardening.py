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
from cryptography.hazmat.primitives import hashes, serialization
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
    "URI + spiffe": (
        ["https://admin.example.org/", TD + "{svc}"], False, _usage(), True, "2 URI SANs"
    ),
    "CA=true leaf": (
        [TD + "{svc}"], True, _usage(cert_sign=True), True, "basicConstraints CA=true"
    ),
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
            x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
            ),
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
    config = kit.server_config(ca_dir, "orders")
    async with tls_mesh(config) as mesh, kit.mtls_server(mesh) as server:
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
            tls = await TLSStream.wrap(
                stream, server_side=True, ssl_context=ctx, standard_compatible=False
            )
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


# -- resumption cannot outlive the client certificate -----------------------------------------


@pytest.mark.parametrize("version", ["1.3", "1.2"])
async def test_no_resumption_after_the_client_certificate_expired(version, ca_dir, kit, tls_mesh):
    # A client certificate that expires 2 s from now (issued "58 s ago" with a 60 s life).
    issued = CA.load(ca_dir, need_key=True).issue(
        "web", ttl=60, now=dt.datetime.now(dt.UTC) - dt.timedelta(seconds=58)
    )
    out = ca_dir.parent / "short"
    out.mkdir()
    cert, key = out / "web.crt", out / "web.key"
    write_private(key, issued.key_pem)
    write_private(cert, issued.cert_pem)
    max_version = ssl.TLSVersion.TLSv1_2 if version == "1.2" else None
    ctx = client_ctx(ca_dir / "ca.crt", cert, key, max_version)
    config = kit.server_config(ca_dir, "orders", min_tls_version=version)
    async with tls_mesh(config) as mesh, kit.mtls_server(mesh) as server:
        server_ctx = mesh.plugins.server_tls(mesh)
        assert server_ctx.num_tickets == 0 and server_ctx.options & ssl.OP_NO_TICKET
        first, session, _ = await anyio.to_thread.run_sync(request, server.port, ctx)
        assert first.startswith(b"HTTP/1.1 200")
        assert session is not None and not session.has_ticket  # the server issued none
        # OpenSSL checks validity against the wall clock, so the test waits for the real
        # expiry; nothing signals it.
        left = (issued.not_after - dt.datetime.now(dt.UTC)).total_seconds()
        await anyio.sleep(max(0.0, left) + 0.2)
        again, _, reused = await anyio.to_thread.run_sync(request, server.port, ctx, session)
    # Nothing to resume (no ticket, and CPython's server contexts keep no session-ID cache):
    # a full handshake, which refuses the expired certificate.
    assert (again, reused) == (b"", False)


async def test_an_expired_certificate_on_an_open_or_resumed_session_is_refused(
    ca_dir, kit, tls_mesh
):
    # The check behind the handshake's: should any resumption path exist, authorize judges
    # the certificate against the clock. `peer` is what an SSLObject answers after resuming.
    expired = CA.load(ca_dir, need_key=True).issue(
        "web", ttl=60, now=dt.datetime.now(dt.UTC) - dt.timedelta(hours=3)
    )
    der = expired.cert.public_bytes(serialization.Encoding.DER)

    class Resumed:
        def getpeercert(self, binary_form: bool = False) -> bytes:
            return der

    async with tls_mesh(kit.server_config(ca_dir, "orders")) as mesh:
        reason = mesh.plugins.authorize(meshcore.Request("GET", "http://orders/"), Resumed(), mesh)
    assert reason is not None and "expired at" in reason


# -- removing a root ----------------------------------------------------------------------------


def fingerprint(path: Path) -> str:
    return x509.load_pem_x509_certificate(path.read_bytes()).fingerprint(hashes.SHA256()).hex()


@pytest.mark.parametrize("version", ["1.3", "1.2"])
async def test_a_removed_root_is_no_longer_trusted_nor_resumable(
    version, ca_dir, other_ca_dir, kit, tls_mesh
):
    # The server's own certificate comes from `other`; `ca_dir`'s root signs the client and
    # is then removed from the server's bundle.
    tmp = ca_dir.parent
    bundle = tmp / "bundle.crt"
    write_private(bundle, (ca_dir / "ca.crt").read_bytes() + (other_ca_dir / "ca.crt").read_bytes())
    server_cert, server_key = kit.write_leaf(other_ca_dir, tmp / "server", "orders")
    old_cert, old_key = kit.write_leaf(ca_dir, tmp / "old", "web")
    new_cert, new_key = kit.write_leaf(other_ca_dir, tmp / "new", "web")
    max_version = ssl.TLSVersion.TLSv1_2 if version == "1.2" else None
    old_ctx = client_ctx(other_ca_dir / "ca.crt", old_cert, old_key, max_version)
    new_ctx = client_ctx(other_ca_dir / "ca.crt", new_cert, new_key, max_version)
    config = {
        "tls": {
            "ca": str(bundle),
            "cert": str(server_cert),
            "key": str(server_key),
            "reload_interval": 0.02,
            "min_tls_version": version,
        },
        "services": {},
    }
    async with tls_mesh(config) as mesh, kit.mtls_server(mesh) as server:
        w = meshcore_tls.workload(mesh)
        assert w is not None and w.rotated is not None
        before = mesh.state()["state"]["tls"]["trusted_roots"]
        first, session, _ = await anyio.to_thread.run_sync(request, server.port, old_ctx)
        assert first.startswith(b"HTTP/1.1 200")

        rotated = w.rotated
        write_private(bundle, (other_ca_dir / "ca.crt").read_bytes(), overwrite=True)
        with anyio.fail_after(10):
            await rotated.wait()
        after = mesh.state()["state"]["tls"]["trusted_roots"]

        fresh, _, _ = await anyio.to_thread.run_sync(request, server.port, old_ctx)
        resumed, _, reused = await anyio.to_thread.run_sync(
            request, server.port, old_ctx, session
        )
        still, _, _ = await anyio.to_thread.run_sync(request, server.port, new_ctx)
    assert before == [fingerprint(ca_dir / "ca.crt"), fingerprint(other_ca_dir / "ca.crt")]
    assert after == [fingerprint(other_ca_dir / "ca.crt")]
    assert fresh == b"" and resumed == b"" and not reused
    assert still.startswith(b"HTTP/1.1 200")


async def test_outbound_stops_trusting_a_removed_root(ca_dir, other_ca_dir, kit, tls_mesh):
    # The client mesh trusts both roots, then only `other`: the server (from `ca_dir`) is
    # refused on the next new connection, in library mode through `security_changed()`.
    tmp = ca_dir.parent
    bundle = tmp / "client-bundle.crt"
    write_private(bundle, (ca_dir / "ca.crt").read_bytes() + (other_ca_dir / "ca.crt").read_bytes())
    both = tmp / "server-bundle.crt"
    write_private(both, bundle.read_bytes())
    cert, key = kit.write_leaf(other_ca_dir, tmp / "client", "web")
    async with tls_mesh(kit.server_config(ca_dir, "orders", ca=str(both))) as server_mesh:
        # close_every=1: each request on a new connection, so each one is a handshake.
        async with kit.mtls_server(server_mesh, close_every=1) as server:
            tls = {"ca": str(bundle), "cert": str(cert), "key": str(key), "reload_interval": 0.02}
            async with tls_mesh(kit.client_config(tls, server)) as mesh, mesh.client() as client:
                w = meshcore_tls.workload(mesh)
                assert w is not None and w.rotated is not None
                first = await client.get("http://orders/")
                rotated = w.rotated
                write_private(bundle, (other_ca_dir / "ca.crt").read_bytes(), overwrite=True)
                with anyio.fail_after(10):
                    await rotated.wait()
                refused = pytest.raises(
                    meshcore.EndpointConnectError, match="CERTIFICATE_VERIFY_FAILED"
                )
                with refused:
                    await client.get("http://orders/")
                roots = mesh.state()["state"]["tls"]["trusted_roots"]
    assert first.status_code == 200
    assert roots == [fingerprint(other_ca_dir / "ca.crt")]
