"""Tracing on for a block of a test, its spans kept in memory (the SDK's in-memory exporter)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from worker import otel, tracing


@contextlib.contextmanager
def traced() -> Iterator[InMemorySpanExporter]:
    """Spans of what runs in this process meanwhile (a worker in the test's event loop, the
    service), made as the relay makes them when OTEL_* ask for traces."""
    exporter = InMemorySpanExporter()
    provider = otel.provider(SimpleSpanProcessor(exporter), shutdown_on_exit=False)
    tracing.enable(otel.Tracer(provider))
    try:
        yield exporter
    finally:
        tracing.disable()
        provider.shutdown()


def named(spans: tuple[ReadableSpan, ...], name: str) -> list[ReadableSpan]:
    return [span for span in spans if span.name == name]


def children(spans: tuple[ReadableSpan, ...], parent: ReadableSpan) -> list[ReadableSpan]:
    """The spans whose parent is `parent`, in the order they started."""
    assert parent.context is not None
    found = [
        span
        for span in spans
        if span.parent is not None and span.parent.span_id == parent.context.span_id
    ]
    return sorted(found, key=lambda span: span.start_time or 0)
