"""Latency: enqueue to arrival at the receiver, at a steady rate, with one running worker,
in RUNS runs, each with a fresh worker; p50, p95 and p99 for each, and the target for each.

Each event carries the time.time() of its publish in its link (`t`), which the callback's
template copies into the URL; the receiver notes its own time.time() on arrival. Both clocks
are this machine's, so the difference is the relay's whole path: queue wait (arq's polling
included), Postgres, rendering and the HTTP request. Publishes are scheduled on a fixed
timetable, each in its own task, so a slow one does not delay the next and the rate holds.
"""

from __future__ import annotations

import asyncio
import statistics
import time
from dataclasses import dataclass

from bench import events, setup
from bench.context import Bench
from bench.progress import say
from bench.results import InvalidMeasurement, Row, judged
from bench.scenarios.common import AFFILIATES, save_callbacks
from bench.workers import wait_ready
from producer import Producer

NAME = "latency"
WARMUP_EVENTS = 100
TARGET_P99_MS = 100.0
RUNS = 3
"""Runs, each with a worker of its own; the target holds for each."""
SETTLE_TIMEOUT = 60.0
"""Seconds after the last publish by which every event must have arrived."""


async def _paced(
    producer: Producer, bench: Bench, label: str, count: int, rate: float, first: int
) -> float:
    """Publish `count` events at `rate` per second; returns the rate actually achieved."""
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


async def _arrived(bench: Bench, count: int) -> None:
    """Wait until the receiver has `count` requests; at most SETTLE_TIMEOUT seconds."""
    deadline = time.monotonic() + SETTLE_TIMEOUT
    while (received := (await bench.receiver.stats()).total) < count:
        if time.monotonic() > deadline:
            raise InvalidMeasurement(
                f"only {received:,} of {count:,} arrived within {SETTLE_TIMEOUT:.0f} s"
            )
        await asyncio.sleep(0.1)


def _percentile_ms(cuts: list[float], p: int) -> float:
    return cuts[p - 1] * 1000


@dataclass(frozen=True, slots=True)
class Percentiles:
    p50: float
    p95: float
    p99: float
    worst: float
    """All in ms."""
    achieved: float
    """The publish rate reached, events/s."""


async def _one_run(bench: Bench, run: int, count: int) -> Percentiles:
    """One run: a fresh worker, its warm-up, then `count` events at the steady rate."""
    rate = bench.options.rate
    config = bench.config
    label = f"{NAME}-{run}"
    queue = config.queue_name(label)

    await setup.empty_ledger(bench.db)
    await save_callbacks(bench)
    await bench.receiver.reset()
    worker = await bench.workers.relay(queue, burst=False)
    ready = await wait_ready(worker, bench.redis, queue)
    say(f"latency run {run}: worker ready in {ready:.1f} s; warming up with {WARMUP_EVENTS} events")
    async with await Producer.connect(config.redis_url, queue) as producer:
        await _paced(producer, bench, label, WARMUP_EVENTS, rate, first=0)
        await _arrived(bench, WARMUP_EVENTS)
        await bench.receiver.reset(record=True)
        say(f"latency run {run}: publishing {count:,} events at {rate:g}/s")
        achieved = await _paced(producer, bench, label, count, rate, first=WARMUP_EVENTS)
    await _arrived(bench, count)
    samples = (await bench.receiver.stats(samples=True)).samples
    # Stopped before the ledger is read: SIGTERM lets the deliveries in flight finish.
    await worker.stop()
    if len(samples) != count:
        raise InvalidMeasurement(f"{len(samples):,} latency samples for {count:,} events")
    delivered = await setup.delivered(bench.db, AFFILIATES)
    if delivered != count + WARMUP_EVENTS:
        raise InvalidMeasurement(
            f"ledger has {delivered:,} of {count + WARMUP_EVENTS:,} (warm-up included) delivered"
        )

    latencies = [arrived - sent for sent, arrived in samples]
    cuts = statistics.quantiles(latencies, n=100, method="inclusive")
    p50, p95, p99 = (_percentile_ms(cuts, p) for p in (50, 95, 99))
    worst = max(latencies) * 1000
    say(f"  p50 {p50:.0f} ms, p95 {p95:.0f} ms, p99 {p99:.0f} ms, max {worst:.0f} ms")
    return Percentiles(p50, p95, p99, worst, achieved)


async def run(bench: Bench) -> list[Row]:
    count = bench.options.events or round(bench.options.rate * bench.options.seconds)
    rows: list[Row] = []
    for n in range(1, RUNS + 1):
        cut = await _one_run(bench, n, count)
        rows.append(
            judged(
                NAME,
                f"run {n}: p50 / p95 / p99",
                f"{cut.p50:.1f} / {cut.p95:.1f} / {cut.p99:.1f} ms",
                f"p99 < {TARGET_P99_MS:g} ms",
                cut.p99 < TARGET_P99_MS,
                note=f"enqueue→received; max {cut.worst:.0f} ms; {count:,} events at "
                f"{cut.achieved:.0f}/s, 1 worker",
            )
        )
    return rows
