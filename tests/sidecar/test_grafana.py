"""docs/grafana/meshcore.json against a live Prometheus (Debian's `prometheus`) scraping real
sidecars with traffic: every query parses and the main panels return data.

The mesh is the dashboard test's: `web` calling `orders` over mTLS, one instance failing (so
retries, ejections and endpoint failures exist), each sidecar's admin listener a scrape target.
Grafana's variables are replaced the way Grafana would with "All" selected, `$__rate_interval`
with a window that holds several 1 s scrapes.
"""

from __future__ import annotations

import contextlib
import json
import re
import subprocess
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest

from meshcore.testing import free_port, require_binary

from .test_dashboard import three_sidecars

pytestmark = pytest.mark.anyio

DASHBOARD = Path(__file__).parents[2] / "docs" / "grafana" / "meshcore.json"
# Series that may rightly be absent in this mesh: no breaker opened its circuit (the failing
# instance is ejected, not the service's breaker), the sidecar answered nothing itself and no
# server identity was refused.
MAY_BE_EMPTY = ("meshcore_breaker_open", "meshcore_local_response_total",
                "meshcore_identity_rejections_total")


def panels() -> Iterator[dict[str, Any]]:
    for panel in json.loads(DASHBOARD.read_text())["panels"]:
        yield panel
        yield from panel.get("panels", ())


def promql(expr: str) -> str:
    """An expression as Grafana sends it with every variable at "All"."""
    expr = expr.replace("$__rate_interval", "1m")
    return re.sub(r"\$\{?(job|instance|service)\}?", ".*", expr)


def variable_queries() -> list[str]:
    """The variables' `label_values(selector, label)` as the query Grafana runs for them."""
    out = []
    for var in json.loads(DASHBOARD.read_text())["templating"]["list"]:
        if var["type"] == "query":
            match = re.fullmatch(r"label_values\((.*),\s*(\w+)\)", var["query"]["query"], re.S)
            assert match, var
            out.append(f"count by ({match[2]}) ({promql(match[1])})")
    return out


def test_the_dashboard_is_grafana_json_over_meshcore_series():
    data = json.loads(DASHBOARD.read_text())
    assert data["uid"] == "meshcore-mesh" and data["schemaVersion"] >= 36
    ids = [p["id"] for p in panels()]
    assert len(ids) == len(set(ids))
    exprs = [t["expr"] for p in panels() for t in p.get("targets", ())]
    assert len(exprs) >= 20
    for expr in exprs:
        assert "meshcore_" in expr or "process_" in expr, expr


@contextlib.asynccontextmanager
async def prometheus(tmp_path: Path, targets: list[str]) -> AsyncIterator[str]:
    """A real Prometheus scraping `targets` every second; yields its base URL."""
    binary = require_binary("prometheus")
    port = free_port()
    config = tmp_path / "prometheus.yml"
    config.write_text(
        "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n"
        "scrape_configs:\n  - job_name: meshcore\n    static_configs:\n"
        f"      - targets: {json.dumps(targets)}\n"
    )
    log = (tmp_path / "prometheus.log").open("wb")
    process = await anyio.open_process(
        [binary, f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
         f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn"],
        stdout=log, stderr=subprocess.STDOUT,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        async with httpx.AsyncClient() as client:
            with anyio.fail_after(30):
                while True:
                    if process.returncode is not None:
                        raise AssertionError((tmp_path / "prometheus.log").read_text()[-2000:])
                    with contextlib.suppress(httpx.HTTPError):
                        if (await client.get(f"{base}/-/ready")).status_code == 200:
                            break
                    await anyio.sleep(0.1)
        yield base
    finally:
        process.terminate()
        with anyio.fail_after(10, shield=True):
            await process.wait()
        log.close()


async def query(client: httpx.AsyncClient, base: str, expr: str) -> list[Any]:
    r = await client.get(f"{base}/api/v1/query", params={"query": expr})
    body = r.json()
    assert r.status_code == 200 and body["status"] == "success", f"{expr}\n-> {body}"
    result: list[Any] = body["data"]["result"]
    return result


async def test_every_query_parses_and_the_main_panels_have_data(upstream, tmp_path):
    async with three_sidecars(upstream, tmp_path) as mesh:
        targets = [str(s.addresses["admin"]) for s in (mesh.web, *mesh.orders)]
        async with prometheus(tmp_path, targets) as base, anyio.create_task_group() as tg:

            async def load() -> None:
                while True:
                    await mesh.send(5)
                    await anyio.sleep(0.05)

            tg.start_soon(load)
            async with httpx.AsyncClient() as client:
                # rate() needs two scrapes of a series in its window
                ready = 'sum(rate(meshcore_request_total{direction="inbound"}[1m]))'
                with anyio.fail_after(40):
                    while not await query(client, base, ready):
                        await anyio.sleep(0.5)
                # Each sidecar is scraped at its own offset, so a series of another target may
                # still have one sample: ask again until every panel has data (or time is up).
                empty: list[tuple[str, str]] = []
                with anyio.move_on_after(20):
                    while True:
                        empty = []
                        for panel in panels():
                            for target in panel.get("targets", ()):
                                result = await query(client, base, promql(target["expr"]))
                                if not result and not any(m in target["expr"] for m in MAY_BE_EMPTY):
                                    empty.append((panel["title"], target["expr"]))
                        if not empty:
                            break
                        await anyio.sleep(0.5)
                for expr in variable_queries():
                    assert await query(client, base, expr), expr
                callers = await query(
                    client, base, 'sum by (peer_identity) (meshcore_request_total{direction="inbound"})'
                )
            tg.cancel_scope.cancel()
    assert not empty, f"panels without data: {empty}"
    assert {r["metric"]["peer_identity"] for r in callers} == {"spiffe://dashboard.test/ns/default/sa/web"}


async def test_a_broken_query_is_caught(tmp_path):
    """The check above can fail: Prometheus refuses what does not parse."""
    async with prometheus(tmp_path, []) as base, httpx.AsyncClient() as client:
        r = await client.get(f"{base}/api/v1/query", params={"query": "sum by (service (rate(x[1m]))"})
    assert r.status_code == 400 and r.json()["errorType"] == "bad_data"
