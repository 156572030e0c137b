"""The ledger scenario of the bench, run small: every operation it promises is timed and
judged, the plans of each are written, and its database and Redis keys are gone
afterwards."""

from __future__ import annotations

import re
from datetime import UTC, datetime
from pathlib import Path

import asyncpg
import pytest
import redis.asyncio

from bench.config import BenchConfig
from bench.scenarios import ledger
from bench.table import table
from tests.support import servers

DELIVERIES = 50_000


@pytest.fixture
def config(admin_url: str, redis_base_url: str) -> BenchConfig:
    return BenchConfig(admin_url=admin_url, redis_base=redis_base_url, redis_db=servers.REDIS_DB)


async def test_every_operation_is_timed_against_the_filled_ledger(
    config: BenchConfig, admin_url: str, tmp_path: Path
) -> None:
    plans = tmp_path / "plans.txt"
    rows = await ledger.measure(config, DELIVERIES, repetitions=5, plans=plans)

    fill, *timed = rows
    assert fill.metric == "fill"
    assert fill.note.startswith(f"{DELIVERIES:,} deliveries, ")
    attempts = int(fill.note.split(", ")[1].split()[0].replace(",", ""))
    assert 1.9 * DELIVERIES < attempts < 2.1 * DELIVERIES

    now = datetime.now(UTC)
    names = [*ledger.operations(ledger.Space(DELIVERIES, now, now)), "bulk replay"]
    assert len(timed) == len(names)
    for row, name in zip(timed, names, strict=True):
        assert row.metric.startswith(name), (row.metric, name)
        assert row.metric.endswith(", p99")
        assert row.status in ("PASS", "FAIL")
        assert row.target == "< 50 ms"
        assert float(row.value.removesuffix(" ms")) > 0
    replay = timed[-1]
    replayed = re.fullmatch(r"bulk replay \(([\d,]+) dead letters\), each, p99", replay.metric)
    assert replayed is not None, replay.metric
    assert int(replayed[1].replace(",", "")) > 900  # 2% of the deliveries are dead
    assert replay.note.endswith(" s in all")
    assert "ledger    list error_class, deep page, p99" in table(rows)

    written = plans.read_text()
    for name in names[:-1]:
        section = written.split(f"==== {name}\n", 1)[1].split("\n==== ", 1)[0]
        assert "Query Text:" in section, name
        assert "Buffers:" in section, name

    conn = await asyncpg.connect(admin_url)
    try:
        left = await conn.fetchval(
            "SELECT count(*) FROM pg_database WHERE datname = $1", config.ledger_database_name
        )
    finally:
        await conn.close()
    assert left == 0
    # Nor any Redis key of the run: the jobs the bulk replay enqueued included.
    client = redis.asyncio.Redis.from_url(config.redis_url)
    try:
        keys = [key async for key in client.scan_iter(match="*", count=1000)]
    finally:
        await client.aclose()
    assert [key for key in keys if config.run.encode() in key or b"evt-" in key] == []
