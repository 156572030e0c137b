"""The facts about this machine and this relay that the figures depend on, for the header.

Cores matter most: Postgres, Redis, the receiver and the workers all share them. The relay's
arq settings (max_jobs, poll delay, queue read limit) bound throughput and latency, so they
are read from the relay's own configuration rather than restated here.
"""

from __future__ import annotations

import asyncio
import inspect
import os
import platform
import sys
from importlib import metadata

import asyncpg
import psutil
import redis.asyncio
from arq import Worker

from bench.config import BenchConfig
from bench.workers import PROJECT_ROOT
from worker.config import Settings
from worker.pool import worker_settings


def _relay_settings(config: BenchConfig) -> str:
    """The arq settings a bench worker runs with: the relay's defaults, as the workers get
    no POSTBACK_* variable but the bench's URLs and queue (model_construct: no environment)."""
    settings = Settings.model_construct(
        database_url=config.database_url, redis_url=config.redis_url
    )
    kwargs = worker_settings(settings)
    signature = inspect.signature(Worker).parameters
    poll_delay = kwargs.get("poll_delay", signature["poll_delay"].default)
    max_jobs = kwargs["max_jobs"]
    read_limit = kwargs.get("queue_read_limit") or max(max_jobs * 5, 100)  # arq's own rule
    return (
        f"max_jobs {max_jobs}, poll delay {poll_delay} s, queue read limit {read_limit}, "
        f"db pool {settings.db_pool_size}, request timeout {settings.request_timeout:g} s, "
        f"retry schedule {settings.retry_schedule}"
    )


def _peers(config: BenchConfig) -> str:
    """The throughput scenario's peers: the arq floor and no-op workers run the relay's own
    settings (above); the Celery peer its own libraries, Redis database and database."""
    try:
        libraries = ", ".join(
            f"{p} {metadata.version(p)}" for p in ("celery", "kombu", "requests", "psycopg")
        )
    except metadata.PackageNotFoundError as exc:
        return f"Celery peer not installed ({exc.name}): pip install -e '.[bench]'"
    return (
        f"arq floor and no-op jobs with the relay's settings; Celery peer: {libraries}, "
        f"Redis db {config.peer_redis_db}, database {config.peer_database_name}"
    )


async def _git(*args: str) -> str:
    proc = await asyncio.create_subprocess_exec(
        "git",
        "--no-optional-locks",  # read only: not even the index's stat cache is rewritten
        *args,
        cwd=PROJECT_ROOT,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.DEVNULL,
    )
    out, _ = await proc.communicate()
    return out.decode() if proc.returncode == 0 else ""


async def code_version() -> str:
    """The commit measured, and whether the working tree differs from it: figures belong to
    the code that produced them, and a shared tree changes under a run."""
    commit = (await _git("rev-parse", "--short", "HEAD")).strip()
    if not commit:
        return "unknown (not a git checkout)"
    changed = [
        line[3:]
        for line in (await _git("status", "--porcelain")).splitlines()
        if not line[3:].startswith("bench/")
    ]
    if not changed:
        return f"{commit}, clean"
    return f"{commit} + uncommitted changes: {', '.join(changed)}"


def load_average() -> str:
    """Other work on the machine (a test run, a build) skews every figure: say how much."""
    one, five, fifteen = os.getloadavg()
    return f"{one:.2f} {five:.2f} {fifteen:.2f} (1, 5, 15 min)"


async def collect(
    config: BenchConfig, db: asyncpg.Connection, client: redis.asyncio.Redis, capacity: float
) -> list[tuple[str, str]]:
    physical = psutil.cpu_count(logical=False)
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    info = await client.info("server")
    versions = ", ".join(
        f"{p} {metadata.version(p)}" for p in ("arq", "aiohttp", "asyncpg", "redis")
    )
    try:  # the workers' event loop (worker.pool.use_fast_loop)
        loop = f"uvloop {metadata.version('uvloop')}"
    except metadata.PackageNotFoundError:
        loop = "asyncio (uvloop not installed)"
    return [
        ("cores", f"{os.cpu_count()} logical ({physical} physical), {usable} usable by the bench"),
        ("load", load_average()),
        ("memory", f"{psutil.virtual_memory().total / 1024**3:.1f} GiB"),
        ("python", f"{platform.python_implementation()} {sys.version.split()[0]}"),
        ("platform", platform.platform()),
        ("postgres", str(await db.fetchval("SHOW server_version"))),
        ("redis", f"{info['redis_version']} at {config.redis_url}"),
        ("libraries", versions),
        ("event loop", loop),
        ("relay code", await code_version()),
        ("relay worker", _relay_settings(config)),
        (
            "receiver",
            f"{capacity:,.0f} req/s (50 concurrent aiohttp clients, 3 s; a lower bound), "
            "one port per affiliate",
        ),
        ("peers", _peers(config)),
        ("run", f"{config.run} (database {config.database_name}, Redis db {config.redis_db})"),
    ]
