"""The events tests publish, and the callbacks that send them on."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterable
from typing import Any

import asyncpg
from arq.connections import ArqRedis

from producer import Producer
from producer.queue import JOB_NAME, job_id, job_key
from tests.support.receivers import ALLOW_NETWORKS
from tests.support.servers import RUN
from worker import address, callbacks


async def write_job(redis: ArqRedis, queue_name: str, event_id: str, event_json: str) -> None:
    """A job for the event written straight into Redis, as a producer in another language
    would write it: `event_json` as given, never validated on the way in."""
    now_ms = int(time.time() * 1000)
    job = f'{{"t":1,"f":"{JOB_NAME}","a":[{event_json}],"k":{{}},"et":{now_ms}}}'
    await redis.set(job_key(job_id(event_id)), job)
    await redis.zadd(queue_name, {job_id(event_id): now_ms})


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


def events(label: str, count: int, affiliate: str = "ann") -> list[dict[str, Any]]:
    """`count` events, each of its own order, so none waits for another (per-order order)."""
    return [
        event_data(
            label,
            affiliate_id=affiliate,
            order={"number": f"#{label}-{n}", "amount": "10.50", "commission": "1.05"},
        )
        for n in range(count)
    ]


async def publish(producer: Producer, batch: Iterable[dict[str, Any]]) -> list[str]:
    """Publish one by one, each accepted; the event ids."""
    ids = []
    for data in batch:
        assert await producer.publish(data)
        ids.append(data["id"])
    return ids


async def save_callback(
    conn: asyncpg.Connection,
    affiliate: str,
    event_type: str,
    method: str,
    url: str,
    secret: str | None = None,
    *,
    statuses: str | None = None,
    delay: str | None = None,
) -> callbacks.Callback:
    """Configure a callback as `postback callbacks set` does, validation included."""
    allowed = address.parse_networks(ALLOW_NETWORKS)
    spec = callbacks.validate(
        affiliate,
        event_type,
        method,
        url,
        secret,
        allowed=allowed,
        statuses=statuses,
        delay=delay,
    )
    return await callbacks.save(conn, spec)
