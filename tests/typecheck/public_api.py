"""The public API as the docs tell people to use it, for mypy only (pytest never imports it).

Each call below is a documented form (README, docs/*.md); `assert_type` pins what it gives
back. A signature that stops accepting a documented form, or starts giving back `Any` where a
type was promised, fails `tox -e type`.
"""

from __future__ import annotations

import ssl
from collections.abc import Callable, Collection
from contextlib import AbstractAsyncContextManager
from typing import Any, assert_type

import click
import httpx

import meshcore
from meshcore.testing import UpstreamServer, scripted_mesh, static_service


async def library_mode() -> None:
    async with meshcore.Mesh.from_config("mesh.toml") as mesh:
        assert_type(mesh, meshcore.Mesh)
        async with mesh.client(timeout=5.0) as client:
            assert_type(await client.get("http://orders/items/7"), httpx.Response)
        async with mesh.http(timeout=5.0, base_url="http://orders") as http:
            assert_type(http, meshcore.Client)
            response = await http.get("/items/7", params={"a": 1}, headers={"x": "y"}, timeout=None)
            assert_type(response, meshcore.ClientResponse)
            assert_type(response.headers, meshcore.Headers)
            assert_type(response.headers["content-type"], str)
            assert_type(response.raise_for_status(), meshcore.ClientResponse)
            await http.post("http://orders/items", json={"sku": "A-1"}, timeout={"read": 2.0})
            async with http.stream("GET", "http://orders/export") as streamed:
                assert_type(streamed, meshcore.ClientResponse)
                async for chunk in streamed.aiter_bytes():
                    assert_type(chunk, bytes)
        upstream = mesh.upstream("orders")
        assert_type(upstream.balancer, meshcore.Balancer | None)
        assert_type(upstream.snapshot.endpoints, tuple[meshcore.Endpoint, ...])
        assert_type(mesh.state(), dict[str, Any])
    assert_type(meshcore.Mesh({"services": {}}, plugins=["dns"]), meshcore.Mesh)


def endpoints_and_errors(error: meshcore.DeadlineExceeded) -> None:
    endpoint = meshcore.Endpoint("10.0.0.1", 80, tags=["blue"], metadata={"zone": "a"})
    assert_type(endpoint.metadata, tuple[tuple[str, str], ...])
    assert_type(endpoint.meta, dict[str, str])
    assert_type(meshcore.Endpoint.parse("[::1]:8080", weight=2), meshcore.Endpoint)
    # Mesh errors become httpx exceptions at the library-mode boundary (the transport), so the
    # core and the sidecar never import httpx; statically they are meshcore's own classes.
    assert_type(error, meshcore.DeadlineExceeded)
    assert_type(error.attempts, list[meshcore.Attempt])
    assert_type(meshcore.parse_duration("1m30s"), float)


# -- a plugin, written to docs/writing-a-plugin.md and docs/hooks.md ----------------------------


class Rotation:
    def __init__(self, upstream: meshcore.Upstream) -> None:
        self.upstream = upstream

    def pick(
        self,
        snapshot: meshcore.Snapshot,
        request: meshcore.Request,
        exclude: Collection[meshcore.Endpoint],
    ) -> meshcore.Endpoint:
        return snapshot.endpoints[0]


class Registration:
    async def __aenter__(self) -> Registration:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        pass


@meshcore.hookimpl
def meshcore_kinds() -> list[meshcore.Kind]:
    return [meshcore.Kind("rotation", "balancer", {"step": meshcore.Setting("int", 1, "step")})]


@meshcore.hookimpl
def meshcore_balancer(
    kind: str, settings: meshcore.Settings, upstream: meshcore.Upstream
) -> meshcore.Balancer | None:
    return Rotation(upstream) if kind == "rotation" else None


@meshcore.hookimpl
def meshcore_layer(
    kind: str, settings: meshcore.Settings, upstream: meshcore.Upstream
) -> meshcore.Layer | None:
    def layer(inner: meshcore.Service) -> meshcore.Service:
        async def service(request: meshcore.Request) -> meshcore.Response:
            return await inner(request)

        return service

    return layer if kind == "noop" else None


@meshcore.hookimpl
def meshcore_lifespan(mesh: meshcore.Mesh) -> AbstractAsyncContextManager[object] | None:
    return Registration()


@meshcore.hookimpl
def meshcore_authorize(
    request: meshcore.Request, peer: ssl.SSLObject | None, mesh: meshcore.Mesh
) -> str | None:
    return None if peer is not None else "no client certificate"


@meshcore.hookimpl
def meshcore_cli(cli: click.Group) -> None:
    pass


def the_facade(
    plugins: meshcore.Plugins, settings: meshcore.Settings, upstream: meshcore.Upstream
) -> None:
    assert_type(plugins.balancer("rotation", settings, upstream), meshcore.Balancer)
    assert_type(plugins.layer("noop", settings, upstream), meshcore.Layer)
    assert_type(plugins.discovery("static", settings, "orders"), meshcore.Discovery)


# -- the test kit (docs/writing-a-plugin.md, "Testing your plugin") -----------------------------


async def kit_test(
    upstream: Callable[..., UpstreamServer], mesh_factory: Callable[..., meshcore.Mesh]
) -> None:
    server = upstream("one", status=503)
    config = {"services": {"orders": static_service([server], resilience=["stamp"])}}
    async with mesh_factory(config, extra_plugins=[("stamp", object())]) as mesh:
        async with mesh.client() as client:
            await client.get("http://orders/")
    assert_type(server.seen[-1][2], dict[str, str])
    mesh, connector = scripted_mesh(lambda port, request, n: 200, resilience=["retry"])
    assert_type(mesh, meshcore.Mesh)
