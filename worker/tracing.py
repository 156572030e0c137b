"""Traces of the relay's work (OpenTelemetry): made only when the `OTEL_*` variables say
where to send them and the `otel` extra is installed (README, "Tracing").

Off, every function here returns `NO_SPAN`, one shared object whose methods do nothing:
a delivery then makes no span object and opentelemetry is never imported (worker.otel,
which makes the real spans, is imported only by `from_environment` and `enable`).
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable, Mapping
from datetime import datetime
from types import TracebackType
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from producer.event import Event
    from worker.exchange import Outcome

Value = str | bool | int | float


class Span(Protocol):
    """A span while it is open: entered, given attributes, exited."""

    def __enter__(self) -> Span: ...

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None: ...

    def set(self, key: str, value: Value | None) -> None:
        """Set an attribute; None sets nothing."""

    def answered(self, outcome: Outcome) -> None:
        """For a request's span: its status code, and its failure class as `error.type`."""

    def statement(self, name: str) -> Span:
        """A child span for one ledger statement."""

    def request(self, method: str, url: str) -> Span:
        """A child span for one attempt's request, with the URL's host only."""

    @property
    def noted(self) -> Callable[[int, int], None] | None:
        """For a statement sent by group commit (worker.group): told which statement the
        call went in (the worker's count of them) and how many calls it carried; None
        when there is nothing to tell."""


class _NoSpan:
    """What every span is when tracing is off: shared, and doing nothing."""

    __slots__ = ()
    noted: None = None

    def __enter__(self) -> _NoSpan:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        return None

    def set(self, key: str, value: Value | None) -> None:
        return None

    def answered(self, outcome: Outcome) -> None:
        return None

    def statement(self, name: str) -> _NoSpan:
        return self

    def request(self, method: str, url: str) -> _NoSpan:
        return self


NO_SPAN = _NoSpan()


class Tracer(Protocol):
    """What makes the spans when tracing is on (worker.otel.Tracer)."""

    def run(
        self, event: Event, delivery: uuid.UUID, job_id: str, job_try: int, enqueued: datetime
    ) -> Span: ...

    def ingest(self, headers: Mapping[str, str]) -> Span: ...

    def flush(self) -> None: ...


_tracer: Tracer | None = None


def run(event: Event, delivery: uuid.UUID, job_id: str, job_try: int, enqueued: datetime) -> Span:
    """The span of one run of a delivery's job (`job_try` counts from 1); a root span, whose
    ids for a job's first run are derived from the job, so its later runs link to it."""
    return NO_SPAN if _tracer is None else _tracer.run(event, delivery, job_id, job_try, enqueued)


def ingest(headers: Mapping[str, str]) -> Span:
    """The span of one `POST /v1/events`, in the caller's trace when its headers carry a
    W3C `traceparent`."""
    return NO_SPAN if _tracer is None else _tracer.ingest(headers)


def enabled() -> bool:
    return _tracer is not None


def enable(tracer: Tracer) -> None:
    """Make spans with `tracer` from now on (`from_environment` does, and tests)."""
    global _tracer
    _tracer = tracer


def disable() -> None:
    global _tracer
    _tracer = None


def flush() -> None:
    """Export the spans still buffered: before a worker or the service stops."""
    if _tracer is not None:
        _tracer.flush()


class TracingUnavailable(Exception):
    """`OTEL_*` asks for traces that this installation cannot export."""


EXPORTERS = ("otlp", "console")
"""The values of OTEL_TRACES_EXPORTER the relay exports to (the extra's OTLP over HTTP, and
the SDK's console exporter); "none" turns tracing off."""


def exporter_from_environment(environ: Mapping[str, str]) -> str | None:
    """The exporter `environ` asks for, or None when it asks for no traces: with neither
    OTEL_TRACES_EXPORTER nor an OTLP endpoint set, or with OTEL_SDK_DISABLED=true.

    Raises `TracingUnavailable` for an exporter or protocol the relay does not export to.
    """
    if environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return None
    named = environ.get("OTEL_TRACES_EXPORTER", "").strip().lower()
    endpoint = any(
        environ.get(name, "").strip()
        for name in ("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
    )
    if not named:
        named = "otlp" if endpoint else "none"
    if named == "none":
        return None
    if named not in EXPORTERS:
        raise TracingUnavailable(
            f"OTEL_TRACES_EXPORTER={named} is not one the relay exports to: "
            f"use {' or '.join(EXPORTERS)}, or none"
        )
    protocol = (
        environ.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL")
        or environ.get("OTEL_EXPORTER_OTLP_PROTOCOL")
        or "http/protobuf"
    ).strip()
    if named == "otlp" and protocol != "http/protobuf":
        raise TracingUnavailable(
            f"OTLP protocol {protocol} is not supported: the relay exports OTLP over HTTP; "
            "set OTEL_EXPORTER_OTLP_PROTOCOL=http/protobuf (and the endpoint's HTTP port, "
            "usually 4318)"
        )
    return named


def from_environment(environ: Mapping[str, str] | None = None) -> bool:
    """Turn tracing on when the environment asks for it; whether it is on.

    Leaves tracing as it is when the environment does not ask for it, so that a tracer
    enabled in-process (by a test) stays. Raises `TracingUnavailable` when the environment
    asks for traces that cannot be exported, the extra's absence included.
    """
    exporter = exporter_from_environment(os.environ if environ is None else environ)
    if exporter is None or _tracer is not None:
        return _tracer is not None
    try:
        from worker import otel  # the extra: only imported when asked for
    except ImportError as exc:
        raise TracingUnavailable(
            f"OTEL_* asks for traces but OpenTelemetry is not installed ({exc.name}): "
            "pip install 'postback-relay[otel]', or unset OTEL_TRACES_EXPORTER and "
            "OTEL_EXPORTER_OTLP_ENDPOINT"
        ) from None
    enable(otel.Tracer(otel.exporting(exporter)))
    return True
