"""Library mode: a CLIENT span per attempt, exported to a real OTLP/HTTP receiver; the
W3C context each attempt sends; the exporter down or hung costs requests nothing."""

from __future__ import annotations

import re
import socket
import threading
from typing import Any

import anyio
import pytest
from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from otlp_receiver import OtlpReceiver

import meshcore
from meshcore.testing import static_service

PLUGINS = ["retry", "otel"]


def config(receiver_url: str, server: Any, **tracing: Any) -> dict[str, Any]:
    return {
        "tracing": {"endpoint": receiver_url, "service_name": "shop", "schedule_delay": "20ms",
                    **tracing},
        "services": {
            "orders": static_service(
                [server], resilience=["retry", "otel"],
                retry={"backoff_base": "1ms", "backoff_max": "2ms", "budget": False},
            ),
        },
    }


def traceparent(headers: dict[str, str]) -> tuple[str, str, bool]:
    """(trace id, parent span id, sampled) of the W3C header a hop received."""
    version, trace_id, span_id, flags = headers["traceparent"].split("-")
    assert version == "00"
    return trace_id, span_id, bool(int(flags, 16) & 1)


@pytest.mark.anyio
async def test_a_span_per_attempt_under_the_callers_span(
    receiver: OtlpReceiver, upstream: Any
) -> None:
    server = upstream(fail_every=2)  # the 2nd request answers 503: retried once
    app_tracer = TracerProvider().get_tracer("app")  # the app's own SDK, separate from the mesh's
    async with meshcore.Mesh(config(receiver.url, server), PLUGINS) as mesh:
        with app_tracer.start_as_current_span("checkout") as root:
            async with mesh.client() as client:
                assert (await client.get("http://orders/a")).status_code == 200
                assert (await client.get("http://orders/b?x=1")).status_code == 200
        state = mesh.state()["state"]["tracing"]
    # Leaving the mesh exported what was queued (shutdown flushes).
    spans = await anyio.to_thread.run_sync(receiver.wait_for, 3)
    assert len(spans) == 3
    root_ctx = root.get_span_context()
    trace_id = format(root_ctx.trace_id, "032x")
    assert {s.trace_id for s in spans} == {trace_id}
    assert {s.parent_id for s in spans} == {format(root_ctx.span_id, "016x")}
    assert {s.kind for s in spans} == {"CLIENT"} and {s.service for s in spans} == {"shop"}
    first, failed, retried = spans
    assert first.name == "GET"
    assert first.attributes["http.request.method"] == "GET"
    assert first.attributes["url.full"] == "http://orders/a"
    assert first.attributes["server.address"] == "orders"
    assert first.attributes["server.port"] == 80
    assert first.attributes["http.response.status_code"] == 200
    assert first.attributes["meshcore.service"] == "orders"
    assert first.attributes["meshcore.attempt"] == 1
    assert first.attributes["meshcore.endpoint"] == server.address
    assert first.attributes["network.peer.port"] == server.port
    assert not first.error and "error.type" not in first.attributes
    assert failed.attributes["meshcore.attempt"] == 1
    assert failed.attributes["http.response.status_code"] == 503
    assert failed.attributes["error.type"] == "503" and failed.error
    assert retried.attributes["meshcore.attempt"] == 2
    assert retried.attributes["http.request.resend_count"] == 1
    assert retried.attributes["http.response.status_code"] == 200
    assert retried.attributes["url.full"] == "http://orders/b?x=1"
    # Each attempt carried its own span id to the server, in the caller's trace.
    sent = [traceparent(headers) for _, _, headers in server.seen]
    assert sent == [(trace_id, s.span_id, True) for s in spans]
    assert state["exported"] + state["queued"] == 3 and state["dropped"] == 0


@pytest.mark.anyio
async def test_a_request_without_a_trace_starts_one(receiver: OtlpReceiver, upstream: Any) -> None:
    server = upstream()
    token = otel_context.attach(otel_context.Context())  # no current span at all
    try:
        async with meshcore.Mesh(config(receiver.url, server), PLUGINS) as mesh:
            async with mesh.client() as client:
                await client.get("http://orders/")
                # A caller's own unsampled traceparent is honoured: parent-based sampling.
                unsampled = "00-" + "ab" * 16 + "-" + "cd" * 8 + "-00"
                await client.get("http://orders/", headers={"traceparent": unsampled})
                # A malformed one restarts the trace (W3C Trace Context, 4.3).
                await client.get("http://orders/", headers={"traceparent": "00-xyz-1-01"})
    finally:
        otel_context.detach(token)
    span, restarted = await anyio.to_thread.run_sync(receiver.wait_for, 2)
    assert span.parent_id == "" and restarted.parent_id == ""
    assert traceparent(server.seen[2][2]) == (restarted.trace_id, restarted.span_id, True)
    assert traceparent(server.seen[0][2]) == (span.trace_id, span.span_id, True)
    trace_id, span_id, flags = traceparent(server.seen[1][2])
    assert (trace_id, flags) == ("ab" * 16, False) and span_id != "cd" * 8
    assert receiver.posts >= 1 and len(receiver.spans) == 2


@pytest.mark.anyio
async def test_ratio_zero_samples_no_new_trace_but_still_propagates(
    receiver: OtlpReceiver, upstream: Any
) -> None:
    server = upstream()
    token = otel_context.attach(otel_context.Context())
    try:
        async with meshcore.Mesh(config(receiver.url, server, ratio=0.0), PLUGINS) as mesh:
            async with mesh.client() as client:
                for _ in range(5):
                    await client.get("http://orders/")
    finally:
        otel_context.detach(token)
    assert receiver.spans == []
    assert {traceparent(h)[2] for _, _, h in server.seen} == {False}
    assert len({traceparent(h)[0] for _, _, h in server.seen}) == 5


class HungCollector:
    """A collector on loopback that takes each export's request and answers none of them until
    `release()`; from then on it answers every export 400 (not retried by the exporter)."""

    def __init__(self) -> None:
        self.listener = socket.socket()
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(64)
        self.listener.settimeout(0.05)  # the serving thread polls `stopping`
        self.url = f"http://127.0.0.1:{self.listener.getsockname()[1]}/v1/traces"
        self.posts = 0
        self.holding = threading.Event()  # an export's request arrived and is unanswered
        self.released = threading.Event()
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while not self.stopping.is_set():
            try:
                conn, _ = self.listener.accept()
            except TimeoutError:
                continue
            with conn:
                conn.settimeout(10)
                data = b""
                while b"\r\n\r\n" not in data:
                    chunk = conn.recv(65536)
                    if not chunk:
                        break
                    data += chunk
                head, _, body = data.partition(b"\r\n\r\n")
                if not head.startswith(b"POST /v1/traces "):
                    continue
                length = re.search(rb"(?im)^content-length: *(\d+)", head)
                left = int(length[1]) - len(body) if length else 0
                while left > 0:  # all of it: closing over unread bytes would reset the answer
                    chunk = conn.recv(65536)
                    if not chunk:
                        break
                    left -= len(chunk)
                self.posts += 1
                self.holding.set()
                while not self.released.wait(0.05):
                    if self.stopping.is_set():
                        return
                conn.sendall(b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\n"
                             b"connection: close\r\n\r\n")

    def release(self) -> None:
        self.released.set()

    def close(self) -> None:
        self.released.set()
        self.stopping.set()
        self.thread.join(10)
        self.listener.close()


@pytest.mark.anyio
async def test_a_hung_collector_costs_requests_nothing(upstream: Any) -> None:
    """A collector that takes an export and never answers it: requests do not wait for the
    export, the queue stays at its bound, and drops are counted exactly."""
    server = upstream()
    collector = HungCollector()
    requests = 200
    try:
        # The export timeout is longer than the test runs: the export in flight ends only when
        # the collector answers it.
        cfg = config(collector.url, server, max_queue_size=8, max_export_batch_size=4,
                     export_timeout="60s")
        async with meshcore.Mesh(cfg, PLUGINS) as mesh:
            async with mesh.client() as client:
                assert (await client.get("http://orders/")).status_code == 200
                # The first span's export has reached the collector and hangs there.
                assert await anyio.to_thread.run_sync(collector.holding.wait, 10)
                # A hang guard only: a request that waited for the export would wait 60 s.
                with anyio.fail_after(30):
                    for _ in range(requests):
                        assert (await client.get("http://orders/")).status_code == 200
            # Every request completed while that export still hangs: nothing was settled.
            hung = mesh.state()["state"]["tracing"]
            assert collector.posts == 1
            collector.release()  # the collector answers 400 to that export and every later one
        state = mesh.state()["state"]["tracing"]
    finally:
        collector.close()
    assert hung["exported"] == 0 and hung["export_failed"] == 0
    assert hung["queued"] == 8  # the bound: the hung export's one span and 7 waiting
    assert hung["dropped"] == requests + 1 - 8
    # Leaving the mesh flushed the 8 to the collector, which refused them: counted, not lost.
    assert state["export_failed"] == 8 and state["queued"] == 0 and state["exported"] == 0
    assert state["dropped"] == requests + 1 - 8


def test_settings_are_checked() -> None:
    with pytest.raises(meshcore.ConfigError, match=r"tracing.*endpoint"):
        meshcore.Mesh({"tracing": {"endpoint": "collector:4318"}}, PLUGINS)
    with pytest.raises(meshcore.ConfigError, match=r"tracing.*headers"):
        meshcore.Mesh({"tracing": {"headers": ["no-equals-sign"]}}, PLUGINS)
    with pytest.raises(meshcore.ConfigError, match=r"tracing.*ratio"):
        meshcore.Mesh({"tracing": {"ratio": 2}}, PLUGINS)


def test_without_an_endpoint_spans_go_to_the_global_provider() -> None:
    mesh = meshcore.Mesh({}, PLUGINS)
    import meshcore_otel

    tracing = meshcore_otel.tracing_for(mesh)
    assert tracing.provider is None
    assert isinstance(tracing.tracer, trace.ProxyTracer | trace.Tracer)
    assert mesh.state()["state"]["tracing"] == {"endpoint": "(global provider)"}


def test_a_mesh_never_started_makes_no_provider_and_no_thread() -> None:
    """`meshcore check-config` builds meshes it never runs: no exporter thread for those."""
    import threading

    import meshcore_otel

    before = threading.active_count()
    mesh = meshcore.Mesh({"tracing": {"endpoint": "http://127.0.0.1:4318/v1/traces"}}, PLUGINS)
    tracing = meshcore_otel.tracing_for(mesh)
    assert tracing.provider is None and not tracing.tracer.start_span("x").is_recording()
    assert threading.active_count() == before


@pytest.mark.anyio
async def test_breaker_state_and_a_refused_call_on_the_span(
    receiver: OtlpReceiver, upstream: Any
) -> None:
    """With `otel` outside `breaker`, the call the open circuit refuses is a span too."""
    import meshcore_otel

    server = upstream(status=503)
    breaker = {"window_size": 4, "minimum_calls": 4, "failure_rate": 50,
               "consecutive_failures": 0, "open_duration": "60s"}
    cfg = {
        "tracing": {"endpoint": receiver.url, "schedule_delay": "20ms"},
        "services": {"billing": static_service([server], resilience=["otel", "breaker"],
                                               breaker=breaker)},
    }
    try:
        async with meshcore.Mesh(cfg, ["breaker", "otel"]) as mesh:
            async with mesh.client() as client:
                for _ in range(4):
                    assert (await client.get("http://billing/")).status_code == 503
                with pytest.raises(meshcore.CircuitOpen):
                    await client.get("http://billing/")
    finally:
        meshcore_otel.breaker_states.pop("billing", None)
    spans = await anyio.to_thread.run_sync(receiver.wait_for, 5)
    assert [s.attributes.get("meshcore.breaker.state") for s in spans] == [None] * 4 + ["open"]
    assert spans[4].attributes["error.type"] == "CircuitOpen" and spans[4].error
    assert "http.response.status_code" not in spans[4].attributes
