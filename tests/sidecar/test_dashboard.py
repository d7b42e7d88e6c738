"""The dashboard on the sidecar's admin listener: `/dashboard.json` and the page that draws it,
loaded in a real headless chromium.

The mesh under test is three real sidecars over mTLS (the tls plugin, a CA made in the test):
`web` calls `orders`, whose two instances are each an inbound-only sidecar (no services of
their own) in front of an app; the second app answers 503, so retries, a failing endpoint and
an ejection show. `web` is given both instances' admin listeners and one that is down as peers.

Chromium runs with `--virtual-time-budget`, which lets the page's timers fire (several
refreshes) before `--dump-dom` prints the DOM. With MESHCORE_UPDATE_SCREENSHOTS=1 the browser
test also writes docs/img/dashboard-*.png (docs/dashboard.md shows them). Without chromium the
browser tests skip (fail under MESHCORE_REQUIRE_INTEGRATION=1, as in CI).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import anyio.abc
import httpx
import pytest

from meshcore._sidecar._dashboard import merge_views, page, workload
from meshcore._sidecar._runtime import Sidecar
from meshcore.testing import free_port, require_binary, static_service

from .conftest import LOOPBACK, url

pytestmark = pytest.mark.anyio

DOCS_IMG = Path(__file__).parents[2] / "docs" / "img"
TRUST = "dashboard.test"
BUCKET = 0.1  # seconds per point, so a test sees several ticks


def spiffe(name: str) -> str:
    return f"spiffe://{TRUST}/ns/default/sa/{name}"


@dataclass
class Mesh:
    web: Sidecar
    orders: list[Sidecar]
    down: str  # an admin address nothing listens on

    async def send(self, n: int) -> None:
        async with httpx.AsyncClient() as client:
            for _ in range(n):
                r = await client.get(url(self.web, "outbound", "/items"), headers={"host": "orders"})
                assert r.status_code in (200, 503)


@contextlib.asynccontextmanager
async def three_sidecars(upstream: Any, tmp_path: Path) -> AsyncIterator[Mesh]:
    import meshcore_tls

    ca_dir = tmp_path / "ca"
    if not ca_dir.exists():
        meshcore_tls.CA.create(TRUST).save(ca_dir)
    apps = [upstream("orders-app-1"), upstream("orders-app-2", status=503)]
    tls = {"ca_dir": str(ca_dir)}
    async with contextlib.AsyncExitStack() as stack:
        orders = []
        for app in apps:
            config = {
                "services": {},
                "sidecar": {**LOOPBACK, "service": "orders", "app": app.address,
                            "dashboard_bucket": BUCKET},
                "tls": {**tls, "service": "orders"},
            }
            orders.append(await stack.enter_async_context(Sidecar(config, ["tls"])))
        down = f"127.0.0.1:{free_port()}"
        endpoints = [
            {"address": str(s.addresses["inbound"]),
             "metadata": {"instance": f"orders-{i + 1}", "admin": str(s.addresses["admin"])}}
            for i, s in enumerate(orders)
        ]
        service = static_service([], balancer="round-robin", resilience=["retry", "breaker"],
                                 breaker={"consecutive_failures": 3})
        service["static"]["endpoints"] = endpoints
        config = {
            "services": {"orders": service},
            "sidecar": {**LOOPBACK, "service": "web", "app": upstream("web-app").address,
                        "dashboard_bucket": BUCKET, "admin_peers": [down],
                        "admin_peer_timeout": 2.0},
            "tls": {**tls, "service": "web", "identities": {"orders": spiffe("orders")}},
        }
        web = await stack.enter_async_context(
            Sidecar(config, ["tls", "round-robin", "retry", "breaker"])
        )
        yield Mesh(web, orders, down)


async def dashboard_json(sidecar: Sidecar, query: str = "") -> dict[str, Any]:
    async with httpx.AsyncClient() as client:
        r = await client.get(url(sidecar, "admin", "/dashboard.json" + query))
    assert r.status_code == 200 and r.headers["content-type"] == "application/json"
    data: dict[str, Any] = json.loads(r.text)
    return data


async def ticks(sidecar: Sidecar, n: int = 2) -> None:
    """Wait until the sampling task has closed `n` more buckets."""
    target = sidecar.history.ticks + n
    with anyio.fail_after(10):
        while sidecar.history.ticks < target:
            await anyio.sleep(BUCKET / 4)


def service(data: dict[str, Any], direction: str, name: str) -> dict[str, Any]:
    rows = [s for s in data["services"] if s["direction"] == direction and s["service"] == name]
    assert len(rows) == 1, data["services"]
    return rows[0]


# -- /dashboard.json ----------------------------------------------------------------------------


async def test_dashboard_json_of_a_mesh(upstream, tmp_path):
    async with three_sidecars(upstream, tmp_path) as mesh:
        await mesh.send(40)
        await ticks(mesh.web)
        data = await dashboard_json(mesh.web)
        server = await dashboard_json(mesh.orders[0])
        local = await dashboard_json(mesh.web, "?peers=0")

    assert data["version"] == 1 and data["bucket_seconds"] == BUCKET and data["points"] == 90
    assert data["sidecar"]["service"] == "web" and data["sidecar"]["identity"] == spiffe("web")
    out = service(data, "outbound", "orders")
    assert out["requests"] == 40  # what the app asked for; the attempts are below
    assert out["retries"] >= 1 and out["ejections"] >= 1  # orders-2 answered 503
    assert out["tls"] is True and out["peer_identity"] == spiffe("orders")
    assert out["endpoints"] == 2 and out["resilience"] == ["retry", "breaker"]
    assert out["breaker"] == "closed"  # the breaker plugin's circuit (an ejection is not a trip)
    assert out["rps"] > 0 and 0 < out["p50"] <= out["p95"] <= out["p99"]
    # The ring holds every request once, however the ticks fell.
    assert sum(out["series"]["requests"]) == 40
    assert len(out["series"]["p99"]) == len(out["series"]["requests"]) >= 2

    eps = {e["instance"]: e for e in data["endpoints"]}
    assert set(eps) == {"orders-1", "orders-2"}
    assert eps["orders-1"]["failures"] == 0 and eps["orders-1"]["success_rate"] == 1.0
    bad = eps["orders-2"]
    assert bad["failures"] == bad["requests"] >= 3 and bad["success_rate"] == 0.0
    assert bad["times_ejected"] >= 1 and bad["ejected"] is True
    assert sum(bad["series"]["ejections"]) == bad["times_ejected"]
    assert eps["orders-1"]["requests"] + bad["requests"] == 40 + out["retries"]

    [cert] = data["certificates"]
    assert cert["identity"] == spiffe("web") and cert["plugin"] == "tls"
    assert 0 < cert["seconds_left"] <= 25 * 3600
    [disc] = data["discovery"]
    assert disc["service"] == "orders" and disc["state"] == "ok" and disc["snapshot_age"] >= 0

    # Peers: both instances up (found in discovery), the configured one down, not an error.
    peers = {p["address"]: p for p in data["peers"]}
    assert peers[mesh.down]["state"] == "down" and peers[mesh.down]["source"] == "config"
    assert peers[mesh.down]["error"]
    for sidecar in mesh.orders:
        p = peers[str(sidecar.addresses["admin"])]
        assert p["state"] == "up" and p["source"] == "discovery" and p["service"] == "orders"
        assert p["identity"] == spiffe("orders") and p["inbound"][0]["requests"] > 0
    # The topology: web -> orders seen from both ends (client figures), the down peer a node.
    edges = {(e["source"], e["target"]): e for e in data["topology"]["edges"]}
    edge = edges[("web", "orders")]
    assert edge["side"] == "client" and edge["seen_by"] == ["orders", "web"] and edge["tls"]
    nodes = {n["id"]: n for n in data["topology"]["nodes"]}
    assert nodes["web"]["kind"] == "self" and nodes["orders"]["state"] == "up"
    assert nodes[mesh.down]["state"] == "down"

    # The inbound-only sidecar: its inbound service and its caller by identity.
    inbound = service(server, "inbound", "orders")
    assert inbound["requests"] > 0 and inbound["success_rate"] == 1.0 and inbound["rps"] > 0
    assert [s["direction"] for s in server["services"]] == ["inbound"]
    [caller] = server["callers"]
    assert caller["identity"] == spiffe("web") and caller["workload"] == "web" and caller["tls"]
    assert caller["requests"] == inbound["requests"]
    assert server["endpoints"] == [] and server["sidecar"]["identity"] == spiffe("orders")

    # What a peer is asked for: this sidecar alone, no peers, no topology (no recursion).
    assert "peers" not in local and "topology" not in local and local["edges"]


async def test_a_slow_peer_is_down_within_the_timeout_and_the_answer_is_cached(upstream):
    """A peer that accepts and never answers costs one `admin_peer_timeout`, then is "down"."""
    listener = await anyio.create_tcp_listener(local_host="127.0.0.1")
    port = listener.extra(anyio.abc.SocketAttribute.local_port)
    held: list[Any] = []

    async def hold(stream: Any) -> None:
        held.append(stream)
        await anyio.sleep_forever()

    config = {"services": {}, "sidecar": {**LOOPBACK, "admin_peers": [f"127.0.0.1:{port}"],
                                           "admin_peer_timeout": 0.3}}
    async with anyio.create_task_group() as tg:
        tg.start_soon(listener.serve, hold)
        async with Sidecar(config, []) as sidecar:
            data = await dashboard_json(sidecar)
            again = await dashboard_json(sidecar)
        tg.cancel_scope.cancel()
    [peer] = data["peers"]
    assert peer["state"] == "down" and peer["error"] == "no answer within 0.3 s"
    assert again["peers"] == data["peers"] and len(held) == 1  # cached: not asked twice


async def test_a_peer_answering_too_much_or_not_json_is_down(monkeypatch):
    from meshcore._sidecar import _dashboard

    monkeypatch.setattr(_dashboard, "MAX_PEER_BYTES", 100)
    async with Sidecar({"services": {}, "sidecar": LOOPBACK}, []) as peer:
        config = {"services": {}, "sidecar": {
            **LOOPBACK, "admin_peers": [str(peer.addresses["admin"]), str(peer.addresses["outbound"])],
        }}
        async with Sidecar(config, []) as sidecar:
            data = await dashboard_json(sidecar)
    big, wrong = data["peers"]
    assert big["state"] == "down" and big["error"] == "answer larger than 100 bytes"
    # the outbound listener is not an admin: 404 no_route
    assert wrong["state"] == "down" and wrong["error"] == "answered 404"


async def test_dashboard_json_is_behind_the_host_check():
    async with Sidecar({"services": {}, "sidecar": LOOPBACK}, []) as sidecar:
        async with httpx.AsyncClient() as client:
            evil = await client.get(url(sidecar, "admin", "/dashboard.json"),
                                    headers={"host": "rebind.example:15000"})
            post = await client.post(url(sidecar, "admin", "/dashboard.json"))
            ok = await client.get(url(sidecar, "admin", "/dashboard.json"),
                                  headers={"host": "localhost"})
    assert evil.status_code == 403 and "DNS rebinding" in evil.text
    assert post.status_code == 405
    assert ok.status_code == 200 and ok.json()["services"][0]["direction"] == "inbound"


async def test_the_views_of_workers_merge_into_one(upstream):
    """What the group's admin does with `--workers N` (tests/sidecar/test_workers.py runs the
    group): two sidecars' views of the same service become one row."""
    ok, bad = upstream("ok"), upstream("bad", status=503)
    views = []
    for n, app in ((30, ok), (10, bad)):
        config = {"services": {"orders": static_service([app])},
                  "sidecar": {**LOOPBACK, "dashboard_bucket": BUCKET}}
        async with Sidecar(config, []) as sidecar, httpx.AsyncClient() as client:
            for _ in range(n):
                await client.get(url(sidecar, "outbound", "/"), headers={"host": "orders"})
            await ticks(sidecar)
            views.append(await dashboard_json(sidecar, "?peers=0"))
    merged = merge_views([*views, None])  # a third worker not up
    out = service(merged, "outbound", "orders")
    assert out["requests"] == 40 and out["failures"] == 10
    assert out["rps"] == pytest.approx(sum(service(v, "outbound", "orders")["rps"] for v in views))
    assert 0 < out["success_rate"] < 1 and out["p99"] == max(
        service(v, "outbound", "orders")["p99"] for v in views
    )
    assert sum(out["series"]["requests"]) == 40
    assert len(merged["endpoints"]) == 2  # two different endpoints, one row each
    assert merged["sidecar"]["workers"] == 3 and merged["sidecar"]["workers_up"] == 2
    assert merged["sidecar"]["ready"] is False  # not every worker answered
    assert merge_views([None])["services"] == []


def test_bad_peer_addresses_name_the_key():
    from meshcore import ConfigError

    with pytest.raises(ConfigError, match=r"sidecar\.admin_peers.*host:port"):
        Sidecar({"services": {}, "sidecar": {**LOOPBACK, "admin_peers": ["nowhere"]}}, [])


def test_workload_names_from_identities():
    assert workload(spiffe("web")) == "web"
    assert workload("") == "(no identity)"
    assert workload("overflow") == "(other callers)"
    assert workload("spiffe://td/other") == "spiffe://td/other"


# -- the page -----------------------------------------------------------------------------------

ROW = re.compile(r'<tr data-endpoint="([^"]+)">(.*?)</tr>', re.DOTALL)
CHROMIUM_FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--disable-dev-shm-usage",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--no-first-run", "--hide-scrollbars",
]


async def chromium_run(chromium: str, profile: Path, *args: str) -> str:
    cmd = [chromium, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", *args]
    with anyio.fail_after(90):
        result = await anyio.run_process(cmd, check=False)
    assert result.returncode == 0, result.stderr.decode()[-2000:]
    return result.stdout.decode()


async def dump_dom(chromium: str, url: str, profile: Path) -> str:
    dom = await chromium_run(chromium, profile, "--virtual-time-budget=5000", "--dump-dom", url)
    assert "<html" in dom
    return dom


async def screenshot(chromium: str, url: str, profile: Path, name: str, height: int) -> None:
    """docs/img/<name>.png, when MESHCORE_UPDATE_SCREENSHOTS=1 (the docs show them)."""
    if os.environ.get("MESHCORE_UPDATE_SCREENSHOTS") != "1":
        return
    out = DOCS_IMG / f"{name}.png"
    await chromium_run(chromium, profile, f"--window-size=1400,{height}",
                       "--virtual-time-budget=5000", f"--screenshot={out}", url)
    assert out.stat().st_size > 10_000


def section(dom: str, tag_id: str) -> str:
    match = re.search(rf'<section class="box" id="{tag_id}">(.*?)</section>', dom, re.DOTALL)
    assert match, f"no {tag_id} box"
    return match[1]


def endpoint_rows(dom: str, service: str) -> dict[str, str]:
    match = re.search(rf'<section class="service" data-service="{service}">(.*?)</section>', dom, re.DOTALL)
    assert match, f"service {service} has no endpoints section"
    return dict(ROW.findall(match[1]))


def cell(row: str, name: str) -> str:
    match = re.search(rf'<td class="num {name}[^"]*">([^<]*)', row)
    assert match, f"no {name} cell in {row}"
    return match[1]


async def test_page_is_self_contained_html(upstream):
    async with Sidecar({"services": {}, "sidecar": LOOPBACK}, []) as sidecar, httpx.AsyncClient() as client:
        r = await client.get(url(sidecar, "admin", "/"))
        head = await client.head(url(sidecar, "admin", "/"))
        post = await client.post(url(sidecar, "admin", "/"))
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    assert r.content == page()
    assert head.status_code == 200 and head.content == b""
    assert post.status_code == 405
    html = r.text
    # no external assets: nothing fetched from another origin, no scripts or styles by URL
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", html)
    assert "<script src" not in html and "<link" not in html and "@import" not in html
    assert 'fetch("/dashboard.json"' in html


async def test_the_page_shows_the_mesh_a_failing_instance_and_an_inbound_only_sidecar(
    upstream, tmp_path
):
    chromium = require_binary("chromium")
    async with three_sidecars(upstream, tmp_path) as mesh:
        # Traffic keeps flowing while the browser loads, so the rates are live.
        async with anyio.create_task_group() as tg:

            async def load() -> None:
                while True:
                    await mesh.send(5)
                    await anyio.sleep(0.02)

            tg.start_soon(load)
            await ticks(mesh.web, 3)
            web_url = f"http://{mesh.web.addresses['admin']}/"
            orders_url = f"http://{mesh.orders[0].addresses['admin']}/"
            web = await dump_dom(chromium, web_url, tmp_path / "p1")
            server = await dump_dom(chromium, orders_url, tmp_path / "p2")
            await screenshot(chromium, web_url, tmp_path / "p3", "dashboard-mesh", 1000)
            await screenshot(chromium, orders_url, tmp_path / "p4", "dashboard-inbound", 760)
            tg.cancel_scope.cancel()

    for dom in (web, server):
        assert int(re.search(r'<span id="refreshes">(\d+)</span>', dom)[1]) >= 2  # it refreshes
        assert 'id="error" style="display: none;"' in dom
    # web: the outbound service with live figures, the failing instance ejected, the peers.
    assert re.search(r'<span id="summary"[^>]*>2 services, 2 endpoints, 0 callers, 3 peers \(1 down\)', web)
    row = re.search(r'<tr data-service="outbound/orders">(.*?)</tr>', web, re.DOTALL)[1]
    assert float(cell(row, "rps")) > 0 and int(cell(row, "retries")) > 0
    assert int(cell(row, "ejections")) >= 1 and "<polyline" in row  # sparklines drawn
    rows = {re.search(r"<td>(orders-\d)</td>", r)[1]: r for r in endpoint_rows(web, "orders").values()}
    assert "ejected" in rows["orders-2"] and cell(rows["orders-2"], "success bad") == "0%"
    assert "active" in rows["orders-1"] and cell(rows["orders-1"], "success ok") == "100%"
    topology = section(web, "topology")
    assert 'data-edge="web→orders"' in topology and "mTLS" in topology
    assert f'data-node="{mesh.down}" data-state="down"' in topology
    peers = section(web, "peers")
    assert peers.count(">up<") == 2 and ">down<" in peers
    assert spiffe("web") in section(web, "certificates") and "expires in" in web
    assert 'data-discovery="orders"' in section(web, "discovery")
    # orders: an inbound-only sidecar shows its inbound service and who calls it.
    assert "no services configured" not in section(server, "services")
    row = re.search(r'<tr data-service="inbound/orders">(.*?)</tr>', server, re.DOTALL)[1]
    assert float(cell(row, "rps")) > 0 and cell(row, "success ok") == "100%"
    callers = section(server, "callers")
    assert f'data-caller="{spiffe("web")}"' in callers and "<b>web</b>" in callers
    assert 'data-edge="web→orders"' in section(server, "topology")


async def test_dashboard_says_when_its_data_is_unreachable(tmp_path):
    """The page served from somewhere without /dashboard.json shows the error box."""
    chromium = require_binary("chromium")

    async def serve(task_status: Any) -> None:
        # a tiny HTTP server for the page alone: everything else answers 404
        listener = await anyio.create_tcp_listener(local_host="127.0.0.1")
        task_status.started(listener.extra(anyio.abc.SocketAttribute.local_port))

        async def handle(stream: Any) -> None:
            async with stream:
                request = b""
                while b"\r\n\r\n" not in request:
                    request += await stream.receive()
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
    assert "cannot read /dashboard.json: /dashboard.json answered 404" in dom
