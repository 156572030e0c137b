"""Worker processes: the relay's own `python -m ops worker`, and its peers: the no-op and
floor arq workers, and the Celery peer's worker.

Workers run as separate processes, as in production, so that their CPU time, memory and
event loop are theirs alone and can be measured. Every process started here is tracked, so
the bench can kill whatever is left when a scenario fails halfway.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import psutil
import redis.asyncio

from bench.config import ALLOW_NETWORKS, BenchConfig
from producer.queue import worker_report

PROJECT_ROOT = Path(__file__).resolve().parent.parent

READY_TIMEOUT = 30.0
"""Seconds a worker may take to connect to Redis and Postgres and start polling."""

STOP_GRACE = 40.0
"""Seconds a SIGTERMed worker gets before it is killed: the relay lets in-flight deliveries
run for POSTBACK_SHUTDOWN_WAIT (20 s by default) and a blackholed one times out in 10 s."""


def worker_env(config: BenchConfig, queue_name: str) -> dict[str, str]:
    """The environment of a worker: the bench's servers and queue, nothing else of the caller's.

    Every POSTBACK_* variable of the caller is dropped, so the relay runs on its defaults
    (timeouts, retry schedule, max_jobs, pool size) whatever the shell that ran the bench
    had set, and results compare across machines and runs.
    """
    env = {k: v for k, v in os.environ.items() if not k.startswith("POSTBACK_")}
    env.update(
        POSTBACK_DATABASE_URL=config.database_url,
        POSTBACK_REDIS_URL=config.redis_url,
        POSTBACK_QUEUE_NAME=queue_name,
        POSTBACK_ALLOW_NETWORKS=ALLOW_NETWORKS,
        POSTBACK_LOG_LEVEL="warning",
        # Never used with both URLs set; pointed away from the tree so nothing lands there.
        POSTBACK_DATA_DIR=str(Path(tempfile.gettempdir()) / f"postback-bench-{config.run}"),
    )
    return env


@dataclass
class WorkerProcess:
    """One worker process, its log file, and when it was started."""

    label: str
    proc: asyncio.subprocess.Process
    log_path: Path
    started: float
    """time.perf_counter() just before the process was spawned."""
    started_wall: float = 0.0
    """time.time() at the same moment, to compare with the receiver's arrival times."""
    group: bool = False
    """It leads a process group of its own (a Celery worker and its pool), killed whole."""

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def running(self) -> bool:
        return self.proc.returncode is None

    async def wait(self, within: float) -> float:
        """Wait for the process to exit; returns seconds from spawn to exit.

        Raises RuntimeError (with the end of its log) when it fails or outlives `within`
        seconds, in which case it is killed.
        """
        try:
            code = await asyncio.wait_for(self.proc.wait(), within)
        except TimeoutError:
            self.kill()
            raise RuntimeError(f"{self.label} still running after {within:.0f} s") from None
        elapsed = time.perf_counter() - self.started
        if code != 0:
            raise RuntimeError(f"{self.label} exited with {code}:\n{self.log_tail()}")
        return elapsed

    async def stop(self, grace: float = STOP_GRACE) -> None:
        """SIGTERM, the way a supervisor stops it; SIGKILL if it does not exit in `grace`."""
        if not self.running:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(self.proc.wait(), grace)
        except TimeoutError:
            self.kill()
            await self.proc.wait()

    def kill(self) -> None:
        if self.group and (self.running or self.proc.returncode != 0):
            # The pool's processes too, even when the leader died first.
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
        elif self.running:
            with contextlib.suppress(ProcessLookupError):
                self.proc.kill()

    def log_tail(self, lines: int = 20) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:]) or "(empty log)"


class Supervisor:
    """Starts worker processes and remembers them all, to kill any left at the end."""

    def __init__(self, config: BenchConfig, log_dir: Path) -> None:
        self.config = config
        self.log_dir = log_dir
        self.started: list[WorkerProcess] = []

    async def relay(self, queue_name: str, *, burst: bool, label: str = "worker") -> WorkerProcess:
        """`python -m ops worker [--burst]`: the relay's worker exactly as deployed."""
        args = ["-m", "ops", "worker", *(["--burst"] if burst else [])]
        return await self._spawn(label, queue_name, args)

    async def noop(self, queue_name: str, poll_delay: float | None = None) -> WorkerProcess:
        """`python -m bench.noop`: a burst worker with the relay's settings and a job that
        does nothing, i.e. the queue's own ceiling; `poll_delay` overrides the relay's."""
        extra = [] if poll_delay is None else ["--poll-delay", str(poll_delay)]
        return await self._spawn("no-op worker", queue_name, ["-m", "bench.noop", *extra])

    async def floor(self, queue_name: str, receivers: dict[str, str]) -> WorkerProcess:
        """`python -m bench.floor`: a burst worker with the relay's settings and a job that
        makes one GET to the receiver (`receivers`: each affiliate's base URL), no ledger."""
        args = [f"--receiver={affiliate}={url}" for affiliate, url in receivers.items()]
        return await self._spawn("floor worker", queue_name, ["-m", "bench.floor", *args])

    async def celery(self, env: dict[str, str], concurrency: int) -> WorkerProcess:
        """Celery's own worker for the Celery peer (bench/celery_peer.py), prefork pool of
        `concurrency` processes, in a process group of its own. `env` names its broker,
        queue and database. It never exits by itself: stop it when its work is done."""
        args = [
            *("-m", "celery", "-A", "bench.celery_peer:app", "worker"),
            *("--pool", "prefork", "--concurrency", str(concurrency)),
            *("--loglevel", "WARNING", "--without-mingle", "--without-gossip"),
            "--without-heartbeat",
        ]
        return await self._spawn("celery worker", "", args, extra_env=env, group=True)

    async def _spawn(
        self,
        label: str,
        queue_name: str,
        args: list[str],
        extra_env: dict[str, str] | None = None,
        group: bool = False,
    ) -> WorkerProcess:
        log_path = self.log_dir / f"{label.replace(' ', '-')}-{len(self.started)}.log"
        env = {**worker_env(self.config, queue_name), **(extra_env or {})}
        with log_path.open("wb") as log:
            started, started_wall = time.perf_counter(), time.time()
            proc = await asyncio.create_subprocess_exec(
                sys.executable,
                *args,
                cwd=PROJECT_ROOT,
                env=env,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                start_new_session=group,
            )
        worker = WorkerProcess(label, proc, log_path, started, started_wall, group)
        self.started.append(worker)
        return worker

    async def kill_all(self) -> None:
        """Kill every process still running: only called when something already failed,
        or for workers a scenario left behind, whose work no longer matters."""
        for worker in self.started:
            worker.kill()
        for worker in self.started:
            with contextlib.suppress(ProcessLookupError):
                await worker.proc.wait()
        self.started.clear()


async def wait_ready(worker: WorkerProcess, client: redis.asyncio.Redis, queue_name: str) -> float:
    """Wait until a (non-burst) worker polls its queue; returns seconds since spawn.

    arq writes the queue's health check on its first poll, after the relay's startup
    (Postgres pool, HTTP session) has finished, so a worker's report means "ready".
    """
    deadline = time.monotonic() + READY_TIMEOUT
    while time.monotonic() < deadline:
        if not worker.running:
            raise RuntimeError(f"{worker.label} exited during startup:\n{worker.log_tail()}")
        if await worker_report(client, queue_name) is not None:
            return time.perf_counter() - worker.started
        await asyncio.sleep(0.02)
    raise RuntimeError(f"{worker.label} not ready after {READY_TIMEOUT:.0f} s")


class RssSampler:
    """The resident set size of one process, sampled at a fixed interval in the background."""

    def __init__(self, pid: int, interval: float = 0.1) -> None:
        self.process = psutil.Process(pid)
        self.interval = interval
        self.peak = 0
        self.samples = 0
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _run(self) -> None:
        while True:
            try:
                rss = self.process.memory_info().rss
            except psutil.NoSuchProcess:
                return
            self.peak = max(self.peak, rss)
            self.samples += 1
            await asyncio.sleep(self.interval)
