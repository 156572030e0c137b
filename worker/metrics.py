"""Delivery metrics: counted by every worker in Redis, read by the service for Prometheus.

Counters live in Redis, not in a worker's memory, because there are many workers and the
one `/metrics` endpoint is served by another process; a scrape adds them up once. Gauges
(queue depth, retries waiting, dead letters) are read at scrape time from where they are
true: the queue in Redis and the ledger in Postgres. A scrape reads the two sources apart,
so one being down leaves the other's metrics served (`exposition`).

Counting is best effort: a Redis error costs a count, never a delivery. The counters start
again from zero if Redis loses its data, which Prometheus reads as a counter reset.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Iterator
from dataclasses import dataclass
from typing import TypeVar

import asyncpg
import structlog
from prometheus_client import generate_latest
from prometheus_client.metrics_core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from redis.asyncio import Redis
from redis.exceptions import RedisError

from producer.queue import QueueDepth, metrics_keys, queue_depth
from worker import database

log = structlog.get_logger("postback.metrics")

DURATION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
"""Upper bounds, in seconds, of the attempt duration histogram (and +Inf)."""

_INF = "+Inf"

_Reading = TypeVar("_Reading")


def _bucket(seconds: float) -> str:
    return next((repr(b) for b in DURATION_BUCKETS if seconds <= b), _INF)


async def count(
    redis: Redis,
    queue_name: str,
    affiliate: str,
    *,
    attempt: tuple[str, float] | None = None,
    settled: str | None = None,
    deferred: str | None = None,
    circuit: str | None = None,
) -> None:
    """Count an attempt (the state it left the delivery in, and its duration in seconds),
    the state a delivery settled in, a delivery deferred for its destination (the reason),
    and a destination's circuit opening or closing."""
    keys = metrics_keys(queue_name)
    key = keys.counters
    try:
        # `async with`: the pipeline gives its connection back even when cancelled.
        async with redis.pipeline(transaction=False) as pipe:
            if attempt is not None:
                state, seconds = attempt
                pipe.hincrby(key, f"attempts:{state}", 1)
                pipe.hincrby(key, f"duration:{_bucket(seconds)}", 1)
                pipe.hincrbyfloat(key, "duration:sum", seconds)
                if state != "delivered":
                    pipe.hincrby(keys.failures, affiliate, 1)
            if settled is not None:
                pipe.hincrby(key, f"deliveries:{settled}", 1)
            if deferred is not None:
                pipe.hincrby(key, f"deferred:{deferred}", 1)
            if circuit is not None:
                pipe.hincrby(key, f"circuit:{circuit}", 1)
            await pipe.execute()
    except RedisError as exc:
        log.warning("metrics_not_counted", error=str(exc))


class _Families:
    """What `generate_latest` wants: something whose `collect` yields metric families."""

    def __init__(self, families: list[Metric]) -> None:
        self.families = families

    def collect(self) -> Iterator[Metric]:
        return iter(self.families)


SOURCES = ("redis", "postgres")
"""Where a scrape reads from, as `postback_source_up{source}` names them."""

_DOWN: dict[str, tuple[type[BaseException], ...]] = {
    "redis": (RedisError, TimeoutError),
    "postgres": (database.DatabaseUnavailable, *database.UNAVAILABLE),
}
"""What a source's read raises when that source is down (or slower than the scrape may
wait), as opposed to a bug, which fails the scrape."""


@dataclass(frozen=True, slots=True)
class RedisReading:
    """What Redis knows: the workers' counters, failures by affiliate, the queue's depth."""

    counters: dict[str, float]
    failures: dict[str, float]
    queue: QueueDepth


@dataclass(frozen=True, slots=True)
class LedgerReading:
    """What Postgres knows: how many deliveries are in each of the states the gauges count."""

    by_state: dict[str, int]


async def read_redis(redis: Redis, queue_name: str) -> RedisReading:
    keys = metrics_keys(queue_name)
    async with redis.pipeline(transaction=False) as pipe:
        pipe.hgetall(keys.counters)
        pipe.hgetall(keys.failures)
        raw_counters, raw_failures = await pipe.execute()
    return RedisReading(
        counters={k.decode(): float(v) for k, v in raw_counters.items()},
        failures={k.decode(): float(v) for k, v in raw_failures.items()},
        queue=await queue_depth(redis, queue_name),
    )


async def read_ledger(db: asyncpg.Pool) -> LedgerReading:
    rows = await db.fetch(
        "SELECT state, count(*) AS n FROM deliveries WHERE state IN ('retrying', 'dead')"
        " GROUP BY state"
    )
    return LedgerReading({row["state"]: row["n"] for row in rows})


async def exposition(redis: Redis, db: asyncpg.Pool, queue_name: str, within: float) -> bytes:
    """The Prometheus text exposition of every metric, read now.

    Each source is read on its own, `within` so many seconds: when one is down (or hung),
    the other's metrics are still served, and `postback_source_up` says which failed. A
    dead-letter gauge matters most while Redis is down; its metrics are left out rather than
    shown as zeros, which would read as "all clear".
    """
    from_redis, from_ledger = await asyncio.gather(
        _bounded("redis", read_redis(redis, queue_name), within),
        _bounded("postgres", read_ledger(db), within),
    )
    return generate_latest(_Families(families(from_redis, from_ledger)))


async def _bounded(source: str, read: Awaitable[_Reading], within: float) -> _Reading | None:
    """What `read` returned, or None when its source is down or gave no answer in time."""
    try:
        async with asyncio.timeout(within):
            return await read
    except TimeoutError:
        log.warning("metrics_source_down", source=source, error=f"no answer within {within:g} s")
    except _DOWN[source] as exc:
        log.warning("metrics_source_down", source=source, error=database.describe(exc))
    return None


def families(redis: RedisReading | None, ledger: LedgerReading | None) -> list[Metric]:
    """The metric families of what was read; a source that was down (None) adds none of its
    own, and shows as 0 in `postback_source_up`."""
    up = GaugeMetricFamily(
        "postback_source_up",
        "Whether /metrics could read the source just now (1) or not (0, its metrics left "
        "out): redis (counters, queue) and postgres (retries waiting, dead letters).",
        labels=["source"],
    )
    for source, reading in zip(SOURCES, (redis, ledger), strict=True):
        up.add_metric([source], 0.0 if reading is None else 1.0)
    return [
        up,
        *([] if redis is None else _from_redis(redis)),
        *([] if ledger is None else _from_ledger(ledger)),
    ]


def _from_redis(reading: RedisReading) -> list[Metric]:
    counters = reading.counters
    deliveries = CounterMetricFamily(
        "postback_deliveries",
        "Deliveries settled, by the state they settled in (a replayed one counts again).",
        labels=["outcome"],
    )
    for outcome in ("delivered", "dead", "skipped"):
        deliveries.add_metric([outcome], counters.get(f"deliveries:{outcome}", 0.0))
    attempts = CounterMetricFamily(
        "postback_attempts",
        "Attempts made, by the state each left its delivery in.",
        labels=["result"],
    )
    for result in ("delivered", "retrying", "dead"):
        attempts.add_metric([result], counters.get(f"attempts:{result}", 0.0))
    cumulative, buckets = 0.0, []
    for bound in [*map(repr, DURATION_BUCKETS), _INF]:
        cumulative += counters.get(f"duration:{bound}", 0.0)
        buckets.append((bound, cumulative))
    duration = HistogramMetricFamily(
        "postback_attempt_duration_seconds",
        "How long attempts took, connect to last byte read.",
        buckets=buckets,
        sum_value=counters.get("duration:sum", 0.0),
    )
    failures = CounterMetricFamily(
        "postback_affiliate_failures",
        "Failed attempts (retried or dead-lettered), by affiliate.",
        labels=["affiliate"],
    )
    for affiliate, n in sorted(reading.failures.items()):
        failures.add_metric([affiliate], n)
    depth = GaugeMetricFamily(
        "postback_queue_depth",
        "Jobs in the queue due now: waiting for a worker, or running.",
        value=reading.queue.due,
    )
    deferred = GaugeMetricFamily(
        "postback_queue_deferred",
        "Jobs in the queue due later: retries and deliveries waiting for an earlier one.",
        value=reading.queue.later,
    )
    held = CounterMetricFamily(
        "postback_destination_deferrals",
        "Times a delivery was put off for its destination, without an attempt: over the "
        "per-destination cap, or its circuit open.",
        labels=["reason"],
    )
    for reason in ("at_cap", "circuit_open"):
        held.add_metric([reason], counters.get(f"deferred:{reason}", 0.0))
    circuits = CounterMetricFamily(
        "postback_circuit_changes",
        "Destinations' circuits opened (after repeated failures) and closed (by a probe).",
        labels=["change"],
    )
    for change in ("opened", "closed"):
        circuits.add_metric([change], counters.get(f"circuit:{change}", 0.0))
    return [deliveries, attempts, duration, failures, depth, deferred, held, circuits]


def _from_ledger(reading: LedgerReading) -> list[Metric]:
    retrying = GaugeMetricFamily(
        "postback_retries_waiting",
        "Deliveries that failed and wait for their next retry.",
        value=reading.by_state.get("retrying", 0),
    )
    dead = GaugeMetricFamily(
        "postback_dead_letters",
        "Dead-lettered deliveries, not replayed or discarded.",
        value=reading.by_state.get("dead", 0),
    )
    return [retrying, dead]
