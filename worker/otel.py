"""The spans themselves, with the OpenTelemetry SDK (the `otel` extra); imported only when
tracing is on (worker.tracing).

Attributes use OpenTelemetry's semantic-convention names where one fits (HTTP client,
database) and `postback.*` for the relay's own. What is never set: a URL's path or query,
a header, a body, a secret, an error's message (README, "Tracing").
"""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import Callable, Mapping
from contextvars import ContextVar
from datetime import datetime
from importlib.metadata import version
from types import TracebackType

from arq import Retry
from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import (
    BatchSpanProcessor,
    ConsoleSpanExporter,
    SpanExporter,
)
from opentelemetry.sdk.trace.id_generator import IdGenerator, RandomIdGenerator
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
from yarl import URL

from producer.event import Event
from worker.exchange import Outcome
from worker.tracing import Value

SERVICE_NAME = "postback-relay"
"""`service.name` unless OTEL_SERVICE_NAME (or OTEL_RESOURCE_ATTRIBUTES) names another."""

_first_run: ContextVar[tuple[int, int] | None] = ContextVar("first_run", default=None)
"""The trace and span id the span being started takes: set only around the start of a
job's first run."""


class RunIds(IdGenerator):
    """Random ids, except for the root span of a job's first run, which takes the ids
    `first_run_ids` derives from the job, so that its later runs can link to it without
    storing anything."""

    def __init__(self) -> None:
        self._random = RandomIdGenerator()

    def generate_trace_id(self) -> int:
        ids = _first_run.get()
        return self._random.generate_trace_id() if ids is None else ids[0]

    def generate_span_id(self) -> int:
        ids = _first_run.get()
        return self._random.generate_span_id() if ids is None else ids[1]

    def is_trace_id_random(self) -> bool:
        return _first_run.get() is None


def first_run_ids(delivery: uuid.UUID, job_id: str, enqueued: datetime) -> tuple[int, int]:
    """The trace id and span id of the first run of a delivery's job.

    Every run of a job knows its delivery, job id and enqueue time (arq keeps the latter
    across runs), and nothing else needs storing. The job id and enqueue time tell apart
    a delivery's jobs (a replay, a job the sweep enqueued again), each with its own first
    run; hashed, so that the ids look as random as the W3C trace context asks of them.
    """
    key = f"{delivery}\n{job_id}\n{enqueued.timestamp():.6f}".encode()
    digest = hashlib.blake2b(key, digest_size=24).digest()
    # An all-zero id is invalid; 1 in 2**64 at worst.
    return int.from_bytes(digest[:16]) or 1, int.from_bytes(digest[16:]) or 1


def resource() -> Resource:
    """The SDK's resource from the environment, named for the relay unless it says."""
    found = Resource.create({"service.version": version("postback-relay")})
    if str(found.attributes.get("service.name", "")).startswith("unknown_service"):
        found = found.merge(Resource({"service.name": SERVICE_NAME}))
    return found


def provider(*processors: SpanProcessor, shutdown_on_exit: bool = True) -> TracerProvider:
    """A tracer provider with the relay's ids (`RunIds`) and resource, sending its spans to
    `processors`."""
    made = TracerProvider(
        resource=resource(), id_generator=RunIds(), shutdown_on_exit=shutdown_on_exit
    )
    for processor in processors:
        made.add_span_processor(processor)
    return made


def exporting(exporter: str) -> TracerProvider:
    """The provider for an exporter named as OTEL_TRACES_EXPORTER names it; the exporter
    reads its endpoint, headers and timeout from the OTEL_EXPORTER_OTLP_* variables."""
    chosen: SpanExporter
    if exporter == "console":
        chosen = ConsoleSpanExporter()
    else:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        chosen = OTLPSpanExporter()
    return provider(BatchSpanProcessor(chosen))


class _Span:
    """An SDK span, current in this task's context while entered."""

    __slots__ = ("_span", "_token", "_tracer", "noted")

    def __init__(self, tracer: trace.Tracer, span: trace.Span, batched: bool = False) -> None:
        self._tracer = tracer
        self._span = span
        self._token: object | None = None
        self.noted: Callable[[int, int], None] | None = self._batch if batched else None

    def __enter__(self) -> _Span:
        self._token = otel_context.attach(trace.set_span_in_context(self._span))
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        if isinstance(error, Retry):
            # Run again later, as planned: not a failure.
            self._span.set_attribute("postback.run.again_in_s", _seconds(error))
        elif error is not None:
            # The class only: a message may quote a stored row (worker.database.describe).
            self.fail(type(error).__name__)
        if self._token is not None:
            otel_context.detach(self._token)  # type: ignore[arg-type]
        self._span.end()

    def set(self, key: str, value: Value | None) -> None:
        if value is not None:
            self._span.set_attribute(key, value)

    def fail(self, kind: str) -> None:
        """Mark the span failed, `kind` its `error.type` (a class name, never a message)."""
        self._span.set_attribute("error.type", kind)
        self._span.set_status(trace.StatusCode.ERROR)

    def answered(self, outcome: Outcome) -> None:
        if outcome.status is not None:
            self._span.set_attribute("http.response.status_code", outcome.status)
        failure = outcome.failure_class
        if failure is not None:
            self.fail(failure)

    def statement(self, name: str) -> _Span:
        span = self._tracer.start_span(
            name,
            kind=trace.SpanKind.CLIENT,
            attributes={"db.system.name": "postgresql", "db.stored_procedure.name": name},
            record_exception=False,
        )
        return _Span(self._tracer, span, batched=True)

    def request(self, method: str, url: str) -> _Span:
        parsed = URL(url, encoded=True)
        attributes: dict[str, Value] = {"http.request.method": method}
        if parsed.host is not None:
            attributes["server.address"] = parsed.host
        if parsed.port is not None:
            attributes["server.port"] = parsed.port
        span = self._tracer.start_span(
            method, kind=trace.SpanKind.CLIENT, attributes=attributes, record_exception=False
        )
        return _Span(self._tracer, span)

    def _batch(self, statement: int, calls: int) -> None:
        self._span.set_attribute("postback.ledger.statement", statement)
        if calls > 1:  # the convention leaves it unset for one
            self._span.set_attribute("db.operation.batch.size", calls)


def _seconds(retry: Retry) -> float:
    defer = retry.defer_score  # milliseconds
    return 0.0 if defer is None else round(defer / 1000, 3)


class Tracer:
    """Makes the relay's spans with `provider`'s tracer (worker.tracing.Tracer)."""

    def __init__(self, provider: TracerProvider) -> None:
        self.provider = provider
        self._tracer = provider.get_tracer("postback-relay", version("postback-relay"))
        self._propagator = TraceContextTextMapPropagator()

    def run(
        self, event: Event, delivery: uuid.UUID, job_id: str, job_try: int, enqueued: datetime
    ) -> _Span:
        first = first_run_ids(delivery, job_id, enqueued)
        attributes: dict[str, Value] = {
            "postback.event.id": event.id,
            "postback.event.type": event.type,
            "postback.delivery.id": str(delivery),
            "postback.affiliate.id": event.affiliate_id,
            "postback.job.try": job_try,
        }
        links: list[trace.Link] = []
        token = None
        if job_try == 1:
            token = _first_run.set(first)
        else:
            context = trace.SpanContext(
                first[0],
                first[1],
                is_remote=True,
                trace_flags=trace.TraceFlags(trace.TraceFlags.SAMPLED),
            )
            links.append(trace.Link(context, {"postback.link": "first_run"}))
        try:
            span = self._tracer.start_span(
                "deliver",
                # A root: never a child of whatever context the job's task inherited.
                context=otel_context.Context(),
                kind=trace.SpanKind.CONSUMER,
                attributes=attributes,
                links=links,
                record_exception=False,
            )
        finally:
            if token is not None:
                _first_run.reset(token)
        return _Span(self._tracer, span)

    def ingest(self, headers: Mapping[str, str]) -> _Span:
        parent = self._propagator.extract(headers)
        span = self._tracer.start_span(
            "POST /v1/events",
            context=parent,
            kind=trace.SpanKind.SERVER,
            attributes={"http.request.method": "POST", "http.route": "/v1/events"},
            record_exception=False,
        )
        return _Span(self._tracer, span)

    def flush(self) -> None:
        self.provider.force_flush(timeout_millis=5000)
