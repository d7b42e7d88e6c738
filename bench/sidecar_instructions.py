"""Machine instructions per request through one sidecar, under valgrind's callgrind.

    python bench/sidecar_instructions.py [--compare /work/main,.] [--quick]
    python bench/sidecar_instructions.py --cases get,get1k,post1k --requests 2000

CPU time per request moves by tens of percent on a shared machine; the instructions one
request costs do not (runs differ by about 1 %). One sidecar per source tree (round-robin,
retry and breaker, as `bench/sidecar.py` runs it, on `--backend`) runs under callgrind with
instrumentation off; nginx (the same locations as bench/sidecar.py's) is the upstream. For each
case a client sends `--warmup` requests, then callgrind counts the next `--requests`
(`callgrind_control -i on`, then a dump); printed: instructions per request per tree and case,
the trees interleaved case by case, and the ratio of the second tree to the first.
`--keep DIR` copies each counted dump there (`TREE-CASE-ROUND.callgrind`), for per-function
counts: `callgrind_annotate --inclusive=no DIR/FILE | head -40`.

The client keeps `--connections` keep-alive connections and sends one request on each before
reading the answers, so the sidecar sees a few requests per pass of its loop, as under wrk.
`--cpu`: no callgrind; the sidecars' CPU time (utime+stime from /proc) over `--requests`
requests instead, the trees alternating in short rounds (the order swapped every round) so
they see the same load; printed: the median, the range and the ratio of the medians and of
each round's pair. Load moves it; the instruction count it does not.

Cases: `get` (`/`, a 2-byte answer), `get1k` (a 1 KiB static file), `post1k` and `post16k`
(a body of that size to a location that answers 2 bytes, as `--bodies`' POST rows).
"""

from __future__ import annotations

import argparse
import re
import shutil
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from sidecar import TICKS, Bench, load_average  # noqa: E402

CASES = {
    "get": ("GET", "/", 0),
    "get1k": ("GET", "/b/1k", 0),
    "post1k": ("POST", "/post", 1024),
    "post16k": ("POST", "/post", 16384),
}


class CallgrindBench(Bench):
    """bench/sidecar.py's processes, the sidecars (the pinned ones) under callgrind."""

    def spawn(self, cmd: list[str], pinned: bool = False, **kwargs) -> subprocess.Popen:  # type: ignore[no-untyped-def]
        if pinned and getattr(self.args, "cpu", False):
            return super().spawn(cmd, pinned=True, **kwargs)
        if pinned:
            out = self.tmp / f"callgrind.out.{len(self.procs)}"
            cmd = ["valgrind", "--tool=callgrind", "--instr-atstart=no",
                   f"--callgrind-out-file={out}", sys.executable, *cmd]
        return super().spawn(cmd, **kwargs)


def request_bytes(method: str, path: str, size: int) -> bytes:
    head = f"{method} {path} HTTP/1.1\r\nHost: bench\r\n"
    if size:
        head += f"Content-Length: {size}\r\nContent-Type: application/octet-stream\r\n"
    return head.encode() + b"\r\n" + b"x" * size


def read_response(sock: socket.socket, buf: bytearray) -> None:
    """Read one response (Content-Length framed) off `sock`; what follows stays in `buf`."""
    while True:
        end = buf.find(b"\r\n\r\n")
        if end >= 0:
            match = re.search(rb"(?im)^content-length:\s*(\d+)", bytes(buf[:end]))
            if match is None:
                raise RuntimeError(f"response without Content-Length: {bytes(buf[:end])!r}")
            total = end + 4 + int(match.group(1))
            if not buf.startswith(b"HTTP/1.1 200"):
                raise RuntimeError(f"unexpected response: {bytes(buf[:end])!r}")
            if len(buf) >= total:
                del buf[:total]
                return
        data = sock.recv(65536)
        if not data:
            raise RuntimeError("the sidecar closed the connection")
        buf += data


def drive(port: int, data: bytes, requests: int, connections: int) -> None:
    socks = [socket.create_connection(("127.0.0.1", port)) for _ in range(connections)]
    bufs = [bytearray() for _ in socks]
    try:
        for _ in range(max(1, requests // connections)):
            for s in socks:
                s.sendall(data)
            for s, buf in zip(socks, bufs):
                read_response(s, buf)
    finally:
        for s in socks:
            s.close()


def count(pid: int, out_prefix: Path, port: int, data: bytes, args: argparse.Namespace,
          keep_as: str = "") -> float:
    drive(port, data, args.warmup, args.connections)
    before = set(out_prefix.parent.glob(out_prefix.name + ".*"))
    subprocess.run(["callgrind_control", "-i", "on", str(pid)], check=True, capture_output=True)
    drive(port, data, args.requests, args.connections)
    subprocess.run(["callgrind_control", "-d", str(pid)], check=True, capture_output=True)
    subprocess.run(["callgrind_control", "-i", "off", str(pid)], check=True, capture_output=True)
    deadline = time.monotonic() + 30
    while True:
        new = set(out_prefix.parent.glob(out_prefix.name + ".*")) - before
        totals = [m for f in new for m in re.findall(r"^totals: (\d+)", f.read_text(), re.M)]
        if totals:
            break
        if time.monotonic() > deadline:
            raise RuntimeError("no callgrind dump")
        time.sleep(0.2)
    if args.keep and keep_as:
        Path(args.keep).mkdir(parents=True, exist_ok=True)
        for f in new:
            shutil.copy(f, Path(args.keep) / f"{keep_as}.callgrind")
    # `totals` of a dump is the part's own count once instrumentation was switched off and on
    # again (its `summary` is then not).
    requests = max(1, args.requests // args.connections) * args.connections
    return int(totals[0]) / requests


def user_system(pid: int) -> tuple[float, float]:
    """The process's user and system CPU seconds (/proc/PID/stat)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[11]) / TICKS, int(fields[12]) / TICKS


def cpu_rounds(sides: list[tuple[str, int, Path, int]], cases: list[str],
               args: argparse.Namespace) -> None:
    """CPU µs per request of each tree, the trees alternating round by round."""
    for case in cases:
        data = request_bytes(*CASES[case])
        for _, _, _, port in sides:
            drive(port, data, args.warmup, args.connections)
        runs: dict[tuple[str, str], list[float]] = {}
        loads = []
        for rnd in range(args.rounds):
            order = sides if rnd % 2 == 0 else sides[::-1]
            for root, pid, _, port in order:
                before = user_system(pid)
                drive(port, data, args.requests, args.connections)
                after = user_system(pid)
                for kind, used in (("user", after[0] - before[0]), ("user+system",
                                   sum(after) - sum(before))):
                    runs.setdefault((kind, root), []).append(used / args.requests * 1e6)
            loads.append(load_average())
        print(f"{case}: CPU µs per request ({args.requests} requests x {args.rounds} rounds, "
              f"{args.connections} connections, load average {min(loads):.1f}-{max(loads):.1f})")
        for kind in ("user", "user+system"):
            for root, *_ in sides:
                values = runs[(kind, root)]
                print(f"  {kind:12} {root:36} {statistics.median(values):6.1f} "
                      f"({min(values):.1f}-{max(values):.1f})")
            if len(sides) == 2:
                a, b = (runs[(kind, root)] for root, *_ in sides)
                pairs = statistics.median([y / x for x, y in zip(a, b)])
                print(f"  {kind:12} second / first: {statistics.median(b) / statistics.median(a):.3f} "
                      f"(per-round pairs {pairs:.3f})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--compare", metavar="A,B", default=".", help="source trees (comma list)")
    parser.add_argument("--cases", default="get,get1k,post1k,post16k")
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--warmup", type=int, default=400)
    parser.add_argument("--connections", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--backend", default="uvloop", choices=["trio", "asyncio", "uvloop"])
    parser.add_argument("--quick", action="store_true", help="1,000 requests per case")
    parser.add_argument("--cpu", action="store_true", help="CPU time per request, no callgrind")
    parser.add_argument("--pin", default="auto", help="with --cpu: core for the sidecars")
    parser.add_argument("--keep", metavar="DIR", help="copy each counted callgrind dump here")
    args = parser.parse_args()
    if not args.cpu:
        args.pin = "none"
    if args.quick:
        args.requests, args.warmup = 1000, 300
    roots = [str(Path(r).resolve()) for r in args.compare.split(",")]
    cases = args.cases.split(",")
    bench = CallgrindBench(args)
    try:
        bench.nginx()
        sides = []
        for i, root in enumerate(roots):
            index = len(bench.procs)
            pid, ports = bench.sidecar(f"cg{i}", [f"127.0.0.1:{p}" for p in bench.app_ports],
                                       root=root)
            sides.append((root, pid, bench.tmp / f"callgrind.out.{index}", ports["outbound"]))
        if args.cpu:
            cpu_rounds(sides, cases, args)
            return
        results: dict[tuple[str, str], list[float]] = {}
        for rnd in range(args.rounds):
            for case in cases:
                data = request_bytes(*CASES[case])
                for root, pid, prefix, port in sides:
                    keep_as = f"{Path(root).name}-{case}-{rnd + 1}"
                    per = count(pid, prefix, port, data, args, keep_as)
                    results.setdefault((root, case), []).append(per)
                    print(f"round {rnd + 1}  {case:8} {root:30} {per / 1000:8.1f} k instructions/request",
                          flush=True)
        print(f"\ninstructions per request (callgrind; {args.requests} requests after {args.warmup}, "
              f"{args.connections} connections, backend {args.backend}; median of {args.rounds})")
        print(f"{'case':8} " + " ".join(f"{Path(r).name or r:>14}" for r in roots)
              + ("   second/first" if len(roots) == 2 else ""))
        for case in cases:
            meds = [statistics.median(results[(r, case)]) for r in roots]
            ratio = f"   {meds[1] / meds[0]:.3f}" if len(roots) == 2 else ""
            print(f"{case:8} " + " ".join(f"{m / 1000:13.1f}k" for m in meds) + ratio)
    finally:
        bench.close()


if __name__ == "__main__":
    main()
