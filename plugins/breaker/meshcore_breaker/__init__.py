"""meshcore-servicemesh-breaker: per-endpoint outlier ejection and a per-service circuit breaker.

    [mesh]
    plugins = ["retry", "breaker"]

    [defaults]
    resilience = ["timeout", "retry", "breaker"]    # outermost first

    [defaults.breaker]
    consecutive_failures = 5

Every default and its source is in docs/resilience.md and this package's README. Only the
public `meshcore` API is used, so this is also an example of a third-party layer plugin.
"""

from __future__ import annotations

from typing import Any

import meshcore

from ._circuit import CLOSED, HALF_OPEN, OPEN, Circuit, CountWindow, TimeWindow
from ._ejection import Ejector
from ._failures import ERROR_KINDS, FailureClassifier, parse_statuses
from ._layer import BreakerLayer

__all__ = [
    "BREAKER_SETTINGS",
    "CLOSED",
    "HALF_OPEN",
    "OPEN",
    "BreakerLayer",
    "Circuit",
    "CountWindow",
    "Ejector",
    "FailureClassifier",
    "TimeWindow",
    "parse_statuses",
]


def _check_kinds(values: tuple[str, ...]) -> frozenset[str]:
    for v in values:
        if v not in ERROR_KINDS:
            raise ValueError(f"expected items from {', '.join(ERROR_KINDS)}, got {v!r}")
    return frozenset(values)


S = meshcore.Setting
BREAKER_SETTINGS = {
    # what counts as a failure
    "failure_statuses": S("list[str]", ("5xx",), 'statuses that count as failures ("5xx", "429")',
                          convert=parse_statuses),
    "failure_errors": S("list[str]", ERROR_KINDS,
                        f"endpoint errors that count as failures ({', '.join(ERROR_KINDS)})",
                        convert=_check_kinds),
    # per-endpoint outlier ejection (Envoy outlier detection defaults)
    "consecutive_failures": S("int", 5, "consecutive failures that eject an endpoint "
                              "(Envoy consecutive_5xx: 5; 0: off)", min=0),
    "base_ejection_time": S("duration", 30.0, "first ejection; grows x times ejected "
                            "(Envoy: 30 s)", min=0),
    "max_ejection_time": S("duration", 300.0, "longest ejection (Envoy: 300 s)", min=0),
    "max_ejection_percent": S("float", 10.0, "most endpoints ejected at once, %, at least one "
                              "(Envoy: 10)", min=0, max=100),
    "interval": S("duration", 10.0, "ejection-multiplier decay and failure-percentage "
                  "interval (Envoy: 10 s)", min=0.001),
    "failure_percentage_threshold": S("float", 0.0, "eject at this failure % per interval "
                                      "(0: off, as Envoy; Envoy suggests 85)", min=0, max=100),
    "failure_percentage_min_hosts": S("int", 5, "endpoints with enough volume needed "
                                      "(Envoy: 5)", min=1),
    "failure_percentage_request_volume": S("int", 50, "requests per interval an endpoint needs "
                                           "(Envoy: 50)", min=1),
    # per-service circuit breaker (Resilience4j defaults)
    "circuit": S("bool", True, "run the per-service circuit breaker"),
    "window": S("str", "count", "sliding window: the last N calls or the last N seconds",
                choices=("count", "time")),
    "window_size": S("int", 100, "calls (count window) or seconds (time window) "
                     "(Resilience4j: 100)", min=1, max=100_000),
    "minimum_calls": S("int", 100, "calls in the window before the rates count "
                       "(Resilience4j: 100)", min=1),
    "failure_rate": S("float", 50.0, "failure % that opens the circuit (Resilience4j: 50)",
                      min=0.001, max=100),
    "slow_call_duration": S("duration", 60.0, "a call slower than this is slow "
                            "(Resilience4j: 60 s)", min=0.001),
    "slow_call_rate": S("float", 100.0, "slow-call % that opens the circuit "
                        "(Resilience4j: 100)", min=0.001, max=100),
    "open_duration": S("duration", 60.0, "time open before probing (Resilience4j: 60 s)",
                       min=0),
    "half_open_probes": S("int", 10, "calls let through while half-open "
                          "(Resilience4j: 10)", min=1),
}


@meshcore.hookimpl
def meshcore_kinds() -> list[meshcore.Kind]:
    return [
        meshcore.Kind("breaker", "layer", BREAKER_SETTINGS,
                      help="outlier ejection per endpoint and a circuit breaker per service"),
    ]


@meshcore.hookimpl
def meshcore_layer(kind: str, settings: meshcore.Settings, upstream: Any) -> Any:
    if kind != "breaker":
        return None
    # Defaults are not run through `convert`, so normalise both forms here.
    statuses = settings.failure_statuses
    if not isinstance(statuses, frozenset):
        statuses = parse_statuses(statuses)
    classifier = FailureClassifier(statuses, frozenset(settings.failure_errors))
    ejector = None
    if settings.consecutive_failures or settings.failure_percentage_threshold:
        ejector = Ejector(
            upstream,
            classifier,
            consecutive_failures=settings.consecutive_failures,
            base_ejection_time=settings.base_ejection_time,
            max_ejection_time=settings.max_ejection_time,
            max_ejection_percent=settings.max_ejection_percent,
            interval=settings.interval,
            failure_percentage_threshold=settings.failure_percentage_threshold,
            failure_percentage_min_hosts=settings.failure_percentage_min_hosts,
            failure_percentage_request_volume=settings.failure_percentage_request_volume,
        )
    circuit = None
    if settings.circuit:
        circuit = Circuit(
            window=settings.window,
            window_size=settings.window_size,
            minimum_calls=settings.minimum_calls,
            failure_rate=settings.failure_rate,
            slow_call_duration=settings.slow_call_duration,
            slow_call_rate=settings.slow_call_rate,
            open_duration=settings.open_duration,
            half_open_probes=settings.half_open_probes,
        )
    return BreakerLayer(upstream, classifier, circuit, ejector)
