"""Where spans go: one TracerProvider per mesh, exporting over OTLP/HTTP off the request path.

With `[tracing] endpoint` set, the plugin builds its own provider (sampler
`ParentBased(TraceIdRatioBased(ratio))`, a `BatchSpanProcessor` over the OTLP/HTTP exporter);
with it empty, spans go to the process's global provider, the one an application that already
set up OpenTelemetry configured (library mode).

The SDK's batch processor drops spans silently once its queue is full (it only logs). The
plugin keeps its own count of spans handed over and not yet exported, and refuses a span
before the SDK's queue could overflow, so `dropped` in the mesh's state is exact and the
queue stays bounded however slow or dead the collector is.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from typing import Any

from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, Span, SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult
from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased

__all__ = ["Exporting", "Tracing", "parse_headers"]

INSTRUMENTATION = "meshcore_otel"
VERSION = "0.2.0"


def parse_headers(items: Sequence[str]) -> dict[str, str]:
    """`["authorization=Bearer x", ...]` -> a dict; the OTEL_EXPORTER_OTLP_HEADERS form."""
    out: dict[str, str] = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or not name.strip():
            raise ValueError(f"expected 'name=value', got {item!r}")
        out[name.strip().lower()] = value.strip()
    return out


class _CountingExporter(SpanExporter):
    """The OTLP exporter, counting what left the queue (exported or lost to the collector)."""

    def __init__(self, inner: SpanExporter, owner: Exporting) -> None:
        self.inner = inner
        self.owner = owner

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        try:
            result = self.inner.export(spans)
        except Exception:
            result = SpanExportResult.FAILURE
        self.owner.settle(len(spans), result is SpanExportResult.SUCCESS)
        return result

    def shutdown(self) -> None:
        self.inner.shutdown()

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return self.inner.force_flush(timeout_millis)


class Exporting(SpanProcessor):
    """A BatchSpanProcessor with an exact count of what it accepted, exported and dropped."""

    def __init__(self, exporter: SpanExporter, *, max_queue_size: int, max_export_batch_size: int,
                 schedule_delay: float, export_timeout: float) -> None:
        self.max_queue_size = max_queue_size
        self.accepted = 0
        self.exported = 0
        self.failed = 0
        self.dropped = 0
        self._lock = threading.Lock()
        self.batch = BatchSpanProcessor(
            _CountingExporter(exporter, self),
            max_queue_size=max_queue_size,
            max_export_batch_size=min(max_export_batch_size, max_queue_size),
            schedule_delay_millis=schedule_delay * 1000,
            export_timeout_millis=export_timeout * 1000,
        )

    @property
    def pending(self) -> int:
        """Spans queued or being exported."""
        return self.accepted - self.exported - self.failed

    def settle(self, count: int, ok: bool) -> None:
        with self._lock:
            if ok:
                self.exported += count
            else:
                self.failed += count

    def on_start(self, span: Span, parent_context: Context | None = None) -> None:
        pass

    def on_end(self, span: ReadableSpan) -> None:
        if span.context is None or not span.context.trace_flags.sampled:
            return
        with self._lock:
            if self.accepted - self.exported - self.failed >= self.max_queue_size:
                self.dropped += 1
                return
            self.accepted += 1
        self.batch.on_end(span)

    def shutdown(self) -> None:
        self.batch.shutdown()  # type: ignore[no-untyped-call]  # the SDK leaves it unannotated

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return self.batch.force_flush(timeout_millis)

    def state(self) -> dict[str, int]:
        return {
            "queued": self.pending,
            "exported": self.exported,
            "export_failed": self.failed,
            "dropped": self.dropped,
        }


class Tracing:
    """One mesh's tracer: its own provider and exporter, or the global provider.

    The provider (and the batch processor's thread) is made by `start()` when the mesh starts,
    so a mesh that is built but never run (`meshcore check-config`) leaves no thread behind;
    until then `tracer` makes no spans.
    """

    def __init__(self, settings: Any, service_name: str) -> None:
        self.settings = settings
        self.service_name = settings.service_name or service_name
        self.endpoint: str = settings.endpoint
        self.ratio: float = settings.ratio
        self.provider: TracerProvider | None = None
        self.exporting: Exporting | None = None
        # service -> endpoint -> the SPIFFE ID its server proved in the last accepted mTLS
        # handshake (`meshcore_check_peer`); what a CLIENT span names as the attempt's peer.
        self.peers: dict[str, dict[Any, str]] = {}
        self.tracer: trace.Tracer = (
            trace.NoOpTracer() if self.endpoint else trace.get_tracer(INSTRUMENTATION, VERSION)
        )

    def start(self) -> None:
        if not self.endpoint or self.provider is not None:
            return
        settings = self.settings
        exporter = OTLPSpanExporter(
            endpoint=self.endpoint,
            headers=parse_headers(settings.headers),
            timeout=settings.export_timeout,
        )
        self.exporting = Exporting(
            exporter,
            max_queue_size=settings.max_queue_size,
            max_export_batch_size=settings.max_export_batch_size,
            schedule_delay=settings.schedule_delay,
            export_timeout=settings.export_timeout,
        )
        self.provider = TracerProvider(
            sampler=ParentBased(TraceIdRatioBased(self.ratio)),
            resource=Resource.create({"service.name": self.service_name}),
        )
        self.provider.add_span_processor(self.exporting)
        self.tracer = self.provider.get_tracer(INSTRUMENTATION, VERSION)

    def state(self) -> dict[str, Any]:
        out: dict[str, Any] = {"endpoint": self.endpoint or "(global provider)"}
        if self.endpoint:
            out["ratio"] = self.ratio
            out.update(self.exporting.state() if self.exporting is not None else {})
        return out

    def shutdown(self) -> None:
        """Export what is queued (bounded by the export timeout) and stop; blocks: a thread."""
        if self.provider is not None:
            self.provider.shutdown()
