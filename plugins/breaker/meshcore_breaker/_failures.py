"""What counts as a failure, shared by outlier ejection and the circuit breaker.

By default an endpoint error of any kind (connect failure, reset, timeout, protocol error) and
any 5xx status are failures, and 4xx are not: a 4xx is the caller's mistake, not a sign the
instance is unhealthy (Envoy's consecutive_5xx and Resilience4j's recordExceptions work the same
way). Both lists are settings.
"""

from __future__ import annotations

from collections.abc import Iterable

import meshcore

__all__ = ["ERROR_KINDS", "FailureClassifier", "parse_statuses"]

ERROR_KINDS = meshcore.EndpointError.KINDS


def error_kind(exc: BaseException) -> str | None:
    """The policy name of an endpoint failure (`EndpointError.kind`), None for other errors."""
    return exc.kind if isinstance(exc, meshcore.EndpointError) else None


def parse_statuses(values: Iterable[str]) -> frozenset[int]:
    """`["5xx", "429"]` -> the set of status codes; ValueError names a bad entry."""
    codes: set[int] = set()
    for value in values:
        text = value.strip().lower()
        if len(text) == 3 and text.endswith("xx") and text[0] in "12345":
            base = int(text[0]) * 100
            codes.update(range(base, base + 100))
        elif text.isdigit() and 100 <= int(text) <= 599:
            codes.add(int(text))
        else:
            raise ValueError(f'expected status codes or classes like "5xx", "429", got {value!r}')
    return frozenset(codes)


class FailureClassifier:
    __slots__ = ("errors", "statuses")

    def __init__(self, statuses: frozenset[int], errors: frozenset[str]) -> None:
        self.statuses = statuses
        self.errors = errors

    def error_failed(self, exc: BaseException) -> bool:
        return error_kind(exc) in self.errors
