"""What several scenarios share: the affiliates, a timed, checked burst run, and events
published at a steady rate with their enqueue to arrival latency."""

from __future__ import annotations

import asyncio
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass

import asyncpg

from bench import events, setup
from bench.context import Bench
from bench.progress import say
from bench.results import InvalidMeasurement
from producer import Producer

AFFILIATES = tuple(f"aff{n:02d}" for n in range(10))

WARMUP_EVENTS = 100
"""Events a fresh worker delivers before its latencies count: its first requests open
connections and fill caches."""
SETTLE_TIMEOUT = 60.0
"""Seconds after the last publish by which every event must have arrived."""


def burst_timeout(events: int) -> float:
    """Generous: a burst run slower than 20 events/s has gone wrong, not slow."""
    return 120.0 + events / 20


async def save_callbacks(
    bench: Bench,
    affiliates: Sequence[str] = AFFILIATES,
    db: asyncpg.Connection | None = None,
) -> None:
    """Each affiliate's callback on a receiver port of its own, as each affiliate has its
    own host in production (the relay's per-destination limits see them apart); in `db`,
    or the run's database."""
    urls = {a: bench.receiver.url_for(n) for n, a in enumerate(affiliates)}
    await setup.save_callbacks(bench.db if db is None else db, urls)


async def timed_burst(bench: Bench, queue_name: str, events: int, workers: int = 1) -> float:
    """Run `workers` burst relay workers on a queue holding `events` events, and return the
    seconds from spawning them to the last one's exit (interpreter start included).

    Raises InvalidMeasurement unless the ledger has every event delivered and the receiver
    got exactly that many requests.
    """
    await bench.receiver.reset()
    started = time.perf_counter()
    procs = [
        await bench.workers.relay(queue_name, burst=True, label=f"burst worker {n + 1}")
        for n in range(workers)
    ]
    await asyncio.gather(*(p.wait(burst_timeout(events)) for p in procs))
    seconds = time.perf_counter() - started
    await check_all_delivered(bench, events)
    return seconds


async def check_all_delivered(
    bench: Bench, events: int, affiliates: Sequence[str] = AFFILIATES
) -> None:
    """The ledger says `events` delivered, nothing else, and the receiver counted as many."""
    states = await setup.ledger_states(bench.db, affiliates)
    received = (await bench.receiver.stats()).count(list(affiliates))
    if states != {"delivered": events} or received != events:
        raise InvalidMeasurement(
            f"expected {events:,} delivered and received; ledger {states}, receiver {received:,}"
        )
    say(f"  checked: {events:,} delivered in the ledger, {received:,} at the receiver")


async def paced(
    producer: Producer, bench: Bench, label: str, count: int, rate: float, first: int
) -> float:
    """Publish `count` events at `rate` per second; returns the rate actually achieved.

    Each event carries its publish time (`t` in its link) for the receiver to subtract.
    Publishes are scheduled on a fixed timetable, each in its own task, so a slow one does
    not delay the next and the rate holds."""
    loop = asyncio.get_running_loop()
    start = loop.time()
    tasks: set[asyncio.Task[bool]] = set()
    for n in range(count):
        delay = start + n / rate - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
        affiliate = AFFILIATES[n % len(AFFILIATES)]
        event = events.event(bench.config, label, first + n, affiliate, sent_at=time.time())
        task = asyncio.create_task(producer.publish(event))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
        if n and n % max(1, round(rate * 10)) == 0:  # every ~10 s
            say(f"  published {n:,} of {count:,}")
    await asyncio.gather(*tasks)
    return count / (loop.time() - start)


async def arrived(bench: Bench, count: int, within: float = SETTLE_TIMEOUT) -> None:
    """Wait until the receiver has `count` requests; at most `within` seconds."""
    deadline = time.monotonic() + within
    while (received := (await bench.receiver.stats()).total) < count:
        if time.monotonic() > deadline:
            raise InvalidMeasurement(
                f"only {received:,} of {count:,} arrived within {within:.0f} s"
            )
        await asyncio.sleep(0.1)


async def warm_up(producer: Producer, bench: Bench, label: str, rate: float) -> None:
    """WARMUP_EVENTS events delivered at `rate`, then the receiver's count reset with
    latency recording on: what follows is measured."""
    await paced(producer, bench, label, WARMUP_EVENTS, rate, first=0)
    await arrived(bench, WARMUP_EVENTS)
    await bench.receiver.reset(record=True)


async def latencies(bench: Bench, count: int) -> list[float]:
    """The receiver's enqueue to arrival latencies, in seconds, since recording began;
    exactly `count` of them or InvalidMeasurement."""
    samples = (await bench.receiver.stats(samples=True)).samples
    if len(samples) != count:
        raise InvalidMeasurement(f"{len(samples):,} latency samples for {count:,} events")
    return [received - sent for sent, received in samples]


@dataclass(frozen=True, slots=True)
class Percentiles:
    p50: float
    p95: float
    p99: float
    worst: float
    """All in ms."""
    achieved: float
    """The publish rate reached, events/s."""


def percentiles(latencies: Sequence[float], achieved: float) -> Percentiles:
    """p50, p95, p99 (inclusive quantiles) and the worst of `latencies` (seconds), in ms."""
    cuts = statistics.quantiles(latencies, n=100, method="inclusive")
    p50, p95, p99 = (cuts[p - 1] * 1000 for p in (50, 95, 99))
    worst = max(latencies) * 1000
    say(f"  p50 {p50:.0f} ms, p95 {p95:.0f} ms, p99 {p99:.0f} ms, max {worst:.0f} ms")
    return Percentiles(p50, p95, p99, worst, achieved)
