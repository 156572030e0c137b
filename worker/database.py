"""Postgres connections and the schema."""

from __future__ import annotations

import json
from pathlib import Path

import asyncpg

SCHEMA_PATH = Path(__file__).resolve().parent.parent / "schema.sql"

CONNECT_TIMEOUT = 5.0
"""Seconds before an unreachable database is reported instead of waited on."""


async def _init_connection(conn: asyncpg.Connection) -> None:
    await conn.set_type_codec("jsonb", encoder=json.dumps, decoder=json.loads, schema="pg_catalog")


async def connect(database_url: str) -> asyncpg.Connection:
    conn: asyncpg.Connection = await asyncpg.connect(database_url, timeout=CONNECT_TIMEOUT)
    await _init_connection(conn)
    return conn


async def create_pool(database_url: str, size: int) -> asyncpg.Pool:
    pool = await asyncpg.create_pool(
        database_url,
        min_size=1,
        max_size=size,
        timeout=CONNECT_TIMEOUT,
        init=_init_connection,
    )
    assert pool is not None  # only None when used without await
    return pool


async def apply_schema(conn: asyncpg.Connection) -> None:
    """Create what is missing; safe to run on every start and on a live database."""
    await conn.execute(SCHEMA_PATH.read_text())
