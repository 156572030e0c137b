"""Group commit: a worker's concurrent jobs share their ledger statements.

`Group` alone (no servers): a lone call goes at once, calls that come while one is in flight
go together, one bad call fails only itself. Then the ledger's statements for many, against
the real Postgres: each call does exactly what it does alone, and two transactions holding
several orders' locks (or callbacks) never wait for each other in a circle. The end-to-end
test with four worker processes on the same orders is in test_ordering.py.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import pytest

from producer.event import Event, parse_event
from tests.support.events import event_data, save_callback
from tests.support.wait import until
from worker import database, ledger
from worker.deliver import delivery_id
from worker.exchange import Outcome, Request
from worker.group import Group
from worker.retry import Verdict

# --- Group, without servers --------------------------------------------------------------


class Statements:
    """A statement that stays in flight until the test lets it go, recording what it sent."""

    def __init__(self, bad: frozenset[int] = frozenset()) -> None:
        self.sent: list[tuple[str, list[int]]] = []
        self.going = asyncio.Event()
        self.going.set()
        self.bad = bad

    async def one(self, call: int) -> int:
        self.sent.append(("one", [call]))
        await self.going.wait()
        if call in self.bad:
            raise ValueError(f"bad call {call}")
        return call * 10

    async def many(self, calls: list[int]) -> list[int]:
        self.sent.append(("many", list(calls)))
        await self.going.wait()
        if self.bad & set(calls):
            raise ValueError("a bad call in the statement")
        return [call * 10 for call in calls]


def _group(statements: Statements, alone: bool = True) -> Group[int, int]:
    return Group(statements.one, statements.many, lambda _exc: alone)


async def _in_flight(statements: Statements, count: int) -> None:
    """Until `count` statements have been sent (the last one now waits to be let go)."""
    for _ in range(100):
        if len(statements.sent) >= count:
            return
        await asyncio.sleep(0)
    raise AssertionError(f"sent {statements.sent}, expected {count} statements")


@pytest.mark.unit
async def test_a_lone_call_goes_at_once_and_alone() -> None:
    statements = Statements()
    group = _group(statements)
    assert await group(7) == 70
    assert statements.sent == [("one", [7])]
    assert (group.statements, group.calls) == (1, 1)


@pytest.mark.unit
async def test_calls_that_come_while_one_is_in_flight_go_next_together_in_order() -> None:
    statements = Statements()
    statements.going.clear()
    group = _group(statements)
    first = asyncio.create_task(group(1))
    await _in_flight(statements, 1)
    later = [asyncio.create_task(group(n)) for n in (2, 3, 4, 5)]
    await asyncio.sleep(0.01)
    assert statements.sent == [("one", [1])]  # the rest wait for it, not a second statement
    statements.going.set()
    assert await asyncio.gather(first, *later) == [10, 20, 30, 40, 50]
    assert statements.sent == [("one", [1]), ("many", [2, 3, 4, 5])]
    assert (group.statements, group.calls) == (2, 5)


@pytest.mark.unit
async def test_a_failed_statement_is_sent_again_call_by_call_and_fails_only_the_bad_call() -> None:
    statements = Statements(bad=frozenset({3}))
    statements.going.clear()
    group = _group(statements)
    first = asyncio.create_task(group(1))
    await _in_flight(statements, 1)
    later = [asyncio.create_task(group(n)) for n in (2, 3, 4)]
    statements.going.set()
    results = await asyncio.gather(first, *later, return_exceptions=True)
    assert results[:2] == [10, 20]
    assert results[3] == 40
    assert isinstance(results[2], ValueError)
    assert str(results[2]) == "bad call 3"
    assert statements.sent == [
        ("one", [1]),
        ("many", [2, 3, 4]),
        ("one", [2]),
        ("one", [3]),
        ("one", [4]),
    ]


@pytest.mark.unit
async def test_a_failure_that_would_fail_each_call_alone_too_fails_them_all_at_once() -> None:
    """The database is down: sending each call again would only wait out the same error."""
    statements = Statements(bad=frozenset({3}))
    statements.going.clear()
    group = _group(statements, alone=False)
    first = asyncio.create_task(group(1))
    await _in_flight(statements, 1)
    later = [asyncio.create_task(group(n)) for n in (2, 3)]
    statements.going.set()
    results = await asyncio.gather(first, *later, return_exceptions=True)
    assert results[0] == 10
    assert all(isinstance(r, ValueError) for r in results[1:])
    assert statements.sent == [("one", [1]), ("many", [2, 3])]


@pytest.mark.unit
async def test_a_cancelled_caller_leaves_its_call_sent_and_the_others_answered() -> None:
    statements = Statements()
    statements.going.clear()
    group = _group(statements)
    first = asyncio.create_task(group(1))
    await _in_flight(statements, 1)
    second, third = asyncio.create_task(group(2)), asyncio.create_task(group(3))
    await asyncio.sleep(0)
    second.cancel()
    statements.going.set()
    assert await first == 10
    assert await third == 30
    assert second.cancelled()
    assert statements.sent == [("one", [1]), ("many", [2, 3])]


@pytest.mark.unit
async def test_close_waits_for_every_call_handed_over() -> None:
    statements = Statements()
    statements.going.clear()
    group = _group(statements)
    calls = [asyncio.create_task(group(n)) for n in (1, 2)]
    await _in_flight(statements, 1)
    closing = asyncio.create_task(group.close())
    await asyncio.sleep(0.01)
    assert not closing.done()
    statements.going.set()
    await closing
    assert all(call.done() for call in calls)
    assert statements.sent == [("many", [1, 2])]


# --- the ledger's statements for many, against Postgres -----------------------------------

T0 = datetime(2030, 1, 1, tzinfo=UTC)


def _event(
    label: str, order: str, kind: str = "order.created", minute: int = 0, affiliate: str = "ann"
) -> Event:
    return parse_event(
        event_data(
            label,
            type=kind,
            affiliate_id=affiliate,
            occurred_at=(T0 + timedelta(minutes=minute)).isoformat(),
            order={"number": order, "amount": "10.00", "commission": "1.00"},
        )
    )


def _take(event: Event, job: str, **options: Any) -> ledger.TakeCall:
    return ledger.TakeCall(delivery_id(event), event, None, job, 60, **options)


def _takes() -> list[ledger.TakeCall]:
    """One of each thing `take` does, several in the same order, some waking others."""
    update_a1 = _event("u-a1", "#A", "order.updated", 1)
    create_a = _event("c-a", "#A")
    update_a2 = _event("u-a2", "#A", "order.updated", 2)
    skipped_b = _event("c-b", "#B")
    put_off_b = _event("u-b", "#B", "order.updated", 1)
    create_d = _event("c-d", "#D")
    update_d = _event("u-d", "#D", "order.updated", 1)
    return [
        _take(update_a1, "job-1", create_wait=60.0),  # awaiting its create
        _take(create_a, "job-2"),  # claimed; now update_a1 waits for it
        _take(update_a2, "job-3"),  # blocked by the create
        _take(create_a, "job-4"),  # elsewhere: job-2 holds it
        _take(skipped_b, "job-5", close=("no order.created callback", False)),  # closed
        _take(put_off_b, "job-6", defer=30.0),  # deferred
        _take(put_off_b, "job-6"),  # early
        _take(create_d, "job-7"),  # claimed
        _take(update_d, "job-8"),  # blocked by it
        _take(create_d, "job-7", close=("callback disabled", False)),  # closed, wakes update_d
        _take(create_d, "job-9"),  # settled
    ]


def _what(taken: ledger.Taken) -> tuple[Any, ...]:
    """All of a `Taken` but `wait`, which is measured from the moment the call ran."""
    return (
        taken.action,
        taken.inserted,
        taken.event,
        taken.state,
        taken.attempts,
        taken.claimed_by,
        taken.blocked_by,
        taken.retry_base,
        taken.resend,
        taken.blocker,
        sorted(taken.woken),
        taken.gave_up_waiting,
    )


async def _rows(db: asyncpg.Connection) -> list[tuple[Any, ...]]:
    """The deliveries as the ledger keeps them, in arrival order, without their times."""
    rows = await db.fetch(
        """
        SELECT event_id, state, reason, attempts, claimed_by, blocked_by,
               next_attempt_at IS NOT NULL AS due, create_wait_until IS NOT NULL AS waits
        FROM deliveries ORDER BY created_at, id
        """
    )
    return [tuple(row.values()) for row in rows]


@pytest.fixture
async def pool(database_url: str, db: asyncpg.Connection) -> AsyncIterator[asyncpg.Pool]:
    """A pool on the run's database, emptied (by `db`) before the test."""
    pool = await database.create_pool(database_url, 4)
    yield pool
    await pool.close()


async def test_takes_in_one_statement_do_exactly_what_they_do_one_by_one(
    db: asyncpg.Connection,
) -> None:
    calls = _takes()
    alone = [_what(await ledger.take(db, *_arguments(call))) for call in calls]
    rows_alone = await _rows(db)
    await db.execute("TRUNCATE deliveries, attempts, actions")
    together = [_what(taken) for taken in await ledger.take_many(db, calls)]
    assert together == alone
    assert await _rows(db) == rows_alone
    actions = [what[0] for what in together]
    assert actions == [
        "awaiting",
        "claimed",
        "blocked",
        "elsewhere",
        "closed",
        "deferred",
        "early",
        "claimed",
        "blocked",
        "closed",
        "settled",
    ]
    assert together[9][10] == [calls[8].event.id]  # the closed create woke its update


def _arguments(call: ledger.TakeCall | ledger.RecordCall) -> list[Any]:
    """A call's fields, in the order `take` (`record_attempt`) takes them after `db`."""
    return [getattr(call, field.name) for field in dataclasses.fields(call)]


def _record(
    event: Event, callback_id: int, status: int, verdict: Verdict, url: str = "http://a.test/"
) -> ledger.RecordCall:
    request = Request("GET", url, {"Idempotency-Key": str(delivery_id(event))}, None)
    outcome = Outcome(status, 12.5, excerpt=f"answer {status}", headers=(("X-Seen", "1"),))
    return ledger.RecordCall(event, delivery_id(event), callback_id, request, T0, outcome, verdict)


async def _claimed(db: asyncpg.Connection, *events: Event) -> None:
    for n, event in enumerate(events):
        assert (await ledger.take(db, delivery_id(event), event, None, f"job-{n}", 60)).action in (
            "claimed",
            "blocked",
        )


async def _callback_id(db: asyncpg.Connection, affiliate: str) -> int:
    found: int = await db.fetchval(
        "SELECT id FROM callbacks WHERE affiliate_id = $1 AND event_type = 'order.created'",
        affiliate,
    )
    return found


async def _records_ledger(db: asyncpg.Connection) -> tuple[Any, ...]:
    deliveries = await db.fetch(
        "SELECT event_id, state, reason, attempts, error_class, claimed_by FROM deliveries"
        " ORDER BY event_id"
    )
    attempts = await db.fetch(
        "SELECT d.event_id, a.number, a.status_code, a.response_excerpt, a.response_headers,"
        " a.request FROM attempts a JOIN deliveries d ON d.id = a.delivery_id"
        " ORDER BY d.event_id, a.number"
    )
    enabled = await db.fetch("SELECT affiliate_id, enabled FROM callbacks ORDER BY affiliate_id")
    return tuple(
        tuple(tuple(row.values()) for row in rows) for rows in (deliveries, attempts, enabled)
    )


async def test_records_in_one_statement_do_exactly_what_they_do_one_by_one(
    db: asyncpg.Connection,
) -> None:
    await save_callback(db, "ann", "order.created", "GET", "http://a.test/pb")
    await save_callback(db, "bob", "order.created", "GET", "http://b.test/pb")
    ann, bob = await _callback_id(db, "ann"), await _callback_id(db, "bob")
    create = _event("c-r", "#R")
    update = _event("u-r", "#R", "order.updated", 1)
    retried = _event("c-s", "#S")
    gone = _event("c-g", "#G", affiliate="bob")
    calls = [
        _record(create, ann, 204, Verdict("delivered", "success")),
        _record(retried, ann, 503, Verdict("retrying", "transient", 60.0, "HTTP 503")),
        _record(gone, bob, 410, Verdict("dead", "permanent", None, "HTTP 410", True)),
    ]
    results = []
    for together in (False, True):
        await db.execute("TRUNCATE deliveries, attempts, actions")
        await db.execute("UPDATE callbacks SET enabled = true")
        await _claimed(db, create, update, retried, gone)
        if together:
            woken = await ledger.record_many(db, calls)
        else:
            woken = [await ledger.record_attempt(db, *_arguments(c)) for c in calls]
        results.append((woken, await _records_ledger(db)))
    assert results[1] == results[0]
    woken, (deliveries, _attempts, enabled) = results[1]
    assert woken == [[update.id], [], []]
    # By event id: c-g (to bob), c-r, c-s, u-r.
    assert [row[1] for row in deliveries] == ["dead", "delivered", "retrying", "pending"]
    assert enabled == (("ann", True), ("bob", False))


async def _lock_waits(db: asyncpg.Connection, pid: int) -> bool:
    waiting: bool = await db.fetchval(
        "SELECT wait_event_type = 'Lock' FROM pg_stat_activity WHERE pid = $1", pid
    )
    return waiting


async def _order_key(db: asyncpg.Connection, event: Event) -> int:
    key: int = await db.fetchval(
        "SELECT postback_order_key($1, $2)", event.affiliate_id, event.order.number
    )
    return key


async def _waits_without_deadlock(
    database_url: str,
    holder: asyncpg.Connection,
    statement: Callable[[asyncpg.Connection], Coroutine[Any, Any, Any]],
    meanwhile: Callable[[], Awaitable[Any]],
) -> Any:
    """`statement`'s result, run on a connection of its own while `holder`'s open transaction
    holds a lock it needs. Once it waits, `holder` does `meanwhile`, which must not wait for
    it (were it so, Postgres would fail one of the two with a deadlock after a second), then
    commits and lets it finish."""
    other = await database.connect(database_url)
    try:
        running = asyncio.create_task(statement(other))
        pid = other.get_server_pid()
        await until(lambda: _lock_waits(holder, pid), within=5, what="the statement waits")
        await asyncio.wait_for(meanwhile(), timeout=5)
        await holder.execute("COMMIT")
        return await asyncio.wait_for(running, timeout=5)
    finally:
        if holder.is_in_transaction():
            await holder.execute("ROLLBACK")
        await other.close()


async def test_takes_in_one_statement_lock_their_orders_in_one_global_order(
    database_url: str, db: asyncpg.Connection
) -> None:
    """Another transaction holds the order that comes first in key order and then takes the
    other one: the statement for both waits for the first before it locks the second, so
    that other transaction goes on. Locking in arrival order would hold the second while
    waiting for the first: a deadlock, which Postgres breaks by failing one of them."""
    events = [_event(f"lock-{n}", f"#lock-{n}") for n in range(2)]
    keys = {event.id: await _order_key(db, event) for event in events}
    first, second = sorted(events, key=lambda e: keys[e.id])
    await db.execute("BEGIN")
    await db.execute("SELECT postback_lock_order($1, $2)", first.affiliate_id, first.order.number)
    # Arrival order: the second order first.
    calls = [_take(second, "job-batch"), _take(first, "job-batch")]
    taken = await _waits_without_deadlock(
        database_url,
        db,
        lambda conn: ledger.take_many(conn, calls),
        lambda: ledger.take(db, delivery_id(second), second, None, "job-other", 60),
    )
    # The other transaction claimed the second order's delivery first.
    assert [t.action for t in taken] == ["elsewhere", "claimed"]


async def test_records_in_one_statement_lock_callbacks_in_one_global_order(
    database_url: str, db: asyncpg.Connection
) -> None:
    """Two answers of 410 in one statement disable two callbacks: it locks them by id, after
    its orders, so a transaction holding the first and then changing the second goes on."""
    await save_callback(db, "ann", "order.created", "GET", "http://a.test/pb")
    await save_callback(db, "bob", "order.created", "GET", "http://b.test/pb")
    ann, bob = await _callback_id(db, "ann"), await _callback_id(db, "bob")
    lower, higher = sorted((ann, bob))
    to_ann = _event("gone-a", "#gone-a")
    to_bob = _event("gone-b", "#gone-b", affiliate="bob")
    await _claimed(db, to_ann, to_bob)
    gone = Verdict("dead", "permanent", None, "HTTP 410", True)
    by_callback = {ann: _record(to_ann, ann, 410, gone), bob: _record(to_bob, bob, 410, gone)}
    calls = [by_callback[higher], by_callback[lower]]  # arrival: the higher id first
    await db.execute("BEGIN")
    await db.execute("SELECT 1 FROM callbacks WHERE id = $1 FOR UPDATE", lower)
    woken = await _waits_without_deadlock(
        database_url,
        db,
        lambda conn: ledger.record_many(conn, calls),
        lambda: db.execute("UPDATE callbacks SET secret = NULL WHERE id = $1", higher),
    )
    assert woken == [[], []]
    assert await db.fetchval("SELECT count(*) FROM callbacks WHERE enabled") == 0


async def test_a_workers_concurrent_takes_share_statements(pool: asyncpg.Pool) -> None:
    shared = ledger.Ledger(pool)
    events = [_event(f"many-{n}", f"#many-{n}") for n in range(20)]
    lone = await shared.takes(_take(events[0], "job-0"))
    assert lone.action == "claimed"
    assert (shared.takes.statements, shared.takes.calls) == (1, 1)
    taken = await asyncio.gather(
        *(shared.takes(_take(event, f"job-{n}")) for n, event in enumerate(events[1:], 1))
    )
    assert [t.action for t in taken] == ["claimed"] * 19
    assert shared.takes.calls == 20
    assert shared.takes.statements < 20
    await shared.close()


async def test_a_call_the_database_refuses_fails_alone_and_the_others_are_recorded(
    pool: asyncpg.Pool, db: asyncpg.Connection
) -> None:
    await save_callback(db, "ann", "order.created", "GET", "http://a.test/pb")
    ann = await _callback_id(db, "ann")
    events = [_event(f"rec-{n}", f"#rec-{n}") for n in range(4)]
    await _claimed(db, *events[:3])  # the last was never taken: no delivery to record on
    shared = ledger.Ledger(pool)
    delivered = Verdict("delivered", "success")
    results = await asyncio.gather(
        *(shared.records(_record(event, ann, 204, delivered)) for event in events),
        return_exceptions=True,
    )
    assert results[:3] == [[], [], []]
    assert isinstance(results[3], asyncpg.NoDataFoundError)
    states = await db.fetch("SELECT state FROM deliveries")
    assert [row["state"] for row in states] == ["delivered"] * 3
    await shared.close()
