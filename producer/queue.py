"""arq's layout in Redis, as the relay uses it: the queue (a sorted set of job ids scored by
when each runs), each job's key, the workers' health check, the cron names of the sweep, the
prune and the notifier, and the relay's own metrics hashes beside them. Only this module names
a Redis key or touches arq's structures directly; every other part of the relay calls the
functions here.

Jobs are JSON, never pickle: whoever can write to Redis must not be able to run code in a
worker, and a producer in any language can enqueue by writing the same shape as arq.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import timedelta
from decimal import Decimal
from typing import Any

from arq.connections import ArqRedis
from arq.constants import health_check_key_suffix, job_key_prefix
from redis.asyncio import Redis
from redis.exceptions import ConnectionError as RedisConnectionError

DEFAULT_QUEUE = "postback:queue"
"""The Redis key of the queue (a sorted set, as arq keeps it) unless configured otherwise."""

JOB_NAME = "deliver_event"
"""The worker function every event job calls, with the event object as its one argument."""


JOB_EXPIRES = timedelta(days=30)
"""How long a queued job waits for a worker before Redis drops it (arq's default is a day:
too short for a relay whose workers may be stopped over a long weekend)."""


def job_id(event_id: str) -> str:
    """One job per event id, so publishing the same id while it is queued enqueues nothing."""
    return f"event:{event_id}"


def job_key(job: str) -> str:
    """The key arq keeps job `job` (a job id) under, until the job ends or expires."""
    return job_key_prefix + job


def health_check_key(queue_name: str) -> str:
    """The key each worker of the queue rewrites every few seconds with a report of its jobs,
    and which expires soon after the last worker stops: arq's Worker writes it here."""
    return queue_name + health_check_key_suffix


def sweep_name(queue_name: str) -> str:
    """The name of the queue's sweep cron job. arq keys each run of a cron job by its name,
    so relays sharing a Redis under different queue names each sweep their own deliveries."""
    return f"{queue_name}:sweep"


def prune_name(queue_name: str) -> str:
    """The name of the queue's prune cron job: as the sweep's, one run at each time of its
    schedule among all the queue's workers."""
    return f"{queue_name}:prune"


def notify_name(queue_name: str) -> str:
    """The name of the queue's notification cron job (the checks and the sender of ops
    notifications): as the sweep's, one run at each time of its schedule."""
    return f"{queue_name}:notify"


@dataclass(frozen=True, slots=True)
class MetricsKeys:
    """The hashes the workers count in, beside their queue: `counters` by name, `failures`
    by affiliate."""

    counters: str
    failures: str


def metrics_keys(queue_name: str) -> MetricsKeys:
    return MetricsKeys(f"{queue_name}:metrics", f"{queue_name}:metrics:affiliate-failures")


@dataclass(frozen=True, slots=True)
class QueueDepth:
    """The jobs in a queue: `due` now (waiting for a worker, or running) and due `later`
    (deferred: a retry, a wait for an earlier delivery)."""

    due: int
    later: int


async def enqueue(redis: ArqRedis, event: dict[str, Any], queue_name: str) -> bool:
    """Queue a validated event's job. False when that event's job is already in Redis.

    arq's check and write are one transaction, so two callers racing on the same event
    (a producer publishing twice, two sweeps) enqueue it once.
    """
    key = job_id(event["id"])
    for _ in range(2):
        job = await redis.enqueue_job(
            JOB_NAME, event, _job_id=key, _queue_name=queue_name, _expires=JOB_EXPIRES
        )
        if job is not None:
            return True
        # arq says None for a job already there, and also when the connection was lost
        # inside its transaction (a failover): redis-py reports that as a WatchError, which
        # arq takes for another caller's enqueue. Only a job that is there was queued.
        if await redis.exists(job_key(key)):
            return False
    raise RedisConnectionError("Redis neither took the event's job nor has it; send it again")


async def have_jobs(redis: Redis, event_ids: Sequence[str]) -> list[bool]:
    """Whether Redis has each event's job, in one round trip."""
    # `async with`: the pipeline gives its connection back even when cancelled.
    async with redis.pipeline(transaction=False) as pipe:
        for event_id in event_ids:
            pipe.exists(job_key(job_id(event_id)))
        return [bool(n) for n in await pipe.execute()]


async def keep_job(redis: Redis, job: str, runs_in: float) -> None:
    """Keep job `job` in Redis for `JOB_EXPIRES` after its next run, `runs_in` seconds away.

    arq keeps a job's key only until the expiry given at enqueue; a long schedule (or a
    long Retry-After) must not outlive it, or arq would drop the job as expired.
    """
    await redis.expire(job_key(job), int(JOB_EXPIRES.total_seconds() + runs_in))


async def wake(redis: Redis, queue_name: str, event_ids: Sequence[str]) -> None:
    """Make the jobs of these events due now, if they are still queued."""
    if not event_ids:
        return
    now_ms = int(time.time() * 1000)
    # XX: only jobs still queued; LT: never push a job later than it already was.
    await redis.zadd(queue_name, {job_id(e): now_ms for e in event_ids}, xx=True, lt=True)


async def queue_depth(redis: Redis, queue_name: str) -> QueueDepth:
    async with redis.pipeline(transaction=False) as pipe:
        pipe.zcount(queue_name, "-inf", int(time.time() * 1000))
        pipe.zcard(queue_name)
        due, queued = await pipe.execute()
    return QueueDepth(due, queued - due)


async def worker_report(redis: Redis, queue_name: str) -> str | None:
    """What the queue's last worker to check in said of itself, None when no worker has
    checked in lately.

    arq's own `async_check_health` reads the same key, but opens a client of its own and
    answers with an exit code; the service asks through its own client, with its timeout.
    """
    report: bytes | None = await redis.get(health_check_key(queue_name))
    return None if report is None else report.decode(errors="replace")


def _default(value: object) -> str:
    if isinstance(value, Decimal):
        return format(value, "f")
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


def serialize(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":"), default=_default).encode()
