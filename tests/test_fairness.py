"""Fairness between destinations: the per-destination cap and the circuit breaker.

The bookkeeping is plain functions of the time, tested first; then a real worker against
real receivers: the receiver counts what is in flight, and the ledger shows that a
deferred delivery spent no attempt.
"""

from __future__ import annotations

import asyncio
import random
import socket
import time
from collections.abc import Awaitable
from dataclasses import dataclass
from typing import Any, cast

import asyncpg
import pytest
from aiohttp import web

from ops.demo import serve
from producer import Producer, parse_event
from tests.conftest import drain, event_data, save_callback
from worker import fairness, ledger
from worker.config import Settings
from worker.deliver import Outcome, delivery_id

ORIGIN = "https://t.example:443"


def _destinations(cap: int = 2, failures: int = 3) -> fairness.Destinations:
    return fairness.Destinations(
        max_in_flight=cap,
        failures=failures,
        open_seconds=30.0,
        max_open_seconds=100.0,
        rng=random.Random(1),
    )


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


def test_a_failed_probe_opens_the_circuit_for_twice_as_long_up_to_the_limit() -> None:
    places = _destinations(failures=1)
    assert _fail(places, 0.0) == "opened"  # open until 30
    now = 30.0
    for opened_for in (60.0, 100.0, 100.0):
        assert _fail(places, now) == "opened"  # the probe failed
        assert isinstance(places.admit(ORIGIN, now + opened_for - 0.1), fairness.Defer)
        now += opened_for
    assert isinstance(places.admit(ORIGIN, now), fairness.Slot)


@pytest.mark.parametrize("answer", [ANSWERED_404, ANSWERED_503])
def test_an_answer_even_an_error_resets_the_count_and_a_cancelled_probe_lets_another_go(
    answer: Outcome,
) -> None:
    places = _destinations(failures=2)
    assert _fail(places, 0.0) is None
    for _ in range(5):
        slot = places.admit(ORIGIN, 0.0)
        assert isinstance(slot, fairness.Slot)
        # The receiver answered: it is up, and its errors are its deliveries' own business.
        assert places.release(slot, answer, 0.0) is None
    assert not places.is_open(ORIGIN)
    assert _fail(places, 0.0) is None  # the count started again
    assert _fail(places, 0.0) == "opened"
    probe = places.admit(ORIGIN, 30.0)
    assert isinstance(probe, fairness.Slot)
    assert places.release(probe, None, 30.0) is None  # stopped before an answer
    again = places.admit(ORIGIN, 30.0)
    assert isinstance(again, fairness.Slot)
    assert again.probe


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
    with socket.socket() as probe:  # a port where nothing listens, yet
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    await save_callback(db, "ann", "order.created", "GET", url + "/pb?o={{order.number}}")
    await producer.publish_many(_events("cb", 6))
    tuned = settings.model_copy(
        update={
            "destination_max_in_flight": 1,  # one at a time, so the count is exact
            "circuit_failures": 2,
            "circuit_open_seconds": 1.0,
            "retry_schedule": "100ms,100ms,100ms",
        }
    )
    counting = Counting()

    async def attempts_made() -> int:
        made: int = await db.fetchval("SELECT coalesce(sum(attempts), 0) FROM deliveries")
        return made

    async def recover() -> None:
        # Two attempts could not connect, and opened the circuit. The receiver comes up
        # while it is open: only the probe can find out.
        deadline = time.monotonic() + 10
        while await attempts_made() < 2:
            assert time.monotonic() < deadline, "the circuit never opened"
            await asyncio.sleep(0.01)
        async with serve(counting.handle, port=port):
            await worker
        assert await attempts_made() == 2 + 6

    worker = asyncio.ensure_future(drain(tuned))
    await recover()
    # Six deliveries and two failed attempts: the deliveries put off while the circuit
    # was open spent none.
    assert counting.answered == 6
    assert sum((await _attempts(db)).values()) == 8
    counters: dict[bytes, bytes] = await cast(
        Awaitable[dict[bytes, bytes]],
        producer.redis.hgetall(f"{settings.queue_name}:metrics"),
    )
    assert counters[b"circuit:opened"] == b"1"
    assert counters[b"circuit:closed"] == b"1"
    assert int(counters[b"deferred:circuit_open"]) >= 1


def test_a_delivery_that_waited_before_waits_longer_up_to_about_a_minute() -> None:
    places = _destinations(cap=1)
    assert isinstance(places.admit(ORIGIN, 0.0), fairness.Slot)
    waits = []
    for runs in (0, 1, 2, 5, 9):
        held = places.admit(ORIGIN, 0.0, runs)
        assert isinstance(held, fairness.Defer)
        waits.append(held.seconds / fairness.AT_CAP_SECONDS)
    for wait, doubled in zip(waits, (1, 2, 4, 32, 32), strict=True):
        assert doubled <= wait <= doubled * 1.5


def test_a_probe_stopped_before_the_wire_neither_closes_nor_reopens_the_circuit() -> None:
    places = _destinations(failures=1)
    assert _fail(places, 0.0) == "opened"
    probe = places.admit(ORIGIN, 30.0)
    assert isinstance(probe, fairness.Slot)
    refused = Outcome(None, 0.1, "blocked_address", "10.0.0.1 is a refused address (private)")
    assert places.release(probe, refused, 30.0) is None
    assert places.is_open(ORIGIN)
    assert isinstance(places.admit(ORIGIN, 30.0), fairness.Slot)  # another probe may go


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
    assert later.blocker == ledger.Blocker(delivery_id(create), create.id)


def _put_off(places: fairness.Destinations, now: float, count: int) -> list[float]:
    waits = []
    for _ in range(count):
        held = places.admit(ORIGIN, now)
        assert isinstance(held, fairness.Defer)
        assert held.reason == "at_cap"
        waits.append(held.seconds)
    return waits


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
    assert max(waits) <= fairness.MAX_AT_CAP_SECONDS * 1.5
    assert sorted(waits[::10]) == waits[::10]


def test_at_a_busy_quick_destination_the_put_off_wait_stays_short() -> None:
    places = _destinations(cap=2)
    first = places.admit(ORIGIN, 0.0)
    assert isinstance(first, fairness.Slot)
    assert isinstance(places.admit(ORIGIN, 0.0), fairness.Slot)
    places.release(first, Outcome(200, 5.0), 0.5)
    assert isinstance(places.admit(ORIGIN, 0.5), fairness.Slot)  # a request just started
    waits = _put_off(places, 1.0, 40)
    assert max(waits) <= fairness.AT_CAP_SECONDS * 1.5
