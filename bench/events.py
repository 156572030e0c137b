"""Events for the bench, and putting them on a queue through the producer library.

Events are built with `producer.order_created` and enqueued with `Producer.publish_many`,
the path order systems use, so the jobs in Redis are exactly what production queues hold.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

from bench.config import BenchConfig
from bench.progress import say
from producer import Event, Producer, order_created

BATCH = 500
"""Events per `publish_many` call."""

CONCURRENCY = 8
"""`publish_many` calls in flight at once: each enqueue is a few Redis round trips, so one
at a time would make enqueueing 100,000 events take minutes."""


def event(
    config: BenchConfig, scenario: str, n: int, affiliate: str, sent_at: float | None = None
) -> Event:
    """Order number `n` of `affiliate`. Every order is new, so no delivery waits for another
    of its order. `sent_at` (the enqueue time, for latency) travels in the link's `t`."""
    link = f"https://shop.example/landing?ref={affiliate}&sub_id=s{n}"
    if sent_at is not None:
        link += f"&t={sent_at:.6f}"
    return order_created(
        id=config.event_id(scenario, n),
        affiliate_id=affiliate,
        number=f"#{n}",
        amount="10.50",
        commission="1.05",
        currency="EUR",
        status="pending",
        link_url=link,
    )


def spread(
    config: BenchConfig, scenario: str, count: int, affiliates: Sequence[str]
) -> list[Event]:
    """`count` events dealt round-robin over `affiliates`."""
    return [event(config, scenario, n, affiliates[n % len(affiliates)]) for n in range(count)]


async def enqueue(config: BenchConfig, queue_name: str, events: Sequence[Event]) -> float:
    """Publish all `events` in batches; returns the seconds it took.

    Raises if any was refused as already queued: the counts the scenarios check against
    would be wrong.
    """
    loop = asyncio.get_running_loop()
    started = loop.time()
    batches = [events[i : i + BATCH] for i in range(0, len(events), BATCH)]
    limit = asyncio.Semaphore(CONCURRENCY)
    done = 0
    async with await Producer.connect(config.redis_url, queue_name) as producer:

        async def publish(batch: Sequence[Event]) -> int:
            nonlocal done
            async with limit:
                queued = sum(await producer.publish_many(batch))
            done += len(batch)
            if len(events) >= 20_000 and done % 20_000 < len(batch):
                say(f"  enqueued {done:,} of {len(events):,}")
            return queued

        queued = sum(await asyncio.gather(*(publish(batch) for batch in batches)))
    if queued != len(events):
        raise RuntimeError(f"only {queued} of {len(events)} events were queued")
    return loop.time() - started
