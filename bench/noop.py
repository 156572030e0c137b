"""The no-op worker: `python -m bench.noop [--poll-delay S]` drains its queue in burst mode.

It is the relay's own arq configuration (`worker.pool.worker_settings`, read from the same
POSTBACK_* environment: max_jobs, poll delay, queue read limit, JSON serializer, Redis
settings, timeouts, event loop) with the delivery replaced by a function that returns at once, and
without the relay's startup (no Postgres pool, no HTTP session) or its sweep. Whatever this
worker achieves on the same Redis is the ceiling the queue itself sets; the throughput
scenario reports the relay's rate as a fraction of it.
"""

from __future__ import annotations

import argparse
from typing import Any

from arq.worker import func, run_worker

from producer.queue import JOB_NAME
from worker.config import Settings
from worker.pool import use_fast_loop, worker_settings


async def noop(ctx: dict[str, Any], event_data: Any) -> str:
    """Takes the event job's argument, as `deliver_event` does, and does nothing with it."""
    return "noop"


def settings(poll_delay: float | None = None) -> dict[str, Any]:
    """The relay's WorkerSettings with only the work taken out; `poll_delay` overrides
    the relay's (arq's default), to see what Redis and arq allow without that rhythm."""
    kwargs = worker_settings(Settings())
    if poll_delay is not None:
        kwargs["poll_delay"] = poll_delay
    kwargs.update(
        functions=[func(noop, name=JOB_NAME)],
        cron_jobs=[],
        on_startup=None,
        on_shutdown=None,
        ctx={},
    )
    return kwargs


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.noop", description=__doc__)
    parser.add_argument("--poll-delay", type=float, help="seconds (default: the relay's)")
    use_fast_loop()  # as the relay's worker does
    run_worker(settings(parser.parse_args().poll_delay), burst=True)


if __name__ == "__main__":
    main()
