"""The Prometheus text rendering of the sidecar's counters (`/metrics`), exposition format 0.0.4.

Loaded with the first scrape, not at start (docs/data-path.md, "Start-up time and idle
memory"): a sidecar nobody scrapes never needs it. The counters are `_metrics.Telemetry`.
"""

from __future__ import annotations

import math
import os
import resource
import sys
from collections.abc import Iterable, Iterator
from typing import Any

import anyio

from ._metrics import _CLASSES, _STATUS_OF, BUCKETS, Histogram, Telemetry

__all__ = ["render"]



def _escape(value: Any) -> str:
    return str(value).replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _labels(names: Iterable[str], values: Iterable[Any]) -> str:
    inner = ",".join(f'{n}="{_escape(v)}"' for n, v in zip(names, values))
    return "{" + inner + "}" if inner else ""


def _num(value: float) -> str:
    if value == math.inf:
        return "+Inf"
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, int) or float(value).is_integer():
        return str(int(value))
    return repr(float(value))


class _Writer:
    def __init__(self) -> None:
        self.lines: list[str] = []

    def family(self, name: str, kind: str, help: str) -> None:
        self.lines.append(f"# HELP {name} {help}")
        self.lines.append(f"# TYPE {name} {kind}")

    def sample(self, name: str, value: float, names: Iterable[str] = (), values: Iterable[Any] = ()) -> None:
        self.lines.append(f"{name}{_labels(names, values)} {_num(value)}")

    def text(self) -> str:
        return "\n".join(self.lines) + "\n"


def _rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):  # not Linux: peak RSS instead
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak if sys.platform == "darwin" else peak * 1024


def _find_expiry(tree: Any, path: tuple[str, ...] = ()) -> Iterator[tuple[str, float]]:
    """Certificate expiry times anywhere in a plugin's state: keys named like `not_after`,
    `expires`, `expiry` holding a Unix timestamp, with the nearest `identity` beside them."""
    if isinstance(tree, dict):
        identity = tree.get("identity") or tree.get("spiffe_id") or "/".join(path) or "-"
        for key, value in tree.items():
            low = str(key).lower()
            if (
                isinstance(value, (int, float))
                and not isinstance(value, bool)
                and ("not_after" in low or "expir" in low)
                and value > 1e9  # a wall-clock timestamp, not a duration
            ):
                yield str(identity), float(value)
            elif isinstance(value, (dict, list)):
                yield from _find_expiry(value, (*path, str(key)))
    elif isinstance(tree, list):
        for i, item in enumerate(tree):
            yield from _find_expiry(item, (*path, str(i)))


_CORE_SERVICE_KEYS = {
    "discovery", "balancer", "resilience", "panics", "snapshot_version", "endpoints",
    "routing", "subsets",
}


def _plugin_numbers(tree: Any, path: tuple[str, ...] = ()) -> Iterator[tuple[str, float]]:
    """Numeric leaves of a plugin's state (`retry.budget_denied`, `breaker.opened`)."""
    if isinstance(tree, dict):
        for key, value in tree.items():
            yield from _plugin_numbers(value, (*path, str(key)))
    elif isinstance(tree, bool):
        yield ".".join(path), 1.0 if tree else 0.0
    elif isinstance(tree, (int, float)) and math.isfinite(tree):
        yield ".".join(path), float(tree)


def _histograms(w: _Writer, name: str, hists: dict[tuple[str, str], Histogram], help: str) -> None:
    w.family(name, "histogram", help)
    for (direction, svc), hist in sorted(hists.items()):
        cumulative = 0
        for bound, count in zip((*BUCKETS, math.inf), hist.counts):
            cumulative += count
            w.sample(f"{name}_bucket", cumulative, ("direction", "service", "le"), (direction, svc, _num(bound)))
        w.sample(f"{name}_sum", hist.sum, ("direction", "service"), (direction, svc))
        w.sample(f"{name}_count", hist.count, ("direction", "service"), (direction, svc))


def _routing(w: _Writer, services: dict[str, Any]) -> None:
    """Routed requests by route and backend (a subset is `service/subset`), faults, mirrors."""
    routed = [(svc, r) for svc, s in sorted(services.items()) for r in s.get("routing", {}).get("routes", ())]
    w.family("meshcore_route_requests_total", "counter",
             "Requests a route sent, by service, route and backend (service or service/subset).")
    for svc, r in routed:
        for b in r["backends"]:
            w.sample("meshcore_route_requests_total", b["requests"], ("service", "route", "backend"), (svc, r["name"], b["backend"]))
    w.family("meshcore_route_faults_total", "counter", "Injected faults, by service, route and fault (delay, abort).")
    for svc, r in routed:
        fault = r.get("FAULT_INJECTION")
        if fault is not None:
            for kind, key in (("delay", "delayed"), ("abort", "aborted")):
                w.sample("meshcore_route_faults_total", fault[key], ("service", "route", "fault"), (svc, r["name"], kind))
    w.family("meshcore_route_mirror_total", "counter",
             "Mirrored copies, by service, route and result (sent, completed, failed, dropped).")
    for svc, r in routed:
        for f in r.get("filters", ()):
            if f.get("type") == "RequestMirror":
                for result in ("sent", "completed", "failed", "dropped"):
                    w.sample("meshcore_route_mirror_total", f[result], ("service", "route", "result"), (svc, r["name"], result))


def render(telemetry: Telemetry, state: dict[str, Any], sidecar: dict[str, Any]) -> str:
    """The whole /metrics page from the counters, `mesh.state()` and sidecar stats."""
    w = _Writer()
    t = telemetry

    # Expiry is a timing decision: anyio's clock (virtual under trio's MockClock in tests).
    t.prune(state.get("services", {}), anyio.current_time())

    w.family("meshcore_request_total", "counter",
             "Requests the sidecar answered, by direction, service, status code and class, the "
             "peer's identity (caller inbound, server outbound) and whether the hop was mTLS.")
    for (direction, svc, code, peer, tls), n in sorted(t.requests.items()):
        w.sample("meshcore_request_total", n,
                 ("direction", "service", "status_code", "status_class", "peer_identity", "tls"),
                 (direction, svc, code, _CLASSES.get(code // 100, "other"), peer, tls))

    _histograms(w, "meshcore_response_latency_seconds", t.latency,
                "Seconds from the request head received to the response head handed to the "
                "client (time to first byte, Linkerd's response_latency_ms).")
    _histograms(w, "meshcore_response_duration_seconds", t.duration,
                "Seconds from the request head received to the last byte of the response body "
                "written to the client (Envoy's upstream_rq_time).")

    w.family("meshcore_response_total", "counter",
             "Attempts sent to endpoints, by service, endpoint and status class (error = no response).")
    for (svc, ep, cls), n in sorted(t.responses.items()):
        w.sample("meshcore_response_total", n, ("service", "endpoint", "status_class"), (svc, ep, cls))

    w.family("meshcore_retries_total", "counter",
             "Attempts beyond the first one per request (what retry layers added), by service.")
    for svc, n in sorted(t.retries().items()):
        w.sample("meshcore_retries_total", n, ("service",), (svc,))

    w.family("meshcore_local_response_total", "counter",
             "Requests the sidecar answered itself (no route, no endpoints, breaker open, a "
             "request over a limit, ...), by reason (the x-meshcore-error code) and status code.")
    for (direction, svc, reason), n in sorted(t.local_errors.items()):
        w.sample("meshcore_local_response_total", n, ("direction", "service", "reason", "status_code"),
                 (direction, svc, reason, _STATUS_OF.get(reason, "")))

    w.family("meshcore_identity_rejections_total", "counter",
             "Outbound TLS connections refused because the server's identity was not the one "
             "expected for the service.")
    for svc, n in sorted(t.identity_rejections.items()):
        w.sample("meshcore_identity_rejections_total", n, ("service",), (svc,))

    w.family("meshcore_inbound_denied_total", "counter",
             "Inbound requests refused by authorization (403).")
    w.sample("meshcore_inbound_denied_total", t.denied)

    w.family("meshcore_state_changes_total", "counter",
             "State changes reported by plugins (breaker, ejection), by the new state.")
    for (svc, component, new), n in sorted(t.state_changes.items()):
        w.sample("meshcore_state_changes_total", n, ("service", "component", "state"), (svc, component, new))

    services = state.get("services", {})
    w.family("meshcore_breaker_open", "gauge",
             "1 when a breaker reported itself open (or half-open = 0.5), by service and subject.")
    for (svc, component, subject), new in sorted(t.states.items()):
        if component == "breaker":
            value = 1.0 if new == "open" else 0.5 if new.replace("-", "_") == "half_open" else 0.0
            w.sample("meshcore_breaker_open", value, ("service", "subject"), (svc, subject))

    w.family("meshcore_endpoints", "gauge", "Endpoints in the current snapshot, by service.")
    for svc, s in sorted(services.items()):
        w.sample("meshcore_endpoints", len(s.get("endpoints", ())), ("service",), (svc,))
    w.family("meshcore_endpoints_ejected", "gauge", "Endpoints ejected right now, by service.")
    for svc, s in sorted(services.items()):
        ejected = sum(1 for ep in s.get("endpoints", ()) if ep.get("ejected"))
        w.sample("meshcore_endpoints_ejected", ejected, ("service",), (svc,))
    w.family("meshcore_endpoint_in_flight", "gauge", "Requests in flight, by service and endpoint.")
    for svc, s in sorted(services.items()):
        for ep in s.get("endpoints", ()):
            w.sample("meshcore_endpoint_in_flight", ep.get("in_flight", 0), ("service", "endpoint"), (svc, ep["id"]))
    w.family("meshcore_stale_connection_resends_total", "counter",
             "Requests resent on a fresh connection because the reused keep-alive connection "
             "was found closed before any response byte (RFC 9112 9.3.1), by service and endpoint.")
    for svc, s in sorted(services.items()):
        for ep in s.get("endpoints", ()):
            w.sample("meshcore_stale_connection_resends_total", ep.get("stale_resends", 0),
                     ("service", "endpoint"), (svc, ep["id"]))
    w.family("meshcore_balancer_panics_total", "counter",
             "Picks made among ejected endpoints because every endpoint was ejected.")
    for svc, s in sorted(services.items()):
        w.sample("meshcore_balancer_panics_total", s.get("panics", 0), ("service",), (svc,))

    _routing(w, services)

    w.family("meshcore_discovery_errors_total", "counter", "Discovery failures, by service.")
    for svc, s in sorted(services.items()):
        errors = max(s.get("discovery", {}).get("errors", 0), t.discovery_errors.get(svc, 0))
        w.sample("meshcore_discovery_errors_total", errors, ("service",), (svc,))
    w.family("meshcore_discovery_updates_total", "counter", "Endpoint snapshots published, by service.")
    for svc, s in sorted(services.items()):
        w.sample("meshcore_discovery_updates_total", s.get("discovery", {}).get("updates", 0), ("service",), (svc,))
    w.family("meshcore_discovery_snapshot_age_seconds", "gauge",
             "Seconds since discovery last confirmed the endpoints (absent until the first snapshot).")
    for svc, s in sorted(services.items()):
        age = s.get("discovery", {}).get("snapshot_age")
        if age is not None:
            w.sample("meshcore_discovery_snapshot_age_seconds", age, ("service",), (svc,))
    w.family("meshcore_discovery_stale", "gauge", "1 while a service runs on a stale snapshot.")
    for svc, s in sorted(services.items()):
        w.sample("meshcore_discovery_stale", s.get("discovery", {}).get("state") == "stale", ("service",), (svc,))

    w.family("meshcore_plugin_state", "gauge",
             "Numeric state plugins expose per service (retry budget use and denials, breaker counters), "
             'or mesh-wide with service="" (certificate, registration).')
    # Mesh-wide state (`Mesh.add_state`): one workload certificate, one registration per mesh,
    # exported once rather than repeated under every service.
    for plugin, tree in sorted(state.get("state", {}).items()):
        for key, value in _plugin_numbers(tree):
            w.sample("meshcore_plugin_state", value, ("service", "plugin", "key"), ("", plugin, key))
    for svc, s in sorted(services.items()):
        for plugin, tree in sorted(s.items()):
            if plugin in _CORE_SERVICE_KEYS:
                continue
            for key, value in _plugin_numbers(tree):
                w.sample("meshcore_plugin_state", value, ("service", "plugin", "key"), (svc, plugin, key))

    w.family("meshcore_identity_cert_expiration_timestamp_seconds", "gauge",
             "Unix time at which the workload certificate expires (from the security plugin's state).")
    seen: set[tuple[str, float]] = set()
    for identity, expiry in _find_expiry({k: v for k, v in state.items() if k != "services"}):
        seen.add((identity, expiry))
    for _svc, s in services.items():
        for plugin, tree in s.items():
            if plugin not in _CORE_SERVICE_KEYS:
                seen.update(_find_expiry(tree))
    for identity, expiry in sorted(seen):
        w.sample("meshcore_identity_cert_expiration_timestamp_seconds", expiry, ("identity",), (identity,))

    w.family("meshcore_sidecar_connections_open", "gauge", "Open client connections, by listener.")
    for name, n in sorted(sidecar.get("connections_open", {}).items()):
        w.sample("meshcore_sidecar_connections_open", n, ("listener",), (name,))
    w.family("meshcore_sidecar_connections_total", "counter", "Accepted connections, by listener.")
    for name, n in sorted(t.connections_total.items()):
        w.sample("meshcore_sidecar_connections_total", n, ("listener",), (name,))
    w.family("meshcore_sidecar_accept_paused_total", "counter",
             "Times the listener stopped accepting at max_connections or max_pending_connections "
             "(newcomers wait in the backlog).")
    for name, n in sorted(t.accept_paused.items()):
        w.sample("meshcore_sidecar_accept_paused_total", n, ("listener",), (name,))
    w.family("meshcore_sidecar_pending_closed_total", "counter",
             "Connections closed before their first request head (or TLS handshake) was complete, "
             "to make room within max_pending_connections (the oldest, once past its grace).")
    for name, n in sorted(t.pending_closed.items()):
        w.sample("meshcore_sidecar_pending_closed_total", n, ("listener",), (name,))
    w.family("meshcore_sidecar_requests_in_flight", "gauge", "Requests being answered right now.")
    w.sample("meshcore_sidecar_requests_in_flight", sidecar.get("in_flight", 0))
    w.family("meshcore_sidecar_draining", "gauge", "1 while the sidecar drains after SIGTERM.")
    w.sample("meshcore_sidecar_draining", bool(sidecar.get("draining")))
    w.family("meshcore_sidecar_config_generation", "gauge", "Config generation (1 + successful reloads).")
    w.sample("meshcore_sidecar_config_generation", sidecar.get("generation", 1))
    w.family("meshcore_sidecar_reloads_total", "counter", "SIGHUP reloads, by result (ok, refused).")
    for result in ("ok", "refused"):
        w.sample("meshcore_sidecar_reloads_total", t.reloads.get(result, 0), ("result",), (result,))

    w.family("process_resident_memory_bytes", "gauge", "Resident memory size in bytes.")
    w.sample("process_resident_memory_bytes", _rss_bytes())
    usage = resource.getrusage(resource.RUSAGE_SELF)
    w.family("process_cpu_seconds_total", "counter", "User and system CPU time spent in seconds.")
    w.sample("process_cpu_seconds_total", usage.ru_utime + usage.ru_stime)
    w.family("process_start_time_seconds", "gauge", "Start time of the process since the Unix epoch.")
    w.sample("process_start_time_seconds", t.started)
    return w.text()
