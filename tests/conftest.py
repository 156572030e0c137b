"""Fixtures on real servers: a Postgres database and a Redis queue of the test run's own.

The database is created for the run and dropped after it. Redis is shared, so the run uses
its own database number (POSTBACK_TEST_REDIS_DB, default 15) and its own queue name, and
deletes only the keys it wrote.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import asyncpg
import pytest
import redis.asyncio
from aiohttp import web
from pydantic import SecretStr

from ops.demo import serve
from ops.service import create_app
from producer.publish import Producer
from tests import leakcheck
from worker import address, callbacks, database
from worker.config import Settings
from worker.pool import create_worker

pytest_plugins = ["tests.leakcheck"]

ADMIN_URL = os.environ.get(
    "POSTBACK_TEST_ADMIN_URL", "postgresql://postgres@127.0.0.1:5432/postgres"
)
REDIS_BASE = os.environ.get("POSTBACK_TEST_REDIS_URL", "redis://127.0.0.1:6379")
REDIS_DB = int(os.environ.get("POSTBACK_TEST_REDIS_DB", "15"))
RUN = uuid.uuid4().hex[:10]
ALLOW_NETWORKS = "127.0.0.1/32"


@pytest.fixture(scope="session")
def database_url() -> Iterator[str]:
    name = f"postback_test_{RUN}"

    async def admin(sql: str) -> None:
        conn = await asyncpg.connect(ADMIN_URL)
        try:
            await conn.execute(sql)
        finally:
            await conn.close()

    asyncio.run(admin(f'CREATE DATABASE "{name}"'))
    url = ADMIN_URL.rsplit("/", 1)[0] + f"/{name}"

    asyncio.run(database.init(url))
    yield url
    asyncio.run(admin(f'DROP DATABASE "{name}" WITH (FORCE)'))


@pytest.fixture(scope="session")
def redis_url() -> str:
    return f"{REDIS_BASE}/{REDIS_DB}"


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
