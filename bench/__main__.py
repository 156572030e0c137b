"""`python -m bench [SCENARIO ...] [--events N] ...`: run the scenarios, print the table.

Progress goes to stderr, the header and the table to stdout. The exit status is 0 when every
target is met, 1 when one is missed, 2 when a scenario failed or its count did not add up,
130 when interrupted (Ctrl-C or SIGTERM, after cleaning up).
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
import time
import traceback
from collections.abc import Sequence

from bench import facts
from bench.config import BenchConfig, Options
from bench.context import open_bench
from bench.progress import say
from bench.results import InvalidMeasurement, Row
from bench.scenarios import SCENARIOS
from bench.table import header, table


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m bench",
        description="Benchmarks of the postback relay against the real Redis and Postgres.",
        epilog="Servers: POSTBACK_BENCH_ADMIN_URL, POSTBACK_BENCH_REDIS_URL, "
        "POSTBACK_BENCH_REDIS_DB (default 14).",
    )
    parser.add_argument(
        "scenarios",
        nargs="*",
        choices=[*SCENARIOS, "all"],
        default="all",
        metavar="SCENARIO",
        help=f"any of {', '.join(SCENARIOS)} (default: all)",
    )
    parser.add_argument(
        "--events",
        type=int,
        help="the scenario's main count: throughput 20000 per run, latency rate x seconds per "
        "run, isolation 5000 healthy, memory 100000 queued, scale 10000 per worker, ingest 20000 "
        "per run in batches, ledger 5000000 deliveries, prune 1000000 settled deliveries pruned",
    )
    parser.add_argument("--rate", type=float, default=300.0, help="latency: events/s (300)")
    parser.add_argument(
        "--seconds", type=float, default=30.0, help="latency: duration of each run (30)"
    )
    parser.add_argument(
        "--memory-window", type=float, default=20.0, help="memory: seconds sampled (20)"
    )
    parser.add_argument(
        "--plans",
        metavar="FILE",
        help="ledger: write the query plans of each operation (EXPLAIN ANALYZE, BUFFERS) to FILE",
    )
    return parser


def _selected(names: Sequence[str] | str) -> list[str]:
    chosen = [names] if isinstance(names, str) else list(names)
    if not chosen or "all" in chosen:
        return list(SCENARIOS)
    return list(dict.fromkeys(chosen))


async def _run(names: list[str], config: BenchConfig, options: Options) -> list[Row]:
    rows: list[Row] = []
    # SIGTERM cancels the run like Ctrl-C does, so the cleanup in every `finally` still runs.
    main_task = asyncio.current_task()
    assert main_task is not None
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, main_task.cancel)
    async with open_bench(config, options) as bench:
        say("measuring the receiver's capacity")
        capacity = await bench.receiver.capacity()
        print(header(await facts.collect(config, bench.db, bench.redis, capacity)), flush=True)
        print(flush=True)
        for name in names:
            say(f"=== {name}")
            started = time.monotonic()
            try:
                rows += await SCENARIOS[name](bench)
            except InvalidMeasurement as exc:
                rows.append(Row(name, "(not measured)", "-", status="INVALID", note=str(exc)))
                say(f"{name}: INVALID: {exc}")
            except Exception as exc:
                traceback.print_exc(file=sys.stderr)
                what = str(exc).splitlines()[0] if str(exc) else ""
                rows.append(
                    Row(
                        name, "(crashed)", "-", status="ERROR", note=f"{type(exc).__name__}: {what}"
                    )
                )
            finally:
                await bench.tidy()
            say(f"{name} took {time.monotonic() - started:.0f} s")
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    options = Options(
        events=args.events,
        rate=args.rate,
        seconds=args.seconds,
        memory_window=args.memory_window,
        plans=args.plans,
    )
    started = time.monotonic()
    try:
        rows = asyncio.run(_run(_selected(args.scenarios), BenchConfig.from_env(), options))
    except (KeyboardInterrupt, asyncio.CancelledError):
        say("interrupted; everything the run made has been removed")
        return 130
    print(table(rows))
    print(f"\ntotal wall time {time.monotonic() - started:.0f} s; load {facts.load_average()}")
    statuses = {row.status for row in rows}
    if statuses & {"INVALID", "ERROR"}:
        return 2
    return 1 if "FAIL" in statuses else 0


if __name__ == "__main__":
    raise SystemExit(main())
