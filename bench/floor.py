"""The floor worker: `python -m bench.floor --receiver AFFILIATE=URL ...` drains its queue in
burst mode, one HTTP GET per job.

It is the relay's own arq configuration (`worker.pool.worker_settings`, read from the same
POSTBACK_* environment, and the relay's event loop), as the no-op worker (bench/noop.py) is,
with a job that makes the one request a delivery makes and nothing else: a GET to the
receiver port of the event's affiliate through one aiohttp session shared by the process,
its body read. No validation, no ledger, no rendering, no counters, no sweep. It is the
floor for an arq job that makes one request; the throughput scenario reports one relay
worker's rate as a fraction of it.
"""

from __future__ import annotations

import argparse
from typing import Any

import aiohttp
from arq.worker import func, run_worker

from producer.queue import JOB_NAME
from worker.config import Settings
from worker.pool import use_fast_loop, worker_settings


async def get(ctx: dict[str, Any], event_data: Any) -> None:
    """Takes the event job's argument, as `deliver_event` does, and GETs the receiver of the
    event's affiliate: the port its callback points at in the relay's runs."""
    affiliate = event_data["affiliate_id"]
    url = f"{ctx['receivers'][affiliate]}/{affiliate}/pb?event={event_data['id']}"
    async with ctx["http"].get(url) as response:
        await response.read()


async def _startup(ctx: dict[str, Any]) -> None:
    # As the relay's session: no pool-wide cap on connections (worker.deliver.session).
    ctx["http"] = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0))


async def _shutdown(ctx: dict[str, Any]) -> None:
    if "http" in ctx:
        await ctx["http"].close()


def settings(receivers: dict[str, str]) -> dict[str, Any]:
    """The relay's WorkerSettings with the job replaced by one GET; `receivers` maps each
    affiliate to its receiver's base URL."""
    kwargs = worker_settings(Settings())
    kwargs.update(
        functions=[func(get, name=JOB_NAME)],
        cron_jobs=[],
        on_startup=_startup,
        on_shutdown=_shutdown,
        ctx={"receivers": receivers},
    )
    return kwargs


def _receiver(value: str) -> tuple[str, str]:
    affiliate, sep, url = value.partition("=")
    if not sep or not affiliate or not url:
        raise argparse.ArgumentTypeError(f"expected AFFILIATE=URL, got {value!r}")
    return affiliate, url.rstrip("/")


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.floor", description=__doc__)
    parser.add_argument(
        "--receiver",
        type=_receiver,
        action="append",
        required=True,
        metavar="AFFILIATE=URL",
        help="the receiver's base URL for an affiliate (once per affiliate)",
    )
    args = parser.parse_args()
    use_fast_loop()  # as the relay's worker does
    run_worker(settings(dict(args.receiver)), burst=True)


if __name__ == "__main__":
    main()
