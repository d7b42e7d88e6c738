"""Cost of the `otel` plugin per request, at 32 concurrent requests, sampled at 100 % and 1 %.

Judged by: time per request through the mesh client (`mesh.client()`, 32 tasks sharing one
client, GETs to one loopback upstream) with `resilience = ["retry", "otel"]` over the same mesh
with `["retry"]` only, spans exported over OTLP/HTTP to a receiver that takes them (its own
process) with the plugin's batch processor. Also printed: the spans' own µs per request around
a terminal that answers at once (the figure that is stable on a busy machine).

    python plugins/otel/bench/tracing_overhead.py [--batches 30] [--batch 640] [--backends asyncio,trio]

All variants run side by side in one event loop in interleaved batches (the order rotates each
round) and the medians of the batch times are compared, because the machine is shared
(shared/reference/performance-baselines.md: compare only runs made side by side). "control" is
a second mesh without the plugin: its ratio to "none" is the noise floor.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import subprocess
import sys
import time
from typing import Any

import anyio

import meshcore
from meshcore.testing import static_service

CONCURRENCY = 32

_SINK = """
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
class H(BaseHTTPRequestHandler):
    def do_POST(self):
        self.rfile.read(int(self.headers.get("content-length", 0)))
        self.send_response(200); self.send_header("content-length", "0"); self.end_headers()
    def log_message(self, *a): pass
s = ThreadingHTTPServer(("127.0.0.1", 0), H)
print(s.server_address[1], flush=True)
s.serve_forever()
"""

_UPSTREAM = (
    "import sys; from meshcore.testing import UpstreamServer; "
    "s = UpstreamServer('bench', record=False).start(); print(s.port, flush=True); sys.stdin.read()"
)


class _Process:
    """A helper server in a process of its own, so it does not share the client's GIL."""

    def __init__(self, code: str) -> None:
        self.code = code

    def __enter__(self) -> _Process:
        self.proc = subprocess.Popen(
            [sys.executable, "-c", self.code], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            text=True,
        )
        assert self.proc.stdout is not None
        self.port = int(self.proc.stdout.readline())
        return self

    def __exit__(self, *exc: object) -> None:
        self.proc.kill()
        self.proc.wait(5)


def variants(sink_port: int) -> dict[str, tuple[list[str], float]]:
    return {
        "none": (["retry"], 1.0),
        "control": (["retry"], 1.0),
        "otel 100%": (["retry", "otel"], 1.0),
        "otel 1%": (["retry", "otel"], 0.01),
    }


def config(address: str, layers: list[str], ratio: float, sink_port: int) -> dict[str, Any]:
    return {
        "tracing": {"endpoint": f"http://127.0.0.1:{sink_port}/v1/traces", "ratio": ratio,
                    "service_name": "bench"},
        "services": {"svc": static_service([address], resilience=layers)},
    }


async def run_variants(upstream_port: int, sink_port: int, batches: int, batch: int
                       ) -> dict[str, list[float]]:
    """Seconds per request of each batch, per variant, from interleaved batches."""
    address = f"127.0.0.1:{upstream_port}"
    times: dict[str, list[float]] = {}
    async with contextlib.AsyncExitStack() as stack:
        clients = {}
        for name, (layers, ratio) in variants(sink_port).items():
            mesh = await stack.enter_async_context(
                meshcore.Mesh(config(address, layers, ratio, sink_port), ["retry", "otel"])
            )
            clients[name] = await stack.enter_async_context(mesh.client())
            times[name] = []

        async def burst(client: Any, n: int) -> None:
            async def worker() -> None:
                for _ in range(n // CONCURRENCY):
                    response = await client.get("http://svc/")
                    assert response.status_code == 200

            async with anyio.create_task_group() as tg:
                for _ in range(CONCURRENCY):
                    tg.start_soon(worker)

        for client in clients.values():
            await burst(client, 320)  # warm the pools
        names = list(clients)
        for round_ in range(batches):
            shift = round_ % len(names)
            for name in names[shift:] + names[:shift]:
                start = time.perf_counter()
                await burst(clients[name], batch)
                times[name].append((time.perf_counter() - start) / batch)
    return times


async def span_cost(layers: list[str], ratio: float, sink_port: int, n: int) -> float:
    """µs per request in the layers alone, around a terminal that answers at once (spans
    exported to the sink, so the export thread's share of the CPU counts too)."""
    response = meshcore.Response(200, [], b"ok")

    class Instant:
        async def send(self, endpoint: meshcore.Endpoint, request: meshcore.Request) -> meshcore.Response:
            return response

        async def aclose(self) -> None:
            pass

    cfg = config("127.0.0.1:9", layers, ratio, sink_port)
    mesh = meshcore.Mesh(cfg, ["retry", "otel"], connector_factory=lambda *a: Instant())
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
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--batches", type=int, default=30, help="batches per variant")
    parser.add_argument("--batch", type=int, default=640, help="requests per batch")
    parser.add_argument("--backends", default="asyncio,trio")
    args = parser.parse_args()
    with _Process(_UPSTREAM) as upstream, _Process(_SINK) as sink:
        for backend in args.backends.split(","):
            times = anyio.run(run_variants, upstream.port, sink.port, args.batches, args.batch,
                              backend=backend)
            # The baseline pools both meshes without the plugin: in a shared loop the first
            # mesh made was measured slower than its A/A twin in every run.
            base = statistics.median(times["none"] + times["control"])
            print(f"{backend}: {CONCURRENCY} concurrent, {args.batches} batches of {args.batch}; "
                  f"ratios to none+control ({base * 1e6:.1f} µs/req)")
            for name, t in times.items():
                q = statistics.quantiles(t, n=4)
                med = statistics.median(t)
                print(f"  {name:10s} median {med * 1e6:6.1f} µs/req  IQR {q[0] * 1e6:6.1f}-"
                      f"{q[2] * 1e6:6.1f}  ratio {med / base:.3f}  (+{(med - base) * 1e6:5.1f} µs)")
            cost = {
                name: min(anyio.run(span_cost, layers, ratio, sink.port, 20000, backend=backend)
                          for _ in range(3))
                for name, (layers, ratio) in variants(sink.port).items() if name != "control"
            }
            print(f"  spans alone, µs/req added: 100% {cost['otel 100%'] - cost['none']:.1f}, "
                  f"1% {cost['otel 1%'] - cost['none']:.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
