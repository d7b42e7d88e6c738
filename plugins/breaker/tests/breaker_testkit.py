"""Helpers for the breaker plugin's tests (imported by conftest.py and the test modules).

- `RoundRobin`: a tiny inline balancer plugin (kind `test-rr`) honouring `exclude` and
  ejection, so these tests do not depend on the balancing plugins being installed.
- `Scripted`: a terminal connector (the core's `connector_factory` seam) whose endpoints follow
  a script: a status, an exception, or a delay. Used for virtual-time tests under trio's
  MockClock, where real sockets cannot follow a fake clock. It honours the httpx-style
  `timeout` extension like the real senders do.
- `virtual_backend`: trio with MockClock(autojump_threshold=0) for virtual-time tests.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import anyio
import pytest

import meshcore


class RoundRobinBalancer:
    def __init__(self, upstream: Any) -> None:
        self.upstream = upstream
        self.i = 0

    def pick(self, snapshot: Any, request: Any, exclude: Any) -> Any:
        endpoints = snapshot.endpoints
        healthy = [ep for ep in endpoints if not self.upstream.is_ejected(ep)]
        if not healthy:
            self.upstream.count_panic()
            healthy = list(endpoints)
        fresh = [ep for ep in healthy if ep not in exclude] or healthy
        self.i += 1
        return fresh[self.i % len(fresh)]


class RoundRobin:
    @meshcore.hookimpl
    def meshcore_kinds(self) -> list[meshcore.Kind]:
        return [meshcore.Kind("test-rr", "balancer", {})]

    @meshcore.hookimpl
    def meshcore_balancer(self, kind: str, settings: Any, upstream: Any) -> Any:
        return RoundRobinBalancer(upstream) if kind == "test-rr" else None


class Events:
    """An inline plugin collecting state-change events."""

    def __init__(self) -> None:
        self.changes: list[tuple[str, str, str, str, str]] = []

    @meshcore.hookimpl
    def meshcore_state_changed(self, service, component, subject, old, new):
        self.changes.append((service, component, subject, old, new))


class TrackedBody:
    """A response body that records whether it was closed."""

    def __init__(self, data: bytes = b"body") -> None:
        self.data = data
        self.closed = False

    async def __aiter__(self):
        yield self.data

    async def aclose(self) -> None:
        self.closed = True


class Scripted:
    """A connector whose behaviour per endpoint is `script(endpoint_port, request, n)`.

    The script returns a status code, a (status, headers) pair, a float (seconds to hang before
    answering 200), or raises. Every send is logged with its time, port and body.
    """

    def __init__(self, script: Callable[[int, Any, int], Any]) -> None:
        self.script = script
        self.log: list[tuple[float, int, str, bytes]] = []
        self.bodies: list[TrackedBody] = []

    def factory(self, mesh: Any, service: str, ssl_context: Any) -> Scripted:
        return self

    async def send(self, endpoint: meshcore.Endpoint, request: meshcore.Request) -> meshcore.Response:
        body = await request.aread() if not isinstance(request.stream, bytes) else request.stream
        self.log.append((anyio.current_time(), endpoint.port, request.method, body))
        n = sum(1 for _, port, _, _ in self.log if port == endpoint.port)
        timeout = (request.extensions.get("timeout") or {}).get("read")
        try:
            with anyio.fail_after(timeout):
                action = self.script(endpoint.port, request, n)
                if isinstance(action, float):
                    await anyio.sleep(action)
                    action = 200
        except TimeoutError:
            raise meshcore.EndpointTimeout(f"{endpoint.id}: read timed out", endpoint=endpoint) from None
        headers: list[tuple[str, str]] = []
        if isinstance(action, tuple):
            action, headers = action
        tracked = TrackedBody()
        self.bodies.append(tracked)
        return meshcore.Response(action, headers, tracked)

    async def aclose(self) -> None:
        pass


def connect_error(port: int) -> meshcore.EndpointConnectError:
    ep = meshcore.Endpoint("127.0.0.1", port)
    return meshcore.EndpointConnectError(f"connect to {ep.id} failed", endpoint=ep)


def read_error(port: int) -> meshcore.EndpointReadError:
    ep = meshcore.Endpoint("127.0.0.1", port)
    return meshcore.EndpointReadError(f"{ep.id}: connection reset", endpoint=ep)


PORTS = (9001, 9002, 9003)


def scripted_config(resilience: list[str], **tables: Any) -> dict[str, Any]:
    return {
        "services": {
            "svc": {
                "discovery": "static",
                "static": {"endpoints": [f"127.0.0.1:{p}" for p in PORTS]},
                "balancer": "test-rr",
                "resilience": resilience,
                **tables,
            }
        }
    }


@pytest.fixture
def scripted_mesh() -> Callable[..., Any]:
    """`scripted_mesh(script, resilience=[...], **tables)` -> (Mesh, Scripted)."""

    def make(script: Callable[[int, Any, int], Any], resilience: list[str] | None = None,
             plugins: tuple[str, ...] = ("breaker",), extra: tuple = (), **tables: Any) -> Any:
        connector = Scripted(script)
        mesh = meshcore.Mesh(
            scripted_config(resilience or ["breaker"], **tables),
            list(plugins),
            extra_plugins=[("test-rr", RoundRobin()), *extra],
            connector_factory=connector.factory,
        )
        return mesh, connector

    return make


@pytest.fixture
def virtual_backend() -> Any:
    import trio.testing

    return ("trio", {"clock": trio.testing.MockClock(autojump_threshold=0)})
