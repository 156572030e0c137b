"""The arq job: one queued event in, its postback sent, retried or dead-lettered, and recorded.

A job runs until its delivery settles. Every wait (the retry schedule, an earlier delivery
of the same order, a database outage) is an arq deferral of the same job, so the event
stays in Redis until Postgres says it is done; the sweep re-enqueues it from Postgres if
Redis loses it anyway.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import aiohttp
import asyncpg
import structlog
from arq import Retry
from arq.connections import ArqRedis
from redis.exceptions import RedisError
from yarl import URL

from producer import queue
from producer.event import Event, InvalidEvent, parse_event
from producer.record import refused_delivery_id
from worker import (
    cache,
    callbacks,
    database,
    deliver,
    duration,
    fairness,
    ledger,
    metrics,
    notify,
    render,
    retry,
    sign,
    tracing,
)
from worker.config import Settings
from worker.exchange import Outcome, Request

log = structlog.get_logger("postback.worker")

INFRA_RETRY_SECONDS = 5
"""Wait before retrying a job whose database failed; the event stays queued meanwhile."""

CRASH_RETRY_SECONDS = 60
"""Wait before re-running a job that raised something nobody foresaw."""

BLOCKED_RECHECK_SECONDS = 15
"""How long after the earlier delivery of its order is due a delivery waiting for it looks
again. The earlier one wakes it as soon as it settles; this bounds the wait when that
wake-up comes while the waiting job is between runs and misses it. Counted from when the
earlier one is due, so an update of a create delayed (or retrying) for hours does not look
every 15 s meanwhile."""

CREATE_RECHECK_SECONDS = 1.0
"""The first wait of an update waiting for its order's create before it looks again; each
later one is as long as it has waited so far (`_create_recheck`)."""


@dataclass(frozen=True, slots=True)
class _Run:
    """What one run of the job works with."""

    db: asyncpg.Pool
    http: aiohttp.ClientSession
    redis: ArqRedis
    settings: Settings
    job_id: str
    callbacks: cache.CallbackCache
    destinations: fairness.Destinations
    counts: metrics.Tally
    ledger: ledger.Ledger
    accepted_at: datetime
    """When the event was enqueued: a callback's delay counts from then."""
    span: tracing.Span
    """The run's trace span: `tracing.NO_SPAN`, doing nothing, unless tracing is on."""


async def deliver_event(ctx: dict[str, Any], event_data: Any) -> str:
    """Deliver one event to its affiliate's callback; returns the delivery's state."""
    try:
        # Anyone who can write to Redis can enqueue: validate again, never trust the queue.
        event = parse_event(event_data)
    except InvalidEvent as exc:
        log.error("event_refused", job_id=ctx.get("job_id"), error=str(exc))
        did = refused_delivery_id(event_data)
        if did is not None:
            await ledger.refuse_accepted(ctx["db"], did, f"the worker refused it: {exc}")
        return "refused"
    if event.occurred_at is None:
        # Defaults to the enqueue time, whoever enqueued it (docs/design.md, "Fields and limits").
        event = event.model_copy(update={"occurred_at": ctx["enqueue_time"].astimezone(UTC)})
    did = deliver.delivery_id(event)
    run = _Run(
        ctx["db"],
        ctx["http"],
        ctx["redis"],
        ctx["settings"],
        ctx["job_id"],
        ctx["callbacks"],
        ctx["destinations"],
        ctx["counts"],
        ctx["ledger"],
        ctx["enqueue_time"],
        tracing.run(event, did, ctx["job_id"], ctx["job_try"], ctx["enqueue_time"]),
    )
    with run.span:
        return await _budgeted(run, event, did)


async def _budgeted(run: _Run, event: Event, did: uuid.UUID) -> str:
    # arq deletes a job that outruns its timeout, and before the ledger has the delivery
    # nothing else knows of the event; so the job keeps a budget of its own, shorter
    # than arq's, and running out of it means "try again", like every failure here.
    budget = asyncio.timeout(run.settings.job_timeout)
    try:
        async with budget:
            return await _deliver(run, event, did)
    except Retry:
        raise
    except Exception as exc:
        if budget.expired():
            log.warning("job_timed_out", event_id=event.id, seconds=run.settings.job_timeout)
            wait = INFRA_RETRY_SECONDS
        elif database.transient(exc):
            log.warning("database_failed", event_id=event.id, error=database.describe(exc))
            wait = INFRA_RETRY_SECONDS
        elif isinstance(exc, database.OUTDATED_SCHEMA):
            # New workers on a database the new schema.sql was not applied to yet.
            log.error(
                "schema_outdated",
                event_id=event.id,
                error=database.describe(exc),
                hint="run `postback db init`",
            )
            wait = CRASH_RETRY_SECONDS
        else:
            # Nobody foresaw it: a bug, most likely. Kept, not dropped, so a fix can still
            # deliver it; the traceback only when it cannot quote stored data.
            log.error(
                "job_crashed",
                event_id=event.id,
                error=database.describe(exc),
                exc_info=not isinstance(exc, asyncpg.PostgresError),
            )
            wait = CRASH_RETRY_SECONDS
        raise await _defer(run, wait) from exc


@dataclass(frozen=True, slots=True)
class _Ready:
    """A delivery claimed for sending: its event as the ledger first recorded it, and how."""

    event: Event
    callback: callbacks.Callback
    template: render.Template
    signer: sign.Signer | None
    delivery: ledger.Taken


@dataclass(slots=True)
class _Said:
    """A delivery's log lines, each with its event id, delivery id and affiliate.

    The logger is bound only for a line that is written: below the log level a line costs
    one level check, with no bound logger and no fields built (issue 18).
    """

    event: Event
    delivery: uuid.UUID
    destination: str | None = None
    """Said on every line once set: the destination that put the delivery off."""

    def enabled(self, level: int) -> bool:
        """Whether a line at `level` is written: for fields that cost something to build."""
        return bool(log.is_enabled_for(level))

    def debug(self, name: str, **fields: Any) -> None:
        self._line(logging.DEBUG, name, fields)

    def info(self, name: str, **fields: Any) -> None:
        self._line(logging.INFO, name, fields)

    def warning(self, name: str, **fields: Any) -> None:
        self._line(logging.WARNING, name, fields)

    def _line(self, level: int, name: str, fields: dict[str, Any]) -> None:
        if not log.is_enabled_for(level):
            return
        bound = log.bind(
            event_id=self.event.id,
            delivery_id=str(self.delivery),
            affiliate=self.event.affiliate_id,
        )
        if self.destination is not None:
            bound = bound.bind(destination=self.destination)
        bound.log(level, name, **fields)


async def _deliver(run: _Run, event: Event, did: uuid.UUID) -> str:
    said = _Said(event, did)
    entry = await run.callbacks.get(run.db, event.affiliate_id, event.type)
    close = _unsendable(event, entry)
    # The destination is asked before the ledger, so that a delivery put off for it costs
    # one statement and is never claimed. A resend goes where it first went, and is counted
    # against its callback's destination now: the same, unless the template's host changed.
    admitted: fairness.Slot | fairness.Defer | None = None
    if close is None and entry.destination is not None:
        admitted = run.destinations.admit(entry.destination, time.monotonic(), did)
        if isinstance(admitted, fairness.Defer):
            said.destination = entry.destination
            if admitted.reason == "circuit_open":
                await _circuit_long_open(run, entry.destination)
    slot = admitted if isinstance(admitted, fairness.Slot) else None
    try:
        return await _go(run, said, did, event, entry, close, admitted)
    finally:
        # Not sent (put off, waiting, settled) or stopped before its request was done: the
        # slot goes back unused. After a request, `_attempt` gave it back with the outcome.
        if slot is not None:
            run.destinations.release(slot, None, time.monotonic())


async def _circuit_long_open(run: _Run, origin: str) -> None:
    """Tell ops of a circuit open longer than POSTBACK_NOTIFY_CIRCUIT_OPEN. A circuit lives
    in one worker's memory, so the worker's own jobs say it: the first one it puts off
    after that long, and again each hour it stays open (`postback_notify` keeps it to one
    an hour however many workers say it)."""
    after = run.settings.circuit_open_after
    if after is None:
        return
    now = time.monotonic()
    open_for = run.destinations.long_open(origin, now, after)
    if open_for is None:
        return
    opened_at = datetime.now(UTC) - timedelta(seconds=open_for)
    await notify.circuit_open(run.db, origin, open_for, opened_at)
    run.destinations.reported(origin, now)


async def _go(
    run: _Run,
    said: _Said,
    did: uuid.UUID,
    event: Event,
    entry: cache.Entry,
    close: tuple[str, bool] | None,
    admitted: fairness.Slot | fairness.Defer | None,
) -> str:
    """Ask the ledger, then do what it says: return, run again later, or send."""
    callback_id = None if entry.callback is None else entry.callback.id
    defer = admitted if isinstance(admitted, fairness.Defer) else None
    call = ledger.TakeCall(
        did,
        event,
        callback_id,
        run.job_id,
        run.settings.job_timeout,
        close,
        None if defer is None else defer.seconds,
        await _create_wait(run, event),
        _due(run, entry) if close is None else None,
    )
    with run.span.statement("postback_take") as statement:
        taken = await run.ledger.takes(call, statement.noted)
    # Claimed but recorded before (by an earlier run, or by another job under the same event
    # id): what is sent is the event as first recorded. When that is this run's event, as
    # it nearly always is, it is not validated a second time: its JSON form reads back as
    # the same event (tests/test_properties.py, the round trip).
    if taken.action == "claimed" and not taken.inserted and taken.event != event.to_json():
        try:
            event = parse_event(taken.event)  # as first recorded
        except InvalidEvent as exc:
            # Only a row edited by hand, or one from a version with other rules, gets here.
            close = f"stored event is invalid: {exc.details}", True
            call = ledger.TakeCall(
                did, event, callback_id, run.job_id, run.settings.job_timeout, close
            )
            with run.span.statement("postback_take") as statement:
                taken = await run.ledger.takes(call, statement.noted)
    run.span.set("postback.take.action", taken.action)
    run.span.set("postback.delivery.state", taken.state)
    # Redis is touched only once the ledger has committed: never while holding an order lock.
    if taken.action == "settled":
        # The same event id again after it settled: at most one postback per event.
        said.info("delivery_repeat_ignored", state=taken.state)
        return taken.state
    if taken.action == "early":
        if taken.inserted:  # new, and its callback puts it off: said once
            said.info("delivery_delayed", due_in_s=round(taken.wait, 3))
        # Otherwise run early (re-enqueued by the sweep, or woken): the schedule still holds.
        raise await _defer(run, taken.wait)
    if taken.action == "elsewhere":
        # Another job is sending it right now (an event enqueued under a second job id).
        said.info("delivery_in_flight_elsewhere", job_id=taken.claimed_by)
        return taken.state
    if taken.action == "closed":
        assert close is not None
        if taken.state == "dead":
            said.warning(
                "delivery_dead", state=taken.state, reason=close[0], attempts=taken.attempts
            )
        else:
            said.info("delivery_skipped", state=taken.state, reason=close[0])
        run.counts.count(event.affiliate_id, settled=taken.state)
        await queue.wake(run.redis, run.settings.queue_name, taken.woken)
        return taken.state
    if taken.action == "blocked":
        assert taken.blocker is not None
        if taken.blocker.id != taken.blocked_by:  # said once per delivery waited for
            said.info(
                "delivery_waiting",
                waiting_for=str(taken.blocker.id),
                waiting_for_event=taken.blocker.event_id,
            )
        raise await _defer(run, taken.blocker.wait + BLOCKED_RECHECK_SECONDS)
    if taken.action == "awaiting":
        if taken.inserted:
            said.info(
                "delivery_waiting", waiting_for_event="order.created", seconds=round(taken.wait)
            )
        raise await _defer(run, _create_recheck(taken.wait, run.settings.create_wait))
    if taken.gave_up_waiting:
        said.warning("delivery_without_create", waited_s=run.settings.create_wait)
    if taken.action == "deferred":
        assert defer is not None
        said.debug("delivery_deferred", reason=defer.reason, seconds=defer.seconds)
        run.counts.count(event.affiliate_id, deferred=defer.reason)
        raise await _defer(run, defer.seconds)

    assert isinstance(admitted, fairness.Slot)
    assert entry.callback is not None
    assert entry.template is not None
    ready = _Ready(event, entry.callback, entry.template, entry.signer, taken)
    return await _attempt(run, said, did, ready, admitted)


async def _create_wait(run: _Run, event: Event) -> float | None:
    """How long an update waits for its order's create when the ledger has none yet: only
    when the affiliate has an enabled order.created callback, since otherwise no create
    delivery will ever come."""
    if event.type != "order.updated" or not run.settings.create_wait:
        return None
    create = (await run.callbacks.get(run.db, event.affiliate_id, "order.created")).callback
    return run.settings.create_wait if create is not None and create.enabled else None


def _due(run: _Run, entry: cache.Entry) -> tuple[datetime, str] | None:
    """When the delivery becomes due if its callback delays it: that long after the event
    was accepted, whenever this job first runs. Given only for a delivery that can be sent;
    one that is skipped settles at once."""
    callback = entry.callback
    if callback is None or not callback.delay_seconds:
        return None
    due_at = run.accepted_at + timedelta(seconds=callback.delay_seconds)
    return due_at, f"delayed {duration.spell(callback.delay_seconds)} by its callback"


def _create_recheck(left: float, limit: float) -> float:
    """When an update waiting for its create looks again: when the wait is over, and before
    that after as long as it has waited so far (at least `CREATE_RECHECK_SECONDS`).

    The create wakes it as soon as it settles; looking again only covers a wake-up that
    came while this job was between its runs. Doubling keeps thousands of waiting updates
    from polling (about a dozen runs each over ten minutes), while a missed wake-up at most
    doubles how long one waits.
    """
    waited = limit - left
    return max(0.0, min(left, max(CREATE_RECHECK_SECONDS, waited)))


def _unsendable(event: Event, entry: cache.Entry) -> tuple[str, bool] | None:
    """Why the event's delivery cannot be sent, and whether that makes it a dead letter even
    if it was never tried; None when it can be sent.

    The ledger settles it `skipped` if never tried (nothing to replay), and `dead` if tried
    before the callback went away, so ops can replay it once the callback is back. (A stored
    event that no longer validates is only noticed when the delivery is claimed, so with
    its callback gone it is skipped rather than dead: only a row edited by hand is so.)
    """
    callback = entry.callback
    if callback is None:
        return f"no {event.type} callback configured for affiliate {event.affiliate_id}", False
    if not callback.enabled:
        return "callback disabled", False
    refusal = callback.refusal(event.order.status)
    if refusal is not None:
        return refusal, False
    if entry.template is None:
        return f"stored template is invalid: {entry.invalid}", True
    return None


async def _attempt(
    run: _Run,
    said: _Said,
    did: uuid.UUID,
    ready: _Ready,
    slot: fairness.Slot,
) -> str:
    callback, event = ready.callback, ready.event
    number = ready.delivery.attempts + 1
    # Set up once with the callback; a secret that cannot sign fails here as it always did.
    secret = callback.secret if ready.signer is None else ready.signer
    if ready.delivery.resend is not None:
        request = deliver.resend_request(ready.delivery.resend, event, secret)
    else:
        request = deliver.build_request(callback.method, ready.template, event, did, secret)
    started_at = datetime.now(UTC)
    with run.span.request(request.method, request.url) as sent:
        try:
            outcome = await deliver.attempt(run.http, request)
        except asyncio.CancelledError:
            # Stopped mid-request (shutdown, job timeout): the receiver may or may not have
            # it. Free the delivery so the next run sends it again, with the same delivery id.
            await asyncio.shield(ledger.release(run.db, did, run.job_id))
            raise
        sent.answered(outcome)
    circuit = run.destinations.release(slot, outcome, time.monotonic())
    if circuit is not None:
        # Said by the request that changed it: the next ones to that destination wait.
        (said.warning if circuit == "opened" else said.info)(
            f"circuit_{circuit}", destination=slot.origin
        )
    before = ready.delivery.retry_base
    verdict = retry.decide(
        outcome, number - before, run.settings.schedule, started_at, before=before
    )
    record = ledger.RecordCall(event, did, callback.id, request, started_at, outcome, verdict)
    with run.span.statement("postback_record") as statement:
        woken = await run.ledger.records(record, statement.noted)
    run.span.set("postback.delivery.state", verdict.state)
    run.span.set("postback.attempt", number)
    if verdict.disable_callback:
        run.callbacks.forget()  # not waiting for its own notification to come back
    run.counts.count(
        event.affiliate_id,
        attempt=(verdict.state, outcome.duration_ms / 1000),
        settled=None if verdict.state == "retrying" else verdict.state,
        circuit=circuit,
    )
    _said_after(said, number, request, outcome, verdict)
    if verdict.state == "retrying":
        assert verdict.delay is not None
        raise await _defer(run, verdict.delay)
    # Deliveries that were waiting for this one run now.
    await queue.wake(run.redis, run.settings.queue_name, woken)
    return verdict.state


def _said_after(
    said: _Said, number: int, request: Request, outcome: Outcome, verdict: retry.Verdict
) -> None:
    """The line an attempt ends with; its fields are only built when it is written."""
    if not said.enabled(logging.WARNING if verdict.state == "dead" else logging.INFO):
        return
    fields: dict[str, Any] = {
        "state": verdict.state,
        "attempt": number,
        "outcome": verdict.kind,
        "status_code": outcome.status,
        "error_class": outcome.error_class,
        "duration_ms": round(outcome.duration_ms, 1),
        # The host only: the path and query may carry the affiliate's tokens.
        "host": URL(request.url, encoded=True).host,
    }
    if verdict.state == "retrying":
        assert verdict.delay is not None
        said.info(
            "delivery_retrying", **fields, reason=verdict.reason, retry_in_s=round(verdict.delay, 3)
        )
    elif verdict.state == "dead":
        said.warning(
            "delivery_dead",
            **fields,
            reason=verdict.reason,
            callback_disabled=verdict.disable_callback,
        )
    else:
        said.info("delivery_delivered", **fields)


async def _defer(run: _Run, seconds: float) -> Retry:
    """The arq Retry that runs this job again in `seconds`, with its Redis key kept alive."""
    try:
        await queue.keep_job(run.redis, run.job_id, seconds)
    except RedisError as exc:
        # The key still has days to live; failing the job here would have arq drop it.
        log.warning("job_expiry_not_extended", job_id=run.job_id, error=str(exc))
    return Retry(defer=seconds)
