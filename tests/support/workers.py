"""Workers for the tests: in the test's own event loop, or as a `postback worker` process."""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import time
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from signal import Signals
from typing import Any

import redis.exceptions

from ops.cli.demo import running
from producer.connection import open_redis
from producer.queue import health_check_key
from tests import leakcheck
from tests.support.cli import POSTBACK, postback_env
from worker.config import Settings
from worker.pool import create_worker

POLL_DELAY = 0.01
"""Seconds between a test worker's looks at the queue: a test waits for no longer."""


async def drain(settings: Settings) -> None:
    """Run a worker until the queue is empty, as `postback worker --burst` does."""
    worker = create_worker(settings, burst=True, handle_signals=False, poll_delay=POLL_DELAY)
    try:
        await worker.async_run()
    finally:
        await worker.close()


def running_worker(settings: Settings) -> contextlib.AbstractAsyncContextManager[None]:
    """A worker running in this event loop for the block, as `postback worker` runs."""
    return running(create_worker(settings, handle_signals=False, poll_delay=POLL_DELAY))


# --- a worker process --------------------------------------------------------------------

FAST: dict[str, Any] = {
    # Small enough that a job orphaned by a dead worker is run again after 13 s
    # (arq: job timeout + 10 s), large enough for the rule job > connect + 0.5 + request.
    "job_timeout": 3.0,
    "request_timeout": 2.0,
    "connect_timeout": 0.4,
    "log_level": "info",
}


def worker_settings(settings: Settings, **overrides: Any) -> Settings:
    """The run's settings with FAST and `overrides`, validated as the subprocess will."""
    return Settings(**{**settings.model_dump(), **FAST, **overrides})


@dataclass
class WorkerProcess:
    """`postback worker` with its stdout and stderr read line by line as they come."""

    process: asyncio.subprocess.Process
    stdout: list[str] = field(default_factory=list)
    stderr: list[str] = field(default_factory=list)
    readers: list[asyncio.Task[None]] = field(default_factory=list)

    def signal(self, signum: signal.Signals) -> None:
        self.process.send_signal(signum)

    async def exited(self, within: float) -> int:
        """The exit code, once the process has exited and its output has all been read."""
        async with asyncio.timeout(within):
            code = await self.process.wait()
            await asyncio.gather(*self.readers)
        return code

    async def stop(self, within: float, signum: Signals = Signals.SIGTERM) -> tuple[int, float]:
        """SIGTERM, as a supervisor stops it (or `signum`: SIGINT is Ctrl-C); the exit code
        and the seconds it took."""
        started = time.monotonic()
        self.signal(signum)
        code = await self.exited(within)
        return code, time.monotonic() - started

    def logs(self) -> list[dict[str, Any]]:
        """The JSON log lines of stderr (any other line is skipped here; see `errors`)."""
        found = []
        for line in self.stderr:
            with contextlib.suppress(ValueError):
                record = json.loads(line)
                if isinstance(record, dict):
                    found.append(record)
        return found

    def events(self, name: str) -> list[dict[str, Any]]:
        return [record for record in self.logs() if record.get("event") == name]

    def about(self, event_ids: Iterable[str]) -> str:
        """For a failure message: the log lines naming these events, and every error."""
        wanted = set(event_ids)
        lines = [json.dumps(r) for r in self.logs() if r.get("event_id") in wanted]
        return "\n".join([f"events: {sorted(wanted)}", *lines, "errors:", *self.errors()])

    def plain(self) -> list[str]:
        """Lines of stderr that are not JSON log lines: a traceback, a crash."""
        return [line for line in self.stderr if not _json_object(line)]

    def errors(self) -> list[str]:
        """Lines logged at error level or above, or not JSON at all."""
        logged = [json.dumps(r) for r in self.logs() if r.get("level") in ("error", "critical")]
        return self.plain() + logged


def _json_object(line: str) -> bool:
    try:
        return isinstance(json.loads(line), dict)
    except ValueError:
        return False


async def _read_lines(stream: asyncio.StreamReader | None, into: list[str]) -> None:
    assert stream is not None
    while line := await stream.readline():
        into.append(line.decode())


@contextlib.asynccontextmanager
async def worker_process(settings: Settings, cwd: Path) -> AsyncIterator[WorkerProcess]:
    """A running worker subprocess configured with `settings`; killed if still running after."""
    process = await asyncio.create_subprocess_exec(
        *POSTBACK,
        "worker",
        env=postback_env(settings),
        cwd=cwd,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        limit=2**20,
    )
    worker = WorkerProcess(process)
    worker.readers = [
        asyncio.create_task(_read_lines(process.stdout, worker.stdout)),
        asyncio.create_task(_read_lines(process.stderr, worker.stderr)),
    ]
    try:
        yield worker
    finally:
        if process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                process.kill()
        if await worker.exited(30) != 0:
            await _forget_health_check(settings)
        leakcheck.logged("\n".join(worker.stderr))


async def kill_hard(worker: WorkerProcess) -> None:
    worker.signal(signal.SIGKILL)
    assert await worker.exited(10) == -signal.SIGKILL


async def _forget_health_check(settings: Settings) -> None:
    """A killed worker leaves its health-check key behind for an hour: the run's queue name
    is in it, but not under `arq:`, where the run's clean-up looks. Opened as the relay
    opens Redis, so a Sentinel URL finds the primary."""
    assert settings.redis_url is not None
    client = open_redis(settings.redis_url, settings.queue_name)
    try:
        # A Redis that is gone (a failover test's killed primary) took the key with it; and a
        # clean-up must not hide the test's own failure behind its own.
        with contextlib.suppress(redis.exceptions.ConnectionError):
            await client.delete(health_check_key(settings.queue_name))
    finally:
        await client.aclose()
