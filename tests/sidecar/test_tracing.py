"""Traces through sidecars (issue 20): the `meshcore_inbound_layer` hook, and the `otel` plugin's
spans of a request through two sidecars with a retry, received by a real OTLP/HTTP receiver.

    test client (its own span, W3C traceparent)
      -> sidecar A outbound: retry, then otel innermost (a CLIENT span per attempt)
      -> sidecar B inbound: a SERVER span per request
      -> app B: a real UpstreamServer that answers 503 to every 2nd request
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
from opentelemetry import propagate
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.trace import set_span_in_context

import meshcore
from meshcore._sidecar._runtime import Sidecar

from .conftest import running_sidecar, sidecar_config, static_service, url

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "plugins" / "otel" / "tests"))

from otlp_receiver import OtlpReceiver  # noqa: E402


class Stamp:
    """A plugin wrapping the inbound send: stamps the request on its way to the app."""

    def __init__(self, name: str, log: list[str]) -> None:
        self.name = name
        self.log = log

    @meshcore.hookimpl
    def meshcore_inbound_layer(self, mesh: meshcore.Mesh) -> Any:
        def layer(send: Any) -> Any:
            async def stamped(request: meshcore.Request) -> meshcore.Response:
                self.log.append(self.name)
                request.headers.append((f"x-{self.name}".encode(), b"inbound"))
                response = await send(request)
                response.headers.append((b"x-stamped", str(response.status_code).encode()))
                return response

            return stamped

        return layer


@pytest.mark.anyio
async def test_the_inbound_layer_hook_wraps_the_send_to_the_app(upstream: Any) -> None:
    app = upstream()
    log: list[str] = []
    config = sidecar_config({}, service="orders", app=app.address)
    plugins = [("first", Stamp("first", log)), ("second", Stamp("second", log))]
    async with running_sidecar(config, extra_plugins=plugins) as sidecar:
        async with httpx.AsyncClient() as client:
            r = await client.get(url(sidecar, "inbound", "/x"))
    assert r.status_code == 200 and r.headers.get_list("x-stamped") == ["200", "200"]
    assert app.seen[0][2]["x-first"] == app.seen[0][2]["x-second"] == "inbound"
    assert log == ["first", "second"]  # in plugin order, the first outermost


@pytest.mark.anyio
async def test_one_trace_through_two_sidecars_with_a_retry(upstream: Any) -> None:
    receiver = OtlpReceiver()
    app_b = upstream("app-b", fail_every=2)
    tracing = {"endpoint": receiver.url, "schedule_delay": "20ms"}
    plugins = ["retry", "otel"]
    try:
        config_b = sidecar_config({}, service="orders", app=app_b.address)
        config_b["tracing"] = tracing
        async with Sidecar(config_b, plugins) as sidecar_b:
            retry = {"backoff_base": "1ms", "backoff_max": "2ms", "budget": False}
            config_a = sidecar_config({
                "orders": static_service([str(sidecar_b.addresses["inbound"])],
                                         resilience=["retry", "otel"], retry=retry),
            })
            config_a["tracing"] = {**tracing, "service_name": "frontend"}
            async with Sidecar(config_a, plugins) as sidecar_a:
                root = TracerProvider().get_tracer("client").start_span("checkout")
                headers = {"host": "orders"}
                propagate.inject(headers, context=set_span_in_context(root))
                async with httpx.AsyncClient(base_url=url(sidecar_a, "outbound")) as client:
                    for path in ("/first", "/second"):  # the second: 503 once, then retried
                        assert (await client.get(path, headers=headers)).status_code == 200
        # Each sidecar's mesh exported what it queued when it stopped.
        spans = await anyio.to_thread.run_sync(receiver.wait_for, 6)
    finally:
        receiver.close()
    assert len(spans) == 6
    trace_id = format(root.get_span_context().trace_id, "032x")
    assert {s.trace_id for s in spans} == {trace_id}
    clients = sorted((s for s in spans if s.kind == "CLIENT"), key=lambda s: s.attributes["url.full"])
    servers = [s for s in spans if s.kind == "SERVER"]
    assert len(clients) == 3 and len(servers) == 3
    assert {s.service for s in clients} == {"frontend"} and {s.service for s in servers} == {"orders"}
    # Every attempt is a child of the client's span; every server span a child of an attempt.
    assert {c.parent_id for c in clients} == {format(root.get_span_context().span_id, "016x")}
    by_parent = {s.parent_id: s for s in servers}
    assert set(by_parent) == {c.span_id for c in clients}
    first = next(c for c in clients if c.attributes["url.full"].endswith("/first"))
    second = [c for c in clients if c.attributes["url.full"].endswith("/second")]
    assert first.attributes["meshcore.attempt"] == 1
    assert [c.attributes["meshcore.attempt"] for c in second] in ([1, 2], [2, 1])
    failed = next(c for c in second if c.attributes["meshcore.attempt"] == 1)
    retried = next(c for c in second if c.attributes["meshcore.attempt"] == 2)
    assert failed.attributes["http.response.status_code"] == 503 and failed.error
    assert retried.attributes["http.response.status_code"] == 200 and not retried.error
    assert retried.attributes["http.request.resend_count"] == 1
    assert by_parent[failed.span_id].attributes["http.response.status_code"] == 503
    assert by_parent[failed.span_id].error
    server_ok = by_parent[retried.span_id]
    assert server_ok.attributes["http.request.method"] == "GET"
    assert server_ok.attributes["url.path"] == "/second"
    assert server_ok.attributes["meshcore.service"] == "orders"
    # The app got a new span id per hop: its parent is the inbound sidecar's server span.
    parents = [h["traceparent"].split("-")[2] for _, _, h in app_b.seen]
    assert parents == [by_parent[c.span_id].span_id for c in (first, failed, retried)]
    assert all(h["traceparent"].split("-")[1] == trace_id for _, _, h in app_b.seen)

