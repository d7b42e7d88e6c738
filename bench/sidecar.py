"""Sidecar benchmark: meshcore's sidecar beside HAProxy, in interleaved rounds, with wrk.

Everything on loopback: one nginx with three server blocks as the upstream instances; every
proxy balances over the three with round-robin. Compared, all started once and then measured
in turn every round (the order rotating each round, so drifting load on a shared machine hits
every row alike):

- **HAProxy plain**: `nbthread 1`, round-robin, nothing else.
- **HAProxy same work**: what the sidecar does per request, done by HAProxy (issue 21):
  `X-Forwarded-For`, `Via` both ways, an `X-Request-Id` (a UUID) when absent, up to 2 retries
  on connection failures, empty responses, timeouts and 502/503/504 (`retry-on`, with
  `option redispatch` to another server, as the retry layer's previous-hosts rule), and
  health checks (active `check`, plus `observe layer7` as passive outlier ejection).
- **1 sidecar**: `meshcore run` with round-robin, retry and breaker.
- **2 sidecars** (outbound -> inbound), plain and with mTLS (`tls` plugin).

Every proxy is pinned to one core with `taskset` (`--pin`, default the last core; `--pin
none` to turn it off), so a proxy that is CPU-bound shows it in req/s. CPU per request is the
proxy processes' user+system time (from /proc) over the run divided by the requests wrk
completed. Printed: per row the median and spread (min-max) over the rounds of req/s, p50/p99
and CPU µs per request, and the bar of issue 21: the sidecar's CPU per request ≤ 2x the
same-work HAProxy's.

    python bench/sidecar.py [--quick] [--rounds 3] [--duration 5] [--backend uvloop]
    python bench/sidecar.py --bodies [--quick]     # 1-64 KiB responses, 1/16 KiB POSTs
    python bench/sidecar.py --compare A,B [--rounds 4] [--duration 4]
    python bench/open_loop.py [--quick]            # the tail at 5,000 req/s, open loop

`--bodies`: GETs of 1, 4, 16 and 64 KiB responses (static files nginx serves) and POSTs of
1 and 16 KiB, through HAProxy (plain and same work) and one sidecar, each pinned; the bar:
the sidecar ≥ 0.5x HAProxy's req/s for every size.

`--compare` is for A/B work on one change: it runs the one-sidecar setup from two (or more)
source trees side by side and measures them in turn, rotating the order each round, then
prints the median req/s and CPU µs/req of each. A tree is a checkout of this repository
(`git worktree add`, or `git archive COMMIT meshcore plugins | tar -x -C /tmp/A`): its core
and its plugins' packages go first on the sidecar's PYTHONPATH.

Needs /usr/bin/wrk, nginx, /usr/sbin/haproxy and taskset (Debian packages wrk, nginx-light
or nginx, haproxy, util-linux).
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
BODY_SIZES = (1, 4, 16, 64)  # KiB, GET responses
POST_SIZES = (1, 16)  # KiB, request bodies


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


def load_average() -> float:
    return os.getloadavg()[0]


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


def wrk(url: str, connections: int, duration: float, host: str | None,
        script: str | None = None) -> dict:
    cmd = ["wrk", "-t1", f"-c{connections}", f"-d{max(1, round(duration))}s", "--latency", url]
    if host:
        cmd[1:1] = ["-H", f"Host: {host}"]
    if script:
        cmd[1:1] = ["-s", script]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout

    def latency(pct: str) -> float:
        m = re.search(rf"^\s+{pct}%\s+([\d.]+)(us|ms|s)\s*$", out, re.M)
        if m is None:
            return float("nan")
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


def haproxy_config(port: int, apps: list[int], same_work: bool, threads: int = 1) -> str:
    """HAProxy 2.6, `threads` threads, round-robin over `apps`; `same_work`: the sidecar's work."""
    text = (
        f"global\n  nbthread {threads}\n  maxconn 4096\n"
        "defaults\n  mode http\n  timeout connect 5s\n  timeout client 60s\n  timeout server 60s\n"
        "  option http-keep-alive\n"
    )
    server = rules = ""
    if same_work:
        text += (
            "  option forwardfor\n"
            # the retry layer: 3 attempts in all, another server for each, on the same failures
            "  retries 2\n  option redispatch 1\n"
            "  retry-on conn-failure empty-response response-timeout 502 503 504\n"
        )
        # hop-by-hop fields are HAProxy's own work in every mode; Via and X-Request-Id:
        rules = (
            "  http-request add-header Via \"1.1 haproxy\"\n"
            "  http-request set-header X-Request-Id %[uuid] unless { req.hdr(x-request-id) -m found }\n"
            "  http-response add-header Via \"1.1 haproxy\"\n"
        )
        # health checks: active every 2 s, and passive (the breaker's ejection after 5 errors)
        server = " check inter 2s observe layer7 error-limit 5 on-error mark-down"
    backends = "\n".join(f"  server s{i} 127.0.0.1:{p}{server}" for i, p in enumerate(apps))
    return (
        text
        + f"frontend f\n  bind 127.0.0.1:{port}\n{rules}  default_backend b\n"
        + f"backend b\n  balance roundrobin\n{'  option httpchk GET /' + chr(10) if same_work else ''}"
        + f"{backends}\n"
    )


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.tmp = Path(tempfile.mkdtemp(prefix="meshcore-bench-"))
        self.procs: list[subprocess.Popen] = []
        self.app_ports = [free_port() for _ in range(3)]
        pin = getattr(args, "pin", "none")  # callers from other benches: as they were
        if pin == "auto":
            pin = str(os.cpu_count() - 1) if (os.cpu_count() or 1) > 1 else "none"
        self.pin: list[str] = [] if pin == "none" or not shutil.which("taskset") else ["taskset", "-c", pin]

    def spawn(self, cmd: list[str], pinned: bool = False, **kwargs) -> subprocess.Popen:
        log = open(self.tmp / f"log-{len(self.procs)}.txt", "wb")
        proc = subprocess.Popen((self.pin if pinned else []) + cmd, stdout=log,
                                stderr=subprocess.STDOUT, **kwargs)
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
        www = self.tmp / "www"
        www.mkdir()
        for kib in BODY_SIZES:
            (www / f"{kib}k").write_bytes(b"x" * (kib * 1024))
        locations = (
            "location / { return 200 'ok'; } "
            f"location /b/ {{ alias {www}/; }} "
            "location = /post { return 200 'ok'; }"
        )
        servers = "\n".join(
            f"server {{ listen 127.0.0.1:{p}; access_log off; {locations} }}" for p in self.app_ports
        )
        conf = self.tmp / "nginx.conf"
        conf.write_text(
            f"worker_processes 1; daemon off; pid {self.tmp}/nginx.pid; error_log {self.tmp}/nginx.err;\n"
            "events { worker_connections 4096; }\n"
            f"http {{ keepalive_requests 1000000; client_body_temp_path {self.tmp};"
            f" client_body_buffer_size 128k; {servers} }}\n"
        )
        self.spawn(["/usr/sbin/nginx", "-p", str(self.tmp), "-c", str(conf)])
        for p in self.app_ports:
            wait_http(f"http://127.0.0.1:{p}/")

    def haproxy(self, same_work: bool = False, threads: int = 1, port: int = 0) -> tuple[int, int]:
        """(pid, port) of a pinned HAProxy; `port`: one another HAProxy already binds (HAProxy
        sets SO_REUSEPORT on its listeners by default, so the kernel spreads connections)."""
        port = port or free_port()
        conf = self.tmp / f"haproxy-{port}-{threads}.cfg"
        conf.write_text(haproxy_config(port, self.app_ports, same_work, threads))
        proc = self.spawn(["/usr/sbin/haproxy", "-f", str(conf)], pinned=True)
        wait_http(f"http://127.0.0.1:{port}/")
        return proc.pid, port

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
            plugins = Path(root, "plugins")
            if plugins.is_dir():  # a checkout: its plugins' packages too
                root = os.pathsep.join([root, *sorted(str(p) for p in plugins.iterdir() if p.is_dir())])
            env = dict(os.environ, PYTHONPATH=root + (os.pathsep + path if path else ""))
        proc = self.spawn([MESHCORE, "-c", str(conf), "run", "--backend", self.args.backend,
                           "--log-level", "warning"], pinned=True, env=env)
        wait_http(f"http://127.0.0.1:{ports['admin']}/ready")
        return proc.pid, ports

    def measure(self, label: str, url: str, host: str | None, pids: list[int],
                script: str | None = None) -> dict:
        # warm-up, then the measured run
        wrk(url, self.args.connections, 1, host, script)
        before = sum(cpu_seconds(p) for p in pids)
        result = wrk(url, self.args.connections, self.args.duration, host, script)
        used = sum(cpu_seconds(p) for p in pids) - before
        result["cpu_us"] = used / max(result["requests"], 1) * 1e6 if pids else None
        result["rss"] = sum(rss_mib(p) for p in pids) if pids else None
        result["label"] = label
        result["load"] = load_average()
        return result

    def targets(self, tls: bool = True) -> list[tuple[str, str, str | None, list[int]]]:
        """(label, base URL, Host header, pids) of every row, all started now."""
        apps = [f"127.0.0.1:{p}" for p in self.app_ports]
        rows: list[tuple[str, str, str | None, list[int]]] = [
            ("direct to nginx (unpinned)", f"http://{apps[0]}", None, [])
        ]
        pid, port = self.haproxy()
        rows.append(("HAProxy plain", f"http://127.0.0.1:{port}", None, [pid]))
        pid, port = self.haproxy(same_work=True)
        rows.append(("HAProxy same work", f"http://127.0.0.1:{port}", None, [pid]))
        pid, ports = self.sidecar("one", apps)
        rows.append(("1 sidecar (rr+retry+breaker)", f"http://127.0.0.1:{ports['outbound']}", "bench", [pid]))
        if getattr(self.args, "bodies", False):
            return rows[1:]
        pid_b, ports_b = self.sidecar("b", apps, app=self.app_ports[0], service="bench")
        pid_a, ports_a = self.sidecar("a", [f"127.0.0.1:{ports_b['inbound']}"])
        rows.append(("2 sidecars plain (both)", f"http://127.0.0.1:{ports_a['outbound']}", "bench",
                     [pid_a, pid_b]))
        if tls:
            ca = self.ca()
            pid_b, ports_b = self.sidecar("tb", apps, app=self.app_ports[0], tls=ca, service="bench")
            pid_a, ports_a = self.sidecar("ta", [f"127.0.0.1:{ports_b['inbound']}"], tls=ca,
                                          service="client")
            rows.append(("2 sidecars mTLS (both)", f"http://127.0.0.1:{ports_a['outbound']}",
                         "bench", [pid_a, pid_b]))
        return rows

    def rounds(self, cases: list[tuple[str, str, str | None, list[int], str | None]]
               ) -> dict[str, list[dict]]:
        """Every case once per round, the order rotated each round."""
        runs: dict[str, list[dict]] = {c[0]: [] for c in cases}
        for rnd in range(self.args.rounds):
            shift = rnd % len(cases)
            order = cases[shift:] + cases[:shift]
            for label, url, host, pids, script in order:
                r = self.measure(label, url, host, pids, script)
                runs[label].append(r)
                cpu = f"{r['cpu_us']:6.1f} µs/req" if r["cpu_us"] is not None else " " * 13
                print(f"round {rnd + 1}  {label:44} {r['rps']:9.0f} req/s  {cpu}  "
                      f"load {r['load']:.1f}", flush=True)
        return runs

    def compare(self, roots: list[str]) -> dict[str, list[dict]]:
        self.nginx()
        apps = [f"127.0.0.1:{p}" for p in self.app_ports]
        sides = {root: self.sidecar(f"cmp{i}", apps, root=root) for i, root in enumerate(roots)}
        cases = [(root, f"http://127.0.0.1:{ports['outbound']}/", "bench", [pid], None)
                 for root, (pid, ports) in sides.items()]
        return self.rounds(cases)


def med(values: list[float]) -> float:
    return statistics.median(values)


def spread(values: list[float]) -> str:
    return f"{min(values):.0f}-{max(values):.0f}"


def print_table(runs: dict[str, list[dict]]) -> None:
    print(f"{'path':44} {'req/s median (range)':>24} {'p50 µs':>7} {'p99 µs':>7} "
          f"{'CPU µs/req (range)':>20} {'errors':>6}")
    for label, rs in runs.items():
        rps = [r["rps"] for r in rs]
        cpu = [r["cpu_us"] for r in rs if r["cpu_us"] is not None]
        cpu_text = f"{med(cpu):.1f} ({min(cpu):.1f}-{max(cpu):.1f})" if cpu else "-"
        print(f"{label:44} {med(rps):9.0f} ({spread(rps):>13}) {med([r['p50'] for r in rs]):7.0f} "
              f"{med([r['p99'] for r in rs]):7.0f} {cpu_text:>20} {sum(r['errors'] for r in rs):6d}")


def cpu_main(bench: Bench, args: argparse.Namespace) -> None:
    bench.nginx()
    targets = bench.targets(tls=not args.no_tls)
    runs = bench.rounds([(label, url + "/", host, pids, None) for label, url, host, pids in targets])
    loads = [r["load"] for rs in runs.values() for r in rs]
    print(f"\nwrk -t1 -c{args.connections} -d{args.duration:g}s x {args.rounds} interleaved rounds, "
          f"sidecar backend {args.backend}, proxies pinned: {' '.join(bench.pin) or 'no'}, "
          f"{os.cpu_count()} cores, load average {min(loads):.1f}-{max(loads):.1f}")
    print_table(runs)
    one = runs["1 sidecar (rr+retry+breaker)"]
    same = runs["HAProxy same work"]
    plain = runs["HAProxy plain"]
    ratio = med([r["cpu_us"] for r in one]) / med([r["cpu_us"] for r in same])
    paired = med([a["cpu_us"] / b["cpu_us"] for a, b in zip(one, same)])
    print(f"1 sidecar CPU per request vs HAProxy same work: {ratio:.2f}x (per-round pairs "
          f"{paired:.2f}x), vs plain {med([r['cpu_us'] for r in one]) / med([r['cpu_us'] for r in plain]):.2f}x; "
          f"req/s vs same work {med([a['rps'] / b['rps'] for a, b in zip(one, same)]):.2f}x")
    print(f"bar (issue 21: CPU per request ≤ 2x the same-work HAProxy's): "
          f"{'met' if ratio <= 2 else 'NOT met'}")


def bodies_main(bench: Bench, args: argparse.Namespace) -> None:
    bench.nginx()
    targets = bench.targets()
    cases = []
    for kib in BODY_SIZES:
        for label, url, host, pids in targets:
            cases.append((f"GET {kib:2d} KiB  {label}", f"{url}/b/{kib}k", host, pids, None))
    for kib in POST_SIZES:
        script = bench.tmp / f"post{kib}.lua"
        script.write_text(
            'wrk.method = "POST"\n'
            f'wrk.body = string.rep("x", {kib * 1024})\n'
            'wrk.headers["Content-Type"] = "application/octet-stream"\n'
        )
        for label, url, host, pids in targets:
            cases.append((f"POST {kib:2d} KiB {label}", f"{url}/post", host, pids, str(script)))
    runs = bench.rounds(cases)
    loads = [r["load"] for rs in runs.values() for r in rs]
    print(f"\nwrk -t1 -c{args.connections} -d{args.duration:g}s x {args.rounds} interleaved rounds, "
          f"sidecar backend {args.backend}, proxies pinned: {' '.join(bench.pin) or 'no'}, "
          f"load average {min(loads):.1f}-{max(loads):.1f}")
    print_table(runs)
    print(f"\n{'body':14} {'sidecar / HAProxy plain':>24} {'/ HAProxy same work':>20}  bar ≥ 0.5x")
    met = True
    for kind, sizes in (("GET", BODY_SIZES), ("POST", POST_SIZES)):
        for kib in sizes:
            prefix = f"{kind} {kib:2d} KiB{' ' if kind == 'GET' else ''} "
            one = runs[f"{prefix}1 sidecar (rr+retry+breaker)"]
            plain = runs[f"{prefix}HAProxy plain"]
            same = runs[f"{prefix}HAProxy same work"]
            r_plain = med([a["rps"] / b["rps"] for a, b in zip(one, plain)])
            r_same = med([a["rps"] / b["rps"] for a, b in zip(one, same)])
            met = met and r_plain >= 0.5
            print(f"{kind:4} {kib:2d} KiB    {r_plain:23.2f}x {r_same:19.2f}x  "
                  f"{'met' if r_plain >= 0.5 else 'NOT met'}")
    print(f"bar (issue 21: ≥ 0.5x HAProxy for 1-64 KiB responses and requests): "
          f"{'met' if met else 'NOT met'}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=5)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--backend", default="uvloop", choices=["trio", "asyncio", "uvloop"])
    parser.add_argument("--pin", default="auto",
                        help="core for every proxy (taskset -c); 'none' to not pin")
    parser.add_argument("--no-tls", action="store_true", help="skip the mTLS pair")
    parser.add_argument("--bodies", action="store_true", help="body-size rows instead")
    parser.add_argument("--quick", action="store_true", help="2 rounds of 2 s (under 2 minutes)")
    parser.add_argument("--compare", metavar="A,B", help="source trees to compare (one sidecar)")
    args = parser.parse_args()
    if args.quick:
        args.rounds, args.duration = 2, 2
    bench = Bench(args)
    try:
        if args.compare:
            roots = [str(Path(r).resolve()) for r in args.compare.split(",")]
            runs = bench.compare(roots)
            print(f"wrk -t1 -c{args.connections} -d{args.duration:g}s x {args.rounds} interleaved, "
                  f"one sidecar (rr+retry+breaker), backend {args.backend}; medians:")
            print_table(runs)
            if len(roots) == 2:
                a, b = runs[roots[0]], runs[roots[1]]
                print(f"CPU per request, second / first: "
                      f"{med([r['cpu_us'] for r in b]) / med([r['cpu_us'] for r in a]):.3f} "
                      f"(per-round pairs {med([y['cpu_us'] / x['cpu_us'] for x, y in zip(a, b)]):.3f})")
        elif args.bodies:
            bodies_main(bench, args)
        else:
            cpu_main(bench, args)
    finally:
        bench.close()


if __name__ == "__main__":
    main()
