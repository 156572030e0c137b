"""A TCP proxy the test controls, between the relay and a server of the test run: how a test
takes Redis or Postgres away, and brings it back, without touching the shared server."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any, Literal
from urllib.parse import parse_qsl, urlsplit


@dataclass
class Proxy:
    """A TCP proxy to a server of the test run (Redis, Postgres) whose link can be cut
    (connections through it closed, new ones closed at once) or made silent (nothing passes,
    nothing is closed). `target`: `host` and `port`, or `path` for a Unix socket."""

    target: dict[str, Any]
    url: str = ""
    mode: Literal["up", "down", "silent"] = "up"
    links: list[asyncio.StreamWriter] = field(default_factory=list)

    def cut(self) -> None:
        self.mode = "down"
        for writer in self.links:
            writer.transport.abort()
        self.links.clear()

    def go_silent(self) -> None:
        self.mode = "silent"

    def mend(self) -> None:
        self.mode = "up"

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.mode == "down":
            return  # raw_server closes it
        if "path" in self.target:
            upstream = asyncio.open_unix_connection(self.target["path"])
        else:
            upstream = asyncio.open_connection(
                self.target.get("host", "127.0.0.1"), self.target["port"]
            )
        upstream_reader, upstream_writer = await upstream
        self.links += [writer, upstream_writer]

        async def pump(source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
            while data := await source.read(65536):
                if self.mode == "up":
                    sink.write(data)
                    await sink.drain()
            sink.close()

        try:
            await asyncio.gather(pump(reader, upstream_writer), pump(upstream_reader, writer))
        finally:
            upstream_writer.close()


def postgres_target(database_url: str) -> dict[str, Any]:
    """Where `database_url`'s Postgres listens, as `Proxy.target`: its host and port, or the
    socket in its ?host= folder (the embedded Postgres has no TCP port)."""
    split = urlsplit(database_url)
    folder = dict(parse_qsl(split.query)).get("host", "")
    port = split.port or 5432
    if folder.startswith("/"):
        return {"path": f"{folder}/.s.PGSQL.{port}"}
    return {"host": split.hostname or "127.0.0.1", "port": port}


def through(database_url: str, port: int) -> str:
    """`database_url` by way of a proxy on 127.0.0.1:`port`: same user and database."""
    split = urlsplit(database_url)
    user = split.netloc.rsplit("@", 1)[0]
    query = "&".join(f"{name}={value}" for name, value in parse_qsl(split.query) if name != "host")
    return split._replace(netloc=f"{user}@127.0.0.1:{port}", query=query).geturl()
