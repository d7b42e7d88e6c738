"""The identity service and identity mode: real HTTPS handshakes on loopback, both backends.

The service runs in-process on the test's event loop (as the demo and embedding
applications run it); workloads are meshes with `[tls] identity_service`, their certificates
checked by real mTLS requests to `MTLSServer` (conftest.py).
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import ssl
import time
from pathlib import Path
from typing import Any

import anyio
import meshcore
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from meshcore.testing import virtual_trio

import meshcore_tls
from meshcore_tls import CA, IdentityService, TokenStore
from meshcore_tls._ca import write_private
from meshcore_tls._identity_client import IdentityClient, IdentityError
from meshcore_tls._identity_service import TOKENS, service_spiffe_id

pytestmark = pytest.mark.anyio

TD = "example.org"
WEB = "spiffe://example.org/ns/shop/sa/web"
ADMIN = "spiffe://example.org/ns/shop/sa/admin"
ORDERS = "spiffe://example.org/ns/shop/sa/orders"


def make_service_dir(root_dir: Path, out: Path) -> Path:
    """What `meshcore -p tls ca intermediate --ca root_dir out` writes."""
    return meshcore_tls.make_identity_dir(CA.load(root_dir, need_key=True), out)


@pytest.fixture
def root_crt(ca_dir: Path, tmp_path: Path) -> Path:
    """The root certificate alone, in a directory of its own (what workloads get)."""
    d = tmp_path / "trust"
    d.mkdir()
    (d / "root.crt").write_bytes((ca_dir / "ca.crt").read_bytes())
    return d / "root.crt"


@pytest.fixture
def service_dir(ca_dir: Path, tmp_path: Path) -> Path:
    return make_service_dir(ca_dir, tmp_path / "identity")


def token_file(service_dir: Path, tmp_path: Path, spiffe_id: str, **kw: Any) -> Path:
    _, token = TokenStore(service_dir / TOKENS).create(spiffe_id, **kw)
    path = tmp_path / f"token-{spiffe_id.rpartition('/')[2]}-{time.monotonic_ns()}"
    write_private(path, token.encode())
    return path


def identity_tls(
    svc: IdentityService, root_crt: Path, token: Path | None, **kw: Any
) -> dict[str, Any]:
    tls: dict[str, Any] = {
        "identity_service": svc.address,
        "ca": str(root_crt),
        "namespace": "shop",
        **kw,
    }
    if token is not None:
        tls["join_token_file"] = str(token)
    return tls


def bootstrap_context(root_crt: Path, chain: bytes = b"", key: bytes = b"") -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.load_verify_locations(str(root_crt))
    if chain:
        from meshcore_tls._runtime import _load_chain

        _load_chain(ctx, chain, key)
    return ctx


# -- issuance and use -------------------------------------------------------------------------


async def test_a_join_token_gets_exactly_its_identity_and_the_mesh_runs_on_it(
    ca_dir, service_dir, root_crt, tmp_path, kit, tls_mesh, caplog
):
    caplog.set_level(logging.INFO, logger="meshcore.tls")
    web_token = token_file(service_dir, tmp_path, WEB)
    orders_token = token_file(service_dir, tmp_path, ORDERS)
    async with IdentityService(service_dir, port=0) as service:
        server_tls = identity_tls(service, root_crt, orders_token, service="orders")
        async with tls_mesh({"tls": server_tls, "services": {}}) as server_mesh:
            async with kit.mtls_server(server_mesh) as server:
                client_tls = identity_tls(service, root_crt, web_token, service="web")
                async with tls_mesh(kit.client_config(client_tls, server)) as mesh:
                    async with mesh.client() as client:
                        response = await client.get("http://orders/items")
                    state = mesh.state()["state"]["tls"]
                    workload = meshcore_tls.workload(mesh)
                    chain = workload.cert
        status = service.status()
    assert response.status_code == 200 and response.text == WEB
    assert state["mode"] == "identity" and state["identity"] == WEB
    assert state["credential"] == "join token" and state["renewals"] == 1
    assert state["identity_service"] == service.address and state["last_renewal"]
    assert status["issued"] == 2 and status["denied"] == {}
    # signed by the intermediate, not the root; a leaf; the configured 24 h lifetime
    intermediate = x509.load_pem_x509_certificate((service_dir / "intermediate.crt").read_bytes())
    assert chain.issuer == intermediate.subject
    assert chain.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is False
    lifetime = chain.not_valid_after_utc - chain.not_valid_before_utc
    assert lifetime == dt.timedelta(hours=24, minutes=1)
    # every issuance logged with the token's id, never the token
    secret = web_token.read_text()
    token_id = secret.partition(".")[0]
    assert f"issued {WEB} serial {chain.serial_number:x}" in caplog.text
    assert f"credential: join token {token_id}" in caplog.text
    assert secret not in caplog.text and secret.partition(".")[2] not in caplog.text
    # the token was single-use: its record is gone
    assert not (service_dir / TOKENS / f"{token_id}.json").exists()


REFUSALS = [
    # (case, token spiffe id, how to spoil it, requested id, status, reason)
    ("no credential", None, None, None, 401, "no_credential"),
    ("used token", WEB, "use", None, 401, "token_unknown"),
    ("expired token", WEB, "expire", None, 401, "token_expired"),
    ("token for another identity", WEB, None, ADMIN, 403, "identity_not_allowed"),
    ("pattern token, identity outside it", "spiffe://example.org/ns/shop/*", None,
     "spiffe://example.org/ns/billing/sa/web", 403, "identity_not_allowed"),
    ("pattern token, dot segments", "spiffe://example.org/ns/shop/*", None,
     "spiffe://example.org/ns/shop/../../ns/ops/sa/admin", 403, "identity_not_allowed"),
    ("pattern token, no identity named", "spiffe://example.org/ns/shop/*", None,
     None, 400, "bad_request"),
    ("wrong secret", WEB, "forge", None, 401, "token_unknown"),
    ("malformed token", WEB, "mangle", None, 401, "token_malformed"),
]


@pytest.mark.parametrize(
    "case,bound,spoil,wanted,status,reason", REFUSALS, ids=[r[0] for r in REFUSALS]
)
async def test_refused_credentials_get_nothing_and_are_counted(
    service_dir, root_crt, case, bound, spoil, wanted, status, reason
):
    store = TokenStore(service_dir / TOKENS)
    token = None
    if bound is not None:
        if spoil == "expire":
            past = TokenStore(service_dir / TOKENS, now=lambda: time.time() - 3600)
            _, token = past.create(bound, ttl=60)
        else:
            _, token = store.create(bound)
        if spoil == "use":
            store.use(store.check(token))
        elif spoil == "forge":
            token = token.partition(".")[0] + ".AAAA" + token[-20:]
        elif spoil == "mangle":
            token = "not-a-token"
    async with IdentityService(service_dir, port=0) as service:
        client = IdentityClient(service.address, service_spiffe_id(TD))
        key = ec.generate_private_key(ec.SECP256R1())
        with pytest.raises(IdentityError) as info:
            await client.sign(bootstrap_context(root_crt), key, wanted, token)
        status_after = service.status()
    assert info.value.status == status and info.value.reason == reason
    assert status_after["issued"] == 0 and status_after["denied"] == {reason: 1}
    if token is not None:
        assert token not in str(info.value)


async def test_a_workload_whose_token_is_refused_does_not_start(
    service_dir, root_crt, tmp_path, tls_mesh
):
    token = token_file(service_dir, tmp_path, WEB)
    store = TokenStore(service_dir / TOKENS)
    store.use(store.check(token.read_text()))
    async with IdentityService(service_dir, port=0) as service:
        mesh = tls_mesh({"tls": identity_tls(service, root_crt, token, service="web"), "services": {}})
        with pytest.raises(meshcore.ConfigError, match=r"tls\.identity_service: .*already used"):
            async with mesh:
                pass


async def test_identity_mode_without_any_credential_fails_at_start(root_crt, tls_mesh, monkeypatch):
    monkeypatch.delenv("MESHCORE_JOIN_TOKEN", raising=False)
    tls = {"identity_service": "127.0.0.1:1", "ca": str(root_crt), "service": "web"}
    with pytest.raises(meshcore.ConfigError, match="needs a join token"):
        async with tls_mesh({"tls": tls, "services": {}}):
            pass


async def test_the_token_is_never_sent_to_a_server_that_is_not_the_identity_service(
    service_dir, root_crt, tmp_path, tls_mesh
):
    token = token_file(service_dir, tmp_path, WEB)
    async with IdentityService(service_dir, port=0) as service:
        tls = identity_tls(
            service, root_crt, token, service="web",
            identity_service_id="spiffe://example.org/ns/shop/sa/orders",
        )
        with pytest.raises(meshcore.ConfigError, match="nothing was sent"):
            async with tls_mesh({"tls": tls, "services": {}}):
                pass
        assert service.status()["denied"] == {}
    # the token is still good
    assert TokenStore(service_dir / TOKENS).check(token.read_text()).spiffe_id == WEB


# -- what a CSR can and cannot ask for ---------------------------------------------------------


def _csr(key: Any, *, sans: list[x509.GeneralName] = (), ca: bool = False, cn: str = "") -> bytes:
    builder = x509.CertificateSigningRequestBuilder().subject_name(
        x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn or "x")])
    )
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(list(sans)), critical=False)
    if ca:
        builder = builder.add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        builder = builder.add_extension(
            x509.KeyUsage(True, False, False, False, False, True, True, False, False), critical=True
        )
    builder = builder.add_extension(
        x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CODE_SIGNING]), critical=False
    )
    return builder.sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM)


def _bad_signature(key: Any) -> bytes:
    der = bytearray(x509.load_pem_x509_csr(_csr(key)).public_bytes(serialization.Encoding.DER))
    der[-5] ^= 0xFF  # inside the signature value
    csr = x509.load_der_x509_csr(bytes(der))
    return csr.public_bytes(serialization.Encoding.PEM)


P256 = ec.generate_private_key(ec.SECP256R1())
CSR_CASES = [
    # (case, csr, extra request fields, expected status or None when issued)
    ("asks to be a CA", _csr(P256, ca=True), {}, None),
    ("asks for another SPIFFE ID and extra SANs", _csr(P256, sans=[
        x509.UniformResourceIdentifier(ADMIN),
        x509.UniformResourceIdentifier("spiffe://example.org"),
        x509.DNSName("identity.example.org"),
        x509.DNSName("*.example.org"),
        x509.RFC822Name("root@example.org"),
    ], cn="admin"), {}, None),
    ("asks for ten years", _csr(P256), {"ttl": 10 * 365 * 86400, "not_after": "2099-01-01"}, None),
    ("bad signature", _bad_signature(P256), {}, 400),
    ("weak RSA key", _csr(rsa.generate_private_key(65537, 1024)), {}, 400),
    ("not a CSR", b"-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n", {}, 400),
    ("huge CSR", _csr(P256, sans=[x509.DNSName(f"h{i}.example.org") for i in range(4000)]), {}, 413),
]


@pytest.mark.parametrize("case,csr,extra,expected", CSR_CASES, ids=[c[0] for c in CSR_CASES])
async def test_nothing_in_a_csr_changes_what_is_signed(
    service_dir, root_crt, case, csr, extra, expected
):
    _, token = TokenStore(service_dir / TOKENS).create(WEB)
    async with IdentityService(service_dir, port=0, ttl=3600) as service:
        client = IdentityClient(service.address, service_spiffe_id(TD))
        body = json.dumps({"csr": csr.decode(), **extra}).encode()
        answer = await client._exchange(
            bootstrap_context(root_crt), "POST", "/v1/sign",
            {"authorization": f"Bearer {token}", "content-type": "application/json"}, body,
        )
        status = service.status()
    if expected is not None:
        assert answer.status == expected, answer.body
        assert status["issued"] == 0
        # a refused request does not spend the token
        assert TokenStore(service_dir / TOKENS).check(token).uses_left == 1
        return
    assert answer.status == 200, answer.body
    cert = x509.load_pem_x509_certificate(json.loads(answer.body)["certificate"].encode())
    assert meshcore_tls.spiffe_ids_of(cert) == [WEB]
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert list(san) == [x509.UniformResourceIdentifier(WEB)]
    assert cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is False
    usage = cert.extensions.get_extension_for_class(x509.KeyUsage).value
    assert not usage.key_cert_sign and not usage.crl_sign
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
    assert cert.not_valid_after_utc - cert.not_valid_before_utc == dt.timedelta(seconds=3660)
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "web"
    assert status["issued"] == 1


async def test_endpoints_bounds_and_the_bundle(service_dir, root_crt, ca_dir):
    async with IdentityService(service_dir, port=0) as service:
        client = IdentityClient(service.address, service_spiffe_id(TD))
        ctx = bootstrap_context(root_crt)
        bundle = await client.bundle(ctx)
        missing = await client._exchange(ctx, "GET", "/v1/nothing", {}, b"")
        wrong_method = await client._exchange(ctx, "GET", "/v1/sign", {}, b"")
        huge_head = await client._exchange(ctx, "GET", "/v1/bundle", {"x-pad": "a" * 20000}, b"")
        nested = await client._exchange(ctx, "POST", "/v1/sign", {}, b"[" * 60000)
        # content-length and chunked at once (request smuggling's shape): refused
        both_lengths = await client._exchange(
            ctx, "POST", "/v1/sign", {"transfer-encoding": "chunked"}, b"ffffff\r\n" + b"a" * 70000
        )
        # plain TCP, and a TLS client that goes quiet: counted, nothing else happens
        async with await anyio.connect_tcp("127.0.0.1", service.port) as plain:
            await plain.send(b"GET /v1/health HTTP/1.1\r\n\r\n")
            with pytest.raises((anyio.EndOfStream, anyio.BrokenResourceError)):
                await plain.receive()
        health = await client._exchange(ctx, "GET", "/v1/health", {}, b"")
        status = service.status()
    assert bundle == (ca_dir / "ca.crt").read_bytes()
    assert (missing.status, wrong_method.status, huge_head.status) == (404, 405, 431)
    assert (nested.status, both_lengths.status) == (400, 400)
    assert json.loads(health.body)["status"] == "ok"
    assert status["denied"]["handshake"] == 1 and status["issued"] == 0


# -- renewal ----------------------------------------------------------------------------------


# Jump the virtual clock only after 50 ms of real idleness: the service is real sockets on
# loopback, and a TCP handshake may finish a moment later than the send that started it.
VIRTUAL = virtual_trio(autojump_threshold=0.05)


@pytest.mark.parametrize("anyio_backend", [VIRTUAL])
async def test_renewal_at_two_thirds_over_mtls_in_virtual_time(
    anyio_backend, service_dir, root_crt, tmp_path, tls_mesh
):
    token = token_file(service_dir, tmp_path, WEB)
    async with IdentityService(service_dir, port=0, ttl=3600) as service:
        tls = identity_tls(service, root_crt, token, service="web")
        async with tls_mesh({"tls": tls, "services": {}}) as mesh:
            workload = meshcore_tls.workload(mesh)
            first = workload.cert.serial_number
            start = anyio.current_time()
            await workload.rotated.wait()
            elapsed = anyio.current_time() - start
            await workload.rotated.wait()
            state = meshcore_tls.status(mesh)
        status = service.status()
    assert elapsed == pytest.approx(2400, rel=1e-3)
    assert workload.cert.serial_number != first
    assert state["credential"] == "certificate" and state["renewals"] == 3
    assert state["rotations"] == 2 and state["renew_errors"] == 0
    assert (status["issued"], status["renewed"]) == (1, 2)


# Jump the virtual clock only after 50 ms of real idleness: the service is real sockets on
# loopback, and a TCP handshake may finish a moment later than the send that started it.
VIRTUAL = virtual_trio(autojump_threshold=0.05)


@pytest.mark.parametrize("anyio_backend", [VIRTUAL])
async def test_service_down_past_the_margin_keeps_the_cert_retries_and_recovers(
    anyio_backend, service_dir, root_crt, tmp_path, ca_dir, kit, tls_mesh, caplog
):
    token = token_file(service_dir, tmp_path, WEB)
    service = IdentityService(service_dir, port=0, ttl=3600)

    async def run(svc: IdentityService, scope: anyio.CancelScope, *, task_status: Any) -> None:
        with scope:
            await svc.serve(task_status=task_status)

    async with anyio.create_task_group() as services:
        down = anyio.CancelScope()
        await services.start(run, service, down)
        async with tls_mesh(kit.server_config(ca_dir, "orders", namespace="shop")) as server_mesh:
            async with kit.mtls_server(server_mesh) as server:
                tls = identity_tls(service, root_crt, token, service="web")
                async with tls_mesh(kit.client_config(tls, server)) as mesh:
                    workload = meshcore_tls.workload(mesh)
                    first = workload.cert.serial_number
                    source = workload.identity_source
                    sign = source.client.sign
                    start = anyio.current_time()
                    errors_at: list[float] = []

                    async def recorded_sign(*args: Any, **kwargs: Any) -> Any:
                        errors_at.append(anyio.current_time() - start)
                        return await sign(*args, **kwargs)

                    source.client.sign = recorded_sign  # a spy: the real call still happens
                    # The service goes away. Renewal is due at 2400 s, the margin after it is
                    # 1200 s; the outage lasts past it.
                    down.cancel()
                    await anyio.sleep(2400 + 1500)
                    # still serving with the current certificate
                    async with mesh.client() as client:
                        response = await client.get("http://orders/during-outage")
                    assert response.status_code == 200
                    assert workload.cert.serial_number == first
                    state = workload.status()
                    assert state["last_error"].startswith(f"identity service {service.address}")
                    assert state["renew_errors"] == len(errors_at)
                    # back on the same address
                    await services.start(
                        run, IdentityService(service_dir, port=service.port, ttl=3600),
                        anyio.CancelScope(),
                    )
                    with anyio.fail_after(60):
                        await workload.rotated.wait()
                    async with mesh.client() as client:
                        response = await client.get("http://orders/after")
                    recovered = workload.status()
        services.cancel_scope.cancel()
    errors_at = errors_at[:state["renew_errors"]]
    assert errors_at[0] == pytest.approx(2400, abs=1)
    gaps = [b - a for a, b in zip(errors_at, errors_at[1:])]
    assert len(gaps) >= 20
    # growing with jitter, never beyond a quarter of the margin capped at 30 s, never immediate
    assert all(0.05 <= g <= 30.6 for g in gaps), gaps
    assert max(gaps[:3]) < 10 and max(gaps[-10:]) > 15
    assert len(set(round(g, 2) for g in gaps[-10:])) > 5
    assert response.status_code == 200 and recovered["serial"] != f"{first:x}"
    assert recovered["credential"] == "certificate"
    assert "keeping the current certificate" in caplog.text


# -- no CA key anywhere near a workload ---------------------------------------------------------


async def test_no_ca_key_in_any_workload_directory_and_restart_needs_no_new_token(
    ca_dir, service_dir, root_crt, tmp_path, kit, tls_mesh
):
    dirs = {name: tmp_path / "workloads" / name for name in ("web", "orders")}
    tokens = {
        "web": token_file(service_dir, tmp_path, WEB),
        "orders": token_file(service_dir, tmp_path, ORDERS),
    }
    async with IdentityService(service_dir, port=0) as service:

        def tls(name: str) -> dict[str, Any]:
            return identity_tls(
                service, root_crt, tokens[name], service=name, identity_dir=str(dirs[name])
            )

        async with tls_mesh({"tls": tls("orders"), "services": {}}) as server_mesh:
            async with kit.mtls_server(server_mesh) as server:
                async with tls_mesh(kit.client_config(tls("web"), server)) as mesh:
                    async with mesh.client() as client:
                        assert (await client.get("http://orders/")).status_code == 200
                    first = meshcore_tls.workload(mesh).cert.serial_number
                # Restarted, with its (used) token still configured: it renews with the saved
                # certificate over mTLS instead.
                async with tls_mesh(kit.client_config(tls("web"), server)) as mesh:
                    async with mesh.client() as client:
                        assert (await client.get("http://orders/")).status_code == 200
                    again = meshcore_tls.workload(mesh)
                    saved_state = again.status()
                    await again.identity_source.fetch()
                    renewed = again.status()
        status = service.status()
    assert saved_state["serial"] == f"{first:x}" and saved_state["renewals"] == 1
    assert renewed["credential"] == "certificate" and renewed["serial"] != saved_state["serial"]
    assert (status["issued"], status["renewed"]) == (2, 1)

    ca_keys = [
        CA.load(ca_dir, need_key=True).key.public_key(),
        serialization.load_pem_private_key(
            (service_dir / "intermediate.key").read_bytes(), None
        ).public_key(),
    ]
    for d in dirs.values():
        files = sorted(p.name for p in d.rglob("*"))
        assert files == ["bundle.crt", "svid.crt", "svid.key"], files
        assert not any(p.name in ("ca.key", "intermediate.key") for p in d.rglob("*"))
        key_path = d / "svid.key"
        assert key_path.stat().st_mode & 0o777 == 0o600
        key = serialization.load_pem_private_key(key_path.read_bytes(), None)
        assert key.public_key() not in ca_keys
        leaf = x509.load_pem_x509_certificate((d / "svid.crt").read_bytes())
        assert leaf.public_key() == key.public_key()
    # and nothing below the workloads' trust directory but the root certificate
    assert sorted(os.listdir(root_crt.parent)) == ["root.crt"]


async def test_identity_mode_refuses_a_ca_dir_holding_the_ca_key(ca_dir, tls_mesh):
    tls = {"identity_service": "127.0.0.1:1", "ca_dir": str(ca_dir), "service": "web"}
    with pytest.raises(meshcore.ConfigError, match=r"tls\.ca_dir: identity mode: .* holds ca.key"):
        async with tls_mesh({"tls": tls, "services": {}}):
            pass


# -- the token store --------------------------------------------------------------------------


def test_tokens_are_stored_hashed_0600_exclusive_and_not_through_symlinks(tmp_path):
    store = TokenStore(tmp_path / "tokens")
    token_id, token = store.create(WEB, ttl=60, uses=2)
    path = tmp_path / "tokens" / f"{token_id}.json"
    assert path.stat().st_mode & 0o777 == 0o600
    assert (tmp_path / "tokens").stat().st_mode & 0o777 == 0o700
    text = path.read_text()
    assert token.partition(".")[2] not in text and "sha256" in text
    grant = store.check(token)
    store.use(grant)
    assert store.check(token).uses_left == 1
    store.use(store.check(token))
    assert not path.exists()
    with pytest.raises(meshcore_tls._tokens.TokenError, match="already used"):
        store.check(token)

    # a symlinked token directory is refused
    real = tmp_path / "elsewhere"
    real.mkdir(mode=0o700)
    (tmp_path / "link").symlink_to(real)
    with pytest.raises(ValueError, match="symlinks are refused"):
        TokenStore(tmp_path / "link").create(WEB)
    # a token file that is a symlink is not followed
    target = tmp_path / "target.json"
    target.write_text("{}")
    (tmp_path / "tokens" / "0123456789abcdef.json").symlink_to(target)
    with pytest.raises(meshcore_tls._tokens.TokenError, match="unreadable"):
        store.check("0123456789abcdef.secret")
    # a directory others can enter is refused
    (tmp_path / "tokens").chmod(0o755)
    with pytest.raises(ValueError, match="open to others"):
        store.create(WEB)
    # hostile ids and identities
    (tmp_path / "tokens").chmod(0o700)
    with pytest.raises(ValueError, match="SPIFFE"):
        store.create("https://example.org/web")
    with pytest.raises(ValueError, match="token id"):
        store.revoke("../../etc/passwd")


def test_cli_intermediate_token_and_their_errors(ca_dir, tmp_path):
    import click
    from click.testing import CliRunner

    group = click.Group("meshcore")
    meshcore_tls.meshcore_cli(group)
    runner = CliRunner()
    out = tmp_path / "identity"
    result = runner.invoke(group, ["ca", "intermediate", "--ca", str(ca_dir), str(out)])
    assert result.exit_code == 0, result.output
    assert (out / "intermediate.key").stat().st_mode & 0o777 == 0o600
    assert "BEGIN" not in result.output
    again = runner.invoke(group, ["ca", "intermediate", "--ca", str(ca_dir), str(out)])
    assert again.exit_code == 2 and "already exists" in again.output
    service = IdentityService(out, port=0)
    assert service.status()["roots"] == 1

    token_path = tmp_path / "web.token"
    created = runner.invoke(group, [
        "identity", "token", "create", "--dir", str(out), "--spiffe-id", WEB,
        "--ttl", "1h", "--uses", "2", "--out", str(token_path),
    ])
    assert created.exit_code == 0, created.output
    token = token_path.read_text().strip()
    assert token not in created.output and token_path.stat().st_mode & 0o777 == 0o600
    listed = runner.invoke(group, ["identity", "token", "list", "--dir", str(out)])
    assert WEB in listed.output and "uses_left=2" in listed.output
    assert token.partition(".")[2] not in listed.output
    bad = runner.invoke(group, [
        "identity", "token", "create", "--dir", str(out), "--spiffe-id", "web",
    ])
    assert bad.exit_code == 2 and "not a SPIFFE ID" in bad.output
    revoked = runner.invoke(group, ["identity", "token", "revoke", "--dir", str(out), token[:16]])
    assert revoked.exit_code == 0
    missing = runner.invoke(group, ["identity", "serve", "--dir", str(tmp_path / "nowhere")])
    assert missing.exit_code == 2 and "intermediate.crt: missing" in missing.output


# -- property: whatever the CSR and request say, the certificate is the token's --------------

_names = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789-.*/", min_size=1, max_size=30)
_sans = st.lists(
    st.one_of(
        _names.map(lambda n: x509.DNSName(n)),
        _names.map(lambda n: x509.UniformResourceIdentifier(f"spiffe://example.org/{n}")),
        _names.map(lambda n: x509.UniformResourceIdentifier(f"spiffe://{n}")),
        st.just(x509.UniformResourceIdentifier(ADMIN)),
        st.ip_addresses().map(x509.IPAddress),
    ),
    max_size=6,
)


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    sans=_sans,
    ca=st.booleans(),
    cn=_names,
    wanted=st.one_of(st.none(), st.just(WEB), st.just(ADMIN), _names.map(lambda n: f"spiffe://example.org/{n}")),
    extra=st.dictionaries(st.sampled_from(["ttl", "not_after", "is_ca", "sans"]), st.integers() | st.text(max_size=5), max_size=3),
)
def test_fuzzed_requests_get_exactly_the_token_identity_or_nothing(
    service_dir, sans, ca, cn, wanted, extra
):
    service = IdentityService(service_dir, port=0, ttl=1800)
    _, token = TokenStore(service_dir / TOKENS).create(WEB)
    key = ec.generate_private_key(ec.SECP256R1())
    request = {**extra, "csr": _csr(key, sans=sans, ca=ca, cn=cn).decode()}
    if wanted is not None:
        request["spiffe_id"] = wanted
    try:
        answer = service.sign(json.dumps(request).encode(), token, None)
    except ValueError as exc:  # refused: only ever because another identity was asked for
        assert wanted not in (None, WEB), exc
        assert service.issued == 0
        return
    cert = x509.load_pem_x509_certificate(answer["certificate"].encode())
    assert wanted in (None, WEB)
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert list(san) == [x509.UniformResourceIdentifier(WEB)]
    assert cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is False
    assert cert.not_valid_after_utc - cert.not_valid_before_utc == dt.timedelta(seconds=1860)
    assert cert.public_key() == key.public_key()


async def test_a_renewal_gets_only_the_presented_identity(
    service_dir, root_crt, other_ca_dir, ca_dir
):
    async with IdentityService(service_dir, port=0) as service:
        client = IdentityClient(service.address, service_spiffe_id(TD))
        key = ec.generate_private_key(ec.SECP256R1())
        # a valid mesh certificate for web (here straight from the root, as files mode has)
        web = CA.load(ca_dir, need_key=True).issue("web", "shop")
        ctx = bootstrap_context(root_crt, web.cert_pem, web.key_pem)
        with pytest.raises(IdentityError) as other:
            await client.sign(ctx, key, ADMIN)
        renewed = await client.sign(ctx, key, None)
        # a certificate from another root does not even get through the handshake
        forged = CA.load(other_ca_dir, need_key=True).issue("web", "shop")
        with pytest.raises(IdentityError):
            await client.sign(bootstrap_context(root_crt, forged.cert_pem, forged.key_pem), key, None)
        status = service.status()
    assert (other.value.status, other.value.reason) == (403, "identity_not_allowed")
    assert renewed.spiffe_id == WEB
    assert status["renewed"] == 1 and status["issued"] == 0
    assert status["denied"] == {"identity_not_allowed": 1, "handshake": 1}


async def test_an_expired_saved_certificate_falls_back_to_the_join_token(
    ca_dir, service_dir, root_crt, tmp_path, tls_mesh, caplog
):
    saved = tmp_path / "web-state"
    saved.mkdir(mode=0o700)
    old = CA.load(ca_dir, need_key=True).issue(
        "web", "shop", ttl=60, now=dt.datetime.now(dt.UTC) - dt.timedelta(hours=1)
    )
    write_private(saved / "svid.key", old.key_pem)
    write_private(saved / "svid.crt", old.cert_pem)
    write_private(saved / "bundle.crt", (ca_dir / "ca.crt").read_bytes())
    token = token_file(service_dir, tmp_path, WEB)
    async with IdentityService(service_dir, port=0) as service:
        tls = identity_tls(service, root_crt, token, service="web", identity_dir=str(saved))
        async with tls_mesh({"tls": tls, "services": {}}) as mesh:
            state = meshcore_tls.status(mesh)
    assert state["credential"] == "join token" and state["serial"] != f"{old.cert.serial_number:x}"
    assert "not using the saved certificate" in caplog.text and "expired" in caplog.text
    assert x509.load_pem_x509_certificate((saved / "svid.crt").read_bytes()).serial_number != (
        old.cert.serial_number
    )


async def test_identity_serve_command_signs_for_a_token(service_dir, root_crt):
    import subprocess
    import sys

    from meshcore.testing import free_port

    port = free_port()
    _, token = TokenStore(service_dir / TOKENS).create(WEB)
    command = [
        sys.executable, "-m", "meshcore", "-p", "tls", "identity", "serve",
        "--dir", str(service_dir), "--listen", f"127.0.0.1:{port}", "--ttl", "2h",
    ]
    process = await anyio.open_process(command, stderr=subprocess.PIPE)
    try:
        client = IdentityClient(f"127.0.0.1:{port}", service_spiffe_id(TD))
        with anyio.fail_after(30):
            while True:
                try:
                    await (await anyio.connect_tcp("127.0.0.1", port)).aclose()
                    break
                except OSError:
                    assert process.returncode is None
                    await anyio.sleep(0.05)
            signed = await client.sign(
                bootstrap_context(root_crt), ec.generate_private_key(ec.SECP256R1()), None, token
            )
    finally:
        process.terminate()
        await process.wait()
        chunks = []
        assert process.stderr is not None
        async for chunk in process.stderr:
            chunks.append(chunk)
        stderr = b"".join(chunks).decode()
    assert signed.spiffe_id == WEB
    assert signed.cert.not_valid_after_utc - signed.cert.not_valid_before_utc == dt.timedelta(
        hours=2, minutes=1
    )
    assert "identity service spiffe://example.org/meshcore/identity" in stderr
    assert f"issued {WEB} serial {signed.cert.serial_number:x}" in stderr
    assert token not in stderr and token.partition(".")[2] not in stderr


async def test_after_expiry_the_workload_starts_over_with_a_new_token_from_its_file(
    service_dir, root_crt, tmp_path, tls_mesh
):
    token = token_file(service_dir, tmp_path, WEB)

    async def run(svc: IdentityService, scope: anyio.CancelScope, *, task_status: Any) -> None:
        with scope:
            await svc.serve(task_status=task_status)

    async with anyio.create_task_group() as services:
        down = anyio.CancelScope()
        service = IdentityService(service_dir, port=0, ttl=2)
        await services.start(run, service, down)
        tls = identity_tls(service, root_crt, token, service="web", renew_at=0.5)
        async with tls_mesh({"tls": tls, "services": {}}) as mesh:
            workload = meshcore_tls.workload(mesh)
            first = workload.cert.serial_number
            down.cancel()
            with anyio.fail_after(20):
                while workload.seconds_left() > 0:
                    await anyio.sleep(0.1)
            # expired; the old token is spent, so the operator hands out a new one
            _, new = TokenStore(service_dir / TOKENS).create(WEB)
            write_private(token, new.encode(), overwrite=True)
            rotated = workload.rotated
            await services.start(
                run, IdentityService(service_dir, port=service.port, ttl=60), anyio.CancelScope()
            )
            with anyio.fail_after(20):
                await rotated.wait()
            state = workload.status()
        services.cancel_scope.cancel()
    assert state["credential"] == "join token" and state["serial"] != f"{first:x}"
    assert state["renew_errors"] >= 1 and state["seconds_left"] > 50
