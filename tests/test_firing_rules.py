"""Which events a callback fires for, whose callback it is, and when: status conditions,
store-wide callbacks and delays, end to end through a worker to a real receiver."""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime
from typing import Any

import asyncpg
import pytest
import structlog.testing

from producer import Producer
from producer.event import InvalidEvent, parse_event
from producer.queue import job_id
from tests.support.events import event_data, save_callback
from tests.support.ledger import delivery
from tests.support.receivers import Receiver
from tests.support.wait import until
from tests.support.workers import drain, running_worker
from worker import callbacks, duration
from worker.config import Settings
from worker.deliver import delivery_id
from worker.job import BLOCKED_RECHECK_SECONDS


def _order(number: str, status: str | None) -> dict[str, Any]:
    order = {"number": number, "amount": "10.50", "commission": "1.05"}
    if status is not None:
        order["status"] = status
    return order


# --- conditions ----------------------------------------------------------------------------


async def test_a_callback_fires_only_for_the_statuses_it_lists(
    db: asyncpg.Connection, producer: Producer, receiver: Receiver, settings: Settings
) -> None:
    await save_callback(
        db,
        "ann",
        "order.created",
        "GET",
        receiver.url + "/pb?o={{order.number}}&s={{order.status}}",
        statuses="approved, refunded",
    )
    sent = {
        status: event_data(f"status-{status}", order=_order(f"#{status}", status))
        for status in ("approved", "pending", "refunded", "Approved")
    }
    no_status = event_data("status-none", order=_order("#none", None))
    for data in [*sent.values(), no_status]:
        await producer.publish(data)
    await drain(settings)

    assert sorted(got.path_qs for got in receiver.requests) == [
        "/pb?o=%23approved&s=approved",
        "/pb?o=%23refunded&s=refunded",
    ]
    for status in ("approved", "refunded"):
        row = await delivery(db, sent[status]["id"])
        assert (row["state"], row["reason"], row["attempts"]) == ("delivered", None, 1)
    for status in ("pending", "Approved"):  # statuses match exactly, case included
        row = await delivery(db, sent[status]["id"])
        assert (row["state"], row["attempts"]) == ("skipped", 0)
        assert row["reason"] == f"status {status} not in approved, refunded"
    row = await delivery(db, no_status["id"])
    assert (row["state"], row["reason"]) == ("skipped", "status (none) not in approved, refunded")


async def test_an_update_whose_status_is_not_listed_does_not_hold_up_the_next(
    db: asyncpg.Connection, producer: Producer, receiver: Receiver, settings: Settings
) -> None:
    """A skipped update settles at once, so the order's later updates go in their turn."""
    await save_callback(
        db, "ann", "order.updated", "GET", receiver.url + "/u?s={{order.status}}", statuses="paid"
    )
    first = event_data(
        "upd-1",
        type="order.updated",
        occurred_at="2026-11-30T10:00:00+00:00",
        order=_order("#77", "pending"),
    )
    second = event_data(
        "upd-2",
        type="order.updated",
        occurred_at="2026-11-30T10:05:00+00:00",
        order=_order("#77", "paid"),
    )
    await producer.publish(first)
    await producer.publish(second)
    await drain(settings)

    assert [got.path_qs for got in receiver.requests] == ["/u?s=paid"]
    assert (await delivery(db, first["id"]))["state"] == "skipped"
    assert (await delivery(db, second["id"]))["state"] == "delivered"


# --- store-wide callbacks -----------------------------------------------------------------


async def test_a_store_wide_callback_serves_every_affiliate_without_one_of_its_own(
    db: asyncpg.Connection, producer: Producer, receiver: Receiver, settings: Settings
) -> None:
    store = await save_callback(
        db, "*", "order.created", "GET", receiver.url + "/store?aff={{affiliate.id}}"
    )
    own = await save_callback(db, "ann", "order.created", "GET", receiver.url + "/ann")
    disabled = await save_callback(db, "dave", "order.created", "GET", receiver.url + "/dave")
    await db.execute("SELECT postback_disable_callback($1, 'ops', NULL, NULL, false)", disabled.id)
    await save_callback(db, "*", "order.updated", "GET", receiver.url + "/store-updated")
    events = {
        affiliate: event_data(f"store-{affiliate}", affiliate_id=affiliate)
        for affiliate in ("ann", "bob", "carol", "dave")
    }
    for data in events.values():
        await producer.publish(data)
    await drain(settings)

    assert sorted(got.path_qs for got in receiver.requests) == [
        "/ann",
        "/store?aff=bob",
        "/store?aff=carol",
    ]
    ann = await delivery(db, events["ann"]["id"])
    assert (ann["state"], ann["callback_id"]) == ("delivered", own.id)
    for affiliate in ("bob", "carol"):
        row = await delivery(db, events[affiliate]["id"])
        assert (row["state"], row["callback_id"]) == ("delivered", store.id)
        # The delivery id, and so the Idempotency-Key, is the affiliate's as ever.
        assert row["id"] == delivery_id(parse_event(events[affiliate]))
    # An affiliate's own callback wins even when disabled: its postbacks are stopped, not
    # handed to the store's.
    dave = await delivery(db, events["dave"]["id"])
    assert (dave["state"], dave["reason"], dave["callback_id"]) == (
        "skipped",
        "callback disabled",
        disabled.id,
    )


async def test_a_running_worker_follows_store_wide_and_own_callbacks_as_they_change(
    db: asyncpg.Connection, producer: Producer, receiver: Receiver, settings: Settings
) -> None:
    await save_callback(db, "*", "order.created", "GET", receiver.url + "/store")
    async with running_worker(settings):
        first = event_data("change-1", affiliate_id="bob", order=_order("#c1", None))
        await producer.publish(first)
        await until(lambda: len(receiver.requests) == 1)
        # bob gets a callback of his own: the worker's cache must not keep sending his
        # events to the store-wide one.
        await save_callback(db, "bob", "order.created", "GET", receiver.url + "/bob")
        second = event_data("change-2", affiliate_id="bob", order=_order("#c2", None))
        await producer.publish(second)
        await until(lambda: len(receiver.requests) == 2)
        # The store-wide one removed: an affiliate without its own has nowhere to go.
        assert await callbacks.remove(db, "*", "order.created")
        third = event_data("change-3", affiliate_id="carol", order=_order("#c3", None))
        await producer.publish(third)

        async def settled() -> bool:
            row = await db.fetchrow("SELECT state FROM deliveries WHERE event_id = $1", third["id"])
            return row is not None and row["state"] == "skipped"

        await until(settled)
    assert [got.path_qs for got in receiver.requests] == ["/store", "/bob"]
    row = await delivery(db, third["id"])
    assert row["reason"] == "no order.created callback configured for affiliate carol"


async def test_an_update_waits_for_a_create_that_goes_to_the_store_wide_callback(
    db: asyncpg.Connection, producer: Producer, receiver: Receiver, settings: Settings
) -> None:
    """The wait for an order's create counts the store-wide create callback as the
    affiliate's: its create is coming."""
    await save_callback(db, "*", "order.created", "GET", receiver.url + "/created")
    await save_callback(db, "bob", "order.updated", "GET", receiver.url + "/updated")
    update = event_data(
        "sw-upd", affiliate_id="bob", type="order.updated", order=_order("#9", None)
    )
    create = event_data("sw-new", affiliate_id="bob", order=_order("#9", None))
    async with running_worker(settings.model_copy(update={"create_wait": 30.0})):
        await producer.publish(update)

        async def waiting() -> bool:
            row = await db.fetchrow(
                "SELECT create_wait_until FROM deliveries WHERE event_id = $1", update["id"]
            )
            return row is not None and row["create_wait_until"] is not None

        await until(waiting)
        await producer.publish(create)
        await until(lambda: len(receiver.requests) == 2)
    assert [got.path_qs for got in receiver.requests] == ["/created", "/updated"]


@pytest.mark.unit
def test_no_event_can_name_the_store_wide_callback_as_its_affiliate() -> None:
    with pytest.raises(InvalidEvent) as refused:
        parse_event(event_data("star", affiliate_id="*"))
    [error] = refused.value.errors
    assert error.field == "affiliate_id"
    assert "'*' names the store-wide callback, not an affiliate" in error.message


# --- delays ---------------------------------------------------------------------------------


async def test_a_delayed_callback_fires_that_long_after_the_event_was_accepted(
    db: asyncpg.Connection, producer: Producer, receiver: Receiver, settings: Settings
) -> None:
    await save_callback(db, "ann", "order.created", "GET", receiver.url + "/late", delay="2s")
    data = event_data("delayed")
    with structlog.testing.capture_logs() as logs:
        async with running_worker(settings):
            accepted = time.time()
            await producer.publish(data)
            # Ops see it waiting, with its due time and why.
            await until(lambda: _exists(db, data["id"]))
            row = await delivery(db, data["id"])
            assert (row["state"], row["attempts"]) == ("pending", 0)
            assert row["reason"] == "delayed 2s by its callback"
            due = row["next_attempt_at"].timestamp()
            assert accepted + 1.5 < due < time.time() + 2.0
            await until(lambda: len(receiver.requests) == 1, within=10)
    [said] = [line for line in logs if line["event"] == "delivery_delayed"]
    assert said["event_id"] == data["id"]
    assert 1.0 < said["due_in_s"] <= 2.0
    [got] = receiver.requests
    assert got.at >= due
    assert got.at - accepted >= 2.0
    row = await delivery(db, data["id"])
    assert (row["state"], row["reason"], row["attempts"]) == ("delivered", None, 1)


async def _exists(db: asyncpg.Connection, event_id: str) -> bool:
    return bool(await db.fetchval("SELECT count(*) FROM deliveries WHERE event_id = $1", event_id))


async def test_an_update_of_a_delayed_create_waits_for_it(
    db: asyncpg.Connection, producer: Producer, receiver: Receiver, settings: Settings
) -> None:
    await save_callback(db, "ann", "order.created", "GET", receiver.url + "/created", delay="2s")
    await save_callback(db, "ann", "order.updated", "GET", receiver.url + "/updated")
    create = event_data("dl-new", order=_order("#5", "pending"))
    update = event_data("dl-upd", type="order.updated", order=_order("#5", "approved"))
    async with running_worker(settings):
        await producer.publish(create)
        await producer.publish(update)
        await until(lambda: len(receiver.requests) == 2, within=30)
    assert [got.path_qs for got in receiver.requests] == ["/created", "/updated"]
    row = await delivery(db, update["id"])
    assert (row["state"], row["order_note"]) == ("delivered", None)


async def test_an_update_held_by_a_delayed_create_is_not_run_again_until_the_create_is_due(
    db: asyncpg.Connection, producer: Producer, receiver: Receiver, settings: Settings
) -> None:
    """It looks again 15 s after the create is due, not every 15 s for the whole delay."""
    await save_callback(db, "ann", "order.created", "GET", receiver.url + "/created", delay="1h")
    await save_callback(db, "ann", "order.updated", "GET", receiver.url + "/updated")
    create = event_data("held-new", order=_order("#h", None))
    update = event_data("held-upd", type="order.updated", order=_order("#h", None))
    async with running_worker(settings):
        await producer.publish(create)
        await producer.publish(update)

        async def blocked() -> bool:
            row = await db.fetchrow(
                "SELECT blocked_by FROM deliveries WHERE event_id = $1", update["id"]
            )
            return row is not None and row["blocked_by"] is not None

        await until(blocked)
        create_due = (await delivery(db, create["id"]))["next_attempt_at"].timestamp()

        async def next_run() -> float | None:
            score = await producer.redis.zscore(settings.queue_name, job_id(update["id"]))
            return None if score is None or score < create_due * 1000 else score / 1000

        await until(next_run, what="the update deferred past the create's due time")
        runs_at = await next_run()
        assert receiver.requests == []
    assert runs_at == pytest.approx(create_due + BLOCKED_RECHECK_SECONDS, abs=1.0)


async def test_a_delay_counts_from_acceptance_even_when_the_worker_comes_later(
    db: asyncpg.Connection, producer: Producer, receiver: Receiver, settings: Settings
) -> None:
    """A backlog taken after its delay is over goes at once: the delay is not added again."""
    await save_callback(db, "ann", "order.created", "GET", receiver.url + "/late", delay="1s")
    data = event_data("backlog")
    await producer.publish(data)
    await asyncio.sleep(1.2)  # the worker comes after the delay is over
    started = time.time()
    await drain(settings)
    [got] = receiver.requests
    assert got.at - started < 1.0
    row = await delivery(db, data["id"])
    assert row["state"] == "delivered"


# --- a rolling upgrade ----------------------------------------------------------------------


async def test_workers_of_version_10_still_take_deliveries(db: asyncpg.Connection) -> None:
    """They call `postback_take` with 14 arguments and `postback_take_many` with 14 arrays,
    and so never delay: a rolling upgrade, schema first, does not stop them."""
    events = [
        parse_event(event_data(f"v10-{n}", order=_order(f"#v10-{n}", None))).model_copy(
            update={"occurred_at": datetime.now(UTC)}
        )
        for n in range(2)
    ]
    one = events[0]
    arguments = (
        delivery_id(one),
        one.id,
        one.type,
        one.affiliate_id,
        one.order.number,
        one.occurred_at,
        None,
        one.to_json(),
        "old-job",
        60.0,
        None,
        False,
        None,
        None,
    )
    row = await db.fetchrow(
        "SELECT action FROM postback_take($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12,"
        " $13, $14)",
        *arguments,
    )
    assert row is not None
    assert row["action"] == "claimed"
    two = events[1]
    arrays = [
        [delivery_id(two)],
        [two.id],
        [two.type],
        [two.affiliate_id],
        [two.order.number],
        [two.occurred_at],
        [None],
        [two.to_json()],
        ["old-job"],
        [60.0],
        [None],
        [False],
        [None],
        [None],
    ]
    rows = await db.fetch(
        "SELECT action FROM postback_take_many($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11,"
        " $12, $13, $14)",
        *arrays,
    )
    assert [r["action"] for r in rows] == ["claimed"]


# --- the rules as typed ---------------------------------------------------------------------


@pytest.mark.unit
@pytest.mark.parametrize(
    ("typed", "seconds"),
    [(None, 0), ("0", 0), ("0s", 0), ("90s", 90), ("5m", 300), ("1.5h", 5400), ("24h", 86400)],
)
def test_a_delay_is_read_in_whole_seconds(typed: str | None, seconds: int) -> None:
    assert callbacks.parse_delay(typed) == seconds


@pytest.mark.unit
@pytest.mark.parametrize(
    ("typed", "message"),
    [
        ("5x", "delay '5x' is not a duration; write it like 90s, 5m or 2h"),
        ("", "delay '' is not a duration; write it like 90s, 5m or 2h"),
        ("-5m", "delay '-5m' is not a duration; write it like 90s, 5m or 2h"),
        ("25h", "delay '25h' is out of range; it may be 0 to 24h (86400 s)"),
        (86401, "delay 86401 is out of range; it may be 0 to 24h (86400 s)"),
        (-1, "delay -1 is out of range; it may be 0 to 24h (86400 s)"),
        (10**400, f"delay {10**400!r} is out of range; it may be 0 to 24h (86400 s)"),
        ("250ms", "delay '250ms' is not a whole number of seconds"),
    ],
)
def test_a_delay_out_of_bounds_is_refused_naming_it(typed: str | int, message: str) -> None:
    with pytest.raises(callbacks.CallbackError) as refused:
        callbacks.parse_delay(typed)
    assert (refused.value.field, refused.value.message) == ("delay", message)


@pytest.mark.unit
@pytest.mark.parametrize("seconds", [0, 1, 59, 60, 90, 300, 3599, 3600, 5400, 86400])
def test_a_delay_is_spelled_as_it_reads_back(seconds: int) -> None:
    assert callbacks.parse_delay(duration.spell(seconds)) == seconds


@pytest.mark.unit
def test_statuses_are_read_from_text_or_a_list_alike() -> None:
    assert callbacks.parse_statuses(None) is None
    assert callbacks.parse_statuses(" approved , refunded") == ("approved", "refunded")
    assert callbacks.parse_statuses(["approved", "refunded"]) == ("approved", "refunded")


@pytest.mark.unit
@pytest.mark.parametrize(
    ("typed", "message"),
    [
        ("approved,,x", "got an empty one"),
        ([], "got none"),
        ("", "got an empty one"),
        ("a,a", "status 'a' is listed twice"),
        ("x" * 65, "is longer than an order status can be (64 characters)"),
        (",".join(str(n) for n in range(33)), "33 statuses listed; at most 32 may be"),
    ],
)
def test_statuses_that_cannot_match_are_refused(typed: str | list[str], message: str) -> None:
    with pytest.raises(callbacks.CallbackError) as refused:
        callbacks.parse_statuses(typed)
    assert refused.value.field == "statuses"
    assert message in refused.value.message
