"""The dashboard page on the sidecar's admin listener, loaded in a real headless chromium.

Chromium runs with `--virtual-time-budget`, which lets the page's timers fire (several
refreshes of /state) before `--dump-dom` prints the DOM; two loads some real time apart show
the numbers moving. Without chromium the browser tests skip (fail under
MESHCORE_REQUIRE_INTEGRATION=1, as in CI).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest

from meshcore._demo._scenario import _RotationPlugin
from meshcore._sidecar._dashboard import page
from meshcore._sidecar._runtime import Sidecar
from meshcore.testing import require_binary

pytestmark = pytest.mark.anyio

ROW = re.compile(r'<tr data-endpoint="([^"]+)">(.*?)</tr>', re.DOTALL)


def config(orders: list[Any], web: Any) -> dict[str, Any]:
    return {
        "services": {
            "orders": {
                "discovery": "static",
                "balancer": "demo-rotation",
                "static": {"endpoints": [
                    {"address": s.address, "metadata": {"instance": s.name}} for s in orders
                ]},
            },
            "web": {"discovery": "static", "static": {"endpoints": [web.address]}},
        },
        "sidecar": {"outbound": "127.0.0.1:0", "inbound": "127.0.0.1:0", "admin": "127.0.0.1:0"},
    }


async def dump_dom(chromium: str, url: str, profile: Path) -> str:
    args = [
        chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
        f"--user-data-dir={profile}", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--no-first-run",
        "--virtual-time-budget=3500", "--dump-dom", url,
    ]
    with anyio.fail_after(60):
        result = await anyio.run_process(args, check=False)
    dom = result.stdout.decode()
    assert result.returncode == 0 and "<html" in dom, result.stderr.decode()[-2000:]
    return dom


def endpoint_rows(dom: str, service: str) -> dict[str, str]:
    section = re.search(rf'<section class="service" data-service="{service}">(.*?)</section>', dom, re.DOTALL)
    assert section, f"service {service} is not on the page"
    return dict(ROW.findall(section[1]))


def cell(row: str, name: str) -> str:
    match = re.search(rf'<td class="num {name}[^"]*">([^<]*)', row)
    assert match, f"no {name} cell in {row}"
    return match[1]


async def test_page_is_self_contained_html(upstream, monkeypatch):
    monkeypatch.delenv("MESHCORE_PLUGINS", raising=False)
    orders = [upstream(f"o{i}") for i in range(3)]
    sidecar = Sidecar(config(orders, upstream("w")), [], extra_plugins=[("demo-rotation", _RotationPlugin())])
    async with sidecar, httpx.AsyncClient() as client:
        r = await client.get(f"http://{sidecar.addresses['admin']}/")
        head = await client.head(f"http://{sidecar.addresses['admin']}/")
        post = await client.post(f"http://{sidecar.addresses['admin']}/")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    assert r.content == page()
    assert head.status_code == 200 and head.content == b""
    assert post.status_code == 405
    html = r.text
    # no external assets: nothing fetched from another origin, no scripts or styles by URL
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", html)
    assert "<script src" not in html and "<link" not in html and "@import" not in html
    assert 'fetch("/state"' in html


async def test_dashboard_shows_services_and_endpoints_and_updates(upstream, tmp_path, monkeypatch):
    chromium = require_binary("chromium")
    monkeypatch.delenv("MESHCORE_PLUGINS", raising=False)
    orders = [upstream(f"o{i}") for i in range(3)]
    web = upstream("w")
    plugin = _RotationPlugin()
    async with Sidecar(config(orders, web), [], extra_plugins=[("demo-rotation", plugin)]) as sidecar:
        out = f"http://{sidecar.addresses['outbound']}"
        url = f"http://{sidecar.addresses['admin']}/"
        mesh = sidecar.generation.mesh
        sent = 0

        async def load() -> None:
            nonlocal sent
            async with httpx.AsyncClient() as client:
                while True:
                    await client.get(f"{out}/x", headers={"host": "orders"})
                    sent += 1
                    await anyio.sleep(0.005)

        async with anyio.create_task_group() as tg:
            tg.start_soon(load)
            with anyio.fail_after(10):
                while sent < 30:
                    await anyio.sleep(0.01)
            first = await dump_dom(chromium, url, tmp_path / "profile1")
            # something happens between the two loads: more traffic, and o1 is ejected
            upstream_orders = mesh.upstreams["orders"]
            ejected = next(ep for ep in upstream_orders.snapshot.endpoints if ep.meta.get("instance") == "o1")
            upstream_orders.eject(ejected, 60)
            target = sent + 50
            with anyio.fail_after(10):
                while sent < target:
                    await anyio.sleep(0.01)
            second = await dump_dom(chromium, url, tmp_path / "profile2")
            tg.cancel_scope.cancel()

    for dom in (first, second):
        assert re.search(r'<span id="summary"[^>]*>2 services, 4 endpoints', dom), dom[:3000]
        assert int(re.search(r'<span id="refreshes">(\d+)</span>', dom)[1]) >= 2  # it refreshes
        assert 'id="error" style="display: none;"' in dom
        rows = endpoint_rows(dom, "orders")
        assert set(rows) == {s.address for s in orders}
        assert endpoint_rows(dom, "web").keys() == {web.address}
        assert "static" in dom and ">ok<" in dom  # discovery status
    before = {ep: int(cell(row, "requests")) for ep, row in endpoint_rows(first, "orders").items()}
    after = {ep: int(cell(row, "requests")) for ep, row in endpoint_rows(second, "orders").items()}
    assert sum(before.values()) >= 30
    assert sum(after.values()) >= sum(before.values()) + 50  # the numbers moved
    assert all(after[ep] >= before[ep] for ep in before)
    o1 = orders[1].address
    assert "ejected (1x)" in endpoint_rows(second, "orders")[o1]
    assert "ejected" not in endpoint_rows(first, "orders")[o1]
    assert ">o1<" in endpoint_rows(second, "orders")[o1]  # the instance label from metadata


async def test_dashboard_says_when_state_is_unreachable(tmp_path):
    """The page served from somewhere without /state shows the error box, not a blank page."""
    chromium = require_binary("chromium")
    site = tmp_path / "site"
    site.mkdir()
    (site / "index.html").write_bytes(page())

    async def serve(task_status: Any) -> None:
        # a tiny HTTP server for the page alone: /state answers 404
        listener = await anyio.create_tcp_listener(local_host="127.0.0.1")
        task_status.started(listener.extra(anyio.abc.SocketAttribute.local_port))

        async def handle(stream: Any) -> None:
            async with stream:
                request = b""
                while b"\r\n\r\n" not in request:
                    chunk = await stream.receive()
                    request += chunk
                path = request.split(b" ")[1]
                body, status = (page(), b"200 OK") if path == b"/" else (b"nope", b"404 Not Found")
                await stream.send(b"HTTP/1.1 " + status + b"\r\ncontent-length: %d\r\n"
                                  b"connection: close\r\ncontent-type: text/html\r\n\r\n" % len(body) + body)

        await listener.serve(handle)

    async with anyio.create_task_group() as tg:
        port = await tg.start(serve)
        dom = await dump_dom(chromium, f"http://127.0.0.1:{port}/", tmp_path / "profile")
        tg.cancel_scope.cancel()
    assert 'id="error" style="display: block;"' in dom
    assert "cannot read /state: /state answered 404" in dom
