"""`meshcore run --workers N`: req/s and CPU per request of 1 worker against N, with wrk.

The bar in issue 21 ("Every core"): on a 2-core machine, 2 workers give ≥ 1.4x the req/s of
1 worker at 64 connections, with CPU per request within 1.1x. Both sidecars (the same config as
bench/sidecar.py's one-sidecar row: round-robin + retry + breaker over three nginx servers) run
side by side and are measured in turn, alternating the order each round; the table has the
median and the spread (min-max) of each. CPU per request is the user+system time of the
supervisor and every worker over the run divided by the requests wrk completed. On a shared
machine, read the figures beside the load average printed with them.

    python bench/workers.py [--workers 2] [--rounds 5] [--duration 4] [--connections 64]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).parent))
from sidecar import MESHCORE, Bench, cpu_seconds, free_port, wait_http, wrk  # noqa: E402


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


def measure(bench: Bench, url: str, procs: list[int]) -> dict:
    args = bench.args
    wrk(url, args.connections, 1, "bench")  # warm-up
    before = sum(cpu_seconds(p) for p in procs)
    result = wrk(url, args.connections, args.duration, "bench")
    used = sum(cpu_seconds(p) for p in procs) - before
    result["cpu_us"] = used / max(result["requests"], 1) * 1e6
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--duration", type=float, default=4)
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument("--backend", default="uvloop")
    args = parser.parse_args()
    args.no_tls = True
    bench = Bench(args)
    try:
        bench.nginx()
        sides = {1: start(bench, "one", 1), args.workers: start(bench, "many", args.workers)}
        procs = {n: pids(pid, ports) for n, (pid, ports) in sides.items()}
        runs: dict[int, list[dict]] = {n: [] for n in sides}
        load = [os.getloadavg()[0]]
        for rnd in range(args.rounds):
            order = list(sides) if rnd % 2 == 0 else list(sides)[::-1]
            for n in order:
                url = f"http://127.0.0.1:{sides[n][1]['outbound']}/"
                r = measure(bench, url, procs[n])
                runs[n].append(r)
                print(f"round {rnd + 1}  {n} worker(s)  {r['rps']:8.0f} req/s  {r['cpu_us']:6.1f} µs/req"
                      f"  errors {r['errors']}", flush=True)
            load.append(os.getloadavg()[0])
    finally:
        bench.close()

    def med(n: int, key: str) -> float:
        return statistics.median(r[key] for r in runs[n])

    def spread(n: int, key: str) -> str:
        values = [r[key] for r in runs[n]]
        return f"{min(values):.0f}-{max(values):.0f}"

    print(f"\nwrk -t1 -c{args.connections} -d{args.duration:g}s x {args.rounds} interleaved rounds, "
          f"backend {args.backend}, {os.cpu_count()} cores, load average (1 min) "
          f"{min(load):.1f}-{max(load):.1f} during the run")
    for n in runs:
        print(f"{n} worker(s): {med(n, 'rps'):8.0f} req/s ({spread(n, 'rps')})  "
              f"{med(n, 'cpu_us'):6.1f} µs/req ({spread(n, 'cpu_us')})")
    many = args.workers
    ratios = sorted(a["rps"] / b["rps"] for a, b in zip(runs[many], runs[1]))
    print(f"{many} workers / 1: req/s {med(many, 'rps') / med(1, 'rps'):.2f}x "
          f"(per round {ratios[0]:.2f}-{ratios[-1]:.2f}), "
          f"CPU per request {med(many, 'cpu_us') / med(1, 'cpu_us'):.2f}x")


if __name__ == "__main__":
    main()
