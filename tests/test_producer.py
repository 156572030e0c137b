"""The producer contract: exact decimals, refusals naming the field, JSON jobs, one job per id."""

from __future__ import annotations

import json
import pickle
import time
from decimal import Decimal
from pathlib import Path
from typing import Any

import asyncpg
import pytest
import redis.asyncio
import structlog.testing

from producer import InvalidEvent, Producer, loads_event, order_created, order_updated, parse_event
from producer.publish import NotDurable
from producer.queue import DEFAULT_QUEUE, JOB_EXPIRES, JOB_NAME, job_id, job_key
from tests.support.events import event_data, save_callback, write_job
from tests.support.proxy import Proxy, postgres_target, through
from tests.support.receivers import Receiver, raw_server
from tests.support.workers import drain
from worker.config import Settings


def _refusal(data: Any) -> list[str]:
    with pytest.raises(InvalidEvent) as caught:
        parse_event(data)
    return [error.field for error in caught.value.errors]


@pytest.mark.unit
@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"id": ""}, "id"),
        ({"id": "x" * 129}, "id"),
        ({"type": "order.deleted"}, "type"),
        ({"affiliate_id": ""}, "affiliate_id"),
        ({"affiliate_id": "a" * 65}, "affiliate_id"),
        ({"occurred_at": "yesterday"}, "occurred_at"),
        ({"occurred_at": "2026-11-21T10:00:00"}, "occurred_at"),  # no offset: ambiguous
        ({"order": {"number": "#1", "amount": "ten", "commission": "1"}}, "order.amount"),
        ({"order": {"number": "#1", "amount": "NaN", "commission": "1"}}, "order.amount"),
        ({"order": {"number": "#1", "amount": "1", "commission": True}}, "order.commission"),
        ({"order": {"number": "#1", "amount": "1"}}, "order.commission"),
        ({"order": {"amount": "1", "commission": "1"}}, "order.number"),
        (
            {"order": {"number": "#1", "amount": "1", "commission": "1", "currency": "euro"}},
            "order.currency",
        ),
        ({"order": {"number": "#1", "amount": "1e999999999", "commission": "1"}}, "order.amount"),
        ({"order": {"number": "#1\x00", "amount": "1", "commission": "1"}}, "order.number"),
        ({"affiliate_id": "ann\x00"}, "affiliate_id"),
        ({"link": {"url": "/relative/path"}}, "link.url"),
        ({"link": {"url": "ftp://shop.example/x"}}, "link.url"),
        ({"link": {}}, "link.url"),
        ({"affiliateId": "ann"}, "affiliateId"),
    ],
)
def test_invalid_event_names_the_field(change: dict[str, Any], field: str) -> None:
    assert field in _refusal(event_data(**change))


@pytest.mark.unit
def test_refusal_message_names_field_and_reason() -> None:
    with pytest.raises(InvalidEvent, match=r"order\.amount: Input should be a valid decimal"):
        parse_event(event_data(order={"number": "#1", "amount": "ten", "commission": "1"}))
    with pytest.raises(InvalidEvent, match=r"affiliateId: unknown field"):
        parse_event(event_data(affiliateId="ann"))


@pytest.mark.unit
def test_not_an_object_and_not_json_are_refused() -> None:
    assert _refusal([1, 2]) == ["event"]
    with pytest.raises(InvalidEvent, match="not valid JSON"):
        loads_event("{nope")


@pytest.mark.unit
def test_a_number_beyond_what_a_decimal_holds_is_refused_not_a_crash() -> None:
    text = json.dumps(event_data()).replace('"10.50"', "0e1000000000000000000")
    with pytest.raises(InvalidEvent, match=r"^invalid event: the number 0e1000\d* is out"):
        loads_event(text)


@pytest.mark.unit
def test_a_key_given_twice_is_refused_not_the_last_one_taken() -> None:
    text = json.dumps(event_data()).replace('"10.50"', '"10.50", "amount": "99999.00"')
    with pytest.raises(InvalidEvent, match=r'^invalid event: duplicate key "amount"$'):
        loads_event(text)


@pytest.mark.unit
def test_decimals_stay_exact_from_json_numbers_and_strings() -> None:
    text = json.dumps(event_data()).replace('"10.50"', "10.50").replace('"1.05"', "0.1")
    assert '"amount": 10.50' in text
    event = loads_event(text)
    assert event.order.amount == Decimal("10.50")
    assert event.to_json()["order"] == {"number": "#1001", "amount": "10.50", "commission": "0.1"}


@pytest.mark.unit
def test_helpers_build_valid_events() -> None:
    created = order_created(
        id="evt-1",
        affiliate_id="ann",
        number="#1001",
        amount="10.50",
        commission=Decimal("1.05"),
        link_url="https://shop.example/?ref=ann",
        sub_id="fb",
        currency="EUR",
        status="pending",
    )
    assert created.type == "order.created"
    assert created.link.sub_id == "fb"
    assert created.order.currency == "EUR"
    updated = order_updated(
        id="evt-2",
        affiliate_id="ann",
        number="#1001",
        amount=10,
        commission="1",
        link_url="https://shop.example/",
    )
    assert updated.type == "order.updated"
    with pytest.raises(InvalidEvent, match=r"link\.url"):
        order_created(
            id="evt-3", affiliate_id="ann", number="#1", amount=1, commission=1, link_url="nope"
        )


async def test_publish_writes_a_json_job_once_per_event_id(
    producer: Producer, redis_url: str, queue_name: str
) -> None:
    data = event_data("publish")
    assert await producer.publish(data) is True
    assert await producer.publish(data) is False  # same id while queued: nothing more

    client = redis.asyncio.Redis.from_url(redis_url)
    try:
        raw = await client.get(job_key(job_id(data["id"])))
        queued = await client.zrange(queue_name, 0, -1)
    finally:
        await client.aclose()
    assert raw is not None
    job = json.loads(raw)  # JSON, not pickle: any language can read and write it
    assert job["f"] == JOB_NAME
    [sent] = job["a"]
    assert sent["id"] == data["id"]
    assert sent["order"]["amount"] == "10.50"
    assert "occurred_at" not in sent  # the worker takes arq's enqueue time, for any producer
    assert queued.count(job_id(data["id"]).encode()) == 1


async def test_a_durable_producer_records_each_event_before_it_queues_it(
    db: asyncpg.Connection, producer: Producer, settings: Settings
) -> None:
    data = event_data("durable")
    assert settings.redis_url is not None
    async with await Producer.connect(
        settings.redis_url, settings.queue_name, database_url=settings.database_url
    ) as durable:
        assert durable.durable
        assert await durable.publish(data) is True
        assert await durable.publish(data) is False  # same id: recorded once, queued once

    row = await db.fetchrow("SELECT state, event FROM deliveries WHERE event_id = $1", data["id"])
    assert row is not None
    raw = await producer.redis.get(job_key(job_id(data["id"])))
    assert raw is not None
    [sent] = json.loads(raw)["a"]
    # The ledger's row and the job carry the same event, stamped with when it was accepted.
    assert (row["state"], row["event"]) == ("accepted", sent)
    assert "occurred_at" in sent


async def test_a_durable_producer_with_postgres_away_raises_and_queues_nothing(
    producer: Producer, settings: Settings, database_url: str
) -> None:
    """Away after it connected: a proxy between it and Postgres is cut."""
    proxy = Proxy(postgres_target(database_url))
    data = event_data("durable-away")
    assert settings.redis_url is not None
    async with raw_server(proxy.handle) as base:
        port = int(base.rsplit(":", 1)[1])
        async with await Producer.connect(
            settings.redis_url, settings.queue_name, database_url=through(database_url, port)
        ) as durable:
            proxy.cut()
            with pytest.raises((OSError, asyncpg.PostgresConnectionError, asyncpg.InterfaceError)):
                await durable.publish(data)
            assert await producer.redis.exists(job_key(job_id(data["id"]))) == 0
            proxy.mend()
            assert await durable.publish(data) is True  # back: the same event goes in once


async def test_a_redis_only_producer_cannot_say_what_it_recorded(producer: Producer) -> None:
    assert not producer.durable
    with pytest.raises(NotDurable, match="connect with database_url"):
        await producer.accept_many([event_data("not-durable")])


@pytest.mark.unit
def test_the_readme_gives_other_languages_the_keys_the_relay_uses() -> None:
    """README, "From another language, straight into Redis": the key and queue it names are
    the ones the producer writes and the worker reads."""
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    section = readme.split("### From another language, straight into Redis")[1]
    steps = section.split("\n## ")[0]
    assert f"`SET {job_key(job_id('<id>'))}` to the JSON" in steps
    assert f"`ZADD {DEFAULT_QUEUE} <time in ms> {job_id('<id>')}`" in steps
    assert f'"f":"{JOB_NAME}"' in steps
    assert f"uses {JOB_EXPIRES.days} days" in steps


def test_only_the_queue_module_names_a_redis_key() -> None:
    """README, "How it works": producer/queue.py is arq's layout in Redis, which no other
    module of the relay names."""
    root = Path(__file__).resolve().parent.parent
    owner = root / "producer" / "queue.py"
    spellings = ("arq.constants", "arq:", ":health-check", ":metrics", ":sweep")
    naming = [
        f"{path.relative_to(root)}: {spelling}"
        for folder in ("producer", "worker", "ops", "bench")
        for path in sorted((root / folder).rglob("*.py"))
        if path != owner
        for spelling in spellings
        if spelling in path.read_text()
    ]
    assert naming == []


async def test_invalid_event_never_reaches_redis(
    producer: Producer, redis_url: str, queue_name: str
) -> None:
    good = event_data("batch-good")
    bad = event_data("batch-bad", type="order.shipped")
    with pytest.raises(InvalidEvent, match="type"):
        await producer.publish_many([good, bad])
    client = redis.asyncio.Redis.from_url(redis_url)
    try:
        for data in (good, bad):
            assert await client.exists(job_key(job_id(data["id"]))) == 0
            assert await client.zscore(queue_name, job_id(data["id"])) is None
    finally:
        await client.aclose()


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        (('"10.50"', '"10.50", "amount": "99999.00"'), 'duplicate key "amount"'),
        (('"10.50"', "0e1000000000000000000"), "the number 0e1000000000000000000 is out of range"),
    ],
    ids=["duplicate-key", "number-out-of-range"],
)
async def test_a_job_written_by_hand_that_the_reader_refuses_is_dropped_not_delivered(
    db: asyncpg.Connection,
    producer: Producer,
    receiver: Receiver,
    settings: Settings,
    caplog: pytest.LogCaptureFixture,
    change: tuple[str, str],
    reason: str,
) -> None:
    """As a producer in another language would write them (README: straight into Redis);
    the refused one is logged and dropped, as any job that does not deserialize, and the
    one beside it is delivered."""
    await save_callback(db, "ann", "order.created", "GET", receiver.url + "/pb")
    good, bad = event_data("by-hand-good"), event_data("by-hand-bad")
    for data, text in ((good, json.dumps(good)), (bad, json.dumps(bad).replace(*change))):
        await write_job(producer.redis, producer.queue_name, data["id"], text)

    await drain(settings)

    assert [r.path_qs for r in receiver.requests] == ["/pb"]
    taken = await db.fetch("SELECT event_id FROM deliveries")
    assert [row["event_id"] for row in taken] == [good["id"]]
    assert await producer.redis.zcard(producer.queue_name) == 0
    assert await producer.redis.exists(job_key(job_id(bad["id"]))) == 0
    [failed] = [r for r in caplog.records if r.getMessage().startswith("deserializing job")]
    assert job_id(bad["id"]) in failed.getMessage()
    assert failed.exc_info is not None
    error = failed.exc_info[1]
    assert error is not None
    assert str(error.__cause__) == reason  # arq's DeserializationError, from the reader's


class _TouchesAFileWhenUnpickled:
    """What an attacker with write access to Redis would store, were jobs pickled: loading
    it runs `Path.touch(path)`."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self) -> tuple[Any, ...]:
        return (Path.touch, (self.path,))


async def test_a_pickled_job_written_to_redis_runs_no_code_in_the_worker(
    db: asyncpg.Connection,
    producer: Producer,
    receiver: Receiver,
    settings: Settings,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """README: jobs are never pickled, so writing to Redis does not let anyone run code in
    a worker. The pickle sits where a job goes, under a job id the queue names; a valid
    job beside it shows the worker did read the queue."""
    await save_callback(db, "ann", "order.created", "GET", receiver.url + "/pb")
    planted = tmp_path / "pwned"
    payload = pickle.dumps(_TouchesAFileWhenUnpickled(planted))
    now_ms = int(time.time() * 1000)
    evil = job_id(event_data("pickled")["id"])
    good = event_data("beside-pickle")
    job = f'{{"t":1,"f":"{JOB_NAME}","a":[{json.dumps(good)}],"k":{{}},"et":{now_ms}}}'
    await producer.redis.set(job_key(evil), payload)
    await producer.redis.set(job_key(job_id(good["id"])), job)
    await producer.redis.zadd(producer.queue_name, {evil: now_ms, job_id(good["id"]): now_ms})

    await drain(settings)

    assert not planted.exists()
    # Taken and dropped as a job that does not read as JSON; nothing sent or recorded for it.
    assert await producer.redis.zcard(producer.queue_name) == 0
    assert await producer.redis.exists(job_key(evil)) == 0
    assert [r.path_qs for r in receiver.requests] == ["/pb"]
    taken = await db.fetch("SELECT event_id FROM deliveries")
    assert [row["event_id"] for row in taken] == [good["id"]]
    [failed] = [r for r in caplog.records if r.getMessage().startswith("deserializing job")]
    assert evil in failed.getMessage()


async def test_a_job_written_by_hand_with_an_invalid_event_is_logged_and_never_sent(
    db: asyncpg.Connection, producer: Producer, receiver: Receiver, settings: Settings
) -> None:
    """README: the worker validates every event again, so a malformed one is logged and
    dropped without reaching an affiliate. This one is valid JSON, so it reaches the job,
    which refuses it for a field the event model does not have."""
    await save_callback(db, "ann", "order.created", "GET", receiver.url + "/pb")
    bad = event_data("unknown-field", affiliateId="ann")
    await write_job(producer.redis, producer.queue_name, bad["id"], json.dumps(bad))

    with structlog.testing.capture_logs() as logs:
        await drain(settings)

    assert receiver.requests == []
    assert await db.fetchval("SELECT count(*) FROM deliveries") == 0
    assert await producer.redis.zcard(producer.queue_name) == 0  # dropped, not retried
    [refused] = [e for e in logs if e["event"] == "event_refused"]
    assert refused["log_level"] == "error"
    assert refused["job_id"] == job_id(bad["id"])
    assert "affiliateId: unknown field" in refused["error"]
