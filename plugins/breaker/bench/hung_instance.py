"""How many requests reach a hung instance before it is ejected, and what they cost.

Three instances of one service behind round robin with the recommended layers and their
defaults (`["timeout", "retry", "breaker"]`: 15 s deadline, 3 attempts, 5 consecutive failures
eject); one instance accepts connections and never answers. `--workers` clients send GETs in a
closed loop for `--seconds`. Reported per setting of `retry.per_try_timeout`: requests that
reached the hung instance before its ejection, when it was ejected, client errors, and the
slowest request.

    python plugins/breaker/bench/hung_instance.py [--workers 20] [--seconds 20]

Real sockets on loopback; the two healthy instances are `meshcore.testing.UpstreamServer`s.
"""

from __future__ import annotations

import argparse
import socket
import threading
import time
from typing import Any

import anyio

import meshcore
from meshcore.testing import UpstreamServer, static_service


class HungServer:
    """Accepts connections, reads nothing, answers nothing, counts what connected."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.address = f"127.0.0.1:{self.sock.getsockname()[1]}"
        self.accepted: list[float] = []
        self.held: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.accepted.append(time.monotonic())
            self.held.append(conn)

    def close(self) -> None:
        self.sock.close()
        for conn in self.held:
            conn.close()


async def run(per_try: str | None, workers: int, seconds: float) -> dict[str, Any]:
    good = [UpstreamServer(f"good{i}").start() for i in range(2)]
    hung = HungServer()
    retry = {} if per_try is None else {"per_try_timeout": per_try}
    service = static_service(
        [good[0], hung.address, good[1]], balancer="round-robin",
        resilience=["timeout", "retry", "breaker"], retry=retry,
    )
    mesh = meshcore.Mesh({"services": {"orders": service}}, ["retry", "breaker", "round-robin"])
    errors = 0
    slowest = 0.0
    ejected_at: float | None = None
    start = time.monotonic()
    async with mesh:
        upstream = mesh.upstream("orders")
        hung_ep = next(ep for ep in upstream.snapshot.endpoints if ep.id == hung.address) \
            if upstream.snapshot.endpoints else None

        async def worker() -> None:
            nonlocal errors, slowest, ejected_at
            while time.monotonic() - start < seconds:
                began = time.monotonic()
                try:
                    response = await mesh.send(meshcore.Request("GET", "http://orders/"))
                    await response.aread()
                except meshcore.MeshError:
                    errors += 1
                slowest = max(slowest, time.monotonic() - began)

        async def watch() -> None:
            nonlocal ejected_at, hung_ep
            while ejected_at is None and time.monotonic() - start < seconds:
                if hung_ep is None and upstream.snapshot.endpoints:
                    hung_ep = next(e for e in upstream.snapshot.endpoints if e.id == hung.address)
                if hung_ep is not None and upstream.is_ejected(hung_ep):
                    ejected_at = time.monotonic()
                await anyio.sleep(0.01)

        async with anyio.create_task_group() as tg:
            tg.start_soon(watch)
            for _ in range(workers):
                tg.start_soon(worker)
    for server in good:
        server.stop()
    hung.close()
    before = [t for t in hung.accepted if ejected_at is None or t <= ejected_at]
    return {
        "per_try_timeout": per_try or "unset (deadline / attempts = 5 s)",
        "reached_hung_before_ejection": len(before),
        "reached_hung_total": len(hung.accepted),
        "ejected_after_s": None if ejected_at is None else round(ejected_at - start, 2),
        "client_errors": errors,
        "slowest_request_s": round(slowest, 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=20)
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--backend", default="asyncio", choices=("asyncio", "trio"))
    args = parser.parse_args()
    # "1h": no per-try timeout in effect, the 15 s deadline alone bounds an attempt (the
    # behaviour before the default); None: the default.
    for per_try in (None, "1h"):
        result = anyio.run(run, per_try, args.workers, args.seconds, backend=args.backend)
        print(result)


if __name__ == "__main__":
    main()
