"""What mTLS costs: per-request overhead of authorize/check_peer, a renewal, a handshake, and
requests per second through the mesh over mTLS vs plain TCP (keep-alive, loopback).

    python plugins/tls/bench/tls_costs.py [--quick] [--rounds 5] [--seconds 3] [--backend asyncio]

Numbers are from one core of the machine it runs on; the server is a small anyio HTTP/1.1
server on the same event loop, so the throughput figures include both ends. Plain and mTLS
runs alternate in interleaved rounds (the order flips each round), and each reports requests
per second and CPU seconds per request (process time: less moved by other load than wall
clock); the summary gives medians, spread (min-max) and the mTLS/plain ratios.
"""

from __future__ import annotations

import argparse
import ssl
import statistics
import tempfile
import time
from pathlib import Path

import anyio
import meshcore
from anyio.streams.tls import TLSAttribute, TLSStream
from meshcore.testing import static_service

import meshcore_tls


async def serve(mesh: meshcore.Mesh, tls: bool, stream) -> None:
    if tls:
        stream = await TLSStream.wrap(
            stream,
            server_side=True,
            ssl_context=mesh.plugins.server_tls(mesh),
            standard_compatible=False,
        )
    peer = stream.extra(TLSAttribute.ssl_object, None)
    buf = b""
    try:
        while True:
            while b"\r\n\r\n" not in buf:
                buf += await stream.receive()
            head, _, buf = buf.partition(b"\r\n\r\n")
            method, target, _ = head.split(b"\r\n", 1)[0].decode().split(" ", 2)
            if tls:
                reason = mesh.plugins.authorize(
                    meshcore.Request(method, f"http://x{target}"), peer, mesh
                )
                assert reason is None, reason
            await stream.send(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
    except (anyio.EndOfStream, anyio.BrokenResourceError, ssl.SSLError, OSError):
        pass


async def throughput(ca: Path, tls: bool, seconds: float, workers: int = 16) -> tuple[float, float]:
    """(requests per second, CPU seconds per request) for `seconds` of keep-alive load."""
    section = {"tls": {"ca_dir": str(ca), "service": "orders"}} if tls else {}
    async with meshcore.Mesh({**section}, ["tls"]) as server_mesh:
        listener = await anyio.create_tcp_listener(local_host="127.0.0.1", local_port=0)
        port = listener.extra(anyio.abc.SocketAttribute.local_port)
        client_section = {"tls": {"ca_dir": str(ca), "service": "web"}} if tls else {}
        config = {**client_section, "services": {"orders": static_service([f"127.0.0.1:{port}"])}}
        async with listener, anyio.create_task_group() as tg:
            tg.start_soon(listener.serve, lambda s: serve(server_mesh, tls, s))
            async with meshcore.Mesh(config, ["tls"]) as mesh, mesh.client() as client:
                assert (await client.get("http://orders/orders/0")).status_code == 200  # warm
                count = 0
                cpu = time.process_time()
                stop = time.perf_counter() + seconds

                async def worker() -> None:
                    nonlocal count
                    while time.perf_counter() < stop:
                        r = await client.get("http://orders/orders/1")
                        assert r.status_code == 200
                        count += 1

                async with anyio.create_task_group() as load:
                    for _ in range(workers):
                        load.start_soon(worker)
                cpu = time.process_time() - cpu
            tg.cancel_scope.cancel()
    return count / seconds, cpu / count


async def handshakes(ca: Path, n: int = 200) -> float:
    async with meshcore.Mesh({"tls": {"ca_dir": str(ca), "service": "orders"}}, ["tls"]) as mesh:
        listener = await anyio.create_tcp_listener(local_host="127.0.0.1", local_port=0)
        port = listener.extra(anyio.abc.SocketAttribute.local_port)
        ctx = mesh.plugins.client_tls("orders", mesh)
        async with listener, anyio.create_task_group() as tg:
            tg.start_soon(listener.serve, lambda s: serve(mesh, True, s))
            t = time.perf_counter()
            for _ in range(n):
                s = await anyio.connect_tcp(
                    "127.0.0.1", port, ssl_context=ctx, tls_standard_compatible=False
                )
                meshcore_tls.meshcore_check_peer(
                    "orders",
                    meshcore.Endpoint.parse(f"127.0.0.1:{port}"),
                    s.extra(TLSAttribute.ssl_object),
                    mesh,
                )
                await s.aclose()
            elapsed = (time.perf_counter() - t) / n
            tg.cancel_scope.cancel()
    return elapsed


def micro(ca: Path) -> dict[str, float]:
    root = meshcore_tls.CA.load(ca, need_key=True)
    policy = meshcore_tls.parse_rules(
        [
            {
                "identities": ["spiffe://example.org/ns/default/sa/web"],
                "methods": ["GET"],
                "paths": ["/orders"],
            },
            {"identities": ["spiffe://example.org/ns/ops/*"]},
        ]
    )
    n = 100_000
    t = time.perf_counter()
    for _ in range(n):
        policy.check("spiffe://example.org/ns/default/sa/web", "GET", "/orders/1")
    check = (time.perf_counter() - t) / n
    t = time.perf_counter()
    for _ in range(n):
        policy.check("spiffe://example.org/ns/default/sa/intruder", "GET", "/orders/1")
    deny = (time.perf_counter() - t) / n
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    from meshcore_tls._runtime import _load_chain

    m = 200
    t = time.perf_counter()
    for _ in range(m):
        issued = root.issue("web")
        _load_chain(ctx, issued.cert_pem, issued.key_pem)
    renew = (time.perf_counter() - t) / m
    return {
        "policy allow (µs)": check * 1e6,
        "policy deny, 2 rules (µs)": deny * 1e6,
        "renewal: key+sign+load (ms)": renew * 1e3,
    }


def _summary(name: str, values: list[float], unit: str, scale: float) -> str:
    scaled = [v * scale for v in values]
    return (
        f"{name:>32}: median {statistics.median(scaled):.1f} {unit} "
        f"(spread {min(scaled):.1f}-{max(scaled):.1f}, {len(scaled)} rounds)"
    )


async def main(seconds: float, rounds: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        ca = Path(tmp) / "ca"
        meshcore_tls.CA.create("example.org").save(ca)
        for k, v in micro(ca).items():
            print(f"{k:>32}: {v:.2f}")
        print(f"{'new mTLS connection (ms)':>32}: {await handshakes(ca) * 1e3:.2f}")
        runs: dict[bool, list[tuple[float, float]]] = {False: [], True: []}
        for i in range(rounds):
            for tls in (False, True) if i % 2 == 0 else (True, False):
                runs[tls].append(await throughput(ca, tls, seconds))
        plain_rps, plain_cpu = zip(*runs[False])
        mtls_rps, mtls_cpu = zip(*runs[True])
        print(_summary("plain keep-alive req/s", list(plain_rps), "", 1))
        print(_summary("mTLS keep-alive req/s", list(mtls_rps), "", 1))
        print(_summary("plain CPU per request", list(plain_cpu), "µs", 1e6))
        print(_summary("mTLS CPU per request", list(mtls_cpu), "µs", 1e6))
        rps_ratio = statistics.median(mtls_rps) / statistics.median(plain_rps)
        cpu_ratio = statistics.median(mtls_cpu) / statistics.median(plain_cpu)
        # Paired per round, so a busier round moves both sides.
        paired = [m / p for (p, _), (m, _) in zip(runs[False], runs[True])]
        print(f"{'mTLS / plain req/s':>32}: {rps_ratio:.2f} (per round {min(paired):.2f}-{max(paired):.2f})")
        print(f"{'mTLS / plain CPU per request':>32}: {cpu_ratio:.2f}")


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("--seconds", type=float, default=3.0)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--quick", action="store_true", help="3 rounds of 1 s (well under 2 minutes)")
    p.add_argument("--backend", default="asyncio", choices=["asyncio", "trio"])
    args = p.parse_args()
    if args.quick:
        args.seconds, args.rounds = 1.0, 3
    anyio.run(main, args.seconds, args.rounds, backend=args.backend)
