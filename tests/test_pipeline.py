"""End to end: an event published to Redis, a worker, a real receiver, the ledger."""

from __future__ import annotations

import asyncio
import json
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import pytest
import structlog.testing
from aiohttp import web
from structlog.typing import EventDict

from ops.cli.demo import running, serve
from producer import Producer
from producer.queue import job_id
from tests.support.events import event_data, save_callback
from tests.support.ledger import delivery
from tests.support.logs import relay_logs
from tests.support.receivers import Flaky, Receiver
from tests.support.servers import database_name
from tests.support.wait import until
from tests.support.workers import drain
from worker.config import Settings
from worker.deliver import USER_AGENT
from worker.pool import create_worker

LINK = "https://shop.example/summer?ref=ann&campaign=summer&sub_id=fb1#promo"


async def test_get_callback_receives_the_rendered_request(
    db: asyncpg.Connection, producer: Producer, receiver: Receiver, settings: Settings
) -> None:
    await save_callback(
        db,
        "ann",
        "order.created",
        "GET",
        receiver.url + "/pb?o={{order.number}}&a={{order.amount}}&c={{ order.commission }}"
        "&s={{link.sub_id}}&camp={{link.query.campaign}}&h={{link.hash}}&p={{link.path}}",
    )
    data = event_data("get", link={"url": LINK})
    await producer.publish(data)
    await drain(settings)

    [got] = receiver.requests
    assert got.method == "GET"
    assert got.path_qs == "/pb?o=%231001&a=10.50&c=1.05&s=fb1&camp=summer&h=promo&p=%2Fsummer"
    assert got.body == b""
    assert got.headers["User-Agent"] == USER_AGENT
    row = await delivery(db, data["id"])
    assert got.headers["Idempotency-Key"] == str(row["id"])
    assert row["state"] == "delivered"
    assert row["attempts"] == 1
    assert row["request"]["url"] == receiver.url + got.path_qs
    attempt = await db.fetchrow("SELECT * FROM attempts WHERE delivery_id = $1", row["id"])
    assert attempt is not None
    assert attempt["number"] == 1
    assert attempt["status_code"] == 200
    assert attempt["response_excerpt"] == "thanks"
    assert attempt["duration_ms"] > 0


async def test_post_callback_receives_the_json_body(
    db: asyncpg.Connection, producer: Producer, receiver: Receiver, settings: Settings
) -> None:
    await save_callback(db, "bob", "order.created", "POST", receiver.url + "/hook/{{affiliate.id}}")
    data = event_data(
        "post",
        affiliate_id="bob",
        occurred_at="2026-11-21T10:00:00+00:00",
        order={
            "number": "#1002",
            "amount": "249.00",
            "commission": "24.90",
            "currency": "USD",
            "status": "pending",
        },
        link={"url": LINK, "sub_id": "newsletter"},
    )
    await producer.publish(data)
    await drain(settings)

    [got] = receiver.requests
    assert got.method == "POST"
    assert got.path_qs == "/hook/bob"
    assert got.headers["Content-Type"] == "application/json"
    assert got.headers["User-Agent"] == USER_AGENT
    uuid.UUID(got.headers["Idempotency-Key"])
    assert json.loads(got.body) == {
        "event": {
            "id": data["id"],
            "type": "order.created",
            "occurred_at": "2026-11-21T10:00:00+00:00",
        },
        "affiliate": {"id": "bob"},
        "order": {
            "number": "#1002",
            "amount": "249.00",
            "commission": "24.90",
            "currency": "USD",
            "status": "pending",
        },
        "link": {
            "url": LINK,
            "path": "/summer",
            "hash": "promo",
            "sub_id": "newsletter",
            "query": {"ref": "ann", "campaign": "summer", "sub_id": "fb1"},
        },
    }


async def test_affiliate_without_callback_gets_nothing_and_ledger_says_so(
    db: asyncpg.Connection, producer: Producer, receiver: Receiver, settings: Settings
) -> None:
    await save_callback(db, "ann", "order.created", "GET", receiver.url + "/ann")
    data = event_data("nocallback", affiliate_id="zoe")
    await producer.publish(data)
    with structlog.testing.capture_logs() as logs:
        await drain(settings)

    assert receiver.requests == []
    row = await delivery(db, data["id"])
    assert row["state"] == "skipped"
    assert row["reason"] == "no order.created callback configured for affiliate zoe"
    assert row["attempts"] == 0
    [skipped] = [e for e in logs if e["event"] == "delivery_skipped"]
    assert skipped["event_id"] == data["id"]
    assert skipped["delivery_id"] == str(row["id"])
    assert skipped["affiliate"] == "zoe"
    assert skipped["reason"] == row["reason"]


async def test_below_the_log_level_a_delivery_makes_no_log_call_and_above_it_says_all(
    db: asyncpg.Connection, producer: Producer, flaky: Flaky, settings: Settings
) -> None:
    """At level warning, as a deployment that logs only problems runs: a delivered event
    makes no call into the logging pipeline at all (not one that the level filter drops
    afterwards), while a dead one still says everything it always said."""
    await save_callback(db, "ann", "order.created", "GET", flaky.url + "/ok")
    await save_callback(db, "bob", "order.created", "GET", flaky.url + "/fail")
    delivered, dead = event_data("quiet"), event_data("loud", affiliate_id="bob")
    await producer.publish(delivered)
    await producer.publish(dead)
    reached: list[tuple[str, dict[str, Any]]] = []

    def first(_logger: Any, method: str, line: EventDict) -> EventDict:
        reached.append((method, dict(line)))
        return line

    with relay_logs("warning"):
        # Ahead of the relay's own processors, the level filter among them.
        structlog.configure(processors=[first, *structlog.get_config()["processors"]])
        await drain(settings.model_copy(update={"retry_schedule": ""}))

    assert (await delivery(db, delivered["id"]))["state"] == "delivered"
    row = await delivery(db, dead["id"])
    about = [(method, line) for method, line in reached if "delivery_id" in line]
    assert [(method, line["event"]) for method, line in about] == [("warning", "delivery_dead")]
    [(_, said)] = about
    assert said | {"reason": None} == {
        "event_id": dead["id"],
        "delivery_id": str(row["id"]),
        "affiliate": "bob",
        "state": "dead",
        "attempt": 1,
        "outcome": "transient",
        "status_code": 500,
        "error_class": None,
        "duration_ms": said["duration_ms"],
        "host": "127.0.0.1",
        "reason": None,
        "callback_disabled": False,
        "event": "delivery_dead",
    }
    assert said["reason"] == row["reason"] == "gave up after 1 attempt, last: HTTP 500"


async def test_updated_callback_fires_only_on_updates(
    db: asyncpg.Connection, producer: Producer, receiver: Receiver, settings: Settings
) -> None:
    await save_callback(db, "ann", "order.updated", "GET", receiver.url + "/u?e={{event.type}}")
    created = event_data("only-created")
    updated = event_data("only-updated", type="order.updated")
    await producer.publish(created)
    await producer.publish(updated)
    await drain(settings)

    assert [r.path_qs for r in receiver.requests] == ["/u?e=order.updated"]
    assert (await delivery(db, created["id"]))["state"] == "skipped"
    assert (await delivery(db, updated["id"]))["state"] == "delivered"


async def test_same_event_id_published_twice_while_queued_delivers_once(
    db: asyncpg.Connection, producer: Producer, receiver: Receiver, settings: Settings
) -> None:
    await save_callback(db, "ann", "order.created", "GET", receiver.url + "/once?id={{event.id}}")
    data = event_data("twice")
    assert await producer.publish(data) is True
    assert await producer.publish(data) is False
    await drain(settings)

    assert len(receiver.requests) == 1
    assert (await delivery(db, data["id"]))["attempts"] == 1


async def test_same_event_id_after_delivery_sends_nothing_more(
    db: asyncpg.Connection, producer: Producer, receiver: Receiver, settings: Settings
) -> None:
    await save_callback(db, "ann", "order.created", "GET", receiver.url + "/again")
    data = event_data("again")
    await producer.publish(data)
    await drain(settings)
    assert await producer.publish(data) is True  # the job is gone, so it is accepted again
    await drain(settings)

    assert len(receiver.requests) == 1
    row = await delivery(db, data["id"])
    assert (row["state"], row["attempts"]) == ("delivered", 1)


async def test_post_idempotency_key_is_the_ledger_delivery_id_and_occurred_at_defaults(
    db: asyncpg.Connection, producer: Producer, receiver: Receiver, settings: Settings
) -> None:
    await save_callback(db, "bob", "order.created", "POST", receiver.url + "/hook")
    data = event_data("stamp", affiliate_id="bob")  # no occurred_at
    before = datetime.now(UTC)
    await producer.publish(data)
    await drain(settings)

    [got] = receiver.requests
    row = await delivery(db, data["id"])
    assert got.headers["Idempotency-Key"] == str(row["id"])
    stamped = datetime.fromisoformat(json.loads(got.body)["event"]["occurred_at"])
    assert before - timedelta(seconds=1) <= stamped <= datetime.now(UTC)


@pytest.mark.parametrize(("hops", "state"), [(3, "delivered"), (4, "dead")])
async def test_redirects_are_followed_up_to_three_hops(
    db: asyncpg.Connection, producer: Producer, settings: Settings, hops: int, state: str
) -> None:
    seen: list[str] = []

    async def chain(request: web.Request) -> web.Response:
        seen.append(request.raw_path)
        step = int(request.match_info["tail"] or 0)
        if step < hops:
            raise web.HTTPFound(f"/{step + 1}")
        return web.Response(text="landed")

    async with serve(chain) as url:
        await save_callback(db, "ann", "order.created", "GET", url + "/0")
        data = event_data(f"hops-{hops}")
        await producer.publish(data)
        await drain(settings)

    row = await delivery(db, data["id"])
    assert (row["state"], row["attempts"]) == (state, 1)  # a redirect loop is not retried
    attempt = await db.fetchrow("SELECT * FROM attempts WHERE delivery_id = $1", row["id"])
    assert attempt is not None
    if state == "delivered":
        assert seen == ["/0", "/1", "/2", "/3"]
        assert attempt["response_excerpt"] == "landed"
    else:
        assert seen == ["/0", "/1", "/2", "/3"]  # the fourth redirect is not followed
        assert attempt["error_class"] == "too_many_redirects"


async def test_a_huge_response_is_read_only_up_to_64_kib(
    db: asyncpg.Connection, producer: Producer, settings: Settings
) -> None:
    async def huge(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse()
        await response.prepare(request)
        for _ in range(64):  # 8 MiB in all, more than anyone should keep
            await response.write(b"x" * 128 * 1024)
        return response

    async with serve(huge) as url:
        await save_callback(db, "ann", "order.created", "GET", url + "/big")
        data = event_data("huge")
        await producer.publish(data)
        await drain(settings)

    row = await delivery(db, data["id"])
    assert row["state"] == "delivered"
    excerpt = await db.fetchval(
        "SELECT response_excerpt FROM attempts WHERE delivery_id = $1", row["id"]
    )
    assert excerpt == "x" * 64 * 1024


async def test_a_receiver_slower_than_the_timeout_is_recorded_as_a_timeout(
    db: asyncpg.Connection, producer: Producer, settings: Settings
) -> None:
    done = asyncio.Event()

    async def slow(request: web.Request) -> web.Response:
        await done.wait()
        return web.Response(text="too late")

    async with serve(slow) as url:
        await save_callback(db, "ann", "order.created", "GET", url + "/slow")
        data = event_data("slow")
        await producer.publish(data)
        await drain(settings.model_copy(update={"request_timeout": 0.5, "retry_schedule": ""}))
        done.set()

    row = await delivery(db, data["id"])
    attempt = await db.fetchrow("SELECT * FROM attempts WHERE delivery_id = $1", row["id"])
    assert attempt is not None
    assert (row["state"], attempt["error_class"]) == ("dead", "timeout")
    assert 400 < attempt["duration_ms"] < 3000


async def test_a_database_outage_keeps_the_event_until_postgres_is_back(
    db: asyncpg.Connection,
    producer: Producer,
    receiver: Receiver,
    settings: Settings,
    database_url: str,
    admin_url: str,
) -> None:
    await save_callback(db, "ann", "order.created", "GET", receiver.url + "/outage")
    name = database_name(database_url)
    admin = await asyncpg.connect(admin_url)
    worker = create_worker(settings, handle_signals=False, poll_delay=0.05)
    try:
        with structlog.testing.capture_logs() as logs:
            async with running(worker):
                # arq offers no start-up event.
                await until(lambda: "db" in worker.ctx, what="the worker's database pool")
                # Postgres goes away for the worker: its connections cut, new ones refused.
                await admin.execute(f'ALTER DATABASE "{name}" WITH ALLOW_CONNECTIONS false')
                await admin.execute(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                    " WHERE datname = $1 AND pid <> $2",
                    name,
                    await db.fetchval("SELECT pg_backend_pid()"),
                )
                data = event_data("outage")
                await producer.publish(data)

                def failed() -> bool:
                    return any(
                        e["event"] == "database_failed" and e.get("event_id") == data["id"]
                        for e in logs
                    )

                # The job has run and given up for now: had it sent anything, it would be in.
                await until(failed, what="the job's database_failed")
                assert receiver.requests == []
                job = await producer.redis.zscore(producer.queue_name, job_id(data["id"]))
                assert job is not None

                await admin.execute(f'ALTER DATABASE "{name}" WITH ALLOW_CONNECTIONS true')
                # The job's next try comes INFRA_RETRY_SECONDS later.
                await until(lambda: receiver.requests, 30, "the delivery after the outage")
    finally:
        await admin.execute(f'ALTER DATABASE "{name}" WITH ALLOW_CONNECTIONS true')
        await admin.close()

    assert len(receiver.requests) == 1

    async def delivered() -> bool:
        return bool((await delivery(db, data["id"]))["state"] == "delivered")

    # The ledger write follows the request by a moment.
    await until(delivered, 5, "the ledger's delivered")
