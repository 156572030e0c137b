"""The arq job: one queued event in, its postback sent and recorded."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import asyncpg
import structlog

from producer.event import InvalidEvent, parse_event
from worker import callbacks, ledger, render
from worker.deliver import build_request, delivery_id, send

log = structlog.get_logger("postback.worker")


async def deliver_event(ctx: dict[str, Any], event_data: Any) -> str:
    """Deliver one event to its affiliate's callback; returns the delivery's final state."""
    try:
        # Anyone who can write to Redis can enqueue: validate again, never trust the queue.
        event = parse_event(event_data)
    except InvalidEvent as exc:
        log.error("event_refused", job_id=ctx.get("job_id"), error=str(exc))
        return "refused"

    db: asyncpg.Pool = ctx["db"]
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
        await ledger.open_delivery(db, did, event, callback_id, state="skipped", reason=reason)
        bound.info("delivery_skipped", reason=reason)
        return "skipped"

    delivery, _ = await ledger.open_delivery(db, did, event, callback.id)
    if delivery.state != "pending":
        # The same event id again after it settled: at most one postback per event.
        bound.info("delivery_repeat_ignored", state=delivery.state)
        return delivery.state

    request = build_request(callback.method, render.parse(callback.url_template), event, did)
    started_at = datetime.now(UTC)
    outcome = await send(ctx["http"], request)
    state: ledger.State = "delivered" if outcome.ok else "failed"
    failure = None if outcome.ok else (outcome.error or f"HTTP {outcome.status}")
    await ledger.record_attempt(db, delivery, request, started_at, outcome, state, failure)
    bound.info(
        f"delivery_{state}",
        attempt=delivery.attempts + 1,
        status_code=outcome.status,
        error_class=outcome.error_class,
        duration_ms=round(outcome.duration_ms, 1),
    )
    return state
