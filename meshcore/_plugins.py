"""Finding plugins by entry point, loading the ones named, and a typed facade over pluggy.

Strict about what the user named, clear about everything else: a plugin in the list that is
missing or fails to import stops startup naming the plugin, its distribution and the cause; an
installed plugin nobody asked for is never imported (listing reads only entry-point metadata).
"""

from __future__ import annotations

import importlib.metadata as metadata
import inspect
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import pluggy

from . import hookspecs
from ._errors import PluginError
from ._settings import Setting

if TYPE_CHECKING:
    from ._settings import Settings

__all__ = ["Kind", "PluginInfo", "Plugins", "hookimpl", "installed_plugins", "resolve_plugin_list"]

GROUP = "meshcore"
FAMILIES = ("discovery", "balancer", "layer", "section")
BUILTIN = ("static", "sidecar", "demo")

hookimpl = pluggy.HookimplMarker("meshcore")


@dataclass(frozen=True)
class Kind:
    """A name users write in the config, the family it belongs to, and its settings."""

    name: str
    family: str
    settings: Mapping[str, Setting] = field(default_factory=dict)
    help: str = ""
    validate: Callable[[Settings], None] | None = None
    """Checks settings against each other (`min_refresh` <= `max_refresh`): raise ValueError
    saying what is wrong; the core reports it with the file and the kind's key path."""

    def __post_init__(self) -> None:
        if self.family not in FAMILIES:
            raise ValueError(f"kind {self.name!r}: family must be one of {FAMILIES}")


@dataclass(frozen=True)
class PluginInfo:
    """An installed plugin, read from entry-point metadata without importing it."""

    name: str
    value: str
    distribution: str
    version: str

    def load(self) -> Any:
        return metadata.EntryPoint(self.name, self.value, GROUP).load()


def installed_plugins() -> dict[str, PluginInfo]:
    """Every plugin installed in group `meshcore`, by name. Imports nothing."""
    found: dict[str, PluginInfo] = {}
    for dist in metadata.distributions():
        for ep in dist.entry_points:
            if ep.group == GROUP and ep.name not in found:
                found[ep.name] = PluginInfo(
                    ep.name, ep.value, dist.metadata["Name"], dist.version
                )
    return found


def resolve_plugin_list(
    cli: Sequence[str] | None = None, config: Sequence[str] | None = None
) -> list[str]:
    """The plugin list by precedence: `--plugin`, then `MESHCORE_PLUGINS`, then `[mesh] plugins`.

    Built-ins are always loaded; names keep their first position and appear once.
    """
    env = os.environ.get("MESHCORE_PLUGINS")
    if cli:
        chosen = list(cli)
    elif env is not None and env.strip():
        chosen = [n.strip() for n in env.split(",") if n.strip()]
    else:
        chosen = list(config or ())
    names = [*BUILTIN, *chosen]
    return list(dict.fromkeys(names))


def ensure_not_awaitable(result: Any, hook: str, plugin: str) -> Any:
    """The one rule for async in hooks: results are plain values, never awaitables."""
    if inspect.isawaitable(result):
        if inspect.iscoroutine(result):
            result.close()
        raise PluginError(
            f"plugin {plugin!r}: hook {hook} returned an awaitable; hooks are synchronous "
            "factories (return an object with async methods instead)"
        )
    return result


# The first-party plugins and the distributions that carry them: the name users type is not
# always the distribution's suffix (`round-robin` ships as `meshcore-servicemesh-roundrobin`).
FIRST_PARTY = {
    "round-robin": "meshcore-servicemesh-roundrobin",
    "weighted": "meshcore-servicemesh-weighted",
    "retry": "meshcore-servicemesh-retry",
    "breaker": "meshcore-servicemesh-breaker",
    "dns": "meshcore-servicemesh-dns",
    "consul": "meshcore-servicemesh-consul",
    "tls": "meshcore-servicemesh-tls",
    "etcd": "meshcore-servicemesh-etcd",
}


def _install_hint(name: str) -> str:
    distribution = FIRST_PARTY.get(name)
    if distribution is not None:
        return f"Install it with `pip install {distribution}`."
    return "Install the distribution that provides it, or fix the name."


class Plugins:
    """The loaded plugin list: a typed facade over the pluggy manager.

    The core calls these methods, never `pm.hook.<name>` directly.
    """

    def __init__(self, names: Iterable[str] = (), *, extra: Iterable[tuple[str, Any]] = ()):
        """Load `names` by entry point; `extra` adds (name, object) pairs already in hand
        (tests and embedders registering a plugin class inline)."""
        self.pm = pluggy.PluginManager(GROUP)
        self.pm.add_hookspecs(hookspecs)
        self.names: list[str] = []
        self.kinds: dict[str, Kind] = {}
        self.kind_owner: dict[str, str] = {}
        installed = installed_plugins()
        for name in names:
            info = installed.get(name)
            if info is None:
                listing = ", ".join(sorted(installed)) or "none"
                raise PluginError(
                    f"unknown plugin {name!r}; installed plugins: {listing}. {_install_hint(name)}"
                )
            try:
                module = info.load()
            except Exception as exc:
                raise PluginError(
                    f"plugin {name!r} (distribution {info.distribution} {info.version}) "
                    f"failed to import: {type(exc).__name__}: {exc}"
                ) from exc
            self._register(name, module)
        for name, obj in extra:
            self._register(name, obj)
        try:
            self.pm.check_pending()
        except pluggy.PluginValidationError as exc:
            raise PluginError(f"invalid hook implementation: {exc}") from exc
        self._collect_kinds()

    def _register(self, name: str, obj: Any) -> None:
        if name in self.names:
            return
        try:
            self.pm.register(obj, name=name)
        except (pluggy.PluginValidationError, ValueError) as exc:
            raise PluginError(f"plugin {name!r} is not a valid meshcore plugin: {exc}") from exc
        self.names.append(name)

    def _collect_kinds(self) -> None:
        for impl in self.pm.hook.meshcore_kinds.get_hookimpls():
            kinds = ensure_not_awaitable(impl.function(), "meshcore_kinds", impl.plugin_name)
            for kind in kinds or ():
                if not isinstance(kind, Kind):
                    raise PluginError(
                        f"plugin {impl.plugin_name!r}: meshcore_kinds must return "
                        f"meshcore.Kind objects, got {kind!r}"
                    )
                owner = self.kind_owner.get(kind.name)
                if owner is not None:
                    raise PluginError(
                        f"kind {kind.name!r} is provided by two plugins: {owner!r} and "
                        f"{impl.plugin_name!r}; remove one of them from the plugin list"
                    )
                self.kinds[kind.name] = kind
                self.kind_owner[kind.name] = impl.plugin_name

    # -- queries -------------------------------------------------------------------------------

    def kinds_of(self, family: str) -> list[str]:
        return sorted(k.name for k in self.kinds.values() if k.family == family)

    def families_of(self, name: str) -> list[str]:
        """The hook families plugin `name` implements (for `meshcore plugins`)."""
        plugin = self.pm.get_plugin(name)
        if plugin is None:
            return []
        return families_of(self.pm, plugin)

    def implements(self, hook: str) -> bool:
        return bool(getattr(self.pm.hook, hook).get_hookimpls())

    # -- factories -----------------------------------------------------------------------------

    def _first(self, hook: str, **kwargs: Any) -> Any:
        caller = getattr(self.pm.hook, hook)
        for impl in reversed(caller.get_hookimpls()):
            result = impl.function(**{k: kwargs[k] for k in impl.argnames})
            if result is not None:
                return ensure_not_awaitable(result, hook, impl.plugin_name)
        return None

    def discovery(self, kind: str, settings: Settings, service: str) -> Any:
        found = self._first("meshcore_discovery", kind=kind, settings=settings, service=service)
        if found is None:
            raise PluginError(f"plugin {self.kind_owner.get(kind)!r} gave no discovery for {kind!r}")
        return found

    def balancer(self, kind: str, settings: Settings, upstream: Any) -> Any:
        found = self._first("meshcore_balancer", kind=kind, settings=settings, upstream=upstream)
        if found is None:
            raise PluginError(f"plugin {self.kind_owner.get(kind)!r} gave no balancer for {kind!r}")
        return found

    def layer(self, kind: str, settings: Settings, upstream: Any) -> Any:
        found = self._first("meshcore_layer", kind=kind, settings=settings, upstream=upstream)
        if found is None:
            raise PluginError(f"plugin {self.kind_owner.get(kind)!r} gave no layer for {kind!r}")
        return found

    def client_tls(self, service: str, mesh: Any) -> Any:
        return self._first("meshcore_client_tls", service=service, mesh=mesh)

    def server_tls(self, mesh: Any) -> Any:
        return self._first("meshcore_server_tls", mesh=mesh)

    def check_peer(self, service: str, endpoint: Any, peer: Any, mesh: Any) -> None:
        self.pm.hook.meshcore_check_peer(service=service, endpoint=endpoint, peer=peer, mesh=mesh)

    def authorize(self, request: Any, peer: Any, mesh: Any) -> str | None:
        return self.pm.hook.meshcore_authorize(request=request, peer=peer, mesh=mesh)

    def lifespans(self, mesh: Any) -> list[Any]:
        results = []
        for impl in reversed(self.pm.hook.meshcore_lifespan.get_hookimpls()):
            result = impl.function(mesh=mesh)
            if result is not None:
                results.append(ensure_not_awaitable(result, "meshcore_lifespan", impl.plugin_name))
        return results

    def local_health(self, mesh: Any) -> list[tuple[str, str]]:
        return [r for r in self.pm.hook.meshcore_local_health(mesh=mesh) if r is not None]

    def add_cli(self, cli: Any) -> None:
        self.pm.hook.meshcore_cli(cli=cli)

    @property
    def events(self) -> Any:
        """`pm.hook`, for firing event hooks (`plugins.events.meshcore_endpoints_changed(...)`)."""
        return self.pm.hook


_FAMILY_OF_HOOK = {
    "meshcore_kinds": "config",
    "meshcore_discovery": "discovery",
    "meshcore_balancer": "balancing",
    "meshcore_layer": "resilience",
    "meshcore_client_tls": "security",
    "meshcore_server_tls": "security",
    "meshcore_check_peer": "security",
    "meshcore_authorize": "security",
    "meshcore_lifespan": "lifecycle",
    "meshcore_local_health": "lifecycle",
    "meshcore_mesh_started": "events",
    "meshcore_mesh_stopping": "events",
    "meshcore_endpoints_changed": "events",
    "meshcore_discovery_error": "events",
    "meshcore_request_finished": "events",
    "meshcore_state_changed": "events",
    "meshcore_cli": "cli",
}


def families_of(pm: pluggy.PluginManager, plugin: Any) -> list[str]:
    found = {
        _FAMILY_OF_HOOK.get(caller.name, caller.name)
        for caller in pm.get_hookcallers(plugin) or ()
    }
    return sorted(found)
