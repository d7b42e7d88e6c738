"""The Mesh: plugins, one Upstream per service, and their tasks, as one async context manager.

Start order: load the plugin list -> validate the config against the plugins' declared
settings -> build every service's balancer and layers (so a bad plugin or setting fails before
anything runs) -> open a task group -> enter plugin lifespans -> start one discovery watcher
per service. Shutdown runs it backwards and leaves no task behind.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import anyio
import anyio.abc

from ._config import MeshConfig
from ._errors import MeshNotRunning, PluginError
from ._models import Request, Response
from ._plugins import Plugins, installed_plugins, resolve_plugin_list
from ._routing import BackendName, Router, check_subsets, compile_routes, subset_config
from ._upstream import Upstream

if TYPE_CHECKING:
    import httpx

    from ._client import Client

__all__ = ["Mesh"]

_HEALTH_ORDER = {"passing": 0, "warning": 1, "critical": 2}


class Mesh:
    """A running service mesh. Use as `async with Mesh(config) as mesh:`.

    `config` is a `MeshConfig`, a dict in the shape of mesh.toml, or None for an empty mesh.
    `plugins` overrides the plugin list (like `--plugin`); `extra_plugins` registers plugin
    objects already in hand as `(name, object)` pairs, which is how tests add inline plugins.
    """

    def __init__(
        self,
        config: MeshConfig | Mapping[str, Any] | None = None,
        plugins: Sequence[str] | None = None,
        *,
        extra_plugins: Iterable[tuple[str, Any]] = (),
        connector_factory: Any = None,
    ) -> None:
        if config is None:
            config = MeshConfig()
        elif not isinstance(config, MeshConfig):
            config = MeshConfig.from_dict(config, source="<dict>")
        self.config = config
        self._plugin_names = resolve_plugin_list(plugins, config.plugins)
        self._extra = list(extra_plugins)
        self._connector_factory = connector_factory
        self.plugins: Plugins = Plugins.load(self._plugin_names, extra=self._extra)
        self.config = config.resolve(self.plugins)
        self.upstreams: dict[str, Upstream] = {}
        # Subset upstreams by "service/subset", and the routers of services with routes
        # (docs/routing.md); both are rebuilt on every start.
        self.subsets: dict[str, Upstream] = {}
        self.routers: dict[str, Router] = {}
        self.mirrors_in_flight = 0
        self.task_group: anyio.abc.TaskGroup | None = None
        self.running = False
        self._stack: contextlib.AsyncExitStack | None = None
        self._state_providers: dict[str, Any] = {}
        self._check_balancers()
        # Subsets and routes are checked (and compiled, then dropped) now, so a bad one fails
        # when the config loads; the mesh compiles them again for its upstreams at start.
        backends: dict[str, Any] = {}
        for name, svc in self.config.services.items():
            backends[name] = BackendName(name)
            for subset in check_subsets(svc, self.config.source):
                backends[f"{name}/{subset}"] = BackendName(f"{name}/{subset}")
        compile_routes(self, self.config, backends)

    def _build_upstreams(self) -> None:
        """One Upstream per service and per subset, their pipelines, and the routers."""
        self.upstreams, self.subsets, self.routers = {}, {}, {}
        for name, svc in self.config.services.items():
            upstream = Upstream(self, svc)
            upstream.build()
            self.upstreams[name] = upstream
            for subset, selects in check_subsets(svc, self.config.source).items():
                derived = Upstream(self, subset_config(svc, subset))
                derived.build()
                upstream.subsets.append((derived, selects))
                self.subsets[derived.name] = derived
        backends = {**self.upstreams, **self.subsets}
        for name, table in compile_routes(self, self.config, backends).items():
            self.routers[name] = Router(self.upstreams[name], table)

    @classmethod
    def from_config(
        cls, path: str | Path, plugins: Sequence[str] | None = None, **kwargs: Any
    ) -> Mesh:
        """A mesh from a mesh.toml file (errors name the file and key path)."""
        return cls(MeshConfig.load(path), plugins, **kwargs)

    # -- lifecycle ----------------------------------------------------------------------------

    async def __aenter__(self) -> Mesh:
        if self.running:
            raise RuntimeError("this mesh is already running")
        stack = contextlib.AsyncExitStack()
        await stack.__aenter__()
        try:
            self._build_upstreams()
            self.task_group = await stack.enter_async_context(anyio.create_task_group())
            stack.callback(self.task_group.cancel_scope.cancel)
            for lifespan in self.plugins.lifespans(self):
                await stack.enter_async_context(lifespan)
            for name, upstream in self.upstreams.items():
                upstream.connector = self._make_connector(name)
                stack.push_async_callback(upstream.connector.aclose)
                for subset, _ in upstream.subsets:
                    subset.connector = upstream.connector  # same endpoints, same pools
            for name, upstream in self.upstreams.items():
                svc = self.config.services[name]
                discovery = self.plugins.discovery(
                    svc.discovery, svc.settings_for(svc.discovery), name
                )
                self.task_group.start_soon(upstream.watch, discovery, name=f"discovery:{name}")
        except BaseException:
            await stack.aclose()
            raise
        self._stack = stack
        self.running = True
        self.plugins.events.meshcore_mesh_started(mesh=self)
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        self.plugins.events.meshcore_mesh_stopping(mesh=self)
        self.running = False
        stack, self._stack = self._stack, None
        if stack is not None:
            await stack.aclose()

    def _make_connector(self, service: str) -> Any:
        ssl_context = self.plugins.client_tls(service, self)
        if self._connector_factory is not None:
            return self._connector_factory(self, service, ssl_context)
        return default_connector(self, service, ssl_context)

    def _check_balancers(self) -> None:
        """A static service with several endpoints needs a balancer; say which exist.

        For dynamic discovery the count is unknown at start: without a balancer the first
        endpoint is used and a snapshot with more is reported as a discovery error.
        """
        for name, svc in self.config.services.items():
            if svc.balancer is not None or svc.discovery != "static":
                continue
            count = len(svc.settings_for("static").endpoints)
            if count <= 1:
                continue
            loaded = ", ".join(self.plugins.kinds_of("balancer")) or "none"
            others = sorted(set(installed_plugins()) - set(self.plugins.names))
            raise PluginError(
                f"service {name!r} has {count} endpoints and no balancer: set `balancer` for it "
                f"or in [defaults]. Loaded balancer kinds: {loaded}; installed plugins not in "
                f"the plugin list: {', '.join(others) or 'none'}"
            )

    # -- requests -----------------------------------------------------------------------------

    def client(self, **kwargs: Any) -> httpx.AsyncClient:
        """An `httpx.AsyncClient` whose requests to mesh services go through the mesh.

        httpx is imported here, when library mode first needs it, not with meshcore."""
        import httpx

        from ._transport import MeshTransport

        return httpx.AsyncClient(transport=MeshTransport(self), **kwargs)

    def http(self, **kwargs: Any) -> Client:
        """The native client (`meshcore.Client`): httpx's everyday surface on the same pipeline,
        without httpx's client in front: the fast path of library mode (docs/concepts.md).
        Takes `base_url`, `headers`, `params`, `timeout` and `verify` (hosts outside the mesh)."""
        from ._client import Client

        return Client(self, **kwargs)

    def upstream(self, service: str) -> Upstream:
        try:
            return self.upstreams[service]
        except KeyError:
            raise KeyError(
                f"no service {service!r} in this mesh (services: {', '.join(self.upstreams) or 'none'})"
            ) from None

    def route(self, request: Request) -> Upstream | Router | None:
        """Where `request` goes: its host's service (its Router when the service has routes,
        which picks a route's backend per request), or None for a host outside the mesh
        (library mode passes it through, the sidecar answers 404). Both have `name` and
        `send(request)`. Raises MeshNotRunning for a mesh service while the mesh is not
        running."""
        host = request.url.host
        router = self.routers.get(host)
        if router is not None and self.running:
            return router
        upstream = self.upstreams.get(host)
        if upstream is not None and self.running:
            return upstream
        if request.url.host in self.config.services:
            raise MeshNotRunning(
                f"request to mesh service {request.url.host!r}: the mesh is not running "
                "(it has not started yet or has already closed; use it inside `async with mesh:`)",
                service=request.url.host,
            )
        return None

    async def send(self, request: Request) -> Response:
        """Send a mesh `Request` whose host names a service through that service's pipeline."""
        upstream = self.route(request)
        if upstream is None:
            raise KeyError(
                f"{request.url.host!r} is not a service of this mesh "
                f"(services: {', '.join(self.config.services) or 'none'})"
            )
        return await upstream.send(request)

    # -- security -----------------------------------------------------------------------------

    def security_changed(self) -> None:
        """Tell the mesh its TLS material rotated: new connections use fresh contexts."""
        for name, upstream in self.upstreams.items():
            update = getattr(upstream.connector, "set_ssl_context", None)
            if update is not None:
                update(self.plugins.client_tls(name, self))

    # -- health -------------------------------------------------------------------------------

    def local_health(self) -> tuple[str, str]:
        """`(status, reason)` of the local instance: the worst answer of the
        `meshcore_local_health` hook ("passing", "warning" or "critical"); passing when no
        plugin has an opinion. Registering plugins report it with each heartbeat."""
        worst = ("passing", "")
        for status, reason in self.plugins.local_health(self):
            if status not in _HEALTH_ORDER:
                raise PluginError(
                    f"meshcore_local_health answered {status!r}; expected one of "
                    f"{', '.join(_HEALTH_ORDER)}"
                )
            if _HEALTH_ORDER[status] > _HEALTH_ORDER[worst[0]]:
                worst = (status, reason)
        return worst

    # -- state --------------------------------------------------------------------------------

    def add_state(self, name: str, provider: Callable[[], Any]) -> None:
        """Show mesh-wide plugin state (registration, certificates) in `state()["state"][name]`;
        `provider()` returns something JSON-ready. Per-service state: `Upstream.add_state`."""
        self._state_providers[name] = provider

    def state(self) -> dict[str, Any]:
        """A JSON-ready view: plugins, mesh-wide plugin state, and per service discovery,
        endpoints and plugin state."""
        return {
            "running": self.running,
            "plugins": list(self.plugins.names),
            "state": {name: provider() for name, provider in self._state_providers.items()},
            "services": {name: self._service_state(name, up) for name, up in self.upstreams.items()},
        }

    def _service_state(self, name: str, upstream: Upstream) -> dict[str, Any]:
        state = upstream.state()
        if upstream.subsets:
            state["subsets"] = {
                sub.name.partition("/")[2]: sub.state() for sub, _ in upstream.subsets
            }
        router = self.routers.get(name)
        if router is not None:
            state["routing"] = router.state()
        return state


def default_connector(mesh: Mesh, service: str, ssl_context: Any) -> Any:
    """meshcore's own HTTP/1.1 engine (meshcore._http), with peer checks through the hooks."""
    from ._http import HTTPConnector

    def verify_peer(endpoint: Any, peer: Any) -> None:
        mesh.plugins.check_peer(service, endpoint, peer, mesh)

    return HTTPConnector(
        ssl_context=ssl_context,
        server_hostname=None,
        verify_peer=verify_peer if ssl_context is not None else None,
    )
