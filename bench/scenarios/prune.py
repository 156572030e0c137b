"""Prune: enqueue to arrival latency at a steady rate while a million settled deliveries
are pruned, against the same run without pruning.

A database of its own (`postback_bench_<run id>_prune`) is filled in SQL
(`bench.ledger_fill`) with settled deliveries `AGO` to `AGO + DAYS` days old: younger than
the relay's default retention, so the worker's own prune (every 5 minutes, on the
defaults) finds nothing, and older than `KEEP`, which the `postback db prune` of the
measured run is given. Each round then runs a fresh worker (`python -m ops worker`, on that
database) at `RATE` events/s for `WINDOW` seconds without pruning, then a fresh worker
again with `postback db prune` started as the recording starts; that run goes on until the
prune has exited and at least `WINDOW` seconds have passed, so every batch it deleted fell
in the window. Each round has a database of its own, created, filled and dropped, so each
pair of runs starts from the same ledger and the machine's noise weighs on both sides.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

import asyncpg

from bench import ledger_fill, setup
from bench.config import BenchConfig
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
from bench.workers import PROJECT_ROOT, Supervisor, wait_ready, worker_env
from producer import Producer
from worker import database

NAME = "prune"
DEFAULT_DELIVERIES = 1_000_000
RATE = 200.0
"""Events/s delivered while pruning: the issue's figure."""
WINDOW = 60.0
"""Seconds of each run at least; a run with pruning lasts until the prune has finished."""
ROUNDS = 2
TARGET_RATIO = 2.0
"""p99 with pruning over p99 without, at most."""
KEEP = "1d"
"""The measured prune's POSTBACK_KEEP_SETTLED, _DEAD and _EXCERPTS: every filled row is
older."""
DAYS = 20
AGO = 2
"""The fill's arrivals span DAYS days up to AGO days ago: past KEEP, within the defaults
(30 days at the least) the worker's own prune goes by."""
PRUNE_TIMEOUT = 3600.0
"""Seconds after which a prune still running is killed and reported unfinished."""
SETTLE_TIMEOUT = 600.0
"""Seconds after the last publish by which every event must have arrived: a worker that
fell behind while the prune ran has a backlog to catch up on, and its latencies are the
finding, not a lost count."""


def prune_config(config: BenchConfig) -> BenchConfig:
    """The run's config with a database of the scenario's own: its name and its queues'
    still hold the run id, so the run's cleanup finds every key the scenario leaves."""
    return replace(config, run=f"{config.run}_prune")


@dataclass(frozen=True, slots=True)
class Run:
    """One run at the steady rate: its latencies and what it delivered."""

    latency: Percentiles
    events: int
    seconds: float


@dataclass(frozen=True, slots=True)
class Pruning:
    """What the `postback db prune` of a run did, counted in the ledger."""

    deliveries: int
    """Filled deliveries deleted."""
    attempts: int
    """Their attempts, deleted with them."""
    left: int
    """Filled deliveries still there: 0 when it finished."""
    seconds: float
    """From spawning the command to its exit."""
    finished: bool
    """It exited with status 0 within PRUNE_TIMEOUT and left no filled delivery."""


@dataclass(frozen=True, slots=True)
class Round:
    filled: dict[str, int]
    fill_seconds: float
    without: Run
    with_pruning: Run
    pruning: Pruning

    @property
    def ratio(self) -> float:
        return self.with_pruning.latency.p99 / self.without.latency.p99


async def _filled_counts(db: asyncpg.Connection) -> tuple[int, int]:
    """Deliveries and attempts of the fill: every affiliate but the bench's own."""
    row = await db.fetchrow(
        "SELECT (SELECT count(*) FROM deliveries WHERE affiliate_id <> ALL($1::text[])),"
        " (SELECT count(*) FROM attempts a JOIN deliveries d ON d.id = a.delivery_id"
        "  WHERE d.affiliate_id <> ALL($1::text[]))",
        list(AFFILIATES),
    )
    assert row is not None
    return row[0], row[1]


async def _prune(own: BenchConfig, queue: str, log_dir: Path) -> tuple[float, bool]:
    """`python -m ops db prune` on the scenario's database, with every retention KEEP;
    returns its seconds and whether it exited with 0 within PRUNE_TIMEOUT."""
    env = {
        **worker_env(own, queue),
        "POSTBACK_KEEP_SETTLED": KEEP,
        "POSTBACK_KEEP_DEAD": KEEP,
        "POSTBACK_KEEP_EXCERPTS": KEEP,
    }
    log_path = log_dir / f"prune-{time.monotonic_ns()}.log"
    with log_path.open("wb") as log:
        started = time.perf_counter()
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            *("-m", "ops", "db", "prune"),
            cwd=PROJECT_ROOT,
            env=env,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=log,
            stderr=log,
        )
    try:
        code = await asyncio.wait_for(proc.wait(), PRUNE_TIMEOUT)
    except TimeoutError:
        say(f"  the prune is still running after {PRUNE_TIMEOUT:.0f} s; killed")
        return time.perf_counter() - started, False
    finally:
        if proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()
    seconds = time.perf_counter() - started
    if code != 0:
        tail = "\n".join(log_path.read_text(errors="replace").splitlines()[-20:])
        say(f"  the prune exited with {code}:\n{tail}")
    return seconds, code == 0


class _Ledger:
    """A round's database, its connection, and what the bench's affiliates have been
    delivered in it."""

    def __init__(
        self, bench: Bench, own: BenchConfig, workers: Supervisor, db: asyncpg.Connection
    ) -> None:
        self.bench = bench
        self.own = own
        self.db = db
        self.workers = workers
        self.delivered = 0

    async def fill(self, deliveries: int) -> tuple[dict[str, int], float]:
        started = time.monotonic()
        counts = await ledger_fill.fill(
            self.own.database_url,
            deliveries,
            f"{self.own.run}-evt-",
            days=DAYS,
            ago=AGO,
            settled_only=True,
        )
        seconds = time.monotonic() - started
        await save_callbacks(self.bench, db=self.db)
        # The fill's gigabytes written out now: otherwise the checkpoint that follows it
        # lands on the first run, which is the one without pruning.
        await self.db.execute("CHECKPOINT")
        return counts, seconds

    async def run(
        self, label: str, rate: float, window: float, pruned: bool
    ) -> tuple[Run, Pruning | None]:
        """A fresh worker, its warm-up, then `rate` events/s for `window` seconds, with
        `postback db prune` running alongside when `pruned`, and for as long as it runs."""
        bench = self.bench
        queue = self.own.queue_name(label)
        await bench.receiver.reset()
        before = await _filled_counts(self.db) if pruned else (0, 0)
        worker = await self.workers.relay(queue, burst=False)
        try:
            ready = await wait_ready(worker, bench.redis, queue)
            say(f"{label}: worker ready in {ready:.1f} s; warming up with {WARMUP_EVENTS} events")
            async with await Producer.connect(self.own.redis_url, queue) as producer:
                await warm_up(producer, bench, label, rate)
                pruning = (
                    asyncio.create_task(_prune(self.own, queue, self.workers.log_dir))
                    if pruned
                    else None
                )
                alongside = ", and as long as the prune runs" if pruned else ""
                say(f"{label}: {rate:g} events/s for {window:g} s{alongside}")
                started = time.monotonic()
                published = 0
                # A second's events at a time, so the run stops within a second of the
                # prune's exit; the timetable restarts each second, a millisecond later.
                chunk = max(1, round(rate))
                try:
                    while True:
                        await paced(producer, bench, label, chunk, rate, WARMUP_EVENTS + published)
                        published += chunk
                        elapsed = time.monotonic() - started
                        if elapsed >= window and (pruning is None or pruning.done()):
                            break
                finally:
                    if pruning is not None and not pruning.done():
                        pruning.cancel()
                achieved = published / elapsed
            await arrived(bench, published, within=SETTLE_TIMEOUT)
            measured = await latencies(bench, published)
        finally:
            # Stopped before the ledger is read: SIGTERM lets the deliveries in flight finish.
            await worker.stop()
        self.delivered += WARMUP_EVENTS + published
        delivered = await setup.delivered(self.db, AFFILIATES)
        if delivered != self.delivered:
            raise InvalidMeasurement(
                f"ledger has {delivered:,} of {self.delivered:,} (warm-ups included) delivered"
            )
        run = Run(percentiles(measured, achieved), published, elapsed)
        if pruning is None:
            return run, None
        seconds, exited = pruning.result()
        after = await _filled_counts(self.db)
        result = Pruning(
            before[0] - after[0], before[1] - after[1], after[0], seconds, exited and not after[0]
        )
        say(
            f"  pruned {result.deliveries:,} deliveries and {result.attempts:,} attempts"
            f" in {seconds:.0f} s; {result.left:,} left"
        )
        return run, result


async def measure(
    bench: Bench,
    deliveries: int = DEFAULT_DELIVERIES,
    rate: float = RATE,
    window: float = WINDOW,
    rounds: int = ROUNDS,
) -> list[Round]:
    """Each round in a database of its own, created, filled, measured and dropped: each
    pair of runs starts from the same ledger, and nothing is left."""
    own = prune_config(bench.config)
    workers = Supervisor(own, bench.workers.log_dir)
    done = []
    try:
        for n in range(1, rounds + 1):
            say(f"round {n}: creating database {own.database_name}")
            await setup.create_database(own)
            db = await database.connect(own.database_url)
            try:
                ledger = _Ledger(bench, own, workers, db)
                filled, fill_seconds = await ledger.fill(deliveries)
                without, _ = await ledger.run(f"{NAME}-{n}-without", rate, window, False)
                with_pruning, pruning = await ledger.run(f"{NAME}-{n}-with", rate, window, True)
                assert pruning is not None
                done.append(Round(filled, fill_seconds, without, with_pruning, pruning))
            finally:
                await workers.kill_all()
                await db.close()
                await setup.drop_database(own)
    finally:
        await workers.kill_all()
    return done


def rows(rounds: list[Round], rate: float = RATE) -> list[Row]:
    """Each round's fill, its two runs, and their p99 ratio judged against the target."""
    out: list[Row] = []
    for n, done in enumerate(rounds, 1):
        filled = done.filled
        pruning = done.pruning
        out.append(
            Row(
                NAME,
                f"round {n}: fill",
                f"{done.fill_seconds:.0f} s",
                note=f"{filled['deliveries']:,} settled deliveries, {filled['attempts']:,}"
                f" attempts, {AGO} to {AGO + DAYS} days old",
            )
        )
        for what, run in (("without", done.without), ("with", done.with_pruning)):
            cut = run.latency
            out.append(
                Row(
                    NAME,
                    f"round {n}: {what} pruning, p50 / p95 / p99",
                    f"{cut.p50:.1f} / {cut.p95:.1f} / {cut.p99:.1f} ms",
                    note=f"enqueue→received; max {cut.worst:.0f} ms; {run.events:,} events in"
                    f" {run.seconds:.0f} s at {cut.achieved:.0f}/s, 1 worker",
                )
            )
        out.append(
            Row(
                NAME,
                f"round {n}: prune",
                f"{pruning.seconds:.0f} s",
                note=f"{pruning.deliveries:,} deliveries and {pruning.attempts:,} attempts"
                f" deleted while {rate:g} events/s flowed; "
                + ("finished" if pruning.finished else f"NOT finished, {pruning.left:,} left"),
            )
        )
        out.append(
            judged(
                NAME,
                f"round {n}: p99 with / without pruning",
                f"{done.ratio:.2f}",
                f"<= {TARGET_RATIO:g}",
                done.ratio <= TARGET_RATIO and pruning.finished,
            )
        )
    return out


async def run(bench: Bench) -> list[Row]:
    deliveries = bench.options.events or DEFAULT_DELIVERIES
    return rows(await measure(bench, deliveries))
