"""The prune scenario of the bench, run small: each round fills the ledger, measures the
runs without and with pruning, prunes every filled delivery while deliveries flow, and
leaves no database or Redis key behind."""

from __future__ import annotations

import asyncpg
import redis.asyncio

from bench.config import BenchConfig, Options
from bench.context import open_bench
from bench.scenarios import prune
from bench.table import table
from tests.support import servers

DELIVERIES = 20_000
WINDOW = 10.0
ROUNDS = 2


async def test_each_round_prunes_the_filled_ledger_while_deliveries_flow(
    admin_url: str, redis_base_url: str
) -> None:
    config = BenchConfig(admin_url=admin_url, redis_base=redis_base_url, redis_db=servers.REDIS_DB)
    own = prune.prune_config(config)
    async with open_bench(config, Options()) as bench:
        rounds = await prune.measure(bench, DELIVERIES, window=WINDOW, rounds=ROUNDS)

    assert len(rounds) == ROUNDS
    for done in rounds:
        # Settled only: a worker's sweep would send open ones to the fill's made-up hosts.
        assert done.filled["deliveries"] == DELIVERIES
        assert 1.9 * DELIVERIES < done.filled["attempts"] < 2.1 * DELIVERIES
        assert done.pruning.finished
        assert done.pruning.left == 0
        assert done.pruning.deliveries == DELIVERIES
        assert done.pruning.attempts == done.filled["attempts"]
        for run in (done.without, done.with_pruning):
            assert run.seconds >= WINDOW
            # A second's events at a time, at 200/s, for the window at least.
            assert run.events % round(prune.RATE) == 0
            assert run.events >= prune.RATE * WINDOW
            assert 0 < run.latency.p50 <= run.latency.p95 <= run.latency.p99
        # The run with pruning lasts until the prune has exited.
        assert done.with_pruning.seconds >= done.pruning.seconds - 1.0
        assert done.ratio == done.with_pruning.latency.p99 / done.without.latency.p99

    rows = prune.rows(rounds)
    assert [row.metric for row in rows[:5]] == [
        "round 1: fill",
        "round 1: without pruning, p50 / p95 / p99",
        "round 1: with pruning, p50 / p95 / p99",
        "round 1: prune",
        "round 1: p99 with / without pruning",
    ]
    assert len(rows) == 5 * ROUNDS
    assert rows[3].note == (
        f"{DELIVERIES:,} deliveries and {rounds[0].pruning.attempts:,} attempts deleted while"
        " 200 events/s flowed; finished"
    )
    ratio = rows[4]
    assert ratio.value == f"{rounds[0].ratio:.2f}"
    assert ratio.target == "<= 2"
    assert ratio.status == ("PASS" if rounds[0].ratio <= 2.0 else "FAIL")
    assert "prune     round 2: p99 with / without pruning" in table(rows)

    conn = await asyncpg.connect(admin_url)
    try:
        left = await conn.fetchval(
            "SELECT count(*) FROM pg_database WHERE datname = ANY($1::text[])",
            [own.database_name, config.database_name],
        )
    finally:
        await conn.close()
    assert left == 0
    client = redis.asyncio.Redis.from_url(config.redis_url)
    try:
        keys = [key async for key in client.scan_iter(match="*", count=1000)]
    finally:
        await client.aclose()
    assert [key for key in keys if config.run.encode() in key] == []
