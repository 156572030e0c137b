"""The schema's versions: `postback db init` makes an empty database the current schema, and
brings a database made by any earlier released version (tests/schemas/) to exactly the same
one. Each test has a database of its own, created for it and dropped after it.
"""

from __future__ import annotations

import asyncio
import uuid
from datetime import UTC, datetime
from typing import Any

import asyncpg
import pytest

from tests.support.schemas import RELEASED, SCHEMAS, TABLES, released
from tests.support.servers import RUN, scratch_database
from worker import database, ledger, schema
from worker.schema import CURRENT, SchemaTooNew, Upgraded

CURRENT_STATES = (
    "accepted",
    "pending",
    "retrying",
    "delivered",
    "dead",
    "skipped",
    "discarded",
)
VERSION_2_DELIVERY_COLUMNS = {
    "occurred_at": "timestamp with time zone",
    "error_class": "text",
    "next_attempt_at": "timestamp with time zone",
    "claimed_by": "text",
    "claimed_at": "timestamp with time zone",
    "blocked_by": "uuid",
}
"""What version 2 (retries) added to deliveries."""
NEW_COLUMN_VALUES = {"retry_base": 0, "resend": False, "delay_seconds": 0}
"""What an upgrade gives an old row in a column added since, besides NULL."""

FAILED_AT = datetime(2026, 11, 20, 9, 0, tzinfo=UTC)
DELIVERED_AT = datetime(2026, 11, 20, 9, 30, tzinfo=UTC)
SKIPPED_AT = datetime(2026, 11, 20, 10, 0, tzinfo=UTC)
DEAD_AT = datetime(2026, 11, 20, 10, 30, tzinfo=UTC)


async def catalogue_of(conn: asyncpg.Connection) -> dict[str, set[tuple[Any, ...]]]:
    """Tables, columns (type, default, nullability), constraints, indexes, sequences,
    functions (whole definitions) and triggers of the public schema. Column order is left
    out, since an upgrade can only add columns at the end."""
    queries = {
        "tables": "SELECT tablename FROM pg_tables WHERE schemaname = 'public'",
        "columns": """
            SELECT table_name, column_name, data_type, is_nullable, column_default
            FROM information_schema.columns WHERE table_schema = 'public'
        """,
        "constraints": """
            SELECT conrelid::regclass::text, conname, contype, pg_get_constraintdef(oid)
            FROM pg_constraint WHERE connamespace = 'public'::regnamespace
        """,
        "indexes": """
            SELECT tablename, indexname, indexdef FROM pg_indexes WHERE schemaname = 'public'
        """,
        "sequences": "SELECT sequencename, data_type FROM pg_sequences WHERE schemaname = 'public'",
        "functions": """
            SELECT proname, pg_get_functiondef(oid) FROM pg_proc
            WHERE pronamespace = 'public'::regnamespace
        """,
        "triggers": """
            SELECT tgrelid::regclass::text, tgname, tgenabled, pg_get_triggerdef(oid)
            FROM pg_trigger WHERE NOT tgisinternal
        """,
    }
    return {name: {tuple(row) for row in await conn.fetch(sql)} for name, sql in queries.items()}


@pytest.fixture(scope="module")
async def fresh(admin_url: str) -> dict[str, set[tuple[Any, ...]]]:
    """What `db init` makes of an empty database."""
    async with scratch_database(admin_url, "fresh") as url:
        assert await database.init(url) == Upgraded(None, CURRENT)
        async with database.connection(url) as conn:
            return await catalogue_of(conn)


async def rows_of(conn: asyncpg.Connection) -> dict[str, list[dict[str, Any]]]:
    """Every row of every relay table, in the order of its first column (its key)."""
    tables = await conn.fetch(
        "SELECT tablename FROM pg_tables WHERE schemaname = 'public'"
        " AND tablename <> 'schema_version' ORDER BY tablename"
    )
    rows = {}
    for (table,) in tables:
        sql = f"SELECT * FROM {table} ORDER BY 1"  # noqa: S608 -- a name from pg_tables
        rows[table] = [dict(row) for row in await conn.fetch(sql)]
    return rows


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


async def recorded_version(conn: asyncpg.Connection) -> int:
    found: int = await conn.fetchval("SELECT version FROM schema_version")
    return found


def event(event_id: str, order_number: str) -> dict[str, Any]:
    return {
        "id": event_id,
        "type": "order.created",
        "affiliate_id": "ann",
        "order": {"number": order_number, "amount": "10.50", "commission": "1.05"},
    }


async def insert(conn: asyncpg.Connection, table: str, **values: Any) -> None:
    columns = ", ".join(values)
    placeholders = ", ".join(f"${n}" for n in range(1, len(values) + 1))
    sql = f"INSERT INTO {table} ({columns}) VALUES ({placeholders})"  # noqa: S608 -- the tests' names
    await conn.execute(sql, *values.values())


async def insert_previous_delivery(
    conn: asyncpg.Connection,
    state: str,
    created_at: datetime,
    reason: str | None,
    version: int = 1,
) -> uuid.UUID:
    """A delivery as a worker of `version` wrote it."""
    delivery = uuid.uuid4()
    event_id = f"{RUN}-{state}"
    since_retries = {"occurred_at": created_at} if version >= 2 else {}
    await insert(
        conn,
        "deliveries",
        id=delivery,
        event_id=event_id,
        event_type="order.created",
        affiliate_id="ann",
        order_number=f"#{state}",
        callback_id=1,
        event=event(event_id, f"#{state}"),
        state=state,
        reason=reason,
        request=None if state == "skipped" else {"method": "GET", "url": "https://t.example/pb"},
        attempts=0 if state == "skipped" else 1,
        created_at=created_at,
        updated_at=created_at,
        **since_retries,
    )
    return delivery


async def insert_previous_attempt(
    conn: asyncpg.Connection, delivery: uuid.UUID, started_at: datetime, status: int
) -> None:
    await insert(
        conn,
        "attempts",
        delivery_id=delivery,
        number=1,
        started_at=started_at,
        duration_ms=12.5,
        status_code=status,
        response_excerpt=f"answered {status}",
    )


async def insert_rows_of_version(conn: asyncpg.Connection, version: int) -> None:
    """What a relay of `version` kept: a callback; a delivered delivery and its attempt, a
    skipped one, and from version 2 a dead letter; from version 3 a discard and a test fire."""
    await insert(
        conn,
        "callbacks",
        affiliate_id="ann",
        event_type="order.created",
        method="GET",
        url_template="https://t.example/pb?o={order.number}",
        secret="whsec_old",
    )
    delivered = await insert_previous_delivery(conn, "delivered", DELIVERED_AT, None, version)
    await insert_previous_attempt(conn, delivered, DELIVERED_AT, 200)
    await insert_previous_delivery(conn, "skipped", SKIPPED_AT, "no callback", version)
    if version < 2:
        return
    dead = await insert_previous_delivery(conn, "dead", DEAD_AT, "HTTP 404", version)
    await insert_previous_attempt(conn, dead, DEAD_AT, 404)
    if version < 3:
        return
    await insert(
        conn, "actions", delivery_id=dead, action="discard", actor="ops", note="gone", attempt=1
    )
    await insert(
        conn,
        "test_fires",
        callback_id=1,
        affiliate_id="ann",
        event_type="order.created",
        actor="ops",
        request={"method": "GET", "url": "https://t.example/pb"},
        duration_ms=3.5,
        status_code=200,
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


# --- the versions ----------------------------------------------------------------------


@pytest.mark.unit
def test_each_version_has_its_step_and_each_earlier_one_its_schema() -> None:
    assert sorted(schema.STEPS) == list(range(2, CURRENT + 1))
    names = {path.name for path in SCHEMAS.iterdir()}
    assert names == {f"v{k}.sql" for k in RELEASED}


# --- a new database --------------------------------------------------------------------


async def test_db_init_makes_an_empty_database_the_current_schema_and_then_changes_nothing(
    admin_url: str,
) -> None:
    async with scratch_database(admin_url, "new") as url, database.connection(url) as conn:
        assert await database.init(url) == Upgraded(None, CURRENT)
        assert await recorded_version(conn) == CURRENT
        catalogue = await catalogue_of(conn)
        delivery = await insert_current_delivery(conn, "retrying")
        rows = await rows_of(conn)

        assert await database.init(url) == Upgraded(CURRENT, CURRENT)

        assert await catalogue_of(conn) == catalogue
        assert await rows_of(conn) == rows
        assert [row["id"] for row in rows["deliveries"]] == [delivery]
        assert {table for (table,) in catalogue["tables"]} == TABLES
        deliveries = await column_types(conn, "deliveries")
        assert deliveries["occurred_at"] == ("timestamp with time zone", "NO")
        assert set(VERSION_2_DELIVERY_COLUMNS) <= set(deliveries)
        with pytest.raises(asyncpg.CheckViolationError):
            await insert_current_delivery(conn, "failed")
        with pytest.raises(asyncpg.UniqueViolationError):
            await conn.execute("INSERT INTO schema_version (version) VALUES (1)")


async def test_db_init_run_four_times_at_once_creates_the_schema_once(
    admin_url: str, fresh: dict[str, Any]
) -> None:
    async with scratch_database(admin_url, "together") as url:
        done = await asyncio.gather(*(database.init(url) for _ in range(4)))
        async with database.connection(url) as conn:
            assert await catalogue_of(conn) == fresh
    assert (done.count(Upgraded(None, CURRENT)), done.count(Upgraded(CURRENT, CURRENT))) == (1, 3)


async def test_db_init_run_four_times_at_once_upgrades_version_1_once(
    admin_url: str, fresh: dict[str, Any]
) -> None:
    async with scratch_database(admin_url, "together_v1") as url:
        async with database.connection(url) as conn:
            await conn.execute(released(1))
            await insert_rows_of_version(conn, 1)
            before = await rows_of(conn)
        done = await asyncio.gather(*(database.init(url) for _ in range(4)))
        async with database.connection(url) as conn:
            assert await catalogue_of(conn) == fresh
            after = await rows_of(conn)
    assert {upgraded.after for upgraded in done} == {CURRENT}
    assert sorted(upgraded.before or 0 for upgraded in done)[0] == 1
    assert {table: len(rows) for table, rows in before.items()} == {
        table: len(after[table]) for table in before
    }


# --- from each earlier version ---------------------------------------------------------


@pytest.mark.parametrize("version", RELEASED)
async def test_a_database_of_each_earlier_version_becomes_the_current_schema(
    admin_url: str, fresh: dict[str, Any], version: int
) -> None:
    async with (
        scratch_database(admin_url, f"v{version}") as url,
        database.connection(url) as conn,
    ):
        await conn.execute(released(version))
        await insert_rows_of_version(conn, version)
        before = await rows_of(conn)

        # Recognised by what it has, since versions before 8 recorded none.
        assert await database.init(url) == Upgraded(version, CURRENT)

        assert await catalogue_of(conn) == fresh
        assert await recorded_version(conn) == CURRENT
        # Every row is kept with every value it had; what was added since is empty.
        after = await rows_of(conn)
        assert set(after) >= set(before)
        for table, rows in before.items():
            assert len(after[table]) == len(rows), table
            for old, new in zip(rows, after[table], strict=True):
                assert {key: new[key] for key in old} == old, table
                added = {key: value for key, value in new.items() if key not in old}
                expected = {key: NEW_COLUMN_VALUES.get(key) for key in added}
                if "occurred_at" in added:
                    expected["occurred_at"] = old["created_at"]
                assert added == expected, table
        for state in CURRENT_STATES:
            await insert_current_delivery(conn, state)

        # Once upgraded, db init changes nothing.
        catalogue, rows_now = await catalogue_of(conn), await rows_of(conn)
        assert await database.init(url) == Upgraded(CURRENT, CURRENT)
        assert await catalogue_of(conn) == catalogue
        assert await rows_of(conn) == rows_now


async def test_a_database_each_release_upgraded_in_place_becomes_the_current_schema(
    admin_url: str, fresh: dict[str, Any]
) -> None:
    """Before versions were recorded, each release's schema.sql upgraded the database in
    place; version 6's left version 5's postback_take beside its own. Since version 8,
    `db init` upgrades instead."""
    in_place = range(1, schema.RECORDED_FROM)
    async with scratch_database(admin_url, "history") as url, database.connection(url) as conn:
        for version in in_place:
            await conn.execute(released(version))
        takes = await conn.fetchval("SELECT count(*) FROM pg_proc WHERE proname = 'postback_take'")
        assert takes == 2

        assert await database.init(url) == Upgraded(in_place[-1], CURRENT)

        assert await catalogue_of(conn) == fresh


async def test_version_1s_failed_deliveries_become_dead_letters(
    admin_url: str, fresh: dict[str, Any]
) -> None:
    async with scratch_database(admin_url, "failed") as url, database.connection(url) as conn:
        await conn.execute(released(1))
        failed = await insert_previous_delivery(conn, "failed", FAILED_AT, "HTTP 404")
        delivered = await insert_previous_delivery(conn, "delivered", DELIVERED_AT, None)
        skipped = await insert_previous_delivery(conn, "skipped", SKIPPED_AT, "no callback")
        await insert_previous_attempt(conn, failed, FAILED_AT, 404)
        await insert_previous_attempt(conn, delivered, DELIVERED_AT, 200)
        before = await rows_of(conn)
        assert "occurred_at" not in await column_types(conn, "deliveries")  # really the old one

        await database.init(url)

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

        # The new columns exist, empty on the old rows (but the dead letter's error class).
        for column, data_type in VERSION_2_DELIVERY_COLUMNS.items():
            assert deliveries[column][0] == data_type, column
        for row in after["deliveries"]:
            for column in set(VERSION_2_DELIVERY_COLUMNS) - {"occurred_at", "error_class"}:
                assert row[column] is None, column
        assert (await column_types(conn, "attempts"))["request"] == ("jsonb", "YES")

        # The old attempts remain as they were.
        assert len(after["attempts"]) == 2
        for old, new in zip(before["attempts"], after["attempts"], strict=True):
            assert new == {**old, "request": None, "response_headers": None}

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
        assert await catalogue_of(conn) == fresh


async def test_version_1s_dead_letters_and_open_deliveries_are_usable(admin_url: str) -> None:
    """A failed delivery keeps its last error class; a pending one is due, so it is swept."""
    async with scratch_database(admin_url, "open") as url, database.connection(url) as conn:
        await conn.execute(released(1))
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

        await database.init(url)

        row = await conn.fetchrow("SELECT state, error_class FROM deliveries WHERE id = $1", failed)
        assert row is not None
        assert (row["state"], row["error_class"]) == ("dead", "timeout")
        pool = await database.create_pool(url, 1)
        try:
            due = await ledger.due_without_claim(pool, 60.0, None, 10)
        finally:
            await pool.close()
        assert [r["id"] for r in due] == [pending]


# --- from a later version --------------------------------------------------------------


async def test_a_database_of_a_later_version_is_refused_and_left_alone(admin_url: str) -> None:
    async with scratch_database(admin_url, "later") as url, database.connection(url) as conn:
        await database.init(url)
        await conn.execute("UPDATE schema_version SET version = $1", CURRENT + 1)
        catalogue = await catalogue_of(conn)

        with pytest.raises(SchemaTooNew) as refused:
            await database.init(url)

        assert str(refused.value) == (
            f"the database's schema is version {CURRENT + 1}, newer than this relay's "
            f"version {CURRENT}: run the relay that upgraded it, or a later one"
        )
        assert await catalogue_of(conn) == catalogue
        assert await recorded_version(conn) == CURRENT + 1
