"""`python -m bench.ingest_service PORT`: `postback serve` as the ingest scenario runs it, in
a process of its own, with the handler ingest had before it recorded events beside the real
one, so both are measured behind the same server, middlewares and connections.

Configured by POSTBACK_* variables as `postback serve` is (`bench.workers.worker_env`),
without tokens (`--insecure`: the scenario calls from 127.0.0.1). Prints one line once it
listens, and stops at SIGTERM.
"""

from __future__ import annotations

import asyncio
import sys

from aiohttp import web

from ops.service import ingest
from ops.service.api import SERVICES, error
from ops.service.app import create_app, stop_signals
from producer.publish import Producer
from worker.config import Settings

REDIS_ONLY_PATH = "/bench/v1/events-redis-only"
"""Where the handler of before the record listens."""

READY = "listening"


async def redis_only(request: web.Request) -> web.Response:
    """`POST /v1/events` as it was up to schema 13 (5dc3dd2's `_post_events`, without its
    trace span, which is off unless OTEL_* ask for traces): validate the batch, then
    enqueue it; nothing is written to Postgres."""
    body = await request.read()
    try:
        events = ingest.parse_batch(body)
    except ingest.BatchRefused as exc:
        errors = [refusal.as_json() for refusal in exc.refusals]
        return error(422, "refused; nothing was enqueued", errors)
    services = request.app[SERVICES]
    producer = Producer(services.redis, services.settings.queue_name)
    fresh = await producer.publish_many(events)
    return web.json_response(
        {
            "accepted": [event.id for event in events],
            "already_queued": [e.id for e, new in zip(events, fresh, strict=True) if not new],
        },
        status=202,
    )


async def serve(port: int) -> None:
    app = create_app(Settings(), insecure=True)
    app.router.add_post(REDIS_ONLY_PATH, redis_only)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    try:
        await web.TCPSite(runner, "127.0.0.1", port).start()
        async with stop_signals() as stop:
            print(READY, flush=True)
            await stop.wait()
    finally:
        await runner.cleanup()


if __name__ == "__main__":
    asyncio.run(serve(int(sys.argv[1])))
