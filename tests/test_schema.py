"""schema.sql: safe to apply twice, and an upgrade of a database made by its previous version.

Each test has a database of its own, created for it and dropped after it, since upgrading
needs a database that starts with the previous schema rather than the run's current one.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from tests.conftest import RUN, database_at
from worker import database, ledger

PREVIOUS_SCHEMA = """\
-- Postback relay schema. Idempotent: applying it again changes nothing.
-- Postgres is the record; Redis only carries work to the workers.

CREATE TABLE IF NOT EXISTS callbacks (
    id            bigserial PRIMARY KEY,
    affiliate_id  text        NOT NULL CHECK (length(affiliate_id) BETWEEN 1 AND 64),
    event_type    text        NOT NULL CHECK (event_type IN ('order.created', 'order.updated')),
    method        text        NOT NULL CHECK (method IN ('GET', 'POST')),
    url_template  text        NOT NULL,
    secret        text,
    enabled       boolean     NOT NULL DEFAULT true,
    created_at    timestamptz NOT NULL DEFAULT now(),
    updated_at    timestamptz NOT NULL DEFAULT now(),
    UNIQUE (affiliate_id, event_type)
);

-- One row per (event, callback key): the id is derived from the event id, affiliate and
-- event type, so a repeated event id never creates a second delivery, and the receiver sees
-- the same Idempotency-Key on every try.
CREATE TABLE IF NOT EXISTS deliveries (
    id            uuid        PRIMARY KEY,
    event_id      text        NOT NULL,
    event_type    text        NOT NULL,
    affiliate_id  text        NOT NULL,
    order_number  text        NOT NULL,
    callback_id   bigint,     -- no foreign key: the record outlives a removed callback
    event         jsonb       NOT NULL,
    state         text        NOT NULL CHECK (state IN ('pending', 'delivered', 'failed', 'skipped')),
    reason        text,
    request       jsonb,      -- the rendered request: method, url, headers, body
    attempts      integer     NOT NULL DEFAULT 0,  -- kept here so listings need no count
    created_at    timestamptz NOT NULL DEFAULT now(),
    updated_at    timestamptz NOT NULL DEFAULT now()
);

CREATE INDEX IF NOT EXISTS deliveries_affiliate_created ON deliveries (affiliate_id, created_at);
CREATE INDEX IF NOT EXISTS deliveries_order ON deliveries (order_number);
CREATE INDEX IF NOT EXISTS deliveries_state ON deliveries (state) WHERE state <> 'delivered';

CREATE TABLE IF NOT EXISTS attempts (
    id               bigserial   PRIMARY KEY,
    delivery_id      uuid        NOT NULL REFERENCES deliveries (id) ON DELETE CASCADE,
    number           integer     NOT NULL,
    started_at       timestamptz NOT NULL,
    duration_ms      double precision NOT NULL,
    status_code      integer,
    error_class      text,
    error            text,
    response_excerpt text,
    UNIQUE (delivery_id, number)
);
"""  # noqa: E501 -- verbatim, as `git show HEAD~1:schema.sql` printed it
"""schema.sql before retries (issue 2): states pending, delivered, failed and skipped; no
occurred_at, error_class, next_attempt_at, claimed_by, claimed_at or blocked_by in
deliveries, and no request in attempts."""

CURRENT_STATES = ("pending", "retrying", "delivered", "dead", "skipped")
NEW_DELIVERY_COLUMNS = {
    "occurred_at": "timestamp with time zone",
    "error_class": "text",
    "next_attempt_at": "timestamp with time zone",
    "claimed_by": "text",
    "claimed_at": "timestamp with time zone",
    "blocked_by": "uuid",
}
FAILED_AT = datetime(2026, 11, 20, 9, 0, tzinfo=UTC)
DELIVERED_AT = datetime(2026, 11, 20, 9, 30, tzinfo=UTC)
SKIPPED_AT = datetime(2026, 11, 20, 10, 0, tzinfo=UTC)


@asynccontextmanager
async def scratch_database(admin_url: str, label: str) -> AsyncIterator[str]:
    """The URL of an empty database of its own, dropped (whatever holds it open) after."""
    name = f"postback_test_{RUN}_{label}_{uuid.uuid4().hex[:8]}"
    admin = await asyncpg.connect(admin_url)
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
        try:
            yield database_at(admin_url, name)
        finally:
            await admin.execute(f'DROP DATABASE "{name}" WITH (FORCE)')
    finally:
        await admin.close()


async def schema_of(conn: asyncpg.Connection) -> dict[str, set[tuple[Any, ...]]]:
    """Columns, constraints and indexes of the public schema; column order left out, since
    an upgrade can only add columns at the end."""
    columns = await conn.fetch(
        """
        SELECT table_name, column_name, data_type, is_nullable, column_default
        FROM information_schema.columns WHERE table_schema = 'public'
        """
    )
    constraints = await conn.fetch(
        """
        SELECT conrelid::regclass::text, conname, contype, pg_get_constraintdef(oid)
        FROM pg_constraint WHERE connamespace = 'public'::regnamespace
        """
    )
    indexes = await conn.fetch(
        "SELECT tablename, indexname, indexdef FROM pg_indexes WHERE schemaname = 'public'"
    )
    return {
        "columns": {tuple(row) for row in columns},
        "constraints": {tuple(row) for row in constraints},
        "indexes": {tuple(row) for row in indexes},
    }


async def rows_of(conn: asyncpg.Connection) -> dict[str, list[dict[str, Any]]]:
    return {
        "callbacks": [dict(row) for row in await conn.fetch("SELECT * FROM callbacks ORDER BY id")],
        "deliveries": [
            dict(row) for row in await conn.fetch("SELECT * FROM deliveries ORDER BY id")
        ],
        "attempts": [dict(row) for row in await conn.fetch("SELECT * FROM attempts ORDER BY id")],
    }


async def column_types(conn: asyncpg.Connection, table: str) -> dict[str, tuple[str, str]]:
    """Each column of `table`: its type and whether it takes NULL ("YES" or "NO")."""
    rows = await conn.fetch(
        """
        SELECT column_name, data_type, is_nullable FROM information_schema.columns
        WHERE table_schema = 'public' AND table_name = $1
        """,
        table,
    )
    return {row["column_name"]: (row["data_type"], row["is_nullable"]) for row in rows}


async def current_schema(admin_url: str) -> dict[str, set[tuple[Any, ...]]]:
    """What schema.sql makes of an empty database."""
    async with scratch_database(admin_url, "fresh") as url:
        await database.init(url)
        async with database.connection(url) as conn:
            return await schema_of(conn)


def event(event_id: str, order_number: str) -> dict[str, Any]:
    return {
        "id": event_id,
        "type": "order.created",
        "affiliate_id": "ann",
        "order": {"number": order_number, "amount": "10.50", "commission": "1.05"},
    }


async def insert_previous_delivery(
    conn: asyncpg.Connection, state: str, created_at: datetime, reason: str | None
) -> uuid.UUID:
    """A delivery as the previous version of the worker wrote it."""
    delivery = uuid.uuid4()
    event_id = f"{RUN}-{state}"
    await conn.execute(
        """
        INSERT INTO deliveries (id, event_id, event_type, affiliate_id, order_number,
                                callback_id, event, state, reason, request, attempts,
                                created_at, updated_at)
        VALUES ($1, $2, 'order.created', 'ann', $3, 1, $4, $5, $6, $7, $8, $9, $9)
        """,
        delivery,
        event_id,
        f"#{state}",
        event(event_id, f"#{state}"),
        state,
        reason,
        None if state == "skipped" else {"method": "GET", "url": "https://t.example/pb"},
        0 if state == "skipped" else 1,
        created_at,
    )
    return delivery


async def insert_previous_attempt(
    conn: asyncpg.Connection, delivery: uuid.UUID, started_at: datetime, status: int
) -> None:
    await conn.execute(
        """
        INSERT INTO attempts (delivery_id, number, started_at, duration_ms, status_code,
                              response_excerpt)
        VALUES ($1, 1, $2, 12.5, $3, $4)
        """,
        delivery,
        started_at,
        status,
        f"answered {status}",
    )


async def insert_current_delivery(conn: asyncpg.Connection, state: str) -> uuid.UUID:
    """A delivery as the current worker writes it (postback_take in schema.sql)."""
    delivery = uuid.uuid4()
    event_id = f"{RUN}-new-{state}-{delivery.hex[:6]}"
    await conn.execute(
        """
        INSERT INTO deliveries (id, event_id, event_type, affiliate_id, order_number,
                                occurred_at, callback_id, event, state, next_attempt_at)
        VALUES ($1, $2, 'order.created', 'ann', '#new', now(), 1, $3, $4, now())
        """,
        delivery,
        event_id,
        event(event_id, "#new"),
        state,
    )
    return delivery


# --- upgrade from the previous schema --------------------------------------------------


async def test_the_previous_schema_is_upgraded_in_place(admin_url: str) -> None:
    async with scratch_database(admin_url, "upgrade") as url, database.connection(url) as conn:
        await conn.execute(PREVIOUS_SCHEMA)
        failed = await insert_previous_delivery(conn, "failed", FAILED_AT, "HTTP 404")
        delivered = await insert_previous_delivery(conn, "delivered", DELIVERED_AT, None)
        skipped = await insert_previous_delivery(conn, "skipped", SKIPPED_AT, "no callback")
        await insert_previous_attempt(conn, failed, FAILED_AT, 404)
        await insert_previous_attempt(conn, delivered, DELIVERED_AT, 200)
        before = await rows_of(conn)
        assert "occurred_at" not in await column_types(conn, "deliveries")  # really the old one

        await database.apply_schema(conn)

        # Failed deliveries are dead letters now; nothing else about any row changed.
        after = await rows_of(conn)
        states = {row["id"]: row["state"] for row in after["deliveries"]}
        assert states == {failed: "dead", delivered: "delivered", skipped: "skipped"}
        for old, new in zip(before["deliveries"], after["deliveries"], strict=True):
            assert {key: new[key] for key in old if key != "state"} == {
                key: value for key, value in old.items() if key != "state"
            }

        # occurred_at is filled in (with when the delivery was made) and now required.
        deliveries = await column_types(conn, "deliveries")
        assert deliveries["occurred_at"] == ("timestamp with time zone", "NO")
        occurred = {row["id"]: row["occurred_at"] for row in after["deliveries"]}
        assert occurred == {failed: FAILED_AT, delivered: DELIVERED_AT, skipped: SKIPPED_AT}

        # The new columns exist, empty on the old rows.
        for column, data_type in NEW_DELIVERY_COLUMNS.items():
            assert deliveries[column][0] == data_type, column
        for row in after["deliveries"]:
            for column in set(NEW_DELIVERY_COLUMNS) - {"occurred_at"}:
                assert row[column] is None, column
        assert (await column_types(conn, "attempts"))["request"] == ("jsonb", "YES")

        # The old attempts remain as they were.
        assert len(after["attempts"]) == 2
        for old, new in zip(before["attempts"], after["attempts"], strict=True):
            assert new == {**old, "request": None}

        # The states are the current ones: retrying goes in, failed no longer does.
        for state in CURRENT_STATES:
            await insert_current_delivery(conn, state)
        with pytest.raises(asyncpg.CheckViolationError) as refused:
            await insert_current_delivery(conn, "failed")
        assert refused.value.constraint_name == "deliveries_state_check"
        with pytest.raises(asyncpg.NotNullViolationError):
            await conn.execute(
                """
                INSERT INTO deliveries (id, event_id, event_type, affiliate_id, order_number,
                                        event, state)
                VALUES ($1, 'no-time', 'order.created', 'ann', '#1', '{}', 'pending')
                """,
                uuid.uuid4(),
            )

        # Columns, constraints and indexes are exactly those of a database made afresh.
        assert await schema_of(conn) == await current_schema(admin_url)


async def test_upgraded_dead_letters_and_open_deliveries_are_usable(admin_url: str) -> None:
    """A failed delivery keeps its last error class; a pending one is due, so it is swept."""
    async with scratch_database(admin_url, "open") as url, database.connection(url) as conn:
        await conn.execute(PREVIOUS_SCHEMA)
        failed = await insert_previous_delivery(conn, "failed", FAILED_AT, "timeout")
        await conn.execute(
            """
            INSERT INTO attempts (delivery_id, number, started_at, duration_ms, error_class)
            VALUES ($1, 1, $2, 10000, 'timeout')
            """,
            failed,
            FAILED_AT,
        )
        pending = await insert_previous_delivery(conn, "pending", DELIVERED_AT, None)

        await database.apply_schema(conn)

        row = await conn.fetchrow("SELECT state, error_class FROM deliveries WHERE id = $1", failed)
        assert row is not None
        assert (row["state"], row["error_class"]) == ("dead", "timeout")
        pool = await database.create_pool(url, 1)
        try:
            due = await ledger.due_without_claim(pool, 60.0, None, 10)
        finally:
            await pool.close()
        assert [r["id"] for r in due] == [pending]


async def test_applying_the_schema_again_to_an_upgraded_database_changes_nothing(
    admin_url: str,
) -> None:
    async with (
        scratch_database(admin_url, "upgrade_twice") as url,
        database.connection(url) as conn,
    ):
        await conn.execute(PREVIOUS_SCHEMA)
        failed = await insert_previous_delivery(conn, "failed", FAILED_AT, "HTTP 503")
        await insert_previous_attempt(conn, failed, FAILED_AT, 503)
        await database.apply_schema(conn)
        await insert_current_delivery(conn, "retrying")
        schema, rows = await schema_of(conn), await rows_of(conn)

        await database.apply_schema(conn)
        await database.init(url)

        assert await schema_of(conn) == schema
        assert await rows_of(conn) == rows


# --- a new database --------------------------------------------------------------------


async def test_a_new_database_can_have_the_schema_applied_twice(admin_url: str) -> None:
    async with scratch_database(admin_url, "new") as url, database.connection(url) as conn:
        await database.apply_schema(conn)
        schema = await schema_of(conn)
        delivery = await insert_current_delivery(conn, "retrying")
        rows = await rows_of(conn)

        await database.apply_schema(conn)
        await database.init(url)

        assert await schema_of(conn) == schema
        assert await rows_of(conn) == rows
        assert [row["id"] for row in rows["deliveries"]] == [delivery]
        tables = {table for table, *_ in schema["columns"]}
        assert tables == {"callbacks", "deliveries", "attempts", "actions", "test_fires"}
        deliveries = await column_types(conn, "deliveries")
        assert deliveries["occurred_at"] == ("timestamp with time zone", "NO")
        assert set(NEW_DELIVERY_COLUMNS) <= set(deliveries)
        with pytest.raises(asyncpg.CheckViolationError):
            await insert_current_delivery(conn, "failed")


SCHEMA_BEFORE_REPLAYS = Path(__file__).with_name("schema_before_replays.sql")
"""schema.sql as issue 3 left it, verbatim: no `discarded` state, no `retry_base` or
`resend` in deliveries, no `actions` or `test_fires` tables."""


async def test_the_schema_before_replays_is_upgraded_in_place(admin_url: str) -> None:
    fresh = await current_schema(admin_url)
    async with scratch_database(admin_url, "replays") as url, database.connection(url) as conn:
        await conn.execute(SCHEMA_BEFORE_REPLAYS.read_text())
        dead = await insert_current_delivery(conn, "dead")
        before = await conn.fetchrow("SELECT * FROM deliveries WHERE id = $1", dead)
        assert before is not None

        await database.init(url)

        assert await schema_of(conn) == fresh
        after = await conn.fetchrow("SELECT * FROM deliveries WHERE id = $1", dead)
        assert after is not None
        assert dict(after) == {
            **dict(before),
            "retry_base": 0,
            "resend": False,
            "create_wait_until": None,
            "order_note": None,
        }
        await conn.execute("UPDATE deliveries SET state = 'discarded' WHERE id = $1", dead)
