"""Success-path overhead of the resilience layers.

Judged by: ratio of time per request through the mesh client (httpx.AsyncClient from
`mesh.client()`, sequential GETs to one loopback upstream) with `retry` + `breaker` over
without layers. Target: ratio ≤ 1.05 (issue 5). The recommended stack with the `timeout`
deadline in front is measured alongside (its cancel scope is the most expensive part).

Also printed, for context: the layers' own cost in µs per request around a no-I/O terminal
(what a ratio hides when the request path is slow, and the figure that is stable on a busy
machine).

    /work/venv/bin/python bench/resilience_overhead.py [--batches 40] [--batch 250]

Both variants run side by side in one event loop, in alternating batches, and the medians of
the batch times are compared, because the machine is shared (the upstream runs in its own
process; shared/reference/performance-baselines.md: compare only runs made side by side).
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time

import anyio

import meshcore
from meshcore.testing import static_service

JUDGED = ["retry", "breaker"]  # what issue 5 judges
FULL = ["timeout", "retry", "breaker"]  # the recommended stack, reported alongside


class _ServerProcess:
    """The upstream in a process of its own, so it does not share the client's GIL (a thread
    would make every µs the client spends also delay the server, and add noise)."""

    def __enter__(self) -> _ServerProcess:
        code = (
            "import sys, time; from meshcore.testing import UpstreamServer; "
            "s = UpstreamServer('bench').start(); print(s.port, flush=True); "
            "sys.stdin.read()"
        )
        self.proc = subprocess.Popen(
            [sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
        )
        self.port = int(self.proc.stdout.readline())
        self.address = f"127.0.0.1:{self.port}"
        return self

    def __exit__(self, *exc: object) -> None:
        self.proc.stdin.close()
        self.proc.wait(5)


async def client_variants(
    server: _ServerProcess, variants: dict[str, list[str]], batches: int, batch: int
) -> dict[str, float]:
    """Median seconds per request of each variant (a layer list), from interleaved batches.

    All meshes run side by side in one event loop and batches rotate through them (the order
    shifts every round), so load from anything else on the machine hits each the same way.
    """
    import contextlib

    times: dict[str, list[float]] = {name: [] for name in variants}
    async with contextlib.AsyncExitStack() as stack:
        clients = {}
        for name, layers in variants.items():
            config = {"services": {"svc": static_service([server.address], resilience=layers)}}
            mesh = await stack.enter_async_context(meshcore.Mesh(config, ["retry", "breaker"]))
            clients[name] = await stack.enter_async_context(mesh.client())
        for client in clients.values():
            for _ in range(300):  # warm the pools and caches
                await client.get("http://svc/")
        names = list(variants)
        for round_ in range(batches):
            shift = round_ % len(names)
            for name in names[shift:] + names[:shift]:
                client = clients[name]
                start = time.perf_counter()
                for _ in range(batch):
                    response = await client.get("http://svc/")
                    assert response.status_code == 200
                times[name].append((time.perf_counter() - start) / batch)
    return {name: statistics.median(t) for name, t in times.items()}


async def layer_cost(layers: list[str], n: int) -> float:
    """µs per request spent in the layers alone, around a terminal that answers at once."""
    config = {"services": {"svc": static_service(["127.0.0.1:9"], resilience=layers)}}
    response = meshcore.Response(200, [], b"ok")

    class Instant:
        async def send(self, endpoint: meshcore.Endpoint, request: meshcore.Request) -> meshcore.Response:
            return response

        async def aclose(self) -> None:
            pass

    mesh = meshcore.Mesh(config, ["retry", "breaker"], connector_factory=lambda *a: Instant())
    async with mesh:
        await mesh.upstream("svc").wait_ready(5)
        request = meshcore.Request("GET", "http://svc/")
        for _ in range(1000):
            await mesh.send(request.copy())
        start = time.perf_counter()
        for _ in range(n):
            await mesh.send(request.copy())
        return (time.perf_counter() - start) / n * 1e6


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, default=40, help="batches per variant")
    parser.add_argument("--batch", type=int, default=250, help="requests per batch")
    parser.add_argument("--backends", default="asyncio,trio")
    args = parser.parse_args()
    worst = 0.0
    # "control" is a second mesh without layers: its ratio to "none" is the noise floor.
    variants = {"none": [], "control": [], "judged": JUDGED, "full": FULL}
    with _ServerProcess() as server:
        for backend in args.backends.split(","):
            t = anyio.run(
                client_variants, server, variants, args.batches, args.batch, backend=backend
            )
            ratio, full_ratio = t["judged"] / t["none"], t["full"] / t["none"]
            worst = max(worst, ratio)
            cost = {
                name: min(anyio.run(layer_cost, layers, 20000, backend=backend) for _ in range(3))
                for name, layers in variants.items()
                if name != "control"
            }
            print(
                f"{backend:8s} client µs/req: none {t['none'] * 1e6:6.1f}, control (A/A, noise "
                f"floor) ratio {t['control'] / t['none']:.3f}, "
                f"{'+'.join(JUDGED)} {t['judged'] * 1e6:6.1f} (ratio {ratio:.3f}), "
                f"{'+'.join(FULL)} {t['full'] * 1e6:6.1f} (ratio {full_ratio:.3f})"
            )
            print(
                f"{'':8s} layers alone, µs/req added: {'+'.join(JUDGED)} "
                f"{cost['judged'] - cost['none']:4.1f}, {'+'.join(FULL)} "
                f"{cost['full'] - cost['none']:4.1f}"
            )
    print(f"worst {'+'.join(JUDGED)} ratio {worst:.3f} (target ≤ 1.05): "
          f"{'OK' if worst <= 1.05 else 'OVER'}")
    return 0 if worst <= 1.05 else 1


if __name__ == "__main__":
    sys.exit(main())
