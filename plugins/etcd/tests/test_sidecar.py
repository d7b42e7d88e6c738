"""`meshcore run` (a real sidecar process, on the test's backend) discovering through etcd,
under steady load while the etcd leader is killed: no request fails, and an instance added
after the election is used."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import anyio
import httpx
import pytest
from etcd_testkit import Admin, EtcdCluster

from meshcore.testing import free_port

pytestmark = pytest.mark.anyio

MESHCORE = str(Path(sys.executable).with_name("meshcore"))


def write_config(path: Path, ports: dict[str, int], etcd: EtcdCluster, admin: Admin) -> None:
    path.write_text(f"""
[mesh]
plugins = ["etcd", "round-robin"]
[sidecar]
outbound = "127.0.0.1:{ports['outbound']}"
inbound = "127.0.0.1:{ports['inbound']}"
admin = "127.0.0.1:{ports['admin']}"
[services.orders]
discovery = "etcd"
balancer = "round-robin"
[services.orders.etcd]
endpoints = {json.dumps(etcd.urls)}
prefix = "{admin.prefix}"
timeout = "0.5s"
probe_interval = "0.3s"
probe_timeout = "0.3s"
""")


async def test_sidecar_under_load_while_the_leader_is_killed(etcd, admin, upstream, tmp_path, anyio_backend_name):
    servers = [upstream(f"u{i}") for i in range(3)]
    for server in servers[:2]:
        await admin.put_instance("orders", server.port)
    ports = {name: free_port() for name in ("outbound", "inbound", "admin")}
    config = tmp_path / "mesh.toml"
    write_config(config, ports, etcd, admin)
    log = open(tmp_path / "sidecar.log", "wb")  # noqa: SIM115 - closed below
    proc = subprocess.Popen([MESHCORE, "-c", str(config), "run", "--backend", anyio_backend_name],
                            stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "MESHCORE_PLUGINS": ""})
    counts = {"ok": 0, "failed": 0}
    failures: list[str] = []
    try:
        async with httpx.AsyncClient(timeout=5) as client:
            with anyio.fail_after(15):
                while True:
                    assert proc.poll() is None, (tmp_path / "sidecar.log").read_text()
                    try:
                        if (await client.get(f"http://127.0.0.1:{ports['admin']}/ready")).status_code == 200:
                            break
                    except httpx.HTTPError:
                        pass
                    await anyio.sleep(0.05)
            outbound = f"http://127.0.0.1:{ports['outbound']}/x"

            async def load(stop: anyio.Event) -> None:
                while not stop.is_set():
                    try:
                        r = await client.get(outbound, headers={"Host": "orders"})
                        if r.status_code == 200:
                            counts["ok"] += 1
                        else:
                            counts["failed"] += 1
                            failures.append(f"{r.status_code} {r.text[:100]}")
                    except httpx.HTTPError as exc:
                        counts["failed"] += 1
                        failures.append(repr(exc))

            stop = anyio.Event()
            async with anyio.create_task_group() as tg:
                for _ in range(4):
                    tg.start_soon(load, stop)
                await anyio.sleep(0.3)
                leader = await anyio.to_thread.run_sync(etcd.leader)
                etcd.kill(leader)
                await admin.put_instance("orders", servers[2].port)
                with anyio.fail_after(5):
                    while servers[2].requests == 0:
                        await anyio.sleep(0.02)
                await anyio.sleep(0.3)
                stop.set()
            state = (await client.get(f"http://127.0.0.1:{ports['admin']}/state")).json()
    finally:
        proc.terminate()
        proc.wait(10)
        log.close()
    assert counts["failed"] == 0, failures[:3]
    assert counts["ok"] > 50
    assert state["services"]["orders"]["etcd"]["loads"] == 1


async def test_sidecar_registers_its_instance_through_the_register_hook(etcd, admin, tmp_path, anyio_backend_name):
    """`[sidecar] service` with an `[etcd-registration]` that names no instance: the sidecar's
    own instance (advertised inbound address) goes on a lease, and leaves when it stops."""
    ports = {name: free_port() for name in ("outbound", "inbound", "admin")}
    config = tmp_path / "mesh.toml"
    config.write_text(f"""
[mesh]
plugins = ["etcd"]
[sidecar]
service = "orders"
outbound = "127.0.0.1:{ports['outbound']}"
inbound = "127.0.0.1:{ports['inbound']}"
admin = "127.0.0.1:{ports['admin']}"
app = "127.0.0.1:{free_port()}"
app_health_interval = "0s"
[etcd-registration]
endpoints = {json.dumps(etcd.urls)}
prefix = "{admin.prefix}"
timeout = "0.5s"
""")
    log = open(tmp_path / "sidecar.log", "wb")  # noqa: SIM115 - closed below
    proc = subprocess.Popen([MESHCORE, "-c", str(config), "run", "--backend", anyio_backend_name],
                            stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "MESHCORE_PLUGINS": ""})
    try:
        with anyio.fail_after(15):
            while True:
                assert proc.poll() is None, (tmp_path / "sidecar.log").read_text()
                keys = {k: v for k, v in (await admin.contents()).items() if "/orders/" in k}
                if keys:
                    break
                await anyio.sleep(0.05)
        [(key, value)] = keys.items()
        assert key == admin.key("orders", f"orders-127.0.0.1-{ports['inbound']}-g1")
        assert json.loads(value)["Addr"] == f"127.0.0.1:{ports['inbound']}"
        assert json.loads(value)["Metadata"]["meta"] == {"admin": f"127.0.0.1:{ports['admin']}"}
    finally:
        proc.terminate()
        proc.wait(10)
        log.close()
    assert not [k for k in await admin.contents() if "/orders/" in k], "the lease was revoked on stop"
