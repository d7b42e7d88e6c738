"""The three balancers of this plugin and what they share.

Shared rules (hookspecs.py, `meshcore_balancer`):

- Per pick: one identity check of the snapshot, one draw from a precomputed table, one O(1)
  `upstream.is_ejected` check. Tables are rebuilt only when the endpoint set changes (keyed by
  snapshot identity), when the set of ejected endpoints changes, or on a slow-start step.
- Weights come from discovery (`Endpoint.weight`). Zero means "never", unless every candidate
  is zero, then they count as equal (so draining every endpoint at once does not leave none).
- Ejected endpoints are skipped; when all are ejected every endpoint is used (panic mode,
  counted with `upstream.count_panic()`), Envoy's panic threshold at its limit.
- `exclude` (a retry's earlier endpoints) is avoided whenever another non-ejected endpoint
  exists: a few cheap draws first, then an exact O(n) fallback that only a retry can reach.
- Slow start (Envoy's `slow_start_window`, off by default): an endpoint that appears after the
  first snapshot starts at `slow-start-min-weight` of its weight (Envoy: min_weight_percent
  10 %) and ramps as (age / window) ** (1 / aggression) (Envoy: aggression 1.0, linear). The
  table is rebuilt in tenths of the window while something ramps; the clock is read per pick
  only then.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Collection, Sequence
from typing import Protocol

import anyio

import meshcore

from ._tables import Alias, Schedule

__all__ = ["LeastRequest", "PeakEwma", "RandomBalancer", "WeightedBalancer"]

_INF = math.inf
# Cheap draws before the exact fallback when a draw hits `exclude`.
_EXCLUDE_TRIES = 3
# Slow start steps: the ramp is rebuilt ten times per window.
_RAMP_STEPS = 10
# Finagle's peak-EWMA penalty for an endpoint with requests in flight but no latency sample
# yet (Long.MaxValue >> 16 there): large, so unknown busy endpoints lose every comparison.
_PENALTY = 1e9


def choose_weighted(endpoints: Sequence[meshcore.Endpoint]) -> meshcore.Endpoint:
    """A weighted random choice by `Endpoint.weight`, uniform when all are zero. O(n)."""
    weights = [ep.weight for ep in endpoints]
    if not any(weights):
        return random.choice(endpoints)
    return random.choices(endpoints, weights)[0]


class _Table(Protocol):
    """What a balancer draws from: `next()` is one weighted pick, O(1)."""

    def next(self) -> meshcore.Endpoint: ...


class _Balancer:
    """Snapshot cache, ejection, panic, exclude and slow start; subclasses make the table."""

    def __init__(self, upstream: meshcore.Upstream, settings: meshcore.Settings) -> None:
        self._upstream = upstream
        self._is_ejected = upstream.is_ejected
        self._snapshot: meshcore.Snapshot | None = None
        self._table: _Table  # both made by the first pick's _rebuild
        self._next: Callable[[], meshcore.Endpoint]
        # (ejected set, table over the rest or None in panic, the rest)
        self._healthy: (
            tuple[frozenset[meshcore.Endpoint], _Table | None, tuple[meshcore.Endpoint, ...]] | None
        ) = None
        self._window = float(settings.get("slow-start-window", 0.0))
        self._aggression = float(settings.get("slow-start-aggression", 1.0))
        self._min_weight = float(settings.get("slow-start-min-weight", 0.1))
        self._born: dict[meshcore.Endpoint, float] = {}
        self._ramping = False
        self._refresh_at = _INF

    # -- subclass hooks -------------------------------------------------------------------------

    def _make_table(self, endpoints: Sequence[meshcore.Endpoint], weights: Sequence[float]) -> _Table:
        raise NotImplementedError

    def _endpoints_changed(self, endpoints: tuple[meshcore.Endpoint, ...]) -> None:
        """Called once per new endpoint set, before the table is built."""

    # -- tables -------------------------------------------------------------------------------

    def _install(self, snapshot: meshcore.Snapshot) -> None:
        old = self._snapshot
        self._snapshot = snapshot
        if old is not None and old.endpoints == snapshot.endpoints:
            return
        if self._window > 0:
            # The first snapshot does not ramp: if everything is new, nothing is slower.
            born = -_INF if old is None else anyio.current_time()
            self._born = {ep: self._born.get(ep, born) for ep in snapshot.endpoints}
        self._endpoints_changed(snapshot.endpoints)
        self._rebuild(snapshot)

    def _rebuild(self, snapshot: meshcore.Snapshot) -> None:
        self._ramping = False
        self._refresh_at = _INF
        self._table = self._build(snapshot.endpoints)
        self._next = self._table.next
        self._healthy = None

    def _build(self, endpoints: Sequence[meshcore.Endpoint]) -> _Table:
        weights: list[float] = [ep.weight for ep in endpoints]
        if not any(weights):
            weights = [1] * len(weights)
        if self._window > 0:
            weights = self._ramp(endpoints, weights)
        chosen = [(ep, w) for ep, w in zip(endpoints, weights) if w > 0]
        return self._make_table([ep for ep, _ in chosen], [w for _, w in chosen])

    def _ramp(self, endpoints: Sequence[meshcore.Endpoint], weights: list[float]) -> list[float]:
        now = anyio.current_time()
        window, born = self._window, self._born
        ramped = list(weights)
        for i, ep in enumerate(endpoints):
            age = now - born.get(ep, -_INF)
            if age < window:
                factor = max(self._min_weight, (max(age, 0.0) / window) ** (1.0 / self._aggression))
                ramped[i] = weights[i] * min(factor, 1.0)
                self._ramping = True
        if self._ramping:
            self._refresh_at = min(self._refresh_at, now + window / _RAMP_STEPS)
        return ramped

    # -- picking ------------------------------------------------------------------------------

    def pick(
        self,
        snapshot: meshcore.Snapshot,
        request: meshcore.Request,
        exclude: Collection[meshcore.Endpoint],
    ) -> meshcore.Endpoint:
        if snapshot is not self._snapshot:
            self._install(snapshot)
        elif self._ramping and anyio.current_time() >= self._refresh_at:
            self._rebuild(snapshot)
        endpoint = self._next()
        if self._is_ejected(endpoint) or (exclude and endpoint in exclude):
            return self._pick_avoiding(snapshot, endpoint, exclude)
        return endpoint

    def _pick_avoiding(
        self,
        snapshot: meshcore.Snapshot,
        drawn: meshcore.Endpoint,
        exclude: Collection[meshcore.Endpoint],
    ) -> meshcore.Endpoint:
        """The slow path: `drawn` is ejected or excluded. O(#ejected) plus O(1) amortised."""
        upstream = self._upstream
        table = self._table
        pool = snapshot.endpoints
        ejected = upstream.ejected
        if ejected:
            key = frozenset(ejected)
            cached = self._healthy
            if cached is None or cached[0] != key:
                healthy = tuple(ep for ep in pool if ep not in key)
                cached = (key, self._build(healthy) if healthy else None, healthy)
                self._healthy = cached
            if cached[1] is None:
                upstream.count_panic()  # every endpoint is ejected: use them all
                if not (exclude and drawn in exclude):
                    return drawn
            else:
                table, pool = cached[1], cached[2]
        if exclude:
            for _ in range(_EXCLUDE_TRIES):
                endpoint = table.next()
                if endpoint not in exclude:
                    return endpoint
            rest = [ep for ep in pool if ep not in exclude]
            if rest:
                return choose_weighted(rest)
        return table.next()


class WeightedBalancer(_Balancer):
    """Kind `weighted`: smooth, deterministic weighted round-robin (EDF)."""

    def _make_table(self, endpoints: Sequence[meshcore.Endpoint], weights: Sequence[float]) -> _Table:
        return Schedule(endpoints, weights)


class RandomBalancer(_Balancer):
    """Kind `random`: a weighted random draw (uniform when weights are equal)."""

    def _make_table(self, endpoints: Sequence[meshcore.Endpoint], weights: Sequence[float]) -> _Table:
        return Alias(endpoints, weights)


class _TwoChoices:
    """Power of two choices (Mitzenmacher; Envoy's least-request, choice_count 2): two random
    candidates, the one with fewer requests in flight wins, the first on a tie.

    Weights decide how often an endpoint is a *candidate* (a weighted draw); load decides
    between the two. Dividing load by weight as well would count the weight twice: with
    nothing in flight a 1:2 pair would then split about 1:26 instead of 1:2.
    """

    __slots__ = ("_alias", "_n", "_prob", "_stats", "endpoints")

    def __init__(
        self,
        endpoints: Sequence[meshcore.Endpoint],
        weights: Sequence[float],
        stats: list[meshcore.EndpointStats],
    ) -> None:
        table = Alias(endpoints, weights)
        self.endpoints = table.endpoints
        self._n, self._prob, self._alias = table.n, table.prob, table.alias
        self._stats = stats

    def _draw(self) -> tuple[int, int]:
        n, prob, alias, rnd = self._n, self._prob, self._alias, random.random
        u = rnd() * n
        a = int(u)
        if u - a >= prob[a]:
            a = alias[a]
        u = rnd() * n
        b = int(u)
        if u - b >= prob[b]:
            b = alias[b]
        if a == b and n > 1:
            # Two *distinct* candidates (as Finagle's P2C): otherwise the worst endpoint still
            # wins whenever it is drawn twice. A few redraws, then its neighbour.
            for _ in range(4):
                u = rnd() * n
                b = int(u)
                if u - b >= prob[b]:
                    b = alias[b]
                if b != a:
                    break
            else:
                b = (a + 1) % n
        return a, b

    def next(self) -> meshcore.Endpoint:
        a, b = self._draw()
        stats = self._stats
        if stats[b].in_flight < stats[a].in_flight:
            a = b
        return self.endpoints[a]


class _PeakEwmaChoices(_TwoChoices):
    """Two choices on peak-EWMA cost x (in-flight + 1) (Finagle, Linkerd)."""

    __slots__ = ("_costs", "_tau")

    def __init__(
        self,
        endpoints: Sequence[meshcore.Endpoint],
        weights: Sequence[float],
        stats: list[meshcore.EndpointStats],
        costs: list[list[float]],
        tau: float,
    ) -> None:
        super().__init__(endpoints, weights, stats)
        self._costs = costs
        self._tau = tau

    def _load(self, i: int, now: float) -> float:
        state = self._costs[i]
        cost = state[0]
        in_flight = self._stats[i].in_flight
        if not cost:
            return _PENALTY + in_flight if in_flight else 0.0
        elapsed = now - state[1]
        if elapsed > 0:
            # Finagle's Metric.get(): reading decays the cost towards zero, so an endpoint that
            # was slow once is tried again after a while instead of being starved forever.
            cost *= math.exp(-elapsed / self._tau)
            state[0], state[1] = cost, now
        return cost * (in_flight + 1)

    def next(self) -> meshcore.Endpoint:
        a, b = self._draw()
        now = anyio.current_time()
        if self._load(b, now) < self._load(a, now):
            a = b
        return self.endpoints[a]


class LeastRequest(_Balancer):
    """Kind `least-request`, mode `in-flight`: fewest requests in flight, of two."""

    def __init__(self, upstream: meshcore.Upstream, settings: meshcore.Settings) -> None:
        super().__init__(upstream, settings)
        self._orphan_stats: dict[meshcore.Endpoint, meshcore.EndpointStats] = {}

    def _stats_for(self, endpoints: Sequence[meshcore.Endpoint]) -> list[meshcore.EndpointStats]:
        # The core keeps one EndpointStats per endpoint for as long as the endpoint stays in
        # the snapshot, so holding the objects is safe until the next endpoint change.
        live = self._upstream.stats
        orphans = self._orphan_stats
        return [
            live.get(ep) or orphans.setdefault(ep, meshcore.EndpointStats()) for ep in endpoints
        ]

    def _endpoints_changed(self, endpoints: tuple[meshcore.Endpoint, ...]) -> None:
        self._orphan_stats = {}

    def _make_table(self, endpoints: Sequence[meshcore.Endpoint], weights: Sequence[float]) -> _Table:
        return _TwoChoices(endpoints, weights, self._stats_for(endpoints))


class PeakEwma(LeastRequest):
    """Kind `least-request`, mode `peak-ewma`: latency EWMA x (in-flight + 1), of two.

    After Finagle's PeakEwma and Linkerd's balancer: a sample above the estimate replaces it at
    once (peak), one below pulls it down with weight 1 - exp(-dt / decay), and reading decays
    it towards zero. Default decay window 10 s, as both use. Failed requests (errors, 5xx)
    never lower the estimate: a fast failure must not make a broken endpoint look fast.
    """

    def __init__(self, upstream: meshcore.Upstream, settings: meshcore.Settings) -> None:
        super().__init__(upstream, settings)
        self._tau = float(settings.get("decay", 10.0))
        self._costs: dict[meshcore.Endpoint, list[float]] = {}

    def _endpoints_changed(self, endpoints: tuple[meshcore.Endpoint, ...]) -> None:
        old = self._costs
        now = anyio.current_time()
        self._costs = {ep: old.get(ep) or [0.0, now] for ep in endpoints}
        super()._endpoints_changed(endpoints)

    def _make_table(self, endpoints: Sequence[meshcore.Endpoint], weights: Sequence[float]) -> _Table:
        costs = self._costs
        state = [costs.setdefault(ep, [0.0, 0.0]) for ep in endpoints]
        return _PeakEwmaChoices(endpoints, weights, self._stats_for(endpoints), state, self._tau)

    def observe(self, outcome: meshcore.Outcome) -> None:
        state = self._costs.get(outcome.endpoint)
        if state is None:
            snapshot = self._upstream.snapshot
            if snapshot is self._snapshot:
                return  # not (or no longer) one of ours
            self._install(snapshot)  # an outcome before the first pick of a new snapshot
            state = self._costs.get(outcome.endpoint)
            if state is None:
                return
        now = anyio.current_time()
        cost, stamp = state
        rtt = max(outcome.elapsed, 0.0)
        if outcome.error is not None or (outcome.status_code or 0) >= 500:
            rtt = max(rtt, cost)
        if rtt > cost:
            cost = rtt
        else:
            w = math.exp(-max(now - stamp, 0.0) / self._tau)
            cost = cost * w + rtt * (1.0 - w)
        state[0], state[1] = cost, now

    def costs(self) -> dict[str, float]:
        """Current latency estimates in seconds by endpoint id (for state pages and tests)."""
        return {ep.id: state[0] for ep, state in self._costs.items()}
