"""The server's SPIFFE identity on each CLIENT span of an mTLS hop (`meshcore.peer.identity`).

Real mTLS: two servers of service `orders` hold certificates of a throwaway mesh CA (the `tls`
plugin's) and serve HTTP/1.1 on anyio TLS listeners with the server context the plugin makes;
the client mesh runs `tls`, `retry` and `otel`. Spans go to the real OTLP/HTTP receiver.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import anyio.abc
import meshcore_tls
import pytest
from anyio.streams.tls import TLSStream
from otlp_receiver import OtlpReceiver

import meshcore
from meshcore.testing import SimpleBalancers, static_service

pytestmark = pytest.mark.anyio

ORDERS = "spiffe://example.org/ns/default/sa/orders"


@asynccontextmanager
async def mtls_server(ca_dir: Path, status: int) -> AsyncIterator[int]:
    """An `orders` server over mTLS answering `status` to every request; yields its port."""
    async with meshcore.Mesh({"tls": {"ca_dir": str(ca_dir), "service": "orders"}}, ["tls"]) as mesh:
        context = mesh.plugins.server_tls(mesh)
        listener = await anyio.create_tcp_listener(local_host="127.0.0.1", local_port=0)
        port = listener.extra(anyio.abc.SocketAttribute.local_port)

        async def serve(tcp: Any) -> None:
            try:
                stream = await TLSStream.wrap(tcp, server_side=True, ssl_context=context,
                                              standard_compatible=False)
                async with stream:
                    buf = b""
                    while True:
                        while b"\r\n\r\n" not in buf:
                            buf += await stream.receive()
                        _, _, buf = buf.partition(b"\r\n\r\n")
                        await stream.send(b"HTTP/1.1 %d X\r\ncontent-length: 2\r\n\r\nok" % status)
            except (anyio.EndOfStream, anyio.BrokenResourceError, OSError):
                pass

        async with listener, anyio.create_task_group() as tg:
            tg.start_soon(listener.serve, serve)
            yield port
            tg.cancel_scope.cancel()


@pytest.mark.parametrize("anyio_backend", ["asyncio", "trio"])
async def test_each_attempt_over_mtls_names_the_servers_identity(
    receiver: OtlpReceiver, tmp_path: Path
) -> None:
    ca_dir = tmp_path / "ca"
    meshcore_tls.CA.create("example.org").save(ca_dir)
    async with mtls_server(ca_dir, 503) as failing, mtls_server(ca_dir, 200) as ok:
        endpoints = [f"127.0.0.1:{failing}", f"127.0.0.1:{ok}"]
        config = {
            "tls": {"ca_dir": str(ca_dir), "service": "web"},
            "tracing": {"endpoint": receiver.url, "schedule_delay": "20ms"},
            "services": {
                "orders": static_service(
                    endpoints, balancer="test-first", resilience=["retry", "otel"],
                    retry={"backoff_base": "1ms", "backoff_max": "2ms", "budget": False},
                ),
            },
        }
        plugins = ["tls", "retry", "otel"]
        async with meshcore.Mesh(config, plugins, extra_plugins=[("simple", SimpleBalancers())]) as mesh:
            async with mesh.client() as client:
                response = await client.get("http://orders/x")
                assert response.status_code == 200
                response = await client.get("http://orders/x")  # pooled connections this time
                assert response.status_code == 200
    spans = await anyio.to_thread.run_sync(receiver.wait_for, 4)
    assert [s.attributes["meshcore.endpoint"] for s in spans] == endpoints * 2
    assert [s.attributes["http.response.status_code"] for s in spans] == [503, 200] * 2
    # Every attempt went over mTLS: each span names the identity its server proved.
    assert [s.attributes.get("meshcore.peer.identity") for s in spans] == [ORDERS] * 4


async def test_a_plaintext_hop_names_no_identity(receiver: OtlpReceiver, upstream: Any) -> None:
    server = upstream()
    config = {
        "tracing": {"endpoint": receiver.url, "schedule_delay": "20ms"},
        "services": {"orders": static_service([server], resilience=["otel"])},
    }
    async with meshcore.Mesh(config, ["otel"]) as mesh, mesh.client() as client:
        assert (await client.get("http://orders/")).status_code == 200
    (span,) = await anyio.to_thread.run_sync(receiver.wait_for, 1)
    assert span.attributes["meshcore.endpoint"] == server.address
    assert "meshcore.peer.identity" not in span.attributes


async def test_a_server_with_the_wrong_identity_is_not_named(
    receiver: OtlpReceiver, tmp_path: Path
) -> None:
    """A refused server never becomes the span's peer: the attempt fails with IdentityRejected."""
    ca_dir = tmp_path / "ca"
    meshcore_tls.CA.create("example.org").save(ca_dir)
    async with mtls_server(ca_dir, 200) as port:
        config = {
            "tls": {"ca_dir": str(ca_dir), "service": "web"},
            "tracing": {"endpoint": receiver.url, "schedule_delay": "20ms"},
            # `payments` is served by the orders server: its identity is not the one expected.
            "services": {"payments": static_service([f"127.0.0.1:{port}"], resilience=["otel"])},
        }
        async with meshcore.Mesh(config, ["tls", "otel"]) as mesh, mesh.client() as client:
            with pytest.raises(meshcore.IdentityRejected):
                await client.get("http://payments/")
    (span,) = await anyio.to_thread.run_sync(receiver.wait_for, 1)
    assert span.error and span.attributes["error.type"] == "IdentityRejected"
    assert "meshcore.peer.identity" not in span.attributes
