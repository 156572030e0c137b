"""`postback demo`: the whole pipeline on one machine, with postbacks printed as they land.

In a terminal (or with `--stay`) it then keeps its worker running and serves the ops page
until Ctrl-C, so that a newcomer can practise the runbook on what it left: a dead letter
whose callback points at a URL the receiver has moved away from.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable

import asyncpg
from aiohttp import web
from arq import Worker
from pydantic import SecretStr

from ops.cli import console
from ops.service import app
from producer.event import EVENT_TYPES, Event, parse_event
from producer.publish import Producer
from worker import callbacks, database, schema
from worker.config import Settings
from worker.ledger import OPEN_STATES
from worker.pool import RelayWorker, create_worker

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

STOP_WAIT_SECONDS = 10.0
"""How long stopping a worker started by `running` waits for the jobs it has in flight."""

WAIT_SECONDS = 30.0
"""How long the demo waits for its deliveries before saying which did not settle."""

# Every variable, so the demo shows what each one renders to.
_QUERY = (
    "order={{order.number}}&amount={{order.amount}}&commission={{order.commission}}"
    "&currency={{order.currency}}&status={{order.status}}&event={{event.id}}"
    "&type={{event.type}}&affiliate={{affiliate.id}}&sub_id={{link.sub_id}}"
    "&campaign={{link.query.campaign}}&path={{link.path}}&hash={{link.hash}}"
    "&at={{event.occurred_at}}&link={{link.url}}"
)
MOVED = "/dan/v1/"
"""Where dan's callback points, and his receiver no longer answers (404): his dead letter
is the one to practise on, by pointing the callback at `MOVED_TO` and replaying it."""
MOVED_TO = "/dan/v2/"
AFFILIATES = {
    "demo-ann": ("GET", "/ann/postback?" + _QUERY),
    "demo-bob": ("POST", "/bob/{{event.type}}?" + _QUERY),
    "demo-dan": ("GET", MOVED + "postback?order={{order.number}}&event={{event.id}}"),
}
LINK = "https://shop.example/summer?ref={ref}&campaign=summer%20sale&sub_id=fb-1#promo"


# type, affiliate, order, amount, commission, status, sub_id override
_ORDERS = [
    ("order.created", "demo-ann", "#1001", "10.50", "1.05", "pending", None),
    ("order.created", "demo-bob", "#1002", "249.00", "24.90", "pending", "newsletter"),
    ("order.updated", "demo-ann", "#1001", "10.50", "1.05", "approved", None),
    ("order.updated", "demo-bob", "#1002", "199.00", "19.90", "refunded", "newsletter"),
    # No callback for this affiliate: nothing is sent, and the ledger says why.
    ("order.created", "demo-carol", "#1003", "5", "0.5", "pending", None),
    # Sent to a URL that answers 404: a dead letter at once.
    ("order.created", "demo-dan", "#1004", "30.00", "3.00", "pending", None),
]


def _events(run: str) -> list[Event]:
    events = []
    for number, (kind, affiliate, order, amount, commission, status, sub_id) in enumerate(
        _ORDERS, start=1
    ):
        link = {"url": LINK.format(ref=affiliate.removeprefix("demo-"))}
        if sub_id:
            link["sub_id"] = sub_id
        data = {
            "id": f"{run}-{number}",
            "type": kind,
            "affiliate_id": affiliate,
            "order": {
                "number": order,
                "amount": amount,
                "commission": commission,
                "currency": "EUR",
                "status": status,
            },
            "link": link,
        }
        events.append(parse_event(data))
    return events


STAYS = "Ctrl-C stops the demo."
"""The last line the demo prints before it waits for Ctrl-C."""

DEMO_SCHEDULE = "1s"
"""The demo's retry schedule unless POSTBACK_RETRY_SCHEDULE is set: its one failure is
retried within seconds rather than the production minute."""
RECEIVER_HOST = "127.0.0.1"
"""Where the demo's receivers listen: loopback, which the demo alone adds to the networks
the SSRF policy opens."""


class _Receiver:
    """Prints each request; refuses the first try of bob's create, to show a retry, and
    answers 404 under dan's old path, to leave a dead letter."""

    def __init__(self) -> None:
        self.refused: set[str] = set()

    async def handle(self, request: web.Request) -> web.Response:
        body = await request.text()
        key = request.headers.get("Idempotency-Key", "")
        print(f"receiver got: {request.method} {request.path_qs}", flush=True)
        print(
            f"    Idempotency-Key: {key}  User-Agent: {request.headers.get('User-Agent')}",
            flush=True,
        )
        if body:
            print(f"    body: {body}", flush=True)
        if request.path.startswith(MOVED):
            print(f"    answered 404: dan's postbacks moved to {MOVED_TO}", flush=True)
            return web.Response(status=404, text=f"moved to {MOVED_TO}")
        if request.path == "/bob/order.created" and key not in self.refused:
            self.refused.add(key)
            print("    answered 503: the relay will retry; bob's update waits for it", flush=True)
            return web.Response(status=503, text="busy")
        return web.Response(text="ok")


@contextlib.asynccontextmanager
async def serve(handler: Handler, host: str = RECEIVER_HOST, port: int = 0) -> AsyncIterator[str]:
    """Answer every method and path with `handler` on `host` (a free port unless given);
    yields the URL."""
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handler)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    await site.start()
    host, port = runner.addresses[0][:2]
    try:
        yield f"http://{host}:{port}"
    finally:
        await runner.cleanup()


def stays(asked: bool | None) -> bool:
    """Whether the demo stays running when done: as asked (`--stay`, `--no-stay`), else
    when run in a terminal, where Ctrl-C ends it. Anywhere else (a test, CI, a pipe) it
    finishes, as its callers wait for it to."""
    if asked is not None:
        return asked
    return sys.stdin.isatty() and sys.stdout.isatty()


def _page_tokens(settings: Settings) -> tuple[Settings, str]:
    """Settings whose tokens are set, one made for this run where none is configured (the
    page is served only with a token), and how to tell the ops token to the user."""
    made = {
        name: SecretStr(secrets.token_urlsafe(18))
        for name in ("ingest_token", "ops_token")
        if getattr(settings, name) is None
    }
    ops = made.get("ops_token")
    said = "the one in POSTBACK_OPS_TOKEN" if ops is None else ops.get_secret_value()
    return settings.model_copy(update=made), said


async def run(
    settings: Settings,
    receiver: str | None = None,
    stay: bool = False,
    host: str | None = None,
    port: int | None = None,
) -> int:
    """The demo. `receiver`: the base URL of a `postback receive` elsewhere, with workers
    elsewhere delivering this queue (docker compose's demo profile); otherwise both run here.
    `stay`: then serve the ops page on `host` and `port` (default the service's settings)
    and keep the worker running, until SIGINT or SIGTERM.
    """
    if receiver is None and "retry_schedule" not in settings.model_fields_set:
        settings = settings.model_copy(update={"retry_schedule": DEMO_SCHEDULE})
    if receiver is None:
        # The demo's receivers listen on loopback, which the SSRF policy refuses: open just that.
        allow = f"{settings.allow_networks or ''},{RECEIVER_HOST}/32".lstrip(",")
        settings = settings.model_copy(update={"allow_networks": allow})
    assert settings.database_url is not None
    assert settings.redis_url is not None
    # The demo narrates on stdout; the worker's own log lines would only repeat it.
    console.quiet_logs(settings)
    run_id = f"demo-{int(time.time() * 1000)}"
    events = _events(run_id)
    async with contextlib.AsyncExitStack() as stack:
        if stay:
            # Listening first: a port in use is said before the demo runs, not after.
            page_settings, token = _page_tokens(settings)
            page = await stack.enter_async_context(
                app.serving(
                    page_settings,
                    settings.api_host if host is None else host,
                    settings.api_port if port is None else port,
                )
            )
        conn = await stack.enter_async_context(database.connection(settings.database_url))
        if receiver is None:
            base = await stack.enter_async_context(serve(_Receiver().handle))
            print(f"demo receiver listening on {base}")
        else:
            base = receiver.rstrip("/")
            print(f"demo receiver at {base}; the workers of queue {settings.queue_name} deliver")
        await schema.upgrade(conn)
        for affiliate, (method, path) in AFFILIATES.items():
            for event_type in EVENT_TYPES:
                spec = callbacks.validate(
                    affiliate, event_type, method, base + path, allowed=settings.allowed
                )
                await callbacks.save(conn, spec)
            print(f"callback: {affiliate} {method} {base}{path}")

        if receiver is None:
            worker = create_worker(settings, handle_signals=False, poll_delay=0.05)
            await stack.enter_async_context(running(worker))
        async with await Producer.connect(settings.redis_url, settings.queue_name) as producer:
            published: list[str] = []
            for event in events:
                if event.type == "order.updated":
                    # As in a shop, an update follows its create, here by the moment it
                    # takes a worker to record the create: the relay orders what its
                    # ledger has seen, and this keeps the demo's order the same each run.
                    await _recorded(conn, published)
                await producer.publish(event)
                published.append(event.id)
                print(f"published: {event.id} {event.type} {event.affiliate_id}")
        rows = await _settled(conn, [event.id for event in events])

        print("\nledger:")
        for row in rows:
            detail = row["reason"] or f"{row['attempts']} attempt(s)"
            print(f"  {row['event_id']:<24} {row['affiliate_id']:<11} {row['state']:<10} {detail}")
        unsettled = sum(row["state"] in OPEN_STATES for row in rows)
        if unsettled:
            print(f"{unsettled} deliveries did not settle within {WAIT_SECONDS:.0f} s")
        if stay:
            async with app.stop_signals() as stop:
                print(
                    f"\nops page: {page}\nops token: {token}\n"
                    f"To practise the runbook: demo-dan's postbacks moved from {MOVED} to "
                    f"{MOVED_TO}; fix his callback, test fire it, replay his dead letter.\n"
                    f"{'The page' if receiver else 'The worker'} keeps running; {STAYS}",
                    flush=True,
                )
                await stop.wait()
    if stay:
        print("demo stopped")
    return 1 if unsettled else 0


async def receive(host: str, port: int) -> int:
    """`postback receive`: the demo's receiver on its own, until the process is stopped."""
    async with serve(_Receiver().handle, host, port) as url:
        print(f"demo receiver listening on {url}", flush=True)
        await asyncio.Event().wait()
    return 0


@contextlib.asynccontextmanager
async def running(worker: Worker) -> AsyncIterator[None]:
    """The worker runs (not in burst mode) for the block, then stops.

    Jobs in flight are let finish first, as on SIGTERM: cancelled in the middle of their
    last writes, they would only run again.
    """
    task = asyncio.create_task(worker.async_run())
    try:
        yield
    finally:
        if isinstance(worker, RelayWorker):
            await worker.stop_polling(within=STOP_WAIT_SECONDS)
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        if worker.tasks:
            await asyncio.wait(worker.tasks.values(), timeout=STOP_WAIT_SECONDS)
        await worker.close()


async def _recorded(conn: asyncpg.Connection, event_ids: list[str]) -> None:
    """Wait (briefly) until the ledger has a delivery for each of these events."""
    deadline = time.monotonic() + WAIT_SECONDS
    while time.monotonic() < deadline:
        count = await conn.fetchval(
            "SELECT count(*) FROM deliveries WHERE event_id = ANY($1::text[])", event_ids
        )
        if count == len(event_ids):
            return
        await asyncio.sleep(0.01)


async def _settled(conn: asyncpg.Connection, event_ids: list[str]) -> list[dict[str, object]]:
    """The ledger rows of these events, once each has settled (or time is up)."""
    deadline = time.monotonic() + WAIT_SECONDS
    while True:
        rows = await conn.fetch(
            """
            SELECT event_id, affiliate_id, state, attempts, reason FROM deliveries
            WHERE event_id = ANY($1::text[]) ORDER BY event_id
            """,
            event_ids,
        )
        done = len(rows) == len(event_ids) and all(row["state"] not in OPEN_STATES for row in rows)
        if done or time.monotonic() > deadline:
            return [dict(row) for row in rows]
        await asyncio.sleep(0.1)
