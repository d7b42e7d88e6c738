"""Library mode against the plain clients: httpx, aiohttp, `mesh.client()` and `mesh.http()`.

One nginx upstream on loopback; the mesh has static discovery with one endpoint, a balancer
and a pass-through layer (inline plugins, so nothing else is measured). Every client sends the
same GETs, sequential and from 32 tasks, in interleaved rounds: each round runs every client on
asyncio and on trio (aiohttp runs on asyncio only), so load on the machine moves all of them
alike. Prints the median µs per request (wall time) with its spread (min-max), CPU µs per
request of this process (nginx runs in its own), and the ratios:

- native / aiohttp: issue 21's bar, <= 0.7 sequential and at 32 tasks, on asyncio and trio
  (trio is compared to the asyncio aiohttp figure of the same round: aiohttp has no trio);
- mesh.client() / plain httpx: issue 2's bar, <= 1.10.

    python bench/library_overhead.py            # 5 rounds of 2,000 requests per client
    python bench/library_overhead.py --quick    # 3 rounds of 1,000, under a minute
    python bench/library_overhead.py --instructions   # callgrind, a few minutes

`--instructions` counts the machine instructions per sequential request of each client under
valgrind's callgrind (the difference between runs of 400 and 100 requests, over 300), one
process per client and backend: other work on the machine does not move it.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import anyio
import httpx

sys.path.insert(0, str(Path(__file__).parent))
from _nginx import nginx  # noqa: E402

import meshcore  # noqa: E402

try:
    import aiohttp
except ImportError:  # the anchor is optional to run, but then the bar cannot be judged
    aiohttp = None

BAR = 0.7
CONCURRENCY = (1, 32)


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


async def run_requests(get: Callable[[], Awaitable[int]], n: int, concurrency: int) -> tuple[float, float]:
    """(wall seconds, CPU seconds) per request for n GETs from `concurrency` tasks."""
    per_task = n // concurrency

    async def worker() -> None:
        for _ in range(per_task):
            status = await get()
            assert status == 200, status

    cpu0 = time.process_time()
    start = time.perf_counter()
    async with anyio.create_task_group() as tg:
        for _ in range(concurrency):
            tg.start_soon(worker)
    wall = time.perf_counter() - start
    cpu = time.process_time() - cpu0
    done = per_task * concurrency
    return wall / done, cpu / done


def getter_httpx(client: httpx.AsyncClient, url: str) -> Callable[[], Awaitable[int]]:
    async def get() -> int:
        return (await client.get(url)).status_code

    return get


def getter_native(client: meshcore.Client, url: str) -> Callable[[], Awaitable[int]]:
    async def get() -> int:
        response = await client.get(url)
        return response.status_code

    return get


def getter_aiohttp(session: Any, url: str) -> Callable[[], Awaitable[int]]:
    async def get() -> int:
        async with session.get(url) as response:
            await response.read()
            return response.status

    return get


Results = dict[tuple[str, str, int], list[tuple[float, float]]]


async def one_round(port: int, n: int, backend: str, results: Results) -> None:
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
    direct = f"http://127.0.0.1:{port}/"
    limits = httpx.Limits(max_connections=100, max_keepalive_connections=100)
    async with meshcore.Mesh(config, [], extra_plugins=[("bench", BenchPlugins())]) as mesh:
        async with (
            httpx.AsyncClient(limits=limits) as plain,
            mesh.client(limits=limits) as meshed,
            mesh.http() as native,
        ):
            clients = [
                ("httpx", getter_httpx(plain, direct)),
                ("mesh.client()", getter_httpx(meshed, "http://bench/")),
                ("mesh.http()", getter_native(native, "http://bench/")),
            ]
            session = None
            if aiohttp is not None and backend == "asyncio":
                connector = aiohttp.TCPConnector(limit=100)
                session = aiohttp.ClientSession(connector=connector)
                clients.insert(1, ("aiohttp", getter_aiohttp(session, direct)))
            try:
                for concurrency in CONCURRENCY:
                    for _, get in clients:  # warm every pool to this concurrency
                        await run_requests(get, 2 * concurrency, concurrency)
                    for label, get in clients:
                        figures = await run_requests(get, n, concurrency)
                        results.setdefault((label, backend, concurrency), []).append(figures)
            finally:
                if session is not None:
                    await session.close()


async def sequential(port: int, label: str, n: int, backend: str) -> None:
    """`n` sequential GETs with one client after a warm-up: what `--instructions` counts."""
    config = {"services": {"bench": {"discovery": "static", "balancer": "first",
                                     "resilience": ["pass"],
                                     "static": {"endpoints": [f"127.0.0.1:{port}"]}}}}
    direct = f"http://127.0.0.1:{port}/"
    async with meshcore.Mesh(config, [], extra_plugins=[("bench", BenchPlugins())]) as mesh:
        if label == "aiohttp":
            async with aiohttp.ClientSession() as session:
                get = getter_aiohttp(session, direct)
                for _ in range(50 + n):
                    await get()
            return
        async with httpx.AsyncClient() as plain, mesh.client() as meshed, mesh.http() as native:
            get = {
                "httpx": getter_httpx(plain, direct),
                "mesh.client()": getter_httpx(meshed, "http://bench/"),
                "mesh.http()": getter_native(native, "http://bench/"),
            }[label]
            for _ in range(50 + n):
                await get()


def instructions(port: int, label: str, backend: str, n: int) -> int:
    import subprocess

    cmd = ["valgrind", "--tool=callgrind", "--callgrind-out-file=/dev/null", sys.executable,
           __file__, "--one", label, backend, str(n), str(port)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stderr
    return int(out.split("Collected : ")[1].split()[0])


def instructions_table(backends: list[str]) -> None:
    print("instructions per sequential request (callgrind, 400 minus 100 requests, over 300)")
    with nginx(1) as (port,):
        for backend in backends:
            for label in ("aiohttp", "mesh.http()", "mesh.client()", "httpx"):
                if label == "aiohttp" and (backend != "asyncio" or aiohttp is None):
                    continue
                few, many = (instructions(port, label, backend, n) for n in (100, 400))
                print(f"{backend:8} {label:14} {(many - few) / 300 / 1000:8.0f} k", flush=True)


def fmt(samples: list[tuple[float, float]], index: int) -> str:
    values = [s[index] * 1e6 for s in samples]
    return f"{statistics.median(values):7.1f} ({min(values):.0f}-{max(values):.0f})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=2000, help="requests per client per round")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--backends", default="asyncio,trio")
    parser.add_argument("--quick", action="store_true", help="3 rounds of 1,000 requests")
    parser.add_argument("--instructions", action="store_true", help="callgrind's count per request")
    parser.add_argument("--one", nargs=4, help=argparse.SUPPRESS)  # label backend n port
    args = parser.parse_args()
    if args.one:
        label, backend, n, port = args.one
        anyio.run(sequential, int(port), label, int(n), backend, backend=backend)
        return
    if args.instructions:
        instructions_table(args.backends.split(","))
        return
    if args.quick:
        args.requests, args.rounds = 1000, 3
    backends = args.backends.split(",")
    if aiohttp is None:
        print("aiohttp is not installed (pip install aiohttp): no anchor, no bar")
    results: Results = {}
    load_before = os.getloadavg()
    with nginx(1) as (port,):
        for _ in range(args.rounds):
            for backend in backends:
                anyio.run(one_round, port, args.requests, backend, results, backend=backend)
    load_after = os.getloadavg()
    print(f"{args.rounds} interleaved rounds of {args.requests} GETs per client; load average "
          f"{load_before[0]:.2f} before, {load_after[0]:.2f} after")
    print(f"{'backend':8} {'tasks':>5} {'client':14} {'µs/req median (min-max)':>24} "
          f"{'CPU µs/req':>22} {'vs aiohttp':>10}")
    verdicts = []
    for backend in backends:
        for concurrency in CONCURRENCY:
            anchor = results.get(("aiohttp", "asyncio", concurrency))
            anchor_us = statistics.median(s[0] for s in anchor) if anchor else None
            for label in ("httpx", "aiohttp", "mesh.client()", "mesh.http()"):
                samples = results.get((label, backend, concurrency))
                if not samples:
                    continue
                wall = statistics.median(s[0] for s in samples)
                ratio = f"{wall / anchor_us:10.2f}" if anchor_us else f"{'-':>10}"
                print(f"{backend:8} {concurrency:>5} {label:14} {fmt(samples, 0):>24} "
                      f"{fmt(samples, 1):>22} {ratio}")
                if label == "mesh.http()" and anchor_us:
                    # Each round's own ratio, so the spread shows how steady the verdict is.
                    per_round = [
                        s[0] / a[0] for s, a in zip(samples, anchor, strict=False)
                    ]
                    cpu = statistics.median(s[1] for s in samples)
                    anchor_cpu = statistics.median(s[1] for s in anchor)
                    verdicts.append((backend, concurrency, wall / anchor_us, min(per_round),
                                     max(per_round), cpu / anchor_cpu))
    if verdicts:
        print(f"\nbar: mesh.http() <= {BAR}x aiohttp's time per request (trio against asyncio's aiohttp)")
        for backend, concurrency, ratio, low, high, cpu_ratio in verdicts:
            verdict = "holds" if ratio <= BAR else "MISSES"
            print(f"  {backend:8} {concurrency:>2} tasks: {ratio:.2f}x (rounds {low:.2f}-{high:.2f}) "
                  f"{verdict}; CPU per request {cpu_ratio:.2f}x aiohttp's")
    for backend in backends:
        for concurrency in CONCURRENCY:
            mesh = results.get(("mesh.client()", backend, concurrency))
            plain = results.get(("httpx", backend, concurrency))
            if mesh and plain:
                ratio = statistics.median(s[0] for s in mesh) / statistics.median(s[0] for s in plain)
                print(f"  mesh.client() / httpx, {backend} {concurrency} tasks: {ratio:.2f}")


if __name__ == "__main__":
    main()
