"""The schema's versions: which one a database is at, and bringing it to the current one.

schema.sql is the whole current schema, for an empty database. For each earlier released
version there is a numbered step in upgrades/ (`00K_*.sql` takes a database from version
K-1 to K), and `postback db init` applies the ones a database lacks, in order. Since version
8 a database records its version (`schema_version`); one made by an earlier version is
recognised by what it has.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass
from importlib.resources import files
from importlib.resources.abc import Traversable

import asyncpg

SCHEMA = files("worker") / "schema.sql"
"""The current schema, inside the package, however it is installed: worker/schema.sql links
to the repository's top-level schema.sql (a checkout, an editable install), a wheel holds
the file."""

STEPS: dict[int, Traversable] = {
    int(step.name.split("_", 1)[0]): step
    for step in (files("worker") / "upgrades").iterdir()
    if step.name.endswith(".sql")
}
"""Each upgrade step by the version it brings a database to."""

CURRENT = max(STEPS)
"""The version of schema.sql: the one the last step brings a database to."""

RECORDED_FROM = 8
"""The first version that records itself in `schema_version`."""

RECOGNISED: tuple[tuple[int, str], ...] = (
    (7, "deliveries.create_wait_until"),
    (6, "postback_take/13"),
    (5, "postback_take/12"),
    (4, "postback_callbacks_changed/0"),
    (3, "deliveries.retry_base"),
    (2, "deliveries.next_attempt_at"),
)
"""The versions before `schema_version`, newest first, each with something it was the first
to have (a column of `deliveries`, or a function with its number of arguments). A database
with none of them is version 1."""

_LOCK = "postback schema"
"""Names the advisory lock two `db init` at once take turns on. (The order locks of
`postback_lock_order` hash text with a newline in it, so never this.)"""

_CATALOGUE = """
    SELECT 'deliveries.' || column_name FROM information_schema.columns
    WHERE table_schema = current_schema() AND table_name = 'deliveries'
    UNION ALL
    SELECT proname || '/' || pronargs FROM pg_proc
    WHERE pronamespace = current_schema()::regnamespace
"""


class SchemaTooNew(Exception):
    """The database was made or upgraded by a later version of the relay than this one."""

    def __init__(self, found: int) -> None:
        super().__init__(
            f"the database's schema is version {found}, newer than this relay's "
            f"version {CURRENT}: run the relay that upgraded it, or a later one"
        )
        self.found = found


@dataclass(frozen=True)
class Upgraded:
    """What `upgrade` did: from which version (None: the database had no relay tables)."""

    before: int | None
    after: int

    def __str__(self) -> str:
        if self.before is None:
            return f"schema created at version {self.after}"
        if self.before == self.after:
            return f"schema at version {self.after} already: nothing to do"
        return f"schema upgraded from version {self.before} to {self.after}"


def recognise(has: Collection[str]) -> int:
    """The version of a database made before versions were recorded, from what it `has`:
    `table.column` and `function/arguments` names, as `_CATALOGUE` lists them."""
    for version, first_had in RECOGNISED:
        if first_had in has:
            return version
    return 1


async def version_of(conn: asyncpg.Connection) -> int | None:
    """The database's schema version; None when it has no relay tables."""
    if await conn.fetchval("SELECT to_regclass('schema_version') IS NOT NULL"):
        found: int = await conn.fetchval("SELECT version FROM schema_version")
        return found
    if not await conn.fetchval("SELECT to_regclass('deliveries') IS NOT NULL"):
        return None
    return recognise({name for (name,) in await conn.fetch(_CATALOGUE)})


async def upgrade(conn: asyncpg.Connection) -> Upgraded:
    """Bring the database to the current schema: schema.sql for an empty one, else each
    step it lacks, in order, each in a transaction of its own that records the version it
    reached. Safe on a live database. Two at once take turns, the second finding the version
    the first left: a lock for the whole session, since a transaction that waited for a lock
    inside it could still see the tables as they were when it began."""
    await conn.execute("SELECT pg_advisory_lock(hashtextextended($1, 0))", _LOCK)
    try:
        return await _upgrade(conn)
    finally:
        if not conn.is_closed():
            await conn.execute("SELECT pg_advisory_unlock(hashtextextended($1, 0))", _LOCK)


async def _upgrade(conn: asyncpg.Connection) -> Upgraded:
    before = found = await version_of(conn)
    if found is None:
        async with conn.transaction():
            await conn.execute(SCHEMA.read_text(encoding="utf-8"))
        return Upgraded(None, CURRENT)
    if found > CURRENT:
        raise SchemaTooNew(found)
    while found < CURRENT:
        async with conn.transaction():
            found += 1
            await conn.execute(STEPS[found].read_text(encoding="utf-8"))
            if found >= RECORDED_FROM:
                await conn.execute("UPDATE schema_version SET version = $1", found)
    return Upgraded(before, CURRENT)
