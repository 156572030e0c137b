"""The ledger as tests fill it and read it."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import asyncpg

from producer import Producer, parse_event
from producer.event import STORE_WIDE
from tests.support.events import event_data, save_callback
from tests.support.receivers import Flaky
from tests.support.workers import drain
from worker.config import Settings
from worker.deliver import delivery_id
from worker.ledger import take

SETTLED = ("delivered", "dead")


async def delivery(db: asyncpg.Connection, event_id: str) -> asyncpg.Record:
    """The whole row of an event's delivery; fails the test when there is none."""
    row = await db.fetchrow("SELECT * FROM deliveries WHERE event_id = $1", event_id)
    assert row is not None, f"no delivery recorded for {event_id}"
    return row


async def ledger(db: asyncpg.Connection, event_ids: list[str]) -> dict[str, asyncpg.Record]:
    rows = await db.fetch(
        """
        SELECT event_id, id::text AS id, state, attempts, claimed_by FROM deliveries
        WHERE event_id = ANY($1::text[])
        """,
        event_ids,
    )
    return {row["event_id"]: row for row in rows}


async def settled(
    db: asyncpg.Connection, event_ids: list[str], within: float
) -> dict[str, asyncpg.Record]:
    """The ledger rows once every event's delivery is delivered or dead, or time is up:
    the caller's assertions then say what did not settle."""
    deadline = time.monotonic() + within
    while True:
        rows = await ledger(db, event_ids)
        done = len(rows) == len(event_ids) and all(r["state"] in SETTLED for r in rows.values())
        if done or time.monotonic() > deadline:
            return rows
        await asyncio.sleep(0.1)


def states(rows: dict[str, asyncpg.Record], event_ids: list[str]) -> Counter[str]:
    return Counter(rows[e]["state"] if e in rows else "no row" for e in event_ids)


@dataclass(frozen=True)
class Made:
    """Event ids of what `make_deliveries` made."""

    ann: str
    ann_update: str
    bobs: list[str]
    carol: str


async def make_deliveries(
    db: asyncpg.Connection, producer: Producer, flaky: Flaky, settings: Settings, dead: int = 1
) -> Made:
    """A ledger with one of each outcome: ann's create and update of order #1 delivered;
    `dead` creates of bob's (orders #1001, #1002, ...) answered 500 until the schedule
    ran out, so dead letters; carol's create skipped, as she has no callback."""
    await save_callback(db, "ann", "order.created", "GET", flaky.url + "/ann?o={{order.number}}")
    await save_callback(db, "ann", "order.updated", "GET", flaky.url + "/ann/u?o={{order.number}}")
    await save_callback(
        db, "bob", "order.created", "GET", flaky.url + "/fail/bob?o={{order.number}}"
    )
    order = {"number": "#1", "amount": "1", "commission": "0.1"}
    ann = event_data("ann", order=order)
    ann_update = event_data("annu", type="order.updated", order={**order, "status": "paid"})
    bobs = [
        event_data("bob", affiliate_id="bob", order={**order, "number": f"#{1000 + n}"})
        for n in range(1, dead + 1)
    ]
    carol = event_data("carol", affiliate_id="carol")
    await producer.publish_many([ann, ann_update, *bobs, carol])
    await drain(settings)
    return Made(ann["id"], ann_update["id"], [bob["id"] for bob in bobs], carol["id"])


async def add_delivery(
    db: asyncpg.Connection,
    affiliate: str,
    state: str,
    ago: timedelta,
    durations_ms: Sequence[float] = (),
    order: str = "#1",
) -> str:
    """A delivery as the ledger would hold it, written straight in: taken `ago`, now in
    `state`, with one attempt of each duration (the last answered 500 unless delivered).
    For what reads the ledger by time (the overview), which a worker cannot back-date.
    Its event id."""
    data = event_data(
        f"{affiliate}-{state}",
        affiliate_id=affiliate,
        order={"number": order, "amount": "1", "commission": "0.1"},
    )
    row = await db.fetchrow(
        """
        INSERT INTO deliveries (id, event_id, event_type, affiliate_id, order_number,
                                occurred_at, event, state, attempts, created_at, updated_at)
        VALUES ($1, $2, 'order.created', $3, $4, now() - $5::interval, $6, $7, $8,
                now() - $5::interval, now() - $5::interval)
        RETURNING id, created_at
        """,
        uuid.uuid4(),
        data["id"],
        affiliate,
        order,
        ago,
        data,
        state,
        len(durations_ms),
    )
    assert row is not None
    for number, duration in enumerate(durations_ms, 1):
        last = number == len(durations_ms)
        await db.execute(
            """
            INSERT INTO attempts (delivery_id, number, started_at, duration_ms, status_code)
            VALUES ($1, $2, $3, $4, $5)
            """,
            row["id"],
            number,
            row["created_at"],
            duration,
            200 if last and state == "delivered" else 500,
        )
    return str(data["id"])


DELAYED_REASON = "delayed 5m by its callback"


@dataclass(frozen=True)
class StoreWideAndDelayed:
    """What `make_store_wide_and_delayed` made: delivery ids, callback ids, and when the
    delayed delivery is due."""

    store_wide: str
    store_callback: int
    delayed: str
    delayed_callback: int
    due: datetime


async def make_store_wide_and_delayed(
    db: asyncpg.Connection, producer: Producer, flaky: Flaky, settings: Settings
) -> StoreWideAndDelayed:
    """zed, who has no callback of their own, gets order #9's create delivered through the
    store-wide callback, by a worker; ann's update of order #1001 waits, pending, 5 minutes
    as its callback's delay says. That one is taken straight into the ledger, as a worker
    takes it: a worker would keep its job, and a test, waiting for those minutes."""
    store = await save_callback(
        db, STORE_WIDE, "order.created", "GET", flaky.url + "/store?a={{affiliate.id}}"
    )
    later = await save_callback(db, "ann", "order.updated", "GET", flaky.url + "/ann", delay="5m")
    zed = parse_event(
        event_data(
            "zed", affiliate_id="zed", order={"number": "#9", "amount": "1", "commission": "0.1"}
        )
    )
    assert await producer.publish(zed)
    await drain(settings)
    update = parse_event(
        event_data("later", type="order.updated", occurred_at="2026-11-29T09:00:00Z")
    )
    due = datetime.now(UTC) + timedelta(minutes=5)
    taken = await take(
        db, delivery_id(update), update, later.id, "job-later", 60, due=(due, DELAYED_REASON)
    )
    assert taken.action == "early", taken
    return StoreWideAndDelayed(
        str(delivery_id(zed)), store.id, str(delivery_id(update)), later.id, due
    )
