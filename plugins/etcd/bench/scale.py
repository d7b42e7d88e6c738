"""The etcd discovery at scale and its change -> snapshot latency, on a real 3-member cluster.

    python plugins/etcd/bench/scale.py [--backend trio] [--services 1000] [--instances 10]
        [--changes 200] [--consul]

Starts a 3-member etcd cluster on loopback (tests/etcd_testkit.py), writes `--services` x
`--instances` instance keys, then starts a mesh with one `etcd` service per name and prints:

- ready: mesh entered -> every service has its first snapshot (bar: 2 s);
- connections from this process to etcd once ready (bar: 4);
- RSS of this process once ready (bar: 100 MiB);
- propagation of one change to one service's snapshot, put -> snapshot, median and p99 over
  `--changes` changes, each on a random service (bar: median 50 ms);
- change -> snapshot latency with a single service (median, p99).

`--consul` adds the same figures for the consul plugin against its embedded registry;
`--sidecar` the ready time, connections and RSS of a `meshcore run` process with the same
services.
"""

from __future__ import annotations

import argparse
import base64
import gc
import json
import os
import random
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import anyio
import httpx

import meshcore

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from etcd_testkit import EtcdCluster  # noqa: E402

PREFIX = "bench/services/"


def b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


def value(port: int) -> str:
    return json.dumps({"Addr": f"127.0.0.1:{port}", "Metadata": {"meshcore": 1, "weight": 1}})


class FirstBalancer:
    @meshcore.hookimpl
    def meshcore_kinds(self) -> list[meshcore.Kind]:
        return [meshcore.Kind("bench-first", "balancer", {})]

    @meshcore.hookimpl
    def meshcore_balancer(self, kind: str, settings: Any, upstream: Any) -> Any:
        if kind != "bench-first":
            return None

        class First:
            def pick(self, snapshot: Any, request: Any, exclude: Any) -> Any:
                return snapshot.endpoints[0]

        return First()


class Changes:
    """Wakes a waiter when one service's snapshot gains a port."""

    def __init__(self) -> None:
        self.want: tuple[str, int] | None = None
        self.event: anyio.Event | None = None

    @meshcore.hookimpl
    def meshcore_endpoints_changed(self, service: str, snapshot: Any) -> None:
        if self.want is not None and self.want[0] == service and any(
            ep.port == self.want[1] for ep in snapshot.endpoints
        ):
            assert self.event is not None
            self.event.set()

    async def wait(self, service: str, port: int, send: Any) -> float:
        self.want, self.event = (service, port), anyio.Event()
        start = time.perf_counter()
        await send()
        with anyio.fail_after(10):
            await self.event.wait()
        return time.perf_counter() - start


def rss_mib(pid: str = "self") -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def connections_to(ports: set[int], pid: str = "self") -> int:
    """Established TCP connections of process `pid` whose remote port is one of `ports`."""
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
                remote_port = int(fields[2].rsplit(":", 1)[1], 16)
                if fields[3] == "01" and fields[9] in inodes and remote_port in ports:
                    count += 1
    return count


async def load(cluster: EtcdCluster, services: int, instances: int) -> None:
    """Every instance key, 128 puts per transaction (etcd's default --max-txn-ops)."""
    puts = [{"request_put": {"key": b64(f"{PREFIX}s{s}/i{i}"), "value": b64(value(10000 + i))}}
            for s in range(services) for i in range(instances)]
    async with httpx.AsyncClient(timeout=10) as client:
        for start in range(0, len(puts), 128):
            r = await client.post(cluster.urls[0] + "/v3/kv/txn", json={"success": puts[start:start + 128]})
            r.raise_for_status()


async def put(client: httpx.AsyncClient, url: str, key: str, port: int) -> None:
    r = await client.post(url + "/v3/kv/put", json={"key": b64(key), "value": b64(value(port))})
    r.raise_for_status()


def etcd_service(cluster: EtcdCluster) -> dict[str, Any]:
    return {"discovery": "etcd", "balancer": "bench-first", "etcd": {"endpoints": cluster.urls, "prefix": PREFIX}}


def summary(samples: list[float]) -> str:
    samples = sorted(samples)
    p99 = samples[min(len(samples) - 1, int(len(samples) * 0.99))]
    return f"median {statistics.median(samples) * 1000:.1f} ms, p99 {p99 * 1000:.1f} ms, max {samples[-1] * 1000:.1f} ms"


async def scale(cluster: EtcdCluster, services: int, instances: int, changes: int) -> dict[str, Any]:
    await load(cluster, services, instances)
    config = {"services": {f"s{s}": etcd_service(cluster) for s in range(services)}}
    watch = Changes()
    gc.collect()
    rss_before = rss_mib()
    mesh = meshcore.Mesh(config, ["etcd"], extra_plugins=[("first", FirstBalancer()), ("changes", watch)])
    start = time.perf_counter()
    async with mesh:
        for upstream in mesh.upstreams.values():
            await upstream.wait_ready(30)
        ready = time.perf_counter() - start
        assert all(len(u.snapshot) == instances for u in mesh.upstreams.values())
        await anyio.sleep(2.5)  # the watch open and one status probe (every 2 s) made
        etcd_ports = {m.client_port for m in cluster.members}
        conns = connections_to(etcd_ports)
        rss = rss_mib()
        rng = random.Random(1)
        samples = []
        async with httpx.AsyncClient(timeout=5) as client:
            for n in range(changes):
                name = f"s{rng.randrange(services)}"
                port = 20000 + n

                async def send(name: str = name, port: int = port, url: str = cluster.urls[n % 3]) -> None:
                    await put(client, url, f"{PREFIX}{name}/new{port}", port)

                samples.append(await watch.wait(name, port, send))
                await anyio.sleep(0.01)
    return {"ready": ready, "connections": conns, "rss": rss, "rss_before": rss_before, "propagation": samples}


async def latency(cluster: EtcdCluster, changes: int) -> list[float]:
    config = {"services": {"lat": etcd_service(cluster)}}
    watch = Changes()
    async with meshcore.Mesh(config, ["etcd"], extra_plugins=[("first", FirstBalancer()), ("changes", watch)]) as mesh:
        await mesh.upstream("lat").wait_ready(10)
        samples = []
        async with httpx.AsyncClient(timeout=5) as client:
            for n in range(changes):
                port = 30000 + n

                async def send(port: int = port) -> None:
                    await put(client, cluster.urls[0], f"{PREFIX}lat/i{port}", port)

                samples.append(await watch.wait("lat", port, send))
                await anyio.sleep(0.01)
        return samples


def sidecar_scale(cluster: EtcdCluster, services: int, backend: str) -> dict[str, Any]:
    """`meshcore run` with one etcd service per name (the keys are loaded already): spawn ->
    /ready, then its RSS and connections to etcd, read from /proc."""
    import subprocess
    import tempfile

    from meshcore.testing import free_port

    admin_port = free_port()
    lines = ["[mesh]", 'plugins = ["etcd"]', "[sidecar]", f'outbound = "127.0.0.1:{free_port()}"',
             f'inbound = "127.0.0.1:{free_port()}"', f'admin = "127.0.0.1:{admin_port}"']
    for s in range(services):
        lines += [f"[services.s{s}]", 'discovery = "etcd"', f"[services.s{s}.etcd]",
                  f"endpoints = {json.dumps(cluster.urls)}", f'prefix = "{PREFIX}"']
    with tempfile.TemporaryDirectory() as tmp:
        config = Path(tmp) / "mesh.toml"
        config.write_text("\n".join(lines) + "\n")
        meshcore_bin = str(Path(sys.executable).with_name("meshcore"))
        start = time.perf_counter()
        subprocess.run([meshcore_bin, "--help"], stdout=subprocess.DEVNULL, check=True)
        baseline = time.perf_counter() - start  # Python start and the core's imports
        start = time.perf_counter()
        proc = subprocess.Popen([meshcore_bin, "-c", str(config), "run", "--backend", backend],
                                stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT,
                                env={**os.environ, "MESHCORE_PLUGINS": ""})
        try:
            while True:
                if proc.poll() is not None:
                    raise RuntimeError(f"meshcore run exited with {proc.returncode}")
                try:
                    if httpx.get(f"http://127.0.0.1:{admin_port}/ready", timeout=1).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                time.sleep(0.02)
            ready = time.perf_counter() - start
            time.sleep(2.5)  # one status probe made
            pid = str(proc.pid)
            etcd_ports = {m.client_port for m in cluster.members}
            return {"ready": ready, "baseline": baseline, "connections": connections_to(etcd_ports, pid),
                    "rss": rss_mib(pid)}
        finally:
            proc.terminate()
            proc.wait(10)


async def consul_scale(services: int, instances: int) -> dict[str, Any]:
    from meshcore_consul import Registry

    with Registry(port=0) as registry:
        for s in range(services):
            for i in range(instances):
                registry.catalog.register({"Name": f"s{s}", "ID": f"s{s}-{i}", "Port": 10000 + i,
                                           "Address": "127.0.0.1"})
        config = {"services": {f"s{s}": {"discovery": "consul", "balancer": "bench-first",
                                         "consul": {"address": registry.url}} for s in range(services)}}
        gc.collect()
        start = time.perf_counter()
        async with meshcore.Mesh(config, ["consul"], extra_plugins=[("first", FirstBalancer())]) as mesh:
            for upstream in mesh.upstreams.values():
                await upstream.wait_ready(60)
            ready = time.perf_counter() - start
            await anyio.sleep(0.5)
            return {"ready": ready, "connections": connections_to({registry.port}), "rss": rss_mib()}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--backend", default="asyncio", choices=("asyncio", "trio"))
    parser.add_argument("--services", type=int, default=1000)
    parser.add_argument("--instances", type=int, default=10)
    parser.add_argument("--changes", type=int, default=200)
    parser.add_argument("--consul", action="store_true", help="also the consul plugin against its embedded registry")
    parser.add_argument("--sidecar", action="store_true", help="also a `meshcore run` process with the same services")
    args = parser.parse_args()
    import shutil

    binary = shutil.which("etcd")
    if binary is None:
        sys.exit("etcd is not installed (Debian: apt-get install etcd-server)")
    if args.consul:
        # First, in a fresh process state, so its RSS is not on top of etcd's figures.
        c = anyio.run(consul_scale, args.services, args.instances, backend=args.backend)
        print(f"consul (embedded registry), {args.services} services x {args.instances}: ready {c['ready']:.2f} s, "
              f"{c['connections']} connections, RSS {c['rss']:.0f} MiB")
    cluster = EtcdCluster.create(binary).start()
    try:
        lat = anyio.run(latency, cluster, args.changes, backend=args.backend)
        print(f"etcd, one service ({args.backend}): put -> snapshot {summary(lat)} ({len(lat)} changes)")
        r = anyio.run(scale, cluster, args.services, args.instances, args.changes, backend=args.backend)
        print(f"etcd, {args.services} services x {args.instances} instances ({args.backend}): "
              f"ready {r['ready']:.2f} s (bar 2 s), {r['connections']} connections to etcd (bar 4), "
              f"RSS {r['rss']:.0f} MiB (bar 100; {r['rss_before']:.0f} before the mesh), "
              f"propagation {summary(r['propagation'])} (bar: median 50 ms)")
        if args.sidecar:
            sc = sidecar_scale(cluster, args.services, args.backend)
            print(f"etcd, `meshcore run` with {args.services} services ({args.backend}): process spawned -> /ready "
                  f"{sc['ready']:.2f} s (of which `meshcore --help` alone takes {sc['baseline']:.2f} s), "
                  f"{sc['connections']} connections to etcd, "
                  f"RSS {sc['rss']:.0f} MiB")
    finally:
        cluster.stop()


if __name__ == "__main__":
    main()
