"""The arq worker pool: its settings, and the connections each worker process shares."""

from __future__ import annotations

import asyncio
import contextlib
import time
from datetime import datetime
from typing import Any

import redis.exceptions
import structlog
from arq import Worker
from arq.cron import cron
from arq.worker import func

from producer.connection import open_redis, redis_settings
from producer.json_input import read_json
from producer.queue import (
    JOB_NAME,
    health_check_key,
    notify_name,
    prune_name,
    serialize,
    sweep_name,
)
from worker import cache, database, deliver, fairness, ledger, metrics, notify, tracing
from worker.config import Settings
from worker.job import deliver_event
from worker.prune import prune_job
from worker.sweep import sweep_job

JOB_TIMEOUT_BACKSTOP = 5.0
"""Seconds arq waits beyond a job's own budget before it cancels the job itself."""

MAX_TRIES = 10**9
"""arq's cap on runs of one job, set out of reach: every wait of a delivery (its retry
schedule, an earlier delivery of its order, a database outage) is a run, and when to give up
is the retry policy's decision, made from the ledger."""


PRUNE_EVERY_MINUTES = 5
"""The prune runs every 5 minutes, in one worker (arq enqueues each run of a cron job under
an id made of its name and time, so one worker takes it), for at most the job timeout
(`prune.BUDGET_SHARE` of it). Never longer: arq holds a killed worker's jobs until the
longest timeout of its functions has passed (plus 10 s), so a prune allowed 50 minutes
would hold a crashed worker's deliveries for 50 minutes. Each batch is committed as it
goes: a run cut short leaves the rest to the next."""


HEALTH_CHECK_SECONDS = 10
"""How often a worker writes arq's health check key (which lives a second longer), so
`/healthz` knows within seconds that no worker is running."""

REDIS_FIRST_WAIT = 0.1
REDIS_LONGEST_WAIT = 1.0
"""Seconds a worker that lost Redis waits before it tries again: the first wait, doubled
after each failed try up to the longest. A failover takes seconds; a worker should see
the new primary within a second of it."""

log = structlog.get_logger("postback.worker")


async def _startup(ctx: dict[str, Any]) -> None:
    settings: Settings = ctx["settings"]
    assert settings.database_url is not None
    ctx["db"] = db = await database.create_pool(settings.database_url, settings.db_pool_size)
    # The jobs' ledger statements, gathered while one is in flight (worker/group.py).
    ctx["ledger"] = ledger.Ledger(db, settings.auto_disable)
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
    # The jobs count here, without waiting; the flusher writes it all to Redis once a second.
    ctx["counts"] = counts = metrics.Tally()
    ctx["metrics_flusher"] = flusher = metrics.Flusher(ctx["redis"], settings.queue_name, counts)
    flusher.start()


async def _shutdown(ctx: dict[str, Any]) -> None:
    # arq calls this once every job has finished (on SIGTERM too): their counts are all in.
    if "metrics_flusher" in ctx:
        await ctx["metrics_flusher"].close()
    if "cache_listener" in ctx:
        ctx["cache_listener"].cancel()
        # Its failures were logged as they happened; closing the rest must not wait on it.
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await ctx["cache_listener"]
    if "http" in ctx:
        await ctx["http"].close()
    if "ledger" in ctx:
        shared: ledger.Ledger = ctx["ledger"]
        await shared.close()
        # How well the jobs shared their statements (worker/group.py): calls per statement.
        log.info(
            "ledger_statements",
            takes=shared.takes.calls,
            take_statements=shared.takes.statements,
            records=shared.records.calls,
            record_statements=shared.records.statements,
        )
    if "db" in ctx:
        await ctx["db"].close()
    # Spans still buffered, exported before the process goes (a no-op when tracing is off).
    tracing.flush()


def worker_settings(settings: Settings) -> dict[str, Any]:
    """arq's WorkerSettings for the relay, as keyword arguments of `arq.Worker`.

    Both URLs must be resolved (embedded services started) before this is called.
    """
    assert settings.redis_url is not None
    # For arq's own Worker (the benchmark's no-op worker); the relay's `RelayWorker` is
    # given the same URL opened with `open_redis` instead (`create_worker`). Either fails
    # at once and says so when it starts without Redis: restarting it is the supervisor's
    # job, and arq's quiet retries would only hide the cause for seconds.
    arq_redis = redis_settings(settings.redis_url)
    arq_redis.conn_retries = 0
    return {
        "functions": [func(deliver_event, name=JOB_NAME)],
        "cron_jobs": [
            cron(
                sweep_job,
                name=sweep_name(settings.queue_name),
                second=0,
                run_at_startup=True,
                timeout=settings.job_timeout,
            ),
            cron(
                prune_job,
                name=prune_name(settings.queue_name),
                minute=set(range(0, 60, PRUNE_EVERY_MINUTES)),
                second=30,
                timeout=settings.job_timeout,
            ),
            cron(
                notify.notify_job,
                name=notify_name(settings.queue_name),
                second=set(range(0, 60, notify.EVERY_SECONDS)),
                timeout=settings.job_timeout,
            ),
        ],
        "queue_name": settings.queue_name,
        "redis_settings": arq_redis,
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
        # arq's own default key, named where `/healthz` reads it.
        "health_check_key": health_check_key(settings.queue_name),
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


class RelayWorker(Worker):
    """arq's Worker, made to outlast Redis going away while it runs (a Sentinel failover,
    a restart).

    arq ends its main loop on the first Redis error, and the worker process with it. This
    one opens Redis as every part of the relay does (`open_redis`, which reads a Sentinel
    URL too), fails at once only when it starts without Redis (arq asks Redis for its INFO
    before anything else), and otherwise waits out a lost connection: it logs
    `redis_unavailable`, tries again after 0.1 s, then after twice as long each time up to
    1 s, and through Sentinel each try asks the sentinels where the primary is. Once Redis
    answers it logs `redis_reconnected` and sweeps at once, so that what the new primary
    lacks (what the old one had not replicated) comes back from the ledger now rather than
    at the next minute.

    Deliveries in flight meanwhile finish and are recorded in Postgres; arq's bookkeeping
    of their jobs may fail, and a job left behind runs again later and finds its delivery
    settled in the ledger.

    arq has no public hook around one poll of its queue: its `main` loops over the private
    `_poll_iteration`, which this class wraps; overriding `main` instead would mean copying
    it.
    """

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._redis_lost_at: float | None = None
        self._redis_wait = REDIS_FIRST_WAIT
        self._polling = asyncio.Lock()

    async def stop_polling(self, within: float) -> None:
        """Let the poll under way finish and start no other, so that cancelling the worker
        then cannot land inside one.

        arq takes a job in a WATCH transaction; cancelled there, redis-py leaves that
        pipeline holding its connection (a ResourceWarning when it is collected). Waits at
        most `within` seconds: a poll stuck on a hung Redis is cancelled all the same.
        """
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._polling.acquire(), within)

    async def start_jobs(self, job_ids: list[bytes]) -> None:
        try:
            await super().start_jobs(job_ids)
        except redis.exceptions.RedisError:
            # arq takes a job slot before the transaction that marks the job in progress,
            # and gives it back when that fails only on a conflict: an error that leaves
            # here left in that transaction, and would keep its slot for good. Given back
            # as arq gives it back on a conflict.
            self.job_counter -= 1
            self.sem.release()
            raise

    async def _poll_iteration(self) -> None:
        async with self._polling:
            try:
                self._reap_jobs_that_lost_redis()
                await super()._poll_iteration()
            except redis.exceptions.RedisError as exc:
                lost = _connection_lost(exc)
                if lost is None:
                    raise
                await self._wait_for_redis(lost)
            else:
                if self._redis_lost_at is not None:
                    self._redis_back()

    def _reap_jobs_that_lost_redis(self) -> None:
        """Drop every finished job whose arq bookkeeping lost Redis, and raise the first
        such error. arq would raise them one per poll, and a job run again under the same
        id before its turn would replace its task unread."""
        first: redis.exceptions.RedisError | None = None
        for job_id, task in list(self.tasks.items()):
            if not task.done() or task.cancelled():
                continue
            error = task.exception()
            if isinstance(error, redis.exceptions.RedisError) and _connection_lost(error):
                del self.tasks[job_id]
                first = first or error
        if first is not None:
            raise first

    async def _wait_for_redis(self, error: Exception) -> None:
        if self._redis_lost_at is None:
            self._redis_lost_at = time.monotonic()
            self._redis_wait = REDIS_FIRST_WAIT
            log.warning("redis_unavailable", error=f"{type(error).__name__}: {error}")
        await asyncio.sleep(self._redis_wait)
        self._redis_wait = min(self._redis_wait * 2, REDIS_LONGEST_WAIT)

    def _redis_back(self) -> None:
        assert self._redis_lost_at is not None
        log.info("redis_reconnected", after_s=round(time.monotonic() - self._redis_lost_at, 1))
        self._redis_lost_at = None
        now = datetime.now(tz=self.timezone)
        for job in self.cron_jobs:
            if job.coroutine is sweep_job:
                job.next_run = now  # enqueued by the next heartbeat, then every minute again


def _connection_lost(exc: redis.exceptions.RedisError) -> Exception | None:
    """The error that lost the connection to Redis, if that is what `exc` says; redis-py
    reports a connection lost inside a transaction (WATCH ... EXEC) as a WatchError."""
    cause = exc.__context__ if isinstance(exc, redis.exceptions.WatchError) else exc
    if isinstance(cause, redis.exceptions.ConnectionError | redis.exceptions.TimeoutError):
        return cause
    return None


def create_worker(settings: Settings, **overrides: Any) -> Worker:
    assert settings.redis_url is not None
    kwargs = {**worker_settings(settings), **overrides}
    if "redis_pool" not in kwargs:
        # No read timeout, as arq's own pool: see `open_redis`.
        kwargs["redis_pool"] = open_redis(
            settings.redis_url, settings.queue_name, read_timeout=None
        )
    return RelayWorker(**kwargs)
