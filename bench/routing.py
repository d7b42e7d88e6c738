"""Route selection cost at 10 and 100 routes per service, and a routed request vs an unrouted one.

    python bench/routing.py [--requests 2000] [--reps 3] [--backend asyncio|trio]

Selection: `Router.send`'s work before the backend's pipeline, i.e. `RouteTable.match` plus
the weighted pick, for requests that hit an exact path, a deep prefix with a header match, a
regex (the slowest bucket: every regex before it is tried), and no route at all. Routes are a
mix of exact paths, prefixes (a third with a header match) and 10% regexes. The bar (issue 23):
≤ 2 µs per selection at 10 and 100 routes (best batch). End to end: sequential `mesh.send` of a GET
to a loopback upstream through a 90/10 split of two subsets vs the same service with no
routes, interleaved reps; prints the best rep's CPU µs per request (the whole process's, the
upstream's thread included: wall time on a shared machine measures the neighbours) and the
difference. Exits 1 when a bar is missed.
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any

import anyio

import meshcore
from meshcore.testing import UpstreamServer

BAR_US = 2.0
BATCH, ROUNDS = 2_000, 31


def routes(n: int) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for i in range(n):
        split = {"backendRefs": [{"subset": "v1", "weight": 90}, {"subset": "v2", "weight": 10}]}
        if i % 10 == 9:
            match = {"path": {"type": "RegularExpression", "value": f"/re{i}/[0-9]+"}}
        elif i % 3 == 0:
            match = {"path": {"type": "Exact", "value": f"/exact/{i}"}}
        elif i % 3 == 1:
            match = {"path": {"type": "PathPrefix", "value": f"/api/{i}"},
                     "headers": [{"name": "x-tester", "value": str(i)}]}
        else:
            match = {"path": {"type": "PathPrefix", "value": f"/api/{i}"}}
        out.append({"matches": [match], **split})
    return out


def config(address: str, n: int) -> dict[str, Any]:
    service: dict[str, Any] = {
        "discovery": "static",
        "balancer": "first",
        "static": {"endpoints": [
            {"address": address, "metadata": {"version": "v1"}},
            {"address": address, "metadata": {"version": "v2"}, "id": "second"},
        ]},
        "subsets": {"v1": {"metadata": {"version": "v1"}}, "v2": {"metadata": {"version": "v2"}}},
    }
    if n < 0:  # every request through one 90/10 split
        service["routes"] = [{"backendRefs": [{"subset": "v1", "weight": 90}, {"subset": "v2", "weight": 10}]}]
    elif n:
        service["routes"] = routes(n)
    return {"services": {"svc": service}}


class First:
    @meshcore.hookimpl
    def meshcore_kinds(self) -> list[meshcore.Kind]:
        return [meshcore.Kind("first", "balancer")]

    @meshcore.hookimpl
    def meshcore_balancer(self, kind: str, settings: Any, upstream: Any) -> Any:
        class Pick:
            def pick(self, snapshot: Any, request: Any, exclude: Any) -> Any:
                return snapshot.endpoints[0]

        return Pick() if kind == "first" else None


def requests(n: int) -> dict[str, meshcore.Request]:
    last_regex = max(i for i in range(n) if i % 10 == 9)
    return {
        "exact": meshcore.Request("GET", f"http://svc/exact/{(n // 2) // 3 * 3}"),
        "prefix+header": meshcore.Request("GET", "http://svc/api/4/items/7?x=1", [("x-tester", "4"), ("accept", "*/*")]),
        "last regex": meshcore.Request("GET", f"http://svc/re{last_regex}/12"),
        "no route": meshcore.Request("GET", "http://svc/nothing/here"),
    }


def select_us(mesh: meshcore.Mesh, request: meshcore.Request) -> float:
    table = mesh.routers["svc"].table
    match = table.match
    assert match(request) is not None or request.url.target.startswith("/nothing")
    samples = []
    for _ in range(ROUNDS):
        start = time.perf_counter()
        for _ in range(BATCH):
            found = match(request)
            if found is not None:
                found.route.pick()
        samples.append((time.perf_counter() - start) / BATCH * 1e6)
    # The best batch, as timeit advises: on a shared 2-core machine the slower batches measure
    # the neighbours, not the code.
    return min(samples)


async def main(args: argparse.Namespace) -> int:
    server = UpstreamServer("bench", record=False).start()
    ok = True
    try:
        print("route selection (µs of match + weighted pick, best of 31 batches of 2,000)")
        for n in (10, 100):
            async with meshcore.Mesh(config(server.address, n), extra_plugins=[("first", First())]) as mesh:
                for name, request in requests(n).items():
                    us = select_us(mesh, request)
                    ok &= us <= BAR_US
                    print(f"  {n:>4} routes  {name:<14} {us:6.2f} µs  {'ok' if us <= BAR_US else 'MISSED (bar 2 µs)'}")
        print(f"end to end, sequential mesh.send, {args.requests} requests x {args.reps} reps")
        results: dict[str, list[float]] = {"unrouted": [], "routed (90/10 split)": []}
        async with meshcore.Mesh(config(server.address, 0), extra_plugins=[("first", First())]) as plain, \
                meshcore.Mesh(config(server.address, -1), extra_plugins=[("first", First())]) as routed:
            for _ in range(args.reps):
                for label, mesh in (("unrouted", plain), ("routed (90/10 split)", routed)):
                    up = mesh.route(meshcore.Request("GET", "http://svc/api/0"))
                    assert up is not None
                    start = time.process_time()
                    for _ in range(args.requests):
                        response = await up.send(meshcore.Request("GET", "http://svc/api/0/x"))
                        await response.aread()
                    results[label].append((time.process_time() - start) / args.requests * 1e6)
        base = min(results["unrouted"])
        for label, samples in results.items():
            us = min(samples)
            print(f"  {label:<22} {us:7.1f} µs CPU/request  ({us - base:+.1f} µs)")
    finally:
        server.stop()
    return 0 if ok else 1


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--backend", default="asyncio", choices=["asyncio", "trio"])
    args = parser.parse_args()
    sys.exit(anyio.run(main, args, backend=args.backend))
