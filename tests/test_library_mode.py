"""Library mode end to end: an httpx client through discovery -> balancer -> layers -> endpoint."""

from __future__ import annotations

import httpx
import pytest

import meshcore
from meshcore.testing import static_service

pytestmark = pytest.mark.anyio


class Tagging:
    """An inline layer plugin that stamps every request, to show layers run in order."""

    @meshcore.hookimpl
    def meshcore_kinds(self):
        return [meshcore.Kind("tag", "layer", {"value": meshcore.Setting("str", "x")})]

    @meshcore.hookimpl
    def meshcore_layer(self, kind, settings, upstream):
        if kind != "tag":
            return None

        def layer(inner):
            async def service(request):
                request.headers.append((b"x-tag", settings.value.encode()))
                return await inner(request)

            return service

        return layer


async def test_request_reaches_an_endpoint(upstream, mesh_factory):
    server = upstream("one")
    config = {"services": {"orders": static_service([server], resilience=["tag"], tag={"value": "t1"})}}
    async with mesh_factory(config, extra_plugins=[("tagging", Tagging())]) as mesh:
        async with mesh.client() as client:
            response = await client.get("http://orders/items/7?x=1")
    assert response.status_code == 200
    assert response.headers["x-upstream"] == "one"
    method, target, headers = server.seen[-1]
    assert (method, target) == ("GET", "/items/7?x=1")
    assert headers["host"] == "orders"
    assert headers["x-tag"] == "t1"


async def test_post_body_and_streamed_response(upstream, mesh_factory):
    server = upstream()
    async with mesh_factory({"services": {"echo": static_service([server])}}) as mesh:
        async with mesh.client() as client:
            response = await client.post("http://echo/echo", content=b"hello mesh")
            assert response.content == b"hello mesh"

            async def chunks():
                yield b"a" * 1000
                yield b"b" * 1000

            response = await client.post("http://echo/echo", content=chunks())
            assert response.content == b"a" * 1000 + b"b" * 1000


async def test_non_mesh_host_passes_through(upstream, mesh_factory):
    server = upstream("direct")
    async with mesh_factory({"services": {}}) as mesh:
        async with mesh.client() as client:
            response = await client.get(f"{server.url}/x")
    assert response.headers["x-upstream"] == "direct"


async def test_request_before_start_and_after_close_is_a_clear_error(upstream, mesh_factory):
    server = upstream()
    mesh = mesh_factory({"services": {"orders": static_service([server])}})
    async with mesh.client() as client:
        with pytest.raises(meshcore.MeshNotRunning, match="not running"):
            await client.get("http://orders/")
        async with mesh:
            assert (await client.get("http://orders/")).status_code == 200
        with pytest.raises(meshcore.MeshNotRunning) as info:
            await client.get("http://orders/")
    assert isinstance(info.value, httpx.HTTPError)


async def test_connect_failure_names_the_endpoint(mesh_factory):
    from meshcore.testing import free_port

    port = free_port()
    async with mesh_factory({"services": {"orders": static_service([f"127.0.0.1:{port}"])}}) as mesh:
        async with mesh.client() as client:
            with pytest.raises(meshcore.EndpointConnectError) as info:
                await client.get("http://orders/")
    assert info.value.endpoint.port == port
    assert info.value.service == "orders"
    assert f"127.0.0.1:{port}" in str(info.value)
    assert isinstance(info.value, httpx.ConnectError)
