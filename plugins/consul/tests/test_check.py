"""`meshcore check` lines from the consul plugin (its `meshcore_checks`): each agent the config
names answers, each consul service has a passing instance — against the embedded registry."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import meshcore_consul
import pytest
from consul_testkit import register

import meshcore

pytestmark = pytest.mark.anyio


def consul_config(url: str, **extra: Any) -> meshcore.MeshConfig:
    data = {
        "services": {
            "orders": {"discovery": "consul", "consul": {"address": url}},
            "users": {"discovery": "consul", "consul": {"address": url, "service": "accounts"}},
            "local": {"discovery": "static", "static": {"endpoints": ["127.0.0.1:1"]}},
        },
        **extra,
    }
    config = meshcore.MeshConfig.from_dict(data, source="mesh.toml")
    return config.resolve(meshcore.Plugins(["static", "consul"]))


async def lines(config: meshcore.MeshConfig) -> list[meshcore.Check]:
    return [await probe() for probe in meshcore_consul.meshcore_checks(config)]


def dead_url() -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{sock.getsockname()[1]}"


async def test_agent_reachable_and_services_with_and_without_instances(registry):
    register(registry, "orders", 7001, ttl="30s", status="passing")
    register(registry, "accounts", 7002, ttl="30s", status="critical")
    agent, orders, users = await lines(consul_config(registry.url))
    assert agent == meshcore.Check(f"consul agent {registry.url}", True, f"reachable, leader {registry.address}")
    assert orders.ok and orders.title == "consul service 'orders' (services.orders)"
    assert orders.detail == "1 instance: 127.0.0.1:7001"
    assert not users.ok and users.title == "consul service 'accounts' (services.users)"
    assert users.detail == "no passing instance" and "[consul-registration]" in users.fix


async def test_an_unreachable_agent_names_the_keys_that_point_at_it():
    url = dead_url()
    config = consul_config(url, **{"consul-registration": {"name": "web", "port": 8080, "agent": url}})
    agent, orders, _ = await lines(config)
    assert not agent.ok and agent.detail.startswith("unreachable: EndpointConnectError")
    assert "meshcore -p consul registry" in agent.fix
    assert ("services.orders.consul.address, services.users.consul.address, "
            "consul-registration.agent") in agent.fix
    assert not orders.ok and orders.detail.startswith("query failed: ")


async def test_no_lines_without_consul_services():
    config = meshcore.MeshConfig.from_dict({}).resolve(meshcore.Plugins(["static", "consul"]))
    assert meshcore_consul.meshcore_checks(config) == []


def test_meshcore_check_exits_non_zero_when_the_agent_is_down(tmp_path: Path):
    config = tmp_path / "mesh.toml"
    config.write_text(f'[mesh]\nplugins = ["consul"]\n[services.orders]\ndiscovery = "consul"\n'
                      f'[services.orders.consul]\naddress = "{dead_url()}"\n')
    result = subprocess.run(
        [sys.executable, "-m", "meshcore", "check", "--no-listeners", "-c", str(config)],
        capture_output=True, text=True, timeout=60, check=False,
    )
    assert result.returncode == 1
    assert "✗ consul agent http://127.0.0.1:" in result.stdout
    assert "    fix: start the Consul agent, or the embedded registry" in result.stdout
