"""`meshcore run --workers N`: req/s and CPU per request of 1 worker against N, with wrk,
beside HAProxy doing the same work on 1 thread against N threads and N processes (the anchor).

The bar in issue 21 ("Every core"): on a 2-core machine, 2 workers give ≥ 1.4x the req/s of
1 worker at 64 connections, with CPU per request within 1.1x. Both sidecars (the same config as
bench/sidecar.py's one-sidecar row: round-robin + retry + breaker over three nginx servers) and
the anchor HAProxies (bench/sidecar.py's "HAProxy same work" config with `nbthread 1`, with
`nbthread N`, and N one-thread processes on one port, which HAProxy binds with SO_REUSEPORT as
the workers do) run side by side and are measured in turn, the order rotating each round; the
table has the median and the spread (min-max) of each. Nothing is pinned: the point is what a
second core adds. CPU per request is the user+system time of every process of the row (the
supervisor and every worker; every HAProxy) over the run divided by the requests wrk completed.

The anchor answers whether the bar is reachable on the machine at all, since wrk and nginx
share the same cores. Printed with it, per row: wrk's and nginx's CPU per request and how busy
the whole machine was (/proc/stat: on a shared machine, other work counts too), and the
ceiling those allow: 1 worker holds at most one core, N workers at most N cores and at most
every core less what wrk and nginx take per request. On a shared machine, read the figures
beside the load average printed with them.

`--counts`: instead of the rounds, one measured run per row with `perf stat -p` on each
process (and `perf record` of epoll_wait's returns), printed per request: CPU (user and
system), context switches, migrations, each syscall, epoll_wait's returns with their mean
events and share empty, and the connections each process holds. These counts move much less
with the machine's load than req/s does. Needs perf with tracepoints (root, or
kernel.perf_event_paranoid -1). bench/read_miss.py prices one of them: a read that misses.

    python bench/workers.py [--quick] [--rounds 4] [--duration 4] [--workers 2] [--no-anchor]
    python bench/workers.py --counts [--duration 4] [--no-anchor]
"""

from __future__ import annotations

import argparse
import os
import re
import resource
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).parent))
from sidecar import (  # noqa: E402
    MESHCORE,
    TICKS,
    Bench,
    cpu_seconds,
    free_port,
    load_average,
    print_table,
    rss_mib,
    wait_http,
    wrk,
)

# What a worker's loop asks of the kernel (libuv/uvloop, asyncio and trio between them).
SYSCALLS = ("epoll_wait", "epoll_pwait", "epoll_ctl", "read", "write", "recvfrom", "sendto",
            "readv", "writev", "sendmsg", "recvmsg", "accept4", "connect", "close", "getpid",
            "getppid", "clock_gettime", "futex", "ioctl", "setsockopt", "getsockopt", "getsockname",
            "getpeername", "socket")


def children(pid: int) -> list[int]:
    found = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        found += [int(c) for c in (task / "children").read_text().split()]
    return found


def machine_busy() -> tuple[float, float]:
    """(busy, total) jiffies of every core since boot, from /proc/stat."""
    values = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = values[3] + values[4]  # idle + iowait
    return sum(values[:8]) - idle, sum(values[:8])


class WorkersBench(Bench):
    """`Bench` whose measure also takes the load generator's and nginx's CPU per request (the
    part of the machine a proxy cannot use) and how busy the whole machine was."""

    nginx_pids: list[int]

    def nginx(self) -> None:
        super().nginx()
        master = self.procs[-1].pid
        self.nginx_pids = [master, *children(master)]

    def measure(self, label: str, url: str, host: str | None, pids: list[int],
                script: str | None = None) -> dict:
        args = self.args
        wrk(url, args.connections, 1, host, script)  # warm-up
        before = [cpu_seconds(p) for p in pids]
        nginx_before = sum(cpu_seconds(p) for p in self.nginx_pids)
        gen_before = resource.getrusage(resource.RUSAGE_CHILDREN)
        busy_before, total_before = machine_busy()
        result = wrk(url, args.connections, args.duration, host, script)
        busy, total = machine_busy()
        gen = resource.getrusage(resource.RUSAGE_CHILDREN)  # wrk's, now that it was waited for
        n = max(result["requests"], 1)
        result["cpu_us"] = (sum(cpu_seconds(p) for p in pids) - sum(before)) / n * 1e6
        result["other_us"] = (
            sum(cpu_seconds(p) for p in self.nginx_pids) - nginx_before
            + gen.ru_utime + gen.ru_stime - gen_before.ru_utime - gen_before.ru_stime
        ) / n * 1e6
        result["busy"] = (busy - busy_before) / max(total - total_before, 1)
        result["rss"] = sum(rss_mib(p) for p in pids)
        result["label"] = label
        result["load"] = load_average()
        return result


def start(bench: Bench, name: str, workers: int) -> tuple[int, dict[str, int]]:
    ports = {k: free_port() for k in ("outbound", "inbound", "admin")}
    eps = ", ".join(f'"127.0.0.1:{p}"' for p in bench.app_ports)
    conf = bench.tmp / f"{name}.toml"
    conf.write_text(
        '[mesh]\nplugins = ["round-robin", "retry", "breaker"]\n'
        '[defaults]\nbalancer = "round-robin"\nresilience = ["retry", "breaker"]\n[sidecar]\n'
        + "".join(f'{k} = "127.0.0.1:{v}"\n' for k, v in ports.items())
        + f'[services.bench]\ndiscovery = "static"\n[services.bench.static]\nendpoints = [{eps}]\n'
    )
    proc = bench.spawn([MESHCORE, "-c", str(conf), "run", "--backend", bench.args.backend,
                        "--log-level", "warning", "--workers", str(workers)])
    wait_http(f"http://127.0.0.1:{ports['admin']}/ready")
    return proc.pid, ports


def pids(supervisor: int, ports: dict[str, int]) -> list[int]:
    """The supervisor and its workers (one process when --workers 1)."""
    state = httpx.get(f"http://127.0.0.1:{ports['admin']}/state", timeout=5).json()
    return [supervisor] + [w["pid"] for w in state.get("workers", ()) if w["pid"]]


def connections_to(pid: int, port: int) -> int:
    """Established TCP connections process `pid` holds on local `port` (its accepted ones)."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    count = 0
    for table in ("tcp", "tcp6"):
        for line in Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]:
            parts = line.split()
            local_port = int(parts[1].rsplit(":", 1)[1], 16)
            if local_port == port and parts[3] == "01" and parts[9] in inodes:  # ESTABLISHED
                count += 1
    return count


def counts(bench: Bench, label: str, url: str, host: str | None, procs: list[int]) -> None:
    """One measured wrk run with perf attached to each process; per-request counts printed."""
    args = bench.args
    events = ["context-switches", "cpu-migrations"]
    events += [f"syscalls:sys_enter_{name}" for name in SYSCALLS]
    port = int(url.rsplit(":", 1)[1].strip("/"))
    wrk(url, args.connections, 1, host)  # warm-up
    stats, records = [], []
    for pid in procs:
        out = bench.tmp / f"perf-{pid}.csv"
        stats.append((pid, out, subprocess.Popen(
            ["perf", "stat", "-x,", "-o", str(out), "-e", ",".join(events), "-p", str(pid)],
            stderr=subprocess.DEVNULL)))
        data = bench.tmp / f"perf-{pid}.data"
        records.append((pid, data, subprocess.Popen(
            ["perf", "record", "-q", "-o", str(data), "-e", "syscalls:sys_exit_epoll_wait",
             "-e", "syscalls:sys_exit_epoll_pwait", "-p", str(pid)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)))
    held: dict[int, int] = {}
    time.sleep(1.0)  # perf attaches before wrk starts (idle meanwhile: a few wake-ups a second)
    times = {pid: split_cpu(pid) for pid in procs}
    wrk_proc = subprocess.Popen(["wrk", "-t1", f"-c{args.connections}", f"-d{max(1, round(args.duration))}s",
                                 *(["-H", f"Host: {host}"] if host else []), url],
                                stdout=subprocess.PIPE, text=True)
    time.sleep(min(1.0, args.duration / 2))
    for pid in procs:
        held[pid] = connections_to(pid, port)
    out_text = wrk_proc.communicate()[0]
    times = {pid: tuple(b - a for a, b in zip(times[pid], split_cpu(pid))) for pid in procs}
    requests = int(re.search(r"(\d+) requests in", out_text).group(1))
    for _, _, proc in stats + records:
        proc.send_signal(signal.SIGINT)
    for _, _, proc in stats + records:
        proc.wait(30)
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out_text).group(1))
    print(f"\n{label}: {requests} requests, {rps:.0f} req/s, load {os.getloadavg()[0]:.1f}; "
          "per request (counts under 0.001 left out):")
    totals: dict[str, float] = {}
    cpu_total = 0.0
    for pid, out, _ in stats:
        values: dict[str, float] = {}
        for line in out.read_text().splitlines():
            parts = line.split(",")
            if len(parts) > 3 and parts[0] and parts[0][0].isdigit():
                values[parts[2].removeprefix("syscalls:sys_enter_")] = float(parts[0])
        for k, v in values.items():
            totals[k] = totals.get(k, 0.0) + v
        returns = events_per_return(records, pid, requests)
        shown = "  ".join(f"{k} {v / requests:.3f}" for k, v in values.items()
                          if v / requests >= 0.001)
        user, system = (t / requests * 1e6 for t in times[pid])
        cpu_total += user + system
        print(f"  pid {pid}: connections {held[pid]:3d}  CPU {user + system:.1f} µs "
              f"(user {user:.1f}, system {system:.1f})  "
              f"epoll returns {returns}  {shown}")
    shown = "  ".join(f"{k} {v / requests:.3f}" for k, v in totals.items()
                      if v / requests >= 0.001)
    print(f"  all: CPU {cpu_total:.1f} µs  {shown}")


def split_cpu(pid: int) -> tuple[float, float]:
    """(user, system) CPU seconds of `pid` so far, from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[11]) / TICKS, int(fields[12]) / TICKS


def events_per_return(records: list, pid: int, requests: int) -> str:
    """epoll_wait's returns for `pid` per request, the mean events each, the share empty."""
    data = next(d for p, d, _ in records if p == pid)
    try:
        out = subprocess.run(["perf", "script", "-i", str(data), "-F", "trace"],
                             capture_output=True, text=True, timeout=120).stdout
    except (OSError, subprocess.TimeoutExpired):
        return "?"
    rets = [int(m, 16) for m in re.findall(r"0x([0-9a-f]+)", out)]
    rets = [r for r in rets if r < 1 << 31]
    if not rets:
        return "0"
    empty = sum(r == 0 for r in rets) / len(rets)
    return f"{len(rets) / requests:.3f} (mean {statistics.mean(rets):.1f} events, {empty:.0%} empty)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--duration", type=float, default=4)
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument("--backend", default="uvloop")
    parser.add_argument("--quick", action="store_true", help="2 rounds of 2 s")
    parser.add_argument("--no-anchor", action="store_true", help="the meshcore rows only")
    parser.add_argument("--counts", action="store_true", help="perf counts per request instead")
    args = parser.parse_args()
    if args.quick:
        args.rounds, args.duration = 2, 2
    args.no_tls = True
    many = args.workers
    one_label, many_label = "meshcore 1 worker", f"meshcore {many} workers"
    bench = WorkersBench(args)
    try:
        bench.nginx()
        sides = {one_label: start(bench, "one", 1), many_label: start(bench, "many", many)}
        cases = [(label, f"http://127.0.0.1:{ports['outbound']}/", "bench", pids(pid, ports))
                 for label, (pid, ports) in sides.items()]
        if not args.no_anchor:
            for label, threads, processes in (("HAProxy same work nbthread 1", 1, 1),
                                              (f"HAProxy same work nbthread {many}", many, 1),
                                              (f"HAProxy same work {many} processes", 1, many)):
                port, procs = 0, []
                for _ in range(processes):
                    pid, port = bench.haproxy(same_work=True, threads=threads, port=port)
                    procs.append(pid)
                cases.append((label, f"http://127.0.0.1:{port}/", None, procs))
        if args.counts:
            for label, url, host, procs in cases:
                counts(bench, label, url, host, procs)
            return
        runs = bench.rounds([(*case, None) for case in cases])
    finally:
        bench.close()

    loads = [r["load"] for rs in runs.values() for r in rs]
    print(f"\nwrk -t1 -c{args.connections} -d{args.duration:g}s x {args.rounds} interleaved rounds, "
          f"backend {args.backend}, nothing pinned, {os.cpu_count()} cores, load average (1 min) "
          f"{min(loads):.1f}-{max(loads):.1f} during the run")
    print_table(runs)

    def med(label: str, key: str) -> float:
        return statistics.median(r[key] for r in runs[label])

    print(f"\n{'path':44} {'wrk + nginx µs/req':>18} {'machine busy':>12}")
    for label in runs:
        print(f"{label:44} {med(label, 'other_us'):18.1f} {med(label, 'busy'):11.0%}")

    def ratio(label: str, base: str) -> str:
        pairs = sorted(a["rps"] / b["rps"] for a, b in zip(runs[label], runs[base]))
        return (f"{label} / {base}: req/s {med(label, 'rps') / med(base, 'rps'):.2f}x "
                f"(per round {pairs[0]:.2f}-{pairs[-1]:.2f}), "
                f"CPU per request {med(label, 'cpu_us') / med(base, 'cpu_us'):.2f}x")

    print()
    print(ratio(many_label, one_label))
    if not args.no_anchor:
        print(ratio(f"HAProxy same work nbthread {many}", "HAProxy same work nbthread 1"))
        print(ratio(f"HAProxy same work {many} processes", "HAProxy same work nbthread 1"))
    # What the machine allows at these CPU costs: one worker is held to one core; N workers
    # to N cores and to every core less what wrk and nginx take per request.
    cores = os.cpu_count() or 1
    one_cpu, many_cpu = med(one_label, "cpu_us"), med(many_label, "cpu_us")
    other = statistics.median(r["other_us"] for label in (one_label, many_label) for r in runs[label])
    best_one = min(1e6 / one_cpu, cores * 1e6 / (other + one_cpu))
    best_many = min(many * 1e6 / many_cpu, cores * 1e6 / (other + many_cpu))
    best_same = min(many * 1e6 / one_cpu, cores * 1e6 / (other + one_cpu))
    print(f"ceiling from the CPU per request ({cores} cores all busy, wrk + nginx {other:.1f} µs/req): "
          f"{many} workers / 1 ≤ {best_many / best_one:.2f}x at the measured CPU per request, "
          f"≤ {best_same / best_one:.2f}x if {many} workers cost what 1 does")
    print("bar (issue 21: ≥ 1.4x the req/s, CPU per request ≤ 1.1x); the HAProxy rows show what "
          "this machine allows a proxy that costs less per request")


if __name__ == "__main__":
    main()
