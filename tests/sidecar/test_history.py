"""The dashboard's in-memory time series (`_history`): points from counter differences,
quantiles as Prometheus computes them, rings that wrap, and bounds that hold under a flood."""

from __future__ import annotations

import tracemalloc
from types import SimpleNamespace
from typing import Any

from meshcore._sidecar._history import (
    FIELDS,
    MAX_CALLERS,
    MAX_ENDPOINTS,
    MAX_SERVICES,
    History,
    Ring,
    quantile,
)
from meshcore._sidecar._metrics import BUCKETS, NO_PEER, Telemetry

PEER = ("spiffe://t/ns/default/sa/web", "true")


def snapshot(service: str, *ids: str, ejected: int = 0) -> dict[str, Any]:
    return {service: {"endpoints": [{"id": i, "times_ejected": ejected} for i in ids]}}


def attempt(history: History, telemetry: Telemetry, service: str, ep: str, status: int, elapsed: float) -> None:
    outcome = SimpleNamespace(service=service, endpoint=SimpleNamespace(id=ep),
                              status_code=status, elapsed=elapsed)
    telemetry.attempt_finished(outcome)
    history.attempt(outcome)


def test_quantile_interpolates_inside_the_bucket_as_prometheus_does():
    counts = [0.0] * (len(BUCKETS) + 1)
    counts[BUCKETS.index(0.002)] = 10  # ten observations in (0.001, 0.002]
    assert quantile(0.5, counts) == 0.0015
    assert quantile(0.99, counts) == 0.001 + 0.001 * 0.99
    counts[-1] = 90  # most above the last bound: Prometheus answers the highest finite bound
    assert quantile(0.99, counts) == BUCKETS[-1]
    assert quantile(0.5, [0.0] * len(counts)) is None


def test_a_ring_keeps_the_last_points_oldest_first():
    ring = Ring(points=4)
    for i in range(6):
        ring.append([float(i)] * len(FIELDS))
    assert ring.column("requests") == [2.0, 3.0, 4.0, 5.0]
    assert ring.nbytes() == 4 * len(FIELDS) * 8


def test_points_are_counter_differences_and_now_is_over_the_window():
    t, h = Telemetry(), History(width=10.0, points=90)
    services = snapshot("orders", "a:1")
    h.tick(t, services, now=10.0)
    for _ in range(8):
        t.observe("outbound", "orders", 200, NO_PEER, 0.003)
        attempt(h, t, "orders", "a:1", 200, 0.003)
    for _ in range(2):
        t.observe("outbound", "orders", 503, NO_PEER, 0.040)
        attempt(h, t, "orders", "a:1", 503, 0.040)
    t.observe("inbound", "local", 200, PEER, 0.001)
    h.tick(t, services, now=20.0)
    h.tick(t, services, now=30.0)  # an idle bucket

    current = h.cumulative(t, services)
    svc = h.view("services", ("outbound", "orders"), current, clock=35.0)
    assert svc["series"]["requests"] == [10.0, 0.0] and svc["series"]["failures"] == [2.0, 0.0]
    assert svc["series"]["p99"][1] is None  # no requests, no quantile
    assert 0.002 < svc["series"]["p50"][0] <= 0.005 < svc["series"]["p99"][0] <= 0.05
    # 10 requests over the window: two closed buckets and 5 s of the one filling
    assert svc["rps"] == round(10 / 25, 3) and svc["success_rate"] == 0.8 and svc["window"] == 25.0
    ep = h.view("endpoints", ("orders", "a:1"), current, clock=35.0)
    assert ep["series"]["requests"] == [0.0, 10.0, 0.0]  # this one existed at the first tick
    assert ep["success_rate"] == 0.8 and ep["p50"] is not None
    caller = h.view("callers", ("local", PEER[0]), current, clock=35.0)
    assert caller["series"]["requests"] == [1.0, 0.0] and caller["success_rate"] == 1.0
    # requests since the last tick count in "now" before their bucket closes
    t.observe("outbound", "orders", 200, NO_PEER, 0.003)
    later = h.view("services", ("outbound", "orders"), h.cumulative(t, services), clock=35.0)
    assert later["rps"] == round(11 / 25, 3)


def test_the_window_is_a_minute_of_buckets():
    t, h = Telemetry(), History(width=10.0, points=90)
    for i in range(20):
        t.observe("outbound", "orders", 200, NO_PEER, 0.003)
        h.tick(t, {}, now=10.0 * (i + 1))
    figures = h.view("services", ("outbound", "orders"), h.cumulative(t, {}), clock=200.0)
    assert figures["window"] == 60.0 and figures["rps"] == 0.1
    assert len(figures["series"]["requests"]) == 20


def test_retries_dipping_mid_request_count_once():
    """`retries` is attempts minus requests: it dips while a request waits for its attempt."""
    t, h = Telemetry(), History()
    t.pipeline_requests["orders"] = 1
    attempt(h, t, "orders", "a:1", 503, 0.01)
    attempt(h, t, "orders", "a:1", 200, 0.01)
    t.observe("outbound", "orders", 200, NO_PEER, 0.02)
    h.tick(t, {}, now=10.0)  # one retry
    t.pipeline_requests["orders"] += 1  # a request started: retries reads 0 for a moment
    h.tick(t, {}, now=20.0)
    attempt(h, t, "orders", "a:1", 200, 0.01)
    t.observe("outbound", "orders", 200, NO_PEER, 0.02)
    h.tick(t, {}, now=30.0)
    series = h.view("services", ("outbound", "orders"), h.cumulative(t, {}), 30.0)["series"]
    assert series["retries"] == [1.0, 0.0, 0.0]


def test_ejections_come_from_the_endpoint_stats_and_the_events():
    t, h = Telemetry(), History()
    h.tick(t, snapshot("orders", "a:1"), now=10.0)
    t.meshcore_state_changed("orders", "ejection", "a:1", "active", "ejected")
    t.observe("outbound", "orders", 503, NO_PEER, 0.01)
    h.tick(t, snapshot("orders", "a:1", ejected=1), now=20.0)
    current = h.cumulative(t, snapshot("orders", "a:1", ejected=1))
    assert h.view("endpoints", ("orders", "a:1"), current, 20.0)["series"]["ejections"] == [0.0, 1.0]
    assert h.view("services", ("outbound", "orders"), current, 20.0)["series"]["ejections"] == [1.0]


def test_a_gone_endpoint_is_dropped_after_an_idle_window_and_comes_back_without_a_spike():
    t, h = Telemetry(), History(width=1.0, points=3)
    for _ in range(5):
        attempt(h, t, "orders", "a:1", 200, 0.01)
    h.tick(t, snapshot("orders", "a:1"), now=1.0)
    for i in range(3):  # out of the snapshot, idle for the whole ring
        h.tick(t, {}, now=2.0 + i)
    assert ("orders", "a:1") not in h.endpoints
    attempt(h, t, "orders", "a:1", 200, 0.01)
    h.tick(t, snapshot("orders", "a:1"), now=6.0)
    series = h.view("endpoints", ("orders", "a:1"), h.cumulative(t, {}), 6.0)["series"]
    assert series["requests"] == [1.0]  # the one new request, not the five before


def test_a_flood_of_names_stays_within_the_bounds():
    t, h = Telemetry(), History()
    for i in range(MAX_SERVICES + 50):
        t.observe("outbound", f"svc{i}", 200, NO_PEER, 0.001)
    for i in range(MAX_ENDPOINTS + 200):
        attempt(h, t, f"svc{i % 7}", f"10.0.{i // 250}.{i % 250}:80", 200, 0.001)
    for i in range(MAX_CALLERS + 50):
        t.observe("inbound", "local", 200, (f"spiffe://t/ns/x/sa/c{i}", "true"), 0.001)
    h.tick(t, {}, now=10.0)
    h.tick(t, {}, now=20.0)
    assert len(h.services) == MAX_SERVICES and len(h.endpoints) <= MAX_ENDPOINTS
    assert len(h.callers) <= MAX_CALLERS and sum(map(len, h.endpoint_latency.values())) <= MAX_ENDPOINTS
    assert h.dropped > 0


def test_memory_at_the_bounds():
    """The figure docs/dashboard.md gives: every bound full, the whole window recorded."""
    t = Telemetry()
    tracemalloc.start()
    try:
        base = tracemalloc.take_snapshot()
        h = History()
        for i in range(MAX_SERVICES):
            t.observe("outbound", f"svc{i}", 200, NO_PEER, 0.001)
        for i in range(MAX_ENDPOINTS):
            attempt(h, t, f"svc{i % 4}", f"10.0.{i // 250}.{i % 250}:80", 200, 0.001)
        before_ticks = tracemalloc.take_snapshot()
        for tick in range(h.points + 10):
            h.tick(t, {}, now=10.0 * (tick + 1))
        after = tracemalloc.take_snapshot()
    finally:
        tracemalloc.stop()
    series = len(h.services) + len(h.endpoints) + len(h.callers)
    assert series == MAX_SERVICES + MAX_ENDPOINTS
    used = sum(s.size_diff for s in after.compare_to(before_ticks, "filename"))
    per_series = used / series
    # ~5 KB of ring and ~1.1 KB of minute marks per series, plus object overhead
    assert 6_000 < per_series < 10_000, per_series  # 8.4 KB measured
    assert h.nbytes() < used
    del base


def test_before_the_first_tick_now_is_over_the_time_since_the_start():
    t, h = Telemetry(), History(width=10.0, points=90)
    h.started = 100.0
    for _ in range(4):
        t.observe("outbound", "orders", 200, NO_PEER, 0.003)
    t.observe("outbound", "orders", 503, NO_PEER, 0.003)
    figures = h.view("services", ("outbound", "orders"), h.cumulative(t, {}), clock=102.0)
    assert figures["rps"] == 2.5 and figures["success_rate"] == 0.8 and figures["series"] == {}
    assert figures["p50"] is not None
    nothing = h.view("services", ("outbound", "other"), h.cumulative(t, {}), clock=102.0)
    assert nothing["rps"] == 0.0 and nothing["success_rate"] is None
