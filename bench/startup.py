"""Start-up time and idle memory of `meshcore run`, beside HAProxy's.

The bar in issue 21 ("Memory and CPU per request"): idle RSS ≤ 25 MiB and `meshcore run`
ready ≤ 0.15 s. "Ready" is the time from starting the process to its `/ready` answering 200
(HAProxy: a `monitor-uri /ready` on its frontend), polled every 2 ms; beside it, the
process's CPU time at that moment (its threads' nanoseconds on a CPU from
/proc/PID/task/*/schedstat; utime+stime, in clock ticks, where that is missing), which the
load of a shared machine moves much less than the wall clock; idle RSS is VmRSS from /proc/PID/status half a second after
ready, with no traffic yet. The processes run with bytecode caching on (as after a pip
install, which compiles .pyc files), after one uncounted start of each that writes them. The sidecar has the config of
bench/sidecar.py's one-sidecar row (round-robin + retry + breaker, three static endpoints);
the `+ tls` row loads the tls plugin too (mTLS inbound, a workload certificate issued from a
local CA at start). `python floor` is the same interpreter importing only the event loop and
anyio: what no change to meshcore can go below.

Every setup is started once per round, in an order that rotates each round (interleaved, so a
burst of load from elsewhere hits all of them); the table gives the median and the spread
(min-max) of each, and the ratio of the median to the bar.

    python bench/startup.py [--rounds 9] [--backend uvloop] [--no-tls] [--quick]
    python bench/startup.py --compare A,B   # two source trees, as bench/sidecar.py's --compare

`--compare` puts each tree (a directory with `meshcore/` and the plugins' packages, e.g.
`mkdir /tmp/A && cp -r meshcore plugins/*/meshcore_* /tmp/A/`) first on the sidecar's
PYTHONPATH and starts it as `python -P -m meshcore`, so each tree enters through its own
`__main__`. Needs /usr/sbin/haproxy (Debian package haproxy) for the anchor row.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MESHCORE = str(Path(sys.executable).with_name("meshcore"))
HAPROXY = "/usr/sbin/haproxy"
BAR_READY_S = 0.15
BAR_RSS_MIB = 25.0
POLL_S = 0.002
TICKS = os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def status_kib(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} for pid {pid}")


def cpu_s(pid: int) -> float:
    """CPU time of the process's threads: /proc/PID/task/*/schedstat's nanoseconds on a CPU
    where the kernel has schedstats, else /proc/PID/stat's utime+stime (clock ticks)."""
    total = 0
    try:
        for task in Path(f"/proc/{pid}/task").iterdir():
            total += int((task / "schedstat").read_text().split()[0])
        return total / 1e9
    except (OSError, ValueError, IndexError):
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / TICKS


def answers_200(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1) as s:
            s.sendall(b"GET /ready HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
            return s.recv(64).startswith((b"HTTP/1.1 200", b"HTTP/1.0 200"))
    except OSError:
        return False


class Setup:
    """One thing to start: its command, how it says it is ready, and its environment."""

    def __init__(self, label: str, cmd: list[str], ready_port: int | None,
                 env: dict[str, str] | None = None) -> None:
        self.label = label
        self.cmd = cmd
        self.ready_port = ready_port  # None: ready when the process prints a line
        self.env = env
        self.ready_s: list[float] = []
        self.rss_mib: list[float] = []
        self.cpu_s: list[float] = []

    def measure(self, log: Path, timeout: float = 30.0) -> None:
        with open(log, "ab") as err:
            start = time.perf_counter()
            proc = subprocess.Popen(self.cmd, stdout=subprocess.PIPE, stderr=err, env=self.env)
            try:
                assert proc.stdout is not None
                if self.ready_port is None:
                    proc.stdout.readline()
                else:
                    while not answers_200(self.ready_port):
                        if proc.poll() is not None or time.perf_counter() - start > timeout:
                            tail = log.read_text(errors="replace")[-2000:]
                            raise RuntimeError(f"{self.label}: not ready; stderr ends:\n{tail}")
                        time.sleep(POLL_S)
                ready = time.perf_counter() - start
                self.cpu_s.append(cpu_s(proc.pid))
                time.sleep(0.5)
                self.ready_s.append(ready)
                self.rss_mib.append(status_kib(proc.pid, "VmRSS") / 1024)
            finally:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()


def sidecar_config(tmp: Path, name: str, tls_ca: Path | None) -> tuple[Path, int]:
    ports = {k: free_port() for k in ("outbound", "inbound", "admin")}
    endpoints = ", ".join(f'"127.0.0.1:{free_port()}"' for _ in range(3))
    plugins = ["round-robin", "retry", "breaker"] + (["tls"] if tls_ca else [])
    text = (
        "[mesh]\nplugins = [" + ", ".join(f'"{p}"' for p in plugins) + "]\n"
        '[defaults]\nbalancer = "round-robin"\nresilience = ["retry", "breaker"]\n'
        "[sidecar]\n"
        + "".join(f'{k} = "127.0.0.1:{v}"\n' for k, v in ports.items())
        + f'[services.bench]\ndiscovery = "static"\n[services.bench.static]\nendpoints = [{endpoints}]\n'
    )
    if tls_ca:
        text += f'[tls]\nca_dir = "{tls_ca}"\nservice = "bench"\n'
    conf = tmp / f"{name}.toml"
    conf.write_text(text)
    return conf, ports["admin"]


def haproxy_config(tmp: Path) -> tuple[Path, int]:
    port = free_port()
    servers = "\n".join(f"  server s{i} 127.0.0.1:{free_port()}" for i in range(3))
    conf = tmp / "haproxy.cfg"
    # The same shape as bench/sidecar.py's HAProxy, plus a monitor URI to poll for readiness.
    conf.write_text(
        "global\n  nbthread 1\n  maxconn 4096\n"
        "defaults\n  mode http\n  timeout connect 5s\n  timeout client 60s\n  timeout server 60s\n"
        f"frontend f\n  bind 127.0.0.1:{port}\n  monitor-uri /ready\n  default_backend b\n"
        f"backend b\n  balance roundrobin\n{servers}\n"
    )
    return conf, port


def floor_command(backend: str) -> list[str]:
    loop = {"uvloop": "uvloop", "asyncio": "asyncio", "trio": "trio"}[backend]
    code = (f"import sys, signal, {loop}, anyio; print('ready', flush=True); "
            "signal.signal(signal.SIGTERM, lambda *a: sys.exit(0)); signal.pause()")
    return [sys.executable, "-c", code]


def summary(values: list[float]) -> tuple[float, float, float]:
    return statistics.median(values), min(values), max(values)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--backend", default="uvloop", choices=["uvloop", "asyncio", "trio"])
    parser.add_argument("--no-tls", action="store_true", help="skip the row with the tls plugin")
    parser.add_argument("--compare", metavar="A,B", help="source trees to compare (plain sidecar)")
    parser.add_argument("--quick", action="store_true", help="3 rounds (well under 2 minutes)")
    args = parser.parse_args()
    rounds = 3 if args.quick else args.rounds

    tmp = Path(tempfile.mkdtemp(prefix="meshcore-startup-"))
    log = tmp / "stderr.txt"
    try:
        run = [MESHCORE, "run", "--backend", args.backend, "--log-level", "warning"]
        setups: list[Setup] = []
        if Path(HAPROXY).exists():
            conf, port = haproxy_config(tmp)
            setups.append(Setup("HAProxy (anchor)", [HAPROXY, "-db", "-f", str(conf)], port))
        setups.append(Setup("python floor", floor_command(args.backend), None))
        if args.compare:
            for i, root in enumerate(str(Path(r).resolve()) for r in args.compare.split(",")):
                conf, port = sidecar_config(tmp, f"cmp{i}", None)
                path = os.environ.get("PYTHONPATH")
                env = dict(os.environ, PYTHONPATH=root + (os.pathsep + path if path else ""))
                # `python -P -m meshcore`: each tree's own entry point (the installed script
                # names the current tree's); -P keeps the working directory off sys.path.
                setups.append(Setup(f"meshcore run [{root}]", [sys.executable, "-P", "-m",
                                                                "meshcore",
                                                                "-c", str(conf), *run[1:]],
                                    port, env))
        else:
            conf, port = sidecar_config(tmp, "plain", None)
            setups.append(Setup("meshcore run (rr+retry+breaker)",
                                [MESHCORE, "-c", str(conf), *run[1:]], port))
            if not args.no_tls:
                ca = tmp / "ca"
                subprocess.run([MESHCORE, "-p", "tls", "ca", "init", "--trust-domain",
                                "bench.local", str(ca)], check=True, capture_output=True)
                conf, port = sidecar_config(tmp, "tls", ca)
                setups.append(Setup("meshcore run + tls", [MESHCORE, "-c", str(conf), *run[1:]],
                                    port))
        # As installed by pip (bytecode compiled at install): drop PYTHONDONTWRITEBYTECODE, and
        # one uncounted start of each writes the .pyc files an editable checkout lacks.
        for setup in setups:
            setup.env = {k: v for k, v in (setup.env or os.environ).items()
                         if k != "PYTHONDONTWRITEBYTECODE"}
            setup.measure(log)
            setup.ready_s.clear()
            setup.rss_mib.clear()
            setup.cpu_s.clear()
        for rnd in range(rounds):
            shift = rnd % len(setups)
            for setup in setups[shift:] + setups[:shift]:
                setup.measure(log)
            print(f"round {rnd + 1}/{rounds}: " + ", ".join(
                f"{s.label} {s.ready_s[-1] * 1000:.0f} ms {s.rss_mib[-1]:.1f} MiB" for s in setups
            ), flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    load = os.getloadavg()
    print(f"\n{rounds} interleaved rounds, backend {args.backend}, load average "
          f"{load[0]:.2f} {load[1]:.2f} {load[2]:.2f}; median (min-max)")
    head = (f"{'':34} {'ready ms':>16} {'CPU ms to ready':>16} {'idle RSS MiB':>18} "
            f"{'ready/bar':>10} {'CPU/bar':>8} {'RSS/bar':>8}")
    print(head)

    def fmt(t: tuple[float, float, float], k: float, d: int) -> str:
        return f"{t[0] * k:.{d}f} ({t[1] * k:.{d}f}-{t[2] * k:.{d}f})"

    for s in setups:
        ready, cpu, rss = summary(s.ready_s), summary(s.cpu_s), summary(s.rss_mib)
        ratios = ""
        if s.label.startswith("meshcore"):
            ratios = (f"{ready[0] / BAR_READY_S:10.2f} {cpu[0] / BAR_READY_S:8.2f} "
                      f"{rss[0] / BAR_RSS_MIB:8.2f}")
        print(f"{s.label[:34]:34} {fmt(ready, 1000, 0):>16} {fmt(cpu, 1000, 0):>16} "
              f"{fmt(rss, 1, 1):>18} {ratios}")
    print(f"bars: ready ≤ {BAR_READY_S * 1000:.0f} ms, idle RSS ≤ {BAR_RSS_MIB:.0f} MiB (ratio ≤ 1 "
          "meets it). On a loaded machine wall-clock ready time mostly measures the wait for a "
          "core: read the CPU time to ready beside it.")


if __name__ == "__main__":
    main()
