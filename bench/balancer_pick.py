"""µs per pick for every balancer kind at 10 / 1,000 / 10,000 endpoints, and the cost of a
snapshot change at 10,000.

    /work/venv/bin/python bench/balancer_pick.py [--backend asyncio|trio]

The bar (issue 4): median pick ≤ 5 µs at 10,000 endpoints for every kind, and ≤ 2x from 10 to
10,000 endpoints for round-robin, weighted, random and least-request. Weights are random 1..100
(so `weighted` has up to 100 distinct weights in its schedule), nothing is ejected, and picks go
through a real Mesh/Upstream inside a running event loop, as in a request. The last column is
the ratio the bar judges; the script exits 1 when a bar is missed.
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time

import anyio

import meshcore

SIZES = (10, 1_000, 10_000)
KINDS = [
    ("round-robin", "round-robin", {}),
    ("weighted", "weighted", {}),
    ("random", "random", {}),
    ("least-request", "least-request", {}),
    ("least-request (peak-ewma)", "least-request", {"mode": "peak-ewma"}),
]
FLAT = {"round-robin", "weighted", "random", "least-request"}
BATCH, ROUNDS = 2_000, 31


def endpoints(n: int, salt: int = 0) -> list[meshcore.Endpoint]:
    rng = random.Random(n + salt)
    return [
        meshcore.Endpoint(f"10.{i >> 16 & 255}.{i >> 8 & 255}.{i & 255}", 8000 + salt, weight=rng.randint(1, 100))
        for i in range(n)
    ]


async def measure(kind: str, settings: dict, n: int) -> tuple[float, float | None]:
    config = {
        "services": {
            "svc": {
                "discovery": "static",
                "static": {"endpoints": ["127.0.0.1:1"]},
                "balancer": kind,
                **({kind: settings} if settings else {}),
            }
        }
    }
    async with meshcore.Mesh(config, plugins=["round-robin", "weighted"]) as mesh:
        upstream = mesh.upstream("svc")
        await upstream.wait_ready(5)
        upstream.publish(endpoints(n))
        pick, request = upstream.balancer.pick, meshcore.Request("GET", "http://svc/")
        if hasattr(upstream.balancer, "observe"):
            for ep in upstream.snapshot.endpoints:
                upstream.record(meshcore.Outcome("svc", ep, "GET", 200, None, random.random() / 100))
        pick(upstream.snapshot, request, ())  # build the table
        samples = []
        for _ in range(ROUNDS):
            snapshot = upstream.snapshot
            t0 = time.perf_counter()
            for _ in range(BATCH):
                pick(snapshot, request, ())
            samples.append((time.perf_counter() - t0) / BATCH * 1e6)
        change = None
        if n == SIZES[-1]:
            # one endpoint replaced: what a discovery update costs the first request after it
            costs = []
            for i in range(5):
                eps = endpoints(n)
                eps[i] = meshcore.Endpoint("10.255.255.255", 9000 + i)
                t0 = time.perf_counter()
                upstream.publish(eps)  # the core's part: new snapshot and stats map
                t1 = time.perf_counter()
                pick(upstream.snapshot, request, ())  # the balancer's part: its table
                t2 = time.perf_counter()
                costs.append(((t1 - t0) * 1e3, (t2 - t1) * 1e3))
            change = tuple(statistics.median(c) for c in zip(*costs))
        return statistics.median(samples), change


async def main(out: list) -> None:
    for label, kind, settings in KINDS:
        row = [label]
        change = None
        for n in SIZES:
            us, c = await measure(kind, settings, n)
            row.append(us)
            change = c if c is not None else change
        row.append(change)
        out.append(row)


def run() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", default="asyncio", choices=("asyncio", "trio"))
    args = parser.parse_args()
    rows: list = []
    anyio.run(main, rows, backend=args.backend)
    print(f"backend {args.backend}; median µs per pick ({ROUNDS} rounds of {BATCH} picks)")
    head = f"{'kind':<28}" + "".join(f"{n:>10,}" for n in SIZES) + f"{'10k/10':>9}   snapshot change at 10k (core publish + balancer rebuild)"
    print(head)
    failed = []
    for label, *us, change in rows:
        ratio = us[-1] / us[0]
        publish, rebuild = change
        print(
            f"{label:<28}" + "".join(f"{u:>10.2f}" for u in us)
            + f"{ratio:>8.2f}x   {publish:.1f} ms + {rebuild:.1f} ms"
        )
        if us[-1] > 5.0:
            failed.append(f"{label}: {us[-1]:.2f} µs at 10,000 > 5 µs")
        if label in FLAT and ratio > 2.0:
            failed.append(f"{label}: {ratio:.2f}x from 10 to 10,000 > 2x")
    print("bar: ≤ 5 µs at 10,000 for every kind; ≤ 2x flat for " + ", ".join(sorted(FLAT)))
    print("FAILED: " + "; ".join(failed) if failed else "all bars met")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(run())
