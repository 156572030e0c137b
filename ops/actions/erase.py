"""Erasure: an affiliate's stored events and requests removed on request, and the request
recorded without them.

An affiliate's events and the requests made from them are stored in its deliveries
(`event`, `request`), their attempts (each attempt's request, response headers and excerpt)
and its test fires (`test_fires`); deleting those rows is the erasure. A delivery's
attempts and the ops actions on it go with it (`ON DELETE CASCADE`). Nothing else in
Postgres holds an event: the callbacks are configuration, kept; a delivery that settled
has no job left in Redis (a job ends once its delivery settles, and the workers keep no
results). Log lines are the log system's to keep or erase.

Open deliveries (accepted, pending, retrying) are kept: each is work the relay accepted, whose job
is in Redis and would write the delivery again. The erase says how many it kept, to run
again once they settle.

It works as the prune does (worker/prune.py): batches of one short statement each, with a
rest after each, so a large affiliate is erased while deliveries flow. The erase is one
row in `actions`, written before the first batch and its counts kept up to date by each
batch in the same statement: an erase cut short still says what went. It names the
affiliate, who asked and why, and how many rows of each kind went: never an event, an
order number or a URL.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import structlog

from producer.event import STORE_WIDE
from worker import prune
from worker.database import Executor
from worker.ledger import OPEN_STATES

log = structlog.get_logger("postback.ops")


class NotErasable(ValueError):
    """The affiliate id names nothing an erase can take."""


class NothingStored(LookupError):
    """Nothing at all is stored for the affiliate: most likely a mistyped id."""


@dataclass(slots=True)
class Erased:
    """What an erase removed (or, dry, would remove), and the open deliveries it kept."""

    deliveries: int = 0
    attempts: int = 0
    test_fires: int = 0
    kept_open: int = 0
    action_id: int | None = None
    """The `actions` row that records it; None for a dry run."""

    @property
    def rows(self) -> int:
        """The rows taken one by one, which a progress bar counts: attempts go with their
        deliveries."""
        return self.deliveries + self.test_fires

    def detail(self) -> dict[str, int]:
        """The counts, as the action's `detail` holds them."""
        counts = asdict(self)
        del counts["action_id"]
        return counts


def check_affiliate(affiliate: str) -> str:
    """The affiliate id an erase takes, or `NotErasable` saying why not."""
    if not affiliate.strip():
        raise NotErasable("give the affiliate id whose deliveries and test fires go")
    if affiliate == STORE_WIDE:
        raise NotErasable(
            f"'{STORE_WIDE}' names the store-wide callback, not an affiliate: deliveries and "
            "test fires are stored under the affiliate each event was for; erase that one"
        )
    return affiliate


_COUNT = """
    SELECT count(*) FILTER (WHERE d.state <> ALL($2::text[])) AS deliveries,
           count(*) FILTER (WHERE d.state = ANY($2::text[])) AS kept_open,
           (SELECT count(*) FROM attempts a JOIN deliveries s ON s.id = a.delivery_id
            WHERE s.affiliate_id = $1 AND s.state <> ALL($2::text[])) AS attempts,
           (SELECT count(*) FROM test_fires WHERE affiliate_id = $1) AS test_fires
    FROM deliveries d WHERE d.affiliate_id = $1
"""

# A page of the affiliate's deliveries in `deliveries_affiliate_created` order, after the
# last one seen ($2, $3; the bound on created_at alone lets the index start there): its
# settled ones deleted (the state is checked on the row as it is then, so one replayed
# meanwhile stays), their attempts counted as they were before the statement, and both
# added to the action's counts.
_DELETE = """
    WITH page AS (
        SELECT id, created_at FROM deliveries
        WHERE affiliate_id = $1 AND created_at >= $2 AND (created_at, id) > ($2, $3)
        ORDER BY created_at, id
        LIMIT $4
    ), gone AS (
        DELETE FROM deliveries d USING page
        WHERE d.id = page.id AND d.state <> ALL($5::text[])
        RETURNING d.id
    ), counted AS (
        SELECT (SELECT count(*) FROM gone) AS deliveries,
               (SELECT count(*) FROM attempts WHERE delivery_id IN (SELECT id FROM gone))
                   AS attempts
    ), noted AS (
        UPDATE actions SET detail = detail || jsonb_build_object(
            'deliveries', (detail->>'deliveries')::bigint + counted.deliveries,
            'attempts', (detail->>'attempts')::bigint + counted.attempts)
        FROM counted WHERE actions.id = $6
    )
    SELECT p.created_at, p.id, c.deliveries, c.attempts
    FROM page p, counted c
    ORDER BY p.created_at DESC, p.id DESC
    LIMIT 1
"""

# Test fires are few (each one a person's click): no index of their affiliate is needed.
_DELETE_TEST_FIRES = """
    WITH gone AS (
        DELETE FROM test_fires WHERE id IN (
            SELECT id FROM test_fires WHERE affiliate_id = $1 ORDER BY id LIMIT $2)
        RETURNING id
    ), noted AS (
        UPDATE actions SET detail = detail || jsonb_build_object(
            'test_fires', (detail->>'test_fires')::bigint + (SELECT count(*) FROM gone))
        WHERE id = $3
    )
    SELECT count(*) FROM gone
"""


async def count(db: Executor, affiliate: str) -> Erased:
    """What an erase of `affiliate` would remove now, and the open deliveries it would
    keep; `NothingStored` when there is none of either."""
    check_affiliate(affiliate)
    row = await db.fetchrow(_COUNT, affiliate, list(OPEN_STATES))
    assert row is not None  # an aggregate: one row
    found = Erased(row["deliveries"], row["attempts"], row["test_fires"], row["kept_open"])
    if not (found.rows or found.kept_open):
        raise NothingStored(f"no deliveries or test fires are stored for affiliate {affiliate}")
    return found


async def erase(
    db: Executor,
    affiliate: str,
    actor: str,
    note: str | None = None,
    *,
    batch: int = prune.BATCH,
    rest: float = prune.REST,
    progress: Callable[[Erased], None] | None = None,
) -> Erased:
    """Delete the affiliate's settled deliveries (with their attempts and actions) and its
    test fires, in batches, recorded as one `erase` action by `actor` because of `note`.
    `progress` is called with the totals so far between batches. `NothingStored` when
    there is nothing of the affiliate to erase or keep."""
    await count(db, affiliate)
    erased = Erased()
    erased.action_id = await db.fetchval(
        """
        INSERT INTO actions (action, actor, note, affiliate_id, detail)
        VALUES ('erase', $1, $2, $3, $4)
        RETURNING id
        """,
        actor,
        note.strip() if note and note.strip() else None,
        affiliate,
        erased.detail(),
    )
    shown = None if progress is None else lambda: progress(erased)
    after: tuple[Any, ...] = prune.FIRST

    async def deliveries() -> bool:
        nonlocal after
        row = await db.fetchrow(
            _DELETE, affiliate, *after, batch, list(OPEN_STATES), erased.action_id
        )
        if row is None:
            return False
        erased.deliveries += row["deliveries"]
        erased.attempts += row["attempts"]
        after = (row["created_at"], row["id"])
        return True

    async def test_fires() -> bool:
        gone: int = await db.fetchval(_DELETE_TEST_FIRES, affiliate, batch, erased.action_id)
        erased.test_fires += gone
        return gone > 0

    await prune.in_batches(deliveries, rest=rest, progress=shown)
    await prune.in_batches(test_fires, rest=rest, progress=shown)
    erased.kept_open = await db.fetchval(
        """
        WITH kept AS (
            SELECT count(*) AS n FROM deliveries
            WHERE affiliate_id = $1 AND state = ANY($2::text[])
        ), noted AS (
            UPDATE actions SET detail = detail || jsonb_build_object('kept_open', kept.n)
            FROM kept WHERE actions.id = $3
        )
        SELECT n FROM kept
        """,
        affiliate,
        list(OPEN_STATES),
        erased.action_id,
    )
    log.info("affiliate_erased", affiliate_id=affiliate, actor=actor, **erased.detail())
    return erased


AFFILIATE_ACTIONS = 50
"""The records an affiliate's listing shows: its newest."""


async def affiliate_actions(
    db: Executor, affiliate: str, limit: int = AFFILIATE_ACTIONS
) -> list[dict[str, Any]]:
    """What was done to an affiliate's callbacks and records, newest first: disables,
    enables and erases (`actions` rows that name no delivery). `*`: the store-wide
    callback's."""
    rows = await db.fetch(
        """
        SELECT id, action, actor, note, at, event_type, callback_id, detail FROM actions
        WHERE delivery_id IS NULL AND affiliate_id = $1
        ORDER BY id DESC
        LIMIT $2
        """,
        affiliate,
        limit,
    )
    listed = []
    for row in rows:
        detail = row["detail"]
        if detail is not None:  # jsonb keeps keys in an order of its own: an erase's in ours
            detail = {k: detail[k] for k in Erased().detail() if k in detail} | detail
        listed.append(dict(row) | {"at": row["at"].isoformat(), "detail": detail})
    return listed
