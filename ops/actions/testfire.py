"""Test fire: send a callback a sample (or given) event now, and show what came back.

An affiliate manager setting up a callback wants to see the request their affiliate will
get and what the affiliate's server answers, without waiting for a real order. A test fire
is not a delivery: it never enters the ledger's state machine, is never retried, and has an
Idempotency-Key of its own; it is recorded in `test_fires`. A preview builds the same
sample request for a callback not saved yet, and sends it nowhere.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

import aiohttp
import asyncpg

from producer.event import STORE_WIDE, Event, EventType, parse_event
from worker import deliver, render
from worker.callbacks import Callback, CallbackSpec
from worker.exchange import Request

SAMPLE_AFFILIATE = "sample-affiliate"
"""The affiliate of a store-wide callback's sample order, which must be someone's."""


def sample_event(
    affiliate_id: str, event_type: EventType, statuses: Sequence[str] | None = None
) -> Event:
    """A made-up order for the affiliate and event type, every field filled; its status is
    the first the callback fires for, when it names some, so the sample is one it sends."""
    return parse_event(
        {
            "id": f"test-{uuid.uuid4()}",
            "type": event_type,
            "affiliate_id": SAMPLE_AFFILIATE if affiliate_id == STORE_WIDE else affiliate_id,
            "occurred_at": datetime.now(UTC).isoformat(),
            "order": {
                "number": "TEST-1001",
                "amount": "100.00",
                "commission": "10.00",
                "currency": "EUR",
                "status": statuses[0] if statuses else "pending",
            },
            "link": {
                "url": "https://shop.example/landing/summer?campaign=test&ref=sample#top",
                "sub_id": "test-sub",
            },
        }
    )


def _test_request(
    method: str, template: render.Template, event: Event, secret: str | None
) -> Request:
    # "test-": in the Idempotency-Key and in the signed webhook-id, so a receiver can tell
    # a test from a real postback and trust that it is one.
    return deliver.build_request(method, template, event, f"test-{uuid.uuid4()}", secret)


def preview(spec: CallbackSpec) -> Request:
    """The request a callback as given would send for the sample event, unsigned, sent
    nowhere: what a person setting a callback up sees as they type its template."""
    event = sample_event(spec.affiliate_id, spec.event_type, spec.statuses)
    return _test_request(spec.method, spec.template, event, None)


class EventMismatch(ValueError):
    """A given event is for another affiliate or event type than the callback."""


async def fire(
    db: asyncpg.Pool,
    http: aiohttp.ClientSession,
    callback: Callback,
    event: Event | None,
    actor: str,
) -> dict[str, Any]:
    """Send one request to the callback and record it; returns what was sent and got."""
    if event is None:
        event = sample_event(callback.affiliate_id, callback.event_type, callback.statuses)
    elif event.type != callback.event_type or (
        event.affiliate_id != callback.affiliate_id and not callback.store_wide
    ):
        raise EventMismatch(
            f"the event is {event.type} for affiliate {event.affiliate_id}, but the callback "
            f"is {callback.event_type} for affiliate {callback.affiliate_id}"
        )
    template = render.parse(callback.url_template)
    request = _test_request(callback.method, template, event, callback.secret)
    fired_at = datetime.now(UTC)
    outcome = await deliver.attempt(http, request)
    headers = dict(outcome.headers)
    test_id: int = await db.fetchval(
        """
        INSERT INTO test_fires (callback_id, affiliate_id, event_type, actor, fired_at,
                                request, duration_ms, status_code, error_class, error,
                                response_headers, response_excerpt)
        VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12)
        RETURNING id
        """,
        callback.id,
        # Whose event it sent, not the callback's key: a store-wide callback fired with an
        # affiliate's event holds that affiliate's data, which their erase must find.
        event.affiliate_id,
        callback.event_type,
        actor,
        fired_at,
        request.as_json(),
        outcome.duration_ms,
        outcome.status,
        outcome.error_class,
        outcome.error,
        headers if outcome.status is not None else None,
        outcome.excerpt if outcome.status is not None else None,
    )
    response = None
    if outcome.status is not None:
        response = {"status": outcome.status, "headers": headers, "body_excerpt": outcome.excerpt}
    return {
        "id": test_id,
        "fired_at": fired_at.isoformat(),
        "duration_ms": round(outcome.duration_ms, 1),
        "request": request.as_json(),
        "response": response,
        "error_class": outcome.error_class,
        "error": outcome.error,
        "delivered": outcome.ok,
        # A disabled callback is fired all the same: it is how a fix is checked before the
        # callback is enabled again. The answer says so, since its real events are skipped.
        "enabled": callback.enabled,
    }
