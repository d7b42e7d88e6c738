"""A scripted terminal, for testing layers and balancers in virtual time.

Real sockets cannot follow trio's MockClock, so tests of backoff, ejection and deadlines
replace the terminal's sender (the `connector_factory` seam of `meshcore.Mesh`) with a
`ScriptedConnector`: each endpoint answers what a script says (a status, a status with
headers, a delay, or an exception), and every send is logged with its virtual time.
`SimpleBalancers` gives tests balancer kinds that do not depend on the balancing plugins.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterable
from typing import TYPE_CHECKING, Any

import anyio

from .._endpoints import Endpoint
from .._errors import EndpointConnectError, EndpointReadError, EndpointTimeout
from .._mesh import Mesh
from .._models import Request, Response
from .._plugins import Kind, hookimpl

if TYPE_CHECKING:
    import ssl

    from .._service import Balancer
    from .._settings import Settings
    from .._upstream import Upstream

__all__ = [
    "SCRIPTED_PORTS",
    "ScriptedConnector",
    "SimpleBalancers",
    "StateEvents",
    "TrackedBody",
    "connect_error",
    "read_error",
    "scripted_mesh",
]

SCRIPTED_PORTS = (9001, 9002, 9003)


class _RotatingBalancer:
    """Kind `test-rr`: rotation over usable endpoints, honouring ejection and `exclude`."""

    def __init__(self, upstream: Any) -> None:
        self.upstream = upstream
        self.i = 0

    def _usable(self, snapshot: Any) -> list[Endpoint]:
        healthy = [ep for ep in snapshot.endpoints if not self.upstream.is_ejected(ep)]
        if not healthy:
            self.upstream.count_panic()
            healthy = list(snapshot.endpoints)
        return healthy

    def pick(self, snapshot: Any, request: Any, exclude: Any) -> Endpoint:
        healthy = self._usable(snapshot)
        fresh = [ep for ep in healthy if ep not in exclude] or healthy
        self.i += 1
        return fresh[self.i % len(fresh)]


class _FirstBalancer(_RotatingBalancer):
    """Kind `test-first`: always the first usable endpoint; only `exclude` moves a retry."""

    def pick(self, snapshot: Any, request: Any, exclude: Any) -> Endpoint:
        healthy = self._usable(snapshot)
        return next((ep for ep in healthy if ep not in exclude), healthy[0])


class SimpleBalancers:
    """An inline plugin with balancer kinds `test-rr` and `test-first`."""

    @hookimpl
    def meshcore_kinds(self) -> list[Kind]:
        return [Kind("test-rr", "balancer"), Kind("test-first", "balancer")]

    @hookimpl
    def meshcore_balancer(self, kind: str, settings: Settings, upstream: Upstream) -> Balancer | None:
        if kind == "test-rr":
            return _RotatingBalancer(upstream)
        if kind == "test-first":
            return _FirstBalancer(upstream)
        return None


class StateEvents:
    """An inline plugin collecting `meshcore_state_changed` events in `changes`."""

    def __init__(self) -> None:
        self.changes: list[tuple[str, str, str, str, str]] = []

    @hookimpl
    def meshcore_state_changed(
        self, service: str, component: str, subject: str, old: str, new: str
    ) -> None:
        self.changes.append((service, component, subject, old, new))


class TrackedBody:
    """A response body that records whether it was closed."""

    def __init__(self, data: bytes = b"body") -> None:
        self.data = data
        self.closed = False

    async def __aiter__(self) -> AsyncIterator[bytes]:
        yield self.data

    async def aclose(self) -> None:
        self.closed = True


class ScriptedConnector:
    """A sender whose behaviour per endpoint is `script(endpoint_port, request, n)`.

    The script returns a status code, a `(status, headers)` pair, a float (seconds to wait
    before answering 200), or raises. `n` counts sends to that port, this one included. Every
    send is logged as `(time, port, method, body)`; the `timeout` extension's `read` bounds
    the wait as the real sender's does.
    """

    def __init__(self, script: Callable[[int, Any, int], Any]) -> None:
        self.script = script
        self.log: list[tuple[float, int, str, bytes]] = []
        self.bodies: list[TrackedBody] = []

    def factory(self, mesh: Mesh, service: str, ssl_context: ssl.SSLContext | None) -> ScriptedConnector:
        """Pass as `Mesh(..., connector_factory=connector.factory)`."""
        return self

    async def send(self, endpoint: Endpoint, request: Request) -> Response:
        body = await request.aread()
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
            raise EndpointTimeout(f"{endpoint.id}: read timed out", endpoint=endpoint) from None
        headers: list[tuple[str, str]] = []
        if isinstance(action, tuple):
            action, headers = action
        tracked = TrackedBody()
        self.bodies.append(tracked)
        return Response(action, headers, tracked)

    async def aclose(self) -> None:
        pass


def connect_error(port: int) -> EndpointConnectError:
    ep = Endpoint("127.0.0.1", port)
    return EndpointConnectError(f"connect to {ep.id} failed", endpoint=ep)


def read_error(port: int) -> EndpointReadError:
    ep = Endpoint("127.0.0.1", port)
    return EndpointReadError(f"{ep.id}: connection reset", endpoint=ep)


def scripted_mesh(
    script: Callable[[int, Any, int], Any],
    resilience: list[str],
    plugins: Iterable[str] = (),
    extra: Iterable[tuple[str, Any]] = (),
    balancer: str = "test-rr",
    **tables: Any,
) -> tuple[Mesh, ScriptedConnector]:
    """A mesh with one service `svc` over `SCRIPTED_PORTS`, sending through a
    ScriptedConnector; returns both."""
    connector = ScriptedConnector(script)
    config = {
        "services": {
            "svc": {
                "discovery": "static",
                "static": {"endpoints": [f"127.0.0.1:{p}" for p in SCRIPTED_PORTS]},
                "balancer": balancer,
                "resilience": resilience,
                **tables,
            }
        }
    }
    mesh = Mesh(
        config,
        list(plugins),
        extra_plugins=[("test-balancers", SimpleBalancers()), *extra],
        connector_factory=connector.factory,
    )
    return mesh, connector
