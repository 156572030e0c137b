"""Ops disabling and enabling a callback, and what listings say of each callback's health.

Every disable and enable goes through `postback_disable_callback` and
`postback_enable_callback` (schema.sql), which record it in `actions` with who did it and
why, as the relay's own disables (a 410, deliveries dying in a row) are: "who turned this
off, and why?" has one answer wherever it is asked. An enable can replay the callback's
dead letters in the same step, through the bulk replay.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import asyncpg
from arq.connections import ArqRedis

from ops.actions.replay import Mode, Summary, replay_each
from producer.event import STORE_WIDE
from worker import callbacks
from worker.callbacks import Callback
from worker.database import Executor


@dataclass(frozen=True, slots=True)
class Switched:
    callback: Callback
    """As it is now."""
    changed: bool
    """False: it already was enabled (disabled); nothing was recorded."""


_DEAD_LETTERS_OF = f"""
    d.state = 'dead' AND d.event_type = c.event_type
    AND CASE WHEN c.affiliate_id = '{STORE_WIDE}' THEN d.callback_id = c.id
             ELSE d.affiliate_id = c.affiliate_id END
"""
"""A callback `c`'s dead letters `d`: an affiliate's own callback's are that affiliate's of
its event type (sent to it, or to one it replaced); the store-wide one's, those sent to it."""


async def dead_letters(db: Executor, callback: Callback) -> list[uuid.UUID]:
    """The callback's dead letters, oldest first: what an enable with replay replays."""
    rows = await db.fetch(
        f"""
        SELECT d.id FROM deliveries d, callbacks c
        WHERE c.id = $1 AND {_DEAD_LETTERS_OF}
        ORDER BY d.created_at, d.id
        """,  # noqa: S608 -- constant SQL text
        callback.id,
    )
    return [row["id"] for row in rows]


async def disable(
    db: asyncpg.Pool, affiliate_id: str, event_type: str, actor: str, note: str | None
) -> Switched | None:
    """Disable the callback as `actor`'s doing (no notification: ops did it themselves);
    None when there is no such callback."""
    return await _switch(
        db, "postback_disable_callback(id, $3, $4, NULL, false)", affiliate_id, event_type,
        actor, note,
    )  # fmt: skip


async def enable(
    db: asyncpg.Pool, affiliate_id: str, event_type: str, actor: str, note: str | None
) -> Switched | None:
    """Enable the callback as `actor`'s doing, its streak of dead deliveries forgotten;
    None when there is no such callback."""
    return await _switch(
        db, "postback_enable_callback(id, $3, $4)", affiliate_id, event_type, actor, note
    )


async def _switch(
    db: asyncpg.Pool, call: str, affiliate_id: str, event_type: str, actor: str, note: str | None
) -> Switched | None:
    async with db.acquire() as conn, conn.transaction():
        changed = await conn.fetchval(
            f"SELECT {call} FROM callbacks WHERE affiliate_id = $1 AND event_type = $2",  # noqa: S608 -- constant SQL text
            affiliate_id,
            event_type,
            actor,
            note,
        )
        found = await callbacks.get(conn, affiliate_id, event_type)
    return None if found is None else Switched(found, bool(changed))


async def replay_dead_letters(
    db: asyncpg.Pool,
    redis: ArqRedis,
    queue_name: str,
    callback: Callback,
    mode: Mode,
    actor: str,
    progress: Callable[[int, int], None] | None = None,
) -> Summary:
    """Replay the callback's dead letters, as a bulk replay does: what an enable offers to
    do in the same step."""
    ids = await dead_letters(db, callback)
    return await replay_each(db, redis, queue_name, ids, mode, actor, progress)


async def listing(
    db: Executor, affiliate_id: str | None = None, event_type: str | None = None
) -> list[dict[str, Any]]:
    """Callbacks as the CLI, the API and the page list them: each as `Callback.public`
    says it, with `dead_streak` (its deliveries that died in a row since the last one
    delivered, and `dead_since`, when the first of them did), and, for a disabled one,
    `disabled` (who, when and why, from its last recorded disable; null for one disabled
    before disables were recorded) and `dead_letters` (how many an enable would replay)."""
    rows = await db.fetch(
        f"""
        SELECT c.*, h.dead_streak, h.first_dead_at,
               w.actor AS w_actor, w.at AS w_at, w.note AS w_note, n.count AS n_dead
        FROM callbacks c
        LEFT JOIN callback_health h ON h.callback_id = c.id
        LEFT JOIN LATERAL (
            SELECT a.actor, a.at, a.note FROM actions a
            WHERE a.delivery_id IS NULL AND a.affiliate_id = c.affiliate_id
              AND a.callback_id = c.id AND a.action = 'disable'
            ORDER BY a.id DESC LIMIT 1
        ) w ON NOT c.enabled
        LEFT JOIN LATERAL (
            SELECT count(*) FROM deliveries d WHERE {_DEAD_LETTERS_OF}
        ) n ON NOT c.enabled
        WHERE ($1::text IS NULL OR c.affiliate_id = $1)
          AND ($2::text IS NULL OR c.event_type = $2)
        ORDER BY c.affiliate_id, c.event_type
        """,  # noqa: S608 -- constant SQL text
        affiliate_id,
        event_type,
    )
    listed = []
    for row in rows:
        values = dict(row)
        streak, since = values.pop("dead_streak"), values.pop("first_dead_at")
        actor, at, note = values.pop("w_actor"), values.pop("w_at"), values.pop("w_note")
        count = values.pop("n_dead")
        callback = Callback(**values)
        disabled = None if actor is None else {"actor": actor, "at": at.isoformat(), "note": note}
        listed.append(
            callback.public()
            | {
                "dead_streak": streak or 0,
                "dead_since": None if since is None else since.isoformat(),
                "disabled": disabled,
                "dead_letters": count,
            }
        )
    return listed
