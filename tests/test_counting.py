"""The delivery counters: counted in the worker's memory, written to Redis at most once a
second and when the worker stops, kept through a Redis outage (worker/metrics.py, `Tally`
and `Flusher`).
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import signal
import time
from collections.abc import AsyncIterator, Awaitable, MutableMapping
from pathlib import Path
from typing import Any, cast

import asyncpg
import pytest
import structlog.testing
from aiohttp import web
from redis.asyncio import Redis
from redis.asyncio.connection import parse_url

from ops.cli.demo import serve
from producer import Producer
from producer.connection import open_redis
from producer.queue import metrics_keys
from tests.support.events import events, publish, save_callback
from tests.support.proxy import Proxy
from tests.support.receivers import Receiver, raw_server
from tests.support.wait import until
from tests.support.workers import running_worker, worker_process, worker_settings
from worker import metrics
from worker.config import Settings
from worker.metrics import Flusher, Increment, Tally

# --- the tally, without servers ----------------------------------------------------------


def _pending(tally: Tally) -> dict[tuple[str, str], float]:
    return {(i.hash, i.field): i.amount for i in tally.drain()}


@pytest.mark.unit
def test_a_tally_counts_in_the_layout_the_scrape_reads() -> None:
    """The same hashes and fields the workers wrote one attempt at a time before, so
    `/metrics` and the dashboard read the same thing."""
    tally = Tally()
    assert not inspect.iscoroutinefunction(tally.count)  # nothing to wait for on a delivery
    tally.count("ann", attempt=("delivered", 0.004), settled="delivered")
    tally.count("bob", attempt=("retrying", 0.3))
    tally.count("bob", attempt=("dead", 45.0), settled="dead", circuit="opened")
    tally.count("carol", settled="skipped")
    tally.count("ann", deferred="at_cap")
    tally.count("ann", deferred="at_cap")
    got = _pending(tally)
    assert got.pop(("counters", "duration:sum")) == pytest.approx(45.304)
    assert got == {
        ("counters", "attempts:delivered"): 1,
        ("counters", "attempts:retrying"): 1,
        ("counters", "attempts:dead"): 1,
        ("counters", "duration:0.005"): 1,
        ("counters", "duration:0.5"): 1,
        ("counters", "duration:+Inf"): 1,
        ("counters", "deliveries:delivered"): 1,
        ("counters", "deliveries:dead"): 1,
        ("counters", "deliveries:skipped"): 1,
        ("counters", "deferred:at_cap"): 2,
        ("counters", "circuit:opened"): 1,
        ("failures", "bob"): 2,
    }
    # Every field the scrape reads is one a tally writes: `families` finds them all.
    assert {f for h, f in got if h == "counters"} <= _fields_read()


def _fields_read() -> set[str]:
    """The counter fields `/metrics` turns into samples."""
    return {
        *(f"deliveries:{o}" for o in ("delivered", "dead", "skipped")),
        *(f"attempts:{r}" for r in ("delivered", "retrying", "dead")),
        *(f"duration:{b!r}" for b in metrics.DURATION_BUCKETS),
        "duration:+Inf",
        "duration:sum",
        "deferred:at_cap",
        "deferred:circuit_open",
        "circuit:opened",
        "circuit:closed",
    }


@pytest.mark.unit
def test_the_sum_is_a_float_for_hincrbyfloat_and_the_counts_are_integers() -> None:
    tally = Tally()
    tally.count("ann", attempt=("delivered", 0))
    tally.count("ann", attempt=("delivered", 1))
    batch = {(i.hash, i.field): i.amount for i in tally.drain()}
    assert isinstance(batch[("counters", "duration:sum")], float)
    assert batch[("counters", "duration:sum")] == 1.0
    assert {type(amount) for key, amount in batch.items() if key[1] != "duration:sum"} == {int}


@pytest.mark.unit
def test_draining_empties_the_tally_and_restoring_adds_back_to_what_came_since() -> None:
    tally = Tally()
    tally.count("bob", attempt=("retrying", 0.25))
    batch = tally.drain()
    assert len(tally) == 0
    assert tally.drain() == []
    tally.count("bob", attempt=("retrying", 0.5), settled=None)
    tally.restore(batch)  # the flush of `batch` failed
    got = _pending(tally)
    assert got[("counters", "attempts:retrying")] == 2
    assert got[("counters", "duration:0.25")] == 1
    assert got[("counters", "duration:0.5")] == 1
    assert got[("counters", "duration:sum")] == pytest.approx(0.75)
    assert got[("failures", "bob")] == 2


@pytest.mark.unit
def test_a_tally_holds_at_most_max_fields_and_counts_what_it_dropped() -> None:
    """Counts add up in place; only new fields (affiliates failing while Redis is away)
    could grow it, and beyond the bound they are dropped, and said."""
    tally = Tally(max_fields=5)
    tally.count("a", attempt=("dead", 0.1), settled="dead")  # 5 fields
    tally.count("a", attempt=("dead", 0.1), settled="dead")  # the same 5: kept
    tally.count("b", attempt=("retrying", 0.1))  # 2 new fields dropped, 2 old ones kept
    assert len(tally) == 5
    assert tally.take_dropped() == 2
    assert tally.take_dropped() == 0
    got = _pending(tally)
    assert got[("failures", "a")] == 2
    assert ("failures", "b") not in got
    assert got[("counters", "duration:0.1")] == 3
    # A batch put back after a failed flush obeys the same bound.
    tally.count("c", settled="delivered")
    tally.restore([Increment("failures", f"x{n}", 1) for n in range(10)])
    assert len(tally) == 5
    assert tally.take_dropped() == 6


# --- a worker on a Redis of the test's own -----------------------------------------------


async def _calls(redis: Redis) -> dict[str, int]:
    """How many times each metric write command ran on the server so far."""
    stats = await redis.info("commandstats")
    return {
        command: int(stats.get(f"cmdstat_{command}", {}).get("calls", 0))
        for command in ("hincrby", "hincrbyfloat")
    }


async def _counters(redis: Redis, queue_name: str) -> dict[str, float]:
    return (await metrics.read_redis(redis, queue_name)).counters


async def _delivered(db: asyncpg.Connection, event_ids: list[str]) -> bool:
    n = await db.fetchval(
        "SELECT count(*) FROM deliveries WHERE event_id = ANY($1::text[]) AND state = 'delivered'",
        event_ids,
    )
    return bool(n == len(event_ids))


async def test_a_worker_writes_its_counts_once_a_second_not_once_a_delivery(
    db: asyncpg.Connection, settings: Settings, private_redis: str, receiver: Receiver
) -> None:
    """Many deliveries, a handful of writes: the private server's own command counts say
    how many times the worker wrote, and every delivery is counted within about a second
    of the ledger saying it was delivered."""
    total = 300
    own = settings.model_copy(update={"redis_url": private_redis})
    await save_callback(db, "ann", "order.created", "GET", receiver.url + "/pb?e={{event.id}}")
    batch = events("tally", total)
    event_ids = [data["id"] for data in batch]
    async with await Producer.connect(private_redis, own.queue_name) as producer:
        before = await _calls(producer.redis)
        async with running_worker(own):
            started = time.monotonic()
            await producer.publish_many(batch)
            delivered_at = await until(lambda: _delivered(db, event_ids), 60, "all delivered")

            async def all_counted() -> bool:
                counters = await _counters(producer.redis, own.queue_name)
                return counters.get("deliveries:delivered") == total

            counted_at = await until(all_counted, 3, "every delivery counted")
            during = await _calls(producer.redis)
        after = await _calls(producer.redis)
        counters = await _counters(producer.redis, own.queue_name)

    took = counted_at - started
    flushes = during["hincrbyfloat"] - before["hincrbyfloat"]  # each writes duration:sum once
    print(
        f"\n{total} deliveries in {delivered_at - started:.2f} s, all counted"
        f" {counted_at - delivered_at:.2f} s later, in {flushes} flushes"
        f" ({during['hincrby'] - before['hincrby']} HINCRBY)"
    )
    assert counted_at - delivered_at < 1.5
    assert 1 <= flushes <= took / metrics.FLUSH_SECONDS + 1
    assert flushes < total / 20
    # A flush is one HINCRBY per field it adds to, however many deliveries it holds.
    fields = len(_fields_read()) + 1  # and one affiliate's failures
    assert during["hincrby"] - before["hincrby"] <= flushes * fields
    # Counted exactly once each; stopping the worker had nothing left to write.
    assert after == during
    assert counters["attempts:delivered"] == total
    buckets = [f"duration:{b!r}" for b in metrics.DURATION_BUCKETS] + ["duration:+Inf"]
    assert sum(counters.get(bucket, 0) for bucket in buckets) == total
    assert len(receiver.requests) == total


# --- a worker process stopped with SIGTERM ----------------------------------------------


async def test_a_worker_stopped_by_sigterm_writes_what_its_last_deliveries_counted(
    db: asyncpg.Connection, producer: Producer, settings: Settings, tmp_path: Path
) -> None:
    """The deliveries in flight at SIGTERM finish after it, and are counted after it: the
    worker writes their counts on its way out, after its last job."""
    arrived: list[str] = []
    release = asyncio.Event()

    async def held(request: web.Request) -> web.Response:
        arrived.append(request.path_qs)
        await release.wait()
        return web.Response(text="ok")

    total = 5
    chosen = worker_settings(settings, shutdown_wait=10)
    async with serve(held) as url:
        await save_callback(db, "ann", "order.created", "GET", url + "/pb?e={{event.id}}")
        event_ids = await publish(producer, events("term-count", total))
        async with worker_process(chosen, tmp_path) as worker:
            await until(lambda: len(arrived) == total, 30, "all in flight")
            worker.signal(signal.SIGTERM)
            await asyncio.sleep(0.2)  # the signal handled: no new jobs, the rest may finish
            assert await _counters(producer.redis, settings.queue_name) == {}
            release.set()
            code = await worker.exited(within=chosen.shutdown_wait + 5)

    assert code == 0
    assert await _delivered(db, event_ids)
    counters = await _counters(producer.redis, settings.queue_name)
    assert counters["deliveries:delivered"] == total
    assert counters["attempts:delivered"] == total
    assert worker.errors() == []
    assert worker.events("metrics_not_counted") == []


# --- Redis away while flushing -----------------------------------------------------------


@contextlib.asynccontextmanager
async def redis_proxy(redis_url: str) -> AsyncIterator[Proxy]:
    target: dict[str, Any] = {"port": 6379, **parse_url(redis_url)}
    proxy = Proxy(target)
    async with raw_server(proxy.handle) as base:
        proxy.url = f"redis://{base.removeprefix('http://')}/{target.get('db', 0)}"
        yield proxy


@contextlib.asynccontextmanager
async def flushing(
    settings: Settings, proxy: Proxy, **timing: float
) -> AsyncIterator[tuple[Tally, Flusher]]:
    """A tally and its flusher writing through `proxy` on a client opened as the worker's
    is (no read timeout of its own); the flusher closed after the block."""
    client = open_redis(proxy.url, settings.queue_name, read_timeout=None)
    tally = Tally()
    flusher = Flusher(client, settings.queue_name, tally, **timing)
    flusher.start()
    try:
        yield tally, flusher
    finally:
        await flusher.close()
        await client.aclose()


def _events(logs: list[MutableMapping[str, Any]]) -> list[str]:
    return [entry["event"] for entry in logs if entry["event"].startswith("metrics_")]


async def test_counts_made_while_redis_is_down_are_written_once_it_is_back(
    producer: Producer, settings: Settings
) -> None:
    """Redis goes away between two flushes, and comes back: each flush meanwhile fails and
    keeps its counts, the outage is logged once, and the next flush after it writes them
    all, none lost and none twice."""
    queue_name = settings.queue_name
    assert settings.redis_url is not None

    async def counted(field: str, n: int) -> bool:
        return (await _counters(producer.redis, queue_name)).get(field) == n

    with structlog.testing.capture_logs() as logs:
        async with (
            redis_proxy(settings.redis_url) as proxy,
            flushing(settings, proxy, every=0.1) as (tally, _),
        ):
            tally.count("ann", attempt=("delivered", 0.02), settled="delivered")
            await until(lambda: counted("deliveries:delivered", 1), 5, "the first flush")
            proxy.cut()
            for _ in range(3):
                tally.count("bob", attempt=("retrying", 0.25))
            tally.count("ann", attempt=("delivered", 0.02), settled="delivered")
            await until(lambda: "metrics_not_counted" in _events(logs), 5, "a failed flush")
            tally.count("ann", attempt=("delivered", 0.02), settled="delivered")
            await asyncio.sleep(0.5)  # a few more flushes fail meanwhile
            assert (await _counters(producer.redis, queue_name))["deliveries:delivered"] == 1
            proxy.mend()
            await until(lambda: counted("deliveries:delivered", 3), 5, "the counts written")

    read = await metrics.read_redis(producer.redis, queue_name)
    assert read.counters["attempts:delivered"] == 3
    assert read.counters["attempts:retrying"] == 3
    assert read.counters["duration:0.025"] == 3
    assert read.counters["duration:0.25"] == 3
    assert read.counters["duration:sum"] == pytest.approx(0.81)
    assert read.failures == {"bob": 3}
    assert _events(logs) == ["metrics_not_counted", "metrics_counted_again"]
    [lost] = [entry for entry in logs if entry["event"] == "metrics_not_counted"]
    assert lost["log_level"] == "warning"
    assert lost["kept"] is True
    assert "Connection" in lost["error"]


async def test_a_hung_redis_holds_a_flush_for_its_limit_and_a_stop_says_what_was_lost(
    producer: Producer, settings: Settings
) -> None:
    """Redis takes the pipeline and never answers: the flush gives up after `within`,
    keeping its counts; a worker stopping then waits no longer, and logs the loss."""
    assert settings.redis_url is not None
    with structlog.testing.capture_logs() as logs:
        async with (
            redis_proxy(settings.redis_url) as proxy,
            flushing(settings, proxy, every=0.05, within=0.3) as (tally, _),
        ):
            proxy.go_silent()
            tally.count("ann", attempt=("delivered", 0.02), settled="delivered")
            await until(lambda: "metrics_not_counted" in _events(logs), 5, "a flush given up")
            stopping = time.monotonic()
        stopped_in = time.monotonic() - stopping

    assert stopped_in < 1.5  # a flush under way (0.3 s at most), then the last (as long)
    assert await _counters(producer.redis, settings.queue_name) == {}
    said = {entry["event"]: entry for entry in logs if entry["event"].startswith("metrics_")}
    assert said.keys() == {"metrics_not_counted", "metrics_lost"}
    assert said["metrics_not_counted"]["error"] == "no answer within 0.3 s"
    assert said["metrics_lost"]["fields"] == 4
    assert said["metrics_lost"]["log_level"] == "warning"


async def test_a_field_redis_refuses_is_kept_and_the_rest_is_not_written_twice(
    producer: Producer, settings: Settings
) -> None:
    """The counters' key holds a string, so Redis refuses every HINCRBY on it (WRONGTYPE)
    while the failures hash takes its own: only what was refused is kept for the next
    flush, so the failure is not counted twice once the key is fixed."""
    keys = metrics_keys(settings.queue_name)
    await producer.redis.set(keys.counters, "not a hash")
    tally = Tally()
    flusher = Flusher(producer.redis, settings.queue_name, tally)
    tally.count("bob", attempt=("retrying", 0.3))
    with structlog.testing.capture_logs() as logs:
        assert await flusher.flush() is False
        assert len(tally) == 3  # attempts:retrying, duration:0.5, duration:sum
        failures = producer.redis.hgetall(keys.failures)
        assert await cast(Awaitable[dict[bytes, bytes]], failures) == {b"bob": b"1"}
        await producer.redis.delete(keys.counters)
        assert await flusher.flush() is True
    read = await metrics.read_redis(producer.redis, settings.queue_name)
    assert read.failures == {"bob": 1}
    assert read.counters == {"attempts:retrying": 1, "duration:0.5": 1, "duration:sum": 0.3}
    assert "WRONGTYPE" in logs[0]["error"]
    assert _events(logs) == ["metrics_not_counted", "metrics_counted_again"]
