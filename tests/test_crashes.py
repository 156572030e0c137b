"""A worker process stopped the hard way: killed, told to stop, its database cut off.

Each test runs `postback worker` as a subprocess on the run's real Postgres and Redis, with
a real receiver on 127.0.0.1 in the test's event loop, and judges the outcome as a user
would: what the receiver got (every Idempotency-Key, how often), what the ledger says, the
exit code, and the worker's log lines on stderr.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import io
import secrets
import signal
import sys
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import asyncpg
import pytest
import structlog
from aiohttp import web

from ops.cli.demo import serve
from producer import Producer
from producer.queue import job_id
from tests.support.events import event_data, events, publish, save_callback
from tests.support.ledger import ledger, settled, states
from tests.support.logs import relay_logs
from tests.support.servers import database_name
from tests.support.wait import until
from tests.support.workers import WorkerProcess, kill_hard, worker_process, worker_settings
from worker.config import Settings

# --- a receiver that records every Idempotency-Key ---------------------------------------


@dataclass(frozen=True)
class Hit:
    key: str
    event_id: str


@dataclass
class Hits:
    """What the receiver saw, in arrival order."""

    arrived: list[Hit] = field(default_factory=list)
    answered: list[Hit] = field(default_factory=list)

    def record(self, request: web.Request) -> Hit:
        hit = Hit(request.headers["Idempotency-Key"], request.query["e"])
        self.arrived.append(hit)
        return hit

    async def answer_after_10ms(self, request: web.Request) -> web.Response:
        """A receiver a little slow, so that many deliveries are in flight at once."""
        self.record(request)
        await asyncio.sleep(0.01)
        return web.Response(text="ok")

    def at_least(self, count: int) -> Callable[[], bool]:
        return lambda: len(self.arrived) >= count

    def keys(self) -> Counter[str]:
        return Counter(hit.key for hit in self.arrived)


PATH = "/pb?e={{event.id}}&o={{order.number}}"


@dataclass(frozen=True)
class Figures:
    lost: int
    """Events not delivered, or delivered in the ledger without the receiver seeing it."""
    repeats: int
    """Requests beyond the first for a key."""
    wrong_keys: list[Hit]
    """Requests whose Idempotency-Key is not the ledger's delivery id of their event."""


def figures(rows: dict[str, asyncpg.Record], event_ids: list[str], hits: Hits) -> Figures:
    seen = hits.keys()
    lost = sum(
        1
        for e in event_ids
        if e not in rows or rows[e]["state"] != "delivered" or rows[e]["id"] not in seen
    )
    wrong = [h for h in hits.arrived if h.event_id not in rows or rows[h.event_id]["id"] != h.key]
    return Figures(lost, sum(seen.values()) - len(seen), wrong)


# --- the tests ---------------------------------------------------------------------------


async def test_sigkill_mid_run_loses_nothing_and_repeats_keep_their_key(
    db: asyncpg.Connection, producer: Producer, settings: Settings, tmp_path: Path
) -> None:
    hits = Hits()

    total = 500
    chosen = worker_settings(settings)
    async with serve(hits.answer_after_10ms) as url:
        await save_callback(db, "ann", "order.created", "GET", url + PATH)
        event_ids = await publish(producer, events("kill", total))
        async with worker_process(chosen, tmp_path) as first:
            await until(hits.at_least(total // 3), 30, "a third arrived")
            await kill_hard(first)
        arrived_at_kill = len(hits.arrived)
        before = states(await ledger(db, event_ids), event_ids)
        assert before["delivered"] < total, "the kill came too late to test anything"

        async with worker_process(chosen, tmp_path) as second:
            rows = await settled(db, event_ids, within=90)
            code, _ = await second.stop(within=chosen.shutdown_wait + 5)

    result = figures(rows, event_ids, hits)
    print(
        f"\nSIGKILL after {arrived_at_kill} of {total} requests arrived"
        f" ({before['delivered']} recorded delivered):"
        f" lost={result.lost} repeats={result.repeats}"
        f" requests={len(hits.arrived)} unique keys={len(hits.keys())}"
    )
    assert states(rows, event_ids) == {"delivered": total}
    assert result.lost == 0
    assert set(hits.keys()) == {row["id"] for row in rows.values()}
    assert result.wrong_keys == []
    # Only a request in flight at the kill can go out again, and only once.
    assert result.repeats <= chosen.max_jobs
    assert max(hits.keys().values()) <= 2
    assert code == 0
    assert second.errors() == []


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
async def test_sigterm_lets_in_flight_deliveries_finish(
    db: asyncpg.Connection,
    producer: Producer,
    settings: Settings,
    tmp_path: Path,
    signum: signal.Signals,
) -> None:
    """README: on SIGTERM (or Ctrl-C, which is SIGINT) a worker takes no new jobs and lets
    the deliveries in flight finish."""
    hits = Hits()

    async def slow(request: web.Request) -> web.Response:
        hit = hits.record(request)
        await asyncio.sleep(1.5)
        hits.answered.append(hit)
        return web.Response(text="ok")

    chosen = worker_settings(settings, shutdown_wait=5)
    async with serve(slow) as url:
        await save_callback(db, "ann", "order.created", "GET", url + PATH)
        event_ids = await publish(producer, events("term", 3))
        async with worker_process(chosen, tmp_path) as worker:
            await until(hits.at_least(3), 30, "all three in flight")
            code, took = await worker.stop(within=chosen.shutdown_wait + 3, signum=signum)

    assert code == 0
    assert took < chosen.shutdown_wait + 2
    rows = await ledger(db, event_ids)
    assert states(rows, event_ids) == {"delivered": 3}
    assert all(row["attempts"] == 1 for row in rows.values())
    assert hits.keys() == Counter({row["id"]: 1 for row in rows.values()})
    assert len(hits.answered) == 3
    assert sorted(r["event_id"] for r in worker.events("delivery_delivered")) == sorted(event_ids)
    for event in event_ids:  # done: nothing left queued to run again
        assert await producer.redis.zscore(producer.queue_name, job_id(event)) is None
    assert worker.errors() == []


async def test_sigterm_shorter_than_the_receiver_requeues_and_the_next_worker_delivers(
    db: asyncpg.Connection, producer: Producer, settings: Settings, tmp_path: Path
) -> None:
    hits = Hits()
    release = asyncio.Event()

    async def slow_the_first_time(request: web.Request) -> web.Response:
        hit = hits.record(request)
        if hits.keys()[hit.key] == 1:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(4):
                    await release.wait()
        hits.answered.append(hit)
        return web.Response(text="ok")

    # The request may take longer than the shutdown wait: it is cut by the shutdown.
    chosen = worker_settings(settings, shutdown_wait=1, request_timeout=5.0, job_timeout=6.0)
    async with serve(slow_the_first_time) as url:
        try:
            await save_callback(db, "ann", "order.created", "GET", url + PATH)
            event_ids = await publish(producer, events("cut", 3))
            async with worker_process(chosen, tmp_path) as first:
                await until(hits.at_least(3), 30, "all three in flight")
                code, took = await first.stop(within=10)
                assert code == 0
                assert took < chosen.shutdown_wait + 2  # the receiver needs 4 s
            cut = await ledger(db, event_ids)
            assert states(cut, event_ids) == {"pending": 3}
            assert all(row["claimed_by"] is None for row in cut.values())  # released
            for event in event_ids:  # back in the queue for the next worker
                assert await producer.redis.zscore(producer.queue_name, job_id(event)) is not None

            async with worker_process(chosen, tmp_path) as second:
                rows = await settled(db, event_ids, within=30)
                code, _ = await second.stop(within=chosen.shutdown_wait + 5)
        finally:
            release.set()

    assert code == 0
    assert states(rows, event_ids) == {"delivered": 3}
    result = figures(rows, event_ids, hits)
    assert result.lost == 0
    assert result.wrong_keys == []
    # Each was sent twice, with the same key: the cut request, then the one that landed.
    assert hits.keys() == Counter({row["id"]: 2 for row in rows.values()})
    assert first.errors() == []
    assert second.errors() == []


async def test_postgres_connections_cut_mid_run_lose_nothing(
    db: asyncpg.Connection,
    producer: Producer,
    settings: Settings,
    database_url: str,
    admin_url: str,
    tmp_path: Path,
) -> None:
    hits = Hits()

    total = 200
    name = database_name(database_url)
    own = await db.fetchval("SELECT pg_backend_pid()")
    admin = await asyncpg.connect(admin_url)
    terminated: list[int] = []
    chosen = worker_settings(settings)
    try:
        async with serve(hits.answer_after_10ms) as url:
            await save_callback(db, "ann", "order.created", "GET", url + PATH)
            event_ids = await publish(producer, events("pgcut", total))
            async with worker_process(chosen, tmp_path) as worker:
                for share in (4, 2):  # cut after a quarter has arrived, and after half
                    await until(hits.at_least(total // share), 60, f"1/{share} arrived")
                    cut = await admin.fetchval(
                        "SELECT count(*) FILTER (WHERE gone) FROM ("
                        " SELECT pg_terminate_backend(pid) AS gone FROM pg_stat_activity"
                        " WHERE datname = $1 AND pid <> $2) AS cut",
                        name,
                        own,
                    )
                    terminated.append(cut)
                rows = await settled(db, event_ids, within=30)
                code, _ = await worker.stop(within=chosen.shutdown_wait + 5)
    finally:
        await admin.close()

    result = figures(rows, event_ids, hits)
    print(
        f"\npg_terminate_backend mid-run: backends cut {terminated},"
        f" database_failed logged {len(worker.events('database_failed'))} times,"
        f" lost={result.lost} repeats={result.repeats}"
    )
    assert all(cut > 0 for cut in terminated), "the worker had no connection to cut"
    assert states(rows, event_ids) == {"delivered": total}, worker.about(
        e for e in event_ids if e not in rows or rows[e]["state"] != "delivered"
    )
    assert result.lost == 0
    assert result.wrong_keys == []
    assert set(hits.keys()) == {row["id"] for row in rows.values()}
    assert code == 0
    assert worker.errors() == []


async def test_logs_are_json_lines_with_the_outcome_and_never_a_secret(
    db: asyncpg.Connection, producer: Producer, settings: Settings, tmp_path: Path
) -> None:
    secret = "whsec_" + base64.b64encode(secrets.token_bytes(24)).decode()
    token = "SeCrEt123"
    signatures: list[str] = []
    paths: list[str] = []

    async def receive(request: web.Request) -> web.Response:
        paths.append(request.raw_path)
        if request.path == "/missing":
            return web.Response(status=404, text="no such page")
        signatures.append(request.headers["webhook-signature"])
        if len(signatures) == 1:  # the signed one fails once, so it is logged retrying too
            return web.Response(status=503, text="busy")
        return web.Response(text="ok")

    chosen = worker_settings(settings)
    async with serve(receive) as url:
        await save_callback(db, "gone", "order.created", "GET", url + "/missing?o={{order.number}}")
        await save_callback(
            db,
            "bob",
            "order.created",
            "POST",
            url + f"/hook?token={token}&o={{{{order.number}}}}",
            secret=secret,
        )
        missing = event_data("log404", affiliate_id="gone")
        signed = event_data(
            "logpost", affiliate_id="bob", order={**missing["order"], "number": "#2"}
        )
        event_ids = await publish(producer, [missing, signed])
        async with worker_process(chosen, tmp_path) as worker:
            rows = await settled(db, event_ids, within=30)
            code, _ = await worker.stop(within=chosen.shutdown_wait + 5)

    assert code == 0
    assert states(rows, event_ids) == {"dead": 1, "delivered": 1}
    assert worker.stderr, "the worker logged nothing"
    assert worker.plain() == []

    [dead] = worker.events("delivery_dead")
    assert dead["event_id"] == missing["id"]
    assert dead["delivery_id"] == rows[missing["id"]]["id"]
    assert dead["affiliate"] == "gone"
    assert dead["attempt"] == 1
    assert dead["status_code"] == 404
    assert dead["state"] == "dead"
    assert dead["duration_ms"] > 0
    assert dead["level"] == "warning"
    # An answer, not an error: the attempt's error_class is null (the ledger's delivery
    # says http_4xx); test_a_garbled_answer_does_not_put_the_url_token_in_the_logs has one.
    assert (dead["outcome"], dead["error_class"], dead["host"]) == ("permanent", None, "127.0.0.1")
    [retrying] = worker.events("delivery_retrying")
    assert (retrying["event_id"], retrying["status_code"]) == (signed["id"], 503)
    assert retrying["delivery_id"] == rows[signed["id"]]["id"]
    assert retrying["affiliate"] == "bob"
    assert retrying["attempt"] == 1
    assert (retrying["outcome"], retrying["error_class"]) == ("transient", None)
    assert retrying["duration_ms"] > 0
    assert retrying["host"] == "127.0.0.1"
    [delivered] = worker.events("delivery_delivered")
    assert delivered["event_id"] == signed["id"]
    assert delivered["delivery_id"] == rows[signed["id"]]["id"]
    assert delivered["affiliate"] == "bob"
    assert delivered["attempt"] == 2
    assert delivered["status_code"] == 200
    assert (delivered["outcome"], delivered["error_class"]) == ("success", None)
    assert delivered["duration_ms"] > 0
    assert delivered["host"] == "127.0.0.1"

    # The secrets did go out (so their absence from the logs means something) ...
    assert len(signatures) == 2
    assert any(f"token={token}" in path for path in paths)
    # ... and none of them is in anything the worker wrote.
    key = secret.removeprefix("whsec_")
    hidden = [secret, key, token, *signatures, *(s.removeprefix("v1,") for s in signatures)]
    leaked = leaks(worker, hidden)
    assert not leaked, "".join(leaked)


def leaks(worker: WorkerProcess, hidden: list[str]) -> list[str]:
    """The lines of the worker's output that hold any of the `hidden` values."""
    return [line for line in worker.stderr + worker.stdout if any(v in line for v in hidden)]


async def test_a_garbled_answer_does_not_put_the_url_token_in_the_logs(
    db: asyncpg.Connection, producer: Producer, settings: Settings, tmp_path: Path
) -> None:
    token = "SeCrEt123"
    heads: list[bytes] = []

    async def garbled(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        heads.append(await reader.readuntil(b"\r\n\r\n"))
        writer.write(b"HTTP/1.1 2OO OK\r\nContent-Length: 0\r\n\r\n")  # not a status code
        with contextlib.suppress(ConnectionError):
            await writer.drain()
            writer.close()
            await writer.wait_closed()

    server = await asyncio.start_server(garbled, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    chosen = worker_settings(settings)
    try:
        await save_callback(
            db,
            "bob",
            "order.created",
            "GET",
            f"http://127.0.0.1:{port}/pb?token={token}&o={{{{order.number}}}}",
        )
        data = event_data("garbled", affiliate_id="bob")
        event_ids = await publish(producer, [data])
        async with worker_process(chosen, tmp_path) as worker:
            rows = await settled(db, event_ids, within=30)
            code, _ = await worker.stop(within=chosen.shutdown_wait + 5)
    finally:
        server.close()
        await server.wait_closed()

    assert code == 0
    # Every try failed the same way (the schedule has two retries), then it was dead-lettered.
    assert states(rows, event_ids) == {"dead": 1}
    assert len(heads) == 3
    assert all(f"token={token}".encode() in head for head in heads)
    assert len(worker.events("delivery_retrying")) == 2
    [dead] = worker.events("delivery_dead")
    assert (dead["event_id"], dead["error_class"]) == (data["id"], "http_error")
    leaked = leaks(worker, [token])
    assert not leaked, "".join(leaked)


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.mark.unit
def test_a_crash_logged_on_a_terminal_shows_no_local_variables(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A traceback renderer that prints each frame's locals would print the secret the
    # crashed delivery was signing with.
    secret = "whsec_" + base64.b64encode(secrets.token_bytes(24)).decode()
    terminal = _Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    with relay_logs("info"):

        def sign_and_crash(key: str = secret) -> None:
            raise RuntimeError("crashed while signing")

        try:
            sign_and_crash()
        except RuntimeError:
            structlog.get_logger("postback.worker").exception("job_crashed")
    written = terminal.getvalue()
    assert "job_crashed" in written
    assert "crashed while signing" in written  # the traceback is there...
    assert secret not in written  # ...without the values it was holding
