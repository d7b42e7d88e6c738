"""meshcore-servicemesh-retry: the `retry` and `timeout` resilience layers.

    [mesh]
    plugins = ["retry"]

    [defaults]
    resilience = ["timeout", "retry"]      # outermost first; add "breaker" innermost

    [defaults.retry]
    attempts = 3

    [defaults.timeout]
    deadline = "15s"

Every default and its source is in docs/resilience.md and this package's README. Only the
public `meshcore` API is used, so this is also an example of a third-party layer plugin.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import meshcore

from ._budget import RetryBudget
from ._retry import (
    ERROR_KINDS,
    IDEMPOTENT,
    RETRY_EXTENSION,
    RetryLayer,
    RetryPolicy,
    error_kind,
    parse_retry_after,
)
from ._timeout import TIMEOUT_EXTENSION, TimeoutLayer

__all__ = [
    "RETRY_EXTENSION",
    "RETRY_SETTINGS",
    "TIMEOUT_EXTENSION",
    "TIMEOUT_SETTINGS",
    "RetryBudget",
    "RetryLayer",
    "RetryPolicy",
    "TimeoutLayer",
    "error_kind",
    "parse_retry_after",
]

_METHODS = ("GET", "HEAD", "OPTIONS", "PUT", "DELETE", "POST", "PATCH", "TRACE", "CONNECT")


def _check_subset(
    allowed: tuple[str, ...], upper: bool = False
) -> Callable[[tuple[str, ...]], tuple[str, ...]]:
    def convert(values: tuple[str, ...]) -> tuple[str, ...]:
        for v in values:
            if (v.upper() if upper else v) not in allowed:
                raise ValueError(f"expected items from {', '.join(allowed)}, got {v!r}")
        return values

    return convert


def _check_statuses(values: tuple[int, ...]) -> tuple[int, ...]:
    for v in values:
        if not 100 <= v <= 599:
            raise ValueError(f"expected HTTP status codes (100-599), got {v!r}")
    return values


RETRY_SETTINGS = {
    "attempts": meshcore.Setting(
        "int", 3, "attempts in total, the first included", min=1, max=10
    ),
    "per_try_timeout": meshcore.Setting(
        "duration", 0.0, "timeout of each attempt (0: the deadline's share per attempt, "
        "deadline / attempts, when a timeout layer sets one)",
        min=0,
    ),
    "backoff_base": meshcore.Setting(
        "duration", 0.025, "full-jitter backoff base (Envoy/Istio: 25 ms)", min=0
    ),
    "backoff_max": meshcore.Setting(
        "duration", 0.25, "backoff cap (Envoy: 10 x base = 250 ms)", min=0
    ),
    "retry_on": meshcore.Setting(
        "list[str]",
        ("connect-failure", "reset", "timeout"),
        f"endpoint failures to retry ({', '.join(ERROR_KINDS)})",
        convert=_check_subset(ERROR_KINDS),
    ),
    "statuses": meshcore.Setting(
        "list[int]", (502, 503, 504), "response statuses to retry (idempotent methods only)",
        convert=_check_statuses,
    ),
    "methods": meshcore.Setting(
        "list[str]",
        IDEMPOTENT,
        "methods retried after the request may have reached the server (RFC 9110 idempotent)",
        convert=_check_subset(_METHODS, upper=True),
    ),
    "retry_after": meshcore.Setting(
        "bool", True, "wait as long as a Retry-After header asks (capped by the deadline)"
    ),
    "budget": meshcore.Setting("bool", True, "cap retries with the per-service budget"),
    "budget_ratio": meshcore.Setting(
        "float", 0.2, "retries allowed as a share of requests (Finagle/Linkerd: 0.2)", min=0, max=10
    ),
    "budget_min_per_second": meshcore.Setting(
        "float", 10.0, "retries always allowed per second (Finagle/Linkerd: 10)", min=0
    ),
    "budget_ttl": meshcore.Setting(
        "duration", 10.0, "the budget's window (Finagle/Linkerd: 10 s)", min=1, max=3600
    ),
    "buffer_limit": meshcore.Setting(
        "int", 64 * 1024, "largest request body buffered for replay, bytes (Linkerd: 64 KiB)",
        min=0,
    ),
}

TIMEOUT_SETTINGS = {
    "deadline": meshcore.Setting(
        "duration", 15.0,
        "overall deadline incl. every retry and backoff (Envoy route timeout: 15 s; 0: none)",
        min=0,
    ),
}


@meshcore.hookimpl
def meshcore_kinds() -> list[meshcore.Kind]:
    return [
        meshcore.Kind("retry", "layer", RETRY_SETTINGS,
                      help="retries with full-jitter backoff, a budget and body replay"),
        meshcore.Kind("timeout", "layer", TIMEOUT_SETTINGS,
                      help="one overall deadline per request, retries included"),
    ]


@meshcore.hookimpl
def meshcore_layer(kind: str, settings: meshcore.Settings, upstream: Any) -> Any:
    if kind == "retry":
        budget = RetryBudget(
            settings.budget_ratio, settings.budget_min_per_second, settings.budget_ttl
        )
        return RetryLayer(RetryPolicy.from_settings(settings), upstream, RETRY_SETTINGS, budget)
    if kind == "timeout":
        return TimeoutLayer(settings.deadline, upstream)
    return None
