"""The identity service's transport floor, its registration in discovery, and join tokens
shared between processes: real handshakes and a real registry on loopback, both backends."""

from __future__ import annotations

import ssl
from pathlib import Path

import anyio
import pytest
from anyio.streams.tls import TLSAttribute, TLSStream

import meshcore_tls
from meshcore_tls import CA, IdentityService
from meshcore_tls._identity_client import IdentityClient
from meshcore_tls._identity_service import service_spiffe_id

pytestmark = pytest.mark.anyio

TD = "example.org"


@pytest.fixture
def service_dir(ca_dir: Path, tmp_path: Path) -> Path:
    return meshcore_tls.make_identity_dir(CA.load(ca_dir, need_key=True), tmp_path / "identity")


def client_context(ca_dir: Path, maximum: ssl.TLSVersion, ciphers: str = "") -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.load_verify_locations(str(ca_dir / "ca.crt"))
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.maximum_version = maximum
    if ciphers:
        ctx.set_ciphers(ciphers)
    return ctx


async def handshake(service: IdentityService, ctx: ssl.SSLContext) -> str:
    """The protocol version agreed, or the error that ended the handshake."""
    stream = await anyio.connect_tcp(service.host, service.port)
    try:
        tls = await TLSStream.wrap(
            stream, ssl_context=ctx, server_side=False, standard_compatible=False
        )
    except (ssl.SSLError, anyio.BrokenResourceError, anyio.EndOfStream, OSError) as exc:
        await stream.aclose()
        return f"refused: {type(exc).__name__} {exc}"
    version = tls.extra(TLSAttribute.ssl_object).version()
    await tls.aclose()
    return str(version)


async def test_the_service_speaks_tls_1_3_only_by_default(service_dir, ca_dir):
    async with IdentityService(service_dir, port=0) as service:
        old = await handshake(service, client_context(ca_dir, ssl.TLSVersion.TLSv1_2))
        new = await handshake(service, client_context(ca_dir, ssl.TLSVersion.TLSv1_3))
        # and the workload side's bootstrap context asks for 1.3 too: it still gets its bundle
        bundle = await IdentityClient(service.address, service_spiffe_id(TD)).bundle(
            client_context(ca_dir, ssl.TLSVersion.TLSv1_3)
        )
        status = service.status()
    assert old.startswith("refused") and new == "TLSv1.3"
    assert bundle == (ca_dir / "ca.crt").read_bytes()
    assert status["denied"]["handshake"] == 1


async def test_tls_1_2_when_asked_for_takes_only_aead_suites(service_dir, ca_dir):
    async with IdentityService(service_dir, port=0, min_tls_version="1.2") as service:
        aead = await handshake(
            service, client_context(ca_dir, ssl.TLSVersion.TLSv1_2, "ECDHE+AESGCM")
        )
        cbc = await handshake(
            service, client_context(ca_dir, ssl.TLSVersion.TLSv1_2, "ECDHE+AES+SHA")
        )
    assert aead == "TLSv1.2" and cbc.startswith("refused")


def test_an_unknown_tls_version_is_a_named_error(service_dir):
    with pytest.raises(ValueError, match=r"min_tls_version: expected one of .*'1.1'"):
        IdentityService(service_dir, port=0, min_tls_version="1.1")
