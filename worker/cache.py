"""Callbacks held in the worker, so a delivery in steady state costs no configuration query.

Postgres stays the truth: every change to the `callbacks` table, by any path (the CLI, the
API, a 410 that disables a callback, SQL typed by hand), notifies the channel below from a
trigger in schema.sql, and a worker empties its cache when told. Callbacks change rarely,
so emptying all of it keeps the rule simple.

Three rules keep it from serving a stale callback:
- it caches only once it has checked that changes reach it: the trigger is there and
  enabled, and a notification it sends comes back (not so behind a pooler in transaction
  mode); the check is repeated every few seconds, which also finds a cut connection;
- whenever that is not so, it empties and reads every callback through until it is;
- a value read before a notification arrived is not kept, since it may predate the
  change the notification announced (`_generation`).
"""

from __future__ import annotations

import asyncio
import uuid
from dataclasses import dataclass

import asyncpg
import structlog

from worker import callbacks, database, fairness, render, sign

CHANNEL = "postback_callbacks"
"""Notified by schema.sql's trigger on every change to `callbacks`."""

TRIGGER = "callbacks_changed"

LISTENER_NAME = "postback-cache"
"""The listening connection's application_name, as pg_stat_activity shows it."""

RELISTEN_SECONDS = 1.0
"""Wait before listening again after the listening connection was lost."""

CHECK_SECONDS = 2.0
"""How often the listener checks that changes still reach it, and how long a check may
take: a cut connection or a disabled trigger is noticed within twice this."""

_CHECK = "check:"

log = structlog.get_logger("postback.cache")


@dataclass(frozen=True, slots=True)
class Entry:
    """A callback as loaded, with its template parsed once rather than per delivery."""

    callback: callbacks.Callback | None
    template: render.Template | None = None
    """None when there is no callback, or when its stored template does not parse..."""
    invalid: str | None = None
    """...which says why: only a template written to the table by hand gets here."""
    destination: str | None = None
    """The template's scheme, host and port, which the per-destination cap and circuit go
    by; set whenever `template` is."""
    signer: sign.Signer | None = None
    """The callback's secret, set up for signing once rather than per request. None without
    a secret, or with one that cannot sign (written by hand): its requests are then built
    from the secret itself, which fails as it always did."""


def _entry(callback: callbacks.Callback | None) -> Entry:
    if callback is None:
        return Entry(None)
    try:
        template = render.parse(callback.url_template)
    except render.TemplateError as exc:
        return Entry(callback, invalid=str(exc))
    destination = fairness.destination(callback.url_template)
    return Entry(callback, template, destination=destination, signer=_signer(callback.secret))


def _signer(secret: str | None) -> sign.Signer | None:
    if secret is None:
        return None
    try:
        return sign.Signer(secret)
    except ValueError:
        return None


class CallbackCache:
    """`get` reads a callback through the cache; `run` keeps the cache honest."""

    def __init__(self, database_url: str) -> None:
        self._url = database_url
        self._entries: dict[tuple[str, str], Entry] = {}
        self._generation = 0
        self._listening = False
        self._checks: dict[str, asyncio.Event] = {}
        self.loads = 0
        """Callbacks read from Postgres: what the cache saves shows here."""

    async def get(self, db: database.Executor, affiliate_id: str, event_type: str) -> Entry:
        """The callback the affiliate's events of `event_type` go to: its own, else the
        store-wide one (`callbacks.find`), kept per affiliate."""
        key = (affiliate_id, event_type)
        cached = self._entries.get(key)
        if cached is not None:
            return cached
        generation = self._generation
        entry = _entry(await callbacks.find(db, affiliate_id, event_type))
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

    def forget(self) -> None:
        """Empty the cache now: for a change this worker made itself (a 410 disabling a
        callback), which must not wait for its own notification to come back."""
        self._generation += 1
        self._entries.clear()

    def _heard(self, _conn: database.Conn, _pid: int, _channel: str, payload: object) -> None:
        if isinstance(payload, str) and payload.startswith(_CHECK):
            # Another worker's check, or this one's: only a check waited for here counts.
            if payload in self._checks:
                self._checks[payload].set()
        else:
            self.forget()

    async def _hears(self, conn: asyncpg.Connection) -> str | None:
        """Whether changes will be heard: the trigger is there and enabled, and a
        notification sent now comes back. None if so, else what is wrong."""
        enabled = await conn.fetchval(
            "SELECT tgenabled <> 'D' FROM pg_trigger"
            " WHERE tgrelid = 'callbacks'::regclass AND tgname = $1",
            TRIGGER,
            timeout=CHECK_SECONDS,
        )
        if not enabled:
            return f"trigger {TRIGGER} on callbacks is missing or disabled: run postback db init"
        check = f"{_CHECK}{uuid.uuid4()}"
        heard = self._checks[check] = asyncio.Event()
        try:
            await conn.execute("SELECT pg_notify($1, $2)", CHANNEL, check, timeout=CHECK_SECONDS)
            await asyncio.wait_for(heard.wait(), CHECK_SECONDS)
        except TimeoutError:
            return "a notification sent did not come back (a pooler in transaction mode?)"
        finally:
            del self._checks[check]
        return None

    async def run(self) -> None:
        """Listen for changes until cancelled, listening again whenever the connection is
        lost or a check fails; meanwhile `get` reads every callback from Postgres."""
        while True:
            try:
                await self._listen()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                # Never fatal: without the listener every delivery reads its callback.
                log.warning("cache_listen_failed", error=database.describe(exc))
            await asyncio.sleep(RELISTEN_SECONDS)

    async def _listen(self) -> None:
        conn = await database.connect(self._url, application_name=LISTENER_NAME)
        try:
            await conn.add_listener(CHANNEL, self._heard)
            problem = await self._hears(conn)
            if problem is not None:
                log.error("cache_not_notified", problem=problem)
                return
            # Anything read before now may predate a change that was never announced.
            self.forget()
            self._listening = True
            # Checked again and again: a connection cut without a FIN (a network partition)
            # is only noticed when used, and a trigger disabled later must be noticed too.
            while True:
                await asyncio.sleep(CHECK_SECONDS)
                problem = await self._hears(conn)
                if problem is not None:
                    log.warning("cache_listen_lost", problem=problem)
                    return
        finally:
            self._listening = False
            self.forget()
            await _close(conn)


async def _close(conn: asyncpg.Connection) -> None:
    try:
        await asyncio.shield(conn.close(timeout=2))
    except Exception:
        conn.terminate()
