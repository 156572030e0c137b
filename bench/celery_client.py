"""The bench's side of the Celery peer (bench/celery_peer.py): its database, its tasks, its
Redis keys.

Its Postgres database (`postback_bench_<run id>_peer`, one table) is created for the run and
dropped at its end (`WITH (FORCE)`); its broker is a Redis database number of its own
(POSTBACK_BENCH_PEER_REDIS_DB, 13 by default), where every key it makes starts with the
run's prefix and only those are deleted.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence

import asyncpg
import redis.asyncio

from bench import celery_peer
from bench.config import BenchConfig
from bench.setup import admin, delete_matching
from producer import Event


def queue_name(config: BenchConfig) -> str:
    return f"postback-bench-{config.run}-peer"


def worker_env(config: BenchConfig) -> dict[str, str]:
    """What the peer's worker reads (celery_peer.ENV)."""
    return {
        celery_peer.ENV["broker"]: config.peer_redis_url,
        celery_peer.ENV["prefix"]: config.peer_key_prefix,
        celery_peer.ENV["queue"]: queue_name(config),
        celery_peer.ENV["database"]: config.peer_database_url,
    }


async def create_database(config: BenchConfig) -> None:
    await admin(config, f'CREATE DATABASE "{config.peer_database_name}"')
    conn = await asyncpg.connect(config.peer_database_url)
    try:
        await conn.execute(celery_peer.SCHEMA)
    finally:
        await conn.close()


async def drop_database(config: BenchConfig) -> None:
    await admin(config, f'DROP DATABASE IF EXISTS "{config.peer_database_name}" WITH (FORCE)')


async def attempts(config: BenchConfig) -> tuple[int, int]:
    """Rows in the peer's log: (all, those with a 2xx status)."""
    conn = await asyncpg.connect(config.peer_database_url)
    try:
        row = await conn.fetchrow(
            "SELECT count(*) AS n, count(*) FILTER (WHERE status BETWEEN 200 AND 299) AS ok"
            " FROM attempts"
        )
    finally:
        await conn.close()
    assert row is not None
    return row["n"], row["ok"]


def _send(config: BenchConfig, tasks: Sequence[tuple[str, Event]]) -> None:
    app = celery_peer.make_app(config.peer_redis_url, config.peer_key_prefix, queue_name(config))
    try:
        with app.producer_or_acquire() as producer:
            for base_url, event in tasks:
                app.send_task(
                    celery_peer.TASK_NAME, args=(base_url, event.to_json()), producer=producer
                )
    finally:
        app.close()


async def enqueue(config: BenchConfig, tasks: Sequence[tuple[str, Event]]) -> float:
    """Send one task per (receiver base URL, event), as Celery's own client does (in a
    thread: it blocks); returns the seconds it took."""
    started = time.monotonic()
    await asyncio.to_thread(_send, config, tasks)
    return time.monotonic() - started


async def forget_keys(config: BenchConfig) -> int:
    """Delete every key of the peer in this run (and only those); returns how many."""
    client = redis.asyncio.Redis.from_url(config.peer_redis_url)
    try:
        return await delete_matching(client, f"{config.peer_key_prefix}*")
    finally:
        await client.aclose()
