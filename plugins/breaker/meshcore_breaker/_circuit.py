"""The per-service circuit breaker: closed -> open -> half-open -> closed (or open again).

Why: outlier ejection takes single bad instances out, but when the whole service is failing
(every instance overloaded, a dependency down), sending more calls only deepens the outage and
makes callers wait for failures. A breaker fails those calls at once for a while, then lets a
*fixed* number of probes through to see whether the service recovered, instead of letting
everyone through at the first sign of life (the thundering herd this state exists to avoid).

Defaults are Resilience4j's (shared/reference/data-plane-anchors.md): a count-based window of
the last 100 calls, evaluated once at least 100 calls were seen; open at a 50% failure rate, or
when 100% of calls are slower than 60 s; stay open 60 s; then allow 10 half-open probes and
decide from their results alone.

This module is pure state (time is passed in), so the state machine can be driven by property
tests whatever the interleaving; the layer in `_layer.py` feeds it anyio's clock.
"""

from __future__ import annotations

import math
from typing import Any

__all__ = ["CLOSED", "HALF_OPEN", "OPEN", "Circuit", "CountWindow", "TimeWindow"]

CLOSED, OPEN, HALF_OPEN = "closed", "open", "half-open"
_NO_FAILURES = (0.0, 0.0)


class CountWindow:
    """The outcomes of the last `size` calls, with running sums (O(1) per call)."""

    __slots__ = ("_i", "_ring", "calls", "failures", "size", "slow")

    def __init__(self, size: int) -> None:
        self.size = size
        self.reset()

    def reset(self) -> None:
        self._ring = [0] * self.size  # bit 1: failed, bit 2: slow
        self._i = 0
        self.calls = self.failures = self.slow = 0

    def add(self, now: float, failed: bool, slow: bool) -> tuple[int, int, int]:
        """Count one call; returns `totals(now)` after it (one call less per request)."""
        i = self._i
        old = self._ring[i]
        if self.calls == self.size:
            self.failures -= old & 1
            self.slow -= old >> 1
        else:
            self.calls += 1
        self._ring[i] = failed | (slow << 1)
        self.failures += failed
        self.slow += slow
        i += 1
        self._i = 0 if i == self.size else i
        return self.calls, self.failures, self.slow

    def totals(self, now: float) -> tuple[int, int, int]:
        return self.calls, self.failures, self.slow


class TimeWindow:
    """The outcomes of the calls of the last `size` seconds, in one-second buckets."""

    __slots__ = ("_calls", "_failures", "_slow", "_stamps", "size")

    def __init__(self, size: int) -> None:
        self.size = size
        self.reset()

    def add(self, now: float, failed: bool, slow: bool) -> tuple[int, int, int]:
        """Count one call; returns `totals(now)` after it."""
        second = math.floor(now)
        i = second % self.size
        if self._stamps[i] != second:
            self._stamps[i] = second
            self._calls[i] = self._failures[i] = self._slow[i] = 0
        self._calls[i] += 1
        self._failures[i] += failed
        self._slow[i] += slow
        return self.totals(now)

    def totals(self, now: float) -> tuple[int, int, int]:
        oldest = math.floor(now) - self.size + 1
        calls = failures = slow = 0
        for i in range(self.size):
            if self._stamps[i] >= oldest:
                calls += self._calls[i]
                failures += self._failures[i]
                slow += self._slow[i]
        return calls, failures, slow

    def reset(self) -> None:
        self._stamps = [-1] * self.size
        self._calls = [0] * self.size
        self._failures = [0] * self.size
        self._slow = [0] * self.size


class Circuit:
    """The breaker's state machine. `acquire(now)` -> a ticket or None; `record(ticket, ...)`.

    A ticket is the generation (period) the call was admitted in: a result from an older
    period (a call admitted while closed that ends after the breaker opened) is not counted
    toward the current one, so the half-open decision rests on the probes alone.
    """

    def __init__(
        self,
        *,
        window: str = "count",
        window_size: int = 100,
        minimum_calls: int = 100,
        failure_rate: float = 50.0,
        slow_call_duration: float = 60.0,
        slow_call_rate: float = 100.0,
        open_duration: float = 60.0,
        half_open_probes: int = 10,
        on_change: Any = None,
    ) -> None:
        if window not in ("count", "time"):
            raise ValueError(f"window must be 'count' or 'time', got {window!r}")
        if not (0 < failure_rate <= 100 and 0 < slow_call_rate <= 100):
            raise ValueError("failure_rate and slow_call_rate must be above 0 and at most 100")
        self.window = CountWindow(window_size) if window == "count" else TimeWindow(window_size)
        self.minimum_calls = minimum_calls
        self.failure_rate = failure_rate
        self.slow_call_duration = slow_call_duration
        self.slow_call_rate = slow_call_rate
        self.open_duration = open_duration
        self.half_open_probes = half_open_probes
        self.on_change = on_change
        self.state = CLOSED
        self.generation = 0
        self.open_until = -math.inf
        self.opened = 0  # times opened, for mesh.state()
        self.rejected = 0
        # half-open bookkeeping
        self.admitted = 0
        self.completed = 0
        self.probe_failures = 0
        self.probe_slow = 0
        self.last_rates = (0.0, 0.0)

    # -- transitions ---------------------------------------------------------------------------

    def _move(self, new: str, now: float) -> None:
        old, self.state = self.state, new
        self.generation += 1
        if new == OPEN:
            self.open_until = now + self.open_duration
            self.opened += 1
        elif new == HALF_OPEN:
            self.admitted = self.completed = self.probe_failures = self.probe_slow = 0
        else:
            self.window.reset()
        if self.on_change is not None:
            self.on_change(old, new)

    # -- the request path ----------------------------------------------------------------------

    def acquire(self, now: float) -> int | None:
        """Admit a call (its ticket) or refuse it (None: fail fast with CircuitOpen)."""
        state = self.state
        if state == CLOSED:
            return self.generation
        if state == OPEN:
            if now < self.open_until:
                self.rejected += 1
                return None
            self._move(HALF_OPEN, now)
        if self.admitted < self.half_open_probes:
            self.admitted += 1
            return self.generation
        self.rejected += 1
        return None

    def retry_at(self, now: float) -> float:
        """When a refused caller may expect probes to be let through."""
        return self.open_until if self.state == OPEN else now

    def record(self, ticket: int, now: float, failed: bool, slow: bool) -> None:
        if ticket != self.generation:
            return  # admitted in an earlier period: not evidence about this one
        state = self.state
        if state == CLOSED:
            calls, failures, slows = self.window.add(now, failed, slow)
            if not failures and not slows:
                # The usual case: nothing to trip on (both thresholds are above 0).
                self.last_rates = _NO_FAILURES
            elif calls >= self.minimum_calls:
                rates = (100.0 * failures / calls, 100.0 * slows / calls)
                self.last_rates = rates
                if rates[0] >= self.failure_rate or (slows and self._tripped(rates)):
                    self._move(OPEN, now)
        elif state == HALF_OPEN:
            self.completed += 1
            self.probe_failures += failed
            self.probe_slow += slow
            if self.completed >= self.half_open_probes:
                n = self.completed
                rates = (100.0 * self.probe_failures / n, 100.0 * self.probe_slow / n)
                self.last_rates = rates
                self._move(OPEN if self._tripped(rates) else CLOSED, now)

    def _tripped(self, rates: tuple[float, float]) -> bool:
        failure_rate, slow_rate = rates
        return failure_rate >= self.failure_rate or (
            self.slow_call_rate <= 100.0 and slow_rate >= self.slow_call_rate and slow_rate > 0
        )

    def state_dict(self, now: float) -> dict[str, Any]:
        calls, failures, slows = self.window.totals(now)
        return {
            "state": self.state,
            "window_calls": calls,
            "window_failures": failures,
            "window_slow_calls": slows,
            "failure_rate": round(self.last_rates[0], 2),
            "slow_call_rate": round(self.last_rates[1], 2),
            "retry_at": self.open_until if self.state == OPEN else None,
            "half_open_admitted": self.admitted if self.state == HALF_OPEN else None,
            "opened": self.opened,
            "rejected": self.rejected,
        }
