"""Memory: the worker's peak resident set size while a large backlog waits in Redis.

A worker must not hold the queue in memory: arq reads a bounded number of job ids per poll.
The backlog is enqueued first, then one (non-burst) worker is started and its RSS sampled
every 100 ms from its spawn, for a fixed window of draining or until the backlog is gone.
"""

from __future__ import annotations

import asyncio
import time

from bench import events
from bench.context import Bench
from bench.progress import say
from bench.results import InvalidMeasurement, Row, judged
from bench.scenarios.common import AFFILIATES, save_callbacks
from bench.workers import RssSampler

NAME = "memory"
DEFAULT_EVENTS = 100_000
TARGET_MB = 150.0
MB = 1024 * 1024


async def run(bench: Bench) -> list[Row]:
    count = bench.options.events or DEFAULT_EVENTS
    window = bench.options.memory_window
    queue = bench.config.queue_name(NAME)

    await save_callbacks(bench)
    say(f"memory: enqueueing {count:,} events")
    took = await events.enqueue(
        bench.config, queue, events.spread(bench.config, NAME, count, AFFILIATES)
    )
    say(f"  enqueued in {took:.1f} s; sampling the worker's RSS for up to {window:g} s")
    await bench.receiver.reset()
    worker = await bench.workers.relay(queue, burst=False)
    sampler = RssSampler(worker.pid)
    sampler.start()
    started = time.monotonic()
    deadline = started + window
    try:
        while time.monotonic() < deadline and worker.running:
            if (await bench.receiver.stats()).total >= count:
                break
            await asyncio.sleep(0.5)
    finally:
        await sampler.stop()
    elapsed = time.monotonic() - started
    received = (await bench.receiver.stats()).total
    running = worker.running
    await worker.stop()
    if not running or received == 0:
        raise InvalidMeasurement(
            f"worker exited early or delivered nothing ({received}):\n{worker.log_tail()}"
        )
    peak = sampler.peak / MB
    say(f"  peak RSS {peak:.1f} MiB over {sampler.samples} samples")
    return [
        judged(
            NAME,
            f"worker peak RSS, {count:,} queued",
            f"{peak:.1f} MB",
            f"< {TARGET_MB:g} MB",
            peak < TARGET_MB,
            note=f"MiB; {sampler.samples} samples over {elapsed:.0f} s, "
            f"{received:,} delivered meanwhile",
        )
    ]
