"""The plugin in a running mesh: library mode under steady load while the etcd leader is
killed (no request may fail: discovery is never on the request path and the snapshot stays),
the discovery state in `mesh.state()`, `check-config --resolve`, and config errors with key
paths."""

from __future__ import annotations

import json
from typing import Any

import anyio
import httpx
import pytest
from click.testing import CliRunner
from etcd_testkit import Admin, EtcdCluster

import meshcore

pytestmark = pytest.mark.anyio


def service(etcd: EtcdCluster, admin: Admin, **extra: Any) -> dict[str, Any]:
    return {"discovery": "etcd", "balancer": "round-robin",
            "etcd": {"endpoints": etcd.urls, "prefix": admin.prefix, "timeout": "0.5s",
                     "probe_interval": "0.3s", "probe_timeout": "0.3s", **extra}}


async def test_library_mode_under_load_while_the_leader_is_killed(etcd, admin, upstream, mesh_factory):
    servers = [upstream(f"u{i}") for i in range(3)]
    for server in servers[:2]:
        await admin.put_instance("orders", server.port)
    config = {"services": {"orders": service(etcd, admin)}}
    counts = {"ok": 0, "failed": 0}
    errors: list[str] = []
    async with mesh_factory(config, plugins=["etcd", "round-robin"]) as mesh, mesh.client() as client:
        upstream_ = mesh.upstream("orders")
        await upstream_.wait_ready(5)
        assert {ep.port for ep in upstream_.snapshot} == {s.port for s in servers[:2]}

        async def load(stop: anyio.Event) -> None:
            while not stop.is_set():
                try:
                    r = await client.get("http://orders/x")
                    counts["ok" if r.status_code == 200 else "failed"] += 1
                except httpx.HTTPError as exc:
                    counts["failed"] += 1
                    errors.append(repr(exc))

        stop = anyio.Event()
        async with anyio.create_task_group() as tg:
            for _ in range(4):
                tg.start_soon(load, stop)
            await anyio.sleep(0.3)
            leader = await anyio.to_thread.run_sync(etcd.leader)
            etcd.kill(leader)
            # While the cluster elects, the mesh serves from its snapshot; afterwards a new
            # instance arrives through the resumed watch.
            await admin.put_instance("orders", servers[2].port)
            with anyio.fail_after(5):
                while servers[2].port not in {ep.port for ep in upstream_.snapshot}:
                    await anyio.sleep(0.01)
            await anyio.sleep(0.3)
            stop.set()
        state = mesh.state()["services"]["orders"]
    assert counts["failed"] == 0, errors[:3]
    assert counts["ok"] > 100 and servers[2].requests > 0
    assert state["etcd"]["loads"] == 1  # no re-list, whatever the watch went through


async def test_discovery_state_in_mesh_state(etcd, admin, mesh_factory):
    await admin.put_instance("orders", 7001)
    config = {"services": {"orders": service(etcd, admin), "billing": service(etcd, admin)}}
    async with mesh_factory(config, plugins=["etcd", "round-robin"]) as mesh:
        await mesh.upstream("orders").wait_ready(5)
        await mesh.upstream("billing").wait_ready(5)
        with anyio.fail_after(5):  # the first answer comes from the range; the watch opens next
            while mesh.state()["services"]["orders"]["etcd"]["member"] is None:
                await anyio.sleep(0.01)
        state = json.loads(json.dumps(mesh.state()))["services"]
        assert [ep["id"] for ep in state["orders"]["endpoints"]] == ["127.0.0.1:7001"]
        assert state["billing"]["endpoints"] == [] and state["billing"]["discovery"]["state"] == "ok"
        shared = state["orders"]["etcd"]
        assert shared == state["billing"]["etcd"]  # one watch serves both
        assert shared["member"] in etcd.urls and shared["subscribed_services"] == 2
        assert (shared["loads"], shared["errors"], shared["prefix"]) == (1, 0, admin.prefix)


def write_config(tmp_path: Any, text: str) -> str:
    path = tmp_path / "mesh.toml"
    path.write_text(text)
    return str(path)


async def test_check_config_resolve(etcd, admin, tmp_path):
    await admin.put_instance("orders", 7001)
    await admin.put_instance("orders", 7002)
    path = write_config(tmp_path, f"""
[mesh]
plugins = ["etcd", "round-robin"]
[services.orders]
discovery = "etcd"
balancer = "round-robin"
[services.orders.etcd]
endpoints = {json.dumps(etcd.urls)}
prefix = "{admin.prefix}"
[services.empty]
discovery = "etcd"
[services.empty.etcd]
endpoints = {json.dumps(etcd.urls)}
prefix = "{admin.prefix}"
""")
    from meshcore._cli import cli  # the CLI entry point, as `meshcore` runs it

    result = await anyio.to_thread.run_sync(lambda: CliRunner().invoke(cli, ["check-config", path, "--resolve"]))
    assert result.exit_code == 0, result.output
    assert "orders: resolved 2 endpoints: 127.0.0.1:7001, 127.0.0.1:7002" in result.output
    assert "empty: resolved 0 endpoints" in result.output


@pytest.mark.parametrize(
    ("table", "path", "message"),
    [
        ({"endpoints": []}, "services.orders.etcd.endpoints", "at least one endpoint"),
        ({"endpoints": ["ftp://x:1"]}, "services.orders.etcd.endpoints", "http://host:port"),
        ({"prefix": "/abs"}, "services.orders.etcd.prefix", "leading '/'"),
        ({"probe_interval": "soon"}, "services.orders.etcd.probe_interval", "duration"),
        ({"backoff": "2s", "max_backoff": "1s"}, "services.orders.etcd", "max_backoff"),
        ({"endpoint": "x"}, "services.orders.etcd.endpoint", "unknown setting"),
    ],
)
async def test_config_errors_name_the_key_path(table, path, message, mesh_factory):
    config = {"services": {"orders": {"discovery": "etcd", "etcd": table}}}
    with pytest.raises(meshcore.ConfigError) as info:
        mesh_factory(config, plugins=["etcd"])
    assert path in str(info.value) and message in str(info.value)


@pytest.mark.parametrize(
    ("table", "path"),
    [({"ttl": "0.5s"}, "etcd-registration.ttl"), ({"meta": {"a": 1}}, "etcd-registration.meta"),
     ({"keepalive_ratio": 1.5}, "etcd-registration.keepalive_ratio")],
)
async def test_registration_config_errors_name_the_key_path(table, path, mesh_factory):
    with pytest.raises(meshcore.ConfigError, match=path.replace(".", r"\.")):
        mesh_factory({"etcd-registration": {"name": "x", "port": 1, **table}}, plugins=["etcd"])
