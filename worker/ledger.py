"""The delivery record in Postgres: each delivery's state, every attempt, and who may send next.

Postgres is the truth and Redis only carries work: whatever a job is about to do, it first
checks and claims the delivery here, and whatever it did is written here before the job
ends. A job that dies between the two leaves a claim that its re-run, or the sweep, takes
over.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal

import asyncpg

from producer.event import Event
from worker.database import Conn, Executor
from worker.deliver import Outcome, Request
from worker.retry import Verdict

State = Literal["pending", "retrying", "delivered", "dead", "skipped", "discarded"]
STATES: tuple[State, ...] = ("pending", "retrying", "delivered", "dead", "skipped", "discarded")
OPEN_STATES: tuple[State, ...] = ("pending", "retrying")
"""The states a delivery can still leave; the others are final."""


@dataclass(frozen=True, slots=True)
class Delivery:
    id: uuid.UUID
    event: dict[str, Any]
    """As first recorded: a repeated event id never changes what is sent."""
    state: State
    attempts: int
    wait: float
    """Seconds until the next try is due; 0 or less when it is due now."""
    claimed_by: str | None
    claim_age: float | None
    """Seconds since `claimed_by` claimed it."""
    blocked_by: uuid.UUID | None
    retry_base: int
    """Attempts made before the last replay; the retry schedule counts from there."""
    resend: dict[str, Any] | None
    """The request to send again as it was, when a replay asked for that."""

    @property
    def open(self) -> bool:
        return self.state in OPEN_STATES


@dataclass(frozen=True, slots=True)
class Blocker:
    """An earlier delivery of the same order to the same affiliate, not settled yet."""

    id: uuid.UUID
    event_id: str


_DELIVERY_COLUMNS = """
    id, event, state, attempts, claimed_by, blocked_by, retry_base,
    CASE WHEN resend THEN request END AS resend,
    extract(epoch FROM next_attempt_at - now())::float8 AS wait,
    extract(epoch FROM now() - claimed_at)::float8 AS claim_age
"""


async def open_delivery(
    conn: Conn, delivery: uuid.UUID, event: Event, callback_id: int | None
) -> Delivery:
    """The delivery for this event, created `pending` and due now if new; locked until commit.

    An existing row wins: a repeated event id never makes a second delivery. A concurrent
    insert of the same row makes the INSERT wait for it, and the SELECT then finds it.
    """
    row = await conn.fetchrow(
        f"""
        INSERT INTO deliveries (id, event_id, event_type, affiliate_id, order_number,
                                occurred_at, callback_id, event, state, next_attempt_at)
        VALUES ($1, $2, $3, $4, $5, $6, $7, $8, 'pending', now())
        ON CONFLICT (id) DO NOTHING
        RETURNING {_DELIVERY_COLUMNS}
        """,  # noqa: S608 -- a constant column list; values go as parameters
        delivery,
        event.id,
        event.type,
        event.affiliate_id,
        event.order.number,
        event.occurred_at,
        callback_id,
        event.to_json(),
    )
    if row is None:  # it exists: a repeat, a retry, or a re-check of a waiting delivery
        row = await conn.fetchrow(
            f"SELECT {_DELIVERY_COLUMNS} FROM deliveries WHERE id = $1 FOR UPDATE",  # noqa: S608
            delivery,
        )
    assert row is not None
    return Delivery(
        row["id"],
        row["event"],
        row["state"],
        row["attempts"],
        row["wait"] or 0.0,
        row["claimed_by"],
        row["claim_age"],
        row["blocked_by"],
        row["retry_base"],
        row["resend"],
    )


async def lock_order(conn: Conn, affiliate_id: str, order_number: str) -> None:
    """Serialise, until commit, the transactions that order one affiliate's order.

    Taken before a delivery looks for earlier ones (`blocker`) and before one settles
    (`record_attempt`, `close`), so a delivery either sees an earlier one that is open, or
    that one sees it waiting when it settles and wakes it: never neither.
    """
    await conn.execute(
        "SELECT pg_advisory_xact_lock(hashtextextended($1, 0))", f"{affiliate_id}\n{order_number}"
    )


async def blocker(conn: Conn, delivery: uuid.UUID) -> Blocker | None:
    """The earliest open delivery of the same affiliate and order that must go first.

    Creates go before updates, then by `occurred_at`, then by arrival. Call it holding
    `lock_order`.
    """
    row = await conn.fetchrow(
        """
        SELECT p.id, p.event_id
        FROM deliveries d
        JOIN deliveries p
          ON p.affiliate_id = d.affiliate_id AND p.order_number = d.order_number
        WHERE d.id = $1
          AND p.state IN ('pending', 'retrying')
          AND p.id <> d.id
          AND ((p.event_type <> 'order.created')::int, p.occurred_at, p.created_at, p.id)
            < ((d.event_type <> 'order.created')::int, d.occurred_at, d.created_at, d.id)
        ORDER BY (p.event_type <> 'order.created')::int, p.occurred_at, p.created_at, p.id
        LIMIT 1
        """,
        delivery,
    )
    return None if row is None else Blocker(row["id"], row["event_id"])


async def put_off(conn: Executor, delivery: uuid.UUID, seconds: float) -> None:
    """The delivery waits for its destination (its cap, or its open circuit): what the
    ledger shows is when it goes next, not an earlier delivery it no longer waits for."""
    await conn.execute(
        """
        UPDATE deliveries SET blocked_by = NULL,
            next_attempt_at = now() + make_interval(secs => $2), updated_at = now()
        WHERE id = $1
        """,
        delivery,
        seconds,
    )


async def block(conn: Conn, delivery: uuid.UUID, by: uuid.UUID) -> None:
    await conn.execute("UPDATE deliveries SET blocked_by = $2 WHERE id = $1", delivery, by)


async def claim(conn: Conn, delivery: uuid.UUID, job_id: str) -> None:
    """Mark the delivery in flight for this job; a claim older than the job timeout is stale."""
    await conn.execute(
        """
        UPDATE deliveries SET claimed_by = $2, claimed_at = now(), blocked_by = NULL
        WHERE id = $1
        """,
        delivery,
        job_id,
    )


async def release(conn: Executor, delivery: uuid.UUID, job_id: str) -> None:
    """Give up this job's claim without an outcome, so the delivery can be tried again."""
    await conn.execute(
        """
        UPDATE deliveries SET claimed_by = NULL, claimed_at = NULL
        WHERE id = $1 AND claimed_by = $2
        """,
        delivery,
        job_id,
    )


async def close(
    conn: Conn,
    delivery: uuid.UUID,
    state: Literal["skipped", "dead"],
    reason: str,
) -> list[str]:
    """Settle a delivery without sending it (no callback, a broken stored template).

    Returns the event ids of deliveries that were waiting for this one. Call it holding
    `lock_order`.
    """
    await conn.execute(
        """
        UPDATE deliveries
        SET state = $2, reason = $3, next_attempt_at = NULL,
            claimed_by = NULL, claimed_at = NULL, blocked_by = NULL, updated_at = now()
        WHERE id = $1
        """,
        delivery,
        state,
        reason,
    )
    return await _waiting_for(conn, delivery)


async def record_attempt(
    pool: asyncpg.Pool,
    event: Event,
    delivery: uuid.UUID,
    callback_id: int,
    request: Request,
    started_at: datetime,
    outcome: Outcome,
    verdict: Verdict,
) -> list[str]:
    """Record an attempt and what follows from it, in one transaction.

    Returns the event ids of deliveries that were waiting for this one, when it settles.
    A 410 disables the callback in the same transaction: a delivery that starts after it
    commits is skipped (one already sending when the 410 came still finishes).
    """
    async with pool.acquire() as conn, conn.transaction():
        if verdict.state != "retrying":
            await lock_order(conn, event.affiliate_id, event.order.number)
        number: int = await conn.fetchval(
            """
            UPDATE deliveries
            SET attempts = attempts + 1, state = $2, reason = $3, error_class = $4,
                request = $5, callback_id = $6,
                next_attempt_at = now() + make_interval(secs => $7),
                claimed_by = NULL, claimed_at = NULL, blocked_by = NULL, updated_at = now()
            WHERE id = $1
            RETURNING attempts
            """,
            delivery,
            verdict.state,
            verdict.reason,
            outcome.failure_class,
            request.as_json(),
            callback_id,
            verdict.delay,
        )
        await conn.execute(
            """
            INSERT INTO attempts (delivery_id, number, started_at, duration_ms, status_code,
                                  error_class, error, response_excerpt, request)
            VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)
            """,
            delivery,
            number,
            started_at,
            outcome.duration_ms,
            outcome.status,
            outcome.error_class,
            outcome.error,
            outcome.excerpt,
            request.as_json(),
        )
        if verdict.disable_callback:
            await conn.execute(
                "UPDATE callbacks SET enabled = false, updated_at = now() WHERE id = $1",
                callback_id,
            )
        return [] if verdict.state == "retrying" else await _waiting_for(conn, delivery)


async def _waiting_for(conn: Conn, delivery: uuid.UUID) -> list[str]:
    rows: Sequence[asyncpg.Record] = await conn.fetch(
        """
        SELECT event_id FROM deliveries
        WHERE blocked_by = $1 AND state IN ('pending', 'retrying')
        """,
        delivery,
    )
    return [row["event_id"] for row in rows]


async def due_without_claim(
    pool: asyncpg.Pool, job_timeout: float, after: tuple[datetime, uuid.UUID] | None, limit: int
) -> list[asyncpg.Record]:
    """Open deliveries due now that no live job holds: what the sweep checks against Redis.

    A page of `limit`, in (next_attempt_at, id) order after `after`.
    """
    return list(
        await pool.fetch(
            """
            SELECT id, event, next_attempt_at FROM deliveries
            WHERE state IN ('pending', 'retrying')
              AND next_attempt_at <= now()
              AND (claimed_at IS NULL OR claimed_at < now() - make_interval(secs => $1))
              AND ($2::timestamptz IS NULL OR (next_attempt_at, id) > ($2, $3))
            ORDER BY next_attempt_at, id
            LIMIT $4
            """,
            job_timeout,
            None if after is None else after[0],
            None if after is None else after[1],
            limit,
        )
    )
