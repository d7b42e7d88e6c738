"""Real mTLS handshakes on loopback through the mesh (asyncio and trio).

Outbound: a mesh client (`meshcore_client_tls`, `meshcore_check_peer` through the engine's
verify_peer) talks to `MTLSServer`, the inbound side built from `meshcore_server_tls` and
`meshcore_authorize`. Bad clients that the mesh itself would never build (no certificate,
expired) are made with Python's ssl directly and with `openssl s_client`.
"""

from __future__ import annotations

import datetime as dt
import socket
import ssl

import anyio
import httpx
import meshcore
import pytest
from meshcore.testing import static_service

import meshcore_tls

pytestmark = pytest.mark.anyio

WEB = "spiffe://example.org/ns/default/sa/web"


def raw_request(
    port: int, cert=None, key=None, ca=None, max_version=None, ciphers=None, session=None
) -> bytes:
    """One request with Python's ssl used directly; returns what came back (b"" on EOF)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    if ca is None:
        ctx.verify_mode = ssl.CERT_NONE
    else:
        ctx.load_verify_locations(ca)
    if max_version is not None:
        ctx.maximum_version = max_version
    if ciphers is not None:
        ctx.set_ciphers(ciphers)
    if cert is not None:
        ctx.load_cert_chain(cert, key)
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        with ctx.wrap_socket(sock) as tls:
            tls.sendall(b"GET /x HTTP/1.1\r\nhost: orders\r\nconnection: close\r\n\r\n")
            out = b""
            while chunk := tls.recv(4096):
                out += chunk
            return out


def plain_request(port: int) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(b"GET /x HTTP/1.1\r\nhost: orders\r\n\r\n")
        try:
            return sock.recv(4096)
        except ConnectionResetError:
            return b""


async def rejected(call, *args, **kwargs) -> bool:
    """True when the server refused: an SSL/socket error, or EOF without a response."""
    try:
        out = await anyio.to_thread.run_sync(lambda: call(*args, **kwargs))
    except (ssl.SSLError, OSError):
        return True
    return b"HTTP/1.1" not in out


# -- outbound ---------------------------------------------------------------------------------


async def test_valid_certificate_reaches_the_mtls_upstream(ca_dir, kit, tls_mesh):
    async with tls_mesh(kit.server_config(ca_dir, "orders")) as server_mesh:
        async with kit.mtls_server(server_mesh) as server:
            config = kit.client_config({"ca_dir": str(ca_dir), "service": "web"}, server)
            async with tls_mesh(config) as mesh, mesh.client() as client:
                first = await client.get("http://orders/items/7")
                second = await client.get("http://orders/items/8")
                state = mesh.state()
    assert (first.status_code, first.text) == (200, WEB)
    assert second.status_code == 200
    assert server.handshake_errors == []
    assert server.connections == 1  # keep-alive: one handshake, two requests
    tls = state["state"]["tls"]  # one workload identity per mesh: mesh-wide state
    assert tls["identity"] == WEB
    assert tls["mode"] == "issue"
    assert 23 * 3600 < tls["seconds_left"] <= 24 * 3600
    assert state["services"]["orders"]["tls"] == {
        "expected_server": "spiffe://example.org/ns/default/sa/orders"
    }


async def test_the_native_client_speaks_mtls_too(ca_dir, kit, tls_mesh):
    async with tls_mesh(kit.server_config(ca_dir, "orders")) as server_mesh:
        async with kit.mtls_server(server_mesh) as server:
            config = kit.client_config({"ca_dir": str(ca_dir), "service": "web"}, server)
            async with tls_mesh(config) as mesh, mesh.http() as http:
                first = await http.get("http://orders/items/7")
                second = await http.get("http://orders/items/8")
    assert (first.status_code, first.text) == (200, WEB)
    assert second.status_code == 200
    assert server.handshake_errors == []
    assert server.connections == 1


async def test_tls_13_only_by_default(ca_dir, kit, tls_mesh):
    async with tls_mesh(kit.server_config(ca_dir, "orders")) as server_mesh:
        ctx = server_mesh.plugins.server_tls(server_mesh)
        assert ctx.minimum_version == ssl.TLSVersion.TLSv1_3
        assert ctx.verify_mode == ssl.CERT_REQUIRED
        assert server_mesh.state()["state"]["tls"]["min_tls_version"] == "1.3"
        async with kit.mtls_server(server_mesh) as server:
            leaf, key = kit.write_leaf(ca_dir, ca_dir.parent / "leaf", "web")
            # A TLS 1.2-only client with a valid certificate: Python's ssl and openssl.
            assert await rejected(
                raw_request, server.port, leaf, key, ca_dir / "ca.crt", ssl.TLSVersion.TLSv1_2
            )
            s_client = await anyio.run_process(
                ["openssl", "s_client", "-connect", server.address, "-tls1_2",
                 "-cert", str(leaf), "-key", str(key), "-CAfile", str(ca_dir / "ca.crt")],
                input=b"", check=False,
            )
            assert s_client.returncode != 0
            assert b"no peer certificate available" in s_client.stdout  # no handshake
            ok13 = await anyio.to_thread.run_sync(
                lambda: raw_request(server.port, leaf, key, ca_dir / "ca.crt")
            )
            assert ok13.startswith(b"HTTP/1.1 200")
            # what the mesh client negotiates by default
            async with await anyio.connect_tcp(
                "127.0.0.1",
                server.port,
                ssl_context=tls_client_ctx(ca_dir, leaf, key),
                tls_standard_compatible=False,
            ) as stream:
                version = stream.extra(anyio.streams.tls.TLSAttribute.tls_version)
    assert version == "TLSv1.3"


async def test_tls_12_when_allowed_takes_aead_suites_only(ca_dir, kit, tls_mesh):
    config = kit.server_config(ca_dir, "orders", min_tls_version="1.2")
    async with tls_mesh(config) as server_mesh, kit.mtls_server(server_mesh) as server:
        leaf, key = kit.write_leaf(ca_dir, ca_dir.parent / "leaf", "web")
        ok12 = await anyio.to_thread.run_sync(
            lambda: raw_request(server.port, leaf, key, ca_dir / "ca.crt", ssl.TLSVersion.TLSv1_2)
        )
        assert ok12.startswith(b"HTTP/1.1 200")
        cbc = "ECDHE-ECDSA-AES128-SHA:ECDHE-ECDSA-AES256-SHA384:ECDHE-ECDSA-AES128-SHA256"
        assert await rejected(
            raw_request, server.port, leaf, key, ca_dir / "ca.crt", ssl.TLSVersion.TLSv1_2,
            ciphers=cbc,
        )
        s_client = await anyio.run_process(
            ["openssl", "s_client", "-connect", server.address, "-tls1_2",
             "-cipher", "ECDHE-ECDSA-AES128-SHA256",
             "-cert", str(leaf), "-key", str(key), "-CAfile", str(ca_dir / "ca.crt")],
            input=b"", check=False,
        )
        assert s_client.returncode != 0
        assert b"no peer certificate available" in s_client.stdout
    with pytest.raises(meshcore.ConfigError, match="min_tls_version"):
        tls_mesh(kit.server_config(ca_dir, "orders", min_tls_version="1.1"))


def tls_client_ctx(ca_dir, leaf, key):
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.load_verify_locations(ca_dir / "ca.crt")
    ctx.load_cert_chain(leaf, key)
    return ctx


async def test_server_with_another_services_identity_is_rejected(ca_dir, kit, tls_mesh):
    # The endpoint listed for `orders` presents the certificate of `payments`.
    async with tls_mesh(kit.server_config(ca_dir, "payments")) as server_mesh:
        async with kit.mtls_server(server_mesh) as server:
            config = kit.client_config({"ca_dir": str(ca_dir), "service": "web"}, server)
            async with tls_mesh(config) as mesh, mesh.client() as client:
                with pytest.raises(meshcore.IdentityRejected) as info:
                    await client.get("http://orders/")
                state = mesh.state()["state"]["tls"]
    err = info.value
    assert err.expected == "spiffe://example.org/ns/default/sa/orders"
    assert err.actual == "spiffe://example.org/ns/default/sa/payments"
    assert err.expected in str(err) and err.actual in str(err)
    assert server.seen == []  # no request was sent to the impostor
    assert state["rejected_servers"] == 1


async def test_identity_mapping_accepts_a_service_in_another_namespace(ca_dir, kit, tls_mesh):
    async with tls_mesh(kit.server_config(ca_dir, "orders-v2", namespace="billing")) as server_mesh:
        async with kit.mtls_server(server_mesh) as server:
            tls = {
                "ca_dir": str(ca_dir),
                "service": "web",
                "identities": {"orders": "spiffe://example.org/ns/billing/sa/orders-*"},
            }
            async with tls_mesh(kit.client_config(tls, server)) as mesh, mesh.client() as client:
                response = await client.get("http://orders/")
    assert response.status_code == 200


async def test_server_from_another_ca_is_rejected_by_the_client(
    ca_dir, other_ca_dir, kit, tls_mesh
):
    async with tls_mesh(kit.server_config(other_ca_dir, "orders")) as server_mesh:
        async with kit.mtls_server(server_mesh) as server:
            config = kit.client_config({"ca_dir": str(ca_dir), "service": "web"}, server)
            async with tls_mesh(config) as mesh, mesh.client() as client:
                with pytest.raises(
                    meshcore.EndpointConnectError, match="CERTIFICATE_VERIFY_FAILED"
                ):
                    await client.get("http://orders/")
    assert server.seen == []


# -- inbound ----------------------------------------------------------------------------------


async def test_client_with_a_certificate_from_another_ca_is_rejected(
    ca_dir, other_ca_dir, kit, tls_mesh, tmp_path
):
    cert, key = kit.write_leaf(other_ca_dir, tmp_path / "foreign", "web")
    async with tls_mesh(kit.server_config(ca_dir, "orders")) as server_mesh:
        async with kit.mtls_server(server_mesh) as server:
            # trusts our root (so it accepts the server) but presents a foreign certificate
            tls = {"ca": str(ca_dir / "ca.crt"), "cert": str(cert), "key": str(key)}
            async with tls_mesh(kit.client_config(tls, server)) as mesh, mesh.client() as client:
                with pytest.raises(httpx.TransportError):
                    await client.get("http://orders/")
    assert server.seen == []
    assert any("certificate" in e.lower() for e in server.handshake_errors), server.handshake_errors


async def test_client_without_certificate_expired_or_plain_is_rejected(
    ca_dir, kit, tls_mesh, tmp_path
):
    ca = ca_dir / "ca.crt"
    good = kit.write_leaf(ca_dir, tmp_path / "good", "web")
    past = dt.datetime.now(dt.UTC) - dt.timedelta(days=2)
    expired = kit.write_leaf(ca_dir, tmp_path / "expired", "web", now=past, ttl=3600)
    async with tls_mesh(kit.server_config(ca_dir, "orders")) as server_mesh:
        async with kit.mtls_server(server_mesh) as server:
            assert not await rejected(raw_request, server.port, *good, ca)  # the control
            assert await rejected(raw_request, server.port, None, None, ca)  # no certificate
            assert await rejected(raw_request, server.port, *expired, ca)
            assert await rejected(plain_request, server.port)
    assert len(server.seen) == 1
    errors = " | ".join(server.handshake_errors)
    assert "PEER_DID_NOT_RETURN_A_CERTIFICATE" in errors or "certificate required" in errors.lower()
    assert "expired" in errors.lower()


async def test_openssl_s_client_confirms_the_inbound_side(
    ca_dir, other_ca_dir, kit, tls_mesh, tmp_path, require_binary
):
    openssl = require_binary("openssl")
    good = kit.write_leaf(ca_dir, tmp_path / "good", "web")
    foreign = kit.write_leaf(other_ca_dir, tmp_path / "foreign", "web")
    request = b"GET /hello HTTP/1.1\r\nHost: orders\r\nConnection: close\r\n\r\n"

    async def s_client(port: int, *extra: str) -> str:
        cmd = [
            openssl,
            "s_client",
            "-connect",
            f"127.0.0.1:{port}",
            "-CAfile",
            str(ca_dir / "ca.crt"),
            "-ign_eof",
            *extra,
        ]
        with anyio.fail_after(15):
            done = await anyio.run_process(cmd, input=request, check=False)
        return done.stdout.decode(errors="replace") + done.stderr.decode(errors="replace")

    async with tls_mesh(kit.server_config(ca_dir, "orders")) as server_mesh:
        async with kit.mtls_server(server_mesh) as server:
            ok = await s_client(server.port, "-cert", str(good[0]), "-key", str(good[1]))
            foreign_out = await s_client(
                server.port, "-cert", str(foreign[0]), "-key", str(foreign[1])
            )
            none_out = await s_client(server.port)
    assert "HTTP/1.1 200" in ok and WEB in ok
    assert "Verify return code: 0 (ok)" in ok  # s_client verified the server chain too
    assert "HTTP/1.1 200" not in foreign_out
    assert "HTTP/1.1 200" not in none_out
    assert [s[3] for s in server.seen] == ["/hello"]


# -- authorization ----------------------------------------------------------------------------


POLICY = [
    {"identities": [WEB], "methods": ["GET"], "paths": ["/orders"]},
    {"identities": ["spiffe://example.org/ns/ops/*"]},
]


async def test_authorization_per_identity_method_and_path(ca_dir, kit, tls_mesh):
    async with tls_mesh(kit.server_config(ca_dir, "orders", allow=POLICY)) as server_mesh:
        async with kit.mtls_server(server_mesh) as server:
            results = {}
            for service, namespace in (
                ("web", "default"),
                ("admin", "ops"),
                ("intruder", "default"),
            ):
                tls = {
                    "ca_dir": str(ca_dir),
                    "service": service,
                    "namespace": namespace,
                    "identities": {"orders": "spiffe://example.org/ns/default/sa/orders"},
                }
                async with (
                    tls_mesh(kit.client_config(tls, server)) as mesh,
                    mesh.client() as client,
                ):
                    for method, path in (
                        ("GET", "/orders/7"),
                        ("POST", "/orders/7"),
                        ("GET", "/admin"),
                        ("GET", "/orders/../admin"),
                        ("GET", "/ordersx"),
                    ):
                        r = await client.request(method, f"http://orders{path}")
                        results[(service, method, path)] = (r.status_code, r.text)
            status = meshcore_tls.status(server_mesh)
    codes = {k: v[0] for k, v in results.items()}
    assert codes[("web", "GET", "/orders/7")] == 200
    assert codes[("web", "POST", "/orders/7")] == 403
    assert codes[("web", "GET", "/admin")] == 403
    assert codes[("web", "GET", "/orders/../admin")] == 403
    assert codes[("web", "GET", "/ordersx")] == 403
    assert all(codes[("admin", m, p)] == 200 for (s, m, p) in codes if s == "admin")
    assert all(codes[k] == 403 for k in codes if k[0] == "intruder")
    reason = results[("intruder", "GET", "/orders/7")][1]
    assert reason == "spiffe://example.org/ns/default/sa/intruder is not allowed to GET /orders/7"
    assert status["denied"] == 9 and status["allowed"] == 6


async def test_no_policy_allows_every_authenticated_peer_and_denies_plain(ca_dir, kit, tls_mesh):
    async with tls_mesh(kit.server_config(ca_dir, "orders")) as server_mesh:
        async with kit.mtls_server(server_mesh) as server:
            tls = {
                "ca_dir": str(ca_dir),
                "service": "anyone",
                "namespace": "elsewhere",
                "identities": {"orders": "spiffe://example.org/ns/default/sa/orders"},
            }
            async with tls_mesh(kit.client_config(tls, server)) as mesh, mesh.client() as client:
                assert (
                    await client.post("http://orders/anything", content=b"x")
                ).status_code == 200
        # a plain connection has no peer: nobody is authenticated
        plain = meshcore.Request("GET", "http://orders/")
        assert server_mesh.plugins.authorize(plain, None, server_mesh) == "a client certificate is required"


async def test_an_impostor_endpoint_is_retried_elsewhere_and_ejected(ca_dir, kit, tls_mesh):
    """Two instances of `orders`, one presenting the identity of `payments`: the rejection is
    an endpoint failure, so retry sends the request to the real instance and the breaker's
    outlier ejection takes the impostor out, instead of a permanent 50 % error rate."""
    async with (
        tls_mesh(kit.server_config(ca_dir, "orders")) as good_mesh,
        tls_mesh(kit.server_config(ca_dir, "payments")) as bad_mesh,
        kit.mtls_server(good_mesh) as good,
        kit.mtls_server(bad_mesh) as bad,
    ):
        service = static_service(
            [good.address, bad.address],
            balancer="round-robin",
            resilience=["retry", "breaker"],
        )
        config = {"tls": {"ca_dir": str(ca_dir), "service": "web"}, "services": {"orders": service}}
        mesh = meshcore.Mesh(config, ["tls", "retry", "breaker", "round-robin"])
        async with mesh, mesh.client() as client:
            statuses = [(await client.get(f"http://orders/{i}")).status_code for i in range(20)]
            state = mesh.state()
    assert statuses == [200] * 20  # no client error: every rejection was retried elsewhere
    assert len(good.seen) == 20 and bad.seen == []  # nothing was ever sent to the impostor
    orders = state["services"]["orders"]
    by_id = {ep["id"]: ep for ep in orders["endpoints"]}
    impostor = by_id[bad.address]
    assert impostor["ejected"] and impostor["times_ejected"] == 1
    assert impostor["failures"] == 5  # Envoy's consecutive_5xx default, then never picked
    assert by_id[good.address]["failures"] == 0
    assert orders["breaker"]["endpoints"][bad.address]["ejected"]
    assert state["state"]["tls"]["rejected_servers"] == 5


def test_identity_rejected_is_a_replayable_connect_failure_of_its_endpoint():
    endpoint = meshcore.Endpoint("127.0.0.1", 8443)
    error = meshcore.IdentityRejected("who", expected="a", actual="b", endpoint=endpoint)
    assert isinstance(error, meshcore.EndpointError)
    assert (error.kind, error.replayable, error.endpoint) == ("connect-failure", True, endpoint)
    assert (error.expected, error.actual) == ("a", "b")
