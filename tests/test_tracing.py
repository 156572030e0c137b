"""Tracing: the spans a delivery, a retry and an ingest make when OTEL_* ask for traces,
what they never carry, and nothing at all when they do not ask."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import asyncpg
import pytest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.trace import SpanKind, StatusCode

import worker
from ops.cli.demo import serve
from producer import Producer
from producer.event import parse_event
from tests import leakcheck
from tests.support.cli import Postback, postback_env, refusal, succeeded
from tests.support.events import event_data, save_callback
from tests.support.ledger import delivery
from tests.support.receivers import Flaky, Receiver
from tests.support.service import Api, ingest
from tests.support.tracing import children, named, traced
from tests.support.workers import drain
from worker import otel, tracing
from worker.config import Settings

ROOT = Path(__file__).resolve().parent.parent

SECRET = "whsec_tracing0123456789abcdefghij"
TOKEN = "tok-in-the-query-0123456789"
leakcheck.register(SECRET, TOKEN)

OTEL_VARIABLES = (
    "OTEL_SDK_DISABLED",
    "OTEL_TRACES_EXPORTER",
    "OTEL_EXPORTER_OTLP_ENDPOINT",
    "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
    "OTEL_EXPORTER_OTLP_PROTOCOL",
    "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL",
    "OTEL_SERVICE_NAME",
)


def _values(spans: tuple[ReadableSpan, ...]) -> list[str]:
    """Every attribute value of every span and link, and every span's name, as text."""
    found = []
    for span in spans:
        found.append(span.name)
        found.extend(str(value) for value in (span.attributes or {}).values())
        for link in span.links:
            found.extend(str(value) for value in (link.attributes or {}).values())
    return found


async def test_a_delivered_event_gives_a_run_span_with_its_request_and_ledger_statements(
    db: asyncpg.Connection, producer: Producer, receiver: Receiver, settings: Settings
) -> None:
    await save_callback(
        db,
        "ann",
        "order.created",
        "POST",
        receiver.url + f"/pb/{{{{order.number}}}}?token={TOKEN}",
        SECRET,
    )
    data = event_data("traced")
    await producer.publish(data)
    with traced() as exported:
        await drain(settings)
    spans = exported.get_finished_spans()

    [got] = receiver.requests
    headers = {name.lower() for name in got.headers}
    assert {"traceparent", "tracestate", "baggage"} & headers == set()
    row = await delivery(db, data["id"])
    [run] = named(spans, "deliver")
    assert run.parent is None
    assert run.kind == SpanKind.CONSUMER
    assert dict(run.attributes or {}) == {
        "postback.event.id": data["id"],
        "postback.event.type": "order.created",
        "postback.delivery.id": str(row["id"]),
        "postback.affiliate.id": "ann",
        "postback.job.try": 1,
        "postback.take.action": "claimed",
        "postback.delivery.state": "delivered",
        "postback.attempt": 1,
    }
    assert run.status.status_code == StatusCode.UNSET
    take, sent, record = children(spans, run)
    assert (take.name, sent.name, record.name) == ("postback_take", "POST", "postback_record")
    port = int(receiver.url.rsplit(":", 1)[1])
    assert sent.kind == SpanKind.CLIENT
    assert dict(sent.attributes or {}) == {
        "http.request.method": "POST",
        "server.address": "127.0.0.1",
        "server.port": port,
        "http.response.status_code": 200,
    }
    for statement in (take, record):
        attributes = dict(statement.attributes or {})
        assert attributes["db.system.name"] == "postgresql"
        assert attributes["db.stored_procedure.name"] == statement.name
        assert attributes["postback.ledger.statement"] >= 1  # type: ignore[operator]
    assert {span.context.trace_id for span in spans if span.context} == {run.context.trace_id}
    # Not the URL, nor its path or query, nor the secret, nor anything from the body.
    text = " ".join(_values(spans))
    for never in (TOKEN, SECRET, "/pb/", "?token", got.path_qs, receiver.url, "#1001"):
        assert never not in text


async def test_a_retried_delivery_links_each_later_run_to_the_first(
    db: asyncpg.Connection, producer: Producer, flaky: Flaky, settings: Settings
) -> None:
    """Three runs (the schedule's two retries), each a trace of its own: the first's ids
    come from the job, so the later runs link to it with nothing stored."""
    await save_callback(db, "ann", "order.created", "GET", flaky.url + "/fail")
    data = event_data("retried")
    await producer.publish(data)
    with traced() as exported:
        await drain(settings)
    spans = exported.get_finished_spans()

    row = await delivery(db, data["id"])
    assert (row["state"], row["attempts"]) == ("dead", 3)
    runs = sorted(named(spans, "deliver"), key=lambda span: span.start_time or 0)
    tries = [(span.attributes or {})["postback.job.try"] for span in runs]
    assert tries == [1, 2, 3]
    first = runs[0].context
    assert first is not None
    assert runs[0].links == ()
    for later in runs[1:]:
        assert later.context is not None
        assert later.context.trace_id != first.trace_id
        [link] = later.links
        assert (link.context.trace_id, link.context.span_id) == (first.trace_id, first.span_id)
        assert dict(link.attributes or {}) == {"postback.link": "first_run"}
    states = [(span.attributes or {})["postback.delivery.state"] for span in runs]
    assert states == ["retrying", "retrying", "dead"]
    assert all((span.attributes or {})["postback.run.again_in_s"] > 0 for span in runs[:2])  # type: ignore[operator]
    requests = named(spans, "GET")
    assert len(requests) == 3
    for sent in requests:
        assert (sent.attributes or {})["http.response.status_code"] == 500
        assert (sent.attributes or {})["error.type"] == "http_5xx"
        assert sent.status.status_code == StatusCode.ERROR
    assert flaky.paths == ["/fail"] * 3


async def test_an_ingest_span_joins_the_callers_trace_and_says_the_batch_size(
    api: Api, db: asyncpg.Connection
) -> None:
    trace_id = "4bf92f3577b34da6a3ce929d0e0e4736"
    parent = "00f067aa0ba902b7"
    batch = [event_data("ingest-a"), event_data("ingest-b")]
    with traced() as exported:
        status, _ = await api.call(
            "POST",
            "/v1/events",
            token="ingest-token-for-tests-0123456789",
            json=batch,
            headers={"traceparent": f"00-{trace_id}-{parent}-01"},
        )
        refused, _ = await ingest(api, [{"id": "x"}])
    assert (status, refused) == (202, 422)
    accepted, bad = named(exported.get_finished_spans(), "POST /v1/events")
    assert accepted.kind == SpanKind.SERVER
    assert accepted.context is not None
    assert accepted.parent is not None
    assert f"{accepted.context.trace_id:032x}" == trace_id
    assert f"{accepted.parent.span_id:016x}" == parent
    assert dict(accepted.attributes or {}) == {
        "http.request.method": "POST",
        "http.route": "/v1/events",
        "postback.batch.size": 2,
        "http.response.status_code": 202,
    }
    assert bad.parent is None
    assert (bad.attributes or {})["http.response.status_code"] == 422
    assert "postback.batch.size" not in (bad.attributes or {})


async def test_the_worker_exports_over_otlp_when_the_environment_asks(
    db: asyncpg.Connection,
    producer: Producer,
    receiver: Receiver,
    settings: Settings,
    tmp_path: Path,
) -> None:
    """`postback worker` with OTEL_EXPORTER_OTLP_ENDPOINT and OTEL_SERVICE_NAME set: a
    collector (a plain HTTP server here) gets the spans as OTLP over HTTP."""
    collector = Receiver()
    await save_callback(db, "ann", "order.created", "GET", receiver.url + "/pb")
    data = event_data("otlp")
    await producer.publish(data)
    async with serve(collector.record) as url:
        postback = Postback(postback_env(settings), tmp_path)
        env = dict.fromkeys(OTEL_VARIABLES)
        env |= {"OTEL_EXPORTER_OTLP_ENDPOINT": url, "OTEL_SERVICE_NAME": "relay-under-test"}
        # In a thread: the receiver and the collector answer from this event loop.
        ran = await asyncio.to_thread(postback, "worker", "--burst", env_overrides=env)
        succeeded(ran)
    assert len(receiver.requests) == 1
    posts = [got for got in collector.requests if got.path_qs == "/v1/traces"]
    assert posts, [got.path_qs for got in collector.requests]
    names = set()
    for got in posts:
        assert got.headers["Content-Type"] == "application/x-protobuf"
        request = ExportTraceServiceRequest()
        request.ParseFromString(got.body)
        for spans in request.resource_spans:
            service = {a.key: a.value.string_value for a in spans.resource.attributes}
            assert service["service.name"] == "relay-under-test"
            names |= {span.name for scope in spans.scope_spans for span in scope.spans}
    assert {"deliver", "postback_take", "GET", "postback_record"} <= names


async def test_a_worker_not_asked_for_traces_imports_no_opentelemetry(
    db: asyncpg.Connection,
    producer: Producer,
    receiver: Receiver,
    settings: Settings,
) -> None:
    """`postback worker` as it runs without OTEL_*: it delivers, and opentelemetry is never
    loaded, so no span is made or exported."""
    await save_callback(db, "ann", "order.created", "GET", receiver.url + "/pb")
    await producer.publish(event_data("untraced"))
    code = (
        "import sys\n"
        "from ops.cli.commands import main\n"
        "code = main(['worker', '--burst'])\n"
        "print(*sorted(sys.modules))\n"
        "sys.exit(code)\n"
    )
    env = {k: v for k, v in postback_env(settings).items() if not k.startswith("OTEL_")}
    # In a thread: the receiver answers from this event loop.
    ran = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-c", code],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    leakcheck.logged(ran.stderr)
    loaded = ran.stdout.split()
    assert [got.path_qs for got in receiver.requests] == ["/pb"]
    assert "worker.tracing" in loaded
    otel_loaded = [name for name in loaded if name.partition(".")[0] == "opentelemetry"]
    assert (otel_loaded, "worker.otel" in loaded) == ([], False)


@pytest.mark.unit
def test_without_a_tracer_every_span_is_the_one_that_does_nothing() -> None:
    assert not tracing.enabled()
    run = tracing.run(parse_event(event_data("unit")), uuid.uuid4(), "job", 1, datetime.now(UTC))
    assert run is tracing.NO_SPAN
    assert run.statement("postback_take") is run.request("GET", "http://x.test/") is run
    assert run.noted is None
    assert tracing.ingest({"traceparent": "whatever"}) is tracing.NO_SPAN


@pytest.mark.unit
def test_a_first_run_has_ids_any_later_run_of_its_job_derives_again() -> None:
    """From what every run of a job knows (its delivery, job id and enqueue time): the same
    each time, and another job of the same delivery (a replay) has its own."""
    did = uuid.uuid4()
    at = datetime(2026, 11, 30, 6, 0, tzinfo=UTC)
    ids = otel.first_run_ids(did, "job-1", at)
    assert ids == otel.first_run_ids(did, "job-1", at)
    assert 0 < ids[0] < 2**128
    assert 0 < ids[1] < 2**64
    others = {
        otel.first_run_ids(did, "job-2", at),
        otel.first_run_ids(did, "job-1", at + timedelta(milliseconds=1)),
        otel.first_run_ids(uuid.uuid4(), "job-1", at),
    }
    assert len(others) == 3
    assert ids not in others
    assert len({trace_id for trace_id, _ in others | {ids}}) == 4


@pytest.mark.unit
@pytest.mark.parametrize(
    ("environ", "exporter"),
    [
        ({}, None),
        ({"OTEL_SERVICE_NAME": "relay"}, None),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318"}, "otlp"),
        ({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://collector:4318/v1/traces"}, "otlp"),
        ({"OTEL_TRACES_EXPORTER": "otlp"}, "otlp"),
        ({"OTEL_TRACES_EXPORTER": "console"}, "console"),
        ({"OTEL_TRACES_EXPORTER": "none", "OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318"}, None),
        ({"OTEL_SDK_DISABLED": "true", "OTEL_TRACES_EXPORTER": "otlp"}, None),
    ],
)
def test_the_environment_says_whether_and_where_to_export(
    environ: dict[str, str], exporter: str | None
) -> None:
    assert tracing.exporter_from_environment(environ) == exporter


@pytest.mark.unit
@pytest.mark.parametrize(
    ("environ", "said"),
    [
        (
            {"OTEL_TRACES_EXPORTER": "zipkin"},
            "OTEL_TRACES_EXPORTER=zipkin is not one the relay exports to: use otlp or "
            "console, or none",
        ),
        (
            {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4317", "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc"},
            "OTLP protocol grpc is not supported: the relay exports OTLP over HTTP; set "
            "OTEL_EXPORTER_OTLP_PROTOCOL=http/protobuf (and the endpoint's HTTP port, usually "
            "4318)",
        ),
    ],
)
def test_an_exporter_the_relay_cannot_use_is_refused_with_the_fix(
    environ: dict[str, str], said: str
) -> None:
    with pytest.raises(tracing.TracingUnavailable) as refused:
        tracing.exporter_from_environment(environ)
    assert str(refused.value) == said


@pytest.mark.unit
def test_traces_asked_for_without_the_extra_name_the_extra(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # As where the extra is not installed: the import of opentelemetry fails.
    monkeypatch.setitem(sys.modules, "opentelemetry", None)
    monkeypatch.delitem(sys.modules, "worker.otel", raising=False)
    monkeypatch.delattr(worker, "otel", raising=False)
    with pytest.raises(tracing.TracingUnavailable) as refused:
        tracing.from_environment({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318"})
    assert str(refused.value) == (
        "OTEL_* asks for traces but OpenTelemetry is not installed (opentelemetry): "
        "pip install 'postback-relay[otel]', or unset OTEL_TRACES_EXPORTER and "
        "OTEL_EXPORTER_OTLP_ENDPOINT"
    )
    assert not tracing.enabled()


def test_a_worker_asked_for_an_unknown_exporter_refuses_to_start(
    settings: Settings, tmp_path: Path
) -> None:
    postback = Postback(postback_env(settings), tmp_path)
    said = refusal(postback("worker", "--burst", env_overrides={"OTEL_TRACES_EXPORTER": "jaeger"}))
    assert said == (
        "postback: error: OTEL_TRACES_EXPORTER=jaeger is not one the relay exports to: "
        "use otlp or console, or none"
    )


@pytest.mark.unit
def test_a_run_that_fails_says_the_class_of_its_error_and_never_its_message() -> None:
    """A message may quote a stored row (worker.database.describe): only the class goes."""
    event = parse_event(event_data("failing"))
    with (
        traced() as exported,
        pytest.raises(ValueError, match=TOKEN),
        tracing.run(event, uuid.uuid4(), "job", 2, datetime.now(UTC)),
    ):
        raise ValueError(f"row contains {TOKEN}")
    [run] = exported.get_finished_spans()
    assert run.status.status_code == StatusCode.ERROR
    assert run.status.description is None
    assert (run.attributes or {})["error.type"] == "ValueError"
    assert run.events == ()
    assert TOKEN not in " ".join(_values((run,)))
