"""Retention: settled deliveries deleted and attempts' exchanges trimmed once old enough, by
the workers' cron job (every 5 minutes) and by `postback db prune`; open deliveries never
touched."""

from __future__ import annotations

import asyncio
import itertools
import os
import subprocess
import time
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg
import pytest
import structlog

from ops.cli.demo import running
from producer import Producer
from producer.queue import prune_name
from tests.support.cli import POSTBACK, Postback, postback_env, refusal, succeeded
from tests.support.demo import read_until
from tests.support.ledger import add_delivery, make_deliveries
from tests.support.receivers import Flaky
from tests.support.workers import POLL_DELAY, drain
from worker import database
from worker.config import Settings
from worker.pool import (
    JOB_TIMEOUT_BACKSTOP,
    PRUNE_EVERY_MINUTES,
    create_worker,
    worker_settings,
)
from worker.prune import (
    BATCH,
    BUDGET_SHARE,
    REST,
    Pruned,
    Retention,
    in_batches,
    parse_keep,
    prune,
    prune_job,
)

DAY = timedelta(days=1)
DEFAULTS = Retention.parse("30d", "90d", "30d")
REQUEST: dict[str, Any] = {
    "method": "GET",
    "url": "https://t.example/pb?o=1",
    "headers": {},
    "body": None,
}


async def add(
    db: asyncpg.Connection,
    label: str,
    state: str,
    ago: timedelta,
    settled_ago: timedelta | None = None,
    tries: int = 1,
) -> str:
    """A delivery taken `ago` and last changed `settled_ago` (default: then too), with
    `tries` attempts made when it was taken, each with its request and response stored,
    and a discard recorded by ops. Its event id."""
    event_id = await add_delivery(db, label, state, ago, [10.0] * tries)
    await db.execute(
        """
        UPDATE attempts a
        SET request = $2, response_excerpt = 'down for maintenance',
            response_headers = '{"Server": "t"}'
        FROM deliveries d WHERE d.id = a.delivery_id AND d.event_id = $1
        """,
        event_id,
        REQUEST,
    )
    await db.execute(
        """
        UPDATE deliveries SET updated_at = now() - $2::interval, request = $3
        WHERE event_id = $1
        """,
        event_id,
        settled_ago or ago,
        REQUEST,
    )
    await db.execute(
        """
        INSERT INTO actions (delivery_id, action, actor, note, attempt)
        SELECT id, 'discard', 'ops', 'noted', attempts FROM deliveries WHERE event_id = $1
        """,
        event_id,
    )
    return event_id


async def left(db: asyncpg.Connection) -> dict[str, str]:
    """Event id -> state of every delivery in the ledger."""
    rows = await db.fetch("SELECT event_id, state FROM deliveries")
    return {row["event_id"]: row["state"] for row in rows}


async def stored(db: asyncpg.Connection) -> dict[str, tuple[int, int]]:
    """Event id -> (attempts, attempts still holding their request and response)."""
    rows = await db.fetch(
        """
        SELECT d.event_id, count(a.id) AS attempts,
               count(a.id) FILTER (WHERE a.request IS NOT NULL
                   OR a.response_excerpt IS NOT NULL OR a.response_headers IS NOT NULL) AS kept
        FROM deliveries d LEFT JOIN attempts a ON a.delivery_id = d.id
        GROUP BY d.event_id
        """
    )
    return {row["event_id"]: (row["attempts"], row["kept"]) for row in rows}


async def everything(db: asyncpg.Connection) -> list[list[asyncpg.Record]]:
    return [
        await db.fetch(f"SELECT * FROM {table} ORDER BY id")  # noqa: S608 -- our own names
        for table in ("deliveries", "attempts", "actions")
    ]


# --- settings ----------------------------------------------------------------------------


@pytest.mark.unit
def test_defaults_keep_settled_30_days_dead_90_and_excerpts_30() -> None:
    fields = Settings.model_fields
    defaults = Retention.parse(
        fields["keep_settled"].default, fields["keep_dead"].default, fields["keep_excerpts"].default
    )
    assert defaults == Retention(settled=30 * 86400, dead=90 * 86400, excerpts=30 * 86400)


@pytest.mark.unit
@pytest.mark.parametrize(("text", "seconds"), [("12h", 43200.0), (" 7d ", 604800.0)])
def test_a_retention_is_a_duration(text: str, seconds: float) -> None:
    assert parse_keep(text) == seconds


@pytest.mark.unit
@pytest.mark.parametrize("text", ["", "0", "0d", " "])
def test_zero_or_empty_keeps_forever(text: str) -> None:
    assert parse_keep(text) is None


@pytest.mark.unit
@pytest.mark.parametrize("name", ["keep_settled", "keep_dead", "keep_excerpts"])
def test_a_bad_retention_is_refused_naming_the_setting(name: str) -> None:
    given: dict[str, Any] = {name: "30 days"}
    with pytest.raises(ValueError, match=name) as refused:
        Settings(**given)
    assert "write it like 30d" in str(refused.value)


# --- what goes, and when -----------------------------------------------------------------


async def test_each_kind_goes_at_its_own_age_and_open_deliveries_never(
    db: asyncpg.Connection,
) -> None:
    goes = [
        await add(db, "old", "delivered", 31 * DAY),
        await add(db, "old", "skipped", 31 * DAY, tries=0),
        await add(db, "old", "dead", 91 * DAY, tries=3),
        await add(db, "old", "discarded", 91 * DAY),
    ]
    stays = [
        await add(db, "new", "delivered", 29 * DAY),
        await add(db, "new", "skipped", 29 * DAY, tries=0),
        await add(db, "new", "dead", 89 * DAY),
        await add(db, "late", "dead", 31 * DAY),  # settled 31 days ago: a dead letter still
        # taken long ago, but discarded (settled) only 10 days ago
        await add(db, "long", "discarded", 200 * DAY, settled_ago=10 * DAY),
        await add(db, "ancient", "accepted", 400 * DAY, tries=0),  # never taken
        await add(db, "ancient", "pending", 400 * DAY, tries=0),
        await add(db, "ancient", "retrying", 400 * DAY, tries=5),
    ]

    pruned = await prune(db, DEFAULTS, rest=0)

    assert set(await left(db)) == set(stays)
    assert pruned.deliveries == {"delivered": 1, "skipped": 1, "dead": 1, "discarded": 1}
    # Their attempts and actions went with them (ON DELETE CASCADE).
    assert await db.fetchval("SELECT count(*) FROM attempts") == 1 + 1 + 1 + 1 + 5
    assert await db.fetchval("SELECT count(*) FROM actions") == len(stays)
    kept = await stored(db)
    assert kept[stays[-1]] == (5, 5), "a retrying delivery's attempts are never trimmed"
    assert goes[0] not in kept


async def test_nothing_goes_when_kept_forever(db: asyncpg.Connection) -> None:
    events = [
        await add(db, "a", "delivered", 999 * DAY),
        await add(db, "a", "dead", 999 * DAY),
        await add(db, "a", "discarded", 999 * DAY),
    ]
    before = await everything(db)

    pruned = await prune(db, Retention.parse("0", "", "0d"), rest=0)

    assert pruned == Pruned()
    assert await everything(db) == before
    assert set(await left(db)) == set(events)


async def test_notifications_go_with_the_dead_letters_unless_still_being_sent(
    db: asyncpg.Connection,
) -> None:
    for cause, state, ago in (
        ("old", "sent", 91 * DAY),
        ("old-failed", "failed", 91 * DAY),
        ("old-pending", "pending", 91 * DAY),
        ("new", "sent", 89 * DAY),
    ):
        await db.execute(
            """
            INSERT INTO notifications (cause, kind, text, fields, state, created_at)
            VALUES ($1, 'dead_letters', 't', '{}', $2, now() - $3::interval)
            """,
            cause,
            state,
            ago,
        )

    async def causes() -> set[str]:
        return {row["cause"] for row in await db.fetch("SELECT cause FROM notifications")}

    dry = await prune(db, DEFAULTS, dry_run=True, rest=0)
    assert dry.notifications == 2
    assert len(await causes()) == 4
    assert (await prune(db, Retention.parse("30d", "0", "30d"), rest=0)).notifications == 0
    pruned = await prune(db, DEFAULTS, rest=0, batch=1)
    assert pruned.notifications == 2
    assert pruned.counts()["notifications"] == 2
    assert await causes() == {"old-pending", "new"}


async def test_trimming_keeps_the_attempts_and_clears_their_exchanges(
    db: asyncpg.Connection,
) -> None:
    old_dead = await add(db, "old", "dead", 40 * DAY, tries=3)
    young_dead = await add(db, "young", "dead", 10 * DAY, tries=2)
    old_open = await add(db, "open", "retrying", 40 * DAY, tries=2)

    pruned = await prune(db, DEFAULTS, rest=0)

    assert pruned.attempts == 3
    assert sum(pruned.deliveries.values()) == 0
    assert await stored(db) == {old_dead: (3, 0), young_dead: (2, 2), old_open: (2, 2)}
    trimmed = await db.fetch(
        """
        SELECT a.* FROM attempts a JOIN deliveries d ON d.id = a.delivery_id
        WHERE d.event_id = $1 ORDER BY a.number
        """,
        old_dead,
    )
    # What ops read in a listing stays: each attempt's time, duration and outcome.
    assert [(a["number"], a["status_code"], a["duration_ms"]) for a in trimmed] == [
        (1, 500, 10.0),
        (2, 500, 10.0),
        (3, 500, 10.0),
    ]
    assert all(
        a["request"] is a["response_excerpt"] is a["response_headers"] is None for a in trimmed
    )
    # The delivery keeps its last request, which a replay may resend.
    assert await db.fetchval("SELECT request FROM deliveries WHERE event_id = $1", old_dead)


async def test_a_dry_run_changes_nothing_and_counts_what_the_run_then_removes(
    db: asyncpg.Connection,
) -> None:
    await add(db, "d", "delivered", 31 * DAY, tries=2)  # goes: its attempts are not trimmed
    await add(db, "s", "skipped", 35 * DAY, tries=0)
    await add(db, "x", "dead", 95 * DAY, tries=4)
    await add(db, "y", "dead", 60 * DAY, tries=3)  # stays, trimmed
    await add(db, "z", "discarded", 40 * DAY, tries=2)  # stays, trimmed
    await add(db, "n", "delivered", 5 * DAY)
    await add(db, "o", "retrying", 100 * DAY, tries=2)
    before = await everything(db)

    counted = await prune(db, DEFAULTS, dry_run=True, rest=0)

    assert await everything(db) == before
    assert counted.deliveries == {"delivered": 1, "skipped": 1, "dead": 1, "discarded": 0}
    assert counted.attempts == 3 + 2
    assert await prune(db, DEFAULTS, rest=0) == counted
    assert await prune(db, DEFAULTS, dry_run=True, rest=0) == Pruned()


async def test_small_batches_walk_past_what_stays_and_take_all_that_goes(
    db: asyncpg.Connection,
) -> None:
    # Oldest first, dead letters that stay: whole batches where nothing goes.
    stays = [await add(db, f"dead{n}", "dead", (80 - n / 100) * DAY, tries=2) for n in range(7)]
    goes = []
    for n in range(9):
        goes.append(await add(db, f"done{n}", "delivered", (40 - n / 100) * DAY))
        stays.append(await add(db, f"open{n}", "pending", (40 - n / 100) * DAY, tries=0))
    stays.append(await add(db, "young", "delivered", DAY))
    seen: list[int] = []

    pruned = await prune(db, DEFAULTS, batch=3, rest=0, progress=lambda p: seen.append(p.total))

    assert set(await left(db)) == set(stays)
    assert pruned.deliveries["delivered"] == len(goes)
    assert pruned.attempts == 7 * 2
    assert all(kept == 0 for event, (_, kept) in (await stored(db)).items() if "dead" in event)
    assert len(seen) > (7 + 18) // 3, "one progress report per batch"
    assert seen == sorted(seen)
    assert seen[-1] == pruned.total


async def test_a_dead_letter_replayed_meanwhile_stays(db: asyncpg.Connection) -> None:
    """A delivery reopened (replayed) is open: whatever its age, neither it nor its
    attempts go."""
    event_id = await add(db, "r", "dead", 100 * DAY, tries=2)
    await db.execute(
        "UPDATE deliveries SET state = 'retrying', updated_at = now() - interval '100 days'"
    )
    assert await prune(db, DEFAULTS, rest=0) == Pruned()
    assert await stored(db) == {event_id: (2, 2)}


# --- the workers' cron job -----------------------------------------------------------------


@pytest.mark.unit
def test_the_prune_is_a_cron_job_no_longer_than_a_delivery() -> None:
    settings = Settings(redis_url="redis://127.0.0.1:1/0", queue_name="q")
    (job,) = [j for j in worker_settings(settings)["cron_jobs"] if j.coroutine is prune_job]
    assert job.name == prune_name("q") == "q:prune"
    assert (job.minute, job.second, job.hour) == (set(range(0, 60, 5)), 30, None)
    assert PRUNE_EVERY_MINUTES == 5
    # One run per time, among all workers (arq's job id is the name and the time), none at
    # a worker's start (each would start its own).
    assert job.unique
    assert not job.run_at_startup
    assert job.timeout_s == settings.job_timeout
    assert (BATCH, REST, BUDGET_SHARE) == (250, 2.0, 0.8)  # as the README says


async def test_a_killed_workers_jobs_are_held_no_longer_for_the_prune() -> None:
    """arq re-runs a killed worker's jobs once the longest timeout of its functions (plus
    10 s) has passed: no cron job may make that longer than a delivery's own. (Async: a
    worker made outside a running loop makes a loop of its own, never closed.)"""
    settings = Settings(redis_url="redis://127.0.0.1:1/0", queue_name="q")
    worker = create_worker(settings, handle_signals=False)
    assert worker.in_progress_timeout_s == settings.job_timeout + JOB_TIMEOUT_BACKSTOP + 10


async def test_a_run_stops_between_batches_at_its_time_limit(db: asyncpg.Connection) -> None:
    old = [await add(db, f"old-{n}", "delivered", 40 * DAY) for n in range(3)]
    partial = await prune(db, DEFAULTS, batch=1, rest=0, until=time.monotonic())
    assert not partial.complete
    assert partial.deliveries["delivered"] == 1  # one batch, then the time was up
    rest = await prune(db, DEFAULTS, batch=1, rest=0)
    assert rest.complete
    assert partial.deliveries["delivered"] + rest.deliveries["delivered"] == len(old)
    assert not set(old) & set(await left(db))


async def test_the_workers_prune_once_at_its_time_and_log_what_went(
    db: asyncpg.Connection, producer: Producer, flaky: Flaky, settings: Settings
) -> None:
    made = await make_deliveries(db, producer, flaky, settings)
    ann = await db.fetchval("SELECT event FROM deliveries WHERE event_id = $1", made.ann)
    await db.execute(
        "UPDATE deliveries SET created_at = created_at - interval '95 days', "
        "updated_at = updated_at - interval '95 days'"
    )
    young = await add(db, "young", "delivered", DAY)
    workers = [
        create_worker(settings, handle_signals=False, poll_delay=POLL_DELAY) for _ in range(2)
    ]
    due = datetime.now(UTC).replace(microsecond=0)
    with structlog.testing.capture_logs() as logs:
        async with running(workers[0]), running(workers[1]):
            for worker in workers:
                (job,) = [j for j in worker.cron_jobs if j.coroutine is prune_job]
                job.next_run = due  # as if its minute had come, in both workers at once
            pruned = await logged(logs, "ledger_pruned")
            await asyncio.sleep(1)  # time for a second run, which must not come

    assert len([line for line in logs if line["event"] == "ledger_pruned"]) == 1
    assert {k: pruned[k] for k in ("delivered", "skipped", "dead", "discarded")} == {
        "delivered": 2,
        "skipped": 1,
        "dead": 1,
        "discarded": 0,
    }
    assert pruned["attempts_trimmed"] == 0  # every old attempt went with its delivery
    assert pruned["seconds"] >= 0
    assert set(await left(db)) == {young}

    # Its record gone, the same event sent again is a new one, and goes again.
    sent = flaky.paths.count("/ann?o=%231")
    assert sent == 1
    await producer.publish_many([ann])
    await drain(settings)
    assert flaky.paths.count("/ann?o=%231") == 2


async def test_a_run_that_loses_the_database_says_so_and_leaves_the_next_run_to_go_on(
    settings: Settings,
) -> None:
    pool = await database.create_pool(settings.database_url or "", 1)
    await pool.close()  # every statement now fails as with a database gone
    with structlog.testing.capture_logs() as logs:
        assert await prune_job({"settings": settings, "db": pool}) == 0
    (line,) = [line for line in logs if line["event"] == "prune_failed"]
    assert line["log_level"] == "warning"
    assert "InterfaceError" in line["error"]


# --- postback db prune -------------------------------------------------------------------


@pytest.fixture
def postback(settings: Settings, tmp_path: Path) -> Postback:
    return Postback(postback_env(settings), tmp_path)


async def test_db_prune_dry_run_shows_what_would_go_and_changes_nothing(
    db: asyncpg.Connection, postback: Postback
) -> None:
    await add(db, "d", "delivered", 31 * DAY, tries=2)
    await add(db, "x", "dead", 95 * DAY)
    await add(db, "y", "dead", 60 * DAY, tries=3)
    await add(db, "o", "pending", 400 * DAY, tries=0)
    before = await everything(db)

    out = succeeded(postback("db", "prune", "--dry-run"))

    assert out.splitlines() == [
        "kept: delivered and skipped 30d, dead and discarded 90d, "
        "attempts' requests and responses 30d",
        "would delete 2 deliveries (1 delivered, 0 skipped, 1 dead, 0 discarded), "
        "with their attempts and actions",
        "would trim 3 attempts: request, response headers and excerpt cleared",
    ]
    assert await everything(db) == before


async def test_db_prune_deletes_with_a_progress_line_outside_a_terminal(
    db: asyncpg.Connection, postback: Postback
) -> None:
    stays = await add(db, "y", "dead", 60 * DAY, tries=3)
    for n in range(5):
        await add(db, f"d{n}", "skipped", (40 + n) * DAY, tries=0)

    result = postback("db", "prune", env_overrides={"POSTBACK_KEEP_DEAD": "0"})

    assert succeeded(result).splitlines() == [
        "kept: delivered and skipped 30d, dead and discarded forever, "
        "attempts' requests and responses 30d",
        "deleted 5 deliveries (0 delivered, 5 skipped, 0 dead, 0 discarded), "
        "with their attempts and actions",
        "trimmed 3 attempts: request, response headers and excerpt cleared",
    ]
    # stderr is not a terminal here: plain lines, the last one the whole.
    progress = result.stderr.splitlines()
    assert progress[-1] == "pruning: 8/8", result.stderr
    assert all(line.startswith("pruning: ") for line in progress), result.stderr
    assert await stored(db) == {stays: (3, 0)}


async def test_db_prune_draws_a_progress_bar_on_a_terminal(
    db: asyncpg.Connection, postback: Postback
) -> None:
    for n in range(3):
        await add(db, f"d{n}", "delivered", (40 + n) * DAY, tries=0)
    code, drawn, out = on_a_terminal(postback, "db", "prune")

    assert code == 0, drawn
    assert drawn == f"\rpruning [{'#' * 30}] 3/3\r\n"  # the terminal turns \n into \r\n
    assert "deleted 3 deliveries (3 delivered," in out
    assert await left(db) == {}


def on_a_terminal(postback: Postback, *args: str) -> tuple[int, str, str]:
    """`postback ARGS` with its stderr a terminal (a pty): its exit code, what it drew
    there, and its stdout."""
    reading, writing = os.openpty()
    process = subprocess.Popen(
        [*POSTBACK, *args],
        env=dict(postback.env),
        cwd=postback.cwd,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=writing,
        text=True,
    )
    os.close(writing)
    try:
        drawn = read_until(reading, None, time.monotonic() + 60)
    finally:
        os.close(reading)
    out, _ = process.communicate(timeout=60)
    return process.returncode, drawn, out


@pytest.mark.parametrize("args", [["db", "prune"], ["worker"]], ids=" ".join)
def test_a_bad_retention_setting_is_refused_at_startup(postback: Postback, args: list[str]) -> None:
    line = refusal(postback(*args, env_overrides={"POSTBACK_KEEP_SETTLED": "a month"}))
    assert line == (
        "postback: error: bad configuration: POSTBACK_KEEP_SETTLED: 'a month' is not a "
        "duration; write it like 30d or 12h, or 0 to keep forever"
    )


async def logged(
    logs: Sequence[Mapping[str, Any]], event: str, within: float = 10
) -> Mapping[str, Any]:
    """The first `event` line, once it is logged."""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        for line in logs:
            if line["event"] == event:
                return line
        await asyncio.sleep(0.05)
    raise AssertionError(f"no {event} logged within {within} s: {logs}")


@pytest.mark.unit
async def test_batches_rest_twice_as_long_as_each_took() -> None:
    started: list[float] = []

    async def batch() -> bool:
        started.append(time.monotonic())
        await asyncio.sleep(0.05)
        return len(started) < 3

    assert await in_batches(batch)
    assert len(started) == 3
    # Each batch took at least 50 ms, so at least 100 ms of rest followed it.
    assert all(b - a >= 0.15 for a, b in itertools.pairwise(started))
