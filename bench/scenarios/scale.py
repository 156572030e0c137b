"""Scale: deliveries per second of two worker processes against one.

Each worker gets the same share of events (one: N, two: 2N), so startup weighs the same in
both runs. On a machine with few cores, Postgres, Redis and the receiver compete with the
workers for them, so the ratio says as much about the machine as about the relay; it has
no target.

So does arq's polling: every worker reads the same head of the queue (the first queue read
limit of due ids, every poll delay) and they race for those ids, so with the relay's 0.5 s
poll delay two workers share roughly the cap of one (see the throughput scenario).
"""

from __future__ import annotations

from bench import events
from bench.context import Bench
from bench.progress import say
from bench.results import Row
from bench.scenarios.common import AFFILIATES, save_callbacks, timed_burst
from bench.setup import empty_ledger

NAME = "scale"
DEFAULT_EVENTS_PER_WORKER = 10_000


async def _rate(bench: Bench, workers: int, per_worker: int) -> tuple[float, str]:
    count = workers * per_worker
    label = f"{NAME}-{workers}"
    queue = bench.config.queue_name(label)
    say(f"scale: enqueueing {count:,} events for {workers} worker(s)")
    await events.enqueue(bench.config, queue, events.spread(bench.config, label, count, AFFILIATES))
    seconds = await timed_burst(bench, queue, count, workers=workers)
    rate = count / seconds
    say(f"  {workers} worker(s): {rate:,.0f} deliveries/s")
    return rate, f"{count:,} events in {seconds:.1f} s, all delivered"


async def run(bench: Bench) -> list[Row]:
    per_worker = bench.options.events or DEFAULT_EVENTS_PER_WORKER
    await save_callbacks(bench)
    one, one_note = await _rate(bench, 1, per_worker)
    await empty_ledger(bench.db)
    await save_callbacks(bench)
    two, two_note = await _rate(bench, 2, per_worker)
    return [
        Row(NAME, "1 worker", f"{one:,.0f}/s", note=one_note),
        Row(NAME, "2 workers", f"{two:,.0f}/s", note=two_note),
        Row(NAME, "2 workers / 1", f"{two / one:.2f}", note="no target"),
    ]
