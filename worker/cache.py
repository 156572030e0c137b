"""Callbacks held in the worker, so a delivery in steady state costs no configuration query.

Postgres stays the truth: every change to the `callbacks` table, by any path (the CLI, the
API, a 410 that disables a callback, SQL typed by hand), notifies the channel below from a
trigger in schema.sql, and a worker empties its cache when told. Callbacks change rarely,
so emptying all of it keeps the rule simple.

Two rules keep it from serving a stale callback:
- it caches only while its listening connection is up; when that connection is lost,
  notifications could be missed, so it empties and reads through until listening again;
- a value read before a notification arrived is not kept, since it may predate the
  change the notification announced (`_generation`).
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

import asyncpg
import structlog

from worker import callbacks, database, render

CHANNEL = "postback_callbacks"
"""Notified by schema.sql's trigger on every change to `callbacks`."""

RELISTEN_SECONDS = 1.0
"""Wait before listening again after the listening connection was lost."""

PING_SECONDS = 5.0
"""How often a quiet listening connection is checked, and how long the check may take."""

log = structlog.get_logger("postback.cache")


@dataclass(frozen=True, slots=True)
class Entry:
    """A callback as loaded, with its template parsed once rather than per delivery."""

    callback: callbacks.Callback | None
    template: render.Template | None = None
    """None when there is no callback, or when its stored template does not parse..."""
    invalid: str | None = None
    """...which says why: only a template written to the table by hand gets here."""


def _entry(callback: callbacks.Callback | None) -> Entry:
    if callback is None:
        return Entry(None)
    try:
        return Entry(callback, render.parse(callback.url_template))
    except render.TemplateError as exc:
        return Entry(callback, invalid=str(exc))


class CallbackCache:
    """`get` reads a callback through the cache; `run` keeps the cache honest."""

    def __init__(self, database_url: str) -> None:
        self._url = database_url
        self._entries: dict[tuple[str, str], Entry] = {}
        self._generation = 0
        self._listening = False
        self.loads = 0
        """Callbacks read from Postgres: what the cache saves shows here."""

    async def get(self, db: database.Executor, affiliate_id: str, event_type: str) -> Entry:
        key = (affiliate_id, event_type)
        cached = self._entries.get(key)
        if cached is not None:
            return cached
        generation = self._generation
        entry = _entry(await callbacks.get(db, affiliate_id, event_type))
        self.loads += 1
        if self._listening and generation == self._generation:
            self._entries[key] = entry
        return entry

    @property
    def listening(self) -> bool:
        """Whether changes are being heard, and so callbacks kept."""
        return self._listening

    @property
    def generation(self) -> int:
        """Goes up each time the cache is emptied: a change announced, the listener lost
        or back."""
        return self._generation

    def _forget(self, *_: object) -> None:
        self._generation += 1
        self._entries.clear()

    async def run(self) -> None:
        """Listen for changes until cancelled, listening again whenever the connection is
        lost; meanwhile `get` reads every callback from Postgres."""
        while True:
            try:
                conn = await database.connect(self._url)
            except Exception as exc:
                # Never fatal: without the listener every delivery reads its callback.
                log.warning("cache_listen_failed", error=database.describe(exc))
                await asyncio.sleep(RELISTEN_SECONDS)
                continue
            lost = asyncio.Event()
            try:
                conn.add_termination_listener(lambda _, lost=lost: lost.set())
                await conn.add_listener(CHANNEL, self._forget)
                # Anything read before now may predate a change that was never announced.
                self._forget()
                self._listening = True
                await _until_lost(conn, lost)
                log.warning("cache_listen_lost")
            finally:
                self._listening = False
                self._forget()
                await _close(conn)
            await asyncio.sleep(RELISTEN_SECONDS)


async def _until_lost(conn: asyncpg.Connection, lost: asyncio.Event) -> None:
    # A connection cut without a FIN (a network partition) is only noticed when used.
    while True:
        try:
            await asyncio.wait_for(lost.wait(), PING_SECONDS)
            return
        except TimeoutError:
            pass
        try:
            await conn.fetchval("SELECT 1", timeout=PING_SECONDS)
        except Exception:
            return


async def _close(conn: asyncpg.Connection) -> None:
    try:
        await asyncio.shield(conn.close(timeout=2))
    except Exception:
        conn.terminate()
