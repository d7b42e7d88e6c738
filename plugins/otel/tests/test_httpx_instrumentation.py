"""Library mode under the standard httpx instrumentation: an app that set up OpenTelemetry
(a global TracerProvider, `HTTPXClientInstrumentor().instrument()`) sees each mesh call as an
httpx CLIENT span, with the mesh's attempt spans beneath it."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from opentelemetry import trace
from opentelemetry.instrumentation.httpx import HTTPXClientInstrumentor
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

import meshcore
from meshcore.testing import static_service

_exporter = InMemorySpanExporter()


@pytest.fixture
def app_telemetry() -> Iterator[InMemorySpanExporter]:
    """The app's usual set-up: a global provider (settable once per process) and the httpx
    instrumentation, removed again after the test."""
    if not isinstance(trace.get_tracer_provider(), TracerProvider):
        provider = TracerProvider()
        provider.add_span_processor(SimpleSpanProcessor(_exporter))
        trace.set_tracer_provider(provider)
    _exporter.clear()
    HTTPXClientInstrumentor().instrument()
    try:
        yield _exporter
    finally:
        HTTPXClientInstrumentor().uninstrument()


@pytest.mark.anyio
async def test_mesh_calls_are_httpx_client_spans_with_attempts_beneath(
    app_telemetry: InMemorySpanExporter, upstream: Any
) -> None:
    server = upstream(fail_every=2)
    config = {  # no [tracing] endpoint: the mesh's spans go to the app's global provider
        "services": {"orders": static_service(
            [server], resilience=["retry", "otel"],
            retry={"backoff_base": "1ms", "backoff_max": "2ms", "budget": False},
        )},
    }
    async with meshcore.Mesh(config, ["retry", "otel"]) as mesh:
        with trace.get_tracer("app").start_as_current_span("checkout") as root:
            async with mesh.client() as client:
                assert (await client.get("http://orders/a")).status_code == 200
                assert (await client.get("http://orders/b")).status_code == 200  # retried once
    spans = app_telemetry.get_finished_spans()
    by_scope: dict[str, list[Any]] = {}
    for span in spans:
        assert span.instrumentation_scope is not None
        by_scope.setdefault(span.instrumentation_scope.name, []).append(span)
    httpx_spans = by_scope["opentelemetry.instrumentation.httpx"]
    attempts = by_scope["meshcore_otel"]
    assert len(httpx_spans) == 2 and len(attempts) == 3
    trace_id = root.get_span_context().trace_id
    assert {s.context.trace_id for s in spans} == {trace_id}
    assert all(s.kind is trace.SpanKind.CLIENT for s in httpx_spans + attempts)
    assert {s.parent.span_id for s in httpx_spans} == {root.get_span_context().span_id}
    call_a, call_b = sorted(httpx_spans, key=lambda s: s.start_time)
    under_a = [s for s in attempts if s.parent.span_id == call_a.context.span_id]
    under_b = [s for s in attempts if s.parent.span_id == call_b.context.span_id]
    assert [s.attributes["meshcore.attempt"] for s in under_a] == [1]
    assert [s.attributes["meshcore.attempt"] for s in under_b] == [1, 2]
    # The instrumentation's own attribute names (old semconv unless OTEL_SEMCONV_STABILITY_OPT_IN).
    assert call_b.attributes["http.url"] == "http://orders/b"
    assert call_b.attributes["http.status_code"] == 200
    # The server saw each attempt's own span id as the parent.
    sent = [h["traceparent"].split("-")[2] for _, _, h in server.seen]
    assert sent == [format(s.context.span_id, "016x") for s in under_a + under_b]
