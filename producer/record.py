"""Events recorded in the relay's ledger before they are queued: what makes "accepted" mean
"in Postgres" for HTTP ingest and for a durable `Producer`.

Redis carries work to the workers but can lose what it holds (a crash between two fsyncs,
a failover, a flush). An event written to Postgres first, as a delivery `accepted` and due
at once, is queued again by the workers' sweep if its job is lost; so whoever is told
"accepted" after `accept` may forget the event.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import asyncpg
from arq.connections import ArqRedis
from redis.exceptions import RedisError

from producer.event import Event
from producer.queue import enqueue

_DELIVERY_NAMESPACE = uuid.UUID("5d0b5c6e-7c1a-4f4e-9a55-0f6a2b8d4e21")

_ACCEPT = "SELECT postback_accept($1, $2, $3, $4, $5, $6, $7::text[]::jsonb[])"
# The events go as JSON text, cast by Postgres: whatever codec the caller's connections
# have for jsonb (the relay's decode it; a producer's own pool may not), the text is the same.


def delivery_id(event: Event) -> uuid.UUID:
    """Stable for the event and its callback key, so every try carries the same id, and the
    row recorded at acceptance is the one the worker's take finds."""
    return _delivery_id(event.id, event.affiliate_id, event.type)


def refused_delivery_id(data: Any) -> uuid.UUID | None:
    """The delivery id of event data the event model refused, when its id, affiliate and
    type are still strings: a worker of another version than the ingest or producer that
    accepted it may refuse it, and the row recorded then must still be settled."""
    if not isinstance(data, dict):
        return None
    event_id, affiliate_id, event_type = data.get("id"), data.get("affiliate_id"), data.get("type")
    if isinstance(event_id, str) and isinstance(affiliate_id, str) and isinstance(event_type, str):
        return _delivery_id(event_id, affiliate_id, event_type)
    return None


def _delivery_id(event_id: str, affiliate_id: str, event_type: str) -> uuid.UUID:
    return uuid.uuid5(_DELIVERY_NAMESPACE, f"{event_id}\n{affiliate_id}\n{event_type}")


def stamped(event: Event, at: datetime) -> Event:
    """The event with `occurred_at` set to `at` when it has none: the default is the time it
    was accepted, and the ledger's row and the queued job must say the same time."""
    if event.occurred_at is not None:
        return event
    return event.model_copy(update={"occurred_at": at})


async def record(db: asyncpg.Pool | asyncpg.Connection, events: Sequence[Event]) -> list[bool]:
    """Write `events` (stamped) to the ledger as accepted, in one statement; for each, whether
    this call recorded it (False: the ledger had its delivery already)."""
    ids = [delivery_id(event) for event in events]
    rows = await db.fetch(
        _ACCEPT,
        ids,
        [event.id for event in events],
        [event.type for event in events],
        [event.affiliate_id for event in events],
        [event.order.number for event in events],
        [event.occurred_at for event in events],
        [json.dumps(event.to_json(), separators=(",", ":")) for event in events],
    )
    new = {row[0] for row in rows}
    return [delivery in new for delivery in ids]


@dataclass(frozen=True, slots=True)
class Accepted:
    """What `accept` did with a batch."""

    events: list[Event]
    """The events as recorded and queued: `occurred_at` filled in."""
    recorded: list[bool]
    """For each event, whether this call recorded it (False: recorded before)."""
    queued: list[bool] | None
    """For each event, whether this call queued its job (False: it was queued already);
    None when Redis failed after the record: the sweep queues them."""
    redis_error: str | None = None
    """Why Redis failed, when it did."""


async def accept(
    db: asyncpg.Pool | asyncpg.Connection,
    redis: ArqRedis,
    queue_name: str,
    events: Sequence[Event],
) -> Accepted:
    """Record validated events in the ledger, then queue them. A Postgres failure raises
    before anything is queued; a Redis failure after the record is reported, not raised:
    the events are safe, and the sweep queues what Redis does not have."""
    now = datetime.now(UTC)
    ready = [stamped(event, now) for event in events]
    recorded = await record(db, ready)
    queued: list[bool] = []
    try:
        for event in ready:
            queued.append(await enqueue(redis, event.to_json(), queue_name))
    except RedisError as exc:
        return Accepted(ready, recorded, None, f"{type(exc).__name__}: {exc}")
    return Accepted(ready, recorded, queued)
