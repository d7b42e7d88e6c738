"""Connection bursts (issue 21) and the pending-connection cap (issue 16), on asyncio, trio and
uvloop: a burst of new connections is answered, every one; connections that never speak cannot
lock an mTLS peer out; a connection that spoke is no longer pending. No timings asserted (the
figures are bench/bursts.py's)."""

from __future__ import annotations

import resource
import ssl
from pathlib import Path
from typing import Any

import anyio
import httpx
import meshcore_tls
import pytest

from meshcore._sidecar import _listeners
from meshcore._sidecar._runtime import Sidecar

from .conftest import (
    LOOPBACK,
    open_connections,
    running_sidecar,
    sidecar_config,
    static_service,
    url,
    wait_for,
)

pytestmark = pytest.mark.anyio

BACKENDS = [
    "asyncio",
    "trio",
    pytest.param(("asyncio", {"use_uvloop": True}), id="uvloop"),
]

TRUST_DOMAIN = "bursts.meshcore.test"
WEB = meshcore_tls.spiffe_id(TRUST_DOMAIN, "default", "web")
REQUEST = b"GET /public HTTP/1.1\r\nHost: %b\r\nConnection: close\r\n\r\n"


def burst_size(want: int = 1000) -> int:
    """`want`, or what the descriptor limit allows (each connection of the burst needs two
    descriptors in this process, the client's and the sidecar's)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    needed = 2 * want + 400
    if soft < needed and (hard == resource.RLIM_INFINITY or hard > soft):
        soft = needed if hard == resource.RLIM_INFINITY else min(needed, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    return min(want, (soft - 400) // 2)


async def exchange(host: str, port: int, data: bytes, **tls: Any) -> bytes:
    """Connect, send `data`, read until the other side closes."""
    received = b""
    stream = await anyio.connect_tcp(host, port, **tls)
    async with stream:
        await stream.send(data)
        while True:
            try:
                received += await stream.receive()
            except (anyio.EndOfStream, anyio.BrokenResourceError):
                return received


@pytest.mark.parametrize("anyio_backend", BACKENDS)
async def test_every_connection_of_a_burst_is_answered(anyio_backend, upstream):
    count = burst_size()
    config = sidecar_config({"orders": static_service([upstream()])})
    async with running_sidecar(config) as sidecar:
        address = sidecar.addresses["outbound"]
        answers: list[bytes] = []

        async def one() -> None:
            answers.append(await exchange(address.host, address.port, REQUEST % b"orders"))

        with anyio.fail_after(60):  # a hang, not a timing
            async with anyio.create_task_group() as tg:
                for _ in range(count):
                    tg.start_soon(one)
        assert len(answers) == count
        assert all(a.startswith(b"HTTP/1.1 200 ") for a in answers), {a[:40] for a in answers}
        assert sidecar.telemetry.connections_total["outbound"] == count
        await wait_for(lambda: open_connections(sidecar)["outbound"] == 0)


@pytest.mark.parametrize("anyio_backend", BACKENDS)
async def test_a_connection_that_sent_its_head_is_no_longer_pending(anyio_backend, upstream):
    config = sidecar_config({"orders": static_service([upstream()])})
    async with running_sidecar(config) as sidecar:
        address = sidecar.addresses["outbound"]
        pending = sidecar.listeners.pending["outbound"].conns
        stream = await anyio.connect_tcp(address.host, address.port)
        async with stream:
            await wait_for(lambda: len(pending) == 1)  # accepted, silent: pending
            await stream.send(b"GET / HTTP/1.1\r\nHost: orders\r\n\r\n")
            with anyio.fail_after(5):
                assert (await stream.receive()).startswith(b"HTTP/1.1 200 ")
            assert open_connections(sidecar)["outbound"] == 1
            assert not pending  # a keep-alive connection that spoke


@pytest.fixture(scope="module")
def mesh_ca(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, ssl.SSLContext]:
    """A mesh CA directory and a client TLS context holding WEB's certificate."""
    tmp = tmp_path_factory.mktemp("bursts-ca")
    ca = meshcore_tls.CA.create(TRUST_DOMAIN)
    ca.save(tmp / "ca")
    issued = ca.issue("web", "default")
    chain = tmp / "web.pem"
    chain.write_bytes(issued.cert_pem + issued.key_pem)
    ctx = ssl.create_default_context(cafile=str(tmp / "ca" / "ca.crt"))
    ctx.check_hostname = False  # mesh peers are identified by SPIFFE ID, not host name
    ctx.load_cert_chain(str(chain))
    return tmp / "ca", ctx


@pytest.mark.parametrize("anyio_backend", BACKENDS)
async def test_silent_connections_cannot_lock_out_an_mtls_peer(
    anyio_backend, upstream, mesh_ca, monkeypatch
):
    """Three times `max_pending_connections` raw connections that never send a byte (nor a
    ClientHello) are open and more wait in the backlog; an mTLS peer still gets its answer,
    because the oldest silent ones are closed to make room once past their grace."""
    monkeypatch.setattr(_listeners, "PENDING_GRACE", 0.2)  # the test's wait, not the default
    ca_dir, ctx = mesh_ca
    app = upstream()
    config = {
        "sidecar": {
            **LOOPBACK, "service": "app", "app": f"127.0.0.1:{app.port}", "drain": 1.0,
            "max_pending_connections": 4,
        },
        "tls": {"ca_dir": str(ca_dir), "service": "app", "allow": [{"identities": [WEB]}]},
    }
    async with Sidecar(config, ["tls"]) as sidecar:
        address = sidecar.addresses["inbound"]
        pending = sidecar.listeners.pending["inbound"].conns
        silent = [await anyio.connect_tcp(address.host, address.port) for _ in range(12)]
        try:
            await wait_for(lambda: len(pending) == 4)
            await wait_for(lambda: sidecar.telemetry.accept_paused["inbound"] >= 1)
            with anyio.fail_after(20):  # a lockout would hang here (header_timeout is 60 s)
                answer = await exchange(
                    address.host, address.port, REQUEST % b"app",
                    ssl_context=ctx, tls_standard_compatible=False,
                )
            assert answer.startswith(b"HTTP/1.1 200 "), answer[:80]
            closed = sidecar.telemetry.pending_closed["inbound"]
            assert closed >= 1
            assert len(pending) <= 4
            async with httpx.AsyncClient() as client:
                metrics = (await client.get(url(sidecar, "admin", "/metrics"))).text
            assert f'meshcore_sidecar_pending_closed_total{{listener="inbound"}} {closed}' in metrics
            # the first silent connection was among the oldest: the sidecar closed it
            with anyio.fail_after(5):
                with pytest.raises((anyio.EndOfStream, anyio.BrokenResourceError)):
                    await silent[0].receive()
        finally:
            for stream in silent:
                await stream.aclose()
