"""The bench's own Postgres database and Redis keys: made, filled with callbacks, emptied,
and removed.

The database is created fresh and dropped at the end, so a run never touches anyone's data
and leaves nothing behind. Redis is shared, so the bench works in its own database number and
deletes only keys holding its run id (every key arq and the relay derive from the bench's
queue names and event ids holds it).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import asyncpg
import redis.asyncio

from bench.config import ALLOW_NETWORKS, BenchConfig
from worker import address, callbacks, database

DELETE_CHUNK = 1000
"""Keys per DEL: a 100,000-event run leaves that many job keys to remove."""

# Every variable kind the relay renders (order fields, event fields, link parts), so a
# delivery does the work a real callback does; `t` carries the enqueue time for latency.
TEMPLATE_QUERY = (
    "order={{order.number}}&amount={{order.amount}}&commission={{order.commission}}"
    "&currency={{order.currency}}&event={{event.id}}&sub={{link.sub_id}}&t={{link.query.t}}"
)


async def admin(config: BenchConfig, sql: str) -> None:
    """One statement on the admin connection: creating and dropping the run's databases."""
    conn = await asyncpg.connect(config.admin_url)
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


async def create_database(config: BenchConfig) -> None:
    """A new, empty database with the relay's schema, applied by the relay itself."""
    await admin(config, f'CREATE DATABASE "{config.database_name}"')
    await database.init(config.database_url)


async def drop_database(config: BenchConfig) -> None:
    """FORCE: a worker the bench could not stop must not keep the database alive."""
    await admin(config, f'DROP DATABASE IF EXISTS "{config.database_name}" WITH (FORCE)')


async def empty_ledger(conn: asyncpg.Connection) -> None:
    """Each scenario starts on empty tables, so one's rows never slow or skew the next."""
    await conn.execute(
        "TRUNCATE callbacks, callback_health, deliveries, attempts, actions, test_fires,"
        " notifications"
    )


def template(base_url: str, affiliate: str) -> str:
    return f"{base_url}/{affiliate}/pb?{TEMPLATE_QUERY}"


async def save_callbacks(conn: asyncpg.Connection, urls: Mapping[str, str]) -> None:
    """A GET order.created callback per affiliate, pointing at `urls[affiliate]` (a base
    URL), validated and saved as `postback callbacks set` does."""
    allowed = address.parse_networks(ALLOW_NETWORKS)
    for affiliate, base_url in urls.items():
        spec = callbacks.validate(
            affiliate, "order.created", "GET", template(base_url, affiliate), allowed=allowed
        )
        await callbacks.save(conn, spec)


async def ledger_states(
    conn: asyncpg.Connection, affiliates: Iterable[str] | None = None
) -> dict[str, int]:
    """How many deliveries are in each state, for the given affiliates or all."""
    if affiliates is None:
        rows = await conn.fetch("SELECT state, count(*) AS n FROM deliveries GROUP BY state")
    else:
        rows = await conn.fetch(
            "SELECT state, count(*) AS n FROM deliveries WHERE affiliate_id = ANY($1::text[])"
            " GROUP BY state",
            list(affiliates),
        )
    return {row["state"]: row["n"] for row in rows}


async def delivered(conn: asyncpg.Connection, affiliates: Iterable[str]) -> int:
    return (await ledger_states(conn, affiliates)).get("delivered", 0)


async def forget_redis_keys(client: redis.asyncio.Redis, config: BenchConfig) -> int:
    """Delete every key of this run (and only those); returns how many."""
    return await delete_matching(client, f"*{config.run}*")


async def delete_matching(client: redis.asyncio.Redis, pattern: str) -> int:
    """Delete every key matching `pattern`, a chunk at a time; returns how many."""
    deleted = 0
    chunk: list[bytes] = []
    async for key in client.scan_iter(match=pattern, count=DELETE_CHUNK):
        chunk.append(key)
        if len(chunk) >= DELETE_CHUNK:
            deleted += await client.delete(*chunk)
            chunk.clear()
    if chunk:
        deleted += await client.delete(*chunk)
    return deleted
