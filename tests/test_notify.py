"""Ops notifications: what the relay writes down for POSTBACK_OPS_WEBHOOK (a callback
disabled, an affiliate's dead letters, a circuit open too long), at most one an hour per
cause, and how the sender posts them: signed, retried, refused by the SSRF policy."""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import pydantic
import pytest
from pydantic import SecretStr

from ops.cli.demo import serve
from producer import Producer
from producer.queue import notify_name
from tests import leakcheck
from tests.support.cli import Postback, postback_env, refusal, succeeded
from tests.support.events import event_data, events, publish, save_callback
from tests.support.ledger import add_delivery
from tests.support.ports import free_port
from tests.support.receivers import HostsFile, Receiver
from tests.support.wait import until
from tests.support.workers import drain, running_worker
from worker import database, deliver, fairness, notify, sign
from worker.config import Settings
from worker.exchange import Outcome
from worker.pool import worker_settings

SECRET = sign.generate()
leakcheck.register(SECRET)  # signs, and is never logged


@pytest.fixture
async def webhook() -> AsyncIterator[Receiver]:
    """The ops webhook: a receiver on 127.0.0.1 (which ALLOW_NETWORKS opens)."""
    state = Receiver()
    async with serve(state.record) as url:
        state.url = url + "/services/T0/B0/hook"
        yield state


def _with(settings: Settings, **overrides: Any) -> Settings:
    return Settings(**{**settings.model_dump(), **overrides})


def _hooked(settings: Settings, webhook: Receiver, **overrides: Any) -> Settings:
    return _with(
        settings,
        ops_webhook=SecretStr(webhook.url),
        ops_webhook_secret=SecretStr(SECRET),
        **overrides,
    )


async def _send(
    settings: Settings, http: aiohttp.ClientSession | None = None, until: float | None = None
) -> notify.Sent:
    """One run of the sender, through a session made as a worker makes its own."""
    assert settings.database_url is not None
    own = http is None
    session = http or deliver.session(
        settings.connect_timeout, settings.request_timeout, settings.allowed
    )
    pool = await database.create_pool(settings.database_url, 1)
    try:
        return await notify.send_due(pool, session, settings, until)
    finally:
        await pool.close()
        if own:
            await session.close()


async def _rows(db: asyncpg.Connection) -> list[asyncpg.Record]:
    return await db.fetch("SELECT * FROM notifications ORDER BY id")


async def _due_now(db: asyncpg.Connection) -> None:
    """As if the backoff had passed."""
    await db.execute("UPDATE notifications SET next_attempt_at = now() WHERE state = 'pending'")


# --- pure parts ----------------------------------------------------------------------------


@pytest.mark.unit
def test_the_backoff_is_1m_5m_30m_2h_then_failed() -> None:
    assert [notify.next_wait(n) for n in range(1, 6)] == [60, 300, 1800, 7200, None]


@pytest.mark.unit
def test_a_webhook_url_is_checked_at_startup_naming_the_setting() -> None:
    with pytest.raises(pydantic.ValidationError) as refused:
        Settings(ops_webhook=SecretStr("http://127.0.0.1:9/hook"))
    error = refused.value.errors()[0]
    assert error["loc"] == ("ops_webhook",)
    assert "loopback" in error["msg"]
    assert "POSTBACK_ALLOW_NETWORKS" in error["msg"]
    # Allow-listed like any receiver.
    assert Settings(ops_webhook=SecretStr("http://127.0.0.1:9/hook"), allow_networks="127.0.0.1/32")
    with pytest.raises(pydantic.ValidationError, match="must start with http"):
        Settings(ops_webhook=SecretStr("ftp://hooks.example/x"))
    with pytest.raises(pydantic.ValidationError, match="credentials"):
        Settings(ops_webhook=SecretStr("https://u:p@hooks.example/x"))


@pytest.mark.unit
@pytest.mark.parametrize(("text", "seconds"), [("15m", 900.0), ("0", None), ("", None)])
def test_the_circuit_threshold_is_a_duration_or_never(text: str, seconds: float | None) -> None:
    assert Settings(notify_circuit_open=text).circuit_open_after == seconds


@pytest.mark.unit
def test_a_long_open_circuit_counts_from_its_first_opening_through_failed_probes() -> None:
    dests = fairness.Destinations(
        max_in_flight=10, failures=1, open_seconds=1.0, max_open_seconds=600.0
    )
    origin = "http://t.example:80"
    down = Outcome(None, 1.0, "connect_error", "refused")
    slot = dests.admit(origin, 0.0)
    assert isinstance(slot, fairness.Slot)
    assert dests.release(slot, down, 0.0) == "opened"
    assert dests.long_open(origin, 0.5, after=2.0) is None
    probe = dests.admit(origin, 1.5)
    assert isinstance(probe, fairness.Slot)
    assert dests.release(probe, down, 1.5) == "opened"  # a failed probe: open still
    assert dests.long_open(origin, 2.5, after=2.0) == 2.5
    dests.reported(origin, 2.5)
    assert dests.long_open(origin, 3.0, after=2.0) is None  # said; again only in an hour
    assert dests.long_open(origin, 2.5 + fairness.REPORT_AGAIN_SECONDS, after=2.0) is not None
    probe = dests.admit(origin, 4.0)
    assert isinstance(probe, fairness.Slot)
    assert dests.release(probe, Outcome(200, 1.0), 4.0) == "closed"
    assert dests.long_open(origin, 10.0, after=2.0) is None


@pytest.mark.unit
def test_the_notify_cron_job_is_unique_and_no_longer_than_a_delivery() -> None:
    settings = Settings(database_url="postgresql://x@h/d", redis_url="redis://h")
    crons = {job.name: job for job in worker_settings(settings)["cron_jobs"]}
    job = crons[notify_name(settings.queue_name)]
    assert job.unique
    assert job.timeout_s == settings.job_timeout
    assert job.second == set(range(0, 60, notify.EVERY_SECONDS))


# --- on real servers -----------------------------------------------------------------------


async def test_a_callback_disabled_by_a_410_is_posted_once_signed_with_text(
    db: asyncpg.Connection,
    settings: Settings,
    producer: Producer,
    receiver: Receiver,
    webhook: Receiver,
) -> None:
    receiver.status = 410
    cb = await save_callback(db, "ann", "order.created", "GET", receiver.url + "/pb")
    hooked = _hooked(settings, webhook)
    await publish(producer, [event_data("gone")])
    await drain(hooked)  # its notify cron job may send it already: either way, once

    await _send(hooked)
    assert len(webhook.requests) == 1
    got = webhook.requests[0]
    assert got.path_qs == "/services/T0/B0/hook"
    body = json.loads(got.body)
    assert set(body) == {"text", "id", "kind", "cause", "created_at", "fields"}
    assert body["kind"] == "callback_disabled"
    assert body["cause"] == f"callback_disabled:{cb.id}"
    assert "ann" in body["text"]
    assert "disabled" in body["text"]
    assert body["fields"]["callback_id"] == cb.id
    assert body["fields"]["status_code"] == 410
    expected = sign.signature(
        SECRET, got.headers["webhook-id"], int(got.headers["webhook-timestamp"]), got.body
    )
    assert got.headers["webhook-signature"] == expected
    [row] = await _rows(db)
    assert (row["state"], row["attempts"], row["status_code"]) == ("sent", 1, 200)
    assert row["sent_at"] is not None

    # Enabled again and gone again within the hour: disabled, and nothing new to say.
    await db.execute("SELECT postback_enable_callback($1, 'ops', 'back')", cb.id)
    await publish(producer, [event_data("gone-again")])
    await drain(hooked)
    assert not await db.fetchval("SELECT enabled FROM callbacks WHERE id = $1", cb.id)
    assert len(await _rows(db)) == 1
    await _send(hooked)
    assert len(webhook.requests) == 1

    # Disabled by ops: they know.
    other = await save_callback(db, "bob", "order.created", "GET", receiver.url + "/pb")
    await db.execute("SELECT postback_disable_callback($1, 'ops', 'why', NULL, false)", other.id)
    assert len(await _rows(db)) == 1


async def test_a_webhook_that_fails_is_tried_again_then_given_up(
    db: asyncpg.Connection, settings: Settings, webhook: Receiver
) -> None:
    await db.fetchval("SELECT postback_notify('dead_letters:ann', 'dead_letters', 't', '{}')")
    hooked = _hooked(settings, webhook)
    webhook.status = 500
    assert (await _send(hooked)).retrying == 1
    [row] = await _rows(db)
    assert (row["state"], row["attempts"], row["status_code"]) == ("pending", 1, 500)
    assert row["error"] == "HTTP 500: thanks"
    waits = await db.fetchval(
        "SELECT extract(epoch FROM next_attempt_at - now()) FROM notifications"
    )
    assert 55 < waits <= 60
    assert (await _send(hooked)).retrying == 0  # not due yet

    webhook.status = 200
    await _due_now(db)
    assert (await _send(hooked)).sent == 1
    [row] = await _rows(db)
    assert (row["state"], row["attempts"], row["error"]) == ("sent", 2, None)
    ids = {r.headers["webhook-id"] for r in webhook.requests}
    assert ids == {f"ntf_{row['id']}"}  # the same message, tried again

    await db.fetchval("SELECT postback_notify('dead_letters:bob', 'dead_letters', 't', '{}')")
    webhook.status = 503
    for _ in notify.BACKOFF:
        await _send(hooked)
        await _due_now(db)
    assert (await _send(hooked)).failed == 1
    row = (await _rows(db))[-1]
    assert (row["state"], row["attempts"], row["next_attempt_at"]) == ("failed", 5, None)


async def test_a_run_whose_time_is_up_still_posts_one(
    db: asyncpg.Connection, settings: Settings, webhook: Receiver
) -> None:
    """A job timeout shorter than a post can take must not stop every post."""
    for cause in ("dead_letters:ann", "dead_letters:bob"):
        await db.fetchval("SELECT postback_notify($1, 'dead_letters', 't', '{}')", cause)
    hooked = _hooked(settings, webhook)

    assert (await _send(hooked, until=time.monotonic())).sent == 1
    assert (await _send(hooked)).sent == 1
    assert len(webhook.requests) == 2


async def test_a_loopback_webhook_not_allow_listed_is_refused_and_never_sent(
    db: asyncpg.Connection, settings: Settings, webhook: Receiver
) -> None:
    # A name that resolves to loopback passes the startup check; the connect is refused.
    port = webhook.url.split(":")[2].split("/")[0]
    hooked = _with(
        settings, allow_networks=None, ops_webhook=SecretStr(f"http://ops.test:{port}/hook")
    )
    http = deliver.session(1.0, 2.0, (), resolver=HostsFile({"ops.test": [["127.0.0.1"]]}))
    await db.fetchval("SELECT postback_notify('dead_letters:ann', 'dead_letters', 't', '{}')")
    try:
        assert (await _send(hooked, http)).retrying == 1
    finally:
        await http.close()
    [row] = await _rows(db)
    assert row["state"] == "pending"
    assert row["error"].startswith("blocked_address: 127.0.0.1 is a refused address (loopback)")
    assert "POSTBACK_ALLOW_NETWORKS" in row["error"]
    assert webhook.requests == []


async def test_without_a_webhook_due_notifications_are_unsent(
    db: asyncpg.Connection, settings: Settings
) -> None:
    await db.fetchval("SELECT postback_notify('dead_letters:ann', 'dead_letters', 't', '{}')")
    assert (await _send(settings)).unsent == 1
    [row] = await _rows(db)
    assert (row["state"], row["attempts"], row["next_attempt_at"]) == ("unsent", 0, None)


async def test_dead_letters_over_the_threshold_make_one_message_per_affiliate_an_hour(
    db: asyncpg.Connection, settings: Settings, webhook: Receiver
) -> None:
    for _ in range(3):
        await add_delivery(db, "ann", "dead", timedelta(minutes=5))
    for _ in range(2):
        await add_delivery(db, "bob", "dead", timedelta(minutes=5))
    await add_delivery(db, "bob", "dead", timedelta(hours=2))  # died before the window
    await add_delivery(db, "bob", "retrying", timedelta(minutes=5))
    hooked = _hooked(settings, webhook, notify_dead_letters=3, notify_dead_letters_window="1h")
    assert settings.database_url is not None
    pool = await database.create_pool(settings.database_url, 1)
    try:
        assert len(await notify.check_dead_letters(pool, hooked)) == 1
        await add_delivery(db, "ann", "dead", timedelta(minutes=1))
        assert await notify.check_dead_letters(pool, hooked) == []  # within the hour
        assert await notify.check_dead_letters(pool, _with(hooked, notify_dead_letters=0)) == []
    finally:
        await pool.close()
    [row] = await _rows(db)
    assert row["cause"] == "dead_letters:ann"
    assert row["fields"] == {
        "affiliate_id": "ann",
        "dead_letters": 3,
        "window": "1h",
        "window_seconds": 3600.0,
        "threshold": 3,
    }
    await _send(hooked)
    [got] = webhook.requests
    assert json.loads(got.body)["text"].startswith("Postback affiliate ann: 3 deliveries died")


async def test_a_circuit_open_longer_than_the_threshold_makes_one_message(
    db: asyncpg.Connection, settings: Settings, producer: Producer
) -> None:
    down = f"http://127.0.0.1:{free_port()}"  # nothing listens: every connect is refused
    await save_callback(db, "ann", "order.created", "GET", down + "/pb?token=t0ps3cret")
    run = _with(
        settings,
        circuit_failures=1,
        circuit_open_seconds=0.5,
        notify_circuit_open="1s",
        retry_schedule="1s,1s,1s,1s,1s,1s,1s,1s",
    )
    await publish(producer, events("down", 4))
    async with running_worker(run):
        await until(
            lambda: db.fetchval("SELECT count(*) FROM notifications WHERE kind = 'circuit_open'"),
            within=30,
            what="a circuit_open notification",
        )
        # Probes after it, failing, keep the circuit open: still nothing more to say.
        await until(
            lambda: db.fetchval("SELECT sum(attempts) >= 6 FROM deliveries"),
            within=30,
            what="probes after the notification",
        )
    rows = [r for r in await _rows(db) if r["kind"] == "circuit_open"]
    assert len(rows) == 1
    [row] = rows
    assert row["cause"] == f"circuit_open:{down}"
    assert row["fields"]["origin"] == down
    assert row["fields"]["open_seconds"] >= 1
    assert "circuit has been open" in row["text"]
    assert "t0ps3cret" not in row["text"] + json.dumps(row["fields"])


async def test_the_api_and_the_cli_list_them_newest_first(
    db: asyncpg.Connection, settings: Settings, api: Any, tmp_path: Path
) -> None:
    for affiliate in ("ann", "bob"):
        await db.fetchval(
            "SELECT postback_notify($1, 'dead_letters', $2, '{}')",
            f"dead_letters:{affiliate}",
            f"Postback affiliate {affiliate}: many died",
        )
    status, body = await api.call("GET", "/v1/notifications?limit=1")
    assert status == 200
    [newest] = body["items"]
    assert set(newest) == {
        "id", "cause", "kind", "text", "fields", "created_at", "state", "attempts",
        "next_attempt_at", "status_code", "error", "sent_at",
    }  # fmt: skip
    assert (newest["cause"], newest["state"]) == ("dead_letters:bob", "pending")
    status, body = await api.call("GET", f"/v1/notifications?before={body['next']}")
    assert [n["cause"] for n in body["items"]] == ["dead_letters:ann"]
    assert body["next"] is None
    for refused in ("limit=0", "before=0", f"before={2**63}", "since=1h"):
        status, body = await api.call("GET", f"/v1/notifications?{refused}")
        assert status == 422, refused
        assert body["errors"][0]["field"] == refused.split("=")[0]

    postback = Postback(postback_env(settings), tmp_path)
    result = postback("notifications", "--limit", "1")
    out = succeeded(result)
    assert "Postback affiliate bob: many died" in out
    assert "ann" not in out
    assert "more notifications: add --before" in result.stderr
    await db.execute(
        "UPDATE notifications SET state = 'failed', error = 'HTTP 500: down' "
        "WHERE cause = 'dead_letters:ann'"
    )
    table = succeeded(postback("notifications")).splitlines()
    assert table[0].split() == ["ID", "CREATED", "(UTC)", "KIND", "STATE", "TRIES", "TEXT"]
    assert "failed (HTTP 500: down)" in table[2]
    listed = json.loads(succeeded(postback("notifications", "--json")))
    assert [n["cause"] for n in listed["items"]] == ["dead_letters:bob", "dead_letters:ann"]
    line = refusal(
        postback("notifications", env_overrides={"POSTBACK_OPS_WEBHOOK": "http://10.0.0.1/hook"})
    )
    assert line.startswith("postback: error: bad configuration: POSTBACK_OPS_WEBHOOK: ")
    assert "private" in line
