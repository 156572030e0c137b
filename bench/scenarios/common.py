"""What several scenarios share: the affiliates, and a timed, checked burst run."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence

from bench import setup
from bench.context import Bench
from bench.progress import say
from bench.results import InvalidMeasurement

AFFILIATES = tuple(f"aff{n:02d}" for n in range(10))


def burst_timeout(events: int) -> float:
    """Generous: a burst run slower than 20 events/s has gone wrong, not slow."""
    return 120.0 + events / 20


async def save_callbacks(bench: Bench, affiliates: Sequence[str] = AFFILIATES) -> None:
    """Each affiliate's callback on a receiver port of its own, as each affiliate has its
    own host in production (the relay's per-destination limits see them apart)."""
    urls = {a: bench.receiver.url_for(n) for n, a in enumerate(affiliates)}
    await setup.save_callbacks(bench.db, urls)


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
