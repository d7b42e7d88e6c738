"""Library mode: a single-label host that is neither a mesh service nor a resolvable name (a
typo of a service) fails naming the mesh's services; hosts that resolve still pass through."""

from __future__ import annotations

import socket

import httpx
import pytest

import meshcore
from meshcore.testing import static_service

pytestmark = pytest.mark.anyio

TYPO = "ordres"


@pytest.fixture
def unresolvable() -> str:
    """The typo, after making sure this machine's resolver really has no answer for it."""
    try:
        socket.getaddrinfo(TYPO, 80)
    except socket.gaierror:
        return TYPO
    raise AssertionError(f"pre-condition: {TYPO!r} must not resolve on this machine for these tests")


def services(upstream, *names: str) -> dict:
    server = upstream("one")
    return {"services": {name: static_service([server]) for name in names}}


async def test_a_typo_of_a_service_says_which_was_meant(upstream, mesh_factory, unresolvable):
    async with mesh_factory(services(upstream, "orders", "users")) as mesh:
        async with mesh.client() as client:
            with pytest.raises(meshcore.UnknownService) as info:
                await client.get(f"http://{unresolvable}/items/7")
    error = info.value
    assert isinstance(error, httpx.ConnectError) and isinstance(error, meshcore.MeshError)
    message = str(error)
    assert message.startswith(f"host {unresolvable!r} is not a mesh service and does not resolve (")
    assert "Did you mean 'orders'? Mesh services: orders, users." in message
    assert error.suggestions == ["orders"] and error.services == ["orders", "users"]
    assert error.host == unresolvable
    assert error.request.url == f"http://{unresolvable}/items/7"
    assert isinstance(error.__cause__, httpx.ConnectError)


async def test_no_suggestion_when_nothing_is_close(upstream, mesh_factory):
    host = "zqxjkvw"
    with pytest.raises(socket.gaierror):
        socket.getaddrinfo(host, 80)  # pre-condition
    async with mesh_factory(services(upstream, "orders")) as mesh:
        async with mesh.client() as client:
            with pytest.raises(meshcore.UnknownService) as info:
                await client.get(f"http://{host}/")
    assert "Did you mean" not in str(info.value) and "Mesh services: orders." in str(info.value)


async def test_except_httpx_http_error_still_catches_it(upstream, mesh_factory, unresolvable):
    async with mesh_factory(services(upstream, "orders")) as mesh:
        async with mesh.client() as client:
            try:
                await client.get(f"http://{unresolvable}/")
            except httpx.HTTPError as exc:
                caught: Exception = exc
    # The transport raises it as a subclass of both (meshcore._transport.as_httpx_error).
    assert isinstance(caught, meshcore.UnknownService) and isinstance(caught, httpx.ConnectError)
    assert type(caught).__name__ == "UnknownService"


async def test_a_single_label_host_that_resolves_passes_through(upstream, mesh_factory):
    outside = upstream("outside")
    async with mesh_factory(services(upstream, "orders")) as mesh:
        async with mesh.client() as client:
            response = await client.get(f"http://localhost:{outside.port}/echo")
    assert response.status_code == 200


async def test_a_resolvable_host_that_refuses_keeps_httpx_own_error(upstream, mesh_factory):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        closed = sock.getsockname()[1]
    async with mesh_factory(services(upstream, "orders")) as mesh:
        async with mesh.client() as client:
            with pytest.raises(httpx.ConnectError) as info:
                await client.get(f"http://localhost:{closed}/")
    assert not isinstance(info.value, meshcore.MeshError)


async def test_pass_through_off_suggests_the_service_too(upstream, mesh_factory, unresolvable):
    config = {**services(upstream, "orders"), "mesh": {"pass_through": False}}
    async with mesh_factory(config) as mesh:
        async with mesh.client() as client:
            with pytest.raises(meshcore.MeshError, match="pass-through is off .* Did you mean 'orders'"):
                await client.get(f"http://{unresolvable}/")
