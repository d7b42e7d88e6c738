"""TLS with client certificates and username/password auth, each against its own real
single-member etcd (so the shared test cluster stays plain): discovery and registration work
with the right credentials, fail visibly (counted, stale kept) with wrong ones, and an auth
token that expires is renewed without losing the registration."""

from __future__ import annotations

import datetime
import ipaddress
import ssl
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import httpx
import meshcore_etcd
import pytest
from etcd_testkit import Admin, EtcdCluster
from meshcore_etcd import ClusterConfig, EtcdDiscovery, WatchOptions

from meshcore.testing import require_binary
from meshcore.testing.conformance.discovery import RecordingSink

pytestmark = pytest.mark.anyio


def _write_pki(root: Path) -> dict[str, str]:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = datetime.datetime.now(datetime.UTC)

    def name(cn: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])

    def save(stem: str, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey) -> None:
        (root / f"{stem}.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        (root / f"{stem}-key.pem").write_bytes(key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = (x509.CertificateBuilder().subject_name(name("test-ca")).issuer_name(name("test-ca"))
          .public_key(ca_key.public_key()).serial_number(1).not_valid_before(now)
          .not_valid_after(now + datetime.timedelta(days=1))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .sign(ca_key, hashes.SHA256()))
    save("ca", ca, ca_key)
    for stem, usage in (("server", ExtendedKeyUsageOID.SERVER_AUTH), ("client", ExtendedKeyUsageOID.CLIENT_AUTH)):
        key = ec.generate_private_key(ec.SECP256R1())
        builder = (x509.CertificateBuilder().subject_name(name(stem)).issuer_name(ca.subject)
                   .public_key(key.public_key()).serial_number(x509.random_serial_number())
                   .not_valid_before(now).not_valid_after(now + datetime.timedelta(days=1))
                   .add_extension(x509.ExtendedKeyUsage([usage, ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False))
        if stem == "server":
            builder = builder.add_extension(
                x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
        save(stem, builder.sign(ca_key, hashes.SHA256()), key)
    return {"ca": str(root / "ca.pem"), "cert": str(root / "client.pem"), "key": str(root / "client-key.pem"),
            "server": str(root / "server.pem"), "server_key": str(root / "server-key.pem")}


@pytest.fixture(scope="module")
def tls_etcd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[EtcdCluster, dict[str, str]]]:
    binary = require_binary("etcd")
    pki = _write_pki(tmp_path_factory.mktemp("pki"))
    cluster = EtcdCluster.create(
        binary, size=1, scheme="https",
        extra=["--cert-file", pki["server"], "--key-file", pki["server_key"],
               "--client-cert-auth", "--trusted-ca-file", pki["ca"]],
        client={"verify": _context(pki)},
    ).start()
    try:
        yield cluster, pki
    finally:
        cluster.stop()


def _context(pki: dict[str, str]) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=pki["ca"])
    ctx.load_cert_chain(pki["cert"], pki["key"])
    return ctx


def tls_options(cluster: EtcdCluster, pki: dict[str, str], **kw: Any) -> WatchOptions:
    config = ClusterConfig(endpoints=tuple(cluster.urls), timeout=1.0, ca_file=pki["ca"], **kw)
    return WatchOptions(config, prefix="tls/services/", backoff=0.05, max_backoff=0.1)


async def test_tls_with_a_client_certificate(tls_etcd):
    cluster, pki = tls_etcd
    admin = Admin(cluster, "tls/services/")
    await admin.put_instance("orders", 7001)
    sink = RecordingSink()
    options = tls_options(cluster, pki, cert_file=pki["cert"], key_file=pki["key"])
    async with anyio.create_task_group() as tg:
        tg.start_soon(EtcdDiscovery(options, "orders").watch, sink)
        await sink.wait_for(lambda: bool(sink.last), 5, "instances over TLS")
        await admin.put_instance("orders", 7002)
        await sink.wait_for(lambda: len(sink.last or ()) == 2, 5, "the watch over TLS")
        tg.cancel_scope.cancel()
    assert not sink.errors


async def test_tls_without_a_client_certificate_is_refused_and_counted(tls_etcd):
    cluster, pki = tls_etcd
    sink = RecordingSink()
    async with anyio.create_task_group() as tg:
        tg.start_soon(EtcdDiscovery(tls_options(cluster, pki), "orders").watch, sink)
        await sink.wait_for(lambda: len(sink.errors) >= 2, 5, "refusals")
        tg.cancel_scope.cancel()
    assert sink.published == []
    # the server's alert arrives at the first read (TLS 1.3): httpx's error or the ssl module's
    assert all(isinstance(e, (httpx.HTTPError, ssl.SSLError)) for e in sink.errors), sink.errors


def _auth_admin(cluster: EtcdCluster) -> list[tuple[str, dict[str, Any]]]:
    """Users root (root role) and meshcore (read-write on the prefix), then auth enabled."""
    prefix = "auth/services/"
    end = prefix[:-1] + chr(ord(prefix[-1]) + 1)
    from etcd_testkit import b64

    return [
        ("/v3/auth/role/add", {"name": "root"}),
        ("/v3/auth/user/add", {"name": "root", "password": "rootpw"}),
        ("/v3/auth/user/grant", {"user": "root", "role": "root"}),
        ("/v3/auth/role/add", {"name": "mesh"}),
        ("/v3/auth/role/grant", {"name": "mesh", "perm": {"permType": "READWRITE", "key": b64(prefix),
                                                         "range_end": b64(end)}}),
        ("/v3/auth/user/add", {"name": "meshcore", "password": "s3cret"}),
        ("/v3/auth/user/grant", {"user": "meshcore", "role": "mesh"}),
        ("/v3/auth/enable", {}),
    ]


@pytest.fixture(scope="module")
def auth_etcd() -> Iterator[EtcdCluster]:
    binary = require_binary("etcd")
    # Simple tokens that expire after 1 s, so a test sees one renewed.
    cluster = EtcdCluster.create(binary, size=1, extra=["--auth-token", "simple", "--auth-token-ttl", "1"]).start()
    try:
        for path, body in _auth_admin(cluster):
            r = httpx.post(cluster.urls[0] + path, json=body, timeout=5)
            assert r.status_code == 200, (path, r.text)
        yield cluster
    finally:
        cluster.stop()


async def test_auth_discovery_and_registration_with_token_renewal(auth_etcd, mesh_factory):
    cluster = auth_etcd
    config = {"etcd-registration": {"endpoints": cluster.urls, "prefix": "auth/services/", "name": "orders",
                                    "address": "127.0.0.1", "port": 8123, "username": "meshcore",
                                    "password": "s3cret", "ttl": "1.5s"}}
    options = WatchOptions(ClusterConfig(endpoints=tuple(cluster.urls), username="meshcore", password="s3cret",
                                         timeout=1.0), prefix="auth/services/", probe_interval=0.3, probe_timeout=0.5)
    sink = RecordingSink()
    async with anyio.create_task_group() as tg:
        tg.start_soon(EtcdDiscovery(options, "orders").watch, sink)
        await sink.wait_for(lambda: sink.published == [()], 5, "the empty first answer")
        async with mesh_factory(config, plugins=["etcd"]) as mesh:
            reg = meshcore_etcd.registration_of(mesh)
            assert reg.status == "registered", reg.last_error
            await sink.wait_for(lambda: len(sink.last or ()) == 1, 5, "the registered instance")
            await anyio.sleep(2.5)  # past the 1 s token TTL several times: tokens renewed
            assert reg.status == "registered" and reg.registrations == 1 and reg.keepalives >= 4
        await sink.wait_for(lambda: sink.last == (), 2, "the revoked instance leaving")
        tg.cancel_scope.cancel()
    assert not sink.errors


async def test_auth_wrong_password_is_reported(auth_etcd):
    options = WatchOptions(ClusterConfig(endpoints=tuple(auth_etcd.urls), username="meshcore", password="nope",
                                         timeout=1.0), prefix="auth/services/", backoff=0.05, max_backoff=0.1)
    sink = RecordingSink()
    async with anyio.create_task_group() as tg:
        tg.start_soon(EtcdDiscovery(options, "orders").watch, sink)
        await sink.wait_for(lambda: len(sink.errors) >= 2, 5, "authentication errors")
        tg.cancel_scope.cancel()
    assert sink.published == []
    assert "authentication failed" in str(sink.errors[0]), sink.errors[0]


