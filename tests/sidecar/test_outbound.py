"""Outbound listener: the local app's plain HTTP/1.1 routed through the mesh pipeline."""

from __future__ import annotations

import anyio
import httpx
import pytest

import meshcore
from meshcore.testing import static_service

from .conftest import open_connections, raw_exchange, running_sidecar, sidecar_config, url, wait_for

pytestmark = pytest.mark.anyio


async def test_host_header_and_absolute_uri_route_to_mesh_services(upstream):
    orders, users = upstream("orders-1"), upstream("users-1")
    config = sidecar_config({"orders": static_service([orders]), "users": static_service([users])})
    async with running_sidecar(config) as sidecar:
        async with httpx.AsyncClient() as client:
            r1 = await client.get(url(sidecar, "outbound", "/items/7?x=1"), headers={"host": "orders"})
            r2 = await client.get(url(sidecar, "outbound", "/me"), headers={"host": "users:80"})
        assert (r1.status_code, r1.headers["x-upstream"], r1.text) == (200, "orders-1", "ok")
        assert r2.headers["x-upstream"] == "users-1"
        assert orders.seen[-1][:2] == ("GET", "/items/7?x=1")
        assert orders.seen[-1][2]["host"] == "orders"
        # absolute-form request target (RFC 9112 §3.2.2), as an HTTP proxy client sends it
        answer = await raw_exchange(
            sidecar, "outbound",
            b"GET http://users/abs HTTP/1.1\r\nHost: ignored\r\nConnection: close\r\n\r\n",
        )
        assert answer.startswith(b"HTTP/1.1 200 ")
        assert b"x-upstream: users-1" in answer
        assert users.seen[-1][1] == "/abs"


async def test_non_mesh_host_is_a_clear_404_not_a_hang(upstream):
    config = sidecar_config({"orders": static_service([upstream()])})
    async with running_sidecar(config) as sidecar:
        async with httpx.AsyncClient(timeout=5) as client:
            with anyio.fail_after(2):
                r = await client.get(url(sidecar, "outbound", "/"), headers={"host": "example.com"})
        assert r.status_code == 404
        assert r.headers["x-meshcore-error"] == "no_route"
        assert "'example.com' is not a mesh service (services: orders)" in r.text


async def test_dead_endpoint_is_503_connect_failed_and_sidecar_keeps_serving(upstream):
    alive = upstream("alive")
    dead = upstream("dead")
    dead.stop()
    config = sidecar_config(
        {"down": static_service([dead]), "up": static_service([alive])}
    )
    async with running_sidecar(config) as sidecar:
        async with httpx.AsyncClient() as client:
            r = await client.get(url(sidecar, "outbound", "/"), headers={"host": "down"})
            assert r.status_code == 503
            assert r.headers["x-meshcore-error"] == "connect_failed"
            assert dead.address in r.text
            r = await client.get(url(sidecar, "outbound", "/"), headers={"host": "up"})
            assert r.status_code == 200


async def test_hop_by_hop_removed_and_forwarding_headers_set(upstream):
    server = upstream(
        "h", headers=[("keep-alive", "timeout=5"), ("x-hop", "1"), ("connection", "x-hop"), ("x-end", "2")]
    )
    config = sidecar_config({"orders": static_service([server])})
    traceparent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
    async with running_sidecar(config) as sidecar:
        async with httpx.AsyncClient() as client:
            r = await client.get(
                url(sidecar, "outbound", "/"),
                headers={
                    "host": "orders",
                    "connection": "keep-alive, x-private",
                    "x-private": "secret",
                    "keep-alive": "timeout=10",
                    "te": "trailers",
                    "proxy-authorization": "Basic abc",
                    "x-forwarded-for": "10.0.0.9",
                    "via": "1.0 corp-proxy",
                    "traceparent": traceparent,
                    "tracestate": "vendor=1",
                },
            )
            _, _, seen = server.seen[-1]
            for name in ("x-private", "keep-alive", "te", "proxy-authorization"):
                assert name not in seen, name
            assert seen["via"] == "1.0 corp-proxy, 1.1 meshcore"
            assert seen["x-forwarded-for"] == "10.0.0.9, 127.0.0.1"
            assert seen["traceparent"] == traceparent
            assert seen["tracestate"] == "vendor=1"
            first_id = seen["x-request-id"]
            assert len(first_id) == 36
            # a request id the app set is kept; a missing one is generated fresh
            await client.get(url(sidecar, "outbound", "/"), headers={"host": "orders", "x-request-id": "abc"})
            assert server.seen[-1][2]["x-request-id"] == "abc"
            await client.get(url(sidecar, "outbound", "/"), headers={"host": "orders"})
            assert server.seen[-1][2]["x-request-id"] not in (first_id, "abc")
        # response side
        assert "keep-alive" not in r.headers and "x-hop" not in r.headers
        assert r.headers["x-end"] == "2"
        assert r.headers["via"] == "1.1 meshcore"


async def test_bodies_stream_both_ways_and_keep_alive_is_reused(upstream):
    server = upstream()
    config = sidecar_config({"echo": static_service([server])}, retry_buffer=1024)
    big = bytes(range(256)) * 4096  # 1 MiB: larger than the retry buffer, so streamed

    async def chunks():
        for i in range(0, len(big), 65536):
            yield big[i : i + 65536]

    async with running_sidecar(config) as sidecar:
        async with httpx.AsyncClient() as client:
            r = await client.post(url(sidecar, "outbound", "/echo"), content=chunks(), headers={"host": "echo"})
            assert r.status_code == 200 and r.content == big
            r = await client.post(url(sidecar, "outbound", "/echo"), content=b"small", headers={"host": "echo"})
            assert r.content == b"small"
            for _ in range(5):
                await client.get(url(sidecar, "outbound", "/"), headers={"host": "echo"})
            assert sidecar.telemetry.connections_total["outbound"] == 1  # one keep-alive connection
        await wait_for(lambda: open_connections(sidecar)["outbound"] == 0)


async def test_retry_buffer_makes_small_bodies_replayable(upstream):
    """A body within `retry_buffer` reaches the pipeline in full, so a retry layer can resend it."""
    server = upstream()
    seen = []

    class Probe:
        @meshcore.hookimpl
        def meshcore_kinds(self):
            return [meshcore.Kind("probe", "layer")]

        @meshcore.hookimpl
        def meshcore_layer(self, kind, settings, upstream):
            if kind != "probe":
                return None

            def layer(inner):
                async def service(request):
                    seen.append(request.replayable)
                    return await inner(request)

                return service

            return layer

    config = sidecar_config({"echo": static_service([server], resilience=["probe"])}, retry_buffer=100)
    async with running_sidecar(config, extra_plugins=[("probe", Probe())]) as sidecar:
        async with httpx.AsyncClient() as client:
            r = await client.post(url(sidecar, "outbound", "/echo"), content=b"x" * 100, headers={"host": "echo"})
            assert r.content == b"x" * 100
            r = await client.post(url(sidecar, "outbound", "/echo"), content=b"y" * 101, headers={"host": "echo"})
            assert r.content == b"y" * 101
    assert seen == [True, False]


async def test_max_connections_queues_the_extra_connection_until_one_closes(upstream):
    """At the cap the listener stops accepting: a third client waits in the backlog (its
    connect succeeds, its request is not read) and is served once a connection closes, rather
    than being accepted and dropped."""
    config = sidecar_config({"orders": static_service([upstream()])}, max_connections=2)
    async with running_sidecar(config) as sidecar:
        address = sidecar.addresses["outbound"]
        first = await anyio.connect_tcp(address.host, address.port)
        second = await anyio.connect_tcp(address.host, address.port)
        await wait_for(lambda: open_connections(sidecar)["outbound"] == 2)
        third = await anyio.connect_tcp(address.host, address.port)
        await third.send(b"GET / HTTP/1.1\r\nHost: orders\r\nConnection: close\r\n\r\n")
        await wait_for(lambda: sidecar.telemetry.accept_paused["outbound"] >= 1)
        with anyio.move_on_after(0.3):  # bounded: nothing may come while both slots are held
            assert await third.receive() == b"", "answered past max_connections"
        assert open_connections(sidecar)["outbound"] == 2
        await first.aclose()
        answer = b""
        with anyio.fail_after(5):
            while chunk := await _receive_or_end(third):
                answer += chunk
        assert answer.startswith(b"HTTP/1.1 200 ")
        await second.aclose()
        await third.aclose()


async def _receive_or_end(stream: anyio.abc.ByteStream) -> bytes:
    try:
        return await stream.receive()
    except anyio.EndOfStream:
        return b""
