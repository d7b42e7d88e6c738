"""A response cut mid-body is a failure of its endpoint in the sidecar's /metrics and /state,
not the 2xx its head announced (raw upstream on loopback, both backends, both body sizes:
one the sidecar reads before answering, one it streams)."""

from __future__ import annotations

import anyio
import httpx
import pytest

from .conftest import admin_json, raw_exchange, running_sidecar, sidecar_config, static_service, url

pytestmark = pytest.mark.anyio


async def test_a_cut_body_is_counted_as_an_error_of_the_endpoint(cut_upstream):
    async with anyio.create_task_group() as tg:
        await tg.start(cut_upstream.run)
        config = sidecar_config({"cut": static_service([cut_upstream.address])})
        async with running_sidecar(config) as sidecar:
            with anyio.fail_after(5):
                await raw_exchange(
                    sidecar, "outbound", b"GET / HTTP/1.1\r\nHost: cut\r\nConnection: close\r\n\r\n"
                )
            state = await admin_json(sidecar)
            async with httpx.AsyncClient() as client:
                metrics = (await client.get(url(sidecar, "admin", "/metrics"))).text
        tg.cancel_scope.cancel()
    [endpoint] = state["services"]["cut"]["endpoints"]
    assert (endpoint["requests"], endpoint["failures"]) == (1, 1)
    responses = [line for line in metrics.splitlines() if line.startswith("meshcore_response_total")]
    cut = [line for line in responses if 'service="cut"' in line]
    assert any('status_class="error"' in line and line.endswith(" 1") for line in cut), cut
    assert not any('status_class="2xx"' in line for line in cut), cut
