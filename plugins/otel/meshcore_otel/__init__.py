"""meshcore-servicemesh-otel: OpenTelemetry traces of mesh calls, exported over OTLP/HTTP.

    [mesh]
    plugins = ["retry", "otel"]

    [defaults]
    resilience = ["timeout", "retry", "otel"]   # innermost: one CLIENT span per attempt

    [tracing]
    endpoint = "http://collector:4318/v1/traces"
    ratio = 0.01                                 # new traces sampled; a caller's decision wins

On a sidecar (`meshcore run`) the plugin also makes a SERVER span for each inbound request.
Placement, propagation, attributes and costs: docs/tracing.md. Only the public `meshcore`
API is used.
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import AsyncIterator
from typing import Any

import anyio

import meshcore

from ._export import Exporting, Tracing, parse_headers
from ._spans import (
    ClientSpans,
    ServerSpans,
    breaker_states,
    follow_httpx_instrumentation,
    spiffe_id,
)

__all__ = [
    "LAYER_SETTINGS",
    "TRACING_SETTINGS",
    "ClientSpans",
    "Exporting",
    "ServerSpans",
    "Tracing",
    "breaker_states",
    "tracing_for",
]


def _check_headers(values: tuple[str, ...]) -> tuple[str, ...]:
    parse_headers(values)
    return values


def _check_endpoint(value: str) -> str:
    if value and not value.startswith(("http://", "https://")):
        raise ValueError(f"expected an http(s) URL such as http://collector:4318/v1/traces, got {value!r}")
    return value


# Queue and batch defaults are the OpenTelemetry SDK's (OTEL_BSP_* in the SDK environment
# variable spec: 2048 spans, batches of 512, every 5 s, 30 s export timeout).
TRACING_SETTINGS = {
    "endpoint": meshcore.Setting(
        "str", "",
        "OTLP/HTTP traces URL (http://host:4318/v1/traces); empty: the process's global "
        "TracerProvider (an app that set up OpenTelemetry itself)",
        convert=_check_endpoint,
    ),
    "ratio": meshcore.Setting(
        "float", 1.0,
        "share of new traces sampled (ParentBased(TraceIdRatioBased)); a caller's decision wins",
        min=0, max=1,
    ),
    "service_name": meshcore.Setting(
        "str", "", "the resource's service.name (empty: the sidecar's service, else 'meshcore')"
    ),
    "headers": meshcore.Setting(
        "list[str]", (), "headers sent to the collector, as 'name=value'", convert=_check_headers
    ),
    "max_queue_size": meshcore.Setting(
        "int", 2048, "spans held for export at most; more are dropped and counted (SDK: 2048)",
        min=1, max=1_000_000,
    ),
    "max_export_batch_size": meshcore.Setting(
        "int", 512, "spans per export request (SDK: 512)", min=1, max=1_000_000
    ),
    "schedule_delay": meshcore.Setting(
        "duration", 5.0, "longest wait before a partial batch is exported (SDK: 5 s)",
        min=0.001, max=3600,
    ),
    "export_timeout": meshcore.Setting(
        "duration", 30.0, "one export's timeout, its retries included (SDK: 30 s)",
        min=0.001, max=3600,
    ),
    "inbound": meshcore.Setting(
        "bool", True, "on a sidecar, a SERVER span for each inbound request"
    ),
}

LAYER_SETTINGS: dict[str, meshcore.Setting] = {}

_tracings: weakref.WeakKeyDictionary[meshcore.Mesh, Tracing] = weakref.WeakKeyDictionary()


def tracing_for(mesh: meshcore.Mesh) -> Tracing:
    """The mesh's Tracing, made on first use (layer factories may run before lifespans)."""
    tracing = _tracings.get(mesh)
    if tracing is None:
        sidecar = mesh.config.section("sidecar")
        default_name = getattr(sidecar, "service", None) or "meshcore"
        tracing = _tracings[mesh] = Tracing(mesh.config.section("tracing"), default_name)
        mesh.add_state("tracing", tracing.state)
        follow_httpx_instrumentation()
    return tracing


@meshcore.hookimpl
def meshcore_kinds() -> list[meshcore.Kind]:
    return [
        meshcore.Kind("tracing", "section", TRACING_SETTINGS,
                      help="where spans are exported and how new traces are sampled"),
        meshcore.Kind("otel", "layer", LAYER_SETTINGS,
                      help="an OpenTelemetry CLIENT span per call (innermost: per attempt)"),
    ]


@meshcore.hookimpl
def meshcore_layer(kind: str, settings: meshcore.Settings, upstream: Any) -> Any:
    if kind != "otel":
        return None
    return ClientSpans(tracing_for(upstream.mesh), upstream.name)


@meshcore.hookimpl
def meshcore_inbound_layer(mesh: meshcore.Mesh) -> Any:
    tracing = tracing_for(mesh)
    if not mesh.config.section("tracing").inbound:
        return None
    return ServerSpans(tracing, getattr(mesh.config.section("sidecar"), "service", None) or "local")


@meshcore.hookimpl(wrapper=True)
def meshcore_check_peer(service: str, endpoint: Any, peer: Any, mesh: meshcore.Mesh) -> Any:
    """Around the security plugin's check of an outbound server: once it accepted the server,
    note the identity it proved, for the CLIENT spans of the attempts to that endpoint (a
    pooled connection was checked when it was opened)."""
    result = yield
    identity = spiffe_id(peer)
    if identity is not None:
        tracing_for(mesh).peers.setdefault(service, {})[endpoint] = identity
    return result


@meshcore.hookimpl
def meshcore_state_changed(service: str, component: str, subject: str, old: str, new: str) -> None:
    if component == "breaker" and subject == service:
        breaker_states[service] = new


@contextlib.asynccontextmanager
async def _flushed(mesh: meshcore.Mesh) -> AsyncIterator[None]:
    tracing = tracing_for(mesh)
    tracing.start()
    try:
        yield
    finally:
        # Shutting down exports what is queued; blocking (HTTP), so off the event loop.
        with anyio.CancelScope(shield=True):
            await anyio.to_thread.run_sync(tracing.shutdown)
        _tracings.pop(mesh, None)


@meshcore.hookimpl
def meshcore_lifespan(mesh: meshcore.Mesh) -> Any:
    return _flushed(mesh)
