"""`meshcore demo` gets every certificate from the tls plugin's identity service: no sidecar
holds a CA key, and none is written anywhere in the demo's directory."""

from __future__ import annotations

import os
from pathlib import Path

import httpx
import pytest

from meshcore._demo._scenario import Demo, make_plan

pytestmark = pytest.mark.anyio


async def test_the_demo_runs_on_the_identity_service_with_no_ca_key_on_disk():
    pytest.importorskip("meshcore_tls")
    demo = Demo(make_plan(), duration=3, admin="127.0.0.1:0", admin_fallback=False)
    async with demo:
        sidecars = [*demo._instance_sidecars.values(), demo.sidecar]
        states = [s.generation.mesh.state()["state"]["tls"] for s in sidecars]
        async with httpx.AsyncClient() as client:
            proxied = await client.get(
                f"http://{demo.sidecar.addresses['outbound']}/items", headers={"host": "api"}
            )
        tmp = Path(demo._tmp)
        files = sorted(str(p.relative_to(tmp)) for p in tmp.rglob("*") if p.is_file())
    assert proxied.status_code == 200
    assert all(s["mode"] == "identity" and s["credential"] == "join token" for s in states)
    assert {s["identity"].rpartition("/")[2] for s in states} == {"api", "demo-client"}
    # The only private key on disk is the identity service's intermediate; no root key at all.
    assert [f for f in files if f.endswith(".key")] == ["identity/intermediate.key"]
    assert not any(os.path.basename(f) == "ca.key" for f in files)
    assert not tmp.exists()
