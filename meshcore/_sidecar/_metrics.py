"""Counters the sidecar keeps (their Prometheus text rendering is `_exposition`).

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
import time
from collections import defaultdict
from collections.abc import Mapping
from typing import Any

from .._errors import IdentityRejected
from .._plugins import hookimpl
from ._answers import CODES
from ._proxy import peer_identity

__all__ = ["NO_PEER", "REJECTED", "UNKNOWN", "Telemetry"]

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
