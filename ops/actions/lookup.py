"""Reading the ledger for people: deliveries and dead letters by filter, one in full.

The API, the page and the CLI all read through here, with the filters of
`ops.actions.filters`, so a filter means the same thing wherever it is typed.
"""

from __future__ import annotations

import uuid
from collections.abc import Collection
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from ops.actions.filters import DEFAULT_LIMIT, Cursor, DeliveryFilter, IdPrefix
from producer.event import STORE_WIDE
from worker.database import Executor
from worker.ledger import OPEN_STATES, State

_SUMMARY = f"""
    d.id, d.event_id, d.event_type, d.affiliate_id, d.order_number, d.state, d.reason,
    d.error_class, d.attempts, d.created_at, d.updated_at, d.next_attempt_at, d.occurred_at,
    d.blocked_by, d.create_wait_until, d.order_note, d.callback_id,
    (c.affiliate_id = '{STORE_WIDE}') AS callback_store_wide,
    (SELECT a.status_code FROM attempts a WHERE a.delivery_id = d.id
     ORDER BY a.number DESC LIMIT 1) AS last_status
"""  # noqa: S608 -- constant SQL text
"""A delivery's columns in listings. `callback_store_wide` says whether the callback it went
to was the store-wide one; null when it had none, or that callback was removed since."""

_FROM = "deliveries d LEFT JOIN callbacks c ON c.id = d.callback_id"
"""What `_SUMMARY` reads: the ledger keeps only the callback's id, no foreign key."""

_WHERE = """
    ($1::text IS NULL OR d.affiliate_id = $1)
    AND ($2::text IS NULL OR d.event_type = $2)
    AND ($3::text IS NULL OR d.order_number = $3)
    AND ($4::text IS NULL OR d.state = $4)
    AND ($5::text IS NULL OR d.error_class = $5)
    AND ($6::timestamptz IS NULL OR d.created_at >= $6)
    AND ($7::timestamptz IS NULL OR d.created_at < $7)
"""


def _arguments(where: DeliveryFilter) -> tuple[object, ...]:
    """The filter's values as $1 to $7 of `_WHERE`."""
    return (
        where.affiliate,
        where.event_type,
        where.order,
        where.state,
        where.error_class,
        where.since,
        where.until,
    )


@dataclass(frozen=True, slots=True)
class Page:
    items: list[dict[str, Any]]
    next: str | None
    """The cursor of the next page; None on the last."""


async def list_deliveries(
    db: Executor, where: DeliveryFilter, limit: int = DEFAULT_LIMIT, after: Cursor | None = None
) -> Page:
    """Deliveries matching `where`, newest first, a page at a time."""
    if after is not None and where.until is not None and after.created_at >= where.until:
        # The cursor excludes nothing `until` does not. Given, an index scan would start
        # at the cursor and read every row from there back to `until`.
        after = None
    rows = await db.fetch(
        f"""
        SELECT {_SUMMARY} FROM {_FROM}
        WHERE {_WHERE}
          AND ($8::timestamptz IS NULL OR (d.created_at, d.id) < ($8, $9))
        ORDER BY d.created_at DESC, d.id DESC
        LIMIT $10
        """,  # noqa: S608 -- constant SQL text; every value goes as a parameter
        *_arguments(where),
        None if after is None else after.created_at,
        None if after is None else after.id,
        limit + 1,
    )
    items = [_plain(dict(row)) for row in rows[:limit]]
    more = len(rows) > limit
    last = rows[limit - 1] if more else None
    cursor = None if last is None else Cursor(last["created_at"], last["id"]).encode()
    return Page(items, cursor)


async def matching_ids(db: Executor, where: DeliveryFilter) -> list[uuid.UUID]:
    """Every delivery matching `where`, oldest first: what a bulk action works through."""
    rows = await db.fetch(
        f"SELECT d.id FROM deliveries d WHERE {_WHERE} ORDER BY d.created_at, d.id",  # noqa: S608
        *_arguments(where),
    )
    return [row["id"] for row in rows]


ID_RANGE = "SELECT id FROM deliveries WHERE id BETWEEN $1 AND $2 ORDER BY id LIMIT $3"
"""The ids from $1 to $2, at most $3: a range on the primary key's index, however large
the ledger (a uuid compares as its hex digits read in order)."""


async def ids_starting(db: Executor, prefix: IdPrefix, limit: int) -> list[uuid.UUID]:
    """The first `limit` delivery ids that `prefix` can stand for, in order."""
    rows = await db.fetch(
        ID_RANGE,
        prefix.low,
        prefix.high,
        limit,
    )
    return [row["id"] for row in rows]


async def show_delivery(db: Executor, delivery: uuid.UUID) -> dict[str, Any] | None:
    """One delivery in full: its event, last request, every attempt, and what ops did."""
    row = await db.fetchrow(
        f"""
        SELECT {_SUMMARY}, d.event, d.request
        FROM {_FROM} WHERE d.id = $1
        """,  # noqa: S608 -- constant SQL text
        delivery,
    )
    if row is None:
        return None
    attempts = await db.fetch(
        """
        SELECT number, started_at, duration_ms, status_code, error_class, error,
               response_excerpt, response_headers, request
        FROM attempts WHERE delivery_id = $1 ORDER BY number
        """,
        delivery,
    )
    actions = await db.fetch(
        "SELECT action, mode, actor, note, attempt, at FROM actions"
        " WHERE delivery_id = $1 ORDER BY id",
        delivery,
    )
    return {
        **_plain(dict(row)),
        "attempts": [_plain(dict(a)) for a in attempts],
        "actions": [_plain(dict(a)) for a in actions],
    }


@dataclass(frozen=True, slots=True)
class Settled:
    """A delivery that is done with: sending its event again changes nothing."""

    id: uuid.UUID
    state: State
    reason: str | None
    at: datetime
    """When it settled: a settled delivery changes only when ops replay or discard it."""


async def settled(db: Executor, deliveries: Collection[uuid.UUID]) -> dict[uuid.UUID, Settled]:
    """Those of `deliveries` that have settled (neither pending nor retrying), by id."""
    rows = await db.fetch(
        """
        SELECT id, state, reason, updated_at AS at FROM deliveries
        WHERE id = ANY($1::uuid[]) AND state <> ALL($2::text[])
        """,
        list(deliveries),
        list(OPEN_STATES),
    )
    return {row["id"]: Settled(**dict(row)) for row in rows}


def _plain(values: dict[str, Any]) -> dict[str, Any]:
    """JSON-ready: times as ISO 8601 text, ids as text."""
    out: dict[str, Any] = {}
    for key, value in values.items():
        if isinstance(value, datetime):
            out[key] = value.isoformat()
        elif isinstance(value, uuid.UUID):
            out[key] = str(value)
        else:
            out[key] = value
    return out
