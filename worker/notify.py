"""What the relay tells ops, and getting it to them: POSTBACK_OPS_WEBHOOK.

Three causes make a notification (a row of `notifications`, written by `postback_notify`,
which holds back a second one for the same cause within the hour): a callback disabled (by
a 410 or by its streak of deaths; written in SQL as it is disabled), an affiliate whose dead
letters within a window reach a threshold (`check_dead_letters`), and a destination whose
circuit has stayed open longer than a threshold (`circuit_open`, called by the job that
finds its delivery put off for it: circuits live in each worker's memory).

The sender (`send_due`) posts each due one as JSON to the webhook, through the workers' own
HTTP session, so the SSRF policy and POSTBACK_ALLOW_NETWORKS apply as they do to a
callback; signed as callbacks are when POSTBACK_OPS_WEBHOOK_SECRET is set; tried again
after `BACKOFF` and then given up as `failed`. With no webhook set, a due one is marked
`unsent`: recorded, listed, never posted later to a webhook set since.

`notify_job` runs both, as an arq cron job every `EVERY_SECONDS`.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any, Literal
from urllib.parse import urlsplit

import aiohttp
import structlog

from worker import address, database, deliver, duration, sign
from worker.callbacks import MAX_DELAY_SECONDS
from worker.exchange import Outcome, Request

if TYPE_CHECKING:
    from worker.config import Settings

log = structlog.get_logger("postback.notify")

Kind = Literal["callback_disabled", "dead_letters", "circuit_open"]
State = Literal["pending", "sent", "failed", "unsent"]

EVERY_SECONDS = 15
"""How often the cron job looks: a disable written by a delivery reaches ops within about
this long. Both checks are index range scans and the sender reads an index of due rows
only, so looking this often costs Postgres little; a minute would make ops wait for news
of a callback that stopped."""

BACKOFF = (60.0, 300.0, 1800.0, 7200.0)
"""Seconds before each try again of a notification the webhook did not take (1m, 5m, 30m,
2h); after the last, it is `failed`."""

BUDGET_SHARE = 0.8
"""The share of the job timeout a run may spend sending: it takes no further notification
once a send could outlast it."""

LIFETIME_MARGIN = 86_400.0
"""Added to how long a delivery can live before it dies when bounding the dead-letter
check by when deliveries were taken: a generous day."""

MESSAGE_PREFIX = "ntf_"
"""The webhook-id of notification n is `ntf_<n>`: the same for each try of it."""


def parse_after(text: str) -> float | None:
    """A `POSTBACK_NOTIFY_*` duration in seconds; None (never) for 0 or empty."""
    return duration.parse_setting(text, "15m or 1h", "for never")


def check_url(url: str, allowed: tuple[address.Network, ...]) -> None:
    """Refuse a webhook URL the relay could not or would not post to, as a callback's URL
    is refused when it is saved. The message never quotes the URL: a Slack-compatible
    webhook's path is its secret."""
    try:
        split = urlsplit(url)
        split.port  # noqa: B018 -- raises ValueError for a port that is not 0-65535
    except ValueError:
        raise ValueError("is not a URL; write it like https://hooks.example/services/...") from None
    if split.scheme not in ("http", "https") or not split.hostname:
        raise ValueError("must start with http:// or https:// and a host")
    if "@" in split.netloc:
        raise ValueError("must not have credentials (user:password@) before the host")
    if split.fragment:
        raise ValueError("must not have a fragment ('#' and what follows): it is never sent")
    problem = address.host_problem(split.hostname, allowed)
    if problem is not None:
        raise ValueError(problem)


# --- what is said ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Notification:
    """A row of `notifications`."""

    id: int
    cause: str
    kind: Kind
    text: str
    fields: dict[str, Any]
    created_at: datetime
    state: State
    attempts: int
    next_attempt_at: datetime | None
    status_code: int | None
    error: str | None
    sent_at: datetime | None

    def public(self) -> dict[str, Any]:
        """As the API, the CLI's --json and the page show it."""
        return {
            "id": self.id,
            "cause": self.cause,
            "kind": self.kind,
            "text": self.text,
            "fields": self.fields,
            "created_at": self.created_at.isoformat(),
            "state": self.state,
            "attempts": self.attempts,
            "next_attempt_at": _iso(self.next_attempt_at),
            "status_code": self.status_code,
            "error": self.error,
            "sent_at": _iso(self.sent_at),
        }


def _iso(at: datetime | None) -> str | None:
    return None if at is None else at.isoformat()


def payload(n: Notification) -> dict[str, Any]:
    """The JSON posted: `text` for people (what Slack-compatible incoming webhooks show), the
    rest for machines."""
    return {
        "text": n.text,
        "id": n.id,
        "kind": n.kind,
        "cause": n.cause,
        "created_at": n.created_at.isoformat(),
        "fields": n.fields,
    }


def request(
    url: str, n: Notification, secret: str | sign.Signer | None, timestamp: int | None = None
) -> Request:
    """The POST of notification `n`, signed as a callback's POST is (Standard Webhooks over
    the body) when there is a secret; `timestamp` is the signature's (default now)."""
    body = json.dumps(payload(n), separators=(",", ":")).encode()
    message_id = f"{MESSAGE_PREFIX}{n.id}"
    headers = {
        "User-Agent": deliver.USER_AGENT,
        "Content-Type": "application/json",
        "Idempotency-Key": message_id,
    }
    if secret is not None:
        signer = sign.Signer(secret) if isinstance(secret, str) else secret
        signed_at = int(time.time()) if timestamp is None else timestamp
        headers |= signer.headers(message_id, signed_at, body)
    return Request("POST", url, headers, body)


def next_wait(attempts: int) -> float | None:
    """Seconds before trying again a notification `attempts` tries failed to send; None when
    that was the last."""
    return BACKOFF[attempts - 1] if attempts <= len(BACKOFF) else None


def failure(outcome: Outcome) -> str | None:
    """Why the webhook did not take it, or None when it did (any 2xx)."""
    if outcome.ok:
        return None
    if outcome.status is not None:
        return f"HTTP {outcome.status}: {outcome.excerpt[:200]}".rstrip(": ")
    return f"{outcome.error_class}: {outcome.error}"


def dead_letters_text(affiliate: str, count: int, window: float, threshold: int) -> str:
    return (
        f"Postback affiliate {affiliate}: {count} deliveries died in the last "
        f"{duration.spell(int(window))} (the threshold is {threshold}); "
        f"see `postback dlq list --affiliate {affiliate}`"
    )


def circuit_text(origin: str, open_seconds: float) -> str:
    return (
        f"Postback destination {origin}: its circuit has been open for "
        f"{_minutes(open_seconds)}, its deliveries waiting until it answers again"
    )


def _minutes(seconds: float) -> str:
    whole = int(seconds)
    if whole < 60:
        return f"{whole}s"
    hours, minutes = divmod(whole // 60, 60)
    return f"{hours}h {minutes}m" if hours else f"{minutes}m"


# --- the checks -----------------------------------------------------------------------------


async def notify(
    db: database.Executor, cause: str, kind: Kind, text: str, fields: Any
) -> int | None:
    """Write a notification unless the same cause had one in the last hour; its id, or None."""
    found: int | None = await db.fetchval(
        "SELECT postback_notify($1, $2, $3, $4)", cause, kind, text, fields
    )
    return found


def taken_since(window: float, schedule: tuple[float, ...], create_wait: float) -> float:
    """How far back deliveries dying in the last `window` seconds may have been taken: the
    longest a delivery lives (its callback's delay, the wait for its order's create, every
    retry), plus a margin. It bounds the scan of `deliveries_state`, which is ordered by
    when each was taken, not by when it died; a dead letter replayed long after it was
    taken that dies again is left out of the count."""
    return window + MAX_DELAY_SECONDS + create_wait + sum(schedule) + LIFETIME_MARGIN


_DEAD_BY_AFFILIATE = """
    SELECT affiliate_id, count(*) AS dead
    FROM deliveries
    WHERE state = 'dead'
      AND created_at >= now() - make_interval(secs => $2)
      AND updated_at >= now() - make_interval(secs => $1)
    GROUP BY affiliate_id
    HAVING count(*) >= $3
    ORDER BY affiliate_id
"""


async def check_dead_letters(db: database.Executor, settings: Settings) -> list[int]:
    """A notification for each affiliate whose deliveries that died in the window reach the
    threshold (once an hour at most); the ids of those written."""
    threshold = settings.notify_dead_letters
    window = settings.dead_letters_window
    if not threshold:
        return []
    since = taken_since(window, settings.schedule, settings.create_wait)
    written = []
    for row in await db.fetch(_DEAD_BY_AFFILIATE, window, since, threshold):
        affiliate, count = row["affiliate_id"], row["dead"]
        fields = {
            "affiliate_id": affiliate,
            "dead_letters": count,
            "window": duration.spell(int(window)),
            "window_seconds": window,
            "threshold": threshold,
        }
        text = dead_letters_text(affiliate, count, window, threshold)
        made = await notify(db, f"dead_letters:{affiliate}", "dead_letters", text, fields)
        if made is not None:
            written.append(made)
    return written


async def circuit_open(
    db: database.Executor, origin: str, open_seconds: float, opened_at: datetime
) -> int | None:
    """A notification that the circuit of `origin` (scheme://host:port only: a destination
    never carries a path or query, which may hold an affiliate's token) has stayed open for
    `open_seconds`, since `opened_at`."""
    fields = {
        "origin": origin,
        "open_seconds": round(open_seconds),
        "opened_at": opened_at.isoformat(),
    }
    text = circuit_text(origin, open_seconds)
    return await notify(db, f"circuit_open:{origin}", "circuit_open", text, fields)


# --- the sender -----------------------------------------------------------------------------


_CLAIM = """
    UPDATE notifications n
    SET next_attempt_at = now() + make_interval(secs => $1)
    WHERE n.id = (
        SELECT id FROM notifications
        WHERE state = 'pending' AND next_attempt_at <= now()
        ORDER BY next_attempt_at, id
        LIMIT 1
        FOR UPDATE SKIP LOCKED
    )
    RETURNING n.*
"""

_SENT = """
    UPDATE notifications
    SET state = 'sent', attempts = attempts + 1, status_code = $2, error = NULL,
        sent_at = now(), next_attempt_at = NULL
    WHERE id = $1
"""

_FAILED = """
    UPDATE notifications
    SET state = CASE WHEN $4::float8 IS NULL THEN 'failed' ELSE 'pending' END,
        attempts = attempts + 1, status_code = $2, error = $3,
        next_attempt_at = now() + make_interval(secs => $4)  -- NULL once failed
    WHERE id = $1
"""

_UNSENT = """
    UPDATE notifications SET state = 'unsent', next_attempt_at = NULL
    WHERE state = 'pending' AND next_attempt_at <= now()
"""


@dataclass(slots=True)
class Sent:
    """What a run of the sender did."""

    sent: int = 0
    retrying: int = 0
    failed: int = 0
    unsent: int = 0


async def send_due(
    db: database.Executor,
    http: aiohttp.ClientSession,
    settings: Settings,
    until: float | None = None,
) -> Sent:
    """Post every due notification, one at a time; `until` (a `time.monotonic()` time): no
    post but the first starts after it. Each is claimed for as long as a post can take (it
    goes again if the worker dies meanwhile, under the same webhook-id), so two workers
    never post the same one at once."""
    done = Sent()
    if settings.ops_webhook is None:
        done.unsent = int((await db.execute(_UNSENT)).split()[-1])
        return done
    url = settings.ops_webhook.get_secret_value()
    secret = settings.ops_webhook_secret
    signer = None if secret is None else sign.Signer(secret.get_secret_value())
    hold = settings.connect_timeout + deliver.QUICK_RETRY_SECONDS + settings.request_timeout
    posted = 0
    # The first post of a run goes whatever is left of `until`: a job timeout that leaves
    # less than a post can take must still send, one a run.
    while not posted or until is None or time.monotonic() + hold < until:
        posted += 1
        row = await db.fetchrow(_CLAIM, hold + settings.job_timeout)
        if row is None:
            break
        n = Notification(**dict(row))
        outcome = await deliver.attempt(http, request(url, n, signer))
        why = failure(outcome)
        if why is None:
            await db.execute(_SENT, n.id, outcome.status)
            done.sent += 1
            log.info("notification_sent", id=n.id, cause=n.cause, status_code=outcome.status)
            continue
        wait = next_wait(n.attempts + 1)
        await db.execute(_FAILED, n.id, outcome.status, why, wait)
        if wait is None:
            done.failed += 1
        else:
            done.retrying += 1
        log.warning(
            "notification_failed",
            id=n.id,
            cause=n.cause,
            attempts=n.attempts + 1,
            error=why,
            retry_in_s=wait,
        )
    return done


async def notify_job(ctx: dict[str, Any]) -> int:
    """The arq cron job: the dead-letter check, then the sender; how many it posted.

    Only one worker runs each run (arq enqueues a cron run under its name and time), for at
    most the job timeout, as the prune; the circuit check is each worker's own, in the job
    (`circuit_open`)."""
    settings: Settings = ctx["settings"]
    started = time.monotonic()
    try:
        await check_dead_letters(ctx["db"], settings)
        done = await send_due(
            ctx["db"], ctx["http"], settings, until=started + settings.job_timeout * BUDGET_SHARE
        )
    except database.UNAVAILABLE as exc:
        # Nothing is lost: the rows wait in Postgres for the next run.
        log.warning("notify_failed", error=f"{type(exc).__name__}: {exc}")
        return 0
    return done.sent


# --- what ops read --------------------------------------------------------------------------


async def recent(
    db: database.Executor, limit: int, before: int | None = None
) -> tuple[list[Notification], int | None]:
    """The newest notifications, `limit` of them, with ids below `before` when given; and
    the `before` of the next page, None on the last."""
    rows = await db.fetch(
        """
        SELECT * FROM notifications
        WHERE $2::bigint IS NULL OR id < $2
        ORDER BY id DESC
        LIMIT $1
        """,
        limit + 1,
        before,
    )
    found = [Notification(**dict(row)) for row in rows[:limit]]
    more = len(rows) > limit
    return found, (found[-1].id if more else None)
