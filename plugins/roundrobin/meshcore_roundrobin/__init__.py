"""The `round-robin` balancer: strict rotation over the endpoints of the current snapshot.

Why a rotation and not weights: it is the simplest fair policy and the one most people expect;
services that need weights, randomness or load awareness use the `weighted` plugin. Weights
from discovery are therefore ignored here (zero included).

- O(1) per pick: one counter, one modulo, one index into a tuple built when the snapshot
  changes (keyed by snapshot identity, so the per-pick check is an `is`).
- The counter is *not* reset on a snapshot change, so a fleet whose discovery updates often
  does not burst onto the first endpoint after every change, and it starts at a random offset
  per process so many clients started together do not march in step (the reason Envoy
  randomises its round-robin start index).
- Ejected endpoints (`upstream.is_ejected`) are skipped; when every endpoint is ejected it
  picks among all of them (panic mode, counted with `upstream.count_panic()`), like Envoy's
  panic threshold at its limit. Endpoints in `exclude` (a retry's previous attempts) are
  avoided whenever another endpoint is available.
"""

from __future__ import annotations

import os
from collections.abc import Collection
from typing import Any

import meshcore

__all__ = ["RoundRobin"]

# Cheap draws from the rotation before the exact (O(n)) fallback when `exclude` is hit.
_EXCLUDE_TRIES = 3


def _random_start() -> int:
    """A random start offset (30 bits) from the OS: the `random` module is not loaded for it
    (~0.17 MiB of a sidecar's idle memory, docs/data-path.md)."""
    return int.from_bytes(os.urandom(4), "big") >> 2


class _Rotation:
    __slots__ = ("endpoints", "i", "n")

    def __init__(self, endpoints: tuple[meshcore.Endpoint, ...], start: int) -> None:
        self.endpoints = endpoints
        self.n = len(endpoints)
        self.i = start

    def next(self) -> meshcore.Endpoint:
        i = self.i
        self.i = i + 1
        return self.endpoints[i % self.n]


class RoundRobin:
    """One per service. `pick` is called per request; everything else on snapshot change."""

    def __init__(self, upstream: Any) -> None:
        self._upstream = upstream
        self._is_ejected = upstream.is_ejected
        self._snapshot: meshcore.Snapshot | None = None
        self._rotation = _Rotation((), _random_start())
        # Rotation over the endpoints that are not ejected, keyed by the ejected set; rebuilt
        # only when that set changes (ejections are rare events, picks are not).
        self._healthy: tuple[frozenset[meshcore.Endpoint], _Rotation | None] | None = None

    def _install(self, snapshot: meshcore.Snapshot) -> None:
        old = self._snapshot
        self._snapshot = snapshot
        if old is not None and old.endpoints == snapshot.endpoints:
            return
        # Keep the counter: continuing the rotation is what keeps a change fair.
        self._rotation = _Rotation(snapshot.endpoints, self._rotation.i)
        self._healthy = None

    def pick(
        self,
        snapshot: meshcore.Snapshot,
        request: Any,
        exclude: Collection[meshcore.Endpoint],
    ) -> meshcore.Endpoint:
        if snapshot is not self._snapshot:
            self._install(snapshot)
        rotation = self._rotation
        i = rotation.i
        rotation.i = i + 1
        endpoint = rotation.endpoints[i % rotation.n]
        if self._is_ejected(endpoint) or (exclude and endpoint in exclude):
            return self._pick_avoiding(endpoint, exclude)
        return endpoint

    def _pick_avoiding(
        self, drawn: meshcore.Endpoint, exclude: Collection[meshcore.Endpoint]
    ) -> meshcore.Endpoint:
        """The slow path: `drawn` is ejected or excluded. O(#ejected) plus O(1) amortised."""
        upstream = self._upstream
        rotation = self._rotation
        ejected = upstream.ejected
        if ejected:
            key = frozenset(ejected)
            cached = self._healthy
            if cached is None or cached[0] != key:
                healthy = tuple(ep for ep in rotation.endpoints if ep not in key)
                start = _random_start()
                cached = self._healthy = (key, _Rotation(healthy, start) if healthy else None)
            if cached[1] is None:
                upstream.count_panic()  # every endpoint is ejected: use them all
                if not (exclude and drawn in exclude):
                    return drawn  # already the rotation's next: drawing again would skip one
            else:
                rotation = cached[1]
        if exclude:
            for _ in range(min(_EXCLUDE_TRIES, rotation.n)):
                endpoint = rotation.next()
                if endpoint not in exclude:
                    return endpoint
            rest = [ep for ep in rotation.endpoints if ep not in exclude]
            if rest:
                return rest[rotation.i % len(rest)]
        return rotation.next()


@meshcore.hookimpl
def meshcore_kinds() -> list[meshcore.Kind]:
    return [
        meshcore.Kind(
            "round-robin",
            "balancer",
            {},
            help="strict rotation over the endpoints (weights ignored); skips ejected ones",
        )
    ]


@meshcore.hookimpl
def meshcore_balancer(kind: str, settings: Any, upstream: Any) -> RoundRobin | None:
    if kind != "round-robin":
        return None
    return RoundRobin(upstream)
