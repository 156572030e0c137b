"""The worker's callback cache: a change made anywhere is used for the next event, and the
steady state reads no callback from Postgres.

One long-running worker handles every event of a test, as in production: a fresh worker per
event would start with an empty cache and prove nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable, Iterator, MutableMapping
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit

import asyncpg
import standardwebhooks
import structlog.testing
from standardwebhooks.webhooks import WebhookVerificationError

from ops.cli.demo import running
from producer import Producer
from tests.support.events import event_data, save_callback
from tests.support.receivers import Received, Receiver, raw_server
from tests.support.wait import until
from worker import sign
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

        await until(up)
        cache: CallbackCache = started.ctx["callbacks"]
        if listening:
            await _listening(cache)
        yield cache


@contextlib.asynccontextmanager
async def _told_within_a_second(cache: CallbackCache) -> AsyncIterator[None]:
    """The change made in the block empties the worker's cache within a second."""
    before = cache.generation

    async def emptied() -> bool:
        return cache.generation > before

    yield
    await until(emptied, within=1.0)


async def _settled(db: asyncpg.Connection, event_id: str) -> str:
    async def settled() -> bool:
        state = await db.fetchval("SELECT state FROM deliveries WHERE event_id = $1", event_id)
        return state in ("delivered", "skipped", "dead")

    await until(settled)
    state: str = await db.fetchval("SELECT state FROM deliveries WHERE event_id = $1", event_id)
    return state


async def _publish(producer: Producer, db: asyncpg.Connection, label: str) -> str:
    event = event_data(label)
    await producer.publish(event)
    return await _settled(db, event["id"])


async def _listening(cache: CallbackCache) -> None:
    async def listening() -> bool:
        return cache.listening

    await until(listening)


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


async def test_a_cached_secret_signs_every_event_and_a_new_one_signs_the_next(
    db: asyncpg.Connection, producer: Producer, receiver: Receiver, settings: Settings
) -> None:
    """The secret is set up for signing once, with the callback: each later event is still
    signed afresh and verifies, and a new secret is used from the next event on."""
    first, second = sign.generate(), sign.generate()
    await save_callback(db, "ann", "order.created", "POST", receiver.url + "/pb", first)
    async with worker(settings) as cache:
        for label in ("one", "two", "three"):
            assert await _publish(producer, db, label) == "delivered"
        assert cache.loads == 1
        async with _told_within_a_second(cache):
            await save_callback(db, "ann", "order.created", "POST", receiver.url + "/pb", second)
        assert await _publish(producer, db, "four") == "delivered"

    def verifies(secret: str, request: Received) -> bool:
        try:
            standardwebhooks.Webhook(secret).verify(request.body, request.headers)
        except WebhookVerificationError:
            return False
        return True

    assert [verifies(first, r) for r in receiver.requests] == [True, True, True, False]
    assert [verifies(second, r) for r in receiver.requests] == [False, False, False, True]


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
    with structlog.testing.capture_logs() as logs, _listener_logs(logs) as said:
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

            await until(deaf)
            # Changed while nobody listens: this notification is lost.
            await save_callback(db, "ann", "order.created", "GET", receiver.url + "/v2")
            loads = cache.loads
            assert await _publish(producer, db, "deaf") == "delivered"
            assert cache.loads == loads + 1  # read from Postgres, not from the cache
            await _listening(cache)  # back within a second or so
            assert await _publish(producer, db, "again") == "delivered"
            assert await _publish(producer, db, "cached again") == "delivered"
    # The connection's end is an error of the next check: `cache_listen_failed`.
    [(event, level, error)] = said
    assert (event, level) == ("cache_listen_failed", "warning")
    assert error is not None
    assert "connection" in error, error
    assert [request.path_qs for request in receiver.requests] == ["/v1", "/v2", "/v2", "/v2"]


async def test_without_the_trigger_nothing_is_cached(
    db: asyncpg.Connection, producer: Producer, receiver: Receiver, settings: Settings
) -> None:
    # A database whose schema predates the trigger, or whose trigger was disabled: changes
    # would never be announced, so every callback is read from Postgres.
    await save_callback(db, "ann", "order.created", "GET", receiver.url + "/v1")
    await db.execute(f"ALTER TABLE callbacks DISABLE TRIGGER {TRIGGER}")
    try:
        with structlog.testing.capture_logs() as logs, _listener_logs(logs) as said:
            async with worker(settings, listening=False) as cache:
                assert await _publish(producer, db, "one") == "delivered"
                await db.execute("UPDATE callbacks SET url_template = $1", receiver.url + "/v2")
                assert await _publish(producer, db, "two") == "delivered"
                assert not cache.listening
                assert cache.loads == 2
                await until(lambda: _logged(logs, "cache_not_notified"))
    finally:
        await db.execute(f"ALTER TABLE callbacks ENABLE TRIGGER {TRIGGER}")
    assert [request.path_qs for request in receiver.requests] == ["/v1", "/v2"]
    # An error, each time the listener tries again (every second or so), naming the cause.
    assert said
    assert set(said) == {("cache_not_notified", "error", NO_TRIGGER)}


async def test_a_trigger_disabled_while_listening_is_noticed_within_2_s(
    db: asyncpg.Connection, producer: Producer, receiver: Receiver, settings: Settings
) -> None:
    await save_callback(db, "ann", "order.created", "GET", receiver.url + "/v1")
    try:
        with structlog.testing.capture_logs() as logs, _listener_logs(logs) as said:
            async with worker(settings) as cache:
                assert await _publish(producer, db, "cached") == "delivered"
                await db.execute(f"ALTER TABLE callbacks DISABLE TRIGGER {TRIGGER}")

                async def deaf() -> bool:
                    return not cache.listening

                await until(deaf, within=3.0)  # the next check, every 2 s
                await until(lambda: _logged(logs, "cache_not_notified"))
                # Changed while nothing is announced: read from Postgres, not the cache.
                await db.execute("UPDATE callbacks SET url_template = $1", receiver.url + "/v2")
                assert await _publish(producer, db, "unannounced") == "delivered"
                await db.execute(f"ALTER TABLE callbacks ENABLE TRIGGER {TRIGGER}")
                await _listening(cache)
    finally:
        await db.execute(f"ALTER TABLE callbacks ENABLE TRIGGER {TRIGGER}")
    assert [request.path_qs for request in receiver.requests] == ["/v1", "/v2"]
    # Lost while listening (a warning), then not notified (an error) until it is back.
    assert said[0] == ("cache_listen_lost", "warning", NO_TRIGGER)
    assert set(said[1:]) == {("cache_not_notified", "error", NO_TRIGGER)}


async def test_a_listening_connection_cut_silently_is_noticed_within_4_s(
    database_url: str,
) -> None:
    """The listener on a connection that goes silent, as in a network partition: no FIN, no
    answer. A cache of its own on a proxy rather than a worker's, whose pool would go
    silent too and hold up its deliveries."""
    async with _partition(database_url) as (url, go_silent):
        cache = CallbackCache(url)
        with structlog.testing.capture_logs() as logs, _listener_logs(logs) as said:
            listener = asyncio.create_task(cache.run())
            try:
                await _listening(cache)
                go_silent()
                started = time.monotonic()

                async def deaf() -> bool:
                    return not cache.listening

                await until(deaf, within=6.0)
                took = time.monotonic() - started
                await until(lambda: _logged(logs, "cache_listen_failed"), within=4.0)
            finally:
                listener.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await listener
    assert took < 5.0  # a check every 2 s, which may take 2 s: about 4 s at most
    # The check that got no answer timed out: `cache_listen_failed`, once the connection
    # was given up (up to 2 s later).
    assert said == [("cache_listen_failed", "warning", "TimeoutError: ")]


NO_TRIGGER = f"trigger {TRIGGER} on callbacks is missing or disabled: run postback db init"


async def _logged(logs: list[MutableMapping[str, Any]], event: str) -> bool:
    return any(entry["event"] == event for entry in logs)


@contextlib.contextmanager
def _listener_logs(
    logs: list[MutableMapping[str, Any]],
) -> Iterator[list[tuple[str, str, str | None]]]:
    """After the block: the callback cache's log events, as (event, level, problem or
    error), in the order logged."""
    said: list[tuple[str, str, str | None]] = []
    yield said
    said += [
        (entry["event"], entry["log_level"], entry.get("problem", entry.get("error")))
        for entry in logs
        if entry["event"].startswith("cache_")
    ]


@contextlib.asynccontextmanager
async def _partition(database_url: str) -> AsyncIterator[tuple[str, Callable[[], None]]]:
    """A TCP proxy to the database: its URL, and a function after which nothing more passes
    either way on the connections open through it, which stay open (new ones still pass).
    The database may be on a Unix socket (?host=DIR, as the embedded Postgres is)."""
    target = urlsplit(database_url)
    options = dict(parse_qsl(target.query))
    host = options.pop("host", None) or target.hostname or "127.0.0.1"
    port = target.port or 5432
    silent: list[list[bool]] = []

    async def proxy(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if host.startswith("/"):  # a socket folder
            upstream = asyncio.open_unix_connection(f"{host}/.s.PGSQL.{port}")
        else:
            upstream = asyncio.open_connection(host, port)
        upstream_reader, upstream_writer = await upstream
        cut = [False]
        silent.append(cut)

        async def pump(source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
            while data := await source.read(65536):
                if not cut[0]:
                    sink.write(data)
                    await sink.drain()

        try:
            await asyncio.gather(pump(reader, upstream_writer), pump(upstream_reader, writer))
        finally:
            upstream_writer.close()

    def go_silent() -> None:
        for cut in silent:
            cut[0] = True

    async with raw_server(proxy) as base:
        listening = base.rsplit(":", 1)[1]
        user = target.netloc.rsplit("@", 1)[0]
        netloc = f"{user}@127.0.0.1:{listening}"
        through = target._replace(netloc=netloc, query=urlencode(options))
        yield through.geturl(), go_silent
