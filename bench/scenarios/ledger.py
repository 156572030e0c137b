"""Ledger: what runs against a ledger of millions of rows, timed at the 99th percentile.

A database of its own is filled in SQL (`bench.ledger_fill`: 5,000,000 deliveries and
about 10,000,000 attempts by default), then each operation runs `REPETITIONS` times with
random parameters, one after the other, through the relay's own functions: a worker's take
and record of a new delivery, the sweep's query, every listing filter ops have (first page
and a page deep into the ledger), a delivery's detail, the gauges `/metrics` reads at every
scrape, and a bulk replay of 1,000 dead letters (each replay timed, and the selection it
works through). Each must stay under 50 ms at the 99th percentile.

`--plans FILE` writes the plan of every statement of each operation (auto_explain, with
ANALYZE and BUFFERS, nested statements included) for one run of it.
"""

from __future__ import annotations

import asyncio
import hashlib
import math
import random
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, cast

import asyncpg
import structlog
import structlog.testing

from bench import ledger_fill, setup
from bench.config import BenchConfig
from bench.context import Bench
from bench.progress import say
from bench.results import Row, judged
from ops.actions import lookup, replay
from ops.actions.filters import Cursor, DeliveryFilter, Filter
from producer import order_created, order_updated
from producer.connection import connect_redis
from worker import database, ledger, metrics, sweep
from worker.exchange import FAILURE_CLASSES, Outcome, Request
from worker.ledger import STATES
from worker.retry import Verdict

NAME = "ledger"
DEFAULT_DELIVERIES = 5_000_000
REPETITIONS = 200
REPLAYED = 1000
TARGET_MS = 50.0
BUDGET_S = 60.0
"""Seconds of runs at most per operation."""

Operation = Callable[[asyncpg.Pool], Awaitable[object]]


def delivery_id(n: int) -> uuid.UUID:
    """The id the fill gave delivery number `n`."""
    return uuid.UUID(hashlib.md5(f"d{n}".encode(), usedforsecurity=False).hexdigest())


def p99(samples: list[float]) -> float:
    """The 99th percentile (nearest rank): the 198th of 200 samples."""
    ordered = sorted(samples)
    return ordered[max(0, math.ceil(0.99 * len(ordered)) - 1)]


class Space:
    """Random parameters that exist in a ledger filled with `deliveries` rows."""

    def __init__(self, deliveries: int, start: datetime, end: datetime) -> None:
        self.deliveries = deliveries
        self.start = start
        self.end = end
        self.rng = random.Random(20)  # noqa: S311 -- parameters, not secrets

    def affiliate(self) -> str:
        return f"aff{self.rng.randrange(ledger_fill.AFFILIATES):03d}"

    def order(self) -> str:
        return f"ORD-{self.rng.randrange(self.deliveries * 2 // 3)}"

    def moment(self) -> datetime:
        return self.start + (self.end - self.start) * self.rng.uniform(0.1, 0.9)

    def day(self) -> tuple[datetime, datetime]:
        since = self.moment()
        return since, since + timedelta(days=1)

    def deep(self) -> Cursor:
        """A page far into the listing: after a random time of the ledger's middle."""
        return Cursor(self.moment(), uuid.UUID(int=self.rng.getrandbits(128)))

    def dead_window(self, per_window: int) -> tuple[datetime, datetime]:
        """A span of arrivals holding about `per_window` dead letters."""
        dead = max(1, self.deliveries * 2 // 100)
        share = min(1.0, per_window / dead)
        since = self.start + (self.end - self.start) * self.rng.uniform(0.0, 1.0 - share)
        return since, since + (self.end - self.start) * share + timedelta(seconds=1)


def _filters(space: Space) -> dict[str, Callable[[], DeliveryFilter]]:
    """Each filter of the listings, with a random value each time."""
    return {
        "affiliate": lambda: DeliveryFilter(affiliate=space.affiliate()),
        "state": lambda: DeliveryFilter(state=space.rng.choice(STATES)),
        "event_type": lambda: DeliveryFilter(
            event_type=space.rng.choice(("order.created", "order.updated"))
        ),
        "error_class": lambda: DeliveryFilter(error_class=space.rng.choice(FAILURE_CLASSES)),
        "order": lambda: DeliveryFilter(order=space.order()),
        "since/until": lambda: DeliveryFilter(since=(day := space.day())[0], until=day[1]),
        "dead letters": lambda: Filter().dead_letters(),
    }


class _Worker:
    """A worker's two statements for new deliveries, as `worker.job` makes them."""

    def __init__(self, space: Space) -> None:
        self.space = space
        self.taken: list[tuple[uuid.UUID, Any]] = []
        self.count = 0

    async def take(self, db: asyncpg.Pool) -> object:
        self.count += 1
        space = self.space
        affiliate = space.affiliate()
        fields: dict[str, Any] = {
            "id": f"bench-ledger-{uuid.uuid4().hex}",
            "affiliate_id": affiliate,
            "amount": "25.00",
            "commission": "2.50",
            "currency": "EUR",
            "occurred_at": datetime.now(UTC),
            "link_url": f"https://shop.example/landing?ref={affiliate}&sub_id=s{self.count}",
        }
        # Half are updates of orders the ledger holds: they look for their order's create.
        if self.count % 2:
            event = order_created(number=f"NEW-{uuid.uuid4().hex[:12]}", **fields)
            wait = None
        else:
            event = order_updated(number=space.order(), status="paid", **fields)
            wait = 5.0
        delivery = uuid.uuid4()
        taken = await ledger.take(db, delivery, event, 1, f"job-{delivery}", 60.0, create_wait=wait)
        self.taken.append((delivery, event))
        return taken

    async def record(self, db: asyncpg.Pool) -> object:
        delivery, event = self.taken.pop()
        request = Request(
            "GET",
            f"https://track.{event.affiliate_id}.example/pb?order={event.order.number}",
            {"User-Agent": "postback-relay/1.0", "Idempotency-Key": str(delivery)},
            None,
        )
        outcome = Outcome(
            200,
            42.0,
            excerpt='{"status":"ok"}',
            headers=(("Content-Type", "application/json"), ("Server", "nginx")),
        )
        return await ledger.record_attempt(
            db,
            event,
            delivery,
            1,
            request,
            datetime.now(UTC),
            outcome,
            Verdict("delivered", "success"),
        )


def operations(space: Space) -> dict[str, Operation]:
    """Each operation timed, by name; each call draws fresh random parameters (a few
    microseconds, inside the time measured)."""
    worker = _Worker(space)
    ops: dict[str, Operation] = {
        "postback_take (new delivery)": worker.take,
        "postback_record (new delivery)": worker.record,
    }

    async def sweep_page(db: asyncpg.Pool) -> object:
        return await ledger.due_without_claim(db, 300.0, None, sweep.PAGE)

    ops["sweep query (a page of due deliveries)"] = sweep_page
    for name, make in _filters(space).items():
        ops[f"list {name}, first page"] = _listing(make, None)
        ops[f"list {name}, deep page"] = _listing(make, space.deep)

    async def show(db: asyncpg.Pool) -> object:
        return await lookup.show_delivery(db, delivery_id(space.rng.randrange(space.deliveries)))

    async def selection(db: asyncpg.Pool) -> object:
        since, until = space.dead_window(REPLAYED)
        return await lookup.matching_ids(db, Filter(since=since, until=until).dead_letters())

    ops["show delivery"] = show
    ops["gauges (dead letters, retrying)"] = metrics.read_ledger
    ops["bulk replay selection (1,000 dead letters)"] = selection
    return ops


def _listing(make: Callable[[], DeliveryFilter], deep: Callable[[], Cursor] | None) -> Operation:
    async def listing(db: asyncpg.Pool) -> object:
        return await lookup.list_deliveries(db, make(), after=None if deep is None else deep())

    return listing


async def _timed(db: asyncpg.Pool, operation: Operation, repetitions: int) -> list[float]:
    """`repetitions` runs' times, fewer if they pass `BUDGET_S` in all: an operation that
    takes seconds has missed its target whatever the rest would say."""
    samples = []
    spent = 0.0
    for _ in range(repetitions):
        started = time.perf_counter()
        await operation(db)
        samples.append((time.perf_counter() - started) * 1000)
        spent += samples[-1] / 1000
        if spent > BUDGET_S:
            break
    return samples


async def _replay_times(
    db: asyncpg.Pool, config: BenchConfig, space: Space
) -> tuple[list[float], int]:
    """Each replay's time in a bulk replay of about `REPLAYED` dead letters."""
    since, until = space.dead_window(REPLAYED)
    redis = await connect_redis(config.redis_url, config.queue_name(NAME))
    times: list[float] = []
    last = time.perf_counter()

    def progress(done: int, total: int) -> None:
        nonlocal last
        now = time.perf_counter()
        times.append((now - last) * 1000)
        last = now

    try:
        with structlog.testing.capture_logs():  # a line per replay: stdout is the table's
            summary = await replay.replay_matching(
                db,
                redis,
                config.queue_name(NAME),
                Filter(since=since, until=until),
                "rerender",
                "bench",
                progress,
            )
    finally:
        await setup.forget_redis_keys(redis, config)
        await redis.aclose()
    if summary.failed or summary.skipped:
        raise RuntimeError(f"bulk replay: {summary.failed} failed, {summary.skipped} skipped")
    return times, summary.replayed


async def _plans(url: str, space: Space, path: Path) -> None:
    """One run of each operation with auto_explain on, its plans written to `path`."""
    conn = await database.connect(url)
    out: list[str] = []
    try:
        await conn.execute("LOAD 'auto_explain'")
        for setting in (
            "auto_explain.log_min_duration = 0",
            "auto_explain.log_analyze = on",
            "auto_explain.log_buffers = on",
            "auto_explain.log_nested_statements = on",
            "client_min_messages = log",
        ):
            await conn.execute(f"SET {setting}")
        conn.add_log_listener(lambda _c, message: out.append(str(message)))
        # One connection, not a pool: a pool forgets a connection's log listener when it
        # takes the connection back. The operations only run statements on it.
        db = cast("asyncpg.Pool", conn)
        for name, operation in operations(space).items():
            out.append(f"\n==== {name}\n")
            await operation(db)
            await asyncio.sleep(0.05)  # the listener is called soon after, not at once
    finally:
        await conn.close()
    with path.open("w") as file:
        file.write("\n".join(out) + "\n")
    say(f"  plans written to {path}")


async def measure(
    config: BenchConfig,
    deliveries: int,
    repetitions: int = REPETITIONS,
    plans: Path | None = None,
) -> list[Row]:
    """Fill a database of the run's own, time every operation, drop the database."""
    name = config.ledger_database_name
    await setup.admin(config, f'CREATE DATABASE "{name}"')
    try:
        await database.init(config.ledger_database_url)
        started = time.monotonic()
        counts = await ledger_fill.fill(
            config.ledger_database_url, deliveries, f"{config.run}-evt-"
        )
        filled = time.monotonic() - started
        db = await database.create_pool(config.ledger_database_url, 2)
        try:
            size = await db.fetchval("SELECT pg_size_pretty(pg_database_size(current_database()))")
            span = await db.fetchrow("SELECT min(created_at), max(created_at) FROM deliveries")
            assert span is not None
            start, end = span
            rows = [
                Row(
                    NAME,
                    "fill",
                    f"{filled:.0f} s",
                    note=f"{counts['deliveries']:,} deliveries, {counts['attempts']:,} attempts,"
                    f" {size} on disk",
                )
            ]
            space = Space(deliveries, start, end)
            if plans is not None:
                await _plans(config.ledger_database_url, Space(deliveries, start, end), plans)
            for op, operation in operations(space).items():
                samples = await _timed(db, operation, repetitions)
                rows.append(_judged(op, samples))
            times, replayed = await _replay_times(db, config, space)
            row = _judged(f"bulk replay ({replayed:,} dead letters), each", times)
            rows.append(replace(row, note=f"{row.note}, {sum(times) / 1000:.1f} s in all"))
        finally:
            await db.close()
    finally:
        await setup.admin(config, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    return rows


def _judged(op: str, samples: list[float]) -> Row:
    worst = p99(samples)
    say(f"  {op}: p99 {worst:.1f} ms")
    return judged(
        NAME,
        f"{op}, p99",
        f"{worst:.1f} ms",
        f"< {TARGET_MS:.0f} ms",
        worst < TARGET_MS,
        note=f"p50 {sorted(samples)[len(samples) // 2]:.1f} ms, {len(samples)} runs",
    )


async def run(bench: Bench) -> list[Row]:
    deliveries = bench.options.events or DEFAULT_DELIVERIES
    plans = None if bench.options.plans is None else Path(bench.options.plans)
    return await measure(bench.config, deliveries, plans=plans)
