"""Interleaved A/B of two source trees: the bare engine proxy and one sidecar, per backend.

    python bench/ab.py --base /work/wt-engine-base [--new .] [--rounds 5] [--duration 3]
                       [--benches proxy,sidecar] [--backends uvloop,asyncio,trio]

A tree is a checkout of this repository (a `git worktree add` of the commit to compare
against is the easy way). For each backend both trees' proxies run side by side against the
same nginx upstreams and are measured in turn with wrk, the order alternating every round, so
a machine shared with other work slows both alike. `proxy` is `bench/engine_proxy.py`'s
engine-only proxy; `sidecar` is `bench/sidecar.py`'s one sidecar with round-robin, retry and
breaker. Printed per bench and backend: the median and spread (min-max, as a percentage of
the median) of req/s and CPU µs per request for each tree, the ratio new/base of the CPU
medians, and the median of the per-round ratios (each round's pair measured back to back,
the figure least moved by drifting load) and of the minimums. Run `--new` equal to `--base`
for the noise floor.
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import engine_proxy  # noqa: E402
import sidecar  # noqa: E402
from _nginx import nginx  # noqa: E402

from meshcore.testing import free_port, wait_listening  # noqa: E402

Sample = tuple[float, float]  # (req/s, CPU µs per request)


def python_path(tree: Path) -> str:
    """The tree's core and its plugins' packages, ahead of the installed (editable) ones."""
    plugins = sorted(str(p) for p in (tree / "plugins").iterdir() if p.is_dir())
    return ":".join([str(tree), *plugins])


def interleave(
    names: list[str], measure: Callable[[str], Sample], rounds: int
) -> dict[str, list[Sample]]:
    runs: dict[str, list[Sample]] = {name: [] for name in names}
    for rnd in range(rounds):
        for name in names if rnd % 2 == 0 else names[::-1]:
            runs[name].append(measure(name))
    return runs


def proxy_runs(
    trees: dict[str, Path], backend: str, args: argparse.Namespace
) -> dict[str, list[Sample]]:
    procs: list[subprocess.Popen[bytes]] = []
    try:
        with nginx(3) as upstreams:
            ports: dict[str, tuple[int, int]] = {}
            for name, tree in trees.items():
                port = free_port()
                proc = subprocess.Popen(
                    [
                        sys.executable,
                        str(tree / "bench" / "engine_proxy.py"),
                        "serve",
                        backend,
                        str(port),
                        *map(str, upstreams),
                    ]
                )
                procs.append(proc)
                wait_listening(port)
                ports[name] = (proc.pid, port)

            def measure(name: str) -> Sample:
                pid, port = ports[name]
                rps, cpu, errors = engine_proxy.measure(pid, port, args.duration)
                if errors:
                    print(f"  {name}: {errors}", flush=True)
                return rps, cpu

            return interleave(list(trees), measure, args.rounds)
    finally:
        for proc in procs:
            proc.terminate()
            proc.wait(10)


def sidecar_runs(
    trees: dict[str, Path], backend: str, args: argparse.Namespace
) -> dict[str, list[Sample]]:
    opts = argparse.Namespace(backend=backend, connections=32, duration=args.duration)
    bench = sidecar.Bench(opts)
    try:
        bench.nginx()
        apps = [f"127.0.0.1:{p}" for p in bench.app_ports]
        sides = {
            name: bench.sidecar(f"ab{i}", apps, root=python_path(tree))
            for i, (name, tree) in enumerate(trees.items())
        }

        def measure(name: str) -> Sample:
            pid, ports = sides[name]
            r = bench.measure(name, f"http://127.0.0.1:{ports['outbound']}/", "bench", [pid])
            if r["errors"]:
                print(f"  {name}: {r['errors']} errors", flush=True)
            return r["rps"], r["cpu_us"]

        return interleave(list(trees), measure, args.rounds)
    finally:
        bench.close()


def spread(values: list[float]) -> float:
    return (max(values) - min(values)) / statistics.median(values) * 100


def report(bench: str, backend: str, runs: dict[str, list[Sample]]) -> None:
    base, new = runs["base"], runs["new"]
    print(f"{bench:8} {backend:8}", end="")
    for name, samples in (("base", base), ("new", new)):
        rps = [s[0] for s in samples]
        cpu = [s[1] for s in samples]
        print(
            f"  {name} {statistics.median(rps):7.0f} req/s ±{spread(rps):4.1f}% "
            f"{statistics.median(cpu):6.1f} µs ±{spread(cpu):4.1f}%",
            end="",
        )
    cpu_ratio = statistics.median(s[1] for s in new) / statistics.median(s[1] for s in base)
    paired = statistics.median(n[1] / b[1] for b, n in zip(base, new, strict=True))
    best = min(s[1] for s in new) / min(s[1] for s in base)
    print(
        f"  CPU new/base {cpu_ratio:.3f} (paired median {paired:.3f}, min {best:.3f})", flush=True
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", type=Path, required=True, help="the tree to compare against")
    parser.add_argument("--new", type=Path, default=HERE.parent, help="default: this tree")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--duration", type=int, default=3, help="seconds per wrk run")
    parser.add_argument("--benches", default="proxy,sidecar")
    parser.add_argument("--backends", default="uvloop,asyncio,trio")
    args = parser.parse_args()
    trees = {"base": args.base.resolve(), "new": args.new.resolve()}
    benches = {"proxy": proxy_runs, "sidecar": sidecar_runs}
    print(
        f"base {trees['base']}  new {trees['new']}; wrk -t1 -c32 -d{args.duration}s, "
        f"{args.rounds} interleaved rounds; medians, spread = (max-min)/median",
        flush=True,
    )
    for bench, backend in itertools.product(args.benches.split(","), args.backends.split(",")):
        report(bench, backend, benches[bench](trees, backend, args))


if __name__ == "__main__":
    main()
