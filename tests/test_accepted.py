"""Accepted means recorded: an event that ingest (or a durable producer) accepted is in the
ledger, `accepted`, before anyone is told so; a worker's take makes it the delivery it would
have made, and the sweep queues it again if Redis loses its job.

Real Redis and Postgres; a test that empties Redis does it on a Redis of its own.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from dataclasses import replace
from datetime import UTC, datetime
from typing import Any

import asyncpg
import pytest

from producer import Producer
from producer.event import Event, parse_event
from producer.record import delivery_id, record, stamped
from tests.support.cli import UNREACHABLE_REDIS
from tests.support.events import event_data, events, save_callback, write_job
from tests.support.proxy import Proxy, postgres_target, through
from tests.support.receivers import Receiver, raw_server
from tests.support.service import Api, ingest, running_service, with_tokens
from tests.support.wait import until
from tests.support.workers import drain, running_worker
from worker import database, ledger
from worker.config import Settings
from worker.sweep import sweep


def _stamped(data: dict[str, object]) -> Event:
    return stamped(parse_event(data), _now())


def _order(number: str) -> dict[str, str]:
    """Another order: its deliveries wait for none of order #1001's."""
    return {"number": number, "amount": "10.50", "commission": "1.05"}


def _now() -> datetime:
    return datetime.now(UTC)


@pytest.fixture
async def pool(settings: Settings) -> AsyncIterator[asyncpg.Pool]:
    assert settings.database_url is not None
    pool = await database.create_pool(settings.database_url, 2)
    try:
        yield pool
    finally:
        await pool.close()


async def _row(db: asyncpg.Connection, event: Event) -> asyncpg.Record:
    row = await db.fetchrow("SELECT * FROM deliveries WHERE id = $1", delivery_id(event))
    assert row is not None
    return row


# --- the ledger ------------------------------------------------------------------------


async def test_a_recorded_event_is_accepted_due_and_recorded_once(
    db: asyncpg.Connection, pool: asyncpg.Pool
) -> None:
    event = _stamped(event_data("rec"))
    other = _stamped(event_data("rec-other", type="order.updated"))

    assert await record(pool, [event, other]) == [True, True]
    row = await _row(db, event)
    assert await record(pool, [other, event]) == [False, False]  # the same ids again

    assert dict(await _row(db, event)) == dict(row)  # a repeated id changes nothing
    assert row["state"] == "accepted"
    assert row["callback_id"] is None
    assert row["event"] == event.to_json()
    assert row["occurred_at"] == event.occurred_at
    assert row["next_attempt_at"] <= await db.fetchval("SELECT now()")  # due at once
    # The batch's order is its arrival order.
    assert (await _row(db, other))["created_at"] > row["created_at"]


async def test_a_take_makes_an_accepted_delivery_what_an_insert_would_have(
    db: asyncpg.Connection, pool: asyncpg.Pool
) -> None:
    recorded = _stamped(event_data("take-rec"))
    fresh = _stamped(event_data("take-fresh", order=_order("#2")))
    await record(pool, [recorded])
    arrived = (await _row(db, recorded))["created_at"]

    taken = await ledger.take(db, delivery_id(recorded), recorded, 7, "job-1", 60)
    as_new = await ledger.take(db, delivery_id(fresh), fresh, 7, "job-2", 60)

    # The same answer as for a delivery the take created, but for its own event and due time.
    assert replace(taken, event={}, wait=0) == replace(as_new, event={}, wait=0)
    assert taken.event == recorded.to_json()
    assert (taken.action, taken.inserted, taken.state) == ("claimed", True, "pending")
    row = await _row(db, recorded)
    assert (row["state"], row["callback_id"], row["claimed_by"]) == ("pending", 7, "job-1")
    assert row["created_at"] == arrived  # its arrival is when it was accepted


async def test_a_take_of_another_event_under_a_recorded_id_sends_the_recorded_one(
    db: asyncpg.Connection, pool: asyncpg.Pool
) -> None:
    first = _stamped(event_data("first-wins"))
    second = parse_event({**first.to_json(), "order": {**first.to_json()["order"], "amount": "99"}})
    await record(pool, [first])

    taken = await ledger.take(db, delivery_id(second), second, 7, "job-1", 60)

    # Not the caller's event: the worker reads the recorded one back (worker/job.py).
    assert (taken.action, taken.inserted, taken.event) == ("claimed", False, first.to_json())


async def test_an_accepted_create_goes_before_an_update_taken_ahead_of_it(
    db: asyncpg.Connection, pool: asyncpg.Pool
) -> None:
    create = _stamped(event_data("order-create"))
    update = _stamped(event_data("order-update", type="order.updated"))
    await record(pool, [create, update])

    taken = await ledger.take(db, delivery_id(update), update, 8, "job-u", 60)

    assert taken.action == "blocked"
    assert taken.blocker is not None
    assert (taken.blocker.id, taken.blocker.event_id) == (delivery_id(create), create.id)


# --- the sweep -------------------------------------------------------------------------


async def test_the_sweep_queues_accepted_events_whose_job_redis_never_had(
    db: asyncpg.Connection,
    pool: asyncpg.Pool,
    settings: Settings,
    private_redis: str,
    receiver: Receiver,
) -> None:
    own = settings.model_copy(update={"redis_url": private_redis})
    await save_callback(db, "ann", "order.created", "GET", receiver.url + "/pb?e={{event.id}}")
    await save_callback(db, "ann", "order.updated", "GET", receiver.url + "/up?e={{event.id}}")
    # The sweep queues in the ledger's order of ids: the update's first, so that the worker
    # takes it before its create.
    while True:
        create = _stamped(event_data("swept-create"))
        update = _stamped(event_data("swept-update", type="order.updated"))
        if delivery_id(update) < delivery_id(create):
            break
    await record(pool, [create, update])

    async with await Producer.connect(private_redis, own.queue_name) as producer:
        assert await sweep(pool, producer.redis, own.queue_name, own.job_timeout) == 2
        assert await sweep(pool, producer.redis, own.queue_name, own.job_timeout) == 0
        async with running_worker(own):
            await until(lambda: len(receiver.requests) == 2)

    assert [r.path_qs.split("?")[0] for r in receiver.requests] == ["/pb", "/up"]
    states = await db.fetch("SELECT state FROM deliveries")
    assert [row["state"] for row in states] == ["delivered", "delivered"]


async def test_an_accepted_event_this_worker_refuses_becomes_a_dead_letter(
    db: asyncpg.Connection, pool: asyncpg.Pool, producer: Producer, settings: Settings
) -> None:
    """Recorded by an ingest or a producer of another version, refused by this worker: left
    accepted, the sweep would queue it again every minute, for ever."""
    good = event_data("refused-later")
    await record(pool, [_stamped(good)])
    bad = good | {"order": {**good["order"], "amount": "ten"}}
    await write_job(producer.redis, producer.queue_name, bad["id"], json.dumps(bad))

    await drain(settings)

    row = await db.fetchrow("SELECT state, reason FROM deliveries WHERE event_id = $1", good["id"])
    assert row is not None
    assert row["state"] == "dead"
    assert row["reason"].startswith("the worker refused it: invalid event: order.amount: ")
    assert await sweep(pool, producer.redis, settings.queue_name, settings.job_timeout) == 0


async def test_a_worker_taking_a_recorded_event_behaves_as_for_a_queued_one(
    db: asyncpg.Connection, pool: asyncpg.Pool, settings: Settings, producer: Producer
) -> None:
    """Its retries and its dead letter: the schedule (two quick retries) runs out."""
    await save_callback(db, "ann", "order.created", "GET", "http://127.0.0.1:1/pb")
    recorded = _stamped(event_data("dead-rec"))
    queued = _stamped(event_data("dead-queued", order=_order("#2")))
    await record(pool, [recorded])
    assert await producer.publish_many([recorded, queued]) == [True, True]

    await drain(settings)

    rows = {e.id: await _row(db, e) for e in (recorded, queued)}
    for row in rows.values():
        assert (row["state"], row["attempts"], row["error_class"]) == ("dead", 3, "connect_error")
    assert rows[recorded.id]["reason"] == rows[queued.id]["reason"]


# --- ingest ----------------------------------------------------------------------------


async def _keys_by_event(receiver: Receiver) -> dict[str, set[str]]:
    """The Idempotency-Keys each event id was sent with (the callbacks put it in ?e=)."""
    keys: dict[str, set[str]] = {}
    for request in receiver.requests:
        event = request.path_qs.split("e=", 1)[1]
        keys.setdefault(event, set()).add(request.headers["Idempotency-Key"])
    return keys


async def test_2000_events_accepted_while_no_worker_runs_survive_a_flushall(
    db: asyncpg.Connection, settings: Settings, private_redis: str, receiver: Receiver
) -> None:
    """1,000 over HTTP (batches of 100) and 1,000 through a durable producer; Redis loses
    every job; a worker starts: each event delivered once, with one key."""
    own = settings.model_copy(update={"redis_url": private_redis})
    await save_callback(db, "ann", "order.created", "GET", receiver.url + "/pb?e={{event.id}}")
    over_http = events("http", 1000)
    durable = events("durable", 1000)
    assert settings.database_url is not None
    async with running_service(with_tokens(own)) as api:
        for start in range(0, 1000, 100):
            status, body = await ingest(api, over_http[start : start + 100])
            assert (status, body["queued"]) == (202, True)
    async with await Producer.connect(
        private_redis, own.queue_name, database_url=settings.database_url
    ) as producer:
        assert await producer.publish_many(durable) == [True] * 1000
        assert await producer.redis.zcard(own.queue_name) == 2000
        await producer.redis.flushall()

    async with running_worker(own):  # it sweeps as it starts
        await until(lambda: len(receiver.requests) >= 2000, within=120)
        await until(lambda: _count(db, "delivered", 2000))

    keys = await _keys_by_event(receiver)
    assert sorted(keys) == sorted(e["id"] for e in over_http + durable)
    assert all(len(k) == 1 for k in keys.values())  # none twice with different keys
    assert len(receiver.requests) == 2000


async def _count(db: asyncpg.Connection, state: str, expected: int) -> bool:
    count = await db.fetchval("SELECT count(*) FROM deliveries WHERE state = $1", state)
    return bool(count == expected)


async def test_with_postgres_down_ingest_answers_503_and_enqueues_nothing(
    db: asyncpg.Connection, settings: Settings, producer: Producer, receiver: Receiver
) -> None:
    """Postgres is taken away behind a proxy; back, the same request is accepted once."""
    assert settings.database_url is not None
    await save_callback(db, "ann", "order.created", "GET", receiver.url + "/pb?e={{event.id}}")
    batch = events("pg-down", 3)
    proxy = Proxy(postgres_target(settings.database_url))
    async with raw_server(proxy.handle) as base:
        port = int(base.rsplit(":", 1)[1])
        behind = settings.model_copy(update={"database_url": through(settings.database_url, port)})
        async with running_service(with_tokens(behind)) as api:
            proxy.cut()
            status, body = await ingest(api, batch)
            assert status == 503
            assert body["error"] == (
                "Postgres is unreachable: nothing was recorded or enqueued; send the same "
                "request again (safe: event ids are idempotent)"
            )
            assert await producer.redis.zcard(producer.queue_name) == 0
            assert await db.fetchval("SELECT count(*) FROM deliveries") == 0

            proxy.mend()
            first = await ingest(api, batch)
            again = await ingest(api, batch)

    assert first == (202, {"accepted": ids(batch), "already_queued": [], "queued": True})
    assert again == (202, {"accepted": ids(batch), "already_queued": ids(batch), "queued": True})
    assert await producer.redis.zcard(producer.queue_name) == 3
    assert await _count(db, "accepted", 3)
    await drain(settings)
    assert sorted(await _keys_by_event(receiver)) == sorted(ids(batch))
    assert len(receiver.requests) == 3


def ids(batch: list[dict[str, Any]]) -> list[str]:
    return [str(data["id"]) for data in batch]


async def test_with_redis_down_ingest_records_and_the_sweep_delivers_once_redis_is_back(
    db: asyncpg.Connection, settings: Settings, private_redis: str, receiver: Receiver
) -> None:
    await save_callback(db, "ann", "order.created", "GET", receiver.url + "/pb?e={{event.id}}")
    batch = events("redis-down", 5)
    gone = settings.model_copy(update={"redis_url": UNREACHABLE_REDIS})
    async with running_service(with_tokens(gone)) as api:
        status, body = await ingest(api, batch)

    assert (status, body) == (202, {"accepted": ids(batch), "already_queued": [], "queued": False})
    assert await _count(db, "accepted", 5)
    back = settings.model_copy(update={"redis_url": private_redis})
    async with running_worker(back):  # its sweep at start-up queues them
        await until(lambda: _count(db, "delivered", 5))
    assert sorted(await _keys_by_event(receiver)) == sorted(ids(batch))
    assert len(receiver.requests) == 5


async def test_an_event_id_sent_twice_over_http_and_once_durably_is_one_delivery(
    db: asyncpg.Connection, api: Api, settings: Settings, receiver: Receiver
) -> None:
    await save_callback(db, "ann", "order.created", "GET", receiver.url + "/pb?e={{event.id}}")
    data = event_data("thrice")
    assert (await ingest(api, data))[0] == 202
    await drain(settings)
    assert (await ingest(api, data))[0] == 202  # after it was delivered
    assert settings.redis_url is not None
    async with await Producer.connect(
        settings.redis_url, settings.queue_name, database_url=settings.database_url
    ) as durable:
        done = await durable.accept_many([data])
    assert done.recorded == [False]  # the ledger has it: nothing more is sent
    await drain(settings)

    assert len(receiver.requests) == 1
    assert await _count(db, "delivered", 1)


async def test_the_ops_api_lists_accepted_deliveries_by_their_state(api: Api) -> None:
    batch = events("listed", 2)
    assert (await ingest(api, batch))[0] == 202

    status, page = await api.call("GET", "/v1/deliveries", params={"state": "accepted"})

    assert status == 200
    assert sorted(item["event_id"] for item in page["items"]) == sorted(ids(batch))
    assert {item["state"] for item in page["items"]} == {"accepted"}
    status, detail = await api.call("GET", f"/v1/deliveries/{page['items'][0]['id']}")
    assert (status, detail["state"], detail["attempts"]) == (200, "accepted", [])
