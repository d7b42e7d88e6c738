"""mesh.toml -> validated config objects.

Two passes. `MeshConfig.load` checks the shape the core owns (`[mesh]`, `[defaults]`,
`[services.*]` and their pipeline keys) without knowing any plugin. `MeshConfig.resolve` then
checks every kind name and kind table against the loaded plugins' declared settings. Every
error names the file, the key path and what was expected.
"""

from __future__ import annotations

import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ._errors import ConfigError
from ._settings import Setting, Settings, validate_settings

if TYPE_CHECKING:
    from ._plugins import Kind, Plugins

__all__ = ["MeshConfig", "ServiceConfig", "MESH_SETTINGS"]

# [mesh] settings the core owns. discovery_timeout: how long the first request to a service
# waits for its first snapshot; Envoy's initial_fetch_timeout is 15 s
# (shared/reference/data-plane-anchors.md, "Discovery").
MESH_SETTINGS: dict[str, Setting] = {
    "plugins": Setting("list[str]", (), "the plugin list (built-ins are always loaded)"),
    "discovery_timeout": Setting(
        "duration", 15.0, "how long a request waits for a service's first snapshot", min=0
    ),
    "discovery_backoff": Setting(
        "duration", 1.0, "first backoff after a discovery error (doubles up to 30 s)", min=0
    ),
    "pass_through": Setting(
        "bool", True, "send requests for hosts that are not mesh services directly"
    ),
}

_PIPELINE_KEYS = {"discovery", "balancer", "resilience"}
# Per-service only (never merged from [defaults]): traffic management, see docs/routing.md.
_ROUTING_KEYS = {"routes", "subsets"}


@dataclass(frozen=True)
class ServiceConfig:
    """One service's pipeline: kind names and the validated settings of each kind."""

    name: str
    discovery: str
    balancer: str | None
    resilience: tuple[str, ...]
    tables: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    settings: Mapping[str, Settings] = field(default_factory=dict)
    # Raw `routes` (HTTPRoute rules, in order) and `subsets` tables; the mesh compiles them
    # (meshcore._routing), because match and filter kinds come from plugins.
    routes: tuple[Mapping[str, Any], ...] = ()
    subsets: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)

    def settings_for(self, kind: str) -> Settings:
        return self.settings.get(kind, Settings())


@dataclass(frozen=True)
class MeshConfig:
    """A whole mesh.toml. Build one with `load`, `from_dict`, or in code."""

    services: Mapping[str, ServiceConfig] = field(default_factory=dict)
    plugins: tuple[str, ...] = ()
    mesh: Settings = field(default_factory=lambda: _default_mesh_settings())
    sections: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    section_settings: Mapping[str, Settings] = field(default_factory=dict)
    source: str = "<config>"
    resolved: bool = False

    # -- loading -------------------------------------------------------------------------------

    @classmethod
    def load(cls, path: str | Path) -> MeshConfig:
        path = Path(path)
        source = str(path)
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise ConfigError("file not found", source=source) from None
        except OSError as exc:
            raise ConfigError(f"cannot read: {exc.strerror}", source=source) from None
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"invalid TOML: {exc}", source=source) from None
        return cls.from_dict(data, source=source)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], *, source: str = "<config>") -> MeshConfig:
        """Check the core's part of the shape; plugin kinds are checked later by `resolve`."""
        _expect_table(data, source, "")
        mesh_table = data.get("mesh", {})
        mesh = validate_settings(MESH_SETTINGS, mesh_table, source=source, path="mesh")
        defaults = data.get("defaults", {})
        _expect_table(defaults, source, "defaults")
        for key in _ROUTING_KEYS & set(defaults):
            raise ConfigError(
                f"{key} are per service: move them to [services.<name>.{key}]",
                source=source, path=f"defaults.{key}",
            )
        services_table = data.get("services", {})
        _expect_table(services_table, source, "services")
        services = {
            name: _service(name, table, defaults, source)
            for name, table in services_table.items()
        }
        sections = {k: v for k, v in data.items() if k not in ("mesh", "defaults", "services")}
        for name, table in sections.items():
            _expect_table(table, source, name)
        return cls(
            services=services,
            plugins=tuple(mesh.plugins),
            mesh=mesh,
            sections=sections,
            source=source,
        )

    # -- checking against plugins --------------------------------------------------------------

    def resolve(self, plugins: Plugins) -> MeshConfig:
        """Validate kind names and kind tables against the loaded plugins' declarations."""
        src = self.source
        services = {}
        for name, svc in self.services.items():
            base = f"services.{name}"
            _check_kind(plugins, svc.discovery, "discovery", src, f"{base}.discovery")
            if svc.balancer is not None:
                _check_kind(plugins, svc.balancer, "balancer", src, f"{base}.balancer")
            for i, kind in enumerate(svc.resilience):
                _check_kind(plugins, kind, "layer", src, f"{base}.resilience[{i}]")
            settings = {}
            for kind in (svc.discovery, svc.balancer, *svc.resilience, *svc.tables):
                if kind is None or kind in settings:
                    continue
                path = f"{base}.{kind}"
                declared = plugins.kinds.get(kind)
                if declared is None or declared.family == "section":
                    known = ", ".join(sorted(plugins.kinds)) or "none"
                    raise ConfigError(
                        f"no loaded plugin provides kind {kind!r} (loaded kinds: {known})",
                        source=src,
                        path=path,
                    )
                settings[kind] = _kind_settings(declared, svc.tables.get(kind, {}), src, path)
            services[name] = ServiceConfig(
                svc.name, svc.discovery, svc.balancer, svc.resilience, svc.tables, settings,
                svc.routes, svc.subsets,
            )
        section_settings = {}
        for name, table in self.sections.items():
            declared = plugins.kinds.get(name)
            if declared is None or declared.family != "section":
                known = ", ".join(sorted(plugins.kinds_of("section"))) or "none"
                raise ConfigError(
                    f"unknown section (sections of loaded plugins: {known}; "
                    "core sections: mesh, defaults, services)",
                    source=src,
                    path=name,
                )
            section_settings[name] = _kind_settings(declared, table, src, name)
        for kind in plugins.kinds.values():
            if kind.family == "section" and kind.name not in section_settings:
                section_settings[kind.name] = _kind_settings(kind, {}, src, kind.name)
        return MeshConfig(
            services=services,
            plugins=self.plugins,
            mesh=self.mesh,
            sections=self.sections,
            section_settings=section_settings,
            source=self.source,
            resolved=True,
        )

    def section(self, name: str) -> Settings:
        """A plugin section's validated settings (`[tls]`, `[registration]`, ...)."""
        return self.section_settings.get(name, Settings())


def _kind_settings(kind: Kind, table: Mapping[str, Any], source: str, path: str) -> Settings:
    """Validate one kind's table, then its cross-setting check (`Kind.validate`), if any."""
    settings = validate_settings(
        kind.settings, table, source=source, path=path, defaults=kind.defaults
    )
    if kind.validate is not None:
        try:
            kind.validate(settings)
        except ValueError as exc:
            raise ConfigError(str(exc), source=source, path=path) from None
    return settings


def _default_mesh_settings() -> Settings:
    return validate_settings(MESH_SETTINGS, {}, source="", path="mesh")


def _expect_table(value: Any, source: str, path: str) -> None:
    if not isinstance(value, Mapping):
        raise ConfigError(f"expected a table, got {value!r}", source=source, path=path or "(top)")


def _service(
    name: str, table: Any, defaults: Mapping[str, Any], source: str
) -> ServiceConfig:
    base = f"services.{name}"
    _expect_table(table, source, base)
    merged: dict[str, Any] = {}
    for key, value in defaults.items():
        merged[key] = dict(value) if isinstance(value, Mapping) else value
    for key, value in table.items():
        if key in _ROUTING_KEYS:
            continue
        if isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
            merged[key] = {**merged[key], **value}
        else:
            merged[key] = value

    def where(key: str) -> str:
        return f"{base}.{key}" if key in table else f"defaults.{key}"

    discovery = merged.get("discovery")
    if discovery is None:
        raise ConfigError(
            'missing "discovery" (a discovery kind such as "static" or "dns")',
            source=source,
            path=f"{base}.discovery",
        )
    if not isinstance(discovery, str):
        raise ConfigError(
            f"expected a kind name (string), got {discovery!r}", source=source, path=where("discovery")
        )
    balancer = merged.get("balancer")
    if balancer is not None and not isinstance(balancer, str):
        raise ConfigError(
            f"expected a kind name (string), got {balancer!r}", source=source, path=where("balancer")
        )
    resilience = merged.get("resilience", [])
    if not isinstance(resilience, Sequence) or isinstance(resilience, str) or not all(
        isinstance(k, str) for k in resilience
    ):
        raise ConfigError(
            f"expected a list of kind names, got {resilience!r}",
            source=source,
            path=where("resilience"),
        )
    tables = {}
    for key, value in merged.items():
        if key in _PIPELINE_KEYS:
            continue
        if not isinstance(value, Mapping):
            raise ConfigError(
                f"unknown key {key!r} (expected discovery, balancer, resilience, "
                "or a table of settings named after a kind)",
                source=source,
                path=where(key),
            )
        tables[key] = value
    return ServiceConfig(
        name, discovery, balancer, tuple(resilience), tables,
        routes=_routes(table.get("routes", []), source, f"{base}.routes"),
        subsets=_subsets(table.get("subsets", {}), source, f"{base}.subsets"),
    )


def _routes(value: Any, source: str, path: str) -> tuple[Mapping[str, Any], ...]:
    """`[[services.X.routes]]` (a list, in order) or `[services.X.routes.<name>]` (named)."""
    if isinstance(value, Mapping):
        out = []
        for name, route in value.items():
            _expect_table(route, source, f"{path}.{name}")
            out.append({"name": name, **route})
        return tuple(out)
    if not isinstance(value, list):
        raise ConfigError(
            f"expected an array of tables [[...routes]] or a table of named routes, got {value!r}",
            source=source, path=path,
        )
    for i, route in enumerate(value):
        _expect_table(route, source, f"{path}[{i}]")
    return tuple(value)


def _subsets(value: Any, source: str, path: str) -> Mapping[str, Mapping[str, Any]]:
    _expect_table(value, source, path)
    for name, table in value.items():
        _expect_table(table, source, f"{path}.{name}")
    return dict(value)


def _check_kind(plugins: Plugins, kind: str, family: str, source: str, path: str) -> None:
    declared = plugins.kinds.get(kind)
    if declared is not None and declared.family == family:
        return
    available = ", ".join(plugins.kinds_of(family)) or "none loaded"
    if declared is not None:
        raise ConfigError(
            f"{kind!r} is a {declared.family} kind, not a {family} kind "
            f"(loaded {family} kinds: {available})",
            source=source,
            path=path,
        )
    raise ConfigError(
        f"unknown {family} kind {kind!r}: no plugin in the plugin list "
        f"({', '.join(plugins.names)}) declares it in meshcore_kinds (loaded {family} kinds: "
        f"{available}). Add the plugin that provides it to the plugin list, or, if it is "
        "there, check that plugin's meshcore_kinds",
        source=source,
        path=path,
    )
