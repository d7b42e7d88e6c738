"""Per-request CPU of the mesh pipeline itself, without any I/O.

Drives `mesh.upstream("svc").send(request)` through a connector that answers at once with a
ready Response (no socket, no parsing, never suspends), so what is left is the pipeline:
`Upstream.send` / `_terminal` / `record`, the balancer, the `retry` and `breaker` layers, and
the sidecar's telemetry. Variants, each a mesh of its own:

    terminal             one endpoint, no balancer, no layers
    +round-robin         three endpoints, round-robin
    +retry               ... and the retry layer (defaults: 3 attempts, budget on)
    +breaker             ... and the breaker layer (circuit and ejection on)
    +retry+breaker       the sidecar's usual stack
    +sidecar telemetry   ... and the sidecar's Telemetry registered as it is in `meshcore run`,
                         plus the per-request counting the sidecar's outbound handler does

All meshes run side by side in one event loop and are measured in interleaved batches (the
machine is shared: shared/reference/performance-baselines.md, compare only side-by-side runs);
the figure is the median of the batch times. Python calls per request come from a separate
cProfile pass (calls, not time: cProfile's own overhead distorts time).

    /work/venv/bin/python bench/pipeline_overhead.py [--batches 30] [--batch 2000]
        [--backends asyncio,trio] [--profile]

Prints µs per request, the ratio to terminal-only, and Python calls per request.
`--profile` also prints the top functions of the +sidecar telemetry variant by own time.
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import pstats
import statistics
import sys
import time
from typing import Any

import anyio

import meshcore
from meshcore._sidecar._metrics import Telemetry  # what `meshcore run` registers
from meshcore.testing import static_service

ENDPOINTS = ["127.0.0.1:9001", "127.0.0.1:9002", "127.0.0.1:9003"]
RR = "round-robin"
# name -> (endpoints, balancer, layers, telemetry)
VARIANTS: dict[str, tuple[list[str], str | None, list[str], bool]] = {
    "terminal": (ENDPOINTS[:1], None, [], False),
    "+round-robin": (ENDPOINTS, RR, [], False),
    "+retry": (ENDPOINTS, RR, ["retry"], False),
    "+breaker": (ENDPOINTS, RR, ["breaker"], False),
    "+retry+breaker": (ENDPOINTS, RR, ["retry", "breaker"], False),
    "+sidecar telemetry": (ENDPOINTS, RR, ["retry", "breaker"], True),
}
URL = meshcore.URL.parse("http://svc/items/7") if hasattr(meshcore, "URL") else "http://svc/items/7"


class Instant:
    """A connector that costs nothing: one ready Response, shared by every send."""

    def __init__(self) -> None:
        self.response = meshcore.Response(200, [(b"content-length", b"2")], b"ok")

    async def send(self, endpoint: meshcore.Endpoint, request: meshcore.Request) -> meshcore.Response:
        return self.response

    async def aclose(self) -> None:
        pass


def _requests(n: int) -> list[meshcore.Request]:
    # Built outside the timed part: the sidecar and the transport make one per request anyway.
    return [meshcore.Request("GET", URL, [(b"host", b"svc")]) for _ in range(n)]


def _driver(mesh: meshcore.Mesh, telemetry: Telemetry | None) -> Any:
    send = mesh.upstream("svc").send
    if telemetry is None:

        async def run(requests: list[meshcore.Request]) -> None:
            for request in requests:
                await send(request)

        return run

    # What the sidecar's outbound handler adds around `upstream.send` (meshcore/_sidecar/
    # _runtime.py): the pipeline request count, and the client-facing latency histogram.
    observe = telemetry.observe
    pipeline_requests = telemetry.pipeline_requests
    clock = mesh.upstream("svc").clock  # anyio's clock, looked up once, as the sidecar does

    async def run_with_telemetry(requests: list[meshcore.Request]) -> None:
        for request in requests:
            start = clock()
            pipeline_requests["svc"] += 1
            response = await send(request)
            observe("outbound", "svc", response.status_code, clock() - start)

    return run_with_telemetry


async def measure(batches: int, batch: int, profile: bool) -> dict[str, tuple[float, float]]:
    """{variant: (median µs per request, Python calls per request)}."""
    times: dict[str, list[float]] = {name: [] for name in VARIANTS}
    calls: dict[str, float] = {}
    async with contextlib.AsyncExitStack() as stack:
        drivers = {}
        for name, (endpoints, balancer, layers, with_telemetry) in VARIANTS.items():
            config = {"services": {"svc": static_service(endpoints, balancer=balancer,
                                                         resilience=layers)}}
            telemetry = Telemetry() if with_telemetry else None
            extra = [("sidecar-telemetry", telemetry)] if telemetry is not None else []
            connector = Instant()
            mesh = meshcore.Mesh(config, ["round-robin", "retry", "breaker"], extra_plugins=extra,
                                 connector_factory=lambda *a, c=connector: c)
            await stack.enter_async_context(mesh)
            await mesh.upstream("svc").wait_ready(5)
            drivers[name] = _driver(mesh, telemetry)
        for driver in drivers.values():
            await driver(_requests(2000))  # warm up
        names = list(VARIANTS)
        for round_ in range(batches):
            shift = round_ % len(names)
            for name in names[shift:] + names[:shift]:
                requests = _requests(batch)
                start = time.perf_counter()
                await drivers[name](requests)
                times[name].append((time.perf_counter() - start) / batch)
        n = min(batch, 5000)
        for name, driver in drivers.items():
            requests = _requests(n)
            profiler = cProfile.Profile()
            profiler.enable()
            await driver(requests)
            profiler.disable()
            stats = pstats.Stats(profiler)
            calls[name] = stats.total_calls / n  # type: ignore[attr-defined]
            if profile and name == names[-1]:
                print(f"--- {name}: top functions by own time ({n} requests) ---")
                stats.sort_stats("tottime").print_stats(18)
    return {name: (statistics.median(t) * 1e6, calls[name]) for name, t in times.items()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, default=30, help="batches per variant")
    parser.add_argument("--batch", type=int, default=2000, help="requests per batch")
    parser.add_argument("--backends", default="asyncio,trio")
    parser.add_argument("--profile", action="store_true", help="print cProfile's top functions")
    args = parser.parse_args()
    print(f"{'backend':8} {'variant':20} {'µs/req':>7} {'vs terminal':>11} {'calls/req':>9}")
    for backend in args.backends.split(","):
        results = anyio.run(measure, args.batches, args.batch, args.profile, backend=backend)
        base = results["terminal"][0]
        for name, (us, calls) in results.items():
            print(f"{backend:8} {name:20} {us:7.2f} {us / base:10.2f}x {calls:9.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
