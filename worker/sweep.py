"""The sweep: put back in Redis the open deliveries whose job Redis no longer has.

Redis can lose jobs (a restart without persistence, a FLUSHALL, a failover); a worker can
die mid-delivery or a job can time out. Postgres still knows every open delivery and when it
is due, so a periodic sweep re-enqueues those that are due and have no job. Re-enqueueing
uses the event's own job id, which arq refuses while that job exists: sweeping twice, or
from several workers at once, enqueues nothing twice.
"""

from __future__ import annotations

from typing import Any

import asyncpg
import structlog
from arq.connections import ArqRedis

from producer.queue import enqueue, have_jobs
from worker import database, ledger
from worker.config import Settings

log = structlog.get_logger("postback.sweep")

PAGE = 500
"""Deliveries read per query; the sweep pages through all that are due."""


async def sweep(db: asyncpg.Pool, redis: ArqRedis, queue_name: str, job_timeout: float) -> int:
    """Re-enqueue every due open delivery that has no job in Redis; returns how many."""
    enqueued = 0
    after = None
    while True:
        rows = await ledger.due_without_claim(db, job_timeout, after, PAGE)
        # One round trip for the page: most due deliveries still have their job (a backlog,
        # a wait for an earlier delivery), and only the rest need arq's checked enqueue.
        present = await have_jobs(redis, [row["event"]["id"] for row in rows])
        for row, exists in zip(rows, present, strict=True):
            if not exists and await enqueue(redis, row["event"], queue_name):
                enqueued += 1
                log.info(
                    "delivery_requeued", event_id=row["event"]["id"], delivery_id=str(row["id"])
                )
        if len(rows) < PAGE:
            return enqueued
        after = (rows[-1]["next_attempt_at"], rows[-1]["id"])


async def sweep_job(ctx: dict[str, Any]) -> int:
    """The arq cron job around `sweep`."""
    settings: Settings = ctx["settings"]
    try:
        count = await sweep(ctx["db"], ctx["redis"], settings.queue_name, settings.job_timeout)
    except database.UNAVAILABLE as exc:
        # The next sweep tries again; jobs meanwhile wait out the outage on their own.
        log.warning("sweep_failed", error=f"{type(exc).__name__}: {exc}")
        return 0
    if count:
        log.warning("sweep_requeued", count=count)
    return count
