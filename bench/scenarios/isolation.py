"""Isolation: how much one affiliate whose server never answers slows everyone else.

Runs of the same healthy events (9 affiliates): alone, and with one event in 11 going to a
tenth affiliate whose callback points at the blackhole, which accepts the connection and
never answers. The relay runs on its defaults: 10 blackholed requests at a time hold a job
slot each for the request timeout (10 s), and the rest are put off for the destination
(its cap, then its open circuit) without holding one. Each run is timed from the
receiver's first healthy arrival to the moment the ledger has every healthy delivery
`delivered` (polled), so the worker's startup is left out; the worker is then stopped with
SIGTERM.

The two kinds of run alternate, ROUNDS times, and the figures are the medians: on a
machine shared with Postgres, Redis and the receiver one run's rate varies by a tenth or
more, which a single pair of runs would put straight into the ratio.
"""

from __future__ import annotations

import asyncio
import statistics
import time

from bench import events, setup
from bench.context import Bench
from bench.progress import say
from bench.results import InvalidMeasurement, Row, judged
from bench.scenarios.common import AFFILIATES
from bench.workers import wait_ready
from producer import Event

NAME = "isolation"
DEFAULT_HEALTHY = 5_000
HEALTHY_PER_BLACKHOLED = 10
BLACKHOLED = AFFILIATES[-1]
HEALTHY = AFFILIATES[:-1]
TARGET_RATIO = 0.9
ROUNDS = 3
TIMEOUT = 300.0
"""Seconds a run may take to deliver every healthy event; past it, the rate so far is
reported (and the ratio fails)."""
POLL = 0.05


def _events(bench: Bench, phase: str, healthy: int, with_blackholed: bool) -> list[Event]:
    """`healthy` events round-robin over the healthy affiliates, and, if asked, one for the
    blackholed affiliate after every HEALTHY_PER_BLACKHOLED of them."""
    label = f"{NAME}-{phase}"
    made: list[Event] = []
    for n in range(healthy):
        made.append(events.event(bench.config, label, n, HEALTHY[n % len(HEALTHY)]))
        if with_blackholed and n % HEALTHY_PER_BLACKHOLED == HEALTHY_PER_BLACKHOLED - 1:
            made.append(events.event(bench.config, label, healthy + n, BLACKHOLED))
    return made


async def _phase(
    bench: Bench, phase: str, healthy: int, with_blackholed: bool
) -> tuple[float, str]:
    """Healthy deliveries per second in one run, and a note on it."""
    queue = bench.config.queue_name(f"{NAME}-{phase}")
    batch = _events(bench, phase, healthy, with_blackholed)
    blackholed = len(batch) - healthy
    say(f"isolation ({phase}): enqueueing {healthy:,} healthy + {blackholed:,} blackholed")
    await events.enqueue(bench.config, queue, batch)
    await bench.receiver.reset()
    worker = await bench.workers.relay(queue, burst=False, label=f"worker ({phase})")
    await wait_ready(worker, bench.redis, queue)
    deadline = time.monotonic() + TIMEOUT
    while (done := await setup.delivered(bench.db, HEALTHY)) < healthy:
        if not worker.running:
            raise RuntimeError(f"the worker exited:\n{worker.log_tail()}")
        if time.monotonic() > deadline:
            break
        await asyncio.sleep(POLL)
    finished = time.time()
    stats = await bench.receiver.stats()
    say(f"  stopping the worker (SIGTERM); {stats.blackhole_open} requests held by the blackhole")
    await worker.stop()
    if stats.first is None or done == 0:
        raise InvalidMeasurement(f"no healthy delivery in {phase} run:\n{worker.log_tail()}")
    received = stats.count(list(HEALTHY))
    if received < done:
        raise InvalidMeasurement(f"ledger says {done:,} delivered, receiver got {received:,}")
    seconds = finished - stats.first
    rate = done / seconds
    note = f"{done:,} healthy in {seconds:.1f} s"
    if blackholed:
        note += f"; {stats.blackhole_connections:,} requests reached the blackhole"
    if done < healthy:
        note += f"; INCOMPLETE: {done:,} of {healthy:,} after {TIMEOUT:.0f} s"
    say(f"  {phase}: {rate:,.0f} healthy deliveries/s ({note})")
    return rate, note


async def _callbacks(bench: Bench) -> None:
    """The same callbacks in both runs; the alone run just sends the blackholed one nothing."""
    urls = {a: bench.receiver.url_for(n) for n, a in enumerate(HEALTHY)}
    urls[BLACKHOLED] = bench.receiver.blackhole_url
    await setup.save_callbacks(bench.db, urls)


async def run(bench: Bench) -> list[Row]:
    healthy = bench.options.events or DEFAULT_HEALTHY
    rates: dict[bool, list[float]] = {False: [], True: []}
    incomplete: list[str] = []
    for round_ in range(1, ROUNDS + 1):
        for with_blackholed in (False, True):
            await setup.empty_ledger(bench.db)
            await _callbacks(bench)
            phase = f"{'blackholed' if with_blackholed else 'alone'}-{round_}"
            rate, note = await _phase(bench, phase, healthy, with_blackholed)
            rates[with_blackholed].append(rate)
            if "INCOMPLETE" in note:
                incomplete.append(f"{phase}: {note}")
    alone, mixed = statistics.median(rates[False]), statistics.median(rates[True])
    ratio = mixed / alone

    def runs(of: list[float]) -> str:
        said = f"median of {ROUNDS} runs of {healthy:,}: " + ", ".join(f"{r:,.0f}" for r in of)
        return "; ".join([said, *incomplete])

    return [
        Row(NAME, "healthy alone", f"{alone:,.0f}/s", note=runs(rates[False])),
        Row(NAME, "healthy, 1 of 10 blackholed", f"{mixed:,.0f}/s", note=runs(rates[True])),
        judged(
            NAME,
            "blackholed / alone",
            f"{ratio:.2f}",
            f">= {TARGET_RATIO}",
            ratio >= TARGET_RATIO,
            note="1 worker, default timeouts and retry schedule; runs alternate",
        ),
    ]
