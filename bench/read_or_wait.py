"""What a read costs the engine when the bytes are there, when it waits first, and when it fails.

    python bench/read_or_wait.py [--backend uvloop|asyncio] [--reps 7] [--n 30000]

On a socketpair, with the engine's own wait (`_loop._LoopWaiter`, its registration kept) and
checkpoint (a bare yield to the loop), best of `--reps` runs of `--n` each, µs per read:

- checkpoint, then a `recv` that finds the bytes (the engine's usual read after a send);
- a wait for readiness, then the `recv` (HAProxy's way: read only what the poller reported);
- checkpoint, a `recv` that fails with EAGAIN, a wait, then the `recv` (the usual read when
  the bytes come late).

With a miss rate p, reading first costs about first + (third - first) * p and waiting first
the second: docs/data-path.md, "Fifth pass: system calls per request".
"""

from __future__ import annotations

import argparse
import asyncio
import socket
import time

from meshcore._http._loop import _LoopWaiter, _yield_to_loop


async def measure(n: int, reps: int) -> dict[str, float]:
    loop = asyncio.get_running_loop()
    a, b = socket.socketpair()
    a.setblocking(False)
    b.setblocking(False)
    waiter = _LoopWaiter(loop, loop.add_reader, loop.remove_reader, a, persistent=True)
    best: dict[str, float] = {}
    try:
        for _ in range(reps):
            t = time.perf_counter()
            for _ in range(n):
                b.send(b"x")
                await _yield_to_loop()
                a.recv(100)
            found = (time.perf_counter() - t) / n
            t = time.perf_counter()
            for _ in range(n):
                b.send(b"x")
                await waiter.wait(60.0)
                a.recv(100)
            waited = (time.perf_counter() - t) / n
            t = time.perf_counter()
            for _ in range(n):
                await _yield_to_loop()
                try:
                    a.recv(100)
                except BlockingIOError:
                    pass
                b.send(b"x")
                await waiter.wait(60.0)
                a.recv(100)
            missed = (time.perf_counter() - t) / n
            for key, value in (("checkpoint, read", found), ("wait, read", waited),
                               ("checkpoint, failed read, wait, read", missed)):
                best[key] = min(best.get(key, value), value)
    finally:
        waiter.release()
        a.close()
        b.close()
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", default="uvloop", choices=["uvloop", "asyncio"])
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--n", type=int, default=30000)
    args = parser.parse_args()
    if args.backend == "uvloop":
        import uvloop

        best = uvloop.run(measure(args.n, args.reps))
    else:
        best = asyncio.run(measure(args.n, args.reps))
    for key, value in best.items():
        print(f"{args.backend}: {key:40} {value * 1e6:6.2f} µs")


if __name__ == "__main__":
    main()
