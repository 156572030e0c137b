"""A callback whose deliveries keep dying is disabled, visibly, and enabled again in one step.

End to end with a worker and a real receiver: deliveries that die in a row, the first long
enough ago (POSTBACK_AUTO_DISABLE_AFTER, _SPAN), disable their callback as the relay's
doing, recorded and notified; a delivered one in between starts the count again; a 410
disables at once, recorded the same way. Enabling it from the CLI or the API, with
`--replay` / `"replay": true`, records who did it and sends its dead letters again. Then the
ledger's statement itself: batches for two callbacks recorded concurrently, in opposite
orders, never deadlock and count every death.
"""

from __future__ import annotations

import asyncio
import json
import random
from datetime import UTC, datetime, timedelta
from pathlib import Path

import asyncpg
import pytest

from ops.actions import switch
from producer import Producer
from producer.event import Event, parse_event
from tests.support.cli import Postback, postback_env, refusal, succeeded
from tests.support.events import event_data, events, publish, save_callback
from tests.support.receivers import Flaky, Receiver
from tests.support.service import Api
from tests.support.workers import drain
from worker import database, ledger
from worker.config import Settings
from worker.deliver import delivery_id
from worker.exchange import Outcome, Request
from worker.retry import Verdict

AFTER = 3


def _rule(settings: Settings, after: int = AFTER, span: str = "0") -> Settings:
    """The run's settings with the auto-disable rule given, validated as a worker would."""
    return Settings(
        **{**settings.model_dump(), "auto_disable_after": after, "auto_disable_span": span}
    )


@pytest.fixture
def postback(settings: Settings, tmp_path: Path) -> Postback:
    return Postback(postback_env(settings), tmp_path)


async def _callback(db: asyncpg.Connection) -> asyncpg.Record:
    row = await db.fetchrow("SELECT * FROM callbacks WHERE affiliate_id = 'ann'")
    assert row is not None
    return row


async def _callback_actions(db: asyncpg.Connection) -> list[asyncpg.Record]:
    return list(
        await db.fetch(
            "SELECT action, actor, note, callback_id, detail FROM actions"
            " WHERE delivery_id IS NULL ORDER BY id"
        )
    )


async def _streak(db: asyncpg.Connection, callback_id: int) -> int:
    found = await db.fetchval(
        "SELECT dead_streak FROM callback_health WHERE callback_id = $1", callback_id
    )
    return int(found or 0)


async def _states(db: asyncpg.Connection, ids: list[str]) -> list[tuple[str, str | None]]:
    rows = await db.fetch(
        "SELECT state, reason FROM deliveries WHERE event_id = ANY($1::text[]) ORDER BY event_id",
        ids,
    )
    return [(row["state"], row["reason"]) for row in rows]


async def _disabled_by_its_deaths(
    db: asyncpg.Connection, producer: Producer, settings: Settings, receiver: Receiver
) -> tuple[int, list[str]]:
    """ann's callback to a receiver answering 500, disabled by AFTER deliveries that died;
    its id and their event ids."""
    receiver.status = 500
    saved = await save_callback(db, "ann", "order.created", "GET", receiver.url + "/pb")
    dead = await publish(producer, events("dies", AFTER))
    await drain(_rule(settings))
    assert await _states(db, dead) == [("dead", "gave up after 3 attempts, last: HTTP 500")] * AFTER
    return saved.id, dead


# --- the relay disables --------------------------------------------------------------------


async def test_deliveries_dying_in_a_row_disable_the_callback_recorded_and_notified(
    db: asyncpg.Connection, producer: Producer, settings: Settings, receiver: Receiver
) -> None:
    callback_id, _ = await _disabled_by_its_deaths(db, producer, settings, receiver)

    assert (await _callback(db))["enabled"] is False
    [action] = await _callback_actions(db)
    assert (action["action"], action["actor"], action["callback_id"]) == (
        "disable",
        "relay",
        callback_id,
    )
    assert action["note"].startswith(f"{AFTER} deliveries in a row died since ")
    assert action["note"].endswith("; the last: gave up after 3 attempts, last: HTTP 500")
    assert action["detail"]["dead_streak"] == AFTER
    [notice] = await db.fetch("SELECT cause, kind, text FROM notifications")
    assert (notice["cause"], notice["kind"]) == (
        f"callback_disabled:{callback_id}",
        "callback_disabled",
    )
    assert notice["text"].startswith("Postback callback ann order.created was disabled by relay: ")

    # Later events for it are skipped, never sent.
    sent = len(receiver.requests)
    later = await publish(producer, events("later", 2))
    await drain(_rule(settings))
    assert await _states(db, later) == [("skipped", "callback disabled")] * 2
    assert len(receiver.requests) == sent


async def test_a_streak_younger_than_the_span_does_not_disable(
    db: asyncpg.Connection, producer: Producer, settings: Settings, receiver: Receiver
) -> None:
    receiver.status = 500
    saved = await save_callback(db, "ann", "order.created", "GET", receiver.url + "/pb")
    await publish(producer, events("burst", AFTER + 1))
    await drain(_rule(settings, span="1h"))

    assert (await _callback(db))["enabled"] is True
    assert await _streak(db, saved.id) == AFTER + 1
    assert await _callback_actions(db) == []

    # The same streak, its first death two hours old: the next death disables it.
    await db.execute("UPDATE callback_health SET first_dead_at = now() - interval '2 hours'")
    await publish(producer, events("old", 1))
    await drain(_rule(settings, span="1h"))
    assert (await _callback(db))["enabled"] is False
    [action] = await _callback_actions(db)
    assert action["note"].startswith(f"{AFTER + 2} deliveries in a row died since ")
    first = datetime.fromisoformat(action["detail"]["first_dead_at"])
    assert first < datetime.now(UTC) - timedelta(minutes=119)


async def test_a_delivered_delivery_starts_the_count_again(
    db: asyncpg.Connection, producer: Producer, settings: Settings, flaky: Flaky
) -> None:
    saved = await save_callback(db, "ann", "order.created", "GET", flaky.url + "/fail")
    await publish(producer, events("one", AFTER - 1))
    await drain(_rule(settings))
    assert await _streak(db, saved.id) == AFTER - 1

    flaky.fixed = True
    [delivered] = await publish(producer, events("two", 1))
    await drain(_rule(settings))
    assert await _states(db, [delivered]) == [("delivered", None)]
    assert await _streak(db, saved.id) == 0

    flaky.fixed = False
    await publish(producer, events("three", AFTER - 1))
    await drain(_rule(settings))
    # 2 + 2 died, but not in a row: still enabled.
    assert await _streak(db, saved.id) == AFTER - 1
    assert (await _callback(db))["enabled"] is True


async def test_a_410_records_a_disable_by_the_relay(
    db: asyncpg.Connection, producer: Producer, settings: Settings, receiver: Receiver
) -> None:
    receiver.status = 410
    saved = await save_callback(db, "ann", "order.created", "GET", receiver.url + "/gone")
    await publish(producer, events("gone", 1))
    await drain(settings)

    assert (await _callback(db))["enabled"] is False
    [action] = await _callback_actions(db)
    assert (action["action"], action["actor"], action["note"]) == (
        "disable",
        "relay",
        "HTTP 410: callback disabled",
    )
    assert action["detail"] == {"status_code": 410}
    causes = await db.fetch("SELECT cause FROM notifications")
    assert [row["cause"] for row in causes] == [f"callback_disabled:{saved.id}"]


# --- what ops see, and enabling with a replay ------------------------------------------------


async def test_cli_lists_who_disabled_it_and_enable_replay_sends_its_dead_letters(
    db: asyncpg.Connection,
    producer: Producer,
    settings: Settings,
    receiver: Receiver,
    postback: Postback,
) -> None:
    callback_id, dead = await _disabled_by_its_deaths(db, producer, settings, receiver)

    listed = succeeded(postback("callbacks", "list")).splitlines()
    assert listed[0].split()[7:] == ["STREAK", "URL"]
    assert listed[1].split()[3] == "no"  # ENABLED
    assert listed[1].split()[7] == str(AFTER)
    assert listed[2].startswith("ann order.created: disabled by relay at ")
    assert f"{AFTER} deliveries in a row died" in listed[2]
    assert listed[3] == (
        f"  {AFTER} dead letters; to enable it and replay them: "
        "postback callbacks enable --affiliate ann --event order.created --replay"
    )
    [as_json] = json.loads(succeeded(postback("callbacks", "list", "--json")))
    assert (as_json["dead_streak"], as_json["dead_letters"]) == (AFTER, AFTER)
    assert as_json["disabled"]["actor"] == "relay"

    receiver.status = 200
    enabled = postback(
        "callbacks",
        "enable",
        "--affiliate",
        "ann",
        "--event",
        "order.created",
        "--replay",
        "--actor",
        "jane (cli)",
        "--note",
        "their server is back",
    )
    assert succeeded(enabled) == (
        f"enabled: ann order.created\nreplayed {AFTER}, skipped 0, failed 0\n"
    )
    await drain(_rule(settings))
    assert await _states(db, dead) == [("delivered", None)] * AFTER
    assert [a["action"] for a in await _callback_actions(db)] == ["disable", "enable"]
    enable = (await _callback_actions(db))[1]
    assert (enable["actor"], enable["note"], enable["callback_id"]) == (
        "jane (cli)",
        "their server is back",
        callback_id,
    )
    replays = await db.fetch("SELECT actor FROM actions WHERE action = 'replay'")
    assert [row["actor"] for row in replays] == ["jane (cli)"] * AFTER
    assert await _streak(db, callback_id) == 0
    # A delivery's own actions are its replays: the callback's disable and enable are not.
    first = await db.fetchval("SELECT id FROM deliveries WHERE event_id = $1", dead[0])
    shown = json.loads(succeeded(postback("deliveries", "show", str(first), "--json")))
    assert [(a["action"], a["actor"]) for a in shown["actions"]] == [("replay", "jane (cli)")]


async def test_cli_disable_records_who_and_why(db: asyncpg.Connection, postback: Postback) -> None:
    await save_callback(db, "ann", "order.created", "GET", "https://t.example/pb")
    off = postback(
        "callbacks", "disable", "--affiliate", "ann", "--event", "order.created",
        "--actor", "jane", "--note", "affiliate asked us to pause",
    )  # fmt: skip
    assert succeeded(off) == "disabled: ann order.created\n"
    again = postback("callbacks", "disable", "--affiliate", "ann", "--event", "order.created")
    assert succeeded(again) == "already disabled: ann order.created\n"
    [action] = await _callback_actions(db)
    assert (action["action"], action["actor"], action["note"]) == (
        "disable",
        "jane",
        "affiliate asked us to pause",
    )
    # Ops disabled it themselves: no one is notified.
    assert await db.fetchval("SELECT count(*) FROM notifications") == 0
    listed = succeeded(postback("callbacks", "list")).splitlines()
    assert listed[2].startswith("ann order.created: disabled by jane at ")
    assert listed[2].endswith(" UTC: affiliate asked us to pause")
    assert listed[3] == (
        "  to enable it: postback callbacks enable --affiliate ann --event order.created"
    )


async def test_api_lists_who_disabled_it_and_enable_replay_sends_its_dead_letters(
    db: asyncpg.Connection,
    producer: Producer,
    settings: Settings,
    receiver: Receiver,
    api: Api,
) -> None:
    callback_id, dead = await _disabled_by_its_deaths(db, producer, settings, receiver)
    status, body = await api.call("GET", "/v1/callbacks")
    assert status == 200
    [listed] = body["items"]
    assert (listed["enabled"], listed["dead_streak"], listed["dead_letters"]) == (
        False,
        AFTER,
        AFTER,
    )
    assert listed["disabled"]["actor"] == "relay"
    assert listed["disabled"]["note"].startswith(f"{AFTER} deliveries in a row died")
    datetime.fromisoformat(listed["dead_since"])

    receiver.status = 200
    path = "/v1/callbacks/ann/order.created/enable"
    status, body = await api.call(
        "POST", path, json={"actor": "joe (page)", "note": "fixed", "replay": True}
    )
    assert status == 200
    assert (body["enabled"], body["changed"], body["dead_streak"], body["disabled"]) == (
        True,
        True,
        0,
        None,
    )
    assert body["replayed"] == {
        "matching": AFTER,
        "replayed": AFTER,
        "skipped": 0,
        "failed": 0,
        "problems": [],
    }
    await drain(_rule(settings))
    assert await _states(db, dead) == [("delivered", None)] * AFTER
    enable = (await _callback_actions(db))[-1]
    assert (enable["action"], enable["actor"], enable["note"], enable["callback_id"]) == (
        "enable",
        "joe (page)",
        "fixed",
        callback_id,
    )
    status, body = await api.call("POST", path, json={"replay": True})
    assert (status, body["changed"], body["replayed"]["matching"]) == (200, False, 0)

    off = "/v1/callbacks/ann/order.created/disable"
    status, body = await api.call("POST", off, json={"note": "x" * 2001})
    assert (status, body["errors"][0]["field"]) == (422, "note")
    status, body = await api.call("POST", off, json={"actor": "joe", "note": "paused"})
    assert (status, body["changed"], body["disabled"]["actor"], body["disabled"]["note"]) == (
        200,
        True,
        "joe",
        "paused",
    )
    # Recorded, and not notified: only the relay's disable was.
    assert (await _callback_actions(db))[-1]["actor"] == "joe"
    assert await db.fetchval("SELECT count(*) FROM notifications") == 1


# --- the ledger's statement ----------------------------------------------------------------

T0 = datetime(2026, 1, 1, tzinfo=UTC)
DEAD = Verdict("dead", "transient", None, "gave up after 3 attempts, last: HTTP 500")
DELIVERED = Verdict("delivered", "success")
RETRYING = Verdict("retrying", "transient", 60.0)


def _event(label: str, affiliate: str) -> Event:
    return parse_event(
        event_data(
            label,
            affiliate_id=affiliate,
            occurred_at=T0.isoformat(),
            order={"number": f"#{label}", "amount": "1.00", "commission": "0.10"},
        )
    )


def _record(event: Event, callback_id: int, verdict: Verdict) -> ledger.RecordCall:
    request = Request("GET", "http://a.test/pb", {}, None)
    status = 200 if verdict.state == "delivered" else 500
    return ledger.RecordCall(
        event, delivery_id(event), callback_id, request, T0, Outcome(status, 1.0), verdict
    )


async def _taken(db: asyncpg.Connection, batch: list[Event]) -> None:
    calls = [
        ledger.TakeCall(delivery_id(event), event, None, f"job-{event.id}", 60) for event in batch
    ]
    assert {t.action for t in await ledger.take_many(db, calls)} == {"claimed"}


async def test_concurrent_batches_in_opposite_orders_never_deadlock_and_count_exactly(
    database_url: str, db: asyncpg.Connection
) -> None:
    ids = {}
    for affiliate in ("ann", "bob", "cat"):
        ids[affiliate] = (
            await save_callback(db, affiliate, "order.created", "GET", "http://a.test/")
        ).id
    ann, bob, cat = ids["ann"], ids["bob"], ids["cat"]
    rng = random.Random(13)
    batches: list[list[ledger.RecordCall]] = []
    deaths = {ann: 0, bob: 0}
    for n in range(60):
        first, second = (ann, bob) if n % 2 else (bob, ann)
        batch = []
        for callback_id in (first, second):
            for k in range(3):
                verdict = rng.choice((DEAD, RETRYING))
                deaths[callback_id] += verdict is DEAD
                affiliate = "ann" if callback_id == ann else "bob"
                batch.append(
                    _record(_event(f"b{n}-{callback_id}-{k}", affiliate), callback_id, verdict)
                )
        # A third callback's deliveries get through: its streak is never there.
        batch.insert(rng.randrange(len(batch)), _record(_event(f"b{n}-cat", "cat"), cat, DELIVERED))
        batches.append(batch)
    await _taken(db, [call.event for batch in batches for call in batch])
    rule = ledger.AutoDisable(AFTER, 0.0)

    connections = [await database.connect(database_url) for _ in range(8)]
    try:
        queue: asyncio.Queue[list[ledger.RecordCall]] = asyncio.Queue()
        for batch in batches:
            queue.put_nowait(batch)

        async def record(conn: asyncpg.Connection) -> None:
            while not queue.empty():
                batch = queue.get_nowait()
                await ledger.record_many(conn, batch, rule)

        # A deadlock would fail a statement with asyncpg's DeadlockDetectedError, here.
        await asyncio.gather(*(record(conn) for conn in connections))
    finally:
        await asyncio.gather(*(conn.close() for conn in connections))

    assert await _streak(db, ann) == deaths[ann]
    assert await _streak(db, bob) == deaths[bob]
    assert await _streak(db, cat) == 0
    # Disabled once each, by the relay, past the third death; the third callback never.
    disables = await db.fetch("SELECT callback_id, actor FROM actions WHERE action = 'disable'")
    assert sorted((row["callback_id"], row["actor"]) for row in disables) == [
        (ann, "relay"),
        (bob, "relay"),
    ]
    enabled = await db.fetch("SELECT id FROM callbacks WHERE enabled")
    assert [row["id"] for row in enabled] == [cat]


async def test_deaths_of_a_removed_callback_are_recorded_without_a_streak(
    db: asyncpg.Connection,
) -> None:
    saved = await save_callback(db, "ann", "order.created", "GET", "http://a.test/")
    batch = [_event(f"gone-{n}", "ann") for n in range(AFTER + 1)]
    await _taken(db, batch)
    await db.execute("DELETE FROM callbacks WHERE id = $1", saved.id)

    rule = ledger.AutoDisable(AFTER, 0.0)
    await ledger.record_many(db, [_record(event, saved.id, DEAD) for event in batch[:-1]], rule)
    last = _record(batch[-1], saved.id, DEAD)  # alone, as a lone job's record goes
    await ledger.record_attempt(
        db,
        last.event,
        last.delivery,
        last.callback_id,
        last.request,
        last.started_at,
        last.outcome,
        last.verdict,
        rule,
    )

    states = await db.fetch("SELECT state FROM deliveries")
    assert [row["state"] for row in states] == ["dead"] * (AFTER + 1)
    assert await db.fetchval("SELECT count(*) FROM callback_health") == 0
    assert await _callback_actions(db) == []


async def test_after_0_never_disables_and_still_counts(db: asyncpg.Connection) -> None:
    saved = await save_callback(db, "ann", "order.created", "GET", "http://a.test/")
    batch = [_event(f"never-{n}", "ann") for n in range(AFTER + 2)]
    await _taken(db, batch)
    never = _rule_of(after=0)
    assert never.arguments() == (None, None)
    await ledger.record_many(db, [_record(event, saved.id, DEAD) for event in batch], never)

    assert (await _callback(db))["enabled"] is True
    assert await _streak(db, saved.id) == AFTER + 2


async def test_the_store_wide_callbacks_dead_letters_are_those_that_went_to_it(
    db: asyncpg.Connection,
) -> None:
    store = await save_callback(db, "*", "order.created", "GET", "http://a.test/")
    bobs = await save_callback(db, "bob", "order.created", "GET", "http://b.test/")
    ann, bob, cat = _event("sw-ann", "ann"), _event("sw-bob", "bob"), _event("sw-cat", "cat")
    await _taken(db, [ann, bob, cat])
    calls = [
        _record(ann, store.id, DEAD),
        _record(bob, bobs.id, DEAD),
        _record(cat, store.id, DEAD),
    ]
    await ledger.record_many(db, calls)

    # Oldest first; not bob's, which went to bob's own callback.
    assert await switch.dead_letters(db, store) == [delivery_id(ann), delivery_id(cat)]
    assert await switch.dead_letters(db, bobs) == [delivery_id(bob)]


def _rule_of(after: int, span: str = "0") -> ledger.AutoDisable:
    """The rule as the worker reads it from POSTBACK_AUTO_DISABLE_AFTER and _SPAN."""
    return ledger.AutoDisable.parse(after, span)


def test_a_span_that_is_not_a_duration_is_refused_naming_it(postback: Postback) -> None:
    line = refusal(
        postback("callbacks", "list", env_overrides={"POSTBACK_AUTO_DISABLE_SPAN": "soon"})
    )
    assert line == (
        "postback: error: bad configuration: POSTBACK_AUTO_DISABLE_SPAN: 'soon' is not a "
        "duration; write it like 1h or 30m, or 0 for no wait"
    )


async def test_saving_a_disabled_callback_through_the_api_leaves_it_disabled(
    db: asyncpg.Connection, api: Api
) -> None:
    saved = await save_callback(db, "ann", "order.created", "GET", "https://old.example/pb")
    await db.execute(
        "SELECT postback_disable_callback($1, 'relay', 'HTTP 410: callback disabled', NULL, true)",
        saved.id,
    )

    status, body = await api.call(
        "PUT", "/v1/callbacks/ann/order.created", json={"url": "https://new.example/pb"}
    )

    assert status == 200, body
    assert (body["url_template"], body["enabled"]) == ("https://new.example/pb", False)
    assert body["disabled"]["note"] == "HTTP 410: callback disabled"
