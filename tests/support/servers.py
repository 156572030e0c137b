"""The test run's Postgres and Redis: which ones (tests/conftest.py's docstring says how they
are chosen), and the run's own names on them.

Nothing here looks for a server when imported: the choice is made once the tests to run
are known, and only if one of them needs a server, so the tests that need none
(`pytest -m unit`) run where there is none.
"""

from __future__ import annotations

import functools
import os
import socket
import uuid
from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from urllib.parse import urlsplit

import asyncpg
import redis.asyncio

RUN = uuid.uuid4().hex[:10]
"""The run's own id, in its database's name, its queue's name and its event ids, so that it
finds and deletes what it wrote."""

REDIS_DB = int(os.environ.get("POSTBACK_TEST_REDIS_DB", "15"))
SERVERS = os.environ.get("POSTBACK_TEST_SERVERS", "auto")
POSTGRES_DEFAULT = "postgresql://postgres@127.0.0.1:5432/postgres"
REDIS_DEFAULT = "redis://127.0.0.1:6379"

SERVER_FIXTURES = frozenset({"admin_url", "redis_base_url"})
"""The fixtures every use of a server goes through (tests/conftest.py): a test whose
fixtures lead to neither needs no server."""


def needs_servers(fixturenames: Iterable[str]) -> bool:
    """Whether a test with these fixtures (all of them, as pytest resolves them) uses a
    server."""
    return not SERVER_FIXTURES.isdisjoint(fixturenames)


@dataclass(frozen=True)
class Server:
    """Which server of one kind the run uses: `url`, or an embedded one when it is None."""

    kind: str
    url: str | None
    why: str


@functools.cache
def chosen_servers() -> tuple[Server, Server]:
    """Postgres and Redis, each: configured, else running on its port, else embedded.
    Decided once per run, when first asked."""
    return (
        _choose("Postgres", "POSTBACK_TEST_ADMIN_URL", POSTGRES_DEFAULT, 5432),
        _choose("Redis", "POSTBACK_TEST_REDIS_URL", REDIS_DEFAULT, 6379),
    )


def _choose(kind: str, variable: str, default: str, port: int) -> Server:
    if SERVERS == "embedded":
        return Server(kind, None, "embedded (POSTBACK_TEST_SERVERS=embedded)")
    if configured := os.environ.get(variable):
        return Server(kind, configured, f"from {variable}")
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return Server(kind, default, f"on 127.0.0.1:{port}")
    except OSError:
        return Server(kind, None, f"embedded (nothing on 127.0.0.1:{port})")


def servers_line() -> str:
    """The line the run prints to say which servers it uses."""
    return "test servers: " + ", ".join(
        f"{server.kind} {server.why}" for server in chosen_servers()
    )


def database_at(url: str, name: str) -> str:
    """`url` with database `name`; its host, a name or a socket folder (?host=), kept."""
    return urlsplit(url)._replace(path=f"/{name}").geturl()


def database_name(url: str) -> str:
    return urlsplit(url).path.lstrip("/")


def with_options(url: str, **options: object) -> str:
    """`url` with query parameters added (asyncpg takes the ones it does not know as
    server settings, e.g. lock_timeout)."""
    added = "&".join(f"{name}={value}" for name, value in options.items())
    return f"{url}{'&' if urlsplit(url).query else '?'}{added}"


@asynccontextmanager
async def scratch_database(admin_url: str, label: str) -> AsyncIterator[str]:
    """The URL of an empty database of its own, dropped (whatever holds it open) after."""
    name = f"postback_test_{RUN}_{label}_{uuid.uuid4().hex[:8]}"
    admin = await asyncpg.connect(admin_url)
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
        try:
            yield database_at(admin_url, name)
        finally:
            await admin.execute(f'DROP DATABASE "{name}" WITH (FORCE)')
    finally:
        await admin.close()


async def forget_redis_keys(redis_url: str, queue_name: str) -> None:
    """Delete the run's queue, its jobs and its metrics (event ids and queue name hold RUN)."""
    client = redis.asyncio.Redis.from_url(redis_url)
    try:
        keys = [key async for key in client.scan_iter(match=f"*{RUN}*")]
        await client.delete(queue_name, *keys)
    finally:
        await client.aclose()
