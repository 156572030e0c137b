"""The arq job: one queued event in, its postback sent and recorded."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import aiohttp
import asyncpg
import structlog
from arq import Retry

from producer.event import Event, InvalidEvent, parse_event
from worker import callbacks, database, ledger, render
from worker.deliver import build_request, delivery_id, send

log = structlog.get_logger("postback.worker")

INFRA_RETRY_SECONDS = 5
"""Wait before retrying a job whose database failed; the event stays queued meanwhile."""

# Any database failure is waited out rather than the event dropped: a lost postback costs
# an affiliate money, a retried job costs a log line.
_RETRYABLE: tuple[type[BaseException], ...] = (*database.UNAVAILABLE, asyncpg.PostgresError)


async def deliver_event(ctx: dict[str, Any], event_data: Any) -> str:
    """Deliver one event to its affiliate's callback; returns the delivery's state."""
    try:
        # Anyone who can write to Redis can enqueue: validate again, never trust the queue.
        event = parse_event(event_data)
    except InvalidEvent as exc:
        log.error("event_refused", job_id=ctx.get("job_id"), error=str(exc))
        return "refused"
    if event.occurred_at is None:
        # DESIGN §2: defaults to enqueue time, whoever enqueued it.
        event = event.model_copy(update={"occurred_at": ctx["enqueue_time"].astimezone(UTC)})
    try:
        return await _deliver(ctx["db"], ctx["http"], event)
    except _RETRYABLE as exc:
        log.warning("database_failed", event_id=event.id, error=f"{type(exc).__name__}: {exc}")
        raise Retry(defer=INFRA_RETRY_SECONDS) from exc


async def _deliver(db: asyncpg.Pool, http: aiohttp.ClientSession, event: Event) -> str:
    did = delivery_id(event)
    bound = log.bind(event_id=event.id, delivery_id=str(did), affiliate=event.affiliate_id)

    callback = await callbacks.get(db, event.affiliate_id, event.type)
    if callback is None or not callback.enabled:
        reason = (
            f"no {event.type} callback configured for affiliate {event.affiliate_id}"
            if callback is None
            else "callback disabled"
        )
        callback_id = None if callback is None else callback.id
        delivery = await ledger.open_delivery(db, did, event, callback_id, "skipped", reason)
        bound.info("delivery_skipped", reason=reason, state=delivery.state)
        return delivery.state

    try:
        template = render.parse(callback.url_template)
    except render.TemplateError as exc:
        # Only a template written to the table by hand gets here; say so in the ledger.
        reason = f"stored template is invalid: {exc}"
        delivery = await ledger.open_delivery(db, did, event, callback.id, "failed", reason)
        bound.error("delivery_failed", reason=reason, state=delivery.state)
        return delivery.state

    delivery = await ledger.open_delivery(db, did, event, callback.id)
    if delivery.state != "pending":
        # The same event id again after it settled: at most one postback per event.
        bound.info("delivery_repeat_ignored", state=delivery.state)
        return delivery.state

    request = build_request(callback.method, template, event, did, callback.secret)
    started_at = datetime.now(UTC)
    outcome = await send(http, request)
    state: ledger.State = "delivered" if outcome.ok else "failed"
    failure = None if outcome.ok else (outcome.error or f"HTTP {outcome.status}")
    attempt = await ledger.record_attempt(
        db, delivery, request, started_at, outcome, state, failure
    )
    bound.info(
        f"delivery_{state}",
        attempt=attempt,
        status_code=outcome.status,
        error_class=outcome.error_class,
        duration_ms=round(outcome.duration_ms, 1),
    )
    return state
