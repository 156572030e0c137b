"""Postgres backend CPU: the CPU time the server processes serving one database spent.

Each client connection has a backend process of its own; its CPU time (user + system) is in
/proc/PID/stat, the kernel's own account, which nothing on the client side can see. While a
run goes, a sampler asks `pg_stat_activity` every SAMPLE_SECONDS for the client backends of
the database and reads each one's CPU time. A backend that exits (a worker closing its pool)
takes its last reading with it, so the total is the sum, over every backend seen, of its last
reading less its reading when first seen (zero for a backend that started during the run):
what a backend spends between the last sample and its exit is missed, a tenth of a second of
one backend's work at most.

Only client backends count (`backend_type = 'client backend'`): not autovacuum, the WAL
writer or the checkpointer, which work for every database at once. The sampler's own
connection is to another database, and the bench's own connections are left out by pid.

It also counts the database's committed transactions (`pg_stat_database.xact_commit`, which
a backend reports when it goes idle for a second or exits; the relay's burst workers have
exited by the time it is read): a worker that shares its statements commits fewer than two
per delivery.

Reading /proc needs the Postgres server on this machine (and in this PID namespace). When it
is not, `BackendCpu.unavailable` says why and there is no figure.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import Iterable
from dataclasses import dataclass

import asyncpg

SAMPLE_SECONDS = 0.1
TICKS = os.sysconf("SC_CLK_TCK")

COMMITS = """
SELECT xact_commit FROM pg_stat_database WHERE datname = $1
"""

BACKENDS = """
SELECT pid FROM pg_stat_activity
WHERE datname = $1 AND backend_type = 'client backend' AND pid <> ALL($2::int[])
"""


@dataclass(frozen=True, slots=True)
class _Reading:
    started: int
    """The process's start time (ticks since boot): a pid reused is another backend."""
    cpu: int
    """utime + stime, in ticks."""


def _read(pid: int) -> tuple[str, _Reading] | None:
    """(command name, reading) of a process, or None when it has gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read().decode(errors="replace")
    except OSError:
        return None
    name = stat[stat.index("(") + 1 : stat.rindex(")")]
    fields = stat[stat.rindex(")") + 2 :].split()
    # Fields 14, 15 and 22 of proc(5); `fields` starts at field 3.
    return name, _Reading(started=int(fields[19]), cpu=int(fields[11]) + int(fields[12]))


class BackendCpu:
    """CPU seconds spent by the client backends of `database` between `start` and `stop`."""

    def __init__(self, admin_url: str, database: str, exclude: Iterable[int] = ()) -> None:
        self.admin_url = admin_url
        self.database = database
        self.exclude = list(exclude)
        self.unavailable: str | None = None
        self.backends = 0
        """Backends seen during the run."""
        self.commits: int | None = None
        """Transactions committed in the database during the run (`stop` sets it)."""
        self._commits_before = 0
        self._first: dict[tuple[int, int], int] = {}
        self._last: dict[tuple[int, int], int] = {}
        self._conn: asyncpg.Connection | None = None
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self._conn = await asyncpg.connect(self.admin_url)
        self._commits_before = await self._committed()
        # The sampler's own backend must be a process here, or no backend's CPU is readable.
        own = await self._conn.fetchval("SELECT pg_backend_pid()")
        read = _read(own)
        if read is None or read[0] != "postgres":
            self.unavailable = (
                "Postgres runs on another machine or in another PID namespace: its backends' "
                "CPU time cannot be read here"
            )
            return
        await self._sample(first=True)
        self._task = asyncio.create_task(self._run())

    async def stop(self) -> float | None:
        """Stop sampling; the CPU seconds spent since `start`, None when unavailable."""
        try:
            if self._task is not None:
                self._task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await self._task
            if self._conn is not None:
                self.commits = await self._committed() - self._commits_before
                if self.unavailable is None:
                    await self._sample()
        finally:
            if self._conn is not None:
                await self._conn.close()
        if self.unavailable is not None:
            return None
        self.backends = len(self._last)
        ticks = sum(last - self._first.get(key, 0) for key, last in self._last.items())
        return ticks / TICKS

    async def _committed(self) -> int:
        assert self._conn is not None
        # Within a transaction the statistics are a snapshot taken once: read afresh.
        await self._conn.execute("SELECT pg_stat_clear_snapshot()")
        committed: int = await self._conn.fetchval(COMMITS, self.database) or 0
        return committed

    async def _run(self) -> None:
        while self.unavailable is None:
            await asyncio.sleep(SAMPLE_SECONDS)
            await self._sample()

    async def _sample(self, first: bool = False) -> None:
        assert self._conn is not None
        for row in await self._conn.fetch(BACKENDS, self.database, self.exclude):
            pid = row["pid"]
            read = _read(pid)
            if read is None:
                continue  # gone since the query: its last reading, if any, stands
            name, reading = read
            if name != "postgres":
                continue  # gone, and its pid taken by another process: as gone
            key = (pid, reading.started)
            if first:
                self._first[key] = reading.cpu
            self._last[key] = reading.cpu
