"""An order's update never reaches an affiliate before its create, however events arrive.

Real Redis, Postgres, receivers on 127.0.0.1 and arq workers; events are published in
random order by concurrent producers, as an order system with several processes would.
"""

from __future__ import annotations

import asyncio
import random
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
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
from tests.support.wait import until
from tests.support.workers import running_worker
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


def _order_events(number: int, start: datetime) -> list[dict[str, Any]]:
    """A create and three updates of one order, a minute apart in `occurred_at`."""
    order = {"number": f"#{number}", "amount": "10.00", "commission": "1.00"}
    create = event_data(f"c{number}", occurred_at=start.isoformat(), order=order)
    updates = [
        event_data(
            f"u{number}-{n}",
            type="order.updated",
            occurred_at=(start + timedelta(minutes=n)).isoformat(),
            order={**order, "status": f"s{n}"},
        )
        for n in (1, 2, 3)
    ]
    return [create, *updates]


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
