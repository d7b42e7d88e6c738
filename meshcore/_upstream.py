"""One Upstream per service: its endpoint snapshot, live stats, balancer and pipeline.

The discovery watcher is the only writer of the snapshot; requests only read it, so a request
never awaits discovery once the first snapshot is in. Errors from discovery keep the last good
snapshot (stale beats empty, as Envoy and gRPC do: shared/reference/data-plane-anchors.md) and
back off exponentially with jitter before the watcher is restarted.
"""

from __future__ import annotations

import asyncio
import math
import sys
from collections.abc import Awaitable, Callable, Iterable
from typing import TYPE_CHECKING, Any, cast

import anyio

from ._endpoints import Endpoint, EndpointStats, Outcome, Snapshot
from ._errors import EndpointError, EndpointTimeout, MeshError, NoEndpoints
from ._extensions import DEADLINE, ENDPOINT, EXCLUDE
from ._service import compose, observer

if TYPE_CHECKING:
    from ._config import ServiceConfig
    from ._mesh import Mesh
    from ._models import Request, Response
    from ._service import Balancer, Discovery, Service

__all__ = ["DiscoveryStatus", "Upstream"]

# Latency EWMA weight of the newest sample for `EndpointStats.ewma`, a plain (non-peak) moving
# average the state page shows; balancers that need peak-EWMA keep their own.
_EWMA_ALPHA = 0.2
# `Outcome(...)` without its generated __new__ (a Python-level lambda): the same tuple, made
# in C, once per request.
_new_tuple = tuple.__new__
_MAX_BACKOFF = 30.0


def loop_clock() -> Callable[[], float]:
    """The clock `anyio.current_time()` reads, bound for the running event loop.

    anyio's asyncio backend returns `loop.time()` and its trio backend `trio.current_time()`,
    which is the run's clock (`MockClock` in virtual-time tests). Bound once, a read costs one
    call instead of four or five (0.07 against 0.4 µs). Outside an event loop (or on a loop
    anyio does not know): `anyio.current_time` itself.
    """
    try:
        return asyncio.get_running_loop().time
    except RuntimeError:
        pass
    trio = sys.modules.get("trio")
    if trio is not None:
        try:
            return cast("Callable[[], float]", trio.lowlevel.current_clock().current_time)
        except RuntimeError:
            pass
    return anyio.current_time


class DiscoveryStatus:
    """What the watcher of one service has seen: for `mesh.state()` and the admin API."""

    __slots__ = ("errors", "last_error", "last_update", "updates", "state")

    def __init__(self) -> None:
        self.errors = 0
        self.last_error: str | None = None
        self.last_update: float | None = None
        self.updates = 0
        self.state = "waiting"  # waiting -> ok <-> stale

    def as_dict(self, now: float) -> dict[str, Any]:
        return {
            "state": self.state,
            "updates": self.updates,
            "errors": self.errors,
            "last_error": self.last_error,
            "snapshot_age": None if self.last_update is None else now - self.last_update,
        }


class Upstream:
    """A service as the mesh runs it. Balancers, layers and discovery sinks talk to this.

    `clock()` is anyio's clock (what `anyio.current_time()` reads, so trio's `MockClock` drives
    it), bound to the event loop when the mesh starts (`loop_clock`): a read costs a sixth of
    `anyio.current_time()`. Layers on the request path may use it instead.
    """

    def __init__(self, mesh: Mesh, config: ServiceConfig) -> None:
        self.mesh = mesh
        self.name = config.name
        self.config = config
        self.snapshot = Snapshot((), 0)
        self.stats: dict[Endpoint, EndpointStats] = {}
        self.discovery_status = DiscoveryStatus()
        self.panics = 0
        self.balancer: Balancer | None = None
        self.service: Service = self._terminal
        self.connector: Any = None
        self._ejected: dict[Endpoint, float] = {}
        self._observers: list[Callable[[Outcome], None]] = []
        self._state_providers: dict[str, Callable[[], Any]] = {}
        self._ready = anyio.Event()
        self._is_ready = False  # `_ready.is_set()` without two calls per request
        self.clock: Callable[[], float] = loop_clock()
        self._events = mesh.plugins.events
        self._fire_finished = mesh.plugins.implements("meshcore_request_finished")
        # Subsets of this service (meshcore._routing): each gets the part of every snapshot
        # its selector keeps.
        self.subsets: list[tuple[Upstream, Callable[[Endpoint], bool]]] = []
        from ._http._bodies import ResponseBody  # imported when a mesh is built, not before

        # The engine's body still streaming after the head, the one an endpoint can cut short;
        # other bodies (whole with the head, a test connector's) are judged at the head.
        self._streamed_body: type = ResponseBody

    # -- building -----------------------------------------------------------------------------

    def build(self) -> None:
        """Make balancer and layers through the plugins and compose the pipeline, once."""
        plugins, cfg = self.mesh.plugins, self.config
        if cfg.balancer is not None:
            self.balancer = plugins.balancer(cfg.balancer, cfg.settings_for(cfg.balancer), self)
            observe = observer(self.balancer)
            if observe is not None:
                self._observers.append(observe)
        layers = [plugins.layer(kind, cfg.settings_for(kind), self) for kind in cfg.resilience]
        self.service = compose(layers, self._terminal)

    # -- discovery ----------------------------------------------------------------------------

    def publish(self, endpoints: Iterable[Endpoint]) -> None:
        """Install a new endpoint set (the DiscoverySink side). Unchanged sets are ignored."""
        new = tuple(dict.fromkeys(endpoints))
        status = self.discovery_status
        status.last_update = anyio.current_time()
        status.state = "ok"
        self._ready.set()
        self._is_ready = True
        if new == self.snapshot.endpoints and status.updates:
            return
        status.updates += 1
        if self.balancer is None and len(new) > 1:
            self.error(
                ValueError(
                    f"{len(new)} endpoints and no balancer: only {new[0].id} is used "
                    "(set `balancer` for this service)"
                )
            )
        self.snapshot = Snapshot(new, self.snapshot.version + 1)
        self.stats = {ep: self.stats.get(ep) or EndpointStats() for ep in new}
        for ep in [ep for ep in self._ejected if ep not in self.stats]:
            del self._ejected[ep]
        self._events.meshcore_endpoints_changed(service=self.name, snapshot=self.snapshot)
        for subset, selects in self.subsets:
            subset.publish([ep for ep in new if selects(ep)])

    def error(self, exc: BaseException) -> None:
        """Count a discovery failure; the last good snapshot stays in use."""
        status = self.discovery_status
        status.errors += 1
        status.last_error = f"{type(exc).__name__}: {exc}"
        if status.state == "ok":
            status.state = "stale"
        self._events.meshcore_discovery_error(service=self.name, error=exc)

    async def watch(self, discovery: Discovery) -> None:
        """Run `discovery.watch` until cancelled, restarting it with backoff when it fails."""
        initial = self.mesh.config.mesh.discovery_backoff
        backoff = initial
        while True:
            updates = self.discovery_status.updates
            try:
                await discovery.watch(self)
                return  # a static source publishes once and returns
            except Exception as exc:  # noqa: BLE001 - any discovery failure is survived
                self.error(exc)
            if self.discovery_status.updates != updates:
                backoff = initial
            # Full jitter (as Envoy's backoff does) so a fleet does not retry in step.
            import random  # with the first failure: not loaded at start

            await anyio.sleep(backoff * (0.5 + random.random() / 2))
            backoff = min(max(backoff, 0.01) * 2, _MAX_BACKOFF)

    async def wait_ready(self, timeout: float) -> None:
        if not self._ready.is_set():
            with anyio.move_on_after(timeout):
                await self._ready.wait()

    # -- ejection (written by breakers, read by balancers) ---------------------------------------

    def is_ejected(self, endpoint: Endpoint) -> bool:
        if not self._ejected:
            return False
        until = self._ejected.get(endpoint)
        if until is None:
            return False
        if until > anyio.current_time():
            return True
        self.restore(endpoint)
        return False

    def eject(self, endpoint: Endpoint, duration: float) -> None:
        """Take `endpoint` out of balancing for `duration` seconds (anyio clock)."""
        stats = self.stats.get(endpoint)
        if stats is None:
            return
        until = anyio.current_time() + duration
        stats.ejected_until = until
        stats.times_ejected += 1
        self._ejected[endpoint] = until
        self.emit_state("ejection", endpoint.id, "active", "ejected")

    def restore(self, endpoint: Endpoint) -> None:
        if self._ejected.pop(endpoint, None) is None:
            return
        stats = self.stats.get(endpoint)
        if stats is not None:
            stats.ejected_until = -math.inf
        self.emit_state("ejection", endpoint.id, "ejected", "active")

    @property
    def ejected(self) -> list[Endpoint]:
        return [ep for ep in list(self._ejected) if self.is_ejected(ep)]

    def count_panic(self) -> None:
        """Balancers call this when every endpoint is ejected and they pick among all."""
        self.panics += 1

    # -- outcomes -----------------------------------------------------------------------------

    def add_observer(self, callback: Callable[[Outcome], None]) -> None:
        """Call `callback(outcome)` after every request to an endpoint of this service."""
        self._observers.append(callback)

    def emit_state(self, component: str, subject: str, old: str, new: str) -> None:
        """Fire the `meshcore_state_changed` event (a breaker opening, an ejection, ...)."""
        self._events.meshcore_state_changed(
            service=self.name, component=component, subject=subject, old=old, new=new
        )

    def add_state(self, name: str, provider: Callable[[], Any]) -> None:
        """Expose a plugin's state (breaker states, budget use) in `mesh.state()`."""
        self._state_providers[name] = provider

    def record(self, outcome: Outcome) -> None:
        """Count `outcome` in its endpoint's stats, then tell the observers and event hooks."""
        self._record(self.stats.get(outcome.endpoint), outcome, self.clock())

    def _record(self, stats: EndpointStats | None, outcome: Outcome, now: float) -> None:
        if stats is not None:
            stats.requests += 1
            if outcome.error is not None or (outcome.status_code or 0) >= 500:
                stats.failures += 1
                stats.consecutive_failures += 1
            else:
                stats.consecutive_failures = 0
            stats.ewma += _EWMA_ALPHA * (outcome.elapsed - stats.ewma)
            stats.last_update = now
        for callback in self._observers:
            callback(outcome)
        if self._fire_finished:
            self._events.meshcore_request_finished(outcome=outcome)

    # -- the request path ---------------------------------------------------------------------
    #
    # Per request: two clock reads (send and answer; the answer's also stamps the stats), one
    # stats lookup, one Outcome. `send` is a plain function returning the pipeline's coroutine,
    # so a request (and every wake-up of a suspended one) passes through one frame less.

    def send(self, request: Request) -> Awaitable[Response]:
        """Send `request` through this service's pipeline: `await upstream.send(request)`."""
        if self._is_ready:
            return self.service(request)
        return self._send_when_ready(request)

    async def _send_when_ready(self, request: Request) -> Response:
        await self.wait_ready(self.mesh.config.mesh.discovery_timeout)
        return await self.service(request)

    async def _terminal(self, request: Request) -> Response:
        snapshot = self.snapshot
        if not snapshot.endpoints:
            status = self.discovery_status
            why = (
                f"discovery has not answered yet (last error: {status.last_error})"
                if status.state == "waiting"
                else "discovery reports no endpoints"
            )
            raise NoEndpoints(f"service {self.name!r} has no endpoints: {why}", service=self.name)
        if self.balancer is not None:
            endpoint = self.balancer.pick(
                snapshot, request, request.extensions.get(EXCLUDE, ())
            )
        else:
            endpoint = snapshot.endpoints[0]
        stats_map = self.stats
        stats = stats_map.get(endpoint)
        if stats is not None:
            stats.in_flight += 1
        clock = self.clock
        start = clock()
        try:
            response: Response = await self.connector.send(endpoint, request)
        except Exception as exc:
            if isinstance(exc, MeshError):
                exc.service = self.name
            if isinstance(exc, EndpointError):
                exc.endpoint = exc.endpoint or endpoint
            self._record_failure(stats, stats_map, endpoint, request, exc, start)
            raise
        except BaseException:
            # Cancelled. Past the request's own deadline (the timeout layer's), the endpoint
            # did not answer in time: a timeout against it, as Envoy's outlier detection counts
            # a route timeout against the host; else an endpoint that always outlasts the
            # deadline would never be seen failing. Any other cancellation (the caller's own,
            # shutdown) is not the endpoint's doing and records nothing.
            deadline = request.extensions.get(DEADLINE)
            if deadline is not None and clock() >= deadline:
                error = EndpointTimeout(
                    f"{endpoint.id} had not answered when the request's deadline passed",
                    endpoint=endpoint,
                )
                error.service = self.name
                self._record_failure(stats, stats_map, endpoint, request, error, start)
            raise
        finally:
            if stats is not None:
                stats.in_flight -= 1
        now = clock()
        response.extensions[ENDPOINT] = endpoint
        stream = response.stream
        if type(stream) is self._streamed_body:
            # The exchange is over when its body is: one cut short is the endpoint's failure.
            response.stream = _AccountedBody(
                stream, self, endpoint, request.method, response.status_code, start, now - start
            )
            return response
        status = response.status_code
        elapsed = now - start
        outcome = _new_tuple(Outcome, (self.name, endpoint, request.method, status, None, elapsed))
        if self.stats is not stats_map:  # discovery replaced the endpoint set meanwhile
            stats = self.stats.get(endpoint)
        if stats is not None:  # `_record`, inline for the usual case
            stats.requests += 1
            if status >= 500:
                stats.failures += 1
                stats.consecutive_failures += 1
            else:
                stats.consecutive_failures = 0
            stats.ewma += _EWMA_ALPHA * (elapsed - stats.ewma)
            stats.last_update = now
        for callback in self._observers:
            callback(outcome)
        if self._fire_finished:
            self._events.meshcore_request_finished(outcome=outcome)
        return response

    def _record_failure(
        self,
        stats: EndpointStats | None,
        stats_map: dict[Endpoint, EndpointStats],
        endpoint: Endpoint,
        request: Request,
        error: BaseException,
        start: float,
    ) -> None:
        now = self.clock()
        # Discovery may have replaced the endpoint set meanwhile: count where it is now.
        counted = stats if self.stats is stats_map else self.stats.get(endpoint)
        outcome = Outcome(self.name, endpoint, request.method, None, error, now - start)
        self._record(counted, outcome, now)

    def _body_ended(self, body: _AccountedBody, error: BaseException | None) -> None:
        endpoint = body.endpoint
        if error is None:
            outcome = Outcome(
                self.name, endpoint, body.method, body.status_code, None, body.elapsed
            )
        else:
            if isinstance(error, MeshError):
                error.service = self.name
            if isinstance(error, EndpointError):
                error.endpoint = error.endpoint or endpoint
            # No whole response came back: an error outcome, whatever the head said.
            outcome = Outcome(
                self.name, endpoint, body.method, None, error, self.clock() - body.start
            )
        self.record(outcome)

    # -- state --------------------------------------------------------------------------------

    def state(self) -> dict[str, Any]:
        now = anyio.current_time()
        pool_stats = getattr(self.connector, "stats", None)  # a test's connector may keep none
        pools: dict[str, dict[str, int]] = pool_stats() if pool_stats is not None else {}
        return {
            "discovery": {"kind": self.config.discovery, **self.discovery_status.as_dict(now)},
            "balancer": self.config.balancer,
            "resilience": list(self.config.resilience),
            "panics": self.panics,
            "snapshot_version": self.snapshot.version,
            "endpoints": [
                {
                    "id": ep.id,
                    "address": ep.address,
                    "port": ep.port,
                    "weight": ep.weight,
                    "zone": ep.zone,
                    "tags": list(ep.tags),
                    "metadata": ep.meta,
                    "in_flight": st.in_flight,
                    "requests": st.requests,
                    "failures": st.failures,
                    "consecutive_failures": st.consecutive_failures,
                    "latency_ewma_ms": round(st.ewma * 1000, 3),
                    "ejected": st.ejected(now),
                    "times_ejected": st.times_ejected,
                    "stale_resends": pools.get(ep.id, {}).get("stale_resends", 0),
                }
                for ep, st in self.stats.items()
            ],
            **{name: provider() for name, provider in self._state_providers.items()},
        }


class _AccountedBody:
    """A streamed response body that records its exchange's outcome when it ends.

    The head alone is not a success: a body cut short (a reset, fewer bytes than the
    Content-Length) is a failure of the endpoint in its stats, for the breaker's ejection and in
    metrics, as a failed connect is. Reading to the end records the head's status (and the
    time to the head, as for a whole body); an error while reading records that error; closing
    early records the status, since the caller, not the endpoint, ended the exchange.
    """

    __slots__ = ("_body", "_iterator", "_upstream", "elapsed", "endpoint", "method", "start",
                 "status_code")

    def __init__(
        self,
        body: Any,
        upstream: Upstream,
        endpoint: Endpoint,
        method: str,
        status_code: int,
        start: float,
        elapsed: float,
    ) -> None:
        self._body = body
        self._iterator = body.__aiter__()
        self._upstream: Upstream | None = upstream
        self.endpoint = endpoint
        self.method = method
        self.status_code = status_code
        self.start = start
        self.elapsed = elapsed

    def __aiter__(self) -> _AccountedBody:
        return self

    async def __anext__(self) -> bytes:
        try:
            chunk: bytes = await self._iterator.__anext__()
        except StopAsyncIteration:
            self._end(None)
            raise
        except Exception as exc:
            self._end(exc)
            raise
        return chunk

    async def aclose(self) -> None:
        self._end(None)
        aclose = getattr(self._body, "aclose", None)
        if aclose is not None:
            await aclose()

    def _end(self, error: BaseException | None) -> None:
        upstream, self._upstream = self._upstream, None
        if upstream is not None:
            upstream._body_ended(self, error)
