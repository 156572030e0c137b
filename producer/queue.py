"""How an event travels through Redis: the arq job name, its id, and its JSON encoding.

Jobs are JSON, never pickle: whoever can write to Redis must not be able to run code in a
worker, and a producer in any language can enqueue by writing the same shape as arq.
"""

from __future__ import annotations

import json
from datetime import timedelta
from decimal import Decimal
from typing import Any

from arq.connections import ArqRedis

from producer.json_input import read_json

DEFAULT_QUEUE = "postback:queue"
"""The Redis key of the queue (a sorted set, as arq keeps it) unless configured otherwise."""

JOB_NAME = "deliver_event"
"""The worker function every event job calls, with the event object as its one argument."""


JOB_EXPIRES = timedelta(days=30)
"""How long a queued job waits for a worker before Redis drops it (arq's default is a day:
too short for a relay whose workers may be stopped over a long weekend)."""


REDIS_TIMEOUT = 5.0
"""Seconds to connect to Redis, or to wait for one answer, before saying it is unreachable."""


def open_redis(redis_url: str, queue_name: str = DEFAULT_QUEUE) -> ArqRedis:
    """A client for the relay's queue. It connects on first use, so a service can start
    (and say on its health check that Redis is down) while Redis is away."""
    redis: ArqRedis = ArqRedis.from_url(
        redis_url, socket_connect_timeout=REDIS_TIMEOUT, socket_timeout=REDIS_TIMEOUT
    )
    redis.job_serializer = serialize
    redis.job_deserializer = read_json
    redis.default_queue_name = queue_name
    return redis


def job_id(event_id: str) -> str:
    """One job per event id, so publishing the same id while it is queued enqueues nothing."""
    return f"event:{event_id}"


async def enqueue(redis: ArqRedis, event: dict[str, Any], queue_name: str) -> bool:
    """Queue a validated event's job. False when that event's job is already in Redis.

    arq's check and write are one transaction, so two callers racing on the same event
    (a producer publishing twice, two sweeps) enqueue it once.
    """
    job = await redis.enqueue_job(
        JOB_NAME, event, _job_id=job_id(event["id"]), _queue_name=queue_name, _expires=JOB_EXPIRES
    )
    return job is not None


def _default(value: object) -> str:
    if isinstance(value, Decimal):
        return format(value, "f")
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


def serialize(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":"), default=_default).encode()
