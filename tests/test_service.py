"""`postback serve` over real HTTP: ingest, the ops API, health, metrics and the OpenAPI document.

Deliveries are made the way production makes them: events in through the API or the
producer, a worker draining the queue into receivers on 127.0.0.1.
"""

from __future__ import annotations

import asyncio
import io
import json
import os
import time
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import quote

import asyncpg
import pytest
import structlog.testing
from prometheus_client.parser import text_string_to_metric_families
from yarl import URL

from ops.actions import overview
from ops.service.app import Insecure, create_app
from ops.service.openapi import document
from producer.connection import open_redis
from producer.event import EVENT_TYPES
from producer.publish import Producer
from producer.queue import metrics_keys, wake
from tests.support.events import event_data, save_callback
from tests.support.ledger import (
    DELAYED_REASON,
    add_delivery,
    make_deliveries,
    make_store_wide_and_delayed,
)
from tests.support.receivers import Flaky, Receiver, raw_server
from tests.support.service import (
    INGEST_TOKEN,
    OPS_TOKEN,
    Api,
    ingest,
    running_service,
    with_tokens,
)
from tests.support.wait import until
from tests.support.workers import drain, running_worker
from worker import database, metrics, sign
from worker.config import Settings
from worker.exchange import FAILURE_CLASSES
from worker.ledger import STATES
from worker.sweep import sweep

pytestmark = pytest.mark.usefixtures("db")

CONDITIONS = ("store_wide", "statuses", "delay", "delay_seconds")
"""What a callback's answer says of the store-wide affiliate, statuses and delay."""


async def queued(producer: Producer) -> int:
    return int(await producer.redis.zcard(producer.queue_name))


# --- ingest -----------------------------------------------------------------------------


async def test_one_event_is_accepted_and_delivered(
    api: Api, db: asyncpg.Connection, flaky: Flaky, settings: Settings
) -> None:
    await save_callback(db, "ann", "order.created", "GET", flaky.url + "/ann?o={{order.number}}")
    data = event_data("one")
    status, body = await ingest(api, data)
    assert (status, body) == (
        202,
        {"accepted": [data["id"]], "already_queued": [], "queued": True},
    )
    await drain(settings)
    assert flaky.paths == ["/ann?o=%231001"]


async def test_a_batch_is_accepted_and_delivered(
    api: Api, db: asyncpg.Connection, flaky: Flaky, settings: Settings
) -> None:
    await save_callback(db, "ann", "order.created", "GET", flaky.url + "/ann?o={{order.number}}")
    batch = [
        event_data(f"b{i}", order={"number": f"#{i}", "amount": "1", "commission": "0.1"})
        for i in range(3)
    ]
    status, body = await ingest(api, batch)
    assert status == 202
    assert body["accepted"] == [e["id"] for e in batch]
    await drain(settings)
    assert sorted(flaky.paths) == ["/ann?o=%230", "/ann?o=%231", "/ann?o=%232"]


async def test_the_same_event_twice_is_queued_once(api: Api, producer: Producer) -> None:
    data = event_data("twice")
    await ingest(api, data)
    status, body = await ingest(api, data)
    assert (status, body["already_queued"]) == (202, [data["id"]])
    assert await queued(producer) == 1


@pytest.mark.parametrize(
    ("change", "field", "words"),
    [
        ({"id": None}, "id", "field required"),
        ({"type": "order.deleted"}, "type", "order.created"),
        ({"affiliate_id": ""}, "affiliate_id", "at least 1"),
        ({"affiliateId": "ann"}, "affiliateId", "unknown field"),
        (
            {"order": {"number": "#1", "amount": "ten", "commission": "1"}},
            "order.amount",
            "decimal",
        ),
        (
            {"order": {"number": "#1", "amount": "1", "commission": "1", "currency": "eur"}},
            "order.currency",
            "ISO 4217",
        ),
        ({"link": {"url": "ftp://shop.example/"}}, "link.url", "http or https"),
        ({"occurred_at": "2026-11-21T10:00:00"}, "occurred_at", "timezone"),
        ({"affiliate_id": "a\x00b"}, "affiliate_id", "NUL"),
        (
            {"affiliate_id": "*"},
            "affiliate_id",
            "'*' names the store-wide callback, not an affiliate",
        ),
    ],
    ids=[
        "no-id",
        "type",
        "empty-affiliate",
        "unknown-field",
        "amount",
        "currency",
        "link",
        "naive-time",
        "nul",
        "store-wide",
    ],
)
async def test_each_invalid_event_is_refused_naming_its_field(
    api: Api, producer: Producer, change: dict[str, Any], field: str, words: str
) -> None:
    data = {**event_data("bad"), **change}
    data = {k: v for k, v in data.items() if v is not None}
    status, body = await ingest(api, data)
    assert status == 422
    assert [(e["index"], e["field"]) for e in body["errors"]] == [(0, field)]
    assert words.lower() in body["errors"][0]["message"].lower()
    assert await queued(producer) == 0


@pytest.mark.parametrize(
    ("raw", "index", "field", "words"),
    [
        (b"{not json", None, "event", "not valid JSON"),
        (b"[]", None, "events", "no event"),
        (b'"an event"', 0, "event", "JSON object"),
        (b'{"id": "e1", "id": "e2"}', None, "event", 'duplicate key "id"'),
        (b'[{"order": {"amount": 0e1000000000000000000}}]', None, "event", "is out of range"),
        (b"[" * 100_000 + b"]" * 100_000, None, "event", "nested too deeply"),
    ],
    ids=["not-json", "empty", "not-object", "key-twice", "number-out-of-range", "too-deep"],
)
async def test_a_body_that_is_not_events_is_refused(
    api: Api, producer: Producer, raw: bytes, index: int | None, field: str, words: str
) -> None:
    status, body = await api.call(
        "POST",
        "/v1/events",
        token=INGEST_TOKEN,
        data=raw,
        headers={"Content-Type": "application/json"},
    )
    assert status == 422
    assert (body["errors"][0]["index"], body["errors"][0]["field"]) == (index, field)
    assert words in body["errors"][0]["message"]
    assert await queued(producer) == 0


async def test_a_batch_with_one_bad_event_enqueues_nothing(api: Api, producer: Producer) -> None:
    batch = [event_data("ok1"), {**event_data("bad"), "type": "nope"}, event_data("ok2")]
    status, body = await ingest(api, batch)
    assert status == 422
    assert [(e["index"], e["field"]) for e in body["errors"]] == [(1, "type")]
    assert "nothing was enqueued" in body["error"]
    assert await queued(producer) == 0


async def test_more_than_1000_events_are_refused(api: Api, producer: Producer) -> None:
    status, body = await ingest(api, [event_data(f"n{i}") for i in range(1001)])
    assert status == 422
    assert body["errors"][0]["field"] == "events"
    assert "at most 1000" in body["errors"][0]["message"]
    assert await queued(producer) == 0


async def test_a_body_over_1_mib_is_refused_with_413(api: Api, producer: Producer) -> None:
    big = json.dumps([event_data("big", affiliate_id="x" * 2048)] * 1024).encode()
    assert len(big) > 2 * 1024 * 1024
    status, body = await api.call(
        "POST",
        "/v1/events",
        token=INGEST_TOKEN,
        data=io.BytesIO(big),
        headers={"Content-Type": "application/json"},
    )
    assert status == 413
    assert "1 MiB" in body["error"]
    assert await queued(producer) == 0


@pytest.mark.parametrize(
    ("header", "words"),
    [
        (None, "missing bearer token"),
        ("Bearer wrong-token-0123456789", "wrong token"),
        (f"Bearer {OPS_TOKEN}", "wrong token"),  # the ops token does not open ingest
        (f"Basic {INGEST_TOKEN}", "missing bearer token"),
    ],
    ids=["none", "wrong", "ops-token", "basic"],
)
async def test_ingest_without_its_token_is_401(
    api: Api, producer: Producer, header: str | None, words: str
) -> None:
    headers = {} if header is None else {"Authorization": header}
    status, body = await api.call(
        "POST", "/v1/events", token=None, json=event_data("x"), headers=headers
    )
    assert status == 401
    assert words in body["error"]
    assert await queued(producer) == 0


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", "/v1/deliveries"),
        ("GET", "/v1/dead-letters"),
        ("POST", "/v1/dead-letters/replay"),
        ("GET", "/v1/callbacks"),
        ("DELETE", "/v1/callbacks/ann/order.created"),
    ],
)
async def test_the_ops_api_wants_the_ops_token(api: Api, method: str, path: str) -> None:
    assert (await api.call(method, path, token=None))[0] == 401
    assert (await api.call(method, path, token=INGEST_TOKEN))[0] == 401


@pytest.mark.parametrize(
    "path",
    [
        "//v1/deliveries",
        "/v1//deliveries",
        "/v1/deliveries/",
        "/v1/%64eliveries",
        "/v1/./deliveries",
    ],
)
@pytest.mark.parametrize("method", ["GET", "HEAD"])
async def test_no_spelling_of_a_path_gets_past_the_token(api: Api, method: str, path: str) -> None:
    async with api.http.request(method, URL(api.url + path, encoded=True)) as response:
        assert response.status in (401, 404)


async def test_the_service_will_not_start_without_tokens_unless_told(settings: Settings) -> None:
    with pytest.raises(Insecure, match="POSTBACK_INGEST_TOKEN and POSTBACK_OPS_TOKEN"):
        create_app(settings)
    async with running_service(settings, insecure=True) as api:
        assert (await api.call("GET", "/v1/callbacks", token=None))[0] == 200


# --- deliveries and dead letters ------------------------------------------------------


async def listed(api: Api, path: str, **query: str) -> list[dict[str, Any]]:
    status, body = await api.call("GET", path, params=query)
    assert status == 200, body
    items: list[dict[str, Any]] = body["items"]
    return items


async def test_filters_return_the_right_deliveries(
    api: Api, db: asyncpg.Connection, flaky: Flaky, settings: Settings, producer: Producer
) -> None:
    made = await make_deliveries(db, producer, flaky, settings)

    async def events(**query: str) -> set[str]:
        return {item["event_id"] for item in await listed(api, "/v1/deliveries", **query)}

    everything = {made.ann, made.ann_update, *made.bobs, made.carol}
    assert await events() == everything
    assert await events(affiliate="ann") == {made.ann, made.ann_update}
    assert await events(event_type="order.updated") == {made.ann_update}
    assert await events(order="#1") == {made.ann, made.ann_update}
    assert await events(state="dead") == set(made.bobs)
    assert await events(state="skipped") == {made.carol}
    assert await events(error_class="http_5xx") == set(made.bobs)
    assert await events(affiliate="ann", state="dead") == set()
    assert await events(since="1h") == everything
    assert await events(until="1h") == set()
    future = (datetime.now(UTC) + timedelta(minutes=5)).isoformat()
    assert await events(since=future) == set()
    assert await events(until=future) == everything

    dead = await listed(api, "/v1/dead-letters")
    assert [(d["event_id"], d["attempts"], d["last_status"]) for d in dead] == [
        (made.bobs[0], 3, 500)
    ]
    assert dead[0]["reason"] == "gave up after 3 attempts, last: HTTP 500"
    assert await listed(api, "/v1/dead-letters", affiliate="ann") == []


async def test_listings_page_through_everything_once(
    api: Api, db: asyncpg.Connection, settings: Settings
) -> None:
    batch = [event_data(f"p{i}", affiliate_id="nobody") for i in range(7)]
    await ingest(api, batch)
    await drain(settings)
    seen: list[str] = []
    cursor: str | None = None
    while True:
        query = {"limit": "3"} | ({} if cursor is None else {"cursor": cursor})
        status, body = await api.call("GET", "/v1/deliveries", params=query)
        assert status == 200
        seen += [item["event_id"] for item in body["items"]]
        cursor = body["next"]
        if cursor is None:
            break
    assert sorted(seen) == sorted(e["id"] for e in batch)
    assert len(seen) == 7


async def test_a_cursor_and_until_together_list_what_both_allow(
    api: Api, db: asyncpg.Connection, settings: Settings
) -> None:
    await ingest(api, [event_data(f"u{i}", affiliate_id="nobody") for i in range(5)])
    await drain(settings)
    newest_first = [item["event_id"] for item in await listed(api, "/v1/deliveries")]
    assert len(newest_first) == 5
    created = {
        row["event_id"]: row["created_at"]
        for row in await db.fetch("SELECT event_id, created_at FROM deliveries")
    }
    until = created[newest_first[2]].isoformat()  # before the two newest

    async def page(limit: int, **query: str) -> tuple[list[str], str | None]:
        status, body = await api.call("GET", "/v1/deliveries", params={"limit": str(limit)} | query)
        assert status == 200, body
        return [item["event_id"] for item in body["items"]], body["next"]

    _, after_newest = await page(1)  # a cursor later than `until`
    assert after_newest is not None
    assert await page(5, until=until, cursor=after_newest) == (newest_first[3:], None)
    _, after_fourth = await page(4)  # a cursor earlier than `until`
    assert after_fourth is not None
    assert await page(5, until=until, cursor=after_fourth) == (newest_first[4:], None)


async def test_listings_show_50_unless_told(
    api: Api, db: asyncpg.Connection, flaky: Flaky, settings: Settings
) -> None:
    no_retries = settings.model_copy(update={"retry_schedule": ""})
    await save_callback(db, "bob", "order.created", "GET", flaky.url + "/fail/{{event.id}}")
    order = {"amount": "1", "commission": "0.1"}
    batch = [
        event_data(f"l{i}", affiliate_id="bob", order={**order, "number": f"#l{i}"})
        for i in range(51)
    ]
    assert (await ingest(api, batch))[0] == 202
    await drain(no_retries)
    for path in ("/v1/deliveries", "/v1/dead-letters"):
        status, body = await api.call("GET", path)
        assert status == 200
        assert len(body["items"]) == 50, path
        assert body["next"] is not None, path
        status, rest = await api.call("GET", path, params={"cursor": body["next"]})
        assert (len(rest["items"]), rest["next"]) == (1, None), path
        status, body = await api.call("GET", path, params={"limit": "51"})
        assert (len(body["items"]), body["next"]) == (51, None), path


async def test_a_time_without_an_offset_is_read_as_utc(
    api: Api, db: asyncpg.Connection, settings: Settings
) -> None:
    """Run with the process's local time 5 hours ahead of UTC, so that reading `since` or
    `until` as local time would move each 5 hours and change what they select."""
    data = event_data("utc", affiliate_id="nobody")
    await ingest(api, data)
    await drain(settings)
    hour = timedelta(hours=1)
    now = datetime.now(UTC).replace(tzinfo=None)
    before, after = (now - hour).isoformat(), (now + hour).isoformat()  # no offset
    old_tz = os.environ.get("TZ")
    os.environ["TZ"] = "PBT-5"  # POSIX: 5 hours east of UTC
    time.tzset()
    try:
        assert datetime.now().astimezone().utcoffset() == timedelta(hours=5)

        async def events(**query: str) -> list[str]:
            return [item["event_id"] for item in await listed(api, "/v1/deliveries", **query)]

        assert await events(since=before) == [data["id"]]
        assert await events(since=after) == []
        assert await events(until=after) == [data["id"]]
        assert await events(until=before) == []
    finally:
        if old_tz is None:
            del os.environ["TZ"]
        else:
            os.environ["TZ"] = old_tz
        time.tzset()


async def test_durations_count_days(api: Api, db: asyncpg.Connection, settings: Settings) -> None:
    """`since=2d` is two days ago: taken three days ago is out, one day ago is in."""
    three, one, new = (event_data(f"days{n}", affiliate_id="nobody") for n in (3, 1, 0))
    await ingest(api, [three, one, new])
    await drain(settings)
    for data, days in ((three, 3), (one, 1)):
        await db.execute(
            "UPDATE deliveries SET created_at = now() - make_interval(days => $2)"
            " WHERE event_id = $1",
            data["id"],
            days,
        )

    async def events(**query: str) -> set[str]:
        return {item["event_id"] for item in await listed(api, "/v1/deliveries", **query)}

    assert await events(since="2d") == {one["id"], new["id"]}
    assert await events(until="2d") == {three["id"]}
    assert await events(since="4d", until="2d") == {three["id"]}
    assert await events(since="2d", until="12h") == {one["id"]}


@pytest.mark.parametrize(
    ("path", "query", "field"),
    [
        ("/v1/deliveries", {"state": "lost"}, "state"),
        ("/v1/deliveries", {"event_type": "order.deleted"}, "event_type"),
        ("/v1/deliveries", {"since": "yesterday"}, "since"),
        ("/v1/deliveries", {"since": "1h", "until": "2h"}, "until"),
        ("/v1/deliveries", {"limit": "0"}, "limit"),
        ("/v1/deliveries", {"limit": "501"}, "limit"),
        ("/v1/deliveries", {"cursor": "not-a-cursor"}, "cursor"),
        ("/v1/deliveries", {"affiliat": "ann"}, "affiliat"),
        ("/v1/dead-letters", {"state": "delivered"}, "state"),
        ("/v1/deliveries/not-a-uuid", {}, "id"),
    ],
)
async def test_bad_filters_are_refused_naming_the_parameter(
    api: Api, path: str, query: dict[str, str], field: str
) -> None:
    status, body = await api.call("GET", path, params=query)
    assert status == 422
    assert body["errors"][0]["field"] == field


@pytest.mark.parametrize(
    ("method", "path", "given", "field", "known"),
    [
        ("GET", "/v1/deliveries", {"error_class": "http_500"}, "error_class", FAILURE_CLASSES),
        ("GET", "/v1/dead-letters", {"error_class": "http_500"}, "error_class", FAILURE_CLASSES),
        ("GET", "/v1/deliveries", {"state": "lost"}, "state", STATES),
        ("GET", "/v1/deliveries", {"event_type": "order.deleted"}, "event_type", EVENT_TYPES),
        (
            "POST",
            "/v1/dead-letters/replay",
            {"filter": {"error_class": "http_500"}},
            "filter.error_class",
            FAILURE_CLASSES,
        ),
    ],
    ids=["deliveries", "dead-letters", "state", "event-type", "bulk-replay"],
)
async def test_an_unknown_choice_of_filter_is_refused_listing_the_known_ones(
    api: Api, method: str, path: str, given: dict[str, Any], field: str, known: tuple[str, ...]
) -> None:
    """A typo must not list (or replay) nothing, as if no delivery had failed so."""
    query, json_body = (given, None) if method == "GET" else (None, given)
    status, body = await api.call(method, path, params=query, json=json_body)
    message = f"must be one of {', '.join(known)}"
    assert (status, body) == (
        422,
        {"error": f"{field}: {message}", "errors": [{"field": field, "message": message}]},
    )


async def test_show_has_the_event_request_and_every_attempt(
    api: Api, db: asyncpg.Connection, flaky: Flaky, settings: Settings, producer: Producer
) -> None:
    made = await make_deliveries(db, producer, flaky, settings)
    [dead] = await listed(api, "/v1/dead-letters")
    status, shown = await api.call("GET", f"/v1/deliveries/{dead['id']}")
    assert status == 200
    assert shown["event"]["id"] == made.bobs[0]
    assert shown["request"]["url"] == flaky.url + "/fail/bob?o=%231001"
    assert [(a["number"], a["status_code"]) for a in shown["attempts"]] == [
        (1, 500),
        (2, 500),
        (3, 500),
    ]
    assert shown["attempts"][0]["response_excerpt"] == "down for maintenance"
    assert shown["actions"] == []
    missing = "00000000-0000-0000-0000-000000000000"
    assert (await api.call("GET", f"/v1/deliveries/{missing}"))[0] == 404


async def test_a_dead_letter_replayed_after_the_fix_is_delivered(
    api: Api, db: asyncpg.Connection, flaky: Flaky, settings: Settings, producer: Producer
) -> None:
    await make_deliveries(db, producer, flaky, settings)
    [dead] = await listed(api, "/v1/dead-letters")
    flaky.fixed = True
    status, body = await api.call(
        "POST", f"/v1/dead-letters/{dead['id']}/replay", json={"actor": "dana"}
    )
    assert (status, body) == (
        200,
        {"delivery_id": dead["id"], "outcome": "replayed", "queued": True},
    )
    assert await listed(api, "/v1/dead-letters") == []
    await drain(settings)
    _, shown = await api.call("GET", f"/v1/deliveries/{dead['id']}")
    assert shown["state"] == "delivered"
    assert [a["status_code"] for a in shown["attempts"]] == [500, 500, 500, 200]
    [action] = shown["actions"]
    assert (action["action"], action["mode"], action["actor"], action["attempt"]) == (
        "replay",
        "rerender",
        "dana",
        4,
    )
    # Replaying again is refused: it is not a dead letter any more.
    status, body = await api.call("POST", f"/v1/dead-letters/{dead['id']}/replay")
    assert status == 409
    assert "delivered" in body["error"]


async def test_a_replay_that_fails_again_gets_the_whole_schedule(
    api: Api, db: asyncpg.Connection, flaky: Flaky, settings: Settings, producer: Producer
) -> None:
    await make_deliveries(db, producer, flaky, settings)
    [dead] = await listed(api, "/v1/dead-letters")
    await api.call("POST", f"/v1/dead-letters/{dead['id']}/replay")
    await drain(settings)
    _, shown = await api.call("GET", f"/v1/deliveries/{dead['id']}")
    # Three more attempts, as many as the first time, not one.
    assert (shown["state"], len(shown["attempts"])) == ("dead", 6)
    assert shown["reason"] == "gave up after 3 attempts since the replay (6 in all), last: HTTP 500"


async def test_rerender_uses_the_callback_now_and_resend_the_request_then(
    api: Api, db: asyncpg.Connection, flaky: Flaky, settings: Settings, producer: Producer
) -> None:
    await make_deliveries(db, producer, flaky, settings)
    [dead] = await listed(api, "/v1/dead-letters")
    status, _ = await api.call(
        "PUT",
        "/v1/callbacks/bob/order.created",
        json={"url": flaky.url + "/fixed/bob?order={{order.number}}"},
    )
    assert status == 200
    flaky.paths.clear()
    await api.call("POST", f"/v1/dead-letters/{dead['id']}/replay", json={"mode": "resend"})
    await drain(settings)
    # The original URL, still failing: three attempts, the whole schedule again.
    assert flaky.paths == ["/fail/bob?o=%231001"] * 3
    flaky.paths.clear()
    await api.call("POST", f"/v1/dead-letters/{dead['id']}/replay", json={"mode": "rerender"})
    await drain(settings)
    assert flaky.paths == ["/fixed/bob?order=%231001"]
    _, shown = await api.call("GET", f"/v1/deliveries/{dead['id']}")
    assert shown["state"] == "delivered"
    assert [a["mode"] for a in shown["actions"]] == ["resend", "rerender"]


async def test_replay_is_refused_while_the_callback_is_off(
    api: Api, db: asyncpg.Connection, flaky: Flaky, settings: Settings, producer: Producer
) -> None:
    await make_deliveries(db, producer, flaky, settings)
    [dead] = await listed(api, "/v1/dead-letters")
    await api.call("POST", "/v1/callbacks/bob/order.created/disable")
    status, body = await api.call("POST", f"/v1/dead-letters/{dead['id']}/replay")
    assert status == 409
    assert "disabled" in body["error"]
    status, body = await api.call(
        "POST", f"/v1/dead-letters/{dead['id']}/replay", json={"mode": "again"}
    )
    assert (status, body["errors"][0]["field"]) == (422, "mode")
    assert len(await listed(api, "/v1/dead-letters")) == 1


async def test_bulk_replay_of_200_dead_letters_by_filter(
    api: Api, db: asyncpg.Connection, flaky: Flaky, settings: Settings
) -> None:
    no_retries = settings.model_copy(update={"retry_schedule": ""})
    await save_callback(db, "bob", "order.created", "GET", flaky.url + "/fail/{{event.id}}")
    await save_callback(db, "ann", "order.created", "GET", flaky.url + "/fail/{{event.id}}")
    # 205 orders of their own: the deliveries of one order would go one after the other.
    order = {"amount": "1", "commission": "0.1"}
    bobs = [
        event_data(f"bulk{i}", affiliate_id="bob", order={**order, "number": f"#b{i}"})
        for i in range(200)
    ]
    anns = [
        event_data(f"keep{i}", affiliate_id="ann", order={**order, "number": f"#a{i}"})
        for i in range(5)
    ]
    assert (await ingest(api, bobs + anns))[0] == 202
    await drain(no_retries)
    assert len(await listed(api, "/v1/dead-letters", limit="500")) == 205

    flaky.fixed = True
    # A dry run counts them (what the page's confirmation quotes) and replays nothing.
    status, counted = await api.call(
        "POST", "/v1/dead-letters/replay", json={"filter": {"affiliate": "bob"}, "dry_run": True}
    )
    assert (status, counted) == (
        200,
        {"matching": 200, "replayed": 0, "skipped": 0, "failed": 0, "problems": []},
    )
    assert len(await listed(api, "/v1/dead-letters", limit="500")) == 205
    status, summary = await api.call(
        "POST", "/v1/dead-letters/replay", json={"filter": {"affiliate": "bob"}, "actor": "bulk"}
    )
    assert (status, summary) == (
        200,
        {"matching": 200, "replayed": 200, "skipped": 0, "failed": 0, "problems": []},
    )
    await drain(no_retries)
    delivered = await listed(api, "/v1/deliveries", affiliate="bob", state="delivered", limit="500")
    assert len(delivered) == 200
    left = await listed(api, "/v1/dead-letters", limit="500")
    assert {d["affiliate_id"] for d in left} == {"ann"}
    assert len(left) == 5


async def test_discard_hides_it_from_the_list_and_keeps_it_in_the_record(
    api: Api, db: asyncpg.Connection, flaky: Flaky, settings: Settings, producer: Producer
) -> None:
    await make_deliveries(db, producer, flaky, settings)
    [dead] = await listed(api, "/v1/dead-letters")
    path = f"/v1/dead-letters/{dead['id']}/discard"
    status, body = await api.call("POST", path, json={})
    assert (status, body["errors"][0]["field"]) == (422, "note")
    status, body = await api.call("POST", path, json={"note": "bob's shop closed", "actor": "dana"})
    assert (status, body["outcome"]) == (200, "discarded")
    assert await listed(api, "/v1/dead-letters") == []
    _, shown = await api.call("GET", f"/v1/deliveries/{dead['id']}")
    assert shown["state"] == "discarded"
    assert len(shown["attempts"]) == 3
    [action] = shown["actions"]
    assert (action["action"], action["note"], action["actor"]) == (
        "discard",
        "bob's shop closed",
        "dana",
    )
    assert [d["id"] for d in await listed(api, "/v1/deliveries", state="discarded")] == [dead["id"]]
    status, _ = await api.call("POST", path, json={"note": "again"})
    assert status == 409


# --- callbacks --------------------------------------------------------------------------


async def test_callbacks_can_be_set_listed_switched_and_removed(
    api: Api, flaky: Flaky, settings: Settings
) -> None:
    path = "/v1/callbacks/ann/order.created"
    status, body = await api.call("PUT", path, json={"url": flaky.url + "/ann?o={{order.numbr}}"})
    assert (status, body["errors"][0]["field"]) == (422, "url")
    assert "order.number" in body["errors"][0]["message"]  # the suggestion
    status, saved = await api.call(
        "PUT",
        path,
        json={"url": flaky.url + "/ann?o={{order.number}}", "method": "POST", "secret": "s3cret"},
    )
    assert status == 200
    assert (saved["method"], saved["has_secret"], saved["enabled"]) == ("POST", True, True)
    assert "secret" not in json.dumps(saved).replace("has_secret", "")

    status, body = await api.call("POST", path + "/disable")
    assert (status, body["enabled"]) == (200, False)
    data = event_data("while-off")
    await ingest(api, data)
    await drain(settings)
    assert flaky.paths == []
    [skipped] = await listed(api, "/v1/deliveries", state="skipped")
    assert skipped["reason"] == "callback disabled"

    status, body = await api.call("POST", path + "/enable")
    assert (status, body["enabled"]) == (200, True)
    assert [cb["affiliate_id"] for cb in await listed(api, "/v1/callbacks")] == ["ann"]
    assert await listed(api, "/v1/callbacks", affiliate="bob") == []
    assert (await api.call("DELETE", path))[0] == 200
    assert (await api.call("DELETE", path))[0] == 404
    assert (await api.call("POST", path + "/enable"))[0] == 404
    status, body = await api.call("PUT", "/v1/callbacks/ann/order.paid", json={"url": "x"})
    assert (status, body["errors"][0]["field"]) == (422, "event_type")


async def test_a_null_secret_removes_it_and_requests_go_unsigned(
    api: Api, db: asyncpg.Connection, receiver: Receiver, settings: Settings
) -> None:
    path = "/v1/callbacks/ann/order.created"
    url = receiver.url + "/pb?o={{order.number}}"
    assert (await api.call("PUT", path, json={"url": url, "secret": "s3cret"}))[1]["has_secret"]
    # Omitted, the secret stays: re-pointing a URL must not stop the signatures.
    assert (await api.call("PUT", path, json={"url": url}))[1]["has_secret"] is True
    await ingest(api, event_data("signed"))
    await drain(settings)

    status, saved = await api.call("PUT", path, json={"url": url, "secret": None})

    assert (status, saved["has_secret"]) == (200, False)
    assert await db.fetchval("SELECT secret FROM callbacks") is None
    await ingest(api, event_data("unsigned"))
    await drain(settings)
    signed, unsigned = (got.headers for got in receiver.requests)
    assert "webhook-signature" in signed
    assert not set(sign.HEADER_NAMES) & set(unsigned)


@pytest.mark.parametrize(
    ("url", "named"),
    [
        ("https://ann:hunter2@t.example/pb", "credentials (user:password@)"),
        ("https://t.example/pb#top", "fragment"),
    ],
)
async def test_a_callback_with_credentials_or_a_fragment_is_refused(
    api: Api, url: str, named: str
) -> None:
    status, body = await api.call("PUT", "/v1/callbacks/ann/order.created", json={"url": url})
    assert (status, body["errors"][0]["field"]) == (422, "url")
    assert named in body["errors"][0]["message"]
    assert "hunter2" not in json.dumps(body)


async def test_test_fire_sends_now_and_shows_the_answer(
    api: Api, db: asyncpg.Connection, flaky: Flaky
) -> None:
    await save_callback(
        db, "ann", "order.created", "POST", flaky.url + "/ann?o={{order.number}}", "whsec_c2VjcmV0"
    )
    status, fired = await api.call(
        "POST", "/v1/callbacks/ann/order.created/test", json={"actor": "dana"}
    )
    assert status == 200, fired
    assert fired["request"]["url"] == flaky.url + "/ann?o=TEST-1001"
    assert fired["request"]["body"]["order"]["number"] == "TEST-1001"
    assert "webhook-signature" in fired["request"]["headers"]
    assert fired["response"]["status"] == 200
    assert fired["response"]["headers"]["X-Receiver"] == "flaky"
    assert fired["response"]["body_excerpt"] == "ok"
    assert fired["delivered"] is True
    assert flaky.paths == ["/ann?o=TEST-1001"]
    row = await db.fetchrow("SELECT actor, status_code, request FROM test_fires")
    assert row is not None
    assert (row["actor"], row["status_code"]) == ("dana", 200)
    # A test is not a delivery.
    assert await db.fetchval("SELECT count(*) FROM deliveries") == 0

    given = event_data("given", order={"number": "#77", "amount": "5", "commission": "1"})
    status, fired = await api.call(
        "POST", "/v1/callbacks/ann/order.created/test", json={"event": given}
    )
    assert (status, fired["request"]["url"]) == (200, flaky.url + "/ann?o=%2377")
    status, body = await api.call(
        "POST",
        "/v1/callbacks/ann/order.created/test",
        json={"event": {**given, "affiliate_id": "bob"}},
    )
    assert (status, body["errors"][0]["field"]) == (422, "event")
    status, body = await api.call(
        "POST", "/v1/callbacks/ann/order.created/test", json={"event": {"id": "x"}}
    )
    assert status == 422
    assert "event.type" in [e["field"] for e in body["errors"]]
    assert (await api.call("POST", "/v1/callbacks/bob/order.created/test"))[0] == 404


async def test_test_fire_reports_a_receiver_that_is_down(api: Api, db: asyncpg.Connection) -> None:
    await save_callback(db, "ann", "order.created", "GET", "http://127.0.0.1:1/pb")
    status, fired = await api.call("POST", "/v1/callbacks/ann/order.created/test")
    assert status == 200
    assert (fired["response"], fired["error_class"], fired["delivered"]) == (
        None,
        "connect_error",
        False,
    )


async def test_a_disabled_callback_is_test_fired_saying_so(
    api: Api, db: asyncpg.Connection, flaky: Flaky
) -> None:
    await save_callback(db, "ann", "order.created", "GET", flaky.url + "/ann")
    path = "/v1/callbacks/ann/order.created"
    _, fired = await api.call("POST", path + "/test")
    assert fired["enabled"] is True
    await api.call("POST", path + "/disable")
    status, fired = await api.call("POST", path + "/test")
    assert (status, fired["delivered"], fired["enabled"]) == (200, True, False)
    assert flaky.paths == ["/ann", "/ann"]


async def test_a_preview_renders_the_sample_order_and_saves_nothing(
    api: Api, db: asyncpg.Connection, flaky: Flaky
) -> None:
    template = flaky.url + "/ann?o={{order.number}}&c={{order.currency}}"
    given = {"affiliate_id": "ann", "event_type": "order.created", "url": template}
    status, request = await api.call("POST", "/v1/callbacks/preview", json=given)
    assert status == 200, request
    assert (request["method"], request["url"], request["body"]) == (
        "GET",
        flaky.url + "/ann?o=TEST-1001&c=EUR",
        None,
    )
    assert request["headers"]["Idempotency-Key"].startswith("test-")
    assert "webhook-signature" not in request["headers"]
    status, request = await api.call(
        "POST", "/v1/callbacks/preview", json=given | {"method": "post"}
    )
    assert (status, request["method"]) == (200, "POST")
    assert request["body"]["order"]["number"] == "TEST-1001"
    assert request["body"]["affiliate"]["id"] == "ann"
    assert await db.fetchval("SELECT count(*) FROM callbacks") == 0
    assert await db.fetchval("SELECT count(*) FROM test_fires") == 0
    assert flaky.paths == []


@pytest.mark.parametrize(
    ("change", "field", "words"),
    [
        ({"url": "http://t.example/?o={{order.numbr}}"}, "url", "order.number"),
        ({"url": "http://169.254.169.254/pb"}, "url", "169.254.169.254"),
        ({"url": ""}, "url", ""),
        ({"affiliate_id": ""}, "affiliate_id", "1 to 64 characters"),
        ({"event_type": "order.paid"}, "event_type", "order.created"),
        ({"method": "PATCH"}, "method", "GET"),
    ],
    ids=["variable", "address", "empty-url", "affiliate", "event", "method"],
)
async def test_a_preview_refuses_as_a_put_refuses(
    api: Api, change: dict[str, str], field: str, words: str
) -> None:
    given = {"affiliate_id": "ann", "event_type": "order.created", "url": "https://t.example/"}
    given |= change
    status, previewed = await api.call("POST", "/v1/callbacks/preview", json=given)
    assert (status, previewed["errors"][0]["field"]) == (422, field)
    assert words in previewed["errors"][0]["message"]
    if field in ("url", "method"):  # the fields a PUT takes in its body: word for word
        body = {"url": given["url"], "method": given.get("method", "GET")}
        put = await api.call("PUT", "/v1/callbacks/ann/order.created", json=body)
        assert put == (422, previewed)


async def test_a_callback_takes_statuses_a_delay_and_the_store_wide_affiliate(
    api: Api, db: asyncpg.Connection, flaky: Flaky
) -> None:
    status, saved = await api.call(
        "PUT",
        "/v1/callbacks/ann/order.updated",
        json={"url": flaky.url + "/ann", "statuses": ["approved", "refunded"], "delay": "5m"},
    )
    assert status == 200, saved
    assert {key: saved[key] for key in CONDITIONS} == {
        "store_wide": False,
        "statuses": ["approved", "refunded"],
        "delay": "5m",
        "delay_seconds": 300,
    }
    # The store-wide callback is the path's `*`; a delay may be given in seconds.
    store_url = flaky.url + "/store?a={{affiliate.id}}"
    status, store = await api.call(
        "PUT", "/v1/callbacks/*/order.created", json={"url": store_url, "delay": 90}
    )
    assert status == 200, store
    assert {key: store[key] for key in ("affiliate_id", *CONDITIONS)} == {
        "affiliate_id": "*",
        "store_wide": True,
        "statuses": None,
        "delay": "90s",
        "delay_seconds": 90,
    }
    found = {cb["affiliate_id"]: cb for cb in await listed(api, "/v1/callbacks")}
    assert found == {"ann": saved, "*": store}
    assert await listed(api, "/v1/callbacks", affiliate="*") == [store]
    stored = await db.fetch("SELECT affiliate_id, statuses, delay_seconds FROM callbacks")
    assert sorted(tuple(row) for row in stored) == [
        ("*", None, 90),
        ("ann", ["approved", "refunded"], 300),
    ]
    # Omitted, or null, they are every status and no delay: a PUT replaces the callback.
    status, again = await api.call(
        "PUT", "/v1/callbacks/ann/order.updated", json={"url": flaky.url + "/ann", "statuses": None}
    )
    assert (status, again["statuses"], again["delay"], again["delay_seconds"]) == (
        200,
        None,
        "0s",
        0,
    )


async def _encoded(api: Api, method: str, path: str) -> tuple[int, Any]:
    """`path` sent exactly as written: aiohttp's client would send `%2A` as `*`."""
    headers = {"Authorization": f"Bearer {OPS_TOKEN}"}
    async with api.http.request(method, URL(api.url + path, encoded=True), headers=headers) as r:
        return r.status, await r.json()


@pytest.mark.parametrize("star", ["*", "%2A"])
async def test_the_store_wide_callback_is_reached_by_its_star_literal_or_encoded(
    api: Api, flaky: Flaky, star: str
) -> None:
    path = f"/v1/callbacks/{star}/order.created"
    url = flaky.url + "/store?a={{affiliate.id}}"
    async with api.http.put(
        URL(api.url + path, encoded=True),
        json={"url": url},
        headers={"Authorization": f"Bearer {OPS_TOKEN}"},
    ) as response:
        assert response.status == 200
        assert (await response.json())["affiliate_id"] == "*"
    status, body = await _encoded(api, "POST", path + "/disable")
    assert (status, body["affiliate_id"], body["enabled"]) == (200, "*", False)
    status, body = await _encoded(api, "POST", path + "/enable")
    assert (status, body["enabled"]) == (200, True)
    # A test fire's sample order is someone's: a made-up affiliate's.
    status, fired = await _encoded(api, "POST", path + "/test")
    assert (status, fired["delivered"]) == (200, True), fired
    assert flaky.paths == ["/store?a=sample-affiliate"]
    assert fired["request"]["url"] == flaky.url + "/store?a=sample-affiliate"
    assert await _encoded(api, "DELETE", path) == (200, {"removed": True})
    status, body = await _encoded(api, "DELETE", path)
    assert (status, body["error"]) == (404, "no order.created callback for affiliate *")


async def test_a_preview_takes_the_first_status_and_a_made_up_affiliate_for_the_store(
    api: Api, flaky: Flaky
) -> None:
    given = {
        "affiliate_id": "*",
        "event_type": "order.updated",
        "url": flaky.url + "/pb?s={{order.status}}&a={{affiliate.id}}",
        "method": "POST",
        "statuses": ["refunded", "approved"],
        "delay": "2h",
    }
    status, request = await api.call("POST", "/v1/callbacks/preview", json=given)
    assert status == 200, request
    assert request["url"] == flaky.url + "/pb?s=refunded&a=sample-affiliate"
    assert request["body"]["order"]["status"] == "refunded"
    assert request["body"]["affiliate"]["id"] == "sample-affiliate"
    status, request = await api.call(
        "POST", "/v1/callbacks/preview", json=given | {"statuses": None}
    )
    assert (status, request["url"]) == (200, flaky.url + "/pb?s=pending&a=sample-affiliate")


@pytest.mark.parametrize(
    ("given", "field", "message"),
    [
        ({"delay": "25h"}, "delay", "delay '25h' is out of range; it may be 0 to 24h (86400 s)"),
        ({"delay": "5x"}, "delay", "delay '5x' is not a duration; write it like 90s, 5m or 2h"),
        ({"delay": 90000}, "delay", "delay 90000 is out of range; it may be 0 to 24h (86400 s)"),
        ({"delay": 1.5}, "delay", "must be a duration such as 90s, 5m or 2h, or whole seconds"),
        (
            {"delay": 10**30},
            "delay",
            f"delay {10**30} is out of range; it may be 0 to 24h (86400 s)",
        ),
        (
            {"statuses": ["approved", "", "x"]},
            "statuses",
            "statuses must be order statuses separated by commas, e.g. approved,refunded; "
            "got an empty one",
        ),
        ({"statuses": ["a", "a"]}, "statuses", "status 'a' is listed twice"),
        (
            {"statuses": []},
            "statuses",
            "statuses must name at least one order status, e.g. approved,refunded; got none "
            "(to fire for every status, leave statuses out)",
        ),
        (
            {"statuses": [f"s{n}" for n in range(40_000)]},
            "statuses",
            "40000 statuses listed; at most 32 may be",
        ),
    ],
    ids=[
        "too-long",
        "not-a-duration",
        "seconds-too-many",
        "not-whole",
        "huge",
        "empty-status",
        "twice",
        "none",
        "too-many",
    ],
)
async def test_bad_statuses_or_delay_are_refused_by_put_and_preview_alike(
    api: Api, db: asyncpg.Connection, given: dict[str, Any], field: str, message: str
) -> None:
    """Worded as `postback callbacks set` words them (test_cli.py), naming the field."""
    url = "https://t.example/pb"
    refused = (
        422,
        {"error": f"{field}: {message}", "errors": [{"field": field, "message": message}]},
    )
    assert await api.call("PUT", "/v1/callbacks/ann/order.created", json={"url": url} | given) == (
        refused
    )
    preview = {"affiliate_id": "ann", "event_type": "order.created", "url": url} | given
    assert await api.call("POST", "/v1/callbacks/preview", json=preview) == refused
    assert await db.fetchval("SELECT count(*) FROM callbacks") == 0


async def test_deliveries_say_which_callback_they_went_to_and_when_a_delayed_one_is_due(
    api: Api, db: asyncpg.Connection, flaky: Flaky, settings: Settings, producer: Producer
) -> None:
    made = await make_store_wide_and_delayed(db, producer, flaky, settings)
    items = {item["id"]: item for item in await listed(api, "/v1/deliveries")}
    zed, ann = items[made.store_wide], items[made.delayed]
    assert (zed["state"], zed["callback_id"], zed["callback_store_wide"]) == (
        "delivered",
        made.store_callback,
        True,
    )
    assert (ann["state"], ann["reason"], ann["callback_id"], ann["callback_store_wide"]) == (
        "pending",
        DELAYED_REASON,
        made.delayed_callback,
        False,
    )
    assert datetime.fromisoformat(ann["next_attempt_at"]) == made.due
    status, shown = await api.call("GET", f"/v1/deliveries/{made.store_wide}")
    assert (status, shown["callback_id"], shown["callback_store_wide"]) == (
        200,
        made.store_callback,
        True,
    )
    await api.call("DELETE", "/v1/callbacks/*/order.created")
    _, shown = await api.call("GET", f"/v1/deliveries/{made.store_wide}")
    assert (shown["callback_id"], shown["callback_store_wide"]) == (made.store_callback, None)


# --- the overview -------------------------------------------------------------------------


async def _overview_ledger(db: asyncpg.Connection) -> dict[str, tuple[str, str]]:
    """Deliveries in known states and hours, with attempts of known durations (ms): in the
    window 100 to 500; a day and more ago, 9000 and two dead letters the window leaves out.
    Each event id with its (affiliate, state)."""
    hour = timedelta(hours=1)
    made = {}
    for affiliate, state, ago, durations in (
        ("ann", "delivered", 0 * hour, [100]),
        ("bob", "dead", hour, [200, 300]),
        ("bob", "retrying", hour, [400]),
        ("ann", "retrying", 5 * hour, [500]),
        ("carol", "skipped", 5 * hour, []),
        ("bob", "dead", 30 * hour, [9000]),
        ("dan", "dead", 30 * hour, []),
    ):
        made[await add_delivery(db, affiliate, state, ago, durations)] = (affiliate, state)
    return made


async def test_the_overview_counts_the_last_24_hours_by_hour_state_and_affiliate(
    api: Api, db: asyncpg.Connection, producer: Producer, settings: Settings
) -> None:
    made = await _overview_ledger(db)
    await producer.publish(event_data("queued", affiliate_id="nobody"))  # no worker: due
    status, before = await api.call("GET", "/v1/overview")
    assert status == 200, before
    # As the workers count them (the circuits' destinations are theirs alone).
    counted = metrics.Tally()
    for change, times in (("opened", 3), ("closed", 2)):
        for _ in range(times):
            counted.count("ann", circuit=change)
    for _ in range(7):
        counted.count("ann", deferred="circuit_open")
    assert await metrics.write(producer.redis, settings.queue_name, counted.drain()) == []
    status, body = await api.call("GET", "/v1/overview")
    assert status == 200, body

    since = datetime.fromisoformat(body["since"])
    assert since.minute == since.second == 0
    assert datetime.fromisoformat(body["until"]) - since == timedelta(hours=24)
    assert since <= datetime.now(UTC) < since + timedelta(hours=24)
    taken = {
        row["event_id"]: row["created_at"]
        for row in await db.fetch("SELECT event_id, created_at FROM deliveries")
    }
    expected: dict[int, dict[str, int]] = {}
    for event_id, (_, state) in made.items():
        if taken[event_id] >= since:
            index = (taken[event_id] - since) // timedelta(hours=1)
            expected.setdefault(index, {})[state] = expected.get(index, {}).get(state, 0) + 1
    got = {
        index: {state: n for state, n in hour["states"].items() if n}
        for index, hour in enumerate(body["hours"])
        if any(hour["states"].values())
    }
    assert got == expected
    assert len(got) == 3  # now, an hour ago, five hours ago
    assert body["hours"][0]["start"] == body["since"]
    assert {s: n for s, n in body["states"].items() if n} == {
        "delivered": 1,
        "dead": 1,
        "retrying": 2,
        "skipped": 1,
    }
    assert body["affiliates"] == [
        {"affiliate_id": "bob", "dead": 1, "retrying": 1},
        {"affiliate_id": "ann", "dead": 0, "retrying": 1},
    ]
    # Of the window's five attempts (100 to 500 ms), not the 9000 ms one of a day ago.
    assert body["durations"] == {
        "attempts": 5,
        "p50_ms": 300.0,
        "p95_ms": 480.0,
        "of_newest": overview.DURATION_SAMPLE,
    }
    assert (body["retries_waiting"], body["dead_letters"]) == (2, 3)  # the whole ledger
    assert body["queue"] == {"due": 1, "later": 0}
    moved = {k: body["circuits"][k] - before["circuits"][k] for k in body["circuits"]}
    assert moved == {"opened": 3, "closed": 2, "put_off": 7}
    assert body["redis_error"] is None

    # Each number is the length of the list the page links it to.
    window = {"since": body["since"]}
    for state, n in body["states"].items():
        assert len(await listed(api, "/v1/deliveries", state=state, **window)) == n, state
    for affiliate in body["affiliates"]:
        mine = {"affiliate": affiliate["affiliate_id"], **window}
        assert len(await listed(api, "/v1/dead-letters", **mine)) == affiliate["dead"]
        retrying = await listed(api, "/v1/deliveries", state="retrying", **mine)
        assert len(retrying) == affiliate["retrying"]
    for hour in body["hours"]:
        start = datetime.fromisoformat(hour["start"])
        one = {"since": hour["start"], "until": (start + timedelta(hours=1)).isoformat()}
        assert len(await listed(api, "/v1/deliveries", **one)) == sum(hour["states"].values())
    assert len(await listed(api, "/v1/dead-letters")) == body["dead_letters"]
    assert len(await listed(api, "/v1/deliveries", state="retrying")) == body["retries_waiting"]


async def test_the_overview_times_the_attempts_of_its_newest_deliveries_only(
    api: Api, db: asyncpg.Connection, monkeypatch: pytest.MonkeyPatch
) -> None:
    """However many deliveries a day brings, the durations cost the same: those of the
    window's newest: here 2, ann's of now (100 ms) and bob's retrying one of an hour ago
    (400 ms), written just after his dead one."""
    await _overview_ledger(db)
    monkeypatch.setattr(overview, "DURATION_SAMPLE", 2)
    _, body = await api.call("GET", "/v1/overview")
    assert body["durations"] == {"attempts": 2, "p50_ms": 250.0, "p95_ms": 385.0, "of_newest": 2}


async def test_the_overview_with_redis_down_still_gives_the_ledgers_numbers(
    db: asyncpg.Connection, settings: Settings
) -> None:
    await _overview_ledger(db)
    gone = with_tokens(settings).model_copy(update={"redis_url": "redis://127.0.0.1:1/0"})
    async with running_service(gone) as api:
        status, body = await api.call("GET", "/v1/overview")
    assert status == 200, body
    assert (body["queue"], body["circuits"]) == (None, None)
    assert "Connect" in body["redis_error"]
    assert (body["retries_waiting"], body["dead_letters"]) == (2, 3)
    assert body["states"]["retrying"] == 2


async def test_the_overview_of_an_empty_ledger_is_all_zeros(api: Api) -> None:
    status, body = await api.call("GET", "/v1/overview")
    assert status == 200, body
    assert len(body["hours"]) == 24
    assert not any(n for hour in body["hours"] for n in hour["states"].values())
    assert body["affiliates"] == []
    assert body["durations"] == {
        "attempts": 0,
        "p50_ms": None,
        "p95_ms": None,
        "of_newest": overview.DURATION_SAMPLE,
    }
    status, body = await api.call("GET", "/v1/overview", params={"hours": "48"})
    assert (status, body["errors"][0]["field"]) == (422, "hours")


# --- health, metrics, OpenAPI ----------------------------------------------------------


async def test_healthz_names_what_is_down(api: Api, settings: Settings) -> None:
    status, body = await api.call("GET", "/healthz", token=None)
    assert (status, body["down"]) == (503, ["worker"])
    assert body["checks"]["redis"] == {"ok": True}
    assert body["checks"]["postgres"] == {"ok": True}
    async with running_worker(settings):
        await until(lambda: _healthy(api))
        status, body = await api.call("GET", "/healthz", token=None)
        assert (status, body["status"], body["down"]) == (200, "ok", [])
        assert "j_complete" in body["checks"]["worker"]["report"]


async def _healthy(api: Api) -> bool:
    return (await api.call("GET", "/healthz", token=None))[0] == 200


async def test_healthz_says_503_naming_redis_when_redis_is_unreachable(
    settings: Settings,
) -> None:
    gone = with_tokens(settings).model_copy(update={"redis_url": "redis://127.0.0.1:1/0"})
    async with running_service(gone) as api:
        status, body = await api.call("GET", "/healthz", token=None)
        assert status == 503
        assert body["down"] == ["redis", "worker"]
        assert "Connect" in body["checks"]["redis"]["error"]
        assert body["checks"]["postgres"] == {"ok": True}
        # Ingest records the event all the same, and says it is left to the sweep.
        status, body = await ingest(api, event_data("nowhere"))
        assert (status, body["queued"]) == (202, False)


async def test_healthz_says_503_naming_postgres_when_postgres_is_unreachable(
    settings: Settings,
) -> None:
    gone = with_tokens(settings).model_copy(
        update={"database_url": "postgresql://postgres@127.0.0.1:1/nope"}
    )
    async with running_service(gone) as api:
        status, body = await api.call("GET", "/healthz", token=None)
        assert status == 503
        assert "postgres" in body["down"]
        status, body = await api.call("GET", "/v1/dead-letters")
        assert status == 503
        assert "Postgres" in body["error"]


def _samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


async def test_metrics_move_as_deliveries_happen(
    api: Api, db: asyncpg.Connection, flaky: Flaky, settings: Settings, producer: Producer
) -> None:
    status, text = await api.call("GET", "/metrics", token=None)
    assert status == 200
    before = _samples(text)
    await make_deliveries(db, producer, flaky, settings)
    await ingest(api, event_data("waiting", affiliate_id="nobody"))  # queued, not drained
    _, text = await api.call("GET", "/metrics", token=None)
    after = _samples(text)

    def moved(name: str, **labels: str) -> float:
        key = (name, tuple(sorted(labels.items())))
        return after[key] - before.get(key, 0.0)

    assert moved("postback_deliveries_total", outcome="delivered") == 2
    assert moved("postback_deliveries_total", outcome="dead") == 1
    assert moved("postback_deliveries_total", outcome="skipped") == 1
    assert moved("postback_attempts_total", result="delivered") == 2
    assert moved("postback_attempts_total", result="retrying") == 2
    assert moved("postback_attempts_total", result="dead") == 1
    assert moved("postback_attempt_duration_seconds_count") == 5
    assert moved("postback_attempt_duration_seconds_bucket", le="+Inf") == 5
    assert moved("postback_affiliate_failures_total", affiliate="bob") == 3
    assert after[("postback_dead_letters", ())] == 1
    assert after[("postback_queue_depth", ())] == 1
    assert after[("postback_retries_waiting", ())] == 0


async def test_a_delivery_waiting_for_its_retry_shows_in_the_gauges(
    api: Api, db: asyncpg.Connection, flaky: Flaky, settings: Settings, producer: Producer
) -> None:
    """`postback_queue_deferred` (its job is due later) and `postback_retries_waiting` (its
    delivery is `retrying`) each count it while it waits, and neither once it is delivered."""

    async def gauges() -> tuple[float, float, float]:
        status, text = await api.call("GET", "/metrics", token=None)
        assert status == 200
        got = _samples(text)
        return (
            got[("postback_queue_deferred", ())],
            got[("postback_retries_waiting", ())],
            got[("postback_queue_depth", ())],
        )

    assert await gauges() == (0, 0, 0)
    await save_callback(db, "bob", "order.created", "GET", flaky.url + "/fail/bob")
    hourly = settings.model_copy(update={"retry_schedule": "1h"})
    data = event_data("retry", affiliate_id="bob")
    await producer.publish(data)

    async def retrying_and_alone_in_the_queue() -> bool:
        state = await db.fetchval("SELECT state FROM deliveries WHERE event_id = $1", data["id"])
        return state == "retrying" and await queued(producer) == 1

    async with running_worker(hourly):
        await until(retrying_and_alone_in_the_queue)
    assert await gauges() == (1, 1, 0)

    # The receiver is back, and the hour is up: the ledger and the queue say it is due now.
    flaky.fixed = True
    await db.execute(
        "UPDATE deliveries SET next_attempt_at = now() WHERE event_id = $1", data["id"]
    )
    await wake(producer.redis, settings.queue_name, [data["id"]])
    assert await gauges() == (0, 1, 1)
    await drain(hourly)
    state = await db.fetchval("SELECT state FROM deliveries WHERE event_id = $1", data["id"])
    assert state == "delivered"
    assert await gauges() == (0, 0, 0)


async def test_a_redis_error_loses_the_count_not_the_delivery(
    api: Api, db: asyncpg.Connection, flaky: Flaky, settings: Settings, producer: Producer
) -> None:
    """Redis answers the worker's counting with an error (the counters' key holds a string,
    so every HINCRBY on it is refused with WRONGTYPE) while the queue works: the worker logs
    `metrics_not_counted` and delivers all the same."""
    await save_callback(db, "ann", "order.created", "GET", flaky.url + "/ann")
    counters = metrics_keys(settings.queue_name).counters
    await producer.redis.set(counters, "not a hash")
    try:
        data = event_data("uncounted")
        await producer.publish(data)
        with structlog.testing.capture_logs() as logs:
            await drain(settings)
    finally:
        await producer.redis.delete(counters)
    state = await db.fetchval("SELECT state FROM deliveries WHERE event_id = $1", data["id"])
    assert state == "delivered"
    assert flaky.paths == ["/ann"]
    [lost] = [entry for entry in logs if entry["event"] == "metrics_not_counted"]
    assert lost["log_level"] == "warning"
    assert "WRONGTYPE" in lost["error"]
    # Nothing was counted: the scrape starts from the empty key.
    _, text = await api.call("GET", "/metrics", token=None)
    assert _samples(text)[("postback_deliveries_total", (("outcome", "delivered"),))] == 0


def _source_up(samples: dict[tuple[str, tuple[tuple[str, str], ...]], float]) -> dict[str, float]:
    return {
        labels[0][1]: value
        for (name, labels), value in samples.items()
        if name == "postback_source_up"
    }


def _names(samples: dict[tuple[str, tuple[tuple[str, str], ...]], float]) -> set[str]:
    return {name for name, _ in samples}


async def test_metrics_with_redis_down_still_serve_what_postgres_knows(
    db: asyncpg.Connection, flaky: Flaky, settings: Settings, producer: Producer
) -> None:
    """The dead-letter gauge matters most while Redis is down: served, with Redis's own
    metrics left out (not zeros) and `postback_source_up` saying which source failed."""
    await make_deliveries(db, producer, flaky, settings)
    gone = with_tokens(settings).model_copy(update={"redis_url": "redis://127.0.0.1:1/0"})
    async with running_service(gone) as api:
        with structlog.testing.capture_logs() as logs:
            status, text = await api.call("GET", "/metrics", token=None)
    assert status == 200
    got = _samples(text)
    assert _source_up(got) == {"redis": 0, "postgres": 1}
    assert got[("postback_dead_letters", ())] == 1
    assert got[("postback_retries_waiting", ())] == 0
    assert "postback_queue_depth" not in _names(got)
    assert "postback_deliveries_total" not in _names(got)
    [down] = [entry for entry in logs if entry["event"] == "metrics_source_down"]
    assert down["source"] == "redis"
    assert "Connect" in down["error"]


async def test_metrics_with_postgres_down_still_serve_what_redis_knows(
    db: asyncpg.Connection, flaky: Flaky, settings: Settings, producer: Producer
) -> None:
    await make_deliveries(db, producer, flaky, settings)
    await producer.publish(event_data("waiting", affiliate_id="nobody"))  # queued, not drained
    gone = with_tokens(settings).model_copy(
        update={"database_url": "postgresql://postgres@127.0.0.1:1/nope"}
    )
    async with running_service(gone) as api:
        status, text = await api.call("GET", "/metrics", token=None)
    assert status == 200
    got = _samples(text)
    assert _source_up(got) == {"redis": 1, "postgres": 0}
    assert got[("postback_deliveries_total", (("outcome", "delivered"),))] == 2
    assert got[("postback_deliveries_total", (("outcome", "dead"),))] == 1
    assert got[("postback_affiliate_failures_total", (("affiliate", "bob"),))] == 3
    assert got[("postback_queue_depth", ())] == 1
    assert "postback_dead_letters" not in _names(got)
    assert "postback_retries_waiting" not in _names(got)


async def test_metrics_say_both_sources_are_up_when_they_are(api: Api) -> None:
    status, text = await api.call("GET", "/metrics", token=None)
    assert status == 200
    assert _source_up(_samples(text)) == {"redis": 1, "postgres": 1}


async def test_a_hung_source_costs_the_scrape_its_timeout_not_the_scrape(
    settings: Settings,
) -> None:
    """Redis and Postgres that take the connection and never answer: each read is given
    up after the timeout, and the scrape answers with both sources down."""

    async def never_answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read()

    async with raw_server(never_answer) as hung:
        address = URL(hung).authority
        redis = open_redis(f"redis://{address}/0", settings.queue_name)
        pool = await database.create_pool(f"postgresql://postgres@{address}/nope", 1, min_size=0)
        try:
            started = time.monotonic()
            text = await metrics.exposition(redis, pool, settings.queue_name, within=0.5)
            took = time.monotonic() - started
        finally:
            await redis.aclose()
            pool.terminate()
    assert took < 2
    got = _samples(text.decode())
    assert _source_up(got) == {"redis": 0, "postgres": 0}
    assert _names(got) == {"postback_source_up"}


async def test_openapi_lists_exactly_the_routes_the_service_has(settings: Settings) -> None:
    app = create_app(with_tokens(settings))
    served = {
        (route.method.lower(), route.resource.canonical)
        for route in app.router.routes()
        if route.resource is not None
        and route.method != "HEAD"
        and not route.resource.canonical.startswith("/page")
    }
    documented = {(method, path) for path, ops in document()["paths"].items() for method in ops}
    assert served == documented


async def test_the_page_and_its_files_are_served(api: Api) -> None:
    status, html = await api.call("GET", "/", token=None)
    assert status == 200
    assert "<title>postback relay" in html
    for asset in ("app.js", "overview.js", "style.css"):
        assert f"/page/{asset}" in html
        assert (await api.call("GET", f"/page/{asset}", token=None))[0] == 200


async def test_every_response_carries_the_security_headers(api: Api) -> None:
    """The page, its files, the API (answers and refusals) and the open endpoints alike."""
    expected = {
        "X-Content-Type-Options": "nosniff",
        "Referrer-Policy": "no-referrer",
    }
    for method, path, token in (
        ("GET", "/", None),
        ("GET", "/page/app.js", None),
        ("GET", "/page/favicon.svg", None),
        ("GET", "/healthz", None),
        ("GET", "/openapi.json", None),
        ("GET", "/v1/dead-letters", OPS_TOKEN),
        ("GET", "/v1/dead-letters", None),  # 401
        ("GET", "/no/such/path", None),  # 404
        ("DELETE", "/healthz", None),  # 405
    ):
        async with api.http.request(
            method,
            api.url + path,
            headers={"Authorization": f"Bearer {token}"} if token else {},
        ) as response:
            headers = response.headers
            assert {name: headers.get(name) for name in expected} == expected, path
            policy = dict(
                part.strip().split(" ", 1) for part in headers["Content-Security-Policy"].split(";")
            )
            # Only the service's own files; no framing; forms sent only by the script.
            assert policy == {
                "default-src": "'none'",
                "script-src": "'self'",
                "style-src": "'self'",
                "img-src": "'self'",
                "connect-src": "'self'",
                "form-action": "'none'",
                "base-uri": "'none'",
                "frame-ancestors": "'none'",
            }, path


async def test_concurrent_replays_of_one_dead_letter_replay_it_once(
    api: Api, db: asyncpg.Connection, flaky: Flaky, settings: Settings, producer: Producer
) -> None:
    await make_deliveries(db, producer, flaky, settings)
    [dead] = await listed(api, "/v1/dead-letters")
    path = f"/v1/dead-letters/{dead['id']}/replay"
    results = await asyncio.gather(*(api.call("POST", path) for _ in range(5)))
    assert sorted(status for status, _ in results) == [200, 409, 409, 409, 409]
    _, shown = await api.call("GET", f"/v1/deliveries/{dead['id']}")
    assert len(shown["actions"]) == 1


async def test_resend_sends_the_same_body_and_key_signed_afresh(
    api: Api, db: asyncpg.Connection, receiver: Receiver, settings: Settings
) -> None:
    no_retries = settings.model_copy(update={"retry_schedule": ""})
    secret = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
    await save_callback(db, "ann", "order.created", "POST", receiver.url + "/pb", secret)
    receiver.status = 503
    await ingest(api, event_data("resend"))
    await drain(no_retries)
    [dead] = await listed(api, "/v1/dead-letters")
    receiver.status = 200
    status, _ = await api.call(
        "POST", f"/v1/dead-letters/{dead['id']}/replay", json={"mode": "resend"}
    )
    assert status == 200
    await drain(no_retries)
    first, again = receiver.requests
    assert again.body == first.body  # byte for byte, key order included
    assert again.headers["Idempotency-Key"] == first.headers["Idempotency-Key"] == dead["id"]
    assert again.headers["webhook-id"] == first.headers["webhook-id"]
    timestamp = int(again.headers["webhook-timestamp"])
    assert again.headers["webhook-signature"] == sign.signature(
        secret, dead["id"], timestamp, again.body
    )


async def test_a_dead_letter_whose_stored_event_is_invalid_is_not_replayed(
    api: Api, db: asyncpg.Connection, flaky: Flaky, settings: Settings, producer: Producer
) -> None:
    await make_deliveries(db, producer, flaky, settings)
    [dead] = await listed(api, "/v1/dead-letters")
    # As a row from a version with other rules would be: the job would refuse it, and the
    # delivery would stay pending for ever.
    await db.execute(
        "UPDATE deliveries SET event = jsonb_set(event, '{order,currency}', '\"eur\"')"
        " WHERE id = $1",
        uuid.UUID(dead["id"]),
    )
    status, body = await api.call("POST", f"/v1/dead-letters/{dead['id']}/replay")
    assert status == 409
    assert "stored event is invalid" in body["error"]
    _, shown = await api.call("GET", f"/v1/deliveries/{dead['id']}")
    assert shown["state"] == "dead"


async def test_resend_is_refused_for_a_dead_letter_that_was_never_sent(
    api: Api, db: asyncpg.Connection, flaky: Flaky, settings: Settings, producer: Producer
) -> None:
    """Dead-lettered before any request, because its stored template no longer parses (a
    row written by hand): there is no request to resend. Re-rendered once the template is
    fixed, it is sent."""
    good = flaky.url + "/bob?o={{order.number}}"
    await save_callback(db, "bob", "order.created", "GET", good)
    await db.execute("UPDATE callbacks SET url_template = $1", flaky.url + "/bob?o={{order.numbr}}")
    await producer.publish(event_data("unsent", affiliate_id="bob"))
    await drain(settings)
    [dead] = await listed(api, "/v1/dead-letters")
    _, shown = await api.call("GET", f"/v1/deliveries/{dead['id']}")
    assert (shown["request"], shown["attempts"]) == (None, [])
    assert "stored template is invalid" in shown["reason"]
    assert flaky.paths == []

    path = f"/v1/dead-letters/{dead['id']}/replay"
    status, body = await api.call("POST", path, json={"mode": "resend"})
    assert (status, body["error"]) == (
        409,
        "not done: it was never sent, so there is no request to resend",
    )
    assert [d["id"] for d in await listed(api, "/v1/dead-letters")] == [dead["id"]]
    _, shown = await api.call("GET", f"/v1/deliveries/{dead['id']}")
    assert (shown["state"], shown["actions"]) == ("dead", [])

    assert (await api.call("PUT", "/v1/callbacks/bob/order.created", json={"url": good}))[0] == 200
    assert (await api.call("POST", path, json={"mode": "rerender"}))[0] == 200
    await drain(settings)
    assert flaky.paths == ["/bob?o=%231001"]


async def test_a_replay_with_redis_down_says_it_is_left_to_the_sweep(
    db: asyncpg.Connection, flaky: Flaky, settings: Settings, producer: Producer
) -> None:
    """The page words its message from `queued`: reopened, but not queued now."""
    await make_deliveries(db, producer, flaky, settings)
    gone = with_tokens(settings).model_copy(update={"redis_url": "redis://127.0.0.1:1/0"})
    async with running_service(gone) as down:
        [dead] = await listed(down, "/v1/dead-letters")
        status, body = await down.call("POST", f"/v1/dead-letters/{dead['id']}/replay")
        assert (status, body) == (
            200,
            {"delivery_id": dead["id"], "outcome": "replayed", "queued": False},
        )
        assert await listed(down, "/v1/dead-letters") == []


async def test_a_bulk_replay_with_redis_down_reopens_them_for_the_sweep(
    api: Api, db: asyncpg.Connection, flaky: Flaky, settings: Settings, producer: Producer
) -> None:
    """A service whose Redis is unreachable replays by filter: every match is reopened in
    the ledger, none is queued, and the sweep queues them all."""
    made = await make_deliveries(db, producer, flaky, settings, dead=3)
    gone = with_tokens(settings).model_copy(update={"redis_url": "redis://127.0.0.1:1/0"})
    with structlog.testing.capture_logs() as logs:
        async with running_service(gone) as down:
            status, summary = await down.call(
                "POST", "/v1/dead-letters/replay", json={"filter": {"affiliate": "bob"}}
            )
    assert (status, summary) == (
        200,
        {"matching": 3, "replayed": 3, "skipped": 0, "failed": 0, "problems": []},
    )
    # Redis was tried for the first one only; the rest were reopened in the ledger only.
    assert [e["event"] for e in logs if e["event"] == "replay_left_to_sweep"] == [
        "replay_left_to_sweep"
    ]
    bobs = await listed(api, "/v1/deliveries", affiliate="bob")
    assert sorted((d["event_id"], d["state"]) for d in bobs) == sorted(
        (bob, "pending") for bob in made.bobs
    )
    assert await listed(api, "/v1/dead-letters") == []
    assert await queued(producer) == 0

    flaky.fixed = True
    assert settings.database_url is not None
    pool = await database.create_pool(settings.database_url, 2)
    try:
        swept = await sweep(pool, producer.redis, settings.queue_name, settings.job_timeout)
    finally:
        await pool.close()
    assert swept == 3
    assert await queued(producer) == 3
    await drain(settings)
    delivered = await listed(api, "/v1/deliveries", affiliate="bob", state="delivered")
    assert sorted(d["event_id"] for d in delivered) == sorted(made.bobs)


async def test_bulk_replay_needs_a_filter_or_all(
    api: Api, db: asyncpg.Connection, flaky: Flaky, settings: Settings, producer: Producer
) -> None:
    await make_deliveries(db, producer, flaky, settings)
    bodies: list[dict[str, Any]] = [
        {},
        {"filter": {}},
        {"filter": {"affiliate": ""}},
        {"all": False},
    ]
    for body in bodies:
        status, refused = await api.call("POST", "/v1/dead-letters/replay", json=body)
        assert (status, refused["errors"][0]["field"]) == (422, "filter"), body
    assert len(await listed(api, "/v1/dead-letters")) == 1
    status, summary = await api.call("POST", "/v1/dead-letters/replay", json={"all": True})
    assert (status, summary["replayed"]) == (200, 1)


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b'{"filter": {"affiliate": "ann", "affiliate": "bob"}}', 'duplicate key "affiliate"'),
        (
            b'{"filter": {"affiliate": 0e1000000000000000000}}',
            "the number 0e1000000000000000000 is out of range",
        ),
        (b'{"filter": ' * 10_000 + b"{}" + b"}" * 10_000, "nested too deeply"),
    ],
    ids=["key-twice", "number-out-of-range", "too-deep"],
)
async def test_an_ops_body_the_reader_refuses_is_a_422_naming_why(
    api: Api,
    db: asyncpg.Connection,
    flaky: Flaky,
    settings: Settings,
    producer: Producer,
    body: bytes,
    message: str,
) -> None:
    await make_deliveries(db, producer, flaky, settings)
    status, refused = await api.call(
        "POST",
        "/v1/dead-letters/replay",
        data=body,
        headers={"Content-Type": "application/json"},
    )
    assert (status, refused) == (
        422,
        {"error": f"body: {message}", "errors": [{"field": "body", "message": message}]},
    )
    assert len(await listed(api, "/v1/dead-letters")) == 1  # nothing replayed


async def test_a_web_page_cannot_drive_the_api_from_a_browser(
    api: Api, db: asyncpg.Connection, flaky: Flaky, settings: Settings, producer: Producer
) -> None:
    await make_deliveries(db, producer, flaky, settings)
    [dead] = await listed(api, "/v1/dead-letters")
    path = f"/v1/dead-letters/{dead['id']}/replay"
    status, body = await api.call(
        "POST", path, data=b'{"mode": "rerender"}', headers={"Content-Type": "text/plain"}
    )
    assert status == 415
    assert "application/json" in body["error"]
    status, body = await api.call("POST", path, json={}, headers={"Origin": "https://evil.example"})
    assert (status, body["error"]) == (403, "cross-site request refused")
    assert len(await listed(api, "/v1/dead-letters")) == 1
    # The page itself, on the service's own origin, may.
    status, _ = await api.call("POST", path, json={}, headers={"Origin": api.url})
    assert status == 200


async def test_without_a_token_only_localhost_is_served(settings: Settings) -> None:
    async with running_service(settings, insecure=True) as api:
        status, _ = await api.call("GET", "/v1/callbacks", token=None)
        assert status == 200
        status, body = await api.call(
            "GET", "/v1/callbacks", token=None, headers={"Host": "rebound.example:8080"}
        )
        assert (status, body["error"]) == (
            403,
            "without a token, only requests to localhost are served",
        )
        status, _ = await api.call(
            "GET", "/v1/callbacks", token=None, headers={"Host": "localhost"}
        )
        assert status == 200


@pytest.mark.parametrize(
    ("query", "field"),
    [
        ({"affiliate": "a\x00b"}, "affiliate"),
        ({"since": "1000000d"}, "since"),
        ({"until": "0001-01-01T00:00:00+14:00"}, "until"),
        ({"since": "9999-12-31T23:59:59-14:00"}, "since"),
    ],
)
async def test_values_postgres_cannot_hold_are_refused_not_crashed_on(
    api: Api, query: dict[str, str], field: str
) -> None:
    status, body = await api.call("GET", "/v1/deliveries", params=query)
    assert (status, body["errors"][0]["field"]) == (422, field)


async def test_test_fires_say_they_are_tests(
    api: Api, db: asyncpg.Connection, flaky: Flaky
) -> None:
    await save_callback(db, "ann", "order.created", "POST", flaky.url + "/ann", "whsec_c2VjcmV0")
    _, fired = await api.call("POST", "/v1/callbacks/ann/order.created/test")
    headers = fired["request"]["headers"]
    assert headers["Idempotency-Key"].startswith("test-")
    assert headers["webhook-id"] == headers["Idempotency-Key"]  # signed, so it can be trusted


@pytest.mark.parametrize(
    ("headers", "status"),
    [
        ({"Origin": "http://[::1"}, 403),
        ({"Origin": "null"}, 403),
        ({"Authorization": "Bearer tökén-with-ümlauts-0123456789"}, 401),
    ],
    ids=["broken-origin", "null-origin", "non-ascii-token"],
)
async def test_odd_headers_are_refused_not_crashed_on(
    api: Api, headers: dict[str, str], status: int
) -> None:
    token = None if "Authorization" in headers else OPS_TOKEN
    got, body = await api.call(
        "POST", "/v1/dead-letters/replay", token=token, json={"all": True}, headers=headers
    )
    assert got == status, body


async def test_a_web_page_cannot_drive_an_insecure_service_either(settings: Settings) -> None:
    # No token stops a cross-site request here, so the Origin check must not wait for one.
    async with running_service(settings, insecure=True) as api:
        for headers in ({}, {"Content-Type": "text/plain"}):
            status, body = await api.call(
                "POST",
                "/v1/dead-letters/replay",
                token=None,
                data=b'{"all": true}',
                headers={
                    "Content-Type": "application/json",
                    **headers,
                    "Origin": "https://evil.example",
                },
            )
            assert (status, body["error"]) == (403, "cross-site request refused")


# --- any input on every route: no 5xx, and the token before anything else ---------------

HUGE_NUMBERS = ("0e1000000000000000000", "1e999999999999")
"""A number no Decimal holds, and one a Decimal holds but no field can take."""

_LEAF = "@leaf@"
"""Stands in a body built as Python data for raw JSON text put in its place."""


@dataclass(frozen=True)
class Operation:
    """An operation of the OpenAPI document, which lists exactly the service's routes
    (test_openapi_lists_exactly_the_routes_the_service_has): a new route is in here."""

    method: str
    path: str
    spec: dict[str, Any]

    def __str__(self) -> str:
        return f"{self.method} {self.path}"

    def parameters(self, where: str) -> list[dict[str, Any]]:
        return [p for p in self.spec.get("parameters", []) if p["in"] == where]

    def url(self, **given: str) -> str:
        values = {
            p["name"]: quote(given.get(p["name"], _example(p["schema"])), safe="")
            for p in self.parameters("path")
        }
        return self.path.format(**values)

    def body_schema(self) -> dict[str, Any] | None:
        body = self.spec.get("requestBody")
        return None if body is None else _resolved(body["content"]["application/json"]["schema"])


OPERATIONS = [
    Operation(method.upper(), path, spec)
    for path, operations in document()["paths"].items()
    for method, spec in operations.items()
]


def _resolved(schema: dict[str, Any]) -> dict[str, Any]:
    """The object a schema describes: its reference followed, and of alternatives (one
    event or an array; a value or null) the first."""
    if "$ref" in schema:
        return _resolved(document()["components"]["schemas"][schema["$ref"].rsplit("/", 1)[1]])
    if "anyOf" in schema:
        return _resolved(schema["anyOf"][0])
    return schema


def _example(schema: dict[str, Any]) -> str:
    """A plausible value, so that a request gets as far into its handler as it can."""
    if "enum" in schema:
        return str(schema["enum"][0])
    if schema.get("format") == "uuid":
        return str(uuid.uuid4())
    return "ann"


def _property_paths(schema: dict[str, Any], depth: int = 3) -> list[tuple[str, ...]]:
    """Every property of an object schema, and theirs, down to `depth`."""
    paths: list[tuple[str, ...]] = []
    for name, sub in _resolved(schema).get("properties", {}).items():
        paths.append((name,))
        if depth > 1:
            paths += [(name, *rest) for rest in _property_paths(sub, depth - 1)]
    return paths


def _body(schema: dict[str, Any], path: tuple[str, ...], leaf: str) -> bytes:
    """A JSON object with the schema's required properties, and raw JSON `leaf` at `path`."""
    properties = schema.get("properties", {})
    body: dict[str, Any] = {
        name: _example(_resolved(properties.get(name, {}))) for name in schema.get("required", ())
    }
    node = body
    for name in path[:-1]:
        node[name] = {}
        node = node[name]
    node[path[-1]] = _LEAF
    return json.dumps(body).replace(json.dumps(_LEAF), leaf).encode()


def _said(status: int, answer: Any) -> tuple[int, str]:
    """An answer's status and its most precise message: the first field's, if any."""
    if not isinstance(answer, dict):
        return status, str(answer)
    errors = answer.get("errors") or [{"message": answer.get("error", str(answer))}]
    return status, str(errors[0]["message"])


@pytest.mark.parametrize(
    "operation",
    [op for op in OPERATIONS if op.path.startswith("/v1/") and op.path != "/v1/events"],
    ids=str,
)
async def test_an_unknown_parameter_or_field_is_refused_naming_the_documented_ones(
    api: Api, db: asyncpg.Connection, operation: Operation
) -> None:
    """The handlers read with the models the document is made of: what one refuses as
    unknown, naming what it knows, is what the other lists."""
    documented = ", ".join(p["name"] for p in operation.parameters("query")) or "none"
    body = None if operation.method == "GET" else b"{}"
    status, answer = await api.call(
        operation.method,
        operation.url(),
        params={"colour": "red"},
        data=body,
        headers={"Content-Type": "application/json"},
    )
    message = f"unknown parameter; known: {documented}"
    assert (status, answer["errors"]) == (422, [{"field": "colour", "message": message}])

    schema = operation.body_schema()
    if schema is None:
        return
    status, answer = await api.call(
        operation.method,
        operation.url(),
        data=_body(schema, ("colour",), '"red"'),
        headers={"Content-Type": "application/json"},
    )
    message = f"unknown field; known: {', '.join(schema['properties'])}"
    assert status == 422
    assert {"field": "colour", "message": message} in answer["errors"]  # with what is missing


def _duplicated(key: str) -> str:
    """A leaf that gives its key twice: `"k": "1", "k": "2"` once put after `"k": `."""
    return f'"1", {json.dumps(key)}: "2"'


@pytest.mark.parametrize("operation", OPERATIONS, ids=str)
@pytest.mark.parametrize("tokens", [True, False], ids=["tokens", "insecure"])
async def test_no_input_gets_a_5xx_and_without_the_token_only_a_401(
    settings: Settings,
    db: asyncpg.Connection,
    producer: Producer,
    operation: Operation,
    tokens: bool,
) -> None:
    # The routes with a callback in their path find one, and go as deep as input allows.
    await save_callback(db, "ann", "order.created", "GET", "http://127.0.0.1:1/pb")
    token = None
    if tokens:
        token = INGEST_TOKEN if operation.path == "/v1/events" else OPS_TOKEN
    guarded = "security" in operation.spec
    changes = operation.method != "GET"  # must send JSON, and not cross-site
    schema = operation.body_schema()
    body_paths = [("x",)] if schema is None else _property_paths(schema)
    answers: dict[str, tuple[int, Any]] = {}
    expected: dict[str, tuple[int, str]] = {}

    with structlog.testing.capture_logs() as logs:
        service = with_tokens(settings) if tokens else settings
        async with running_service(service, insecure=not tokens) as api:

            async def send(
                label: str,
                *,
                path: str | None = None,
                body: bytes | None = None,
                content_type: str = "application/json",
                headers: dict[str, str] | None = None,
                **kwargs: Any,
            ) -> None:
                answers[label] = await api.call(
                    operation.method,
                    path or operation.url(),
                    token=kwargs.pop("token", token),
                    data=body,
                    headers={"Content-Type": content_type, **(headers or {})},
                    **kwargs,
                )

            for number in HUGE_NUMBERS:
                for param in [*operation.parameters("query"), {"name": "x"}]:
                    await send(f"query {param['name']}={number}", params={param["name"]: number})
                for param in operation.parameters("path"):
                    given = {param["name"]: number}
                    await send(f"path {param['name']}={number}", path=operation.url(**given))
                for where in body_paths:
                    body = _body(schema or {}, where, number)
                    await send(f"body {'.'.join(where)}: {number}", body=body)

            for where in body_paths:
                label = f"body {'.'.join(where)} twice"
                await send(label, body=_body(schema or {}, where, _duplicated(where[-1])))
                if schema is not None:
                    expected[label] = (422, f'duplicate key "{where[-1]}"')

            await send("text/plain", body=b"{}", content_type="text/plain")
            if changes:
                expected["text/plain"] = (
                    415,
                    "send the body as JSON (Content-Type: application/json)",
                )

            # Everything wrong at once but the token: the answer is about the token.
            hostile = _body(schema or {}, body_paths[0], _duplicated(body_paths[0][-1]))
            for label, authorization, refusal in (
                ("no token", {}, "missing bearer token (Authorization: Bearer TOKEN)"),
                ("wrong token", {"Authorization": "Bearer wrong-token-01234"}, "wrong token"),
            ):
                await send(
                    label,
                    token=None,
                    body=hostile,
                    content_type="text/plain",
                    params={"limit": HUGE_NUMBERS[0]},
                    headers={"Origin": "https://evil.example", **authorization},
                )
                if guarded and tokens:
                    expected[label] = (401, refusal)
                elif guarded and changes:  # --insecure: no token stops a web page, this does
                    expected[label] = (403, "cross-site request refused")

    # /healthz answers 503 by design: no worker runs here.
    crashed = {
        label: status
        for label, (status, _) in answers.items()
        if status >= 500 and operation.path != "/healthz"
    }
    assert crashed == {}
    assert {label: _said(*answers[label]) for label in expected} == expected
    assert [entry for entry in logs if entry["event"] == "request_crashed"] == []
    if not tokens:  # the capture does see what the service logs
        assert any(entry["event"] == "serving_without_token" for entry in logs)
