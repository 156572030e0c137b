"""The arq worker pool: its settings, and the connections each worker process shares."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

from arq import Worker
from arq.connections import RedisSettings
from arq.cron import cron
from arq.worker import func

from producer.json_input import read_json
from producer.queue import JOB_NAME, serialize
from worker import cache, database, deliver, fairness
from worker.config import Settings
from worker.job import deliver_event
from worker.sweep import sweep_job

JOB_TIMEOUT_BACKSTOP = 5.0
"""Seconds arq waits beyond a job's own budget before it cancels the job itself."""

MAX_TRIES = 10**9
"""arq's cap on runs of one job, set out of reach: every wait of a delivery (its retry
schedule, an earlier delivery of its order, a database outage) is a run, and when to give up
is the retry policy's decision, made from the ledger."""


HEALTH_CHECK_SECONDS = 10
"""How often a worker writes arq's health check key (which lives a second longer), so
`/healthz` knows within seconds that no worker is running."""


async def _startup(ctx: dict[str, Any]) -> None:
    settings: Settings = ctx["settings"]
    assert settings.database_url is not None
    ctx["db"] = await database.create_pool(settings.database_url, settings.db_pool_size)
    ctx["http"] = deliver.session(
        settings.connect_timeout, settings.request_timeout, settings.allowed
    )
    ctx["destinations"] = fairness.Destinations(
        max_in_flight=settings.destination_max_in_flight,
        failures=settings.circuit_failures,
        open_seconds=settings.circuit_open_seconds,
        max_open_seconds=fairness.MAX_OPEN_SECONDS,
    )
    ctx["callbacks"] = callbacks = cache.CallbackCache(settings.database_url)
    ctx["cache_listener"] = asyncio.create_task(callbacks.run(), name="callback-cache")


async def _shutdown(ctx: dict[str, Any]) -> None:
    if "cache_listener" in ctx:
        ctx["cache_listener"].cancel()
        # Its failures were logged as they happened; closing the rest must not wait on it.
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await ctx["cache_listener"]
    if "http" in ctx:
        await ctx["http"].close()
    if "db" in ctx:
        await ctx["db"].close()


def worker_settings(settings: Settings) -> dict[str, Any]:
    """arq's WorkerSettings for the relay, as keyword arguments of `arq.Worker`.

    Both URLs must be resolved (embedded services started) before this is called.
    """
    assert settings.redis_url is not None
    redis_settings = RedisSettings.from_dsn(settings.redis_url)
    # Fail at once and say so; restarting a worker that cannot reach Redis is the
    # supervisor's job, and arq's quiet retries would only hide the cause for seconds.
    redis_settings.conn_retries = 0
    return {
        "functions": [func(deliver_event, name=JOB_NAME)],
        "cron_jobs": [
            # Named per queue: relays sharing a Redis each sweep their own deliveries.
            cron(
                sweep_job,
                name=f"{settings.queue_name}:sweep",
                second=0,
                run_at_startup=True,
                timeout=settings.job_timeout,
            )
        ],
        "queue_name": settings.queue_name,
        "redis_settings": redis_settings,
        "job_serializer": serialize,
        # A job a producer wrote by hand that read_json refuses (a duplicate key, a number
        # out of range) fails to deserialize: arq logs it and drops the job.
        "job_deserializer": read_json,
        "on_startup": _startup,
        "on_shutdown": _shutdown,
        "ctx": {"settings": settings},
        "max_jobs": settings.max_jobs,
        "poll_delay": settings.poll_delay,
        # The ledger, not Redis, answers "was this event delivered?"; results would only
        # fill Redis.
        "keep_result": 0,
        "max_tries": MAX_TRIES,
        # The job stops itself at job_timeout and asks to run again (worker.job); arq's
        # own limit, which would delete the job, is only a backstop behind it.
        "job_timeout": settings.job_timeout + JOB_TIMEOUT_BACKSTOP,
        # On SIGTERM or SIGINT: take no new jobs, let those in flight finish for this long,
        # then cancel the rest, which arq puts back in the queue to run again.
        "job_completion_wait": settings.shutdown_wait,
        "health_check_interval": HEALTH_CHECK_SECONDS,
    }


def use_fast_loop() -> bool:
    """Make a uvloop event loop this thread's current loop, when uvloop is installed.

    A worker spends most of its time in socket calls to Redis, Postgres and receivers, and
    uvloop's are cheaper than asyncio's. Call it just before arq's Worker is built: the
    Worker runs on the loop that is current when it is created. Returns whether uvloop is
    in use.
    """
    try:
        import uvloop  # optional: absent where it does not build
    except ImportError:
        return False
    asyncio.set_event_loop(uvloop.new_event_loop())
    return True


def create_worker(settings: Settings, **overrides: Any) -> Worker:
    return Worker(**{**worker_settings(settings), **overrides})
