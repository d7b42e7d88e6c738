"""The tail under a fixed arrival rate (open loop), sidecars beside nginx and HAProxy.

A closed-loop generator (wrk) sends the next request only when an answer came back, so a
proxy that stalls for 100 ms is simply sent less and its stall hides in a few samples
(coordinated omission). Here requests are due at a fixed rate whatever happens, and each
one's latency runs from when it was *due* (as wrk2 measures), so a stall shows as every
request that fell due during it.

The generator (wrk2 is not packaged for Debian) is `--processes` Python processes, each
with its share of the rate and `--connections` keep-alive connections; a due request goes
out on a free connection or waits for one, and that wait counts. Its own floor shows in the
"direct to nginx" row, measured in the same run. Rows, in interleaved rounds (the order
rotating each round): nginx direct, HAProxy same work (bench/sidecar.py), one sidecar with
round-robin + retry + breaker, and two sidecars chained over mutual TLS (tls plugin). Printed
per row: the median over rounds of p50, p99, p99.9 and max, the achieved rate, errors and
requests never sent; then the bars of issue 21 (one sidecar p99 ≤ 10 ms, the mTLS pair
≤ 20 ms at 5,000 req/s).

    python bench/open_loop.py [--quick] [--rate 5000] [--duration 10] [--rounds 3]
                              [--pin auto|none|CORE]

Proxies are not pinned by default here (`--pin` pins them as bench/sidecar.py does).
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import selectors
import socket
import statistics
import sys
import time
from collections import deque
from pathlib import Path

import httptools

sys.path.insert(0, str(Path(__file__).resolve().parent))

import sidecar  # noqa: E402


class _Conn:
    """One keep-alive client connection and the parse of its current response."""

    __slots__ = ("done", "due", "parser", "sock")

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port))
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock.setblocking(False)
        self.parser = httptools.HttpResponseParser(self)
        self.due = 0.0
        self.done = False

    def on_message_complete(self) -> None:
        self.done = True


def generate(port: int, host: str, rate: float, offset: float, start: float, warmup: float,
             duration: float, connections: int, out: mp.Queue) -> None:
    """Send GETs due every 1/rate s from `start` + `offset` for `duration` s; put the
    latencies from each due time (s) after the first `warmup` s, the errors and the requests
    never sent on `out`."""
    request = f"GET / HTTP/1.1\r\nHost: {host}\r\n\r\n".encode()
    conns = [_Conn(port) for _ in range(connections)]
    free = deque(conns)
    sel = selectors.DefaultSelector()
    for c in conns:
        sel.register(c.sock, selectors.EVENT_READ, c)
    interval = 1.0 / rate
    next_due = start + offset
    measured = start + warmup  # the connections' first requests (the proxy accepting them,
    # opening its own upstream connections) are not the steady state: not recorded
    end = start + duration
    queue: deque[float] = deque()
    latencies: list[float] = []
    errors = 0
    busy = 0
    while True:
        now = time.monotonic()
        while next_due <= now and next_due < end:
            queue.append(next_due)
            next_due += interval
        while queue and free:
            c = free.popleft()
            c.due = queue.popleft()
            c.done = False
            try:
                c.sock.send(request)  # small: the socket takes it whole
                busy += 1
            except OSError:
                errors += 1
                c.sock.close()
        if now >= end + 5 or (next_due >= end and not queue and not busy):
            break
        timeout = max(0.0, min(next_due, end) - now) if next_due < end else 0.05
        for key, _ in sel.select(timeout):
            c = key.data
            try:
                data = c.sock.recv(65536)
                if not data:
                    raise ConnectionError("closed")
                c.parser.feed_data(data)
            except (OSError, httptools.HttpParserError):
                errors += 1
                busy -= 1
                sel.unregister(c.sock)
                continue
            if c.done:
                if c.due >= measured:
                    latencies.append(time.monotonic() - c.due)
                busy -= 1
                free.append(c)
    for c in conns:
        c.sock.close()
    out.put((latencies, errors, len(queue) + int(max(0.0, end - next_due) / interval)))


def open_loop(port: int, host: str, args: argparse.Namespace) -> dict:
    ctx = mp.get_context("fork")
    out: mp.Queue = ctx.Queue()
    start = time.monotonic() + 0.3
    per = args.rate / args.processes
    procs = [
        ctx.Process(target=generate, args=(port, host, per, i / args.rate, start, args.warmup,
                                           args.warmup + args.duration, args.connections, out))
        for i in range(args.processes)
    ]
    for p in procs:
        p.start()
    latencies: list[float] = []
    errors = unsent = 0
    for _ in procs:
        lat, err, never = out.get(timeout=args.warmup + args.duration + 60)
        latencies += lat
        errors += err
        unsent += never
    for p in procs:
        p.join()
    latencies.sort()
    n = len(latencies)

    def pct(q: float) -> float:
        return latencies[min(n - 1, int(q * n))] * 1e3 if n else float("nan")

    return {"p50": pct(0.5), "p99": pct(0.99), "p999": pct(0.999),
            "max": latencies[-1] * 1e3 if n else float("nan"), "rate": n / args.duration,
            "errors": errors, "unsent": unsent, "load": os.getloadavg()[0]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rate", type=float, default=5000, help="requests per second")
    parser.add_argument("--duration", type=float, default=10)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--warmup", type=float, default=1.0,
                        help="seconds at the rate before recording, every run")
    parser.add_argument("--processes", type=int, default=2, help="generator processes")
    parser.add_argument("--connections", type=int, default=32,
                        help="connections per generator process")
    parser.add_argument("--backend", default="uvloop", choices=["trio", "asyncio", "uvloop"])
    parser.add_argument("--pin", default="none", help="core for every proxy (taskset -c)")
    parser.add_argument("--quick", action="store_true", help="2 rounds of 1 + 4 s (under 2 minutes)")
    args = parser.parse_args()
    if args.quick:
        args.rounds, args.duration = 2, 4
    bench = sidecar.Bench(args)
    try:
        bench.nginx()
        apps = [f"127.0.0.1:{p}" for p in bench.app_ports]
        _, hport = bench.haproxy(same_work=True)
        _, one = bench.sidecar("one", apps)
        ca = bench.ca()
        _, tb = bench.sidecar("tb", apps, app=bench.app_ports[0], tls=ca, service="bench")
        _, ta = bench.sidecar("ta", [f"127.0.0.1:{tb['inbound']}"], tls=ca, service="client")
        rows = [
            ("direct to nginx", bench.app_ports[0], "x"),
            ("HAProxy same work", hport, "x"),
            ("1 sidecar (rr+retry+breaker)", one["outbound"], "bench"),
            ("2 sidecars, mTLS", ta["outbound"], "bench"),
        ]
        runs: dict[str, list[dict]] = {label: [] for label, _, _ in rows}
        for rnd in range(args.rounds):
            shift = rnd % len(rows)
            for label, port, host in rows[shift:] + rows[:shift]:
                r = open_loop(port, host, args)
                runs[label].append(r)
                print(f"round {rnd + 1}  {label:30} p50 {r['p50']:7.2f}  p99 {r['p99']:7.2f}  "
                      f"p99.9 {r['p999']:7.2f}  max {r['max']:7.1f} ms  {r['rate']:6.0f} req/s  "
                      f"errors {r['errors']}  unsent {r['unsent']}  load {r['load']:.1f}",
                      flush=True)
    finally:
        bench.close()
    loads = [r["load"] for rs in runs.values() for r in rs]
    print(f"\nopen loop at {args.rate:g} req/s, {args.processes} generator processes x "
          f"{args.connections} connections, {args.duration:g} s x {args.rounds} interleaved rounds, "
          f"sidecar backend {args.backend}, load average {min(loads):.1f}-{max(loads):.1f}; "
          "latency from each request's due time, ms, median over rounds (range of p99)")
    print(f"{'path':30} {'p50':>7} {'p99':>7} {'p99 range':>15} {'p99.9':>8} {'max':>8} "
          f"{'req/s':>7} {'errors':>6} {'unsent':>6}")
    for label, rs in runs.items():
        p99 = [r["p99"] for r in rs]
        print(f"{label:30} {statistics.median(r['p50'] for r in rs):7.2f} "
              f"{statistics.median(p99):7.2f} {min(p99):7.2f}-{max(p99):7.2f} "
              f"{statistics.median(r['p999'] for r in rs):8.2f} "
              f"{statistics.median(r['max'] for r in rs):8.1f} "
              f"{statistics.median(r['rate'] for r in rs):7.0f} {sum(r['errors'] for r in rs):6d} "
              f"{sum(r['unsent'] for r in rs):6d}")
    one_p99 = statistics.median(r["p99"] for r in runs["1 sidecar (rr+retry+breaker)"])
    pair_p99 = statistics.median(r["p99"] for r in runs["2 sidecars, mTLS"])
    print(f"bars (issue 21): 1 sidecar p99 {one_p99:.2f} ms ≤ 10: {'met' if one_p99 <= 10 else 'NOT met'}; "
          f"2 mTLS sidecars p99 {pair_p99:.2f} ms ≤ 20: {'met' if pair_p99 <= 20 else 'NOT met'}")


if __name__ == "__main__":
    main()
