"""What mTLS costs: per-request overhead of authorize/check_peer, a renewal, a handshake, and
requests per second through the mesh over mTLS vs plain TCP (keep-alive, loopback).

    /work/venv/bin/python plugins/tls/bench/tls_costs.py [--seconds 3] [--backend asyncio]

Numbers are from one core of the machine it runs on; the server is a small anyio HTTP/1.1
server on the same event loop, so the throughput figures include both ends.
"""

from __future__ import annotations

import argparse
import ssl
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
                reason = mesh.plugins.authorize(meshcore.Request(method, f"http://x{target}"), peer)
                assert reason is None, reason
            await stream.send(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
    except (anyio.EndOfStream, anyio.BrokenResourceError, ssl.SSLError, OSError):
        pass


async def throughput(ca: Path, tls: bool, seconds: float, workers: int = 16) -> float:
    section = {"tls": {"ca_dir": str(ca), "service": "orders"}} if tls else {}
    async with meshcore.Mesh({**section}, ["tls"]) as server_mesh:
        listener = await anyio.create_tcp_listener(local_host="127.0.0.1", local_port=0)
        port = listener.extra(anyio.abc.SocketAttribute.local_port)
        client_section = {"tls": {"ca_dir": str(ca), "service": "web"}} if tls else {}
        config = {**client_section, "services": {"orders": static_service([f"127.0.0.1:{port}"])}}
        async with listener, anyio.create_task_group() as tg:
            tg.start_soon(listener.serve, lambda s: serve(server_mesh, tls, s))
            async with meshcore.Mesh(config, ["tls"]) as mesh, mesh.client() as client:
                count = 0
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
            tg.cancel_scope.cancel()
    return count / seconds


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


async def main(seconds: float) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        ca = Path(tmp) / "ca"
        meshcore_tls.CA.create("example.org").save(ca)
        for k, v in micro(ca).items():
            print(f"{k:>32}: {v:.2f}")
        print(f"{'new mTLS connection (ms)':>32}: {await handshakes(ca) * 1e3:.2f}")
        plain = await throughput(ca, False, seconds)
        mtls = await throughput(ca, True, seconds)
        print(f"{'plain keep-alive req/s':>32}: {plain:.0f}")
        print(f"{'mTLS keep-alive req/s':>32}: {mtls:.0f} ({mtls / plain * 100:.0f}% of plain)")


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("--seconds", type=float, default=3.0)
    p.add_argument("--backend", default="asyncio", choices=["asyncio", "trio"])
    args = p.parse_args()
    anyio.run(main, args.seconds, backend=args.backend)
