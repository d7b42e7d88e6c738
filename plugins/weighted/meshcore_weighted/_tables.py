"""Pick tables, built once per endpoint set (snapshot change, ejection change, slow-start step).

Each table has `endpoints` (the ones it can return) and `next()`; `next()` is what a pick costs.

- `Schedule` (kind `weighted`): earliest-deadline-first, as Envoy's weighted round-robin. Each
  entry is due every 1/weight; the earliest due goes next. Entries start half a period in (the
  Sainte-Laguë / stride-scheduling midpoint), which spreads the heaviest endpoint out instead of
  starting with a run of it, like nginx's smooth weighted round-robin but without its O(n)
  pass per pick. Endpoints of equal weight share one heap entry and rotate inside it, so the
  heap holds one entry per *distinct* weight: O(log d) per pick, flat in the endpoint count.
  Over any S = sum(weights) consecutive picks of a fixed integer-weight set each endpoint gets
  exactly its weight.
- `Alias` (kind `random`, and the candidates of `least-request`): Walker/Vose alias method,
  O(1) per draw with one random number, exact weighted probabilities.
"""

from __future__ import annotations

import heapq
import random
from collections.abc import Sequence
from typing import Generic, TypeVar

# What a table holds: endpoints in the balancers, any value in the property tests.
T = TypeVar("T")

_random = random.random


class Schedule(Generic[T]):
    __slots__ = ("_cursor", "_heap", "_inv", "_members", "endpoints")

    def __init__(self, endpoints: Sequence[T], weights: Sequence[float]) -> None:
        self.endpoints = tuple(endpoints)
        groups: dict[float, list[T]] = {}
        for ep, w in zip(endpoints, weights):
            groups.setdefault(w, []).append(ep)
        self._members = [tuple(members) for members in groups.values()]
        # A random start inside each group, so clients started together do not move in step.
        self._cursor = [random.randrange(len(m)) for m in self._members]
        self._inv = [1.0 / (w * len(m)) for w, m in zip(groups, self._members)]
        self._heap = [(0.5 * inv, c) for c, inv in enumerate(self._inv)]
        heapq.heapify(self._heap)

    def next(self) -> T:
        heap = self._heap
        due, c = heap[0]
        heapq.heapreplace(heap, (due + self._inv[c], c))
        members = self._members[c]
        k = self._cursor[c]
        self._cursor[c] = k + 1
        return members[k % len(members)]


class Alias(Generic[T]):
    __slots__ = ("alias", "endpoints", "n", "prob")

    def __init__(self, endpoints: Sequence[T], weights: Sequence[float]) -> None:
        self.endpoints = tuple(endpoints)
        n = self.n = len(endpoints)
        total = float(sum(weights))
        scaled = [w * n / total for w in weights]
        prob = [1.0] * n
        alias = list(range(n))
        small = [i for i, p in enumerate(scaled) if p < 1.0]
        large = [i for i, p in enumerate(scaled) if p >= 1.0]
        while small and large:
            s, g = small.pop(), large.pop()
            prob[s] = scaled[s]
            alias[s] = g
            scaled[g] -= 1.0 - scaled[s]
            (small if scaled[g] < 1.0 else large).append(g)
        # leftovers are 1.0 up to rounding error
        self.prob = prob
        self.alias = alias

    def index(self) -> int:
        u = _random() * self.n
        i = int(u)
        return i if u - i < self.prob[i] else self.alias[i]

    def next(self) -> T:
        u = _random() * self.n
        i = int(u)
        return self.endpoints[i if u - i < self.prob[i] else self.alias[i]]
