"""Fairness between destinations: the per-destination cap and the circuit breaker.

The bookkeeping is plain functions of the time, tested first; then a real worker against
real receivers: the receiver counts what is in flight, and the ledger shows that a
deferred delivery spent no attempt.
"""

from __future__ import annotations

import asyncio
import random
import socket
import struct
import time
from collections import Counter
from collections.abc import Awaitable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, cast

import asyncpg
import pytest
from aiohttp import web

from ops.cli.demo import serve
from producer import Producer, parse_event
from producer.queue import metrics_keys
from tests.support.events import event_data, save_callback
from tests.support.ports import free_port
from tests.support.receivers import raw_server
from tests.support.servers import database_name
from tests.support.wait import until
from tests.support.workers import drain, running_worker
from worker import fairness, ledger
from worker.config import Settings
from worker.deliver import delivery_id
from worker.exchange import Outcome

ORIGIN = "https://t.example:443"


def _destinations(cap: int = 2, failures: int = 3) -> fairness.Destinations:
    return fairness.Destinations(
        max_in_flight=cap,
        failures=failures,
        open_seconds=30.0,
        max_open_seconds=100.0,
        rng=random.Random(1),
    )


@pytest.mark.unit
@pytest.mark.parametrize(
    ("url", "destination"),
    [
        ("https://T.Example/pb?o={{order.number}}", "https://t.example:443"),
        ("http://t.example/{{order.number}}", "http://t.example:80"),
        ("https://t.example:8443#{{link.hash}}", "https://t.example:8443"),
        ("http://user:pw@t.example:81/", "http://t.example:81"),
        ("http://[2001:DB8::1]:8080/pb", "http://[2001:db8::1]:8080"),
    ],
)
def test_a_destination_is_scheme_host_and_port(url: str, destination: str) -> None:
    assert fairness.destination(url) == destination


@pytest.mark.unit
def test_the_cap_admits_that_many_at_once_and_frees_a_slot_when_one_is_done() -> None:
    places = _destinations(cap=2)
    first, second = places.admit(ORIGIN, 0.0), places.admit(ORIGIN, 0.0)
    assert isinstance(first, fairness.Slot)
    assert isinstance(second, fairness.Slot)
    third = places.admit(ORIGIN, 0.0)
    assert isinstance(third, fairness.Defer)
    assert third.reason == "at_cap"
    assert fairness.AT_CAP_SECONDS <= third.seconds <= fairness.AT_CAP_SECONDS * 1.5
    assert isinstance(places.admit("https://other.example:443", 0.0), fairness.Slot)
    places.release(first, OK, 1.0)
    places.release(first, OK, 1.0)  # a second release of the same slot is ignored
    assert isinstance(places.admit(ORIGIN, 1.0), fairness.Slot)
    assert isinstance(places.admit(ORIGIN, 1.0), fairness.Defer)


NO_ANSWER = Outcome(None, 10_000.0, "timeout", "no complete answer within the timeout")
ANSWERED_404 = Outcome(404, 5.0)
ANSWERED_503 = Outcome(503, 5.0)
OK = Outcome(200, 5.0)


def _fail(places: fairness.Destinations, now: float) -> fairness.Change | None:
    slot = places.admit(ORIGIN, now)
    assert isinstance(slot, fairness.Slot)
    return places.release(slot, NO_ANSWER, now)


@pytest.mark.unit
def test_the_circuit_opens_defers_probes_once_and_closes() -> None:
    places = _destinations(cap=5, failures=3)
    assert [_fail(places, 0.0), _fail(places, 0.0)] == [None, None]
    assert _fail(places, 1.0) == "opened"
    assert places.is_open(ORIGIN)

    held = places.admit(ORIGIN, 11.0)
    assert isinstance(held, fairness.Defer)
    assert held.reason == "circuit_open"
    assert 20.0 <= held.seconds <= 30.0  # until the circuit's time is up, spread out

    probe = places.admit(ORIGIN, 31.0)
    assert isinstance(probe, fairness.Slot)
    assert probe.probe
    behind = places.admit(ORIGIN, 31.0)  # one probe at a time
    assert isinstance(behind, fairness.Defer)
    assert behind.reason == "circuit_open"
    assert places.release(probe, OK, 31.5) == "closed"
    assert not places.is_open(ORIGIN)
    assert isinstance(places.admit(ORIGIN, 31.5), fairness.Slot)


@pytest.mark.unit
def test_a_failed_probe_opens_the_circuit_for_twice_as_long_up_to_the_limit() -> None:
    places = _destinations(failures=1)
    assert _fail(places, 0.0) == "opened"  # open until 30
    now = 30.0
    for opened_for in (60.0, 100.0, 100.0):
        assert _fail(places, now) == "opened"  # the probe failed
        assert isinstance(places.admit(ORIGIN, now + opened_for - 0.1), fairness.Defer)
        now += opened_for
    assert isinstance(places.admit(ORIGIN, now), fairness.Slot)


@pytest.mark.unit
@pytest.mark.parametrize("answer", [ANSWERED_404, ANSWERED_503])
def test_an_answer_even_an_error_counts_against_opening_and_a_cancelled_probe_lets_another_go(
    answer: Outcome,
) -> None:
    places = _destinations(failures=2)  # from a fresh start, 2 failures would open it
    assert _fail(places, 0.0) is None
    for _ in range(5):
        slot = places.admit(ORIGIN, 0.0)
        assert isinstance(slot, fairness.Slot)
        # The receiver answered: it is up, and its errors are its deliveries' own business.
        assert places.release(slot, answer, 0.0) is None
    # Of the last 8 requests, 2, then 3, then 3 again got no answer: fewer than half.
    assert [_fail(places, 0.0) for _ in range(3)] == [None, None, None]
    assert _fail(places, 0.0) == "opened"  # 4 of the last 8
    probe = places.admit(ORIGIN, 30.0)
    assert isinstance(probe, fairness.Slot)
    assert places.release(probe, None, 30.0) is None  # stopped before an answer
    again = places.admit(ORIGIN, 30.0)
    assert isinstance(again, fairness.Slot)
    assert again.probe


REFUSED = Outcome(None, 1.0, "connect_error", "Cannot connect to host t.example:443")


def _answer(places: fairness.Destinations, now: float, outcome: Outcome) -> fairness.Change | None:
    slot = places.admit(ORIGIN, now)
    assert isinstance(slot, fairness.Slot)
    return places.release(slot, outcome, now)


@pytest.mark.unit
def test_from_a_fresh_start_n_refused_connections_open_the_circuit() -> None:
    places = _destinations(cap=10, failures=5)
    assert [_answer(places, n, REFUSED) for n in range(4)] == [None] * 4
    assert _answer(places, 4.0, REFUSED) == "opened"


@pytest.mark.unit
def test_n_failures_arriving_together_among_3n_recent_answers_do_not_open_the_circuit() -> None:
    """Five requests that hung together time out in the same instant: a receiver that
    answered the fifteen before them is not down."""
    places = _destinations(cap=10, failures=5)
    for n in range(15):
        assert _answer(places, n, OK) is None
    together = _slots(places, 20.0, 5)
    assert [places.release(slot, NO_ANSWER, 30.0) for slot in together] == [None] * 5
    # The rule is "at least half of the last 20": each failure more pushes out an answer,
    # and the tenth of twenty opens it.
    assert [_fail(places, 31.0) for _ in range(4)] == [None] * 4
    assert _fail(places, 31.0) == "opened"


@pytest.mark.unit
def test_only_requests_that_ended_in_the_last_minute_count() -> None:
    # An answer at 30 s keeps the destination remembered (and counts, being recent).
    old_failures = _destinations(cap=10, failures=5)
    for _ in range(4):
        assert _answer(old_failures, 0.0, REFUSED) is None
    assert _answer(old_failures, 30.0, OK) is None
    assert _answer(old_failures, fairness.RECENT_SECONDS, REFUSED) is None  # 1 of 2 lately
    within = _destinations(cap=10, failures=5)
    for _ in range(4):
        assert _answer(within, 0.0, REFUSED) is None
    assert _answer(within, 30.0, OK) is None
    assert _answer(within, fairness.RECENT_SECONDS - 0.1, REFUSED) == "opened"  # 5 of 6
    # Old answers do not hide a destination that has gone down since.
    old_answers = _destinations(cap=10, failures=5)
    for _ in range(15):
        assert _answer(old_answers, 0.0, OK) is None
    assert _answer(old_answers, 30.0, OK) is None
    failed = [_answer(old_answers, fairness.RECENT_SECONDS + n, REFUSED) for n in range(5)]
    assert failed == [None, None, None, None, "opened"]


@pytest.mark.unit
def test_a_probe_answer_closes_the_circuit_and_the_count_starts_afresh() -> None:
    places = _destinations(cap=10, failures=3)
    for n in range(3):
        _fail(places, float(n))
    assert places.is_open(ORIGIN)
    probe = places.admit(ORIGIN, 40.0)
    assert isinstance(probe, fairness.Slot)
    assert places.release(probe, ANSWERED_503, 40.0) == "closed"
    # The failures that opened it are forgotten: it takes as many again.
    assert [_fail(places, 41.0), _fail(places, 41.0)] == [None, None]
    assert _fail(places, 41.0) == "opened"


# With a worker: the receiver counts, the ledger remembers.


@dataclass
class Counting:
    """A receiver that holds each request a moment and counts how many it holds at once."""

    now: int = 0
    most: int = 0
    answered: int = 0

    async def handle(self, request: web.Request) -> web.Response:
        self.now += 1
        self.most = max(self.most, self.now)
        try:
            await asyncio.sleep(0.05)
        finally:
            self.now -= 1
        self.answered += 1
        return web.Response(text="ok")


async def _attempts(db: asyncpg.Connection) -> dict[str, int]:
    rows = await db.fetch("SELECT event_id, state, attempts FROM deliveries")
    assert {row["state"] for row in rows} == {"delivered"}
    return {row["event_id"]: row["attempts"] for row in rows}


def _events(label: str, count: int) -> list[dict[str, Any]]:
    return [
        event_data(f"{label}{n}", order={"number": f"#{n}", "amount": "1", "commission": "0"})
        for n in range(count)
    ]


async def test_never_more_than_the_cap_in_flight_to_one_destination(
    db: asyncpg.Connection, producer: Producer, settings: Settings
) -> None:
    counting = Counting()
    async with serve(counting.handle) as url:
        await save_callback(db, "ann", "order.created", "GET", url + "/pb?o={{order.number}}")
        await producer.publish_many(_events("cap", 12))
        await drain(settings.model_copy(update={"destination_max_in_flight": 3, "max_jobs": 20}))
    assert counting.most == 3
    assert counting.answered == 12
    # Waiting for a slot is not an attempt.
    assert set((await _attempts(db)).values()) == {1}


async def test_an_open_circuit_defers_without_spending_attempts_then_a_probe_closes_it(
    db: asyncpg.Connection, producer: Producer, settings: Settings
) -> None:
    """Every connection refused: the default number of failures (5) opens the circuit, and
    nothing more is spent until its probe."""
    failures: int = Settings.model_fields["circuit_failures"].default
    port = free_port()  # nothing listens on it, yet
    url = f"http://127.0.0.1:{port}"
    await save_callback(db, "ann", "order.created", "GET", url + "/pb?o={{order.number}}")
    await producer.publish_many(_events("cb", 6))
    tuned = settings.model_copy(
        update={
            "destination_max_in_flight": 1,  # one at a time, so the count is exact
            "circuit_failures": failures,
            "circuit_open_seconds": 1.0,
            # Enough retries that the one delivery that may get every failure is not dead.
            "retry_schedule": "100ms,100ms,100ms,100ms,100ms",
        }
    )
    counting = Counting()

    async def attempts_made() -> int:
        made: int = await db.fetchval("SELECT coalesce(sum(attempts), 0) FROM deliveries")
        return made

    async def opened() -> bool:
        return await attempts_made() >= failures

    async def recover() -> None:
        # Five attempts could not connect, and opened the circuit. The receiver comes up
        # while it is open: only the probe can find out.
        await until(opened, 20, "the circuit opened")
        async with serve(counting.handle, port=port):
            await worker
        assert await attempts_made() == failures + 6

    worker = asyncio.ensure_future(drain(tuned))
    await recover()
    # Six deliveries and five failed attempts: the deliveries put off while the circuit
    # was open spent none.
    assert counting.answered == 6
    assert sum((await _attempts(db)).values()) == failures + 6
    counters: dict[bytes, bytes] = await cast(
        Awaitable[dict[bytes, bytes]],
        producer.redis.hgetall(metrics_keys(settings.queue_name).counters),
    )
    assert counters[b"circuit:opened"] == b"1"
    assert counters[b"circuit:closed"] == b"1"
    assert int(counters[b"deferred:circuit_open"]) >= 1


def _again(places: fairness.Destinations, delivery: str, now: float) -> fairness.Defer:
    held = places.admit(ORIGIN, now, delivery)
    assert isinstance(held, fairness.Defer)
    return held


@pytest.mark.unit
def test_a_delivery_put_off_again_waits_twice_as_long_up_to_a_minute() -> None:
    places = _destinations(cap=1)
    assert isinstance(places.admit(ORIGIN, 0.0), fairness.Slot)  # held for good
    now, waits = 0.0, []
    for _ in range(12):
        held = _again(places, "d1", now)
        waits.append(held.seconds)
        now += held.seconds  # back as soon as it was told
    for wait, doubled in zip(waits, (1, 2, 4, 8, 16), strict=False):
        assert fairness.AT_CAP_SECONDS * doubled <= wait <= fairness.AT_CAP_SECONDS * doubled * 1.5
    # Spread included, never more than a minute; and still spread, not all the limit.
    longest = waits[5:]
    assert all(40.0 <= wait <= 60.0 for wait in longest)
    assert max(longest) - min(longest) > 5.0
    assert max(waits) <= fairness.PUT_OFF_LIMIT_SECONDS == 60.0
    # Another delivery's first put-off there is short: it grows with its own put-offs only.
    assert _again(places, "d2", now).seconds <= fairness.AT_CAP_SECONDS * 1.5


@pytest.mark.unit
def test_a_delivery_back_from_another_wait_or_given_a_slot_starts_again_short() -> None:
    places = _destinations(cap=1)
    slot = places.admit(ORIGIN, 0.0)
    assert isinstance(slot, fairness.Slot)
    now = 0.0
    for _ in range(3):
        now += _again(places, "d1", now).seconds
    assert _again(places, "d1", now).seconds >= fairness.AT_CAP_SECONDS * 8
    # It was due back then, and came 5 s late: the database was down meanwhile, its job
    # ran again 5 s later. That was not another put-off at this destination.
    late = _again(places, "d1", now + 30 * 1.5 + 5.0)
    assert late.seconds <= fairness.AT_CAP_SECONDS * 1.5
    # Given a slot, it is forgotten: put off later, it starts again at 2 s.
    for _ in range(3):
        now += _again(places, "d2", now).seconds
    places.release(slot, None, now)
    assert isinstance(places.admit(ORIGIN, now, "d2"), fairness.Slot)
    assert _again(places, "d2", now).seconds <= fairness.AT_CAP_SECONDS * 1.5


def _quick(
    places: fairness.Destinations, busy: list[fairness.Slot], now: float
) -> list[fairness.Slot]:
    """The destination at its cap of 10 and quick: the requests under way (`busy`) end, and
    10 that started 0.2 s ago end with an answer, and 10 start at `now`; returns those."""
    for slot in busy:
        places.release(slot, None, now - 0.2)  # never sent: says nothing of its pace
    for answered in _slots(places, now - 0.2, 10):
        places.release(answered, OK, now)
    return _slots(places, now, 10)


def _slots(places: fairness.Destinations, now: float, count: int) -> list[fairness.Slot]:
    slots = [places.admit(ORIGIN, now) for _ in range(count)]
    assert all(isinstance(slot, fairness.Slot) for slot in slots)
    return cast(list[fairness.Slot], slots)


@pytest.mark.unit
def test_at_a_quick_destination_no_delivery_waits_longer_than_the_backlog_takes() -> None:
    """Requests there take 0.2 s, 10 at once: 50 a second. However often a delivery was put
    off, its wait is no longer than those put off before it take to go at that pace (at
    least AT_CAP_SECONDS), so after an outage the backlog goes as fast as the receiver
    takes it, not in ever longer rounds that leave its slots idle."""
    places = _destinations(cap=10)
    now, busy = 0.0, list[fairness.Slot]()
    for _ in range(5):
        busy = _quick(places, busy, now)
        held = _again(places, "often", now)
        assert held.seconds <= fairness.AT_CAP_SECONDS * 1.5
        now += held.seconds  # back as soon as it was told
    # 500 more waiting take 10 s to go at its pace: the one put off often waits that long.
    _quick(places, busy, now)
    assert max(_put_off(places, now, 500)) <= fairness.AT_CAP_SECONDS * 1.5
    assert 10.0 <= _again(places, "often", now).seconds <= 10.0 * 1.5


@pytest.mark.unit
def test_a_probe_stopped_before_the_wire_neither_closes_nor_reopens_the_circuit() -> None:
    places = _destinations(failures=1)
    assert _fail(places, 0.0) == "opened"
    probe = places.admit(ORIGIN, 30.0)
    assert isinstance(probe, fairness.Slot)
    refused = Outcome(None, 0.1, "blocked_address", "10.0.0.1 is a refused address (private)")
    assert places.release(probe, refused, 30.0) is None
    assert places.is_open(ORIGIN)
    assert isinstance(places.admit(ORIGIN, 30.0), fairness.Slot)  # another probe may go


@pytest.mark.unit
def test_a_destination_never_carries_user_info() -> None:
    assert fairness.destination("http://user:pw@t.example:99999/x") == "http://t.example:99999"


async def test_the_ledger_shows_a_put_off_delivery_unclaimed_and_when_it_goes(
    db: asyncpg.Connection,
) -> None:
    """What `take` does when the destination said "not now": no claim, no attempt, the time
    it comes back; and an earlier delivery of its order still comes first."""
    create = parse_event(event_data("put-off-create", occurred_at="2030-01-01T00:00:00Z"))
    update = parse_event(
        event_data("put-off-update", type="order.updated", occurred_at="2030-01-01T00:00:01Z")
    )
    first = await ledger.take(db, delivery_id(create), create, None, "job-a", 60, defer=30.0)
    assert first.action == "deferred"
    row = await db.fetchrow(
        "SELECT state, attempts, claimed_by, blocked_by,"
        " extract(epoch FROM next_attempt_at - now())::float8 AS wait"
        " FROM deliveries WHERE id = $1",
        delivery_id(create),
    )
    assert row is not None
    assert (row["state"], row["attempts"], row["claimed_by"], row["blocked_by"]) == (
        "pending",
        0,
        None,
        None,
    )
    assert 29 < row["wait"] <= 30
    # Run again before then: it is not due, whatever its destination says now.
    assert (await ledger.take(db, delivery_id(create), create, None, "job-a", 60)).action == "early"
    # The order's update waits for its create rather than for the destination.
    later = await ledger.take(db, delivery_id(update), update, None, "job-b", 60, defer=30.0)
    assert later.action == "blocked"
    assert later.blocker is not None
    assert (later.blocker.id, later.blocker.event_id) == (delivery_id(create), create.id)
    # ...and looks again once that one is due, not before.
    assert 29 < later.blocker.wait <= 30


def _put_off(places: fairness.Destinations, now: float, count: int) -> list[float]:
    waits = []
    for _ in range(count):
        held = places.admit(ORIGIN, now)
        assert isinstance(held, fairness.Defer)
        assert held.reason == "at_cap"
        waits.append(held.seconds)
    return waits


@pytest.mark.unit
def test_at_a_slow_destination_the_put_off_wait_grows_with_how_many_are_waiting() -> None:
    """No request to it has started for a while: 40 deliveries come back spread over about
    as long as it takes them to get the 2 slots, not all at once every few seconds."""
    places = _destinations(cap=2)
    assert isinstance(places.admit(ORIGIN, 0.0), fairness.Slot)
    assert isinstance(places.admit(ORIGIN, 0.0), fairness.Slot)
    waits = _put_off(places, fairness.SLOW_SECONDS + 1.0, 40)
    assert fairness.AT_CAP_SECONDS <= waits[0] <= fairness.AT_CAP_SECONDS * 1.5
    # The k-th waits about AT_CAP_SECONDS x k / cap, up to the longest wait.
    assert waits[-1] >= fairness.AT_CAP_SECONDS * 39 / 2
    assert max(waits) <= fairness.PUT_OFF_LIMIT_SECONDS
    assert sorted(waits[::10]) == waits[::10]


@pytest.mark.unit
def test_at_a_busy_quick_destination_the_put_off_wait_stays_short() -> None:
    places = _destinations(cap=2)
    first = places.admit(ORIGIN, 0.0)
    assert isinstance(first, fairness.Slot)
    assert isinstance(places.admit(ORIGIN, 0.0), fairness.Slot)
    places.release(first, Outcome(200, 5.0), 0.5)
    assert isinstance(places.admit(ORIGIN, 0.5), fairness.Slot)  # a request just started
    waits = _put_off(places, 1.0, 40)
    assert max(waits) <= fairness.AT_CAP_SECONDS * 1.5


# After a database outage: the backlog goes at the receiver's pace.

OUTAGE_SECONDS = 10.0
DRAIN_LIMIT_SECONDS = 30.0
"""What a few hundred deliveries left by the outage may take to land at a receiver that
takes about 50 a second: the deliveries come back from the outage's waits within
INFRA_RETRY_SECONDS (5 s) of its end, and would need some 7 s if they went at its pace; the
rest is what the cap's put-off waits may add."""


@dataclass
class Paced:
    """A healthy receiver that holds each request `hold` seconds: with the worker's cap of
    10 at once, about 50 requests a second. Notes when each delivery (its Idempotency-Key)
    was first answered."""

    hold: float = 0.2
    landed: dict[str, float] = field(default_factory=dict)

    async def handle(self, request: web.Request) -> web.Response:
        await asyncio.sleep(self.hold)
        self.landed.setdefault(request.headers["Idempotency-Key"], time.monotonic())
        return web.Response(text="ok")


async def test_after_a_database_outage_the_backlog_drains_at_the_receivers_pace(
    db: asyncpg.Connection,
    producer: Producer,
    settings: Settings,
    database_url: str,
    admin_url: str,
) -> None:
    """Every wait of a job is a run of it: the runs spent waiting out the database (5 s
    each) must not stretch the put-off waits at the receiver's cap once it is back, nor
    may those waits grow into rounds that leave the receiver's slots idle: the backlog
    lands within DRAIN_LIMIT_SECONDS of the outage's end, every delivery delivered."""
    total = 400
    paced = Paced()
    name = database_name(database_url)
    own = await db.fetchval("SELECT pg_backend_pid()")
    # On another database: the test's own connection to this one is spared by pid.
    admin = await asyncpg.connect(admin_url)
    tuned = settings.model_copy(update={"destination_max_in_flight": 10})
    try:
        async with serve(paced.handle) as url:
            await save_callback(db, "ann", "order.created", "GET", url + "/pb?o={{order.number}}")
            await producer.publish_many(_events("outage", total))
            worker = asyncio.ensure_future(drain(tuned))
            try:
                await until(lambda: len(paced.landed) >= 50, 20, "the run under way")
                try:
                    # Postgres goes away for the worker: its connections cut, new ones refused.
                    await admin.execute(f'ALTER DATABASE "{name}" WITH ALLOW_CONNECTIONS false')
                    await admin.execute(
                        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                        " WHERE datname = $1 AND pid <> $2",
                        name,
                        own,
                    )
                    await asyncio.sleep(OUTAGE_SECONDS)
                    remaining = total - len(paced.landed)
                finally:
                    await admin.execute(f'ALTER DATABASE "{name}" WITH ALLOW_CONNECTIONS true')
                back = time.monotonic()
                done, _ = await asyncio.wait({worker}, timeout=DRAIN_LIMIT_SECONDS + 15)
            finally:
                worker.cancel()
                await asyncio.gather(worker, return_exceptions=True)
    finally:
        await admin.close()

    drained = max(paced.landed.values()) - back
    print(
        f"\ndatabase outage of {OUTAGE_SECONDS:g} s: {remaining} of {total} deliveries left"
        f" at its end, {len(paced.landed)} landed, the last {drained:.1f} s after it"
    )
    assert done, f"{total - len(paced.landed)} deliveries still not landed"
    states = await db.fetch("SELECT state, count(*) FROM deliveries GROUP BY state")
    assert {row["state"]: row["count"] for row in states} == {"delivered": total}
    assert remaining >= total // 2, "the outage came too late to leave a backlog"
    assert drained < DRAIN_LIMIT_SECONDS


# A receiver that mostly answers keeps its circuit closed.

WARM_UP = 20
"""Requests it answers first, all 200: the history the failures below arrive into. The
last five of them it holds until all five are there and answers together, so the five
after them start together."""

TOGETHER = 5
"""Then this many hang past the request timeout: started together, they time out in the
same instant, with nothing else in flight, as many as POSTBACK_CIRCUIT_FAILURES."""

CYCLE = ("ok",) * 3 + ("hang",) + ("ok",) * 5 + ("error",) + ("ok",) * 5 + ("reset",) + ("ok",) * 4
"""And then, over and over, what each request gets by its place in every 20: 17 answered
200 (85 %), one 500, one connection reset, one hang."""


@dataclass
class Mostly:
    """A receiver that answers 200 to about 85 % of requests and otherwise answers 500,
    resets the connection or hangs until the client gives up. What a request gets is fixed
    by when it arrives (`WARM_UP`, `TOGETHER`, `CYCLE`), so a run cannot flake."""

    arrived: int = 0
    got: Counter[str] = field(default_factory=Counter)
    all_there: asyncio.Event = field(default_factory=asyncio.Event)

    def fate(self, number: int) -> str:
        if number < WARM_UP:
            return "ok"
        if number < WARM_UP + TOGETHER:
            return "hang"
        return CYCLE[(number - WARM_UP - TOGETHER) % len(CYCLE)]

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:  # requests on a kept-alive connection, one after the other
            try:
                await reader.readuntil(b"\r\n\r\n")  # a GET: no body
            except asyncio.IncompleteReadError:
                return
            number = self.arrived
            self.arrived += 1
            fate = self.fate(number)
            self.got[fate] += 1
            if number == WARM_UP - 1:
                self.all_there.set()
            elif WARM_UP - TOGETHER <= number < WARM_UP:
                await self.all_there.wait()
            if fate == "hang":
                await reader.read()  # until the client gives up and hangs up
                return
            if fate == "reset":
                # Closed with SO_LINGER 0: the client gets a RST, not an answer.
                sock = writer.get_extra_info("socket")
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                return
            status = b"200 OK" if fate == "ok" else b"500 Internal Server Error"
            writer.write(b"HTTP/1.1 " + status + b"\r\nContent-Length: 2\r\n\r\nok")
            await writer.drain()


async def test_a_receiver_that_answers_85_percent_keeps_its_circuit_closed(
    db: asyncpg.Connection, producer: Producer, settings: Settings
) -> None:
    """Five requests that hung together time out in the same instant, after twenty
    answers: not a destination that is down. No circuit opens, and every delivery settles
    within twice its retry schedule: from when it was published to the end of its last
    attempt, at most twice every wait of the schedule plus every attempt taking the whole
    request timeout."""
    mostly = Mostly()
    total = 80
    tuned = settings.model_copy(
        update={
            # The breaker as deployed: 5 failures, 30 s open.
            "circuit_failures": Settings.model_fields["circuit_failures"].default,
            "circuit_open_seconds": Settings.model_fields["circuit_open_seconds"].default,
            "destination_max_in_flight": Settings.model_fields["destination_max_in_flight"].default,
            # Five jobs at once: the five that hang are all that is in flight, so nothing
            # answers between their timeouts.
            "max_jobs": TOGETHER,
            "request_timeout": 1.0,
            "connect_timeout": 0.5,
            "job_timeout": 3.0,
            "retry_schedule": "200ms,400ms,800ms",
        }
    )
    schedule = tuned.schedule
    bound = timedelta(seconds=2 * (sum(schedule) + (len(schedule) + 1) * tuned.request_timeout))
    batch = _events("mostly", total)
    event_ids = [data["id"] for data in batch]

    async def settled(within: float) -> list[asyncpg.Record]:
        deadline = time.monotonic() + within
        while True:
            rows = await db.fetch(
                "SELECT d.state,"
                " max(a.started_at + a.duration_ms * interval '1 millisecond') AS settled_at"
                " FROM deliveries d JOIN attempts a ON a.delivery_id = d.id"
                " WHERE d.event_id = ANY($1::text[]) AND d.state IN ('delivered', 'dead')"
                " GROUP BY d.id",
                event_ids,
            )
            if len(rows) == total or time.monotonic() > deadline:
                return rows
            await asyncio.sleep(0.05)

    async with raw_server(mostly.handle) as url:
        await save_callback(db, "ann", "order.created", "GET", url + "/pb?o={{order.number}}")
        published = datetime.now(UTC)
        await producer.publish_many(batch)  # all queued before the worker starts
        async with running_worker(tuned):
            rows = await settled(bound.total_seconds() + 5)

    counters: dict[bytes, bytes] = await cast(
        Awaitable[dict[bytes, bytes]],
        producer.redis.hgetall(metrics_keys(settings.queue_name).counters),
    )
    slowest = max(row["settled_at"] for row in rows) - published
    print(
        f"\n85 % receiver: {mostly.arrived} requests, {mostly.got['ok'] / mostly.arrived:.0%}"
        f" answered 200 ({dict(mostly.got)}); deliveries {dict(Counter(r['state'] for r in rows))};"
        f" the slowest settled {slowest.total_seconds():.1f} s after it was published"
        f" (bound {bound.total_seconds():g} s); circuit opened"
        f" {int(counters.get(b'circuit:opened', b'0'))} times"
    )
    assert len(rows) == total, "not every delivery settled"
    assert mostly.got["hang"] > TOGETHER
    assert mostly.got["reset"] >= 1
    assert mostly.got["error"] >= 1
    assert b"circuit:opened" not in counters
    assert b"deferred:circuit_open" not in counters
    assert slowest <= bound
