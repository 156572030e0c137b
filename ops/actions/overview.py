"""The overview: the last 24 hours of deliveries at a glance, and what stands waiting now.

Every number is one a list can show: the deliveries of the window are picked by when the
relay took them (`created_at`), as the filters' `since` and `until` pick them, so the page
links each number to the list it counts. That bound is also what keeps it fast on a large
ledger: the window's queries read one day of the `deliveries_created` index, however many
years the ledger holds, and the attempts of its newest deliveries by their own key.
Retries waiting and dead letters are counted over the whole ledger, from the partial index
on the states other than delivered: /metrics's own gauges (worker/metrics.py).

The queue and the circuits are Redis's: with Redis down the rest is still answered, and
`redis_error` says why those are missing. Which circuits are open is known only inside
each worker process (worker/fairness.py), so the overview gives the workers' counts of
circuits opened and closed, and of deliveries put off for an open one.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
from redis.asyncio import Redis
from redis.exceptions import RedisError

from worker import metrics
from worker.ledger import STATES, State

HOURS = 24
TOP_AFFILIATES = 5
FAILING: tuple[State, ...] = ("retrying", "dead")
"""What counts as an affiliate's failures: deliveries that failed and are not delivered."""
DURATION_SAMPLE = 10_000
"""The attempt durations are those of the window's newest deliveries, this many at most:
plenty for a median and a 95th percentile, and a cost that stays the same however many
deliveries a day brings."""
CIRCUITS = {
    "opened": "circuit:opened",
    "closed": "circuit:closed",
    "put_off": "deferred:circuit_open",
}
"""The workers' counters (worker/metrics.py `Tally.count`) that tell of circuits."""


@dataclass(frozen=True, slots=True)
class Window:
    """`HOURS` whole hours of UTC, the last being the current one: each hour's bar is then
    exactly the list `since=START&until=START+1h`."""

    since: datetime
    until: datetime


def window(now: datetime) -> Window:
    hour = now.astimezone(UTC).replace(minute=0, second=0, microsecond=0)
    since = hour - timedelta(hours=HOURS - 1)
    return Window(since, since + timedelta(hours=HOURS))


def hours(w: Window, counts: list[tuple[int, State, int]]) -> list[dict[str, Any]]:
    """Each hour of the window with its deliveries by state (every state, 0 if none), from
    (hour, state, count) rows."""
    table = [dict.fromkeys(STATES, 0) for _ in range(HOURS)]
    for hour, state, n in counts:
        table[hour][state] += n
    return [
        {"start": (w.since + timedelta(hours=i)).isoformat(), "states": states}
        for i, states in enumerate(table)
    ]


async def overview(db: asyncpg.Pool, redis: Redis, queue_name: str) -> dict[str, Any]:
    """The overview as the API answers it (ops/service/models.py, `Overview`)."""
    w = window(await db.fetchval("SELECT now()"))
    by_hour = await db.fetch(
        """
        SELECT floor(extract(epoch FROM created_at - $1) / 3600)::int AS hour, state,
               count(*)::int AS n
        FROM deliveries WHERE created_at >= $1 AND created_at < $2
        GROUP BY 1, 2
        """,
        w.since,
        w.until,
    )
    affiliates = await db.fetch(
        """
        SELECT affiliate_id,
               count(*) FILTER (WHERE state = 'dead')::int AS dead,
               count(*) FILTER (WHERE state = 'retrying')::int AS retrying
        FROM deliveries
        WHERE created_at >= $1 AND created_at < $2 AND state = ANY($3::text[])
        GROUP BY affiliate_id ORDER BY count(*) DESC, affiliate_id LIMIT $4
        """,
        w.since,
        w.until,
        FAILING,
        TOP_AFFILIATES,
    )
    # The attempts by their deliveries' ids, looked up in attempts' own key: joined as
    # tables, Postgres reads every attempt ever made to find the day's.
    durations = await db.fetchrow(
        """
        SELECT count(*)::int AS attempts,
               percentile_cont(0.5) WITHIN GROUP (ORDER BY a.duration_ms) AS p50_ms,
               percentile_cont(0.95) WITHIN GROUP (ORDER BY a.duration_ms) AS p95_ms
        FROM attempts a
        WHERE a.delivery_id = ANY(ARRAY(
            SELECT d.id FROM deliveries d WHERE d.created_at >= $1 AND d.created_at < $2
            ORDER BY d.created_at DESC, d.id DESC LIMIT $3))
        """,
        w.since,
        w.until,
        DURATION_SAMPLE,
    )
    assert durations is not None  # an aggregate answers one row
    ledger = await metrics.read_ledger(db)
    total = dict.fromkeys(STATES, 0)
    for row in by_hour:
        total[row["state"]] += row["n"]
    return {
        "since": w.since.isoformat(),
        "until": w.until.isoformat(),
        "hours": hours(w, [(row["hour"], row["state"], row["n"]) for row in by_hour]),
        "states": total,
        "affiliates": [dict(row) for row in affiliates],
        "durations": {**durations, "of_newest": DURATION_SAMPLE},
        "retries_waiting": ledger.by_state.get("retrying", 0),
        "dead_letters": ledger.by_state.get("dead", 0),
        **await _from_redis(redis, queue_name),
    }


async def _from_redis(redis: Redis, queue_name: str) -> dict[str, Any]:
    """The queue's depth and the circuits' counts, or why Redis could not say."""
    try:
        read = await metrics.read_redis(redis, queue_name)
    except RedisError as exc:
        said = f"{type(exc).__name__}: {exc}"
        return {"queue": None, "circuits": None, "redis_error": said}
    return {
        "queue": {"due": read.queue.due, "later": read.queue.later},
        "circuits": {name: int(read.counters.get(key, 0)) for name, key in CIRCUITS.items()},
        "redis_error": None,
    }
