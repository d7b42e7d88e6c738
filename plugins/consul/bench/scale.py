"""The consul discovery at scale against the embedded registry, beside static discovery.

    python plugins/consul/bench/scale.py [--quick] [--rounds 3] [--services 1000] [--instances 10]
        [--changes 100] [--backend trio]

The registry runs in a process of its own (so its threads and CPU are its own), loaded with
`--services` x `--instances` instances, each with a passing TTL check (as meshcore's own
registration makes them). Interleaved rounds of:

- `meshcore run` with the same services on static discovery (the anchor) and on consul
  discovery: spawn -> /ready (bar 2 s), RSS once ready (bar 120 MiB), connections from the
  sidecar to the registry (bar 50, from /proc/<pid>/net/tcp), the registry's threads (bar 100);
- an in-process mesh on consul discovery with the same services: one check turned critical
  then passing again on a random instance of a random service, change -> snapshot (bar: median
  50 ms), and the registry's CPU per change (utime+stime of its process);
- one service alone, with its own blocking query (`shared_above` 16) and through the shared
  watch (`shared_above` 0): the rule for small counts.

Prints median and spread (min-max over rounds) and the ratio against each bar. `--quick`:
200 services, 1 round, 30 changes (well under 2 minutes).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import anyio
import httpx

import meshcore


def serve_registry(services: int, instances: int) -> None:
    """The registry process: load the catalog, print the URL, serve until stdin closes."""
    from meshcore_consul import Registry

    with Registry(port=0, open_access=True) as registry:
        for s in range(services):
            for i in range(instances):
                registry.catalog.register({
                    "Name": f"s{s}", "ID": f"s{s}-{i}", "Port": 10000 + i, "Address": "127.0.0.1",
                    "Check": {"TTL": "1h", "Status": "passing"},
                })
        print(registry.url, flush=True)
        sys.stdin.read()


class Registry:
    def __init__(self, services: int, instances: int) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, __file__, "--serve-registry", "--services", str(services), "--instances", str(instances)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout is not None
        self.url = self.proc.stdout.readline().strip()
        if not self.url:
            raise RuntimeError("the registry process did not start")
        self.port = int(self.url.rsplit(":", 1)[1])
        self.pid = str(self.proc.pid)

    def threads(self) -> int:
        return int(status_field(self.pid, "Threads"))

    def cpu(self) -> float:
        return cpu_seconds(self.pid)

    def stop(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        self.proc.wait(10)


def status_field(pid: str, name: str) -> str:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(name + ":"):
                return line.split()[1]
    raise KeyError(name)


def rss_mib(pid: str) -> float:
    return int(status_field(pid, "VmRSS")) / 1024


def cpu_seconds(pid: str) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def connections_to(port: int, pid: str) -> int:
    """Established TCP connections of process `pid` whose remote port is `port`."""
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            link = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if link.startswith("socket:["):
            inodes.add(link[8:-1])
    count = 0
    for table in (f"/proc/{pid}/net/tcp", f"/proc/{pid}/net/tcp6"):
        with open(table) as f:
            next(f)
            for line in f:
                fields = line.split()
                if fields[3] == "01" and fields[9] in inodes and int(fields[2].rsplit(":", 1)[1], 16) == port:
                    count += 1
    return count


def sidecar(registry: Registry, services: int, instances: int, kind: str, backend: str) -> dict[str, float]:
    """`meshcore run` with every service on `kind` discovery: spawn -> /ready, then RSS and
    connections to the registry one second later."""
    from meshcore.testing import free_port

    admin = free_port()
    lines = ["[mesh]", 'plugins = ["consul", "round-robin"]', "[sidecar]", f'outbound = "127.0.0.1:{free_port()}"',
             f'inbound = "127.0.0.1:{free_port()}"', f'admin = "127.0.0.1:{admin}"']
    endpoints = json.dumps([f"127.0.0.1:{10000 + i}" for i in range(instances)])
    for s in range(services):
        lines += [f"[services.s{s}]", f'discovery = "{kind}"', 'balancer = "round-robin"']
        if kind == "static":
            lines += [f"[services.s{s}.static]", f"endpoints = {endpoints}"]
        else:
            lines += [f"[services.s{s}.consul]", f'address = "{registry.url}"']
    with tempfile.TemporaryDirectory() as tmp:
        config = Path(tmp) / "mesh.toml"
        config.write_text("\n".join(lines) + "\n")
        start = time.perf_counter()
        registry_cpu = registry.cpu()
        proc = subprocess.Popen([str(Path(sys.executable).with_name("meshcore")), "-c", str(config), "run",
                                 "--backend", backend], stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT,
                                env={**os.environ, "MESHCORE_PLUGINS": ""})
        try:
            while True:
                if proc.poll() is not None:
                    raise RuntimeError(f"meshcore run exited with {proc.returncode}")
                try:
                    if httpx.get(f"http://127.0.0.1:{admin}/ready", timeout=1).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                time.sleep(0.01)
            ready = time.perf_counter() - start
            # CPU to ready: what load does not move much (wall time on a shared machine does).
            cpu, registry_cpu = cpu_seconds(str(proc.pid)), registry.cpu() - registry_cpu
            time.sleep(1.0)
            pid = str(proc.pid)
            return {"ready": ready, "rss": rss_mib(pid), "connections": connections_to(registry.port, pid),
                    "registry_threads": registry.threads(), "cpu": cpu, "registry_cpu": registry_cpu}
        finally:
            proc.terminate()
            proc.wait(10)


class Changes:
    """Wakes a waiter when one service's snapshot has (or lacks) one port."""

    def __init__(self) -> None:
        self.want: tuple[str, int, bool] | None = None
        self.event: anyio.Event | None = None

    @meshcore.hookimpl
    def meshcore_endpoints_changed(self, service: str, snapshot: Any) -> None:
        if self.want is not None and self.want[0] == service and (
            any(ep.port == self.want[1] for ep in snapshot.endpoints) == self.want[2]
        ):
            assert self.event is not None
            self.event.set()

    async def wait(self, service: str, port: int, present: bool, send: Any) -> float:
        self.want, self.event = (service, port, present), anyio.Event()
        start = time.perf_counter()
        await send()
        with anyio.fail_after(10):
            await self.event.wait()
        return time.perf_counter() - start


async def propagation(registry: Registry, services: int, instances: int, changes: int,
                      shared_above: int = 16) -> dict[str, Any]:
    """An in-process mesh on consul discovery: ready, then `changes` check flips."""
    config = {"services": {f"s{s}": {"discovery": "consul", "balancer": "round-robin",
                                     "consul": {"address": registry.url, "shared_above": shared_above}}
                           for s in range(services)}}
    watch = Changes()
    start = time.perf_counter()
    async with meshcore.Mesh(config, ["consul", "round-robin"], extra_plugins=[("changes", watch)]) as mesh:
        for upstream in mesh.upstreams.values():
            await upstream.wait_ready(60)
        ready = time.perf_counter() - start
        assert all(len(u.snapshot) == instances for u in mesh.upstreams.values())
        rng = random.Random(1)
        samples = []
        cpu, own = registry.cpu(), time.process_time()
        async with httpx.AsyncClient(base_url=registry.url, timeout=5) as client:
            for _ in range(changes):
                s, i = rng.randrange(services), rng.randrange(instances)
                for verb, present in (("fail", False), ("pass", True)):
                    async def send(verb: str = verb, s: int = s, i: int = i) -> None:
                        (await client.put(f"/v1/agent/check/{verb}/service:s{s}-{i}")).raise_for_status()

                    samples.append(await watch.wait(f"s{s}", 10000 + i, present, send))
                    await anyio.sleep(0.06)  # under the churn limit (20/s), so no change waits for a token
        cpu_per_change = (registry.cpu() - cpu) / (2 * changes)
        own_per_change = (time.process_time() - own) / (2 * changes)
    return {"ready": ready, "samples": samples, "cpu": cpu_per_change, "own_cpu": own_per_change}


def spread(values: list[float], scale: float = 1.0, unit: str = "") -> str:
    v = sorted(x * scale for x in values)
    return f"{statistics.median(v):.2f}{unit} ({v[0]:.2f}-{v[-1]:.2f})" if len(v) > 1 else f"{v[0]:.2f}{unit}"


def latency(samples: list[float]) -> str:
    v = sorted(samples)
    p90 = v[int(len(v) * 0.9)]
    return f"median {statistics.median(v) * 1000:.1f} ms, p90 {p90 * 1000:.1f} ms, max {v[-1] * 1000:.1f} ms"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--serve-registry", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--quick", action="store_true", help="200 services, 1 round, 30 changes")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--services", type=int, default=1000)
    parser.add_argument("--instances", type=int, default=10)
    parser.add_argument("--changes", type=int, default=100)
    parser.add_argument("--backend", default="asyncio", choices=("asyncio", "trio"))
    args = parser.parse_args()
    if args.serve_registry:
        serve_registry(args.services, args.instances)
        return
    if args.quick:
        args.services, args.rounds, args.changes = 200, 1, 30
    n, k = args.services, args.instances
    print(f"{n} services x {k} instances, {args.rounds} round(s), {args.backend}; load average {os.getloadavg()[0]:.2f}")
    registry = Registry(n, k)
    rows: dict[str, list[dict[str, Any]]] = {"static": [], "consul": []}
    props: list[dict[str, Any]] = []
    single: dict[str, list[float]] = {"service": [], "shared": []}
    small = Registry(1, 3)
    try:
        print(f"registry: {registry.threads()} threads, RSS {rss_mib(registry.pid):.0f} MiB before any client")
        for _ in range(args.rounds):
            for kind in ("static", "consul"):
                rows[kind].append(sidecar(registry, n, k, kind, args.backend))
            props.append(anyio.run(propagation, registry, n, k, args.changes, backend=args.backend))
            for mode, above in (("service", 16), ("shared", 0)):
                r = anyio.run(propagation, small, 1, 3, args.changes, above, backend=args.backend)
                single[mode] += r["samples"]
    finally:
        small.stop()
        registry.stop()
    st, co = rows["static"], rows["consul"]

    def col(rs: list[dict[str, Any]], key: str) -> list[float]:
        return [r[key] for r in rs]

    ready = statistics.median(col(co, "ready"))
    rss = statistics.median(col(co, "rss"))
    conns = max(col(co, "connections"))
    threads = max(col(co, "registry_threads"))
    samples = [x for p in props for x in p["samples"]]
    med = statistics.median(samples)
    print(f"static  `meshcore run`: ready {spread(col(st, 'ready'), unit=' s')}, RSS {spread(col(st, 'rss'), unit=' MiB')}")
    print(f"consul  `meshcore run`: ready {spread(col(co, 'ready'), unit=' s')} ({ready / 2:.2f}x the 2 s bar, "
          f"{ready / statistics.median(col(st, 'ready')):.1f}x static), RSS {spread(col(co, 'rss'), unit=' MiB')} "
          f"({rss / 120:.2f}x the 120 MiB bar), {conns} connections to the registry (bar 50), "
          f"registry threads {threads} (bar 100)")
    print(f"consul  `meshcore run` CPU to ready: sidecar {spread(col(co, 'cpu'), unit=' s')} "
          f"(static {spread(col(st, 'cpu'), unit=' s')}), registry {spread(col(co, 'registry_cpu'), unit=' s')}")
    print(f"consul  in-process mesh: ready {spread([p['ready'] for p in props], unit=' s')}; check flip -> snapshot "
          f"{latency(samples)} over {len(samples)} changes ({med / 0.05:.2f}x the 50 ms bar); registry CPU per change "
          f"{spread([p['cpu'] for p in props], 1000, ' ms')}, mesh process CPU per change (with the bench's PUT) "
          f"{spread([p['own_cpu'] for p in props], 1000, ' ms')}")
    for mode, values in single.items():
        print(f"one service, {'own blocking query' if mode == 'service' else 'shared watch'}: {latency(values)}")


if __name__ == "__main__":
    main()
