"""The dashboard's time series: what they cost per request, per tick and in memory.

1. Per attempt: the one call the dashboard adds on the request path (the per-endpoint latency
   observer), in interleaved rounds against the telemetry's own per-attempt call
   (`Telemetry.attempt_finished`), which is the anchor: the ratio says what the dashboard adds
   to what /metrics already costs. The issue's bar: "tiny" next to the counters.
2. Per tick: `History.tick` at the bounds (256 services, 512 endpoints, 100 callers), run
   every `dashboard_bucket` (10 s) off the request path.
3. Memory: bytes per series once the whole window is recorded (tracemalloc).

    python bench/dashboard_history.py            # ~1 minute
    python bench/dashboard_history.py --quick    # ~15 s

Times are CPU time of this process (`time.process_time`), which other processes' load moves
far less than wall-clock; prints median and spread and the load average.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
import tracemalloc
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from meshcore import Endpoint, Outcome  # noqa: E402
from meshcore._sidecar._history import (  # noqa: E402
    MAX_CALLERS,
    MAX_ENDPOINTS,
    MAX_SERVICES,
    History,
)
from meshcore._sidecar._metrics import NO_PEER, Telemetry  # noqa: E402


def per_call_ns(call: Callable[[Outcome], None], arg: Outcome, n: int) -> float:
    began = time.process_time_ns()  # CPU time: what other processes' load does not move
    for _ in range(n):
        call(arg)
    return (time.process_time_ns() - began) / n


def attempt_rounds(rounds: int, n: int) -> None:
    history, telemetry = History(), Telemetry()
    outcome = Outcome("orders", Endpoint("10.0.0.1", 8080), "GET", 200, None, 0.0012)
    observer = history._observer("orders")
    ours, anchor = [], []
    for _ in range(rounds):  # interleaved: load moves both alike
        ours.append(per_call_ns(observer, outcome, n))
        anchor.append(per_call_ns(telemetry.attempt_finished, outcome, n))
    ratios = [a / b for a, b in zip(ours, anchor)]
    print(f"per attempt (CPU): dashboard observer {statistics.median(ours):.0f} ns "
          f"(spread {min(ours):.0f}-{max(ours):.0f}), telemetry.attempt_finished "
          f"{statistics.median(anchor):.0f} ns (spread {min(anchor):.0f}-{max(anchor):.0f}); "
          f"ratio {statistics.median(ratios):.2f} (spread {min(ratios):.2f}-{max(ratios):.2f})")


def filled(telemetry: Telemetry) -> History:
    history = History()
    for i in range(MAX_SERVICES):
        telemetry.observe("outbound", f"svc{i}", 200, NO_PEER, 0.001)
    for i in range(MAX_ENDPOINTS):
        outcome = Outcome(f"svc{i % 4}", Endpoint(f"10.0.{i // 250}.{i % 250}", 80), "GET", 200, None, 0.001)
        telemetry.attempt_finished(outcome)
        history.attempt(outcome)
    for i in range(MAX_CALLERS):
        telemetry.observe("inbound", "local", 200, (f"spiffe://t/ns/x/sa/c{i}", "true"), 0.001)
    return history


def tick_rounds(ticks: int) -> None:
    telemetry = Telemetry()
    history = filled(telemetry)
    times = []
    for k in range(ticks):
        began = time.process_time()
        history.tick(telemetry, {}, now=10.0 * (k + 1))
        times.append((time.process_time() - began) * 1000)
    series = len(history.services) + len(history.endpoints) + len(history.callers)
    print(f"per tick at the bounds ({series} series): median {statistics.median(times):.1f} ms CPU "
          f"(spread {min(times):.1f}-{max(times):.1f}), once per dashboard_bucket")


def memory() -> None:
    telemetry = Telemetry()
    tracemalloc.start()
    history = filled(telemetry)
    before = tracemalloc.take_snapshot()
    for k in range(history.points + 10):
        history.tick(telemetry, {}, now=10.0 * (k + 1))
    used = sum(s.size_diff for s in tracemalloc.take_snapshot().compare_to(before, "filename"))
    tracemalloc.stop()
    series = len(history.services) + len(history.endpoints) + len(history.callers)
    print(f"memory: {used / series / 1000:.1f} KB per series, {used / 1e6:.1f} MB for {series} series "
          f"(the full window of {history.points} points)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer rounds (~15 s)")
    ns = parser.parse_args()
    print(f"load average: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    attempt_rounds(rounds=5 if ns.quick else 15, n=100_000 if ns.quick else 300_000)
    tick_rounds(20 if ns.quick else 100)
    memory()


if __name__ == "__main__":
    main()
