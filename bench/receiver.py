"""The fast receiver: `python -m bench.receiver [--ports N] [--blackhole-port B]`.

It runs in a process of its own so its work never competes with the bench's event loop,
and does as little as possible per request (count it, answer 200 "ok"), so that what the
bench measures is the relay, not the receiver. It also runs the blackhole: a TCP server
that accepts connections, reads whatever comes, and never answers.

It listens on N ports (10 by default), all answered alike, so that each affiliate can have
a destination of its own as in production: the relay limits and breaks circuits per
destination (scheme, host, port), and ten affiliates behind one port would share one limit.

Once listening, it prints one JSON line on stdout, `{"http": [PORT, ...], "blackhole": PORT}`.
Control endpoints, on any of the ports, for the bench only:

- `GET /_stats[?samples=1]`: counts (total and per first path segment, i.e. per
  affiliate), the first and last arrival times, the blackhole's connections, and with
  `samples=1` the latency samples;
- `GET /_reset[?record=1]`: forget everything; with `record=1`, keep an (enqueue time,
  arrival time) pair for each request whose query has `t` (the enqueue time, which the
  callback's template copies from the event's link).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import time
from collections import Counter
from dataclasses import dataclass, field

from aiohttp import web

HOST = "127.0.0.1"


@dataclass
class Stats:
    total: int = 0
    by_affiliate: Counter[str] = field(default_factory=Counter)
    first: float | None = None
    last: float | None = None
    recording: bool = False
    samples: list[tuple[float, float]] = field(default_factory=list)
    blackhole_connections: int = 0
    blackhole_open: int = 0

    def as_json(self, samples: bool) -> dict[str, object]:
        return {
            "total": self.total,
            "by_affiliate": dict(self.by_affiliate),
            "first": self.first,
            "last": self.last,
            # Only when asked: thousands of pairs are too much to send on every poll.
            "samples": self.samples if samples else [],
            "blackhole_connections": self.blackhole_connections,
            "blackhole_open": self.blackhole_open,
        }


class Receiver:
    """The HTTP handler and the blackhole, sharing one `Stats`."""

    def __init__(self) -> None:
        self.stats = Stats()

    async def handle(self, request: web.BaseRequest) -> web.StreamResponse:
        path = request.path
        if path.startswith("/_"):
            return self._control(request)
        now = time.time()
        stats = self.stats
        stats.total += 1
        stats.by_affiliate[path.split("/", 2)[1]] += 1
        if stats.first is None:
            stats.first = now
        stats.last = now
        if stats.recording:
            sent = request.query.get("t")
            if sent:
                stats.samples.append((float(sent), now))
        return web.Response(text="ok")

    def _control(self, request: web.BaseRequest) -> web.StreamResponse:
        if request.path == "/_stats":
            samples = request.query.get("samples") == "1"
            return web.json_response(self.stats.as_json(samples))
        if request.path == "/_reset":
            # The blackhole's open connections are still open: keep that count.
            self.stats = Stats(
                recording=request.query.get("record") == "1",
                blackhole_open=self.stats.blackhole_open,
            )
            return web.Response(text="reset")
        return web.Response(status=404, text="unknown control path")

    async def hold(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """The blackhole: read until the client gives up, never write a byte."""
        self.stats.blackhole_connections += 1
        self.stats.blackhole_open += 1
        try:
            while await reader.read(65536):
                pass
        except OSError:
            pass
        finally:
            self.stats.blackhole_open -= 1
            writer.close()


async def serve(ports: int, blackhole_port: int) -> None:
    receiver = Receiver()
    runner = web.ServerRunner(web.Server(receiver.handle), access_log=None)
    await runner.setup()
    for _ in range(ports):
        # A deep backlog: a burst of new connections must queue, never be refused.
        await web.TCPSite(runner, HOST, 0, backlog=1024).start()
    blackhole = await asyncio.start_server(receiver.hold, HOST, blackhole_port, backlog=1024)
    http_ports = [address[1] for address in runner.addresses]
    hole_port = blackhole.sockets[0].getsockname()[1]
    print(json.dumps({"http": http_ports, "blackhole": hole_port}), flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        blackhole.close()
        await runner.cleanup()


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.receiver", description=__doc__)
    parser.add_argument("--ports", type=int, default=10, help="HTTP ports (free ones), 10")
    parser.add_argument("--blackhole-port", type=int, default=0, help="default: a free one")
    args = parser.parse_args()
    asyncio.run(serve(args.ports, args.blackhole_port))


if __name__ == "__main__":
    main()
