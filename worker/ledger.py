"""The delivery record in Postgres: what was sent for which event, every attempt, the outcome."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime
from typing import Literal

import asyncpg

from producer.event import Event
from worker.deliver import Outcome, Request

State = Literal["pending", "delivered", "failed", "skipped"]


@dataclass(frozen=True, slots=True)
class Delivery:
    id: uuid.UUID
    state: State
    attempts: int


async def open_delivery(
    conn: asyncpg.Connection | asyncpg.Pool,
    delivery: uuid.UUID,
    event: Event,
    callback_id: int | None,
    state: State = "pending",
    reason: str | None = None,
) -> Delivery:
    """The delivery for this event, created in `state` if new.

    An existing row wins: a repeated event id never makes a second delivery. The no-op
    update (rather than DO NOTHING) makes the statement wait for, and return, a row that
    a concurrent worker is inserting.
    """
    row = await conn.fetchrow(
        """
        INSERT INTO deliveries (id, event_id, event_type, affiliate_id, order_number,
                                callback_id, event, state, reason)
        VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)
        ON CONFLICT (id) DO UPDATE SET id = EXCLUDED.id
        RETURNING id, state, attempts
        """,
        delivery,
        event.id,
        event.type,
        event.affiliate_id,
        event.order.number,
        callback_id,
        event.to_json(),
        state,
        reason,
    )
    assert row is not None
    return Delivery(row["id"], row["state"], row["attempts"])


async def record_attempt(
    pool: asyncpg.Pool,
    delivery: Delivery,
    request: Request,
    started_at: datetime,
    outcome: Outcome,
    state: State,
    reason: str | None,
) -> int:
    """Record the attempt and the delivery's new state together; returns the attempt number.

    One transaction, so the delivery's state and its attempts never disagree.
    """
    async with pool.acquire() as conn, conn.transaction():
        number: int = await conn.fetchval(
            """
            UPDATE deliveries
            SET attempts = attempts + 1, state = $2, reason = $3, request = $4, updated_at = now()
            WHERE id = $1
            RETURNING attempts
            """,
            delivery.id,
            state,
            reason,
            request.as_json(),
        )
        await conn.execute(
            """
            INSERT INTO attempts (delivery_id, number, started_at, duration_ms, status_code,
                                  error_class, error, response_excerpt)
            VALUES ($1, $2, $3, $4, $5, $6, $7, $8)
            """,
            delivery.id,
            number,
            started_at,
            outcome.duration_ms,
            outcome.status,
            outcome.error_class,
            outcome.error,
            outcome.excerpt,
        )
    return number
