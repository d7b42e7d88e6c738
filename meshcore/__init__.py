"""meshcore: a service mesh for Python, as a small async core plus plugins.

Everything public is importable from here; modules starting with `_` are private. Names bound
to httpx (`MeshTransport`) load on first use, so `import meshcore`, the CLI and the sidecar
never import httpx. The engine's client (`HTTPConnector`, `PoolLimits`), for plugins that
talk HTTP to something outside the mesh (the consul plugin to its agent), loads on first use
too.
"""

import typing as _typing

from ._check import Check
from ._client import Client, ClientResponse  # library mode's native client, without httpx
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
    "has_escaped_slash",
    "hookimpl",
    "installed_plugins",
    "normalize_path",
    "normalize_target",
    "parse_duration",
]


def __getattr__(name: str) -> object:
    if name == "MeshTransport":
        from ._transport import MeshTransport

        return MeshTransport
    if name in ("HTTPConnector", "PoolLimits"):
        from . import _http

        return getattr(_http, name)
    raise AttributeError(f"module 'meshcore' has no attribute {name!r}")
