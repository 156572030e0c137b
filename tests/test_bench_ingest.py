"""The ingest scenario of the bench, run small: both handlers and both shapes are timed,
every run is checked (recorded and queued, or queued only), and nothing of the run is left
in Redis or in the ledger afterwards."""

from __future__ import annotations

import asyncpg
import pytest
import redis.asyncio

from bench.config import BenchConfig
from bench.scenarios import ingest
from bench.table import table
from tests.support import servers

EVENTS = 500


@pytest.fixture
def config(admin_url: str, redis_base_url: str) -> BenchConfig:
    return BenchConfig(admin_url=admin_url, redis_base=redis_base_url, redis_db=servers.REDIS_DB)


async def test_recorded_and_redis_only_ingest_are_timed_and_compared(
    config: BenchConfig, database_url: str, db: asyncpg.Connection
) -> None:
    rows = await ingest.measure(config, database_url, EVENTS, rounds=1)

    assert [row.metric for row in rows] == [
        "recorded, batches of 100",
        "Redis-only, batches of 100",
        "recorded / Redis-only, batches of 100",
        "recorded, single events",
        "Redis-only, single events",
        "recorded / Redis-only, single events",
    ]
    for row in rows:
        assert row.status == "INFO"
        if "/" in row.metric:
            assert float(row.value) > 0
        else:
            assert float(row.value.removesuffix(" events/s").replace(",", "")) > 0
    assert rows[0].note == "median of 1 runs of 500 events, 8 requests in flight"
    assert rows[3].note == "median of 1 runs of 100 events, 8 requests in flight"
    assert "ingest    recorded / Redis-only, single events" in table(rows)

    assert await db.fetchval("SELECT count(*) FROM deliveries") == 0
    client = redis.asyncio.Redis.from_url(config.redis_url)
    try:
        keys = [key async for key in client.scan_iter(match=f"*{config.run}*", count=1000)]
    finally:
        await client.aclose()
    assert keys == []
