"""The sidecar probes its local app and reports it through `meshcore_local_health`, so a
registering plugin stops advertising an instance whose app died."""

from __future__ import annotations

import pytest

from .conftest import admin_json, running_sidecar, sidecar_config, wait_for

pytestmark = pytest.mark.anyio


@pytest.mark.parametrize("path", ["", "/status/204"], ids=["tcp", "http"])
async def test_app_probe_turns_critical_and_back(upstream, path):
    app = upstream("app")
    config = sidecar_config(
        {}, app=app.address, app_health_interval="20ms", app_health_path=path, app_unhealthy_after=2
    )
    async with running_sidecar(config) as sidecar:
        mesh = sidecar.generation.mesh
        assert mesh.local_health() == ("passing", "")
        app.stop()
        await wait_for(lambda: mesh.local_health()[0] == "critical")
        status, reason = mesh.local_health()
        assert f"local app {app.address}" in reason and "2 probes in a row" in reason
        state = (await admin_json(sidecar))["state"]["app-health"]
        assert state["status"] == "critical" and state["failures_in_a_row"] >= 2
        app.start()
        await wait_for(lambda: mesh.local_health() == ("passing", ""))


async def test_http_probe_checks_the_status(upstream):
    app = upstream("app")
    config = sidecar_config(
        {}, app=app.address, app_health_interval="20ms", app_health_path="/status/503",
        app_unhealthy_after=1,
    )
    async with running_sidecar(config) as sidecar:
        status, reason = sidecar.generation.mesh.local_health()
    assert status == "critical" and "/status/503 answered 503" in reason


async def test_probing_can_be_turned_off(upstream):
    config = sidecar_config({}, app="127.0.0.1:9", app_health_interval=0)
    async with running_sidecar(config) as sidecar:
        assert sidecar.generation.mesh.local_health() == ("passing", "")
        assert "app-health" not in (await admin_json(sidecar))["state"]
