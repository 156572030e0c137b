"""Erasure: `postback deliveries erase --affiliate A` and `POST /v1/affiliates/A/erase`
remove the affiliate's settled deliveries (their attempts and actions with them) and its
test fires, keep its open deliveries and everything of every other affiliate, and record
one `erase` action that holds counts, never the erased data."""

from __future__ import annotations

import json
import os
import re
import subprocess
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg
import pytest
import redis.asyncio

from ops.actions import erase
from producer import Producer, record
from producer.event import parse_event
from tests.support.cli import POSTBACK, Postback, postback_env, refusal, succeeded
from tests.support.demo import read_until
from tests.support.events import event_data, save_callback
from tests.support.ledger import add_delivery, make_deliveries
from tests.support.receivers import Flaky
from tests.support.servers import RUN
from tests.support.service import Api
from worker.config import Settings

HOUR = timedelta(hours=1)


@dataclass
class Affiliate:
    """What a test stored of one affiliate: the text an erase must leave nowhere."""

    name: str
    event_ids: dict[str, str] = field(default_factory=dict)
    """State -> the event id of its delivery in that state."""
    secrets: list[str] = field(default_factory=list)
    """Its order numbers and the URLs its requests went to."""


async def stored(db: asyncpg.Connection, who: str, state: str, tries: int, order: str) -> str:
    """A delivery of `who` in `state` with `tries` attempts, each with the request it sent
    and the answer got, and its order number `order`; its event id."""
    event_id = await add_delivery(db, who, state, HOUR, [10.0] * tries, order=order)
    request: dict[str, Any] = {
        "method": "GET",
        "url": f"https://{who}-tracker.example/pb?o={order}",
        "headers": {},
        "body": None,
    }
    await db.execute(
        """
        UPDATE attempts a
        SET request = $2, response_excerpt = 'ok ' || d.order_number,
            response_headers = '{"Server": "t"}'
        FROM deliveries d WHERE d.id = a.delivery_id AND d.event_id = $1
        """,
        event_id,
        request,
    )
    await db.execute(
        "UPDATE deliveries SET request = $2 WHERE event_id = $1 AND $3",
        event_id,
        request,
        tries > 0,
    )
    return event_id


async def act(db: asyncpg.Connection, event_id: str, action: str) -> None:
    """An ops action on the delivery, whose note names its order, as a person's would."""
    await db.execute(
        """
        INSERT INTO actions (delivery_id, action, mode, actor, note, attempt)
        SELECT id, $2, CASE WHEN $2 = 'replay' THEN 'rerender' END, 'ops',
               'about order ' || order_number, greatest(attempts, 1)
        FROM deliveries WHERE event_id = $1
        """,
        event_id,
        action,
    )


async def add_test_fire(db: asyncpg.Connection, who: str, order: str) -> None:
    await db.execute(
        """
        INSERT INTO test_fires (callback_id, affiliate_id, event_type, actor, request,
                                duration_ms, status_code)
        VALUES (1, $1, 'order.created', 'ops', $2, 5.0, 200)
        """,
        who,
        {"method": "GET", "url": f"https://{who}-tracker.example/test?o={order}", "headers": {}},
    )


async def fill(db: asyncpg.Connection, who: str) -> Affiliate:
    """One delivery of `who` in each state a ledger holds with attempts, a replay and a
    discard recorded on two of them, and two test fires."""
    made = Affiliate(who)
    tries = {"delivered": 2, "dead": 3, "discarded": 1, "skipped": 0, "pending": 0, "retrying": 1}
    for n, (state, count) in enumerate(tries.items()):
        order = f"#{who.upper()}-{1001 + n}"
        made.event_ids[state] = await stored(db, who, state, count, order)
        made.secrets += [order, f"{who}-tracker.example"]
    await act(db, made.event_ids["dead"], "replay")
    await act(db, made.event_ids["discarded"], "discard")
    for n in range(2):
        await add_test_fire(db, who, f"#{who.upper()}-T{n}")
    return made


async def ledger(db: asyncpg.Connection) -> dict[str, Any]:
    """Every row an erase may touch, by table."""
    return {
        table: [dict(row) for row in await db.fetch(f"SELECT * FROM {table} ORDER BY id")]  # noqa: S608
        for table in ("deliveries", "attempts", "actions", "test_fires")
    }


async def left_of(db: asyncpg.Connection, who: str) -> dict[str, int]:
    """How many rows of each kind are stored for `who`."""
    row = await db.fetchrow(
        """
        SELECT (SELECT count(*) FROM deliveries WHERE affiliate_id = $1) AS deliveries,
               (SELECT count(*) FROM attempts a JOIN deliveries d ON d.id = a.delivery_id
                WHERE d.affiliate_id = $1) AS attempts,
               (SELECT count(*) FROM actions a JOIN deliveries d ON d.id = a.delivery_id
                WHERE d.affiliate_id = $1) AS actions,
               (SELECT count(*) FROM test_fires WHERE affiliate_id = $1) AS test_fires
        """,
        who,
    )
    assert row is not None
    return dict(row)


async def erase_records(db: asyncpg.Connection) -> list[dict[str, Any]]:
    return [dict(r) for r in await db.fetch("SELECT * FROM actions WHERE action = 'erase'")]


def shows_none_of(text: str, affiliate: Affiliate) -> None:
    for secret in [*affiliate.secrets, *affiliate.event_ids.values()]:
        assert secret not in text, secret


ANNS_COUNTS = {"deliveries": 4, "attempts": 6, "test_fires": 2, "kept_open": 2}
"""What an erase of `fill(db, "ann")` takes and keeps: delivered (2 attempts), dead (3),
discarded (1) and skipped (0) go; pending and retrying stay."""


# --- the erase ---------------------------------------------------------------------------


async def test_an_erase_takes_the_affiliates_settled_rows_and_nothing_else(
    db: asyncpg.Connection,
) -> None:
    ann = await fill(db, "ann")
    bob = await fill(db, "bob")
    bobs_before = await left_of(db, "bob")
    seen: list[int] = []

    # Batches of 2: pages that keep an open delivery, and pages past them.
    erased = await erase.erase(
        db, "ann", "ops@desk", "ann asked", batch=2, rest=0, progress=lambda e: seen.append(e.rows)
    )

    assert erased.detail() == ANNS_COUNTS
    assert seen
    assert seen == sorted(seen)
    assert seen[-1] <= 6
    assert await left_of(db, "ann") == {
        "deliveries": 2,
        "attempts": 1,  # the retrying one's
        "actions": 0,
        "test_fires": 0,
    }
    states = {
        r["state"]
        for r in await db.fetch("SELECT state FROM deliveries WHERE affiliate_id = 'ann'")
    }
    assert states == {"pending", "retrying"}
    assert await left_of(db, "bob") == bobs_before
    [record] = await erase_records(db)
    assert record["id"] == erased.action_id
    assert (record["affiliate_id"], record["actor"], record["note"]) == (
        "ann",
        "ops@desk",
        "ann asked",
    )
    assert record["detail"] == ANNS_COUNTS
    assert (record["delivery_id"], record["event_type"]) == (None, None)
    # What stays of ann's settled deliveries: nothing anywhere but her open ones.
    everything = json.dumps(await ledger(db), default=str)
    for state in ("delivered", "dead", "discarded", "skipped"):
        assert ann.event_ids[state] not in everything
    for gone in ("#ANN-1001", "#ANN-1002", "#ANN-1003", "#ANN-1004", "#ANN-T0", "#ANN-T1"):
        assert gone not in everything
    shows_none_of(json.dumps(record, default=str), ann)
    assert bob.event_ids["delivered"] in everything


async def test_an_event_accepted_and_not_yet_taken_is_kept(db: asyncpg.Connection) -> None:
    await fill(db, "ann")
    accepted = parse_event(event_data("ann-accepted", affiliate_id="ann"))
    assert await record.record(db, [record.stamped(accepted, datetime.now(UTC))]) == [True]

    erased = await erase.erase(db, "ann", "ops", rest=0)

    assert erased.kept_open == 3  # pending, retrying and the accepted one
    assert (
        await db.fetchval("SELECT state FROM deliveries WHERE event_id = $1", accepted.id)
        == "accepted"
    )


async def test_a_dry_run_changes_nothing_and_counts_what_the_erase_then_takes(
    db: asyncpg.Connection,
) -> None:
    await fill(db, "ann")
    await fill(db, "bob")
    before = await ledger(db)

    counted = await erase.count(db, "ann")

    assert await ledger(db) == before
    assert counted.action_id is None
    assert (await erase.erase(db, "ann", "ops", rest=0)).detail() == counted.detail()


async def test_a_delivery_that_is_reopened_is_kept(db: asyncpg.Connection) -> None:
    ann = await fill(db, "ann")
    await db.execute(
        "UPDATE deliveries SET state = 'pending' WHERE event_id = $1", ann.event_ids["dead"]
    )

    erased = await erase.erase(db, "ann", "ops", rest=0)

    assert (erased.deliveries, erased.kept_open) == (3, 3)


class CutShort(Exception):
    """The erase's process ended between two batches."""


def cut_short(_: erase.Erased) -> None:
    raise CutShort


async def test_an_erase_cut_short_says_what_went_and_run_again_takes_the_rest(
    db: asyncpg.Connection,
) -> None:
    await fill(db, "ann")

    with pytest.raises(CutShort):
        await erase.erase(db, "ann", "ops", batch=2, rest=0, progress=cut_short)
    await erase.erase(db, "ann", "ops", batch=2, rest=0)

    # The first page was ann's delivered and dead deliveries, with 2 and 3 attempts.
    assert [r["detail"] for r in await erase_records(db)] == [
        {"deliveries": 2, "attempts": 5, "test_fires": 0, "kept_open": 0},
        {"deliveries": 2, "attempts": 1, "test_fires": 2, "kept_open": 2},
    ]
    assert await left_of(db, "ann") == {
        "deliveries": 2,
        "attempts": 1,
        "actions": 0,
        "test_fires": 0,
    }


async def test_an_affiliate_with_only_open_deliveries_is_recorded_with_none_erased(
    db: asyncpg.Connection,
) -> None:
    await stored(db, "cid", "retrying", 1, "#C-1")

    erased = await erase.erase(db, "cid", "ops", rest=0)

    assert erased.detail() == {"deliveries": 0, "attempts": 0, "test_fires": 0, "kept_open": 1}
    assert [r["detail"] for r in await erase_records(db)] == [erased.detail()]


async def test_the_store_wide_key_and_an_affiliate_with_nothing_stored_are_refused(
    db: asyncpg.Connection,
) -> None:
    await fill(db, "ann")
    with pytest.raises(erase.NotErasable, match="names the store-wide callback"):
        await erase.erase(db, "*", "ops")
    with pytest.raises(erase.NothingStored, match=r"affiliate Ann$"):
        await erase.erase(db, "Ann", "ops")
    assert await erase_records(db) == []


async def test_a_test_fire_of_the_store_wide_callback_with_an_affiliates_event_is_theirs(
    db: asyncpg.Connection, api: Api, flaky: Flaky
) -> None:
    await fill(db, "ann")
    await save_callback(db, "*", "order.created", "GET", flaky.url + "/store?a={{affiliate.id}}")
    fired = []
    for event in (event_data("ann-fired", affiliate_id="ann"), None):  # ann's, then a sample
        status, body = await api.call(
            "POST", "/v1/callbacks/%2A/order.created/test", json={"event": event}
        )
        assert status == 200, body
        fired.append(body["id"])

    await erase.erase(db, "ann", "ops", rest=0)

    kept = await db.fetch("SELECT id, affiliate_id FROM test_fires ORDER BY id")
    assert [(r["id"], r["affiliate_id"]) for r in kept if r["id"] in fired] == [
        (fired[1], "sample-affiliate")
    ]


async def test_redis_holds_nothing_of_a_settled_delivery(
    db: asyncpg.Connection, producer: Producer, flaky: Flaky, settings: Settings
) -> None:
    made = await make_deliveries(db, producer, flaky, settings)
    ann = [made.ann, made.ann_update]

    await erase.erase(db, "ann", "ops", rest=0)

    assert await db.fetch("SELECT 1 FROM deliveries WHERE event_id = ANY($1::text[])", ann) == []
    # Its callbacks are configuration, and stay.
    assert await db.fetchval("SELECT count(*) FROM callbacks WHERE affiliate_id = 'ann'") == 2
    assert settings.redis_url is not None
    client = redis.asyncio.Redis.from_url(settings.redis_url, decode_responses=True)
    try:
        keys = [key async for key in client.scan_iter(match=f"*{RUN}*")]
        assert keys  # the queue's metrics at least: the search looks where the run writes
        for key in keys:
            kind = await client.type(key)
            if kind == "string":
                value: object = await client.get(key)
            elif kind == "hash":
                value = await client.hgetall(key)
            elif kind == "zset":
                value = await client.zrange(key, 0, -1)
            elif kind == "list":
                value = await client.lrange(key, 0, -1)
            else:
                value = await client.smembers(key)
            for event_id in ann:
                assert event_id not in f"{key} {value}", key
    finally:
        await client.aclose()


# --- the actions listing ---------------------------------------------------------------------


async def test_an_affiliates_actions_list_its_erases_newest_first(db: asyncpg.Connection) -> None:
    await fill(db, "ann")
    first = await erase.erase(db, "ann", "ops", "first", rest=0)
    await stored(db, "ann", "dead", 1, "#ANN-2")
    second = await erase.erase(db, "ann", "ops", rest=0)

    callback = await save_callback(db, "ann", "order.updated", "GET", "http://127.0.0.1:9/pb")
    await db.execute(
        "SELECT postback_disable_callback($1, 'relay', 'HTTP 410', NULL, false)", callback.id
    )
    await db.execute("SELECT postback_enable_callback($1, 'ops', 'fixed')", callback.id)

    listed = await erase.affiliate_actions(db, "ann")

    assert [(a["action"], a["note"], a["event_type"]) for a in listed] == [
        ("enable", "fixed", "order.updated"),
        ("disable", "HTTP 410", "order.updated"),
        ("erase", None, None),
        ("erase", "first", None),
    ]
    assert [a["detail"] for a in listed[2:]] == [
        {"deliveries": 1, "attempts": 1, "test_fires": 0, "kept_open": 2},
        ANNS_COUNTS,
    ]
    assert [a["id"] for a in listed[2:]] == [second.action_id, first.action_id]
    assert await erase.affiliate_actions(db, "bob") == []


async def test_an_affiliates_actions_are_its_newest_50(db: asyncpg.Connection) -> None:
    await db.execute(
        """
        INSERT INTO actions (action, actor, affiliate_id)
        SELECT 'enable', 'ops ' || n, 'ann' FROM generate_series(1, 51) n
        """
    )

    listed = await erase.affiliate_actions(db, "ann")

    assert [a["actor"] for a in listed] == [f"ops {n}" for n in range(51, 1, -1)]


# --- postback deliveries erase ---------------------------------------------------------------


@pytest.fixture
def postback(settings: Settings, tmp_path: Path) -> Postback:
    return Postback(postback_env(settings), tmp_path)


async def test_the_cli_dry_run_says_what_would_go_and_changes_nothing(
    db: asyncpg.Connection, postback: Postback
) -> None:
    await fill(db, "ann")
    before = await ledger(db)

    out = succeeded(postback("deliveries", "erase", "--affiliate", "ann", "--dry-run"))

    assert out.splitlines() == [
        "would erase 4 deliveries (with 6 attempts and the actions on them) and 2 test fires "
        "of affiliate ann",
        "would keep 2 open deliveries (accepted, pending or retrying), whose jobs would write them "
        "again: run the erase again once they have settled; disabling the affiliate's "
        "callbacks settles them when next due",
    ]
    assert await ledger(db) == before


async def test_the_cli_asks_first_and_without_a_terminal_refuses(
    db: asyncpg.Connection, postback: Postback
) -> None:
    await fill(db, "ann")
    before = await ledger(db)

    line = refusal(postback("deliveries", "erase", "--affiliate", "ann"))

    assert line == (
        "postback: error: erasing cannot be undone, and stdin is not a terminal to ask on: "
        "add --yes to erase, or --dry-run to count what would go"
    )
    assert await ledger(db) == before


async def test_the_cli_erases_with_yes_and_says_the_action_it_recorded(
    db: asyncpg.Connection, postback: Postback
) -> None:
    ann = await fill(db, "ann")

    result = postback(
        "deliveries",
        "erase",
        "--affiliate",
        "ann",
        "--yes",
        "--note",
        "GDPR request 7",
        "--actor",
        "dpo",
    )

    [record] = await erase_records(db)
    assert succeeded(result).splitlines()[0] == (
        "erased 4 deliveries (with 6 attempts and the actions on them) and 2 test fires of "
        f"affiliate ann; recorded as action {record['id']}"
    )
    assert "kept 2 open deliveries" in result.stdout
    assert result.stderr.splitlines()[-1] == "erasing: 6/6", result.stderr  # not a terminal
    assert (record["actor"], record["note"], record["detail"]) == (
        "dpo",
        "GDPR request 7",
        ANNS_COUNTS,
    )
    listed = succeeded(postback("actions", "--affiliate", "ann"))
    assert re.search(
        rf"^{record['id']} .* erase +dpo +deliveries=4 attempts=6 test_fires=2 kept_open=2 +"
        "GDPR request 7$",
        listed,
        re.M,
    ), listed
    shows_none_of(listed, ann)
    assert (
        json.loads(succeeded(postback("actions", "--affiliate", "ann", "--json")))["items"][0][
            "detail"
        ]
        == ANNS_COUNTS
    )


async def test_the_cli_erases_once_confirmed_on_a_terminal(
    db: asyncpg.Connection, postback: Postback
) -> None:
    await fill(db, "ann")
    code, asked, out = on_a_terminal(postback, "y\n", "deliveries", "erase", "--affiliate", "ann")

    assert code == 0, asked
    assert asked.startswith(
        "erase 4 deliveries (with 6 attempts and the actions on them) and 2 test fires of "
        "affiliate ann? This cannot be undone. [y/N] "
    ), asked
    assert f"\rerasing [{'#' * 30}] 6/6\r\n" in asked  # the terminal turns \n into \r\n
    assert out.startswith("erased 4 deliveries")
    assert (await left_of(db, "ann"))["deliveries"] == 2


async def test_the_cli_erases_nothing_unless_confirmed(
    db: asyncpg.Connection, postback: Postback
) -> None:
    await fill(db, "ann")
    before = await ledger(db)

    code, asked, _ = on_a_terminal(postback, "\n", "deliveries", "erase", "--affiliate", "ann")

    assert code == 2
    assert asked.endswith("postback: error: nothing erased: not confirmed\r\n"), asked
    assert await ledger(db) == before


def on_a_terminal(postback: Postback, answer: str, *args: str) -> tuple[int, str, str]:
    """`postback ARGS` with stdin and stderr a terminal (a pty), typing `answer`: its exit
    code, what it wrote on the terminal, and its stdout."""
    main, other = os.openpty()
    process = subprocess.Popen(
        [*POSTBACK, *args],
        env=dict(postback.env),
        cwd=postback.cwd,
        stdin=other,
        stdout=subprocess.PIPE,
        stderr=other,
        text=True,
    )
    os.close(other)
    try:
        os.write(main, answer.encode())
        written = read_until(main, None, time.monotonic() + 60)
    finally:
        os.close(main)
    out, _ = process.communicate(timeout=60)
    return process.returncode, written.replace(answer.replace("\n", "\r\n"), "", 1), out


@pytest.mark.parametrize(
    ("affiliate", "message"),
    [
        (
            "*",
            "postback: error: --affiliate: '*' names the store-wide callback, not an "
            "affiliate: deliveries and test fires are stored under the affiliate each event "
            "was for; erase that one",
        ),
        ("zed", "postback: error: no deliveries or test fires are stored for affiliate zed"),
    ],
)
async def test_the_cli_refuses_the_store_wide_key_and_an_unknown_affiliate(
    db: asyncpg.Connection, postback: Postback, affiliate: str, message: str
) -> None:
    assert refusal(postback("deliveries", "erase", "--affiliate", affiliate, "--yes")) == message


# --- POST /v1/affiliates/{affiliate}/erase ---------------------------------------------------


async def test_the_api_erases_with_the_ops_token_and_refuses_without(
    db: asyncpg.Connection, api: Api
) -> None:
    ann = await fill(db, "ann")
    before = await ledger(db)

    assert (await api.call("POST", "/v1/affiliates/ann/erase", token=None))[0] == 401
    status, dry = await api.call("POST", "/v1/affiliates/ann/erase", json={"dry_run": True})
    assert (status, dry) == (200, ANNS_COUNTS | {"action_id": None, "dry_run": True})
    assert await ledger(db) == before

    status, done = await api.call(
        "POST", "/v1/affiliates/ann/erase", json={"note": "asked by mail", "actor": "dpo"}
    )

    [record] = await erase_records(db)
    assert (status, done) == (200, ANNS_COUNTS | {"action_id": record["id"], "dry_run": False})
    assert (record["actor"], record["note"]) == ("dpo", "asked by mail")
    status, listed = await api.call("GET", "/v1/affiliates/ann/actions")
    assert status == 200
    assert [(a["id"], a["action"], a["detail"]) for a in listed["items"]] == [
        (record["id"], "erase", ANNS_COUNTS)
    ]
    shows_none_of(json.dumps(listed), ann)


async def test_the_api_lists_the_store_wide_callbacks_actions_under_its_key(
    db: asyncpg.Connection, api: Api
) -> None:
    callback = await save_callback(db, "*", "order.created", "GET", "http://127.0.0.1:9/pb")
    await db.execute(
        "SELECT postback_disable_callback($1, 'ops', 'moving trackers', NULL, false)", callback.id
    )

    status, listed = await api.call("GET", "/v1/affiliates/%2A/actions")

    assert status == 200
    assert [(a["action"], a["note"], a["callback_id"]) for a in listed["items"]] == [
        ("disable", "moving trackers", callback.id)
    ]


async def test_the_api_refuses_the_store_wide_key_and_an_unknown_affiliate(
    db: asyncpg.Connection, api: Api
) -> None:
    status, body = await api.call("POST", "/v1/affiliates/%2A/erase")
    assert status == 422
    assert body["errors"][0]["field"] == "affiliate"
    assert "names the store-wide callback" in body["errors"][0]["message"]

    status, body = await api.call("POST", "/v1/affiliates/zed/erase", json={"dry_run": True})
    assert (status, body) == (
        404,
        {"error": "no deliveries or test fires are stored for affiliate zed"},
    )
