"""Affiliates' callbacks: validated when saved, loaded by the worker for each event."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal

import asyncpg

from producer.event import EVENT_TYPES, STORE_WIDE, EventType
from worker import address, duration, render, sign
from worker.database import Executor

Method = Literal["GET", "POST"]
METHODS: tuple[Method, ...] = ("GET", "POST")
GENERATE = "generate"
"""Given as the secret, has a new random one made (`sign.generate`)."""


MAX_DELAY_SECONDS = 86_400
"""The longest a callback may put off its deliveries: 24 hours."""

MAX_STATUSES = 32
MAX_STATUS_LENGTH = 64
"""As long as an event's `order.status` may be (producer/event.py)."""


class CallbackError(ValueError):
    """A callback was refused; `field` names what is wrong, the message says why."""

    def __init__(self, field: str, message: str) -> None:
        self.field = field
        self.message = message
        super().__init__(message)


@dataclass(frozen=True, slots=True)
class Callback:
    id: int
    affiliate_id: str
    event_type: EventType
    method: Method
    url_template: str
    secret: str | None
    enabled: bool
    created_at: datetime
    updated_at: datetime
    statuses: list[str] | None = None
    """The order statuses it fires for; None: every event, whatever its status."""
    delay_seconds: int = 0
    """How long after an event was accepted its delivery becomes due."""

    @property
    def store_wide(self) -> bool:
        """For every affiliate without a callback of its own for the event type (`find`)."""
        return self.affiliate_id == STORE_WIDE

    def refusal(self, status: str | None) -> str | None:
        """Why an event with order status `status` is not for this callback (it is recorded
        skipped with this reason), or None when it is."""
        if self.statuses is None or status in self.statuses:
            return None
        return f"status {status or '(none)'} not in {', '.join(self.statuses)}"

    def public(self) -> dict[str, Any]:
        """What listings show: everything but the secret, which is only said to exist."""
        return {
            "id": self.id,
            "affiliate_id": self.affiliate_id,
            "store_wide": self.store_wide,
            "event_type": self.event_type,
            "method": self.method,
            "url_template": self.url_template,
            "statuses": self.statuses,
            "delay": duration.spell(self.delay_seconds),
            "delay_seconds": self.delay_seconds,
            "has_secret": self.secret is not None,
            "enabled": self.enabled,
            "created_at": self.created_at.isoformat(),
            "updated_at": self.updated_at.isoformat(),
        }


@dataclass(frozen=True, slots=True)
class CallbackSpec:
    """A callback as given by a person, validated: what `save` writes."""

    affiliate_id: str
    event_type: EventType
    method: Method
    template: render.Template
    secret: str | None
    generated: bool = False
    """The secret was made here, so the person saving it must be shown it, once."""
    remove_secret: bool = False
    """Saved without a secret, its requests unsigned; else a spec without one keeps the
    stored secret."""
    statuses: tuple[str, ...] | None = None
    delay_seconds: int = 0


def validate(
    affiliate_id: str,
    event_type: str,
    method: str,
    url_template: str,
    secret: str | None = None,
    *,
    allowed: Sequence[address.Network],
    remove_secret: bool = False,
    statuses: str | Sequence[str] | None = None,
    delay: str | int | None = None,
) -> CallbackSpec:
    """`allowed` are the networks the SSRF policy opens (`Settings.allowed`): a host that is
    a refused address outside them is refused here, before any event is sent there.
    `secret=None` keeps the stored secret, unless `remove_secret`. `statuses` as typed
    (`"approved,refunded"`) or as a list, None for every status; `delay` as typed (`"5m"`)
    or in seconds, None for none."""
    if not 1 <= len(affiliate_id) <= 64:
        raise CallbackError("affiliate_id", "affiliate id must be 1 to 64 characters")
    if event_type not in EVENT_TYPES:
        raise CallbackError(
            "event_type", f"event must be one of {', '.join(EVENT_TYPES)}, got {event_type!r}"
        )
    method = method.upper()
    if method not in METHODS:
        raise CallbackError("method", f"method must be GET or POST, got {method!r}")
    if secret is not None and not secret:
        raise CallbackError("secret", "secret must not be empty")
    if secret is not None and remove_secret:
        raise CallbackError("secret", "give a secret or remove it, not both")
    generated = secret == GENERATE
    if generated:
        secret = sign.generate()
    elif secret is not None:
        try:
            sign.key(secret)
        except ValueError as exc:
            raise CallbackError("secret", str(exc)) from None
    try:
        template = render.parse(url_template)
        render.check_new(template)
    except render.TemplateError as exc:
        raise CallbackError("url", str(exc)) from None
    _check_host(template.host, allowed)
    return CallbackSpec(
        affiliate_id,
        event_type,
        method,
        template,
        secret,
        generated,
        remove_secret,
        parse_statuses(statuses),
        parse_delay(delay),
    )


def parse_statuses(statuses: str | Sequence[str] | None) -> tuple[str, ...] | None:
    """The statuses a callback fires for, in the order given; None (every status) for None.

    Typed as one comma-separated text (the CLI, the page) or as a list (the API), each
    status is checked the same way, so both refuse the same input with the same message.
    """
    if statuses is None:
        return None
    items = statuses.split(",") if isinstance(statuses, str) else list(statuses)
    if not items:
        raise CallbackError(
            "statuses",
            "statuses must name at least one order status, e.g. approved,refunded; got none "
            "(to fire for every status, leave statuses out)",
        )
    if len(items) > MAX_STATUSES:
        raise CallbackError(
            "statuses", f"{len(items)} statuses listed; at most {MAX_STATUSES} may be"
        )
    found: list[str] = []
    for raw in items:
        status = raw.strip()
        if not status:
            raise CallbackError(
                "statuses",
                "statuses must be order statuses separated by commas, e.g. approved,refunded; "
                "got an empty one",
            )
        if len(status) > MAX_STATUS_LENGTH:
            raise CallbackError(
                "statuses",
                f"status {status[:20]!r}... is longer than an order status can be "
                f"({MAX_STATUS_LENGTH} characters)",
            )
        if status in found:
            raise CallbackError("statuses", f"status {status!r} is listed twice")
        found.append(status)
    return tuple(found)


def parse_delay(delay: str | int | None) -> int:
    """A callback's delay in whole seconds, 0 to 24 hours; None and `"0"` are none."""
    if delay is None:
        return 0
    # An int is compared as it is: float() of a huge one would overflow.
    seconds = delay if isinstance(delay, int) else _typed_delay(delay)
    if not 0 <= seconds <= MAX_DELAY_SECONDS:
        raise CallbackError(
            "delay", f"delay {delay!r} is out of range; it may be 0 to 24h (86400 s)"
        )
    if seconds != int(seconds):
        raise CallbackError("delay", f"delay {delay!r} is not a whole number of seconds")
    return int(seconds)


def _typed_delay(text: str) -> float:
    typed = text.strip()
    try:
        return 0.0 if typed == "0" else duration.parse(typed)
    except ValueError:
        raise CallbackError(
            "delay", f"delay {typed!r} is not a duration; write it like 90s, 5m or 2h"
        ) from None


def _check_host(host: str, allowed: Sequence[address.Network]) -> None:
    problem = address.host_problem(host, allowed)
    if problem is not None:
        raise CallbackError("url", problem)


def _from_row(row: asyncpg.Record) -> Callback:
    # The dataclass mirrors the table's columns, so SELECT * maps one to one.
    return Callback(**dict(row))


async def save(conn: Executor, spec: CallbackSpec) -> Callback:
    """Create or replace the callback for the affiliate and event type.

    A spec without a secret keeps the stored one, unless it says to remove it: re-pointing
    a URL must not silently stop the signatures the affiliate checks. A disabled callback
    stays disabled: who disabled it and why stays the last word on it until someone enables
    it (`ops.actions.switch`), which is recorded too.
    """
    row = await conn.fetchrow(
        """
        INSERT INTO callbacks (affiliate_id, event_type, method, url_template, secret,
                               statuses, delay_seconds)
        VALUES ($1, $2, $3, $4, $5, $7, $8)
        ON CONFLICT (affiliate_id, event_type) DO UPDATE
        SET method = EXCLUDED.method, url_template = EXCLUDED.url_template,
            secret = CASE WHEN $6 THEN NULL ELSE COALESCE(EXCLUDED.secret, callbacks.secret) END,
            statuses = EXCLUDED.statuses, delay_seconds = EXCLUDED.delay_seconds,
            updated_at = now()
        RETURNING *
        """,
        spec.affiliate_id,
        spec.event_type,
        spec.method,
        spec.template.source,
        spec.secret,
        spec.remove_secret,
        None if spec.statuses is None else list(spec.statuses),
        spec.delay_seconds,
    )
    assert row is not None
    return _from_row(row)


async def get(conn: Executor, affiliate_id: str, event_type: str) -> Callback | None:
    row = await conn.fetchrow(
        "SELECT * FROM callbacks WHERE affiliate_id = $1 AND event_type = $2",
        affiliate_id,
        event_type,
    )
    return None if row is None else _from_row(row)


async def find(conn: Executor, affiliate_id: str, event_type: str) -> Callback | None:
    """The callback an affiliate's event goes to: its own, enabled or not (a disabled one
    stops its postbacks, it does not hand them to the store), else the store-wide one."""
    row = await conn.fetchrow(
        """
        SELECT * FROM callbacks
        WHERE affiliate_id IN ($1, $3) AND event_type = $2
        ORDER BY affiliate_id = $3
        LIMIT 1
        """,
        affiliate_id,
        event_type,
        STORE_WIDE,
    )
    return None if row is None else _from_row(row)


async def remove(conn: Executor, affiliate_id: str, event_type: str) -> bool:
    """Remove the callback; False when there was none. Past deliveries stay recorded."""
    status: str = await conn.execute(
        "DELETE FROM callbacks WHERE affiliate_id = $1 AND event_type = $2",
        affiliate_id,
        event_type,
    )
    return status != "DELETE 0"
