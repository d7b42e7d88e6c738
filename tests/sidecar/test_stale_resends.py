"""Transparent resends of a dead pooled connection are counted per service and endpoint
(`meshcore_stale_connection_resends_total`, `stale_resends` in /state and `mesh.state()`).

The upstream is Debian's nginx with a short `keepalive_timeout`: it closes the idle keep-alive
connection the mesh pooled, and the next request is sent on it, finds it dead before any
response byte and is resent on a fresh connection (RFC 9112 §9.3.1).
"""

from __future__ import annotations

import math
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

import meshcore
from meshcore.testing import free_port, require_binary, static_service, wait_listening

from .conftest import admin_json, running_sidecar, sidecar_config, url, wait_for
from .test_metrics import BACKENDS, samples, scrape

pytestmark = pytest.mark.anyio

NGINX_CONF = """
daemon off;
master_process off;
worker_processes 1;
error_log {prefix}/error.log warn;
pid {prefix}/nginx.pid;
events {{ worker_connections 64; }}
http {{
    access_log {prefix}/access.log;
    client_body_temp_path {prefix}/body;
    proxy_temp_path {prefix}/proxy;
    fastcgi_temp_path {prefix}/fastcgi;
    uwsgi_temp_path {prefix}/uwsgi;
    scgi_temp_path {prefix}/scgi;
    keepalive_timeout 100ms;
    server {{
        listen 127.0.0.1:{port};
        location / {{ return 200 "nginx\\n"; }}
    }}
}}
"""


@pytest.fixture(scope="module")
def nginx(tmp_path_factory: pytest.TempPathFactory) -> Iterator[int]:
    """nginx closing idle keep-alive connections after 100 ms; yields its port."""
    binary = os.environ.get("MESHCORE_NGINX") or require_binary("nginx")
    prefix: Path = tmp_path_factory.mktemp("nginx-keepalive")
    port = free_port()
    conf = prefix / "nginx.conf"
    conf.write_text(NGINX_CONF.format(prefix=prefix, port=port))
    proc = subprocess.Popen(
        [binary, "-p", str(prefix), "-c", str(conf), "-e", str(prefix / "error.log")],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        wait_listening(port)
        yield port
    finally:
        proc.terminate()
        proc.wait(timeout=10)


async def _pool_closed_by_the_server(upstream: Any) -> None:
    """Wait (bounded) until nginx has closed the connection the pool keeps idle, and make the
    pool reuse it without its liveness peek: the race where the close arrives just as the
    request is sent (a pool skips the peek for a connection idle less than a second)."""
    (pool,) = upstream.connector._pools.values()
    pool.fresh_for = math.inf
    (conn,) = pool.idle
    await wait_for(conn.peer_closed, timeout=5.0)


@pytest.mark.parametrize("anyio_backend", BACKENDS)
async def test_a_resend_on_a_connection_nginx_closed_is_counted(nginx: int) -> None:
    config = sidecar_config({"web": static_service([f"127.0.0.1:{nginx}"])})
    async with running_sidecar(config) as sidecar, httpx.AsyncClient() as client:
        upstream = sidecar.generation.mesh.upstreams["web"]  # type: ignore[union-attr]
        key = f'meshcore_stale_connection_resends_total{{service="web",endpoint="127.0.0.1:{nginx}"}}'
        r = await client.get(url(sidecar, "outbound", "/"), headers={"host": "web"})
        assert r.status_code == 200 and r.text == "nginx\n"
        assert samples(await scrape(sidecar))[key] == 0
        for n in (1, 2):
            await _pool_closed_by_the_server(upstream)
            r = await client.get(url(sidecar, "outbound", "/"), headers={"host": "web"})
            assert r.status_code == 200 and r.text == "nginx\n"  # the caller saw nothing
            m = samples(await scrape(sidecar))
            assert m[key] == n
        state = await admin_json(sidecar)
    (endpoint,) = state["services"]["web"]["endpoints"]
    assert endpoint["stale_resends"] == 2
    # One attempt per request: the resend is the engine's, not a retry.
    assert endpoint["requests"] == 3 and endpoint["failures"] == 0
    assert m[f'meshcore_response_total{{service="web",endpoint="127.0.0.1:{nginx}",status_class="2xx"}}'] == 3


async def test_library_mode_counts_it_in_mesh_state(nginx: int) -> None:
    config = {"services": {"web": static_service([f"127.0.0.1:{nginx}"])}}
    async with meshcore.Mesh(config) as mesh, mesh.client() as client:
        assert (await client.get("http://web/")).status_code == 200
        await _pool_closed_by_the_server(mesh.upstreams["web"])
        assert (await client.get("http://web/")).text == "nginx\n"
        (endpoint,) = mesh.state()["services"]["web"]["endpoints"]
    assert endpoint["stale_resends"] == 1


async def test_a_post_is_not_resent_nor_counted(nginx: int) -> None:
    """A POST on the dead connection fails to the caller instead (never resent by the engine)."""
    config = {"services": {"web": static_service([f"127.0.0.1:{nginx}"])}}
    async with meshcore.Mesh(config) as mesh, mesh.client() as client:
        assert (await client.get("http://web/")).status_code == 200
        await _pool_closed_by_the_server(mesh.upstreams["web"])
        with pytest.raises(httpx.HTTPError):
            await client.post("http://web/", content=b"x")
        (endpoint,) = mesh.state()["services"]["web"]["endpoints"]
    assert endpoint["stale_resends"] == 0
