"""Counters the sidecar keeps and their Prometheus text rendering.

Names follow Linkerd's proxy metrics (`request_total`, `response_total`,
`response_latency_ms`, `identity_cert_expiration_timestamp_seconds`) and Envoy's cluster
stats (retries, ejections, breaker state), prefixed `meshcore_` and in base units (seconds)
as Prometheus recommends. docs/metrics.md lists every metric, its labels, which latency each
histogram measures, and how label values are kept bounded.

Breaker and ejection changes and discovery errors arrive through the mesh's event hooks
(`meshcore_state_changed`, `meshcore_discovery_error`), implemented by `Telemetry`, which the
runtime registers as an extra plugin of the meshes it runs (library-mode meshes, which never run
a sidecar, pay nothing). Per-attempt outcomes, the one event of every request, come through
`upstream.add_observer` instead, subscribed when each mesh starts: a plain call where the
`meshcore_request_finished` hook costs a pluggy dispatch (about 2 µs per request), and the
core only fires that hook when some other plugin implements it. Plugin state that is not an
event (retry budget use, certificate expiry) is read from `mesh.state()` when /metrics is
scraped, never on the request path.
"""

from __future__ import annotations

import bisect
import math
import os
import resource
import sys
import time
from collections import defaultdict
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import anyio

from .._errors import IdentityRejected
from .._plugins import hookimpl
from ._answers import CODES
from ._proxy import peer_identity

__all__ = ["NO_PEER", "REJECTED", "UNKNOWN", "Telemetry", "render"]

# Latency buckets in seconds: Linkerd's response_latency_ms buckets (1, 2, 3, 4, 5, 10, 20, 30,
# 40, 50, 100, ... 50000 ms), thinned to the boundaries that separate proxy overhead
# (sub-millisecond on loopback) from application time.
BUCKETS = (
    0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0
)
_CLASSES = {i: f"{i}xx" for i in range(1, 6)}


class Histogram:
    __slots__ = ("counts", "sum", "count")

    def __init__(self) -> None:
        self.counts = [0] * (len(BUCKETS) + 1)
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(BUCKETS, value)] += 1
        self.sum += value
        self.count += 1


# The label value for everything that is not a configured service (an unknown `Host`), so a
# client sending random host names adds no series (Istio writes "unknown" the same way).
UNKNOWN = "unknown"
# Series bounds: distinct peer identities per (direction, service), and endpoints per service
# in `meshcore_response_total`; past them the label reads "overflow".
MAX_PEERS = 100
MAX_ENDPOINTS = 500
OVERFLOW = "overflow"
# An endpoint that left the discovery snapshot keeps its series this long (seconds) so the
# last increase is scraped and rate() windows (5 min is usual) see it end, then they go.
ENDPOINT_TTL = 900.0
# The sidecar's own answers that the engine makes (a request that broke a limit), by status:
# reasons in the same `local_response_total` family as the `x-meshcore-error` codes.
REJECTED = {
    400: "bad_request",
    408: "request_timeout",
    413: "body_too_large",
    414: "uri_too_long",
    431: "headers_too_large",
}
NO_PEER = ("", "false")
# reason -> status of the sidecar's own answers (handshake_failed answers nothing: "")
_STATUS_OF = {**CODES, **{reason: status for status, reason in REJECTED.items()}}


class Telemetry:
    """Everything the sidecar counts. One instance lives as long as the process, across
    reloads, so counters never go backwards.

    Latency is measured with `time.perf_counter` rather than the event loop's clock: it is a
    measurement, not a timing decision (those use anyio's clock, virtual in tests), and uvloop's
    `loop.time()` moves in 1 ms steps, too coarse for sub-millisecond buckets.
    """

    def __init__(self) -> None:
        # (direction, service, status code, peer identity, tls) -> requests answered
        self.requests: dict[tuple[str, str, int, str, str], int] = {}
        self._peers: dict[tuple[str, str], set[str]] = defaultdict(set)
        # to the response head handed to the client (Linkerd's response_latency_ms)
        self.latency: dict[tuple[str, str], Histogram] = {}
        # to the last byte of the response body (Envoy's upstream_rq_time)
        self.duration: dict[tuple[str, str], Histogram] = {}
        # (direction, service) -> (its latency, its duration histogram), for `answered`
        self._answered: dict[tuple[str, str], tuple[Histogram, Histogram]] = {}
        # (service, endpoint id, status class) -> attempts that ended that way
        self.responses: dict[tuple[str, str, str], int] = defaultdict(int)
        self._endpoints: dict[str, set[str]] = defaultdict(set)
        self._endpoint_seen: dict[tuple[str, str], float] = {}
        # attempts of endpoints whose series were dropped: keeps retries_total monotonic
        self._pruned_attempts: dict[str, int] = defaultdict(int)
        self.pipeline_requests: dict[str, int] = defaultdict(int)
        # (direction, service, reason) -> requests the sidecar answered itself
        self.local_errors: dict[tuple[str, str, str], int] = defaultdict(int)
        # (service) -> outbound TLS handshakes whose server identity a plugin refused
        self.identity_rejections: dict[str, int] = defaultdict(int)
        # service -> (server identity, tls) of the last outbound handshake checked
        self.server_peers: dict[str, tuple[str, str]] = {}
        self.state_changes: dict[tuple[str, str, str], int] = defaultdict(int)
        # (service, component, subject) -> current state as the last event told it
        self.states: dict[tuple[str, str, str], str] = {}
        self.discovery_errors: dict[str, int] = defaultdict(int)
        self.denied = 0
        self.connections_total: dict[str, int] = defaultdict(int)
        self.accept_paused: dict[str, int] = defaultdict(int)
        # listener -> pending connections closed over max_pending_connections
        self.pending_closed: dict[str, int] = defaultdict(int)
        self.reloads: dict[str, int] = defaultdict(int)
        self.started = time.time()

    # -- event hooks (registered on each mesh the sidecar runs) --------------------------------

    @hookimpl
    def meshcore_mesh_started(self, mesh: Any) -> None:
        for name, upstream in mesh.upstreams.items():
            upstream.add_observer(self.attempt_finished)
            connector = upstream.connector
            if getattr(connector, "ssl_context", None) is not None:
                self.server_peers.setdefault(name, ("", "true"))
            else:
                self.server_peers.pop(name, None)

    @hookimpl(wrapper=True)
    def meshcore_check_peer(self, service: str, endpoint: Any, peer: Any, mesh: Any) -> Any:
        """Around the security plugins' check of an outbound server: its identity for the
        `peer_identity` label when accepted, a count when refused."""
        try:
            result = yield
        except IdentityRejected:
            self.identity_rejections[service] += 1
            raise
        identity = peer_identity(peer)
        self.server_peers[service] = (identity.decode("ascii", "replace") if identity else "", "true")
        return result

    def attempt_finished(self, outcome: Any) -> None:
        """One attempt to one endpoint ended (an upstream observer: every request, inline)."""
        status = outcome.status_code
        cls = "error" if status is None else _CLASSES.get(status // 100, "other")
        key = (outcome.service, outcome.endpoint.id, cls)
        responses = self.responses
        if key in responses:
            responses[key] += 1
            return
        known = self._endpoints[key[0]]
        if key[1] not in known:
            if len(known) >= MAX_ENDPOINTS:
                key = (key[0], OVERFLOW, cls)
            else:
                known.add(key[1])
        responses[key] += 1

    @hookimpl
    def meshcore_state_changed(
        self, service: str, component: str, subject: str, old: str, new: str
    ) -> None:
        self.state_changes[(service, component, new)] += 1
        self.states[(service, component, subject)] = new

    @hookimpl
    def meshcore_discovery_error(self, service: str, error: BaseException) -> None:
        self.discovery_errors[service] += 1

    # -- the request path ---------------------------------------------------------------------

    def observe(
        self, direction: str, service: str, status: int, peer: tuple[str, str], elapsed: float
    ) -> None:
        """A response head was handed to the client `elapsed` s after its request head came."""
        key = (direction, service, status, *peer)
        requests = self.requests
        n = requests.get(key)
        if n is None:
            seen = self._peers[(direction, service)]
            if peer[0] not in seen:
                if len(seen) >= MAX_PEERS:
                    key = (direction, service, status, OVERFLOW, peer[1])
                else:
                    seen.add(peer[0])
            n = requests.get(key, 0)
        requests[key] = n + 1
        hist = self.latency.get((direction, service))
        if hist is None:
            hist = self.latency[(direction, service)] = Histogram()
        hist.observe(elapsed)

    def answered(
        self, direction: str, service: str, status: int, peer: tuple[str, str], elapsed: float
    ) -> None:
        """`observe` and `finished` at once, for a response whose body went with its head (the
        usual case): one key lookup and one bucket search for both histograms."""
        key = (direction, service, status, *peer)
        requests = self.requests
        n = requests.get(key)
        pair = self._answered.get((direction, service))
        if n is None or pair is None:
            self.observe(direction, service, status, peer, elapsed)
            self.finished(direction, service, elapsed)
            self._answered[(direction, service)] = (
                self.latency[(direction, service)], self.duration[(direction, service)]
            )
            return
        requests[key] = n + 1
        i = bisect.bisect_left(BUCKETS, elapsed)
        latency, duration = pair
        latency.counts[i] += 1
        latency.sum += elapsed
        latency.count += 1
        duration.counts[i] += 1
        duration.sum += elapsed
        duration.count += 1

    def finished(self, direction: str, service: str, elapsed: float) -> None:
        """The last byte of a response went to the client `elapsed` s after its request head."""
        hist = self.duration.get((direction, service))
        if hist is None:
            hist = self.duration[(direction, service)] = Histogram()
        hist.observe(elapsed)

    def local_error(self, direction: str, service: str, reason: str) -> None:
        self.local_errors[(direction, service, reason)] += 1

    def prune(self, services: dict[str, Any], now: float) -> None:
        """Drop the series of endpoints out of the snapshot for longer than ENDPOINT_TTL."""
        current = {(svc, ep["id"]) for svc, s in services.items() for ep in s.get("endpoints", ())}
        seen = self._endpoint_seen
        gone: set[tuple[str, str]] = set()
        for svc, ep, _cls in self.responses:
            if (svc, ep) in current or ep == OVERFLOW:
                seen[(svc, ep)] = now
            elif now - seen.setdefault((svc, ep), now) > ENDPOINT_TTL:
                gone.add((svc, ep))
        # Ejection states are kept per endpoint: those of endpoints long gone go too.
        for svc, component, subject in list(self.states):
            if component == "ejection" and (svc, subject) not in current:
                if now - seen.setdefault((svc, subject), now) > ENDPOINT_TTL:
                    gone.add((svc, subject))
                    del self.states[(svc, component, subject)]
        if not gone:
            return
        for key in [k for k in self.responses if (k[0], k[1]) in gone]:
            self._pruned_attempts[key[0]] += self.responses.pop(key)
        for svc, ep in gone:
            self._endpoints[svc].discard(ep)
            seen.pop((svc, ep), None)

    # -- state --------------------------------------------------------------------------------

    def as_dict(self) -> dict[str, Any]:
        def by(d: Mapping[Any, int]) -> list[dict[str, Any]]:
            return [{"labels": list(k), "value": v} for k, v in sorted(d.items())]

        return {
            "requests": by(self.requests),
            "local_errors": by(self.local_errors),
            "attempts": self.attempts,
            "retries": self.retries(),
            "denied": self.denied,
            "connections_total": dict(self.connections_total),
            "accept_paused": dict(self.accept_paused),
            "pending_closed": dict(self.pending_closed),
            "reloads": dict(self.reloads),
        }

    @property
    def attempts(self) -> dict[str, int]:
        """Attempts per service (every endpoint, every outcome), summed from `responses` when
        read rather than counted a second time per request."""
        out: dict[str, int] = defaultdict(int, self._pruned_attempts)
        for (service, _, _), n in self.responses.items():
            out[service] += n
        return dict(out)

    def retries(self) -> dict[str, int]:
        """Attempts beyond the first, per service: what the retry layer added."""
        return {
            svc: max(0, n - self.pipeline_requests.get(svc, 0)) for svc, n in self.attempts.items()
        }


# --------------------------------------------------------------------------------------------
# Prometheus text exposition format 0.0.4


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
