"""`meshcore check-config --resolve`: resolves each dns service once, NXDOMAIN is a clear error."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

import meshcore

pytestmark = pytest.mark.integration


def check_config(tmp_path: Path, name: str, port: int) -> subprocess.CompletedProcess[str]:
    if "round-robin" not in meshcore.installed_plugins():
        pytest.skip("the CLI needs an installed balancer plugin (meshcore-servicemesh-roundrobin)")
    config = tmp_path / "mesh.toml"
    config.write_text(
        f"""
[mesh]
plugins = ["dns", "round-robin"]

[defaults]
balancer = "round-robin"

[services.orders]
discovery = "dns"
[services.orders.dns]
name = "{name}"
port = 8080
nameservers = ["127.0.0.1:{port}"]
timeout = "300ms"
lifetime = "600ms"

[services.static-one]
discovery = "static"
[services.static-one.static]
endpoints = ["127.0.0.1:9"]
"""
    )
    command = Path(sys.executable).with_name("meshcore")  # the installed console script
    return subprocess.run(
        [str(command), "-c", str(config), "check-config", "--resolve"],
        capture_output=True, text=True, timeout=30, check=False,
    )


def test_resolve_prints_endpoints(dnsmasq, tmp_path):
    dnsmasq.set_hosts({"orders.mesh.test": ["127.0.0.21", "127.0.0.22"]})
    result = check_config(tmp_path, "orders.mesh.test", dnsmasq.port)
    assert result.returncode == 0, result.stderr
    assert "orders: resolved 2 endpoints: 127.0.0.21:8080, 127.0.0.22:8080" in result.stdout
    assert "static-one: static cannot resolve ahead of time (skipped)" in result.stdout
    assert ": ok (2 services" in result.stdout


def test_nxdomain_is_a_clear_startup_error(dnsmasq, tmp_path):
    result = check_config(tmp_path, "nope.mesh.test", dnsmasq.port)
    assert result.returncode == 1
    assert "orders: error: NXDOMAIN: nope.mesh.test A does not exist" in result.stderr
    assert "never resolved" in result.stderr
    assert f"127.0.0.1:{dnsmasq.port}" in result.stderr
