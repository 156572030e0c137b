"""An order's update never reaches an affiliate before its create, however events arrive.

Real Redis, Postgres, receivers on 127.0.0.1 and arq workers; events are published in
random order by concurrent producers, as an order system with several processes would.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg
import pytest
import structlog.testing
from aiohttp import web

from ops.actions import lookup
from ops.actions.filters import DeliveryFilter
from ops.cli import console
from ops.cli.demo import serve
from producer import Producer, parse_event
from tests.support.events import event_data, save_callback
from tests.support.servers import with_options
from tests.support.service import Api, ingest
from tests.support.wait import until
from tests.support.workers import running_worker, worker_process, worker_settings
from worker.cache import LISTENER_NAME
from worker.config import Settings
from worker.deliver import delivery_id
from worker.job import CREATE_RECHECK_SECONDS, _create_recheck


@dataclass
class Arrivals:
    """What the receiver got, in the order it got it: (order number, event type, at)."""

    seen: list[tuple[str, str, float]] = field(default_factory=list)

    async def handle(self, request: web.Request) -> web.Response:
        self.seen.append((request.query["o"], request.query["t"], time.monotonic()))
        return web.Response(text="ok")

    def types(self, order: str) -> list[str]:
        return [kind for number, kind, _ in self.seen if number == order]


async def _callbacks(db: asyncpg.Connection, url: str, affiliate: str = "ann") -> None:
    template = url + "/pb?o={{order.number}}&t={{event.type}}&s={{order.status}}"
    for kind in ("order.created", "order.updated"):
        await save_callback(db, affiliate, kind, "GET", template)


def _order_events(
    number: int, start: datetime, updates: int = 3, affiliate: str = "ann"
) -> list[dict[str, Any]]:
    """A create and `updates` updates of one order, a minute apart in `occurred_at`."""
    order = {"number": f"#{number}", "amount": "10.00", "commission": "1.00"}
    create = event_data(
        f"c{number}", affiliate_id=affiliate, occurred_at=start.isoformat(), order=order
    )
    later = [
        event_data(
            f"u{number}-{n}",
            type="order.updated",
            affiliate_id=affiliate,
            occurred_at=(start + timedelta(minutes=n)).isoformat(),
            order={**order, "status": f"s{n}"},
        )
        for n in range(1, updates + 1)
    ]
    return [create, *later]


async def _states(db: asyncpg.Connection) -> dict[str, int]:
    rows = await db.fetch("SELECT state, count(*) FROM deliveries GROUP BY state")
    return {row["state"]: row["count"] for row in rows}


async def test_random_publish_by_4_producers_and_2_workers_sends_no_update_before_its_create(
    db: asyncpg.Connection, producer: Producer, settings: Settings
) -> None:
    orders = 200
    rng = random.Random(14)
    start = datetime(2026, 11, 29, 9, 0, tzinfo=UTC)
    events = [e for n in range(orders) for e in _order_events(n, start)]
    rng.shuffle(events)
    shares = [events[i::4] for i in range(4)]
    arrivals = Arrivals()
    assert settings.redis_url is not None

    async def publish(share: list[dict[str, Any]]) -> None:
        async with await Producer.connect(settings.redis_url or "", settings.queue_name) as own:
            for event in share:
                await own.publish(event)
                await asyncio.sleep(rng.uniform(0, 0.004))

    began = time.monotonic()
    async with serve(arrivals.handle) as url:
        await _callbacks(db, url)
        async with running_worker(settings), running_worker(settings):
            await asyncio.gather(*(publish(share) for share in shares))
            await until(lambda: len(arrivals.seen) >= len(events), within=120)
    took = time.monotonic() - began

    early = [f"#{n}" for n in range(orders) if arrivals.types(f"#{n}")[0] != "order.created"]
    waited = await db.fetchval("SELECT count(*) FROM deliveries WHERE order_note IS NOT NULL")
    print(
        f"\n{orders} orders x 4 events, shuffled, 4 producers, 2 workers: "
        f"{len(early)} orders had an update before the create; {len(arrivals.seen)} requests "
        f"in {took:.1f} s"
    )
    assert early == []
    assert len(arrivals.seen) == len(events)  # each sent once
    assert await _states(db) == {"delivered": len(events)}
    assert waited == 0  # every create came within the wait: none went without one


async def test_shuffled_batches_over_http_send_no_update_before_its_create(
    db: asyncpg.Connection, api: Api, settings: Settings
) -> None:
    """Ingest records each batch before it queues it; the workers take the recorded events
    exactly as they take queued ones, and an update recorded after its create never goes
    first, whichever job runs first."""
    orders = 50
    rng = random.Random(21)
    start = datetime(2026, 11, 29, 9, 0, tzinfo=UTC)
    events = [e for n in range(orders) for e in _order_events(n, start)]
    rng.shuffle(events)
    arrivals = Arrivals()
    async with serve(arrivals.handle) as url:
        await _callbacks(db, url)
        async with running_worker(settings), running_worker(settings):
            for at in range(0, len(events), 20):
                assert (await ingest(api, events[at : at + 20]))[0] == 202
            await until(lambda: len(arrivals.seen) >= len(events), within=120)

    early = [f"#{n}" for n in range(orders) if arrivals.types(f"#{n}")[0] != "order.created"]
    assert early == []
    assert len(arrivals.seen) == len(events)  # each sent once
    assert await _states(db) == {"delivered": len(events)}


async def test_an_update_whose_create_never_comes_goes_after_the_wait_and_says_so(
    db: asyncpg.Connection, producer: Producer, settings: Settings
) -> None:
    arrivals = Arrivals()
    wait = 2.0
    update = event_data("lonely", type="order.updated")
    did = delivery_id(parse_event(update))
    async with serve(arrivals.handle) as url:
        await _callbacks(db, url)
        with structlog.testing.capture_logs() as logged:
            async with running_worker(settings.model_copy(update={"create_wait": wait})):
                published = time.monotonic()
                await producer.publish(update)

                async def waiting() -> bool:
                    found = await lookup.show_delivery(db, did)
                    return found is not None and found["create_wait_until"] is not None

                await until(waiting)
                shown = await lookup.show_delivery(db, did)
                assert shown is not None
                assert (shown["state"], len(shown["attempts"]), shown["blocked_by"]) == (
                    "pending",
                    0,
                    None,
                )
                assert console.why(shown).startswith(
                    "waiting for its order.created, not received yet; goes without it at "
                )
                listed = await lookup.list_deliveries(db, DeliveryFilter())
                assert "waiting for its order.created, not received yet" in (
                    console.deliveries_table(listed.items)
                )
                assert arrivals.seen == []
                await until(lambda: arrivals.seen)
    sent_after = arrivals.seen[0][2] - published

    shown = await lookup.show_delivery(db, did)
    assert shown is not None
    assert shown["state"] == "delivered"
    assert shown["create_wait_until"] is None
    note = (
        "sent without its order.created: none had come 2 s after the order's first update "
        "reached the relay"
    )
    assert shown["order_note"] == note
    assert f"\norder      {note}" not in console.delivery_text(shown)  # the state line says it
    assert console.why(shown) == note
    assert wait <= sent_after < wait + 3
    gave_up = [e for e in logged if e["event"] == "delivery_without_create"]
    assert [(e["log_level"], e["event_id"], e["waited_s"]) for e in gave_up] == [
        ("warning", update["id"], wait)
    ]
    # Held for its create: said once, when it began to wait, not at every look.
    [held] = [e for e in logged if e["event"] == "delivery_waiting"]
    assert (held["event_id"], held["delivery_id"], held["affiliate"]) == (
        update["id"],
        str(did),
        "ann",
    )
    assert held["waiting_for_event"] == "order.created"


async def test_a_create_that_comes_while_its_update_waits_wakes_it(
    db: asyncpg.Connection, producer: Producer, settings: Settings
) -> None:
    arrivals = Arrivals()
    create = event_data("late-create")
    update = event_data("early-update", type="order.updated")
    async with serve(arrivals.handle) as url:
        await _callbacks(db, url)
        async with running_worker(settings):
            await producer.publish(update)
            await until(
                lambda: db.fetchval(
                    "SELECT create_wait_until IS NOT NULL FROM deliveries WHERE event_id = $1",
                    update["id"],
                )
            )
            came = time.monotonic()
            await producer.publish(create)
            await until(lambda: len(arrivals.seen) == 2)
    assert arrivals.types("#1001") == ["order.created", "order.updated"]
    # Woken by the create as it settled, not by looking again later.
    assert arrivals.seen[1][2] - came < 5
    rows = await db.fetch("SELECT state, blocked_by, order_note FROM deliveries")
    assert [tuple(row) for row in rows] == [("delivered", None, None)] * 2


async def test_an_update_waits_for_no_create_when_the_affiliate_has_no_create_callback(
    db: asyncpg.Connection, producer: Producer, settings: Settings
) -> None:
    arrivals = Arrivals()
    async with serve(arrivals.handle) as url:
        await _callbacks(db, url)
        await db.execute("UPDATE callbacks SET enabled = false WHERE event_type = 'order.created'")
        async with running_worker(settings):
            await producer.publish(event_data("no-create", type="order.updated"))
            await until(lambda: arrivals.seen, within=5)
    assert await db.fetchval("SELECT order_note FROM deliveries") is None


async def test_after_the_wait_later_updates_of_the_order_do_not_wait_again(
    db: asyncpg.Connection, producer: Producer, settings: Settings
) -> None:
    """The wait counts from the first of the order's deliveries the relay took."""
    arrivals = Arrivals()
    first = event_data("first-update", type="order.updated", occurred_at="2026-11-29T09:01:00Z")
    second = event_data("second-update", type="order.updated", occurred_at="2026-11-29T09:02:00Z")
    async with serve(arrivals.handle) as url:
        await _callbacks(db, url)
        async with running_worker(settings.model_copy(update={"create_wait": 1.5})):
            await producer.publish(first)
            await until(lambda: arrivals.seen)
            published = time.monotonic()
            await producer.publish(second)
            await until(lambda: len(arrivals.seen) == 2)
    assert arrivals.seen[1][2] - published < 1.0
    notes = await db.fetch("SELECT event_id, order_note FROM deliveries ORDER BY occurred_at")
    assert [row["event_id"] for row in notes] == [first["id"], second["id"]]
    assert all(row["order_note"] is not None for row in notes)


async def test_workers_of_the_version_before_still_take_deliveries_after_db_init(
    db: asyncpg.Connection,
) -> None:
    """They call `postback_take` with 13 arguments, and so never wait for a create: a
    rolling upgrade, schema first, does not stop them."""
    update = parse_event(event_data("old-worker", type="order.updated", occurred_at=None))
    update = update.model_copy(update={"occurred_at": datetime.now(UTC)})
    row = await db.fetchrow(
        "SELECT action FROM postback_take($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13)",
        delivery_id(update),
        update.id,
        update.type,
        update.affiliate_id,
        update.order.number,
        update.occurred_at,
        None,
        update.to_json(),
        "old-job",
        60.0,
        None,
        False,
        None,
    )
    assert row is not None
    assert row["action"] == "claimed"


@pytest.mark.unit
def test_an_awaiting_update_looks_again_after_as_long_as_it_has_waited() -> None:
    assert _create_recheck(600, 600) == CREATE_RECHECK_SECONDS
    assert _create_recheck(500, 600) == 100
    assert _create_recheck(100, 600) == 100  # not past the end of the wait
    assert _create_recheck(3, 600) == 3
    runs, left = 0, 600.0
    while left > 0:
        left -= _create_recheck(left, 600)
        runs += 1
    assert runs <= 12  # over ten minutes: about a dozen runs, not one a second


async def _deadlocks(db: asyncpg.Connection) -> int:
    """The deadlocks Postgres has broken in this database, as its backends last reported
    them: a backend reports when it exits, and at most once a second while idle."""
    await db.execute("SELECT pg_stat_clear_snapshot()")
    found: int = await db.fetchval(
        "SELECT deadlocks FROM pg_stat_database WHERE datname = current_database()"
    )
    return found


async def _calls(db: asyncpg.Connection) -> dict[str, int]:
    """How often each ledger function ran, in sessions with track_functions on."""
    await db.execute("SELECT pg_stat_clear_snapshot()")
    rows = await db.fetch("SELECT funcname, calls FROM pg_stat_user_functions")
    return {row["funcname"]: row["calls"] for row in rows}


async def test_4_worker_processes_on_the_same_4_orders_keep_their_order_and_never_deadlock(
    db: asyncpg.Connection, producer: Producer, settings: Settings, tmp_path: Path
) -> None:
    """Group commit: a `postback worker` process sends the takes (and the records) its jobs
    make while one is in flight as one transaction, which holds the locks of several orders
    until it commits. Four processes on the same four orders wait for each other's locks
    all the time; taken in one global order, those waits never close a circle, so Postgres
    never breaks a deadlock by failing a batch (which would cost its jobs 5 s)."""
    updates = 30
    numbers = {"ann": range(2), "bob": range(2, 4)}  # Arrivals tells orders by number alone
    rng = random.Random(18)
    start = datetime(2026, 11, 29, 9, 0, tzinfo=UTC)
    events = [
        e
        for affiliate, orders in numbers.items()
        for n in orders
        for e in _order_events(n, start, updates, affiliate)
    ]
    rng.shuffle(events)
    shares = [events[i::4] for i in range(4)]
    assert settings.database_url is not None
    # A commit on a test machine's disk takes microseconds: a worker's take is seldom still
    # in flight when its next job's comes, so batches stay small and brief, and the four
    # workers' seldom overlap. 20 ms before each WAL flush, as on a slow disk, keeps every
    # statement holding its order locks while jobs gather behind it, in every worker: with
    # the locks taken in arrival order instead, most runs end in deadlocks. track_functions
    # counts the batched statements.
    database_url = with_options(
        settings.database_url, commit_delay=20000, commit_siblings=0, track_functions="pl"
    )
    # The first request of each order is held until the ledger holds every event: up to
    # 5 s, not the 2 s FAST allows, so that it is not cut and sent again.
    chosen = worker_settings(
        settings, database_url=database_url, max_jobs=50, request_timeout=5.0, job_timeout=8.0
    )
    arrivals = Arrivals()
    statuses: dict[str, list[str]] = {}
    all_taken = asyncio.Event()

    async def once_all_taken(request: web.Request) -> web.Response:
        # The ledger orders what it has seen: once it holds all of an order's updates, they
        # must reach the receiver in occurred_at order.
        await all_taken.wait()
        statuses.setdefault(request.query["o"], []).append(request.query["s"])
        answer = await arrivals.handle(request)
        # Answered in 0.1 s, as by an affiliate's server: faster, a delivery can settle
        # while the next of its order is between two runs, which then misses the wake-up
        # and looks again 15 s later (README, "Ordering per order").
        await asyncio.sleep(0.1)
        return answer

    async def publish(share: list[dict[str, Any]]) -> None:
        async with await Producer.connect(settings.redis_url or "", settings.queue_name) as own:
            for event in share:
                await own.publish(event)

    # Counted from here: the run's database is the one the tests before this one used.
    deadlocks_before, calls_before = await _deadlocks(db), await _calls(db)
    began = time.monotonic()
    async with serve(once_all_taken) as url, contextlib.AsyncExitStack() as stack:
        for affiliate in numbers:
            await _callbacks(db, url, affiliate)
        workers = [
            await stack.enter_async_context(worker_process(chosen, tmp_path)) for _ in range(4)
        ]
        # Published once all four have started, so that all four take from the start.
        await until(
            lambda: db.fetchval(
                "SELECT count(*) = 4 FROM pg_stat_activity"
                " WHERE datname = current_database() AND application_name = $1",
                LISTENER_NAME,
            ),
            30,
            "4 workers started",
        )
        await asyncio.gather(*(publish(share) for share in shares))
        await until(
            lambda: db.fetchval("SELECT count(*) = $1 FROM deliveries", len(events)),
            30,
            "every event in the ledger",
        )
        all_taken.set()
        await until(lambda: len(arrivals.seen) >= len(events), 60, "every event at the receiver")
        took = time.monotonic() - began
        stopped = await asyncio.gather(*(w.stop(chosen.shutdown_wait + 5) for w in workers))

    # A backend reports its counters as it exits, before it leaves pg_stat_activity.
    await until(
        lambda: db.fetchval(
            "SELECT count(*) = 0 FROM pg_stat_activity WHERE datname = current_database()"
            " AND backend_type = 'client backend' AND pid <> pg_backend_pid()"
        ),
        10,
        "the workers' connections closed",
    )
    deadlocks = await _deadlocks(db) - deadlocks_before
    calls = {name: n - calls_before.get(name, 0) for name, n in (await _calls(db)).items()}
    failed = [line for w in workers for line in w.events("database_failed")]
    print(
        f"\n{len(statuses)} orders x (1 create + {updates} updates), shuffled, 4 producers,"
        f" 4 worker processes: {len(arrivals.seen)} requests in {took:.1f} s;"
        f" deadlocks {deadlocks},"
        f" database_failed {len(failed)}; calls {dict(sorted(calls.items()))}"
    )
    assert deadlocks == 0
    assert failed == []
    expected = ["", *(f"s{n}" for n in range(1, updates + 1))]  # the create has no status
    for orders in numbers.values():
        for n in orders:
            assert arrivals.types(f"#{n}") == ["order.created"] + ["order.updated"] * updates
            assert statuses[f"#{n}"] == expected, f"order #{n}"
    assert len(arrivals.seen) == len(events)  # each sent once
    assert await _states(db) == {"delivered": len(events)}
    assert [code for code, _ in stopped] == [0] * 4
    assert [w.errors() for w in workers] == [[]] * 4
    assert calls.get("postback_take_many", 0) > 0, "no take went with another: nothing to test"
    # Each worker says at exit how its jobs shared their statements, as Postgres counted them.
    said = [w.events("ledger_statements") for w in workers]
    assert [len(lines) for lines in said] == [1] * 4
    assert sum(lines[0]["takes"] for lines in said) == calls["postback_take"]
    assert sum(lines[0]["take_statements"] for lines in said) < calls["postback_take"]
    assert sum(lines[0]["records"] for lines in said) == calls["postback_record"]
