"""Library mode overhead: the same requests via plain httpx.AsyncClient and via mesh.client().

One nginx upstream on loopback; the mesh has static discovery with one endpoint, a balancer
and a pass-through layer (inline plugins, so nothing else is measured). Sequential and
32-concurrent, on asyncio and trio, interleaved reps in one process run; prints µs per request
and the ratio mesh / plain (issue 2's bar: <= 1.10; issue 3's: <= 0.6 sequential, <= 0.3 at 32).

    python bench/library_overhead.py [--requests 2000] [--reps 3]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import anyio
import httpx

sys.path.insert(0, str(Path(__file__).parent))
from _nginx import nginx  # noqa: E402

import meshcore  # noqa: E402


class BenchPlugins:
    """A pick-first balancer and a pass-through layer, declared like any plugin."""

    @meshcore.hookimpl
    def meshcore_kinds(self):
        return [meshcore.Kind("first", "balancer"), meshcore.Kind("pass", "layer")]

    @meshcore.hookimpl
    def meshcore_balancer(self, kind, settings, upstream):
        if kind != "first":
            return None

        class First:
            def pick(self, snapshot, request, exclude):
                return snapshot.endpoints[0]

        return First()

    @meshcore.hookimpl
    def meshcore_layer(self, kind, settings, upstream):
        if kind != "pass":
            return None
        return lambda inner: inner


async def run_requests(client: httpx.AsyncClient, url: str, n: int, concurrency: int) -> float:
    """Seconds per request for n GETs with `concurrency` tasks sharing the client."""
    per_task = n // concurrency

    async def worker() -> None:
        for _ in range(per_task):
            response = await client.get(url)
            assert response.status_code == 200

    start = time.perf_counter()
    async with anyio.create_task_group() as tg:
        for _ in range(concurrency):
            tg.start_soon(worker)
    return (time.perf_counter() - start) / (per_task * concurrency)


async def measure(port: int, n: int, reps: int) -> dict[tuple[str, int], list[float]]:
    config = {
        "services": {
            "bench": {
                "discovery": "static",
                "balancer": "first",
                "resilience": ["pass"],
                "static": {"endpoints": [f"127.0.0.1:{port}"]},
            }
        }
    }
    results: dict[tuple[str, int], list[float]] = {}
    limits = httpx.Limits(max_connections=100, max_keepalive_connections=100)
    async with meshcore.Mesh(config, [], extra_plugins=[("bench", BenchPlugins())]) as mesh:
        async with httpx.AsyncClient(limits=limits) as plain, mesh.client(limits=limits) as meshed:
            for concurrency in (1, 32):
                # warm both pools
                await run_requests(plain, f"http://127.0.0.1:{port}/", 64, concurrency)
                await run_requests(meshed, "http://bench/", 64, concurrency)
                for _ in range(reps):
                    for label, client, url in (
                        ("plain", plain, f"http://127.0.0.1:{port}/"),
                        ("mesh", meshed, "http://bench/"),
                    ):
                        t = await run_requests(client, url, n, concurrency)
                        results.setdefault((label, concurrency), []).append(t)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--backends", default="asyncio,trio")
    args = parser.parse_args()
    rows = []
    with nginx(1) as (port,):
        for backend in args.backends.split(","):
            results = anyio.run(measure, port, args.requests, args.reps, backend=backend)
            for concurrency in (1, 32):
                plain = statistics.median(results[("plain", concurrency)]) * 1e6
                mesh = statistics.median(results[("mesh", concurrency)]) * 1e6
                rows.append((backend, concurrency, plain, mesh, mesh / plain))
    print(f"{'backend':8} {'tasks':>5} {'plain µs/req':>13} {'mesh µs/req':>12} {'mesh/plain':>10}")
    for backend, concurrency, plain, mesh, ratio in rows:
        print(f"{backend:8} {concurrency:>5} {plain:>13.1f} {mesh:>12.1f} {ratio:>10.2f}")


if __name__ == "__main__":
    main()
