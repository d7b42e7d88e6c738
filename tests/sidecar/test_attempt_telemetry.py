"""The sidecar counts attempts through upstream observers, not the pluggy event hook.

The `meshcore_request_finished` hook stays for third-party plugins; the core fires it only
when one implements it, so a sidecar without such a plugin pays no hook call per request.
"""

from __future__ import annotations

import httpx
import pytest

import meshcore
from meshcore.testing import static_service

from .conftest import running_sidecar, sidecar_config, url

pytestmark = pytest.mark.anyio


class Finished:
    """A third-party plugin listening to the event hook."""

    def __init__(self) -> None:
        self.outcomes: list[meshcore.Outcome] = []

    @meshcore.hookimpl
    def meshcore_request_finished(self, outcome):
        self.outcomes.append(outcome)


async def test_attempts_are_counted_without_the_hook_and_after_a_reload(upstream):
    one, two = upstream("one"), upstream("two")
    config = sidecar_config({"orders": static_service([one])})
    async with running_sidecar(config) as sidecar:
        mesh = sidecar.generation.mesh
        assert not mesh.plugins.implements("meshcore_request_finished")
        assert not mesh.upstream("orders")._fire_finished
        async with httpx.AsyncClient() as client:
            for _ in range(2):
                r = await client.get(url(sidecar, "outbound"), headers={"host": "orders"})
                assert r.status_code == 200
            error = await sidecar.reload(sidecar_config({"orders": static_service([two])}))
            assert error is None
            r = await client.get(url(sidecar, "outbound"), headers={"host": "orders"})
            assert r.headers["x-upstream"] == "two"
        t = sidecar.telemetry
        assert t.attempts["orders"] == 3  # the new generation's mesh is observed too
        assert t.responses[("orders", one.address, "2xx")] == 2
        assert t.responses[("orders", two.address, "2xx")] == 1


async def test_a_plugin_on_the_hook_and_the_sidecar_both_see_every_attempt(upstream):
    server, down = upstream("one"), upstream("down")
    down.stop()
    plugin = Finished()
    config = sidecar_config({"orders": static_service([server]), "gone": static_service([down])})
    async with running_sidecar(config, extra_plugins=[("finished", plugin)]) as sidecar:
        async with httpx.AsyncClient() as client:
            await client.get(url(sidecar, "outbound"), headers={"host": "orders"})
            r = await client.get(url(sidecar, "outbound"), headers={"host": "gone"})
            assert r.status_code >= 500
        t = sidecar.telemetry
    assert [(o.service, o.status_code) for o in plugin.outcomes] == [("orders", 200), ("gone", None)]
    assert t.attempts == {"orders": 1, "gone": 1}
    assert t.responses[("gone", down.address, "error")] == 1
