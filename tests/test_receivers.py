"""Receivers that misbehave on purpose, and what the relay does about each.

Affiliates' servers are not ours: some drip their answer a byte at a time, some send
gigabytes, some redirect forever, some answer binary junk, some take the connection and
never answer at all. The README promises a bounded request (total timeout), a
bounded read (64 KiB), at most 3 redirects and a stored excerpt whatever the bytes; these
tests hold the relay to that against real sockets on 127.0.0.1. aiohttp's own server is too
well behaved for most of it (it always frames its answers properly), so the worst ones are
raw asyncio servers that write whatever bytes the test wants.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field

import aiohttp
import asyncpg
import pytest
from aiohttp import web

from ops.cli.demo import serve
from producer import Producer
from tests.support.events import event_data, save_callback
from tests.support.ledger import delivery
from tests.support.receivers import HostsFile, raw_server
from tests.support.wait import until
from tests.support.workers import drain
from worker import address, deliver
from worker.config import Settings
from worker.exchange import Request

LOOPBACK = address.parse_networks("127.0.0.1/32")
HUGE = 100 * 1024 * 1024
"""What the huge receivers announce and would send if nobody stopped reading."""

CHUNK = 64 * 1024


async def read_head(reader: asyncio.StreamReader) -> bytes:
    """The request line and headers; the relay's requests here have no body worth reading."""
    return await reader.readuntil(b"\r\n\r\n")


@contextlib.asynccontextmanager
async def session(request_timeout: float) -> AsyncIterator[aiohttp.ClientSession]:
    """The worker's own session, with loopback opened so it may reach these receivers."""
    http = deliver.session(1.0, request_timeout, LOOPBACK)
    try:
        yield http
    finally:
        await http.close()


def get(url: str) -> Request:
    return Request("GET", url, {"User-Agent": deliver.USER_AGENT}, None)


async def _only_attempt(conn: asyncpg.Connection, event_id: str) -> asyncpg.Record:
    rows = await conn.fetch(
        """
        SELECT a.* FROM attempts a JOIN deliveries d ON d.id = a.delivery_id
        WHERE d.event_id = $1 ORDER BY a.number
        """,
        event_id,
    )
    assert len(rows) == 1, f"{len(rows)} attempts recorded for {event_id}"
    return rows[0]


def order(number: str) -> dict[str, str]:
    # Deliveries of one affiliate's order go one after another; tests that need them all in
    # flight at once give each event an order of its own.
    return {"number": number, "amount": "10.50", "commission": "1.05"}


# -- slow drip: a body that never ends, one byte at a time ---------------------------------


@dataclass
class Drip:
    url: str = ""
    sent: int = 0
    gone: asyncio.Event = field(default_factory=asyncio.Event)
    """Set when the client has hung up (a write failed)."""

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_head(reader)
        # A body announced as a megabyte keeps the client reading; every byte arrives well
        # within any per-read timeout, so only a deadline on the whole request stops it.
        writer.write(
            b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 1000000\r\n\r\n"
        )
        try:
            while True:
                writer.write(b".")
                await writer.drain()
                self.sent += 1
                await asyncio.sleep(0.2)
        except ConnectionError:
            self.gone.set()
            raise


@pytest.fixture
async def drip() -> AsyncIterator[Drip]:
    state = Drip()
    async with raw_server(state.handle) as url:
        state.url = url
        yield state


async def test_a_body_dripped_a_byte_at_a_time_is_cut_at_the_request_timeout(drip: Drip) -> None:
    async with session(request_timeout=1.0) as http:
        started = time.perf_counter()
        # The guard only turns a hang into a failure; the session's own timeout must fire first.
        async with asyncio.timeout(10):
            outcome = await deliver.attempt(http, get(drip.url + "/pb"))
        took = time.perf_counter() - started

    print(f"\nslow drip cut after {took * 1000:.0f} ms, {drip.sent} bytes dripped")
    assert (outcome.status, outcome.error_class) == (None, "timeout")
    assert 0.9 <= took < 3.0
    assert 900 <= outcome.duration_ms < 3000
    assert 3 <= drip.sent <= 10  # it was dripping the whole time, not stalled
    # The relay hung up rather than leaving the socket to the receiver: its next byte fails.
    async with asyncio.timeout(2):
        await drip.gone.wait()


async def test_a_dripping_receiver_is_recorded_as_a_timeout_in_the_ledger(
    db: asyncpg.Connection, producer: Producer, settings: Settings, drip: Drip
) -> None:
    await save_callback(db, "ann", "order.created", "GET", drip.url + "/pb?o={{order.number}}")
    data = event_data("drip")
    await producer.publish(data)
    started = time.perf_counter()
    async with asyncio.timeout(15):
        await drain(settings.model_copy(update={"request_timeout": 1.0, "retry_schedule": ""}))
    assert time.perf_counter() - started < 5

    row = await delivery(db, data["id"])
    attempt = await _only_attempt(db, data["id"])
    assert (row["state"], row["error_class"]) == ("dead", "timeout")
    assert attempt["status_code"] is None
    assert 900 <= attempt["duration_ms"] < 3000


# -- huge bodies: 100 MiB offered, 64 KiB read -------------------------------------------


@dataclass
class Firehose:
    """Answers 200 and writes 100 MiB of zeros as fast as the socket takes them."""

    chunked: bool
    url: str = ""
    written: int = 0
    """Body bytes the socket accepted before the client hung up."""
    done: asyncio.Event = field(default_factory=asyncio.Event)

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_head(reader)
        framing = b"Transfer-Encoding: chunked" if self.chunked else b"Content-Length: %d" % HUGE
        writer.write(
            b"HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\n%s\r\n\r\n" % framing
        )
        zeros = bytes(CHUNK)
        frame = b"%x\r\n%s\r\n" % (CHUNK, zeros) if self.chunked else zeros
        try:
            while self.written < HUGE:
                writer.write(frame)
                # drain() waits while the socket is full: `written` is what the client's
                # kernel and ours took, give or take the transport's own 64 KiB buffer.
                await writer.drain()
                self.written += CHUNK
            if self.chunked:
                writer.write(b"0\r\n\r\n")
                await writer.drain()
        finally:
            self.done.set()


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
async def test_a_100_mib_body_is_read_to_64_kib_and_the_connection_dropped(
    chunked: bool,
) -> None:
    firehose = Firehose(chunked)
    async with raw_server(firehose.handle) as url, session(request_timeout=10.0) as http:
        started = time.perf_counter()
        outcome = await deliver.attempt(http, get(url + "/big"))
        took = time.perf_counter() - started
        # The receiver learns the client is gone at its next write after the close.
        async with asyncio.timeout(5):
            await firehose.done.wait()

    assert outcome.status == 200
    assert outcome.error_class is None
    # Exactly the cap, and the NULs stored as replacement characters.
    assert outcome.excerpt == "\ufffd" * deliver.BODY_LIMIT
    assert took < 2.0
    # Socket buffers on both ends hold a few MiB at most; reading on would have taken it all.
    assert firehose.written < 16 * 1024 * 1024, f"receiver wrote {firehose.written} bytes"
    print(f"\n{'chunked' if chunked else 'content-length'}: receiver wrote {firehose.written} B")


# -- redirects: 3 hops followed, the 4th refused --------------------------------------------


@dataclass
class Bouncer:
    """Redirects to itself (`/next?n=k`) `hops` times, then answers 200; forever if None."""

    hops: int | None
    status: int = 302
    paths: list[str] = field(default_factory=list)

    async def handle(self, request: web.Request) -> web.Response:
        self.paths.append(request.path_qs)
        n = int(request.query.get("n", "0"))
        if self.hops is None or n < self.hops:
            return web.Response(status=self.status, headers={"Location": f"/next?n={n + 1}"})
        return web.Response(text="landed")


@pytest.mark.parametrize("status", [301, 302, 303, 307, 308])
async def test_a_redirect_loop_stops_after_three_hops(status: int) -> None:
    bouncer = Bouncer(hops=None, status=status)
    async with serve(bouncer.handle) as url, session(request_timeout=5.0) as http:
        outcome = await deliver.attempt(http, get(url + "/pb"))

    assert (outcome.status, outcome.error_class) == (None, "too_many_redirects")
    # The original request and three hops; the fourth Location is never requested.
    assert bouncer.paths == ["/pb", "/next?n=1", "/next?n=2", "/next?n=3"]


async def test_three_redirects_then_200_is_a_success() -> None:
    bouncer = Bouncer(hops=3)
    async with serve(bouncer.handle) as url, session(request_timeout=5.0) as http:
        outcome = await deliver.attempt(http, get(url + "/next?n=0"))

    assert (outcome.status, outcome.error_class, outcome.excerpt) == (200, None, "landed")
    assert bouncer.paths == ["/next?n=0", "/next?n=1", "/next?n=2", "/next?n=3"]


# -- binary answers: stored as text Postgres accepts --------------------------------------


async def test_a_binary_answer_with_nuls_is_stored_as_text_and_delivered(
    db: asyncpg.Connection, producer: Producer, settings: Settings
) -> None:
    valid = "h\u00e9llo \u2713".encode()

    async def binary(request: web.Request) -> web.Response:
        return web.Response(body=bytes(range(256)) + valid, content_type="application/octet-stream")

    async with serve(binary) as url:
        await save_callback(db, "ann", "order.created", "GET", url + "/pb?o={{order.number}}")
        data = event_data("binary")
        await producer.publish(data)
        await drain(settings)

    row = await delivery(db, data["id"])
    attempt = await _only_attempt(db, data["id"])
    assert (row["state"], attempt["status_code"]) == ("delivered", 200)
    stored = attempt["response_excerpt"]
    assert "\x00" not in stored
    # NUL cannot go into Postgres text; 0x80-0xFF on their own are not UTF-8, and no two of
    # them in a row make a valid sequence, so each is one replacement character. ASCII and
    # the valid UTF-8 after them come through as sent.
    ascii_ = "".join(chr(b) for b in range(1, 128))
    assert stored == "\ufffd" + ascii_ + "\ufffd" * 128 + "h\u00e9llo \u2713"


# -- a receiver that takes connections and never answers ----------------------------------


@dataclass
class Hog:
    """Reads each request and then holds the connection, answering nothing, until the client
    hangs up."""

    url: str = ""
    arrived: list[float] = field(default_factory=list)
    open: int = 0
    want: int = 0
    holding: asyncio.Event = field(default_factory=asyncio.Event)
    """Set once `want` connections are held."""

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_head(reader)
        self.arrived.append(time.monotonic())
        self.open += 1
        if self.open >= self.want:
            self.holding.set()
        try:
            await reader.read()  # returns at EOF: the client gave up
        finally:
            self.open -= 1


@pytest.fixture
async def hog() -> AsyncIterator[Hog]:
    state = Hog()
    async with raw_server(state.handle) as url:
        state.url = url
        yield state


@dataclass
class Good:
    url: str = ""
    arrived: list[float] = field(default_factory=list)

    async def handle(self, request: web.Request) -> web.Response:
        self.arrived.append(time.monotonic())
        return web.Response(text="thanks")


@pytest.fixture
async def good() -> AsyncIterator[Good]:
    state = Good()
    async with serve(state.handle) as url:
        state.url = url
        yield state


async def test_a_hogging_receiver_does_not_hold_up_deliveries_to_others(
    db: asyncpg.Connection, producer: Producer, settings: Settings, hog: Hog, good: Good
) -> None:
    request_timeout = 3.0
    hogged = settings.model_copy(
        update={
            "request_timeout": request_timeout,
            "max_jobs": 40,
            "retry_schedule": "",
            # Out of the way: this is about connections, the cap and the circuit breaker
            # have tests of their own (test_fairness).
            "destination_max_in_flight": 20,
            "circuit_failures": 100,
        }
    )
    await save_callback(db, "hog", "order.created", "GET", hog.url + "/pb?o={{order.number}}")
    await save_callback(db, "ok", "order.created", "GET", good.url + "/pb?o={{order.number}}")
    # The hog's events first, so its requests are already holding connections when the
    # good affiliate's jobs start.
    hogs = [event_data(f"hog{n}", affiliate_id="hog", order=order(f"H{n}")) for n in range(20)]
    oks = [event_data(f"ok{n}", affiliate_id="ok", order=order(f"K{n}")) for n in range(5)]
    await producer.publish_many([*hogs, *oks])

    async def oks_delivered() -> bool:
        count = await db.fetchval(
            "SELECT count(*) FROM deliveries WHERE affiliate_id = 'ok' AND state = 'delivered'"
        )
        return bool(count == len(oks))

    worker = asyncio.create_task(drain(hogged))
    try:
        await until(oks_delivered, within=request_timeout)
        # Recorded delivered while every hog request is still waiting for its answer.
        assert hog.open == len(hogs)
        async with asyncio.timeout(15):
            await worker
    finally:
        if not worker.done():
            worker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await worker

    assert len(good.arrived) == len(oks)
    assert len(hog.arrived) == len(hogs)
    latency = max(good.arrived) - min(hog.arrived)
    print(f"\nok deliveries all arrived {latency * 1000:.0f} ms after the first hog request")
    assert latency < request_timeout / 2
    # Nothing lost: each hog delivery is recorded, as a timeout, after one full timeout.
    for data in hogs:
        row = await delivery(db, data["id"])
        attempt = await _only_attempt(db, data["id"])
        assert (row["state"], row["error_class"]) == ("dead", "timeout")
        assert request_timeout * 1000 * 0.9 <= attempt["duration_ms"] < request_timeout * 2000
    for data in oks:
        assert (await delivery(db, data["id"]))["state"] == "delivered"
    assert hog.open == 0  # and the relay hung up on every one of them


async def test_200_requests_held_by_a_hog_leave_the_session_free_for_others(
    hog: Hog, good: Good
) -> None:
    held = 200
    hog.want = held
    async with session(request_timeout=2.0) as http:
        # A pool-wide cap (aiohttp's default is 100) would queue every other receiver's
        # request behind the hog's.
        assert isinstance(http.connector, aiohttp.TCPConnector)
        assert http.connector.limit == 0
        assert http.connector.limit_per_host == 0
        stuck = [
            asyncio.create_task(deliver.attempt(http, get(f"{hog.url}/pb?n={n}")))
            for n in range(held)
        ]
        try:
            # Bounded: were the session capped, they would never all arrive, and the slow
            # good request below is what should fail the test, not this wait.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(1.5):
                    await hog.holding.wait()
            started = time.perf_counter()
            outcome = await deliver.attempt(http, get(good.url + "/pb"))
            took = time.perf_counter() - started
            still_held = hog.open
        finally:
            outcomes = await asyncio.gather(*stuck)

    print(f"\ngood request took {took * 1000:.0f} ms with {held} held by the hog")
    assert (outcome.status, outcome.excerpt) == (200, "thanks")
    assert took < 0.5
    assert still_held == held  # the good one went through while the hog held every one
    assert {o.error_class for o in outcomes} == {"timeout"}


@pytest.mark.unit
async def test_a_stored_url_the_http_client_cannot_read_fails_without_a_crash() -> None:
    # Saved before the template check refused such hosts: the job must record a failure.
    http = deliver.session(1.0, 2.0, LOOPBACK)
    try:
        outcome = await deliver.attempt(http, Request("GET", "https://[::1]x/p", {}, None))
    finally:
        await http.close()
    assert (outcome.status, outcome.error_class) == (None, "invalid_url")


# -- a receiver that cuts off a reused connection: every request is an attempt -------------


@dataclass
class OneRequestPerConnection:
    """Answers the first request on a connection and keeps it alive; reads the next request
    on that connection and ends it unanswered, as a receiver whose keep-alive timeout races
    the reuse does."""

    reset: bool
    """End with a TCP reset rather than a plain close."""
    url: str = ""
    read: int = 0
    """Every request that reached the receiver, answered or not."""
    cut_off: int = 0

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await self._read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: keep-alive\r\n\r\nok")
        await writer.drain()
        await self._read_request(reader)
        self.cut_off += 1
        if self.reset:
            writer.transport.abort()
        # Otherwise raw_server closes the connection when this returns.

    async def _read_request(self, reader: asyncio.StreamReader) -> None:
        head = await read_head(reader)
        length = next(
            (
                int(line.split(b":", 1)[1])
                for line in head.split(b"\r\n")
                if line.lower().startswith(b"content-length:")
            ),
            0,
        )
        await reader.readexactly(length)
        self.read += 1


@pytest.mark.parametrize("ending", ["close", "reset"])
@pytest.mark.parametrize("method", ["GET", "POST"])
async def test_every_request_a_receiver_reads_is_an_attempt_in_the_ledger(
    db: asyncpg.Connection, producer: Producer, settings: Settings, method: str, ending: str
) -> None:
    # One job at a time: each request finds the connection the one before it left in the
    # pool, so every second request on a connection is one the receiver cuts off.
    one_at_a_time = settings.model_copy(update={"max_jobs": 1})
    receiver = OneRequestPerConnection(reset=ending == "reset")
    async with raw_server(receiver.handle) as url:
        await save_callback(db, "ann", "order.created", method, url + "/pb?o={{order.number}}")
        await producer.publish_many(
            [event_data(f"wire{n}", order=order(f"W{n}")) for n in range(6)]
        )
        await drain(one_at_a_time)

    attempts = await db.fetchval("SELECT count(*) FROM attempts")
    print(
        f"\n{method}, {ending}: the receiver read {receiver.read} requests "
        f"({receiver.cut_off} cut off); the ledger has {attempts} attempts"
    )
    assert receiver.cut_off > 0  # connections were reused, so the test tests something
    assert attempts == receiver.read
    # Each cut-off request is a failed attempt of its own, retried like any other.
    answered = await db.fetchval("SELECT count(*) FROM attempts WHERE status_code = 200")
    failed = await db.fetch("SELECT error_class FROM attempts WHERE status_code IS NULL")
    assert answered == receiver.read - receiver.cut_off
    assert [row["error_class"] for row in failed] == ["http_error"] * receiver.cut_off
    # ... and a transient one: its delivery tried again, on the schedule.
    assert await db.fetchval("SELECT count(*) FROM deliveries WHERE attempts > 1") > 0


# -- cookies: none kept, so none travels from one receiver to another ----------------------


async def test_a_cookie_a_receiver_sets_is_never_sent_back_nor_to_another_receiver() -> None:
    """Two receivers under one name, as two endpoints of one tracking platform. Cookies
    ignore the port, so a cookie jar would send a's cookie to a again and to b; the
    worker's one session, shared by every delivery, must keep none."""
    got: list[tuple[str, str | None]] = []

    def receiver(name: str, sets_cookie: bool) -> Callable[[web.Request], Awaitable[web.Response]]:
        async def handle(request: web.Request) -> web.Response:
            got.append((name, request.headers.get("Cookie")))
            headers = {"Set-Cookie": "s=1; Path=/"} if sets_cookie else {}
            return web.Response(text="ok", headers=headers)

        return handle

    # A name, not 127.0.0.1: aiohttp's cookie jar takes no cookie from an IP address.
    hosts = HostsFile({"track.example": [["127.0.0.1"]]})
    async with serve(receiver("a", True)) as a, serve(receiver("b", False)) as b:
        http = deliver.session(1.0, 3.0, LOOPBACK, hosts)
        try:
            outcomes = [
                await deliver.attempt(http, get(url.replace("127.0.0.1", "track.example") + "/pb"))
                for url in (a, a, b)
            ]
        finally:
            await http.close()

    assert [outcome.status for outcome in outcomes] == [200, 200, 200]
    assert ("Set-Cookie", "s=1; Path=/") in outcomes[0].headers  # a did set one
    assert got == [("a", None), ("a", None), ("b", None)]
