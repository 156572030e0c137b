"""The delivery record in Postgres: each delivery's state, every attempt, and who may send next.

Postgres is the truth and Redis only carries work: whatever a job is about to do, it first
checks and claims the delivery here, and whatever it did is written here before the job
ends. A job that dies between the two leaves a claim that its re-run, or the sweep, takes
over.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
from functools import partial
from typing import Any, Literal

import asyncpg

from producer.event import Event
from worker import duration
from worker.database import Executor, transient
from worker.exchange import Outcome, Request
from worker.group import Group
from worker.retry import Verdict

State = Literal["accepted", "pending", "retrying", "delivered", "dead", "skipped", "discarded"]
STATES: tuple[State, ...] = (
    "accepted",
    "pending",
    "retrying",
    "delivered",
    "dead",
    "skipped",
    "discarded",
)
OPEN_STATES: tuple[State, ...] = ("accepted", "pending", "retrying")
"""The states a delivery can still leave; the others are final. `accepted`: recorded when
ingest (or a durable producer) accepted the event, not taken by a worker yet."""


Action = Literal[
    "settled", "early", "elsewhere", "closed", "blocked", "awaiting", "deferred", "claimed"
]
"""What `take` did with the delivery (schema.sql, `postback_take`, says each)."""


@dataclass(frozen=True, slots=True)
class Blocker:
    """An earlier delivery of the same order to the same affiliate, not settled yet."""

    id: uuid.UUID
    event_id: str
    wait: float = 0.0
    """Seconds until it is due: it cannot settle, and wake the one it blocks, before then."""


@dataclass(frozen=True, slots=True)
class Taken:
    """A delivery as `take` found it, and what `take` did with it."""

    action: Action
    inserted: bool
    """Created by this call: its recorded event is the one the caller passed."""
    event: dict[str, Any]
    """As first recorded: a repeated event id never changes what is sent."""
    state: State
    """After the call: for "closed", the state it settled in."""
    attempts: int
    wait: float
    """Seconds until the next try is due (0 or less when it is due now); for "awaiting",
    seconds until the update goes without its create."""
    claimed_by: str | None
    """Before the call: for "elsewhere", the job that holds it."""
    blocked_by: uuid.UUID | None
    """Before the call: the earlier delivery it was waiting for, if any."""
    retry_base: int
    """Attempts made before the last replay; the retry schedule counts from there."""
    resend: dict[str, Any] | None
    """The request to send again as it was, when a replay asked for that."""
    blocker: Blocker | None
    """For "blocked": the delivery that goes first."""
    woken: list[str]
    """For "closed": the event ids of deliveries that were waiting for this one."""
    gave_up_waiting: bool
    """An update goes without its order's create: the wait for it is over (said once)."""


@dataclass(frozen=True, slots=True)
class TakeCall:
    """The arguments of one `take`."""

    delivery: uuid.UUID
    event: Event
    callback_id: int | None
    job_id: str
    claim_timeout: float
    close: tuple[str, bool] | None = None
    defer: float | None = None
    create_wait: float | None = None
    due: tuple[datetime, str] | None = None
    """When a new delivery becomes due, if later than now, and the reason it waits till
    then (its callback's delay)."""

    def arguments(self) -> tuple[Any, ...]:
        """`postback_take`'s arguments, in order."""
        reason, dead = (None, False) if self.close is None else self.close
        due_at, due_reason = (None, None) if self.due is None else self.due
        event = self.event
        return (
            self.delivery,
            event.id,
            event.type,
            event.affiliate_id,
            event.order.number,
            event.occurred_at,
            self.callback_id,
            event.to_json(),
            self.job_id,
            self.claim_timeout,
            reason,
            dead,
            self.defer,
            self.create_wait,
            due_at,
            due_reason,
        )


@dataclass(frozen=True, slots=True)
class RecordCall:
    """The arguments of one `record_attempt`."""

    event: Event
    delivery: uuid.UUID
    callback_id: int
    request: Request
    started_at: datetime
    outcome: Outcome
    verdict: Verdict

    def arguments(self) -> tuple[Any, ...]:
        """`postback_record`'s arguments, in order."""
        outcome, verdict = self.outcome, self.verdict
        return (
            self.delivery,
            self.event.affiliate_id,
            self.event.order.number,
            self.callback_id,
            verdict.state,
            verdict.reason,
            outcome.failure_class,
            verdict.delay,
            self.request.as_json(),
            self.started_at,
            outcome.duration_ms,
            outcome.status,
            outcome.error_class,
            outcome.error,
            outcome.excerpt,
            verdict.disable_callback,
            None if outcome.status is None else dict(outcome.headers),
        )


@dataclass(frozen=True, slots=True)
class AutoDisable:
    """When the ledger disables a callback whose deliveries keep dying, as a 410 disables
    one (POSTBACK_AUTO_DISABLE_AFTER and _SPAN): `after` deaths in a row, the first at least
    `span` seconds ago, so that the burst of deaths of a minutes-long outage disables
    nothing. `after` 0: never (the streak is still counted)."""

    after: int
    span: float

    @classmethod
    def parse(cls, after: int, span: str) -> AutoDisable:
        return cls(after, parse_span(span))

    def arguments(self) -> tuple[int | None, float | None]:
        """`p_disable_after` and `p_disable_span`, the last two arguments of
        `postback_record` and `postback_record_many`: NULL for never."""
        return (None, None) if self.after == 0 else (self.after, self.span)


NEVER = AutoDisable(0, 0.0)
"""No callback is disabled for its deaths in a row (a 410 still disables one)."""


def parse_span(text: str) -> float:
    """POSTBACK_AUTO_DISABLE_SPAN in seconds; 0 or empty for no wait."""
    return duration.parse_setting(text, "1h or 30m", "for no wait") or 0.0


_TAKE = (
    "SELECT * FROM postback_take($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14,"
    " $15, $16)"
)
_TAKE_MANY = (
    "SELECT * FROM postback_take_many($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13,"
    " $14, $15, $16) ORDER BY i"
)
_RECORD = (
    "SELECT postback_record($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14,"
    " $15, $16, $17, $18, $19)"
)
_RECORD_MANY = (
    "SELECT woken FROM postback_record_many($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11,"
    " $12, $13, $14, $15, $16, $17, $18, $19) ORDER BY i"
)
"""A `RecordCall`'s arguments (one array of each for the batch), then `AutoDisable`'s."""


async def take(
    db: Executor,
    delivery: uuid.UUID,
    event: Event,
    callback_id: int | None,
    job_id: str,
    claim_timeout: float,
    close: tuple[str, bool] | None = None,
    defer: float | None = None,
    create_wait: float | None = None,
    due: tuple[datetime, str] | None = None,
) -> Taken:
    """Open (or find) the delivery and, under its order's lock, claim it for `job_id` when
    it can be sent now; one round trip.

    `close`, a reason and whether it makes a dead letter even if never tried, settles it
    instead when the caller already knows it cannot be sent. `defer` puts it off for that
    many seconds instead of claiming it (its destination said not now). A claim younger
    than `claim_timeout` seconds is another job's; an older one is stale and taken over.
    `create_wait`, for an update whose affiliate has an order.created callback: how long
    the order's updates wait for a create the ledger has not seen yet. `due`: when a
    delivery this call creates becomes due, and why (its callback's delay).
    """
    call = TakeCall(
        delivery, event, callback_id, job_id, claim_timeout, close, defer, create_wait, due
    )
    return await _take_one(db, call)


async def _take_one(db: Executor, call: TakeCall) -> Taken:
    row = await db.fetchrow(_TAKE, *call.arguments())
    assert row is not None
    return _taken(row)


async def take_many(db: Executor, calls: list[TakeCall]) -> list[Taken]:
    """`take` for each call, in their order, in one statement and one transaction."""
    rows = await db.fetch(_TAKE_MANY, *_columns(call.arguments() for call in calls))
    return [_taken(row) for row in rows]


def _taken(row: asyncpg.Record) -> Taken:
    blocker_id = row["blocker_id"]
    return Taken(
        row["action"],
        row["inserted"],
        row["event"],
        row["state"],
        row["attempts"],
        row["wait"],
        row["claimed_by"],
        row["blocked_by"],
        row["retry_base"],
        row["resend"],
        None
        if blocker_id is None
        else Blocker(blocker_id, row["blocker_event_id"], max(0.0, row["blocker_wait"] or 0.0)),
        row["woken"],
        row["gave_up_waiting"],
    )


def _columns(rows: Iterable[tuple[Any, ...]]) -> list[list[Any]]:
    """Calls' arguments as one array per parameter, as the `_many` functions take them."""
    return [list(column) for column in zip(*rows, strict=True)]


async def refuse_accepted(db: Executor, delivery: uuid.UUID, reason: str) -> bool:
    """Settle as dead an `accepted` delivery whose event this worker refuses (recorded by an
    ingest or a producer of another version): left accepted, the sweep would queue it
    again every minute, and it would hold up its order's later deliveries, forever. As a
    dead letter it is listed, and replayed once the workers take it. False when no
    accepted delivery has that id."""
    status: str = await db.execute(
        """
        UPDATE deliveries
        SET state = 'dead', reason = $2, next_attempt_at = NULL, updated_at = now()
        WHERE id = $1 AND state = 'accepted'
        """,
        delivery,
        reason,
    )
    return status != "UPDATE 0"


async def release(db: Executor, delivery: uuid.UUID, job_id: str) -> None:
    """Give up this job's claim without an outcome, so the delivery can be tried again."""
    await db.execute(
        """
        UPDATE deliveries SET claimed_by = NULL, claimed_at = NULL
        WHERE id = $1 AND claimed_by = $2
        """,
        delivery,
        job_id,
    )


async def record_attempt(
    db: Executor,
    event: Event,
    delivery: uuid.UUID,
    callback_id: int,
    request: Request,
    started_at: datetime,
    outcome: Outcome,
    verdict: Verdict,
    rule: AutoDisable = NEVER,
) -> list[str]:
    """Record an attempt and what follows from it (`postback_record`); one round trip.

    Returns the event ids of deliveries that were waiting for this one, when it settles.
    `rule` says when its callback's deaths in a row disable it.
    """
    call = RecordCall(event, delivery, callback_id, request, started_at, outcome, verdict)
    return await _record_one(db, call, rule)


async def _record_one(db: Executor, call: RecordCall, rule: AutoDisable = NEVER) -> list[str]:
    woken: list[str] = await db.fetchval(_RECORD, *call.arguments(), *rule.arguments())
    return woken


async def record_many(
    db: Executor, calls: list[RecordCall], rule: AutoDisable = NEVER
) -> list[list[str]]:
    """`record_attempt` for each call, in their order, in one statement and one transaction."""
    rows = await db.fetch(
        _RECORD_MANY, *_columns(call.arguments() for call in calls), *rule.arguments()
    )
    return [row["woken"] for row in rows]


def _alone(exc: Exception) -> bool:
    """Whether the calls of a failed statement are each worth sending alone: not when the
    database is down or the statement was cut, which would fail them all the same."""
    return not transient(exc)


class Ledger:
    """One worker process's way to the two statements every delivery makes: its jobs'
    concurrent takes, and their records, each gathered into one statement while the one
    before is in flight (`worker.group`). A lone call goes at once."""

    def __init__(self, db: asyncpg.Pool, rule: AutoDisable = NEVER) -> None:
        self.takes: Group[TakeCall, Taken] = Group(
            partial(_take_one, db), partial(take_many, db), _alone
        )
        """`take`, sent with the takes of other jobs that come meanwhile."""
        self.records: Group[RecordCall, list[str]] = Group(
            partial(_record_one, db, rule=rule), partial(record_many, db, rule=rule), _alone
        )
        """`record_attempt`, sent with the records of other jobs that come meanwhile."""

    async def close(self) -> None:
        """Wait for the calls handed over to be sent: before the pool closes."""
        await self.takes.close()
        await self.records.close()


async def due_without_claim(
    pool: asyncpg.Pool, job_timeout: float, after: tuple[datetime, uuid.UUID] | None, limit: int
) -> list[asyncpg.Record]:
    """Open deliveries due now that no live job holds: what the sweep checks against Redis.
    Accepted ones are due from the moment they were recorded, so an event whose job Redis
    lost before any worker took it comes back as a taken one does.

    A page of `limit`, in (next_attempt_at, id) order after `after`.
    """
    return list(
        await pool.fetch(
            """
            SELECT id, event, next_attempt_at FROM deliveries
            WHERE state IN ('accepted', 'pending', 'retrying')
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
