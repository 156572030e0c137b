"""Delivery metrics: counted by every worker, added up in Redis, read by the service for
Prometheus.

Counters end up in Redis, not in a worker's memory, because there are many workers and the
one `/metrics` endpoint is served by another process; a scrape adds them up once. A worker
does not write each count as it happens: a job adds to its process's `Tally` (plain
arithmetic, no I/O on a delivery's path), and its `Flusher` writes what was added in one
pipelined round trip at most once a second, and once more when the worker stops, after its
last jobs. Gauges (queue depth, retries waiting, dead letters) are read at scrape time from
where they are true: the queue in Redis and the ledger in Postgres. A scrape reads the two
sources apart, so one being down leaves the other's metrics served (`exposition`).

Counting is best effort: a Redis error costs no delivery. A flush Redis refuses, or that
gets no answer, keeps its counts for the next one (logged once per outage), so a short
outage loses none; a worker killed outright loses the counts it had not written, a second's
worth at most. The counters start again from zero if Redis loses its data, which
Prometheus reads as a counter reset.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Literal, TypeVar

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


FLUSH_SECONDS = 1.0
"""How often, at most, a worker writes its counts to Redis: what a worker killed outright
(SIGKILL, OOM, power) loses, at most."""

FLUSH_WITHIN = 2.0
"""Seconds a flush may wait for Redis before it is given up, its counts kept for the next
one; it also bounds how long a stopping worker waits to write its last counts."""

MAX_FIELDS = 10_000
"""Most distinct fields (counter names, affiliates with failures) a worker holds unwritten.
Counts add up in place, so only new affiliates failing while Redis is away could grow a
tally: beyond this many, their counts are dropped, and the number dropped is logged."""

Hash = Literal["counters", "failures"]
"""Which of the `MetricsKeys` hashes a count goes to."""

_SUM = "duration:sum"


@dataclass(frozen=True, slots=True)
class Increment:
    """One field of one hash to add to: HINCRBY, or HINCRBYFLOAT for a float amount (the
    duration histogram's sum)."""

    hash: Hash
    field: str
    amount: int | float


class Tally:
    """The counts of one worker process not yet written to Redis.

    `count` is what a job calls; it never waits. `drain` hands everything over as one batch
    and starts again from zero; `restore` adds a batch that could not be written back in.
    The layout is Redis's: the `counters` hash by name (`attempts:<state>`,
    `duration:<bucket>`, `duration:sum`, `deliveries:<state>`, `deferred:<reason>`,
    `circuit:<change>`), the `failures` hash by affiliate.
    """

    def __init__(self, max_fields: int = MAX_FIELDS) -> None:
        self.max_fields = max_fields
        self.dropped = 0
        """Increments not kept since the last `take_dropped`: their field was new, and the
        tally already held `max_fields`."""
        self._pending: dict[tuple[Hash, str], int | float] = {}

    def __len__(self) -> int:
        """How many fields hold counts not yet written."""
        return len(self._pending)

    def count(
        self,
        affiliate: str,
        *,
        attempt: tuple[str, float] | None = None,
        settled: str | None = None,
        deferred: str | None = None,
        circuit: str | None = None,
    ) -> None:
        """Count an attempt (the state it left the delivery in, and its duration in
        seconds), the state a delivery settled in, a delivery deferred for its destination
        (the reason), and a destination's circuit opening or closing."""
        if attempt is not None:
            state, seconds = attempt
            self._add("counters", f"attempts:{state}", 1)
            self._add("counters", f"duration:{_bucket(seconds)}", 1)
            self._add("counters", _SUM, float(seconds))
            if state != "delivered":
                self._add("failures", affiliate, 1)
        if settled is not None:
            self._add("counters", f"deliveries:{settled}", 1)
        if deferred is not None:
            self._add("counters", f"deferred:{deferred}", 1)
        if circuit is not None:
            self._add("counters", f"circuit:{circuit}", 1)

    def drain(self) -> list[Increment]:
        """Everything counted so far, as one batch; the tally is empty after."""
        pending, self._pending = self._pending, {}
        return [Increment(hash, field, amount) for (hash, field), amount in pending.items()]

    def restore(self, batch: Iterable[Increment]) -> None:
        """Add back counts that were drained but not written."""
        for increment in batch:
            self._add(increment.hash, increment.field, increment.amount)

    def take_dropped(self) -> int:
        dropped, self.dropped = self.dropped, 0
        return dropped

    def _add(self, hash: Hash, field: str, amount: int | float) -> None:
        key = (hash, field)
        pending = self._pending
        if key in pending:
            pending[key] += amount
        elif len(pending) < self.max_fields:
            pending[key] = amount
        else:
            self.dropped += 1


async def write(
    redis: Redis, queue_name: str, batch: Sequence[Increment]
) -> list[tuple[Increment, RedisError]]:
    """Add a batch to the queue's metric hashes in one pipelined round trip; the increments
    Redis refused, each with its error (the others were written). Raises when Redis could
    not be reached, or the connection was lost: then nothing or all of it may be written."""
    keys = metrics_keys(queue_name)
    # `async with`: the pipeline gives its connection back even when cancelled.
    async with redis.pipeline(transaction=False) as pipe:
        for increment in batch:
            key = getattr(keys, increment.hash)
            if isinstance(increment.amount, float):
                pipe.hincrbyfloat(key, increment.field, increment.amount)
            else:
                pipe.hincrby(key, increment.field, increment.amount)
        answers = await pipe.execute(raise_on_error=False)
    return [
        (increment, answer)
        for increment, answer in zip(batch, answers, strict=True)
        if isinstance(answer, RedisError)
    ]


class Flusher:
    """Writes a worker's `Tally` to Redis: every `every` seconds when it holds counts, and
    once more when closed.

    A flush that fails (Redis down, hung past `within`, or refusing a command) puts its
    counts back for the next one: `metrics_not_counted` is logged at the first failure and
    `metrics_counted_again` once a flush succeeds. A connection lost after Redis applied a
    flush makes the next one count those again; counts are best effort, deliveries are not.
    Counts are never lost to a short outage, only when the worker stops or is killed before
    Redis is back (`metrics_lost`), or for new affiliates beyond `MAX_FIELDS` while it is
    away.
    """

    def __init__(
        self,
        redis: Redis,
        queue_name: str,
        tally: Tally,
        *,
        every: float = FLUSH_SECONDS,
        within: float = FLUSH_WITHIN,
    ) -> None:
        self.redis = redis
        self.queue_name = queue_name
        self.tally = tally
        self.every = every
        self.within = within
        self._stop = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._failing_since: float | None = None

    def start(self) -> None:
        """Flush in the background from now on, until `close`."""
        self._task = asyncio.create_task(self._run(), name="metrics-flusher")

    async def close(self) -> None:
        """Stop flushing every second, after one last flush of everything counted: call it
        once the jobs are done, so that their counts are in it."""
        self._stop.set()
        if self._task is not None:
            await self._task  # a flush under way finishes, then the last one runs
        else:
            await self.flush(final=True)

    async def _run(self) -> None:
        stopping = False
        while not stopping:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.every):
                    await self._stop.wait()
            # Told to stop while flushing: one more turn, at once, for what came meanwhile.
            stopping = self._stop.is_set()
            try:
                await self.flush(final=stopping)
            except Exception:
                # A bug, not Redis (whose errors `flush` handles): the next flush tries again.
                log.exception("metrics_flush_crashed")

    async def flush(self, *, final: bool = False) -> bool:
        """Write everything counted so far, if anything; whether it is all written now.
        `final`: the worker is stopping, so what cannot be written is lost."""
        batch = self.tally.drain()
        if not batch:
            return True
        try:
            async with asyncio.timeout(self.within):
                refused = await write(self.redis, self.queue_name, batch)
        except TimeoutError:
            unwritten, error = batch, f"no answer within {self.within:g} s"
        except (RedisError, OSError) as exc:
            unwritten, error = batch, _describe(exc)
        else:
            if not refused:
                self._written()
                return True
            unwritten, error = [increment for increment, _ in refused], _describe(refused[0][1])
        self.tally.restore(unwritten)
        self._failed(error, len(unwritten), final)
        return False

    def _written(self) -> None:
        dropped = self.tally.take_dropped()
        if self._failing_since is not None:
            log.info(
                "metrics_counted_again",
                after_s=round(time.monotonic() - self._failing_since, 1),
                dropped=dropped,
            )
            self._failing_since = None
        elif dropped:
            log.warning("metrics_dropped", dropped=dropped, max_fields=self.tally.max_fields)

    def _failed(self, error: str, fields: int, final: bool) -> None:
        if self._failing_since is None:
            self._failing_since = time.monotonic()
            log.warning("metrics_not_counted", error=error, kept=not final)
        if final:
            log.warning(
                "metrics_lost", error=error, fields=fields, dropped=self.tally.take_dropped()
            )


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


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
