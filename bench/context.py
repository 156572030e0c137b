"""Everything a scenario works with, set up once per run and torn down in every case.

Teardown runs in reverse order of setup whatever happened: workers killed, the run's Redis
keys deleted, the database dropped (WITH (FORCE)), the receiver stopped. Between scenarios
`tidy` puts the shared pieces back to empty, so each scenario is measured alone.
"""

from __future__ import annotations

import contextlib
import tempfile
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import asyncpg
import redis.asyncio

from bench import setup
from bench.config import BenchConfig, Options
from bench.progress import say
from bench.receiver_client import ReceiverClient, running_receiver
from bench.workers import Supervisor
from worker import database


@dataclass
class Bench:
    config: BenchConfig
    options: Options
    db: asyncpg.Connection
    redis: redis.asyncio.Redis
    receiver: ReceiverClient
    workers: Supervisor

    async def tidy(self) -> None:
        """Back to empty: no workers, no keys of this run, an empty ledger, counts at zero."""
        await self.workers.kill_all()
        deleted = await setup.forget_redis_keys(self.redis, self.config)
        if deleted:
            say(f"  deleted {deleted:,} Redis keys the scenario left (deferred or undrained jobs)")
        await setup.empty_ledger(self.db)
        await self.receiver.reset()


@contextlib.asynccontextmanager
async def open_bench(config: BenchConfig, options: Options) -> AsyncIterator[Bench]:
    async with contextlib.AsyncExitStack() as stack:
        log_dir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="postback-bench-")))

        say(f"creating database {config.database_name}")
        # Registered first, so it runs last: after every worker using it is gone.
        stack.push_async_callback(_drop_database, config)
        await setup.create_database(config)
        db = await database.connect(config.database_url)
        stack.push_async_callback(db.close)

        client = redis.asyncio.Redis.from_url(config.redis_url)
        stack.push_async_callback(client.aclose)
        await client.ping()
        stack.push_async_callback(_forget_keys, client, config)

        say("starting the receiver")
        receiver = await stack.enter_async_context(running_receiver())

        workers = Supervisor(config, log_dir)
        stack.push_async_callback(workers.kill_all)
        yield Bench(config, options, db, client, receiver, workers)


async def _drop_database(config: BenchConfig) -> None:
    say(f"dropping database {config.database_name}")
    await setup.drop_database(config)


async def _forget_keys(client: redis.asyncio.Redis, config: BenchConfig) -> None:
    deleted = await setup.forget_redis_keys(client, config)
    say(f"deleted {deleted:,} Redis keys of run {config.run} (db {config.redis_db})")
