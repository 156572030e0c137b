"""`Producer`: validates events and enqueues them as arq jobs, recording them in the relay's
ledger first when it is durable."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from types import TracebackType
from typing import Any, Self

import asyncpg
from arq.connections import ArqRedis

from producer.connection import connect_redis
from producer.event import Event, parse_event
from producer.queue import DEFAULT_QUEUE, enqueue
from producer.record import Accepted, accept

CONNECT_TIMEOUT = 5.0
"""Seconds a durable producer waits to connect to Postgres before saying it is unreachable."""

POOL_SIZE = 4
"""Connections a durable producer keeps to Postgres at most: each publish takes one for one
statement, so a few serve many concurrent publishers."""


class NotDurable(Exception):
    """`accept_many` was called on a producer that has no database to record in."""


class Producer:
    """Publishes order events to the relay's queue.

    Every event is validated before anything is sent, so an invalid one raises
    `InvalidEvent` naming the field and never reaches the queue (or the ledger).

    Redis-only (the default): a publish that returns has the event's job in Redis, and Redis
    is then all that holds it until a worker takes it. Durable (`connect` with
    `database_url`, the relay's Postgres): a publish that returns has the event in the
    relay's ledger, so losing Redis cannot lose it; it is then queued, and if Redis fails
    after the record, the workers' sweep queues it instead.
    """

    def __init__(
        self, redis: ArqRedis, queue_name: str = DEFAULT_QUEUE, db: asyncpg.Pool | None = None
    ) -> None:
        self.redis = redis
        self.queue_name = queue_name
        self.db = db
        """The relay's Postgres when durable; None for a Redis-only producer."""

    @classmethod
    async def connect(
        cls, redis_url: str, queue_name: str = DEFAULT_QUEUE, *, database_url: str | None = None
    ) -> Self:
        """A producer on the Redis at `redis_url`: redis://, rediss://, unix:// or, to find the
        primary through Sentinel, redis+sentinel://HOST:PORT[,HOST:PORT...]/SERVICE[/DB].
        With `database_url` (postgresql://...), the relay's database, it is durable.
        One quick try of each: a producer learns at once that either is down."""
        redis = await connect_redis(redis_url, queue_name)
        if database_url is None:
            return cls(redis, queue_name)
        try:
            db = await asyncpg.create_pool(
                database_url, min_size=1, max_size=POOL_SIZE, timeout=CONNECT_TIMEOUT
            )
        except BaseException:
            await redis.aclose()
            raise
        assert db is not None  # only None when used without await
        return cls(redis, queue_name, db)

    @property
    def durable(self) -> bool:
        """Whether a publish records the event in the relay's ledger before queueing it."""
        return self.db is not None

    async def close(self) -> None:
        try:
            await self.redis.aclose()
        finally:
            if self.db is not None:
                await self.db.close()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def publish(self, event: Event | Mapping[str, Any]) -> bool:
        """Enqueue one event. False when a job for the same event id is already queued, or,
        durable, when Redis failed after the event was recorded (the sweep queues it)."""
        [queued] = await self.publish_many([event])
        return queued

    async def publish_many(self, events: Iterable[Event | Mapping[str, Any]]) -> list[bool]:
        """Validate all, then enqueue all: one invalid event means none is enqueued. For each,
        what `publish` says of it. Durable: all are recorded in one statement first, and
        nothing is enqueued when that fails."""
        valid = [parse_event(event) for event in events]
        if self.db is not None:
            done = await accept(self.db, self.redis, self.queue_name, valid)
            return [False] * len(valid) if done.queued is None else done.queued
        return [await enqueue(self.redis, event.to_json(), self.queue_name) for event in valid]

    async def accept_many(self, events: Iterable[Event | Mapping[str, Any]]) -> Accepted:
        """`publish_many` for a durable producer, saying in full what was done: which events
        this call recorded, which it queued, and whether Redis failed after the record."""
        if self.db is None:
            raise NotDurable("a Redis-only producer records nothing: connect with database_url")
        valid = [parse_event(event) for event in events]
        return await accept(self.db, self.redis, self.queue_name, valid)
