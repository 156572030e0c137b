"""Retention: settled deliveries deleted, and old attempts' stored exchanges trimmed, once
they are older than the settings keep them.

Without it the ledger grows forever: every event, every request, and up to 64 KiB of every
response. Pruning runs while deliveries flow, so it works in batches, each one statement in
its own short transaction that locks only the rows it changes, and rests after each, twice
as long as it took: the workers' own statements go in between. Open deliveries (pending,
retrying) are never deleted, nor their attempts trimmed, however old they are.

Deliveries are walked in `deliveries_created` order, (created_at, id), from the oldest up to
the latest cutoff: a settled row was updated at or after it was created, so every row that
may go is in that part of the index, and each batch reads the next part of it, not the
rows an earlier batch kept. Attempts are walked by id, in the order they were written, up to
the first batch that is all newer than the cutoff.
"""

from __future__ import annotations

import asyncio
import functools
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

import structlog

from worker import database, duration

if TYPE_CHECKING:
    from worker.config import Settings

log = structlog.get_logger("postback.prune")

SETTLED = ("delivered", "skipped")
DEAD = ("dead", "discarded")
STATES = (*SETTLED, *DEAD)

BATCH = 250
"""Rows one statement deletes or trims at most: a transaction of milliseconds, whose
write-ahead log a delivery's commit may have to wait behind."""

REST = 2.0
"""Seconds of rest after a batch per second it took, so that pruning a large backlog leaves
Postgres to the deliveries two thirds of the time, however fast or loaded the machine.
Deleting writes a lot of write-ahead log (whole pages after each checkpoint), which every
commit waits behind: measured with `python -m bench prune`, a fixed 50 ms pause after
batches of 1,000 doubled the deliveries' p99 latency, while this kept it level."""

BUDGET_SHARE = 0.8
"""The share of the job timeout a cron run of the prune may spend: it stops between
batches, before arq's timeout would cancel it in the middle of one."""


def parse_keep(text: str) -> float | None:
    """A retention setting in seconds; None to keep forever (empty, or 0 in any unit)."""
    return duration.parse_setting(text, "30d or 12h", "to keep forever")


@dataclass(frozen=True, slots=True)
class Retention:
    """How long each kind of row is kept, in seconds; None: forever."""

    settled: float | None
    dead: float | None
    excerpts: float | None

    @classmethod
    def parse(cls, settled: str, dead: str, excerpts: str) -> Retention:
        return cls(parse_keep(settled), parse_keep(dead), parse_keep(excerpts))


@dataclass(slots=True)
class Pruned:
    """What a run deleted (or, dry, would delete): deliveries by state, and attempts
    trimmed."""

    deliveries: dict[str, int] = field(default_factory=lambda: dict.fromkeys(STATES, 0))
    attempts: int = 0
    notifications: int = 0
    """Ops notifications deleted: they are kept as long as dead letters."""
    complete: bool = True
    """False when the run stopped at its time limit: the next run goes on."""

    @property
    def total(self) -> int:
        return sum(self.deliveries.values()) + self.attempts + self.notifications

    def counts(self) -> dict[str, int]:
        """Flat, for a log line: `delivered`, `skipped`, `dead`, `discarded`,
        `attempts_trimmed`."""
        return {
            **self.deliveries,
            "attempts_trimmed": self.attempts,
            "notifications": self.notifications,
        }


Progress = Callable[[Pruned], None]


def _expired(n: int) -> str:
    """Whether delivery `d` may go: parameters $n and $n+2 are the states of each kind
    (empty when that kind is kept forever), $n+1 and $n+3 their cutoffs. The DELETE checks
    it on the row as it is then, so a dead letter replayed meanwhile (open again) stays."""
    return (
        f"((d.state = ANY(${n}::text[]) AND d.updated_at < ${n + 1})"
        f" OR (d.state = ANY(${n + 2}::text[]) AND d.updated_at < ${n + 3}))"
    )


_PAGE = """
    WITH page AS (
        SELECT id, created_at FROM deliveries
        WHERE (created_at, id) > ($1, $2) AND created_at < $3
        ORDER BY created_at, id
        LIMIT $4
    ), gone AS (
        {gone}
    )
    SELECT p.created_at, p.id, (SELECT coalesce(array_agg(state), '{{}}') FROM gone) AS states
    FROM page p
    ORDER BY p.created_at DESC, p.id DESC
    LIMIT 1
"""

# Constant SQL text, put together once; every value goes as a parameter.
_DELETE = _PAGE.format(
    gone=f"DELETE FROM deliveries d USING page WHERE d.id = page.id AND {_expired(5)} "  # noqa: S608
    "RETURNING d.state"
)
_COUNT = _PAGE.format(
    gone=f"SELECT d.state FROM deliveries d JOIN page USING (id) WHERE {_expired(5)}"  # noqa: S608
)

# The attempts of a page whose stored exchange goes: older than the cutoff ($3), something
# still stored, and their delivery settled. A dry run also leaves out those of deliveries
# the deletion would take first (the real run finds them gone).
_CHOSEN = """
    WITH page AS (
        SELECT a.id, a.delivery_id, a.started_at,
               (a.request IS NOT NULL OR a.response_excerpt IS NOT NULL
                OR a.response_headers IS NOT NULL) AS stored
        FROM attempts a
        WHERE a.id > $1
        ORDER BY a.id
        LIMIT $2
    ), chosen AS (
        SELECT page.id FROM page JOIN deliveries d ON d.id = page.delivery_id
        WHERE page.stored AND page.started_at < $3
          AND d.state NOT IN ('pending', 'retrying')
          {dry}
    ){trim}
    SELECT max(id) AS last, min(started_at) AS oldest, (SELECT count(*) FROM {counted}) AS n
    FROM page
"""

_TRIM = _CHOSEN.format(
    dry="",
    trim=""", trimmed AS (
        UPDATE attempts a
        SET request = NULL, response_excerpt = NULL, response_headers = NULL
        FROM chosen WHERE a.id = chosen.id
        RETURNING a.id
    )""",
    counted="trimmed",
)
_TRIM_COUNT = _CHOSEN.format(dry=f"AND NOT {_expired(4)}", trim="", counted="chosen")

# Notifications past the dead letters' retention ($1), a batch ($2) at a time, oldest first;
# one still being sent stays. The dry run counts them all at once: they are few, at most one
# an hour for each cause.
_NOTIFICATIONS = """
    WITH gone AS (
        DELETE FROM notifications WHERE id IN (
            SELECT id FROM notifications
            WHERE created_at < $1 AND state <> 'pending'
            ORDER BY created_at, id
            LIMIT $2
        )
        RETURNING 1
    )
    SELECT count(*) FROM gone
"""
_NOTIFICATIONS_COUNT = """
    SELECT count(*) FROM notifications
    WHERE created_at < $1 AND state <> 'pending'
"""

FIRST = (datetime.min.replace(tzinfo=UTC), uuid.UUID(int=0))
"""Before every row of the deliveries_created index."""


async def prune(
    db: database.Executor,
    retention: Retention,
    *,
    dry_run: bool = False,
    batch: int = BATCH,
    rest: float = REST,
    progress: Progress | None = None,
    until: float | None = None,
) -> Pruned:
    """Delete the settled deliveries past their retention (their attempts and actions go
    with them) and the ops notifications past the dead letters', then trim the attempts
    past theirs; with `dry_run`, only count them.
    `progress` is called with the totals so far between batches. `until`, a
    `time.monotonic()` time: no batch starts after it (`Pruned.complete` says whether all
    was done)."""
    now: datetime = await db.fetchval("SELECT now()")  # the clock the rows were stamped by
    pruned = Pruned()
    settled = _cutoff(now, retention.settled)
    dead = _cutoff(now, retention.dead)
    kinds = (
        list(SETTLED) if settled else [],
        settled or now,
        list(DEAD) if dead else [],
        dead or now,
    )
    latest = max((c for c in (settled, dead) if c is not None), default=None)
    shown = None if progress is None else functools.partial(progress, pruned)
    if latest is not None:
        after = FIRST

        async def delete() -> bool:
            nonlocal after
            row = await db.fetchrow(_COUNT if dry_run else _DELETE, *after, latest, batch, *kinds)
            if row is None:
                return False
            for state in row["states"]:
                pruned.deliveries[state] += 1
            after = (row["created_at"], row["id"])
            return True

        pruned.complete = await in_batches(delete, rest=rest, progress=shown, until=until)
        if not pruned.complete:
            return pruned
    if dead is not None:

        async def forget() -> bool:
            if dry_run:
                pruned.notifications += await db.fetchval(_NOTIFICATIONS_COUNT, dead)
                return False
            n: int = await db.fetchval(_NOTIFICATIONS, dead, batch)
            pruned.notifications += n
            return n == batch

        pruned.complete = await in_batches(forget, rest=rest, progress=shown, until=until)
        if not pruned.complete:
            return pruned
    excerpts = _cutoff(now, retention.excerpts)
    if excerpts is not None:
        last = 0

        async def trim() -> bool:
            nonlocal last
            args: list[Any] = [last, batch, excerpts]
            if dry_run:
                args += kinds
            row = await db.fetchrow(_TRIM_COUNT if dry_run else _TRIM, *args)
            assert row is not None  # an aggregate: one row, NULLs past the last attempt
            if row["last"] is None:
                return False
            pruned.attempts += row["n"]
            last = row["last"]
            return bool(row["oldest"] < excerpts)  # else the rest are all newer

        pruned.complete = await in_batches(trim, rest=rest, progress=shown, until=until)
    return pruned


async def in_batches(
    batch: Callable[[], Awaitable[bool]],
    *,
    rest: float = REST,
    progress: Callable[[], None] | None = None,
    until: float | None = None,
) -> bool:
    """Call `batch` until it says nothing is left (False). Each call is one statement in
    its own short transaction; between two, `progress` is called and `rest` times as long
    as the batch took is waited, so that the workers' statements go in between rather than
    queue behind a long lock or a burst of write-ahead log. `until`, a `time.monotonic()`
    time: no batch starts after it. False when it stopped there with more to do."""
    while True:
        started = time.monotonic()
        if not await batch():
            return True
        if progress is not None:
            progress()
        await asyncio.sleep((time.monotonic() - started) * rest)
        if _over(until):
            return False


def _over(until: float | None) -> bool:
    return until is not None and time.monotonic() >= until


def _cutoff(now: datetime, keep: float | None) -> datetime | None:
    return None if keep is None else now - timedelta(seconds=keep)


async def prune_job(ctx: dict[str, Any]) -> int:
    """The arq cron job around `prune`: what it deleted and trimmed, logged as
    `ledger_pruned`."""
    settings: Settings = ctx["settings"]
    started = time.monotonic()
    try:
        pruned = await prune(
            ctx["db"], settings.retention, until=started + settings.job_timeout * BUDGET_SHARE
        )
    except database.UNAVAILABLE as exc:
        # What it did is committed, batch by batch; the next run goes on from there.
        log.warning("prune_failed", error=f"{type(exc).__name__}: {exc}")
        return 0
    log.info(
        "ledger_pruned",
        **pruned.counts(),
        complete=pruned.complete,
        seconds=round(time.monotonic() - started, 1),
    )
    return pruned.total
