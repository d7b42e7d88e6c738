"""System calls per request through one sidecar and through the same-work HAProxy.

    python bench/sidecar_syscalls.py [--compare /work/main,.] [--cases get,post1k]
    python bench/sidecar_syscalls.py --duration 3 --connections 32 --rounds 2

bench/sidecar.py's setup (nginx with three server blocks; HAProxy doing the sidecar's work,
`nbthread 1`; one `meshcore run` per source tree with round-robin, retry and breaker; every
proxy pinned to one core), driven by `wrk -t1 -c32` keep-alive GETs of `/` (a 2-byte answer)
and POSTs of 1 KiB to `/post` (`--cases`: also get1k, get4k, get16k, get64k, static files
as `--bodies` serves them, and post16k). During each run `perf record -e raw_syscalls:sys_exit` follows
the proxy: every system call it makes, with its result. Printed per proxy and case, divided
by the requests wrk completed: each call's count, how many failed with EAGAIN, how many
ready events each `epoll_wait` returned, the bytes per `sendto`/`recvfrom`/`writev`, minor
page faults (`perf stat` would need a second pass: read from /proc), and the proxy's user and
system CPU per request (wall-clock dependent; the counts are what to read; `--untraced`: that
CPU split alone, without perf's own cost in it, the proxies' rounds interleaved).

The counts move little with the machine's load, except the waits: a proxy that finds more
ready sockets per pass of its loop waits fewer times per request, so `epoll_wait` per request
and the EAGAIN reads follow the load (read them beside the load average printed).

Needs perf (linux-perf) with tracepoint access (root, or perf_event_paranoid ≤ -1), wrk,
nginx, /usr/sbin/haproxy, taskset.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import os
import re
import signal
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from sidecar import TICKS, Bench, load_average, wrk  # noqa: E402

EAGAIN = -11
_UNISTD = "/usr/include/x86_64-linux-gnu/asm/unistd_64.h"


def syscall_names() -> dict[int, str]:
    names: dict[int, str] = {}
    for path in (_UNISTD, "/usr/include/asm/unistd_64.h"):
        if os.path.exists(path):
            for m in re.finditer(r"#define __NR_(\w+)\s+(\d+)", Path(path).read_text()):
                names[int(m.group(2))] = m.group(1)
            break
    return names


def proc_stat(pid: int) -> tuple[float, float, int]:
    """(user s, system s, minor faults) of `pid`, its threads included."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[11]) / TICKS, int(fields[12]) / TICKS, int(fields[7])


def socket_kinds(pid: int, listen_port: int, upstream_ports: set[int]) -> dict[int, str]:
    """fd -> "client" (accepted on `listen_port`) or "upstream" (to one of `upstream_ports`)."""
    peers: dict[str, tuple[int, int]] = {}
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError):
            for line in Path(table).read_text().splitlines()[1:]:
                f = line.split()
                peers[f[9]] = (int(f[1].rsplit(":", 1)[1], 16), int(f[2].rsplit(":", 1)[1], 16))
    kinds: dict[int, str] = {}
    for fd in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(OSError):
            link = os.readlink(f"/proc/{pid}/fd/{fd}")
            m = re.fullmatch(r"socket:\[(\d+)\]", link)
            if m and m.group(1) in peers:
                local, remote = peers[m.group(1)]
                if remote in upstream_ports:
                    kinds[int(fd)] = "upstream"
                elif local == listen_port and remote:
                    kinds[int(fd)] = "client"
    return kinds


# Calls whose first argument is a descriptor worth naming (client or upstream side).
_FD_CALLS = {"recvfrom", "sendto", "read", "write", "readv", "writev", "sendmsg", "recvmsg",
             "setsockopt", "getsockopt", "ioctl"}


_EPOLL_OPS = {1: "ADD", 2: "DEL", 3: "MOD"}


def traced(pid: int, out: Path, url: str, host: str | None, script: str | None,
           args: argparse.Namespace, upstream_ports: set[int], names: dict[int, str]) -> dict:
    """One wrk run with perf recording every system call `pid` makes; per-request tallies."""
    wrk(url, args.connections, 1, host, script)  # warm-up
    if args.untraced:  # the CPU split alone, without perf's cost in it
        before = proc_stat(pid)
        result = wrk(url, args.connections, args.duration, host, script)
        after = proc_stat(pid)
        n = max(result["requests"], 1)
        return {
            "requests": result["requests"], "rps": result["rps"], "load": load_average(),
            "calls": collections.Counter(), "again": collections.Counter(),
            "returned": collections.Counter(), "lost": 0,
            "user_us": (after[0] - before[0]) / n * 1e6,
            "system_us": (after[1] - before[1]) / n * 1e6, "faults": (after[2] - before[2]) / n,
        }
    perf = subprocess.Popen(
        ["perf", "record", "-q", "-m", "8192", "-e", "raw_syscalls:sys_enter,raw_syscalls:sys_exit",
         "-p", str(pid), "-o", str(out)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    time.sleep(0.5)  # perf attaches
    listen_port = int(url.split(":")[2].split("/")[0])
    kinds: dict[int, str] = {}
    snapshot = threading.Timer(args.duration / 2, lambda: kinds.update(
        socket_kinds(pid, listen_port, upstream_ports)))
    snapshot.start()
    before = proc_stat(pid)
    result = wrk(url, args.connections, args.duration, host, script)
    after = proc_stat(pid)
    snapshot.join()
    perf.send_signal(signal.SIGINT)
    perf.wait(30)
    text = subprocess.run(["perf", "script", "-i", str(out), "-F", "tid,trace", "--show-lost-events"],
                          capture_output=True, text=True, check=True).stdout
    lost = sum(int(n) for n in re.findall(r"LOST (\d+) events", text))
    out.unlink()
    # keys: (call name, side) with side "client", "upstream" or "" (not a socket of either)
    calls: collections.Counter[tuple[str, str]] = collections.Counter()
    again: collections.Counter[tuple[str, str]] = collections.Counter()
    returned: collections.Counter[tuple[str, str]] = collections.Counter()
    entered: dict[str, tuple[str, str]] = {}
    for m in re.finditer(r"^\s*(\d+)\s+NR (\d+) (?:\(([\w, ]+)\)|= (-?\d+))", text, re.M):
        tid, nr = m.group(1), int(m.group(2))
        name = names.get(nr, f"NR {nr}")
        if m.group(3) is not None:  # enter: its arguments
            argv = [int(a, 16) for a in m.group(3).split(", ")]
            side = kinds.get(argv[0], "") if name in _FD_CALLS else ""
            if name == "epoll_ctl":  # epoll_ctl(epfd, op, fd, ...): the operation, the third
                name += " " + _EPOLL_OPS.get(argv[1], str(argv[1]))
                side = kinds.get(argv[2], "")
            entered[tid] = (name, side)
            continue
        key = entered.pop(tid, (name, ""))
        ret = int(m.group(4))
        calls[key] += 1
        if ret == EAGAIN:
            again[key] += 1
        elif ret > 0:
            returned[key] += ret
    n = max(result["requests"], 1)
    return {
        "requests": result["requests"], "rps": result["rps"], "load": load_average(),
        "calls": calls, "again": again, "returned": returned,
        "user_us": (after[0] - before[0]) / n * 1e6, "system_us": (after[1] - before[1]) / n * 1e6,
        "faults": (after[2] - before[2]) / n, "lost": lost,
    }


def report(label: str, runs: list[dict]) -> None:
    total = sum(r["requests"] for r in runs)
    calls: collections.Counter[tuple[str, str]] = collections.Counter()
    again: collections.Counter[tuple[str, str]] = collections.Counter()
    returned: collections.Counter[tuple[str, str]] = collections.Counter()
    for r in runs:
        calls.update(r["calls"])
        again.update(r["again"])
        returned.update(r["returned"])
    loads = [r["load"] for r in runs]
    print(f"\n{label}: {total} requests in {len(runs)} run(s), {statistics.median([r['rps'] for r in runs]):.0f} "
          f"req/s, load average {min(loads):.1f}-{max(loads):.1f}")
    print(f"  all system calls {sum(calls.values()) / total:6.3f} per request; user "
          f"{statistics.median([r['user_us'] for r in runs]):.1f} µs, system "
          f"{statistics.median([r['system_us'] for r in runs]):.1f} µs, minor faults "
          f"{statistics.median([r['faults'] for r in runs]):.3f}"
          + (f"; perf LOST {sum(r['lost'] for r in runs)} events: counts too low" if any(
              r["lost"] for r in runs) else ""))
    for key, count in sorted(calls.items(), key=lambda kv: (-kv[1], kv[0])):
        per = count / total
        if per < 0.0005:
            continue
        name, side = key
        extra = ""
        if again[key]:
            extra += f"  EAGAIN {again[key] / total:.3f}"
        if name.startswith("epoll_") and "wait" in name:
            extra += f"  {returned[key] / max(count - again[key], 1):.1f} events per return"
        elif name in ("sendto", "recvfrom", "writev", "readv", "read", "write", "sendmsg", "recvmsg"):
            extra += f"  {returned[key] / max(count - again[key], 1):.0f} bytes per call"
        print(f"    {name + (' ' + side if side else ''):22} {per:7.3f}{extra}")


def post_script(kib: int) -> str:
    return ('wrk.method = "POST"\n'
            f'wrk.body = string.rep("x", {kib * 1024})\n'
            'wrk.headers["Content-Type"] = "application/octet-stream"\n')


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--compare", metavar="A,B", default=".", help="source trees (comma list)")
    parser.add_argument("--cases", default="get,post1k")
    parser.add_argument("--duration", type=float, default=3)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--backend", default="uvloop", choices=["trio", "asyncio", "uvloop"])
    parser.add_argument("--pin", default="auto", help="core for every proxy (taskset -c)")
    parser.add_argument("--no-haproxy", action="store_true")
    parser.add_argument("--untraced", action="store_true",
                        help="no perf: only user and system CPU per request")
    args = parser.parse_args()
    names = syscall_names()
    roots = [str(Path(r).resolve()) for r in args.compare.split(",")]
    bench = Bench(args)
    try:
        bench.nginx()
        apps = [f"127.0.0.1:{p}" for p in bench.app_ports]
        proxies: list[tuple[str, int, str, str | None]] = []
        if not args.no_haproxy:
            pid, port = bench.haproxy(same_work=True)
            proxies.append(("HAProxy same work", pid, f"http://127.0.0.1:{port}", None))
        for i, root in enumerate(roots):
            pid, ports = bench.sidecar(f"sc{i}", apps, root=root)
            proxies.append((f"sidecar {root}", pid, f"http://127.0.0.1:{ports['outbound']}", "bench"))
        cases: dict[str, tuple[str, str | None]] = {"get": ("/", None)}
        for kib in (1, 4, 16, 64):
            cases[f"get{kib}k"] = (f"/b/{kib}k", None)
        for kib in (1, 16):
            post = bench.tmp / f"post{kib}k.lua"
            post.write_text(post_script(kib))
            cases[f"post{kib}k"] = ("/post", str(post))
        runs: dict[tuple[str, str], list[dict]] = collections.defaultdict(list)
        for rnd in range(args.rounds):
            for case in args.cases.split(","):
                path, script = cases[case]
                order = proxies[rnd % len(proxies):] + proxies[: rnd % len(proxies)]
                for label, pid, url, host in order:
                    r = traced(pid, bench.tmp / "perf.data", url + path, host, script, args,
                               set(bench.app_ports), names)
                    runs[(case, label)].append(r)
                    print(f"round {rnd + 1} {case:7} {label:40} {r['requests']:7d} requests "
                          f"load {r['load']:.1f}", flush=True)
        print(f"\nwrk -t1 -c{args.connections} -d{args.duration:g}s, backend {args.backend}, "
              f"proxies pinned: {' '.join(bench.pin) or 'no'}; per request:")
        for (case, label), rs in runs.items():
            report(f"{case} {label}", rs)
    finally:
        bench.close()


if __name__ == "__main__":
    main()
