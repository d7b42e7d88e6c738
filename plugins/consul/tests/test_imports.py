"""The consul discovery and registration talk to the agent on meshcore's own HTTP client: a
sidecar on consul discovery never imports httpx (8 MiB and 2-3 ms of CPU per read; a sidecar
with 1,000 services reads each of them at start). Checked in a fresh interpreter."""

from __future__ import annotations

import subprocess
import sys

CODE = """
import sys, anyio, meshcore
from meshcore_consul import Registry

async def main():
    with Registry(port=0, open_access=True) as registry:
        registry.catalog.register({"Name": "api", "ID": "api-1", "Port": 7001, "Address": "127.0.0.1",
                                   "Check": {"TTL": "1h", "Status": "passing"}})
        config = {"services": {"api": {"discovery": "consul", "consul": {"address": registry.url}}},
                  "consul-registration": {"name": "web", "port": 8080, "agent": registry.url}}
        async with meshcore.Mesh(config, ["consul", "round-robin"]) as mesh:
            await mesh.upstreams["api"].wait_ready(10)
            assert [ep.port for ep in mesh.upstreams["api"].snapshot] == [7001]
            assert any(s.name == "web" for s in registry.catalog.services.values())
    print("httpx" in sys.modules)

anyio.run(main)
"""


def test_consul_discovery_and_registration_do_not_import_httpx():
    out = subprocess.run([sys.executable, "-c", CODE], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"
