"""Throughput: deliveries per second of one burst worker, against the queue's own ceiling.

Both runs drain the same number of events enqueued beforehand through the producer library,
and both are timed from spawning the worker process to its exit. The ceiling is the no-op
worker (bench/noop.py): the relay's arq settings with a job that does nothing, so the ratio
says how much of what arq and Redis allow the relay's own work (Postgres, rendering, HTTP)
leaves.

arq polls its queue every poll delay (0.5 s unless the relay sets it) for at most its queue
read limit of jobs (max_jobs x 5), and a burst of jobs quicker than that waits for the next
poll, so that rhythm alone caps a worker near limit / delay jobs per second. A third run, for
information, drains the no-op worker with a 10 ms poll delay: what Redis and arq allow on
this machine without that cap, to tell the cap from the relay's own cost.
"""

from __future__ import annotations

from bench import events
from bench.context import Bench
from bench.progress import say
from bench.results import InvalidMeasurement, Row, judged
from bench.scenarios.common import AFFILIATES, burst_timeout, save_callbacks, timed_burst
from producer.queue import queue_depth

NAME = "throughput"
DEFAULT_EVENTS = 20_000
TARGET_RATIO = 0.75
FAST_POLL_DELAY = 0.01


async def _noop(bench: Bench, count: int, label: str, poll_delay: float | None = None) -> float:
    """Seconds for a no-op burst worker, spawn to exit, to drain `count` fresh jobs."""
    queue = bench.config.queue_name(f"{NAME}-{label}")
    say(f"throughput: enqueueing {count:,} events for the no-op worker ({label})")
    batch = events.spread(bench.config, f"{NAME}-{label}", count, AFFILIATES)
    await events.enqueue(bench.config, queue, batch)
    noop = await bench.workers.noop(queue, poll_delay)
    seconds = await noop.wait(burst_timeout(count))
    depth = await queue_depth(bench.redis, queue)
    left = depth.due + depth.later
    if left:
        raise InvalidMeasurement(f"the no-op worker exited with {left} jobs still queued")
    return seconds


async def run(bench: Bench) -> list[Row]:
    count = bench.options.events or DEFAULT_EVENTS
    config = bench.config

    await save_callbacks(bench)
    relay_queue = config.queue_name(NAME)
    say(f"throughput: enqueueing {count:,} events")
    took = await events.enqueue(config, relay_queue, events.spread(config, NAME, count, AFFILIATES))
    say(f"  enqueued in {took:.1f} s ({count / took:,.0f}/s); running one burst worker")
    relay_seconds = await timed_burst(bench, relay_queue, count)
    relay_rate = count / relay_seconds
    say(f"  relay: {relay_rate:,.0f} deliveries/s")

    noop_seconds = await _noop(bench, count, "noop")
    noop_rate = count / noop_seconds
    say(f"  no-op: {noop_rate:,.0f} jobs/s")
    fast_seconds = await _noop(bench, count, "noop-fast", FAST_POLL_DELAY)
    fast_rate = count / fast_seconds
    say(f"  no-op, {FAST_POLL_DELAY * 1000:g} ms poll delay: {fast_rate:,.0f} jobs/s")

    ratio = relay_rate / noop_rate
    return [
        Row(
            NAME,
            "relay, 1 worker",
            f"{relay_rate:,.0f}/s",
            note=f"{count:,} events, spawn to exit {relay_seconds:.1f} s, "
            "all delivered (ledger + receiver)",
        ),
        Row(
            NAME,
            "no-op arq ceiling",
            f"{noop_rate:,.0f}/s",
            note=f"{count:,} jobs, spawn to exit {noop_seconds:.1f} s, the relay's arq settings",
        ),
        Row(
            NAME,
            f"no-op, {FAST_POLL_DELAY * 1000:g} ms poll delay",
            f"{fast_rate:,.0f}/s",
            note=f"{count:,} jobs, spawn to exit {fast_seconds:.1f} s; "
            f"relay at {relay_rate / fast_rate:.2f} of it",
        ),
        judged(
            NAME, "relay / ceiling", f"{ratio:.2f}", f">= {TARGET_RATIO}", ratio >= TARGET_RATIO
        ),
    ]
