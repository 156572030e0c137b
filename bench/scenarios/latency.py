"""Latency: enqueue to arrival at the receiver, at a steady rate, with one running worker,
in RUNS runs, each with a fresh worker; p50, p95 and p99 for each, and the target for each.

Each event carries the time.time() of its publish in its link (`t`), which the callback's
template copies into the URL; the receiver notes its own time.time() on arrival. Both clocks
are this machine's, so the difference is the relay's whole path: queue wait (arq's polling
included), Postgres, rendering and the HTTP request. Publishes are scheduled on a fixed
timetable, each in its own task, so a slow one does not delay the next and the rate holds.
"""

from __future__ import annotations

from bench import setup
from bench.context import Bench
from bench.progress import say
from bench.results import InvalidMeasurement, Row, judged
from bench.scenarios.common import (
    AFFILIATES,
    WARMUP_EVENTS,
    Percentiles,
    arrived,
    latencies,
    paced,
    percentiles,
    save_callbacks,
    warm_up,
)
from bench.workers import wait_ready
from producer import Producer

NAME = "latency"
TARGET_P99_MS = 100.0
RUNS = 3
"""Runs, each with a worker of its own; the target holds for each."""


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
        await warm_up(producer, bench, label, rate)
        say(f"latency run {run}: publishing {count:,} events at {rate:g}/s")
        achieved = await paced(producer, bench, label, count, rate, first=WARMUP_EVENTS)
    await arrived(bench, count)
    measured = await latencies(bench, count)
    # Stopped before the ledger is read: SIGTERM lets the deliveries in flight finish.
    await worker.stop()
    delivered = await setup.delivered(bench.db, AFFILIATES)
    if delivered != count + WARMUP_EVENTS:
        raise InvalidMeasurement(
            f"ledger has {delivered:,} of {count + WARMUP_EVENTS:,} (warm-up included) delivered"
        )

    return percentiles(measured, achieved)


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
