"""The `postback` command, run as a user runs it: a subprocess with its own environment.

Every refusal must be exit code 2 and one line on stderr naming the problem, never a
traceback. Async tests run the command synchronously, since their event loop has nothing
to do meanwhile, except where the loop must serve the `receiver` while the command runs.
"""

from __future__ import annotations

import asyncio
import getpass
import io
import json
import re
import socket
import subprocess
import time
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import asyncpg
import psutil
import pytest

from ops.actions import lookup
from ops.actions.filters import IdPrefix
from ops.cli import console
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
from tests.support.ledger import DELAYED_REASON, make_deliveries, make_store_wide_and_delayed
from tests.support.ports import free_port
from tests.support.receivers import ALLOW_NETWORKS, Flaky, Receiver
from tests.support.schemas import released
from tests.support.servers import RUN, database_at, database_name, with_options
from tests.support.workers import drain
from worker import database, sign
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
        pytest.param(["preview", "--file", "-"], "--url", id="missing-option"),
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


async def test_callbacks_set_leaves_a_disabled_callback_disabled_and_says_how_to_enable_it(
    db: asyncpg.Connection, postback: Postback
) -> None:
    saved = await save_callback(db, "ann", "order.updated", "GET", "https://old.example/pb")
    await db.execute(
        "SELECT postback_disable_callback($1, 'relay', 'HTTP 410: callback disabled', NULL, true)",
        saved.id,
    )

    result = postback(
        "callbacks", "set", "--affiliate", "ann", "--event", "order.updated",
        "--method", "GET", "--url", "https://new.example/pb",
    )  # fmt: skip

    lines = succeeded(result).splitlines()
    assert lines[0] == "saved: ann order.updated GET https://new.example/pb"
    assert lines[1].startswith("ann order.updated: disabled by relay at ")
    assert lines[1].endswith(" UTC: HTTP 410: callback disabled")
    assert lines[2] == (
        "  to enable it: postback callbacks enable --affiliate ann --event order.updated"
    )
    assert (await callback_rows(db))[0]["enabled"] is False


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
        pytest.param(
            {"--url": "https://ann:hunter2@t.example/pb"},
            ["credentials (user:password@) before the host t.example", "shown in listings"],
            id="credentials",
        ),
        pytest.param(
            {"--url": "https://t.example/pb?o={{order.number}}#top"},
            ["fragment", "never sent"],
            id="fragment",
        ),
        pytest.param(
            {"--url": "https://münchen.example/pb"},
            ["write the host in its ASCII form, xn--mnchen-3ya.example"],
            id="non-ascii-host",
        ),
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


async def test_callbacks_set_takes_statuses_a_delay_and_the_store_wide_affiliate(
    db: asyncpg.Connection, postback: Postback
) -> None:
    ann = ["--affiliate", "ann", "--event", "order.updated", "--url", "https://t.example/pb"]
    store = ["--affiliate", "*", "--event", "order.created", "--url", "https://store.example/pb"]

    saved = postback("callbacks", "set", *ann, "--statuses", "approved, refunded", "--delay", "5m")
    saved_store = postback("callbacks", "set", *store, "--delay", "90s")

    assert succeeded(saved) == (
        "saved: ann order.updated GET https://t.example/pb (statuses approved,refunded; delay 5m)\n"
    )
    assert succeeded(saved_store) == (
        "saved: * (store-wide) order.created GET https://store.example/pb (delay 90s)\n"
    )
    rows = await db.fetch("SELECT affiliate_id, statuses, delay_seconds FROM callbacks")
    assert sorted(tuple(row) for row in rows) == [
        ("*", None, 90),
        ("ann", ["approved", "refunded"], 300),
    ]
    lines = succeeded(postback("callbacks", "list")).splitlines()
    assert lines[0].split()[5:7] == ["STATUSES", "DELAY"]
    assert sorted(line.split() for line in lines[1:]) == [
        ["*", "(store-wide)", "order.created", "GET", "yes", "no", "all", "90s", "-",
         "https://store.example/pb"],
        ["ann", "order.updated", "GET", "yes", "no", "approved,refunded", "5m", "-",
         "https://t.example/pb"],
    ]  # fmt: skip
    as_json = json.loads(succeeded(postback("callbacks", "list", "--json")))
    assert sorted(({key: cb[key] for key in CONDITIONS} for cb in as_json), key=str) == [
        {"store_wide": False, "statuses": ["approved", "refunded"], "delay": "5m",
         "delay_seconds": 300},
        {"store_wide": True, "statuses": None, "delay": "90s", "delay_seconds": 90},
    ]  # fmt: skip
    # `set` replaces the callback whole: without them, every status, at once.
    assert succeeded(postback("callbacks", "set", *ann)) == (
        "saved: ann order.updated GET https://t.example/pb\n"
    )
    row = await db.fetchrow(
        "SELECT statuses, delay_seconds FROM callbacks WHERE affiliate_id = 'ann'"
    )
    assert row is not None
    assert tuple(row) == (None, 0)
    switched = postback("callbacks", "disable", "--affiliate", "*", "--event", "order.created")
    assert succeeded(switched) == "disabled: * order.created\n"


@pytest.mark.parametrize(
    ("option", "value", "message"),
    [
        ("--delay", "25h", "delay '25h' is out of range; it may be 0 to 24h (86400 s)"),
        ("--delay", "5x", "delay '5x' is not a duration; write it like 90s, 5m or 2h"),
        (
            "--statuses",
            "approved,,x",
            "statuses must be order statuses separated by commas, e.g. approved,refunded; "
            "got an empty one",
        ),
        ("--statuses", "a,a", "status 'a' is listed twice"),
    ],
)
async def test_callbacks_set_refuses_bad_statuses_or_delay_in_one_line(
    db: asyncpg.Connection, postback: Postback, option: str, value: str, message: str
) -> None:
    args = ["--affiliate", "ann", "--event", "order.created", "--url", "https://t.example/pb"]

    line = refusal(postback("callbacks", "set", *args, option, value))

    assert line == f"postback: error: {message}"  # as the API words it (test_service.py)
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


CONDITIONS = {"store_wide": False, "statuses": None, "delay": "0s", "delay_seconds": 0}
"""What `--json` lists of a callback set without --statuses or --delay, for one affiliate."""
HEALTHY = {"dead_streak": 0, "dead_since": None, "disabled": None, "dead_letters": None}
"""What `--json` lists of the health of an enabled callback none of whose deliveries died."""


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
        ["AFFILIATE", "EVENT", "METHOD", "ENABLED", "SECRET", "STATUSES", "DELAY", "STREAK", "URL"],
        ["ann", "order.created", "GET", "yes", "yes", "all", "none", "-", ANN_URL],
        ["bob", "order.updated", "POST", "yes", "no", "all", "none", "-", BOB_URL],
    ]
    assert SECRET not in stdout


@pytest.mark.usefixtures("two_callbacks")
def test_callbacks_list_json_has_every_field_but_the_secret(postback: Postback) -> None:
    stdout = succeeded(postback("callbacks", "list", "--json"))

    assert listed(stdout) == [ANN_LISTED, BOB_LISTED]
    for item in json.loads(stdout):
        assert set(item) == {
            *ANN_LISTED, "id", "created_at", "updated_at", *CONDITIONS, *HEALTHY
        }  # fmt: skip
        assert {key: item[key] for key in CONDITIONS} == CONDITIONS
        assert {key: item[key] for key in HEALTHY} == HEALTHY
        assert isinstance(item["id"], int)
        datetime.fromisoformat(item["created_at"])
        datetime.fromisoformat(item["updated_at"])
    assert SECRET not in stdout
    assert all("secret" not in item for item in json.loads(stdout))


@pytest.mark.usefixtures("two_callbacks")
def test_callbacks_list_filters_by_affiliate(postback: Postback) -> None:
    as_table = succeeded(postback("callbacks", "list", "--affiliate", "ann"))
    as_json = succeeded(postback("callbacks", "list", "--affiliate", "bob", "--json"))

    assert table(as_table)[1:] == [
        ["ann", "order.created", "GET", "yes", "yes", "all", "none", "-", ANN_URL]
    ]
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

    stdout = succeeded(postback("preview", "--url", GET_TEMPLATE, "--file", event))

    assert stdout == f"GET {GET_RENDERED}\n"


def test_preview_reads_stdin_and_keeps_numeric_amounts_exact(postback: Postback) -> None:
    data = event_data("preview-stdin")
    text = json.dumps(data).replace('"10.50"', "10.50").replace('"1.05"', "1.05")
    assert '"amount": 10.50' in text  # a JSON number, which a float would turn into 10.5

    stdout = succeeded(postback("preview", "--url", GET_TEMPLATE, "--file", "-", stdin=text))

    assert stdout == f"GET {GET_RENDERED}\n"


def test_preview_post_prints_the_json_body(postback: Postback, tmp_path: Path) -> None:
    data = event_data("preview-post", occurred_at=OCCURRED_AT)
    event = write(tmp_path, json.dumps(data))

    result = postback(
        "preview", "--method", "POST", "--url", "https://t.example/hook/{{affiliate.id}}",
        "--file", event,
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
        postback("preview", "--json", "--method", method, "--url", GET_TEMPLATE, "--file", event)
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

    line = refusal(postback("preview", "--url", url, "--file", event))

    for name in named:
        assert name in line


def test_preview_needs_no_database_or_redis(postback: Postback, tmp_path: Path) -> None:
    event = write(tmp_path, json.dumps(event_data("preview-offline")))

    result = postback(
        "preview", "--url", GET_TEMPLATE, "--file", event,
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
        result = postback("send", "--file", write(tmp_path, text))
    else:
        result = postback("send", "--file", "-", stdin=text)

    assert succeeded(result) == printed
    assert await queued(producer) == {event["id"] for event in events}


async def test_send_reports_events_already_queued(
    producer: Producer, postback: Postback, tmp_path: Path
) -> None:
    first, second = event_data("send-again-1"), event_data("send-again-2")
    assert succeeded(postback("send", "--file", "-", stdin=json.dumps(first))) == (
        "enqueued 1 event\n"
    )

    assert succeeded(postback("send", "--file", "-", stdin=json.dumps(first))) == (
        "enqueued 0 events, 1 already queued\n"
    )
    assert succeeded(postback("send", "--file", "-", stdin=json_lines(first, second))) == (
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

    line = refusal(postback("send", "--file", write(tmp_path, text)))

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

    line = refusal(postback("send", "--file", write(tmp_path, text)))

    assert line == f'postback: error: {where}duplicate key "amount"'
    assert await queued(producer) == set()


def test_preview_refuses_a_key_given_twice_naming_it(postback: Postback) -> None:
    text = json.dumps(event_data("twice-preview")).replace('"#1001"', '"#1001", "number": "#2"')
    line = refusal(postback("preview", "--url", GET_TEMPLATE, "--file", "-", stdin=text))
    assert line == 'postback: error: duplicate key "number"'


@pytest.mark.parametrize("text", ["", "\n\n", "[]"])
async def test_send_refuses_input_without_events(
    producer: Producer, postback: Postback, text: str
) -> None:
    assert "no event in the input" in refusal(postback("send", "--file", "-", stdin=text))
    assert await queued(producer) == set()


BAD_AMOUNT = "order.amount: Input should be a valid decimal"


@pytest.mark.parametrize("command", ["send", "preview"])
@pytest.mark.parametrize(
    ("text", "said"),
    [
        pytest.param("1", "invalid event: must be a JSON object", id="not-an-object"),
        pytest.param("[1]", "invalid event 1: must be a JSON object", id="array-item"),
        pytest.param(
            json.dumps(with_amount(event_data("stutter"), "ten")),
            f"invalid event: {BAD_AMOUNT}",
            id="bad-field",
        ),
        pytest.param(
            json.dumps([with_amount(event_data("stutter"), "ten")]),
            f"invalid event 1: {BAD_AMOUNT}",
            id="bad-field-in-array",
        ),
        pytest.param(
            json_lines(with_amount(event_data("stutter"), "ten"), event_data("stutter-2")),
            f"invalid event on line 1: {BAD_AMOUNT}",
            id="bad-field-in-lines",
        ),
    ],
)
def test_an_invalid_event_is_named_once(
    postback: Postback, command: str, text: str, said: str
) -> None:
    """Not `event: invalid event: event: must be a JSON object`."""
    args = ["--url", GET_TEMPLATE] if command == "preview" else []
    line = refusal(postback(command, *args, "--file", "-", stdin=text))
    assert line == f"postback: error: {said}"


def test_send_with_unreachable_redis_is_refused_in_one_line(
    postback: Postback, tmp_path: Path
) -> None:
    event = write(tmp_path, json.dumps(event_data("send-no-redis")))

    result = postback(
        "send", "--file", event, env_overrides={"POSTBACK_REDIS_URL": UNREACHABLE_REDIS}
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

    result = postback("send", "--file", event, env_overrides={"POSTBACK_REDIS_URL": bad_url})

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
    succeeded(postback("send", "--file", write(tmp_path, json.dumps(data))))

    # In a thread: the receiver answers on this test's event loop while the worker runs.
    result = await asyncio.to_thread(postback, "worker", "--burst")

    succeeded(result)
    assert [(got.method, got.path_qs) for got in receiver.requests] == [
        ("GET", f"/pb?o=%231001&a=10.50&e={data['id']}")
    ]
    state = await db.fetchval("SELECT state FROM deliveries WHERE event_id = $1", data["id"])
    assert state == "delivered"
    assert await queued(producer) == set()


async def test_a_template_saved_before_credentials_and_fragments_were_refused_is_still_sent(
    db: asyncpg.Connection, producer: Producer, receiver: Receiver, settings: Settings
) -> None:
    """Saved by an earlier version, as its row holds it: the rule is for new templates."""
    template = receiver.url.replace("://", "://ann:pw@", 1) + "/pb?o={{order.number}}#top"
    await db.execute(
        "INSERT INTO callbacks (affiliate_id, event_type, method, url_template)"
        " VALUES ('ann', 'order.created', 'GET', $1)",
        template,
    )
    await producer.publish(event_data("old-template"))
    await drain(settings)

    assert [got.path_qs for got in receiver.requests] == ["/pb?o=%231001"]


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
    assert succeeded(postback("preview", "--url", url, "--file", event)) == (
        f"GET {receiver.url}{sent}\n"
    )

    succeeded(postback("send", "--file", event))
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
        "GET /dan/v1/postback",
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
        ["demo-dan", "dead", "HTTP"],  # HTTP 404: left for the page, to replay
    ]
    assert "answered 404: dan's postbacks moved to /dan/v2/" in stdout


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
        "ARRIVED",
        "(UTC)",
        "AFFILIATE",
        "EVENT",
        "ORDER",
        "STATE",
        "TRIES",
        "LAST",
        "CALLBACK",
        "REASON",
    ]
    assert len(lines) == 3
    assert all(" own " in line for line in lines[1:])
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
    as_json = json.loads(succeeded(postback("deliveries", "show", dead_letter, "--json")))
    assert [a["status_code"] for a in as_json["attempts"]] == [500, 500, 500]
    # Each attempt: what it sent and what came back, headers and all.
    for attempt in as_json["attempts"]:
        assert attempt["response_headers"]["Content-Type"] == "text/plain; charset=utf-8"
        exchange = [
            f"      > GET {flaky.url}/fail/bob?o=%231001",
            f"      > User-Agent: {USER_AGENT}",
            f"      > Idempotency-Key: {dead_letter}",
            "      < HTTP 500",
            "      < Content-Type: text/plain; charset=utf-8",
            "      < Content-Length: 20",
            "      <",
            "      < down for maintenance",
        ]
        block = shown.split(f"  #{attempt['number']}  ")[1].split("\n  #")[0].splitlines()
        assert block[0].endswith("HTTP 500")
        assert set(exchange) <= set(block[1:]), block


@pytest.mark.parametrize(
    ("query", "sent_query"),
    [
        ("o={{order.number}}", "o=%231001"),
        # With filters the body carries rendered_query too, made again from the stored URL.
        (
            'o={{order.number}}&c={{order.amount | cents}}&s={{link.sub_id | default: "none"}}',
            "o=%231001&c=1050&s=fb1",
        ),
    ],
    ids=["plain", "filters"],
)
async def test_deliveries_show_prints_the_request_exactly_as_sent(
    postback: Postback,
    db: asyncpg.Connection,
    receiver: Receiver,
    tmp_path: Path,
    query: str,
    sent_query: str,
) -> None:
    """Every header the relay set (the signature's among them) and the body, byte for
    byte as the receiver got them; never the secret."""
    url = receiver.url + "/pb?" + query
    await save_callback(db, "ann", "order.created", "POST", url, SECRET)
    data = event_data("show-post")
    succeeded(postback("send", "--file", write(tmp_path, json.dumps(data))))
    succeeded(await asyncio.to_thread(postback, "worker", "--burst"))
    [got] = receiver.requests
    did = str(delivery_id(parse_event(data)))

    shown = succeeded(postback("deliveries", "show", did))

    lines = shown.splitlines()
    start = lines.index(f"      > POST {receiver.url}/pb?{sent_query}")
    sent = [
        line.removeprefix("      >").removeprefix(" ")
        for line in lines[start:]
        if line.startswith("      >")
    ]
    relay_set = ("User-Agent", "Idempotency-Key", "Content-Type", *sign.HEADER_NAMES)
    assert set(sent[1:-2]) == {f"{name}: {got.headers[name]}" for name in relay_set}
    assert sent[-2:] == ["", got.body.decode()]
    assert "      < HTTP 200" in lines
    assert "      < Content-Length: 6" in lines
    assert "      < thanks" in lines
    assert SECRET not in shown


async def test_deliveries_say_which_callback_and_when_a_delayed_one_is_due(
    postback: Postback,
    db: asyncpg.Connection,
    flaky: Flaky,
    settings: Settings,
    producer: Producer,
) -> None:
    made = await make_store_wide_and_delayed(db, producer, flaky, settings)
    due = f"due {made.due:%Y-%m-%d %H:%M:%S} UTC ({DELAYED_REASON})"

    lines = succeeded(postback("deliveries", "list")).splitlines()

    assert lines[0].split()[-2:] == ["CALLBACK", "REASON"]
    [zed] = [line for line in lines if " zed " in line]
    assert re.search(r" delivered .* 200 +store-wide$", zed), zed
    [ann] = [line for line in lines if " ann " in line]
    assert re.search(r" pending +0 +- +own +" + re.escape(due) + "$", ann), ann
    shown = succeeded(postback("deliveries", "show", made.store_wide)).splitlines()
    assert f"callback   #{made.store_callback} (store-wide)" in shown
    shown = succeeded(postback("deliveries", "show", made.delayed)).splitlines()
    assert f"state      pending: {due}" in shown
    assert f"callback   #{made.delayed_callback} (own)" in shown
    assert not [line for line in shown if line.startswith("next try")]  # said once, above
    as_json = json.loads(succeeded(postback("deliveries", "show", made.store_wide, "--json")))
    assert (as_json["callback_id"], as_json["callback_store_wide"]) == (made.store_callback, True)

    # The store-wide callback removed, its deliveries still name it.
    succeeded(postback("callbacks", "remove", "--affiliate", "*", "--event", "order.created"))
    as_json = json.loads(succeeded(postback("deliveries", "list", "--json")))
    [zed_item] = [item for item in as_json["items"] if item["affiliate_id"] == "zed"]
    assert (zed_item["callback_id"], zed_item["callback_store_wide"]) == (made.store_callback, None)
    [zed] = [
        line for line in succeeded(postback("deliveries", "list")).splitlines() if " zed " in line
    ]
    assert zed.endswith(" removed"), zed
    shown = succeeded(postback("deliveries", "show", made.store_wide)).splitlines()
    assert f"callback   #{made.store_callback} (removed since)" in shown


@pytest.mark.parametrize(
    ("args", "named"),
    [
        (("dlq", "show", "not-a-uuid"), "error: ID: must be a delivery id"),
        (("deliveries", "show", "3f2a9c"), "error: ID: give at least 8 characters"),
        (("dlq", "replay", "not-a-uuid"), "error: ID: must be a delivery id"),
        (("dlq", "discard", "3f2a9c", "--note", "x"), "error: ID: give at least 8 characters"),
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


PREFIXED = [
    uuid.UUID("abcdef01-aaaa-4000-8000-000000000001"),
    uuid.UUID("abcdef01-bbbb-4000-8000-000000000002"),
    uuid.UUID("abcdef02-aaaa-4000-8000-000000000003"),
]
"""Three dead letters, two of whose ids start alike."""


@pytest.fixture
async def prefixed(db: asyncpg.Connection) -> list[uuid.UUID]:
    for n, did in enumerate(PREFIXED):
        await db.execute(
            """
            INSERT INTO deliveries (id, event_id, event_type, affiliate_id, order_number,
                                    occurred_at, event, state, reason)
            VALUES ($1, $2, 'order.created', 'ann', '#1', now(), '{}', 'dead', 'HTTP 404')
            """,
            did,
            f"prefixed-{n}",
        )
    return PREFIXED


@pytest.mark.parametrize("command", [("deliveries", "show"), ("dlq", "show")])
def test_a_delivery_is_shown_by_the_start_of_its_id(
    postback: Postback, prefixed: list[uuid.UUID], command: tuple[str, str]
) -> None:
    first, second, third = map(str, prefixed)
    for typed, shown in (
        ("abcdef02", third),
        ("ABCDEF01-A", first),
        ("abcdef01bbbb", second),
        (second, second),
    ):
        assert f"delivery   {shown}\n" in succeeded(postback(*command, typed)), typed


def test_an_ambiguous_id_prefix_is_refused_listing_the_matches(
    postback: Postback, prefixed: list[uuid.UUID]
) -> None:
    first, second, _ = map(str, prefixed)
    expected = (
        f"postback: error: ID: abcdef01 starts 2 delivery ids ({first}, {second}); give more of it"
    )
    assert refusal(postback("deliveries", "show", "abcdef01")) == expected
    assert refusal(postback("dlq", "replay", "abcdef01")) == expected
    assert refusal(postback("dlq", "discard", "abcdef01", "--note", "x")) == expected
    assert refusal(postback("dlq", "show", "abcdef03")) == (
        "postback: error: no delivery id starts with abcdef03"
    )


async def test_dlq_discard_and_replay_take_the_start_of_an_id(
    postback: Postback, db: asyncpg.Connection, prefixed: list[uuid.UUID]
) -> None:
    first, second, _ = map(str, prefixed)
    assert succeeded(postback("dlq", "discard", "abcdef01-b", "--note", "test")) == (
        f"discarded: {second}\n"
    )
    # Replayed by its prefix, the delivery is named in full (here skipped: ann has no
    # callback).
    assert refusal(postback("dlq", "replay", "abcdef01-a")) == (
        f"postback: error: {first}: not replayed: no order.created callback for affiliate ann, "
        "nor a store-wide one"
    )


@pytest.mark.parametrize("typed", ["abcdef01", "abcdef01-a", "abcdef01aaaa4"])
async def test_an_id_prefix_is_looked_up_by_the_primary_keys_index(
    db: asyncpg.Connection, prefixed: list[uuid.UUID], typed: str
) -> None:
    """A range on the id, never a scan of the ledger (nor a text match on every id)."""
    prefix = IdPrefix.parse(typed)
    async with db.transaction():
        await db.execute("SET LOCAL enable_seqscan = off")
        plan = await db.fetchval(
            f"EXPLAIN (FORMAT JSON) {lookup.ID_RANGE}", prefix.low, prefix.high, 6
        )
    assert "deliveries_pkey" in plan
    assert "Seq Scan" not in plan
    assert await lookup.ids_starting(db, prefix, 6) == [
        did for did in prefixed if prefix.low <= did <= prefix.high
    ]


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
    started = time.monotonic()
    result = postback("dlq", "replay", "--affiliate", "bob", "--mode", "resend")
    took = time.monotonic() - started
    assert succeeded(result).splitlines()[-1] == "replayed 30, skipped 0, failed 0"
    progress = result.stderr.splitlines()
    assert progress[0] == "replaying: 1/30"
    assert progress[-1] == "replaying: 30/30"
    assert len(progress) <= 2 + took  # not a line per delivery: at most one a second
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


# --- option values, renamed options, secrets, replays without Redis ---------------------


@pytest.mark.parametrize(
    ("args", "named"),
    [
        (("serve", "--insecure", "--port", "99999"), "argument --port: must be a port number"),
        (("serve", "--port", "-1"), "argument --port: must be a port number from 0 to 65535"),
        (("serve", "--port", "\uff18\uff10"), "argument --port: must be a port number"),
        (("receive", "--port", "65536"), "argument --port: must be a port number"),
        (("demo", "--receiver", "receiver:9000"), "argument --receiver: must be an http://"),
        (("demo", "--receiver", "ftp://receiver"), "argument --receiver: must be an http://"),
        (("demo", "--receiver", "http://receiver:99999"), "argument --receiver: must be an"),
        (("demo", "--receiver", "http://receiver/?a=1"), "without a query, fragment or cred"),
        (("demo", "--receiver", "http://u:p@receiver/"), "without a query, fragment or cred"),
        (("dlq", "list", "--limit", "99999999999"), "--limit: must be a whole number"),
        (("dlq", "list", "--since", "99999999999d"), "--since: is further back than any time"),
        (("dlq", "list", "--cursor", "zz"), "--cursor: is not one this service gave out"),
    ],
    ids=lambda value: " ".join(value) if isinstance(value, tuple) else "",
)
def test_a_bad_option_value_is_refused_in_one_line(
    postback: Postback, args: tuple[str, ...], named: str
) -> None:
    """Before anything starts: `serve --port 99999` was a traceback from the socket."""
    assert named in refusal(postback(*args, env_overrides=NO_SERVERS))


@pytest.mark.parametrize("command", ["send", "preview"])
def test_the_old_event_option_of_send_and_preview_works_with_a_notice(
    producer: Producer, postback: Postback, command: str
) -> None:
    data = event_data(f"renamed-{command}")
    args = ["--url", GET_TEMPLATE] if command == "preview" else []

    result = postback(command, *args, "--event", "-", stdin=json.dumps(data))

    assert succeeded(result) == (
        "enqueued 1 event\n" if command == "send" else f"GET {GET_RENDERED}\n"
    )
    assert result.stderr == (
        f"postback {command}: --event is deprecated here and goes in the next release: use "
        "--file (--event names an event type, as in `postback callbacks`)\n"
    )
    assert "--event" not in succeeded(postback(command, "--help"))


def test_an_event_type_given_as_the_file_is_named_as_one(postback: Postback) -> None:
    assert refusal(postback("send", "--file", "order.created")) == (
        "postback: error: cannot read order.created: No such file or directory "
        "(order.created is an event type; --file takes events, each with its type)"
    )


async def test_callbacks_set_no_secret_removes_it_and_requests_go_unsigned(
    db: asyncpg.Connection,
    producer: Producer,
    receiver: Receiver,
    settings: Settings,
    postback: Postback,
) -> None:
    url = receiver.url + "/pb?o={{order.number}}"
    await save_callback(db, "ann", "order.created", "GET", url, SECRET)
    await producer.publish(event_data("signed"))
    await drain(settings)
    args = ["--affiliate", "ann", "--event", "order.created", "--url", url]

    assert "not allowed with argument --secret" in refusal(
        postback("callbacks", "set", *args, "--secret", "x", "--no-secret")
    )
    assert succeeded(postback("callbacks", "set", *args, "--no-secret")) == (
        f"saved: ann order.created GET {url}\nsecret: removed; its requests are no longer signed\n"
    )
    [row] = await callback_rows(db)
    assert row["secret"] is None
    assert table(succeeded(postback("callbacks", "list")))[1][4] == "no"  # the SECRET column
    await producer.publish(event_data("unsigned"))
    await drain(settings)

    signed, unsigned = (got.headers for got in receiver.requests)
    assert "webhook-signature" in signed
    assert not {"webhook-id", "webhook-timestamp", "webhook-signature"} & set(unsigned)


LEFT_TO_SWEEP = (
    "Redis is unreachable; the delivery is reopened and the sweep queues it within a minute\n"
)


async def test_dlq_replay_with_redis_unreachable_says_the_sweep_queues_it_and_exits_3(
    postback: Postback, db: asyncpg.Connection, dead_letter: str
) -> None:
    result = postback(
        "dlq", "replay", dead_letter, env_overrides={"POSTBACK_REDIS_URL": UNREACHABLE_REDIS}
    )

    assert (result.returncode, result.stdout, result.stderr) == (3, LEFT_TO_SWEEP, "")
    state = await db.fetchval("SELECT state FROM deliveries WHERE id = $1", uuid.UUID(dead_letter))
    assert state == "pending"  # reopened: the sweep finds it due


async def test_dlq_replay_by_filter_with_redis_unreachable_exits_3(
    postback: Postback,
    db: asyncpg.Connection,
    flaky: Flaky,
    settings: Settings,
    producer: Producer,
) -> None:
    await make_deliveries(db, producer, flaky, settings, dead=2)

    result = postback(
        "dlq", "replay", "--affiliate", "bob",
        env_overrides={"POSTBACK_REDIS_URL": UNREACHABLE_REDIS},
    )  # fmt: skip

    assert result.returncode == 3, result.stderr
    assert result.stdout.splitlines() == [
        "replayed 2, skipped 0, failed 0",
        "Redis is unreachable; the 2 deliveries are reopened and the sweep queues them within "
        "a minute",
    ]
    assert "{" not in result.stderr  # progress only, no JSON log line


@pytest.mark.unit
def test_progress_outside_a_terminal_is_a_line_at_most_once_a_second() -> None:
    stream = io.StringIO()
    now = [0.0]
    progress = console.ProgressBar("replaying", stream, clock=lambda: now[0])
    for done in range(1, 1001):
        now[0] = done * 0.004  # 1000 replays in 4 seconds
        progress(done, 1000)

    assert stream.getvalue().splitlines() == [
        "replaying: 1/1000",
        "replaying: 251/1000",
        "replaying: 501/1000",
        "replaying: 751/1000",
        "replaying: 1000/1000",
    ]


async def test_send_says_which_events_already_settled_and_does_not_enqueue_them(
    postback: Postback,
    db: asyncpg.Connection,
    flaky: Flaky,
    settings: Settings,
    producer: Producer,
) -> None:
    made = await make_deliveries(db, producer, flaky, settings)
    rows = await db.fetch(
        "SELECT id, event_id, event, state, updated_at FROM deliveries"
        " WHERE event_id = ANY($1::text[])",
        [made.ann, made.carol, *made.bobs],
    )
    by_event = {row["event_id"]: row for row in rows}
    fresh = event_data("fresh")
    sent = [by_event[made.ann]["event"], fresh, by_event[made.carol]["event"]]
    sent.append(by_event[made.bobs[0]]["event"])

    stdout = succeeded(postback("send", "--file", "-", stdin=json_lines(*sent)))

    def at(event_id: str) -> str:
        return f"{by_event[event_id]['updated_at'].astimezone(UTC):%Y-%m-%d %H:%M:%S} UTC"

    bob = by_event[made.bobs[0]]
    assert stdout.splitlines() == [
        "enqueued 1 event, 3 already settled",
        f"{made.ann}: already settled: delivered at {at(made.ann)}",
        f"{made.carol}: already settled: skipped at {at(made.carol)} "
        "(no order.created callback configured for affiliate carol)",
        f"{made.bobs[0]}: already settled: dead at {at(made.bobs[0])} "
        f"(gave up after 3 attempts, last: HTTP 500); "
        f"to send it again: postback dlq replay {bob['id']}",
    ]
    assert await queued(producer) == {fresh["id"]}


async def test_send_without_the_database_enqueues_all_the_same(
    producer: Producer, postback: Postback
) -> None:
    data = event_data("send-no-db")

    result = postback(
        "send", "--file", "-", stdin=json.dumps(data),
        env_overrides={"POSTBACK_DATABASE_URL": UNREACHABLE_DATABASE},
    )  # fmt: skip

    assert succeeded(result) == "enqueued 1 event\n"
    assert result.stderr.startswith(
        "postback: warning: not checked for events already settled, nor recorded in the "
        "ledger before they are queued: "
    )
    assert await queued(producer) == {data["id"]}


async def test_send_records_the_events_in_the_ledger_before_it_queues_them(
    db: asyncpg.Connection, producer: Producer, postback: Postback
) -> None:
    sent = [event_data("send-durable-1"), event_data("send-durable-2")]

    assert succeeded(postback("send", "--file", "-", stdin=json_lines(*sent))) == (
        "enqueued 2 events\n"
    )

    rows = await db.fetch("SELECT event_id, state, event FROM deliveries ORDER BY created_at")
    assert [(row["event_id"], row["state"]) for row in rows] == [
        (data["id"], "accepted") for data in sent
    ]
    # Stamped with the time it was accepted, in the ledger as in its job.
    assert all("occurred_at" in row["event"] for row in rows)
    assert await queued(producer) == {data["id"] for data in sent}
    # Listed, and found by their state, before any worker took them.
    listed = json.loads(succeeded(postback("deliveries", "list", "--state", "accepted", "--json")))
    assert sorted(item["event_id"] for item in listed["items"]) == sorted(d["id"] for d in sent)
    lines = succeeded(postback("deliveries", "list", "--state", "accepted")).splitlines()
    assert lines[0].split()[:3] == ["ID", "ARRIVED", "(UTC)"]  # accepted, not taken yet
    assert len(lines) == 3
    assert all(" accepted " in line for line in lines[1:])


@pytest.fixture
async def missing_database_url(admin_url: str) -> AsyncIterator[str]:
    """A URL naming a database that does not exist (dropped afterwards, if made)."""
    name = f"postback_test_{RUN}_missing"
    yield database_at(admin_url, name)
    admin = await asyncpg.connect(admin_url)
    try:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await admin.close()


def test_db_init_creates_a_database_that_does_not_exist(
    postback: Postback, missing_database_url: str
) -> None:
    env = {"POSTBACK_DATABASE_URL": missing_database_url}
    name = database_name(missing_database_url)

    said = succeeded(postback("db", "init", env_overrides=env))

    assert said == (
        f"created database {name}, which did not exist (connected to the postgres database "
        f"as postgres)\nschema created at version {CURRENT}\n"
    )
    assert succeeded(postback("callbacks", "list", env_overrides=env)) == "no callbacks\n"


async def test_db_init_says_how_to_create_a_database_its_user_may_not(
    postback: Postback, missing_database_url: str, admin_url: str
) -> None:
    role = f"postback_test_{RUN}_nocreate"
    name = database_name(missing_database_url)
    split = urlsplit(missing_database_url)
    url = split._replace(netloc=f"{role}@{split.netloc.rpartition('@')[2]}").geturl()
    admin = await asyncpg.connect(admin_url)
    try:
        await admin.execute(f'CREATE ROLE "{role}" LOGIN NOCREATEDB')

        line = refusal(postback("db", "init", env_overrides={"POSTBACK_DATABASE_URL": url}))
    finally:
        await admin.execute(f'DROP ROLE "{role}"')
        await admin.close()

    assert line == (
        f"postback: error: database {name} does not exist, and {role} could not create it "
        f"(permission denied to create database): create it as a user who may "
        f'(CREATE DATABASE "{name}" OWNER "{role}"), then run `postback db init` again'
    )
