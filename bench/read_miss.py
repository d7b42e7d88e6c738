"""What a missed speculative read costs the engine on asyncio/uvloop (bench/workers.py's counts).

The engine yields to the loop once, then reads before it waits ("others first: the answer is
then often there"). One busy worker nearly always finds the bytes there; two less busy
workers miss about one read per request (docs/data-path.md, "Workers"). This loop reads a
socketpair through the engine's own waits (`_loop._LoopSockets`) four ways, the peer's byte
sent before the read (hit) or on the loop's next pass (miss), and prints CPU µs per read:

- hit: yield, read (the bytes are there);
- miss: yield, read fails (EAGAIN), wait, read;
- wait: yield, wait, read (no speculative read);
- wait alone: wait, read (no yield: what `SendBatch`'s contract does not allow).

    python bench/read_miss.py [--reads 50000] [--rounds 3] [--backend uvloop|asyncio]
"""

from __future__ import annotations

import argparse
import asyncio
import socket
import time

from meshcore._http._loop import _LoopSockets, _yield_to_loop


async def main(reads: int, rounds: int) -> None:
    loop = asyncio.get_running_loop()
    a, b = socket.socketpair()
    a.setblocking(False)
    b.setblocking(False)
    io = _LoopSockets(loop)(a)

    async def hit() -> None:
        for _ in range(reads):
            b.send(b"x")
            await _yield_to_loop()
            a.recv(4096)

    async def miss() -> None:
        for _ in range(reads):
            await _yield_to_loop()
            loop.call_soon(b.send, b"x")
            try:
                a.recv(4096)
            except BlockingIOError:
                await io.wait_readable(60.0)
                a.recv(4096)

    async def wait() -> None:
        for _ in range(reads):
            await _yield_to_loop()
            loop.call_soon(b.send, b"x")
            await io.wait_readable(60.0)
            a.recv(4096)

    async def wait_alone() -> None:
        for _ in range(reads):
            loop.call_soon(b.send, b"x")
            await io.wait_readable(60.0)
            a.recv(4096)

    cases = {"hit": hit, "miss": miss, "wait": wait, "wait alone": wait_alone}
    results: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(rounds):
        for name, case in cases.items():
            began = time.process_time()
            await case()
            results[name].append((time.process_time() - began) / reads * 1e6)
    for name, values in results.items():
        print(f"{name:12} {min(values):5.2f} µs per read (min of {rounds}; max {max(values):.2f})")
    await io.aclose()  # releases the loop's registration, then closes `a`
    b.close()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reads", type=int, default=50000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--backend", default="uvloop", choices=["uvloop", "asyncio"])
    args = parser.parse_args()
    if args.backend == "uvloop":
        import uvloop

        uvloop.run(main(args.reads, args.rounds))
    else:
        asyncio.run(main(args.reads, args.rounds))
