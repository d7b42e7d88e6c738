"""Real mTLS handshakes on loopback through the mesh (asyncio and trio)."""

from __future__ import annotations

import httpx
import pytest

import meshcore
import meshcore_tls

pytestmark = pytest.mark.anyio


async def test_valid_certificate_reaches_the_mtls_upstream(ca_dir, kit, tls_mesh):
    async with tls_mesh(kit.server_config(ca_dir, "orders")) as server_mesh:
        async with kit.mtls_server(server_mesh) as server:
            config = kit.client_config({"ca_dir": str(ca_dir), "service": "web"}, server)
            async with tls_mesh(config) as mesh, mesh.client() as client:
                response = await client.get("http://orders/items/7")
    assert response.status_code == 200
    assert response.text == "spiffe://example.org/ns/default/sa/web"
    assert server.handshake_errors == []
