"""The `postback` command, run as a user runs it: a subprocess with its own environment.

Every refusal must be exit code 2 and one line on stderr naming the problem, never a
traceback. Async tests run the command synchronously, since their event loop has nothing
to do meanwhile, except where the loop must serve the `receiver` while the command runs.
"""

from __future__ import annotations

import asyncio
import getpass
import json
import socket
import subprocess
import time
import uuid
from collections.abc import AsyncIterator
from datetime import datetime
from pathlib import Path
from typing import Any

import asyncpg
import psutil
import pytest

from producer import EVENT_TYPES, Producer, parse_event
from producer.queue import job_id, job_key
from tests import leakcheck
from tests.support.cli import (
    POSTBACK,
    UNREACHABLE_DATABASE,
    UNREACHABLE_REDIS,
    Postback,
    clean_env,
    refusal,
    succeeded,
)
from tests.support.events import event_data, save_callback
from tests.support.ledger import make_deliveries
from tests.support.ports import free_port
from tests.support.receivers import ALLOW_NETWORKS, Flaky, Receiver
from tests.support.schemas import released
from tests.support.servers import RUN, database_at, with_options
from tests.support.workers import drain
from worker import database
from worker.config import Settings
from worker.deliver import USER_AGENT, delivery_id
from worker.exchange import FAILURE_CLASSES
from worker.ledger import STATES
from worker.schema import CURRENT

LINK = "https://shop.example/summer?ref=ann&campaign=summer&sub_id=fb1#promo"  # event_data's
OCCURRED_AT = "2026-11-21T10:00:00+00:00"
SECRET = "s3cret-never-listed"
GET_TEMPLATE = (
    "https://t.example/pb?o={{order.number}}&a={{order.amount}}&c={{ order.commission }}"
    "&s={{link.sub_id}}"
)
GET_RENDERED = "https://t.example/pb?o=%231001&a=10.50&c=1.05&s=fb1"
NO_SERVERS = {"POSTBACK_DATABASE_URL": None, "POSTBACK_REDIS_URL": None}


@pytest.fixture
def postback(database_url: str, redis_url: str, queue_name: str, tmp_path: Path) -> Postback:
    env = clean_env()
    env["POSTBACK_DATABASE_URL"] = database_url
    env["POSTBACK_REDIS_URL"] = redis_url
    env["POSTBACK_QUEUE_NAME"] = queue_name
    env["POSTBACK_ALLOW_NETWORKS"] = ALLOW_NETWORKS
    env["POSTBACK_CIRCUIT_FAILURES"] = "1000"  # as in the settings fixture
    return Postback(env, tmp_path)


def write(tmp_path: Path, text: str, name: str = "event.json") -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def json_lines(*events: dict[str, Any]) -> str:
    return "".join(json.dumps(event) + "\n" for event in events)


def with_amount(data: dict[str, Any], amount: Any) -> dict[str, Any]:
    return {**data, "order": {**data["order"], "amount": amount}}


async def queued(producer: Producer) -> set[str]:
    """Ids of the events in the run's queue, checking each has its job stored."""
    members = await producer.redis.zrange(producer.queue_name, 0, -1)
    ids = {member.decode().removeprefix("event:") for member in members}
    for event_id in ids:
        assert await producer.redis.exists(job_key(job_id(event_id))) == 1, event_id
    return ids


async def callback_rows(conn: asyncpg.Connection) -> list[dict[str, Any]]:
    rows = await conn.fetch(
        "SELECT affiliate_id, event_type, method, url_template, secret, enabled FROM callbacks"
        " ORDER BY affiliate_id, event_type"
    )
    return [dict(row) for row in rows]


# --- usage and configuration -----------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "named"),
    [
        pytest.param([], "required: COMMAND", id="no-arguments"),
        pytest.param(["bogus"], "bogus", id="unknown-command"),
        pytest.param(["callbacks"], "required: COMMAND", id="missing-subcommand"),
        pytest.param(["preview", "--event", "-"], "--url", id="missing-option"),
    ],
)
def test_usage_errors_exit_2_in_one_line(postback: Postback, args: list[str], named: str) -> None:
    assert named in refusal(postback(*args))


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("POSTBACK_LOG_LEVEL", "loud"),
        ("POSTBACK_QUEUE_NAME", ""),
        ("POSTBACK_MAX_JOBS", "0"),
        ("POSTBACK_DATABASE_URL", "mysql://127.0.0.1/db"),
        ("POSTBACK_DATABASE_URL", "postgresql://127.0.0.1:abc/db"),
        ("POSTBACK_ALLOW_NETWORKS", "127.0.0.1/32, 10.0.0.0/33"),
    ],
)
def test_bad_configuration_is_refused_in_one_line(
    postback: Postback, variable: str, value: str
) -> None:
    line = refusal(postback("callbacks", "list", env_overrides={variable: value}))
    assert "bad configuration" in line
    assert variable.removeprefix("POSTBACK_").lower() in line.lower()  # the setting is named


@pytest.mark.parametrize(
    "args",
    [
        ["db", "init"],
        ["callbacks", "list"],
        ["callbacks", "remove", "--affiliate", "ann", "--event", "order.created"],
    ],
    ids=" ".join,
)
def test_unreachable_database_is_refused_in_one_line(postback: Postback, args: list[str]) -> None:
    line = refusal(postback(*args, env_overrides={"POSTBACK_DATABASE_URL": UNREACHABLE_DATABASE}))
    assert "cannot reach the database" in line


# --- db init ---------------------------------------------------------------------------


@pytest.fixture
async def empty_database_url(admin_url: str) -> AsyncIterator[str]:
    """A database of its own with no tables, dropped afterwards."""
    name = f"postback_test_{RUN}_empty"
    admin = await asyncpg.connect(admin_url)
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
        yield database_at(admin_url, name)
        await admin.execute(f'DROP DATABASE "{name}" WITH (FORCE)')
    finally:
        await admin.close()


async def test_db_init_creates_the_tables_and_can_run_again(
    postback: Postback, empty_database_url: str
) -> None:
    env = {"POSTBACK_DATABASE_URL": empty_database_url}
    said = [succeeded(postback("db", "init", env_overrides=env)) for _ in range(2)]
    assert said == [
        f"schema created at version {CURRENT}\n",
        f"schema at version {CURRENT} already: nothing to do\n",
    ]

    async with database.connection(empty_database_url) as conn:
        tables = await conn.fetch("SELECT tablename FROM pg_tables WHERE schemaname = 'public'")
    assert {row["tablename"] for row in tables} >= {"callbacks", "deliveries", "attempts"}


async def test_db_init_upgrades_an_earlier_version_and_refuses_a_later_one(
    postback: Postback, empty_database_url: str
) -> None:
    env = {"POSTBACK_DATABASE_URL": empty_database_url}
    async with database.connection(empty_database_url) as conn:
        await conn.execute(released(1))
    result = postback("db", "init", env_overrides=env)
    assert succeeded(result) == f"schema upgraded from version 1 to {CURRENT}\n"

    async with database.connection(empty_database_url) as conn:
        await conn.execute("UPDATE schema_version SET version = $1", CURRENT + 1)
    assert refusal(postback("db", "init", env_overrides=env)) == (
        f"postback: error: the database's schema is version {CURRENT + 1}, newer than this "
        f"relay's version {CURRENT}: run the relay that upgraded it, or a later one"
    )


def test_a_database_without_tables_asks_for_db_init(
    postback: Postback, empty_database_url: str
) -> None:
    result = postback(
        "callbacks", "list", env_overrides={"POSTBACK_DATABASE_URL": empty_database_url}
    )
    assert refusal(result) == (
        "postback: error: the database has no relay tables yet: run `postback db init`"
    )


# --- callbacks set ---------------------------------------------------------------------


@pytest.mark.parametrize(("given", "stored"), [("GET", "GET"), ("post", "POST")])
async def test_callbacks_set_saves_the_callback(
    db: asyncpg.Connection, postback: Postback, given: str, stored: str
) -> None:
    result = postback(
        "callbacks", "set", "--affiliate", "ann", "--event", "order.created",
        "--method", given, "--url", GET_TEMPLATE, "--secret", SECRET,
    )  # fmt: skip

    assert succeeded(result) == f"saved: ann order.created {stored} {GET_TEMPLATE}\n"
    assert await callback_rows(db) == [
        {
            "affiliate_id": "ann",
            "event_type": "order.created",
            "method": stored,
            "url_template": GET_TEMPLATE,
            "secret": SECRET,
            "enabled": True,
        }
    ]


async def test_callbacks_set_generates_a_secret_and_shows_it_only_then(
    db: asyncpg.Connection, postback: Postback
) -> None:
    args = ["--affiliate", "ann", "--event", "order.created", "--method", "POST"]
    result = postback(
        "callbacks", "set", *args, "--url", "https://t.example/pb", "--secret", "generate"
    )

    [saved, shown, hint] = succeeded(result).splitlines()
    assert saved == "saved: ann order.created POST https://t.example/pb"
    secret = shown.removeprefix("secret: ")
    assert secret.startswith("whsec_")
    assert "shown this once" in hint
    [row] = await callback_rows(db)
    assert row["secret"] == secret
    for listing in (("callbacks", "list"), ("callbacks", "list", "--json")):
        assert secret not in succeeded(postback(*listing))
    # Saved again without --secret: the secret stays and is not printed.
    again = succeeded(postback("callbacks", "set", *args, "--url", "https://t.example/v2"))
    assert secret not in again
    assert (await callback_rows(db))[0]["secret"] == secret


async def test_callbacks_set_replaces_the_existing_callback(
    db: asyncpg.Connection, postback: Postback
) -> None:
    await save_callback(db, "ann", "order.updated", "GET", "https://old.example/pb", "old")

    result = postback(
        "callbacks", "set", "--affiliate", "ann", "--event", "order.updated",
        "--method", "POST", "--url", "https://new.example/{{event.type}}", "--secret", "new",
    )  # fmt: skip

    assert succeeded(result) == (
        "saved: ann order.updated POST https://new.example/{{event.type}}\n"
    )
    assert await callback_rows(db) == [
        {
            "affiliate_id": "ann",
            "event_type": "order.updated",
            "method": "POST",
            "url_template": "https://new.example/{{event.type}}",
            "secret": "new",
            "enabled": True,
        }
    ]


async def test_callbacks_set_without_secret_keeps_the_stored_secret(
    db: asyncpg.Connection, postback: Postback
) -> None:
    await save_callback(db, "ann", "order.created", "GET", "https://old.example/pb", SECRET)
    args = ["--affiliate", "ann", "--event", "order.created", "--url", "https://new.example/pb"]

    succeeded(postback("callbacks", "set", *args))

    [row] = await callback_rows(db)
    assert (row["url_template"], row["secret"]) == ("https://new.example/pb", SECRET)


@pytest.mark.parametrize(
    ("changes", "named"),
    [
        pytest.param(
            {"--url": "https://t.example/pb?o={{order.numbr}}"},
            ["'order.numbr'", "did you mean 'order.number'"],
            id="unknown-variable",
        ),
        pytest.param(
            {"--url": r"https://t.example/pb?o=1\x"},
            ["backslash before 'x' at character 25 of the template", "write %5C"],
            id="stray-backslash",
        ),
        pytest.param(
            {"--url": "ftp://t.example/pb"}, ["http://", "ftp://t.example/pb"], id="not-http"
        ),
        pytest.param({"--event": "order.shipped"}, ["--event", "'order.shipped'"], id="bad-event"),
        pytest.param({"--method": "PUT"}, ["--method", "'PUT'"], id="bad-method"),
        pytest.param({"--url": None}, ["required", "--url"], id="missing-url"),
        pytest.param({"--secret": ""}, ["secret"], id="empty-secret"),
    ],
)
async def test_callbacks_set_refuses_a_bad_callback(
    db: asyncpg.Connection,
    postback: Postback,
    changes: dict[str, str | None],
    named: list[str],
) -> None:
    options: dict[str, str | None] = {
        "--affiliate": "ann",
        "--event": "order.created",
        "--url": "https://t.example/pb",
        **changes,
    }
    args = [
        part for option, value in options.items() if value is not None for part in (option, value)
    ]

    line = refusal(postback("callbacks", "set", *args))

    for name in named:
        assert name in line
    assert await callback_rows(db) == []


# --- callbacks list --------------------------------------------------------------------


ANN_URL = "https://ann.example/pb?o={{order.number}}"
BOB_URL = "https://bob.example/hook"


@pytest.fixture
async def two_callbacks(db: asyncpg.Connection) -> None:
    await save_callback(db, "ann", "order.created", "GET", ANN_URL, SECRET)
    await save_callback(db, "bob", "order.updated", "POST", BOB_URL)


ANN_LISTED = {
    "affiliate_id": "ann",
    "event_type": "order.created",
    "method": "GET",
    "url_template": ANN_URL,
    "has_secret": True,
    "enabled": True,
}
BOB_LISTED = {
    "affiliate_id": "bob",
    "event_type": "order.updated",
    "method": "POST",
    "url_template": BOB_URL,
    "has_secret": False,
    "enabled": True,
}


def table(stdout: str) -> list[list[str]]:
    """The table's cells, row by row (no cell contains a space)."""
    return [line.split() for line in stdout.splitlines()]


def listed(stdout: str) -> list[dict[str, Any]]:
    """The `--json` listing, keeping only the keys the tests compare."""
    found = json.loads(stdout)
    assert isinstance(found, list)
    return [{key: item[key] for key in ANN_LISTED} for item in found]


@pytest.mark.usefixtures("two_callbacks")
def test_callbacks_list_prints_a_table_without_secrets(postback: Postback) -> None:
    stdout = succeeded(postback("callbacks", "list"))

    assert table(stdout) == [
        ["AFFILIATE", "EVENT", "METHOD", "ENABLED", "SECRET", "URL"],
        ["ann", "order.created", "GET", "yes", "yes", ANN_URL],
        ["bob", "order.updated", "POST", "yes", "no", BOB_URL],
    ]
    assert SECRET not in stdout


@pytest.mark.usefixtures("two_callbacks")
def test_callbacks_list_json_has_every_field_but_the_secret(postback: Postback) -> None:
    stdout = succeeded(postback("callbacks", "list", "--json"))

    assert listed(stdout) == [ANN_LISTED, BOB_LISTED]
    for item in json.loads(stdout):
        assert set(item) == {*ANN_LISTED, "id", "created_at", "updated_at"}
        assert isinstance(item["id"], int)
        datetime.fromisoformat(item["created_at"])
        datetime.fromisoformat(item["updated_at"])
    assert SECRET not in stdout
    assert all("secret" not in item for item in json.loads(stdout))


@pytest.mark.usefixtures("two_callbacks")
def test_callbacks_list_filters_by_affiliate(postback: Postback) -> None:
    as_table = succeeded(postback("callbacks", "list", "--affiliate", "ann"))
    as_json = succeeded(postback("callbacks", "list", "--affiliate", "bob", "--json"))

    assert table(as_table)[1:] == [["ann", "order.created", "GET", "yes", "yes", ANN_URL]]
    assert listed(as_json) == [BOB_LISTED]


@pytest.mark.parametrize(("json_flag", "expected"), [([], "no callbacks\n"), (["--json"], "[]\n")])
@pytest.mark.usefixtures("db")
def test_callbacks_list_when_there_are_none(
    postback: Postback, json_flag: list[str], expected: str
) -> None:
    assert succeeded(postback("callbacks", "list", *json_flag)) == expected


# --- callbacks remove ------------------------------------------------------------------


@pytest.mark.usefixtures("two_callbacks")
async def test_callbacks_remove_deletes_only_that_callback(
    db: asyncpg.Connection, postback: Postback
) -> None:
    result = postback("callbacks", "remove", "--affiliate", "ann", "--event", "order.created")

    assert succeeded(result) == "removed: ann order.created\n"
    assert [row["affiliate_id"] for row in await callback_rows(db)] == ["bob"]


@pytest.mark.usefixtures("two_callbacks")
async def test_callbacks_remove_refuses_a_missing_callback(
    db: asyncpg.Connection, postback: Postback
) -> None:
    result = postback("callbacks", "remove", "--affiliate", "ann", "--event", "order.updated")

    assert refusal(result) == "postback: error: no order.updated callback for affiliate ann"
    assert len(await callback_rows(db)) == 2


# --- preview ---------------------------------------------------------------------------


def expected_body(data: dict[str, Any]) -> dict[str, Any]:
    """The POST body for `event_data(...)` with occurred_at set, as the README describes it."""
    return {
        "event": {"id": data["id"], "type": "order.created", "occurred_at": OCCURRED_AT},
        "affiliate": {"id": "ann"},
        "order": {
            "number": "#1001",
            "amount": "10.50",
            "commission": "1.05",
            "currency": "",
            "status": "",
        },
        "link": {
            "url": LINK,
            "path": "/summer",
            "hash": "promo",
            "sub_id": "fb1",
            "query": {"ref": "ann", "campaign": "summer", "sub_id": "fb1"},
        },
    }


def test_preview_get_prints_the_request_line(postback: Postback, tmp_path: Path) -> None:
    event = write(tmp_path, json.dumps(event_data("preview-get")))

    stdout = succeeded(postback("preview", "--url", GET_TEMPLATE, "--event", event))

    assert stdout == f"GET {GET_RENDERED}\n"


def test_preview_reads_stdin_and_keeps_numeric_amounts_exact(postback: Postback) -> None:
    data = event_data("preview-stdin")
    text = json.dumps(data).replace('"10.50"', "10.50").replace('"1.05"', "1.05")
    assert '"amount": 10.50' in text  # a JSON number, which a float would turn into 10.5

    stdout = succeeded(postback("preview", "--url", GET_TEMPLATE, "--event", "-", stdin=text))

    assert stdout == f"GET {GET_RENDERED}\n"


def test_preview_post_prints_the_json_body(postback: Postback, tmp_path: Path) -> None:
    data = event_data("preview-post", occurred_at=OCCURRED_AT)
    event = write(tmp_path, json.dumps(data))

    result = postback(
        "preview", "--method", "POST", "--url", "https://t.example/hook/{{affiliate.id}}",
        "--event", event,
    )  # fmt: skip

    stdout = succeeded(result)

    first, *rest = stdout.splitlines()
    assert first == "POST https://t.example/hook/ann"
    assert json.loads("\n".join(rest)) == expected_body(data)


@pytest.mark.parametrize("method", ["GET", "POST"])
def test_preview_json_shows_method_url_headers_and_body(
    postback: Postback, tmp_path: Path, method: str
) -> None:
    data = event_data("preview-json", occurred_at=OCCURRED_AT)
    event = write(tmp_path, json.dumps(data))

    stdout = succeeded(
        postback("preview", "--json", "--method", method, "--url", GET_TEMPLATE, "--event", event)
    )

    shown = json.loads(stdout)
    headers = {"User-Agent": USER_AGENT, "Idempotency-Key": str(delivery_id(parse_event(data)))}
    if method == "POST":
        headers["Content-Type"] = "application/json"
    assert shown == {
        "method": method,
        "url": GET_RENDERED,
        "headers": headers,
        "body": expected_body(data) if method == "POST" else None,
    }


@pytest.mark.parametrize(
    ("url", "event_text", "named"),
    [
        pytest.param(
            GET_TEMPLATE,
            json.dumps(with_amount(event_data("preview-bad"), "ten")),
            ["order.amount"],
            id="bad-amount",
        ),
        pytest.param(GET_TEMPLATE, None, ["cannot read", "event.json"], id="file-not-found"),
        pytest.param(
            "https://t.example/?o={{order.numbr}}",
            json.dumps(event_data("preview-var")),
            ["'order.numbr'", "'order.number'"],
            id="unknown-variable",
        ),
        pytest.param(
            GET_TEMPLATE,
            json_lines(event_data("preview-one"), event_data("preview-two")),
            ["one event", "got 2"],
            id="two-events",
        ),
    ],
)
def test_preview_refuses(
    postback: Postback, tmp_path: Path, url: str, event_text: str | None, named: list[str]
) -> None:
    event = str(tmp_path / "event.json") if event_text is None else write(tmp_path, event_text)

    line = refusal(postback("preview", "--url", url, "--event", event))

    for name in named:
        assert name in line


def test_preview_needs_no_database_or_redis(postback: Postback, tmp_path: Path) -> None:
    event = write(tmp_path, json.dumps(event_data("preview-offline")))

    result = postback(
        "preview", "--url", GET_TEMPLATE, "--event", event,
        env_overrides={**NO_SERVERS, "POSTBACK_DATA_DIR": str(tmp_path)},
    )  # fmt: skip

    assert succeeded(result) == f"GET {GET_RENDERED}\n"
    assert "embedded" not in result.stderr
    assert sorted(path.name for path in tmp_path.iterdir()) == ["event.json"]  # no pg, no redis


# --- send ------------------------------------------------------------------------------


@pytest.mark.parametrize("source", ["file", "stdin"])
@pytest.mark.parametrize(
    ("form", "count", "printed"),
    [
        ("object", 1, "enqueued 1 event\n"),
        ("array", 2, "enqueued 2 events\n"),
        ("lines", 3, "enqueued 3 events\n"),
    ],
)
async def test_send_enqueues_every_event(
    producer: Producer,
    postback: Postback,
    tmp_path: Path,
    source: str,
    form: str,
    count: int,
    printed: str,
) -> None:
    events = [event_data(f"send-{form}-{n}") for n in range(count)]
    text = {
        "object": json.dumps(events[0]),
        "array": json.dumps(events),
        "lines": json_lines(*events),
    }[form]

    if source == "file":
        result = postback("send", "--event", write(tmp_path, text))
    else:
        result = postback("send", "--event", "-", stdin=text)

    assert succeeded(result) == printed
    assert await queued(producer) == {event["id"] for event in events}


async def test_send_reports_events_already_queued(
    producer: Producer, postback: Postback, tmp_path: Path
) -> None:
    first, second = event_data("send-again-1"), event_data("send-again-2")
    assert succeeded(postback("send", "--event", "-", stdin=json.dumps(first))) == (
        "enqueued 1 event\n"
    )

    assert succeeded(postback("send", "--event", "-", stdin=json.dumps(first))) == (
        "enqueued 0 events, 1 already queued\n"
    )
    assert succeeded(postback("send", "--event", "-", stdin=json_lines(first, second))) == (
        "enqueued 1 event, 1 already queued\n"
    )
    assert await queued(producer) == {first["id"], second["id"]}


@pytest.mark.parametrize(
    ("form", "named"),
    [
        ("lines", ["line 2", "order.amount"]),
        ("array", ["event 2", "order.amount"]),
        ("not-json", ["line 2", "not valid JSON"]),
    ],
)
async def test_send_refuses_all_when_one_event_is_invalid(
    producer: Producer, postback: Postback, tmp_path: Path, form: str, named: list[str]
) -> None:
    good = [event_data("send-good-1"), event_data("send-good-2")]
    bad = with_amount(event_data("send-bad"), "ten")
    text = {
        "lines": json_lines(good[0], bad, good[1]),
        "array": json.dumps([good[0], bad, good[1]]),
        "not-json": json_lines(good[0]) + "{not json\n" + json_lines(good[1]),
    }[form]

    line = refusal(postback("send", "--event", write(tmp_path, text)))

    for name in named:
        assert name in line
    assert await queued(producer) == set()
    for data in (*good, bad):
        assert await producer.redis.exists(job_key(job_id(data["id"]))) == 0


@pytest.mark.parametrize(
    ("form", "where"),
    [("pretty", ""), ("array", ""), ("lines", "line 2: ")],
)
async def test_send_refuses_a_key_given_twice_naming_it(
    producer: Producer, postback: Postback, tmp_path: Path, form: str, where: str
) -> None:
    good, bad = json.dumps(event_data("twice-good")), event_data("twice-bad")
    twice = '"amount": "10.50", "amount": "99999.00"'
    one_line = json.dumps(bad).replace('"amount": "10.50"', twice)
    text = {
        # A pretty-printed document is one document, not JSON lines with a bad line 1.
        "pretty": json.dumps(bad, indent=2).replace('"amount": "10.50"', twice),
        "array": f"[{good}, {one_line}]",
        "lines": f"{good}\n{one_line}\n",
    }[form]
    assert twice in text

    line = refusal(postback("send", "--event", write(tmp_path, text)))

    assert line == f'postback: error: {where}duplicate key "amount"'
    assert await queued(producer) == set()


def test_preview_refuses_a_key_given_twice_naming_it(postback: Postback) -> None:
    text = json.dumps(event_data("twice-preview")).replace('"#1001"', '"#1001", "number": "#2"')
    line = refusal(postback("preview", "--url", GET_TEMPLATE, "--event", "-", stdin=text))
    assert line == 'postback: error: duplicate key "number"'


@pytest.mark.parametrize("text", ["", "\n\n", "[]"])
async def test_send_refuses_input_without_events(
    producer: Producer, postback: Postback, text: str
) -> None:
    assert "no event in the input" in refusal(postback("send", "--event", "-", stdin=text))
    assert await queued(producer) == set()


def test_send_with_unreachable_redis_is_refused_in_one_line(
    postback: Postback, tmp_path: Path
) -> None:
    event = write(tmp_path, json.dumps(event_data("send-no-redis")))

    result = postback(
        "send", "--event", event, env_overrides={"POSTBACK_REDIS_URL": UNREACHABLE_REDIS}
    )

    assert "cannot reach Redis" in refusal(result)


@pytest.mark.parametrize(
    "bad_url",
    ["http://127.0.0.1:6379/0", "redis://127.0.0.1:6379/abc", "redis://127.0.0.1:port/0"],
)
def test_send_with_a_malformed_redis_url_is_refused_in_one_line(
    postback: Postback, tmp_path: Path, bad_url: str
) -> None:
    event = write(tmp_path, json.dumps(event_data("send-bad-url")))

    result = postback("send", "--event", event, env_overrides={"POSTBACK_REDIS_URL": bad_url})

    assert "redis" in refusal(result).lower()


# --- worker ----------------------------------------------------------------------------


async def test_worker_burst_delivers_what_send_enqueued(
    db: asyncpg.Connection,
    producer: Producer,
    receiver: Receiver,
    postback: Postback,
    tmp_path: Path,
) -> None:
    url = receiver.url + "/pb?o={{order.number}}&a={{order.amount}}&e={{event.id}}"
    succeeded(
        postback("callbacks", "set", "--affiliate", "ann", "--event", "order.created", "--url", url)
    )
    data = event_data("worker")
    succeeded(postback("send", "--event", write(tmp_path, json.dumps(data))))

    # In a thread: the receiver answers on this test's event loop while the worker runs.
    result = await asyncio.to_thread(postback, "worker", "--burst")

    succeeded(result)
    assert [(got.method, got.path_qs) for got in receiver.requests] == [
        ("GET", f"/pb?o=%231001&a=10.50&e={data['id']}")
    ]
    state = await db.fetchval("SELECT state FROM deliveries WHERE event_id = $1", data["id"])
    assert state == "delivered"
    assert await queued(producer) == set()


async def test_a_template_copied_from_markdown_is_kept_as_typed_and_sent_plain(
    db: asyncpg.Connection, receiver: Receiver, postback: Postback, tmp_path: Path
) -> None:
    # As copied from the raw text of markdown docs: `\&`, `\_` and `\{{...\}}` are escapes.
    url = receiver.url + r"/pb?o={{order.number}}\&s=\{{link.sub\_id\}}\&q={{link.query.sub\_id}}"
    sent = "/pb?o=%231001&s=fb1&q=fb1"
    args = ["--affiliate", "ann", "--event", "order.created", "--url", url]

    saved = succeeded(postback("callbacks", "set", *args))

    assert saved == f"saved: ann order.created GET {url}\n"
    assert [row["url_template"] for row in await callback_rows(db)] == [url]
    event = write(tmp_path, json.dumps(event_data("markdown")))
    assert succeeded(postback("preview", "--url", url, "--event", event)) == (
        f"GET {receiver.url}{sent}\n"
    )

    succeeded(postback("send", "--event", event))
    # The worker parses the stored template again, as typed.
    succeeded(await asyncio.to_thread(postback, "worker", "--burst"))

    assert [(got.method, got.path_qs) for got in receiver.requests] == [("GET", sent)]


def test_worker_with_unreachable_redis_is_refused_in_one_line(postback: Postback) -> None:
    result = postback("worker", "--burst", env_overrides={"POSTBACK_REDIS_URL": UNREACHABLE_REDIS})

    assert "cannot reach Redis" in refusal(result)


# --- demo ------------------------------------------------------------------------------


def check_demo_output(stdout: str) -> None:
    received = sorted(
        line.removeprefix("receiver got: ").split("?")[0]
        for line in stdout.splitlines()
        if line.startswith("receiver got: ")
    )
    assert received == [
        "GET /ann/postback",
        "GET /ann/postback",
        "POST /bob/order.created",
        "POST /bob/order.created",
        "POST /bob/order.updated",
    ]
    # bob's create is refused once and retried; his update waits until it is delivered.
    bob = [line for line in stdout.splitlines() if line.startswith("receiver got: POST /bob/")]
    assert [line.split("?")[0][14:] for line in bob] == [
        "POST /bob/order.created",
        "POST /bob/order.created",
        "POST /bob/order.updated",
    ]
    assert "answered 503" in stdout
    assert "receiver got: GET /ann/postback?order=%231001&amount=10.50&commission=1.05" in stdout
    assert "receiver got: POST /bob/order.created?order=%231002&amount=249.00" in stdout

    ledger = stdout.split("\nledger:\n", 1)[1].splitlines()
    assert [line.split()[1:4] for line in ledger] == [
        ["demo-ann", "delivered", "1"],
        ["demo-bob", "delivered", "2"],
        ["demo-ann", "delivered", "1"],
        ["demo-bob", "delivered", "1"],
        ["demo-carol", "skipped", "no"],
    ]


@pytest.mark.usefixtures("db", "producer")  # empty tables and an empty queue
def test_demo_on_the_configured_servers(postback: Postback) -> None:
    result = postback("demo", timeout=120)

    check_demo_output(succeeded(result))
    assert "embedded" not in result.stderr
    # The worker's info lines are hidden; the demo's own output says what happened.
    assert "delivery_delivered" not in result.stderr


@pytest.mark.usefixtures("db", "producer")
def test_demo_as_docker_compose_runs_it_receiver_and_worker_apart(postback: Postback) -> None:
    """The compose demo profile: `receive`, a `worker` and `demo --receiver`, three
    processes; the postbacks reach the receiver and the demo prints the ledger."""
    port = free_port()
    env = {**postback.env, "POSTBACK_RETRY_SCHEDULE": "1s"}
    apart = [
        subprocess.Popen(
            [*POSTBACK, *args],
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for args in (["receive", "--port", str(port)], ["worker"])
    ]
    receiver, worker = apart
    try:
        assert receiver.stdout is not None
        assert receiver.stdout.readline() == f"demo receiver listening on http://127.0.0.1:{port}\n"
        result = postback("demo", "--receiver", f"http://127.0.0.1:{port}", timeout=120)
    finally:
        outputs = []
        for process in apart:
            process.terminate()
            outputs.append(process.communicate(timeout=30))
    for _, stderr in outputs:
        leakcheck.logged(stderr)
    demo_out = succeeded(result)
    assert f"demo receiver at http://127.0.0.1:{port}" in demo_out
    check_demo_output(outputs[0][0] + demo_out)
    assert worker.returncode == 0, outputs[1][1]


def processes_using(folder: Path) -> list[str]:
    """Processes whose command line names `folder` (Postgres) or that run inside it (Redis
    changes into its data folder; its command line names only a socket elsewhere)."""
    found = []
    for process in psutil.process_iter(["pid", "cmdline", "cwd"]):
        cmdline = " ".join(process.info["cmdline"] or [])
        cwd = process.info["cwd"] or ""
        if str(folder) in cmdline or cwd.startswith(str(folder)):
            found.append(f"{process.info['pid']} {cmdline}")
    return found


def test_demo_with_embedded_postgres_and_redis(postback: Postback, tmp_path: Path) -> None:
    data_dir = tmp_path / "data"

    result = postback(
        "demo", env_overrides={**NO_SERVERS, "POSTBACK_DATA_DIR": str(data_dir)}, timeout=120
    )

    check_demo_output(succeeded(result))
    assert f"postback: embedded Postgres in {data_dir / 'pg'}" in result.stderr
    assert f"postback: embedded Redis in {data_dir / 'redis.db'}" in result.stderr
    assert (data_dir / "pg").is_dir()
    # The servers stop as the command exits; allow them a moment to finish dying.
    deadline = time.monotonic() + 5
    while processes_using(data_dir) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert processes_using(data_dir) == []


# --- deliveries and dead letters --------------------------------------------------------


async def test_dlq_list_shows_a_table_and_json(
    postback: Postback,
    db: asyncpg.Connection,
    flaky: Flaky,
    settings: Settings,
    producer: Producer,
) -> None:
    await make_deliveries(db, producer, flaky, settings, dead=2)
    lines = succeeded(postback("dlq", "list")).splitlines()
    assert lines[0].split() == [
        "ID",
        "TAKEN",
        "(UTC)",
        "AFFILIATE",
        "EVENT",
        "ORDER",
        "STATE",
        "TRIES",
        "LAST",
        "REASON",
    ]
    assert len(lines) == 3
    assert all(" bob " in line and " dead " in line and " 500 " in line for line in lines[1:])
    listed = json.loads(succeeded(postback("dlq", "list", "--json", "--order", "#1002")))
    [item] = listed["items"]
    assert (item["order_number"], item["state"], item["error_class"]) == (
        "#1002",
        "dead",
        "http_5xx",
    )
    assert listed["next"] is None
    assert succeeded(postback("dlq", "list", "--affiliate", "ann")) == "no dead letters\n"
    everything = json.loads(succeeded(postback("deliveries", "list", "--json")))
    assert {i["affiliate_id"] for i in everything["items"]} == {"ann", "bob", "carol"}
    delivered = json.loads(
        succeeded(postback("deliveries", "list", "--state", "delivered", "--json"))
    )
    assert [i["affiliate_id"] for i in delivered["items"]] == ["ann", "ann"]
    page = postback("deliveries", "list", "--limit", "1")
    assert len(succeeded(page).splitlines()) == 2
    assert "more deliveries: add --cursor " in page.stderr


@pytest.fixture
async def dead_letter(
    postback: Postback,
    db: asyncpg.Connection,
    flaky: Flaky,
    settings: Settings,
    producer: Producer,
) -> str:
    """The id of the one dead letter (bob's) of `make_deliveries`'s ledger."""
    await make_deliveries(db, producer, flaky, settings)
    [item] = json.loads(succeeded(postback("dlq", "list", "--json")))["items"]
    item_id: str = item["id"]
    return item_id


async def test_dlq_show_prints_the_attempts(
    postback: Postback, flaky: Flaky, dead_letter: str
) -> None:
    shown = succeeded(postback("dlq", "show", dead_letter))
    assert f"delivery   {dead_letter}" in shown
    assert "state      dead: gave up after 3 attempts, last: HTTP 500" in shown
    assert f"request    GET {flaky.url}/fail/bob?o=%231001" in shown
    assert "HTTP 500" in shown
    assert "down for maintenance" in shown
    as_json = json.loads(succeeded(postback("deliveries", "show", dead_letter, "--json")))
    assert [a["status_code"] for a in as_json["attempts"]] == [500, 500, 500]


@pytest.mark.parametrize(
    ("args", "named"),
    [
        (("dlq", "show", "not-a-uuid"), "--id: must be a delivery id"),
        (("dlq", "show", "00000000-0000-0000-0000-000000000000"), "no delivery"),
        (("dlq", "list", "--since", "last tuesday"), "--since: must be an ISO 8601 time"),
        (("dlq", "list", "--limit", "0"), "--limit: must be a whole number"),
        (("deliveries", "list", "--state", "lost"), "--state: invalid choice"),
        (("dlq", "replay"), "give a delivery id, filters, or --all"),
        (
            ("dlq", "discard", "00000000-0000-0000-0000-000000000000", "--note", " "),
            "--note: say why",
        ),
    ],
)
def test_ledger_commands_refuse_bad_input_in_one_line(
    postback: Postback, db: asyncpg.Connection, args: tuple[str, ...], named: str
) -> None:
    assert named in refusal(postback(*args))


@pytest.mark.parametrize(
    ("args", "known"),
    [
        (("deliveries", "list", "--error-class", "http_500"), FAILURE_CLASSES),
        (("dlq", "list", "--error-class", "http_500"), FAILURE_CLASSES),
        (("dlq", "replay", "--error-class", "http_500"), FAILURE_CLASSES),
        (("deliveries", "list", "--state", "lost"), STATES),
        (("dlq", "list", "--event", "order.deleted"), EVENT_TYPES),
    ],
    ids=["deliveries", "dlq-list", "dlq-replay", "state", "event"],
)
def test_an_unknown_choice_of_filter_is_refused_naming_the_known_ones(
    postback: Postback, args: tuple[str, ...], known: tuple[str, ...]
) -> None:
    """A typo must not list nothing, as if no delivery had failed so."""
    option, given = args[-2:]
    line = refusal(postback(*args))
    choices = ", ".join(f"'{value}'" for value in known)
    assert f"{option}: invalid choice: '{given}' (choose from {choices})" in line


async def test_dlq_replay_one_then_it_is_delivered(
    postback: Postback, flaky: Flaky, settings: Settings, dead_letter: str
) -> None:
    flaky.fixed = True
    out = succeeded(postback("dlq", "replay", dead_letter, "--actor", "dana"))
    assert out == f"replayed: {dead_letter} (rerender)\n"
    await drain(settings)
    shown = json.loads(succeeded(postback("dlq", "show", dead_letter, "--json")))
    assert shown["state"] == "delivered"
    assert shown["actions"][0]["actor"] == "dana"
    again = refusal(postback("dlq", "replay", dead_letter))
    assert "not replayed: it is delivered, neither dead nor discarded" in again


async def test_dlq_replay_by_filter_shows_progress_and_a_summary(
    postback: Postback,
    db: asyncpg.Connection,
    flaky: Flaky,
    settings: Settings,
    producer: Producer,
) -> None:
    await make_deliveries(db, producer, flaky, settings, dead=30)
    flaky.fixed = True
    result = postback("dlq", "replay", "--affiliate", "bob", "--mode", "resend")
    assert succeeded(result).splitlines()[-1] == "replayed 30, skipped 0, failed 0"
    progress = result.stderr.splitlines()
    assert progress[0] == "replaying: 1/30"
    assert progress[-1] == "replaying: 30/30"
    await drain(settings)
    delivered = json.loads(
        succeeded(
            postback("deliveries", "list", "--affiliate", "bob", "--state", "delivered", "--json")
        )
    )
    assert len(delivered["items"]) == 30
    assert succeeded(postback("dlq", "replay", "--all")) == "replayed 0, skipped 0, failed 0\n"


async def test_dlq_discard_keeps_the_note(postback: Postback, dead_letter: str) -> None:
    out = succeeded(postback("dlq", "discard", dead_letter, "--note", "shop closed"))
    assert out == f"discarded: {dead_letter}\n"
    assert succeeded(postback("dlq", "list")) == "no dead letters\n"
    shown = succeeded(postback("deliveries", "show", dead_letter))
    assert "state      discarded" in shown
    assert "shop closed" in shown
    assert "discard" in shown


async def test_dlq_replay_by_filter_exits_1_when_a_replay_failed(
    postback: Postback,
    db: asyncpg.Connection,
    flaky: Flaky,
    settings: Settings,
    producer: Producer,
    database_url: str,
) -> None:
    """A replay fails when Postgres refuses it (a skip is not a failure): here another
    session holds one dead letter's row, and with a lock_timeout set for the command that
    replay gives up while the other goes through."""
    await make_deliveries(db, producer, flaky, settings, dead=2)
    dead = await db.fetch("SELECT id FROM deliveries WHERE state = 'dead' ORDER BY order_number")
    locked, free = (str(row["id"]) for row in dead)
    async with db.transaction():
        await db.execute("SELECT 1 FROM deliveries WHERE id = $1 FOR UPDATE", uuid.UUID(locked))
        result = postback(
            "dlq",
            "replay",
            "--affiliate",
            "bob",
            env_overrides={"POSTBACK_DATABASE_URL": with_options(database_url, lock_timeout=300)},
        )

    assert "Traceback" not in result.stderr, result.stderr
    assert result.returncode == 1
    assert result.stdout.splitlines() == [
        f"failed: {locked}: LockNotAvailableError (SQLSTATE 55P03)",
        "replayed 1, skipped 0, failed 1",
    ]
    states = {str(row["id"]): row["state"] for row in await db.fetch("SELECT * FROM deliveries")}
    assert (states[locked], states[free]) == ("dead", "pending")


async def test_dlq_replay_and_discard_record_the_user_at_the_host_by_default(
    postback: Postback,
    db: asyncpg.Connection,
    flaky: Flaky,
    settings: Settings,
    producer: Producer,
) -> None:
    await make_deliveries(db, producer, flaky, settings, dead=2)
    replayed, discarded = (
        item["id"] for item in json.loads(succeeded(postback("dlq", "list", "--json")))["items"]
    )
    succeeded(postback("dlq", "replay", replayed))
    succeeded(postback("dlq", "discard", discarded, "--note", "test order"))

    expected = f"{getpass.getuser()}@{socket.gethostname()} (cli)"
    for delivery, action in ((replayed, "replay"), (discarded, "discard")):
        shown = json.loads(succeeded(postback("deliveries", "show", delivery, "--json")))
        assert [(a["action"], a["actor"]) for a in shown["actions"]] == [(action, expected)]


async def test_callbacks_disable_and_enable(postback: Postback, db: asyncpg.Connection) -> None:
    await save_callback(db, "ann", "order.created", "GET", "https://t.example/pb")
    assert (
        succeeded(
            postback("callbacks", "disable", "--affiliate", "ann", "--event", "order.created")
        )
        == "disabled: ann order.created\n"
    )
    assert (await callback_rows(db))[0]["enabled"] is False
    assert (
        succeeded(postback("callbacks", "enable", "--affiliate", "ann", "--event", "order.created"))
        == "enabled: ann order.created\n"
    )
    assert (await callback_rows(db))[0]["enabled"] is True
    assert "no order.updated callback for affiliate ann" in refusal(
        postback("callbacks", "disable", "--affiliate", "ann", "--event", "order.updated")
    )


def test_serve_refuses_to_start_without_tokens(postback: Postback) -> None:
    line = refusal(postback("serve", "--port", "0"))
    assert "POSTBACK_INGEST_TOKEN and POSTBACK_OPS_TOKEN not set" in line
    assert "--insecure" in line


def test_empty_tokens_as_in_env_example_are_unset_not_refused(postback: Postback) -> None:
    """.env.example has `POSTBACK_INGEST_TOKEN=`: a worker runs with it, serve says what
    is missing rather than that the token is too short."""
    empty = {"POSTBACK_INGEST_TOKEN": "", "POSTBACK_OPS_TOKEN": ""}
    line = refusal(postback("serve", "--port", "0", env_overrides=empty))
    assert "POSTBACK_INGEST_TOKEN and POSTBACK_OPS_TOKEN not set" in line
    succeeded(postback("worker", "--burst", env_overrides=empty))
