"""`Producer`: validates events and enqueues them as arq jobs."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from types import TracebackType
from typing import Any, Self

from arq.connections import ArqRedis

from producer.connection import connect_redis
from producer.event import Event, parse_event
from producer.queue import DEFAULT_QUEUE, enqueue


class Producer:
    """Publishes order events to the relay's queue.

    Every event is validated before anything is sent to Redis, so an invalid one raises
    `InvalidEvent` naming the field and never reaches the queue.
    """

    def __init__(self, redis: ArqRedis, queue_name: str = DEFAULT_QUEUE) -> None:
        self.redis = redis
        self.queue_name = queue_name

    @classmethod
    async def connect(cls, redis_url: str, queue_name: str = DEFAULT_QUEUE) -> Self:
        """A producer on the Redis at `redis_url`: redis://, rediss://, unix:// or, to find the
        primary through Sentinel, redis+sentinel://HOST:PORT[,HOST:PORT...]/SERVICE[/DB].
        One quick try: a producer learns at once that Redis is down."""
        return cls(await connect_redis(redis_url, queue_name), queue_name)

    async def close(self) -> None:
        await self.redis.aclose()

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
        """Enqueue one event. False when a job for the same event id is already queued."""
        return await enqueue(self.redis, parse_event(event).to_json(), self.queue_name)

    async def publish_many(self, events: Iterable[Event | Mapping[str, Any]]) -> list[bool]:
        """Validate all, then enqueue all: one invalid event means none is enqueued."""
        valid = [parse_event(event) for event in events]
        return [await self.publish(event) for event in valid]
