"""The identity service's transport floor, its registration in discovery, and join tokens
shared between processes: real handshakes and a real registry on loopback, both backends."""

from __future__ import annotations

import signal
import ssl
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import httpx
import meshcore
import meshcore_consul
import pytest
from anyio.streams.tls import TLSAttribute, TLSStream
from meshcore.testing import free_port

import meshcore_tls
from meshcore_tls import CA, IdentityService, TokenStore
from meshcore_tls._identity_client import IdentityClient
from meshcore_tls._identity_service import SERVICE_NAME, service_spiffe_id

pytestmark = pytest.mark.anyio

TD = "example.org"


@pytest.fixture
def service_dir(ca_dir: Path, tmp_path: Path) -> Path:
    return meshcore_tls.make_identity_dir(CA.load(ca_dir, need_key=True), tmp_path / "identity")


def client_context(
    ca_dir: Path, maximum: ssl.TLSVersion, ciphers: str = "", *, bundle: bool = False
) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.load_verify_locations(str(ca_dir / ("bundle.crt" if bundle else "ca.crt")))
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


# -- registration in discovery ----------------------------------------------------------------


@pytest.fixture
def registry(tmp_path: Path) -> Iterator[Any]:
    """The embedded Consul-compatible registry (the consul plugin, in requirements-dev.txt),
    in a thread of its own."""
    with meshcore_consul.Registry(port=0, data_dir=tmp_path / "registry") as reg:
        yield reg


async def health(registry: Any, name: str) -> list[dict[str, Any]]:
    """`GET /v1/health/service/<name>` over HTTP, as any Consul client asks."""
    async with httpx.AsyncClient(base_url=registry.url) as http:
        response = await http.get(
            f"/v1/health/service/{name}", headers={"X-Consul-Token": registry.token}
        )
    response.raise_for_status()
    return list(response.json())


async def test_the_service_registers_in_discovery_while_it_runs(service_dir, registry):
    config = {"consul-registration": {"agent": registry.url, "token": registry.token}}
    async with IdentityService(service_dir, port=0) as service:
        async with meshcore.Mesh(config, ["tls", "consul"]) as mesh:
            async with service.registered(mesh) as count:
                [entry] = await health(registry, SERVICE_NAME)
                # workloads find it by name and reach it: the bundle through the address found
                found = f"{entry['Service']['Address']}:{entry['Service']['Port']}"
                bundle = await IdentityClient(found, service_spiffe_id(TD)).bundle(
                    client_context(service_dir, ssl.TLSVersion.TLSv1_3, bundle=True)
                )
            after = await health(registry, SERVICE_NAME)
    assert count == 1 and found == service.address
    assert entry["Service"]["ID"] == f"{SERVICE_NAME}-{service.address.replace(':', '-')}"
    assert bundle == (service_dir / "bundle.crt").read_bytes()
    assert after == []


async def test_registering_needs_a_reachable_address_and_a_registering_plugin(service_dir):
    service = IdentityService(service_dir, "0.0.0.0", 0)
    with pytest.raises(ValueError, match=r"listens on 0\.0\.0\.0: give the address .*advertise"):
        service.instance()
    assert service.instance("ids", advertise="identity.example.org").address == (
        "identity.example.org"
    )
    async with meshcore.Mesh({}, ["tls"]) as mesh:
        async with IdentityService(service_dir, port=0) as running:
            async with running.registered(mesh, "ids") as count:
                pass
    assert count == 0


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_identity_serve_register_command_registers_and_leaves(
    service_dir, registry, tmp_path
):
    port = free_port()
    config = tmp_path / "mesh.toml"
    config.write_text(
        f'[consul-registration]\nagent = "{registry.url}"\ntoken = "{registry.token}"\n'
    )
    command = [
        sys.executable, "-m", "meshcore", "-p", "tls", "-p", "consul", "-c", str(config),
        "identity", "serve", "--dir", str(service_dir), "--listen", f"127.0.0.1:{port}",
        "--register", "--name", "ids",
    ]  # fmt: skip
    process = await anyio.open_process(command, stderr=subprocess.PIPE)
    try:
        with anyio.fail_after(30):
            while not (entries := await health(registry, "ids")):
                assert process.returncode is None
                await anyio.sleep(0.05)
    finally:
        process.send_signal(signal.SIGINT)
        with anyio.fail_after(30):
            await process.wait()
    assert entries[0]["Service"]["Port"] == port
    assert await health(registry, "ids") == []


def test_identity_serve_register_without_a_registering_plugin_is_an_error(service_dir, tmp_path):
    config = tmp_path / "mesh.toml"
    config.write_text("")
    result = subprocess.run(
        [
            sys.executable, "-m", "meshcore", "-p", "tls", "-c", str(config), "identity",
            "serve", "--dir", str(service_dir), "--listen", f"127.0.0.1:{free_port()}",
            "--register",
        ],  # fmt: skip
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert "--register: no loaded plugin registers the service" in result.stderr


# -- join tokens shared between processes -----------------------------------------------------


def _spend(directory: str, token: str, start: Any, out: Any) -> None:
    """In a process of its own: use `token` until it is refused; report how many uses it got."""
    from meshcore_tls._tokens import TokenError, TokenStore

    store = TokenStore(directory)
    got = 0
    start.wait()
    while True:
        try:
            store.use(store.check(token))
        except TokenError:
            break
        got += 1
    out.put(got)


def test_token_uses_are_counted_exactly_across_processes(tmp_path):
    import multiprocessing

    directory = tmp_path / "tokens"
    uses = 300
    _, token = TokenStore(directory).create("spiffe://example.org/ns/shop/sa/web", uses=uses)
    mp = multiprocessing.get_context("spawn")
    start, out = mp.Event(), mp.Queue()
    workers = [mp.Process(target=_spend, args=(str(directory), token, start, out)) for _ in "ab"]
    for worker in workers:
        worker.start()
    start.set()
    got = [out.get(timeout=120) for _ in workers]
    for worker in workers:
        worker.join(timeout=30)
    # every use counted once: no lost update grants extra certificates, none is refused early
    assert sum(got) == uses, got
    assert all(worker.exitcode == 0 for worker in workers)
    assert TokenStore(directory).list() == []
