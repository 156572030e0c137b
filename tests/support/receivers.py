"""Receivers on 127.0.0.1 for the tests' postbacks, and the names that lead to them."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field

from aiohttp import web
from aiohttp.abc import AbstractResolver, ResolveResult

ALLOW_NETWORKS = "127.0.0.1/32"
"""The test receivers listen on 127.0.0.1, which the SSRF policy refuses: the tests open
just that."""


@dataclass
class Received:
    method: str
    path_qs: str
    headers: dict[str, str]
    body: bytes
    at: float = field(default_factory=time.time)
    """When it came (Unix time)."""


@dataclass
class Receiver:
    """An HTTP receiver that records every request it gets and answers `status`."""

    url: str = ""
    requests: list[Received] = field(default_factory=list)
    status: int = 200

    async def record(self, request: web.Request) -> web.Response:
        self.requests.append(
            Received(request.method, request.raw_path, dict(request.headers), await request.read())
        )
        return web.Response(status=self.status, text="thanks")


@dataclass
class Flaky:
    """A receiver that answers 500 on paths under /fail until `fixed`, 200 elsewhere."""

    url: str = ""
    fixed: bool = False
    paths: list[str] = field(default_factory=list)

    async def handle(self, request: web.Request) -> web.Response:
        self.paths.append(request.path_qs)
        if request.path.startswith("/fail") and not self.fixed:
            return web.Response(status=500, text="down for maintenance")
        return web.Response(text="ok", headers={"X-Receiver": "flaky"})


RawHandler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


@contextlib.asynccontextmanager
async def raw_server(
    handle: RawHandler, host: str = "127.0.0.1", port: int = 0
) -> AsyncIterator[str]:
    """A TCP server on `host` that runs `handle` per connection; yields its base URL.
    For receivers that must misbehave at the byte level, below what aiohttp's server allows.

    On the way out every connection still open is cancelled and awaited: the event loop
    lives for the whole session, and a handler left running would outlive the test.
    """
    running: set[asyncio.Task[None]] = set()

    async def connection(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        running.add(task)
        try:
            await handle(reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass  # the client hung up, which is what most of these receivers wait for
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()
            running.discard(task)

    server = await asyncio.start_server(connection, host, port, backlog=512)
    bound = server.sockets[0].getsockname()[1]
    try:
        yield f"http://{'[' + host + ']' if ':' in host else host}:{bound}"
    finally:
        server.close()
        left = list(running)
        for task in left:
            task.cancel()
        await asyncio.gather(*left, return_exceptions=True)
        await server.wait_closed()


class HostsFile(AbstractResolver):
    """Name resolution from a table, as an /etc/hosts entry would give it; a name may answer
    differently on each lookup (a DNS rebinding attack)."""

    def __init__(self, table: dict[str, list[list[str]]]) -> None:
        self.table = table
        self.lookups: dict[str, int] = {}

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        answers = self.table.get(host)
        if answers is None:
            raise OSError(socket.EAI_NONAME, f"{host} is not in the test's hosts table")
        turn = self.lookups.get(host, 0)
        self.lookups[host] = turn + 1
        return [
            ResolveResult(
                hostname=host,
                host=ip,
                port=port,
                family=socket.AF_INET6 if ":" in ip else socket.AF_INET,
                proto=0,
                flags=socket.AI_NUMERICHOST,
            )
            for ip in answers[min(turn, len(answers) - 1)]
        ]

    async def close(self) -> None:
        pass
