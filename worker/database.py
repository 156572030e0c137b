"""Postgres connections and the schema."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from urllib.parse import parse_qs, unquote, urlsplit

import asyncpg
from asyncpg.pool import PoolConnectionProxy

from worker import schema

Conn = asyncpg.Connection | PoolConnectionProxy
"""One connection, e.g. one a transaction runs on: from `connect` or from a pool."""

Executor = Conn | asyncpg.Pool
"""Anything a single statement can run on."""

CONNECT_TIMEOUT = 5.0
"""Seconds before an unreachable database is reported instead of waited on."""


async def _init_connection(conn: asyncpg.Connection) -> None:
    await conn.set_type_codec("jsonb", encoder=json.dumps, decoder=json.loads, schema="pg_catalog")


async def _keep_session(conn: asyncpg.Connection) -> None:
    """What a pooled connection needs on release beyond the rollback asyncpg always does:
    nothing, because no pooled connection keeps session state (settings, LISTEN, cursors,
    session advisory locks: the order locks are transaction locks, and the callback cache
    listens on a connection of its own). asyncpg's default would cost a round trip on every
    release, two per delivery."""


class DatabaseUnavailable(Exception):
    """Postgres could not be reached: down, wrong address, no such database, refused login."""


# What asyncpg raises when the server is down, restarting, or refuses us, as opposed to a
# query failing: worth waiting out, never a reason to drop work.
UNAVAILABLE: tuple[type[BaseException], ...] = (
    OSError,
    TimeoutError,
    asyncpg.PostgresConnectionError,
    asyncpg.OperatorInterventionError,
    asyncpg.InvalidCatalogNameError,
    asyncpg.InvalidAuthorizationSpecificationError,
    asyncpg.TooManyConnectionsError,
    asyncpg.InterfaceError,
    # A connection cut mid-statement can leave asyncpg's protocol in a state it reports
    # this way (MagicStack/asyncpg#1069); the next connection works.
    asyncpg.InternalClientError,
)


# SQLSTATE classes of failures that pass: connection exceptions, transaction rollbacks
# (serialization, deadlock), insufficient resources, object not in prerequisite state (a
# database not accepting connections, a lock not available), operator intervention
# (shutdown, cancelled statements).
_TRANSIENT_SQLSTATES = ("08", "40", "53", "55", "57")


OUTDATED_SCHEMA: tuple[type[BaseException], ...] = (
    asyncpg.UndefinedFunctionError,
    asyncpg.UndefinedTableError,
    asyncpg.UndefinedColumnError,
)
"""What a query against a database made by an older `schema.sql` fails with. (42883 is
also "no such operator", and 42703 a misspelt column: a bug the hint would misname, which
the tests would have caught first.)"""


def transient(exc: BaseException) -> bool:
    """Whether a database failure is worth waiting out, as opposed to one that will recur."""
    if isinstance(exc, UNAVAILABLE):
        return True
    return isinstance(exc, asyncpg.PostgresError) and str(exc.sqlstate).startswith(
        _TRANSIENT_SQLSTATES
    )


def describe(exc: BaseException) -> str:
    """An error as one line fit for the logs.

    Postgres's own text can quote the row it refused (DETAIL), and a row holds the
    affiliate's URL and its token: for those, only the kind of error and its SQLSTATE.
    """
    if isinstance(exc, asyncpg.PostgresError):
        return f"{type(exc).__name__} (SQLSTATE {exc.sqlstate})"
    return f"{type(exc).__name__}: {exc}"


async def connect(database_url: str, application_name: str | None = None) -> asyncpg.Connection:
    """`application_name` names a connection with a role of its own in pg_stat_activity."""
    settings = {} if application_name is None else {"application_name": application_name}
    try:
        conn: asyncpg.Connection = await asyncpg.connect(
            database_url, timeout=CONNECT_TIMEOUT, server_settings=settings
        )
    except UNAVAILABLE as exc:
        raise DatabaseUnavailable(str(exc) or type(exc).__name__) from exc
    await _init_connection(conn)
    return conn


@asynccontextmanager
async def connection(database_url: str) -> AsyncIterator[asyncpg.Connection]:
    conn = await connect(database_url)
    try:
        yield conn
    finally:
        await conn.close()


async def create_pool(database_url: str, size: int, min_size: int = 1) -> asyncpg.Pool:
    """A pool of up to `size` connections; `min_size=0` opens none until one is needed,
    so a service can start, and report it, while Postgres is down."""
    try:
        pool = await asyncpg.create_pool(
            database_url,
            min_size=min_size,
            max_size=size,
            timeout=CONNECT_TIMEOUT,
            init=_init_connection,
            reset=_keep_session,
        )
    except UNAVAILABLE as exc:
        raise DatabaseUnavailable(str(exc) or type(exc).__name__) from exc
    assert pool is not None  # only None when used without await
    return pool


async def init(database_url: str) -> schema.Upgraded:
    """`postback db init`: the database brought to the current schema."""
    async with connection(database_url) as conn:
        return await schema.upgrade(conn)


MAINTENANCE_DATABASE = "postgres"
"""The database every Postgres has, to connect to when the one wanted is not there yet."""


def missing(exc: DatabaseUnavailable) -> bool:
    """Whether the database was reached but the one named does not exist."""
    return isinstance(exc.__cause__, asyncpg.InvalidCatalogNameError)


def name_of(database_url: str) -> str:
    """The database a URL names (`postgresql://USER@HOST:PORT/DATABASE`), or "" for none."""
    split = urlsplit(database_url)
    named = unquote(split.path.lstrip("/"))
    if not named:
        query = parse_qs(split.query)
        named = next(iter(query.get("dbname", query.get("database", []))), "")
    return named


async def create(database_url: str) -> str:
    """Create the database `database_url` names, connected to the maintenance database
    with the same user, password and host; its name. Asyncpg's errors pass: no right to
    create databases (InsufficientPrivilegeError), or no maintenance database to connect to
    (DatabaseUnavailable)."""
    name = name_of(database_url)
    if not name:
        raise ValueError("the database URL names no database")
    try:
        conn = await asyncpg.connect(
            database_url, database=MAINTENANCE_DATABASE, timeout=CONNECT_TIMEOUT
        )
    except UNAVAILABLE as exc:
        raise DatabaseUnavailable(str(exc) or type(exc).__name__) from exc
    try:
        quoted = '"' + name.replace('"', '""') + '"'
        await conn.execute(f"CREATE DATABASE {quoted}")
    except asyncpg.DuplicateDatabaseError:
        pass  # another `db init` was first
    finally:
        await conn.close()
    return name
