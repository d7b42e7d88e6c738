"""The dashboard's memory: the last 15 minutes of every service, endpoint and caller, in rings.

Linkerd viz and Kiali read their time series from Prometheus; a sidecar alone has no
Prometheus, so it keeps a small one of its own. Nothing here runs per request except one
histogram observation per attempt (per-endpoint latency, `attempt`): every `width` seconds a
background task samples the counters `Telemetry` keeps anyway (requests by status, latency
histograms, retries, state changes) and the mesh's endpoint stats, and stores the difference
from the last tick as one point (Prometheus' own model: counters sampled, rates derived).

Bounds, so a flood of names cannot grow it: at most MAX_SERVICES (direction, service) series,
MAX_ENDPOINTS endpoint series and MAX_CALLERS caller series; past them a new name is not kept
(counted in `dropped`). An endpoint out of the snapshot and idle for the whole window is
dropped. Each series is one `array('d')` of POINTS x 7 doubles (5 KB) plus a minute of
cumulative snapshots (7 x 20 doubles at 10 s): 8.4 KB per series measured with tracemalloc
(tests/sidecar/test_history.py), so about 0.8 MB for 20 services, 60 endpoints and 10 callers,
and 8.6 MB with every bound full.
"""

from __future__ import annotations

import bisect
import math
from array import array
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from .._plugins import hookimpl
from ._metrics import BUCKETS, OVERFLOW, Histogram, Telemetry

__all__ = ["History", "Ring", "quantile"]

# 10 s x 90 = the last 15 minutes (Linkerd viz's and Kiali's default range is the last
# minute for rates and 10-30 min for graphs); rates, success rates and quantiles shown as "now"
# are over the last minute of buckets plus the one filling (`linkerd viz stat`'s default window
# is one minute).
WIDTH = 10.0
POINTS = 90
RATE_WINDOW = 60.0
MAX_SERVICES = 256
MAX_ENDPOINTS = 512
MAX_CALLERS = 256
FIELDS = ("requests", "failures", "retries", "ejections", "p50", "p95", "p99")
_NAN = math.nan


def quantile(q: float, counts: Sequence[float]) -> float | None:
    """The q-quantile (seconds) of a histogram's per-bucket counts over BUCKETS, interpolated
    linearly inside the bucket as Prometheus' `histogram_quantile` does; None when empty."""
    total = sum(counts)
    if total <= 0:
        return None
    rank = q * total
    seen = 0.0
    for i, count in enumerate(counts):
        if seen + count >= rank and count > 0:
            if i >= len(BUCKETS):  # the +Inf bucket: the highest finite bound, as Prometheus
                return BUCKETS[-1]
            low = BUCKETS[i - 1] if i else 0.0
            return low + (BUCKETS[i] - low) * (rank - seen) / count
        seen += count
    return BUCKETS[-1]


class Ring:
    """POINTS rows of len(FIELDS) doubles in one flat array; the oldest row is overwritten."""

    __slots__ = ("data", "head", "filled", "points")

    def __init__(self, points: int = POINTS) -> None:
        self.points = points
        self.data = array("d", [_NAN]) * (points * len(FIELDS))
        self.head = 0  # the row the next point goes to
        self.filled = 0

    def append(self, row: Sequence[float]) -> None:
        n = len(FIELDS)
        self.data[self.head * n:(self.head + 1) * n] = array("d", row)
        self.head = (self.head + 1) % self.points
        self.filled = min(self.filled + 1, self.points)

    def column(self, field: str) -> list[float | None]:
        """Oldest first; a bucket with no value (no requests for a quantile) is None."""
        n, k = len(FIELDS), FIELDS.index(field)
        start = (self.head - self.filled) % self.points
        out: list[float | None] = []
        for i in range(self.filled):
            v = self.data[((start + i) % self.points) * n + k]
            out.append(None if math.isnan(v) else round(v, 6))
        return out

    def nbytes(self) -> int:
        return self.data.buffer_info()[1] * self.data.itemsize


class Series:
    """One thing's ring plus the cumulative counters at the ticks of the last RATE_WINDOW, from
    which the "now" figures (rate, success rate, quantiles over ~1 minute) are differences."""

    __slots__ = ("ring", "marks", "last", "idle")

    def __init__(self, points: int, rate_points: int) -> None:
        self.ring = Ring(points)
        # each mark: requests, failures, retries, ejections, then the histogram's buckets
        self.marks: deque[array[float]] = deque(maxlen=rate_points + 1)
        self.last: array[float] | None = None
        self.idle = 0  # ticks in a row without a request

    def tick(self, cumulative: array[float]) -> None:
        last = self.last
        if last is None or len(last) != len(cumulative):
            last = array("d", [0.0]) * len(cumulative)  # the first tick
            self.marks.clear()
            self.marks.append(last)  # so "now" counts the first bucket too
        else:
            # Kept monotonic: `retries` (attempts minus requests) dips while a request is
            # between its start and its first attempt's end.
            cumulative = array("d", map(max, cumulative, last))
        delta = [c - p for c, p in zip(cumulative, last)]
        hist = delta[4:]
        self.ring.append((
            delta[0], delta[1], delta[2], delta[3],
            *(_or_nan(quantile(q, hist)) for q in (0.5, 0.95, 0.99)),
        ))
        self.idle = 0 if delta[0] else self.idle + 1
        self.last = cumulative
        self.marks.append(cumulative)

    def now(self, current: array[float] | None, width: float, partial: float) -> dict[str, Any]:
        """Figures over the marks kept and the bucket filling (`partial` s of it)."""
        if current is None:
            current = self.last
        if current is None or not self.marks:
            return {"rps": 0.0, "success_rate": None, "p50": None, "p95": None, "p99": None}
        first = self.marks[0]
        if len(first) != len(current):
            first = array("d", [0.0]) * len(current)
        d = [max(0.0, c - p) for c, p in zip(current, first)]
        seconds = (len(self.marks) - 1) * width + partial
        hist = d[4:]
        return {
            "rps": round(d[0] / seconds, 3) if seconds > 0 else 0.0,
            "success_rate": round(1 - d[1] / d[0], 4) if d[0] else None,
            "p50": _round(quantile(0.5, hist)),
            "p95": _round(quantile(0.95, hist)),
            "p99": _round(quantile(0.99, hist)),
            "window": round(seconds, 3),
        }

    def nbytes(self) -> int:
        marks = sum(m.buffer_info()[1] * m.itemsize for m in self.marks)
        return self.ring.nbytes() + marks


def _or_nan(value: float | None) -> float:
    return _NAN if value is None else value


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 6)


def _hist_counts(hist: Histogram | None) -> list[float]:
    return _counts(hist.counts if hist is not None else None)


def _counts(counts: list[int] | None) -> list[float]:
    return [float(c) for c in counts] if counts is not None else [0.0] * (len(BUCKETS) + 1)


class History:
    """The rings of one sidecar, fed by `tick` (every `width` s, from the sidecar's task group)
    and by `attempt` (an upstream observer: each attempt's latency into its endpoint's
    histogram, the one figure Telemetry does not keep per endpoint). Lives as long as the
    process, like Telemetry, so a reload keeps the history."""

    def __init__(self, width: float = WIDTH, points: int = POINTS) -> None:
        self.width = width
        self.points = points
        self.services: dict[tuple[str, str], Series] = {}
        self.endpoints: dict[tuple[str, str], Series] = {}
        self.callers: dict[tuple[str, str], Series] = {}
        # service -> endpoint id -> per-bucket attempt counts (BUCKETS, then +Inf)
        self.endpoint_latency: dict[str, dict[str, list[int]]] = {}
        self._latency_count = 0
        self.dropped = 0
        self.ticks = 0
        self.started: float | None = None  # the sampling task's start, on anyio's clock
        self.last_tick: float | None = None
        # what the last tick computed, for `now()` between ticks
        # endpoint series dropped while their counters live on: their counters then
        self._retired: dict[tuple[str, str], array[float] | None] = {}

    # -- the request path (one call per attempt) ----------------------------------------------

    @hookimpl
    def meshcore_mesh_started(self, mesh: Any) -> None:
        for name, upstream in mesh.upstreams.items():
            upstream.add_observer(self._observer(name))

    def _observer(self, service: str) -> Callable[[Any], None]:
        """An upstream observer for `service`: one dict lookup keyed by the endpoint id (no
        tuple built per attempt), a bisect and an increment."""
        hists = self.endpoint_latency.setdefault(service, {})
        find = bisect.bisect_left

        def attempt(outcome: Any) -> None:
            hist = hists.get(outcome.endpoint.id)
            if hist is None:
                if self._latency_count >= MAX_ENDPOINTS:
                    return
                self._latency_count += 1
                hist = hists[outcome.endpoint.id] = [0] * (len(BUCKETS) + 1)
            hist[find(BUCKETS, outcome.elapsed)] += 1

        return attempt

    def attempt(self, outcome: Any) -> None:
        """One attempt's latency into its endpoint's histogram (what the observers do)."""
        self._observer(outcome.service)(outcome)

    # -- sampling -----------------------------------------------------------------------------

    def cumulative(
        self, telemetry: Telemetry, services: Mapping[str, Any]
    ) -> dict[str, dict[tuple[str, str], array[float]]]:
        """Every series' counters now: requests, failures, retries, ejections, histogram."""
        t = telemetry
        per_service: dict[tuple[str, str], list[float]] = {}
        per_caller: dict[tuple[str, str], list[float]] = {}
        for (direction, service, status, peer, _tls), n in list(t.requests.items()):
            row = per_service.setdefault((direction, service), [0.0, 0.0])
            row[0] += n
            failed = n if status >= 500 else 0
            row[1] += failed
            if direction == "inbound":
                c = per_caller.setdefault((service, peer), [0.0, 0.0])
                c[0] += n
                c[1] += failed
        retries = t.retries()
        ejections: dict[str, float] = {}
        for (svc, component, new), n in list(t.state_changes.items()):
            if component == "ejection" and new == "ejected":
                ejections[svc] = ejections.get(svc, 0.0) + n
        out: dict[str, dict[tuple[str, str], array[float]]] = {
            "services": {}, "endpoints": {}, "callers": {},
        }
        for (direction, service), (req, fail) in per_service.items():
            outbound = direction == "outbound"
            out["services"][(direction, service)] = array("d", [
                req, fail,
                float(retries.get(service, 0)) if outbound else 0.0,
                ejections.get(service, 0.0) if outbound else 0.0,
                *_hist_counts(t.latency.get((direction, service))),
            ])
        empty = [0.0] * (len(BUCKETS) + 1)
        for (service, peer), (req, fail) in per_caller.items():
            out["callers"][(service, peer)] = array("d", [req, fail, 0.0, 0.0, *empty])
        attempts: dict[tuple[str, str], list[float]] = {}
        for (svc, ep, cls), n in list(t.responses.items()):
            if ep == OVERFLOW:
                continue
            row = attempts.setdefault((svc, ep), [0.0, 0.0])
            row[0] += n
            if cls in ("5xx", "error"):
                row[1] += n
        times_ejected = {
            (svc, ep["id"]): float(ep.get("times_ejected", 0))
            for svc, s in services.items() for ep in s.get("endpoints", ())
        }
        for key in set(attempts) | set(times_ejected):
            req, fail = attempts.get(key, (0.0, 0.0))
            out["endpoints"][key] = array("d", [
                req, fail, 0.0, times_ejected.get(key, 0.0),
                *_counts(self.endpoint_latency.get(key[0], {}).get(key[1])),
            ])
        return out

    def tick(self, telemetry: Telemetry, services: Mapping[str, Any], now: float) -> None:
        """One bucket ends: append a point to every series (the idle ones get a zero)."""
        current = self.cumulative(telemetry, services)
        limits = {"services": MAX_SERVICES, "endpoints": MAX_ENDPOINTS, "callers": MAX_CALLERS}
        for kind, rings in (
            ("services", self.services), ("endpoints", self.endpoints), ("callers", self.callers)
        ):
            values = current[kind]
            for key, cumulative in values.items():
                series = rings.get(key)
                if series is None:
                    if len(rings) >= limits[kind]:
                        self.dropped += 1
                        continue
                    series = rings[key] = Series(self.points, self.rate_points)
                    if kind == "endpoints" and key in self._retired:
                        series.last = self._retired.pop(key)
                series.tick(cumulative)
            # An endpoint out of the snapshot with no requests for the whole window has
            # nothing left to show; its counters stay in Telemetry (until their own expiry),
            # so they are kept as the baseline should it come back.
            for key in [k for k in rings if k not in values]:
                del rings[key]
            if kind == "endpoints":
                for key in [k for k, s in rings.items() if s.idle >= self.points]:
                    if not _in_snapshot(services, key):
                        self._retired[key] = rings.pop(key).last
                for key in [k for k in self._retired if k not in values]:
                    del self._retired[key]
                for svc, hists in self.endpoint_latency.items():
                    for ep in [e for e in hists if (svc, e) not in values]:
                        del hists[ep]
                        self._latency_count -= 1
        self.ticks += 1
        self.last_tick = now

    def view(
        self, kind: str, key: tuple[str, str], current: Mapping[str, Mapping[tuple[str, str], array[float]]],
        clock: float,
    ) -> dict[str, Any]:
        """The "now" figures and the rings of one series (`current` from `cumulative`)."""
        rings: dict[tuple[str, str], Series] = getattr(self, kind)
        series = rings.get(key)
        since = self.last_tick if self.last_tick is not None else self.started
        partial = max(0.0, clock - since) if since is not None else 0.0
        cumulative = current.get(kind, {}).get(key)
        if series is None:
            # Before its first tick (or past the bounds): whatever its counters hold came
            # after the last tick, so the "now" figures are over that part of a bucket.
            series = Series(self.points, 1)
            if cumulative is not None:
                series.marks.append(array("d", [0.0]) * len(cumulative))
            figures = series.now(cumulative, self.width, partial)
            figures["series"] = {}
            return figures
        figures = series.now(cumulative, self.width, partial)
        figures["series"] = {f: series.ring.column(f) for f in FIELDS}
        return figures

    @property
    def rate_points(self) -> int:
        """Buckets in the "now" window: a minute's worth, at most the whole ring."""
        return max(1, min(self.points, round(RATE_WINDOW / self.width)))

    def nbytes(self) -> int:
        """Bytes held in rings, marks and per-endpoint histograms (not Python object headers)."""
        rings = sum(
            s.nbytes() for d in (self.services, self.endpoints, self.callers) for s in d.values()
        )
        return rings + self._latency_count * (len(BUCKETS) + 1) * 8


def _in_snapshot(services: Mapping[str, Any], key: tuple[str, str]) -> bool:
    svc, ep = key
    return any(e.get("id") == ep for e in services.get(svc, {}).get("endpoints", ()))
