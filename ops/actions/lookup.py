"""Reading the ledger for people: deliveries and dead letters by filter, one in full.

The API, the page and the CLI all read through here, so a filter means the same thing
wherever it is typed, and a bad one is refused with the same words.
"""

from __future__ import annotations

import base64
import binascii
import uuid
from collections.abc import Mapping
from dataclasses import astuple, dataclass, fields, replace
from datetime import UTC, datetime, timedelta
from typing import Any

from producer.event import EVENT_TYPES
from worker.database import Executor
from worker.ledger import STATES
from worker.retry import parse_schedule

DEFAULT_LIMIT = 50
MAX_LIMIT = 500


class InputError(ValueError):
    """A value a person or a script gave was refused; `field` names it, the message says why."""

    def __init__(self, field: str, message: str) -> None:
        self.field = field
        self.message = message
        super().__init__(f"{field}: {message}")


@dataclass(frozen=True, slots=True)
class Filter:
    """Which deliveries to list. Every field is optional; set ones must all match."""

    affiliate: str | None = None
    event_type: str | None = None
    order: str | None = None
    state: str | None = None
    error_class: str | None = None
    since: datetime | None = None
    """Taken by the relay at or after this time."""
    until: datetime | None = None
    """Taken by the relay before this time."""

    @classmethod
    def parse(cls, given: Mapping[str, str | None], now: datetime | None = None) -> Filter:
        """A filter from text (query parameters, command-line options); unknown keys are
        the caller's to refuse. Times are ISO 8601, or a duration meaning that long ago."""
        text = {f.name: given.get(f.name) or None for f in fields(cls)}
        for name, value in text.items():
            if value is not None:
                check_text(name, value)
        if text["event_type"] is not None and text["event_type"] not in EVENT_TYPES:
            raise InputError("event_type", f"must be one of {', '.join(EVENT_TYPES)}")
        if text["state"] is not None and text["state"] not in STATES:
            raise InputError("state", f"must be one of {', '.join(STATES)}")
        at = now or datetime.now(UTC)
        since = _time("since", text["since"], at)
        until = _time("until", text["until"], at)
        if since is not None and until is not None and since >= until:
            raise InputError("until", "must be later than since")
        return cls(
            text["affiliate"],
            text["event_type"],
            text["order"],
            text["state"],
            text["error_class"],
            since,
            until,
        )

    def dead_letters(self) -> Filter:
        """This filter over dead letters only: dead, neither replayed nor discarded."""
        return replace(self, state="dead")


FILTER_FIELDS = tuple(f.name for f in fields(Filter))


def check_text(field: str, value: str) -> str:
    """Text that Postgres can hold: no NUL, and valid UTF-8 (no lone surrogates)."""
    if "\x00" in value:
        raise InputError(field, "must not contain the NUL character")
    try:
        value.encode()
    except UnicodeEncodeError:
        raise InputError(field, "must be valid Unicode text") from None
    return value


def _time(name: str, value: str | None, now: datetime) -> datetime | None:
    if value is None:
        return None
    try:
        steps = parse_schedule(value)
    except ValueError:
        pass
    else:
        if len(steps) == 1:
            try:
                return _in_range(name, now - timedelta(seconds=steps[0]))
            except OverflowError:
                raise InputError(name, "is further back than any time Postgres holds") from None
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        raise InputError(
            name, "must be an ISO 8601 time (2026-11-21T09:00:00Z) or a duration (30m, 2h, 7d)"
        ) from None
    # A time without a zone is read as UTC: the relay records and shows UTC.
    return _in_range(name, parsed if parsed.tzinfo is not None else parsed.replace(tzinfo=UTC))


_EARLIEST = datetime(1, 1, 2, tzinfo=UTC)
_LATEST = datetime(9999, 12, 30, tzinfo=UTC)


def _in_range(name: str, at: datetime) -> datetime:
    # Year 1 and 9999 with an offset fall outside what Postgres (and Python) can hold.
    if not _EARLIEST <= at <= _LATEST:
        raise InputError(name, "must be between the years 1 and 9999")
    return at


def parse_limit(value: str | None) -> int:
    if value is None or value == "":
        return DEFAULT_LIMIT
    if not value.isascii() or not value.isdigit() or not 1 <= int(value) <= MAX_LIMIT:
        raise InputError("limit", f"must be a whole number from 1 to {MAX_LIMIT}")
    return int(value)


def parse_id(value: str, field: str = "id") -> uuid.UUID:
    try:
        return uuid.UUID(value)
    except ValueError:
        raise InputError(field, "must be a delivery id (a UUID)") from None


@dataclass(frozen=True, slots=True)
class Cursor:
    """Where the next page starts: after this (created_at, id), newest first."""

    created_at: datetime
    id: uuid.UUID

    def encode(self) -> str:
        raw = f"{self.created_at.isoformat()}|{self.id}".encode()
        return base64.urlsafe_b64encode(raw).decode().rstrip("=")

    @classmethod
    def decode(cls, value: str) -> Cursor:
        try:
            raw = base64.urlsafe_b64decode(value + "=" * (-len(value) % 4)).decode()
            created, did = raw.split("|")
            at = datetime.fromisoformat(created)
            if at.tzinfo is None or not _EARLIEST <= at <= _LATEST:
                raise ValueError
            return cls(at, uuid.UUID(did))
        except (ValueError, binascii.Error, UnicodeDecodeError):
            raise InputError("cursor", "is not one this service gave out") from None


_SUMMARY = """
    d.id, d.event_id, d.event_type, d.affiliate_id, d.order_number, d.state, d.reason,
    d.error_class, d.attempts, d.created_at, d.updated_at, d.next_attempt_at, d.occurred_at,
    d.blocked_by, d.create_wait_until, d.order_note,
    (SELECT a.status_code FROM attempts a WHERE a.delivery_id = d.id
     ORDER BY a.number DESC LIMIT 1) AS last_status
"""

_WHERE = """
    ($1::text IS NULL OR d.affiliate_id = $1)
    AND ($2::text IS NULL OR d.event_type = $2)
    AND ($3::text IS NULL OR d.order_number = $3)
    AND ($4::text IS NULL OR d.state = $4)
    AND ($5::text IS NULL OR d.error_class = $5)
    AND ($6::timestamptz IS NULL OR d.created_at >= $6)
    AND ($7::timestamptz IS NULL OR d.created_at < $7)
"""


@dataclass(frozen=True, slots=True)
class Page:
    items: list[dict[str, Any]]
    next: str | None
    """The cursor of the next page; None on the last."""


async def list_deliveries(
    db: Executor, where: Filter, limit: int = DEFAULT_LIMIT, after: Cursor | None = None
) -> Page:
    """Deliveries matching `where`, newest first, a page at a time."""
    rows = await db.fetch(
        f"""
        SELECT {_SUMMARY} FROM deliveries d
        WHERE {_WHERE}
          AND ($8::timestamptz IS NULL OR (d.created_at, d.id) < ($8, $9))
        ORDER BY d.created_at DESC, d.id DESC
        LIMIT $10
        """,  # noqa: S608 -- constant SQL text; every value goes as a parameter
        *astuple(where),  # the fields in the order of $1 to $7
        None if after is None else after.created_at,
        None if after is None else after.id,
        limit + 1,
    )
    items = [_plain(dict(row)) for row in rows[:limit]]
    more = len(rows) > limit
    last = rows[limit - 1] if more else None
    cursor = None if last is None else Cursor(last["created_at"], last["id"]).encode()
    return Page(items, cursor)


async def matching_ids(db: Executor, where: Filter) -> list[uuid.UUID]:
    """Every delivery matching `where`, oldest first: what a bulk action works through."""
    rows = await db.fetch(
        f"SELECT d.id FROM deliveries d WHERE {_WHERE} ORDER BY d.created_at, d.id",  # noqa: S608
        *astuple(where),  # the fields in the order of $1 to $7
    )
    return [row["id"] for row in rows]


async def show_delivery(db: Executor, delivery: uuid.UUID) -> dict[str, Any] | None:
    """One delivery in full: its event, last request, every attempt, and what ops did."""
    row = await db.fetchrow(
        f"""
        SELECT {_SUMMARY}, d.callback_id, d.event, d.request
        FROM deliveries d WHERE d.id = $1
        """,  # noqa: S608 -- constant SQL text
        delivery,
    )
    if row is None:
        return None
    attempts = await db.fetch(
        """
        SELECT number, started_at, duration_ms, status_code, error_class, error,
               response_excerpt, request
        FROM attempts WHERE delivery_id = $1 ORDER BY number
        """,
        delivery,
    )
    actions = await db.fetch(
        "SELECT action, mode, actor, note, attempt, at FROM actions"
        " WHERE delivery_id = $1 ORDER BY id",
        delivery,
    )
    return {
        **_plain(dict(row)),
        "attempts": [_plain(dict(a)) for a in attempts],
        "actions": [_plain(dict(a)) for a in actions],
    }


def _plain(values: dict[str, Any]) -> dict[str, Any]:
    """JSON-ready: times as ISO 8601 text, ids as text."""
    out: dict[str, Any] = {}
    for key, value in values.items():
        if isinstance(value, datetime):
            out[key] = value.isoformat()
        elif isinstance(value, uuid.UUID):
            out[key] = str(value)
        else:
            out[key] = value
    return out
