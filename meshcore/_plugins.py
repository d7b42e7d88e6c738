"""Finding plugins by entry point, loading the ones named, and a typed facade over pluggy.

Strict about what the user named, clear about everything else: a plugin in the list that is
missing or fails to import stops startup naming the plugin, its distribution and the cause; an
installed plugin nobody asked for is never imported (listing reads only entry-point metadata).
"""

from __future__ import annotations

import functools
import importlib
import importlib.machinery
import inspect
import os
import sys
import tomllib
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pluggy

from . import hookspecs
from ._errors import PluginError
from ._settings import Setting, declared_defaults

if TYPE_CHECKING:
    import ssl
    from contextlib import AbstractAsyncContextManager

    import click

    from ._endpoints import Endpoint
    from ._mesh import Mesh
    from ._models import Request
    from ._service import Balancer, Discovery, Layer
    from ._settings import Settings
    from ._upstream import Upstream

__all__ = ["Kind", "PluginInfo", "Plugins", "hookimpl", "installed_plugins", "resolve_plugin_list"]

GROUP = "meshcore"
FAMILIES = ("discovery", "balancer", "layer", "section")
BUILTIN = ("static", "sidecar", "demo", "routing")

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

    defaults: Mapping[str, Any] = field(init=False, repr=False, compare=False)
    """Each setting's default, checked and converted when the kind is declared."""

    def __post_init__(self) -> None:
        if self.family not in FAMILIES:
            raise ValueError(f"kind {self.name!r}: family must be one of {FAMILIES}")
        try:
            defaults = declared_defaults(self.settings)
        except ValueError as exc:
            raise ValueError(f"kind {self.name!r}, {exc}") from None
        object.__setattr__(self, "defaults", defaults)


@dataclass(frozen=True)
class PluginInfo:
    """An installed plugin, read from entry-point metadata without importing it."""

    name: str
    value: str
    distribution: str
    version: str

    def load(self) -> Any:
        """Import the entry point's object (`module` or `module:attr.attr`), as
        `importlib.metadata.EntryPoint.load` does."""
        target = self.value.split("[", 1)[0]  # extras (`module:attr [extra]`) do not matter here
        module_name, _, attrs = target.partition(":")
        module = importlib.import_module(module_name.strip())
        return functools.reduce(getattr, filter(None, attrs.strip().split(".")), module)


def installed_plugins() -> dict[str, PluginInfo]:
    """Every plugin installed in group `meshcore`, by name. Imports nothing."""
    found: dict[str, PluginInfo] = {}
    for name, value, distribution, version in _entry_points(GROUP):
        if name not in found:
            found[name] = PluginInfo(name, value, distribution, version)
    return found


# Reading the metadata directories ourselves rather than through `importlib.metadata`, which
# costs the sidecar ~30 ms and ~2 MiB at start (it imports the `email`, `zipfile` and `csv`
# machinery and parses every distribution's metadata); docs/data-path.md, "Start-up time and
# idle memory". The layout is the packaging spec's (packaging.python.org, "Recording installed
# projects"), searched in the order importlib.metadata searches; zip files on sys.path and
# finders other than the path finder that provide distributions are left to it.


def _entry_points(group: str) -> Iterator[tuple[str, str, str, str]]:
    """(name, value, distribution, version) of each entry point in `group`, in the order of
    `importlib.metadata.distributions()`: each meta path finder, sys.path order within one."""
    for finder in sys.meta_path:
        if finder is importlib.machinery.PathFinder:
            for entry in sys.path:
                yield from _path_entry_points(entry or ".", group)
        elif hasattr(finder, "find_distributions"):
            from importlib.metadata import DistributionFinder

            dists = finder.find_distributions(DistributionFinder.Context())
            yield from _dist_entry_points(dists, group)


def _path_entry_points(path: str, group: str) -> Iterator[tuple[str, str, str, str]]:
    if os.path.isfile(path):  # a zip file
        from importlib.metadata import distributions

        yield from _dist_entry_points(distributions(path=[path]), group)
        return
    try:
        children = os.listdir(path)
    except OSError:
        return
    infos = [c for c in children if c.lower().endswith(".dist-info")]
    infos += [c for c in children if c.lower().endswith(".egg-info")]
    for info in infos:
        directory = os.path.join(path, info)
        try:
            with open(os.path.join(directory, "entry_points.txt"), encoding="utf-8") as f:
                text = f.read()
        except OSError:
            continue
        entries = list(_parse_entry_points(text, group))
        if entries:
            metadata = "METADATA" if info.lower().endswith(".dist-info") else "PKG-INFO"
            distribution, version = _name_and_version(os.path.join(directory, metadata))
            for name, value in entries:
                yield name, value, distribution, version


def _dist_entry_points(dists: Iterable[Any], group: str) -> Iterator[tuple[str, str, str, str]]:
    for dist in dists:
        for ep in dist.entry_points.select(group=group):
            yield ep.name, ep.value, dist.metadata["Name"], dist.version


def _parse_entry_points(text: str, group: str) -> Iterator[tuple[str, str]]:
    """The `name = value` lines of section `[group]` of an entry_points.txt (INI-style)."""
    section = None
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("[") and line.endswith("]"):
            section = line[1:-1].strip()
        elif section == group and "=" in line:
            name, value = line.split("=", 1)
            yield name.strip(), value.strip()


def _name_and_version(metadata_file: str) -> tuple[str, str]:
    """`Name` and `Version` from a METADATA/PKG-INFO header (it ends at the first blank line)."""
    fields: dict[str, str] = {}
    try:
        with open(metadata_file, encoding="utf-8") as f:
            for line in f:
                if not line.strip():
                    break
                key, sep, value = line.partition(":")
                if sep and key in ("Name", "Version"):
                    fields.setdefault(key, value.strip())
    except OSError:
        pass
    return fields.get("Name", "?"), fields.get("Version", "?")


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


def config_plugins(path: str) -> list[str]:
    """`[mesh] plugins` of the config file, read leniently (check-config reports errors)."""
    try:
        data = tomllib.loads(Path(path).read_text(encoding="utf-8"))
        plugins = data.get("mesh", {}).get("plugins", [])
        return [p for p in plugins if isinstance(p, str)] if isinstance(plugins, list) else []
    except (OSError, tomllib.TOMLDecodeError, AttributeError):
        return []


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
    "otel": "meshcore-servicemesh-otel",
}


def _install_hint(name: str) -> str:
    distribution = FIRST_PARTY.get(name)
    if distribution is not None:
        return f"Install it with `pip install {distribution}`."
    return "Install the distribution that provides it, or fix the name."


_handed_over: Plugins | None = None


def hand_over(plugins: Plugins | None) -> None:
    """Keep `plugins` for the next `Plugins.load` of the same names: `meshcore run`'s fast path
    (`meshcore._main`) loads the plugin list before the sidecar builds its mesh, and loading
    it twice cost ~3 ms of a start (docs/data-path.md, "Start-up time and idle memory")."""
    global _handed_over
    _handed_over = plugins


class Plugins:
    """The loaded plugin list: a typed facade over the pluggy manager.

    The core calls these methods, never `pm.hook.<name>` directly. Every call goes through
    pluggy's call loop (so `wrapper=True` implementations and `pm.add_hookcall_monitoring`
    see it); factory hooks run only the implementation of the plugin that declared the kind.
    """

    def __init__(self, names: Iterable[str] = (), *, extra: Iterable[tuple[str, Any]] = ()) -> None:
        """Load `names` by entry point; `extra` adds (name, object) pairs already in hand
        (tests and embedders registering a plugin class inline)."""
        self.pm = pluggy.PluginManager(GROUP)
        self.pm.add_hookspecs(hookspecs)
        self.names: list[str] = []
        self.kinds: dict[str, Kind] = {}
        self.kind_owner: dict[str, str] = {}
        self._owner_callers: dict[tuple[str, str], pluggy.HookCaller] = {}
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
        self._requested = list(names)
        self._add(extra)

    @classmethod
    def load(cls, names: Iterable[str], *, extra: Iterable[tuple[str, Any]] = ()) -> Plugins:
        """`Plugins(names, extra=extra)`, reusing the list `hand_over` kept if it loaded the
        same `names` (once: a reload loads afresh)."""
        global _handed_over
        kept, _handed_over = _handed_over, None
        names = list(names)
        if kept is None or kept._requested != names or len(kept.names) != len(names):
            return cls(names, extra=extra)
        kept._add(extra, checked=len(kept.names))
        return kept

    def _add(self, extra: Iterable[tuple[str, Any]], checked: int = 0) -> None:
        """Register `extra`, then check the plugins from index `checked` on and collect the
        kinds of all of them."""
        for name, obj in extra:
            self._register(name, obj)
        for name in self.names[checked:]:
            self._check_undecorated(name, self.pm.get_plugin(name))
        try:
            self.pm.check_pending()
        except pluggy.PluginValidationError as exc:
            raise PluginError(f"invalid hook implementation: {exc}") from exc
        self.kinds.clear()
        self.kind_owner.clear()
        self._owner_callers.clear()  # each excludes the other plugins registered so far
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
        # One call per plugin (through pluggy, so wrappers and tracing see it) to know which
        # plugin declared which kind.
        for impl in self.pm.hook.meshcore_kinds.get_hookimpls():
            if impl.wrapper or impl.hookwrapper:
                continue
            plugin = impl.plugin_name
            try:
                kinds = self._call_only(plugin, "meshcore_kinds")
            except ValueError as exc:  # a Kind or Setting declared wrong: the message says how
                raise PluginError(f"plugin {plugin!r}: {exc}") from exc
            except Exception as exc:
                raise PluginError(
                    f"plugin {plugin!r}: meshcore_kinds raised {type(exc).__name__}: {exc}"
                ) from exc
            declared = [k for answer in kinds for k in (answer or ())]
            for kind in declared:
                if not isinstance(kind, Kind):
                    raise PluginError(
                        f"plugin {plugin!r}: meshcore_kinds must return "
                        f"meshcore.Kind objects, got {kind!r}"
                    )
                owner = self.kind_owner.get(kind.name)
                if owner is not None:
                    raise PluginError(
                        f"kind {kind.name!r} is provided by two plugins: {owner!r} and "
                        f"{plugin!r}; remove one of them from the plugin list"
                    )
                self.kinds[kind.name] = kind
                self.kind_owner[kind.name] = plugin

    def _check_undecorated(self, name: str, obj: Any) -> None:
        """A function named like a hook but not marked is never called: say so at load."""
        for hook in _HOOK_NAMES:
            if callable(getattr(obj, hook, None)) and self.pm.parse_hookimpl_opts(obj, hook) is None:
                raise PluginError(
                    f"plugin {name!r} defines {hook} without @meshcore.hookimpl, so meshcore "
                    f"never calls it; decorate it with @meshcore.hookimpl"
                )

    def _call_only(self, plugin: str, hook: str, **kwargs: Any) -> Any:
        result = self._only(plugin, hook)(**kwargs)
        for item in result if isinstance(result, list) else (result,):
            ensure_not_awaitable(item, hook, plugin)
        return result

    def _only(self, plugin: str, hook: str) -> pluggy.HookCaller:
        """A caller of `hook` that runs `plugin`'s implementation (and every plugin's
        `wrapper=True` implementations) through pluggy's call loop, and no other plugin's."""
        key = (hook, plugin)
        caller = self._owner_callers.get(key)
        if caller is None:
            others = {
                impl.plugin
                for impl in getattr(self.pm.hook, hook).get_hookimpls()
                if impl.plugin_name != plugin and not (impl.wrapper or impl.hookwrapper)
            }
            caller = self._owner_callers[key] = self.pm.subset_hook_caller(hook, others)
        return caller

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

    def _owner_call(self, hook: str, what: str, kind: str, **kwargs: Any) -> Any:
        """Ask only the plugin that declared `kind`: a factory of another plugin that forgets
        to return None for kinds not its own can never take over this one's services."""
        owner = self.kind_owner.get(kind)
        if owner is None:
            raise PluginError(f"no plugin in the plugin list declares {what} kind {kind!r}")
        if not any(
            impl.plugin_name == owner and not (impl.wrapper or impl.hookwrapper)
            for impl in getattr(self.pm.hook, hook).get_hookimpls()
        ):
            raise PluginError(
                f"plugin {owner!r} declares {what} kind {kind!r} but implements no {hook}"
            )
        found = self._call_only(owner, hook, kind=kind, **kwargs)
        if found is None:
            raise PluginError(
                f"plugin {owner!r} declares {what} kind {kind!r} but its {hook} returned None "
                "for it"
            )
        return found

    def _call(self, hook: str, **kwargs: Any) -> Any:
        """Call every implementation of `hook` through pluggy; refuse awaitable answers."""
        result = getattr(self.pm.hook, hook)(**kwargs)
        for item in result if isinstance(result, list) else (result,):
            if inspect.isawaitable(item):
                ensure_not_awaitable(item, hook, self._author_of(hook, item))
        return result

    def _author_of(self, hook: str, result: Any) -> str:
        code = getattr(result, "cr_code", None)
        for impl in getattr(self.pm.hook, hook).get_hookimpls():
            if code is not None and getattr(impl.function, "__code__", None) is code:
                return str(impl.plugin_name)
        return "?"

    def discovery(self, kind: str, settings: Settings, service: str) -> Discovery:
        found: Discovery = self._owner_call(
            "meshcore_discovery", "discovery", kind, settings=settings, service=service
        )
        return found

    def balancer(self, kind: str, settings: Settings, upstream: Upstream) -> Balancer:
        found: Balancer = self._owner_call(
            "meshcore_balancer", "balancer", kind, settings=settings, upstream=upstream
        )
        return found

    def layer(self, kind: str, settings: Settings, upstream: Upstream) -> Layer:
        found: Layer = self._owner_call(
            "meshcore_layer", "layer", kind, settings=settings, upstream=upstream
        )
        return found

    def client_tls(self, service: str, mesh: Mesh) -> ssl.SSLContext | None:
        context: ssl.SSLContext | None = self._call("meshcore_client_tls", service=service, mesh=mesh)
        return context

    def server_tls(self, mesh: Mesh) -> ssl.SSLContext | None:
        context: ssl.SSLContext | None = self._call("meshcore_server_tls", mesh=mesh)
        return context

    def check_peer(self, service: str, endpoint: Endpoint, peer: ssl.SSLObject, mesh: Mesh) -> None:
        self.pm.hook.meshcore_check_peer(service=service, endpoint=endpoint, peer=peer, mesh=mesh)

    def authorize(self, request: Request, peer: ssl.SSLObject | None, mesh: Mesh) -> str | None:
        reason: str | None = self.pm.hook.meshcore_authorize(request=request, peer=peer, mesh=mesh)
        return reason

    def route_kinds(self, hook: str) -> list[tuple[str, Any]]:
        """(plugin, answer) of each plugin's `meshcore_route_matches` or `meshcore_route_filters`
        (a mapping of kind name to factory, or None), in plugin-list order."""
        found: list[tuple[str, Any]] = []
        for impl in getattr(self.pm.hook, hook).get_hookimpls():
            if not (impl.wrapper or impl.hookwrapper):
                answers = self._call_only(impl.plugin_name, hook)
                found.extend((impl.plugin_name, a) for a in answers)
        return found

    def inbound_layers(self, mesh: Mesh) -> list[Layer]:
        """Every plugin's wrapper of the sidecar's inbound send, in plugin order (pluggy
        answers the last registered first)."""
        return list(reversed(self._call("meshcore_inbound_layer", mesh=mesh)))

    def lifespans(self, mesh: Mesh) -> list[AbstractAsyncContextManager[object]]:
        return list(self._call("meshcore_lifespan", mesh=mesh))

    def register(self, instance: Any, mesh: Any) -> list[Any]:
        """Every plugin's registration of `instance` (async context managers), in plugin order."""
        results = []
        for impl in reversed(self.pm.hook.meshcore_register.get_hookimpls()):
            kwargs = {"instance": instance, "mesh": mesh}
            result = impl.function(**{k: kwargs[k] for k in impl.argnames})
            if result is not None:
                results.append(ensure_not_awaitable(result, "meshcore_register", impl.plugin_name))
        return results

    def local_health(self, mesh: Any) -> list[tuple[str, str]]:
        return [r for r in self.pm.hook.meshcore_local_health(mesh=mesh) if r is not None]

    def add_cli(self, cli: click.Group) -> None:
        self.pm.hook.meshcore_cli(cli=cli)

    def checks(self, config: Any) -> list[tuple[str, Any]]:
        """(plugin name, probe) for each probe `meshcore_checks` returns, in plugin-list order.

        Called per plugin through pluggy's own loop (a subset caller without the other
        plugins' plain implementations), so each probe is attributed to the plugin that made
        it and hook wrappers still apply.
        """
        impls = self.pm.hook.meshcore_checks.get_hookimpls()
        plain = [i for i in impls if not (i.wrapper or i.hookwrapper)]
        found: list[tuple[str, Any]] = []
        for impl in plain:
            others = [i.plugin for i in plain if i is not impl]
            caller = self.pm.subset_hook_caller("meshcore_checks", others)
            for probes in caller(config=config):
                ensure_not_awaitable(probes, "meshcore_checks", impl.plugin_name)
                found.extend((impl.plugin_name, probe) for probe in probes or ())
        return found

    @property
    def events(self) -> pluggy.HookRelay:
        """`pm.hook`, for firing event hooks (`plugins.events.meshcore_endpoints_changed(...)`)."""
        return self.pm.hook


_HOOK_NAMES = tuple(name for name in dir(hookspecs) if name.startswith("meshcore_"))

_FAMILY_OF_HOOK = {
    "meshcore_kinds": "config",
    "meshcore_discovery": "discovery",
    "meshcore_balancer": "balancing",
    "meshcore_layer": "resilience",
    "meshcore_route_matches": "routing",
    "meshcore_route_filters": "routing",
    "meshcore_client_tls": "security",
    "meshcore_server_tls": "security",
    "meshcore_check_peer": "security",
    "meshcore_authorize": "security",
    "meshcore_lifespan": "lifecycle",
    "meshcore_local_health": "lifecycle",
    "meshcore_register": "lifecycle",
    "meshcore_mesh_started": "events",
    "meshcore_mesh_stopping": "events",
    "meshcore_endpoints_changed": "events",
    "meshcore_discovery_error": "events",
    "meshcore_request_finished": "events",
    "meshcore_state_changed": "events",
    "meshcore_cli": "cli",
    "meshcore_checks": "cli",
}


def families_of(pm: pluggy.PluginManager, plugin: Any) -> list[str]:
    found = {
        _FAMILY_OF_HOOK.get(caller.name, caller.name)
        for caller in pm.get_hookcallers(plugin) or ()
    }
    return sorted(found)
