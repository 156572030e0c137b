"""What ops do to dead letters: replay them (one, or all matching a filter) or discard them.

Both are recorded in the `actions` table with who did it, so "why did the affiliate get
this postback twice?" has an answer. A replay reopens the delivery in the ledger first and
enqueues its event second: if Redis fails in between, the sweep enqueues it within a
minute, so a replay said to be done is never lost.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

import asyncpg
import structlog
from arq.connections import ArqRedis
from redis.exceptions import RedisError

from ops.actions.filters import Filter
from ops.actions.lookup import matching_ids
from producer.event import InvalidEvent, parse_event
from producer.queue import enqueue
from worker import callbacks, database

log = structlog.get_logger("postback.ops")

Mode = Literal["rerender", "resend"]
MODES: tuple[Mode, ...] = ("rerender", "resend")
"""rerender: build the request again from the event and the callback as it is now.
resend: send the last request again as it was (method, URL, body), freshly signed."""

REPLAYABLE = ("dead", "discarded")

_FAILED: tuple[type[BaseException], ...] = (asyncpg.PostgresError, *database.UNAVAILABLE)
"""What fails one replay of a bulk replay, which goes on with the next."""

ReplayOutcome = Literal["replayed", "discarded", "skipped", "not_found"]


@dataclass(frozen=True, slots=True)
class Result:
    delivery_id: str
    outcome: ReplayOutcome
    reason: str | None = None
    """Why it was skipped."""
    queued: bool = False
    """A replay's job is in Redis; False leaves it to the sweep, within a minute."""


@dataclass(slots=True)
class Summary:
    """What a bulk replay did."""

    replayed: int = 0
    unqueued: int = 0
    """Of those replayed, the ones left to the sweep: Redis was unreachable."""
    skipped: int = 0
    failed: int = 0
    problems: list[dict[str, str]] = field(default_factory=list)
    """Each skipped or failed delivery with the reason."""


async def replay(
    db: asyncpg.Pool,
    redis: ArqRedis,
    queue_name: str,
    delivery: uuid.UUID,
    mode: Mode,
    actor: str,
    queue: bool = True,
) -> Result:
    """Reopen one dead (or discarded) delivery and queue it, its retry schedule afresh.

    `queue=False` only reopens it in the ledger, for the sweep to queue: what a bulk replay
    does once Redis has failed, rather than wait out Redis's timeout for every one.
    """
    did = str(delivery)
    async with db.acquire() as conn, conn.transaction():
        row = await conn.fetchrow(
            """
            SELECT state, attempts, affiliate_id, event_type, event, request IS NOT NULL AS sent
            FROM deliveries WHERE id = $1 FOR UPDATE
            """,
            delivery,
        )
        if row is None:
            return Result(did, "not_found", "no such delivery")
        if row["state"] not in REPLAYABLE:
            return Result(did, "skipped", f"it is {row['state']}, neither dead nor discarded")
        callback = await callbacks.find(conn, row["affiliate_id"], row["event_type"])
        if callback is None:
            return Result(
                did,
                "skipped",
                f"no {row['event_type']} callback for affiliate {row['affiliate_id']}, "
                "nor a store-wide one",
            )
        if not callback.enabled:
            return Result(did, "skipped", "its callback is disabled")
        if mode == "resend" and not row["sent"]:
            return Result(did, "skipped", "it was never sent, so there is no request to resend")
        try:
            # The job refuses an invalid event without touching the ledger: reopened, it
            # would stay pending for ever, and hold up the rest of its order.
            parse_event(row["event"])
        except InvalidEvent as exc:
            return Result(did, "skipped", f"its stored event is invalid: {exc.details}")
        await conn.execute(
            """
            UPDATE deliveries
            SET state = 'pending', reason = NULL, next_attempt_at = now(),
                retry_base = attempts, resend = $2, claimed_by = NULL, claimed_at = NULL,
                blocked_by = NULL, updated_at = now()
            WHERE id = $1
            """,
            delivery,
            mode == "resend",
        )
        await conn.execute(
            """
            INSERT INTO actions (delivery_id, action, mode, actor, attempt)
            VALUES ($1, 'replay', $2, $3, $4)
            """,
            delivery,
            mode,
            actor,
            row["attempts"] + 1,
        )
    log.info("delivery_replayed", delivery_id=did, mode=mode, actor=actor)
    if not queue:
        return Result(did, "replayed")
    try:
        fresh = await enqueue(redis, row["event"], queue_name)
    except RedisError as exc:
        # The ledger has it pending and due: the sweep enqueues it within a minute.
        log.warning("replay_left_to_sweep", delivery_id=did, error=str(exc))
        return Result(did, "replayed")
    if not fresh:
        # The event's job is still in Redis (finishing, or another delivery's wait): it
        # finds this one pending when it runs, or the sweep queues it once it is gone.
        log.info("replay_job_already_queued", delivery_id=did)
    return Result(did, "replayed", queued=True)


async def replay_matching(
    db: asyncpg.Pool,
    redis: ArqRedis,
    queue_name: str,
    where: Filter,
    mode: Mode,
    actor: str,
    progress: Callable[[int, int], None] | None = None,
) -> Summary:
    """Replay every dead letter matching `where`; `progress(done, total)` after each."""
    ids = await matching_ids(db, where.dead_letters())
    return await replay_each(db, redis, queue_name, ids, mode, actor, progress)


async def replay_each(
    db: asyncpg.Pool,
    redis: ArqRedis,
    queue_name: str,
    ids: list[uuid.UUID],
    mode: Mode,
    actor: str,
    progress: Callable[[int, int], None] | None = None,
) -> Summary:
    """Replay each of `ids`, one failing without stopping the rest; once Redis has failed,
    the rest are left to the sweep rather than each waiting out its timeout."""
    summary = Summary()
    redis_up = True
    for done, delivery in enumerate(ids, start=1):
        try:
            result = await replay(db, redis, queue_name, delivery, mode, actor, redis_up)
        except _FAILED as exc:
            summary.failed += 1
            summary.problems.append(
                {
                    "delivery_id": str(delivery),
                    "outcome": "failed",
                    "reason": database.describe(exc),
                }
            )
        else:
            if result.outcome == "replayed":
                summary.replayed += 1
                if not result.queued:
                    summary.unqueued += 1
                redis_up = redis_up and result.queued
            else:  # settled or changed since it was listed
                summary.skipped += 1
                summary.problems.append(
                    {
                        "delivery_id": result.delivery_id,
                        "outcome": "skipped",
                        "reason": result.reason or "",
                    }
                )
        if progress is not None:
            progress(done, len(ids))
    return summary


async def discard(db: asyncpg.Pool, delivery: uuid.UUID, note: str, actor: str) -> Result:
    """Drop a dead letter from the list, keeping it and the note in the record."""
    did = str(delivery)
    if not note.strip():
        raise ValueError("a note saying why is required to discard")
    async with db.acquire() as conn, conn.transaction():
        row = await conn.fetchrow(
            "SELECT state, attempts FROM deliveries WHERE id = $1 FOR UPDATE", delivery
        )
        if row is None:
            return Result(did, "not_found", "no such delivery")
        if row["state"] != "dead":
            return Result(did, "skipped", f"it is {row['state']}, not a dead letter")
        await conn.execute(
            "UPDATE deliveries SET state = 'discarded', updated_at = now() WHERE id = $1",
            delivery,
        )
        await conn.execute(
            """
            INSERT INTO actions (delivery_id, action, actor, note, attempt)
            VALUES ($1, 'discard', $2, $3, $4)
            """,
            delivery,
            actor,
            note.strip(),
            row["attempts"],
        )
    log.info("delivery_discarded", delivery_id=did, actor=actor)
    return Result(did, "discarded")
