"""The protocols plugins implement: Service, Layer, Balancer, Discovery.

After Finagle's Service/Filter and tower's Service/Layer: a Service is `async (request) ->
response`; a Layer turns a Service into a Service. The pipeline of a service is
`layers[0](layers[1](...(terminal)))`, composed once at start, so a request pays for plain
awaits and nothing else.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Collection, Iterable, Sequence
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

if TYPE_CHECKING:
    from ._endpoints import Endpoint, Outcome, Snapshot
    from ._models import Request, Response

__all__ = ["Balancer", "Discovery", "DiscoverySink", "Layer", "Service", "compose"]

Service = Callable[["Request"], Awaitable["Response"]]
Layer = Callable[[Service], Service]


@runtime_checkable
class Balancer(Protocol):
    """Picks one endpoint of a snapshot per request. Synchronous and O(1) or O(log n)."""

    def pick(
        self, snapshot: Snapshot, request: Request, exclude: Collection[Endpoint]
    ) -> Endpoint:
        """One endpoint of `snapshot` (never empty), avoiding `exclude` and ejected ones."""
        ...


class DiscoverySink(Protocol):
    """What a Discovery reports to: the core's side of one service's watcher."""

    def publish(self, endpoints: Iterable[Endpoint]) -> None:
        """Replace the service's endpoints (a new snapshot when the set changed)."""

    def error(self, exc: BaseException) -> None:
        """Count a failure the discovery survived; the last good snapshot stays in use."""

    def add_state(self, name: str, provider: Callable[[], Any]) -> None:
        """Show the discovery's own state (JSON-ready `provider()`) in `mesh.state()`."""


@runtime_checkable
class Discovery(Protocol):
    """Yields endpoint snapshots for one service over time."""

    async def watch(self, sink: DiscoverySink) -> None:
        """Publish endpoints until cancelled (a static source may publish once and return)."""
        ...


def compose(layers: Sequence[Layer], terminal: Service) -> Service:
    """`layers[0](layers[1](...(terminal)))`: the first layer is the outermost."""
    service = terminal
    for layer in reversed(layers):
        service = layer(service)
    return service


def observer(balancer: object) -> Callable[[Outcome], None] | None:
    """The balancer's optional `observe(outcome)` method, or None."""
    return getattr(balancer, "observe", None)
