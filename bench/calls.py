"""Python calls (and CPU) per request through the engine: a load-resistant A/B of two trees.

    python bench/calls.py --base /work/wt-engine-base [--new .] [--requests 200]
    python bench/calls.py --base /work/wt-engine-base --cpu [--rounds 10] [--requests 3000]
    python bench/calls.py --base /work/wt-engine-base --instructions   # needs valgrind

On a machine shared with other work, CPU figures move by tens of percent between runs; the
number of Python calls one request makes does not. In one process per tree and backend, an
`HTTPConnector` sends GETs through an engine proxy (`serve_http` + `HTTPConnector`, as
bench/engine_proxy.py's) to an engine upstream, one at a time; a profile hook counts the
Python and C calls of `--requests` requests after a warm-up. Printed: calls per request
for each tree and the ratio.

`--cpu` times the same loop instead (process CPU time per request, no profile hook), one
process per tree and round, the order alternating, and prints the median, the spread
(max-min over median), the minimum, and the ratios new/base of the medians, of each round's
pair and of the minimums (the round least disturbed by other work, as timeit reports).

`--instructions` counts the machine instructions per request under valgrind's callgrind: the
difference between a run of 500 and one of 100 requests, over 400. It takes minutes, but
other work on the machine does not move it at all.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def count(backend: str, requests: int, cpu: bool = False) -> dict[str, float]:
    import time

    import anyio

    from meshcore._endpoints import Endpoint
    from meshcore._http import HTTPConnector, serve_http
    from meshcore._models import Request, Response

    counts = {"call": 0, "c_call": 0}

    def hook(frame: object, event: str, arg: object) -> None:
        if event in counts:
            counts[event] += 1

    async def upstream_app(request: Request, info: object) -> Response:
        return Response(200, [(b"content-type", b"text/plain")], b"ok")

    async def main() -> None:
        up = await anyio.create_tcp_listener(local_host="127.0.0.1")
        up_ep = Endpoint("127.0.0.1", up.extra(anyio.abc.SocketAttribute.local_port))
        px = await anyio.create_tcp_listener(local_host="127.0.0.1")
        px_port = px.extra(anyio.abc.SocketAttribute.local_port)
        px_ep = Endpoint("127.0.0.1", px_port)
        async with HTTPConnector() as upstream_client, HTTPConnector() as client:

            async def proxy(request: Request, info: object) -> Response:
                return await upstream_client.send(up_ep, request)

            async with anyio.create_task_group() as tg:
                tg.start_soon(serve_http, up, upstream_app)
                tg.start_soon(serve_http, px, proxy)
                url = f"http://127.0.0.1:{px_port}/"
                for _ in range(200):
                    await (await client.send(px_ep, Request("GET", url))).aread()
                if cpu:
                    start = time.process_time()
                else:
                    sys.setprofile(hook)
                for _ in range(requests):
                    await (await client.send(px_ep, Request("GET", url))).aread()
                sys.setprofile(None)
                if cpu:
                    counts["cpu_us"] = (time.process_time() - start) * 1e6  # type: ignore[assignment]
                tg.cancel_scope.cancel()

    if backend == "uvloop":
        anyio.run(main, backend="asyncio", backend_options={"use_uvloop": True})
    else:
        anyio.run(main, backend=backend)
    return {k: v / requests for k, v in counts.items()}


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "one":
        print(json.dumps(count(sys.argv[2], int(sys.argv[3]), sys.argv[4:] == ["cpu"])))
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", type=Path, required=True)
    parser.add_argument("--new", type=Path, default=HERE.parent)
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--backends", default="uvloop,asyncio,trio")
    parser.add_argument("--cpu", action="store_true", help="CPU µs per request instead")
    parser.add_argument("--rounds", type=int, default=10, help="--cpu: rounds per tree")
    parser.add_argument("--instructions", action="store_true", help="callgrind's count")
    args = parser.parse_args()
    if args.cpu:
        cpu_ab(args)
        return
    if args.instructions:
        instructions_ab(args)
        return
    print("calls per request (client -> engine proxy -> engine upstream, one process)")
    for backend in args.backends.split(","):
        row = {}
        for name, tree in (("base", args.base), ("new", args.new)):
            row[name] = run_one(tree, backend, args.requests)
        b, n = row["base"], row["new"]
        print(
            f"{backend:8} base {b['call']:6.1f} Python + {b['c_call']:6.1f} C   "
            f"new {n['call']:6.1f} Python + {n['c_call']:6.1f} C   "
            f"Python calls new/base {n['call'] / b['call']:.3f}"
        )


def run_one(tree: Path, backend: str, requests: int, *extra: str) -> dict[str, float]:
    env = dict(os.environ, PYTHONPATH=str(tree.resolve()))
    out = subprocess.run(
        [sys.executable, __file__, "one", backend, str(requests), *extra],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return json.loads(out)  # type: ignore[no-any-return]


def cpu_ab(args: argparse.Namespace) -> None:
    import statistics

    trees = {"base": args.base, "new": args.new}
    print(
        f"CPU µs per request (client -> engine proxy -> engine upstream, one process), "
        f"{args.requests} sequential requests x {args.rounds} interleaved rounds"
    )
    for backend in args.backends.split(","):
        runs: dict[str, list[float]] = {"base": [], "new": []}
        for rnd in range(args.rounds):
            for name in ("base", "new") if rnd % 2 == 0 else ("new", "base"):
                result = run_one(trees[name], backend, args.requests, "cpu")
                runs[name].append(result["cpu_us"])
        med = {k: statistics.median(v) for k, v in runs.items()}
        spread = {k: (max(v) - min(v)) / med[k] * 100 for k, v in runs.items()}
        paired = statistics.median(n / b for b, n in zip(runs["base"], runs["new"]))
        best = {k: min(v) for k, v in runs.items()}
        print(
            f"{backend:8} base {med['base']:6.1f} µs ±{spread['base']:4.1f}% (min {best['base']:.1f})"
            f"   new {med['new']:6.1f} µs ±{spread['new']:4.1f}% (min {best['new']:.1f})"
            f"   new/base {med['new'] / med['base']:.3f}, paired median {paired:.3f},"
            f" min {best['new'] / best['base']:.3f}",
            flush=True,
        )


def instructions(tree: Path, backend: str, requests: int) -> int:
    env = dict(os.environ, PYTHONPATH=str(tree.resolve()), PYTHONHASHSEED="0")
    cmd = ["valgrind", "--tool=callgrind", "--callgrind-out-file=/dev/null", sys.executable]
    out = subprocess.run(
        [*cmd, __file__, "one", backend, str(requests), "cpu"],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    ).stderr
    return int(out.split("Collected : ")[1].split()[0])


def instructions_ab(args: argparse.Namespace) -> None:
    print("instructions per request (callgrind; client -> engine proxy -> engine upstream)")
    for backend in args.backends.split(","):
        per = {}
        for name, tree in (("base", args.base), ("new", args.new)):
            few, many = (instructions(tree, backend, n) for n in (100, 500))
            per[name] = (many - few) / 400
        print(
            f"{backend:8} base {per['base']:10,.0f}   new {per['new']:10,.0f}   "
            f"new/base {per['new'] / per['base']:.4f}",
            flush=True,
        )


if __name__ == "__main__":
    main()
