"""Ingest: events accepted per second by `POST /v1/events`, recorded against Redis-only.

`postback serve` runs in a process of its own (`bench.ingest_service`) on the bench's Redis
and Postgres, with no worker. The bench posts from 127.0.0.1, `CLIENTS` requests in flight,
batches of `BATCH` events and single events, to two handlers of that one service:

- recorded: the real `POST /v1/events`, which writes the batch to the ledger (one
  statement) and then enqueues it: a 202 means the events are in Postgres;
- Redis-only: the handler as it was before it recorded events, validating and enqueueing,
  mounted beside it. The same server, middlewares and connections serve both, so the
  difference is the record (and a token check the bench route skips, a comparison of two
  empty strings).

Each run's events are new; after each, the ledger and the queue are checked (every event
recorded and queued, or queued and not recorded) and emptied. The two handlers alternate,
`ROUNDS` times, and the medians are compared. No target: the ratio is the cost of the
guarantee.
"""

from __future__ import annotations

import asyncio
import json
import socket
import statistics
import sys
import time
from collections.abc import Sequence

import aiohttp
import asyncpg
import redis.asyncio

from bench import events, setup
from bench.config import BenchConfig
from bench.context import Bench
from bench.ingest_service import READY, REDIS_ONLY_PATH
from bench.progress import say
from bench.results import InvalidMeasurement, Row
from bench.scenarios.common import AFFILIATES
from bench.workers import worker_env
from producer import Event
from producer.queue import queue_depth

NAME = "ingest"
DEFAULT_EVENTS = 20_000
"""Events per run in batches; runs of single events send a fifth as many."""
SINGLES_SHARE = 5
BATCH = 100
CLIENTS = 8
"""Requests in flight at once, as an order system with a few processes sends them."""
ROUNDS = 3
START_TIMEOUT = 30.0

PATHS = {"recorded": "/v1/events", "Redis-only": REDIS_ONLY_PATH}
SHAPES = {f"batches of {BATCH}": BATCH, "single events": 1}


def _bodies(batch: Sequence[Event], size: int) -> list[bytes]:
    return [
        json.dumps(
            [e.to_json() for e in batch[i : i + size]] if size > 1 else batch[i].to_json()
        ).encode()
        for i in range(0, len(batch), size)
    ]


async def _post_all(http: aiohttp.ClientSession, url: str, bodies: list[bytes]) -> float:
    """Seconds from the first request to the last answer; every answer must be a 202."""
    limit = asyncio.Semaphore(CLIENTS)
    refused: list[str] = []

    async def post(body: bytes) -> None:
        async with (
            limit,
            http.post(url, data=body, headers={"Content-Type": "application/json"}) as answer,
        ):
            if answer.status != 202:
                refused.append(f"{answer.status} {await answer.text()}")

    started = time.monotonic()
    await asyncio.gather(*(post(body) for body in bodies))
    took = time.monotonic() - started
    if refused:
        raise InvalidMeasurement(f"{len(refused)} requests not accepted, first: {refused[0]}")
    return took


async def _check_and_empty(
    db: asyncpg.Connection,
    client: redis.asyncio.Redis,
    config: BenchConfig,
    queue: str,
    count: int,
    recorded: bool,
) -> None:
    """Every event queued, and recorded when the handler records: else the rate is a lie."""
    depth = await queue_depth(client, queue)
    rows = await db.fetchval("SELECT count(*) FROM deliveries WHERE state = 'accepted'")
    if depth.due + depth.later != count or rows != (count if recorded else 0):
        raise InvalidMeasurement(
            f"{count} events posted; {depth.due + depth.later} queued, {rows} recorded"
        )
    await setup.forget_redis_keys(client, config)
    await db.execute("TRUNCATE deliveries, attempts, actions")


async def _started(service: asyncio.subprocess.Process) -> None:
    """Once the service says it listens; its log lines (stdout too) are read and dropped
    meanwhile, and afterwards, so its pipe never fills."""
    assert service.stdout is not None
    stdout = service.stdout
    try:
        async with asyncio.timeout(START_TIMEOUT):
            while (line := await stdout.readline()) and line.decode().strip() != READY:
                pass
    except TimeoutError:
        raise RuntimeError(f"the ingest service did not start in {START_TIMEOUT:.0f} s") from None
    if not line:
        raise RuntimeError("the ingest service exited before it listened")

    async def drop() -> None:
        while await stdout.readline():
            pass

    _readers.add(asyncio.create_task(drop()))


_readers: set[asyncio.Task[None]] = set()
"""Kept referenced until they end, with their service's output."""


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


async def measure(
    config: BenchConfig, database_url: str, count: int, rounds: int = ROUNDS
) -> list[Row]:
    """Start the service, time each handler and shape `rounds` times, stop it."""
    queue = config.queue_name(NAME)
    env = {**worker_env(config, queue), "POSTBACK_DATABASE_URL": database_url}
    port = _free_port()
    service = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "bench.ingest_service", str(port),
        env=env, stdout=asyncio.subprocess.PIPE, stdin=asyncio.subprocess.DEVNULL,
    )  # fmt: skip
    rates: dict[tuple[str, str], list[float]] = {
        (path, shape): [] for path in PATHS for shape in SHAPES
    }
    try:
        await _started(service)
        db = await asyncpg.connect(database_url)
        client = redis.asyncio.Redis.from_url(config.redis_url)
        try:
            async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=CLIENTS)) as http:
                for round_ in range(rounds):
                    # Alternated, so neither handler always runs on a warmer machine.
                    order = list(PATHS) if round_ % 2 == 0 else list(reversed(PATHS))
                    for shape, size in SHAPES.items():
                        n = count if size > 1 else count // SINGLES_SHARE
                        for handler in order:
                            label = f"{NAME}-{round_}-{size}-{handler[0]}"
                            batch = events.spread(config, label, n, AFFILIATES)
                            url = f"http://127.0.0.1:{port}{PATHS[handler]}"
                            took = await _post_all(http, url, _bodies(batch, size))
                            await _check_and_empty(
                                db, client, config, queue, n, handler == "recorded"
                            )
                            rates[handler, shape].append(n / took)
                            say(f"  {handler}, {shape}: {n / took:,.0f} events/s")
        finally:
            await client.aclose()
            await db.close()
    finally:
        if service.returncode is None:
            service.terminate()
        await service.wait()
    return _rows(rates, count)


def _rows(rates: dict[tuple[str, str], list[float]], count: int) -> list[Row]:
    rows = []
    for shape, size in SHAPES.items():
        n = count if size > 1 else count // SINGLES_SHARE
        median = {h: statistics.median(rates[h, shape]) for h in PATHS}
        runs = len(rates["recorded", shape])
        for handler in PATHS:
            rows.append(
                Row(
                    NAME,
                    f"{handler}, {shape}",
                    f"{median[handler]:,.0f} events/s",
                    note=f"median of {runs} runs of {n:,} events, {CLIENTS} requests in flight",
                )
            )
        ratio = median["recorded"] / median["Redis-only"]
        rows.append(
            Row(NAME, f"recorded / Redis-only, {shape}", f"{ratio:.2f}", note="the record's cost")
        )
    return rows


async def run(bench: Bench) -> list[Row]:
    count = bench.options.events or DEFAULT_EVENTS
    return await measure(bench.config, bench.config.database_url, count)
