"""Sidecar benchmark: direct vs one sidecar vs two (plain and mTLS) vs HAProxy, with wrk.

Everything on loopback: one nginx with three server blocks as the upstream instances; the
proxy under test balances over the three with round-robin. The meshcore sidecar runs as a
real `meshcore run` process with round-robin, retry and breaker loaded (the bar in issue 9:
≥ 0.3x HAProxy's requests/s at 32 connections, RSS ≤ 60 MiB). HAProxy 2.6 runs with
`nbthread 1` (one core, like the sidecar). CPU per request is the proxy processes' user+system
time over the run divided by the requests wrk completed.

    /work/venv/bin/python bench/sidecar.py [--duration 8] [--connections 32] [--backend uvloop]
    /work/venv/bin/python bench/sidecar.py --compare A,B [--rounds 4] [--duration 4]

`--compare` is for a shared, noisy machine, where one run of each tells little: it runs the
one-sidecar setup from two (or more) source trees side by side and measures them in turn,
alternating the order each round, then prints the median req/s and CPU µs/req of each. A
tree is a directory put first on the sidecar's PYTHONPATH, e.g. made with
`mkdir /tmp/A && cp -r meshcore plugins/*/meshcore_* /tmp/A/`.

Needs /usr/bin/wrk, /usr/sbin/nginx, /usr/sbin/haproxy (Debian packages wrk, nginx-light or
nginx, haproxy). Prints one table; ratios are against HAProxy.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

MESHCORE = str(Path(sys.executable).with_name("meshcore"))
TICKS = os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return 0.0


def wait_http(url: str, headers: dict | None = None, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if httpx.get(url, headers=headers, timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.05)
    raise RuntimeError(f"{url} not answering 200")


def wrk(url: str, connections: int, duration: float, host: str | None) -> dict:
    cmd = ["wrk", "-t1", f"-c{connections}", f"-d{duration:g}s", "--latency", url]
    if host:
        cmd[1:1] = ["-H", f"Host: {host}"]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout

    def latency(pct: str) -> float:
        m = re.search(rf"^\s+{pct}%\s+([\d.]+)(us|ms|s)\s*$", out, re.M)
        value, unit = float(m.group(1)), m.group(2)
        return value * {"us": 1, "ms": 1000, "s": 1e6}[unit]

    requests = int(re.search(r"(\d+) requests in", out).group(1))
    errors = sum(int(x) for x in re.findall(r"(?:connect|read|write|timeout) (\d+)", out))
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    return {
        "rps": float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1)),
        "p50": latency("50"),
        "p99": latency("99"),
        "requests": requests,
        "errors": errors + (int(non2xx.group(1)) if non2xx else 0),
    }


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.tmp = Path(tempfile.mkdtemp(prefix="meshcore-bench-"))
        self.procs: list[subprocess.Popen] = []
        self.app_ports = [free_port() for _ in range(3)]

    def spawn(self, cmd: list[str], **kwargs) -> subprocess.Popen:
        log = open(self.tmp / f"log-{len(self.procs)}.txt", "wb")
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, **kwargs)
        self.procs.append(proc)
        return proc

    def close(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.procs:
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
        shutil.rmtree(self.tmp, ignore_errors=True)

    def nginx(self) -> None:
        servers = "\n".join(
            f"server {{ listen 127.0.0.1:{p}; access_log off; location / {{ return 200 'ok'; }} }}"
            for p in self.app_ports
        )
        conf = self.tmp / "nginx.conf"
        conf.write_text(
            f"worker_processes 1; daemon off; pid {self.tmp}/nginx.pid; error_log {self.tmp}/nginx.err;\n"
            "events { worker_connections 4096; }\n"
            f"http {{ keepalive_requests 100000; client_body_temp_path {self.tmp}; {servers} }}\n"
        )
        self.spawn(["/usr/sbin/nginx", "-p", str(self.tmp), "-c", str(conf)])
        for p in self.app_ports:
            wait_http(f"http://127.0.0.1:{p}/")

    def haproxy(self) -> int:
        port = free_port()
        backends = "\n".join(f"  server s{i} 127.0.0.1:{p}" for i, p in enumerate(self.app_ports))
        conf = self.tmp / "haproxy.cfg"
        conf.write_text(
            "global\n  nbthread 1\n  maxconn 4096\n"
            "defaults\n  mode http\n  timeout connect 5s\n  timeout client 60s\n  timeout server 60s\n"
            "  option http-keep-alive\n"
            f"frontend f\n  bind 127.0.0.1:{port}\n  default_backend b\n"
            f"backend b\n  balance roundrobin\n{backends}\n"
        )
        proc = self.spawn(["/usr/sbin/haproxy", "-f", str(conf)])
        wait_http(f"http://127.0.0.1:{port}/")
        return proc.pid

    def ca(self) -> Path:
        ca_dir = self.tmp / "ca"
        subprocess.run(
            [MESHCORE, "-p", "tls", "ca", "init", "--trust-domain", "bench.local", str(ca_dir)],
            check=True, capture_output=True,
        )
        return ca_dir

    def sidecar(self, name: str, endpoints: list[str], app: int | None = None,
                tls: Path | None = None, service: str = "", root: str | None = None,
                ) -> tuple[int, dict]:
        ports = {k: free_port() for k in ("outbound", "inbound", "admin")}
        eps = ", ".join(f'"{e}"' for e in endpoints)
        plugins = ["round-robin", "retry", "breaker"] + (["tls"] if tls else [])
        text = (
            f"[mesh]\nplugins = {plugins!r}\n".replace("'", '"')
            + "[defaults]\nbalancer = \"round-robin\"\nresilience = [\"retry\", \"breaker\"]\n"
            + "[sidecar]\n"
            + "".join(f'{k} = "127.0.0.1:{v}"\n' for k, v in ports.items())
            + (f'app = "127.0.0.1:{app}"\n' if app else "")
            + (f'service = "{service}"\n' if service else "")
            + f"[services.bench]\ndiscovery = \"static\"\n[services.bench.static]\nendpoints = [{eps}]\n"
        )
        if tls:
            text += f'[tls]\nca_dir = "{tls}"\nservice = "{service or name}"\n'
        conf = self.tmp / f"{name}.toml"
        conf.write_text(text)
        env = None
        if root is not None:  # --compare: this source tree's meshcore and plugins first
            path = os.environ.get("PYTHONPATH")
            env = dict(os.environ, PYTHONPATH=root + (os.pathsep + path if path else ""))
        proc = self.spawn([MESHCORE, "-c", str(conf), "run", "--backend", self.args.backend,
                           "--log-level", "warning"], env=env)
        wait_http(f"http://127.0.0.1:{ports['admin']}/ready")
        return proc.pid, ports

    def measure(self, label: str, url: str, host: str | None, pids: list[int]) -> dict:
        # warm-up, then the measured run
        wrk(url, self.args.connections, 1, host)
        before = sum(cpu_seconds(p) for p in pids)
        result = wrk(url, self.args.connections, self.args.duration, host)
        used = sum(cpu_seconds(p) for p in pids) - before
        result["cpu_us"] = used / max(result["requests"], 1) * 1e6 if pids else None
        result["rss"] = sum(rss_mib(p) for p in pids) if pids else None
        result["label"] = label
        return result

    def run(self) -> list[dict]:
        self.nginx()
        apps = [f"127.0.0.1:{p}" for p in self.app_ports]
        rows = [self.measure("direct to nginx", f"http://{apps[0]}/", None, [])]
        hp = self.haproxy_pid = self.haproxy()
        rows.append(self.measure("HAProxy nbthread 1", f"http://127.0.0.1:{self._haproxy_port()}/", None, [hp]))
        pid, ports = self.sidecar("one", apps)
        rows.append(self.measure("1 sidecar (rr+retry+breaker)",
                                 f"http://127.0.0.1:{ports['outbound']}/", "bench", [pid]))
        pid_b, ports_b = self.sidecar("b", apps, app=self.app_ports[0], service="bench")
        pid_a, ports_a = self.sidecar("a", [f"127.0.0.1:{ports_b['inbound']}"])
        rows.append(self.measure("2 sidecars (out -> in), plain",
                                 f"http://127.0.0.1:{ports_a['outbound']}/", "bench", [pid_a, pid_b]))
        if not self.args.no_tls:
            ca = self.ca()
            pid_b, ports_b = self.sidecar("tb", apps, app=self.app_ports[0], tls=ca, service="bench")
            pid_a, ports_a = self.sidecar("ta", [f"127.0.0.1:{ports_b['inbound']}"], tls=ca, service="client")
            rows.append(self.measure("2 sidecars (out -> in), mTLS",
                                     f"http://127.0.0.1:{ports_a['outbound']}/", "bench", [pid_a, pid_b]))
        return rows

    def compare(self, roots: list[str]) -> dict[str, list[dict]]:
        self.nginx()
        apps = [f"127.0.0.1:{p}" for p in self.app_ports]
        sides = {root: self.sidecar(f"cmp{i}", apps, root=root) for i, root in enumerate(roots)}
        runs: dict[str, list[dict]] = {root: [] for root in roots}
        for rnd in range(self.args.rounds):
            for root in roots if rnd % 2 == 0 else roots[::-1]:
                pid, ports = sides[root]
                r = self.measure(root, f"http://127.0.0.1:{ports['outbound']}/", "bench", [pid])
                runs[root].append(r)
                print(f"round {rnd + 1}  {root:30} {r['rps']:8.0f} req/s  {r['cpu_us']:6.1f} µs/req",
                      flush=True)
        return runs

    def _haproxy_port(self) -> int:
        text = (self.tmp / "haproxy.cfg").read_text()
        return int(re.search(r"bind 127.0.0.1:(\d+)", text).group(1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=8)
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--backend", default="uvloop", choices=["trio", "asyncio", "uvloop"])
    parser.add_argument("--no-tls", action="store_true", help="skip the mTLS pair")
    parser.add_argument("--compare", metavar="A,B", help="source trees to compare (one sidecar)")
    parser.add_argument("--rounds", type=int, default=4, help="--compare: rounds per tree")
    args = parser.parse_args()
    bench = Bench(args)
    if args.compare:
        roots = [str(Path(r).resolve()) for r in args.compare.split(",")]
        try:
            runs = bench.compare(roots)
        finally:
            bench.close()
        print(f"wrk -t1 -c{args.connections} -d{args.duration:g}s x {args.rounds} interleaved, "
              f"one sidecar (rr+retry+breaker), backend {args.backend}; medians:")
        for root, rs in runs.items():
            print(f"{root:30} {statistics.median(r['rps'] for r in rs):8.0f} req/s  "
                  f"{statistics.median(r['cpu_us'] for r in rs):6.1f} µs/req  "
                  f"errors {sum(r['errors'] for r in rs)}")
        return
    try:
        rows = bench.run()
    finally:
        bench.close()
    haproxy = next(r["rps"] for r in rows if r["label"].startswith("HAProxy"))
    print(f"wrk -t1 -c{args.connections} -d{args.duration:g}s, sidecar backend {args.backend}, "
          f"{os.cpu_count()} cores, loopback")
    print(f"{'path':32} {'req/s':>9} {'p50 µs':>8} {'p99 µs':>8} {'CPU µs/req':>11} {'RSS MiB':>8} "
          f"{'vs HAProxy':>10} {'errors':>6}")
    for r in rows:
        cpu = f"{r['cpu_us']:.1f}" if r["cpu_us"] is not None else "-"
        rss = f"{r['rss']:.1f}" if r["rss"] is not None else "-"
        print(f"{r['label']:32} {r['rps']:9.0f} {r['p50']:8.0f} {r['p99']:8.0f} {cpu:>11} {rss:>8} "
              f"{r['rps'] / haproxy:9.2f}x {r['errors']:6d}")
    one = next(r for r in rows if r["label"].startswith("1 sidecar"))
    ok = one["rps"] >= 0.3 * haproxy and one["rss"] <= 60
    print(f"bar (1 sidecar ≥ 0.3x HAProxy, RSS ≤ 60 MiB): {'met' if ok else 'NOT met'} "
          f"({one['rps'] / haproxy:.2f}x, {one['rss']:.1f} MiB)")


if __name__ == "__main__":
    main()
