"""Per-endpoint outlier ejection: take a failing instance out of balancing for a while.

Envoy's outlier detection, with its defaults (shared/reference/data-plane-anchors.md):

- 5 consecutive failures eject an endpoint (`consecutive_5xx`; Finagle's failure accrual uses
  5 too, Linkerd 7).
- The ejection lasts base x multiplier: 30 s the first time, 60 s the second, ... capped at
  300 s. The multiplier grows by one per ejection and shrinks by one for every interval (10 s)
  the endpoint spent back in rotation, so an instance that failed once long ago starts over.
- Never more than 10% of the endpoints are ejected at once, but at least one may be (as Envoy
  does), so a small service can still shed its one bad instance while a failure of the whole
  service is left to the circuit breaker instead of emptying the balancer.
- Optional failure-percentage ejection (off by default, as in Envoy, where
  `enforcing_failure_percentage` is 0): every interval, an endpoint with at least 50 requests
  whose failure percentage is at least the threshold (Envoy suggests 85) is ejected, when at
  least 5 endpoints had that volume.

The ejection itself is `upstream.eject()` / `upstream.restore()`: the Upstream keeps the
ejected-until time that every balancer reads, and fires the `ejection` state event. An
ejection ends by itself when its time is up (the Upstream restores lazily).
"""

from __future__ import annotations

import math
from typing import Any

import anyio

import meshcore

from ._failures import FailureClassifier

__all__ = ["Ejector"]


class _Record:
    __slots__ = (
        "consecutive",
        "interval_failures",
        "interval_requests",
        "multiplier",
        "released_at",
    )

    def __init__(self) -> None:
        self.consecutive = 0
        self.multiplier = 0
        self.released_at = -math.inf  # when the last ejection ended (or was due to end)
        self.interval_requests = 0
        self.interval_failures = 0


class Ejector:
    """The upstream observer that ejects outliers. One per service."""

    def __init__(
        self,
        upstream: Any,
        classifier: FailureClassifier,
        *,
        consecutive_failures: int = 5,
        base_ejection_time: float = 30.0,
        max_ejection_time: float = 300.0,
        max_ejection_percent: float = 10.0,
        interval: float = 10.0,
        failure_percentage_threshold: float = 0.0,
        failure_percentage_min_hosts: int = 5,
        failure_percentage_request_volume: int = 50,
    ) -> None:
        self.upstream = upstream
        self.classifier = classifier
        self.consecutive_failures = consecutive_failures
        self.base = base_ejection_time
        self.cap = max(max_ejection_time, base_ejection_time)
        self.max_percent = max_ejection_percent
        self.interval = interval
        self.fp_threshold = failure_percentage_threshold
        self.fp_min_hosts = failure_percentage_min_hosts
        self.fp_volume = failure_percentage_request_volume
        self.records: dict[meshcore.Endpoint, _Record] = {}
        self._failure_statuses = classifier.statuses  # a failure when the status is in it
        self.ejections = 0
        self.skipped = 0  # ejections refused by the max-percent rule
        self._next_evaluation = -math.inf

    def observe(self, outcome: meshcore.Outcome) -> None:
        endpoint = outcome.endpoint
        record = self.records.get(endpoint)
        if record is None:
            record = self.records[endpoint] = _Record()
            self._prune()
        if outcome.error is not None:
            failed = self.classifier.error_failed(outcome.error)
        else:
            failed = (outcome.status_code or 0) in self._failure_statuses
        if self.fp_threshold:
            record.interval_requests += 1
            record.interval_failures += failed
            self._maybe_evaluate()
        if not failed:
            record.consecutive = 0
            return
        record.consecutive += 1
        if self.consecutive_failures and record.consecutive >= self.consecutive_failures:
            if not self.upstream.is_ejected(endpoint):
                self.eject(endpoint, record, f"{record.consecutive} consecutive failures")

    def _prune(self) -> None:
        """Forget endpoints discovery dropped, so churn does not grow the table forever."""
        live = self.upstream.snapshot.endpoints
        if len(self.records) > 2 * len(live) + 16:
            keep = set(live)
            self.records = {ep: r for ep, r in self.records.items() if ep in keep}

    def eject(self, endpoint: meshcore.Endpoint, record: _Record, why: str) -> bool:
        upstream = self.upstream
        total = len(upstream.snapshot.endpoints)
        allowed = max(1, math.floor(total * self.max_percent / 100.0))
        if len(upstream.ejected) >= allowed:
            self.skipped += 1
            return False
        now = anyio.current_time()
        if record.released_at > -math.inf and self.interval > 0:
            healthy_intervals = int(max(0.0, now - record.released_at) // self.interval)
            record.multiplier = max(0, record.multiplier - healthy_intervals)
        record.multiplier += 1
        duration = min(self.base * record.multiplier, self.cap)
        record.released_at = now + duration
        record.consecutive = 0
        self.ejections += 1
        upstream.eject(endpoint, duration)
        return True

    def _maybe_evaluate(self) -> None:
        now = anyio.current_time()
        if now < self._next_evaluation:
            return
        first = self._next_evaluation == -math.inf
        self._next_evaluation = now + self.interval
        if first:
            return
        live = set(self.upstream.snapshot.endpoints)
        candidates = [
            (ep, r) for ep, r in self.records.items()
            if ep in live and r.interval_requests >= self.fp_volume
        ]
        if len(candidates) >= self.fp_min_hosts:
            for ep, r in candidates:
                if (100.0 * r.interval_failures / r.interval_requests >= self.fp_threshold
                        and not self.upstream.is_ejected(ep)):
                    self.eject(ep, r, "failure percentage")
        for r in self.records.values():
            r.interval_requests = r.interval_failures = 0

    def state(self) -> dict[str, Any]:
        upstream = self.upstream
        out = {}
        for ep in upstream.snapshot.endpoints:
            r = self.records.get(ep)
            out[ep.id] = {
                "consecutive_failures": r.consecutive if r else 0,
                "ejected": upstream.is_ejected(ep),
                "ejection_multiplier": r.multiplier if r else 0,
            }
        return out
