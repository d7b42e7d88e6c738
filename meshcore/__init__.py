"""meshcore: a service mesh for Python, as a small async core plus plugins.

Everything public is importable from here; modules starting with `_` are private. Names bound
to httpx (`MeshTransport`) load on first use, so `import meshcore`, the CLI and the sidecar
never import httpx; so do the native client and `Check`, which `meshcore run` never uses
(they are part of its idle memory otherwise: docs/data-path.md, "Start-up time and idle memory"),
and the engine's client (`HTTPConnector`, `PoolLimits`), for plugins that talk HTTP to
something outside the mesh (the consul plugin to its agent).
"""

import typing as _typing

from ._config import MeshConfig, ServiceConfig
from ._endpoints import Endpoint, EndpointStats, Outcome, Snapshot
from ._errors import (
    Attempt,
    CircuitOpen,
    ConfigError,
    DeadlineExceeded,
    EndpointConnectError,
    EndpointError,
    EndpointProtocolError,
    EndpointReadError,
    EndpointTimeout,
    HTTPStatusError,
    IdentityRejected,
    LocalRefusal,
    MeshError,
    MeshNotRunning,
    NoEndpoints,
    PluginError,
    ResponseHeadTooLarge,
    RetriesExhausted,
    UnknownService,
    describe_error,
)
from ._extensions import ATTEMPTS, DEADLINE, ENDPOINT, EXCLUDE
from ._instance import Instance
from ._mesh import Mesh
from ._models import URL, Headers, Request, Response
from ._paths import PathRejected, has_escaped_slash, normalize_path, normalize_target
from ._plugins import Kind, PluginInfo, Plugins, hookimpl, installed_plugins
from ._routing import FaultPolicy, MatchContext, RouteFilter, RouteMatch, Router
from ._service import Balancer, Discovery, DiscoverySink, Layer, Service, compose
from ._settings import Setting, Settings, parse_duration
from ._upstream import Upstream

if _typing.TYPE_CHECKING:
    from ._check import Check
    from ._client import Client, ClientResponse  # library mode's native client, without httpx
    from ._http import HTTPConnector, PoolLimits
    from ._transport import MeshTransport

__version__ = "0.2.0"

__all__ = [
    "ATTEMPTS",
    "DEADLINE",
    "ENDPOINT",
    "EXCLUDE",
    "Attempt",
    "Balancer",
    "Check",
    "CircuitOpen",
    "Client",
    "ClientResponse",
    "ConfigError",
    "DeadlineExceeded",
    "Discovery",
    "DiscoverySink",
    "Endpoint",
    "EndpointConnectError",
    "EndpointError",
    "EndpointProtocolError",
    "EndpointReadError",
    "EndpointStats",
    "EndpointTimeout",
    "FaultPolicy",
    "HTTPConnector",
    "HTTPStatusError",
    "Headers",
    "IdentityRejected",
    "Instance",
    "Kind",
    "Layer",
    "LocalRefusal",
    "MatchContext",
    "Mesh",
    "MeshConfig",
    "MeshError",
    "MeshNotRunning",
    "MeshTransport",
    "NoEndpoints",
    "Outcome",
    "PathRejected",
    "PluginError",
    "PluginInfo",
    "Plugins",
    "PoolLimits",
    "Request",
    "Response",
    "ResponseHeadTooLarge",
    "RetriesExhausted",
    "RouteFilter",
    "RouteMatch",
    "Router",
    "Service",
    "ServiceConfig",
    "Setting",
    "Settings",
    "Snapshot",
    "URL",
    "UnknownService",
    "Upstream",
    "compose",
    "describe_error",
    "has_escaped_slash",
    "hookimpl",
    "installed_plugins",
    "normalize_path",
    "normalize_target",
    "parse_duration",
]


# Exports loaded on first use: name -> the private module that defines it.
_LAZY = {
    "Check": "_check",
    "Client": "_client",
    "ClientResponse": "_client",
    "MeshTransport": "_transport",
    "HTTPConnector": "_http",
    "PoolLimits": "_http",
}


def __getattr__(name: str) -> object:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'meshcore' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value  # later lookups skip this function
    return value
