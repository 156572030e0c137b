"""Throughput: deliveries per second of the relay, and of its peers, in the same run.

Every run drains the same number of events, enqueued beforehand, against the same receiver:

- the relay with one burst worker, then with each worker count that may be the best for the
  machine (`worker_counts`: with 2 usable cores, 2 and 3); each timed from spawning the
  workers to the last one's exit, and checked in the ledger and at the receiver;
- the floor (bench/floor.py): an arq burst worker with the relay's settings and event loop
  whose job makes one aiohttp GET to the receiver, no ledger. One relay worker is judged
  against it: what the relay's own work (validation, the ledger, rendering, counters)
  leaves of what arq plus one request allow;
- the no-op arq worker (bench/noop.py), the same with a job that does nothing, and, for
  information, the no-op worker with a 10 ms poll delay: the queue's own ceilings;
- the Celery peer (bench/celery_peer.py): Celery + requests + one Postgres row per attempt,
  prefork pool of 4, on a Redis database and a Postgres database of its own; timed from
  spawning its worker to the receiver's last arrival (a Celery worker has no burst mode), so
  its shutdown is not counted, to its advantage. The relay at its best worker count is
  judged against it.

For the relay and the peer, the CPU time of the Postgres backends serving their database is
read while they run (bench/pgcpu.py) and divided by the deliveries.
"""

from __future__ import annotations

import asyncio
import os
import time
from dataclasses import dataclass

from bench import celery_client, events, setup
from bench.context import Bench
from bench.pgcpu import BackendCpu
from bench.progress import say
from bench.results import InvalidMeasurement, Row, judged
from bench.scenarios.common import AFFILIATES, burst_timeout, save_callbacks, timed_burst
from bench.workers import WorkerProcess
from producer.queue import queue_depth

NAME = "throughput"
DEFAULT_EVENTS = 20_000
TARGET_FLOOR_RATIO = 0.55
"""One relay worker against the arq floor job."""
TARGET_PEER_RATIO = 1.5
"""The relay at its best worker count against the Celery peer."""
FAST_POLL_DELAY = 0.01
PEER_CONCURRENCY = 4
POLL = 0.05


@dataclass(frozen=True, slots=True)
class Measured:
    count: int
    seconds: float
    pg_cpu: float | None = None
    """Seconds of Postgres backend CPU, None when not measured."""
    backends: int = 0
    commits: int | None = None
    """Transactions committed in its database during the run."""

    @property
    def rate(self) -> float:
        return self.count / self.seconds

    @property
    def pg_ms(self) -> str:
        """Postgres backend CPU per delivery, for the table."""
        if self.pg_cpu is None:
            return "n/a"
        return f"{self.pg_cpu / self.count * 1000:.3f} ms"

    def pg_note(self) -> str:
        notes = []
        if self.pg_cpu is not None:
            notes.append(f"{self.pg_cpu:.2f} s of CPU in {self.backends} client backends")
        if self.commits is not None:
            notes.append(f"{self.commits / self.count:.2f} commits per delivery")
        return "; ".join(notes)


def _workers(n: int) -> str:
    return f"{n} worker{'s' if n > 1 else ''}"


def usable_cores() -> int:
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def worker_counts(cores: int) -> list[int]:
    """The relay's worker counts tried beside 1: half the cores, all of them, one more."""
    return sorted({max(2, cores // 2), max(2, cores), cores + 1})


def _receivers(bench: Bench) -> dict[str, str]:
    """Each affiliate's receiver base URL, as its callback has it (common.save_callbacks)."""
    return {a: bench.receiver.url_for(n) for n, a in enumerate(AFFILIATES)}


async def _enqueue(bench: Bench, label: str, count: int) -> str:
    queue = bench.config.queue_name(f"{NAME}-{label}")
    say(f"throughput: enqueueing {count:,} events ({label})")
    batch = events.spread(bench.config, f"{NAME}-{label}", count, AFFILIATES)
    took = await events.enqueue(bench.config, queue, batch)
    say(f"  enqueued in {took:.1f} s ({count / took:,.0f}/s)")
    return queue


async def _relay(bench: Bench, count: int, workers: int) -> Measured:
    await setup.empty_ledger(bench.db)
    await save_callbacks(bench)
    queue = await _enqueue(bench, f"relay-{workers}", count)
    sampler = BackendCpu(
        bench.config.admin_url, bench.config.database_name, exclude=[bench.db.get_server_pid()]
    )
    await sampler.start()
    try:
        seconds = await timed_burst(bench, queue, count, workers=workers)
    finally:
        cpu = await sampler.stop()
    if sampler.unavailable:
        say(f"  Postgres backend CPU not measured: {sampler.unavailable}")
    measured = Measured(count, seconds, cpu, sampler.backends, sampler.commits)
    say(
        f"  relay, {_workers(workers)}: {measured.rate:,.0f} deliveries/s; Postgres backends "
        f"{measured.pg_ms} of CPU per delivery"
    )
    return measured


async def _drained(bench: Bench, worker: WorkerProcess, queue: str, count: int) -> float:
    """Seconds for an arq burst worker, spawn to exit; it must leave the queue empty."""
    seconds = await worker.wait(burst_timeout(count))
    depth = await queue_depth(bench.redis, queue)
    if depth.due + depth.later:
        raise InvalidMeasurement(
            f"the {worker.label} exited with {depth.due + depth.later} jobs still queued"
        )
    return seconds


async def _noop(bench: Bench, count: int, label: str, poll_delay: float | None = None) -> float:
    queue = await _enqueue(bench, label, count)
    return await _drained(bench, await bench.workers.noop(queue, poll_delay), queue, count)


async def _floor(bench: Bench, count: int) -> float:
    queue = await _enqueue(bench, "floor", count)
    await bench.receiver.reset()
    seconds = await _drained(
        bench, await bench.workers.floor(queue, _receivers(bench)), queue, count
    )
    received = (await bench.receiver.stats()).count(list(AFFILIATES))
    if received != count:
        raise InvalidMeasurement(f"the floor worker made {received:,} requests for {count:,} jobs")
    return seconds


async def _arrived(bench: Bench, worker: WorkerProcess, count: int) -> float:
    """Wait for `count` arrivals at the receiver; returns the last one's time.time()."""
    deadline = time.monotonic() + burst_timeout(count)
    while True:
        stats = await bench.receiver.stats()
        if stats.total >= count and stats.last is not None:
            return stats.last
        if not worker.running:
            raise RuntimeError(f"the {worker.label} exited:\n{worker.log_tail()}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"{stats.total:,} of {count:,} arrived from the {worker.label}")
        await asyncio.sleep(POLL)


async def _logged(bench: Bench, count: int) -> None:
    """Wait (briefly) until the peer's log has a row for each of `count` arrivals."""
    deadline = time.monotonic() + 10
    while (await celery_client.attempts(bench.config))[0] < count:
        if time.monotonic() > deadline:
            return  # the check after the run says what is missing
        await asyncio.sleep(POLL)


async def _peer(bench: Bench, count: int) -> Measured:
    config = bench.config
    say(f"throughput: creating the Celery peer's database {config.peer_database_name}")
    await celery_client.create_database(config)
    try:
        receivers = _receivers(bench)
        batch = events.spread(config, f"{NAME}-peer", count, AFFILIATES)
        say(f"throughput: sending {count:,} tasks to the Celery peer")
        took = await celery_client.enqueue(config, [(receivers[e.affiliate_id], e) for e in batch])
        say(
            f"  sent in {took:.1f} s; starting its worker (prefork, concurrency {PEER_CONCURRENCY})"
        )
        await bench.receiver.reset()
        sampler = BackendCpu(config.admin_url, config.peer_database_name)
        await sampler.start()
        try:
            worker = await bench.workers.celery(celery_client.worker_env(config), PEER_CONCURRENCY)
            last = await _arrived(bench, worker, count)
            await _logged(bench, count)
        finally:
            cpu = await sampler.stop()
        await worker.stop()
        received = (await bench.receiver.stats()).count(list(AFFILIATES))
        logged, ok = await celery_client.attempts(config)
        if not received == logged == ok == count:
            raise InvalidMeasurement(
                f"Celery peer: {count:,} tasks, {received:,} received, {logged:,} attempts "
                f"logged ({ok:,} successful)"
            )
        say(f"  checked: {count:,} received, {logged:,} attempts logged, all successful")
    finally:
        await bench.workers.kill_all()
        await celery_client.drop_database(config)
        deleted = await celery_client.forget_keys(config)
        say(f"  dropped the peer's database; deleted {deleted:,} of its Redis keys")
    # Its commits are left out: its worker is still running, and a backend that stays
    # connected reports them only every few seconds.
    measured = Measured(count, last - worker.started_wall, cpu, sampler.backends)
    say(
        f"  Celery peer: {measured.rate:,.0f} deliveries/s; Postgres backends "
        f"{measured.pg_ms} of CPU per delivery"
    )
    return measured


async def run(bench: Bench) -> list[Row]:
    count = bench.options.events or DEFAULT_EVENTS
    cores = usable_cores()

    relays = {1: await _relay(bench, count, 1)}
    floor = Measured(count, await _floor(bench, count))
    say(f"  floor: {floor.rate:,.0f} jobs/s")
    noop = Measured(count, await _noop(bench, count, "noop"))
    say(f"  no-op: {noop.rate:,.0f} jobs/s")
    fast = Measured(count, await _noop(bench, count, "noop-fast", FAST_POLL_DELAY))
    say(f"  no-op, {FAST_POLL_DELAY * 1000:g} ms poll delay: {fast.rate:,.0f} jobs/s")
    for workers in worker_counts(cores):
        relays[workers] = await _relay(bench, count, workers)
    peer = await _peer(bench, count)

    one = relays[1]
    best_workers = max(relays, key=lambda n: relays[n].rate)
    best = relays[best_workers]
    tried = ", ".join(f"{n}: {m.rate:,.0f}/s" for n, m in sorted(relays.items()))
    floor_ratio = one.rate / floor.rate
    peer_ratio = best.rate / peer.rate
    checked = "all delivered (ledger + receiver)"
    rows = [
        Row(
            NAME,
            "relay, 1 worker",
            f"{one.rate:,.0f}/s",
            note=f"{count:,} events, spawn to exit {one.seconds:.1f} s, {checked}",
        ),
        Row(
            NAME,
            f"relay, best count: {_workers(best_workers)}",
            f"{best.rate:,.0f}/s",
            note=f"{count:,} events each; tried ({cores} usable cores) {tried}",
        ),
        Row(
            NAME,
            "arq floor job, 1 worker",
            f"{floor.rate:,.0f}/s",
            note=f"{count:,} jobs, spawn to exit {floor.seconds:.1f} s; one aiohttp GET per job, "
            "no ledger, the relay's arq settings and event loop",
        ),
        Row(
            NAME,
            "no-op arq job, 1 worker",
            f"{noop.rate:,.0f}/s",
            note=f"{count:,} jobs, spawn to exit {noop.seconds:.1f} s, the relay's arq settings; "
            f"relay at {one.rate / noop.rate:.2f} of it",
        ),
        Row(
            NAME,
            f"no-op, {FAST_POLL_DELAY * 1000:g} ms poll delay",
            f"{fast.rate:,.0f}/s",
            note=f"{count:,} jobs, spawn to exit {fast.seconds:.1f} s",
        ),
        Row(
            NAME,
            "Celery + requests + Postgres row",
            f"{peer.rate:,.0f}/s",
            note=f"{count:,} tasks, prefork concurrency {PEER_CONCURRENCY}, spawn to last "
            f"arrival {peer.seconds:.1f} s; its own Redis db and database",
        ),
        judged(
            NAME,
            "relay 1 worker / floor",
            f"{floor_ratio:.2f}",
            f">= {TARGET_FLOOR_RATIO}",
            floor_ratio >= TARGET_FLOOR_RATIO,
        ),
        judged(
            NAME,
            f"relay {_workers(best_workers)} / Celery",
            f"{peer_ratio:.2f}",
            f">= {TARGET_PEER_RATIO}",
            peer_ratio >= TARGET_PEER_RATIO,
        ),
        judged(
            NAME,
            "Postgres CPU/delivery, relay 1 worker",
            one.pg_ms,
            "reported",
            one.pg_cpu is not None,
            note=one.pg_note() or "not measurable: see the progress lines",
        ),
    ]
    if best_workers != 1:
        rows.append(
            Row(
                NAME,
                f"Postgres CPU/delivery, relay {_workers(best_workers)}",
                best.pg_ms,
                note=best.pg_note(),
            )
        )
    rows.append(Row(NAME, "Postgres CPU/delivery, Celery peer", peer.pg_ms, note=peer.pg_note()))
    return rows
