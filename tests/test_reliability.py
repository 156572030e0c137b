"""Failing receivers, the retry schedule, dead letters, per-order ordering and the sweep.

Real Redis, Postgres and receivers on 127.0.0.1; the schedule is shortened to milliseconds
(or a few seconds where a test must catch deliveries between two tries).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

import asyncpg
import pytest
import structlog.testing
from aiohttp import web

from ops.cli.demo import serve
from producer import Producer
from producer.queue import JOB_EXPIRES, JOB_NAME, job_id, job_key, wake
from tests.support.events import event_data, save_callback
from tests.support.ledger import delivery
from tests.support.ports import free_port
from tests.support.receivers import Receiver, raw_server
from tests.support.schemas import released
from tests.support.servers import scratch_database
from tests.support.wait import until
from tests.support.workers import drain, kill_hard, running_worker, worker_process
from worker import database
from worker.config import Settings
from worker.pool import JOB_TIMEOUT_BACKSTOP
from worker.sweep import sweep


@dataclass
class Hit:
    path: str
    key: str
    at: float


@dataclass
class Script:
    """A receiver that answers each delivery (by Idempotency-Key) from a list of statuses.

    The last status repeats; `headers` go with every non-2xx answer.
    """

    statuses: list[int]
    headers: dict[str, str] = field(default_factory=dict)
    hits: list[Hit] = field(default_factory=list)
    url: str = ""

    def paths(self) -> list[str]:
        return [hit.path for hit in self.hits]

    async def handle(self, request: web.Request) -> web.Response:
        key = request.headers["Idempotency-Key"]
        seen = sum(hit.key == key for hit in self.hits)
        self.hits.append(Hit(request.path, key, time.monotonic()))
        status = self.statuses[min(seen, len(self.statuses) - 1)]
        headers = {} if 200 <= status < 300 else self.headers
        return web.Response(status=status, text=f"answer {status}", headers=headers)


@contextlib.asynccontextmanager
async def scripted(*statuses: int, headers: dict[str, str] | None = None) -> AsyncIterator[Script]:
    script = Script(list(statuses), headers or {})
    async with serve(script.handle) as url:
        script.url = url
        yield script


async def _attempts(conn: asyncpg.Connection, event_id: str) -> list[asyncpg.Record]:
    return list(
        await conn.fetch(
            """
            SELECT a.* FROM attempts a JOIN deliveries d ON d.id = a.delivery_id
            WHERE d.event_id = $1 ORDER BY a.number
            """,
            event_id,
        )
    )


async def _states(conn: asyncpg.Connection) -> dict[str, int]:
    rows = await conn.fetch("SELECT state, count(*) FROM deliveries GROUP BY state")
    return {row["state"]: row["count"] for row in rows}


# -- the schedule and the classification, end to end --------------------------------------


async def test_503_twice_then_200_is_delivered_on_attempt_3(
    db: asyncpg.Connection, producer: Producer, settings: Settings
) -> None:
    async with scripted(503, 503, 200) as receiver:
        await save_callback(
            db, "ann", "order.created", "GET", receiver.url + "/pb?o={{order.number}}"
        )
        data = event_data("flaky")
        await producer.publish(data)
        await drain(settings)

    row = await delivery(db, data["id"])
    assert (row["state"], row["attempts"], row["reason"]) == ("delivered", 3, None)
    attempts = await _attempts(db, data["id"])
    assert [a["number"] for a in attempts] == [1, 2, 3]
    assert [a["status_code"] for a in attempts] == [503, 503, 200]
    assert [a["response_excerpt"] for a in attempts] == ["answer 503", "answer 503", "answer 200"]
    # Each attempt keeps the request it sent; the receiver saw one delivery id throughout.
    assert {a["request"]["url"] for a in attempts} == {receiver.url + "/pb?o=%231001"}
    assert {hit.key for hit in receiver.hits} == {str(row["id"])}
    assert attempts[0]["started_at"] < attempts[1]["started_at"] < attempts[2]["started_at"]


async def test_404_is_dead_at_once_after_one_attempt(
    db: asyncpg.Connection, producer: Producer, settings: Settings
) -> None:
    async with scripted(404) as receiver:
        await save_callback(db, "ann", "order.created", "POST", receiver.url + "/missing")
        data = event_data("notfound")
        await producer.publish(data)
        await drain(settings)

    row = await delivery(db, data["id"])
    assert (row["state"], row["attempts"], row["reason"]) == ("dead", 1, "HTTP 404")
    assert row["error_class"] == "http_4xx"  # what `dlq list --error-class` filters by
    assert len(receiver.hits) == 1
    # The dead letter holds what a replay needs: the event, the request, the attempt.
    assert row["event"]["id"] == data["id"]
    assert row["request"]["method"] == "POST"
    assert row["request"]["url"] == receiver.url + "/missing"
    assert row["request"]["body"]["order"]["number"] == "#1001"
    [attempt] = await _attempts(db, data["id"])
    assert (attempt["status_code"], attempt["response_excerpt"]) == (404, "answer 404")
    assert row["next_attempt_at"] is None


async def test_a_302_without_a_location_is_dead_at_once_as_http_3xx(
    db: asyncpg.Connection, producer: Producer, settings: Settings
) -> None:
    async with scripted(302) as receiver:  # a redirect that says nowhere to go
        await save_callback(db, "ann", "order.created", "GET", receiver.url + "/moved")
        data = event_data("nowhere")
        await producer.publish(data)
        await drain(settings)

    row = await delivery(db, data["id"])
    assert (row["state"], row["attempts"], row["reason"]) == ("dead", 1, "HTTP 302")
    assert row["error_class"] == "http_3xx"
    assert receiver.paths() == ["/moved"]  # not retried
    [attempt] = await _attempts(db, data["id"])
    assert attempt["status_code"] == 302


async def test_410_is_dead_and_disables_the_callback(
    db: asyncpg.Connection, producer: Producer, settings: Settings
) -> None:
    async with scripted(410) as receiver:
        await save_callback(db, "ann", "order.created", "GET", receiver.url + "/gone")
        first = event_data("gone-1")
        await producer.publish(first)
        await drain(settings)
        second = event_data("gone-2", order={"number": "#1002", "amount": "1", "commission": "0"})
        await producer.publish(second)
        await drain(settings)

    row = await delivery(db, first["id"])
    assert (row["state"], row["attempts"]) == ("dead", 1)
    assert row["reason"] == "HTTP 410: callback disabled"
    assert await db.fetchval("SELECT enabled FROM callbacks WHERE affiliate_id = 'ann'") is False
    # The endpoint said it is gone: the next event is not sent there.
    assert len(receiver.hits) == 1
    later = await delivery(db, second["id"])
    assert (later["state"], later["reason"], later["attempts"]) == (
        "skipped",
        "callback disabled",
        0,
    )


async def test_connection_refused_is_retried_then_dead_when_the_schedule_runs_out(
    db: asyncpg.Connection, producer: Producer, settings: Settings
) -> None:
    port = free_port()  # nobody listens on it
    await save_callback(db, "ann", "order.created", "GET", f"http://127.0.0.1:{port}/refused")
    data = event_data("refused")
    await producer.publish(data)
    await drain(settings)

    row = await delivery(db, data["id"])
    attempts = await _attempts(db, data["id"])
    assert len(settings.schedule) == 2
    assert (row["state"], row["attempts"], row["error_class"]) == ("dead", 3, "connect_error")
    assert row["reason"].startswith("gave up after 3 attempts, last: connect_error: ")
    assert [a["error_class"] for a in attempts] == ["connect_error"] * 3
    assert all(a["status_code"] is None for a in attempts)
    # Each attempt includes the quick in-process second try of the connect.
    assert all("again after a retry" in a["error"] for a in attempts)
    assert all(a["duration_ms"] >= 450 for a in attempts)


@pytest.mark.parametrize(
    "answer",
    [b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n", b""],
    ids=["plain-http-answer", "closed"],
)
async def test_a_failed_tls_handshake_is_a_connect_error_tried_again_within_the_attempt(
    db: asyncpg.Connection, producer: Producer, settings: Settings, answer: bytes
) -> None:
    """An https callback whose server does not speak TLS: it answers the handshake with
    plain HTTP, or hangs up on it."""
    opened: list[tuple[float, bytes]] = []

    async def not_tls(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        opened.append((time.monotonic(), await reader.read(1)))
        if answer:
            writer.write(answer)
            await writer.drain()
        # Returning closes the connection.

    async with raw_server(not_tls) as url:
        https = url.replace("http://", "https://", 1)
        await save_callback(db, "ann", "order.created", "GET", https + "/pb")
        data = event_data("tls")
        await producer.publish(data)
        await drain(settings.model_copy(update={"retry_schedule": ""}))

    await _one_attempt_that_could_not_connect(db, data["id"])
    # Two connections in the one attempt, 0.5 s apart, each opened with a TLS handshake
    # record (0x16), never an HTTP request.
    assert [first for _, first in opened] == [b"\x16", b"\x16"]
    assert 0.45 <= opened[1][0] - opened[0][0] < 1.0


async def _one_attempt_that_could_not_connect(
    db: asyncpg.Connection, event_id: str
) -> asyncpg.Record:
    """The delivery is dead after one attempt, which could not connect twice (the quick
    retry within it); the attempt's row."""
    row = await delivery(db, event_id)
    assert (row["state"], row["attempts"], row["error_class"]) == ("dead", 1, "connect_error")
    [attempt] = await _attempts(db, event_id)
    assert (attempt["error_class"], attempt["status_code"]) == ("connect_error", None)
    assert "again after a retry" in attempt["error"]
    return attempt


async def test_an_unknown_host_is_a_connect_error_tried_again_within_the_attempt(
    db: asyncpg.Connection, producer: Producer, settings: Settings
) -> None:
    # .invalid never resolves (RFC 6761); here the lookup fails in milliseconds.
    await save_callback(db, "ann", "order.created", "GET", "http://nothing-here.invalid/pb")
    data = event_data("nxdomain")
    await producer.publish(data)
    await drain(settings.model_copy(update={"retry_schedule": ""}))

    attempt = await _one_attempt_that_could_not_connect(db, data["id"])
    assert "nothing-here.invalid" in attempt["error"]
    assert attempt["duration_ms"] >= 450  # the second lookup came 0.5 s after the first


async def test_a_receiver_that_never_answers_is_retried_then_dead(
    db: asyncpg.Connection, producer: Producer, settings: Settings
) -> None:
    arrived: list[float] = []
    done = asyncio.Event()

    async def silent(request: web.Request) -> web.Response:
        arrived.append(time.monotonic())
        await done.wait()  # never answers while the worker is waiting
        return web.Response()

    async with serve(silent) as url:
        await save_callback(db, "ann", "order.created", "GET", url + "/silent")
        data = event_data("silent")
        await producer.publish(data)
        await drain(settings.model_copy(update={"request_timeout": 0.3}))
        done.set()

    row = await delivery(db, data["id"])
    attempts = await _attempts(db, data["id"])
    assert (row["state"], row["attempts"], row["error_class"]) == ("dead", 3, "timeout")
    assert [a["error_class"] for a in attempts] == ["timeout"] * 3
    assert len(arrived) == 3  # a timeout is not retried in-process, only by the schedule


async def test_retry_after_on_a_429_is_waited_out(
    db: asyncpg.Connection, producer: Producer, settings: Settings
) -> None:
    async with scripted(429, 200, headers={"Retry-After": "2"}) as receiver:
        await save_callback(db, "ann", "order.created", "GET", receiver.url + "/busy")
        data = event_data("busy")
        await producer.publish(data)
        await drain(settings)

    first, second = await _attempts(db, data["id"])
    assert (first["status_code"], second["status_code"]) == (429, 200)
    answered = first["started_at"] + timedelta(milliseconds=first["duration_ms"])
    assert second["started_at"] - answered >= timedelta(seconds=2)
    assert receiver.hits[1].at - receiver.hits[0].at >= 2
    assert (await delivery(db, data["id"]))["state"] == "delivered"


async def test_a_long_schedule_outlives_the_job_expiry_the_producer_set(
    db: asyncpg.Connection, producer: Producer, settings: Settings
) -> None:
    """arq drops a job whose key expired; each wait pushes the key's expiry past it."""
    async with scripted(503, 200) as receiver:
        await save_callback(db, "ann", "order.created", "GET", receiver.url + "/later")
        data = event_data("expiry")
        # Another producer may set a short expiry: here 30 s, less than the next wait.
        await producer.redis.enqueue_job(
            JOB_NAME,
            data,
            _job_id=job_id(data["id"]),
            _queue_name=producer.queue_name,
            _expires=timedelta(seconds=30),
        )
        slow = settings.model_copy(update={"retry_schedule": "1h"})
        async with running_worker(slow):
            await until(lambda: len(receiver.hits) == 1)
            await until(lambda: _retrying(db, data["id"]))
        # Stopped: the job has had its say in Redis too.

    ttl = await producer.redis.ttl(job_key(job_id(data["id"])))
    assert ttl > JOB_EXPIRES.total_seconds() + 0.8 * 3600 - 60
    score = await producer.redis.zscore(producer.queue_name, job_id(data["id"]))
    assert score is not None
    assert score / 1000 - time.time() > 0.8 * 3600 - 60  # deferred about an hour


async def _retrying(db: asyncpg.Connection, event_id: str) -> bool:
    row = await db.fetchrow("SELECT state FROM deliveries WHERE event_id = $1", event_id)
    return row is not None and row["state"] == "retrying"


async def _attempted(db: asyncpg.Connection, event_id: str, attempts: int) -> bool:
    row = await db.fetchrow("SELECT attempts FROM deliveries WHERE event_id = $1", event_id)
    return row is not None and row["attempts"] >= attempts


# -- repeats ----------------------------------------------------------------------------


async def test_same_event_id_after_a_dead_letter_sends_nothing_more(
    db: asyncpg.Connection, producer: Producer, settings: Settings
) -> None:
    async with scripted(404) as receiver:
        await save_callback(db, "ann", "order.created", "GET", receiver.url + "/once")
        data = event_data("dead-again")
        await producer.publish(data)
        await drain(settings)
        assert await producer.publish(data) is True
        await drain(settings)

    assert len(receiver.hits) == 1
    assert (await delivery(db, data["id"]))["attempts"] == 1


# -- ordering per order -----------------------------------------------------------------


async def test_an_update_waits_for_its_failing_create(
    db: asyncpg.Connection, producer: Producer, settings: Settings
) -> None:
    async def answer(request: web.Request) -> web.Response:
        hits.append(request.path)
        failing = request.path == "/created" and hits.count("/created") < 3
        return web.Response(status=503 if failing else 200)

    hits: list[str] = []
    async with serve(answer) as url:
        for kind in ("created", "updated"):
            await save_callback(db, "ann", f"order.{kind}", "GET", f"{url}/{kind}")
        create = event_data("c", type="order.created")
        update = event_data("u", type="order.updated")
        slow = settings.model_copy(update={"retry_schedule": "400ms,400ms"})
        with structlog.testing.capture_logs() as logs:
            async with running_worker(slow):
                await producer.publish(create)
                await until(lambda: len(hits) == 1)  # the create failed once
                await producer.publish(update)
                await until(lambda: _blocked(db, update["id"]))
                assert hits == ["/created"]
                await until(lambda: _count(db, "delivered", 2))

    assert hits == ["/created", "/created", "/created", "/updated"]
    held = await delivery(db, update["id"])
    assert held["attempts"] == 1
    # Said once, naming what it waits for, though it looked again when woken.
    [waiting] = [e for e in logs if e["event"] == "delivery_waiting"]
    assert (waiting["event_id"], waiting["delivery_id"], waiting["affiliate"]) == (
        update["id"],
        str(held["id"]),
        "ann",
    )
    assert waiting["waiting_for"] == str((await delivery(db, create["id"]))["id"])
    assert waiting["waiting_for_event"] == create["id"]


async def _blocked(db: asyncpg.Connection, event_id: str) -> bool:
    row = await db.fetchrow("SELECT blocked_by FROM deliveries WHERE event_id = $1", event_id)
    return row is not None and row["blocked_by"] is not None


async def test_updates_go_in_the_order_they_occurred_once_the_create_is_dead(
    db: asyncpg.Connection, producer: Producer, settings: Settings
) -> None:
    async def answer(request: web.Request) -> web.Response:
        hits.append(f"{request.path}?{request.query.get('s', '')}")
        if request.path == "/created":  # busy, then gone for good
            return web.Response(status=503 if hits.count("/created?") == 1 else 404)
        return web.Response()

    hits: list[str] = []
    async with serve(answer) as url:
        await save_callback(db, "ann", "order.created", "GET", url + "/created")
        await save_callback(db, "ann", "order.updated", "GET", url + "/updated?s={{order.status}}")
        order = {"number": "#7", "amount": "5", "commission": "1"}
        create = event_data("c", type="order.created", order=order)
        approved = event_data(
            "u1",
            type="order.updated",
            occurred_at="2026-11-21T10:01:00Z",
            order={**order, "status": "approved"},
        )
        refunded = event_data(
            "u2",
            type="order.updated",
            occurred_at="2026-11-21T10:02:00Z",
            order={**order, "status": "refunded"},
        )
        slow = settings.model_copy(update={"retry_schedule": "1s"})
        async with running_worker(slow):
            await producer.publish(create)
            await until(lambda: len(hits) == 1)
            # Published newest first: the ledger, not the queue, decides the order.
            await producer.publish(refunded)
            await producer.publish(approved)
            await until(lambda: _blocked(db, approved["id"]))
            await until(lambda: _blocked(db, refunded["id"]))
            await until(lambda: _count(db, "delivered", 2))

    assert hits == ["/created?", "/created?", "/updated?approved", "/updated?refunded"]
    assert (await delivery(db, create["id"]))["state"] == "dead"
    assert await _states(db) == {"dead": 1, "delivered": 2}


async def test_updates_wait_only_for_their_own_order_and_affiliate(
    db: asyncpg.Connection, producer: Producer, settings: Settings
) -> None:
    async with scripted(503, 200) as receiver:
        for affiliate in ("ann", "bob"):
            for kind in ("created", "updated"):
                await save_callback(
                    db, affiliate, f"order.{kind}", "GET", f"{receiver.url}/{affiliate}/{kind}"
                )
        # No wait for a create the ledger has not seen (test_ordering has that): here only
        # ann's failing create of order #1001 could hold the two updates back.
        slow = settings.model_copy(update={"retry_schedule": "2s", "create_wait": 0})
        async with running_worker(slow):
            await producer.publish(event_data("c", type="order.created"))
            await until(lambda: len(receiver.hits) == 1)
            other_order = {"number": "#2", "amount": "1", "commission": "0"}
            await producer.publish(event_data("u", type="order.updated", order=other_order))
            await producer.publish(event_data("b", type="order.updated", affiliate_id="bob"))
            await until(lambda: len(receiver.hits) == 3)
            # Neither waited for ann's failing create of order #1001 (both fail too).
            assert sorted(receiver.paths()[1:]) == ["/ann/updated", "/bob/updated"]


# -- the sweep --------------------------------------------------------------------------


async def test_flushall_while_deliveries_wait_for_their_retry_the_sweep_brings_them_back(
    db: asyncpg.Connection, settings: Settings, private_redis: str
) -> None:
    own = settings.model_copy(update={"redis_url": private_redis, "retry_schedule": "2s"})
    async with (
        scripted(503, 200) as receiver,
        await Producer.connect(private_redis, own.queue_name) as producer,
    ):
        await save_callback(db, "ann", "order.created", "GET", receiver.url + "/pb?e={{event.id}}")
        events = [event_data(f"flush-{n}", order=_order(n)) for n in range(50)]
        async with running_worker(own):
            await producer.publish_many(events)
            await until(lambda: _count(db, "retrying", 50))
        assert len(receiver.hits) == 50

        await producer.redis.flushall()
        assert await producer.redis.zcard(own.queue_name) == 0
        assert settings.database_url is not None
        pool = await database.create_pool(settings.database_url, 2)
        try:
            # Not due yet: nothing to do, however often it runs.
            assert await sweep(pool, producer.redis, own.queue_name, own.job_timeout) == 0
            await until(lambda: _due(db, 50), within=5)
            assert await sweep(pool, producer.redis, own.queue_name, own.job_timeout) == 50
            assert await sweep(pool, producer.redis, own.queue_name, own.job_timeout) == 0
        finally:
            await pool.close()
        assert await producer.redis.zcard(own.queue_name) == 50
        await drain(own)

    assert await _states(db) == {"delivered": 50}
    assert len(receiver.hits) == 100  # one failure and one success each, nothing more
    assert len({hit.key for hit in receiver.hits}) == 50


async def test_a_worker_sweeps_when_it_starts(
    db: asyncpg.Connection, settings: Settings, private_redis: str
) -> None:
    own = settings.model_copy(update={"redis_url": private_redis, "retry_schedule": "1s"})
    async with (
        scripted(503, 200) as receiver,
        await Producer.connect(private_redis, own.queue_name) as producer,
    ):
        await save_callback(db, "ann", "order.created", "GET", receiver.url + "/pb")
        data = event_data("startup")
        async with running_worker(own):
            await producer.publish(data)
            await until(lambda: _retrying(db, data["id"]))
        await producer.redis.flushall()
        await until(lambda: _due(db, 1), within=5)
        with structlog.testing.capture_logs() as logs:
            await drain(own)  # its sweep at start-up finds the delivery without a job

    row = await delivery(db, data["id"])
    assert row["state"] == "delivered"
    assert len(receiver.hits) == 2
    [requeued] = [e for e in logs if e["event"] == "delivery_requeued"]
    assert (requeued["event_id"], requeued["delivery_id"]) == (data["id"], str(row["id"]))
    [swept] = [e for e in logs if e["event"] == "sweep_requeued"]
    assert (swept["log_level"], swept["count"]) == ("warning", 1)


def _order(n: int) -> dict[str, str]:
    """Order #n: deliveries of different orders do not wait for each other."""
    return {"number": f"#{n}", "amount": "10.50", "commission": "1.05"}


async def _count(db: asyncpg.Connection, state: str, expected: int) -> bool:
    count = await db.fetchval("SELECT count(*) FROM deliveries WHERE state = $1", state)
    return bool(count == expected)


async def _due(db: asyncpg.Connection, expected: int) -> bool:
    count = await db.fetchval(
        "SELECT count(*) FROM deliveries WHERE state = 'retrying' AND next_attempt_at <= now()"
    )
    return bool(count == expected)


async def test_the_delivery_time_is_in_the_ledger_not_only_in_redis(
    db: asyncpg.Connection, producer: Producer, settings: Settings
) -> None:
    """What the sweep relies on: a retrying delivery says when it is due."""
    async with scripted(503, 200) as receiver:
        await save_callback(db, "ann", "order.created", "GET", receiver.url + "/pb")
        data = event_data("due")
        slow = settings.model_copy(update={"retry_schedule": "10m"})
        async with running_worker(slow):
            before = datetime.now(UTC)
            await producer.publish(data)
            await until(lambda: _retrying(db, data["id"]))
    row = await delivery(db, data["id"])
    wait = row["next_attempt_at"] - before
    assert timedelta(minutes=8) - timedelta(seconds=5) < wait < timedelta(minutes=12, seconds=5)
    assert (row["reason"], row["error_class"], row["claimed_by"]) == ("HTTP 503", "http_5xx", None)


async def test_a_delivery_whose_worker_died_and_whose_job_redis_lost_is_swept_back(
    db: asyncpg.Connection, settings: Settings, private_redis: str, tmp_path: Path
) -> None:
    """In flight when its worker was SIGKILLed, then Redis lost the job: stuck with a claim.

    The sweep leaves a claim alone while its job could still be running (job timeout),
    then re-enqueues the delivery; the receiver sees it again with the same delivery id.
    """
    own = settings.model_copy(update={"redis_url": private_redis})
    arrived = asyncio.Event()
    done = asyncio.Event()
    keys: list[str] = []

    async def hold_first(request: web.Request) -> web.Response:
        keys.append(request.headers["Idempotency-Key"])
        if len(keys) == 1:
            arrived.set()
            await done.wait()
        return web.Response()

    async with (
        serve(hold_first) as url,
        await Producer.connect(private_redis, own.queue_name) as producer,
    ):
        await save_callback(db, "ann", "order.created", "GET", url + "/pb")
        data = event_data("stuck")
        await producer.publish(data)
        async with worker_process(own, tmp_path) as worker:
            await asyncio.wait_for(arrived.wait(), 20)
            await kill_hard(worker)
        await producer.redis.flushall()
        row = await delivery(db, data["id"])
        assert (row["state"], row["claimed_by"]) == ("pending", job_id(data["id"]))

        assert settings.database_url is not None
        pool = await database.create_pool(settings.database_url, 2)
        try:
            assert await sweep(pool, producer.redis, own.queue_name, own.job_timeout) == 0
            await asyncio.sleep(own.job_timeout)
            assert await sweep(pool, producer.redis, own.queue_name, own.job_timeout) == 1
        finally:
            await pool.close()
        await drain(own)
        done.set()

    row = await delivery(db, data["id"])
    assert (row["state"], row["attempts"], row["claimed_by"]) == ("delivered", 1, None)
    assert keys == [str(row["id"])] * 2


async def test_a_job_held_up_past_its_timeout_before_the_ledger_has_it_is_not_lost(
    db: asyncpg.Connection, producer: Producer, receiver: Receiver, settings: Settings
) -> None:
    """arq deletes a job that outruns its timeout; the job's own budget must fire first."""
    quick = settings.model_copy(
        update={"connect_timeout": 0.2, "request_timeout": 0.5, "job_timeout": 1.5}
    )
    await save_callback(db, "ann", "order.created", "GET", receiver.url + "/late")
    data = event_data("held")
    with structlog.testing.capture_logs() as logs:
        async with running_worker(quick):
            # Whatever holds the table (a migration, a long report) stalls the first write.
            async with db.transaction():
                await db.execute("LOCK TABLE deliveries IN SHARE MODE")
                await producer.publish(data)
                # Past the job's own budget and arq's timeout behind it.
                await asyncio.sleep(quick.job_timeout + JOB_TIMEOUT_BACKSTOP + 1)
            await until(lambda: _count(db, "delivered", 1), within=15)

    assert len(receiver.requests) == 1
    timed_out = [e for e in logs if e["event"] == "job_timed_out"]
    assert timed_out, "the stalled run was not logged"
    assert {(e["log_level"], e["event_id"], e["seconds"]) for e in timed_out} == {
        ("warning", data["id"], quick.job_timeout)
    }


async def test_a_redirect_to_a_url_that_cannot_be_followed_is_dead_and_quotes_no_token(
    db: asyncpg.Connection, producer: Producer, settings: Settings
) -> None:
    async def to_ftp(request: web.Request) -> web.Response:
        raise web.HTTPFound(f"ftp://track.example/pb?{request.query_string}")

    async with serve(to_ftp) as url:
        await save_callback(db, "ann", "order.created", "GET", url + "/pb?token=SeCrEt123")
        data = event_data("ftp")
        await producer.publish(data)
        await drain(settings)

    row = await delivery(db, data["id"])
    assert (row["state"], row["attempts"], row["error_class"]) == ("dead", 1, "invalid_url")
    [attempt] = await _attempts(db, data["id"])
    assert "SeCrEt123" not in row["reason"]
    assert "SeCrEt123" not in attempt["error"]


async def test_a_delivery_whose_stored_event_was_edited_invalid_is_dead_not_stuck(
    db: asyncpg.Connection, producer: Producer, settings: Settings
) -> None:
    async with scripted(503, 200) as receiver:
        await save_callback(db, "ann", "order.created", "GET", receiver.url + "/pb")
        data = event_data("edited")
        async with running_worker(settings.model_copy(update={"retry_schedule": "1s"})):
            await producer.publish(data)
            await until(lambda: _retrying(db, data["id"]))
            # By hand, as only a person at a SQL prompt would.
            await db.execute(
                """UPDATE deliveries SET event = jsonb_set(event, '{order,amount}', '"ten"')
                   WHERE event_id = $1""",
                data["id"],
            )
            await until(lambda: _count(db, "dead", 1), within=10)

    row = await delivery(db, data["id"])
    assert row["reason"].startswith("stored event is invalid: ")
    assert "order.amount" in row["reason"]
    assert len(receiver.hits) == 1


async def test_a_retry_sends_the_event_as_the_ledger_holds_it(
    db: asyncpg.Connection, producer: Producer, settings: Settings
) -> None:
    """A run validates the queued event once and sends it as it is when the ledger's copy is
    the same; when the ledger's copy differs (edited by hand here), that copy is sent."""
    async with scripted(503, 503, 200) as receiver:
        await save_callback(
            db, "ann", "order.created", "GET", receiver.url + "/pb/{{order.amount}}"
        )
        data = event_data("kept")
        async with running_worker(settings.model_copy(update={"retry_schedule": "1s,1s"})):
            await producer.publish(data)
            await until(lambda: _retrying(db, data["id"]))
            await until(lambda: _attempted(db, data["id"], 2), within=10)
            await db.execute(
                """UPDATE deliveries SET event = jsonb_set(event, '{order,amount}', '"12.00"')
                   WHERE event_id = $1""",
                data["id"],
            )
            await until(lambda: _count(db, "delivered", 1), within=10)

    assert receiver.paths() == ["/pb/10.50", "/pb/10.50", "/pb/12.00"]


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        (
            "DELETE FROM callbacks WHERE affiliate_id = 'ann'",
            "no order.created callback configured for affiliate ann",
        ),
        ("UPDATE callbacks SET enabled = false WHERE affiliate_id = 'ann'", "callback disabled"),
        (
            "UPDATE callbacks SET url_template = url_template || '?o={{order.numbr}}'"
            " WHERE affiliate_id = 'ann'",
            "stored template is invalid: ",
        ),
    ],
    ids=["removed", "disabled", "template-unparsable"],
)
async def test_a_delivery_whose_callback_went_away_after_its_first_try_is_dead(
    db: asyncpg.Connection, producer: Producer, settings: Settings, change: str, reason: str
) -> None:
    """Tried once, then its callback changed under it: the next run dead-letters it (a
    replay can send it once the callback is back) rather than skip it or send it."""
    async with scripted(503, 200) as receiver:
        await save_callback(db, "ann", "order.created", "GET", receiver.url + "/pb")
        data = event_data("went-away")
        # The retry comes long after the change reaches the worker's callback cache.
        async with running_worker(settings.model_copy(update={"retry_schedule": "2s"})):
            await producer.publish(data)
            await until(lambda: _retrying(db, data["id"]))
            await db.execute(change)
            await until(lambda: _count(db, "dead", 1), within=10)

    row = await delivery(db, data["id"])
    assert (row["state"], row["attempts"], row["next_attempt_at"]) == ("dead", 1, None)
    assert row["reason"].startswith(reason)
    if "url_template" in change:
        assert "order.numbr" in row["reason"]  # says which variable does not parse
    assert len(receiver.hits) == 1


async def test_a_worker_on_a_database_not_yet_upgraded_says_so_and_keeps_the_event(
    producer: Producer, settings: Settings, receiver: Receiver, admin_url: str
) -> None:
    """New workers started before `postback db init`: every job says what to run, and its
    event waits in the queue; once the schema is applied it is delivered."""
    async with scratch_database(admin_url, "outdated") as url, database.connection(url) as conn:
        await conn.execute(released(4))  # the last version before postback_take
        # As that version saved it: the columns of today's callbacks are not there yet.
        await conn.execute(
            "INSERT INTO callbacks (affiliate_id, event_type, method, url_template)"
            " VALUES ('ann', 'order.created', 'GET', $1)",
            receiver.url + "/pb",
        )
        own = settings.model_copy(update={"database_url": url})
        data = event_data("outdated")
        await producer.publish(data)
        with structlog.testing.capture_logs() as logs:
            async with running_worker(own):
                await until(lambda: any(e["event"] == "schema_outdated" for e in logs))
        [said] = [e for e in logs if e["event"] == "schema_outdated"]
        assert said["hint"] == "run `postback db init`"
        assert said["error"] == "UndefinedFunctionError (SQLSTATE 42883)"
        assert said["log_level"] == "error"
        assert await producer.redis.zscore(settings.queue_name, job_id(data["id"])) is not None
        assert receiver.requests == []

        await database.init(url)
        # Due now rather than in a minute: woken, as a settled delivery wakes those after it.
        await wake(producer.redis, settings.queue_name, [data["id"]])
        await drain(own)
        state = await conn.fetchval("SELECT state FROM deliveries WHERE event_id = $1", data["id"])
    assert state == "delivered"
    assert len(receiver.requests) == 1
