"""Library mode in one file: three local upstreams, one mesh service, an httpx client.

    pip install . ./plugins/roundrobin
    python examples/library_mode.py

Runs on asyncio by default; `python examples/library_mode.py trio` runs the same on trio.
"""

from __future__ import annotations

import sys
from collections import Counter

import anyio

import meshcore
from meshcore.testing import UpstreamServer

CONFIG = """
[mesh]
plugins = ["round-robin"]

[services.orders]
discovery = "static"
balancer = "round-robin"
[services.orders.static]
endpoints = [{endpoints}]
"""


async def main(servers: list[UpstreamServer]) -> None:
    endpoints = ", ".join(f'"{s.address}"' for s in servers)
    config = meshcore.MeshConfig.from_dict(
        __import__("tomllib").loads(CONFIG.format(endpoints=endpoints)), source="example"
    )
    async with meshcore.Mesh(config) as mesh:
        async with mesh.client() as client:
            answered: Counter[str] = Counter()
            for _ in range(9):
                response = await client.get("http://orders/items/7")
                answered[response.headers["x-upstream"]] += 1
            print("9 requests to http://orders/items/7 were answered by:", dict(sorted(answered.items())))
            print("service state:", mesh.state()["services"]["orders"]["discovery"]["state"])


if __name__ == "__main__":
    backend = sys.argv[1] if len(sys.argv) > 1 else "asyncio"
    servers = [UpstreamServer(f"orders-{i}").start() for i in (1, 2, 3)]
    try:
        anyio.run(main, servers, backend=backend)
    finally:
        for server in servers:
            server.stop()
