"""The worker's callback cache: a change made anywhere is used for the next event, and the
steady state reads no callback from Postgres.

One long-running worker handles every event of a test, as in production: a fresh worker per
event would start with an empty cache and prove nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable

import asyncpg

from ops.demo import running
from producer import Producer
from tests.conftest import Receiver, event_data, save_callback
from worker.cache import LISTENER_NAME, TRIGGER, CallbackCache
from worker.config import Settings
from worker.pool import create_worker


@contextlib.asynccontextmanager
async def worker(settings: Settings, listening: bool = True) -> AsyncIterator[CallbackCache]:
    """A running worker's callback cache, once it listens for changes (if `listening`)."""
    started = create_worker(settings, handle_signals=False, poll_delay=0.01)
    async with running(started):

        async def up() -> bool:
            return "callbacks" in started.ctx

        await _until(up)
        cache: CallbackCache = started.ctx["callbacks"]
        if listening:
            await _listening(cache)
        yield cache


async def _until(condition: Callable[[], Awaitable[bool]], seconds: float = 5.0) -> None:
    deadline = time.monotonic() + seconds
    while not await condition():
        assert time.monotonic() < deadline, f"not so within {seconds} s"
        await asyncio.sleep(0.01)


@contextlib.asynccontextmanager
async def _told_within_a_second(cache: CallbackCache) -> AsyncIterator[None]:
    """The change made in the block empties the worker's cache within a second."""
    before = cache.generation

    async def emptied() -> bool:
        return cache.generation > before

    yield
    await _until(emptied, seconds=1.0)


async def _settled(db: asyncpg.Connection, event_id: str) -> str:
    async def settled() -> bool:
        state = await db.fetchval("SELECT state FROM deliveries WHERE event_id = $1", event_id)
        return state in ("delivered", "skipped", "dead")

    await _until(settled)
    state: str = await db.fetchval("SELECT state FROM deliveries WHERE event_id = $1", event_id)
    return state


async def _publish(producer: Producer, db: asyncpg.Connection, label: str) -> str:
    event = event_data(label)
    await producer.publish(event)
    return await _settled(db, event["id"])


async def _listening(cache: CallbackCache) -> None:
    async def listening() -> bool:
        return cache.listening

    await _until(listening)


async def test_a_changed_template_is_used_for_the_next_event(
    db: asyncpg.Connection, producer: Producer, receiver: Receiver, settings: Settings
) -> None:
    await save_callback(db, "ann", "order.created", "GET", receiver.url + "/v1")
    async with worker(settings) as cache:
        assert await _publish(producer, db, "first") == "delivered"
        assert await _publish(producer, db, "second") == "delivered"
        assert cache.loads == 1  # the second event read no callback from Postgres

        async with _told_within_a_second(cache):
            await save_callback(db, "ann", "order.created", "GET", receiver.url + "/v2")
        assert await _publish(producer, db, "third") == "delivered"
    assert [request.path_qs for request in receiver.requests] == ["/v1", "/v1", "/v2"]


async def test_a_callback_disabled_by_hand_is_skipped_from_the_next_event(
    db: asyncpg.Connection, producer: Producer, receiver: Receiver, settings: Settings
) -> None:
    await save_callback(db, "ann", "order.created", "GET", receiver.url + "/pb")
    async with worker(settings) as cache:
        assert await _publish(producer, db, "before") == "delivered"
        async with _told_within_a_second(cache):
            await db.execute("UPDATE callbacks SET enabled = false")  # SQL typed by hand
        assert await _publish(producer, db, "after") == "skipped"
        async with _told_within_a_second(cache):
            await db.execute("UPDATE callbacks SET enabled = true")
        assert await _publish(producer, db, "back") == "delivered"
    assert len(receiver.requests) == 2


async def test_a_lost_listener_reads_through_until_it_listens_again(
    db: asyncpg.Connection, producer: Producer, receiver: Receiver, settings: Settings
) -> None:
    await save_callback(db, "ann", "order.created", "GET", receiver.url + "/v1")
    async with worker(settings) as cache:
        assert await _publish(producer, db, "cached") == "delivered"
        # Cut the listening connection: notifications sent meanwhile would be missed.
        cut = await db.fetchval(
            """
            SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity
            WHERE datname = current_database() AND application_name = $1
            """,
            LISTENER_NAME,
        )
        assert cut == 1

        async def deaf() -> bool:
            return not cache.listening

        await _until(deaf)
        # Changed while nobody listens: this notification is lost.
        await save_callback(db, "ann", "order.created", "GET", receiver.url + "/v2")
        loads = cache.loads
        assert await _publish(producer, db, "deaf") == "delivered"
        assert cache.loads == loads + 1  # read from Postgres, not from the cache
        await _listening(cache)  # back within a second or so
        assert await _publish(producer, db, "again") == "delivered"
        assert await _publish(producer, db, "cached again") == "delivered"
    assert [request.path_qs for request in receiver.requests] == ["/v1", "/v2", "/v2", "/v2"]


async def test_without_the_trigger_nothing_is_cached(
    db: asyncpg.Connection, producer: Producer, receiver: Receiver, settings: Settings
) -> None:
    # A database whose schema predates the trigger, or whose trigger was disabled: changes
    # would never be announced, so every callback is read from Postgres.
    await save_callback(db, "ann", "order.created", "GET", receiver.url + "/v1")
    await db.execute(f"ALTER TABLE callbacks DISABLE TRIGGER {TRIGGER}")
    try:
        async with worker(settings, listening=False) as cache:
            assert await _publish(producer, db, "one") == "delivered"
            await db.execute("UPDATE callbacks SET url_template = $1", receiver.url + "/v2")
            assert await _publish(producer, db, "two") == "delivered"
            assert not cache.listening
            assert cache.loads == 2
    finally:
        await db.execute(f"ALTER TABLE callbacks ENABLE TRIGGER {TRIGGER}")
    assert [request.path_qs for request in receiver.requests] == ["/v1", "/v2"]
