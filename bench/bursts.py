"""Connection bursts, connection-per-request clients and idle connections: sidecar vs HAProxy.

Issue 21's bars, each measured beside HAProxy 2.6 (`nbthread 1`) in the same run, in
interleaved rounds (the order alternates each round), median and spread printed:

(a) burst: while wrk keeps the proxy busy (`--load` connections), 1,000 new connections open
    at once, each sends one request; the time until every one got its first response byte.
    Bar: ≤ 0.5 s for the sidecar.
(b) connection per request: `wrk -H 'Connection: close'`, requests/s and the proxy's CPU µs
    per request (utime+stime from /proc). Bars: ≥ 0.3x HAProxy's req/s, ≤ 5x its CPU.
(c) idle: `--idle` keep-alive connections, each after one request, left open; the proxy's RSS
    growth divided by their number. Bar: ≤ 6 KiB per connection.

The sidecar is a real `meshcore run` process with round-robin, retry and breaker over one
nginx (three server blocks), as in bench/sidecar.py.

    python bench/bursts.py [--rounds 3] [--backend uvloop] [--quick]

Needs /usr/bin/wrk, nginx, /usr/sbin/haproxy. `--quick` finishes in about a minute.
"""

from __future__ import annotations

import argparse
import os
import resource
import selectors
import signal
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import sidecar  # noqa: E402
from sidecar import MESHCORE, cpu_seconds, free_port  # noqa: E402

PAGE = os.sysconf("SC_PAGE_SIZE")


def rss_bytes(pid: int) -> int:
    return int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * PAGE


def get(port: int, host: str = "bench", timeout: float = 2.0) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(f"GET / HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode())
        chunks = []
        while chunk := s.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


def wait_ok(port: int, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if get(port).startswith(b"HTTP/1.1 200"):
                return
        except OSError:
            pass
        time.sleep(0.05)
    raise RuntimeError(f"port {port} not answering 200")


def wrk(port: int, connections: int, duration: float, *extra: str) -> dict:
    cmd = ["wrk", "-t1", f"-c{connections}", f"-d{max(1, round(duration))}s", "-H", "Host: bench", *extra,
           f"http://127.0.0.1:{port}/"]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    requests = int(out.split(" requests in ")[0].split()[-1])
    rps = float(out.split("Requests/sec:")[1].split()[0])
    errors = 0
    if "Non-2xx" in out:
        errors += int(out.split("Non-2xx or 3xx responses:")[1].split()[0])
    return {"requests": requests, "rps": rps, "errors": errors}


def burst(port: int, count: int) -> tuple[float, int]:
    """Open `count` connections at once, one request each; seconds until the last one's first
    response byte, and how many got one (the rest failed or timed out after 10 s)."""
    request = b"GET / HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n"
    sel = selectors.DefaultSelector()
    start = time.monotonic()
    socks = []
    for _ in range(count):
        s = socket.socket()
        s.setblocking(False)
        try:
            s.connect(("127.0.0.1", port))
        except BlockingIOError:
            pass
        socks.append(s)
        sel.register(s, selectors.EVENT_WRITE)
    answered = 0
    last = start
    pending = count
    deadline = start + 10
    while pending and time.monotonic() < deadline:
        for key, events in sel.select(0.5):
            s = key.fileobj
            if events & selectors.EVENT_WRITE:
                try:
                    s.send(request)
                except OSError:
                    sel.unregister(s)
                    pending -= 1
                    continue
                sel.modify(s, selectors.EVENT_READ)
            else:
                try:
                    data = s.recv(4096)
                except OSError:
                    data = b""
                sel.unregister(s)
                pending -= 1
                if data:
                    answered += 1
                    last = time.monotonic()
    for s in socks:
        s.close()
    sel.close()
    return last - start, answered


def idle_per_connection(port: int, pid: int, count: int) -> float:
    """RSS growth of `pid` per idle keep-alive connection (each made one request first)."""
    request = b"GET / HTTP/1.1\r\nHost: bench\r\n\r\n"
    socks = []
    time.sleep(0.3)
    before = rss_bytes(pid)
    try:
        for i in range(count):
            s = socket.create_connection(("127.0.0.1", port))
            s.sendall(request)
            socks.append(s)
            if len(socks) % 200 == 0 or i == count - 1:  # read the answers in batches
                for t in socks[-200:]:
                    t.settimeout(10)
                    t.recv(4096)
        time.sleep(0.5)
        after = rss_bytes(pid)
    finally:
        for s in socks:
            s.close()
    return (after - before) / count


class Bench(sidecar.Bench):
    """bench/sidecar.py's processes (spawn, close), with this bench's nginx, HAProxy and sidecar."""

    def nginx(self) -> None:
        servers = "\n".join(
            f"server {{ listen 127.0.0.1:{p}; access_log off; location / {{ return 200 'ok'; }} }}"
            for p in self.app_ports
        )
        conf = self.tmp / "nginx.conf"
        conf.write_text(
            f"worker_processes 1; daemon off; pid {self.tmp}/nginx.pid; error_log {self.tmp}/nginx.err;\n"
            "events { worker_connections 8192; }\n"
            f"http {{ keepalive_requests 100000; client_body_temp_path {self.tmp}; {servers} }}\n"
        )
        self.spawn(["/usr/sbin/nginx", "-p", str(self.tmp), "-c", str(conf)])
        for p in self.app_ports:
            wait_ok(p)

    def haproxy(self) -> tuple[int, int]:
        port = free_port()
        backends = "\n".join(f"  server s{i} 127.0.0.1:{p}" for i, p in enumerate(self.app_ports))
        conf = self.tmp / "haproxy.cfg"
        conf.write_text(
            "global\n  nbthread 1\n  maxconn 8000\n"
            "defaults\n  mode http\n  maxconn 8000\n  timeout connect 5s\n  timeout client 60s\n"
            "  timeout server 60s\n  option http-keep-alive\n"
            f"frontend f\n  bind 127.0.0.1:{port}\n  default_backend b\n"
            f"backend b\n  balance roundrobin\n{backends}\n"
        )
        proc = self.spawn(["/usr/sbin/haproxy", "-f", str(conf)])
        wait_ok(port)
        return proc.pid, port

    def sidecar(self) -> tuple[int, int]:
        ports = {k: free_port() for k in ("outbound", "inbound", "admin")}
        eps = ", ".join(f'"127.0.0.1:{p}"' for p in self.app_ports)
        text = (
            '[mesh]\nplugins = ["round-robin", "retry", "breaker"]\n'
            '[defaults]\nbalancer = "round-robin"\nresilience = ["retry", "breaker"]\n'
            "[sidecar]\n"
            + "".join(f'{k} = "127.0.0.1:{v}"\n' for k, v in ports.items())
            + f"max_connections = {self.args.max_connections}\n"
            + (f"max_pending_connections = {self.args.max_pending}\n" if self.args.max_pending else "")
            + f'[services.bench]\ndiscovery = "static"\n[services.bench.static]\nendpoints = [{eps}]\n'
        )
        conf = self.tmp / "sidecar.toml"
        conf.write_text(text)
        proc = self.spawn([MESHCORE, "-c", str(conf), "run", "--backend", self.args.backend,
                           "--log-level", "warning"])
        wait_ok(ports["outbound"])
        return proc.pid, ports["outbound"]

    def stop(self, pid: int) -> None:
        proc = next(p for p in self.procs if p.pid == pid)
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
        self.procs.remove(proc)

    def measure(self, pid: int, port: int) -> dict:
        args = self.args
        load = subprocess.Popen(
            ["wrk", "-t1", f"-c{args.load}", f"-d{args.burst_window:g}s", "-H", "Host: bench",
             f"http://127.0.0.1:{port}/"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        time.sleep(1.0)  # the load is running
        burst_s, answered = burst(port, args.burst)
        load.wait()
        wrk(port, args.load, 1, "-H", "Connection: close")  # warm-up
        before = cpu_seconds(pid)
        close = wrk(port, args.load, args.duration, "-H", "Connection: close")
        used = cpu_seconds(pid) - before
        return {
            "burst_s": burst_s, "answered": answered, "rps": close["rps"],
            "cpu_us": used / max(close["requests"], 1) * 1e6, "errors": close["errors"],
        }

    def idle(self, name: str) -> float:
        """KiB per idle connection, on a fresh process (one that served more connections
        before would reuse memory it freed, and look cheaper)."""
        pid, port = self.haproxy() if name == "haproxy" else self.sidecar()
        try:
            return idle_per_connection(port, pid, self.args.idle) / 1024
        finally:
            self.stop(pid)


def spread(values: list[float]) -> str:
    return f"{statistics.median(values):.3g} [{min(values):.3g}-{max(values):.3g}]"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--duration", type=float, default=5, help="connection-per-request run, s")
    parser.add_argument("--load", type=int, default=32, help="wrk connections of the steady load")
    parser.add_argument("--burst", type=int, default=1000)
    parser.add_argument("--idle", type=int, default=5000)
    parser.add_argument("--max-connections", type=int, default=8000,
                        help="the sidecar's max_connections (HAProxy gets maxconn 8000)")
    parser.add_argument("--max-pending", type=int, default=0,
                        help="the sidecar's max_pending_connections (default: its own default)")
    parser.add_argument("--backend", default="uvloop", choices=["trio", "asyncio", "uvloop"])
    parser.add_argument("--quick", action="store_true", help="2 rounds, shorter runs")
    args = parser.parse_args()
    if args.quick:
        args.rounds, args.duration, args.idle = 2, 3, 2000
    args.burst_window = 4.0
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    bench = Bench(args)
    runs: dict[str, list[dict]] = {"haproxy": [], "meshcore": []}
    try:
        bench.nginx()
        procs = {"haproxy": bench.haproxy(), "meshcore": bench.sidecar()}
        for rnd in range(args.rounds):
            order = list(procs) if rnd % 2 == 0 else list(procs)[::-1]
            for name in order:
                r = bench.measure(*procs[name])
                r["idle_kib"] = bench.idle(name)
                runs[name].append(r)
                print(f"round {rnd + 1} {name:9} burst {r['burst_s']:.3f} s ({r['answered']}/"
                      f"{args.burst})  close: {r['rps']:7.0f} req/s {r['cpu_us']:6.1f} µs/req  "
                      f"idle {r['idle_kib']:5.2f} KiB/conn", flush=True)
    finally:
        bench.close()
    load = os.getloadavg()[0]
    print(f"\nbackend {args.backend}, {args.rounds} interleaved rounds, load {args.load} conns, "
          f"burst {args.burst}, idle {args.idle}, loadavg {load:.1f}; median [min-max]")
    for name, rs in runs.items():
        print(f"{name:9} burst {spread([r['burst_s'] for r in rs])} s, answered "
              f"{min(r['answered'] for r in rs)}/{args.burst}; close "
              f"{spread([r['rps'] for r in rs])} req/s, {spread([r['cpu_us'] for r in rs])} µs/req; "
              f"idle {spread([r['idle_kib'] for r in rs])} KiB/conn")
    h, m = runs["haproxy"], runs["meshcore"]
    med = statistics.median
    burst_s = med(r["burst_s"] for r in m)
    rps = med(r["rps"] for r in m) / med(r["rps"] for r in h)
    cpu = med(r["cpu_us"] for r in m) / med(r["cpu_us"] for r in h)
    idle = med(r["idle_kib"] for r in m)
    print(f"bars: burst ≤ 0.5 s: {burst_s:.3f} s {'met' if burst_s <= 0.5 else 'NOT met'}; "
          f"close req/s ≥ 0.3x: {rps:.2f}x {'met' if rps >= 0.3 else 'NOT met'}; "
          f"CPU ≤ 5x: {cpu:.1f}x {'met' if cpu <= 5 else 'NOT met'}; "
          f"idle ≤ 6 KiB: {idle:.1f} KiB {'met' if idle <= 6 else 'NOT met'}")


if __name__ == "__main__":
    main()
