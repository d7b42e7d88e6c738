"""How fast a registry change reaches the mesh's endpoint snapshot, and blocking-query fan-out.

    python plugins/consul/bench/propagation.py [--backend trio] [--changes 200] [--watchers 200]

Prints the deregistration -> snapshot latency (median, p99, max) through the `consul`
discovery kind against the embedded registry on loopback (the bar is 100 ms), and how long one
change takes to answer N parked blocking queries.
"""

from __future__ import annotations

import argparse
import socket
import statistics
import threading
import time

import anyio
from meshcore_consul import Registry

import meshcore


class RoundRobin:
    @meshcore.hookimpl
    def meshcore_kinds(self):
        return [meshcore.Kind("bench-rr", "balancer", {})]

    @meshcore.hookimpl
    def meshcore_balancer(self, kind, settings, upstream):
        if kind != "bench-rr":
            return None

        class B:
            def pick(self, snapshot, request, exclude):
                return snapshot.endpoints[0]

        return B()


class Watch:
    def __init__(self) -> None:
        self.event: anyio.Event | None = None
        self.ports: set[int] = set()

    @meshcore.hookimpl
    def meshcore_endpoints_changed(self, service, snapshot):
        self.ports = {ep.port for ep in snapshot.endpoints}
        if self.event is not None:
            self.event.set()

    async def until(self, predicate) -> None:
        with anyio.fail_after(5):
            while not predicate(self.ports):
                self.event = anyio.Event()
                await self.event.wait()


async def propagation(changes: int) -> list[float]:
    watch = Watch()
    with Registry(port=0) as registry:
        for port in (9001, 9002, 9003):
            registry.catalog.register({"Name": "api", "ID": f"api-{port}", "Port": port,
                                       "Address": "127.0.0.1"})
        config = {"services": {"api": {"discovery": "consul", "balancer": "bench-rr",
                                       "consul": {"address": registry.url}}}}
        async with meshcore.Mesh(config, ["consul"], extra_plugins=[("rr", RoundRobin()), ("w", watch)]):
            await watch.until(lambda p: len(p) == 3)
            samples = []
            for _ in range(changes):
                # Changes 100 ms apart: a quiet service, so the churn limit (20/s, burst 2)
                # does not delay them; back-to-back changes are paced by it on purpose.
                await anyio.sleep(0.1)
                start = time.perf_counter()
                await anyio.to_thread.run_sync(registry.catalog.deregister, "api-9002")
                await watch.until(lambda p: 9002 not in p)
                samples.append(time.perf_counter() - start)
                await anyio.to_thread.run_sync(lambda: registry.catalog.register(
                    {"Name": "api", "ID": "api-9002", "Port": 9002, "Address": "127.0.0.1"}))
                await watch.until(lambda p: 9002 in p)
            return samples


def fan_out(watchers: int) -> float:
    """Raw sockets on the client side, so the figure is the registry's, not a client pool's."""
    with Registry(port=0) as registry:
        registry.catalog.register({"Name": "api", "ID": "a", "Port": 1})
        index = registry.catalog.index_for("api")
        request = (f"GET /v1/health/service/api?index={index}&wait=20s HTTP/1.1\r\n"
                   f"Host: {registry.address}\r\nConnection: close\r\n\r\n").encode()
        done: list[float] = []
        sockets = []
        for _ in range(watchers):
            sock = socket.create_connection((registry.host, registry.port))
            sock.sendall(request)
            sockets.append(sock)

        def read(sock: socket.socket) -> None:
            while sock.recv(65536):
                pass
            done.append(time.perf_counter())
            sock.close()

        threads = [threading.Thread(target=read, args=(s,)) for s in sockets]
        for t in threads:
            t.start()
        time.sleep(0.5)  # every query parked in the registry
        start = time.perf_counter()
        registry.catalog.deregister("a")
        for t in threads:
            t.join()
        assert len(done) == watchers
        return max(done) - start


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--backend", default="asyncio", choices=("asyncio", "trio"))
    parser.add_argument("--changes", type=int, default=100)
    parser.add_argument("--watchers", type=int, default=200)
    args = parser.parse_args()
    samples = sorted(anyio.run(propagation, args.changes, backend=args.backend))
    p99 = samples[min(len(samples) - 1, int(len(samples) * 0.99))]
    slowest = ", ".join(f"{s * 1000:.1f}" for s in samples[-5:])
    print(f"deregistration -> snapshot ({args.backend}, {len(samples)} changes): "
          f"median {statistics.median(samples) * 1000:.1f} ms, p99 {p99 * 1000:.1f} ms, "
          f"max {samples[-1] * 1000:.1f} ms (bar: 100 ms); slowest five: {slowest} ms")
    print(f"one change answers {args.watchers} parked blocking queries in "
          f"{fan_out(args.watchers) * 1000:.0f} ms")


if __name__ == "__main__":
    main()
