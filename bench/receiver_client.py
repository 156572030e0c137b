"""The bench's side of the receiver: start its process, read its counts, measure its capacity."""

from __future__ import annotations

import asyncio
import contextlib
import json
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import aiohttp

from bench.receiver import HOST

START_TIMEOUT = 15.0
"""Seconds the receiver may take to start and print its ports."""

STOP_TIMEOUT = 5.0


@dataclass(frozen=True, slots=True)
class Stats:
    """What the receiver's `/_stats` answered."""

    total: int
    by_affiliate: dict[str, int]
    first: float | None
    last: float | None
    samples: list[tuple[float, float]]
    blackhole_connections: int
    blackhole_open: int

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Stats:
        return cls(
            total=data["total"],
            by_affiliate=data["by_affiliate"],
            first=data["first"],
            last=data["last"],
            samples=[(sent, arrived) for sent, arrived in data["samples"]],
            blackhole_connections=data["blackhole_connections"],
            blackhole_open=data["blackhole_open"],
        )

    def count(self, affiliates: list[str]) -> int:
        return sum(self.by_affiliate.get(a, 0) for a in affiliates)


class ReceiverClient:
    """A running receiver process and an HTTP session to talk to it."""

    def __init__(
        self, http: aiohttp.ClientSession, http_ports: list[int], blackhole_port: int
    ) -> None:
        self.http = http
        self.urls = [f"http://{HOST}:{port}" for port in http_ports]
        self.url = self.urls[0]
        """Where the bench sends its control requests."""
        self.blackhole_url = f"http://{HOST}:{blackhole_port}"

    def url_for(self, n: int) -> str:
        """The base URL of the `n`th affiliate: a port (a destination) of its own."""
        return self.urls[n % len(self.urls)]

    async def stats(self, samples: bool = False) -> Stats:
        params = {"samples": "1"} if samples else {}
        async with self.http.get(self.url + "/_stats", params=params) as response:
            response.raise_for_status()
            return Stats.from_json(await response.json())

    async def reset(self, record: bool = False) -> None:
        params = {"record": "1"} if record else {}
        async with self.http.get(self.url + "/_reset", params=params) as response:
            response.raise_for_status()

    async def capacity(self, concurrency: int = 50, seconds: float = 3.0) -> float:
        """Requests per second the receiver answers to `concurrency` clients in a loop.

        The client is Python in the bench's process, on the same cores, so this is a lower
        bound of what the receiver can take; it only has to be well above the relay's rate.
        """
        await self.reset()
        deadline = time.monotonic() + seconds
        url = self.url + "/capacity/pb"
        connector = aiohttp.TCPConnector(limit=concurrency)
        async with aiohttp.ClientSession(connector=connector) as client:

            async def loop() -> int:
                done = 0
                while time.monotonic() < deadline:
                    async with client.get(url) as response:
                        await response.read()
                    done += 1
                return done

            started = time.monotonic()
            counts = await asyncio.gather(*(loop() for _ in range(concurrency)))
            elapsed = time.monotonic() - started
        received = (await self.stats()).total
        await self.reset()
        if received != sum(counts):
            raise RuntimeError(f"receiver counted {received} of {sum(counts)} requests")
        return sum(counts) / elapsed


@contextlib.asynccontextmanager
async def running_receiver() -> AsyncIterator[ReceiverClient]:
    """The receiver in a process of its own, stopped (and killed if need be) on exit."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "bench.receiver", stdout=asyncio.subprocess.PIPE
    )
    try:
        assert proc.stdout is not None
        line = await asyncio.wait_for(proc.stdout.readline(), START_TIMEOUT)
        if not line:
            raise RuntimeError("the receiver exited before it was listening")
        ports = json.loads(line)
        # No pool cap: the bench polls while the capacity run holds its own session.
        async with aiohttp.ClientSession() as http:
            yield ReceiverClient(http, ports["http"], ports["blackhole"])
    finally:
        if proc.returncode is None:
            proc.terminate()
            try:
                await asyncio.wait_for(proc.wait(), STOP_TIMEOUT)
            except TimeoutError:
                proc.kill()
                await proc.wait()
