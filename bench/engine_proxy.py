"""A bare reverse proxy built only from meshcore's HTTP engine, against HAProxy.

    python bench/engine_proxy.py [--duration 10] [--reps 1] [--backends asyncio,uvloop,trio]
    python bench/engine_proxy.py client [--requests 20000]   # HTTPConnector vs httpx

Both proxies sit in front of the same three nginx upstreams (one nginx, three ports) and are
loaded by wrk with 32 connections. The engine proxy is `serve_http` + `HTTPConnector` with
round robin and hop-by-hop header filtering, nothing else (no mesh features). Printed per
path: requests/s, the ratio to HAProxy (nbthread 1) and the proxy's CPU µs per request, read
from /proc (user + system time of the proxy process over the run).

The `client` mode times sequential and 32-task GETs to nginx through `HTTPConnector` and
through a plain `httpx.AsyncClient`, on each backend.

Compare only figures from one run: load generator, upstreams and proxy share the machine.
"""

from __future__ import annotations

import argparse
import itertools
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _nginx import nginx, nginx_binary  # noqa: E402

from meshcore.testing import free_port, wait_listening  # noqa: E402

HAPROXY = "/usr/sbin/haproxy"
WRK = "/usr/bin/wrk"
HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
    }
)


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def start_haproxy(tmp: Path, port: int, upstreams: list[int]) -> subprocess.Popen[bytes]:
    servers = "\n".join(f"    server u{i} 127.0.0.1:{p}" for i, p in enumerate(upstreams))
    conf = tmp / "haproxy.cfg"
    conf.write_text(
        "global\n    nbthread 1\n    maxconn 4096\n"
        "defaults\n    mode http\n    timeout connect 5s\n    timeout client 60s\n"
        "    timeout server 60s\n    http-reuse always\n"
        f"frontend fe\n    bind 127.0.0.1:{port}\n    default_backend be\n"
        f"backend be\n    balance roundrobin\n{servers}\n"
    )
    proc = subprocess.Popen([HAPROXY, "-f", str(conf)], stderr=subprocess.DEVNULL)
    wait_listening(port)
    return proc


def run_wrk(port: int, duration: int, connections: int = 32) -> tuple[float, int, str]:
    out = subprocess.run(
        [
            WRK,
            "-t1",
            f"-c{connections}",
            f"-d{duration}s",
            "--latency",
            f"http://127.0.0.1:{port}/",
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    total = int(re.search(r"(\d+) requests in", out).group(1))  # type: ignore[union-attr]
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)|Socket errors: (.*)", out)
    return rps, total, errors.group(0) if errors else ""


def measure(pid: int, port: int, duration: int) -> tuple[float, float, str]:
    run_wrk(port, 1)  # warm up: pools filled, code paths hot
    before = cpu_seconds(pid)
    rps, total, errors = run_wrk(port, duration)
    cpu = cpu_seconds(pid) - before
    return rps, cpu / total * 1e6, errors


# the proxy itself --------------------------------------------------------------------------


def serve_proxy(backend: str, port: int, upstreams: list[int]) -> None:
    import anyio

    from meshcore._endpoints import Endpoint
    from meshcore._http import HTTPConnector, serve_http
    from meshcore._models import Headers, Request, Response

    endpoints = itertools.cycle([Endpoint("127.0.0.1", p) for p in upstreams])
    new_headers = Headers.__new__

    def strip(headers: Headers) -> Headers:
        out = new_headers(Headers)
        append = out.append
        for h in headers:  # a loop, not a generator: no frame per header
            if h[0].lower() not in HOP_BY_HOP:
                append(h)
        return out

    async def main() -> None:
        async with HTTPConnector() as connector:

            async def handler(request: Request, conn: object) -> Response:
                # As the sidecar does: the request and the response go on with new headers.
                request.headers = strip(request.headers)
                response = await connector.send(next(endpoints), request)
                response.headers = strip(response.headers)
                return response

            listener = await anyio.create_tcp_listener(local_host="127.0.0.1", local_port=port)
            await serve_http(listener, handler)

    if backend == "uvloop":
        anyio.run(main, backend="asyncio", backend_options={"use_uvloop": True})
    else:
        anyio.run(main, backend=backend)


def bench_proxies(args: argparse.Namespace) -> None:
    for binary in (nginx_binary(), HAPROXY, WRK):
        if not binary or not shutil.which(binary):
            sys.exit(f"{binary or 'nginx'} is needed for this benchmark")
    tmp = Path(tempfile.mkdtemp(prefix="engine-bench-"))
    procs: list[subprocess.Popen[bytes]] = []
    try:
        with nginx(3) as upstreams:
            hport = free_port()
            haproxy = start_haproxy(tmp, hport, upstreams)
            procs.append(haproxy)
            results: dict[str, list[tuple[float, float, str]]] = {}
            proxies: dict[str, tuple[int, int]] = {"HAProxy (nbthread 1)": (haproxy.pid, hport)}
            for backend in args.backends.split(","):
                port = free_port()
                proc = subprocess.Popen(
                    [sys.executable, __file__, "serve", backend, str(port), *map(str, upstreams)]
                )
                procs.append(proc)
                wait_listening(port)
                proxies[f"engine ({backend})"] = (proc.pid, port)
            direct = run_wrk(upstreams[0], args.duration)
            for _ in range(args.reps):  # interleaved reps
                for name, (pid, port) in proxies.items():
                    results.setdefault(name, []).append(measure(pid, port, args.duration))
    finally:
        for proc in reversed(procs):
            proc.terminate()
            proc.wait(10)
        shutil.rmtree(tmp, ignore_errors=True)

    def median(values: list[float]) -> float:
        return sorted(values)[len(values) // 2]

    base = median([r[0] for r in results["HAProxy (nbthread 1)"]])
    print(
        f"\nwrk -t1 -c32 -d{args.duration}s, {args.reps} rep(s), medians; "
        f"nginx direct {direct[0]:,.0f} req/s"
    )
    print(f"{'path':24} {'req/s':>10} {'vs HAProxy':>11} {'CPU µs/req':>11}  errors")
    for name, runs in results.items():
        rps = median([r[0] for r in runs])
        cpu = median([r[1] for r in runs])
        errors = "; ".join(r[2] for r in runs if r[2]) or "0"
        print(f"{name:24} {rps:10,.0f} {rps / base:10.2f}x {cpu:11.1f}  {errors}")


# client microbenchmark ---------------------------------------------------------------------


def bench_client_one(backend: str, port: int, requests: int) -> None:
    import anyio
    import httpx

    from meshcore._endpoints import Endpoint
    from meshcore._http import HTTPConnector
    from meshcore._models import Request

    url = f"http://127.0.0.1:{port}/"
    endpoint = Endpoint("127.0.0.1", port)

    async def timed(send, tasks: int) -> float:  # type: ignore[no-untyped-def]
        async def worker(n: int) -> None:
            for _ in range(n):
                await send()

        await worker(500)
        start = time.perf_counter()
        async with anyio.create_task_group() as tg:
            for _ in range(tasks):
                tg.start_soon(worker, requests // tasks)
        return (time.perf_counter() - start) / requests * 1e6

    async def main() -> None:
        async with HTTPConnector() as connector:

            async def engine() -> None:
                response = await connector.send(endpoint, Request("GET", url))
                await response.aread()

            async with httpx.AsyncClient(limits=httpx.Limits(max_connections=100)) as client:

                async def plain() -> None:
                    await client.get(url)

                for tasks in (1, 32):
                    e = await timed(engine, tasks)
                    h = await timed(plain, tasks)
                    label = "sequential" if tasks == 1 else "32 tasks"
                    print(
                        f"{backend:8} {label:11} HTTPConnector {e:7.1f} µs/req   "
                        f"httpx {h:7.1f} µs/req   ratio {e / h:.2f}",
                        flush=True,
                    )

    if backend == "uvloop":
        anyio.run(main, backend="asyncio", backend_options={"use_uvloop": True})
    else:
        anyio.run(main, backend=backend)


def bench_client(args: argparse.Namespace) -> None:
    with nginx(1) as (port,):
        for backend in args.backends.split(","):
            subprocess.run(
                [sys.executable, __file__, "client-one", backend, str(port), str(args.requests)],
                check=True,
            )


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "serve":
        serve_proxy(sys.argv[2], int(sys.argv[3]), [int(p) for p in sys.argv[4:]])
        return
    if len(sys.argv) > 1 and sys.argv[1] == "client-one":
        bench_client_one(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("mode", nargs="?", default="proxy", choices=["proxy", "client"])
    parser.add_argument("--duration", type=int, default=10)
    parser.add_argument("--reps", type=int, default=1)
    parser.add_argument("--requests", type=int, default=20000)
    parser.add_argument("--backends", default="asyncio,uvloop,trio")
    args = parser.parse_args()
    if args.mode == "client":
        bench_client(args)
    else:
        bench_proxies(args)


if __name__ == "__main__":
    main()
