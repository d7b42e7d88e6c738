"""The embedded registry under slow clients: threads, memory and answer latency.

    python plugins/consul/bench/slow_clients.py [--slow 300] [--watchers 100] [--requests 200]

Starts the registry in a child process (so its threads and RSS are its own), then from this
process opens `--watchers` parked blocking queries and `--slow` connections that send half a
request head and stop (a slowloris). While they are held it measures:

- the registry's thread count and RSS (from /proc/<pid>/status);
- the latency of `--requests` ordinary reads (`GET /v1/health/service/api`) on fresh
  connections, and their answers (200, or 429 when over the per-address cap);
- how many slow connections the registry has closed after `--hold` seconds (a bounded
  server times them out or refuses them; an unbounded one keeps them all), and the reads
  again after that.

All clients come from 127.0.0.1, so they share one per-address cap (Consul's default 200):
`--max-conns-per-client 1000` shows the latency with every connection admitted.
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import time

CHILD = """
import sys, time
from meshcore_consul import Registry
kwargs = {"max_conns_per_client": int(sys.argv[1])} if sys.argv[1] != "default" else {}
try:
    reg = Registry(port=0, open_access=True, **kwargs)
except TypeError:  # before the registry had a token by default
    reg = Registry(port=0, **kwargs)
reg.start()
reg.catalog.register({"Name": "api", "ID": "api-1", "Address": "127.0.0.1", "Port": 8080})
print(reg.port, flush=True)
sys.stdin.read()
reg.stop()
"""


def proc_status(pid: int) -> dict[str, str]:
    with open(f"/proc/{pid}/status") as f:
        return dict(line.rstrip("\n").split(":\t", 1) for line in f if ":\t" in line)


def request(port: int, path: str, timeout: float = 10.0) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(f"GET {path} HTTP/1.1\r\nHost: reg\r\nConnection: close\r\n\r\n".encode())
        chunks = []
        while chunk := s.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


def closed(sock: socket.socket) -> bool:
    """Whether the registry closed it (after answering it, or not)."""
    sock.setblocking(False)
    try:
        while sock.recv(65536):
            pass
        return True
    except BlockingIOError:
        return False
    except OSError:
        return True


def reads(port: int, n: int) -> tuple[list[float], dict[str, int]]:
    latencies, outcomes = [], {}
    for _ in range(n):
        start = time.perf_counter()
        try:
            answer = request(port, "/v1/health/service/api")
            outcome = answer.split(b"\r\n", 1)[0].decode()
        except OSError as exc:
            outcome = type(exc).__name__
        if outcome.startswith("HTTP/1.1 200"):
            latencies.append((time.perf_counter() - start) * 1000)
        outcomes[outcome] = outcomes.get(outcome, 0) + 1
    return sorted(latencies), outcomes


def show(label: str, latencies: list[float], outcomes: dict[str, int]) -> None:
    if latencies:
        p99 = latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))]
        print(f"{label}: median {statistics.median(latencies):.2f} ms, p99 {p99:.2f} ms, "
              f"max {latencies[-1]:.2f} ms; answers {outcomes}")
    else:
        print(f"{label}: no 200 answer; answers {outcomes}")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--slow", type=int, default=300)
    parser.add_argument("--watchers", type=int, default=100)
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--hold", type=float, default=15.0, help="seconds to hold the slow clients")
    parser.add_argument("--max-conns-per-client", default="default",
                        help="the registry's cap per client address (default: its own default)")
    args = parser.parse_args()

    child = subprocess.Popen([sys.executable, "-c", CHILD, args.max_conns_per_client], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                             text=True)
    try:
        port = int(child.stdout.readline())
        idle = proc_status(child.pid)
        index = request(port, "/v1/health/service/api").split(b"X-Consul-Index: ")[1].split(b"\r\n")[0].decode()
        watchers = []
        for _ in range(args.watchers):
            s = socket.create_connection(("127.0.0.1", port))
            s.sendall(f"GET /v1/health/service/api?index={index}&wait=5m HTTP/1.1\r\nHost: reg\r\n\r\n".encode())
            watchers.append(s)
        slow = []
        refused = 0
        for _ in range(args.slow):
            try:
                s = socket.create_connection(("127.0.0.1", port), timeout=5)
                s.sendall(b"PUT /v1/agent/service/register HTTP/1.1\r\nHost: reg\r\n")
                slow.append(s)
            except OSError:
                refused += 1
        time.sleep(1.0)
        loaded = proc_status(child.pid)
        under_load = reads(port, args.requests)
        time.sleep(max(0.0, args.hold - 1.0))
        after = proc_status(child.pid)
        dropped = sum(closed(s) for s in slow)
        after_hold = reads(port, args.requests)
        print(f"registry pid {child.pid} (max_conns_per_client {args.max_conns_per_client}), "
              f"{args.watchers} parked blocking queries, {args.slow} slow clients ({refused} refused at connect)")
        print(f"threads: idle {idle['Threads']}, loaded {loaded['Threads']}, after {args.hold:g} s {after['Threads']}")
        print(f"RSS: idle {idle['VmRSS'].strip()}, loaded {loaded['VmRSS'].strip()}, after {after['VmRSS'].strip()}")
        show("reads while the slow clients are held", *under_load)
        print(f"slow clients closed by the registry after {args.hold:g} s: {dropped}/{len(slow)}")
        show(f"reads after {args.hold:g} s", *after_hold)
        for s in slow + watchers:
            s.close()
    finally:
        child.stdin.close()
        child.wait(timeout=10)


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
