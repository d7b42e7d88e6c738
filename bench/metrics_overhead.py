"""The sidecar's metrics: what recording costs per request, and a scrape at N services.

1. Recording: the calls the handler and the attempt observer make for one proxied request
   (`Telemetry.observe`, `.finished`, `.attempt_finished`, two `perf_counter` reads), timed in
   a loop on steady label values (the usual case: the series exists).
2. Scrape: a real in-process sidecar with N static services on one loopback upstream, one
   request through each (outbound) and one inbound, then `/metrics`: series, bytes, and the
   time the sidecar took to render it.

    /work/venv/bin/python bench/metrics_overhead.py [--services 100]

For the cost on the whole data path, compare source trees with bench/sidecar.py --compare
(docs/metrics.md#cost gives the figures and the trees).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import anyio
import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from meshcore._sidecar._metrics import Telemetry, render  # noqa: E402
from meshcore._sidecar._runtime import Sidecar  # noqa: E402
from meshcore.testing import UpstreamServer  # noqa: E402


def recording_ns(n: int = 200_000) -> float:
    t = Telemetry()
    outcome = SimpleNamespace(service="orders", endpoint=SimpleNamespace(id="10.0.0.1:8080"), status_code=200)
    peer = ("spiffe://example.org/ns/shop/sa/web", "true")
    now = time.perf_counter
    observe, finished, attempt = t.observe, t.finished, t.attempt_finished
    best = float("inf")
    for _ in range(5):
        began = time.perf_counter_ns()
        for _ in range(n):
            start = now()
            attempt(outcome)
            elapsed = now() - start
            observe("outbound", "orders", 200, peer, elapsed)
            finished("outbound", "orders", elapsed)
        best = min(best, (time.perf_counter_ns() - began) / n)
    return best


async def scrape(services: int) -> tuple[int, int, float]:
    upstream = UpstreamServer("u").start()
    try:
        config = {
            "services": {
                f"svc-{i:03d}": {"discovery": "static", "static": {"endpoints": [upstream.address]}}
                for i in range(services)
            },
            "sidecar": {"outbound": "127.0.0.1:0", "inbound": "127.0.0.1:0", "admin": "127.0.0.1:0",
                        "service": "me", "app": upstream.address},
        }
        async with Sidecar(config, []) as sidecar, httpx.AsyncClient() as client:
            out = sidecar.addresses["outbound"]
            for i in range(services):
                await client.get(f"http://{out}/", headers={"host": f"svc-{i:03d}"})
            await client.get(f"http://{sidecar.addresses['inbound']}/")
            text = (await client.get(f"http://{sidecar.addresses['admin']}/metrics")).text
            state = sidecar.generation.mesh.state()
            began = time.perf_counter()
            for _ in range(10):
                render(sidecar.telemetry, state, sidecar.stats())
            render_ms = (time.perf_counter() - began) / 10 * 1000
    finally:
        upstream.stop()
    series = sum(1 for line in text.splitlines() if line and line[0] != "#")
    return series, len(text.encode()), render_ms


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--services", type=int, default=100)
    args = parser.parse_args()
    print(f"recording per request: {recording_ns():.0f} ns (best of 5)")
    series, size, render_ms = anyio.run(scrape, args.services)
    print(f"scrape at {args.services} services: {series} series, {size / 1000:.0f} KB, "
          f"rendered in {render_ms:.1f} ms")


if __name__ == "__main__":
    main()
