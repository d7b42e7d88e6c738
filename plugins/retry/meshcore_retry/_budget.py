"""A retry budget: retries may add at most a fixed share of load, plus a small reserve.

Why a budget and not only an attempt count (tower's `retry/budget` module doc makes the case):
with 3 attempts, a service that starts failing gets up to 3x its normal load from every client
exactly when it can least take it, and the failure spreads. A budget lets each client retry
freely while failures are rare, and caps retries to a share of real traffic when they are not.

Defaults are Finagle's and Linkerd's (shared/reference/data-plane-anchors.md): retries may be
20% of requests (`ratio` 0.2), plus a reserve of 10 retries per second (`min_per_second`) so a
service with little traffic can still retry, both over a 10 s window (`ttl`).

Implementation: one slot per second of the window, each counting the requests (deposits) and
retries (withdrawals) made in it. A retry is allowed while

    retries_in_window + 1 <= ratio * requests_in_window + min_per_second * ttl

which is tower's/Finagle's token arithmetic without their floating-point bucket. O(1) per
request: a slot is reset lazily when the clock moves past it.
"""

from __future__ import annotations

import math
from typing import Any

__all__ = ["RetryBudget"]


class RetryBudget:
    """Per-service retry budget over a sliding window of one-second slots."""

    __slots__ = (
        "_deposits",
        "_slots",
        "_stamps",
        "_withdrawals",
        "denied",
        "min_per_second",
        "ratio",
        "requests",
        "retries",
        "ttl",
    )

    def __init__(self, ratio: float = 0.2, min_per_second: float = 10.0, ttl: float = 10.0) -> None:
        if ratio < 0 or min_per_second < 0 or ttl <= 0:
            raise ValueError("ratio and min_per_second must be ≥ 0 and ttl > 0")
        self.ratio = ratio
        self.min_per_second = min_per_second
        self.ttl = ttl
        self._slots = max(1, math.ceil(ttl))
        self._deposits = [0] * self._slots
        self._withdrawals = [0] * self._slots
        self._stamps = [-1] * self._slots  # the whole second each slot currently counts
        self.requests = 0  # totals since start, for mesh.state()
        self.retries = 0
        self.denied = 0

    def _slot(self, now: float) -> int:
        second = int(now)
        i = second % self._slots
        if self._stamps[i] != second:
            self._stamps[i] = second
            self._deposits[i] = 0
            self._withdrawals[i] = 0
        return i

    def _window(self, now: float) -> tuple[int, int]:
        oldest = int(now) - self._slots + 1
        deposits = withdrawals = 0
        for i in range(self._slots):
            if self._stamps[i] >= oldest:
                deposits += self._deposits[i]
                withdrawals += self._withdrawals[i]
        return deposits, withdrawals

    def deposit(self, now: float) -> None:
        """Count one original request (not a retry). Every request pays this: `_slot` inline."""
        second = int(now)
        i = second % self._slots
        if self._stamps[i] != second:
            self._stamps[i] = second
            self._deposits[i] = 1
            self._withdrawals[i] = 0
        else:
            self._deposits[i] += 1
        self.requests += 1

    def can_retry(self, now: float) -> bool:
        deposits, withdrawals = self._window(now)
        return withdrawals + 1 <= self.ratio * deposits + self.min_per_second * self.ttl + 1e-9

    def withdraw(self, now: float) -> bool:
        """Take one retry from the budget; False (and counted as denied) when it is spent."""
        if not self.can_retry(now):
            self.denied += 1
            return False
        self._withdrawals[self._slot(now)] += 1
        self.retries += 1
        return True

    def state(self, now: float) -> dict[str, Any]:
        deposits, withdrawals = self._window(now)
        return {
            "ratio": self.ratio,
            "min_per_second": self.min_per_second,
            "ttl": self.ttl,
            "window_requests": deposits,
            "window_retries": withdrawals,
            "balance": self.ratio * deposits + self.min_per_second * self.ttl - withdrawals,
            "requests": self.requests,
            "retries": self.retries,
            "denied": self.denied,
        }
