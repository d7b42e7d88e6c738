"""Balancer kinds `weighted`, `random` and `least-request` (with a `peak-ewma` mode).

    [defaults]
    balancer = "least-request"
    [defaults.least-request]
    mode = "peak-ewma"        # or "in-flight" (the default)
    decay = "10s"             # peak-EWMA decay window (Linkerd, Finagle: 10 s)

Which to choose, and how weights reach `Endpoint.weight` from each discovery source, is in
docs/balancing.md. The algorithms and the sources of their numbers are at the top of
`_balancers.py` and `_tables.py`.
"""

from __future__ import annotations

from typing import Any

import meshcore

from ._balancers import LeastRequest, PeakEwma, RandomBalancer, WeightedBalancer

__all__ = ["LeastRequest", "PeakEwma", "RandomBalancer", "WeightedBalancer"]


def _slow_start() -> dict[str, meshcore.Setting]:
    # Envoy's slow_start_config: slow_start_window (no default: off), aggression 1.0,
    # min_weight_percent 10 %.
    return {
        "slow-start-window": meshcore.Setting(
            "duration",
            0.0,
            "ramp a newly appeared endpoint up over this long (0 = off; Envoy slow_start_window)",
            min=0,
        ),
        "slow-start-aggression": meshcore.Setting(
            "float",
            1.0,
            "ramp curve: share = (age / window) ** (1 / aggression); 1.0 is linear (Envoy)",
            min=0.1,
            max=10,
        ),
        "slow-start-min-weight": meshcore.Setting(
            "float",
            0.1,
            "fraction of its weight a new endpoint starts at (Envoy min_weight_percent 10 %)",
            min=0.01,
            max=1,
        ),
    }


@meshcore.hookimpl
def meshcore_kinds() -> list[meshcore.Kind]:
    return [
        meshcore.Kind(
            "weighted",
            "balancer",
            _slow_start(),
            help="smooth weighted round-robin (earliest deadline first, as Envoy)",
        ),
        meshcore.Kind(
            "random",
            "balancer",
            _slow_start(),
            help="weighted random (alias table, O(1)); uniform when weights are equal",
        ),
        meshcore.Kind(
            "least-request",
            "balancer",
            {
                "mode": meshcore.Setting(
                    "str",
                    "in-flight",
                    "what two random candidates are compared on: requests in flight, or "
                    "peak-EWMA latency x (in flight + 1) (Finagle, Linkerd)",
                    choices=("in-flight", "peak-ewma"),
                ),
                "decay": meshcore.Setting(
                    "duration",
                    10.0,
                    "peak-EWMA decay window (Linkerd and Finagle use 10 s)",
                    min=0.001,
                ),
                **_slow_start(),
            },
            help="power of two choices on requests in flight, or on peak-EWMA latency",
        ),
    ]


@meshcore.hookimpl
def meshcore_balancer(kind: str, settings: Any, upstream: Any) -> Any:
    if kind == "weighted":
        return WeightedBalancer(upstream, settings)
    if kind == "random":
        return RandomBalancer(upstream, settings)
    if kind == "least-request":
        if settings.get("mode", "in-flight") == "peak-ewma":
            balancer = PeakEwma(upstream, settings)
            upstream.add_state("peak_ewma_seconds", balancer.costs)
            return balancer
        return LeastRequest(upstream, settings)
    return None
