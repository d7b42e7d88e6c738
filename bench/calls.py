"""Python calls per request through the engine: a load-independent A/B of two trees.

    python bench/calls.py --base /work/wt-engine-base [--new .] [--requests 200]

On a machine shared with other work, CPU figures move by tens of percent between runs; the
number of Python calls one request makes does not. In one process per tree and backend, an
`HTTPConnector` sends GETs through an engine proxy (`serve_http` + `HTTPConnector`, as
bench/engine_proxy.py's) to an engine upstream, one at a time; a profile hook counts the
Python and C calls of `--requests` requests after a warm-up. Printed: calls per request
for each tree and the ratio.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def count(backend: str, requests: int) -> dict[str, float]:
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
                sys.setprofile(hook)
                for _ in range(requests):
                    await (await client.send(px_ep, Request("GET", url))).aread()
                sys.setprofile(None)
                tg.cancel_scope.cancel()

    if backend == "uvloop":
        anyio.run(main, backend="asyncio", backend_options={"use_uvloop": True})
    else:
        anyio.run(main, backend=backend)
    return {k: v / requests for k, v in counts.items()}


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "one":
        print(json.dumps(count(sys.argv[2], int(sys.argv[3]))))
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", type=Path, required=True)
    parser.add_argument("--new", type=Path, default=HERE.parent)
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--backends", default="uvloop,asyncio,trio")
    args = parser.parse_args()
    print("calls per request (client -> engine proxy -> engine upstream, one process)")
    for backend in args.backends.split(","):
        row = {}
        for name, tree in (("base", args.base), ("new", args.new)):
            env = dict(os.environ, PYTHONPATH=str(tree.resolve()))
            out = subprocess.run(
                [sys.executable, __file__, "one", backend, str(args.requests)],
                env=env,
                capture_output=True,
                text=True,
                check=True,
            ).stdout
            row[name] = json.loads(out)
        b, n = row["base"], row["new"]
        print(
            f"{backend:8} base {b['call']:6.1f} Python + {b['c_call']:6.1f} C   "
            f"new {n['call']:6.1f} Python + {n['c_call']:6.1f} C   "
            f"Python calls new/base {n['call'] / b['call']:.3f}"
        )


if __name__ == "__main__":
    main()
