"""The Celery peer: what a home-made relay with a delivery log would be, for comparison.

Celery with its Redis broker, a prefork pool of 4 processes, and one task per event that
builds the affiliate's URL from the event, GETs it with requests (one `requests.Session`
per pool process, so connections are kept alive) and inserts one row per attempt into a
Postgres table (one psycopg connection per pool process, autocommit). A failed request is
retried a minute later, as a relay would; in the bench none fails.

It runs on a Redis database number of its own and a Postgres database of its own, both
given by the bench (bench/celery_client.py), so its keys and rows never mix with the
relay's. Every key it makes starts with the run's prefix (kombu's `global_keyprefix`), so
the bench deletes exactly those. The worker is Celery's own command:

    celery -A bench.celery_peer:app worker --pool prefork --concurrency 4 ...

with its broker, key prefix, queue and database in its environment (`ENV`).
"""

from __future__ import annotations

import os
import time
from typing import Any
from urllib.parse import urlencode

import psycopg
import requests
from celery import Celery
from celery.signals import worker_process_init

TASK_NAME = "postback_peer.deliver"

ENV = {
    "broker": "POSTBACK_BENCH_PEER_BROKER_URL",
    "prefix": "POSTBACK_BENCH_PEER_KEY_PREFIX",
    "queue": "POSTBACK_BENCH_PEER_QUEUE",
    "database": "POSTBACK_BENCH_PEER_DATABASE_URL",
}
"""The worker's configuration, from these environment variables (the bench sets them)."""

SCHEMA = """
CREATE TABLE attempts (
    id bigserial PRIMARY KEY,
    event_id text NOT NULL,
    affiliate_id text NOT NULL,
    url text NOT NULL,
    status integer,
    error text,
    elapsed_ms double precision NOT NULL,
    at timestamptz NOT NULL DEFAULT now()
)
"""
"""The peer's delivery log: one row per attempt."""

INSERT = (
    "INSERT INTO attempts (event_id, affiliate_id, url, status, error, elapsed_ms)"
    " VALUES (%s, %s, %s, %s, %s, %s)"
)

TIMEOUT = (3.0, 10.0)
"""Connect and read timeouts, as the relay's defaults."""

RETRY_SECONDS = 60
MAX_RETRIES = 10


class _Process:
    """What each pool process opens once, after the fork: an HTTP session, a connection."""

    http: requests.Session | None = None
    db: psycopg.Connection[Any] | None = None


def _open(**_: Any) -> None:
    _Process.http = requests.Session()
    _Process.db = psycopg.connect(os.environ[ENV["database"]], autocommit=True)


def deliver(task: Any, base_url: str, event: dict[str, Any]) -> int | None:
    """Send the event's postback once and log the attempt; retried when it failed."""
    http, db = _Process.http, _Process.db
    assert http is not None, "worker_process_init did not run"
    assert db is not None, "worker_process_init did not run"
    order = event["order"]
    query = urlencode(
        {
            "order": order["number"],
            "amount": order["amount"],
            "commission": order["commission"],
            "currency": order["currency"],
            "event": event["id"],
            "sub": event["link"].get("sub_id", ""),
        }
    )
    url = f"{base_url}/{event['affiliate_id']}/pb?{query}"
    status: int | None = None
    error: str | None = None
    started = time.perf_counter()
    try:
        status = http.get(url, timeout=TIMEOUT, allow_redirects=False).status_code
    except requests.RequestException as exc:
        error = type(exc).__name__
    elapsed_ms = (time.perf_counter() - started) * 1000
    db.execute(INSERT, (event["id"], event["affiliate_id"], url, status, error, elapsed_ms))
    if status is None or not 200 <= status < 300:
        raise task.retry(countdown=RETRY_SECONDS, max_retries=MAX_RETRIES)
    return status


def make_app(broker_url: str, key_prefix: str, queue: str) -> Celery:
    """The Celery app, for the worker and for the bench that sends it tasks."""
    app = Celery("postback_peer", broker=broker_url, set_as_current=False)
    app.conf.update(
        broker_transport_options={"global_keyprefix": key_prefix},
        broker_connection_retry_on_startup=True,
        task_default_queue=queue,
        task_ignore_result=True,
        worker_enable_remote_control=False,
        worker_hijack_root_logger=False,
    )
    app.task(bind=True, name=TASK_NAME)(deliver)
    return app


def _from_env() -> Celery:
    return make_app(
        os.environ.get(ENV["broker"], "redis://127.0.0.1:6379/13"),
        os.environ.get(ENV["prefix"], "postback-bench-peer:"),
        os.environ.get(ENV["queue"], "postback-bench-peer"),
    )


app = _from_env()
worker_process_init.connect(_open, weak=False)
